/*
 * Unit tests for virtio/virtio_mmio.c against the register-level fake in fake_mmio.c: bring-up of
 * versions 1 and 2, feature windows, queue addresses (the fake attaches its ring model where the
 * device would look, and the real virtqueue code runs a buffer through it), config bounds, reset
 * deadline, interrupt acknowledgement, exit counters, what bind refuses, microvm probing and the
 * virtio_mmio.device= parser. Every test also checks that the transport never misused the bus and
 * that the device model saw no driver mistake.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "mm/buddy.h"
#include "virtio/balloon.h"
#include "virtio/virtio_mmio.h"
#include "virtio/virtqueue.h"
#include "include/platform.h"
#include "tests/unit/fake_device.h"
#include "tests/unit/fake_mmio.h"
#include "tests/unit/fake_platform.h"

#define TYPE_BALLOON 5
#define BASE         0xfeb02e00ull
#define SLOT         0x200
#define QMAX         128
#define RAM_BASE     0x123400000ull /* above 4 GiB: the high address words matter */
#define RAM_BYTES    (1u << 20)

static struct {
    struct fake_mmio *m;
    struct virtio_mmio vm;
    struct virtio_transport t;
    struct virtio_mmio_device dev;
} E;

static void add_device(uint32_t version)
{
    E.m = fake_mmio_add(BASE, SLOT, version, TYPE_BALLOON);
    E.m->device_features = 1ull << 32 | 1ull << 29 | 1ull << 1; /* VERSION_1, EVENT_IDX, bit 1 */
    for (unsigned i = 0; i < 3; i++)
        fake_mmio_add_queue(E.m, i, QMAX);
    for (unsigned i = 0; i < 8; i++)
        E.m->config[i] = (uint8_t)(0x10 + i);
}

static enum virtio_mmio_result bind(enum virtio_mmio_versions v)
{
    return virtio_mmio_bind(&E.dev, TYPE_BALLOON, v, &E.vm, &E.t);
}

static int setup(void **state)
{
    (void)state;
    fake_mmio_clear();
    fake_log_reset();
    fake_log_echo(false);
    fake_mem_init(RAM_BASE, RAM_BYTES);
    memset(&E, 0, sizeof(E));
    E.dev = (struct virtio_mmio_device){
        .base = BASE, .size = SLOT, .irq = {.kind = VIRTIO_IRQ_GSI, .gsi = 47, .level = true}};
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    fake_mmio_clear();
    fake_mem_fini();
    return 0;
}

/* What every test must also hold to. */
static void check_clean(void **state)
{
    (void)state;
    if (fake_mmio_bus_errors())
        fail_msg("the transport misused the bus %u times, first: %s", fake_mmio_bus_errors(),
                 fake_mmio_first_bus_error());
    if (E.m && E.m->driver_errors)
        fail_msg("the device saw %u driver errors, first: %s", E.m->driver_errors,
                 E.m->driver_error);
}

const char *__ubsan_default_options(void);
const char *__ubsan_default_options(void)
{
    return "halt_on_error=1:print_stacktrace=1";
}

static const struct virtio_transport_ops *ops(void)
{
    return E.t.ops;
}

/* ---- bring-up ------------------------------------------------------------------------------ */

