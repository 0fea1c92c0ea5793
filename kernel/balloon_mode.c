/*
 * Balloon mode's event loop. With interrupts (blimp.irq=auto and a usable line) the CPU sleeps
 * in `sti; hlt` until the device interrupts (its handler reads the ISR, which acknowledges it and
 * drops a level line, and keeps the bits), the agent's UART receives a byte, the LAPIC timer
 * reaches the balloon's next deadline, or look_ns have passed: then the loop looks at the device
 * itself, so a lost interrupt costs at most that long and is counted (irq_missed), never a
 * hang. Everything else runs with interrupts off, so handlers never race the loop. Polling
 * (blimp.irq=poll, or no line) re-reads the ISR and the config every millisecond and never
 * sleeps. docs/design.md, "Interrupts".
 */
#include "kernel/balloon_mode.h"
#include "arch/x86/exit.h"
#include "arch/x86/io.h"
#include "arch/x86/irq.h"
#include "arch/x86/serial.h"
#include "kernel/agent.h"
#include "kernel/devices.h"
#include "kernel/mem.h"
#include "lib/json.h"
#include "lib/printf.h"
#include "virtio/balloon.h"

#define DEVICE_POLL_NS (1000ull * 1000)      /* polling: re-read the ISR and num_pages every ms */
#define AGENT_POLL_NS  (10ull * 1000 * 1000) /* the agent without its interrupt */
/* The longest the loop trusts interrupts alone (blimp.irq.look_ms, 100 by default): then it
 * looks at the device (ISR, or with MSI-X the used rings and the config). 10 looks a second:
 * one or two exits each. 0 never looks (tests: a lost interrupt then hangs, to be diagnosed). */
static uint64_t look_ns;
/* How long an interrupt the device raised may take to reach us once interrupts are on. Under
 * TCG the IOAPIC delivers as the device raises; an in-kernel irqchip may lag a little. */
#define IRQ_ARRIVAL_NS (1000ull * 1000)
#define COM2_ISA_IRQ   3

static struct virtio_transport transport;
static struct balloon balloon;

static volatile unsigned pending; /* VIRTIO_ISR_* bits the handlers saw, taken by the loop */
static struct wait_stats ws = {.mode = "poll"};
static int device_vector = -1; /* the IOAPIC line's vector (INTx, virtio-mmio); -1: none */
static bool agent_irq_routed;
static volatile uint64_t deliveries; /* device-vector interrupts taken, whatever they found */
static volatile bool loop_read_isr;  /* the loop just read the ISR itself (see take_isr) */

/* INTx: read (and so acknowledge) the ISR. 0 means the interrupt was not this device's: a
 * shared line, or a stray delivery, unless the loop had just read the ISR itself. */
static void device_irq(void *ctx)
{
    (void)ctx;
    deliveries++;
    uint8_t isr = transport.ops->read_isr(&transport);
    if (isr == 0) {
        if (loop_read_isr)
            ws.late++;
        else
            ws.spurious++;
        return;
    }
    ws.device_irqs++;
    pending |= isr;
}

/* MSI-X: each message says what happened; nothing to read or acknowledge. */
static void msix_config_irq(void *ctx)
{
    (void)ctx;
    deliveries++;
    ws.device_irqs++;
    pending |= VIRTIO_ISR_CONFIG;
}

static void msix_queue_irq(void *ctx)
{
    (void)ctx;
    deliveries++;
    ws.device_irqs++;
    pending |= VIRTIO_ISR_QUEUE;
}

/* Interrupts on until one from the device arrives or IRQ_ARRIVAL_NS pass: true if one came. */
static bool irq_arrives(void)
{
    uint64_t before = deliveries, start = platform_now_ns();
    do
        cpu_irq_window();
    while (deliveries == before && platform_now_ns() - start < IRQ_ARRIVAL_NS);
    return deliveries != before;
}

/* The loop reads (and so acknowledges) the ISR itself. An interrupt already on its way then
 * finds it 0: it is let in at once and counted as late, not spurious. *arrived says whether one
 * came (only looked for when the ISR had bits). */
static uint8_t take_isr(bool *arrived)
{
    uint8_t isr = transport.ops->read_isr(&transport);
    *arrived = false;
    if (isr) {
        loop_read_isr = true;
        *arrived = irq_arrives();
        loop_read_isr = false;
    }
    return isr;
}

/* Unmask the device's IOAPIC input and take what it raised while it could not interrupt us.
 * QEMU's IOAPIC drops a level raised on a pin that is masked in edge mode (the reset state) and
 * records no wire level: unmasking alone would deliver nothing, and since only the handler
 * reads the ISR, the line would stay high and no later event would ever interrupt (the freeze
 * of docs/design.md "Interrupts"). So the ISR is read before unmasking (the line falls) and
 * after (what came in between). */
