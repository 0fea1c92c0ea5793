/* Port and model-specific-register access; the only place outside arch/x86 C files with inline asm.
 */
#ifndef ARCH_X86_IO_H
#define ARCH_X86_IO_H

#include <stdint.h>

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ __volatile__("outb %0, %1" ::"a"(v), "Nd"(port));
}
static inline void outw(uint16_t port, uint16_t v)
{
    __asm__ __volatile__("outw %0, %1" ::"a"(v), "Nd"(port));
}
static inline void outl(uint16_t port, uint32_t v)
{
    __asm__ __volatile__("outl %0, %1" ::"a"(v), "Nd"(port));
}
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint16_t inw(uint16_t port)
{
    uint16_t v;
    __asm__ __volatile__("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ __volatile__("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
static inline void cpuid(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c,
                         uint32_t *d)
{
    __asm__ __volatile__("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ __volatile__("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}
static inline void wrmsr(uint32_t msr, uint64_t v)
{
    __asm__ __volatile__("wrmsr" ::"c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)));
}
static inline void cpu_cli(void)
{
    __asm__ __volatile__("cli" ::: "memory");
}
/* Enable interrupts and halt until one has been handled, then disable them again. `sti` takes
 * effect only after the next instruction, so an interrupt pending when sti runs is taken after
 * hlt has started and wakes it: no wake-up is lost between the caller's last check and the hlt.
 */
static inline void cpu_sti_hlt_cli(void)
{
    __asm__ __volatile__("sti; hlt; cli" ::: "memory");
}
/* Let interrupts that are pending be taken, then disable them again: `sti` takes effect after
 * the next instruction, so they arrive after the nop. For loops that keep working instead of
 * sleeping. */
static inline void cpu_irq_window(void)
{
    __asm__ __volatile__("sti; nop; cli" ::: "memory");
}
static inline void cpu_pause(void)
{
    __asm__ __volatile__("pause" ::: "memory");
}
__attribute__((noreturn)) static inline void cpu_halt_forever(void)
{
    for (;;)
        __asm__ __volatile__("cli; hlt");
}

#endif
