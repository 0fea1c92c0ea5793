#include "lib/parse.h"

bool parse_number(const char *s, unsigned flags, uint64_t max, uint64_t *out)
{
    uint64_t v = 0, base = 10;
    if ((flags & PARSE_HEX) && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    const char *start = s;
    for (;; s++) {
        uint64_t d;
        if (*s >= '0' && *s <= '9')
            d = (uint64_t)(*s - '0');
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = (uint64_t)(*s - 'a' + 10);
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = (uint64_t)(*s - 'A' + 10);
        else
            break;
        if (d > max || v > (max - d) / base)
            return false;
        v = v * base + d;
    }
    if (s == start)
        return false;
    unsigned shift = 0;
    if (flags & PARSE_SUFFIX) {
        if (*s == 'K' || *s == 'k')
            shift = 10;
        else if (*s == 'M' || *s == 'm')
            shift = 20;
        else if (*s == 'G' || *s == 'g')
            shift = 30;
    }
    if (shift) {
        if (v > (max >> shift))
            return false;
        v <<= shift;
        s++;
    }
    if (*s)
        return false;
    *out = v;
    return true;
}

bool parse_u64(const char *s, uint64_t *out)
{
    return parse_number(s, PARSE_HEX | PARSE_SUFFIX, UINT64_MAX, out);
}
