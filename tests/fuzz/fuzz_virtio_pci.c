/*
 * libFuzzer target: virtio-pci discovery and both faces of the transport (virtio/virtio_pci.c
 * and lib/pci.c's capability walk) against a PCI function the input invents: its configuration
 * space, capability list (vendor capabilities pointing at any BAR, offset and length; lists that
 * loop), BAR sizes, and every value a register read returns.
 *
 * What must hold: no crash or sanitizer report, and the transport never touches anything outside
 * a region, a BAR or the configuration space, nor makes a misaligned access (the fake PCI bus
 * records every such misuse), and device-supplied config offsets are checked before use.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "include/bus.h"
#include "tests/fuzz/fuzz_input.h"
#include "tests/unit/fake_pci.h"
#include "tests/unit/fake_platform.h"
#include "virtio/virtio_pci.h"

#define MEM_BAR  4
#define MEM_BASE 0x8000000000ull
#define IO_BASE  0xc040

static struct fz in;

static void check(bool ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_virtio_pci: invariant broken: %s (%s)\n", what,
                fake_pci_first_error());
        abort();
    }
}

/* Every register read is the device's (the input's) to answer. Time moves on with each read, so
 * a wait for a status that never comes runs into its deadline at once. */
static uint32_t hostile_read(void *arg, uint64_t off, unsigned width)
{
    (void)arg;
    (void)off;
    fake_clock_skip(20ull * 1000 * 1000);
    uint32_t v = fz_u32(&in);
    return width == 4 ? v : width == 2 ? (uint16_t)v : (uint8_t)v;
}

static void ignore_write(void *arg, uint64_t off, unsigned width, uint32_t val)
{
    (void)arg;
    (void)off;
    (void)width;
    (void)val;
}

static void add_cap(struct fake_pci_func *f)
{
    uint8_t body[18] = {0};
    body[0] = (uint8_t)(fz_bool(&in) ? 16 + 4 * fz_bool(&in) : fz_u8(&in)); /* cap_len */
    body[1] = (uint8_t)(fz_bool(&in) ? 1 + fz_below(&in, 5) : fz_u8(&in));  /* cfg_type */
    body[2] = (uint8_t)(fz_bool(&in) ? MEM_BAR : fz_below(&in, 8));         /* bar */
    uint32_t off = fz_bool(&in) ? fz_below(&in, 4) * 0x1000 : fz_u32(&in);
    uint32_t len = fz_len(&in, 0x1000);
    uint32_t mult = fz_len(&in, 4);
    memcpy(&body[6], &off, 4);
    memcpy(&body[10], &len, 4);
    memcpy(&body[14], &mult, 4);
    if (fake_pci_add_cap(f, PCI_CAP_ID_VENDOR, body, body[1] == 2 ? 18 : 14) == 0)
        return;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool ready;
    if (!ready) {
        fake_log_echo(false);
        ready = true;
    }
    fake_log_reset();
    fake_clock_virtual(1000 * 1000); /* 1 ms a reading: deadlines pass in steps, not waits */
    in = (struct fz){data, size};
    fake_pci_reset();

    uint8_t kind = fz_u8(&in);
    uint16_t device = (kind & 3) == 0 ? 0x1045 : (kind & 3) == 1 ? 0x1002 : fz_u16(&in);
    struct fake_pci_func *f = fake_pci_add(0, 3, 0, 0x1af4, device);
    fake_pci_set_subsys(f, 0x1af4, (kind & 4) ? 5 : fz_u16(&in));
    fake_pci_cfg_put8(f, 0x08, fz_u8(&in)); /* revision */
    if (kind & 8) {
        uint64_t sz = 0x1000ull << fz_below(&in, 3);
        fake_pci_set_bar(f, MEM_BAR, FAKE_BAR_MEM64, MEM_BASE, sz);
        fake_pci_add_window(f, MEM_BAR, 0, sz, hostile_read, ignore_write, NULL);
    }
    if (kind & 16) {
        uint64_t sz = 0x20ull << fz_below(&in, 3);
        fake_pci_set_bar(f, 0, FAKE_BAR_IO, IO_BASE, sz);
        fake_pci_add_window(f, 0, 0, sz, hostile_read, ignore_write, NULL);
    }
    for (unsigned n = fz_below(&in, 8); n; n--)
        add_cap(f);
    for (unsigned n = fz_below(&in, 4); n; n--) /* break the list: loops, odd pointers */
        fake_pci_cfg_put8(f, PCI_CAP_FIRST + fz_below(&in, PCI_CFG_SIZE - PCI_CAP_FIRST),
                          fz_u8(&in));
    if (kind & 32)
        fake_pci_cfg_put8(f, PCI_CFG_CAP_PTR, fz_u8(&in));

    struct virtio_pci vp;
    struct virtio_transport t;
    enum virtio_pci_choice choice = (enum virtio_pci_choice)fz_below(&in, 3);
    if (virtio_pci_find(5, choice, &vp, &t) == 0) {
        check(fake_pci_errors() == 0, "discovery misused the bus");
        for (unsigned step = 0; step < 256 && fz_more(&in); step++) {
            switch (fz_below(&in, 10)) {
            case 0:
                t.ops->reset(&t);
                break;
            case 1:
                t.ops->set_status(&t, fz_u8(&in));
                t.ops->get_status(&t);
                break;
            case 2:
                t.ops->get_features(&t);
                t.ops->set_features(&t, fz_u64(&in));
                break;
            case 3: {
                unsigned width = 1u << fz_below(&in, 3);
                uint32_t v;
                bool ok = t.ops->config_read(&t, fz_u16(&in), width, &v);
                (void)ok;
                break;
            }
            case 4: {
                unsigned width = 1u << fz_below(&in, 3);
                t.ops->config_write(&t, fz_u16(&in), width, fz_u32(&in));
                break;
            }
            case 5:
                t.ops->config_generation(&t);
                break;
            case 6: {
                unsigned q = fz_below(&in, 16);
                t.ops->queue_max_size(&t, q); /* untrusted: the caller validates it */
                t.ops->queue_needs_legacy_layout(&t);
                struct vq_addrs a = {fz_u64(&in), fz_u64(&in), fz_u64(&in)};
                t.ops->queue_enable(&t, q, (uint16_t)(1u << fz_below(&in, 16)), &a);
                break;
            }
            case 7:
                t.ops->notify(&t, fz_below(&in, 16));
                break;
            default:
                t.ops->read_isr(&t);
            }
            check(fake_pci_errors() == 0, "the transport misused the bus");
        }
    }
    check(fake_pci_errors() == 0, "discovery misused the bus");
    return 0;
}
