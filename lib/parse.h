/*
 * Numbers as people and loaders write them: decimal or 0x hex, with an optional K/M/G suffix.
 * Kept apart from lib/string.c (which defines memcpy and friends for the freestanding kernel)
 * so that host unit tests and fuzzers can link it next to libc.
 */
#ifndef LIB_PARSE_H
#define LIB_PARSE_H

#include <stdbool.h>
#include <stdint.h>

#define PARSE_HEX    0x1 /* accept 0x... */
#define PARSE_SUFFIX 0x2 /* accept a K, M or G suffix (x 2^10, 2^20, 2^30) */

/* The whole string as a number of the kinds flags allow, at most max; false on anything else
 * (empty, trailing characters, overflow past max). */
bool parse_number(const char *s, unsigned flags, uint64_t max, uint64_t *out);

/* parse_number with hex and suffixes, up to UINT64_MAX: the command line and the agent. */
bool parse_u64(const char *s, uint64_t *out);

#endif
