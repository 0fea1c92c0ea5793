/*
 * Unit tests for virtio/virtio_pci.c (and lib/pci.c's capability walk) against the fake PCI bus
 * in fake_pci.c. The device side is modelled here: the modern common-configuration structure and
 * the legacy I/O header as register callbacks, the ISR, device config and notify area as plain
 * BAR memory. Teardown checks that the transport never touched anything outside a region, the
 * config space or a BAR, and never asked pci_map_bar for a window that does not fit.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <limits.h>
#include <string.h>

#include "virtio/virtio_pci.h"
#include "include/bus.h"
#include "include/platform.h"
#include "tests/unit/fake_pci.h"
#include "tests/unit/fake_platform.h"

#define VIRTIO_VENDOR   0x1af4
#define TYPE_BALLOON    5
#define MODERN_ID       (0x1040 + TYPE_BALLOON)
#define TRANSITIONAL_ID 0x1002 /* QEMU's transitional balloon; subsystem device = type */

/* The modern structures live in a 64-bit memory BAR above 4 GiB (where OVMF puts them). */
#define MEM_BAR    4
#define MEM_BASE   0x8000000000ULL
#define MEM_SIZE   0x4000
#define COMMON_AT  0x0000
#define COMMON_LEN 0x1000
#define ISR_AT     0x1000
#define ISR_LEN    0x4
#define DEVCFG_AT  0x2000
#define DEVCFG_LEN 12
#define NOTIFY_AT  0x3000
#define NOTIFY_LEN 0x1000

/* The legacy header and config in I/O BAR0. */
#define IO_BASE 0xc040
#define IO_SIZE 0x20

#define NQUEUES        3
#define QUEUE_MAX      128
#define RESET_STEP_NS  (50ull * 1000 * 1000) /* clock skipped per status read while resetting */
#define CAP_ID_PCI_CFG 5

/* ---- Device model: modern common configuration ------------------------------------------- */

struct modern_queue {
    uint16_t size, msix, enable, notify_off;
    uint64_t desc, avail, used;
};

struct modern_model {
    uint64_t device_features, driver_features;
    uint32_t dfselect, gfselect;
    uint8_t status, generation;
    uint16_t num_queues, select;
    uint16_t msix_config;
    bool refuse_config_vector, refuse_queue_vector; /* store VIRTIO_MSI_NO_VECTOR instead */
    struct modern_queue q[VIRTIO_PCI_MAX_QUEUES];
    bool never_resets;         /* status writes of 0 are ignored */
    bool reset_keeps_enable;   /* a reset leaves queue_enable as it was (a device bug) */
    uint16_t size_after_reset; /* non-zero: every queue's size after a reset (a bad one) */
    unsigned reset_delay;      /* status reads that still show the old status after a reset */
    bool reset_pending;
    unsigned reset_countdown;
    unsigned status_reads;
    unsigned bad_accesses; /* accesses of the wrong width or to no field */
};

/* Width of the common-config field at off (spec 4.1.4.3), 0 for none. */
static unsigned field_width(uint64_t off)
{
    if (off <= 0x0c)
        return off % 4 ? 0 : 4;
    if (off == 0x10 || off == 0x12)
        return 2;
    if (off == 0x14 || off == 0x15)
        return 1;
    if (off >= 0x16 && off <= 0x1e)
        return off % 2 ? 0 : 2;
    if (off >= 0x20 && off <= 0x34)
        return off % 4 ? 0 : 4;
    return 0;
}

static void modern_reset(struct modern_model *m)
{
    m->status = 0;
    m->driver_features = 0;
    m->dfselect = m->gfselect = 0;
    m->select = 0;
    m->msix_config = VIRTIO_MSI_NO_VECTOR;
    for (unsigned i = 0; i < VIRTIO_PCI_MAX_QUEUES; i++) {
        struct modern_queue *q = &m->q[i];
        q->size = i < m->num_queues ? (m->size_after_reset ? m->size_after_reset : QUEUE_MAX) : 0;
        if (!m->reset_keeps_enable)
            q->enable = 0;
        q->msix = 0;
        q->desc = q->avail = q->used = 0;
    }
}

static struct modern_queue *selected(struct modern_model *m)
{
    static struct modern_queue none;
    none = (struct modern_queue){0};
    return m->select < m->num_queues ? &m->q[m->select] : &none;
}

static uint32_t half(uint64_t v, uint32_t select)
{
    return select == 0 ? (uint32_t)v : select == 1 ? (uint32_t)(v >> 32) : 0;
}

static void set_half(uint64_t *v, uint32_t select, uint32_t val)
{
    if (select == 0)
        *v = (*v & ~0xffffffffULL) | val;
    else if (select == 1)
        *v = (*v & 0xffffffffULL) | (uint64_t)val << 32;
}

static uint32_t common_read(void *arg, uint64_t off, unsigned width)
{
    struct modern_model *m = arg;
    if (field_width(off) != width) {
        m->bad_accesses++;
        return 0;
    }
    struct modern_queue *q = selected(m);
    switch (off) {
    case 0x00:
        return m->dfselect;
    case 0x04:
        return half(m->device_features, m->dfselect);
    case 0x08:
        return m->gfselect;
    case 0x0c:
        return half(m->driver_features, m->gfselect);
    case 0x10:
        return m->msix_config;
    case 0x12:
        return m->num_queues;
    case 0x14:
        m->status_reads++;
        if (m->never_resets || m->reset_pending)
            fake_clock_skip(RESET_STEP_NS);
        if (m->reset_pending && m->reset_countdown-- == 0) {
            m->reset_pending = false;
            modern_reset(m);
        }
        return m->status;
    case 0x15:
        return m->generation;
    case 0x16:
        return m->select;
    case 0x18:
        return q->size;
    case 0x1a:
        return q->msix;
    case 0x1c:
        return q->enable;
    case 0x1e:
        return q->notify_off;
    case 0x20:
        return (uint32_t)q->desc;
    case 0x24:
        return (uint32_t)(q->desc >> 32);
    case 0x28:
        return (uint32_t)q->avail;
    case 0x2c:
        return (uint32_t)(q->avail >> 32);
    case 0x30:
        return (uint32_t)q->used;
    default:
        return (uint32_t)(q->used >> 32);
    }
}

static void set_lo(uint64_t *v, uint32_t val)
{
    *v = (*v & ~0xffffffffULL) | val;
}

static void set_hi(uint64_t *v, uint32_t val)
{
    *v = (*v & 0xffffffffULL) | (uint64_t)val << 32;
}

static void common_write(void *arg, uint64_t off, unsigned width, uint32_t v)
{
    struct modern_model *m = arg;
    if (field_width(off) != width) {
        m->bad_accesses++;
        return;
    }
    struct modern_queue *q = selected(m);
    switch (off) {
    case 0x00:
        m->dfselect = v;
        break;
    case 0x08:
        m->gfselect = v;
        break;
    case 0x0c:
        set_half(&m->driver_features, m->gfselect, v);
        break;
    case 0x14:
        if (v != 0)
            m->status = (uint8_t)v;
        else if (m->never_resets)
            ;
        else if (m->reset_delay) {
            m->reset_pending = true;
            m->reset_countdown = m->reset_delay;
        } else
            modern_reset(m);
        break;
    case 0x10:
        m->msix_config = m->refuse_config_vector ? VIRTIO_MSI_NO_VECTOR : (uint16_t)v;
        break;
    case 0x16:
        m->select = (uint16_t)v;
        break;
    case 0x18:
        q->size = (uint16_t)v;
        break;
    case 0x1a:
        q->msix = m->refuse_queue_vector ? VIRTIO_MSI_NO_VECTOR : (uint16_t)v;
        break;
    case 0x1c:
        q->enable = (uint16_t)v;
        break;
    case 0x20:
        set_lo(&q->desc, v);
        break;
    case 0x24:
        set_hi(&q->desc, v);
        break;
    case 0x28:
        set_lo(&q->avail, v);
        break;
    case 0x2c:
        set_hi(&q->avail, v);
        break;
    case 0x30:
        set_lo(&q->used, v);
        break;
    case 0x34:
        set_hi(&q->used, v);
        break;
    default: /* read-only fields */
        m->bad_accesses++;
    }
}

