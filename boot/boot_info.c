/*
 * Multiboot1, multiboot2, PVH, Linux boot_params and blimp.efi's handover (a multiboot2-format
 * block) -> struct boot_info. Loaders differ in the details that bite:
 * QEMU puts the image file name in front of a multiboot1 command line; microvm's maps are
 * unsorted and end with an all-zero entry; GRUB's UEFI maps are fragmented with many types.
 */
#include "boot/boot_info.h"
#include "lib/string.h" /* memcpy, memset: libc's in the host test */

static const void *phys(uint64_t addr)
{
    return (const void *)(uintptr_t)addr; /* the first 4 GiB are identity-mapped at entry */
}

static uint32_t rd32(uint64_t addr)
{
    uint32_t v;
    memcpy(&v, phys(addr), 4);
    return v;
}

static uint64_t rd64(uint64_t addr)
{
    uint64_t v;
    memcpy(&v, phys(addr), 8);
    return v;
}

static void add_region(struct boot_info *bi, uint64_t base, uint64_t size, uint32_t type)
{
    if (size == 0 || base + size < base) {
        bi->dropped++;
        return;
    }
    if (type < MEM_RAM || type > MEM_BAD)
        type = MEM_RESERVED;
    /* Firmware maps (UEFI above all) list neighbours of one kind separately: merge them. */
    struct mem_region *last = bi->nregions ? &bi->regions[bi->nregions - 1] : 0;
    if (last && last->type == type && last->base + last->size == base) {
        last->size += size;
        return;
    }
    if (bi->nregions == BOOT_MAX_REGIONS) {
        bi->dropped++;
        return;
    }
    struct mem_region *r = &bi->regions[bi->nregions++];
    r->base = base;
    r->size = size;
    r->type = type;
}

/* Copies at most BOOT_CMDLINE_MAX - 1 bytes; no lib/string strlcpy so a host test can build
 * this file against libc (glibc 2.36 has none). */
static void copy_cmdline(struct boot_info *bi, const char *s)
{
    size_t n = 0;
    while (s[n] && n < BOOT_CMDLINE_MAX - 1) {
        bi->cmdline[n] = s[n];
        n++;
    }
    bi->cmdline[n] = 0;
    bi->cmdline_truncated = s[n] != 0;
}

static void set_cmdline(struct boot_info *bi, uint64_t addr, bool skip_image_name)
{
    if (!addr)
        return;
    const char *s = phys(addr);
    if (skip_image_name) {
        /* "blimp-mb1.elf blimp.mode=x": the first word is the image unless it is an option. */
        const char *end = s;
        while (*end && *end != ' ')
            end++;
        bool is_option = false;
        for (const char *p = s; p < end; p++)
            if (*p == '=')
                is_option = true;
        if (!is_option)
            s = end;
    }
    while (*s == ' ')
        s++;
    copy_cmdline(bi, s);
}

static int reject(struct boot_info *bi, const char *why, uint64_t offset)
{
    bi->error = why;
    bi->error_offset = offset;
    return -1;
}

static void parse_mb1(uint64_t info, struct boot_info *bi)
{
    uint32_t flags = rd32(info);
    if (flags & (1u << 2))
        set_cmdline(bi, rd32(info + 16), true);
    if (flags & (1u << 6)) {
        uint64_t p = rd32(info + 48), end = p + rd32(info + 44);
        while (p + 24 <= end) {
            uint32_t size = rd32(p);
            add_region(bi, rd64(p + 4), rd64(p + 12), rd32(p + 20));
            p += (uint64_t)size + 4;
        }
    } else if (flags & 1u) {
        /* Only mem_lower/mem_upper (KiB): conventional memory and memory above 1 MiB. */
        add_region(bi, 0, (uint64_t)rd32(info + 4) << 10, MEM_RAM);
        add_region(bi, 1 << 20, (uint64_t)rd32(info + 8) << 10, MEM_RAM);
    }
}

/* UEFI memory types (UEFI 2.10, 7.2): after ExitBootServices loader and boot-services memory is
 * free RAM like conventional memory; ACPI reclaim and NVS keep their meaning; unusable memory is
 * bad; runtime services, MMIO, PAL code, persistent and unaccepted memory stay reserved. */
static uint32_t efi_mem_type(uint32_t efi)
{
    switch (efi) {
    case 1: /* EfiLoaderCode */
    case 2: /* EfiLoaderData */
    case 3: /* EfiBootServicesCode */
    case 4: /* EfiBootServicesData */
    case 7: /* EfiConventionalMemory */
        return MEM_RAM;
    case 8: /* EfiUnusableMemory */
        return MEM_BAD;
    case 9: /* EfiACPIReclaimMemory */
        return MEM_ACPI;
    case 10: /* EfiACPIMemoryNVS */
        return MEM_NVS;
    default:
        return MEM_RESERVED;
    }
}

