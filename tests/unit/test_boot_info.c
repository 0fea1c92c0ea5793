/* boot/boot_info: the multiboot2 tag walk (GRUB and blimp.efi's handover) and the Linux
 * boot_params reader (build/blimp.bzImage) on built blocks. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdbool.h>
#include <string.h>

#include "boot/boot_info.h"

/* A multiboot2 info block under construction: total_size, reserved, 8-aligned tags. */
static _Alignas(8) unsigned char block[16384];
static size_t used;

static void put32(size_t off, uint32_t v)
{
    memcpy(block + off, &v, 4);
}

static void put64(size_t off, uint64_t v)
{
    memcpy(block + off, &v, 8);
}

static void begin(void)
{
    memset(block, 0xee, sizeof(block));
    used = 8;
    put32(4, 0);
}

/* Appends a tag of `size` bytes (header included) and returns its offset. */
static size_t tag(uint32_t type, uint32_t size)
{
    size_t off = used;
    put32(off, type);
    put32(off + 4, size);
    used += (size + 7) & ~7u;
    return off;
}

static void cmdline_tag(const char *s)
{
    size_t n = strlen(s) + 1, off = tag(1, 8 + n);
    memcpy(block + off + 8, s, n);
}

static void mmap_tag(const uint64_t (*e)[3], unsigned n)
{
    size_t off = tag(6, 16 + 24 * n);
    put32(off + 8, 24);
    put32(off + 12, 0);
    for (unsigned i = 0; i < n; i++) {
        put64(off + 16 + 24 * i, e[i][0]);
        put64(off + 24 + 24 * i, e[i][1]);
        put32(off + 32 + 24 * i, (uint32_t)e[i][2]);
        put32(off + 36 + 24 * i, 0);
    }
}

/* {efi type, physical start, pages}, 48-byte descriptors as OVMF writes them. */
static size_t efi_mmap_tag(const uint64_t (*e)[3], unsigned n)
{
    size_t off = tag(17, 16 + 48 * n);
    put32(off + 8, 48);
    put32(off + 12, 1);
    for (unsigned i = 0; i < n; i++) {
        size_t d = off + 16 + 48 * i;
        memset(block + d, 0, 48);
        put32(d, (uint32_t)e[i][0]);
        put64(d + 8, e[i][1]);
        put64(d + 24, e[i][2]);
    }
    return off;
}

/* An RSDP copy tag: signature, checksum over the first 20 bytes (broken on request). */
static size_t rsdp_tag(uint32_t type, unsigned bytes, bool good)
{
    size_t off = tag(type, 8 + bytes);
    unsigned char *r = block + off + 8;
    memset(r, 0, bytes);
    memcpy(r, "RSD PTR ", 8);
    memcpy(r + 9, "BLIMP ", 6);
    r[15] = type == 15 ? 2 : 0;
    unsigned char sum = 0;
    for (int i = 0; i < 20; i++)
        sum += r[i];
    r[8] = (unsigned char)(0x100 - sum) + (good ? 0 : 1);
    return off;
}

static void end(void)
{
    tag(0, 8);
    put32(0, (uint32_t)used);
}

static int parse(uint32_t magic, struct boot_info *bi)
{
    return boot_info_parse(magic, (uint64_t)(uintptr_t)block, bi);
}

static struct boot_info bi;

static const uint64_t E820[][3] = {
    {0x100000, 0x7ee0000, MEM_RAM}, /* unsorted on purpose */
    {0, 0x9fc00, MEM_RAM},
    {0x9fc00, 0x400, MEM_RESERVED},
    {0xfffc0000, 0x40000, 7 /* unknown: reserved */},
};

static void test_grub_bios_block(void **state)
{
    (void)state;
    begin();
    cmdline_tag("blimp.mode=boot blimp.poison=1");
    tag(2, 8 + 6); /* boot loader name: ignored */
    mmap_tag(E820, 4);
    size_t old = rsdp_tag(14, 20, true);
    end();
    assert_int_equal(parse(MB2_BOOT_MAGIC, &bi), 0);
    assert_int_equal(bi.protocol, BOOT_MULTIBOOT2);
    assert_string_equal(boot_protocol_name(bi.protocol), "multiboot2");
    assert_string_equal(bi.cmdline, "blimp.mode=boot blimp.poison=1");
    assert_false(bi.cmdline_truncated);
    assert_int_equal(bi.nregions, 4);
    assert_int_equal(bi.regions[0].base, 0);
    assert_int_equal(bi.regions[1].type, MEM_RESERVED);
    assert_int_equal(bi.regions[2].base, 0x100000);
    assert_int_equal(bi.regions[3].type, MEM_RESERVED);
    assert_int_equal(boot_ram_bytes(&bi), 0x9fc00 + 0x7ee0000);
    assert_ptr_equal((void *)(uintptr_t)bi.rsdp_phys, block + old + 8);
}

