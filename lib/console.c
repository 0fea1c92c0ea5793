#include "lib/console.h"

static console_sink_fn console_sink;

void console_set_sink(console_sink_fn sink)
{
    console_sink = sink;
}

void console_write(const char *s, size_t n)
{
    if (!console_sink)
        return;
    /* Terminals want CR LF; parsers strip the CR. */
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\n') {
            console_sink(s + start, i - start);
            console_sink("\r\n", 2);
            start = i + 1;
        }
    }
    console_sink(s + start, n - start);
}
