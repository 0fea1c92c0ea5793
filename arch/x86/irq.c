/*
 * Local APIC, IOAPICs, the masked 8259s and the LAPIC timer (arch/x86/irq.h). One CPU, xAPIC
 * mode, physical destination = our own APIC id. Registers are reached as bus regions mapped
 * uncached (bus_map_mmio).
 */
#include "arch/x86/irq.h"
#include "arch/x86/acpi.h"
#include "arch/x86/io.h"
#include "arch/x86/tsc.h"
#include "include/bus.h"
#include "include/platform.h"

#define MSR_APIC_BASE     0x1b
#define APIC_BASE_ENABLE  (1ull << 11)
#define APIC_BASE_X2APIC  (1ull << 10)
#define APIC_BASE_ADDR    0x000ffffffffff000ull
#define IOAPIC_DEFAULT    0xfec00000u
#define IOAPIC_MAX_INPUTS 240

/* Local APIC register offsets (SDM vol. 3, 11.4.1). */
enum {
    LAPIC_ID = 0x20,
    LAPIC_TPR = 0x80,
    LAPIC_EOI = 0xb0,
    LAPIC_SVR = 0xf0,
    LAPIC_ESR = 0x280,
    LAPIC_ICR_LO = 0x300,
    LAPIC_ICR_HI = 0x310,
    LAPIC_LVT_TIMER = 0x320,
    LAPIC_LVT_LINT0 = 0x350,
    LAPIC_LVT_LINT1 = 0x360,
    LAPIC_LVT_ERROR = 0x370,
    LAPIC_TIMER_INIT = 0x380,
    LAPIC_TIMER_CUR = 0x390,
    LAPIC_TIMER_DIV = 0x3e0,
};
#define LVT_MASKED      (1u << 16)
#define SVR_ENABLE      (1u << 8)
#define ICR_SELF        (1u << 18) /* destination shorthand 01: self */
#define TIMER_DIV_16    0x3
#define CALIBRATE_NS    (10ull * 1000 * 1000)
#define TIMER_MAX_DELTA (10ull * 1000 * 1000 * 1000) /* re-armed by the caller beyond this */

/* IOAPIC: an index register and a data window (82093AA datasheet). */
enum { IOREGSEL = 0x00, IOWIN = 0x10, IOAPIC_VER = 0x01, IOAPIC_REDTBL = 0x10 };
#define RTE_LEVEL      (1u << 15)
#define RTE_ACTIVE_LOW (1u << 13)
#define RTE_MASKED     (1u << 16)

#define VECTOR_FIRST 0x30 /* 0x20-0x2f: where the masked 8259s point */
#define VECTOR_LAST  0xef

struct ioapic {
    struct bus_region regs;
    uint32_t gsi_base;
    unsigned inputs;
    uint8_t id;
};

static struct bus_region lapic;
static uint32_t lapic_id;
static struct ioapic ioapics[MADT_MAX_IOAPICS];
static unsigned n_ioapics;
static struct madt_info madt;
static bool ready;
static struct irq_stats stats;
static struct {
    irq_fn fn;
    void *ctx;
} handlers[256];
static unsigned next_vector = VECTOR_FIRST;

static uint32_t lapic_read(unsigned reg)
{
    return bus_read32(&lapic, reg);
}

static void lapic_write(unsigned reg, uint32_t v)
{
    bus_write32(&lapic, reg, v);
}

static uint32_t ioapic_read(const struct ioapic *io, unsigned reg)
{
    bus_write32(&io->regs, IOREGSEL, reg);
    return bus_read32(&io->regs, IOWIN);
}

static void ioapic_write(const struct ioapic *io, unsigned reg, uint32_t v)
{
    bus_write32(&io->regs, IOREGSEL, reg);
    bus_write32(&io->regs, IOWIN, v);
}

/* Remap the 8259s away from the exception vectors (0x20/0x28), then mask every input: all
 * external interrupts come through the IOAPICs. Harmless where there is no PIC. */
static void pic_disable(void)
{
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, 0x20);
    outb(0xa1, 0x28);
    outb(0x21, 0x04);
    outb(0xa1, 0x02);
    outb(0x21, 0x01);
    outb(0xa1, 0x01);
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

