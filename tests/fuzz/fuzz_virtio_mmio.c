/*
 * libFuzzer target: the virtio-mmio transport (virtio/virtio_mmio.c), versions 1 and 2, and the
 * parser of virtio_mmio.device= entries, against the register-level fake of tests/unit/fake_mmio.c
 * whose every register the input rewrites between the driver's steps: magic, version, device id,
 * features, status, interrupt status, generation, queue sizes, config bytes, reset behaviour.
 *
 * What must hold: no crash or sanitizer report; the transport never accesses the bus outside its
 * window, misaligned or with the wrong width (the fake records every such misuse); a parsed
 * entry always describes a window the rest of the kernel can trust (aligned, large enough, below
 * the address limit, no wrap).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/fuzz/fuzz_input.h"
#include "tests/unit/fake_device.h"
#include "tests/unit/fake_mmio.h"
#include "tests/unit/fake_platform.h"
#include "virtio/virtio_mmio.h"

#define BASE      0xfeb00000ull
#define RAM_BASE  0x100000ull
#define RAM_BYTES (256 * 1024ull)

static void check(bool ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_virtio_mmio: invariant broken: %s (%s)\n", what,
                fake_mmio_first_bus_error());
        abort();
    }
}

static void parse_entry(struct fz *f)
{
    char s[48];
    unsigned n = fz_below(f, sizeof(s));
    for (unsigned i = 0; i < n; i++) {
        /* Mostly the characters the syntax uses, so the parser's paths are reached. */
        static const char alphabet[] = "0123456789abcdefxX@:KMGkmg -";
        uint8_t c = fz_u8(f);
        s[i] = (c & 0x80) ? (char)(c & 0x7f) : alphabet[c % (sizeof(alphabet) - 1)];
    }
    s[n] = 0;
    struct virtio_mmio_device d;
    const char *why = NULL;
    if (virtio_mmio_parse_device(s, &d, &why)) {
        check(d.base % 4 == 0, "parsed an unaligned base");
        check(d.size >= VIRTIO_MMIO_MIN_SIZE && d.size <= VIRTIO_MMIO_MAX_SIZE,
              "parsed a size out of bounds");
        check(d.base + d.size > d.base && d.base + d.size <= VIRTIO_MMIO_ADDR_LIMIT,
              "parsed a window past the address limit");
    } else {
        check(why != NULL && why[0] != 0, "refused an entry without saying why");
    }
}

/* The device changes its mind about something. */
static void mutate(struct fz *f, struct fake_mmio *m)
{
    switch (fz_below(f, 10)) {
    case 0:
        m->magic = fz_bool(f) ? 0x74726976 : fz_u32(f);
        break;
    case 1:
        m->version = fz_below(f, 4);
        break;
    case 2:
        m->device_id = fz_bool(f) ? 5 : fz_u32(f);
        break;
    case 3:
        m->device_features = fz_u64(f);
        break;
    case 4:
        m->status = fz_u8(f);
        break;
    case 5:
        m->isr = fz_u32(f);
        break;
    case 6:
        m->generation = fz_u32(f);
        break;
    case 7:
        m->q[fz_below(f, FAKE_MMIO_MAX_QUEUES)].max = fz_len(f, 128);
        break;
    case 8:
        m->config[fz_below(f, FAKE_MMIO_CONFIG_MAX)] = fz_u8(f);
        break;
    default:
        m->never_resets = fz_bool(f);
        m->reset_delay = fz_below(f, 4);
        break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz f = {data, size};
    static bool ready;
    if (!ready) {
        fake_log_echo(false);
        fake_mem_init(RAM_BASE, RAM_BYTES);
        ready = true;
    }
    fake_log_reset();
    fake_clock_virtual(1000 * 1000); /* 1 ms a reading: deadlines pass in steps, not waits */
    fake_mem_rewind();
    fake_mmio_clear();

    parse_entry(&f);

    /* (The model has 0x100 bytes of config: windows up to 0x200.) */
    uint64_t win =
        fz_bool(&f) ? 0x200 : VIRTIO_MMIO_MIN_SIZE + fz_below(&f, 0x200 - VIRTIO_MMIO_MIN_SIZE + 1);
    win &= ~3ull;
    struct fake_mmio *m = fake_mmio_add(BASE, win, 1 + fz_below(&f, 2), 5);
    m->device_features = fz_u64(&f);
    for (unsigned q = fz_below(&f, FAKE_MMIO_MAX_QUEUES + 1); q; q--)
        fake_mmio_add_queue(m, q - 1, fz_len(&f, 128));
    for (unsigned k = fz_below(&f, 3); k; k--)
        mutate(&f, m);

    struct virtio_mmio_device dev = {.base = BASE, .size = win, .id = -1};
    struct virtio_mmio vm;
    struct virtio_transport t;
    enum virtio_mmio_versions versions = (enum virtio_mmio_versions)fz_below(&f, 3);
    if (virtio_mmio_bind(&dev, 5, versions, &vm, &t) == VIRTIO_MMIO_BOUND) {
        uint64_t ring = fake_mem_alloc_phys(3 * 4096, 4096);
        for (unsigned step = 0; step < 256 && fz_more(&f); step++) {
            switch (fz_below(&f, 12)) {
            case 0:
                t.ops->reset(&t);
                break;
            case 1:
                t.ops->set_status(&t, fz_u8(&f));
                t.ops->get_status(&t);
                break;
            case 2:
                t.ops->get_features(&t);
                t.ops->set_features(&t, fz_u64(&f));
                break;
            case 3: {
                uint32_t v;
                t.ops->config_read(&t, fz_u16(&f), 1u << fz_below(&f, 3), &v);
                break;
            }
            case 4:
                t.ops->config_write(&t, fz_u16(&f), 1u << fz_below(&f, 3), fz_u32(&f));
                break;
            case 5:
                t.ops->config_generation(&t);
                break;
            case 6: {
                unsigned q = fz_below(&f, 16);
                t.ops->queue_max_size(&t, q); /* untrusted: the caller validates it */
                bool legacy_layout = t.ops->queue_needs_legacy_layout(&t);
                uint16_t qs = (uint16_t)(1u << fz_below(&f, 5));
                /* Addresses a ring really has: the caller's to get right (the model attaches
                 * its ring view wherever the device is told). */
                struct vq_addrs a = {ring, ring + 16ull * qs,
                                     legacy_layout ? ring + 4096 : ring + 8192};
                t.ops->queue_enable(&t, q, qs, &a);
                break;
            }
            case 7:
                t.ops->notify(&t, fz_below(&f, 16));
                break;
            case 8:
            case 9:
                mutate(&f, m);
                break;
            default:
                t.ops->read_isr(&t);
            }
            check(fake_mmio_bus_errors() == 0, "the transport misused the bus");
        }
    }
    check(fake_mmio_bus_errors() == 0, "the transport misused the bus");
    return 0;
}
