/* One-line JSON builder (lib/json.h). Freestanding: no printf, so host tests link it alone. */
#include "lib/json.h"
#include "include/platform.h"

static void put(struct json *j, const char *s, size_t n)
{
    if (j->overflow || j->len + n >= sizeof(j->buf)) {
        j->overflow = true;
        return;
    }
    for (size_t i = 0; i < n; i++)
        j->buf[j->len++] = s[i];
    j->buf[j->len] = '\0';
}

static void put_c(struct json *j, char c)
{
    put(j, &c, 1);
}

static const char hex[] = "0123456789abcdef";

size_t json_escape(char *dst, size_t size, const char *src)
{
    size_t n = 0;
    if (!size)
        return 0;
    for (; src && *src; src++) {
        unsigned char c = (unsigned char)*src;
        char tmp[6];
        size_t k = 0;
        if (c == '"' || c == '\\') {
            tmp[k++] = '\\';
            tmp[k++] = (char)c;
        } else if (c < 0x20 || c >= 0x7f) {
            /* Control characters and non-ASCII bytes (which need not be valid UTF-8). */
            tmp[k++] = '\\';
            tmp[k++] = 'u';
            tmp[k++] = '0';
            tmp[k++] = '0';
            tmp[k++] = hex[c >> 4];
            tmp[k++] = hex[c & 15];
        } else {
            tmp[k++] = (char)c;
        }
        if (n + k >= size)
            break;
        for (size_t i = 0; i < k; i++)
            dst[n++] = tmp[i];
    }
    dst[n] = '\0';
    return n;
}

static void put_string(struct json *j, const char *s)
{
    put_c(j, '"');
    for (; s && *s && !j->overflow; s++) {
        char esc[8];
        char one[2] = {*s, '\0'};
        put(j, esc, json_escape(esc, sizeof(esc), one));
    }
    put_c(j, '"');
}

static void member(struct json *j, const char *key)
{
    if (j->need_comma)
        put_c(j, ',');
    j->need_comma = true;
    if (key) {
        put_string(j, key);
        put_c(j, ':');
    }
}

static void put_u64(struct json *j, uint64_t v)
{
    char digits[20];
    unsigned n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        put_c(j, digits[--n]);
}

static void open_container(struct json *j, char open, char close)
{
    if (j->depth == JSON_MAX_DEPTH) {
        j->overflow = true;
        return;
    }
    put_c(j, open);
    j->open[j->depth++] = close;
    j->need_comma = false;
}

void json_begin(struct json *j)
{
    j->len = 0;
    j->buf[0] = '\0';
    j->event = NULL;
    j->depth = 0;
    j->need_comma = false;
    j->overflow = false;
    open_container(j, '{', '}');
}

void json_str(struct json *j, const char *key, const char *value)
{
    member(j, key);
    put_string(j, value);
}

void json_u64(struct json *j, const char *key, uint64_t value)
{
    member(j, key);
    put_u64(j, value);
}

void json_i64(struct json *j, const char *key, int64_t value)
{
    member(j, key);
    if (value < 0) {
        put_c(j, '-');
        put_u64(j, (uint64_t)0 - (uint64_t)value);
    } else {
        put_u64(j, (uint64_t)value);
    }
}

void json_bool(struct json *j, const char *key, bool value)
{
    member(j, key);
    if (value)
        put(j, "true", 4);
    else
        put(j, "false", 5);
}

void json_open_object(struct json *j, const char *key)
{
    member(j, key);
    open_container(j, '{', '}');
}

void json_open_array(struct json *j, const char *key)
{
    member(j, key);
    open_container(j, '[', ']');
}

void json_close(struct json *j)
{
    if (j->depth == 0)
        return;
    put_c(j, j->open[--j->depth]);
    j->need_comma = true;
}

const char *json_finish(struct json *j)
{
    while (j->depth)
        json_close(j);
    if (j->overflow) {
        const char *name = j->event;
        json_begin(j);
        if (name)
            json_str(j, "event", name);
        json_bool(j, "truncated", true);
        json_close(j);
    }
    return j->buf;
}

void event_begin(struct json *j, const char *name)
{
    json_begin(j);
    json_str(j, "event", name);
    j->event = name;
}

void event_emit(struct json *j)
{
    platform_log("%s", json_finish(j));
}