static void test_v2_bring_up(void **state)
{
    add_device(2);
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    assert_string_equal(E.t.name, "virtio-mmio-modern");
    assert_false(E.t.legacy);
    assert_int_equal(E.t.device_id, TYPE_BALLOON);
    assert_int_equal(E.t.config_size, SLOT - 0x100);
    assert_int_equal(E.t.irq.kind, VIRTIO_IRQ_GSI);
    assert_int_equal(E.t.irq.gsi, 47);
    assert_true(E.t.irq.level);
    assert_int_equal(E.m->page_size, 0); /* a v1-only register stays untouched */
    assert_int_equal(ops()->reset(&E.t), 0);
    ops()->set_status(&E.t, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    assert_int_equal(ops()->get_features(&E.t), E.m->device_features);
    ops()->set_features(&E.t, 1ull << 32 | 1ull << 1);
    assert_int_equal(E.m->driver_features, 1ull << 32 | 1ull << 1);
    ops()->set_status(&E.t,
                      VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    assert_true(ops()->get_status(&E.t) & VIRTIO_STATUS_FEATURES_OK);
    E.m->generation = 7;
    assert_int_equal(ops()->config_generation(&E.t), 7);
    assert_false(ops()->queue_needs_legacy_layout(&E.t));
    assert_int_equal(ops()->queue_max_size(&E.t, 1), QMAX);
    assert_int_equal(ops()->queue_max_size(&E.t, 5), 0);
    check_clean(state);
}

static void test_v2_features_refused_without_version_1(void **state)
{
    add_device(2);
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    ops()->set_status(&E.t, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    ops()->set_features(&E.t, 1ull << 1);
    ops()->set_status(&E.t,
                      VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    /* The caller sees the refusal through the status read-back. */
    assert_false(ops()->get_status(&E.t) & VIRTIO_STATUS_FEATURES_OK);
    check_clean(state);
}

static void test_v1_bring_up(void **state)
{
    add_device(1);
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    assert_string_equal(E.t.name, "virtio-mmio-legacy");
    assert_true(E.t.legacy);
    assert_true(ops()->queue_needs_legacy_layout(&E.t));
    /* GuestPageSize is written at bind and again after every reset. */
    assert_int_equal(E.m->page_size, 4096);
    E.m->page_size = 0;
    assert_int_equal(ops()->reset(&E.t), 0);
    assert_int_equal(E.m->page_size, 4096);
    /* 32 feature bits only: bit 32 is invisible, and only window 0 is written. */
    assert_int_equal(ops()->get_features(&E.t), (uint32_t)E.m->device_features);
    ops()->set_features(&E.t, 1ull << 32 | 1ull << 1);
    assert_int_equal(E.m->driver_features, 1ull << 1);
    assert_int_equal(E.m->features_writes, 1);
    assert_int_equal(ops()->config_generation(&E.t), 0);
    check_clean(state);
}

static void test_version_restriction(void **state)
{
    add_device(1);
    assert_int_equal(bind(VIRTIO_MMIO_V2_ONLY), VIRTIO_MMIO_UNSUPPORTED);
    assert_true(fake_log_contains("asks for modern"));
    assert_int_equal(bind(VIRTIO_MMIO_V1_ONLY), VIRTIO_MMIO_BOUND);
    E.m->version = 2;
    assert_int_equal(bind(VIRTIO_MMIO_V1_ONLY), VIRTIO_MMIO_UNSUPPORTED);
    assert_int_equal(bind(VIRTIO_MMIO_V2_ONLY), VIRTIO_MMIO_BOUND);
    check_clean(state);
}

/* ---- what bind refuses --------------------------------------------------------------------- */

static void test_bad_magic_is_empty(void **state)
{
    add_device(2);
    E.m->magic = 0x74726977;
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_EMPTY);
    assert_null(E.t.ops);
    /* Nothing but the identification was touched: no status, no features. */
    assert_int_equal(E.m->status_reads, 0);
    check_clean(state);
}

static void test_device_id_0_is_empty(void **state)
{
    add_device(1);
    E.m->device_id = 0;
    E.m->version = 7; /* an empty slot's version does not matter */
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_EMPTY);
    assert_int_equal(fake_log_count(), 0); /* silent: a probe meets many */
    check_clean(state);
}

static void test_no_device_at_all_is_empty(void **state)
{
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_EMPTY);
    assert_true(fake_mmio_unassigned_reads() > 0);
    check_clean(state);
}

static void test_bad_versions_refused(void **state)
{
    static const uint32_t bad[] = {0, 3, 0xffffffff};
    add_device(2);
    for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        E.m->version = bad[i];
        fake_log_reset();
        assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_UNSUPPORTED);
        assert_true(fake_log_contains("only 1 (legacy) and 2"));
    }
    check_clean(state);
}

static void test_other_device_type(void **state)
{
    add_device(2);
    E.m->device_id = 2; /* block */
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_OTHER_TYPE);
    assert_true(fake_log_contains("device type 2, not 5"));
    check_clean(state);
}

static void test_bad_windows_not_mapped(void **state)
{
    add_device(2);
    const struct virtio_mmio_device bad[] = {
        {.base = BASE, .size = VIRTIO_MMIO_MIN_SIZE - 4},
        {.base = BASE, .size = VIRTIO_MMIO_MAX_SIZE + 0x1000},
        {.base = BASE + 2, .size = SLOT},
    };
    for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        E.dev = bad[i];
        assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_MAP_FAILED);
    }
    assert_int_equal(fake_mmio_maps(), 0);
    assert_int_equal(fake_mmio_accesses(), 0);
    check_clean(state);
}

/* ---- queues -------------------------------------------------------------------------------- */

static void test_queue_max_size_validated(void **state)
{
    add_device(2);
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    /* 0x10040 would wrap to a plausible 64 in a uint16_t. */
    static const uint32_t bad[] = {100, 0x10040, 65536, 0x80000000};
    for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        E.m->q[0].max = bad[i];
        assert_int_equal(ops()->queue_max_size(&E.t, 0), 0);
    }
    assert_true(fake_log_contains("not a power of two"));
    E.m->q[0].max = 32768;
    assert_int_equal(ops()->queue_max_size(&E.t, 0), 32768);
    E.m->q[0].max = 0;
    assert_int_equal(ops()->queue_max_size(&E.t, 0), 0);
    check_clean(state);
}

