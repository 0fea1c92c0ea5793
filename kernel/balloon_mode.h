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
    /* Optional: runs once the device is found, before the driver brings it up; it may use the
     * transport directly (it must leave the device reset) and change the driver's config. */
    void (*prepare)(void *ctx, struct virtio_transport *t, struct balloon_config *cfg);
    bool poll_only; /* never sleep on interrupts: the loop reads the ISR every ms */
};

/* The driver and transport balloon mode runs (for a hook that checks the device itself). */
struct balloon *balloon_mode_balloon(void);
struct virtio_transport *balloon_mode_transport(void);

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
    uint64_t late; /* device interrupts whose ISR the loop had already read (routing, looks) */
    /* The bounded look (every LOOK_NS while interrupts are relied on): looks made, and those
     * that found device work no interrupt announced or delivered (each an irq_missed event). */
    uint64_t looks, missed;
    /* The ISR the loop read right after routing or unmasking the line: what the device raised
     * while it could not interrupt us (QEMU's IOAPIC drops a level raised on a masked pin). */
    uint64_t raised_while_masked;
    uint64_t agent_irqs; /* COM2 receive interrupts */
    uint64_t timer_irqs, lapic_spurious;
    uint64_t sleeps; /* times the loop halted */
    /* Polling: ISR reads with the configuration-change bit set, and such reads that directly
     * followed another one with it set (reading the ISR must clear it: spec 4.1.4.5.1). */
    uint64_t isr_config, isr_config_repeat;
    uint64_t uptime_ns; /* when these were taken */
    struct virtio_exit_counts exits;
};
void balloon_mode_wait_stats(struct wait_stats *out);
/* Send n interrupts on the device's vector that the device did not raise (the agent's
 * `spurious` command): each must be counted as spurious and change nothing else. Returns how
 * many were sent (0 when the device has no vector). */
unsigned balloon_mode_inject_spurious(unsigned n);
/* Lose the device's interrupts on purpose (the agent's `lose-irq`): its IOAPIC input is masked
 * behind the loop's back, as a host or interrupt controller that drops them would. The bounded
 * look must find the work, count it as missed and route the line again. False when the device
 * has no IOAPIC line (polling, MSI-X). */
bool balloon_mode_lose_irq(void);
/* Emit the balloon_latency event (docs/serial-output.md): the per-buffer latency histograms of
 * inflate, deflate and report buffers since boot. For any mode running on balloon mode's loop
 * to call at its end (stress mode does, just before stress_done); a mode with its own
 * struct balloon calls balloon_emit_latency(&its_balloon) (virtio/balloon.h) instead. */
void balloon_mode_emit_latency(void);

/* Reset the balloon device and re-inflate what the driver holds (the agent's `reset-device`;
 * balloon_reset_device). 0, or -1 when the driver is not running. */
int balloon_mode_reset_device(void);

#endif
