#include "lib/printf.h"
#include "lib/console.h"
#include "lib/string.h"

#include <stdbool.h>
#include <stdint.h>

struct sink {
    char *buf;   /* NULL: emit to the console through a small line buffer */
    size_t size; /* capacity of buf */
    size_t len;  /* characters produced so far (may exceed size, like snprintf) */
    char line[128];
    size_t line_len;
};

static void sink_flush(struct sink *s)
{
    if (!s->buf && s->line_len) {
        console_write(s->line, s->line_len);
        s->line_len = 0;
    }
}

static void sink_put(struct sink *s, char c)
{
    if (s->buf) {
        if (s->len + 1 < s->size)
            s->buf[s->len] = c;
    } else {
        s->line[s->line_len++] = c;
        if (s->line_len == sizeof(s->line))
            sink_flush(s);
    }
    s->len++;
}

static void put_padded(struct sink *s, const char *str, size_t n, int width, bool left, char pad)
{
    int fill = width > (int)n ? width - (int)n : 0;
    if (!left)
        while (fill-- > 0)
            sink_put(s, pad);
    for (size_t i = 0; i < n; i++)
        sink_put(s, str[i]);
    if (left)
        while (fill-- > 0)
            sink_put(s, ' ');
}

static void put_number(struct sink *s, uint64_t v, bool negative, unsigned base, bool upper,
                       int width, bool left, char pad)
{
    char tmp[24];
    size_t n = 0;
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    if (negative) {
        if (pad == '0') {
            sink_put(s, '-');
            width--;
        } else {
            tmp[n++] = '-';
        }
    }
    char out[24];
    for (size_t i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    put_padded(s, out, n, width, left, pad);
}

static void format(struct sink *s, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            sink_put(s, *fmt);
            continue;
        }
        fmt++;
        bool left = false;
        char pad = ' ';
        for (;; fmt++) {
            if (*fmt == '-')
                left = true;
            else if (*fmt == '0')
                pad = '0';
            else
                break;
        }
        int width = 0;
        if (*fmt == '*') {
            width = va_arg(ap, int);
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        int precision = -1;
        if (*fmt == '.') {
            fmt++;
            precision = 0;
            if (*fmt == '*') {
                precision = va_arg(ap, int);
                fmt++;
            }
            while (*fmt >= '0' && *fmt <= '9')
                precision = precision * 10 + (*fmt++ - '0');
        }
        int longs = 0;
        while (*fmt == 'l') {
            longs++;
            fmt++;
        }
        if (*fmt == 'z') {
            longs = 1;
            fmt++;
        }
        if (left)
            pad = ' ';
        switch (*fmt) {
        case 'd':
        case 'i': {
            int64_t v = longs ? va_arg(ap, int64_t) : va_arg(ap, int);
            bool neg = v < 0;
            put_number(s, neg ? (uint64_t)0 - (uint64_t)v : (uint64_t)v, neg, 10, false, width,
                       left, pad);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            uint64_t v = longs ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            put_number(s, v, false, *fmt == 'u' ? 10 : 16, *fmt == 'X', width, left, pad);
            break;
        }
        case 'p':
            sink_put(s, '0');
            sink_put(s, 'x');
            put_number(s, (uint64_t)(uintptr_t)va_arg(ap, void *), false, 16, false, width, left,
                       pad);
            break;
        case 's': {
            const char *str = va_arg(ap, const char *);
            if (!str)
                str = "(null)";
            size_t n = strlen(str);
            if (precision >= 0 && (size_t)precision < n)
                n = (size_t)precision;
            put_padded(s, str, n, width, left, ' ');
            break;
        }
        case 'c': {
            char c = (char)va_arg(ap, int);
            put_padded(s, &c, 1, width, left, ' ');
            break;
        }
        case '%':
            sink_put(s, '%');
            break;
        case '\0':
            return;
        default: /* unknown conversion: print it literally so the mistake is visible */
            sink_put(s, '%');
            sink_put(s, *fmt);
            break;
        }
    }
}

int kvsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct sink s = {.buf = buf, .size = size};
    format(&s, fmt, ap);
    if (size)
        buf[s.len < size ? s.len : size - 1] = '\0';
    return (int)s.len;
}

int ksnprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = kvsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

int kvprintf(const char *fmt, va_list ap)
{
    struct sink s = {0};
    format(&s, fmt, ap);
    sink_flush(&s);
    return (int)s.len;
}

int kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = kvprintf(fmt, ap);
    va_end(ap);
    return n;
}
