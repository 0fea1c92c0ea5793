/*
 * In-guest allocator checks over all of RAM (blimp.mode=selftest). The host unit tests cover the
 * allocator's logic on simulated memory; this proves it on the real memory map: every page the
 * allocator hands out is real, writable, distinct RAM, and everything coalesces back.
 */
#include "kernel/selftest.h"
#include "kernel/mem.h"
#include "kernel/report.h"
#include "lib/string.h"

#define STAMP_SEED 0x9e3779b97f4a7c15ull

extern char _kernel_start[], _kernel_end[];

/* A block taken during the test, recorded in its own first bytes (we own its contents). */
struct taken {
    uint64_t next_pfn; /* BUDDY_NONE ends the list */
    uint64_t order;
};

static struct taken *block_at(uint64_t pfn)
{
    return phys_to_virt(pfn << PAGE_SHIFT);
}

static uint64_t stamp_for(uint64_t pfn)
{
    return (pfn + 1) * STAMP_SEED;
}

/* Each page gets its own value in its last word (the first words of a head page hold the
 * list), so two pages that alias the same memory cannot both verify. */
static void stamp(uint64_t pfn)
{
    uint64_t *p = phys_to_virt(pfn << PAGE_SHIFT);
    p[PAGE_SIZE / 8 - 1] = stamp_for(pfn);
}

static bool stamped(uint64_t pfn, uint64_t *found)
{
    uint64_t *p = phys_to_virt(pfn << PAGE_SHIFT);
    *found = p[PAGE_SIZE / 8 - 1];
    return *found == stamp_for(pfn);
}

static bool same_layout(const struct buddy_stats *a, const struct buddy_stats *b)
{
    for (unsigned k = 0; k <= BUDDY_MAX_ORDER; k++)
        if (a->free_blocks[k] != b->free_blocks[k])
            return false;
    return a->free_pages == b->free_pages;
}

static void check_memory_map(const struct boot_info *bi)
{
    bool sorted = true, nonzero = true;
    for (unsigned i = 0; i < bi->nregions; i++) {
        nonzero &= bi->regions[i].size != 0;
        if (i)
            sorted &= bi->regions[i - 1].base <= bi->regions[i].base;
    }
    report(sorted && nonzero, "memory map is sorted and has no zero-length entries (%u entries)",
           bi->nregions);
}

static void check_accounting(void)
{
    struct buddy_stats st;
    buddy_get_stats(&kernel_buddy, &st);
    uint64_t sum = 0;
    for (unsigned k = 0; k <= BUDDY_MAX_ORDER; k++)
        sum += st.free_blocks[k] << k;
    report(sum == st.free_pages, "free blocks per order add up to the free page count (%lu pages)",
           st.free_pages);
    report(st.total_pages + mem_layout.excluded_pages <= mem_layout.ram_bytes / PAGE_SIZE &&
               mem_layout.excluded_pages * PAGE_SIZE <
                   (uint64_t)(_kernel_end - _kernel_start) + mem_layout.meta_bytes + (8ull << 20),
           "managed pages (%lu) = RAM pages minus page 0, kernel and metadata (%lu excluded)",
           st.total_pages, mem_layout.excluded_pages);
    report(st.meta_bytes * 1000 <= st.total_pages * PAGE_SIZE,
           "allocator metadata is at most 0.1%% of managed RAM (%lu bytes)", st.meta_bytes);
}

/* blimp.inject=stamp: overwrite the stamp of one page in the middle of the first block taken,
 * as a host that corrupted or lost a page would; the stamp check must name exactly this page. */
static void inject_stamp(uint64_t head)
{
    uint64_t pfn = head + (1ull << block_at(head)->order) / 2;
    uint64_t *p = phys_to_virt(pfn << PAGE_SHIFT);
    p[PAGE_SIZE / 8 - 1] = ~stamp_for(pfn);
    report_info("injected: overwrote the stamp of page 0x%lx", pfn << PAGE_SHIFT);
}

static void check_all_ram(enum fault_inject inject)
{
    struct buddy_stats before, after;
    buddy_get_stats(&kernel_buddy, &before);

    /* Take everything, largest blocks first. */
    uint64_t head = BUDDY_NONE, pages = 0, blocks = 0;
    unsigned order;
    for (;;) {
        uint64_t pfn = buddy_alloc_largest(&kernel_buddy, BUDDY_MAX_ORDER, &order);
        if (pfn == BUDDY_NONE)
            break;
        struct taken *t = block_at(pfn);
        t->next_pfn = head;
        t->order = order;
        head = pfn;
        pages += 1ull << order;
        blocks++;
    }
    report(pages == before.free_pages, "allocated every free page (%lu pages in %lu blocks)", pages,
           blocks);
    report(buddy_alloc(&kernel_buddy, 0) == BUDDY_NONE, "allocator is exhausted afterwards");

    for (uint64_t b = head; b != BUDDY_NONE; b = block_at(b)->next_pfn)
        for (uint64_t i = 0; i < (1ull << block_at(b)->order); i++)
            stamp(b + i);
    if (inject == INJECT_STAMP && head != BUDDY_NONE)
        inject_stamp(head);
    uint64_t bad = 0, first_bad = 0, found = 0;
    for (uint64_t b = head; b != BUDDY_NONE; b = block_at(b)->next_pfn) {
        for (uint64_t i = 0; i < (1ull << block_at(b)->order); i++) {
            uint64_t f;
            if (!stamped(b + i, &f)) {
                if (!bad++) {
                    first_bad = (b + i) << PAGE_SHIFT;
                    found = f;
                }
            }
        }
    }
    report(bad == 0, "every page holds its own stamp (%lu bad; first at 0x%lx read 0x%lx)", bad,
           first_bad, found);

    for (uint64_t b = head; b != BUDDY_NONE;) {
        uint64_t next = block_at(b)->next_pfn;
        buddy_free(&kernel_buddy, b, (unsigned)block_at(b)->order);
        b = next;
    }
    buddy_get_stats(&kernel_buddy, &after);
    report(same_layout(&before, &after), "freeing everything restores the initial free blocks");
}

