/*
 * arch/x86/acpi.c on the host: ACPI tables built in the fake RAM arena (physical 0 up), then
 * read back through acpi_read_madt and acpi_read_s5. Every check that guards a firmware value is
 * made to fire: signatures, checksums, lengths, malformed MADT entries, and the BIOS-area RSDP
 * scan.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "arch/x86/acpi.h"
#include "arch/x86/paging.h"
#include "include/platform.h"
#include "tests/unit/fake_platform.h"

#define RAM_BYTES (2u << 20)
#define RSDP_AT   0xf0000u /* in the BIOS area the scan covers */
#define XSDT_AT   0x10000u
#define RSDT_AT   0x11000u
#define MADT_AT   0x12000u
#define OTHER_AT  0x13000u

/* Tables above 4 GiB would need a mapping; the tests' "machine" cannot map anything. */
int paging_map(uint64_t phys, uint64_t size, enum map_kind kind)
{
    (void)phys, (void)size, (void)kind;
    return -1;
}

static uint8_t *mem(uint64_t phys)
{
    return phys_to_virt(phys);
}

static void put32(uint64_t phys, uint32_t v)
{
    memcpy(mem(phys), &v, 4);
}

static void put64(uint64_t phys, uint64_t v)
{
    memcpy(mem(phys), &v, 8);
}

static uint8_t sum(uint64_t phys, uint32_t len)
{
    uint8_t s = 0;
    for (uint32_t i = 0; i < len; i++)
        s = (uint8_t)(s + mem(phys)[i]);
    return s;
}

/* Fix the checksum byte at phys + at so [phys, phys + len) sums to 0. */
static void fix_sum(uint64_t phys, uint32_t len, unsigned at)
{
    mem(phys)[at] = 0;
    mem(phys)[at] = (uint8_t)(0x100 - sum(phys, len));
}

static void header(uint64_t phys, const char *sig, uint32_t len)
{
    memset(mem(phys), 0, len);
    memcpy(mem(phys), sig, 4);
    put32(phys + 4, len);
    mem(phys)[8] = 1;
}

static void rsdp(uint64_t phys, uint8_t revision, uint32_t rsdt, uint64_t xsdt)
{
    memset(mem(phys), 0, 36);
    memcpy(mem(phys), "RSD PTR ", 8);
    mem(phys)[15] = revision;
    put32(phys + 16, rsdt);
    put32(phys + 20, 36);
    put64(phys + 24, xsdt);
    fix_sum(phys, 20, 8);
    fix_sum(phys, 36, 32);
}

/* A MADT like microvm's: two IOAPICs, plus pc's overrides (IRQ0 -> 2, 10 level high). */
static uint32_t madt(uint64_t phys)
{
    uint32_t len = 44 + 12 + 12 + 10 + 10 + 8;
    header(phys, "APIC", len);
    put32(phys + 36, 0xfee00000);
    put32(phys + 40, 1); /* PCAT_COMPAT */
    uint64_t e = phys + 44;
    uint8_t io0[12] = {1, 12, 0, 0};
    memcpy(mem(e), io0, 12);
    put32(e + 4, 0xfec00000);
    put32(e + 8, 0);
    e += 12;
    uint8_t io1[12] = {1, 12, 1, 0};
    memcpy(mem(e), io1, 12);
    put32(e + 4, 0xfec10000);
    put32(e + 8, 24);
    e += 12;
    uint8_t iso0[10] = {2, 10, 0, 0, 2, 0, 0, 0, 0, 0};
    memcpy(mem(e), iso0, 10);
    e += 10;
    uint8_t iso10[10] = {2, 10, 0, 10, 10, 0, 0, 0, 0x0d, 0};
    memcpy(mem(e), iso10, 10);
    e += 10;
    uint8_t lapic[8] = {0, 8, 0, 0, 1, 0, 0, 0}; /* processor local APIC: skipped */
    memcpy(mem(e), lapic, 8);
    fix_sum(phys, len, 9);
    return len;
}

