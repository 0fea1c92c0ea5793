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
/* boot/entry.S's 64-bit entry (uefi_entry64, called by blimp.efi after ExitBootServices): the
 * info block is in multiboot2 format, built by boot/efi/main.c. "UEFI" in ASCII. */
#define UEFI_BOOT_MAGIC 0x55454649
/* boot/entry.S's linux_entry32 (build/blimp.bzImage's code32_start): the info is the Linux
 * boot_params ("zero page"). "HdrS" as a little-endian u32, the setup header's magic. */
#define LINUX_BOOT_MAGIC 0x53726448
/* linux_entry64 (code32_start + 0x200, long mode): the same boot_params. "Hd64". */
#define LINUX64_BOOT_MAGIC 0x34366448
/* A multiboot2 info block larger than this is taken as garbage. */
#define MB2_INFO_MAX (1u << 20)

enum boot_protocol { BOOT_MULTIBOOT1, BOOT_MULTIBOOT2, BOOT_PVH, BOOT_UEFI, BOOT_LINUX };

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
    /* 0 when the loader gave none (or a multiboot2 copy failed its signature or checksum).
     * Multiboot2 passes a copy inside its info block, which is RAM the allocator reuses:
     * read the RSDP before mem_init. */
    uint64_t rsdp_phys;
    unsigned dropped;       /* map entries dropped: zero length, or beyond BOOT_MAX_REGIONS */
    bool cmdline_truncated; /* the loader's command line did not fit */
    bool entry64;           /* BOOT_LINUX: entered at the 64-bit entry */
    const char *error;      /* why boot_info_parse returned -1 */
    uint64_t error_offset;  /* where in the loader's info block (multiboot2: tag offset,
                               Linux: the boot_params field's offset) */
};

/* Fills bi from what the loader left; returns 0, or -1 (bi->error says why) for an unknown
 * magic or a malformed info block. Host-testable: addresses are read through plain pointers. */
int boot_info_parse(uint32_t magic, uint64_t info_phys, struct boot_info *bi);
const char *boot_protocol_name(enum boot_protocol p);
const char *mem_type_name(uint32_t type);
uint64_t boot_ram_bytes(const struct boot_info *bi);

#endif
