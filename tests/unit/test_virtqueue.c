/*
 * Unit tests for virtio/virtqueue.c against the device model in fake_device.c (and a few for
 * fake_transport.c, which later driver tests build on). Every test reads as a statement of what
 * must hold; the device model independently checks the driver's side of the ring protocol.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "virtio/virtqueue.h"
#include "tests/unit/fake_device.h"
#include "tests/unit/fake_platform.h"
#include "tests/unit/fake_transport.h"
#include "include/platform.h"

#define RAM_BASE  0x100000ULL
#define RAM_BYTES (64ULL << 20)

/* Buffers in most tests are never dereferenced by the device: any address will do. */
#define BUF_ADDR(k) (0x40000000ULL + (uint64_t)(k)*0x10000ULL)

static void *tok(uintptr_t k)
{
    return (void *)(k + 1);
}

/* ---- Fixture -------------------------------------------------------------------------------- */

struct qenv {
    struct virtqueue vq;
    struct fake_vq dev;
    uint8_t *mem;
    size_t bytes;
    uint16_t size;
    bool legacy, indirect, event_idx;
    unsigned max_ind;
};

static void qenv_attach(struct qenv *e)
{
    struct vq_addrs a;
    vq_addrs(&e->vq, &a);
    fake_vq_attach(&e->dev, &a, e->size, e->event_idx);
}

static void qenv_setup_named(struct qenv *e, const char *name, unsigned index, uint16_t size,
                             bool legacy, unsigned max_ind, bool indirect, bool event_idx)
{
    memset(e, 0, sizeof(*e));
    fake_mem_init(RAM_BASE, RAM_BYTES);
    fake_log_reset();
    e->size = size;
    e->legacy = legacy;
    e->indirect = indirect;
    e->event_idx = event_idx;
    e->max_ind = max_ind;
    e->bytes = vq_mem_bytes(size, legacy, max_ind);
    assert_true(e->bytes > 0);
    e->mem = fake_mem_alloc(e->bytes, 4096);
    assert_int_equal(
        vq_init(&e->vq, name, index, size, e->mem, legacy, max_ind, indirect, event_idx), VQ_OK);
    qenv_attach(e);
}

static void qenv_setup(struct qenv *e, uint16_t size, bool legacy, unsigned max_ind, bool indirect,
                       bool event_idx)
{
    qenv_setup_named(e, "test", 3, size, legacy, max_ind, indirect, event_idx);
}

static void assert_device_happy(const struct fake_vq *d)
{
    if (d->errors)
        fail_msg("device saw a driver error: %s", d->error);
}

static void qenv_teardown(struct qenv *e)
{
    assert_device_happy(&e->dev);
    fake_vq_detach(&e->dev);
    fake_mem_fini();
}

static int add1(struct qenv *e, uint64_t addr, uint32_t len, void *token)
{
    struct vq_seg s = {addr, len};
    return vq_add(&e->vq, &s, 1, 0, token);
}

static uint16_t avail_idx(const struct qenv *e)
{
    return e->vq.avail->idx;
}

/* ---- Layout --------------------------------------------------------------------------------- */

static size_t up(size_t x, size_t a)
{
    return (x + a - 1) / a * a;
}

static void test_layout_all_sizes(void **state)
{
    (void)state;
    fake_mem_init(RAM_BASE, RAM_BYTES);
    for (unsigned size = 1; size <= VQ_MAX_SIZE; size *= 2) {
        for (int legacy = 0; legacy <= 1; legacy++) {
            unsigned max_ind = size < 4 ? size : 4;
            size_t b = vq_mem_bytes((uint16_t)size, legacy, max_ind);
            assert_true(b > 0);
            assert_int_equal(b % 4096, 0);
            fake_mem_init(RAM_BASE, RAM_BYTES); /* fresh arena each time */
            uint8_t *mem = fake_mem_alloc(b, 4096);
            struct virtqueue vq;
            assert_int_equal(vq_init(&vq, "l", 0, (uint16_t)size, mem, legacy, max_ind, true, true),
                             VQ_OK);
            struct vq_addrs a;
            vq_addrs(&vq, &a);
            uint64_t base = virt_to_phys(mem);
            assert_int_equal(a.desc, base);
            assert_int_equal(a.desc % 16, 0);
            assert_int_equal(a.avail, base + 16ULL * size);
            if (legacy) {
                /* QEMU's legacy vring: ALIGN(16N + 2(3+N), 4096) up to the used ring. */
                assert_int_equal(a.used % 4096, 0);
                assert_int_equal(a.used - a.desc, up(16 * size + 2 * (3 + size), 4096));
            } else {
                assert_int_equal(a.used, up(a.avail + 6 + 2 * size, 4));
            }
            /* Everything, including driver-private state, fits and does not overlap. */
            uint64_t used_end = a.used + 6 + 8ULL * size;
            uint8_t *ind = (uint8_t *)vq.indirect;
            uint8_t *slots = (uint8_t *)vq.slots;
            assert_true((uint64_t)virt_to_phys(ind) >= used_end);
            assert_true(slots >= ind + 16ULL * max_ind * size);
            assert_true(slots + sizeof(struct vq_slot) * size <= mem + b);
            assert_int_equal((uintptr_t)ind % 16, 0);
            assert_int_equal(vq_num_free(&vq), size);
            assert_true(vq_selfcheck(&vq));
        }
    }
    fake_mem_fini();
}

static void test_layout_known_values(void **state)
{
    (void)state;
    struct qenv e;
    /* Modern 128: desc 2048 bytes, avail 262, used 4-aligned right after. */
    qenv_setup(&e, 128, false, 0, false, false);
    struct vq_addrs a;
    vq_addrs(&e.vq, &a);
    assert_int_equal(a.avail - a.desc, 2048);
    assert_int_equal(a.used - a.desc, 2312);
    qenv_teardown(&e);
    /* Legacy 128 (QEMU balloon): used ring one page in; legacy 256: two pages in. */
    qenv_setup(&e, 128, true, 0, false, false);
    vq_addrs(&e.vq, &a);
    assert_int_equal(a.used - a.desc, 4096);
    qenv_teardown(&e);
    qenv_setup(&e, 256, true, 0, false, false);
    vq_addrs(&e.vq, &a);
    assert_int_equal(a.used - a.desc, 8192);
    qenv_teardown(&e);
}

static void test_init_rejects_invalid(void **state)
{
    (void)state;
    assert_int_equal(vq_mem_bytes(0, false, 0), 0);
    assert_int_equal(vq_mem_bytes(3, false, 0), 0);
    assert_int_equal(vq_mem_bytes(100, true, 0), 0);
    assert_int_equal(vq_mem_bytes(65535, false, 0), 0);
    assert_int_equal(vq_mem_bytes(128, false, 129), 0);
    assert_true(vq_mem_bytes(1, false, 0) > 0);
    assert_true(vq_mem_bytes(32768, true, 0) > 0);

    fake_mem_init(RAM_BASE, RAM_BYTES);
    uint8_t *mem = fake_mem_alloc(vq_mem_bytes(128, false, 128) + 4096, 4096);
    struct virtqueue vq;
    assert_int_equal(vq_init(&vq, "x", 0, 100, mem, false, 0, false, false), VQ_ERR_INVALID);
    assert_int_equal(vq_init(&vq, "x", 0, 0, mem, false, 0, false, false), VQ_ERR_INVALID);
    assert_int_equal(vq_init(&vq, "x", 0, 128, mem + 16, false, 0, false, false), VQ_ERR_INVALID);
    assert_int_equal(vq_init(&vq, "x", 0, 128, NULL, false, 0, false, false), VQ_ERR_INVALID);
    assert_int_equal(vq_init(&vq, "x", 0, 64, mem, false, 65, true, false), VQ_ERR_INVALID);
    assert_int_equal(vq_init(&vq, "x", 0, 128, mem, false, 128, true, false), VQ_OK);
    fake_mem_fini();
}

/* ---- Round trips ---------------------------------------------------------------------------- */

static void test_direct_single(void **state)
{
    (void)state;
    struct qenv e;
    qenv_setup(&e, 16, false, 0, false, false);
    assert_int_equal(add1(&e, 0x5000, 64, tok(7)), VQ_OK);
    assert_int_equal(vq_num_free(&e.vq), 15);
    assert_int_equal(vq_in_flight(&e.vq), 1);
    assert_int_equal(avail_idx(&e), 1);

    assert_int_equal(fake_vq_pop(&e.dev), 1);
    struct fake_chain *c = &e.dev.pending[0];
    assert_false(c->indirect);
    assert_int_equal(c->nsegs, 1);
    assert_int_equal(c->segs[0].addr, 0x5000);
    assert_int_equal(c->segs[0].len, 64);
    assert_false(c->segs[0].write);
    assert_int_equal(e.dev.desc[c->head].flags, 0);

    uint32_t len = 1234;
    assert_null(vq_get_used(&e.vq, &len)); /* nothing used yet */
    fake_vq_complete(&e.dev, 0, 0);
    assert_ptr_equal(vq_get_used(&e.vq, &len), tok(7));
    assert_int_equal(len, 0);
    assert_null(vq_get_used(&e.vq, &len));
    assert_int_equal(vq_num_free(&e.vq), 16);
    assert_int_equal(vq_in_flight(&e.vq), 0);
    assert_true(vq_selfcheck(&e.vq));
    assert_false(vq_is_broken(&e.vq));
    assert_string_equal(vq_violation(&e.vq), "");
    qenv_teardown(&e);
}

