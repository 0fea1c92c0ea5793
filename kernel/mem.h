/* From the boot memory map to the buddy allocator that owns every usable page. */
#ifndef KERNEL_MEM_H
#define KERNEL_MEM_H

#include "boot/boot_info.h"
#include "mm/buddy.h"
#include "include/platform.h"

extern struct buddy kernel_buddy;

struct mem_layout {
    uint64_t ram_bytes;      /* sum of RAM entries in the map */
    uint64_t managed_pages;  /* pages handed to the buddy allocator */
    uint64_t excluded_pages; /* RAM pages kept out: page 0, the kernel image, allocator metadata */
    uint64_t meta_phys, meta_bytes;
    uint64_t span_base_pfn, span_pages;
    uint64_t table_pages; /* page-table pages taken to map RAM above 4 GiB */
};

extern struct mem_layout mem_layout;

/* Builds the allocator and maps all RAM; poisons free pages when asked. Returns 0 or -1 (the
 * reason is printed). */
int mem_init(const struct boot_info *bi, bool poison, uint64_t poison_pattern);

#endif