static void test_efi_map_preferred_and_converted(void **state)
{
    (void)state;
    static const uint64_t efi[][3] = {
        {7, 0, 0x9f},
        {6, 0x9f000, 1},
        {7, 0x100000, 0x700},
        {2, 0x800000, 0x10},
        {4, 0x810000, 0x20},
        {3, 0x830000, 0x10},
        {1, 0x840000, 0x10},
        {5, 0x850000, 0x10},
        {9, 0x860000, 2},
        {10, 0x862000, 1},
        {8, 0x863000, 1},
        {0, 0x864000, 1},
        {11, 0xffc00000, 0x400},
    };
    begin();
    mmap_tag(E820, 4); /* GRUB on UEFI gives both maps: tag 17 wins */
    efi_mmap_tag(efi, 13);
    size_t new = rsdp_tag(15, 36, true);
    rsdp_tag(14, 20, true);
    end();
    assert_int_equal(parse(UEFI_BOOT_MAGIC, &bi), 0);
    assert_string_equal(boot_protocol_name(bi.protocol), "uefi");
    assert_string_equal(bi.cmdline, "");
    /* 0-0x9f000 ram, runtime data reserved, 0x100000-0x850000 ram (conventional, loader,
     * boot services merged), runtime code reserved, ACPI, NVS, bad, reserved x2 */
    assert_int_equal(bi.nregions, 9);
    assert_int_equal(bi.regions[0].type, MEM_RAM);
    assert_int_equal(bi.regions[0].size, 0x9f000);
    assert_int_equal(bi.regions[1].type, MEM_RESERVED);
    assert_int_equal(bi.regions[2].base, 0x100000);
    assert_int_equal(bi.regions[2].size, 0x750000);
    assert_int_equal(bi.regions[2].type, MEM_RAM);
    assert_int_equal(bi.regions[3].type, MEM_RESERVED);
    assert_int_equal(bi.regions[4].type, MEM_ACPI);
    assert_int_equal(bi.regions[5].type, MEM_NVS);
    assert_int_equal(bi.regions[6].type, MEM_BAD);
    assert_int_equal(bi.regions[7].type, MEM_RESERVED);
    assert_int_equal(bi.regions[8].base, 0xffc00000);
    assert_int_equal(boot_ram_bytes(&bi), 0x9f000 + 0x750000);
    /* the ACPI 2.0 copy is preferred whatever the order */
    assert_ptr_equal((void *)(uintptr_t)bi.rsdp_phys, block + new + 8);
}

static void test_efi_map_overflowing_entry_dropped(void **state)
{
    (void)state;
    static const uint64_t efi[][3] = {{7, 0x100000, 0x100}, {7, 0x1000000, 1ull << 53}};
    begin();
    efi_mmap_tag(efi, 2);
    end();
    assert_int_equal(parse(UEFI_BOOT_MAGIC, &bi), 0);
    assert_int_equal(bi.nregions, 1);
    assert_int_equal(bi.dropped, 1);
}

static void test_bad_rsdp_copy_ignored(void **state)
{
    (void)state;
    begin();
    mmap_tag(E820, 1);
    size_t old = rsdp_tag(14, 20, true);
    rsdp_tag(15, 36, false); /* a bad checksum: the good old copy stays */
    end();
    assert_int_equal(parse(MB2_BOOT_MAGIC, &bi), 0);
    assert_ptr_equal((void *)(uintptr_t)bi.rsdp_phys, block + old + 8);
    begin();
    mmap_tag(E820, 1);
    rsdp_tag(14, 20, false);
    end();
    assert_int_equal(parse(MB2_BOOT_MAGIC, &bi), 0);
    assert_int_equal(bi.rsdp_phys, 0);
}