/* ---- Device model: legacy I/O header (spec 4.1.4.10) -------------------------------------- */

struct legacy_model {
    uint32_t host_features, guest_features;
    uint16_t select;
    uint16_t num[VIRTIO_PCI_MAX_QUEUES];
    uint32_t pfn[VIRTIO_PCI_MAX_QUEUES];
    uint8_t status, isr;
    bool reset_keeps_pfn; /* a reset leaves QUEUE_PFN as it was (a device bug) */
    uint8_t config[IO_SIZE - 20];
    unsigned bad_accesses;
    /* MSI-X: the function's config space and capability, to see whether it is enabled (the
     * vectors at 20 and 22 then push the device config to 24). */
    const uint8_t *pci_config;
    unsigned msix_cap;
    uint16_t msix_config, msix_queue[VIRTIO_PCI_MAX_QUEUES];
    bool refuse_vectors; /* store VIRTIO_MSI_NO_VECTOR instead */
};

static bool legacy_msix_on(const struct legacy_model *l)
{
    return l->pci_config && l->msix_cap && (l->pci_config[l->msix_cap + 3] & 0x80);
}

static unsigned legacy_width(uint64_t off)
{
    static const uint8_t widths[20] = {
        [0] = 4, [4] = 4, [8] = 4, [12] = 2, [14] = 2, [16] = 2, [18] = 1, [19] = 1};
    return off < 20 ? widths[off] : 0;
}

static uint32_t legacy_read(void *arg, uint64_t off, unsigned width)
{
    struct legacy_model *l = arg;
    unsigned base = legacy_msix_on(l) ? 24 : 20;
    if (base == 24 && (off == 20 || off == 22) && width == 2)
        return off == 20 ? l->msix_config : l->msix_queue[l->select % VIRTIO_PCI_MAX_QUEUES];
    if (off >= base) {
        uint32_t v = 0;
        memcpy(&v, &l->config[off - base], width);
        return v;
    }
    if (legacy_width(off) != width) {
        l->bad_accesses++;
        return 0;
    }
    unsigned q = l->select < VIRTIO_PCI_MAX_QUEUES ? l->select : 0;
    switch (off) {
    case 0:
        return l->host_features;
    case 4:
        return l->guest_features;
    case 8:
        return l->pfn[q];
    case 12:
        return l->select < VIRTIO_PCI_MAX_QUEUES ? l->num[q] : 0;
    case 14:
        return l->select;
    case 18:
        return l->status;
    case 19: {
        uint8_t isr = l->isr; /* reading acknowledges */
        l->isr = 0;
        return isr;
    }
    default:
        return 0;
    }
}

static void legacy_write(void *arg, uint64_t off, unsigned width, uint32_t v)
{
    struct legacy_model *l = arg;
    unsigned base = legacy_msix_on(l) ? 24 : 20;
    if (base == 24 && (off == 20 || off == 22) && width == 2) {
        uint16_t vec = l->refuse_vectors ? VIRTIO_MSI_NO_VECTOR : (uint16_t)v;
        if (off == 20)
            l->msix_config = vec;
        else
            l->msix_queue[l->select % VIRTIO_PCI_MAX_QUEUES] = vec;
        return;
    }
    if (off >= base) {
        memcpy(&l->config[off - base], &v, width);
        return;
    }
    if (legacy_width(off) != width) {
        l->bad_accesses++;
        return;
    }
    switch (off) {
    case 4:
        l->guest_features = v;
        break;
    case 8:
        if (l->select < VIRTIO_PCI_MAX_QUEUES)
            l->pfn[l->select] = v;
        break;
    case 14:
        l->select = (uint16_t)v;
        break;
    case 16: /* notify: the fake's write log has it */
        break;
    case 18:
        l->status = (uint8_t)v;
        if (v == 0) {
            l->guest_features = 0;
            if (!l->reset_keeps_pfn)
                memset(l->pfn, 0, sizeof(l->pfn));
        }
        break;
    default: /* read-only fields */
        l->bad_accesses++;
    }
}

/* ---- Fixture -------------------------------------------------------------------------------- */

static struct {
    struct modern_model m;
    struct legacy_model l;
    struct virtio_pci vp;
    struct virtio_transport t;
} E;

static int setup(void **state)
{
    (void)state;
    fake_pci_reset();
    fake_log_reset();
    fake_log_echo(false);
    memset(&E, 0, sizeof(E));
    E.m.num_queues = NQUEUES;
    E.m.device_features = 1ULL << 32 | 1ULL << 1 | 1ULL << 0; /* VERSION_1, balloon bits */
    for (unsigned i = 0; i < VIRTIO_PCI_MAX_QUEUES; i++)
        E.m.q[i].notify_off = (uint16_t)i; /* QEMU's choice */
    modern_reset(&E.m);
    E.l.host_features = 0x3;
    for (unsigned i = 0; i < NQUEUES; i++)
        E.l.num[i] = QUEUE_MAX;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    fake_pci_reset();
    return 0;
}

/* What every test must also hold to: the transport kept to its regions, the config space and
 * the registers' widths, and validated every window before asking pci_map_bar for it. */
static void assert_bus_used_correctly(void)
{
    if (fake_pci_errors())
        fail_msg("the transport misused the bus %u times, first: %s", fake_pci_errors(),
                 fake_pci_first_error());
    if (fake_pci_maps_refused())
        fail_msg("the transport asked to map %u windows that do not fit their BAR",
                 fake_pci_maps_refused());
    if (E.m.bad_accesses + E.l.bad_accesses)
        fail_msg("%u register accesses of the wrong width or to no register",
                 E.m.bad_accesses + E.l.bad_accesses);
}

/* Runs the test that the case's initial state names, then the checks above (in the test itself,
 * so that a violation counts as a failed test). */
struct test_case {
    void (*run)(void);
};

static void run_case(void **state)
{
    const struct test_case *c = *state;
    c->run();
    assert_bus_used_correctly();
}

/* Sanitizer reports (say, an out-of-bounds BAR index) fail the run instead of scrolling by. */
const char *__ubsan_default_options(void);
const char *__ubsan_default_options(void)
{
    return "halt_on_error=1:print_stacktrace=1";
}

static struct fake_pci_func *add_func(uint8_t dev, uint16_t vendor, uint16_t device,
                                      uint16_t subsys_device)
{
    struct fake_pci_func *f = fake_pci_add(0, dev, 0, vendor, device);
    fake_pci_set_subsys(f, vendor, subsys_device);
    fake_pci_cfg_put8(f, 0x08, 1); /* revision */
    return f;
}