static void test_v2_queue_addresses(void **state)
{
    add_device(2);
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    const struct vq_addrs a = {
        .desc = 0x1234567000ull, .avail = 0x1234568000ull, .used = 0x1234569004ull};
    /* Split addresses need no page alignment and may lie above 4 GiB; no ring model here. */
    E.m->q[2].max = QMAX;
    ops()->reset(&E.t);
    struct fake_mmio_queue *q = &E.m->q[2];
    q->max = 0; /* absent now: the transport must refuse */
    assert_int_equal(ops()->queue_enable(&E.t, 2, 64, &a), -1);
    q->max = QMAX;
    assert_int_equal(ops()->queue_enable(&E.t, 2, 256, &a), -1); /* above the maximum */
    assert_int_equal(ops()->queue_enable(&E.t, 2, 48, &a), -1);  /* not a power of two */
    assert_int_equal(E.m->driver_errors, 0);
    /* A good one: the fake attaches its ring model, so give it real memory. */
    uint64_t mem = fake_mem_alloc_phys(vq_mem_bytes(64, false, 0), 4096);
    const struct vq_addrs b = {.desc = mem, .avail = mem + 0x400, .used = mem + 0x800};
    assert_int_equal(ops()->queue_enable(&E.t, 2, 64, &b), 0);
    assert_int_equal(q->num, 64);
    assert_int_equal(q->desc, b.desc);
    assert_int_equal(q->driver, b.avail);
    assert_int_equal(q->device, b.used);
    assert_int_equal(q->ready, 1);
    assert_true(q->live);
    /* A live queue is not programmed again. */
    assert_int_equal(ops()->queue_enable(&E.t, 2, 64, &b), -1);
    assert_true(fake_log_contains("already in use"));
    check_clean(state);
}

static void test_v1_queue_pfn(void **state)
{
    add_device(1);
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    uint16_t n = QMAX;
    uint64_t mem = fake_mem_alloc_phys(vq_mem_bytes(n, true, 0), 4096);
    uint64_t avail = mem + 16ull * n;
    uint64_t used = (avail + 6 + 2ull * n + 4095) & ~4095ull;
    /* Rings anywhere but where the device derives them from QueuePFN are refused. */
    const struct vq_addrs off_avail = {mem, avail + 64, used};
    const struct vq_addrs off_used = {mem, avail, used + 4096};
    const struct vq_addrs unaligned = {mem + 0x800, avail + 0x800, used + 0x800};
    const struct vq_addrs too_high = {1ull << 44, (1ull << 44) + 16ull * n,
                                      ((1ull << 44) + 16ull * n + 6 + 2ull * n + 4095) & ~4095ull};
    assert_int_equal(ops()->queue_enable(&E.t, 0, n, &off_avail), -1);
    assert_int_equal(ops()->queue_enable(&E.t, 0, n, &off_used), -1);
    assert_int_equal(ops()->queue_enable(&E.t, 0, n, &unaligned), -1);
    assert_int_equal(ops()->queue_enable(&E.t, 0, n, &too_high), -1);
    assert_int_equal(E.m->q[0].pfn, 0);
    const struct vq_addrs good = {mem, avail, used};
    assert_int_equal(ops()->queue_enable(&E.t, 0, n, &good), 0);
    struct fake_mmio_queue *q = &E.m->q[0];
    assert_int_equal(q->pfn, mem >> 12);
    assert_int_equal(q->align, 4096);
    assert_int_equal(q->num, n);
    assert_true(q->live);
    assert_memory_equal(&q->addrs, &good, sizeof(good));
    check_clean(state);
}

/* The real virtqueue code over the transport: a buffer reaches the device where it looks. */
static void run_buffer_through(uint32_t version)
{
    add_device(version);
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    assert_int_equal(ops()->reset(&E.t), 0);
    bool legacy = ops()->queue_needs_legacy_layout(&E.t);
    uint16_t n = ops()->queue_max_size(&E.t, 1);
    void *mem = fake_mem_alloc(vq_mem_bytes(n, legacy, 0), 4096);
    struct virtqueue vq;
    assert_int_equal(vq_init(&vq, "test", 1, n, mem, legacy, 0, false, false), VQ_OK);
    struct vq_addrs a;
    vq_addrs(&vq, &a);
    assert_int_equal(ops()->queue_enable(&E.t, 1, n, &a), 0);
    ops()->set_status(&E.t,
                      VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_DRIVER_OK);
    uint32_t *payload = fake_mem_alloc(64, 64);
    payload[0] = 0xfeedf00d;
    struct vq_seg seg = {virt_to_phys(payload), 64};
    static int token;
    assert_int_equal(vq_add(&vq, &seg, 1, 0, &token), VQ_OK);
    assert_true(vq_kick_prepare(&vq));
    ops()->notify(&E.t, 1);
    struct fake_mmio_queue *q = &E.m->q[1];
    assert_int_equal(q->notifies, 1);
    assert_int_equal(fake_vq_pop_all(&q->vq), 1);
    uint32_t got = 0;
    assert_int_equal(fake_chain_read(&q->vq.pending[0], &got, 4), 4);
    assert_int_equal(got, 0xfeedf00d);
    fake_vq_complete(&q->vq, 0, 0);
    assert_ptr_equal(vq_get_used(&vq, NULL), &token);
    assert_int_equal(q->vq.errors, 0);
}

