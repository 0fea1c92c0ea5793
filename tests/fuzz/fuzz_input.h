/*
 * The fuzzers' view of their input: a byte stream that decides, one small number at a time, what
 * a hostile device does next. Reading past the end gives zeros, so every input is a complete
 * script and short inputs end the run quickly.
 */
#ifndef BLIMP_FUZZ_INPUT_H
#define BLIMP_FUZZ_INPUT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct fz {
    const uint8_t *p;
    size_t n;
};

static inline bool fz_more(const struct fz *f)
{
    return f->n > 0;
}

static inline uint8_t fz_u8(struct fz *f)
{
    if (!f->n)
        return 0;
    f->n--;
    return *f->p++;
}

static inline uint16_t fz_u16(struct fz *f)
{
    uint16_t lo = fz_u8(f);
    return (uint16_t)(lo | fz_u8(f) << 8);
}

static inline uint32_t fz_u32(struct fz *f)
{
    uint32_t lo = fz_u16(f);
    return lo | (uint32_t)fz_u16(f) << 16;
}

static inline uint64_t fz_u64(struct fz *f)
{
    uint64_t lo = fz_u32(f);
    return lo | (uint64_t)fz_u32(f) << 32;
}

static inline bool fz_bool(struct fz *f)
{
    return fz_u8(f) & 1;
}

/* A number in [0, n), n > 0. */
static inline unsigned fz_below(struct fz *f, unsigned n)
{
    return (n <= 256 ? fz_u8(f) : fz_u16(f)) % n;
}

/* A "small or interesting" 32-bit value: most often near 0 or near a limit, sometimes anything. */
static inline uint32_t fz_len(struct fz *f, uint32_t typical)
{
    switch (fz_u8(f) & 7) {
    case 0:
        return 0;
    case 1:
        return typical;
    case 2:
        return typical + 1;
    case 3:
        return typical ? typical - 1 : 0;
    case 4:
        return 0xffffffffu;
    case 5:
        return fz_u8(f);
    default:
        return fz_u32(f);
    }
}

#endif