static void test_long_cmdline_truncated(void **state)
{
    (void)state;
    char s[1500];
    memset(s, 'x', sizeof(s) - 1);
    s[sizeof(s) - 1] = 0;
    begin();
    cmdline_tag(s);
    mmap_tag(E820, 1);
    end();
    assert_int_equal(parse(MB2_BOOT_MAGIC, &bi), 0);
    assert_true(bi.cmdline_truncated);
    assert_int_equal(strlen(bi.cmdline), BOOT_CMDLINE_MAX - 1);
}

/* Each malformed block must be rejected with a reason, never walked past its end. */
static void expect_reject(const char *why_part)
{
    memset(&bi, 0x5a, sizeof(bi));
    assert_int_equal(parse(MB2_BOOT_MAGIC, &bi), -1);
    assert_non_null(bi.error);
    if (!strstr(bi.error, why_part))
        fail_msg("rejected with \"%s\", expected \"%s\"", bi.error, why_part);
}

static void test_malformed_blocks_rejected(void **state)
{
    (void)state;
    begin(); /* a tag shorter than its own header */
    mmap_tag(E820, 1);
    tag(2, 4);
    end();
    expect_reject("tag size out of bounds");
    assert_int_equal(bi.error_offset, 8 + 16 + 24);

    begin(); /* a tag reaching past total_size */
    mmap_tag(E820, 1);
    size_t off = tag(2, 16);
    end();
    put32(off + 4, 4000);
    expect_reject("tag size out of bounds");

    begin(); /* no end tag: the walk stops at total_size */
    mmap_tag(E820, 1);
    tag(2, 16);
    put32(0, (uint32_t)used);
    expect_reject("no end tag");

    begin(); /* an end tag of the wrong size */
    mmap_tag(E820, 1);
    tag(0, 16);
    put32(0, (uint32_t)used);
    expect_reject("end tag size");

    begin();
    mmap_tag(E820, 1);
    end();
    put32(0, MB2_INFO_MAX + 8);
    expect_reject("total_size out of range");
    put32(0, 8);
    expect_reject("total_size out of range");

    begin(); /* command line without its NUL inside the tag */
    off = tag(1, 8 + 4);
    memcpy(block + off + 8, "abcd", 4);
    mmap_tag(E820, 1);
    end();
    expect_reject("not NUL-terminated");

    begin(); /* map entries smaller than an entry */
    mmap_tag(E820, 2);
    put32(8 + 8, 20);
    end();
    expect_reject("memory map tag malformed");

    static const uint64_t efi[][3] = {{7, 0x100000, 0x100}};
    begin(); /* EFI descriptors smaller than EFI_MEMORY_DESCRIPTOR */
    off = efi_mmap_tag(efi, 1);
    put32(off + 8, 32);
    end();
    expect_reject("EFI memory map tag malformed");

    begin();
    mmap_tag(E820, 1);
    tag(15, 8 + 20); /* an ACPI 2.0 RSDP is 36 bytes */
    end();
    expect_reject("new RSDP tag too short");

    begin();
    cmdline_tag("blimp.mode=boot");
    end();
    expect_reject("no memory map");

    memset(&bi, 0, sizeof(bi)); /* an info pointer that is not 8-aligned */
    begin();
    mmap_tag(E820, 1);
    end();
    assert_int_equal(boot_info_parse(MB2_BOOT_MAGIC, (uint64_t)(uintptr_t)(block + 4), &bi), -1);
    assert_non_null(strstr(bi.error, "aligned"));

    assert_int_equal(parse(0x12345678, &bi), -1);
    assert_string_equal(bi.error, "unknown boot magic");
}

/* ------------------------------------------------------------ Linux boot_params */

/* A zero page as QEMU's -kernel path leaves it after our real-mode setup ran: the setup header
 * copied from blimp.bzImage, the E820 table from the BIOS, cmd_line_ptr set by the loader. */
static _Alignas(4096) unsigned char zp[4096];
static char lcmd[2048];

static void zp_put32(size_t off, uint32_t v)
{
    memcpy(zp + off, &v, 4);
}

static void zp_put64(size_t off, uint64_t v)
{
    memcpy(zp + off, &v, 8);
}