static void test_v1_ring_round_trip(void **state)
{
    run_buffer_through(1);
    check_clean(state);
}

static void test_v2_ring_round_trip(void **state)
{
    run_buffer_through(2);
    check_clean(state);
}

/* ---- config, reset, interrupts, exits ------------------------------------------------------- */

static void test_config_bounds(void **state)
{
    add_device(2);
    E.dev.size = VIRTIO_MMIO_MIN_SIZE; /* 8 bytes of config */
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    assert_int_equal(E.t.config_size, 8);
    uint32_t v = 0;
    assert_true(ops()->config_read(&E.t, 4, 4, &v));
    assert_int_equal(v, 0x17161514);
    assert_true(ops()->config_read(&E.t, 6, 2, &v));
    assert_int_equal(v, 0x1716);
    assert_true(ops()->config_read(&E.t, 7, 1, &v));
    assert_int_equal(v, 0x17);
    unsigned before = fake_mmio_accesses();
    assert_false(ops()->config_read(&E.t, 8, 1, &v)); /* past the window */
    assert_false(ops()->config_read(&E.t, 6, 4, &v)); /* misaligned */
    assert_false(ops()->config_read(&E.t, 0, 3, &v)); /* no such width */
    assert_false(ops()->config_read(&E.t, 0xfffffffc, 4, &v));
    assert_false(ops()->config_write(&E.t, 8, 4, 1));
    assert_int_equal(fake_mmio_accesses(), before); /* refused without touching the device */
    assert_true(ops()->config_write(&E.t, 4, 4, 0xa1b2c3d4));
    assert_int_equal(E.m->config[4], 0xd4);
    assert_int_equal(E.m->config[7], 0xa1);
    assert_true(ops()->config_write(&E.t, 2, 2, 0x5566));
    assert_int_equal(E.m->config[2], 0x66);
    check_clean(state);
}

static void test_reset_waits_for_device(void **state)
{
    add_device(2);
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    ops()->set_status(&E.t, VIRTIO_STATUS_ACKNOWLEDGE);
    E.m->reset_delay = 3;
    assert_int_equal(ops()->reset(&E.t), 0);
    assert_int_equal(E.m->status, 0);
    assert_true(E.m->status_reads >= 4);
    check_clean(state);
}

static void test_reset_deadline(void **state)
{
    for (uint32_t version = 1; version <= 2; version++) {
        fake_mmio_clear();
        add_device(version);
        assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
        ops()->set_status(&E.t, VIRTIO_STATUS_ACKNOWLEDGE);
        E.m->never_resets = true;
        uint64_t t0 = platform_now_ns();
        assert_int_equal(ops()->reset(&E.t), -1);
        /* It gave up after about a second of (skipped) clock, not at the first read. */
        uint64_t waited = platform_now_ns() - t0;
        assert_true(waited >= 1000ull * 1000 * 1000 && waited < 2000ull * 1000 * 1000);
    }
    check_clean(state);
}

static void test_isr_read_and_acked(void **state)
{
    add_device(2);
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    E.m->isr = VIRTIO_ISR_QUEUE | VIRTIO_ISR_CONFIG;
    assert_int_equal(ops()->read_isr(&E.t), 3);
    assert_int_equal(E.m->acks, 1);
    assert_int_equal(E.m->last_ack, 3);
    assert_int_equal(E.m->isr, 0);
    /* Nothing pending: no acknowledgement write. */
    assert_int_equal(ops()->read_isr(&E.t), 0);
    assert_int_equal(E.m->acks, 1);
    /* An unknown bit is acknowledged (the line must drop) but not reported. */
    E.m->isr = 0x4 | VIRTIO_ISR_CONFIG;
    assert_int_equal(ops()->read_isr(&E.t), VIRTIO_ISR_CONFIG);
    assert_int_equal(E.m->last_ack, 0x6);
    assert_int_equal(E.m->isr, 0);
    check_clean(state);
}