static void test_direct_chain_out_in(void **state)
{
    (void)state;
    struct qenv e;
    qenv_setup(&e, 16, false, 0, false, false);
    struct vq_seg segs[5] = {
        {0x10000, 16}, {0x20000, 1000}, {0x30000, 4096}, {0x40000, 8}, {0x50000, 3},
    };
    assert_int_equal(vq_add(&e.vq, segs, 2, 3, tok(1)), VQ_OK);
    assert_int_equal(vq_num_free(&e.vq), 11);
    assert_int_equal(fake_vq_pop(&e.dev), 1);
    struct fake_chain *c = &e.dev.pending[0];
    assert_false(c->indirect);
    assert_int_equal(c->nsegs, 5);
    assert_int_equal(c->nmain, 5);
    for (unsigned i = 0; i < 5; i++) {
        assert_int_equal(c->segs[i].addr, segs[i].addr);
        assert_int_equal(c->segs[i].len, segs[i].len);
        assert_int_equal(c->segs[i].write, i >= 2);
    }
    assert_int_equal(c->in_bytes, 4096 + 8 + 3);
    /* The raw descriptors: NEXT on all but the last, WRITE exactly on the in part. */
    uint16_t d = c->head;
    for (unsigned i = 0; i < 5; i++) {
        const struct vring_desc *x = &e.dev.desc[d];
        assert_int_equal(d, c->main[i]);
        assert_int_equal(!!(x->flags & VRING_DESC_F_NEXT), i < 4);
        assert_int_equal(!!(x->flags & VRING_DESC_F_WRITE), i >= 2);
        assert_int_equal(x->flags & VRING_DESC_F_INDIRECT, 0);
        d = x->next;
    }

    /* An in-only and an out-only chain next to it. */
    struct vq_seg in_only[2] = {{0x60000, 100}, {0x61000, 200}};
    assert_int_equal(vq_add(&e.vq, in_only, 0, 2, tok(2)), VQ_OK);
    struct vq_seg out_only[3] = {{0x70000, 4}, {0x71000, 4}, {0x72000, 4}};
    assert_int_equal(vq_add(&e.vq, out_only, 3, 0, tok(3)), VQ_OK);
    assert_int_equal(vq_num_free(&e.vq), 6);
    assert_int_equal(fake_vq_pop_all(&e.dev), 2);
    assert_true(e.dev.pending[1].segs[0].write && e.dev.pending[1].segs[1].write);
    assert_int_equal(e.dev.pending[1].in_bytes, 300);
    assert_int_equal(e.dev.pending[2].in_bytes, 0);
    assert_int_equal(e.dev.pending[2].out_bytes, 12);

    /* Complete out of order; lengths up to the writable total are legal. */
    uint32_t len;
    fake_vq_complete(&e.dev, 1, 300);          /* tok 2, exact maximum */
    fake_vq_complete(&e.dev, 1, 0);            /* tok 3 */
    fake_vq_complete(&e.dev, 0, 4096 + 8 + 3); /* tok 1 */
    assert_ptr_equal(vq_get_used(&e.vq, &len), tok(2));
    assert_int_equal(len, 300);
    assert_ptr_equal(vq_get_used(&e.vq, &len), tok(3));
    assert_int_equal(len, 0);
    assert_ptr_equal(vq_get_used(&e.vq, &len), tok(1));
    assert_int_equal(len, 4107);
    assert_int_equal(vq_num_free(&e.vq), 16);
    assert_true(vq_selfcheck(&e.vq));
    e.dev.errors = 0; /* the one the test asked for */
    qenv_teardown(&e);
}

static void test_indirect_chain(void **state)
{
    (void)state;
    struct qenv e;
    qenv_setup(&e, 16, false, 8, true, false);
    struct vq_seg segs[5] = {
        {0x10000, 16}, {0x20000, 32}, {0x30000, 48}, {0x40000, 64}, {0x50000, 80},
    };
    assert_int_equal(vq_add(&e.vq, segs, 3, 2, tok(1)), VQ_OK);
    assert_int_equal(vq_num_free(&e.vq), 15); /* one descriptor for the whole buffer */
    assert_int_equal(fake_vq_pop(&e.dev), 1);
    struct fake_chain *c = &e.dev.pending[0];
    const struct vring_desc *h = &e.dev.desc[c->head];
    assert_int_equal(h->flags, VRING_DESC_F_INDIRECT); /* no NEXT, no WRITE */
    assert_int_equal(h->len, 5 * 16);
    uint64_t base = virt_to_phys(e.mem);
    assert_true(h->addr >= base && h->addr + h->len <= base + e.bytes);
    assert_int_equal(h->addr % 16, 0);
    assert_true(c->indirect);
    assert_int_equal(c->nsegs, 5);
    for (unsigned i = 0; i < 5; i++) {
        assert_int_equal(c->segs[i].addr, segs[i].addr);
        assert_int_equal(c->segs[i].len, segs[i].len);
        assert_int_equal(c->segs[i].write, i >= 3);
    }
    const struct vring_desc *t = phys_to_virt(h->addr);
    for (unsigned i = 0; i < 5; i++) {
        assert_int_equal(!!(t[i].flags & VRING_DESC_F_NEXT), i < 4);
        assert_int_equal(t[i].flags & VRING_DESC_F_INDIRECT, 0);
        if (i < 4)
            assert_int_equal(t[i].next, i + 1);
    }

    /* One segment: a plain descriptor. More than max_indirect: a direct chain. */
    assert_int_equal(add1(&e, 0x90000, 8, tok(2)), VQ_OK);
    assert_int_equal(vq_num_free(&e.vq), 14);
    struct vq_seg many[9];
    for (unsigned i = 0; i < 9; i++)
        many[i] = (struct vq_seg){BUF_ADDR(i), 4};
    assert_int_equal(vq_add(&e.vq, many, 9, 0, tok(3)), VQ_OK);
    assert_int_equal(vq_num_free(&e.vq), 5);
    assert_int_equal(fake_vq_pop_all(&e.dev), 2);
    assert_false(e.dev.pending[1].indirect);
    assert_int_equal(e.dev.desc[e.dev.pending[1].head].flags, 0);
    assert_false(e.dev.pending[2].indirect);
    assert_int_equal(e.dev.pending[2].nmain, 9);

    uint32_t len;
    fake_vq_complete(&e.dev, 0, 144); /* all 64 + 80 writable bytes */
    assert_ptr_equal(vq_get_used(&e.vq, &len), tok(1));
    assert_int_equal(len, 144);
    /* Reusing the freed head reuses its table; the device checks nothing in flight moved. */
    assert_int_equal(vq_add(&e.vq, segs, 1, 1, tok(4)), VQ_OK);
    assert_int_equal(fake_vq_pop(&e.dev), 1);
    fake_vq_complete(&e.dev, 0, 0);
    fake_vq_complete(&e.dev, 0, 0);
    fake_vq_complete(&e.dev, 0, 0);
    for (int i = 0; i < 3; i++)
        assert_non_null(vq_get_used(&e.vq, NULL));
    assert_int_equal(vq_num_free(&e.vq), 16);
    assert_true(vq_selfcheck(&e.vq));
    e.dev.errors = 0; /* the one the test asked for */
    qenv_teardown(&e);

    /* Tables provided but the feature not negotiated: never INDIRECT. */
    qenv_setup(&e, 16, false, 8, false, false);
    assert_int_equal(vq_add(&e.vq, segs, 3, 2, tok(1)), VQ_OK);
    assert_int_equal(vq_num_free(&e.vq), 11);
    assert_int_equal(fake_vq_pop(&e.dev), 1);
    assert_false(e.dev.pending[0].indirect);
    qenv_teardown(&e);
}

/* Device-readable and -writable data really travel through the arena. */
static void test_data_through_chain(void **state)
{
    (void)state;
    struct qenv e;
    qenv_setup(&e, 8, false, 4, true, true);
    uint8_t *req = fake_mem_alloc(12, 8);
    uint8_t *resp = fake_mem_alloc(8, 8);
    memcpy(req, "hello, dev!", 12);
    struct vq_seg s[2] = {{virt_to_phys(req), 12}, {virt_to_phys(resp), 8}};
    assert_int_equal(vq_add(&e.vq, s, 1, 1, tok(0)), VQ_OK);
    assert_int_equal(fake_vq_pop(&e.dev), 1);
    char got[32] = {0};
    assert_int_equal(fake_chain_read(&e.dev.pending[0], got, sizeof(got)), 12);
    assert_string_equal(got, "hello, dev!");
    assert_int_equal(fake_chain_write(&e.dev.pending[0], "reply!", 7), 7);
    fake_vq_complete(&e.dev, 0, 7);
    uint32_t len;
    assert_ptr_equal(vq_get_used(&e.vq, &len), tok(0));
    assert_int_equal(len, 7);
    assert_string_equal((char *)resp, "reply!");
    qenv_teardown(&e);
}

/* ---- Capacity and invalid requests ---------------------------------------------------------- */

static void test_fill_to_full(void **state)
{
    (void)state;
    struct qenv e;
    qenv_setup(&e, 8, false, 0, false, false);
    for (unsigned i = 0; i < 8; i++)
        assert_int_equal(add1(&e, BUF_ADDR(i), 4, tok(i)), VQ_OK);
    assert_int_equal(vq_num_free(&e.vq), 0);
    assert_int_equal(add1(&e, BUF_ADDR(8), 4, tok(8)), VQ_ERR_FULL);
    assert_int_equal(avail_idx(&e), 8); /* the failed add published nothing */
    assert_int_equal(vq_in_flight(&e.vq), 8);

    assert_int_equal(fake_vq_pop_all(&e.dev), 8);
    fake_vq_complete(&e.dev, 5, 0);
    assert_ptr_equal(vq_get_used(&e.vq, NULL), tok(5));
    assert_int_equal(vq_num_free(&e.vq), 1);
    /* One descriptor free: a two-segment chain does not fit, a single one does. */
    struct vq_seg two[2] = {{BUF_ADDR(20), 4}, {BUF_ADDR(21), 4}};
    assert_int_equal(vq_add(&e.vq, two, 2, 0, tok(20)), VQ_ERR_FULL);
    assert_int_equal(add1(&e, BUF_ADDR(9), 4, tok(9)), VQ_OK);
    assert_int_equal(add1(&e, BUF_ADDR(10), 4, tok(10)), VQ_ERR_FULL);
    assert_true(vq_selfcheck(&e.vq));
    qenv_teardown(&e);

    /* With indirect tables each multi-segment buffer costs one descriptor. */
    qenv_setup(&e, 8, false, 4, true, false);
    struct vq_seg three[3] = {{BUF_ADDR(0), 4}, {BUF_ADDR(1), 4}, {BUF_ADDR(2), 4}};
    for (unsigned i = 0; i < 8; i++)
        assert_int_equal(vq_add(&e.vq, three, 2, 1, tok(i)), VQ_OK);
    assert_int_equal(vq_add(&e.vq, three, 2, 1, tok(8)), VQ_ERR_FULL);
    assert_int_equal(fake_vq_pop_all(&e.dev), 8);
    fake_vq_complete(&e.dev, 0, 4);
    assert_ptr_equal(vq_get_used(&e.vq, NULL), tok(0));
    assert_int_equal(vq_add(&e.vq, three, 2, 1, tok(8)), VQ_OK);
    qenv_teardown(&e);
}

