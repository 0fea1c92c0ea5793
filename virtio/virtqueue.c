/*
 * Split virtqueue, driver side. See virtqueue.h for the contract.
 *
 * Area layout (offsets from the 4096-aligned base):
 *   descriptor table   16 * size                      at 0
 *   avail ring         6 + 2 * size (incl. used_event) right after
 *   used ring          6 + 8 * size (incl. avail_event) 4-aligned (legacy: next 4096 boundary)
 *   indirect tables    16 * max_indirect * size        16-aligned
 *   slots              sizeof(struct vq_slot) * size   16-aligned
 * The device is told only the first three.
 */
#include "virtio/virtqueue.h"

#include "include/platform.h"

/* Device-shared fields are read and written exactly once per access. */
#define READ_ONCE16(p)     (*(const volatile uint16_t *)(p))
#define READ_ONCE32(p)     (*(const volatile uint32_t *)(p))
#define WRITE_ONCE16(p, v) (*(volatile uint16_t *)(p) = (uint16_t)(v))

struct layout {
    size_t avail, used, indirect, slots, total;
};

static size_t align_up(size_t x, size_t a)
{
    return (x + a - 1) & ~(a - 1);
}

static bool valid_size(uint16_t size)
{
    return size != 0 && (size & (size - 1)) == 0 && size <= VQ_MAX_SIZE;
}

static bool compute_layout(uint16_t size, bool legacy_layout, unsigned max_indirect,
                           struct layout *l)
{
    if (!valid_size(size) || max_indirect > size)
        return false;
    size_t n = size;
    l->avail = sizeof(struct vring_desc) * n;
    size_t avail_end = l->avail + 6 + 2 * n;
    l->used = align_up(avail_end, legacy_layout ? VQ_RING_ALIGN : 4);
    size_t used_end = l->used + 6 + 8 * n;
    l->indirect = align_up(used_end, 16);
    l->slots = align_up(l->indirect + sizeof(struct vring_desc) * (size_t)max_indirect * n, 16);
    l->total = align_up(l->slots + sizeof(struct vq_slot) * n, VQ_RING_ALIGN);
    return true;
}

size_t vq_mem_bytes(uint16_t size, bool legacy_layout, unsigned max_indirect)
{
    struct layout l;
    return compute_layout(size, legacy_layout, max_indirect, &l) ? l.total : 0;
}

static uint16_t *used_event_p(const struct virtqueue *vq)
{
    return &vq->avail->ring[vq->size];
}

static uint16_t *avail_event_p(const struct virtqueue *vq)
{
    return (uint16_t *)((uint8_t *)vq->used + 4 + 8 * (size_t)vq->size);
}

const char *vq_strerror(int err)
{
    switch (err) {
    case VQ_OK:
        return "ok";
    case VQ_ERR_INVALID:
        return "invalid request";
    case VQ_ERR_FULL:
        return "queue full";
    case VQ_ERR_BROKEN:
        return "queue broken by a device protocol violation";
    case VQ_ERR_TIMEOUT:
        return "timed out";
    default:
        return "unknown error";
    }
}

/* ---- Violation messages (no libc: a tiny formatter for %s and %u) --------------------------- */

struct msgbuf {
    char *buf;
    size_t len, cap;
};

static void msg_putc(struct msgbuf *m, char c)
{
    if (m->len + 1 < m->cap)
        m->buf[m->len++] = c;
    m->buf[m->len] = '\0';
}

static void msg_puts(struct msgbuf *m, const char *s)
{
    while (*s)
        msg_putc(m, *s++);
}

static void msg_putu(struct msgbuf *m, uint64_t v)
{
    char tmp[20];
    unsigned n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        msg_putc(m, tmp[--n]);
}

/* A deviating used length against the buffer's readable bytes: 0 the bytes read, 1 the number
 * of 4-byte entries read (a PFN count), 2 anything else. */
static unsigned len_kind(uint32_t len, uint32_t out_len)
{
    if (len == out_len)
        return 0;
    return out_len % 4 == 0 && len == out_len / 4 ? 1 : 2;
}

