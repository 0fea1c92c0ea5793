/*
 * Split virtqueue, driver side (virtio spec 2.7). The queue allocates nothing: the caller gives it
 * one physically contiguous, 4096-aligned area of vq_mem_bytes() bytes and a struct virtqueue.
 *
 * Everything the device writes (used.idx, used entries, used.flags, avail_event) is untrusted.
 * A used ring that breaks the rules puts the queue into a sticky "broken" state with a message
 * (vq_violation()); no descriptor is ever freed on the word of a bad entry.
 *
 * Typical use (the caller owns the transport):
 *
 *     vq_init(&vq, "inflate", 0, size, mem, legacy, 0, false, event_idx);
 *     vq_addrs(&vq, &a); t->ops->queue_enable(t, 0, size, &a);
 *     vq_add(&vq, segs, 1, 0, token); ... more vq_add ...
 *     if (vq_kick_prepare(&vq)) t->ops->notify(t, 0);
 *     vq_wait_used(&vq, timeout_ns, &token, &len);
 *
 * Ring fields are little-endian for modern devices and guest-native for legacy ones: both are
 * little-endian on x86, so fields are accessed directly with no byte swapping.
 *
 * Not thread-safe: one context drives a queue at a time.
 */
#ifndef VIRTIO_VIRTQUEUE_H
#define VIRTIO_VIRTQUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "virtio/transport.h"

/* ---- Ring layout (spec 2.7.5 - 2.7.8), shared with the test device model ------------------- */

#define VRING_DESC_F_NEXT     1 /* chain continues at next */
#define VRING_DESC_F_WRITE    2 /* device-writable */
#define VRING_DESC_F_INDIRECT 4 /* addr/len describe a table of descriptors */

#define VRING_AVAIL_F_NO_INTERRUPT 1 /* driver: no used-buffer notification wanted */
#define VRING_USED_F_NO_NOTIFY     1 /* device: no available-buffer notification wanted */

#define VQ_MAX_SIZE   32768u /* largest split-ring size the spec allows */
#define VQ_RING_ALIGN 4096u  /* legacy used-ring alignment, and the area's alignment */

struct vring_desc {
    uint64_t addr; /* guest-physical */
    uint32_t len;
    uint16_t flags; /* VRING_DESC_F_* */
    uint16_t next;
};

struct vring_avail {
    uint16_t flags; /* VRING_AVAIL_F_* */
    uint16_t idx;   /* free-running count of published entries */
    uint16_t ring[];
    /* uint16_t used_event follows ring[size] (EVENT_IDX) */
};

struct vring_used_elem {
    uint32_t id;  /* head descriptor of the used chain */
    uint32_t len; /* bytes the device wrote into the chain */
};

struct vring_used {
    uint16_t flags; /* VRING_USED_F_* */
    uint16_t idx;   /* free-running count of used entries */
    struct vring_used_elem ring[];
    /* uint16_t avail_event follows ring[size] (EVENT_IDX) */
};

/* ---- Errors --------------------------------------------------------------------------------- */

#define VQ_OK          0
#define VQ_ERR_INVALID (-22) /* bad argument (EINVAL) */
#define VQ_ERR_FULL    (-28) /* not enough free descriptors now; retry after vq_get_used (ENOSPC) */
#define VQ_ERR_BROKEN  (-5)  /* the device violated the protocol; see vq_violation() (EIO) */
#define VQ_ERR_TIMEOUT (-110) /* vq_wait_used deadline passed (ETIMEDOUT) */

const char *vq_strerror(int err);

/* ---- The queue ------------------------------------------------------------------------------ */

/* One segment of a buffer: guest-physical address and non-zero length. */
struct vq_seg {
    uint64_t addr;
    uint32_t len;
};

/*
 * Driver-private bookkeeping per descriptor slot. Lives in the caller's area after the rings, so
 * the chain links we follow are never the ones the device could have scribbled on.
 */
struct vq_slot {
    void *token;      /* head of a buffer in flight: the caller's token; otherwise NULL */
    uint32_t in_len;  /* head: total device-writable bytes of the buffer */
    uint32_t out_len; /* head: total device-readable bytes of the buffer */
    uint16_t next;    /* free list link, or the next descriptor of an in-flight chain */
    uint16_t ndesc;   /* 0 free, VQ_SLOT_BODY non-head in flight, else head: descriptors used */
};
#define VQ_SLOT_BODY 0xffffu

