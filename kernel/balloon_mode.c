#include "kernel/balloon_mode.h"
#include "arch/x86/exit.h"
#include "kernel/agent.h"
#include "kernel/devices.h"
#include "kernel/mem.h"
#include "lib/printf.h"
#include "virtio/balloon.h"

#define DEVICE_POLL_NS (1000ull * 1000) /* re-read the ISR and num_pages every millisecond */

static struct virtio_transport transport;
static struct balloon balloon;

void balloon_mode_run(const struct options *opts)
{
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
    struct balloon_status st;
    if (balloon_init(&balloon, &transport, &kernel_buddy, &cfg) != 0) {
        balloon_get_status(&balloon, &st);
        if (st.violation[0])
            machine_exit(EXIT_PROTOCOL_ERROR, st.violation);
        machine_exit(EXIT_NO_DEVICE, "balloon device could not be brought up");
    }
    agent_init(&balloon);
    uint64_t last_poll = 0;
    for (;;) {
        uint64_t now = platform_now_ns();
        bool poll_device = now - last_poll >= DEVICE_POLL_NS;
        if (poll_device)
            last_poll = now;
        /* Polling: read (and so acknowledge) the ISR, and re-read the configuration every time
         * whatever it says. */
        unsigned events = 0;
        if (poll_device)
            events = transport.ops->read_isr(&transport) | BALLOON_EV_CONFIG;
        balloon_poll(&balloon, events);
        balloon_get_status(&balloon, &st);
        if (st.state == BALLOON_BROKEN)
            machine_exit(EXIT_PROTOCOL_ERROR, st.violation);
        if (st.state == BALLOON_NEEDS_RESET) /* blimp.balloon.on_reset=stop */
            machine_exit(EXIT_DEVICE_NEEDS_RESET, "the balloon device needs a reset");
        agent_poll();
    }
}