/* Tag 6: entry_size, entry_version, then {u64 base, u64 length, u32 type, u32 reserved}. */
static void parse_mb2_mmap(uint64_t tag, uint32_t size, struct boot_info *bi)
{
    uint32_t entry_size = rd32(tag + 8);
    for (uint64_t e = tag + 16; e + entry_size <= tag + size; e += entry_size)
        add_region(bi, rd64(e), rd64(e + 8), rd32(e + 16));
}

/* Tag 17: descr_size, descr_version, then EFI_MEMORY_DESCRIPTORs {u32 type, u32 pad,
 * u64 physical start, u64 virtual start, u64 pages, u64 attribute}. */
static void parse_mb2_efi_mmap(uint64_t tag, uint32_t size, struct boot_info *bi)
{
    uint32_t descr_size = rd32(tag + 8);
    for (uint64_t e = tag + 16; e + descr_size <= tag + size; e += descr_size) {
        uint64_t pages = rd64(e + 24);
        if (pages >> 52) { /* more than 2^64 bytes */
            bi->dropped++;
            continue;
        }
        add_region(bi, rd64(e + 8), pages << 12, efi_mem_type(rd32(e)));
    }
}

/* "RSD PTR " and the ACPI 1.0 checksum over the first 20 bytes (ACPI 6.5, 5.2.5.3). */
static bool rsdp_valid(uint64_t addr)
{
    const uint8_t *r = phys(addr);
    uint8_t sum = 0;
    for (int i = 0; i < 20; i++)
        sum += r[i];
    return memcmp(r, "RSD PTR ", 8) == 0 && sum == 0;
}

static bool has_nul(uint64_t from, uint64_t to)
{
    const char *s = phys(from);
    for (uint64_t i = 0; i < to - from; i++)
        if (!s[i])
            return true;
    return false;
}

/* A bounded walk: every tag must lie inside total_size, be at least 8 bytes and the list must
 * end with the 8-byte end tag; the tags we use are checked for their own minimum sizes. When
 * the loader gives both maps (GRUB on UEFI) the EFI one (tag 17) is used: it is the firmware's
 * own, with more types. */
static int parse_mb2(uint64_t info, struct boot_info *bi)
{
    if (info & 7)
        return reject(bi, "multiboot2 info is not 8-byte aligned", 0);
    uint32_t total = rd32(info);
    if (total < 16 || total > MB2_INFO_MAX)
        return reject(bi, "multiboot2 total_size out of range", 0);
    uint64_t p = info + 8, end = info + total, mmap = 0, efi_mmap = 0;
    uint32_t mmap_size = 0, efi_mmap_size = 0;
    bool ended = false;
    while (!ended && p + 8 <= end) {
        uint32_t type = rd32(p), size = rd32(p + 4);
        uint64_t off = p - info;
        if (size < 8 || size > end - p)
            return reject(bi, "multiboot2 tag size out of bounds", off);
        switch (type) {
        case 0: /* end */
            if (size != 8)
                return reject(bi, "multiboot2 end tag size is not 8", off);
            ended = true;
            break;
        case 1: /* command line */
            if (!has_nul(p + 8, p + size))
                return reject(bi, "multiboot2 command line is not NUL-terminated", off);
            set_cmdline(bi, p + 8, false);
            break;
        case 6: /* memory map */
            if (size < 16 || rd32(p + 8) < 24 || rd32(p + 8) % 8)
                return reject(bi, "multiboot2 memory map tag malformed", off);
            mmap = p;
            mmap_size = size;
            break;
        case 14: /* ACPI 1.0 RSDP copy (20 bytes) */
            if (size < 8 + 20)
                return reject(bi, "multiboot2 ACPI old RSDP tag too short", off);
            if (!bi->rsdp_phys && rsdp_valid(p + 8))
                bi->rsdp_phys = p + 8;
            break;
        case 15: /* ACPI 2.0+ RSDP copy (36 bytes or more): preferred */
            if (size < 8 + 36)
                return reject(bi, "multiboot2 ACPI new RSDP tag too short", off);
            if (rsdp_valid(p + 8))
                bi->rsdp_phys = p + 8;
            break;
        case 17: /* EFI memory map */
            if (size < 16 || rd32(p + 8) < 40 || rd32(p + 8) % 8)
                return reject(bi, "multiboot2 EFI memory map tag malformed", off);
            efi_mmap = p;
            efi_mmap_size = size;
            break;
        }
        p += (size + 7) & ~7u;
    }
    if (!ended)
        return reject(bi, "multiboot2 tag list has no end tag", p - info);
    if (efi_mmap)
        parse_mb2_efi_mmap(efi_mmap, efi_mmap_size, bi);
    else if (mmap)
        parse_mb2_mmap(mmap, mmap_size, bi);
    else
        return reject(bi, "multiboot2 info has no memory map", 0);
    return 0;
}

