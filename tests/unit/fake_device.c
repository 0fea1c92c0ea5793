/* Device-side split-ring model for host unit tests: see fake_device.h. */
#include "tests/unit/fake_device.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/fake_platform.h"
#include "include/platform.h"

/* ---- Arena memory --------------------------------------------------------------------------- */

static uint64_t mem_base, mem_bytes, mem_next;

void fake_mem_init(uint64_t base_phys, uint64_t bytes)
{
    fake_ram_init(base_phys, bytes);
    mem_base = base_phys;
    mem_bytes = bytes;
    mem_next = 0;
}

void fake_mem_fini(void)
{
    fake_ram_fini();
    mem_base = mem_bytes = mem_next = 0;
}

void fake_mem_rewind(void)
{
    mem_next = 0; /* allocations are zeroed when handed out */
}

uint64_t fake_mem_alloc_phys(size_t bytes, size_t align)
{
    if (!align)
        align = 1;
    uint64_t start = (mem_base + mem_next + align - 1) & ~(uint64_t)(align - 1);
    if (start - mem_base + bytes > mem_bytes) {
        fprintf(stderr, "fake_mem_alloc: arena exhausted (%zu bytes wanted)\n", bytes);
        abort();
    }
    mem_next = start - mem_base + bytes;
    memset(phys_to_virt(start), 0, bytes);
    return start;
}

void *fake_mem_alloc(size_t bytes, size_t align)
{
    return phys_to_virt(fake_mem_alloc_phys(bytes, align));
}

/* ---- Device-side queue ---------------------------------------------------------------------- */

