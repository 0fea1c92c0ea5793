/*
 * External interrupts: the 8259 PICs masked, the local APIC (xAPIC, MMIO) enabled, every IOAPIC
 * the MADT lists (0xfec00000 with GSI base 0 when there is no ACPI) with all inputs masked
 * until a driver routes one, and a one-shot LAPIC timer calibrated against the TSC. Handlers
 * run with interrupts off, from irq_dispatch (called by trap_handler for vectors 32-255); the
 * dispatcher sends the EOI after the handler returned. docs/design.md, "Interrupts".
 */
#ifndef ARCH_X86_IRQ_H
#define ARCH_X86_IRQ_H

#include <stdbool.h>
#include <stdint.h>

#define IRQ_VECTOR_TIMER    0xf0
#define IRQ_VECTOR_SPURIOUS 0xff /* the LAPIC's spurious vector: no EOI */

typedef void (*irq_fn)(void *ctx);

struct irq_stats {
    uint64_t lapic_spurious; /* deliveries of IRQ_VECTOR_SPURIOUS */
    uint64_t timer;          /* LAPIC timer interrupts */
    uint64_t unhandled;      /* vectors nobody registered */
    uint64_t timer_khz;      /* LAPIC timer ticks per ms (after the divider) */
    unsigned n_ioapics;
    bool madt; /* the IOAPICs came from ACPI (else the 0xfec00000 fallback) */
};

/* Brings it all up; false (logged) when there is no usable local APIC or IOAPIC. */
bool irq_init(uint64_t rsdp_phys);
bool irq_ready(void);

/* A free vector (0x30..0xef) that calls fn(ctx); -1 when none is left. */
int irq_alloc_vector(irq_fn fn, void *ctx);

/* The GSI and trigger an ISA IRQ (a PCI interrupt line, a legacy device's IRQ) arrives on: the
 * MADT's interrupt source override for it, else the same number with the caller's defaults. */
void irq_isa_to_gsi(unsigned isa_irq, unsigned *gsi, bool *level, bool *active_low);
/* Whether an IOAPIC serves this GSI. */
bool irq_has_gsi(unsigned gsi);
/* Program the IOAPIC input for gsi to deliver vector to this CPU, unmasked. 0, or -1 when no
 * IOAPIC serves that GSI. */
int irq_route_gsi(unsigned gsi, bool level, bool active_low, unsigned vector);
/* Mask the input, keeping its vector, trigger and polarity: a level-triggered input then still
 * records a line that goes up while masked and delivers it when unmasked (an edge-mode masked
 * input, the reset state, drops it). */
void irq_mask_gsi(unsigned gsi);

/* MSI/MSI-X message for vector on this CPU (fixed delivery, edge). */
void irq_msi_message(unsigned vector, uint64_t *addr, uint32_t *data);

/* Arms the one-shot timer to fire at platform_now_ns() == deadline_ns (as late as the 32-bit
 * count allows for far deadlines; the caller re-arms); UINT64_MAX disarms it. */
void irq_timer_arm(uint64_t deadline_ns);

/* Sends vector to this CPU through the LAPIC (tests: an interrupt no device raised). */
void irq_self_ipi(unsigned vector);

void irq_get_stats(struct irq_stats *out);

/* trap_handler's entry for vectors 32-255. */
void irq_dispatch(unsigned vector);

#endif
