#include "mm/blocklist.h"

/* One record page: a link to the previous page, a count, then the records (pfn << 8 | order). */
#define RECORDS_PER_CHUNK ((PAGE_SIZE / 8) - 2)

struct chunk {
    uint64_t prev;
    uint64_t n;
    uint64_t rec[RECORDS_PER_CHUNK];
};

static struct chunk *chunk_at(uint64_t pfn)
{
    return phys_to_virt(pfn << PAGE_SHIFT);
}

void blocklist_init(struct blocklist *bl, struct buddy *mm)
{
    *bl = (struct blocklist){.mm = mm, .top_chunk = BUDDY_NONE};
}

int blocklist_push(struct blocklist *bl, uint64_t pfn, unsigned order)
{
    struct chunk *c = bl->top_chunk == BUDDY_NONE ? NULL : chunk_at(bl->top_chunk);
    if (!c || c->n == RECORDS_PER_CHUNK) {
        uint64_t page = buddy_alloc(bl->mm, 0);
        if (page == BUDDY_NONE)
            return -1;
        c = chunk_at(page);
        c->prev = bl->top_chunk;
        c->n = 0;
        bl->top_chunk = page;
        bl->chunks++;
    }
    c->rec[c->n++] = pfn << 8 | order;
    bl->blocks++;
    bl->pages += 1ull << order;
    return 0;
}

bool blocklist_pop(struct blocklist *bl, uint64_t *pfn, unsigned *order)
{
    if (bl->top_chunk == BUDDY_NONE)
        return false;
    struct chunk *c = chunk_at(bl->top_chunk);
    uint64_t r = c->rec[--c->n];
    *pfn = r >> 8;
    *order = (unsigned)(r & 0xff);
    bl->blocks--;
    bl->pages -= 1ull << *order;
    if (c->n == 0) {
        uint64_t page = bl->top_chunk;
        bl->top_chunk = c->prev;
        bl->chunks--;
        buddy_free(bl->mm, page, 0);
    }
    return true;
}

int blocklist_for_each(const struct blocklist *bl, blocklist_fn fn, void *ctx)
{
    for (uint64_t p = bl->top_chunk; p != BUDDY_NONE; p = chunk_at(p)->prev) {
        const struct chunk *c = chunk_at(p);
        for (uint64_t i = c->n; i-- > 0;) {
            int rc = fn(ctx, c->rec[i] >> 8, (unsigned)(c->rec[i] & 0xff));
            if (rc)
                return rc;
        }
    }
    return 0;
}