static void xsdt(uint64_t phys, const uint64_t *tables, unsigned n)
{
    header(phys, "XSDT", 36 + 8 * n);
    for (unsigned i = 0; i < n; i++)
        put64(phys + 36 + 8 * i, tables[i]);
    fix_sum(phys, 36 + 8 * n, 9);
}

static void rsdt(uint64_t phys, const uint32_t *tables, unsigned n)
{
    header(phys, "RSDT", 36 + 4 * n);
    for (unsigned i = 0; i < n; i++)
        put32(phys + 36 + 4 * i, tables[i]);
    fix_sum(phys, 36 + 4 * n, 9);
}

static int setup(void **state)
{
    (void)state;
    fake_log_echo(false);
    fake_log_reset();
    fake_ram_init(0, RAM_BYTES);
    /* Another table first, so the walk has to look past it. */
    header(OTHER_AT, "FACP", 64);
    fix_sum(OTHER_AT, 64, 9);
    madt(MADT_AT);
    const uint64_t x[2] = {OTHER_AT, MADT_AT};
    xsdt(XSDT_AT, x, 2);
    const uint32_t r[2] = {OTHER_AT, MADT_AT};
    rsdt(RSDT_AT, r, 2);
    rsdp(RSDP_AT, 2, RSDT_AT, XSDT_AT);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    fake_ram_fini();
    return 0;
}

static void assert_microvm_madt(const struct madt_info *m)
{
    assert_true(m->found);
    assert_true(m->pcat_compat);
    assert_int_equal(m->lapic_phys, 0xfee00000);
    assert_int_equal(m->n_ioapics, 2);
    assert_int_equal(m->ioapics[0].phys, 0xfec00000);
    assert_int_equal(m->ioapics[0].gsi_base, 0);
    assert_int_equal(m->ioapics[1].id, 1);
    assert_int_equal(m->ioapics[1].phys, 0xfec10000);
    assert_int_equal(m->ioapics[1].gsi_base, 24);
    assert_int_equal(m->n_overrides, 2);
    assert_int_equal(m->overrides[0].source, 0);
    assert_int_equal(m->overrides[0].gsi, 2);
    assert_int_equal(m->overrides[1].source, 10);
    assert_int_equal(m->overrides[1].gsi, 10);
    assert_int_equal(m->overrides[1].flags & MADT_TRIGGER_MASK, MADT_TRIGGER_LEVEL);
    assert_int_equal(m->overrides[1].flags & MADT_POLARITY_MASK, MADT_POLARITY_HIGH);
}

static void test_xsdt_path(void **state)
{
    (void)state;
    struct madt_info m;
    assert_true(acpi_read_madt(RSDP_AT, &m));
    assert_microvm_madt(&m);
}

static void test_rsdt_when_revision_0(void **state)
{
    (void)state;
    put64(XSDT_AT, 0); /* an XSDT must not be looked at for an ACPI 1.0 RSDP */
    rsdp(RSDP_AT, 0, RSDT_AT, XSDT_AT);
    struct madt_info m;
    assert_true(acpi_read_madt(RSDP_AT, &m));
    assert_microvm_madt(&m);
}

static void test_bad_xsdt_falls_back_to_rsdt(void **state)
{
    (void)state;
    mem(XSDT_AT)[20] ^= 1; /* checksum broken */
    struct madt_info m;
    assert_true(acpi_read_madt(RSDP_AT, &m));
    assert_microvm_madt(&m);
    assert_true(fake_log_contains("XSDT"));
}

static void test_madt_bad_checksum_ignored(void **state)
{
    (void)state;
    mem(MADT_AT + 50)[0] ^= 0x10;
    struct madt_info m;
    assert_false(acpi_read_madt(RSDP_AT, &m));
    assert_false(m.found);
    assert_int_equal(m.n_ioapics, 0);
    assert_true(fake_log_contains("bad checksum"));
}

