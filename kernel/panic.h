#ifndef KERNEL_PANIC_H
#define KERNEL_PANIC_H

/* An impossible state: print why and leave with EXIT_PANIC. */
__attribute__((noreturn, format(printf, 1, 2))) void panic(const char *fmt, ...);

#endif