#define VQ_MSG_MAX 192

struct virtqueue {
    const char *name; /* for messages, e.g. "inflate" */
    unsigned index;   /* queue index on the device */
    uint16_t size;    /* power of two, <= VQ_MAX_SIZE */
    bool legacy_layout;
    bool use_indirect;  /* VIRTIO_F_INDIRECT_DESC negotiated and tables provided */
    bool use_event_idx; /* VIRTIO_F_EVENT_IDX negotiated */
    bool broken;
    bool irq_disabled;     /* vq_disable_interrupts in effect */
    bool strict_len;       /* used len on a read-only buffer breaks it (vq_set_strict_len) */
    bool inject_bad_next;  /* test only: see vq_inject_bad_next */
    unsigned max_indirect; /* descriptors per indirect table (0: no tables) */

    uint64_t mem_phys;           /* guest-physical base of the area */
    struct vring_desc *desc;     /* size entries */
    struct vring_avail *avail;   /* driver area */
    struct vring_used *used;     /* device area (untrusted) */
    struct vring_desc *indirect; /* size * max_indirect entries, table i belongs to head slot i */
    struct vq_slot *slots;       /* size entries */

    uint16_t free_head; /* first free descriptor (valid when num_free > 0) */
    uint16_t num_free;  /* free descriptors */
    uint16_t avail_idx; /* our copy of avail.idx: the device can't change what we trust */
    uint16_t last_used; /* next used entry to consume */
    uint32_t num_added; /* entries published since the last vq_kick_prepare */
    uint32_t in_flight; /* buffers published and not yet used */
    /* Used-length deviations: a non-zero used length, at most the buffer's size, on a buffer
     * with no device-writable bytes (QEMU before 7.0 reported the bytes it read, kvmtool the
     * number of PFNs). Counted and clamped to 0, not fatal. */
    uint32_t len_deviations;
    uint32_t first_dev_len, first_dev_id; /* the first one, for the report */
    uint32_t first_dev_out_len;           /* that buffer's readable bytes (vq_len_observed) */
    uint16_t detach_cursor;               /* vq_detach_unused scan position */
    char violation[VQ_MSG_MAX];           /* "" until broken */
};

/*
 * Bytes of physically contiguous, 4096-aligned memory a queue needs, rounded up to 4096: the
 * descriptor table, the avail ring (with used_event), the used ring (with avail_event; legacy
 * layout: at the next 4096 boundary), size * max_indirect indirect descriptors, and the
 * driver-private slot array. The device is only told the three ring addresses. Returns 0 for an
 * invalid size (not a power of two in 1..32768) or max_indirect > size.
 */
size_t vq_mem_bytes(uint16_t size, bool legacy_layout, unsigned max_indirect);

/*
 * Set up a queue over mem (vq_mem_bytes(size, legacy_layout, max_indirect) bytes, 4096-aligned,
 * physically contiguous, reachable with virt_to_phys). Zeroes the area. use_indirect only takes
 * effect if max_indirect >= 2. Returns VQ_OK or VQ_ERR_INVALID. Re-initialising after a device
 * reset is the way to recover a broken queue (call vq_detach_unused first to get tokens back).
 */
int vq_init(struct virtqueue *vq, const char *name, unsigned index, uint16_t size, void *mem,
            bool legacy_layout, unsigned max_indirect, bool use_indirect, bool use_event_idx);

/* Guest-physical addresses of the descriptor table, driver area and device area. */
void vq_addrs(const struct virtqueue *vq, struct vq_addrs *out);

/*
 * Add and publish one buffer: segs[0..n_out) device-readable, then segs[n_out..n_out+n_in)
 * device-writable. Uses an indirect table when enabled and 1 < n <= max_indirect, else a direct
 * chain. token (non-NULL) is returned by vq_get_used. Publishing does not notify: add any
 * number of buffers, then vq_kick_prepare() once.
 * Returns VQ_OK, VQ_ERR_FULL (not enough free descriptors), VQ_ERR_INVALID (n == 0, a zero
 * length, a chain longer than the queue, > 4 GiB in total, NULL token) or VQ_ERR_BROKEN.
 */