static void parse_pvh(uint64_t info, struct boot_info *bi)
{
    /* struct hvm_start_info: cmdline_paddr at +24, rsdp_paddr +32, memmap (v1) at +40/+48. */
    uint32_t version = rd32(info + 4);
    set_cmdline(bi, rd64(info + 24), false);
    bi->rsdp_phys = rd64(info + 32);
    if (version >= 1) {
        uint64_t map = rd64(info + 40);
        uint32_t n = rd32(info + 48);
        for (uint32_t i = 0; i < n; i++)
            add_region(bi, rd64(map + 24 * i), rd64(map + 24 * i + 8), rd32(map + 24 * i + 16));
    }
}

/* Linux boot_params (Documentation/arch/x86/boot.rst, "zero page"): the fields we read. */
#define BP_ACPI_RSDP_ADDR 0x070 /* u64, protocol 2.14 */
#define BP_EXT_CMD_LINE   0x0c8 /* u32, the high half of cmd_line_ptr */
#define BP_E820_ENTRIES   0x1e8 /* u8 */
#define BP_HEADER         0x202 /* u32 "HdrS" */
#define BP_VERSION        0x206 /* u16 */
#define BP_CMD_LINE_PTR   0x228 /* u32 */
#define BP_CMDLINE_SIZE   0x238 /* u32, protocol 2.06: longest line without its NUL */
#define BP_E820_TABLE     0x2d0 /* {u64 addr, u64 size, u32 type} x 128 */
#define BP_E820_MAX       128
#define BP_EFI_SIGNATURE  0x1c0 /* efi_info: u32 "EL64" from a 64-bit EFI loader */
#define BP_EFI_SYSTAB     0x1c4 /* u32, and the high half at 0x1d8 */
#define BP_EFI_SYSTAB_HI  0x1d8
#define EFI64_LOADER_SIG  0x34364c45            /* "EL64" */
#define EFI_SYSTAB_SIG    0x5453595320494249ull /* "IBI SYST" */
#define EFI_MAX_CONFIG    1024                  /* configuration table entries; OVMF has about 10 */

/* GRUB on UEFI sets no acpi_rsdp_addr but passes the EFI system table (efi_info), as Linux
 * expects: the RSDP is in its configuration table, ACPI 2.0+ preferred (UEFI 2.10, 4.6).
 * Anything not as expected gives 0, and the kernel scans the BIOS areas as for multiboot1. */
static uint64_t efi_rsdp(uint64_t bp)
{
    static const uint8_t acpi20[16] = {0x71, 0xe8, 0x68, 0x88, 0xf1, 0xe4, 0xd3, 0x11,
                                       0xbc, 0x22, 0x00, 0x80, 0xc7, 0x3c, 0x88, 0x81};
    static const uint8_t acpi10[16] = {0x30, 0x2d, 0x9d, 0xeb, 0x88, 0x2d, 0xd3, 0x11,
                                       0x9a, 0x16, 0x00, 0x90, 0x27, 0x3f, 0xc1, 0x4d};
    if (rd32(bp + BP_EFI_SIGNATURE) != EFI64_LOADER_SIG)
        return 0;
    uint64_t st = rd32(bp + BP_EFI_SYSTAB) | (uint64_t)rd32(bp + BP_EFI_SYSTAB_HI) << 32;
    if (!st || rd64(st) != EFI_SYSTAB_SIG)
        return 0;
    uint64_t n = rd64(st + 104), table = rd64(st + 112), v1 = 0;
    if (n > EFI_MAX_CONFIG || !table)
        return 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t e = table + 24 * i, rsdp = rd64(e + 16);
        if (!memcmp(phys(e), acpi20, 16) && rsdp && rsdp_valid(rsdp))
            return rsdp;
        if (!memcmp(phys(e), acpi10, 16) && rsdp && rsdp_valid(rsdp))
            v1 = rsdp;
    }
    return v1;
}

/* Both 32-bit loaders (which build boot_params) and our own real-mode setup (which fills in
 * e820_table from the BIOS) come here. The setup header is copied from build/blimp.bzImage, so
 * a missing magic or an old version means this is not boot_params at all. */
