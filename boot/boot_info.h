/*
 * What every boot path hands to the rest of the kernel: one memory map (sorted, zero-length
 * entries dropped, every non-RAM type kept as reserved), the command line and the ACPI RSDP.
 */
#ifndef BOOT_BOOT_INFO_H
#define BOOT_BOOT_INFO_H

#include <stdbool.h>
#include <stdint.h>

#define MB1_BOOT_MAGIC 0x2BADB002
#define MB2_BOOT_MAGIC 0x36d76289
#define PVH_BOOT_MAGIC 0x336ec578

enum boot_protocol { BOOT_MULTIBOOT1, BOOT_MULTIBOOT2, BOOT_PVH };

enum mem_type {
    MEM_RAM = 1,      /* usable */
    MEM_RESERVED = 2, /* anything the firmware did not call RAM */
    MEM_ACPI = 3,     /* ACPI tables, reclaimable after parsing (kept reserved) */
    MEM_NVS = 4,      /* ACPI non-volatile storage */
    MEM_BAD = 5,
};

struct mem_region {
    uint64_t base;
    uint64_t size;
    uint32_t type; /* enum mem_type; unknown firmware types are stored as MEM_RESERVED */
};

#define BOOT_MAX_REGIONS 128
#define BOOT_CMDLINE_MAX 1024

struct boot_info {
    enum boot_protocol protocol;
    char cmdline[BOOT_CMDLINE_MAX];
    unsigned nregions;
    struct mem_region regions[BOOT_MAX_REGIONS];
    uint64_t rsdp_phys;     /* 0 when the loader gave none */
    unsigned dropped;       /* map entries dropped: zero length, or beyond BOOT_MAX_REGIONS */
    bool cmdline_truncated; /* the loader's command line did not fit */
};

/* Fills bi from what the loader left; returns 0, or -1 for an unknown magic. */
int boot_info_parse(uint32_t magic, uint64_t info_phys, struct boot_info *bi);
const char *boot_protocol_name(enum boot_protocol p);
const char *mem_type_name(uint32_t type);
uint64_t boot_ram_bytes(const struct boot_info *bi);

#endif