/* struct virtio_pci_cap (and _notify_cap) after cap_vndr and cap_next. */
static unsigned add_notify_cap(struct fake_pci_func *f, uint8_t bar, uint32_t off, uint32_t len,
                               uint32_t mult)
{
    uint8_t body[18] = {20, 2, bar};
    memcpy(&body[6], &off, 4);
    memcpy(&body[10], &len, 4);
    memcpy(&body[14], &mult, 4);
    return fake_pci_add_cap(f, PCI_CAP_ID_VENDOR, body, sizeof(body));
}

static unsigned add_vcap(struct fake_pci_func *f, uint8_t type, uint8_t bar, uint32_t off,
                         uint32_t len)
{
    uint8_t body[14] = {16, type, bar};
    memcpy(&body[6], &off, 4);
    memcpy(&body[10], &len, 4);
    return fake_pci_add_cap(f, PCI_CAP_ID_VENDOR, body, sizeof(body));
}

static void give_modern_bar(struct fake_pci_func *f)
{
    fake_pci_set_bar(f, MEM_BAR, FAKE_BAR_MEM64, MEM_BASE, MEM_SIZE);
    fake_pci_add_window(f, MEM_BAR, COMMON_AT, COMMON_LEN, common_read, common_write, &E.m);
}

/* QEMU's order: common, ISR, device, notify, then a PCI-config-access cap (ignored). */
static void add_modern_caps(struct fake_pci_func *f, uint32_t mult)
{
    add_vcap(f, 1, MEM_BAR, COMMON_AT, COMMON_LEN);
    add_vcap(f, 3, MEM_BAR, ISR_AT, ISR_LEN);
    add_vcap(f, 4, MEM_BAR, DEVCFG_AT, DEVCFG_LEN);
    add_notify_cap(f, MEM_BAR, NOTIFY_AT, NOTIFY_LEN, mult);
    add_vcap(f, CAP_ID_PCI_CFG, 0, 0, 0);
}

static void give_legacy_bar(struct fake_pci_func *f, uint64_t size)
{
    fake_pci_set_bar(f, 0, FAKE_BAR_IO, IO_BASE, size);
    fake_pci_add_window(f, 0, 0, size, legacy_read, legacy_write, &E.l);
}

/* A modern-only device with its caps; the caller adds them (bare) or not. */
static struct fake_pci_func *modern_only(bool caps, uint32_t mult)
{
    struct fake_pci_func *f = add_func(3, VIRTIO_VENDOR, MODERN_ID, 0x1100);
    give_modern_bar(f);
    if (caps)
        add_modern_caps(f, mult);
    return f;
}

static struct fake_pci_func *transitional(bool caps, uint32_t mult)
{
    struct fake_pci_func *f = add_func(3, VIRTIO_VENDOR, TRANSITIONAL_ID, TYPE_BALLOON);
    give_legacy_bar(f, IO_SIZE);
    give_modern_bar(f);
    if (caps)
        add_modern_caps(f, mult);
    return f;
}

static int find(enum virtio_pci_choice choice)
{
    return virtio_pci_find(TYPE_BALLOON, choice, &E.vp, &E.t);
}

static const struct virtio_transport_ops *ops(void)
{
    return E.t.ops;
}

/* The notify writes that landed in [base, base + len): their count, and the i-th one. */
static unsigned writes_in(uint64_t base, uint64_t len, unsigned nth, struct fake_pci_write *out)
{
    unsigned n = 0;
    for (unsigned i = 0; i < fake_pci_write_count(); i++) {
        const struct fake_pci_write *w = fake_pci_write_at(i);
        if (w && w->addr >= base && w->addr - base < len) {
            if (n == nth && out)
                *out = *w;
            n++;
        }
    }
    return n;
}

static const struct vq_addrs HIGH_ADDRS = {
    .desc = 0x123456000ULL, .avail = 0x123457000ULL, .used = 0x123458000ULL};

/* ---- Discovery: modern ----------------------------------------------------------------------- */

static void test_modern_discovery_64bit_bar(void)
{
    struct fake_pci_func *f = modern_only(true, 4);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_string_equal(E.t.name, "virtio-pci-modern");
    assert_false(E.t.legacy);
    assert_int_equal(E.t.device_id, TYPE_BALLOON);
    assert_int_equal(E.t.config_size, DEVCFG_LEN);
    assert_int_equal(E.vp.common.base, MEM_BASE + COMMON_AT);
    assert_int_equal(E.vp.common.size, COMMON_LEN);
    assert_int_equal(E.vp.isr.base, MEM_BASE + ISR_AT);
    assert_int_equal(E.vp.device_cfg.base, MEM_BASE + DEVCFG_AT);
    assert_int_equal(E.vp.notify.base, MEM_BASE + NOTIFY_AT);
    assert_int_equal(E.vp.notify.size, NOTIFY_LEN);
    assert_int_equal(E.vp.notify_mult, 4);
    assert_false(E.vp.common.port_io);
    /* Decoding and bus mastering are on. */
    assert_int_equal(f->config[PCI_CFG_COMMAND] & 0x7, 0x7);
    /* The enumeration found the 64-bit BAR above 4 GiB. */
    assert_int_equal(E.vp.pci.bar[MEM_BAR].base, MEM_BASE);
    assert_true(fake_log_contains("1af4:1045"));
    /* Status goes to the common structure. */
    ops()->set_status(&E.t, VIRTIO_STATUS_ACKNOWLEDGE);
    assert_int_equal(E.m.status, VIRTIO_STATUS_ACKNOWLEDGE);
    assert_int_equal(ops()->get_status(&E.t), VIRTIO_STATUS_ACKNOWLEDGE);
}

static void test_first_cap_of_each_type_wins(void)
{
    struct fake_pci_func *f = modern_only(true, 4);
    /* A second set pointing elsewhere, with another multiplier: all ignored. */
    add_vcap(f, 1, MEM_BAR, 0x1800, 0x100);
    add_vcap(f, 3, MEM_BAR, 0x1900, 4);
    add_vcap(f, 4, MEM_BAR, 0x1a00, 0x20);
    add_notify_cap(f, MEM_BAR, 0x1c00, 0x100, 2);
    assert_int_equal(find(VIRTIO_PCI_MODERN), 0);
    assert_int_equal(E.vp.common.base, MEM_BASE + COMMON_AT);
    assert_int_equal(E.vp.isr.base, MEM_BASE + ISR_AT);
    assert_int_equal(E.vp.device_cfg.base, MEM_BASE + DEVCFG_AT);
    assert_int_equal(E.t.config_size, DEVCFG_LEN);
    assert_int_equal(E.vp.notify.base, MEM_BASE + NOTIFY_AT);
    assert_int_equal(E.vp.notify_mult, 4);
}

static void test_unusable_cap_gives_way_to_the_next(void)
{
    struct fake_pci_func *f = add_func(3, VIRTIO_VENDOR, MODERN_ID, 0);
    give_modern_bar(f);
    add_vcap(f, 1, 7, COMMON_AT, COMMON_LEN); /* BAR 7 does not exist */
    add_modern_caps(f, 4);
    assert_int_equal(find(VIRTIO_PCI_MODERN), 0);
    assert_int_equal(E.vp.common.base, MEM_BASE + COMMON_AT);
    assert_true(fake_log_contains("BAR 7"));
}

