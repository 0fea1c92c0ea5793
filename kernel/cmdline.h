/*
 * Kernel command-line options: space-separated key=value words. Every option is declared once,
 * in the table in cmdline.c, with its parser type, its default and its help text; the parsed
 * values land in one struct options that kmain owns and hands to whoever needs a part of it
 * (the balloon driver gets its struct balloon_config as it is). An unknown or malformed word is
 * an error that names the word, never silently ignored.
 */
#ifndef KERNEL_CMDLINE_H
#define KERNEL_CMDLINE_H

#include <stdbool.h>
#include <stdint.h>

#include "virtio/balloon.h"
#include "virtio/virtio_mmio.h"

enum kernel_mode {
    MODE_BALLOON,  /* default: follow the host's balloon target for as long as the host runs us */
    MODE_BOOT,     /* print the boot report and exit: boot benchmarks, smoke tests */
    MODE_SELFTEST, /* allocator checks over all RAM, TAP output, exit */
    MODE_FAULT,    /* take a page fault on purpose: proves the exception path and its exit code */
    MODE_STRESS,  /* balloon mode plus a seeded storm on the guest's own memory (kernel/stress.c) */
    MODE_CONFORM, /* check the host's device against the spec's requirements (kernel/conform.c) */
};

/* Damage done on purpose so a test can prove that a detector fires (blimp.inject). */
enum fault_inject {
    INJECT_NONE,
    INJECT_STAMP,  /* selftest: overwrite one page's stamp after stamping, before the check */
    INJECT_POISON, /* selftest with blimp.poison=1: overwrite one word of a poisoned free page */
    INJECT_STRESS_CORRUPT, /* stress: overwrite one word of one held page halfway through */
    INJECT_STRESS_LEAK,    /* stress: keep 4 pages out of the allocator at the end */
};

/* blimp.virtio: which interface of which transport. modern and legacy pick the face of a
 * transitional virtio-pci device and the virtio-mmio version (2 or 1); mmio skips PCI. */
enum virtio_choice { VIRTIO_AUTO, VIRTIO_MODERN, VIRTIO_LEGACY, VIRTIO_MMIO_ONLY };

/* How balloon mode waits for the device (blimp.irq). */
enum irq_choice {
    IRQ_AUTO, /* interrupts when the transport has a usable line, else polling */
    IRQ_POLL, /* poll the device every millisecond and never sleep */
};

/* blimp.seed and blimp.stress.* (stress mode; README "Stress mode"). */
struct stress_options {
    uint64_t seed;
    uint64_t ops;          /* operations to run, 0: no bound */
    uint64_t time_ns;      /* time to run, 0: no bound */
    uint32_t slots;        /* blocks held at most */
    uint32_t max_order;    /* largest block, as a buddy order */
    uint32_t verify_every; /* ops between verifies of everything held, 0: only at the end */
    uint32_t progress;     /* ops between progress lines (and at least one a second), 0: seconds */
    uint64_t settle_ns;    /* at the end, wait this long at most for the balloon to be at rest */
    bool end_empty;        /* at rest also means the host asked for an empty balloon and got it */
};

/* blimp.conform.* (conformance mode; docs/conformance.md). */
struct conform_options {
    bool host;           /* a host runner answers conform_request events */
    uint64_t timeout_ns; /* for one request to be answered and acted on */
};

#define MAX_VIRTIO_MMIO 16 /* Firecracker passes one entry per device */

struct options {
    enum kernel_mode mode;
    bool poison;             /* fill free pages with a pattern, check it on allocation */
    uint64_t poison_pattern; /* the 64-bit pattern */
    enum fault_inject inject;
    enum virtio_choice virtio;
    enum irq_choice irq;
    uint64_t irq_look_ns;          /* the bounded look's interval; 0 (tests only): never look */
    struct balloon_config balloon; /* the driver's own settings, filled by blimp.balloon.* */
    struct stress_options stress;
    struct conform_options conform;
    /* virtio_mmio.device=<size>@<base>:<irq>[:<id>], in command-line order, no two overlapping */
    struct virtio_mmio_device virtio_mmio[MAX_VIRTIO_MMIO];
    unsigned n_virtio_mmio;
};

/* Fill opts with the defaults, then parse cmdline into it; prints one error line (and event)
 * per bad word, then the known options. Returns the number of bad words. */
int cmdline_parse(const char *cmdline, struct options *opts);
const char *kernel_mode_name(enum kernel_mode m);

#endif