/* fmt takes %u (next of args) only; the queue's name and index are prepended. */
static void vq_break(struct virtqueue *vq, const char *fmt, const uint64_t *args)
{
    if (vq->broken)
        return;
    struct msgbuf m = {vq->violation, 0, sizeof(vq->violation)};
    msg_puts(&m, "virtqueue ");
    msg_puts(&m, vq->name ? vq->name : "?");
    msg_putc(&m, '[');
    msg_putu(&m, vq->index);
    msg_puts(&m, "]: ");
    for (const char *p = fmt; *p; p++) {
        if (p[0] == '%' && p[1] == 'u') {
            msg_putu(&m, *args++);
            p++;
        } else {
            msg_putc(&m, *p);
        }
    }
    vq->broken = true;
    platform_log("%s", vq->violation);
}

/* ---- Setup ---------------------------------------------------------------------------------- */

int vq_init(struct virtqueue *vq, const char *name, unsigned index, uint16_t size, void *mem,
            bool legacy_layout, unsigned max_indirect, bool use_indirect, bool use_event_idx)
{
    struct layout l;
    if (!vq || !mem || ((uintptr_t)mem & (VQ_RING_ALIGN - 1)) ||
        !compute_layout(size, legacy_layout, max_indirect, &l))
        return VQ_ERR_INVALID;
    uint64_t phys = virt_to_phys(mem);
    if (phys & (VQ_RING_ALIGN - 1))
        return VQ_ERR_INVALID;

    /* Zeroed rings: idx 0, flags 0 (the spec requires used.flags = 0 at allocation). */
    __builtin_memset(mem, 0, l.total);
    __builtin_memset(vq, 0, sizeof(*vq));

    uint8_t *base = mem;
    vq->name = name;
    vq->index = index;
    vq->size = size;
    vq->legacy_layout = legacy_layout;
    vq->max_indirect = max_indirect;
    vq->use_indirect = use_indirect && max_indirect >= 2;
    vq->use_event_idx = use_event_idx;
    vq->mem_phys = phys;
    vq->desc = (struct vring_desc *)base;
    vq->avail = (struct vring_avail *)(base + l.avail);
    vq->used = (struct vring_used *)(base + l.used);
    vq->indirect = max_indirect ? (struct vring_desc *)(base + l.indirect) : NULL;
    vq->slots = (struct vq_slot *)(base + l.slots);

    /* Free list 0 -> 1 -> ... -> size-1: taking n from the head yields a linked chain. */
    for (unsigned i = 0; i < size; i++)
        vq->slots[i].next = (uint16_t)(i + 1 < size ? i + 1 : 0);
    vq->free_head = 0;
    vq->num_free = size;
    return VQ_OK;
}

void vq_addrs(const struct virtqueue *vq, struct vq_addrs *out)
{
    const uint8_t *base = (const uint8_t *)vq->desc;
    out->desc = vq->mem_phys;
    out->avail = vq->mem_phys + (uint64_t)((const uint8_t *)vq->avail - base);
    out->used = vq->mem_phys + (uint64_t)((const uint8_t *)vq->used - base);
}

/* ---- Adding buffers ------------------------------------------------------------------------- */

