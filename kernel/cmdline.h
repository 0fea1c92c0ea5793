/*
 * Kernel command-line options: space-separated key=value words. Every option is declared once in
 * the table in cmdline.c (name, type, default, help); an unknown or malformed word is an error
 * that names the word, never silently ignored.
 */
#ifndef KERNEL_CMDLINE_H
#define KERNEL_CMDLINE_H

#include <stdbool.h>
#include <stdint.h>

enum kernel_mode {
    MODE_BALLOON,  /* default: follow the host's balloon target for as long as the host runs us */
    MODE_BOOT,     /* print the boot report and exit: boot benchmarks, smoke tests */
    MODE_SELFTEST, /* allocator checks over all RAM, TAP output, exit */
    MODE_FAULT,    /* take a page fault on purpose: proves the exception path and its exit code */
};

enum virtio_choice { VIRTIO_AUTO, VIRTIO_MODERN, VIRTIO_LEGACY };

struct options {
    enum virtio_choice virtio;   /* blimp.virtio: which face of a transitional device to use */
    uint64_t balloon_pfns;       /* blimp.balloon.pfns: PFNs per inflate/deflate buffer */
    uint64_t balloon_buffers;    /* blimp.balloon.buffers: buffers in flight */
    bool balloon_oom;            /* blimp.balloon.deflate_on_oom: accept DEFLATE_ON_OOM */
    uint64_t balloon_timeout_ms; /* blimp.balloon.timeout_ms: ack deadline before "stalled" */
    enum kernel_mode mode;
    bool poison;             /* blimp.poison: fill free pages with a pattern, check on alloc */
    uint64_t poison_pattern; /* blimp.poison_pattern */
    char virtio_mmio[4][64]; /* virtio_mmio.device=<size>@<base>:<irq>, as Linux spells it */
    unsigned n_virtio_mmio;
};

extern struct options options;

/* Parses into options (defaults first); prints one error line per bad word and returns the number
 * of errors. */
int cmdline_parse(const char *cmdline);
const char *kernel_mode_name(enum kernel_mode m);

#endif