static bool add_ioapic(uint64_t phys, uint32_t gsi_base, uint8_t id)
{
    struct ioapic *io = &ioapics[n_ioapics];
    if (n_ioapics >= MADT_MAX_IOAPICS || bus_map_mmio(phys, 0x20, &io->regs) != 0)
        return false;
    uint32_t ver = ioapic_read(io, IOAPIC_VER);
    if (ver == 0xffffffffu) {
        platform_log("irq: no IOAPIC answers at 0x%lx", (unsigned long)phys);
        return false;
    }
    io->inputs = ((ver >> 16) & 0xff) + 1;
    if (io->inputs > IOAPIC_MAX_INPUTS)
        io->inputs = IOAPIC_MAX_INPUTS;
    io->gsi_base = gsi_base;
    io->id = id;
    for (unsigned i = 0; i < io->inputs; i++) {
        ioapic_write(io, IOAPIC_REDTBL + 2 * i, RTE_MASKED);
        ioapic_write(io, IOAPIC_REDTBL + 2 * i + 1, 0);
    }
    platform_log("irq: IOAPIC id %u at 0x%lx: GSI %u-%u", id, (unsigned long)phys, gsi_base,
                 gsi_base + io->inputs - 1);
    n_ioapics++;
    return true;
}

/* Timer ticks per millisecond at divide-by-16, measured against the TSC. */
static uint64_t timer_calibrate(void)
{
    lapic_write(LAPIC_TIMER_DIV, TIMER_DIV_16);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | IRQ_VECTOR_TIMER);
    uint64_t start = platform_now_ns();
    lapic_write(LAPIC_TIMER_INIT, 0xffffffffu);
    while (platform_now_ns() - start < CALIBRATE_NS)
        cpu_pause();
    uint32_t cur = lapic_read(LAPIC_TIMER_CUR);
    uint64_t elapsed = platform_now_ns() - start;
    lapic_write(LAPIC_TIMER_INIT, 0);
    uint64_t ticks = 0xffffffffu - cur;
    return elapsed ? ticks * 1000000 / elapsed : 0;
}

bool irq_init(uint64_t rsdp_phys)
{
    uint32_t a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    if (!(d & (1u << 9))) {
        platform_log("irq: the CPU has no local APIC");
        return false;
    }
    uint64_t base = rdmsr(MSR_APIC_BASE);
    if (base & APIC_BASE_X2APIC) {
        platform_log("irq: the local APIC is in x2APIC mode (not supported)");
        return false;
    }
    if (!(base & APIC_BASE_ENABLE))
        wrmsr(MSR_APIC_BASE, base | APIC_BASE_ENABLE);
    bool acpi = acpi_read_madt(rsdp_phys, &madt);
    uint64_t lapic_phys = base & APIC_BASE_ADDR;
    if (bus_map_mmio(lapic_phys, 0x1000, &lapic) != 0)
        return false;
    pic_disable();
    lapic_id = lapic_read(LAPIC_ID) >> 24;
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED); /* the PICs' ExtINT path */
    lapic_write(LAPIC_LVT_ERROR, LVT_MASKED);
    lapic_write(LAPIC_ESR, 0);
    lapic_write(LAPIC_SVR, SVR_ENABLE | IRQ_VECTOR_SPURIOUS);
    lapic_write(LAPIC_EOI, 0);

    if (acpi)
        for (unsigned i = 0; i < madt.n_ioapics; i++)
            add_ioapic(madt.ioapics[i].phys, madt.ioapics[i].gsi_base, madt.ioapics[i].id);
    if (n_ioapics == 0) {
        platform_log("irq: %s: trying the IOAPIC at 0x%x",
                     acpi ? "the MADT lists no usable IOAPIC" : "no ACPI MADT", IOAPIC_DEFAULT);
        add_ioapic(IOAPIC_DEFAULT, 0, 0);
    }
    if (n_ioapics == 0)
        return false;
    stats.timer_khz = timer_calibrate();
    if (stats.timer_khz == 0) {
        platform_log("irq: the LAPIC timer does not count");
        return false;
    }
    stats.n_ioapics = n_ioapics;
    stats.madt = acpi;
    platform_log("irq: local APIC id %u at 0x%lx, %u IOAPIC(s) (%s), %u overrides, timer %lu "
                 "kHz",
                 lapic_id, (unsigned long)lapic_phys, n_ioapics, acpi ? "ACPI MADT" : "fallback",
                 madt.n_overrides, (unsigned long)stats.timer_khz);
    ready = true;
    return true;
}

bool irq_ready(void)
{
    return ready;
}

int irq_alloc_vector(irq_fn fn, void *ctx)
{
    if (next_vector > VECTOR_LAST)
        return -1;
    unsigned v = next_vector++;
    handlers[v].fn = fn;
    handlers[v].ctx = ctx;
    return (int)v;
}