int vq_add(struct virtqueue *vq, const struct vq_seg *segs, unsigned n_out, unsigned n_in,
           void *token)
{
    if (vq->broken)
        return VQ_ERR_BROKEN;
    if (!segs || !token || n_out > VQ_MAX_SIZE || n_in > VQ_MAX_SIZE)
        return VQ_ERR_INVALID;
    unsigned n = n_out + n_in;
    if (n == 0)
        return VQ_ERR_INVALID;

    uint64_t total = 0, in_len = 0;
    for (unsigned i = 0; i < n; i++) {
        if (segs[i].len == 0 || segs[i].addr + segs[i].len < segs[i].addr)
            return VQ_ERR_INVALID;
        total += segs[i].len;
        if (i >= n_out)
            in_len += segs[i].len;
    }
    /* The spec caps a chain at 2^32 bytes; staying below also keeps in_len in 32 bits. */
    if (total > UINT32_MAX)
        return VQ_ERR_INVALID;

    bool indirect = vq->use_indirect && n > 1 && n <= vq->max_indirect;
    if (!indirect && n > vq->size)
        return VQ_ERR_INVALID;
    unsigned ndesc = indirect ? 1 : n;
    if (ndesc > vq->num_free)
        return VQ_ERR_FULL;

    uint16_t head = vq->free_head;
    if (indirect) {
        struct vring_desc *t = &vq->indirect[(size_t)head * vq->max_indirect];
        for (unsigned i = 0; i < n; i++) {
            t[i].addr = segs[i].addr;
            t[i].len = segs[i].len;
            t[i].flags = (uint16_t)((i >= n_out ? VRING_DESC_F_WRITE : 0) |
                                    (i + 1 < n ? VRING_DESC_F_NEXT : 0));
            t[i].next = (uint16_t)(i + 1 < n ? i + 1 : 0);
        }
        vq->desc[head].addr = vq->mem_phys + (uint64_t)((uint8_t *)t - (uint8_t *)vq->desc);
        vq->desc[head].len = (uint32_t)(n * sizeof(struct vring_desc));
        vq->desc[head].flags = VRING_DESC_F_INDIRECT;
        vq->desc[head].next = 0;
        vq->free_head = vq->slots[head].next;
    } else {
        /* The free list is already linked: walk n slots, filling descriptors as we go. */
        uint16_t d = head;
        for (unsigned i = 0; i < n; i++) {
            bool last = i + 1 == n;
            vq->desc[d].addr = segs[i].addr;
            vq->desc[d].len = segs[i].len;
            vq->desc[d].flags =
                (uint16_t)((i >= n_out ? VRING_DESC_F_WRITE : 0) | (last ? 0 : VRING_DESC_F_NEXT));
            vq->desc[d].next = last ? 0 : vq->slots[d].next;
            if (last && vq->inject_bad_next) {
                /* Test only: a chain that continues at an index past the table. */
                vq->desc[d].flags |= VRING_DESC_F_NEXT;
                vq->desc[d].next = (uint16_t)vq->size; /* size <= 32768 fits */
                vq->inject_bad_next = false;
            }
            if (i)
                vq->slots[d].ndesc = VQ_SLOT_BODY;
            if (last)
                vq->free_head = vq->slots[d].next;
            else
                d = vq->slots[d].next;
        }
    }
    vq->num_free = (uint16_t)(vq->num_free - ndesc);
    vq->slots[head].token = token;
    vq->slots[head].in_len = (uint32_t)in_len;
    vq->slots[head].out_len = (uint32_t)(total - in_len);
    vq->slots[head].ndesc = (uint16_t)ndesc;

    vq->avail->ring[vq->avail_idx & (vq->size - 1)] = head;
    vq->in_flight++;
    vq->num_added++;
    /* Descriptors and the ring entry must be visible before the index that exposes them. */
    wmb();
    vq->avail_idx++;
    WRITE_ONCE16(&vq->avail->idx, vq->avail_idx);
    return VQ_OK;
}

