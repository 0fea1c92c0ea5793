/*
 * A small seeded pseudo-random generator: splitmix64 (Steele, Lea, Flood 2014; the generator
 * Java's SplittableRandom and xoshiro's seeding use). One 64-bit word of state, every seed a
 * good one, and the same seed gives the same stream on every build and host: stress mode
 * replays a run from its seed alone. Header-only and freestanding.
 */
#ifndef LIB_PRNG_H
#define LIB_PRNG_H

#include <stdint.h>

#define PRNG_GOLDEN 0x9e3779b97f4a7c15ull

/* splitmix64's output function: a bijection of 64-bit words that mixes every input bit into
 * every output bit (also used on its own to derive values from addresses). */
static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

struct prng {
    uint64_t state;
};

static inline void prng_seed(struct prng *r, uint64_t seed)
{
    r->state = seed;
}

static inline uint64_t prng_next(struct prng *r)
{
    r->state += PRNG_GOLDEN;
    return mix64(r->state);
}

/* A value in [0, n), n > 0 (modulo: the bias is below n / 2^64, irrelevant here). */
static inline uint64_t prng_below(struct prng *r, uint64_t n)
{
    return prng_next(r) % n;
}

#endif
