/*
 * A growable stack of (pfn, order) records kept in pages taken from the buddy allocator: how
 * the balloon remembers what it inflated, and the agent what it holds, without ever writing into
 * the recorded pages themselves (ballooned pages must not be touched).
 */
#ifndef MM_BLOCKLIST_H
#define MM_BLOCKLIST_H

#include "mm/buddy.h"
#include "include/platform.h"

struct blocklist {
    struct buddy *mm;
    uint64_t top_chunk; /* pfn of the newest record page, BUDDY_NONE when empty */
    uint64_t blocks;    /* records held */
    uint64_t pages;     /* pages covered by the records */
    uint64_t chunks;    /* record pages in use */
};

void blocklist_init(struct blocklist *bl, struct buddy *mm);
/* Returns 0, or -1 when no page could be had for a new record page. */
int blocklist_push(struct blocklist *bl, uint64_t pfn, unsigned order);
/* Returns false when empty. */
bool blocklist_pop(struct blocklist *bl, uint64_t *pfn, unsigned *order);
/* Calls fn for every record, newest first, until it returns non-zero. */
typedef int (*blocklist_fn)(void *ctx, uint64_t pfn, unsigned order);
int blocklist_for_each(const struct blocklist *bl, blocklist_fn fn, void *ctx);

#endif