static void unmask_device_line(void)
{
    bool arrived;
    uint8_t isr = take_isr(&arrived);
    irq_route_gsi(ws.gsi, ws.level, ws.active_low, (unsigned)device_vector);
    isr |= take_isr(&arrived);
    if (isr)
        ws.raised_while_masked++;
    pending |= isr;
}

static void emit_irq_missed(unsigned work)
{
    const char *what = !(work & BALLOON_EV_QUEUE)    ? "a config change"
                       : !(work & BALLOON_EV_CONFIG) ? "used buffers"
                                                     : "a config change and used buffers";
    kprintf("balloon: interrupt missed: the device had %s that no interrupt announced (%lu so "
            "far)\n",
            what, (unsigned long)ws.missed);
    struct json j;
    event_begin(&j, "irq_missed");
    json_str(&j, "mode", ws.mode);
    json_bool(&j, "config", work & BALLOON_EV_CONFIG);
    json_bool(&j, "queue", work & BALLOON_EV_QUEUE);
    json_u64(&j, "count", ws.missed);
    json_u64(&j, "looks", ws.looks);
    event_emit(&j);
}

/* The bounded look: does the device hold work that no interrupt announced? With an IOAPIC line
 * the ISR says (reading it also drops a line stuck high); with MSI-X the used rings and the
 * config. Work that an interrupt then still does not announce within IRQ_ARRIVAL_NS was missed:
 * counted, reported, and the line routed again. Returns the events for balloon_poll. */
static unsigned look_at_device(void)
{
    ws.looks++;
    bool arrived;
    unsigned work;
    if (device_vector >= 0) {
        work = take_isr(&arrived);
    } else {
        work = balloon_unseen_events(&balloon);
        arrived = work && irq_arrives();
    }
    if (!work || arrived)
        return work;
    ws.missed++;
    emit_irq_missed(work);
    if (device_vector >= 0)
        irq_route_gsi(ws.gsi, ws.level, ws.active_low, (unsigned)device_vector);
    return work | BALLOON_EV_CONFIG;
}

/* COM2 received data (edge): the loop drains the UART, which drops the line for the next edge. */
static void agent_irq(void *ctx)
{
    (void)ctx;
    ws.agent_irqs++;
}

struct balloon *balloon_mode_balloon(void)
{
    return &balloon;
}

struct virtio_transport *balloon_mode_transport(void)
{
    return &transport;
}

void balloon_mode_wait_stats(struct wait_stats *out)
{
    *out = ws;
    out->exits = transport.exits;
    struct irq_stats is;
    irq_get_stats(&is);
    out->timer_irqs = is.timer;
    out->lapic_spurious = is.lapic_spurious;
    out->uptime_ns = platform_now_ns();
}

void balloon_mode_emit_latency(void)
{
    balloon_emit_latency(&balloon);
}

unsigned balloon_mode_inject_spurious(unsigned n)
{
    if (device_vector < 0)
        return 0;
    for (unsigned i = 0; i < n; i++) {
        irq_self_ipi((unsigned)device_vector);
        cpu_sti_hlt_cli(); /* the IPI is pending: taken at once */
    }
    return n;
}

bool balloon_mode_lose_irq(void)
{
    if (device_vector < 0)
        return false;
    irq_mask_gsi(ws.gsi);
    return true;
}

int balloon_mode_reset_device(void)
{
    return balloon_reset_device(&balloon);
}

static void emit_wait_event(const char *reason, bool irqs_on)
{
    kprintf("balloon: waiting by %s%s%s\n", ws.mode, reason ? ": " : "", reason ? reason : "");
    struct json j;
    event_begin(&j, "irq");
    json_str(&j, "mode", ws.mode);
    if (reason)
        json_str(&j, "reason", reason);
    if (irqs_on) {
        if (device_vector >= 0) {
            json_u64(&j, "gsi", ws.gsi);
            json_u64(&j, "vector", (uint64_t)device_vector);
            json_bool(&j, "level", ws.level);
            json_bool(&j, "active_low", ws.active_low);
        }
        json_bool(&j, "agent_irq", agent_irq_routed);
        json_u64(&j, "raised_before_routing", ws.raised_while_masked);
        json_u64(&j, "look_ms", look_ns / 1000000);
        struct irq_stats is;
        irq_get_stats(&is);
        json_u64(&j, "ioapics", is.n_ioapics);
        json_bool(&j, "madt", is.madt);
        json_u64(&j, "timer_khz", is.timer_khz);
    }
    event_emit(&j);
}