static void test_exit_counters(void **state)
{
    add_device(2);
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    const struct virtio_exit_counts zero = {0};
    assert_memory_equal(&E.t.exits, &zero, sizeof(zero)); /* identification is not counted */
    unsigned base = fake_mmio_accesses();
    ops()->set_status(&E.t, 1);            /* status 1 */
    (void)ops()->get_status(&E.t);         /* status 2 */
    (void)ops()->get_features(&E.t);       /* status 6 */
    ops()->set_features(&E.t, 1ull << 32); /* status 10 */
    (void)ops()->config_generation(&E.t);  /* status 11 */
    (void)ops()->queue_max_size(&E.t, 0);  /* status 13 */
    uint32_t v;
    ops()->config_read(&E.t, 0, 4, &v);
    ops()->config_read(&E.t, 4, 1, &v);
    ops()->config_write(&E.t, 4, 4, 9);
    ops()->config_read(&E.t, 0x400, 4, &v); /* refused: not an exit */
    ops()->set_status(&E.t, 1 | 2 | 4);     /* status 14 */
    ops()->notify(&E.t, 0);
    ops()->notify(&E.t, 1);
    ops()->notify(&E.t, 2);
    (void)ops()->read_isr(&E.t); /* read only */
    E.m->isr = 1;
    (void)ops()->read_isr(&E.t); /* read + ack */
    assert_int_equal(E.t.exits.status, 14);
    assert_int_equal(E.t.exits.config_reads, 2);
    assert_int_equal(E.t.exits.config_writes, 1);
    assert_int_equal(E.t.exits.notifies, 3);
    assert_int_equal(E.t.exits.isr_reads, 3);
    /* Every counted exit is one device access, and every device access is counted. */
    uint64_t sum = E.t.exits.status + E.t.exits.config_reads + E.t.exits.config_writes +
                   E.t.exits.notifies + E.t.exits.isr_reads;
    assert_int_equal(fake_mmio_accesses() - base, sum);
    check_clean(state);
}

static void test_exit_counters_cover_queue_setup_and_reset(void **state)
{
    add_device(1);
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    assert_int_equal(E.t.exits.status, 1); /* bind's GuestPageSize write */
    unsigned base = fake_mmio_accesses();
    assert_int_equal(ops()->reset(&E.t), 0);
    uint16_t n = 16;
    uint64_t mem = fake_mem_alloc_phys(vq_mem_bytes(n, true, 0), 4096);
    uint64_t avail = mem + 16ull * n;
    const struct vq_addrs a = {mem, avail, (avail + 6 + 2ull * n + 4095) & ~4095ull};
    assert_int_equal(ops()->queue_enable(&E.t, 0, n, &a), 0);
    assert_int_equal(E.t.exits.status - 1, fake_mmio_accesses() - base);
    check_clean(state);
}

/* ---- the balloon driver over the transport ------------------------------------------------- */

#define BRAM_BYTES (8u << 20)
#define BRAM_PAGES (BRAM_BYTES / 4096)

/* The device side of inflate/deflate: take every buffer, check and count its PFNs, answer it. */
static unsigned serve(struct fake_mmio_queue *q, uint8_t *ballooned, bool inflate)
{
    unsigned pages = 0;
    if (!q->live)
        return 0;
    fake_vq_pop_all(&q->vq);
    while (q->vq.npending) {
        uint32_t pfns[256];
        size_t n = fake_chain_read(&q->vq.pending[0], pfns, sizeof(pfns)) / 4;
        for (size_t i = 0; i < n; i++) {
            uint64_t k = pfns[i] - (RAM_BASE >> 12);
            assert_true(pfns[i] >= RAM_BASE >> 12 && k < BRAM_PAGES);
            assert_int_equal(ballooned[k], !inflate); /* not twice in, not out unless in */
            ballooned[k] = inflate;
        }
        pages += (unsigned)n;
        fake_vq_complete(&q->vq, 0, 0);
    }
    return pages;
}

