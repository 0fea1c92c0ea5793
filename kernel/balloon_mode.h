#ifndef KERNEL_BALLOON_MODE_H
#define KERNEL_BALLOON_MODE_H

#include "kernel/cmdline.h"

/*
 * Work another mode does inside balloon mode's loop (stress mode's operations). `step` runs
 * after every balloon_poll, with interrupts off, given the driver's status; it does a bounded
 * amount of work (the device is served only between steps) and returns when it wants to run
 * again: a platform_now_ns time (now or earlier: at once, without sleeping) or UINT64_MAX (only
 * after the next device or agent event). It may end the run with machine_exit.
 */
struct balloon_mode_hook {
    uint64_t (*step)(void *ctx, const struct balloon_status *st);
    void *ctx;
};

/* The default mode: find the balloon, bring it up, follow the host's target forever
 * (rsdp_phys: the loader's ACPI RSDP, 0 when none; the interrupt code needs the MADT), running
 * hook's step between device events (NULL: none). */
__attribute__((noreturn)) void balloon_mode_run(const struct options *opts, uint64_t rsdp_phys,
                                                const struct balloon_mode_hook *hook);

/* How the loop waits and what it cost, for the agent's `state` (docs/agent.md). */
struct wait_stats {
    const char *mode; /* "intx", "msix" or "poll" */
    unsigned gsi;     /* intx: the IOAPIC input */
    bool level, active_low;
    uint64_t device_irqs; /* device interrupts with ISR bits set */
    uint64_t spurious;    /* device-vector interrupts that found the ISR 0 (shared/stray) */
    uint64_t agent_irqs;  /* COM2 receive interrupts */
    uint64_t timer_irqs, lapic_spurious;
    uint64_t sleeps;    /* times the loop halted */
    uint64_t uptime_ns; /* when these were taken */
    struct virtio_exit_counts exits;
};
void balloon_mode_wait_stats(struct wait_stats *out);
/* Send n interrupts on the device's vector that the device did not raise (the agent's
 * `spurious` command): each must be counted as spurious and change nothing else. Returns how
 * many were sent (0 when the device has no vector). */
unsigned balloon_mode_inject_spurious(unsigned n);
/* Reset the balloon device and re-inflate what the driver holds (the agent's `reset-device`;
 * balloon_reset_device). 0, or -1 when the driver is not running. */
int balloon_mode_reset_device(void);

#endif