static void zp_begin(const char *cmdline)
{
    memset(zp, 0, sizeof(zp));
    memcpy(zp + 0x202, "HdrS", 4);
    zp_put32(0x206, 0x020c);
    zp_put32(0x238, 1023); /* cmdline_size */
    for (unsigned i = 0; i < 4; i++) {
        zp_put64(0x2d0 + 20 * i, E820[i][0]);
        zp_put64(0x2d0 + 20 * i + 8, E820[i][1]);
        zp_put32(0x2d0 + 20 * i + 16, (uint32_t)E820[i][2]);
    }
    zp[0x1e8] = 4;
    memset(lcmd, 'x', sizeof(lcmd));
    strcpy(lcmd, cmdline);
    uint64_t p = (uint64_t)(uintptr_t)lcmd; /* a host address: the high half too */
    zp_put32(0x228, (uint32_t)p);
    zp_put32(0x0c8, (uint32_t)(p >> 32));
}

static int zp_parse(void)
{
    return boot_info_parse(LINUX_BOOT_MAGIC, (uint64_t)(uintptr_t)zp, &bi);
}

static void test_linux_boot_params(void **state)
{
    (void)state;
    zp_begin("noapic blimp.mode=boot console=ttyS0");
    assert_int_equal(zp_parse(), 0);
    assert_int_equal(bi.protocol, BOOT_LINUX);
    assert_string_equal(boot_protocol_name(bi.protocol), "linux");
    assert_string_equal(bi.cmdline, "noapic blimp.mode=boot console=ttyS0");
    assert_int_equal(bi.nregions, 4);
    assert_int_equal(bi.regions[0].base, 0); /* sorted */
    assert_int_equal(bi.regions[3].type, MEM_RESERVED);
    assert_int_equal(bi.rsdp_phys, 0);
    assert_false(bi.entry64);
    assert_int_equal(boot_info_parse(LINUX64_BOOT_MAGIC, (uint64_t)(uintptr_t)zp, &bi), 0);
    assert_true(bi.entry64); /* the same reader, the entry remembered */
    assert_int_equal(bi.protocol, BOOT_LINUX);

    /* an RSDP passed in acpi_rsdp_addr (protocol 2.14) is taken */
    static _Alignas(16) unsigned char rsdp[36];
    memset(rsdp, 0, sizeof(rsdp));
    memcpy(rsdp, "RSD PTR ", 8);
    unsigned char sum = 0;
    for (int i = 0; i < 20; i++)
        sum += rsdp[i];
    rsdp[8] = (unsigned char)(0x100 - sum);
    zp_put64(0x070, (uint64_t)(uintptr_t)rsdp);
    assert_int_equal(zp_parse(), 0);
    assert_int_equal(bi.rsdp_phys, (uint64_t)(uintptr_t)rsdp);

    /* GRUB on UEFI: no acpi_rsdp_addr, the RSDP from the EFI system table's configuration
     * table (ACPI 2.0 GUID preferred over 1.0; a bad RSDP is passed over) */
    static _Alignas(16) unsigned char rsdp1[20], bad2[36];
    memcpy(rsdp1, rsdp, 20);
    memcpy(bad2, rsdp, 36);
    bad2[8] ^= 1;
    static const uint8_t acpi20[16] = {0x71, 0xe8, 0x68, 0x88, 0xf1, 0xe4, 0xd3, 0x11,
                                       0xbc, 0x22, 0x00, 0x80, 0xc7, 0x3c, 0x88, 0x81};
    static const uint8_t acpi10[16] = {0x30, 0x2d, 0x9d, 0xeb, 0x88, 0x2d, 0xd3, 0x11,
                                       0x9a, 0x16, 0x00, 0x90, 0x27, 0x3f, 0xc1, 0x4d};
    static _Alignas(8) unsigned char systab[120], config[4][24];
    memset(systab, 0, sizeof(systab));
    memcpy(systab, "IBI SYST", 8);
    uint64_t n = 4, cfg = (uint64_t)(uintptr_t)config, st = (uint64_t)(uintptr_t)systab;
    memcpy(systab + 104, &n, 8);
    memcpy(systab + 112, &cfg, 8);
    memset(config, 0x5a, sizeof(config)); /* entry 0: some other table */
    const uint64_t ptrs[4] = {0x1234, (uint64_t)(uintptr_t)rsdp1, (uint64_t)(uintptr_t)bad2,
                              (uint64_t)(uintptr_t)rsdp};
    const uint8_t *guids[4] = {NULL, acpi10, acpi20, acpi20};
    for (int i = 0; i < 4; i++) {
        if (guids[i])
            memcpy(config[i], guids[i], 16);
        memcpy(config[i] + 16, &ptrs[i], 8);
    }
    zp_begin("blimp.mode=boot");
    memcpy(zp + 0x1c0, "EL64", 4);
    zp_put32(0x1c4, (uint32_t)st);
    zp_put32(0x1d8, (uint32_t)(st >> 32));
    assert_int_equal(zp_parse(), 0);
    assert_int_equal(bi.rsdp_phys, (uint64_t)(uintptr_t)rsdp);
    n = 3; /* without the good 2.0 entry: the 1.0 one */
    memcpy(systab + 104, &n, 8);
    assert_int_equal(zp_parse(), 0);
    assert_int_equal(bi.rsdp_phys, (uint64_t)(uintptr_t)rsdp1);
    n = 100000; /* an entry count past any firmware's: not walked */
    memcpy(systab + 104, &n, 8);
    assert_int_equal(zp_parse(), 0);
    assert_int_equal(bi.rsdp_phys, 0);
    n = 4;
    memcpy(systab + 104, &n, 8);
    memcpy(zp + 0x1c0, "EL32", 4); /* a 32-bit EFI loader's table: not ours to read */
    assert_int_equal(zp_parse(), 0);
    assert_int_equal(bi.rsdp_phys, 0);

    /* no command line at all: empty */
    zp_begin("");
    zp_put32(0x228, 0);
    zp_put32(0x0c8, 0);
    assert_int_equal(zp_parse(), 0);
    assert_string_equal(bi.cmdline, "");
}

