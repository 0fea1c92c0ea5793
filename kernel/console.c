#include "console.h"
#include "../arch/x86/serial.h"

void console_init(void)
{
    serial_init(COM1);
}

void console_write(const char *s, size_t n)
{
    /* Terminals want CR LF; parsers strip the CR. */
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\n') {
            serial_write(COM1, s + start, i - start);
            serial_write(COM1, "\r\n", 2);
            start = i + 1;
        }
    }
    serial_write(COM1, s + start, n - start);
}