/* Before the driver resets the device: MSI-X when the transport has it (the transport keeps
 * the vectors through resets and falls back to INTx if the device refuses one). */
static void try_msix(void)
{
    if (!transport.ops->msix_setup)
        return;
    int cv = irq_alloc_vector(msix_config_irq, NULL);
    int qv = irq_alloc_vector(msix_queue_irq, NULL);
    if (cv < 0 || qv < 0)
        return;
    struct virtio_msix_msg msgs[2];
    irq_msi_message((unsigned)cv, &msgs[VIRTIO_MSIX_CONFIG].addr, &msgs[VIRTIO_MSIX_CONFIG].data);
    irq_msi_message((unsigned)qv, &msgs[VIRTIO_MSIX_QUEUES].addr, &msgs[VIRTIO_MSIX_QUEUES].data);
    transport.ops->msix_setup(&transport, msgs);
}

static void route_agent(void)
{
    /* COM2's IRQ 3, edge, active high unless the MADT says otherwise. */
    unsigned agsi;
    bool alevel = false, alow = false;
    irq_isa_to_gsi(COM2_ISA_IRQ, &agsi, &alevel, &alow);
    int av = irq_alloc_vector(agent_irq, NULL);
    if (av >= 0 && irq_route_gsi(agsi, alevel, alow, (unsigned)av) == 0) {
        serial_enable_rx_irq(COM2);
        agent_irq_routed = true;
    }
}

/* After balloon_init: MSI-X if it stayed on, else route the INTx line; and the agent's line.
 * False (with the reason) keeps polling. */
static bool setup_interrupts(const char **reason)
{
    struct virtio_irq *irq = &transport.irq;
    if (!irq_ready()) {
        *reason = "no usable local APIC / IOAPIC";
        return false;
    }
    if (irq->kind == VIRTIO_IRQ_MSIX) {
        ws.mode = "msix";
        route_agent();
        return true;
    }
    if (irq->kind != VIRTIO_IRQ_GSI) {
        *reason = "the transport has no interrupt line";
        return false;
    }
    unsigned gsi = irq->gsi;
    bool level = irq->level, low = irq->active_low;
    if (irq->isa)
        irq_isa_to_gsi(irq->gsi, &gsi, &level, &low);
    int v = irq_has_gsi(gsi) ? irq_alloc_vector(device_irq, NULL) : -1;
    if (v < 0) {
        *reason = "no IOAPIC input for the device's GSI";
        return false;
    }
    device_vector = v;
    ws.mode = "intx";
    ws.gsi = gsi;
    ws.level = level;
    ws.active_low = low;
    unmask_device_line(); /* the device may have raised its line long ago: take that first */
    route_agent();
    return true;
}

