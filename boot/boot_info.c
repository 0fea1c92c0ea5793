/*
 * Multiboot1, multiboot2 and PVH -> struct boot_info. Loaders differ in the details that bite:
 * QEMU puts the image file name in front of a multiboot1 command line; microvm's maps are
 * unsorted and end with an all-zero entry; GRUB's UEFI maps are fragmented with many types.
 */
#include "boot/boot_info.h"
#include "lib/string.h"

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
    if (size == 0 || bi->nregions == BOOT_MAX_REGIONS) {
        bi->dropped++;
        return;
    }
    if (type < MEM_RAM || type > MEM_BAD)
        type = MEM_RESERVED;
    struct mem_region *r = &bi->regions[bi->nregions++];
    r->base = base;
    r->size = size;
    r->type = type;
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
    bi->cmdline_truncated = strlcpy(bi->cmdline, s, sizeof(bi->cmdline)) >= sizeof(bi->cmdline);
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

static void parse_mb2(uint64_t info, struct boot_info *bi)
{
    uint64_t total = rd32(info), p = info + 8, end = info + total;
    while (p + 8 <= end) {
        uint32_t type = rd32(p), size = rd32(p + 4);
        if (type == 0 || size < 8)
            break;
        switch (type) {
        case 1: /* command line */
            set_cmdline(bi, p + 8, false);
            break;
        case 6: { /* memory map */
            uint32_t entry_size = rd32(p + 8);
            if (entry_size < 24)
                break;
            for (uint64_t e = p + 16; e + 24 <= p + size; e += entry_size)
                add_region(bi, rd64(e), rd64(e + 8), rd32(e + 16));
            break;
        }
        case 14: /* ACPI 1.0 RSDP copy */
            if (!bi->rsdp_phys)
                bi->rsdp_phys = p + 8;
            break;
        case 15: /* ACPI 2.0+ RSDP copy: preferred */
            bi->rsdp_phys = p + 8;
            break;
        }
        p += (size + 7) & ~7u;
    }
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
        bi->protocol = BOOT_MULTIBOOT2;
        parse_mb2(info_phys, bi);
        break;
    case PVH_BOOT_MAGIC:
        if (rd32(info_phys) != PVH_BOOT_MAGIC)
            return -1;
        bi->protocol = BOOT_PVH;
        parse_pvh(info_phys, bi);
        break;
    default:
        return -1;
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