static void balloon_round_trip(uint32_t version)
{
    fake_mem_fini();
    fake_mem_init(RAM_BASE, BRAM_BYTES);
    struct buddy mm;
    size_t mb = buddy_meta_bytes(BRAM_PAGES);
    void *meta = aligned_alloc(8, (mb + 7) & ~(size_t)7);
    assert_non_null(meta);
    assert_int_equal(buddy_init(&mm, meta, mb, RAM_BASE >> 12, BRAM_PAGES), 0);
    buddy_add_range(&mm, RAM_BASE >> 12, BRAM_PAGES);
    E.m = fake_mmio_add(BASE, SLOT, version, TYPE_BALLOON);
    E.m->device_features = (version == 2 ? 1ull << 32 : 0) | 1ull << 0; /* MUST_TELL_HOST */
    fake_mmio_add_queue(E.m, 0, QMAX);
    fake_mmio_add_queue(E.m, 1, QMAX);
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    struct balloon_config cfg;
    balloon_default_config(&cfg);
    static struct balloon b;
    assert_int_equal(balloon_init(&b, &E.t, &mm, &cfg), 0);
    assert_true(E.m->status & VIRTIO_STATUS_DRIVER_OK);
    assert_int_equal(!!(E.m->status & VIRTIO_STATUS_FEATURES_OK), version == 2);
    assert_true(E.m->q[0].live && E.m->q[1].live);
    uint64_t free0 = mm.free_pages;
    uint8_t *ballooned = calloc(BRAM_PAGES, 1);
    assert_non_null(ballooned);
    static const uint32_t targets[] = {700, 100, 0};
    unsigned in = 0, out = 0;
    for (unsigned k = 0; k < 3; k++) {
        memcpy(&E.m->config[0], &targets[k], 4);
        uint32_t actual = ~0u;
        for (unsigned round = 0; round < 200 && actual != targets[k]; round++) {
            balloon_poll(&b, ops()->read_isr(&E.t) | BALLOON_EV_CONFIG);
            in += serve(&E.m->q[0], ballooned, true);
            out += serve(&E.m->q[1], ballooned, false);
            memcpy(&actual, &E.m->config[4], 4);
        }
        assert_int_equal(actual, targets[k]);
        assert_int_equal(in - out, targets[k]);
        /* The balloon keeps its records in pages of its own (mm/blocklist.c). */
        assert_in_range(mm.free_pages, free0 - targets[k] - 4, free0 - targets[k]);
    }
    assert_int_equal(mm.free_pages, free0);
    struct balloon_status st;
    balloon_get_status(&b, &st);
    assert_string_equal(st.state_name, "running");
    assert_string_equal(st.transport, version == 2 ? "virtio-mmio-modern" : "virtio-mmio-legacy");
    assert_true(E.t.exits.notifies > 0);
    assert_int_equal(E.m->q[0].vq.errors + E.m->q[1].vq.errors, 0);
    free(ballooned);
    fake_mmio_clear();
    E.m = NULL;
    free(meta);
}

static void test_balloon_over_v1(void **state)
{
    balloon_round_trip(1);
    check_clean(state);
}

static void test_balloon_over_v2(void **state)
{
    balloon_round_trip(2);
    check_clean(state);
}

/* ---- microvm probe ------------------------------------------------------------------------- */

static void test_probe_microvm_24_slots(void **state)
{
    /* ACPI on: 24 transports, the balloon in the top one, the rest empty. */
    for (unsigned i = 0; i < 24; i++)
        fake_mmio_add(MICROVM_MMIO_BASE + i * 512ull, 512, 1, i == 23 ? TYPE_BALLOON : 0);
    struct virtio_mmio_device out[MICROVM_MMIO_MAX_SLOTS];
    assert_int_equal(virtio_mmio_probe_microvm(out), 24);
    for (unsigned i = 0; i < 24; i++) {
        assert_int_equal(out[i].base, MICROVM_MMIO_BASE + i * 512ull);
        assert_int_equal(out[i].size, 512);
        assert_int_equal(out[i].irq.kind, VIRTIO_IRQ_GSI);
        assert_int_equal(out[i].irq.gsi, 24 + i);
        assert_true(out[i].irq.level);
    }
    E.dev = out[23];
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    assert_int_equal(E.t.irq.gsi, 47); /* what QEMU 7.2 wires to 0xfeb02e00 */
    E.dev = out[0];
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_EMPTY);
    check_clean(state);
}

static void test_probe_microvm_8_slots_line_unknown(void **state)
{
    /* acpi=off (or ioapic2=off): 8 transports; GSI 5+i or 16+i, which the slots cannot tell. */
    for (unsigned i = 0; i < 8; i++)
        fake_mmio_add(MICROVM_MMIO_BASE + i * 512ull, 512, 2, i == 7 ? TYPE_BALLOON : 0);
    struct virtio_mmio_device out[MICROVM_MMIO_MAX_SLOTS];
    assert_int_equal(virtio_mmio_probe_microvm(out), 8);
    for (unsigned i = 0; i < 8; i++)
        assert_int_equal(out[i].irq.kind, VIRTIO_IRQ_NONE);
    assert_int_equal(out[7].base, 0xfeb00e00ull);
    /* Reads past the 8 transports found nothing (QEMU's unassigned memory reads 0). */
    assert_true(fake_mmio_unassigned_reads() >= 16);
    check_clean(state);
}

