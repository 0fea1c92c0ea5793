/*
 * Device side of a split ring, for host unit tests. It reads what the driver published (avail
 * ring, descriptors, indirect tables) through phys_to_virt, checks the driver's side of the
 * protocol while doing so, keeps the buffers it took, and pushes used entries -- correctly, or,
 * through the *_raw knobs, in any broken way a test wants.
 *
 * Also a bump allocator over the fake_platform arena, for rings and buffers.
 */
#ifndef BLIMP_FAKE_DEVICE_H
#define BLIMP_FAKE_DEVICE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "virtio/virtqueue.h"

/* ---- Arena memory --------------------------------------------------------------------------- */

/* (Re)create the fake RAM [base_phys, base_phys + bytes) and reset the allocator. */
void fake_mem_init(uint64_t base_phys, uint64_t bytes);
void fake_mem_fini(void);
/* Forget every allocation but keep the arena (fuzzers reuse it for each input). */
void fake_mem_rewind(void);
/* Zeroed memory from the arena (align: power of two). Aborts when the arena is exhausted. */
void *fake_mem_alloc(size_t bytes, size_t align);
uint64_t fake_mem_alloc_phys(size_t bytes, size_t align);

/* ---- Device-side queue ---------------------------------------------------------------------- */

struct fake_seg {
    uint64_t addr;
    uint32_t len;
    bool write; /* device-writable */
};

/* A descriptor the device read, and what it held then (to catch the driver rewriting it). */
struct fake_seen_desc {
    const struct vring_desc *where;
    struct vring_desc copy;
};

/* A buffer the device took off the avail ring and has not completed yet. */
struct fake_chain {
    uint16_t head;      /* the id to report in the used ring */
    uint16_t avail_pos; /* avail index it was taken from */
    bool indirect;      /* went through an indirect table */
    unsigned nsegs;
    struct fake_seg *segs;
    uint64_t out_bytes, in_bytes;
    unsigned nmain; /* descriptors of the main table it occupies */
    uint16_t *main;
    unsigned nseen;
    struct fake_seen_desc *seen;
};

struct fake_vq {
    uint16_t size;
    bool event_idx; /* VIRTIO_F_EVENT_IDX negotiated */
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t last_avail; /* next avail entry to take */
    uint16_t used_idx;   /* the device's own copy of used.idx */
    bool *owned;         /* per main descriptor: part of a chain the device holds */
    struct fake_chain *pending;
    unsigned npending, cap;

    /* With EVENT_IDX, after each pop set avail_event = last_avail (default on). */
    bool auto_avail_event;
    /* Used-buffer notifications the device raised (by used_event or NO_INTERRUPT). */
    unsigned long irqs;
    void (*on_irq)(void *arg);
    void *irq_arg;

    /* Driver protocol errors the device noticed (first message kept). */
    unsigned errors;
    char error[256];
};

void fake_vq_attach(struct fake_vq *d, const struct vq_addrs *a, uint16_t size, bool event_idx);
void fake_vq_detach(struct fake_vq *d); /* frees the model's own memory */

/* Take the next available buffer into pending[]. 1: taken, 0: none, -1: driver error. */
int fake_vq_pop(struct fake_vq *d);
unsigned fake_vq_pop_all(struct fake_vq *d); /* pops until none or error; returns the count */
unsigned fake_vq_avail_pending(const struct fake_vq *d); /* published but not popped */

/* Complete pending[k] with used length len (any order). Checks the driver left it alone. */
void fake_vq_complete(struct fake_vq *d, unsigned k, uint32_t len);
int fake_vq_find(const struct fake_vq *d, uint16_t head); /* pending index, or -1 */
/* Forget pending[k] without a used entry (the driver took it back through a garbage entry). */
void fake_vq_release(struct fake_vq *d, unsigned k);

/* Misbehaviour: push any (id, len) / overwrite an entry / set used.idx, with no bookkeeping. */
void fake_vq_push_raw(struct fake_vq *d, uint32_t id, uint32_t len);
void fake_vq_write_used_raw(struct fake_vq *d, uint16_t slot, uint32_t id, uint32_t len);
void fake_vq_set_used_idx_raw(struct fake_vq *d, uint16_t idx);

/* Available-buffer notification suppression, device side. */
void fake_vq_set_no_notify(struct fake_vq *d, bool on);
void fake_vq_set_avail_event(struct fake_vq *d, uint16_t ev);

/* Copy a chain's device-readable bytes out / bytes into its writable part (through the arena).
 * Return the number of bytes copied. */
size_t fake_chain_read(const struct fake_chain *c, void *dst, size_t max);
size_t fake_chain_write(const struct fake_chain *c, const void *src, size_t n);

#endif
