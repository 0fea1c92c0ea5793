#ifndef LIB_CONSOLE_H
#define LIB_CONSOLE_H

#include <stddef.h>

/*
 * The console: every human line and every JSON event goes through here. lib/ knows no hardware,
 * so the kernel names the device that carries it (COM1) with console_set_sink; output before
 * that is dropped.
 */
typedef void (*console_sink_fn)(const char *s, size_t n);

void console_set_sink(console_sink_fn sink);
void console_write(const char *s, size_t n);

#endif