static void test_missing_isr_cap_falls_back_to_legacy(void)
{
    struct fake_pci_func *f = transitional(false, 0);
    add_vcap(f, 1, MEM_BAR, COMMON_AT, COMMON_LEN);
    add_vcap(f, 4, MEM_BAR, DEVCFG_AT, DEVCFG_LEN);
    add_notify_cap(f, MEM_BAR, NOTIFY_AT, NOTIFY_LEN, 4);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_string_equal(E.t.name, "virtio-pci-legacy");
    assert_true(E.t.legacy);
    assert_true(E.vp.legacy.port_io);
    assert_int_equal(E.vp.legacy.base, IO_BASE);
}

static void test_missing_cap_refuses_modern(void)
{
    struct fake_pci_func *f = transitional(false, 0);
    add_vcap(f, 1, MEM_BAR, COMMON_AT, COMMON_LEN);
    add_vcap(f, 3, MEM_BAR, ISR_AT, ISR_LEN);
    add_vcap(f, 4, MEM_BAR, DEVCFG_AT, DEVCFG_LEN); /* no notify cap */
    assert_int_equal(find(VIRTIO_PCI_MODERN), -1);
    assert_true(fake_log_contains("no usable modern interface"));
}

static void test_modern_choice_without_caps_fails(void)
{
    struct fake_pci_func *f = add_func(3, VIRTIO_VENDOR, TRANSITIONAL_ID, TYPE_BALLOON);
    give_legacy_bar(f, IO_SIZE); /* QEMU's disable-modern=on */
    assert_int_equal(find(VIRTIO_PCI_MODERN), -1);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_string_equal(E.t.name, "virtio-pci-legacy");
}

static void test_legacy_choice_on_modern_only_device_fails(void)
{
    struct fake_pci_func *f = modern_only(true, 4);
    give_legacy_bar(f, IO_SIZE); /* even with an I/O BAR0 that looks right */
    assert_int_equal(find(VIRTIO_PCI_LEGACY), -1);
    assert_true(fake_log_contains("no usable legacy interface"));
}

static void test_legacy_choice_on_transitional_device(void)
{
    transitional(true, 4);
    assert_int_equal(find(VIRTIO_PCI_LEGACY), 0);
    assert_string_equal(E.t.name, "virtio-pci-legacy");
    assert_int_equal(E.t.config_size, IO_SIZE - 20);
}

/* ---- Discovery: capabilities the device got wrong -------------------------------------------- */

/* A device whose common cap is replaced by the given one; modern must be refused. */
static void expect_common_cap_refused(uint8_t bar, uint32_t off, uint32_t len)
{
    struct fake_pci_func *f = add_func(3, VIRTIO_VENDOR, MODERN_ID, 0);
    give_modern_bar(f);
    /* The bad cap comes last, so the others are mapped when it is looked at. */
    add_notify_cap(f, MEM_BAR, NOTIFY_AT, NOTIFY_LEN, 4);
    add_vcap(f, 3, MEM_BAR, ISR_AT, ISR_LEN);
    add_vcap(f, 4, MEM_BAR, DEVCFG_AT, DEVCFG_LEN);
    add_vcap(f, 1, bar, off, len);
    assert_int_equal(find(VIRTIO_PCI_AUTO), -1);
    assert_int_equal(E.vp.common.size, 0);
    assert_true(fake_log_contains("is unusable"));
}

static void test_cap_past_end_of_bar_refused(void)
{
    expect_common_cap_refused(MEM_BAR, MEM_SIZE - 0x20, 0x40);
}

static void test_cap_offset_overflow_refused(void)
{
    /* 0xfffffff0 + 0x40 wraps to 0x30 in 32 bits, which would look like it fits. */
    expect_common_cap_refused(MEM_BAR, 0xfffffff0u, 0x40);
}

/* Found by tests/fuzz/fuzz_virtio_pci: an odd offset made every 16- and 32-bit register access
 * misaligned. */
static void test_cap_offset_misaligned_refused(void)
{
    expect_common_cap_refused(MEM_BAR, COMMON_AT + 2, 0x100);
}

static void test_cap_bar_index_above_5_refused(void)
{
    static const uint8_t bad_bars[] = {6, 7, 0xff};
    for (unsigned i = 0; i < sizeof(bad_bars); i++) {
        fake_pci_reset();
        fake_log_reset();
        expect_common_cap_refused(bad_bars[i], COMMON_AT, 0x100);
        assert_bus_used_correctly();
    }
}

static void test_cap_in_absent_bar_refused(void)
{
    expect_common_cap_refused(2, COMMON_AT, COMMON_LEN); /* the function has no BAR2 */
}

static void test_common_cap_too_short_refused(void)
{
    expect_common_cap_refused(MEM_BAR, COMMON_AT, 0x37); /* queue_used is cut off */
}

static void test_notify_cap_at_end_of_config_space_refused(void)
{
    struct fake_pci_func *f = add_func(3, VIRTIO_VENDOR, MODERN_ID, 0);
    give_modern_bar(f);
    add_vcap(f, 1, MEM_BAR, COMMON_AT, COMMON_LEN);
    add_vcap(f, 3, MEM_BAR, ISR_AT, ISR_LEN);
    add_vcap(f, 4, MEM_BAR, DEVCFG_AT, DEVCFG_LEN);
    /* A notify cap at 0xf0: its multiplier would be at 0x100, past config space. Write only
     * the 16 bytes that fit and link it in by hand. */
    uint8_t cap[16] = {PCI_CAP_ID_VENDOR, 0, 20, 2, MEM_BAR};
    uint32_t off = NOTIFY_AT, len = NOTIFY_LEN;
    memcpy(&cap[8], &off, 4);
    memcpy(&cap[12], &len, 4);
    memcpy(&f->config[0xf0], cap, sizeof(cap));
    f->config[f->cap_last + 1] = 0xf0;
    assert_int_equal(find(VIRTIO_PCI_MODERN), -1);
    assert_true(fake_log_contains("too short"));
    /* teardown: no config read went past 0xff */
}

static void test_looping_cap_list_terminates(void)
{
    struct fake_pci_func *f = transitional(false, 0);
    unsigned common = add_vcap(f, 1, MEM_BAR, COMMON_AT, COMMON_LEN);
    add_notify_cap(f, MEM_BAR, NOTIFY_AT, NOTIFY_LEN, 4);
    f->config[f->cap_last + 1] = (uint8_t)common; /* notify -> common -> notify -> ... */
    unsigned before = fake_pci_cfg_reads();
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_string_equal(E.t.name, "virtio-pci-legacy"); /* no ISR or device cap anywhere */
    /* Bounded: two reads per visited entry plus the caps it parses, far below a runaway. */
    assert_true(fake_pci_cfg_reads() - before < 8 * PCI_CAP_MAX_STEPS);
}