static void test_invalid_requests(void **state)
{
    (void)state;
    struct qenv e;
    qenv_setup(&e, 8, false, 8, true, false);
    struct vq_seg s[10];
    for (unsigned i = 0; i < 10; i++)
        s[i] = (struct vq_seg){BUF_ADDR(i), 16};
    assert_int_equal(vq_add(&e.vq, s, 0, 0, tok(0)), VQ_ERR_INVALID);    /* n == 0 */
    assert_int_equal(vq_add(&e.vq, s, 1, 0, NULL), VQ_ERR_INVALID);      /* no token */
    assert_int_equal(vq_add(&e.vq, NULL, 1, 0, tok(0)), VQ_ERR_INVALID); /* no segments */
    assert_int_equal(vq_add(&e.vq, s, 5, 4, tok(0)), VQ_ERR_INVALID);    /* 9 > size 8 */
    assert_int_equal(vq_add(&e.vq, s, 0xffffffffu, 2, tok(0)), VQ_ERR_INVALID);
    s[3].len = 0;
    assert_int_equal(vq_add(&e.vq, s, 2, 2, tok(0)), VQ_ERR_INVALID); /* zero length */
    s[3].len = 16;
    struct vq_seg big[2] = {{BUF_ADDR(0), 0xffffffffu}, {BUF_ADDR(1), 1}};
    assert_int_equal(vq_add(&e.vq, big, 1, 1, tok(0)), VQ_ERR_INVALID); /* > 4 GiB total */
    struct vq_seg wrap = {0xfffffffffffff000ULL, 0x2000};
    assert_int_equal(vq_add(&e.vq, &wrap, 1, 0, tok(0)), VQ_ERR_INVALID);
    /* Nothing happened. */
    assert_int_equal(vq_num_free(&e.vq), 8);
    assert_int_equal(vq_in_flight(&e.vq), 0);
    assert_int_equal(avail_idx(&e), 0);
    assert_false(vq_kick_prepare(&e.vq));
    assert_int_equal(fake_vq_pop(&e.dev), 0);
    assert_false(vq_is_broken(&e.vq));
    /* A full-size chain is fine. */
    assert_int_equal(vq_add(&e.vq, s, 4, 4, tok(1)), VQ_OK);
    qenv_teardown(&e);

    /* Without indirect: a chain as long as the queue is the limit. */
    qenv_setup(&e, 8, false, 0, false, false);
    assert_int_equal(vq_add(&e.vq, s, 9, 0, tok(0)), VQ_ERR_INVALID);
    assert_int_equal(vq_add(&e.vq, s, 8, 0, tok(0)), VQ_OK);
    assert_int_equal(vq_num_free(&e.vq), 0);
    assert_int_equal(fake_vq_pop(&e.dev), 1);
    qenv_teardown(&e);
}

/* ---- Random add/use cycles with out-of-order completion ------------------------------------- */

static uint64_t rng_state;