static int parse_linux(uint64_t bp, struct boot_info *bi)
{
    if (!bp)
        return reject(bi, "Linux boot_params address is 0", 0);
    if (rd32(bp + BP_HEADER) != LINUX_BOOT_MAGIC)
        return reject(bi, "Linux boot_params without the HdrS setup header", BP_HEADER);
    if ((rd32(bp + BP_VERSION) & 0xffff) < 0x0206)
        return reject(bi, "Linux boot_params: boot protocol older than 2.06", BP_VERSION);
    uint8_t n = *(const uint8_t *)phys(bp + BP_E820_ENTRIES);
    if (n > BP_E820_MAX)
        return reject(bi, "Linux boot_params: e820_entries above 128", BP_E820_ENTRIES);
    if (n == 0)
        return reject(bi, "Linux boot_params: no e820 memory map", BP_E820_ENTRIES);
    uint64_t cmd = rd32(bp + BP_CMD_LINE_PTR) | (uint64_t)rd32(bp + BP_EXT_CMD_LINE) << 32;
    if (cmd) {
        uint32_t size = rd32(bp + BP_CMDLINE_SIZE);
        if (size == 0 || size > (1u << 20)) /* Linux uses 2047; more is garbage */
            return reject(bi, "Linux boot_params: cmdline_size out of range", BP_CMDLINE_SIZE);
        if (!has_nul(cmd, cmd + size + 1))
            return reject(bi, "Linux command line has no NUL within cmdline_size", BP_CMD_LINE_PTR);
        set_cmdline(bi, cmd, false);
    }
    uint64_t rsdp = rd64(bp + BP_ACPI_RSDP_ADDR);
    if (rsdp) {
        if (!rsdp_valid(rsdp))
            return reject(bi, "Linux boot_params: acpi_rsdp_addr is not an RSDP",
                          BP_ACPI_RSDP_ADDR);
        bi->rsdp_phys = rsdp;
    } else {
        bi->rsdp_phys = efi_rsdp(bp);
    }
    for (unsigned i = 0; i < n; i++) {
        uint64_t e = bp + BP_E820_TABLE + 20 * i;
        add_region(bi, rd64(e), rd64(e + 8), rd32(e + 16));
    }
    return 0;
}

/* Insertion sort by base: maps are short and nearly sorted. */
static void sort_regions(struct boot_info *bi)
{
    for (unsigned i = 1; i < bi->nregions; i++) {
        struct mem_region r = bi->regions[i];
        unsigned j = i;
        while (j > 0 && bi->regions[j - 1].base > r.base) {
            bi->regions[j] = bi->regions[j - 1];
            j--;
        }
        bi->regions[j] = r;
    }
}

int boot_info_parse(uint32_t magic, uint64_t info_phys, struct boot_info *bi)
{
    memset(bi, 0, sizeof(*bi));
    switch (magic) {
    case MB1_BOOT_MAGIC:
        bi->protocol = BOOT_MULTIBOOT1;
        parse_mb1(info_phys, bi);
        break;
    case MB2_BOOT_MAGIC:
    case UEFI_BOOT_MAGIC:
        bi->protocol = magic == UEFI_BOOT_MAGIC ? BOOT_UEFI : BOOT_MULTIBOOT2;
        if (parse_mb2(info_phys, bi) != 0)
            return -1;
        break;
    case PVH_BOOT_MAGIC:
        if (rd32(info_phys) != PVH_BOOT_MAGIC)
            return reject(bi, "PVH start info without its magic", 0);
        bi->protocol = BOOT_PVH;
        parse_pvh(info_phys, bi);
        break;
    case LINUX_BOOT_MAGIC:
    case LINUX64_BOOT_MAGIC:
        bi->protocol = BOOT_LINUX;
        bi->entry64 = magic == LINUX64_BOOT_MAGIC;
        if (parse_linux(info_phys, bi) != 0)
            return -1;
        break;
    default:
        return reject(bi, "unknown boot magic", 0);
    }
    sort_regions(bi);
    return 0;
}

const char *boot_protocol_name(enum boot_protocol p)
{
    switch (p) {
    case BOOT_MULTIBOOT1:
        return "multiboot1";
    case BOOT_MULTIBOOT2:
        return "multiboot2";
    case BOOT_PVH:
        return "pvh";
    case BOOT_UEFI:
        return "uefi";
    case BOOT_LINUX:
        return "linux";
    }
    return "unknown";
}

const char *mem_type_name(uint32_t type)
{
    switch (type) {
    case MEM_RAM:
        return "ram";
    case MEM_ACPI:
        return "acpi";
    case MEM_NVS:
        return "nvs";
    case MEM_BAD:
        return "bad";
    default:
        return "reserved";
    }
}

uint64_t boot_ram_bytes(const struct boot_info *bi)
{
    uint64_t sum = 0;
    for (unsigned i = 0; i < bi->nregions; i++)
        if (bi->regions[i].type == MEM_RAM)
            sum += bi->regions[i].size;
    return sum;
}