static void test_probe_microvm_nothing(void **state)
{
    struct virtio_mmio_device out[MICROVM_MMIO_MAX_SLOTS];
    assert_int_equal(virtio_mmio_probe_microvm(out), 0);
    check_clean(state);
}

/* ---- virtio_mmio.device= ------------------------------------------------------------------- */

static void parses(const char *s, uint64_t size, uint64_t base, unsigned irq, int id)
{
    struct virtio_mmio_device d;
    const char *why = "unset";
    if (!virtio_mmio_parse_device(s, &d, &why))
        fail_msg("'%s' refused: %s", s, why);
    assert_null(why);
    assert_int_equal(d.size, size);
    assert_int_equal(d.base, base);
    assert_int_equal(d.irq.kind, VIRTIO_IRQ_GSI);
    assert_int_equal(d.irq.gsi, irq);
    assert_true(d.irq.level);
    assert_int_equal(d.id, id);
}

static void refuses(const char *s, const char *why_part)
{
    struct virtio_mmio_device d = {.base = 77};
    const char *why = NULL;
    if (virtio_mmio_parse_device(s, &d, &why))
        fail_msg("'%s' accepted", s);
    assert_non_null(why);
    if (!strstr(why, why_part))
        fail_msg("'%s' refused with '%s', expected it to mention '%s'", s, why, why_part);
    assert_int_equal(d.base, 77); /* untouched */
}

static void test_parse_good_entries(void **state)
{
    (void)state;
    parses("512@0xfeb00e00:12", 512, 0xfeb00e00, 12, -1); /* what QEMU appends */
    parses("4K@0xd0000000:5", 4096, 0xd0000000, 5, -1);   /* Firecracker */
    parses("0x1000@0xd0001000:6:3", 4096, 0xd0001000, 6, 3);
    parses("64k@3489660928:0", 65536, 0xd0000000, 0, -1);
    parses("0x108@0x1000:4294967295", 0x108, 0x1000, 4294967295u, -1);
    parses("512@0xFEB00E00:12:0", 512, 0xfeb00e00, 12, 0);
}

static void test_parse_bad_entries(void **state)
{
    (void)state;
    const char *shape = "expected <size>@<base>:<irq>";
    refuses("", shape);
    refuses("512", shape);
    refuses("512@0xfeb00e00", shape);
    refuses("512@0xfeb00e00:", shape);
    refuses("@0xfeb00e00:12", shape);
    refuses("512@:12", shape);
    refuses("512@0xfeb00e00:12:", shape);
    refuses("512@0xfeb00e00:12:1:2", "id");
    refuses("abc@0xfeb00e00:12", "size");
    refuses("512Q@0xfeb00e00:12", "size");
    refuses("99999999999999999999999@0x1000:1", "size");
    refuses("512@0xfeb00e0g:12", "base");
    refuses("512@1M:12", "base");
    refuses("512@0xfeb00e00:0x0c", "irq");
    refuses("512@0xfeb00e00:-1", "irq");
    refuses("512@0xfeb00e00:4294967296", "irq");
    refuses("512@0xfeb00e00:12:x", "id");
    refuses("512@0xfeb00e00:12:2147483648", "id");
    refuses("0x107@0xfeb00e00:12", "smaller");
    refuses("0@0xfeb00e00:12", "smaller");
    refuses("0x10004@0xfeb00e00:12", "larger");
    refuses("1G@0xfeb00e00:12", "larger");
    refuses("512@0xfeb00e02:12", "aligned");
    refuses("512@0xfeb00e01:12", "aligned");
    refuses("4K@0xfffffffffffff000:5", "52-bit");
    refuses("4K@0xffffffffff800:5", "52-bit");
    parses("4K@0xffffffffff000:5", 4096, 0xffffffffff000ull, 5, -1); /* ends exactly at 2^52 */
    refuses("512@0xfeb00e00:12 ", "irq");
}

static void test_overlap(void **state)
{
    (void)state;
    struct virtio_mmio_device a = {.base = 0x1000, .size = 0x200};
    struct virtio_mmio_device b = {.base = 0x1200, .size = 0x200};
    struct virtio_mmio_device c = {.base = 0x11fc, .size = 0x200};
    struct virtio_mmio_device d = {.base = 0x800, .size = 0x1000};
    assert_false(virtio_mmio_overlap(&a, &b));
    assert_false(virtio_mmio_overlap(&b, &a));
    assert_true(virtio_mmio_overlap(&a, &c));
    assert_true(virtio_mmio_overlap(&c, &b));
    assert_true(virtio_mmio_overlap(&a, &d)); /* one inside the other */
    assert_true(virtio_mmio_overlap(&d, &a));
    assert_true(virtio_mmio_overlap(&a, &a));
}

