#ifndef KERNEL_CONSOLE_H
#define KERNEL_CONSOLE_H

#include <stddef.h>

/* The serial console (COM1): every human line and every JSON event goes through here. */
void console_init(void);
void console_write(const char *s, size_t n);

#endif
