#include "arch/x86/cpu.h"
#include "arch/x86/exit.h"
#include "arch/x86/irq.h"
#include "lib/json.h"
#include "lib/printf.h"

struct idt_entry {
    uint16_t offset_lo;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t offset_mid;
    uint32_t offset_hi;
    uint32_t zero;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((aligned(16)));
extern const uint64_t trap_entries[32];
extern const char irq_entries[]; /* vectors 32..255, 16 bytes each (trap_entry.S) */

static const char *const vector_names[32] = {
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
};

void traps_init(void)
{
    for (int v = 0; v < 256; v++) {
        uint64_t a = v < 32 ? trap_entries[v] : (uint64_t)(uintptr_t)&irq_entries[(v - 32) * 16];
        idt[v] = (struct idt_entry){
            .offset_lo = (uint16_t)a,
            .selector = 0x08,
            .type_attr = 0x8e, /* present, ring 0, 64-bit interrupt gate */
            .offset_mid = (uint16_t)(a >> 16),
            .offset_hi = (uint32_t)(a >> 32),
        };
    }
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) idtr = {sizeof(idt) - 1, (uint64_t)(uintptr_t)idt};
    __asm__ __volatile__("lidt %0" ::"m"(idtr));
}

void trap_handler(struct trap_frame *f);
void trap_handler(struct trap_frame *f)
{
    if (f->vector >= 32) {
        irq_dispatch((unsigned)f->vector);
        return;
    }
    const char *name = f->vector < 32 ? vector_names[f->vector] : "unknown";
    kprintf("\nblimp: CPU exception %lu (%s) error_code=0x%lx\n", f->vector, name, f->error_code);
    kprintf("  rip=%016lx cs=%04lx rflags=%016lx rsp=%016lx ss=%04lx cr2=%016lx\n", f->rip, f->cs,
            f->rflags, f->rsp, f->ss, read_cr2());
    kprintf("  rax=%016lx rbx=%016lx rcx=%016lx rdx=%016lx\n", f->rax, f->rbx, f->rcx, f->rdx);
    kprintf("  rsi=%016lx rdi=%016lx rbp=%016lx r8 =%016lx\n", f->rsi, f->rdi, f->rbp, f->r8);
    kprintf("  r9 =%016lx r10=%016lx r11=%016lx r12=%016lx\n", f->r9, f->r10, f->r11, f->r12);
    kprintf("  r13=%016lx r14=%016lx r15=%016lx\n", f->r13, f->r14, f->r15);
    struct json j;
    event_begin(&j, "exception");
    json_u64(&j, "vector", f->vector);
    json_str(&j, "name", name);
    json_u64(&j, "error_code", f->error_code);
    json_u64(&j, "rip", f->rip);
    json_u64(&j, "cr2", read_cr2());
    event_emit(&j);
    machine_exit(EXIT_CPU_EXCEPTION, "cpu exception");
}