/* ---- conformance checks (check_registers, peek_isr) ---------------------------------------- */

static bool all_ok(const struct virtio_reg_check *c, unsigned n, const char **first_bad)
{
    for (unsigned i = 0; i < n; i++)
        if (!c[i].ok) {
            *first_bad = c[i].what;
            return false;
        }
    return true;
}

static void check_registers_case(uint32_t version, bool keep_queues)
{
    add_device(version);
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    /* a queue set up, as a driver leaves it */
    assert_int_equal(ops()->reset(&E.t), 0);
    ops()->set_status(&E.t, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    ops()->set_features(&E.t, version == 2 ? 1ull << 32 : 0);
    if (version == 2)
        ops()->set_status(&E.t, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
                                    VIRTIO_STATUS_FEATURES_OK);
    struct vq_addrs a = {RAM_BASE, RAM_BASE + 0x1000, RAM_BASE + 0x2000};
    E.m->reset_keeps_queues = keep_queues;
    if (version == 2)
        assert_int_equal(ops()->queue_enable(&E.t, 1, 64, &a), 0);
    else
        E.m->q[1].pfn = 0x123; /* as a v1 driver's QueuePFN write leaves it */
    struct virtio_reg_check c[VIRTIO_REG_CHECKS_MAX];
    unsigned n = ops()->check_registers(&E.t, c, VIRTIO_REG_CHECKS_MAX);
    assert_int_equal(n, 4);
    const char *bad = NULL;
    bool ok = all_ok(c, n, &bad);
    assert_int_equal(ok, !keep_queues);
    if (keep_queues) {
        assert_non_null(strstr(bad, version == 2 ? "QueueReady" : "QueuePFN"));
        assert_int_equal(c[3].v[1], 1); /* one queue still set up */
    }
    assert_int_equal(c[0].v[0], VIRTIO_MMIO_MAGIC);
    assert_int_equal(c[1].v[0], version);
}

static void test_check_registers_v2(void **state)
{
    check_registers_case(2, false);
    check_clean(state);
}

static void test_check_registers_v1(void **state)
{
    check_registers_case(1, false);
    check_clean(state);
}

static void test_check_registers_queue_survives_reset(void **state)
{
    (void)state;
    check_registers_case(2, true);
}

static void test_check_registers_pfn_survives_reset(void **state)
{
    (void)state;
    check_registers_case(1, true);
}

/* InterruptStatus holds until InterruptACK: peek reads it without acknowledging. */
static void test_peek_isr_does_not_ack(void **state)
{
    add_device(2);
    assert_int_equal(bind(VIRTIO_MMIO_ANY), VIRTIO_MMIO_BOUND);
    E.m->isr = VIRTIO_ISR_QUEUE;
    assert_int_equal(ops()->peek_isr(&E.t), VIRTIO_ISR_QUEUE);
    assert_int_equal(ops()->peek_isr(&E.t), VIRTIO_ISR_QUEUE);
    assert_int_equal(E.m->acks, 0);
    assert_int_equal(ops()->read_isr(&E.t), VIRTIO_ISR_QUEUE);
    assert_int_equal(E.m->acks, 1);
    assert_int_equal(ops()->peek_isr(&E.t), 0);
    check_clean(state);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
        T(test_v2_bring_up),
        T(test_check_registers_v2),
        T(test_check_registers_v1),
        T(test_check_registers_queue_survives_reset),
        T(test_check_registers_pfn_survives_reset),
        T(test_peek_isr_does_not_ack),
        T(test_v2_features_refused_without_version_1),
        T(test_v1_bring_up),
        T(test_version_restriction),
        T(test_bad_magic_is_empty),
        T(test_device_id_0_is_empty),
        T(test_no_device_at_all_is_empty),
        T(test_bad_versions_refused),
        T(test_other_device_type),
        T(test_bad_windows_not_mapped),
        T(test_queue_max_size_validated),
        T(test_v2_queue_addresses),
        T(test_v1_queue_pfn),
        T(test_v1_ring_round_trip),
        T(test_v2_ring_round_trip),
        T(test_config_bounds),
        T(test_reset_waits_for_device),
        T(test_reset_deadline),
        T(test_isr_read_and_acked),
        T(test_exit_counters),
        T(test_exit_counters_cover_queue_setup_and_reset),
        T(test_balloon_over_v1),
        T(test_balloon_over_v2),
        T(test_probe_microvm_24_slots),
        T(test_probe_microvm_8_slots_line_unknown),
        T(test_probe_microvm_nothing),
        T(test_parse_good_entries),
        T(test_parse_bad_entries),
        T(test_overlap),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
