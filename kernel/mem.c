#include "kernel/mem.h"
#include "lib/printf.h"
#include "lib/string.h"
#include "arch/x86/paging.h"

struct buddy kernel_buddy;
struct mem_layout mem_layout;

extern char _kernel_start[], _kernel_end[];

#define FOUR_GIB (4ull << 30)

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) & ~(a - 1);
}

static uint64_t align_down(uint64_t v, uint64_t a)
{
    return v & ~(a - 1);
}

/* Page-table pages come from the allocator itself: buddy_init touches no page contents, and
 * lowest-address-first allocation hands out pages below 4 GiB, which are already mapped. */
static uint64_t table_page(void)
{
    uint64_t pfn = buddy_alloc(&kernel_buddy, 0);
    if (pfn == BUDDY_NONE)
        return 0;
    mem_layout.table_pages++;
    void *p = phys_to_virt(pfn << PAGE_SHIFT);
    memset(p, 0, PAGE_SIZE);
    return pfn << PAGE_SHIFT;
}

/* Add [start, end) minus the excluded ranges (sorted, non-overlapping), as memory nobody has
 * written since boot: the host does not back it yet (mm/buddy.h, backed and unbacked). */
static void add_usable(uint64_t start, uint64_t end, const uint64_t excl[][2], unsigned nexcl)
{
    for (unsigned i = 0; i < nexcl && start < end; i++) {
        if (excl[i][1] <= start || excl[i][0] >= end)
            continue;
        if (excl[i][0] > start)
            buddy_add_range_untouched(&kernel_buddy, start >> PAGE_SHIFT,
                                      (excl[i][0] - start) >> PAGE_SHIFT);
        start = excl[i][1];
    }
    if (start < end)
        buddy_add_range_untouched(&kernel_buddy, start >> PAGE_SHIFT, (end - start) >> PAGE_SHIFT);
}

int mem_init(const struct boot_info *bi, bool poison, uint64_t poison_pattern)
{
    uint64_t lo = UINT64_MAX, hi = 0;
    for (unsigned i = 0; i < bi->nregions; i++) {
        const struct mem_region *r = &bi->regions[i];
        if (r->type != MEM_RAM)
            continue;
        mem_layout.ram_bytes += r->size;
        uint64_t s = align_up(r->base, PAGE_SIZE), e = align_down(r->base + r->size, PAGE_SIZE);
        if (s >= e)
            continue;
        lo = s < lo ? s : lo;
        hi = e > hi ? e : hi;
    }
    if (hi == 0) {
        kprintf("blimp: error: the memory map has no RAM\n");
        return -1;
    }
    mem_layout.span_base_pfn = lo >> PAGE_SHIFT;
    mem_layout.span_pages = (hi - lo) >> PAGE_SHIFT;
    mem_layout.meta_bytes = buddy_meta_bytes(mem_layout.span_pages);

    /* Metadata goes into the first RAM below 4 GiB (identity-mapped since entry) above the
     * kernel that can hold it. */
    uint64_t kstart = (uint64_t)(uintptr_t)_kernel_start, kend = (uint64_t)(uintptr_t)_kernel_end;
    uint64_t need = align_up(mem_layout.meta_bytes, PAGE_SIZE);
    for (unsigned i = 0; i < bi->nregions && !mem_layout.meta_phys; i++) {
        const struct mem_region *r = &bi->regions[i];
        uint64_t s = align_up(r->base, PAGE_SIZE), e = align_down(r->base + r->size, PAGE_SIZE);
        if (r->type != MEM_RAM)
            continue;
        if (e > FOUR_GIB)
            e = FOUR_GIB;
        if (s < kend)
            s = kend;
        if (e > s && e - s >= need)
            mem_layout.meta_phys = s;
    }
    if (!mem_layout.meta_phys) {
        kprintf("blimp: error: no room below 4 GiB for %lu bytes of allocator metadata\n",
                mem_layout.meta_bytes);
        return -1;
    }
    void *meta = phys_to_virt(mem_layout.meta_phys);
    if (buddy_init(&kernel_buddy, meta, mem_layout.meta_bytes, mem_layout.span_base_pfn,
                   mem_layout.span_pages) != 0) {
        kprintf("blimp: error: buddy_init refused its metadata area\n");
        return -1;
    }

    /* Kept out of the allocator: page 0 (so physical 0 is never handed out and a NULL is always
     * a bug), the kernel image, and the metadata. Sorted by address. */
    const uint64_t excl[3][2] = {
        {0, PAGE_SIZE},
        {align_down(kstart, PAGE_SIZE), kend},
        {mem_layout.meta_phys, mem_layout.meta_phys + need},
    };
    for (unsigned i = 0; i < bi->nregions; i++) {
        const struct mem_region *r = &bi->regions[i];
        if (r->type == MEM_RAM)
            add_usable(align_up(r->base, PAGE_SIZE), align_down(r->base + r->size, PAGE_SIZE), excl,
                       3);
    }

    /* Map RAM above 4 GiB before anything can touch it (poisoning, the workload). */
    paging_set_table_allocator(table_page);
    for (unsigned i = 0; i < bi->nregions; i++) {
        const struct mem_region *r = &bi->regions[i];
        if (r->type == MEM_RAM && r->base + r->size > FOUR_GIB) {
            uint64_t s = r->base > FOUR_GIB ? r->base : FOUR_GIB;
            if (paging_map(s, r->base + r->size - s, MAP_RAM) != 0) {
                kprintf("blimp: error: out of page-table pages mapping RAM at 0x%lx\n", s);
                return -1;
            }
        }
    }

    struct buddy_stats st;
    buddy_get_stats(&kernel_buddy, &st);
    mem_layout.managed_pages = st.total_pages;
    uint64_t ram_pages = 0;
    for (unsigned i = 0; i < bi->nregions; i++) {
        const struct mem_region *r = &bi->regions[i];
        uint64_t s = align_up(r->base, PAGE_SIZE), e = align_down(r->base + r->size, PAGE_SIZE);
        if (r->type == MEM_RAM && e > s)
            ram_pages += (e - s) >> PAGE_SHIFT;
    }
    mem_layout.excluded_pages = ram_pages - st.total_pages;

    if (poison)
        buddy_set_poison(&kernel_buddy, true, poison_pattern);
    return 0;
}