int vq_add(struct virtqueue *vq, const struct vq_seg *segs, unsigned n_out, unsigned n_in,
           void *token);

/*
 * After one or more vq_add: does the device want an available-buffer notification? (EVENT_IDX:
 * avail_event; otherwise the used ring's NO_NOTIFY flag.) If true, call the transport's notify.
 */
bool vq_kick_prepare(struct virtqueue *vq);

/*
 * Next used buffer: its token (and the used length in *len, if len != NULL), or NULL when there
 * is none or the queue is broken. A protocol violation breaks the queue (see vq_violation).
 */
void *vq_get_used(struct virtqueue *vq, uint32_t *len);

/*
 * Poll vq_get_used until a buffer arrives (VQ_OK, *token and *len set; len may be NULL), the
 * queue breaks (VQ_ERR_BROKEN) or timeout_ns passes on platform_now_ns (VQ_ERR_TIMEOUT).
 */
int vq_wait_used(struct virtqueue *vq, uint64_t timeout_ns, void **token, uint32_t *len);

/*
 * Used-buffer notifications. Enabled after vq_init (with EVENT_IDX: used_event tracks the next
 * entry, so the device notifies for every used buffer). vq_enable_interrupts returns true when
 * used buffers are already pending, so the caller polls instead of waiting for an interrupt
 * that has already gone by.
 */
void vq_disable_interrupts(struct virtqueue *vq);
bool vq_enable_interrupts(struct virtqueue *vq);

/*
 * Used lengths. A length beyond a buffer's device-writable bytes is a violation (the queue
 * breaks) when the buffer has writable bytes: the device claims to have written past them; and
 * so is a length beyond the whole buffer. On a buffer with no writable bytes at all, a length
 * within its size is a *deviation*: QEMU before 7.0 reported the bytes it read, kvmtool reports
 * the number of PFNs, harmless since nothing is read back. A deviation is counted
 * (vq_len_deviations), logged once per queue and treated as length 0; with strict set it breaks
 * the queue like a violation. Default: not strict.
 */
void vq_set_strict_len(struct virtqueue *vq, bool strict);
/* What a deviating used length says, against the buffer's readable bytes: "the bytes read",
 * "the 4-byte entries read (a PFN count)" or "another value". Says what was seen, not who. */
const char *vq_len_observed(uint32_t len, uint32_t out_len);

/* "conforms", "deviates" (used-length deviations seen) or "violated" (the queue is broken). */
const char *vq_len_verdict(const struct virtqueue *vq);

/*
 * Test only (blimp.balloon.inject=bad_next): the next buffer added as a direct chain gets
 * VRING_DESC_F_NEXT on its last descriptor with next = the queue size, an index no device may
 * follow. The driver's own bookkeeping is unchanged (the buffer is in flight as usual), so a
 * device reset and vq_detach_unused take it back. QEMU answers with virtio_error ("Desc next is
 * N"): the device is broken and, on the modern interface, sets DEVICE_NEEDS_RESET.
 */
void vq_inject_bad_next(struct virtqueue *vq);

/*
 * After the device has been reset (so it no longer touches the ring): take back the buffers
 * still in flight, one token per call, NULL when none is left. Works on a broken queue.
 */
void *vq_detach_unused(struct virtqueue *vq);

/* State. vq_violation is "" unless the queue is broken. */
static inline bool vq_is_broken(const struct virtqueue *vq)
{
    return vq->broken;
}
static inline const char *vq_violation(const struct virtqueue *vq)
{
    return vq->violation;
}
static inline unsigned vq_in_flight(const struct virtqueue *vq)
{
    return vq->in_flight;
}
static inline unsigned vq_num_free(const struct virtqueue *vq)
{
    return vq->num_free;
}
/* The device has used buffers the driver has not collected (reads the untrusted used index). */
static inline bool vq_has_used(const struct virtqueue *vq)
{
    return !vq->broken && *(const volatile uint16_t *)&vq->used->idx != vq->last_used;
}
static inline uint32_t vq_len_deviations(const struct virtqueue *vq)
{
    return vq->len_deviations;
}

/*
 * Consistency check of the driver-private state (free list, chains in flight, counters): true
 * when sound. O(size); meant for tests and the kernel self-test, not hot paths.
 */
bool vq_selfcheck(const struct virtqueue *vq);

#endif