void irq_isa_to_gsi(unsigned isa_irq, unsigned *gsi, bool *level, bool *active_low)
{
    *gsi = isa_irq;
    for (unsigned i = 0; i < madt.n_overrides; i++) {
        const struct madt_override *o = &madt.overrides[i];
        if (o->source != isa_irq)
            continue;
        *gsi = o->gsi;
        if ((o->flags & MADT_TRIGGER_MASK) == MADT_TRIGGER_LEVEL)
            *level = true;
        else if ((o->flags & MADT_TRIGGER_MASK) == MADT_TRIGGER_EDGE)
            *level = false;
        if ((o->flags & MADT_POLARITY_MASK) == MADT_POLARITY_LOW)
            *active_low = true;
        else if ((o->flags & MADT_POLARITY_MASK) == MADT_POLARITY_HIGH)
            *active_low = false;
        return;
    }
}

static const struct ioapic *ioapic_for(unsigned gsi, unsigned *pin)
{
    for (unsigned i = 0; i < n_ioapics; i++) {
        const struct ioapic *io = &ioapics[i];
        if (gsi >= io->gsi_base && gsi - io->gsi_base < io->inputs) {
            *pin = gsi - io->gsi_base;
            return io;
        }
    }
    return NULL;
}

bool irq_has_gsi(unsigned gsi)
{
    unsigned pin;
    return ioapic_for(gsi, &pin) != NULL;
}

int irq_route_gsi(unsigned gsi, bool level, bool active_low, unsigned vector)
{
    unsigned pin;
    const struct ioapic *io = ioapic_for(gsi, &pin);
    if (!io || vector < 0x20 || vector > 0xfe)
        return -1;
    uint32_t lo = vector | (level ? RTE_LEVEL : 0) | (active_low ? RTE_ACTIVE_LOW : 0);
    ioapic_write(io, IOAPIC_REDTBL + 2 * pin + 1, lapic_id << 24);
    ioapic_write(io, IOAPIC_REDTBL + 2 * pin, lo); /* unmasked last */
    return 0;
}

void irq_mask_gsi(unsigned gsi)
{
    unsigned pin;
    const struct ioapic *io = ioapic_for(gsi, &pin);
    if (io)
        ioapic_write(io, IOAPIC_REDTBL + 2 * pin,
                     ioapic_read(io, IOAPIC_REDTBL + 2 * pin) | RTE_MASKED);
}

void irq_msi_message(unsigned vector, uint64_t *addr, uint32_t *data)
{
    *addr = 0xfee00000ull | (uint64_t)lapic_id << 12;
    *data = vector; /* fixed delivery, edge */
}

void irq_timer_arm(uint64_t deadline_ns)
{
    if (!ready)
        return;
    if (deadline_ns == UINT64_MAX) {
        lapic_write(LAPIC_TIMER_INIT, 0);
        return;
    }
    uint64_t now = platform_now_ns();
    uint64_t delta = deadline_ns > now ? deadline_ns - now : 0;
    if (delta > TIMER_MAX_DELTA)
        delta = TIMER_MAX_DELTA;
    /* Rounded up: a timer that fires early only costs a loop that finds nothing due. */
    uint64_t ticks = (delta * stats.timer_khz + 999999) / 1000000 + 1;
    if (ticks > 0xffffffffu)
        ticks = 0xffffffffu;
    lapic_write(LAPIC_LVT_TIMER, IRQ_VECTOR_TIMER); /* one-shot, unmasked */
    lapic_write(LAPIC_TIMER_INIT, (uint32_t)ticks);
}

void irq_self_ipi(unsigned vector)
{
    lapic_write(LAPIC_ICR_HI, 0);
    lapic_write(LAPIC_ICR_LO, ICR_SELF | (vector & 0xff));
}

void irq_get_stats(struct irq_stats *out)
{
    *out = stats;
}

void irq_dispatch(unsigned vector)
{
    if (vector == IRQ_VECTOR_SPURIOUS) {
        stats.lapic_spurious++; /* not in service: no EOI (SDM 11.9) */
        return;
    }
    if (vector == IRQ_VECTOR_TIMER)
        stats.timer++;
    else if (vector < 256 && handlers[vector].fn)
        handlers[vector].fn(handlers[vector].ctx);
    else
        stats.unhandled++;
    lapic_write(LAPIC_EOI, 0);
}