static uint64_t rnd(void)
{
    /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static unsigned rndn(unsigned n)
{
    return (unsigned)(rnd() % n);
}

/* Per token: what the test added (tokens are small integers + 1). */
#define MAX_TOKENS 65536
struct model_buf {
    bool live;
    uint16_t head;
    unsigned ndesc;
    uint64_t in_bytes;
    unsigned nsegs, n_out;
    struct vq_seg segs[8];
};
static struct model_buf *model;
static uint32_t expect_len[MAX_TOKENS];

static unsigned model_desc_in_use(unsigned ntok)
{
    unsigned n = 0;
    for (unsigned i = 0; i < ntok; i++)
        if (model[i].live)
            n += model[i].ndesc;
    return n;
}

/* Add a random buffer under token index k. Returns vq_add's result. */
static int random_add(struct qenv *e, unsigned k)
{
    struct model_buf *m = &model[k];
    unsigned n_out = rndn(4), n_in = rndn(4);
    if (n_out + n_in == 0)
        n_out = 1;
    unsigned n = n_out + n_in;
    memset(m, 0, sizeof(*m));
    for (unsigned i = 0; i < n; i++) {
        m->segs[i] = (struct vq_seg){BUF_ADDR(rndn(1u << 16)), 1 + rndn(8192)};
        if (i >= n_out)
            m->in_bytes += m->segs[i].len;
    }
    m->nsegs = n;
    m->n_out = n_out;
    m->ndesc = (e->vq.use_indirect && n > 1 && n <= e->max_ind) ? 1 : n;
    unsigned free_before = vq_num_free(&e->vq);
    int r = vq_add(&e->vq, m->segs, n_out, n_in, tok(k));
    if (m->ndesc > e->size) { /* a direct chain longer than the ring can never fit */
        assert_int_equal(r, VQ_ERR_INVALID);
        assert_int_equal(vq_num_free(&e->vq), free_before);
        return r;
    }
    if (r == VQ_ERR_FULL) {
        assert_true(free_before < m->ndesc);
        assert_int_equal(vq_num_free(&e->vq), free_before);
        return r;
    }
    assert_int_equal(r, VQ_OK);
    assert_int_equal(vq_num_free(&e->vq), free_before - m->ndesc);
    m->live = true;
    m->head = e->vq.avail->ring[(uint16_t)(e->vq.avail_idx - 1) & (e->size - 1)];
    return r;
}

/* The device's view of a popped chain matches what the test added. */
static void check_popped(struct qenv *e, const struct fake_chain *c, unsigned k)
{
    const struct model_buf *m = &model[k];
    assert_true(m->live);
    assert_int_equal(c->head, m->head);
    assert_int_equal(c->nsegs, m->nsegs);
    assert_int_equal(c->indirect, m->ndesc == 1 && m->nsegs > 1);
    for (unsigned i = 0; i < m->nsegs; i++) {
        assert_int_equal(c->segs[i].addr, m->segs[i].addr);
        assert_int_equal(c->segs[i].len, m->segs[i].len);
        assert_int_equal(c->segs[i].write, i >= m->n_out);
    }
    (void)e;
}

static void random_cycles(uint16_t size, bool legacy, unsigned max_ind, bool indirect,
                          bool event_idx, unsigned iterations, uint64_t seed)
{
    struct qenv e;
    qenv_setup(&e, size, legacy, max_ind, indirect, event_idx);
    rng_state = seed;
    model = calloc(MAX_TOKENS, sizeof(*model));
    assert_non_null(model);
    /* avail position -> token, to match popped chains with what was added */
    static unsigned pos_token[65536];
    unsigned next_tok = 0, live = 0, fulls = 0, used_total = 0;

    for (unsigned it = 0; it < iterations; it++) {
        unsigned op = rndn(10);
        if (op < 5) {
            /* find a token index not live (tokens recycle) */
            unsigned k = next_tok++ % 4096;
            if (model[k].live)
                continue;
            uint16_t pos = e.vq.avail_idx;
            int r = random_add(&e, k);
            if (r == VQ_OK) {
                pos_token[pos] = k;
                live++;
            } else if (r == VQ_ERR_FULL) {
                fulls++;
            }
            if (rndn(4) == 0)
                (void)vq_kick_prepare(&e.vq);
        } else if (op < 7) {
            unsigned before = e.dev.npending;
            fake_vq_pop_all(&e.dev);
            assert_device_happy(&e.dev);
            for (unsigned i = before; i < e.dev.npending; i++)
                check_popped(&e, &e.dev.pending[i], pos_token[e.dev.pending[i].avail_pos]);
        } else if (op < 9) {
            /* The device completes a few in random order. */
            for (unsigned n = rndn(4); n && e.dev.npending; n--) {
                unsigned p = rndn(e.dev.npending);
                unsigned k = pos_token[e.dev.pending[p].avail_pos];
                uint32_t len = (uint32_t)(model[k].in_bytes ? rnd() % (model[k].in_bytes + 1) : 0);
                expect_len[k] = len;
                fake_vq_complete(&e.dev, p, len);
                assert_device_happy(&e.dev);
            }
        } else {
            void *t;
            uint32_t len;
            while ((t = vq_get_used(&e.vq, &len))) {
                unsigned k = (unsigned)((uintptr_t)t - 1);
                assert_true(k < 4096 && model[k].live);
                assert_int_equal(len, expect_len[k]);
                model[k].live = false;
                live--;
                used_total++;
            }
            assert_false(vq_is_broken(&e.vq));
        }
        assert_int_equal(vq_in_flight(&e.vq), live);
        assert_int_equal(vq_num_free(&e.vq) + model_desc_in_use(4096), size);
        if (it % 64 == 0 || size <= 16)
            assert_true(vq_selfcheck(&e.vq));
    }
    /* Drain everything: all descriptors come back. */
    fake_vq_pop_all(&e.dev);
    while (e.dev.npending)
        fake_vq_complete(&e.dev, rndn(e.dev.npending), 0);
    while (vq_get_used(&e.vq, NULL))
        live--;
    assert_int_equal(live, 0);
    assert_int_equal(vq_num_free(&e.vq), size);
    assert_int_equal(vq_in_flight(&e.vq), 0);
    assert_true(vq_selfcheck(&e.vq));
    assert_false(vq_is_broken(&e.vq));
    assert_true(used_total > iterations / 20);
    assert_true(fulls > 0); /* the ring did fill up at times */
    free(model);
    model = NULL;
    qenv_teardown(&e);
}

static void test_random_cycles_modern_indirect_event(void **state)
{
    (void)state;
    random_cycles(32, false, 4, true, true, 20000, 0x1234567ULL);
}

static void test_random_cycles_legacy_direct(void **state)
{
    (void)state;
    random_cycles(16, true, 0, false, false, 20000, 0xabcdefULL);
}

static void test_random_cycles_wraps_indices(void **state)
{
    (void)state;
    /* Small ring, many cycles: avail/used indices wrap 16 bits several times. */
    random_cycles(4, false, 2, true, true, 300000, 42);
}

/* ---- Notification suppression --------------------------------------------------------------- */

static void test_event_idx_kick(void **state)
{
    (void)state;
    struct qenv e;
    qenv_setup(&e, 16, false, 0, false, true);
    e.dev.auto_avail_event = false;
    assert_false(vq_kick_prepare(&e.vq)); /* nothing added */
    /* avail_event 0: the first entry (index 0) must be notified. */
    assert_int_equal(add1(&e, BUF_ADDR(0), 4, tok(0)), VQ_OK);
    assert_true(vq_kick_prepare(&e.vq));
    /* The device has not moved avail_event: entry 1 is past it, suppressed. */
    assert_int_equal(add1(&e, BUF_ADDR(1), 4, tok(1)), VQ_OK);
    assert_false(vq_kick_prepare(&e.vq));
    /* Device wants to hear about entry 5: entries 2..4 suppressed, a batch covering 5 kicks. */
    fake_vq_set_avail_event(&e.dev, 5);
    for (unsigned i = 2; i <= 4; i++)
        assert_int_equal(add1(&e, BUF_ADDR(i), 4, tok(i)), VQ_OK);
    assert_false(vq_kick_prepare(&e.vq));
    assert_int_equal(add1(&e, BUF_ADDR(5), 4, tok(5)), VQ_OK);
    assert_true(vq_kick_prepare(&e.vq));
    fake_vq_set_avail_event(&e.dev, 7);
    for (unsigned i = 6; i <= 8; i++)
        assert_int_equal(add1(&e, BUF_ADDR(i), 4, tok(i)), VQ_OK);
    assert_true(vq_kick_prepare(&e.vq));  /* batch 6..8 contains 7 */
    assert_false(vq_kick_prepare(&e.vq)); /* and nothing new since */
    /* EVENT_IDX: the NO_NOTIFY flag must be ignored. */
    fake_vq_set_no_notify(&e.dev, true);
    fake_vq_set_avail_event(&e.dev, 9);
    assert_int_equal(add1(&e, BUF_ADDR(9), 4, tok(9)), VQ_OK);
    assert_true(vq_kick_prepare(&e.vq));
    fake_vq_pop_all(&e.dev);
    qenv_teardown(&e);
}

static void test_event_idx_kick_across_wrap(void **state)
{
    (void)state;
    struct qenv e;
    qenv_setup(&e, 4, false, 0, false, true);
    /* A device that always asks for the next entry: every single add must kick, across the
     * 16-bit wrap of the indices. */
    for (unsigned i = 0; i < 70000; i++) {
        assert_int_equal(add1(&e, BUF_ADDR(i % 8), 4, tok(i % 8)), VQ_OK);
        if (!vq_kick_prepare(&e.vq))
            fail_msg("no kick at iteration %u", i);
        assert_int_equal(fake_vq_pop(&e.dev), 1);
        fake_vq_complete(&e.dev, 0, 0);
        assert_ptr_equal(vq_get_used(&e.vq, NULL), tok(i % 8));
    }
    /* More than 65535 additions without a kick: the 16-bit window is gone, so notify. */
    e.dev.auto_avail_event = false;
    fake_vq_set_avail_event(&e.dev, (uint16_t)(e.vq.avail_idx - 10));
    for (unsigned i = 0; i < 70000; i++) {
        assert_int_equal(add1(&e, BUF_ADDR(0), 4, tok(0)), VQ_OK);
        assert_int_equal(fake_vq_pop(&e.dev), 1);
        fake_vq_complete(&e.dev, 0, 0);
        assert_ptr_equal(vq_get_used(&e.vq, NULL), tok(0));
    }
    assert_true(vq_kick_prepare(&e.vq));
    qenv_teardown(&e);
}

static void test_no_notify_flag(void **state)
{
    (void)state;
    struct qenv e;
    qenv_setup(&e, 8, false, 0, false, false);
    assert_int_equal(add1(&e, BUF_ADDR(0), 4, tok(0)), VQ_OK);
    assert_true(vq_kick_prepare(&e.vq));
    fake_vq_set_no_notify(&e.dev, true);
    assert_int_equal(add1(&e, BUF_ADDR(1), 4, tok(1)), VQ_OK);
    assert_int_equal(add1(&e, BUF_ADDR(2), 4, tok(2)), VQ_OK);
    assert_false(vq_kick_prepare(&e.vq));
    fake_vq_set_no_notify(&e.dev, false);
    assert_int_equal(add1(&e, BUF_ADDR(3), 4, tok(3)), VQ_OK);
    assert_true(vq_kick_prepare(&e.vq));
    assert_false(vq_kick_prepare(&e.vq)); /* nothing new */
    /* Without EVENT_IDX, avail_event is meaningless and ignored. */
    fake_vq_set_avail_event(&e.dev, 1000);
    assert_int_equal(add1(&e, BUF_ADDR(4), 4, tok(4)), VQ_OK);
    assert_true(vq_kick_prepare(&e.vq));
    fake_vq_pop_all(&e.dev);
    qenv_teardown(&e);
}

static void test_used_notifications(void **state)
{
    (void)state;
    struct qenv e;
    for (int ev = 0; ev <= 1; ev++) {
        qenv_setup(&e, 8, false, 0, false, ev);
        for (unsigned i = 0; i < 3; i++)
            assert_int_equal(add1(&e, BUF_ADDR(i), 4, tok(i)), VQ_OK);
        assert_int_equal(fake_vq_pop_all(&e.dev), 3);
        fake_vq_complete(&e.dev, 0, 0);
        assert_int_equal(e.dev.irqs, 1);
        fake_vq_complete(&e.dev, 0, 0);
        /* EVENT_IDX: the driver has not caught up, so no second notification. */
        assert_int_equal(e.dev.irqs, ev ? 1 : 2);
        assert_non_null(vq_get_used(&e.vq, NULL));
        assert_non_null(vq_get_used(&e.vq, NULL));
        if (ev)
            assert_int_equal(e.vq.avail->ring[8], 2); /* used_event tracks last_used */
        fake_vq_complete(&e.dev, 0, 0);
        assert_int_equal(e.dev.irqs, ev ? 2 : 3);
        assert_non_null(vq_get_used(&e.vq, NULL));

        vq_disable_interrupts(&e.vq);
        /* EVENT_IDX: flags must stay 0; otherwise NO_INTERRUPT. */
        assert_int_equal(e.vq.avail->flags, ev ? 0 : VRING_AVAIL_F_NO_INTERRUPT);
        unsigned long irqs = e.dev.irqs;
        for (unsigned i = 0; i < 5; i++) {
            assert_int_equal(add1(&e, BUF_ADDR(i), 4, tok(i)), VQ_OK);
            assert_int_equal(fake_vq_pop(&e.dev), 1);
            fake_vq_complete(&e.dev, 0, 0);
            if (i < 4)
                assert_non_null(vq_get_used(&e.vq, NULL));
        }
        assert_int_equal(e.dev.irqs, irqs);
        /* One used buffer is pending: enabling says "poll first". */
        assert_true(vq_enable_interrupts(&e.vq));
        assert_non_null(vq_get_used(&e.vq, NULL));
        assert_false(vq_enable_interrupts(&e.vq));
        assert_int_equal(e.vq.avail->flags, 0);
        assert_int_equal(add1(&e, BUF_ADDR(0), 4, tok(0)), VQ_OK);
        assert_int_equal(fake_vq_pop(&e.dev), 1);
        fake_vq_complete(&e.dev, 0, 0);
        assert_int_equal(e.dev.irqs, irqs + 1);
        assert_non_null(vq_get_used(&e.vq, NULL));
        qenv_teardown(&e);
    }
}

/* ---- Misbehaving devices -------------------------------------------------------------------- */

/* The queue is broken with a message containing each of the needles, logged exactly once,
 * and stays dead: no adds, no used buffers, no descriptor freed. */
static void assert_broken_with(struct qenv *e, const char *const *needles)
{
    assert_true(vq_is_broken(&e->vq));
    const char *msg = vq_violation(&e->vq);
    assert_true(strncmp(msg, "virtqueue test[3]: ", 19) == 0);
    for (; *needles; needles++)
        if (!strstr(msg, *needles))
            fail_msg("violation \"%s\" lacks \"%s\"", msg, *needles);
    assert_int_equal(fake_log_count(), 1);
    assert_true(fake_log_contains(msg));

    unsigned free_before = vq_num_free(&e->vq), in_flight = vq_in_flight(&e->vq);
    assert_null(vq_get_used(&e->vq, NULL));
    assert_int_equal(add1(e, BUF_ADDR(99), 4, tok(99)), VQ_ERR_BROKEN);
    void *t = NULL;
    uint64_t t0 = platform_now_ns();
    assert_int_equal(vq_wait_used(&e->vq, 5ULL * 1000000000ULL, &t, NULL), VQ_ERR_BROKEN);
    assert_true(platform_now_ns() - t0 < 1000000000ULL); /* immediately, not at the deadline */
    assert_null(t);
    assert_int_equal(vq_num_free(&e->vq), free_before);
    assert_int_equal(vq_in_flight(&e->vq), in_flight);
    assert_true(vq_selfcheck(&e->vq));
    assert_int_equal(fake_log_count(), 1); /* still only the one line */
    assert_string_equal(vq_violation(&e->vq), msg);

    /* After a reset every buffer in flight comes back exactly once. */
    unsigned n = 0;
    while (vq_detach_unused(&e->vq))
        n++;
    assert_int_equal(n, in_flight);
    assert_int_equal(vq_num_free(&e->vq), e->size);
    assert_true(vq_selfcheck(&e->vq));
    fake_vq_detach(&e->dev);
    qenv_attach(e); /* the device model must not see the now-stale buffers as held */
}

#define NEEDLES(...) ((const char *const[]){__VA_ARGS__, NULL})

static void test_bad_used_id_out_of_range(void **state)
{
    (void)state;
    struct qenv e;
    fake_log_echo(false);
    uint32_t ids[] = {16, 21, 0xffff, 0x10000, 0xffffffffu};
    for (unsigned i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
        qenv_setup(&e, 16, false, 0, false, false);
        assert_int_equal(add1(&e, BUF_ADDR(0), 4, tok(0)), VQ_OK);
        assert_int_equal(fake_vq_pop(&e.dev), 1);
        fake_vq_push_raw(&e.dev, ids[i], 0);
        assert_null(vq_get_used(&e.vq, NULL));
        char want[64];
        snprintf(want, sizeof(want), "used id %u out of range", ids[i]);
        assert_broken_with(&e, NEEDLES(want, "queue size 16"));
        assert_int_equal(vq_num_free(&e.vq), 16);
        qenv_teardown(&e);
    }
    fake_log_echo(true);
}

static void test_bad_used_id_free_slot(void **state)
{
    (void)state;
    struct qenv e;
    fake_log_echo(false);
    qenv_setup(&e, 16, false, 0, false, false);
    assert_int_equal(add1(&e, BUF_ADDR(0), 4, tok(0)), VQ_OK);
    assert_int_equal(add1(&e, BUF_ADDR(1), 4, tok(1)), VQ_OK);
    assert_int_equal(fake_vq_pop_all(&e.dev), 2);
    fake_vq_push_raw(&e.dev, 9, 0); /* descriptor 9 was never handed out */
    assert_null(vq_get_used(&e.vq, NULL));
    assert_broken_with(&e, NEEDLES("used id 9", "not in flight", "free descriptor"));
    qenv_teardown(&e);
    fake_log_echo(true);
}

static void test_bad_used_id_chain_body(void **state)
{
    (void)state;
    struct qenv e;
    fake_log_echo(false);
    qenv_setup(&e, 16, false, 0, false, false);
    struct vq_seg s[3] = {{BUF_ADDR(0), 4}, {BUF_ADDR(1), 4}, {BUF_ADDR(2), 4}};
    assert_int_equal(vq_add(&e.vq, s, 2, 1, tok(0)), VQ_OK);
    assert_int_equal(fake_vq_pop(&e.dev), 1);
    uint16_t body = e.dev.pending[0].main[1];
    assert_int_not_equal(body, e.dev.pending[0].head);
    fake_vq_push_raw(&e.dev, body, 0);
    assert_null(vq_get_used(&e.vq, NULL));
    char want[32];
    snprintf(want, sizeof(want), "used id %u ", body);
    assert_broken_with(&e, NEEDLES(want, "not a chain head"));
    assert_int_equal(vq_num_free(&e.vq), 16);
    qenv_teardown(&e);
    fake_log_echo(true);
}

static void test_duplicate_completion(void **state)
{
    (void)state;
    struct qenv e;
    fake_log_echo(false);
    /* Same id twice in one batch, with another buffer still in flight. */
    qenv_setup(&e, 16, false, 0, false, false);
    assert_int_equal(add1(&e, BUF_ADDR(0), 4, tok(0)), VQ_OK);
    assert_int_equal(add1(&e, BUF_ADDR(1), 4, tok(1)), VQ_OK);
    assert_int_equal(add1(&e, BUF_ADDR(2), 4, tok(2)), VQ_OK);
    assert_int_equal(fake_vq_pop_all(&e.dev), 3);
    uint16_t head0 = e.dev.pending[0].head;
    fake_vq_complete(&e.dev, 0, 0);
    fake_vq_push_raw(&e.dev, head0, 0);
    assert_ptr_equal(vq_get_used(&e.vq, NULL), tok(0));
    assert_int_equal(vq_num_free(&e.vq), 14);
    assert_null(vq_get_used(&e.vq, NULL));
    char want[32];
    snprintf(want, sizeof(want), "used id %u ", head0);
    assert_broken_with(&e, NEEDLES(want, "not in flight"));
    qenv_teardown(&e);

    /* Replayed after the driver took it back and nothing else is in flight. */
    qenv_setup(&e, 16, false, 0, false, false);
    assert_int_equal(add1(&e, BUF_ADDR(0), 4, tok(0)), VQ_OK);
    assert_int_equal(fake_vq_pop(&e.dev), 1);
    head0 = e.dev.pending[0].head;
    fake_vq_complete(&e.dev, 0, 0);
    assert_ptr_equal(vq_get_used(&e.vq, NULL), tok(0));
    fake_vq_push_raw(&e.dev, head0, 0);
    assert_null(vq_get_used(&e.vq, NULL));
    assert_broken_with(&e, NEEDLES("moved from 1 to 2", "only 0 buffers are in flight"));
    qenv_teardown(&e);

    fake_log_echo(true);
}

static void test_used_len_too_large(void **state)
{
    (void)state;
    struct qenv e;
    fake_log_echo(false);
    /* Direct chain with 100 writable bytes, and an indirect one with 4 + 96. */
    for (int ind = 0; ind <= 1; ind++) {
        qenv_setup(&e, 16, false, ind ? 4 : 0, ind, false);
        struct vq_seg s[3] = {{BUF_ADDR(0), 50}, {BUF_ADDR(1), 4}, {BUF_ADDR(2), 96}};
        assert_int_equal(vq_add(&e.vq, s, 1, 2, tok(0)), VQ_OK);
        assert_int_equal(fake_vq_pop(&e.dev), 1);
        uint16_t head = e.dev.pending[0].head;
        unsigned free_before = vq_num_free(&e.vq);
        fake_vq_complete(&e.dev, 0, 101);
        assert_null(vq_get_used(&e.vq, NULL));
        char want[64];
        snprintf(want, sizeof(want), "used len 101 for id %u exceeds the 100 ", head);
        assert_int_equal(vq_num_free(&e.vq), free_before);
        assert_broken_with(&e, NEEDLES(want, "device-writable"));
        qenv_teardown(&e);
    }
    /* Out-only buffer (a balloon PFN array) in strict mode: any non-zero length breaks it. */
    qenv_setup(&e, 16, false, 0, false, false);
    vq_set_strict_len(&e.vq, true);
    assert_int_equal(add1(&e, BUF_ADDR(0), 1024, tok(0)), VQ_OK);
    assert_int_equal(fake_vq_pop(&e.dev), 1);
    fake_vq_complete(&e.dev, 0, 1024);
    assert_null(vq_get_used(&e.vq, NULL));
    assert_broken_with(&e, NEEDLES("used len 1024", "no device-writable bytes", "strict"));
    assert_string_equal(vq_len_verdict(&e.vq), "violated");
    qenv_teardown(&e);
    fake_log_echo(true);
}

/* A used length on a buffer with no writable bytes is a deviation (QEMU < 7.0), counted and read
 * as 0, on modern and legacy queues alike; one past a writable part still breaks the queue. */

/* What a deviating used length is said to be: what was seen against the buffer, not a host. */
static void test_used_len_observed(void **state)
{
    (void)state;
    assert_string_equal(vq_len_observed(1024, 1024), "the bytes read");
    assert_string_equal(vq_len_observed(256, 1024), "the 4-byte entries read (a PFN count)");
    assert_string_equal(vq_len_observed(7, 1024), "another value");
    assert_string_equal(vq_len_observed(2, 10), "another value"); /* 10 is no whole PFN count */
}

/* A used length beyond the whole of a read-only buffer is no deviation: the ring is violated. */
static void test_used_len_beyond_buffer(void **state)
{
    (void)state;
    struct qenv e;
    fake_log_echo(false);
    qenv_setup(&e, 16, false, 0, false, false);
    assert_int_equal(add1(&e, BUF_ADDR(0), 1024, tok(0)), VQ_OK);
    assert_int_equal(fake_vq_pop_all(&e.dev), 1);
    fake_vq_complete(&e.dev, 0, 1025);
    assert_null(vq_get_used(&e.vq, NULL));
    assert_true(vq_is_broken(&e.vq));
    assert_non_null(strstr(vq_violation(&e.vq), "exceeds the whole 1024-byte buffer"));
    assert_int_equal(vq_len_deviations(&e.vq), 0);
    qenv_teardown(&e);
    fake_log_reset();
    fake_log_echo(true);
}
static void test_used_len_deviation(void **state)
{
    (void)state;
    struct qenv e;
    fake_log_echo(false);
    for (int legacy = 0; legacy <= 1; legacy++) {
        qenv_setup(&e, 16, legacy, 0, false, false);
        assert_string_equal(vq_len_verdict(&e.vq), "conforms");
        struct vq_seg s[2] = {{BUF_ADDR(0), 1024}, {BUF_ADDR(1), 8}};
        assert_int_equal(add1(&e, BUF_ADDR(0), 1024, tok(0)), VQ_OK);
        assert_int_equal(add1(&e, BUF_ADDR(2), 40, tok(1)), VQ_OK);
        assert_int_equal(vq_add(&e.vq, s, 1, 1, tok(2)), VQ_OK);
        assert_int_equal(fake_vq_pop_all(&e.dev), 3);
        fake_vq_complete(&e.dev, 0, 1024); /* old QEMU: PFN bytes read */
        fake_vq_complete(&e.dev, 0, 40);
        fake_vq_complete(&e.dev, 0, 8); /* within the writable part: fine */
        uint32_t len = 99;
        assert_ptr_equal(vq_get_used(&e.vq, &len), tok(0));
        assert_int_equal(len, 0);
        assert_ptr_equal(vq_get_used(&e.vq, &len), tok(1));
        assert_int_equal(len, 0);
        assert_ptr_equal(vq_get_used(&e.vq, &len), tok(2));
        assert_int_equal(len, 8);
        assert_false(vq_is_broken(&e.vq));
        assert_int_equal(vq_len_deviations(&e.vq), 2);
        assert_int_equal(e.vq.first_dev_len, 1024);
        assert_int_equal(e.vq.first_dev_out_len, 1024);
        assert_string_equal(vq_len_verdict(&e.vq), "deviates");
        assert_int_equal(fake_log_count(), 1); /* reported once per queue */
        assert_true(fake_log_contains("a deviation"));
        assert_true(fake_log_contains("the bytes read"));
        /* Past a writable part: harmful, a violation, deviations or not. */
        assert_int_equal(vq_add(&e.vq, s, 1, 1, tok(3)), VQ_OK);
        assert_int_equal(fake_vq_pop(&e.dev), 1);
        fake_vq_complete(&e.dev, 0, 9);
        assert_null(vq_get_used(&e.vq, NULL));
        assert_true(vq_is_broken(&e.vq));
        assert_non_null(strstr(vq_violation(&e.vq), "exceeds the 8 device-writable"));
        assert_string_equal(vq_len_verdict(&e.vq), "violated");
        qenv_teardown(&e);
        fake_log_reset();
    }
    fake_log_echo(true);
}

/* The test-only bad_next hook: the device sees NEXT with next == size on the last descriptor;
 * the driver's bookkeeping is untouched, so detaching after a reset takes the buffer back. */
static void test_inject_bad_next(void **state)
{
    (void)state;
    struct qenv e;
    fake_log_echo(false);
    qenv_setup(&e, 16, false, 0, false, false);
    assert_int_equal(add1(&e, BUF_ADDR(0), 64, tok(0)), VQ_OK);
    vq_inject_bad_next(&e.vq);
    assert_int_equal(add1(&e, BUF_ADDR(1), 64, tok(1)), VQ_OK);
    assert_int_equal(add1(&e, BUF_ADDR(2), 64, tok(2)), VQ_OK); /* one-shot */
    assert_int_equal(fake_vq_pop(&e.dev), 1);
    assert_int_equal(fake_vq_pop(&e.dev), -1);
    assert_non_null(strstr(e.dev.error, "descriptor index 16 out of range"));
    assert_true(vq_selfcheck(&e.vq));
    assert_int_equal(vq_in_flight(&e.vq), 3);
    /* After a device reset every token comes back exactly once. */
    unsigned seen[3] = {0};
    void *t;
    while ((t = vq_detach_unused(&e.vq)))
        for (unsigned k = 0; k < 3; k++)
            seen[k] += t == tok(k);
    assert_int_equal(seen[0] + seen[1] + seen[2], 3);
    assert_true(seen[0] == 1 && seen[1] == 1 && seen[2] == 1);
    assert_int_equal(vq_num_free(&e.vq), 16);
    assert_true(vq_selfcheck(&e.vq));
    e.dev.errors = 0; /* the one the test asked for */
    qenv_teardown(&e);
    fake_log_echo(true);
}

static void test_used_idx_jump(void **state)
{
    (void)state;
    struct qenv e;
    fake_log_echo(false);
    qenv_setup(&e, 16, false, 0, false, false);
    assert_int_equal(add1(&e, BUF_ADDR(0), 4, tok(0)), VQ_OK);
    assert_int_equal(fake_vq_pop(&e.dev), 1);
    fake_vq_set_used_idx_raw(&e.dev, 17);
    assert_null(vq_get_used(&e.vq, NULL));
    assert_broken_with(&e, NEEDLES("used index jumped from 0 to 17 on a queue of size 16"));
    assert_int_equal(vq_num_free(&e.vq), 16);
    qenv_teardown(&e);

    /* Backwards counts as a jump by almost 2^16. */
    qenv_setup(&e, 16, false, 0, false, false);
    for (unsigned i = 0; i < 5; i++) {
        assert_int_equal(add1(&e, BUF_ADDR(i), 4, tok(i)), VQ_OK);
        assert_int_equal(fake_vq_pop(&e.dev), 1);
        fake_vq_complete(&e.dev, 0, 0);
        assert_ptr_equal(vq_get_used(&e.vq, NULL), tok(i));
    }
    assert_int_equal(add1(&e, BUF_ADDR(5), 4, tok(5)), VQ_OK);
    assert_int_equal(fake_vq_pop(&e.dev), 1);
    fake_vq_set_used_idx_raw(&e.dev, 2);
    assert_null(vq_get_used(&e.vq, NULL));
    assert_broken_with(&e, NEEDLES("used index jumped from 5 to 2 on a queue of size 16"));
    qenv_teardown(&e);

    /* Within the ring size but beyond what is in flight. */
    qenv_setup(&e, 16, false, 0, false, false);
    assert_int_equal(add1(&e, BUF_ADDR(0), 4, tok(0)), VQ_OK);
    assert_int_equal(add1(&e, BUF_ADDR(1), 4, tok(1)), VQ_OK);
    assert_int_equal(fake_vq_pop_all(&e.dev), 2);
    fake_vq_set_used_idx_raw(&e.dev, 3);
    assert_null(vq_get_used(&e.vq, NULL));
    assert_broken_with(&e, NEEDLES("moved from 0 to 3", "only 2 buffers are in flight"));
    qenv_teardown(&e);
    fake_log_echo(true);
}

static void test_wait_used(void **state)
{
    (void)state;
    struct qenv e;
    qenv_setup(&e, 8, false, 0, false, true);
    assert_int_equal(add1(&e, BUF_ADDR(0), 4, tok(0)), VQ_OK);
    assert_true(vq_kick_prepare(&e.vq));
    /* The device never answers. */
    void *t = NULL;
    uint32_t len = 77;
    uint64_t t0 = platform_now_ns();
    assert_int_equal(vq_wait_used(&e.vq, 2000000, &t, &len), VQ_ERR_TIMEOUT);
    uint64_t dt = platform_now_ns() - t0;
    assert_true(dt >= 2000000);
    assert_true(dt < 1000000000ULL);
    assert_null(t);
    assert_false(vq_is_broken(&e.vq));
    assert_int_equal(vq_in_flight(&e.vq), 1);
    assert_int_equal(vq_wait_used(&e.vq, 0, &t, &len), VQ_ERR_TIMEOUT);
    /* Then it does; a huge timeout must not overflow into "already expired". */
    assert_int_equal(fake_vq_pop(&e.dev), 1);
    fake_vq_complete(&e.dev, 0, 0);
    assert_int_equal(vq_wait_used(&e.vq, UINT64_MAX, &t, &len), VQ_OK);
    assert_ptr_equal(t, tok(0));
    assert_int_equal(len, 0);
    assert_int_equal(vq_in_flight(&e.vq), 0);
    assert_string_equal(vq_strerror(VQ_ERR_TIMEOUT), "timed out");
    qenv_teardown(&e);
}

static void test_detach_unused(void **state)
{
    (void)state;
    struct qenv e;
    qenv_setup(&e, 16, false, 4, true, false);
    struct vq_seg s[3] = {{BUF_ADDR(0), 4}, {BUF_ADDR(1), 4}, {BUF_ADDR(2), 4}};
    for (unsigned i = 0; i < 5; i++)
        assert_int_equal(vq_add(&e.vq, s, 1 + i % 3, 0, tok(i)), VQ_OK);
    bool seen[5] = {0};
    void *t;
    while ((t = vq_detach_unused(&e.vq))) {
        unsigned k = (unsigned)((uintptr_t)t - 1);
        assert_true(k < 5 && !seen[k]);
        seen[k] = true;
    }
    for (unsigned i = 0; i < 5; i++)
        assert_true(seen[i]);
    assert_int_equal(vq_num_free(&e.vq), 16);
    assert_int_equal(vq_in_flight(&e.vq), 0);
    assert_true(vq_selfcheck(&e.vq));
    /* A second sweep starts from the beginning again. */
    assert_int_equal(vq_add(&e.vq, s, 2, 1, tok(7)), VQ_OK);
    assert_ptr_equal(vq_detach_unused(&e.vq), tok(7));
    assert_null(vq_detach_unused(&e.vq));
    assert_int_equal(vq_num_free(&e.vq), 16);
    fake_vq_detach(&e.dev);
    fake_mem_fini();
}

/* ---- Fuzz: garbage in the used ring --------------------------------------------------------- */

static void test_fuzz_garbage_used_ring(void **state)
{
    (void)state;
    fake_log_echo(false);
    fake_mem_init(RAM_BASE, RAM_BYTES);
    rng_state = 0x5eed5eedULL;
    model = calloc(MAX_TOKENS, sizeof(*model));
    assert_non_null(model);
    static const uint16_t sizes[] = {1, 2, 4, 16, 64};
    struct virtqueue vq;
    struct fake_vq dev;
    unsigned episodes = 0, violations = 0, accepted = 0, garbage_accepted = 0;
    const unsigned steps = 200000;
    unsigned step = 0;

    while (step < steps) {
        /* A fresh device + queue (what a driver does after a reset). */
        uint16_t size = sizes[rndn(5)];
        bool legacy = rndn(2), event_idx = rndn(2);
        unsigned max_ind = rndn(2) ? (size < 4 ? size : 4) : 0;
        bool indirect = max_ind && rndn(2);
        fake_mem_init(RAM_BASE, 256 << 10); /* small: episodes can be short and many */
        size_t bytes = vq_mem_bytes(size, legacy, max_ind);
        void *mem = fake_mem_alloc(bytes, 4096);
        assert_int_equal(vq_init(&vq, "fuzz", 7, size, mem, legacy, max_ind, indirect, event_idx),
                         VQ_OK);
        struct vq_addrs a;
        vq_addrs(&vq, &a);
        fake_vq_attach(&dev, &a, size, event_idx);
        fake_log_reset();
        unsigned ntok = 0, live = 0;
        episodes++;

        for (; step < steps && !vq_is_broken(&vq); step++) {
            /* Mostly honest traffic, with garbage in about one step in twenty. */
            unsigned op = rndn(100);
            if (op < 40) {
                unsigned k = ntok++ % 1024;
                if (model[k].live)
                    continue;
                unsigned n_out = rndn(3), n_in = rndn(3);
                if (!n_out && !n_in)
                    n_in = 1;
                struct model_buf *m = &model[k];
                memset(m, 0, sizeof(*m));
                for (unsigned i = 0; i < n_out + n_in; i++) {
                    m->segs[i] = (struct vq_seg){BUF_ADDR(rndn(4096)), 1 + rndn(512)};
                    if (i >= n_out)
                        m->in_bytes += m->segs[i].len;
                }
                m->nsegs = n_out + n_in;
                bool fits = m->nsegs <= size || (vq.use_indirect && m->nsegs <= max_ind);
                int r = vq_add(&vq, m->segs, n_out, n_in, tok(k));
                if (fits)
                    assert_true(r == VQ_OK || r == VQ_ERR_FULL);
                else
                    assert_int_equal(r, VQ_ERR_INVALID);
                if (r == VQ_OK) {
                    m->live = true;
                    m->head = vq.avail->ring[(uint16_t)(vq.avail_idx - 1) & (size - 1)];
                    live++;
                }
                if (rndn(3) == 0)
                    (void)vq_kick_prepare(&vq);
            } else if (op < 55) {
                fake_vq_pop_all(&dev);
                /* The device refuses descriptors it already holds: a double free would show. */
                assert_device_happy(&dev);
            } else if (op < 75) {
                if (dev.npending) {
                    unsigned p = rndn(dev.npending);
                    uint32_t in = (uint32_t)dev.pending[p].in_bytes;
                    fake_vq_complete(&dev, p, in ? (uint32_t)(rnd() % (in + 1ULL)) : 0);
                    assert_device_happy(&dev);
                }
            } else if (op < 80) {
                /* Garbage: one of several ways of writing nonsense into the used ring. */
                uint32_t id = rndn(2) ? rndn(size + 2u) : (uint32_t)rnd();
                uint32_t len = rndn(2) ? rndn(600) : (uint32_t)rnd();
                switch (rndn(6)) {
                case 0:
                case 1:
                    fake_vq_push_raw(&dev, id, len);
                    break;
                case 2:
                    fake_vq_write_used_raw(&dev, (uint16_t)rnd(), id, len);
                    break;
                case 3:
                    fake_vq_set_used_idx_raw(&dev, (uint16_t)(dev.used_idx + rndn(4)));
                    break;
                case 4:
                    fake_vq_set_used_idx_raw(&dev, (uint16_t)rnd());
                    break;
                default:
                    dev.used->flags = (uint16_t)rnd();
                    fake_vq_set_avail_event(&dev, (uint16_t)rnd());
                    break;
                }
            } else {
                void *t;
                uint32_t len;
                while ((t = vq_get_used(&vq, &len))) {
                    unsigned k = (unsigned)((uintptr_t)t - 1);
                    if (k >= 1024 || !model[k].live)
                        fail_msg("token %u returned but not in flight", k);
                    if (len > model[k].in_bytes)
                        fail_msg("len %u > writable %u", len, (unsigned)model[k].in_bytes);
                    model[k].live = false;
                    live--;
                    accepted++;
                    /* A garbage entry may complete a buffer the device still holds, or has not
                     * even taken yet (the driver cannot tell). Take everything published, then
                     * hand this one back: the driver may now reuse its descriptors, and the
                     * device keeps checking it never gets one it still holds. */
                    fake_vq_pop_all(&dev);
                    assert_device_happy(&dev);
                    int p = fake_vq_find(&dev, model[k].head);
                    if (p >= 0) {
                        fake_vq_release(&dev, (unsigned)p);
                        garbage_accepted++;
                    }
                }
            }
            /* Invariants after every step. */
            assert_int_equal(vq_in_flight(&vq), live);
            assert_true(vq_selfcheck(&vq));
        }
        if (vq_is_broken(&vq)) {
            violations++;
            assert_true(strncmp(vq_violation(&vq), "virtqueue fuzz[7]: ", 19) == 0);
            /* The violation, after the first used-length deviation's line if there was one. */
            assert_int_equal(fake_log_count(), 1 + (vq_len_deviations(&vq) > 0));
            assert_null(vq_get_used(&vq, NULL));
            struct vq_seg s = {BUF_ADDR(0), 4};
            assert_int_equal(vq_add(&vq, &s, 1, 0, tok(0)), VQ_ERR_BROKEN);
        }
        /* Reset: every buffer still in flight comes back exactly once. */
        void *t;
        while ((t = vq_detach_unused(&vq))) {
            unsigned k = (unsigned)((uintptr_t)t - 1);
            assert_true(k < 1024 && model[k].live);
            model[k].live = false;
            live--;
        }
        assert_int_equal(live, 0);
        assert_int_equal(vq_num_free(&vq), size);
        assert_true(vq_selfcheck(&vq));
        fake_vq_detach(&dev);
        memset(model, 0, MAX_TOKENS * sizeof(*model));
    }
    print_message("fuzz: %u episodes, %u violations, %u buffers accepted (%u through garbage)\n",
                  episodes, violations, accepted, garbage_accepted);
    assert_true(violations > 10);
    assert_true(accepted > 1000);
    free(model);
    model = NULL;
    fake_mem_fini();
    fake_log_echo(true);
}

/* ---- fake_transport ------------------------------------------------------------------------- */

#define F(bit) (1ULL << (bit))

static void test_transport_negotiation(void **state)
{
    (void)state;
    struct fake_transport ft;
    fake_transport_init(&ft, false, 5, F(VIRTIO_F_VERSION_1) | F(VIRTIO_F_EVENT_IDX) | F(0), 8);
    struct virtio_transport *t = &ft.t;
    assert_int_equal(t->ops->reset(t), 0);
    assert_int_equal(t->ops->get_status(t), 0);
    t->ops->set_status(t, VIRTIO_STATUS_ACKNOWLEDGE);
    t->ops->set_status(t, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    assert_int_equal(t->ops->get_features(t), F(32) | F(29) | F(0));
    /* An unoffered bit: FEATURES_OK reads back clear. */
    t->ops->set_features(t, F(VIRTIO_F_VERSION_1) | F(5));
    t->ops->set_status(t, 0x03 | VIRTIO_STATUS_FEATURES_OK);
    assert_int_equal(t->ops->get_status(t) & VIRTIO_STATUS_FEATURES_OK, 0);
    /* Reset, then a proper subset. */
    assert_int_equal(t->ops->reset(t), 0);
    t->ops->set_status(t, 0x03);
    t->ops->set_features(t, F(VIRTIO_F_VERSION_1) | F(VIRTIO_F_EVENT_IDX));
    t->ops->set_status(t, 0x03 | VIRTIO_STATUS_FEATURES_OK);
    assert_int_equal(t->ops->get_status(t), 0x0b);
    assert_true(fake_transport_negotiated(&ft, VIRTIO_F_EVENT_IDX));
    assert_int_equal(ft.driver_errors, 0);
    /* Changing features now is a driver error. */
    t->ops->set_features(t, F(VIRTIO_F_VERSION_1));
    assert_int_equal(ft.driver_errors, 1);
    assert_non_null(strstr(ft.driver_error, "after FEATURES_OK"));

    /* Without VERSION_1 a modern device refuses. */
    fake_transport_init(&ft, false, 5, F(VIRTIO_F_VERSION_1) | F(0), 8);
    t->ops->set_status(t, 0x03);
    t->ops->set_features(t, F(0));
    t->ops->set_status(t, 0x0b);
    assert_int_equal(t->ops->get_status(t), 0x03);

    /* Legacy: 32 feature bits, no generation counter. */
    fake_transport_init(&ft, true, 5, F(VIRTIO_F_VERSION_1) | F(1) | F(0), 8);
    assert_int_equal(t->ops->get_features(t), F(1) | F(0));
    assert_true(t->ops->queue_needs_legacy_layout(t));
    fake_transport_config_set(&ft, 0, 4, 7);
    assert_int_equal(t->ops->config_generation(t), 0);
}

static bool refuse_bit_3(struct fake_transport *ft, uint64_t f, void *arg)
{
    (void)ft;
    (void)arg;
    return !(f & F(3));
}

static void test_transport_accept_hook_and_status_errors(void **state)
{
    (void)state;
    struct fake_transport ft;
    fake_transport_init(&ft, false, 5, F(VIRTIO_F_VERSION_1) | F(3), 8);
    ft.accept_features = refuse_bit_3;
    struct virtio_transport *t = &ft.t;
    t->ops->set_status(t, 0x03);
    t->ops->set_features(t, F(VIRTIO_F_VERSION_1) | F(3));
    t->ops->set_status(t, 0x0b);
    assert_int_equal(t->ops->get_status(t), 0x03);
    assert_int_equal(ft.driver_errors, 0);
    /* DRIVER_OK without FEATURES_OK, and clearing bits, are driver errors. */
    t->ops->set_status(t, 0x07);
    assert_int_equal(ft.driver_errors, 1);
    t->ops->set_status(t, 0x01);
    assert_int_equal(ft.driver_errors, 2);
    ft.reset_fails = true;
    assert_int_equal(t->ops->reset(t), -1);
    assert_int_not_equal(t->ops->get_status(t), 0);
    fake_transport_needs_reset(&ft);
    assert_true(t->ops->get_status(t) & VIRTIO_STATUS_NEEDS_RESET);
    assert_int_equal(t->ops->read_isr(t), VIRTIO_ISR_CONFIG);
    assert_int_equal(t->ops->read_isr(t), 0); /* read clears */
}

static unsigned long cfg_last_off, cfg_last_val;

static void on_cfg_write(struct fake_transport *ft, unsigned off, unsigned width, uint32_t val,
                         void *arg)
{
    (void)ft;
    (void)width;
    (void)arg;
    cfg_last_off = off;
    cfg_last_val = val;
}

static void test_transport_config(void **state)
{
    (void)state;
    struct fake_transport ft;
    fake_transport_init(&ft, false, 5, F(VIRTIO_F_VERSION_1), 8);
    ft.on_config_write = on_cfg_write;
    struct virtio_transport *t = &ft.t;
    uint32_t g0 = t->ops->config_generation(t);
    fake_transport_config_set(&ft, 0, 4, 0x11223344);
    assert_int_not_equal(t->ops->config_generation(t), g0);
    assert_int_equal(t->ops->read_isr(t), VIRTIO_ISR_CONFIG);
    uint32_t v;
    assert_true(t->ops->config_read(t, 0, 4, &v));
    assert_int_equal(v, 0x11223344);
    assert_true(t->ops->config_read(t, 1, 2, &v));
    assert_int_equal(v, 0x2233);
    assert_true(t->ops->config_read(t, 3, 1, &v));
    assert_int_equal(v, 0x11);
    assert_false(t->ops->config_read(t, 6, 4, &v)); /* past config_size */
    assert_false(t->ops->config_read(t, 0, 3, &v)); /* bad width */
    assert_false(t->ops->config_read(t, 8, 1, &v));
    assert_true(t->ops->config_write(t, 4, 4, 0xdeadbeef));
    assert_int_equal(cfg_last_off, 4);
    assert_int_equal(cfg_last_val, 0xdeadbeef);
    assert_int_equal(fake_transport_config_get(&ft, 4, 4), 0xdeadbeef);
    assert_false(t->ops->config_write(t, 5, 4, 0));
    /* A change during a read loop: the generation moves under the reader. */
    ft.unstable_generation = 2;
    uint32_t a = t->ops->config_generation(t), b = t->ops->config_generation(t);
    uint32_t c = t->ops->config_generation(t), d = t->ops->config_generation(t);
    assert_int_not_equal(a, b);
    assert_int_not_equal(a, c);
    assert_int_equal(c, d);
}

/* A tiny echo device model: on notify, answer each buffer by copying its request. */
static void echo_on_notify(struct fake_transport *ft, unsigned index, void *arg)
{
    (void)arg;
    struct fake_vq *d = fake_transport_vq(ft, index);
    fake_vq_pop_all(d);
    while (d->npending) {
        char buf[64];
        size_t n = fake_chain_read(&d->pending[0], buf, sizeof(buf));
        size_t w = fake_chain_write(&d->pending[0], buf, n);
        fake_vq_complete(d, 0, (uint32_t)w);
    }
}

static void transport_roundtrip(bool legacy)
{
    fake_mem_init(RAM_BASE, RAM_BYTES);
    fake_log_reset();
    struct fake_transport ft;
    uint64_t feat = legacy ? F(VIRTIO_F_EVENT_IDX) : F(VIRTIO_F_VERSION_1) | F(VIRTIO_F_EVENT_IDX);
    fake_transport_init(&ft, legacy, 5, feat, 8);
    fake_transport_add_queue(&ft, 0, 128);
    fake_transport_add_queue(&ft, 1, 64);
    ft.on_notify = echo_on_notify;
    struct virtio_transport *t = &ft.t;

    assert_int_equal(t->ops->reset(t), 0);
    t->ops->set_status(t, 0x03);
    t->ops->set_features(t, feat);
    if (!legacy) {
        t->ops->set_status(t, 0x0b);
        assert_true(t->ops->get_status(t) & VIRTIO_STATUS_FEATURES_OK);
    }
    assert_int_equal(t->ops->queue_max_size(t, 1), 64);
    assert_int_equal(t->ops->queue_max_size(t, 2), 0);
    bool lay = t->ops->queue_needs_legacy_layout(t);
    assert_int_equal(lay, legacy);
    uint16_t size = t->ops->queue_max_size(t, 1);
    struct virtqueue vq;
    void *mem = fake_mem_alloc(vq_mem_bytes(size, lay, 0), 4096);
    assert_int_equal(vq_init(&vq, "echo", 1, size, mem, lay, 0, false, true), VQ_OK);
    struct vq_addrs a;
    vq_addrs(&vq, &a);
    if (legacy) {
        /* A legacy device rejects a ring that does not follow the legacy layout. */
        struct vq_addrs bad = a;
        bad.used = a.avail + 6 + 2 * size;
        assert_int_equal(t->ops->queue_enable(t, 1, size, &bad), -1);
        ft.driver_errors = 0;
        assert_int_equal(t->ops->queue_enable(t, 1, size / 2, &a), -1); /* fixed size */
        ft.driver_errors = 0;
    }
    assert_int_equal(t->ops->queue_enable(t, 1, size, &a), 0);
    t->ops->set_status(t, (uint8_t)(t->ops->get_status(t) | VIRTIO_STATUS_DRIVER_OK));

    char *req = fake_mem_alloc(16, 8), *resp = fake_mem_alloc(16, 8);
    strcpy(req, "ping");
    struct vq_seg s[2] = {{virt_to_phys(req), 5}, {virt_to_phys(resp), 16}};
    assert_int_equal(vq_add(&vq, s, 1, 1, req), VQ_OK);
    assert_true(vq_kick_prepare(&vq));
    t->ops->notify(t, 1);
    assert_int_equal(ft.q[1].notifies, 1);
    assert_true(t->ops->read_isr(t) & VIRTIO_ISR_QUEUE);
    void *tk;
    uint32_t len;
    assert_int_equal(vq_wait_used(&vq, 1000000000ULL, &tk, &len), VQ_OK);
    assert_ptr_equal(tk, req);
    assert_int_equal(len, 5);
    assert_string_equal(resp, "ping");
    assert_int_equal(ft.driver_errors, 0);
    assert_int_equal(ft.q[1].vq.errors, 0);

    /* A reset disables the queue and detaches the model. */
    assert_int_equal(t->ops->reset(t), 0);
    assert_null(fake_transport_vq(&ft, 1));
    fake_transport_fini(&ft);
    fake_mem_fini();
}

static void test_transport_queue_roundtrip_modern(void **state)
{
    (void)state;
    transport_roundtrip(false);
}

static void test_transport_queue_roundtrip_legacy(void **state)
{
    (void)state;
    transport_roundtrip(true);
}

static void test_transport_notify_before_driver_ok(void **state)
{
    (void)state;
    fake_mem_init(RAM_BASE, RAM_BYTES);
    struct fake_transport ft;
    fake_transport_init(&ft, false, 5, F(VIRTIO_F_VERSION_1), 8);
    fake_transport_add_queue(&ft, 0, 8);
    struct virtio_transport *t = &ft.t;
    t->ops->set_status(t, 0x03);
    t->ops->set_features(t, F(VIRTIO_F_VERSION_1));
    t->ops->set_status(t, 0x0b);
    struct virtqueue vq;
    void *mem = fake_mem_alloc(vq_mem_bytes(8, false, 0), 4096);
    assert_int_equal(vq_init(&vq, "q", 0, 8, mem, false, 0, false, false), VQ_OK);
    struct vq_addrs a;
    vq_addrs(&vq, &a);
    assert_int_equal(t->ops->queue_enable(t, 0, 8, &a), 0);
    assert_int_equal(t->ops->queue_enable(t, 3, 8, &a), -1); /* no such queue */
    ft.driver_errors = 0;
    t->ops->notify(t, 0);
    assert_int_equal(ft.driver_errors, 1);
    assert_non_null(strstr(ft.driver_error, "before DRIVER_OK"));
    fake_transport_fini(&ft);
    fake_mem_fini();
}

int main(void)
{
    /* BLIMP_TEST_FILTER=pattern runs only the matching tests (cmocka's * and ? wildcards). */
    if (getenv("BLIMP_TEST_FILTER"))
        cmocka_set_test_filter(getenv("BLIMP_TEST_FILTER"));
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout_all_sizes),
        cmocka_unit_test(test_layout_known_values),
        cmocka_unit_test(test_init_rejects_invalid),
        cmocka_unit_test(test_direct_single),
        cmocka_unit_test(test_direct_chain_out_in),
        cmocka_unit_test(test_indirect_chain),
        cmocka_unit_test(test_data_through_chain),
        cmocka_unit_test(test_fill_to_full),
        cmocka_unit_test(test_invalid_requests),
        cmocka_unit_test(test_random_cycles_modern_indirect_event),
        cmocka_unit_test(test_random_cycles_legacy_direct),
        cmocka_unit_test(test_random_cycles_wraps_indices),
        cmocka_unit_test(test_event_idx_kick),
        cmocka_unit_test(test_event_idx_kick_across_wrap),
        cmocka_unit_test(test_no_notify_flag),
        cmocka_unit_test(test_used_notifications),
        cmocka_unit_test(test_bad_used_id_out_of_range),
        cmocka_unit_test(test_bad_used_id_free_slot),
        cmocka_unit_test(test_bad_used_id_chain_body),
        cmocka_unit_test(test_duplicate_completion),
        cmocka_unit_test(test_used_len_too_large),
        cmocka_unit_test(test_used_len_deviation),
        cmocka_unit_test(test_used_len_observed),
        cmocka_unit_test(test_used_len_beyond_buffer),
        cmocka_unit_test(test_inject_bad_next),
        cmocka_unit_test(test_used_idx_jump),
        cmocka_unit_test(test_wait_used),
        cmocka_unit_test(test_detach_unused),
        cmocka_unit_test(test_fuzz_garbage_used_ring),
        cmocka_unit_test(test_transport_negotiation),
        cmocka_unit_test(test_transport_accept_hook_and_status_errors),
        cmocka_unit_test(test_transport_config),
        cmocka_unit_test(test_transport_queue_roundtrip_modern),
        cmocka_unit_test(test_transport_queue_roundtrip_legacy),
        cmocka_unit_test(test_transport_notify_before_driver_ok),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