static void dev_error(struct fake_vq *d, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void dev_error(struct fake_vq *d, const char *fmt, ...)
{
    if (d->errors++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(d->error, sizeof(d->error), fmt, ap);
        va_end(ap);
        fprintf(stderr, "[fake device] driver error: %s\n", d->error);
    }
}

void fake_vq_attach(struct fake_vq *d, const struct vq_addrs *a, uint16_t size, bool event_idx)
{
    memset(d, 0, sizeof(*d));
    d->size = size;
    d->event_idx = event_idx;
    d->desc = phys_to_virt(a->desc);
    d->avail = phys_to_virt(a->avail);
    d->used = phys_to_virt(a->used);
    d->owned = calloc(size, sizeof(bool));
    d->auto_avail_event = true;
    if (!d->owned)
        abort();
}

static void chain_free(struct fake_chain *c)
{
    free(c->segs);
    free(c->main);
    free(c->seen);
    memset(c, 0, sizeof(*c));
}

void fake_vq_detach(struct fake_vq *d)
{
    for (unsigned i = 0; i < d->npending; i++)
        chain_free(&d->pending[i]);
    free(d->pending);
    free(d->owned);
    memset(d, 0, sizeof(*d));
}

static uint16_t rd16(const void *p)
{
    return *(const volatile uint16_t *)p;
}

unsigned fake_vq_avail_pending(const struct fake_vq *d)
{
    return (uint16_t)(rd16(&d->avail->idx) - d->last_avail);
}

/* Growable arrays for the chain being parsed. */
static void *grow(void *p, unsigned n, size_t elem)
{
    /* Power-of-two capacities: grow when n reaches one. */
    if (n && (n & (n - 1)))
        return p;
    void *q = realloc(p, (n ? 2 * n : 1) * elem);
    if (!q)
        abort();
    return q;
}

static void chain_seen(struct fake_chain *c, const struct vring_desc *where)
{
    c->seen = grow(c->seen, c->nseen, sizeof(*c->seen));
    c->seen[c->nseen].where = where;
    memcpy(&c->seen[c->nseen].copy, (const void *)where, sizeof(*where));
    c->nseen++;
}

/* Append one buffer descriptor's segment, enforcing readable-before-writable. */
static bool chain_seg(struct fake_vq *d, struct fake_chain *c, const struct vring_desc *x)
{
    bool w = x->flags & VRING_DESC_F_WRITE;
    if (x->len == 0) {
        dev_error(d, "zero-length descriptor in chain %u", c->head);
        return false;
    }
    if (!w && c->in_bytes) {
        dev_error(d, "device-readable descriptor after a writable one in chain %u", c->head);
        return false;
    }
    c->segs = grow(c->segs, c->nsegs, sizeof(*c->segs));
    c->segs[c->nsegs++] = (struct fake_seg){x->addr, x->len, w};
    if (w)
        c->in_bytes += x->len;
    else
        c->out_bytes += x->len;
    return true;
}

static bool walk_indirect(struct fake_vq *d, struct fake_chain *c, const struct vring_desc *ind)
{
    if (ind->flags & VRING_DESC_F_NEXT) {
        dev_error(d, "INDIRECT and NEXT both set on descriptor of chain %u", c->head);
        return false;
    }
    if (ind->len == 0 || ind->len % sizeof(struct vring_desc)) {
        dev_error(d, "indirect table length %u is not a positive multiple of 16", ind->len);
        return false;
    }
    unsigned n = ind->len / sizeof(struct vring_desc);
    if (n > d->size) {
        dev_error(d, "indirect table of %u descriptors on a queue of size %u", n, d->size);
        return false;
    }
    const struct vring_desc *t = phys_to_virt(ind->addr);
    (void)phys_to_virt(ind->addr + ind->len - 1); /* whole table inside RAM */
    c->indirect = true;
    unsigned i = 0;
    for (unsigned steps = 0;; steps++) {
        if (steps >= n) {
            dev_error(d, "indirect chain %u loops or overruns its table", c->head);
            return false;
        }
        chain_seen(c, &t[i]);
        struct vring_desc x = c->seen[c->nseen - 1].copy;
        if (x.flags & VRING_DESC_F_INDIRECT) {
            dev_error(d, "nested INDIRECT in chain %u", c->head);
            return false;
        }
        if (!chain_seg(d, c, &x))
            return false;
        if (!(x.flags & VRING_DESC_F_NEXT))
            return true;
        if (x.next >= n) {
            dev_error(d, "indirect next %u beyond table of %u in chain %u", x.next, n, c->head);
            return false;
        }
        i = x.next;
    }
}

static void unown(struct fake_vq *d, const struct fake_chain *c)
{
    for (unsigned i = 0; i < c->nmain; i++)
        d->owned[c->main[i]] = false;
}

int fake_vq_pop(struct fake_vq *d)
{
    uint16_t avail_idx = rd16(&d->avail->idx);
    uint16_t n = (uint16_t)(avail_idx - d->last_avail);
    if (n == 0)
        return 0;
    if (n > d->size) {
        dev_error(d, "avail index moved from %u to %u on a queue of size %u", d->last_avail,
                  avail_idx, d->size);
        return -1;
    }
    rmb();
    struct fake_chain c = {0};
    c.avail_pos = d->last_avail;
    c.head = rd16(&d->avail->ring[d->last_avail & (d->size - 1)]);
    uint16_t i = c.head;
    bool ok = true;
    for (;;) {
        if (i >= d->size) {
            dev_error(d, "descriptor index %u out of range in chain %u", i, c.head);
            ok = false;
            break;
        }
        if (d->owned[i]) {
            dev_error(d,
                      "descriptor %u (chain %u) is already held by the device: the driver "
                      "reused a descriptor in flight",
                      i, c.head);
            ok = false;
            break;
        }
        /* Owning as we go also catches loops within this chain. */
        d->owned[i] = true;
        c.main = grow(c.main, c.nmain, sizeof(*c.main));
        c.main[c.nmain++] = i;
        chain_seen(&c, &d->desc[i]);
        struct vring_desc x = c.seen[c.nseen - 1].copy;
        if (x.flags & VRING_DESC_F_INDIRECT) {
            ok = walk_indirect(d, &c, &x);
            break;
        }
        if (!chain_seg(d, &c, &x)) {
            ok = false;
            break;
        }
        if (!(x.flags & VRING_DESC_F_NEXT))
            break;
        i = x.next;
    }
    if (ok && c.out_bytes + c.in_bytes > UINT32_MAX) {
        dev_error(d, "chain %u is longer than 4 GiB", c.head);
        ok = false;
    }
    if (!ok) {
        unown(d, &c);
        chain_free(&c);
        return -1;
    }
    if (d->npending == d->cap) {
        d->cap = d->cap ? 2 * d->cap : 16;
        d->pending = realloc(d->pending, d->cap * sizeof(*d->pending));
        if (!d->pending)
            abort();
    }
    d->pending[d->npending++] = c;
    d->last_avail++;
    if (d->event_idx && d->auto_avail_event)
        fake_vq_set_avail_event(d, d->last_avail);
    return 1;
}

unsigned fake_vq_pop_all(struct fake_vq *d)
{
    unsigned n = 0;
    while (fake_vq_pop(d) == 1)
        n++;
    return n;
}

int fake_vq_find(const struct fake_vq *d, uint16_t head)
{
    for (unsigned k = 0; k < d->npending; k++)
        if (d->pending[k].head == head)
            return (int)k;
    return -1;
}

static void remove_pending(struct fake_vq *d, unsigned k)
{
    unown(d, &d->pending[k]);
    chain_free(&d->pending[k]);
    memmove(&d->pending[k], &d->pending[k + 1], (d->npending - k - 1) * sizeof(*d->pending));
    d->npending--;
}

void fake_vq_release(struct fake_vq *d, unsigned k)
{
    if (k >= d->npending)
        abort();
    remove_pending(d, k);
}

static void maybe_irq(struct fake_vq *d, uint16_t old, uint16_t new_idx)
{
    mb();
    bool fire;
    if (d->event_idx) {
        uint16_t ev = rd16(&d->avail->ring[d->size]);
        fire = (uint16_t)(new_idx - ev - 1) < (uint16_t)(new_idx - old);
    } else {
        fire = !(rd16(&d->avail->flags) & VRING_AVAIL_F_NO_INTERRUPT);
    }
    if (fire) {
        d->irqs++;
        if (d->on_irq)
            d->on_irq(d->irq_arg);
    }
}

void fake_vq_write_used_raw(struct fake_vq *d, uint16_t slot, uint32_t id, uint32_t len)
{
    volatile struct vring_used_elem *e = &d->used->ring[slot & (d->size - 1)];
    e->id = id;
    e->len = len;
}

void fake_vq_set_used_idx_raw(struct fake_vq *d, uint16_t idx)
{
    wmb();
    d->used_idx = idx;
    *(volatile uint16_t *)&d->used->idx = idx;
}

void fake_vq_push_raw(struct fake_vq *d, uint32_t id, uint32_t len)
{
    uint16_t old = d->used_idx;
    fake_vq_write_used_raw(d, old, id, len);
    fake_vq_set_used_idx_raw(d, (uint16_t)(old + 1));
    maybe_irq(d, old, d->used_idx);
}

void fake_vq_complete(struct fake_vq *d, unsigned k, uint32_t len)
{
    if (k >= d->npending)
        abort();
    struct fake_chain *c = &d->pending[k];
    /* The driver must not touch a buffer's descriptors while the device holds it. */
    for (unsigned i = 0; i < c->nseen; i++)
        if (memcmp((const void *)c->seen[i].where, &c->seen[i].copy, sizeof(struct vring_desc))) {
            dev_error(d, "descriptor of chain %u changed while the device held it", c->head);
            break;
        }
    uint16_t head = c->head;
    remove_pending(d, k);
    fake_vq_push_raw(d, head, len);
}

void fake_vq_set_no_notify(struct fake_vq *d, bool on)
{
    *(volatile uint16_t *)&d->used->flags = on ? VRING_USED_F_NO_NOTIFY : 0;
}

void fake_vq_set_avail_event(struct fake_vq *d, uint16_t ev)
{
    /* avail_event sits right after ring[size]. */
    *(volatile uint16_t *)((uint8_t *)d->used + 4 + 8 * (size_t)d->size) = ev;
}

size_t fake_chain_read(const struct fake_chain *c, void *dst, size_t max)
{
    size_t done = 0;
    for (unsigned i = 0; i < c->nsegs && done < max; i++) {
        if (c->segs[i].write)
            break;
        size_t n = c->segs[i].len < max - done ? c->segs[i].len : max - done;
        memcpy((uint8_t *)dst + done, phys_to_virt(c->segs[i].addr), n);
        done += n;
    }
    return done;
}

size_t fake_chain_write(const struct fake_chain *c, const void *src, size_t n)
{
    size_t done = 0;
    for (unsigned i = 0; i < c->nsegs && done < n; i++) {
        if (!c->segs[i].write)
            continue;
        size_t k = c->segs[i].len < n - done ? c->segs[i].len : n - done;
        memcpy(phys_to_virt(c->segs[i].addr), (const uint8_t *)src + done, k);
        done += k;
    }
    return done;
}
