/* 16550 UART: the console (COM1, polled) and the agent's command channel (COM2, polled or woken
 * by its receive interrupt). */
#include "arch/x86/serial.h"
#include "arch/x86/io.h"
#include "lib/console.h"

enum { THR = 0, RBR = 0, DLL = 0, IER = 1, DLM = 1, FCR = 2, LCR = 3, MCR = 4, LSR = 5, SCR = 7 };
enum { LSR_DATA_READY = 0x01, LSR_THR_EMPTY = 0x20 };

bool serial_init(uint16_t port)
{
    /* A missing UART reads back 0xff; the scratch register tells us whether one is there. */
    outb(port + SCR, 0x5a);
    if (inb(port + SCR) != 0x5a)
        return false;
    outb(port + IER, 0x00);
    outb(port + LCR, 0x80); /* divisor latch */
    outb(port + DLL, 1);    /* 115200 baud */
    outb(port + DLM, 0);
    outb(port + LCR, 0x03); /* 8N1 */
    outb(port + FCR, 0x07); /* enable and clear FIFOs */
    outb(port + MCR, 0x03); /* DTR | RTS */
    return true;
}

void serial_write(uint16_t port, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        /* Bounded spin: a wedged UART must not hang the kernel. */
        for (unsigned spin = 0; spin < 100000 && !(inb(port + LSR) & LSR_THR_EMPTY); spin++)
            cpu_pause();
        outb(port + THR, (uint8_t)s[i]);
    }
}

void serial_enable_rx_irq(uint16_t port)
{
    outb(port + IER, 0x01);                   /* received data available */
    outb(port + MCR, inb(port + MCR) | 0x08); /* OUT2: gates the IRQ line on PCs */
}

int serial_getc(uint16_t port)
{
    if (!(inb(port + LSR) & LSR_DATA_READY))
        return -1;
    return inb(port + RBR);
}

static void com1_write(const char *s, size_t n)
{
    serial_write(COM1, s, n);
}

void serial_console_init(void)
{
    serial_init(COM1);
    console_set_sink(com1_write);
}
