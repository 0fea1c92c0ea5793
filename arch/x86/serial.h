#ifndef ARCH_X86_SERIAL_H
#define ARCH_X86_SERIAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define COM1 0x3f8
#define COM2 0x2f8

/* Program a 16550 UART for 115200 8N1; returns false if no UART answers at that port. */
bool serial_init(uint16_t port);
void serial_write(uint16_t port, const char *s, size_t n);
/* Non-blocking read: returns -1 when no byte is waiting. */
int serial_getc(uint16_t port);
/* Raise the UART's IRQ while received data waits (the line drops once it is all read). */
void serial_enable_rx_irq(uint16_t port);
/* COM1 becomes the console (lib/console.h). */
void serial_console_init(void);

#endif