void balloon_mode_run(const struct options *opts, uint64_t rsdp_phys,
                      const struct balloon_mode_hook *hook)
{
    /* First, so that the interrupt hardware is reported even when there is no device. */
    look_ns = opts->irq_look_ns;
    bool irq_hw = opts->irq == IRQ_AUTO && !(hook && hook->poll_only) && irq_init(rsdp_phys);
    if (find_balloon(opts, &transport) != 0) {
        kprintf("blimp: error: no usable virtio balloon device found "
                "(QEMU: -device virtio-balloon-pci, or virtio-balloon-device on microvm)\n");
        machine_exit(EXIT_NO_DEVICE, "no balloon device");
    }
    /* PAGE_POISON only when the guest poisons, with a pattern that repeats a 32-bit poison_val
     * (the only kind the feature can describe). */
    struct balloon_config cfg = opts->balloon;
    uint32_t val = (uint32_t)opts->poison_pattern;
    cfg.page_poison = opts->poison && opts->poison_pattern == ((uint64_t)val << 32 | val);
    cfg.poison_val = val;
    if (opts->poison && !cfg.page_poison)
        kprintf("balloon: poison pattern 0x%lx does not repeat a 32-bit value: PAGE_POISON "
                "declined\n",
                opts->poison_pattern);
    if (hook && hook->prepare)
        hook->prepare(hook->ctx, &transport, &cfg);
    if (irq_hw)
        try_msix();
    struct balloon_status st;
    if (balloon_init(&balloon, &transport, &kernel_buddy, &cfg) != 0) {
        balloon_get_status(&balloon, &st);
        if (st.violation[0])
            machine_exit(EXIT_PROTOCOL_ERROR, st.violation);
        machine_exit(EXIT_NO_DEVICE, "balloon device could not be brought up");
    }
    balloon_hold(&cfg, HOLD_DRIVER_OK);
    bool agent = agent_init(&balloon);
    const char *reason = "blimp.irq=poll";
    bool irqs = false;
    if (hook && hook->poll_only)
        reason = "the mode reads the ISR itself";
    else if (opts->irq == IRQ_AUTO)
        irqs = setup_interrupts(&reason);
    emit_wait_event(irqs ? NULL : reason, irqs);
    balloon_hold(&cfg, HOLD_ROUTED);
    /* Whatever the device did before its interrupt could reach us: look once at everything. */
    pending |= BALLOON_EV_CONFIG | BALLOON_EV_QUEUE;
    balloon_get_status(&balloon, &st);
    uint64_t last_poll = 0, last_agent = 0, last_look = platform_now_ns();
    uint8_t last_isr = 0;
    bool line_masked = false;
    for (;;) {
        uint64_t now = platform_now_ns();
        unsigned events = 0;
        /* Free page hinting: QEMU 7.2 uses the hints in an iothread, and a device interrupt
         * delivered from there (without its big lock) aborts QEMU under TCG. While hinted
         * blocks are out, the INTx line stays masked at the IOAPIC and the device is polled
         * as without interrupts (docs/design.md, "Interrupts"). */
        bool hint_poll = irqs && device_vector >= 0 && (st.hinting || st.hinted_pages);
        if (hint_poll != line_masked) {
            if (hint_poll)
                irq_mask_gsi(ws.gsi);
            else
                unmask_device_line();
            line_masked = hint_poll;
            pending |= BALLOON_EV_CONFIG | BALLOON_EV_QUEUE;
        }
        /* The bounded look, when nothing announced itself since the last round (work an
         * interrupt announced is not "missed"). Polling looks every ms anyway. */
        /* A LAPIC timer calibrated against a TSC that jumps may fire a little early: a wake
         * within 1/16 of the interval counts, rather than one more timer interrupt for the
         * rest of it. */
        if (irqs && !line_masked && look_ns && now - last_look >= look_ns - look_ns / 16) {
            last_look = now;
            if (!pending)
                pending |= look_at_device();
        }
        if (irqs) {
            events = pending; /* interrupts are off: no handler runs until the next sleep */
            pending = 0;
        }
        if ((!irqs || line_masked) && now - last_poll >= DEVICE_POLL_NS) {
            /* Polling: read (and so acknowledge) the ISR, and re-read the configuration every
             * time whatever it says. */
            last_poll = now;
            uint8_t isr = transport.ops->read_isr(&transport);
            if (isr & VIRTIO_ISR_CONFIG) {
                ws.isr_config++;
                ws.isr_config_repeat += (last_isr & VIRTIO_ISR_CONFIG) != 0;
            }
            last_isr = isr;
            events |= isr | BALLOON_EV_CONFIG;
        }
        balloon_poll(&balloon, events);
        balloon_get_status(&balloon, &st);
        /* The hook sees the status just taken (nothing has allocated or freed since), a broken
         * driver included: conformance mode reports that as a failed check before it exits. */
        uint64_t hook_at = hook ? hook->step(hook->ctx, &st) : UINT64_MAX;
        if (st.state == BALLOON_BROKEN)
            machine_exit(EXIT_PROTOCOL_ERROR, st.violation);
        if (st.state == BALLOON_NEEDS_RESET) /* blimp.balloon.on_reset=stop */
            machine_exit(EXIT_DEVICE_NEEDS_RESET, "the balloon device needs a reset");
        bool busy = agent_poll();
        if (irqs && hook_at <= platform_now_ns()) {
            cpu_irq_window(); /* the hook keeps us awake: let the device's interrupts in */
            continue;
        }
        if (!irqs || busy || pending)
            continue; /* an agent command may have freed memory the balloon wants: poll again */
        uint64_t deadline = balloon_next_deadline_ns(&balloon);
        if (hook_at < deadline)
            deadline = hook_at;
        if (line_masked && last_poll + DEVICE_POLL_NS < deadline)
            deadline = last_poll + DEVICE_POLL_NS;
        if (!line_masked && look_ns && last_look + look_ns < deadline)
            deadline = last_look + look_ns; /* no sleep without a bound */
        if (agent && !agent_irq_routed) {
            if (now - last_agent >= AGENT_POLL_NS)
                last_agent = now;
            if (last_agent + AGENT_POLL_NS < deadline)
                deadline = last_agent + AGENT_POLL_NS;
        }
        if (deadline <= platform_now_ns())
            continue;
        irq_timer_arm(deadline);
        ws.sleeps++;
        cpu_sti_hlt_cli();
    }
}
