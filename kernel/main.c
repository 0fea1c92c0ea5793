/*
 * blimp's C entry: bring up the console, timer and traps, turn the loader's information into one
 * struct boot_info, build the page allocator over all RAM, print the boot report, then run the
 * mode the command line asks for.
 */
#include "kernel/balloon_mode.h"
#include "kernel/conform.h"
#include "kernel/cmdline.h"
#include "arch/x86/serial.h"
#include "kernel/mem.h"
#include "kernel/panic.h"
#include "lib/json.h"
#include "lib/printf.h"
#include "kernel/selftest.h"
#include "kernel/stress.h"
#include "arch/x86/cpu.h"
#include "arch/x86/acpi.h"
#include "arch/x86/exit.h"
#include "arch/x86/tsc.h"
#include "boot/boot_info.h"

#define BLIMP_VERSION "0.1"

static struct boot_info boot_info;
static struct options options;

static void print_boot_event(const struct boot_info *bi)
{
    kprintf("blimp %s: booted via %s, cmdline \"%s\"\n", BLIMP_VERSION,
            boot_protocol_name(bi->protocol), bi->cmdline);
    struct json j;
    event_begin(&j, "boot");
    json_str(&j, "version", BLIMP_VERSION);
    json_str(&j, "protocol", boot_protocol_name(bi->protocol));
    json_str(&j, "cmdline", bi->cmdline);
    json_u64(&j, "tsc_khz", tsc_khz());
    json_u64(&j, "rsdp", bi->rsdp_phys);
    if (bi->protocol == BOOT_LINUX)
        json_u64(&j, "entry_bits", bi->entry64 ? 64 : 32);
    event_emit(&j);
    if (bi->cmdline_truncated)
        kprintf("blimp: warning: command line truncated to %u bytes\n", BOOT_CMDLINE_MAX - 1);
}

static void print_memory_map(const struct boot_info *bi)
{
    kprintf("memory map (%u entries%s):\n", bi->nregions, bi->dropped ? ", some dropped" : "");
    for (unsigned i = 0; i < bi->nregions; i++) {
        const struct mem_region *r = &bi->regions[i];
        kprintf("  %016lx-%016lx %-8s %lu KiB\n", r->base, r->base + r->size - 1,
                mem_type_name(r->type), r->size >> 10);
    }
    struct json j;
    event_begin(&j, "memmap");
    json_open_array(&j, "entries");
    for (unsigned i = 0; i < bi->nregions; i++) {
        const struct mem_region *r = &bi->regions[i];
        json_open_object(&j, NULL);
        json_u64(&j, "base", r->base);
        json_u64(&j, "size", r->size);
        json_str(&j, "type", mem_type_name(r->type));
        json_close(&j);
    }
    json_close(&j);
    json_u64(&j, "ram_bytes", boot_ram_bytes(bi));
    json_u64(&j, "dropped", bi->dropped);
    event_emit(&j);
}

static void print_allocator(void)
{
    struct buddy_stats st;
    buddy_get_stats(&kernel_buddy, &st);
    kprintf("buddy: %lu pages managed (%lu MiB), %lu free, metadata %lu bytes at 0x%lx, "
            "%lu pages excluded\n",
            st.total_pages, st.total_pages >> 8, st.free_pages, st.meta_bytes, mem_layout.meta_phys,
            mem_layout.excluded_pages);
    kprintf("buddy: free blocks per order:");
    for (unsigned k = 0; k <= BUDDY_MAX_ORDER; k++)
        kprintf(" %u:%lu", k, st.free_blocks[k]);
    kprintf("\n");
    struct json j;
    event_begin(&j, "buddy");
    json_u64(&j, "total_pages", st.total_pages);
    json_u64(&j, "free_pages", st.free_pages);
    json_u64(&j, "meta_bytes", st.meta_bytes);
    json_u64(&j, "excluded_pages", mem_layout.excluded_pages);
    json_open_array(&j, "free_blocks");
    for (unsigned k = 0; k <= BUDDY_MAX_ORDER; k++)
        json_u64(&j, NULL, st.free_blocks[k]);
    json_close(&j);
    event_emit(&j);
}

void kmain(uint32_t magic, uint32_t info_phys);
void kmain(uint32_t magic, uint32_t info_phys)
{
    serial_console_init();
    traps_init();
    tsc_calibrate();
    if (boot_info_parse(magic, info_phys, &boot_info) != 0)
        panic("boot information rejected: %s (magic 0x%x, info at 0x%x, offset %lu)",
              boot_info.error, magic, info_phys, boot_info.error_offset);
    print_boot_event(&boot_info);
    struct acpi_s5 s5; /* read now: a multiboot2 RSDP copy is RAM mem_init hands out */
    if (acpi_read_s5(boot_info.rsdp_phys, &s5))
        machine_exit_use_s5(&s5);
    if (cmdline_parse(boot_info.cmdline, &options) != 0)
        machine_exit(EXIT_BAD_CMDLINE, "bad command line");
    print_memory_map(&boot_info);
    if (mem_init(&boot_info, options.poison, options.poison_pattern) != 0)
        machine_exit(EXIT_OUT_OF_MEMORY, "memory setup failed");
    print_allocator();

    uint64_t boot_us = tsc_ns_since_boot() / 1000;
    kprintf("blimp: ready in %lu us (mode %s)\n", boot_us, kernel_mode_name(options.mode));
    struct json j;
    event_begin(&j, "ready");
    json_u64(&j, "boot_us", boot_us);
    json_str(&j, "mode", kernel_mode_name(options.mode));
    event_emit(&j);

    switch (options.mode) {
    case MODE_BOOT:
        machine_exit(EXIT_SUCCESS_CODE, "boot report done");
    case MODE_SELFTEST: {
        int code = selftest_run(&boot_info, &options);
        machine_exit((enum exit_code)code, "selftest done");
    }
    case MODE_FAULT:
        /* Canonical but far above any mapping: a #PF with cr2 = that address. */
        *(volatile uint64_t *)0x7fff00000000ull = 1;
        panic("the deliberate page fault did not fault");
    case MODE_STRESS:
        stress_mode_run(&options, boot_info.rsdp_phys);
    case MODE_CONFORM:
        conform_mode_run(&options, boot_info.rsdp_phys);
    case MODE_BALLOON:
        break;
    }
    balloon_mode_run(&options, boot_info.rsdp_phys, NULL);
}
