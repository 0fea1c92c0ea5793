/*
 * Identity paging with 2 MiB pages. boot/entry.S maps the first 4 GiB; paging_map() extends the
 * map to RAM above 4 GiB and to MMIO anywhere (OVMF puts PCI BARs at 0xE000000000), taking page
 * table pages from the allocator the kernel registers.
 */
#ifndef ARCH_X86_PAGING_H
#define ARCH_X86_PAGING_H

#include <stdint.h>

enum map_kind { MAP_RAM, MAP_MMIO };

/* Returns the physical address of a zeroed, identity-mapped 4 KiB page, or 0. */
typedef uint64_t (*page_table_alloc_fn)(void);
void paging_set_table_allocator(page_table_alloc_fn fn);

/* Identity-map [phys, phys+size) (rounded out to 2 MiB). MMIO is mapped uncached.
 * Returns 0, or -1 when no page-table page could be had. */
int paging_map(uint64_t phys, uint64_t size, enum map_kind kind);

#endif