static void check_order0_churn(void)
{
    struct buddy_stats before, after;
    buddy_get_stats(&kernel_buddy, &before);
    enum { N = 4096 };
    static uint64_t pfns[N];
    unsigned n = 0, dup = 0;
    for (; n < N; n++) {
        pfns[n] = buddy_alloc(&kernel_buddy, 0);
        if (pfns[n] == BUDDY_NONE)
            break;
        stamp(pfns[n]);
    }
    for (unsigned i = 0; i < n; i++) {
        uint64_t f;
        dup += !stamped(pfns[i], &f);
    }
    report(n == N && dup == 0, "%u order-0 pages are distinct and hold their stamps", n);
    /* Free in a scrambled order so merging happens from every direction. */
    for (unsigned i = 0; i < n; i++) {
        unsigned j = (unsigned)((i * 2654435761u) % n);
        uint64_t t = pfns[i];
        pfns[i] = pfns[j];
        pfns[j] = t;
    }
    int errors = 0;
    for (unsigned i = 0; i < n; i++)
        errors += buddy_free(&kernel_buddy, pfns[i], 0) != 0;
    buddy_get_stats(&kernel_buddy, &after);
    report(errors == 0 && same_layout(&before, &after),
           "freeing them in scrambled order coalesces fully");
    report(buddy_free(&kernel_buddy, pfns[0], 0) != 0, "a double free is refused");
}

struct poison_scan {
    uint64_t pattern, pages, bad, first_bad;
};

static int scan_free_block(void *ctx, uint64_t pfn, unsigned order, bool reported)
{
    struct poison_scan *s = ctx;
    (void)reported; /* nothing is reported in selftest: every free block must hold the pattern */
    for (uint64_t i = 0; i < (1ull << order); i++) {
        const uint64_t *p = phys_to_virt((pfn + i) << PAGE_SHIFT);
        if (p[0] != s->pattern && !s->bad++)
            s->first_bad = (pfn + i) << PAGE_SHIFT;
        s->pages++;
    }
    return 0;
}

/* Poisoning must really have happened: the first word of every free page holds the pattern. */
static void check_poison_present(const struct options *o)
{
    if (!o->poison) {
        report_skip("free pages hold the poison pattern (blimp.poison=0)");
        return;
    }
    struct poison_scan s = {.pattern = o->poison_pattern};
    buddy_walk_free(&kernel_buddy, 0, scan_free_block, &s);
    report(s.pages > 0 && s.bad == 0,
           "free pages hold the poison pattern (%lu pages, %lu without; first at 0x%lx)", s.pages,
           s.bad, s.first_bad);
}

static int first_free_block(void *ctx, uint64_t pfn, unsigned order, bool reported)
{
    (void)reported;
    *(uint64_t *)ctx = pfn + (1ull << order) / 2;
    return 1;
}

/* blimp.inject=poison: overwrite one word in the middle of a free, poisoned page, as a stray
 * write (or a host that handed back the wrong contents) would; allocating it must notice. */
static void inject_poison(void)
{
    uint64_t pfn = BUDDY_NONE;
    buddy_walk_free(&kernel_buddy, 0, first_free_block, &pfn);
    if (pfn == BUDDY_NONE)
        return;
    uint64_t addr = (pfn << PAGE_SHIFT) + 100 * 8;
    uint64_t *p = phys_to_virt(addr);
    *p = ~*p;
    report_info("injected: overwrote the word at 0x%lx of a free poisoned page", addr);
}

static void check_poison(const struct options *o)
{
    struct buddy_stats st;
    buddy_get_stats(&kernel_buddy, &st);
    if (!o->poison) {
        report_skip("no poison mismatches (blimp.poison=0)");
        return;
    }
    report(st.poison_errors == 0,
           "no poison mismatches after all allocations (%lu; latest at 0x%lx)", st.poison_errors,
           st.poison_errors ? kernel_buddy.poison_bad_phys : 0);
}

int selftest_run(const struct boot_info *bi, const struct options *o)
{
    check_memory_map(bi);
    check_accounting();
    check_poison_present(o);
    if (o->inject == INJECT_POISON)
        inject_poison();
    check_all_ram(o->inject);
    check_order0_churn();
    check_poison(o);
    return report_summary();
}
