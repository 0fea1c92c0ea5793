#include "arch/x86/paging.h"
#include "arch/x86/cpu.h"

#include <stdbool.h>

#define PTE_PRESENT 0x001ull
#define PTE_WRITE   0x002ull
#define PTE_PWT     0x008ull
#define PTE_PCD     0x010ull
#define PTE_HUGE    0x080ull
#define PTE_ADDR    0x000ffffffffff000ull
#define LARGE_PAGE  (2ull << 20)

extern uint64_t boot_pml4[512];
static page_table_alloc_fn table_alloc;

void paging_set_table_allocator(page_table_alloc_fn fn)
{
    table_alloc = fn;
}

/* The next-level table behind entry *e, created on demand. */
static uint64_t *next_table(uint64_t *e)
{
    if (!(*e & PTE_PRESENT)) {
        uint64_t page = table_alloc ? table_alloc() : 0;
        if (!page)
            return 0;
        *e = page | PTE_PRESENT | PTE_WRITE;
    }
    return (uint64_t *)(uintptr_t)(*e & PTE_ADDR);
}

int paging_map(uint64_t phys, uint64_t size, enum map_kind kind)
{
    uint64_t flags = PTE_PRESENT | PTE_WRITE | PTE_HUGE;
    if (kind == MAP_MMIO)
        flags |= PTE_PCD | PTE_PWT;
    uint64_t start = phys & ~(LARGE_PAGE - 1);
    uint64_t end = (phys + size + LARGE_PAGE - 1) & ~(LARGE_PAGE - 1);
    bool changed = false;
    for (uint64_t a = start; a < end; a += LARGE_PAGE) {
        uint64_t *pdpt = next_table(&boot_pml4[(a >> 39) & 511]);
        uint64_t *pd = pdpt ? next_table(&pdpt[(a >> 30) & 511]) : 0;
        if (!pd)
            return -1;
        uint64_t *pde = &pd[(a >> 21) & 511];
        uint64_t want = a | flags;
        if (*pde != want) {
            changed |= (*pde & PTE_PRESENT) != 0;
            *pde = want;
        }
    }
    if (changed)
        write_cr3(read_cr3()); /* an existing mapping changed (e.g. RAM -> uncached MMIO) */
    return 0;
}