static void test_cap_walk_masks_and_bounds(void)
{
    struct fake_pci_func *f = add_func(3, VIRTIO_VENDOR, MODERN_ID, 0);
    const struct pci_func pf = {.bus = 0, .dev = 3, .fn = 0};
    /* No capability-list bit: nothing, whatever the pointer says. */
    f->config[PCI_CFG_CAP_PTR] = 0x40;
    f->config[0x40] = 0x05;
    assert_int_equal(pci_find_cap(&pf, 0x05), 0);
    /* Reserved low bits are masked: 0x43 means 0x40. */
    f->config[PCI_CFG_STATUS] |= PCI_STATUS_CAP_LIST;
    f->config[PCI_CFG_CAP_PTR] = 0x43;
    f->config[0x41] = 0x50;
    f->config[0x50] = PCI_CAP_ID_VENDOR;
    f->config[0x51] = 0x20; /* into the standard header: the end */
    f->config[0x20] = 0x11;
    assert_int_equal(pci_find_cap(&pf, 0x05), 0x40);
    assert_int_equal(pci_find_cap(&pf, PCI_CAP_ID_VENDOR), 0x50);
    assert_int_equal(pci_find_cap(&pf, 0x11), 0);
    /* A capability that points at itself: the walk gives up after PCI_CAP_MAX_STEPS. */
    f->config[0x51] = 0x50;
    unsigned before = fake_pci_cfg_reads();
    assert_int_equal(pci_find_cap(&pf, 0x11), 0);
    unsigned reads = fake_pci_cfg_reads() - before;
    assert_true(reads >= PCI_CAP_MAX_STEPS && reads <= 2 * PCI_CAP_MAX_STEPS + 2);
    /* The iterator visits a looping list's entries at most PCI_CAP_MAX_STEPS times in all. */
    struct pci_cap_walk w;
    pci_cap_walk_start(&w, &pf);
    unsigned found = 0;
    while (pci_cap_walk_next(&w, PCI_CAP_ID_VENDOR))
        found++;
    assert_int_equal(found, PCI_CAP_MAX_STEPS - 1); /* 0x40 once, then 0x50 over and over */
}

/* ---- Modern operation ---------------------------------------------------------------------- */

static void test_queue_enable_programs_the_queue(void)
{
    modern_only(true, 4);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(ops()->queue_max_size(&E.t, 1), QUEUE_MAX);
    assert_int_equal(ops()->queue_max_size(&E.t, NQUEUES), 0); /* beyond num_queues */
    assert_int_equal(ops()->queue_enable(&E.t, 1, 64, &HIGH_ADDRS), 0);
    const struct modern_queue *q = &E.m.q[1];
    assert_int_equal(q->size, 64);
    assert_int_equal(q->msix, 0xffff);
    assert_int_equal(q->desc, HIGH_ADDRS.desc);
    assert_int_equal(q->avail, HIGH_ADDRS.avail);
    assert_int_equal(q->used, HIGH_ADDRS.used);
    assert_int_equal(q->enable, 1);
    assert_int_equal(E.m.q[0].enable, 0);
}

/* Enables queues 0 and 2 with notify_off 5 and 7, notifies both; checks where the writes went. */
static void check_notify(uint32_t mult)
{
    modern_only(true, mult);
    E.m.q[0].notify_off = 5;
    E.m.q[2].notify_off = 7;
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(ops()->queue_enable(&E.t, 0, 128, &HIGH_ADDRS), 0);
    assert_int_equal(ops()->queue_enable(&E.t, 2, 128, &HIGH_ADDRS), 0);
    ops()->notify(&E.t, 2);
    ops()->notify(&E.t, 0);
    struct fake_pci_write w;
    const uint64_t area = MEM_BASE + NOTIFY_AT;
    assert_int_equal(writes_in(area, NOTIFY_LEN, 0, &w), 2);
    assert_int_equal(w.addr, area + 7ull * mult);
    assert_int_equal(w.width, 2);
    assert_int_equal(w.value, 2);
    writes_in(area, NOTIFY_LEN, 1, &w);
    assert_int_equal(w.addr, area + 5ull * mult);
    assert_int_equal(w.value, 0);
}

static void test_notify_multiplier_4(void)
{
    check_notify(4);
}

static void test_notify_multiplier_0_shares_one_address(void)
{
    check_notify(0);
}

static void test_notify_offset_outside_area_fails(void)
{
    modern_only(true, 4);
    E.m.q[0].notify_off = NOTIFY_LEN / 4 - 1; /* the last 4 bytes: fits */
    E.m.q[1].notify_off = NOTIFY_LEN / 4;     /* one past */
    E.m.q[2].notify_off = 0xffff;
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(ops()->queue_enable(&E.t, 0, 128, &HIGH_ADDRS), 0);
    assert_int_equal(ops()->queue_enable(&E.t, 1, 128, &HIGH_ADDRS), -1);
    assert_int_equal(ops()->queue_enable(&E.t, 2, 128, &HIGH_ADDRS), -1);
    assert_int_equal(E.m.q[0].enable, 1);
    assert_int_equal(E.m.q[1].enable, 0);
    assert_int_equal(E.m.q[2].enable, 0);
    assert_true(fake_log_contains("outside the 4096-byte notify area"));
    ops()->notify(&E.t, 0);
    struct fake_pci_write w;
    assert_int_equal(writes_in(MEM_BASE + NOTIFY_AT, NOTIFY_LEN, 0, &w), 1);
    assert_int_equal(w.addr, MEM_BASE + NOTIFY_AT + NOTIFY_LEN - 4);
}

static void test_notify_huge_or_odd_multiplier_fails(void)
{
    modern_only(true, 0x80000000u); /* notify_off 2 -> 4 GiB: must not wrap to 0 */
    E.m.q[0].notify_off = 0;
    E.m.q[1].notify_off = 2;
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(ops()->queue_enable(&E.t, 0, 128, &HIGH_ADDRS), 0);
    assert_int_equal(ops()->queue_enable(&E.t, 1, 128, &HIGH_ADDRS), -1);

    assert_bus_used_correctly();
    fake_pci_reset();
    setup(NULL);
    modern_only(true, 3); /* queue 1 would be notified at an odd address */
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(ops()->queue_enable(&E.t, 1, 128, &HIGH_ADDRS), -1);
    assert_int_equal(ops()->queue_enable(&E.t, 2, 128, &HIGH_ADDRS), 0);
}

static void test_modern_features_both_halves(void)
{
    modern_only(true, 4);
    E.m.device_features = 0x0000000580000003ULL;
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(ops()->get_features(&E.t), 0x0000000580000003ULL);
    ops()->set_features(&E.t, 0x0000000100000002ULL);
    assert_int_equal(E.m.driver_features, 0x0000000100000002ULL);
}

static void test_modern_config_access(void)
{
    struct fake_pci_func *f = modern_only(true, 4);
    uint8_t *cfg = fake_pci_bar_mem(f, MEM_BAR) + DEVCFG_AT;
    const uint8_t bytes[DEVCFG_LEN] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    memcpy(cfg, bytes, sizeof(bytes));
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    uint32_t v = 0;
    assert_true(ops()->config_read(&E.t, 8, 4, &v));
    assert_int_equal(v, 0x0c0b0a09);
    assert_true(ops()->config_read(&E.t, 2, 2, &v));
    assert_int_equal(v, 0x0403);
    assert_true(ops()->config_read(&E.t, 11, 1, &v));
    assert_int_equal(v, 12);
    assert_false(ops()->config_read(&E.t, 12, 1, &v));           /* past the end */
    assert_false(ops()->config_read(&E.t, 10, 4, &v));           /* straddles it */
    assert_false(ops()->config_read(&E.t, 2, 4, &v));            /* misaligned */
    assert_false(ops()->config_read(&E.t, 0, 3, &v));            /* no such width */
    assert_false(ops()->config_read(&E.t, 0, 8, &v));            /* nor this */
    assert_false(ops()->config_read(&E.t, UINT_MAX - 3, 4, &v)); /* off + width wraps */
    assert_true(ops()->config_write(&E.t, 4, 4, 0xdeadbeef));
    assert_int_equal(cfg[4], 0xef);
    assert_int_equal(cfg[7], 0xde);
    assert_false(ops()->config_write(&E.t, 12, 4, 1));
    E.m.generation = 9;
    assert_int_equal(ops()->config_generation(&E.t), 9);
    fake_pci_bar_mem(f, MEM_BAR)[ISR_AT] = VIRTIO_ISR_CONFIG;
    assert_int_equal(ops()->read_isr(&E.t), VIRTIO_ISR_CONFIG);
}