static void expect_zp_reject(const char *why_part, uint64_t offset)
{
    memset(&bi, 0, sizeof(bi));
    assert_int_equal(zp_parse(), -1);
    assert_non_null(bi.error);
    if (!strstr(bi.error, why_part))
        fail_msg("rejected with \"%s\", expected \"%s\"", bi.error, why_part);
    assert_int_equal(bi.error_offset, offset);
}

static void test_malformed_boot_params_rejected(void **state)
{
    (void)state;
    zp_begin("blimp.mode=boot");
    memcpy(zp + 0x202, "HdrT", 4);
    expect_zp_reject("without the HdrS setup header", 0x202);

    zp_begin("blimp.mode=boot");
    zp_put32(0x206, 0x0205);
    expect_zp_reject("older than 2.06", 0x206);

    zp_begin("blimp.mode=boot");
    zp[0x1e8] = 129; /* the table has room for 128 */
    expect_zp_reject("e820_entries above 128", 0x1e8);

    zp_begin("blimp.mode=boot");
    zp[0x1e8] = 0; /* the BIOS answered no E820 call */
    expect_zp_reject("no e820 memory map", 0x1e8);

    zp_begin("blimp.mode=boot");
    lcmd[strlen(lcmd)] = 'x'; /* the NUL gone: 'x' up to the buffer's end */
    expect_zp_reject("no NUL within cmdline_size", 0x228);

    zp_begin("blimp.mode=boot");
    zp_put32(0x238, 0);
    expect_zp_reject("cmdline_size out of range", 0x238);

    zp_begin("blimp.mode=boot");
    static unsigned char not_rsdp[36] = "RSD PTR "; /* checksum wrong */
    zp_put64(0x070, (uint64_t)(uintptr_t)not_rsdp);
    expect_zp_reject("acpi_rsdp_addr is not an RSDP", 0x070);

    memset(&bi, 0, sizeof(bi));
    assert_int_equal(boot_info_parse(LINUX_BOOT_MAGIC, 0, &bi), -1);
    assert_non_null(strstr(bi.error, "address is 0"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grub_bios_block),
        cmocka_unit_test(test_efi_map_preferred_and_converted),
        cmocka_unit_test(test_efi_map_overflowing_entry_dropped),
        cmocka_unit_test(test_bad_rsdp_copy_ignored),
        cmocka_unit_test(test_long_cmdline_truncated),
        cmocka_unit_test(test_malformed_blocks_rejected),
        cmocka_unit_test(test_linux_boot_params),
        cmocka_unit_test(test_malformed_boot_params_rejected),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