bool vq_kick_prepare(struct virtqueue *vq)
{
    /* Our avail.idx store must be visible before we read the device's suppression state,
     * or we could miss a device that went to sleep in between. */
    mb();
    uint32_t added = vq->num_added;
    vq->num_added = 0;
    if (added == 0)
        return false;
    if (!vq->use_event_idx)
        return !(READ_ONCE16(&vq->used->flags) & VRING_USED_F_NO_NOTIFY);
    /* 16-bit window arithmetic can't describe more than 65535 additions: just notify. */
    if (added > 0xffff)
        return true;
    uint16_t new_idx = vq->avail_idx;
    uint16_t old_idx = (uint16_t)(new_idx - added);
    uint16_t event = READ_ONCE16(avail_event_p(vq));
    /* Notify iff avail_event lies in [old, new): the device asked to hear about that entry. */
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

/* ---- Used buffers --------------------------------------------------------------------------- */

static void free_chain(struct virtqueue *vq, uint16_t head)
{
    struct vq_slot *s = &vq->slots[head];
    uint16_t last = head;
    for (unsigned i = 1; i < s->ndesc; i++) {
        last = vq->slots[last].next;
        vq->slots[last].ndesc = 0;
    }
    vq->slots[last].next = vq->free_head;
    vq->free_head = head;
    vq->num_free = (uint16_t)(vq->num_free + s->ndesc);
    s->ndesc = 0;
    s->token = NULL;
    s->in_len = 0;
    s->out_len = 0;
}

void *vq_get_used(struct virtqueue *vq, uint32_t *len)
{
    if (vq->broken)
        return NULL;
    uint16_t used_idx = READ_ONCE16(&vq->used->idx);
    uint16_t pending = (uint16_t)(used_idx - vq->last_used);
    if (pending == 0)
        return NULL;
    if (pending > vq->size) {
        vq_break(vq, "used index jumped from %u to %u on a queue of size %u",
                 (const uint64_t[]){vq->last_used, used_idx, vq->size});
        return NULL;
    }
    if (pending > vq->in_flight) {
        vq_break(vq, "used index moved from %u to %u but only %u buffers are in flight",
                 (const uint64_t[]){vq->last_used, used_idx, vq->in_flight});
        return NULL;
    }
    /* The entry must be read after the index that published it. */
    rmb();
    const struct vring_used_elem *e = &vq->used->ring[vq->last_used & (vq->size - 1)];
    uint32_t id = READ_ONCE32(&e->id);
    uint32_t ulen = READ_ONCE32(&e->len);

    if (id >= vq->size) {
        vq_break(vq, "used id %u out of range (queue size %u) at used index %u",
                 (const uint64_t[]){id, vq->size, vq->last_used});
        return NULL;
    }
    struct vq_slot *s = &vq->slots[id];
    if (!s->token) {
        vq_break(vq,
                 s->ndesc == VQ_SLOT_BODY
                     ? "used id %u at used index %u is not a chain head (inside a buffer in flight)"
                     : "used id %u at used index %u is not in flight (free descriptor)",
                 (const uint64_t[]){id, vq->last_used});
        return NULL;
    }
    if (ulen > s->in_len) {
        if (s->in_len != 0) {
            /* The device claims to have written past what it was given. */
            vq_break(vq, "used len %u for id %u exceeds the %u device-writable bytes",
                     (const uint64_t[]){ulen, id, s->in_len});
            return NULL;
        }
        if (ulen > s->out_len) {
            vq_break(vq, "used len %u for id %u exceeds the whole %u-byte buffer (read-only)",
                     (const uint64_t[]){ulen, id, s->out_len});
            return NULL;
        }
        if (vq->strict_len) {
            /* vq_break formats %u only: one message per kind of value */
            static const char *const strict_msg[] = {
                "used len %u for id %u on a buffer with no device-writable bytes: the bytes read "
                "(a deviation; fatal in strict mode)",
                "used len %u for id %u on a buffer with no device-writable bytes: the 4-byte "
                "entries read, a PFN count (a deviation; fatal in strict mode)",
                "used len %u for id %u on a buffer with no device-writable bytes: another value "
                "(a deviation; fatal in strict mode)",
            };
            vq_break(vq, strict_msg[len_kind(ulen, s->out_len)], (const uint64_t[]){ulen, id});
            return NULL;
        }
        if (vq->len_deviations++ == 0) {
            vq->first_dev_len = ulen;
            vq->first_dev_id = id;
            vq->first_dev_out_len = s->out_len;
            platform_log("virtqueue %s[%u]: used len %u for id %u on a %u-byte buffer with no "
                         "device-writable bytes: %s; a deviation, counted and read as 0",
                         vq->name ? vq->name : "?", vq->index, ulen, id, s->out_len,
                         vq_len_observed(ulen, s->out_len));
        }
        ulen = 0;
    }

    void *token = s->token;
    free_chain(vq, (uint16_t)id);
    vq->in_flight--;
    vq->last_used++;
    if (vq->use_event_idx) {
        /* Ask for a notification on the very next used entry, or (disabled) keep used_event
         * parked just behind what we consumed, so the device never crosses it; publish
         * before we look again. */
        WRITE_ONCE16(used_event_p(vq),
                     vq->irq_disabled ? (uint16_t)(vq->last_used - 1) : vq->last_used);
        mb();
    }
    if (len)
        *len = ulen;
    return token;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause" ::: "memory");
#else
    barrier();
#endif
}

int vq_wait_used(struct virtqueue *vq, uint64_t timeout_ns, void **token, uint32_t *len)
{
    uint64_t start = platform_now_ns();
    uint64_t deadline = start + timeout_ns < start ? UINT64_MAX : start + timeout_ns;
    for (;;) {
        void *t = vq_get_used(vq, len);
        if (t) {
            if (token)
                *token = t;
            return VQ_OK;
        }
        if (vq->broken)
            return VQ_ERR_BROKEN;
        if (platform_now_ns() >= deadline)
            return VQ_ERR_TIMEOUT;
        cpu_relax();
    }
}

/* ---- Notification control ------------------------------------------------------------------- */

void vq_disable_interrupts(struct virtqueue *vq)
{
    vq->irq_disabled = true;
    if (vq->use_event_idx) {
        /* With EVENT_IDX the flags must stay 0: park used_event as far behind as possible. */
        WRITE_ONCE16(used_event_p(vq), (uint16_t)(vq->last_used - 1));
    } else {
        WRITE_ONCE16(&vq->avail->flags, VRING_AVAIL_F_NO_INTERRUPT);
    }
}

bool vq_enable_interrupts(struct virtqueue *vq)
{
    vq->irq_disabled = false;
    if (vq->use_event_idx)
        WRITE_ONCE16(used_event_p(vq), vq->last_used);
    else
        WRITE_ONCE16(&vq->avail->flags, 0);
    /* Re-enabling must be visible before we check for entries that slipped in meanwhile. */
    mb();
    return !vq->broken && READ_ONCE16(&vq->used->idx) != vq->last_used;
}

const char *vq_len_observed(uint32_t len, uint32_t out_len)
{
    static const char *const names[] = {"the bytes read", "the 4-byte entries read (a PFN count)",
                                        "another value"};
    return names[len_kind(len, out_len)];
}

void vq_set_strict_len(struct virtqueue *vq, bool strict)
{
    vq->strict_len = strict;
}

const char *vq_len_verdict(const struct virtqueue *vq)
{
    return vq->broken ? "violated" : vq->len_deviations ? "deviates" : "conforms";
}

void vq_inject_bad_next(struct virtqueue *vq)
{
    vq->inject_bad_next = true;
}

void *vq_detach_unused(struct virtqueue *vq)
{
    for (; vq->detach_cursor < vq->size; vq->detach_cursor++) {
        struct vq_slot *s = &vq->slots[vq->detach_cursor];
        if (s->token) {
            void *token = s->token;
            free_chain(vq, vq->detach_cursor);
            vq->in_flight--;
            return token;
        }
    }
    vq->detach_cursor = 0; /* ready for another sweep */
    return NULL;
}

/* ---- Self-check ----------------------------------------------------------------------------- */

bool vq_selfcheck(const struct virtqueue *vq)
{
    unsigned size = vq->size;
    if (!valid_size(vq->size) || vq->num_free > size)
        return false;
    /* Free list: exactly num_free distinct slots, all marked free, no cycle. */
    unsigned nfree = 0;
    uint16_t d = vq->free_head;
    for (unsigned i = 0; i < vq->num_free; i++) {
        if (d >= size || vq->slots[d].ndesc != 0 || vq->slots[d].token)
            return false;
        nfree++;
        d = vq->slots[d].next;
    }
    unsigned free_marked = 0, heads = 0, chained = 0;
    for (unsigned i = 0; i < size; i++) {
        const struct vq_slot *s = &vq->slots[i];
        if (s->ndesc == 0) {
            if (s->token)
                return false;
            free_marked++;
        } else if (s->ndesc != VQ_SLOT_BODY) {
            if (!s->token || s->ndesc > size)
                return false;
            heads++;
            /* Every link of the chain must be a body slot. */
            uint16_t c = (uint16_t)i;
            for (unsigned k = 1; k < s->ndesc; k++) {
                c = vq->slots[c].next;
                if (c >= size || vq->slots[c].ndesc != VQ_SLOT_BODY)
                    return false;
            }
            chained += s->ndesc;
        } else if (s->token) {
            return false;
        }
    }
    return nfree == vq->num_free && free_marked == vq->num_free && heads == vq->in_flight &&
           chained + vq->num_free == size;
}