static void test_modern_reset_waits_for_the_device(void)
{
    modern_only(true, 4);
    E.m.reset_delay = 3;
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    ops()->set_status(&E.t, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    ops()->set_features(&E.t, 1);
    unsigned before = E.m.status_reads;
    assert_int_equal(ops()->reset(&E.t), 0);
    assert_int_equal(E.m.status_reads - before, 4); /* three still busy, then 0 */
    assert_int_equal(E.m.status, 0);
    assert_int_equal(E.m.driver_features, 0);
}

static void test_modern_reset_times_out(void)
{
    modern_only(true, 4);
    E.m.never_resets = true;
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    ops()->set_status(&E.t, VIRTIO_STATUS_ACKNOWLEDGE);
    uint64_t start = platform_now_ns();
    assert_int_equal(ops()->reset(&E.t), -1);
    /* It polled, and gave up after about its 1 s deadline (50 ms skipped per read). */
    assert_true(E.m.status_reads >= 2);
    assert_true(E.m.status_reads <= 1000000000ull / RESET_STEP_NS + 3);
    assert_true(platform_now_ns() - start >= 1000000000ull);
    assert_int_equal(E.m.status, VIRTIO_STATUS_ACKNOWLEDGE);
}

/* ---- Legacy ---------------------------------------------------------------------------------- */

static void test_legacy_features_are_32_bits(void)
{
    transitional(true, 4);
    E.l.host_features = 0xf0000003u;
    assert_int_equal(find(VIRTIO_PCI_LEGACY), 0);
    assert_int_equal(ops()->get_features(&E.t), 0xf0000003u);
    ops()->set_features(&E.t, 0x0000000700000005ULL);
    assert_int_equal(E.l.guest_features, 5);
    assert_int_equal(ops()->config_generation(&E.t), 0);
}

static void test_legacy_config_at_20(void)
{
    transitional(false, 0);
    for (unsigned i = 0; i < sizeof(E.l.config); i++)
        E.l.config[i] = (uint8_t)(0xa0 + i);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_string_equal(E.t.name, "virtio-pci-legacy");
    assert_int_equal(E.t.config_size, IO_SIZE - 20);
    uint32_t v = 0;
    assert_true(ops()->config_read(&E.t, 0, 4, &v));
    assert_int_equal(v, 0xa3a2a1a0);
    assert_true(ops()->config_read(&E.t, 10, 2, &v));
    assert_int_equal(v, 0xabaa);
    assert_false(ops()->config_read(&E.t, 12, 1, &v));
    assert_false(ops()->config_read(&E.t, 8, 8, &v));
    assert_true(ops()->config_write(&E.t, 4, 4, 0x11223344));
    assert_int_equal(E.l.config[4], 0x44);
    assert_int_equal(E.l.config[7], 0x11);
    /* The config write went to port IO_BASE + 20 + 4, as one 4-byte access. */
    struct fake_pci_write w;
    assert_int_equal(writes_in(IO_BASE + 24, 4, 0, &w), 1);
    assert_true(w.port_io);
    assert_int_equal(w.width, 4);
}

static void test_legacy_queue_pfn(void)
{
    transitional(false, 0);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_true(ops()->queue_needs_legacy_layout(&E.t));
    assert_int_equal(ops()->queue_max_size(&E.t, 1), QUEUE_MAX);
    assert_int_equal(ops()->queue_max_size(&E.t, 5), 0);
    const struct vq_addrs a = {.desc = 0x12345000, .avail = 0x12345800, .used = 0x12346000};
    assert_int_equal(ops()->queue_enable(&E.t, 1, QUEUE_MAX, &a), 0);
    assert_int_equal(E.l.pfn[1], 0x12345);
    /* Only the device's own size works; the area must be page-aligned and below 2^44. */
    assert_int_equal(ops()->queue_enable(&E.t, 0, QUEUE_MAX / 2, &a), -1);
    const struct vq_addrs odd = {.desc = 0x12345800};
    assert_int_equal(ops()->queue_enable(&E.t, 0, QUEUE_MAX, &odd), -1);
    const struct vq_addrs far = {.desc = 1ULL << 44};
    assert_int_equal(ops()->queue_enable(&E.t, 2, QUEUE_MAX, &far), -1);
    assert_int_equal(E.l.pfn[0], 0);
    assert_int_equal(E.l.pfn[2], 0);
}

static void test_legacy_notify_status_isr(void)
{
    transitional(false, 0);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    ops()->notify(&E.t, 2);
    struct fake_pci_write w;
    assert_int_equal(writes_in(IO_BASE + 16, 2, 0, &w), 1);
    assert_true(w.port_io);
    assert_int_equal(w.width, 2);
    assert_int_equal(w.value, 2);
    ops()->set_status(&E.t, VIRTIO_STATUS_ACKNOWLEDGE);
    assert_int_equal(E.l.status, VIRTIO_STATUS_ACKNOWLEDGE);
    assert_int_equal(ops()->reset(&E.t), 0);
    assert_int_equal(E.l.status, 0);
    E.l.isr = VIRTIO_ISR_QUEUE;
    assert_int_equal(ops()->read_isr(&E.t), VIRTIO_ISR_QUEUE);
    assert_int_equal(ops()->read_isr(&E.t), 0);
}

static void test_legacy_bar0_must_be_io_and_big_enough(void)
{
    struct fake_pci_func *f = add_func(3, VIRTIO_VENDOR, TRANSITIONAL_ID, TYPE_BALLOON);
    fake_pci_set_bar(f, 0, FAKE_BAR_MEM32, 0xfebf0000, 0x1000);
    assert_int_equal(find(VIRTIO_PCI_LEGACY), -1);

    fake_pci_reset();
    f = add_func(3, VIRTIO_VENDOR, TRANSITIONAL_ID, TYPE_BALLOON);
    give_legacy_bar(f, 20); /* the header and no config */
    assert_int_equal(find(VIRTIO_PCI_LEGACY), -1);

    fake_pci_reset();
    f = add_func(3, VIRTIO_VENDOR, TRANSITIONAL_ID, TYPE_BALLOON);
    fake_pci_set_bar(f, 0, FAKE_BAR_IO, 0, IO_SIZE); /* unassigned */
    assert_int_equal(find(VIRTIO_PCI_LEGACY), -1);
}

/* ---- Device matching ------------------------------------------------------------------------- */

static void test_device_id_matching(void)
{
    /* Right ids under the wrong vendor, a transitional device of another type, then ours. */
    struct fake_pci_func *other_vendor = add_func(1, 0x8086, MODERN_ID, TYPE_BALLOON);
    give_modern_bar(other_vendor);
    add_modern_caps(other_vendor, 4);
    struct fake_pci_func *net = add_func(2, VIRTIO_VENDOR, 0x1000, 1);
    give_legacy_bar(net, IO_SIZE);
    struct fake_pci_func *ours = add_func(4, VIRTIO_VENDOR, TRANSITIONAL_ID, TYPE_BALLOON);
    fake_pci_set_bar(ours, 0, FAKE_BAR_IO, IO_BASE + 0x40, IO_SIZE);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(E.vp.pci.dev, 4);
    assert_int_equal(E.vp.legacy.base, IO_BASE + 0x40);
    /* Types are matched exactly: there is no type-2 device here... */
    assert_int_equal(virtio_pci_find(2, VIRTIO_PCI_AUTO, &E.vp, &E.t), -1);
    /* ...but the transitional 0x1000 is type 1 by its subsystem device id. */
    assert_int_equal(virtio_pci_find(1, VIRTIO_PCI_AUTO, &E.vp, &E.t), 0);
    assert_int_equal(E.vp.pci.dev, 2);

    fake_pci_reset();
    modern_only(true, 4);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(E.vp.pci.device, MODERN_ID);
    /* The subsystem id of a modern-only device is not its type. */
    assert_int_equal(virtio_pci_find(0x1100 - 0x1040, VIRTIO_PCI_AUTO, &E.vp, &E.t), -1);
}

/* ---- MSI-X and INTx -------------------------------------------------------------------------- */

#define MSIX_BAR     1
#define MSIX_BASE    0xfebf1000ULL
#define MSIX_ENTRIES 3
static const struct virtio_msix_msg MSGS[2] = {{0xfee00000, 0x31}, {0xfee01000, 0x32}};

/* QEMU's layout: the table at BAR1 + 0, the PBA after it; INTx pin A on line 11. */
static unsigned add_msix(struct fake_pci_func *f, uint32_t table_off)
{
    fake_pci_set_bar(f, MSIX_BAR, FAKE_BAR_MEM32, MSIX_BASE, 0x1000);
    uint8_t body[10] = {MSIX_ENTRIES - 1, 0};
    uint32_t table = table_off | MSIX_BAR, pba = 0x800 | MSIX_BAR;
    memcpy(&body[2], &table, 4);
    memcpy(&body[6], &pba, 4);
    fake_pci_cfg_put8(f, PCI_CFG_INT_PIN, 1);
    fake_pci_cfg_put8(f, PCI_CFG_INT_LINE, 11);
    return fake_pci_add_cap(f, 0x11, body, sizeof(body));
}

static uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static bool msix_enabled(const struct fake_pci_func *f, unsigned cap)
{
    return f->config[cap + 3] & 0x80;
}

static void test_intx_line_from_the_header(void)
{
    struct fake_pci_func *f = modern_only(true, 4);
    fake_pci_cfg_put8(f, PCI_CFG_INT_PIN, 1);
    fake_pci_cfg_put8(f, PCI_CFG_INT_LINE, 10);
    fake_pci_cfg_put16(f, PCI_CFG_COMMAND, PCI_CMD_INTX_OFF);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(E.t.irq.kind, VIRTIO_IRQ_GSI);
    assert_int_equal(E.t.irq.gsi, 10);
    assert_true(E.t.irq.isa && E.t.irq.level && E.t.irq.active_low);
    assert_int_equal(f->config[PCI_CFG_COMMAND + 1] & 0x4, 0); /* INTx Disable cleared */
    /* No pin, or a line the firmware left unassigned: no interrupt, the kernel polls. */
    fake_pci_cfg_put8(f, PCI_CFG_INT_LINE, 0xff);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(E.t.irq.kind, VIRTIO_IRQ_NONE);
    fake_pci_cfg_put8(f, PCI_CFG_INT_LINE, 10);
    fake_pci_cfg_put8(f, PCI_CFG_INT_PIN, 0);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(E.t.irq.kind, VIRTIO_IRQ_NONE);
    assert_non_null(ops()->msix_setup); /* the op exists; this device has no capability */
    assert_int_equal(ops()->msix_setup(&E.t, MSGS), -1);
}

static void test_msix_modern_programs_table_and_vectors(void)
{
    struct fake_pci_func *f = modern_only(true, 4);
    unsigned cap = add_msix(f, 0);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(E.t.irq.kind, VIRTIO_IRQ_GSI); /* INTx until the kernel asks */
    assert_int_equal(ops()->msix_setup(&E.t, MSGS), 0);
    assert_int_equal(E.t.irq.kind, VIRTIO_IRQ_MSIX);
    const uint8_t *tab = fake_pci_bar_mem(f, MSIX_BAR);
    for (unsigned i = 0; i < 2; i++) {
        assert_int_equal(rd32(tab + 16 * i), (uint32_t)MSGS[i].addr);
        assert_int_equal(rd32(tab + 16 * i + 4), 0);
        assert_int_equal(rd32(tab + 16 * i + 8), MSGS[i].data);
        assert_int_equal(rd32(tab + 16 * i + 12), 0); /* unmasked */
    }
    assert_true(msix_enabled(f, cap));
    assert_int_equal(f->config[cap + 3] & 0x40, 0);    /* function mask off again */
    assert_true(f->config[PCI_CFG_COMMAND + 1] & 0x4); /* INTx Disable */
    assert_int_equal(E.m.msix_config, VIRTIO_MSIX_CONFIG);
    /* A reset drops the vectors; the transport assigns the config vector again. */
    assert_int_equal(ops()->reset(&E.t), 0);
    assert_int_equal(E.m.msix_config, VIRTIO_MSIX_CONFIG);
    assert_int_equal(ops()->queue_enable(&E.t, 1, QUEUE_MAX, &HIGH_ADDRS), 0);
    assert_int_equal(E.m.q[1].msix, VIRTIO_MSIX_QUEUES);
    assert_int_equal(E.t.irq.kind, VIRTIO_IRQ_MSIX);
}

static void test_msix_config_vector_refused_falls_back_to_intx(void)
{
    struct fake_pci_func *f = modern_only(true, 4);
    unsigned cap = add_msix(f, 0);
    E.m.refuse_config_vector = true;
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(ops()->msix_setup(&E.t, MSGS), -1);
    assert_int_equal(E.t.irq.kind, VIRTIO_IRQ_GSI);
    assert_int_equal(E.t.irq.gsi, 11);
    assert_false(msix_enabled(f, cap));
    assert_int_equal(f->config[PCI_CFG_COMMAND + 1] & 0x4, 0);
}

static void test_msix_queue_vector_refused_falls_back_to_intx(void)
{
    struct fake_pci_func *f = modern_only(true, 4);
    unsigned cap = add_msix(f, 0);
    E.m.refuse_queue_vector = true;
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(ops()->msix_setup(&E.t, MSGS), 0);
    assert_int_equal(ops()->queue_enable(&E.t, 0, QUEUE_MAX, &HIGH_ADDRS), 0);
    assert_int_equal(E.t.irq.kind, VIRTIO_IRQ_GSI);
    assert_false(msix_enabled(f, cap));
    /* Later queues are set up without vectors. */
    assert_int_equal(ops()->queue_enable(&E.t, 1, QUEUE_MAX, &HIGH_ADDRS), 0);
    assert_int_equal(E.m.q[1].msix, VIRTIO_MSI_NO_VECTOR);
}

static void test_msix_table_outside_its_bar_is_ignored(void)
{
    struct fake_pci_func *f = modern_only(true, 4);
    add_msix(f, 0xff8); /* 3 entries from 0xff8 run past the 4 KiB BAR */
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(ops()->msix_setup(&E.t, MSGS), -1);
    assert_int_equal(E.t.irq.kind, VIRTIO_IRQ_GSI);
}

static void test_msix_legacy_config_moves_to_24(void)
{
    struct fake_pci_func *f = transitional(false, 0);
    E.l.msix_cap = add_msix(f, 0);
    E.l.pci_config = f->config;
    for (unsigned i = 0; i < sizeof(E.l.config); i++)
        E.l.config[i] = (uint8_t)(0xa0 + i);
    assert_int_equal(find(VIRTIO_PCI_LEGACY), 0);
    assert_int_equal(E.t.config_size, IO_SIZE - 20);
    assert_int_equal(ops()->msix_setup(&E.t, MSGS), 0);
    assert_int_equal(E.t.config_size, IO_SIZE - 24);
    assert_int_equal(E.l.msix_config, VIRTIO_MSIX_CONFIG);
    uint32_t v = 0;
    assert_true(ops()->config_read(&E.t, 0, 4, &v));
    assert_int_equal(v, 0xa3a2a1a0); /* read at 24 now */
    assert_false(ops()->config_read(&E.t, 8, 4, &v));
    const struct vq_addrs a = {.desc = 0x12345000};
    assert_int_equal(ops()->queue_enable(&E.t, 2, QUEUE_MAX, &a), 0);
    assert_int_equal(E.l.msix_queue[2], VIRTIO_MSIX_QUEUES);
    assert_int_equal(ops()->reset(&E.t), 0);
    assert_int_equal(E.t.irq.kind, VIRTIO_IRQ_MSIX);
    /* Refused (read back NO_VECTOR): MSI-X off, the config back at 20. */
    E.l.refuse_vectors = true;
    assert_int_equal(ops()->reset(&E.t), 0);
    assert_false(msix_enabled(f, E.l.msix_cap));
    assert_int_equal(E.t.irq.kind, VIRTIO_IRQ_GSI);
    assert_int_equal(E.t.config_size, IO_SIZE - 20);
    assert_true(ops()->config_read(&E.t, 0, 4, &v));
    assert_int_equal(v, 0xa3a2a1a0); /* at 20 again */
}

/* ---- Conformance checks (check_registers) --------------------------------------------------- */

/* The index of the first failed check, or -1. */
static int first_failed(const struct virtio_reg_check *c, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        if (!c[i].ok)
            return (int)i;
    return -1;
}

static void test_check_registers_modern(void)
{
    modern_only(true, 4);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(ops()->queue_enable(&E.t, 1, 64, &HIGH_ADDRS), 0);
    struct virtio_reg_check c[VIRTIO_REG_CHECKS_MAX];
    unsigned n = ops()->check_registers(&E.t, c, VIRTIO_REG_CHECKS_MAX);
    assert_int_equal(n, 4);
    assert_int_equal(first_failed(c, n), -1);
    assert_int_equal(E.m.q[1].enable, 0);                       /* the check reset the device */
    assert_int_equal(c[3].v[0], (uint32_t)E.m.device_features); /* window 0, read twice */
    assert_int_equal(c[3].v[1], (uint32_t)E.m.device_features);
}

static void test_check_registers_modern_enable_survives_reset(void)
{
    modern_only(true, 4);
    E.m.reset_keeps_enable = true;
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_int_equal(ops()->queue_enable(&E.t, 2, 64, &HIGH_ADDRS), 0);
    struct virtio_reg_check c[VIRTIO_REG_CHECKS_MAX];
    unsigned n = ops()->check_registers(&E.t, c, VIRTIO_REG_CHECKS_MAX);
    assert_int_equal(first_failed(c, n), 1);
    assert_non_null(strstr(c[1].what, "queue_enable"));
    assert_int_equal(c[1].v[1], 1); /* one queue still enabled */
    assert_int_equal(c[1].v[2], 2); /* queue 2 */
}

static void test_check_registers_modern_bad_queue_size(void)
{
    modern_only(true, 4);
    E.m.size_after_reset = 100;
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    struct virtio_reg_check c[VIRTIO_REG_CHECKS_MAX];
    unsigned n = ops()->check_registers(&E.t, c, VIRTIO_REG_CHECKS_MAX);
    assert_int_equal(first_failed(c, n), 2);
    assert_non_null(strstr(c[2].what, "power of 2"));
    assert_int_equal(c[2].v[1], NQUEUES);
}

static void test_check_registers_legacy(void)
{
    transitional(false, 0);
    assert_int_equal(find(VIRTIO_PCI_AUTO), 0);
    assert_string_equal(E.t.name, "virtio-pci-legacy");
    E.l.pfn[1] = 0x1234; /* a queue a driver set up */
    struct virtio_reg_check c[VIRTIO_REG_CHECKS_MAX];
    unsigned n = ops()->check_registers(&E.t, c, VIRTIO_REG_CHECKS_MAX);
    assert_int_equal(n, 3);
    assert_int_equal(first_failed(c, n), -1);
    E.l.reset_keeps_pfn = true;
    E.l.pfn[1] = 0x1234;
    n = ops()->check_registers(&E.t, c, VIRTIO_REG_CHECKS_MAX);
    assert_int_equal(first_failed(c, n), 1);
    assert_non_null(strstr(c[1].what, "QUEUE_PFN"));
    assert_int_equal(c[1].v[1], 1);
}

int main(void)
{
#define T(fn)                                                                                      \
    {                                                                                              \
        .name = #fn, .test_func = run_case, .setup_func = setup, .teardown_func = teardown,        \
        .initial_state = &(struct test_case){fn},                                                  \
    }
    const struct CMUnitTest tests[] = {
        T(test_modern_discovery_64bit_bar),
        T(test_check_registers_modern),
        T(test_check_registers_modern_enable_survives_reset),
        T(test_check_registers_modern_bad_queue_size),
        T(test_check_registers_legacy),
        T(test_first_cap_of_each_type_wins),
        T(test_unusable_cap_gives_way_to_the_next),
        T(test_missing_isr_cap_falls_back_to_legacy),
        T(test_missing_cap_refuses_modern),
        T(test_modern_choice_without_caps_fails),
        T(test_legacy_choice_on_modern_only_device_fails),
        T(test_legacy_choice_on_transitional_device),
        T(test_cap_past_end_of_bar_refused),
        T(test_cap_offset_overflow_refused),
        T(test_cap_offset_misaligned_refused),
        T(test_cap_bar_index_above_5_refused),
        T(test_cap_in_absent_bar_refused),
        T(test_common_cap_too_short_refused),
        T(test_notify_cap_at_end_of_config_space_refused),
        T(test_looping_cap_list_terminates),
        T(test_cap_walk_masks_and_bounds),
        T(test_queue_enable_programs_the_queue),
        T(test_notify_multiplier_4),
        T(test_notify_multiplier_0_shares_one_address),
        T(test_notify_offset_outside_area_fails),
        T(test_notify_huge_or_odd_multiplier_fails),
        T(test_modern_features_both_halves),
        T(test_modern_config_access),
        T(test_modern_reset_waits_for_the_device),
        T(test_modern_reset_times_out),
        T(test_legacy_features_are_32_bits),
        T(test_legacy_config_at_20),
        T(test_legacy_queue_pfn),
        T(test_legacy_notify_status_isr),
        T(test_intx_line_from_the_header),
        T(test_msix_modern_programs_table_and_vectors),
        T(test_msix_config_vector_refused_falls_back_to_intx),
        T(test_msix_queue_vector_refused_falls_back_to_intx),
        T(test_msix_table_outside_its_bar_is_ignored),
        T(test_msix_legacy_config_moves_to_24),
        T(test_legacy_bar0_must_be_io_and_big_enough),
        T(test_device_id_matching),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