static void test_rsdp_checks(void **state)
{
    (void)state;
    struct madt_info m;
    /* Given a bad pointer, the BIOS-area scan still finds the real one. */
    assert_true(acpi_read_madt(0x1000, &m));
    assert_true(m.found);
    assert_true(acpi_read_madt(0, &m));
    /* A broken v1 checksum, then a broken extended one: no RSDP anywhere. */
    mem(RSDP_AT)[9] ^= 1;
    assert_false(acpi_read_madt(RSDP_AT, &m));
    mem(RSDP_AT)[9] ^= 1;
    mem(RSDP_AT)[30] ^= 1;
    assert_false(acpi_read_madt(0, &m));
    /* The scan also covers the EBDA named at 0x40e. */
    mem(RSDP_AT)[30] ^= 1;
    memcpy(mem(0x9fc00), mem(RSDP_AT), 36);
    memset(mem(RSDP_AT), 0, 36);
    put32(0x40e, 0x9fc0);
    assert_true(acpi_read_madt(0, &m));
    assert_microvm_madt(&m);
}

static void test_table_length_bounds(void **state)
{
    (void)state;
    struct madt_info m;
    /* A MADT claiming 2 MiB (beyond the 1 MiB cap) or less than a header is not read. */
    put32(MADT_AT + 4, 2u << 20);
    assert_false(acpi_read_madt(RSDP_AT, &m));
    put32(MADT_AT + 4, 20);
    assert_false(acpi_read_madt(RSDP_AT, &m));
    /* A table above 4 GiB that cannot be mapped is skipped. */
    madt(MADT_AT);
    const uint64_t x[1] = {1ull << 33};
    xsdt(XSDT_AT, x, 1);
    const uint32_t r[1] = {OTHER_AT};
    rsdt(RSDT_AT, r, 1);
    assert_false(acpi_read_madt(RSDP_AT, &m));
}

static void test_malformed_entry_ends_the_walk(void **state)
{
    (void)state;
    /* The second IOAPIC's length byte says 0: the walk stops there, keeping the first. */
    mem(MADT_AT + 44 + 12 + 1)[0] = 0;
    uint32_t len = 44 + 12 + 12 + 10 + 10 + 8;
    fix_sum(MADT_AT, len, 9);
    struct madt_info m;
    assert_true(acpi_read_madt(RSDP_AT, &m));
    assert_int_equal(m.n_ioapics, 1);
    assert_int_equal(m.n_overrides, 0);
    /* An entry running past the table's end is not read either. */
    madt(MADT_AT);
    /* The last entry becomes an IOAPIC entry (12 bytes) with only 8 bytes of table left. */
    mem(MADT_AT + 44 + 12 + 12 + 10 + 10)[0] = 1;
    mem(MADT_AT + 44 + 12 + 12 + 10 + 10 + 1)[0] = 12;
    fix_sum(MADT_AT, len, 9);
    assert_true(acpi_read_madt(RSDP_AT, &m));
    assert_int_equal(m.n_ioapics, 2);
    assert_int_equal(m.n_overrides, 2);
}

/* ------------------------------------------------------------ FADT + DSDT -> \_S5 */

#define DSDT_AT 0x14000u

/* A FADT (ACPI 1.0 size) with PM1a_CNT 0x604 and the DSDT at DSDT_AT, in place of the 64-byte
 * FACP that setup() put first in the root tables. */
static void fadt(uint32_t pm1a, uint32_t flags)
{
    header(OTHER_AT, "FACP", 116);
    put32(OTHER_AT + 40, DSDT_AT);
    put32(OTHER_AT + 48, 0xb2); /* SMI_CMD */
    mem(OTHER_AT)[52] = 0xf1;   /* ACPI_ENABLE */
    put32(OTHER_AT + 64, pm1a);
    put32(OTHER_AT + 112, flags);
    fix_sum(OTHER_AT, 116, 9);
}

/* A DSDT whose AML body is `aml` (after some unrelated bytes that contain "_S5_" as data). */
static void dsdt(const uint8_t *aml, uint32_t n)
{
    static const uint8_t noise[] = {0x10, 0x05, '_', 'S', '5', '_', 0x0d, 0x5b, 0x80};
    uint32_t len = 36 + sizeof(noise) + n;
    header(DSDT_AT, "DSDT", len);
    memcpy(mem(DSDT_AT + 36), noise, sizeof(noise));
    memcpy(mem(DSDT_AT + 36 + sizeof(noise)), aml, n);
    fix_sum(DSDT_AT, len, 9);
}

static void test_s5_found(void **state)
{
    (void)state;
    struct acpi_s5 s5;
    fadt(0x604, 0);
    /* Name (_S5, Package (0x04) { 0x05, One, Zero, Zero }) as QEMU-like firmware writes it */
    static const uint8_t q[] = {0x08, '_',  'S',  '5',  '_',  0x12, 0x08,
                                0x04, 0x0a, 0x05, 0x01, 0x00, 0x00};
    dsdt(q, sizeof(q));
    assert_true(acpi_read_s5(RSDP_AT, &s5));
    assert_int_equal(s5.pm1a_cnt, 0x604);
    assert_int_equal(s5.pm1b_cnt, 0);
    assert_int_equal(s5.slp_typa, 5);
    assert_int_equal(s5.slp_typb, 1);
    assert_int_equal(s5.smi_cmd, 0xb2);
    assert_int_equal(s5.acpi_enable, 0xf1);
    /* the rooted name and a two-byte PkgLength */
    static const uint8_t r[] = {0x08, '\\', '_', 'S', '5', '_', 0x12, 0x40, 0x00, 0x02, 0x00, 0x00};
    dsdt(r, sizeof(r));
    assert_true(acpi_read_s5(RSDP_AT, &s5));
    assert_int_equal(s5.slp_typa, 0);
}

static void test_s5_refused(void **state)
{
    (void)state;
    struct acpi_s5 s5;
    static const uint8_t good[] = {0x08, '_',  'S',  '5',  '_',  0x12,
                                   0x06, 0x04, 0x00, 0x00, 0x00, 0x00};
    fadt(0x604, 1u << 20); /* HW_REDUCED_ACPI: no PM1 blocks (microvm) */
    dsdt(good, sizeof(good));
    assert_false(acpi_read_s5(RSDP_AT, &s5));
    assert_int_equal(s5.pm1a_cnt, 0);

    fadt(0, 0); /* no PM1a control block */
    assert_false(acpi_read_s5(RSDP_AT, &s5));

    fadt(0x604, 0);
    assert_true(acpi_read_s5(RSDP_AT, &s5));
    mem(DSDT_AT)[9] ^= 1; /* DSDT checksum broken */
    assert_false(acpi_read_s5(RSDP_AT, &s5));

    static const uint8_t method[] = {0x08, '_', 'S', '5', '_', 0x0a, 0x05}; /* not a package */
    dsdt(method, sizeof(method));
    assert_false(acpi_read_s5(RSDP_AT, &s5));

    static const uint8_t cut[] = {0x08, '_',  'S',  '5', '_',
                                  0x12, 0x06, 0x04, 0x0a}; /* at the end */
    dsdt(cut, sizeof(cut));
    assert_false(acpi_read_s5(RSDP_AT, &s5));

    static const uint8_t big[] = {0x08, '_', 'S', '5', '_', 0x12, 0x06, 0x02, 0x0a, 0x08, 0x00};
    dsdt(big, sizeof(big)); /* SLP_TYP is 3 bits */
    assert_false(acpi_read_s5(RSDP_AT, &s5));

    static const uint8_t ones[] = {0x08, '_', 'S', '5', '_', 0x12, 0x06, 0x02, 0xff, 0x00};
    dsdt(ones, sizeof(ones)); /* OnesOp: not a small integer */
    assert_false(acpi_read_s5(RSDP_AT, &s5));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_xsdt_path, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rsdt_when_revision_0, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_xsdt_falls_back_to_rsdt, setup, teardown),
        cmocka_unit_test_setup_teardown(test_madt_bad_checksum_ignored, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rsdp_checks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_table_length_bounds, setup, teardown),
        cmocka_unit_test_setup_teardown(test_malformed_entry_ends_the_walk, setup, teardown),
        cmocka_unit_test_setup_teardown(test_s5_found, setup, teardown),
        cmocka_unit_test_setup_teardown(test_s5_refused, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
