/*
 * RSDP -> XSDT/RSDT -> MADT, and FADT -> DSDT's \_S5 (ACPI 6.x, 5.2.5-5.2.12, 7.4.2). Tables are
 * firmware data in RAM: each is mapped before it is read, its length bounded and its checksum
 * verified; a bad table is skipped with a log line, never trusted.
 */
#include "arch/x86/acpi.h"
#include "arch/x86/paging.h"
#include "include/platform.h"

#define SDT_HEADER   36
#define MAX_TABLE    (1u << 20)   /* no MADT or root table comes near 1 MiB */
#define LOW_IDENTITY (4ull << 30) /* boot/entry.S maps the first 4 GiB */

static bool mapped(uint64_t phys, uint64_t len)
{
    if (phys + len < phys)
        return false;
    if (phys + len <= LOW_IDENTITY)
        return true;
    return paging_map(phys, len, MAP_RAM) == 0;
}

static const uint8_t *at(uint64_t phys)
{
    return phys_to_virt(phys);
}

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rd64(const uint8_t *p)
{
    return rd32(p) | (uint64_t)rd32(p + 4) << 32;
}

static bool checksum_ok(const uint8_t *p, uint32_t len)
{
    uint8_t sum = 0;
    for (uint32_t i = 0; i < len; i++)
        sum = (uint8_t)(sum + p[i]);
    return sum == 0;
}

static bool sig_is(const uint8_t *p, const char *sig, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        if (p[i] != (uint8_t)sig[i])
            return false;
    return true;
}

/* A valid RSDP at phys: signature, the ACPI 1.0 checksum, and for revision >= 2 the extended
 * one over its stated length. */
static bool rsdp_ok(uint64_t phys)
{
    if (!phys || !mapped(phys, 36))
        return false;
    const uint8_t *p = at(phys);
    if (!sig_is(p, "RSD PTR ", 8) || !checksum_ok(p, 20))
        return false;
    if (p[15] >= 2) {
        uint32_t len = rd32(p + 20);
        if (len < 36 || len > 4096 || !mapped(phys, len) || !checksum_ok(p, len))
            return false;
    }
    return true;
}

/* The BIOS places the RSDP on a 16-byte boundary in the first KiB of the EBDA or in
 * 0xe0000-0xfffff (ACPI 5.2.5.1); PVH loaders that pass no rsdp_paddr leave it there. */
static uint64_t rsdp_scan(void)
{
    uint64_t ebda = (uint64_t)(*(const volatile uint16_t *)phys_to_virt(0x40e)) << 4;
    if (ebda >= 0x80000 && ebda < 0xa0000)
        for (uint64_t p = ebda; p < ebda + 1024; p += 16)
            if (rsdp_ok(p))
                return p;
    for (uint64_t p = 0xe0000; p < 0x100000; p += 16)
        if (rsdp_ok(p))
            return p;
    return 0;
}

/* The table at phys if it is a valid one with this signature; its length in *len. */
static const uint8_t *table(uint64_t phys, const char *sig, uint32_t *len)
{
    if (!phys || !mapped(phys, SDT_HEADER))
        return NULL;
    const uint8_t *p = at(phys);
    uint32_t n = rd32(p + 4);
    if (!sig_is(p, sig, 4) || n < SDT_HEADER || n > MAX_TABLE || !mapped(phys, n))
        return NULL;
    if (!checksum_ok(p, n)) {
        platform_log("acpi: table %.4s at 0x%lx has a bad checksum; ignored", sig,
                     (unsigned long)phys);
        return NULL;
    }
    *len = n;
    return p;
}

static void parse_madt(const uint8_t *m, uint32_t len, struct madt_info *out)
{
    out->found = true;
    out->lapic_phys = rd32(m + 36);
    out->pcat_compat = rd32(m + 40) & 1;
    for (uint32_t off = 44; off + 2 <= len;) {
        uint8_t type = m[off], elen = m[off + 1];
        if (elen < 2 || off + elen > len)
            break; /* a malformed entry ends the walk */
        const uint8_t *e = m + off;
        if (type == 1 && elen >= 12 && out->n_ioapics < MADT_MAX_IOAPICS) {
            out->ioapics[out->n_ioapics++] =
                (struct madt_ioapic){.id = e[2], .phys = rd32(e + 4), .gsi_base = rd32(e + 8)};
        } else if (type == 2 && elen >= 10 && e[2] == 0 && out->n_overrides < MADT_MAX_OVERRIDES) {
            out->overrides[out->n_overrides++] = (struct madt_override){
                .source = e[3], .gsi = rd32(e + 4), .flags = (uint16_t)(e[8] | e[9] << 8)};
        } else if (type == 5 && elen >= 12) {
            out->lapic_phys = rd64(e + 4); /* local APIC address override */
        }
        off += elen;
    }
}

/* The first valid table with this signature and at least min_len bytes, through the XSDT
 * (revision >= 2) or else the RSDT; its length in *len. */
static const uint8_t *find_table(uint64_t rsdp_phys, const char *sig, uint32_t min_len,
                                 uint32_t *len)
{
    uint64_t rsdp = rsdp_ok(rsdp_phys) ? rsdp_phys : rsdp_scan();
    if (!rsdp)
        return NULL;
    const uint8_t *r = at(rsdp);
    uint32_t root_len = 0;
    const uint8_t *root = NULL;
    unsigned entry = 8;
    if (r[15] >= 2)
        root = table(rd64(r + 24), "XSDT", &root_len);
    if (!root) {
        root = table(rd32(r + 16), "RSDT", &root_len);
        entry = 4;
    }
    if (!root)
        return NULL;
    for (uint32_t off = SDT_HEADER; off + entry <= root_len; off += entry) {
        uint64_t phys = entry == 8 ? rd64(root + off) : rd32(root + off);
        const uint8_t *t = table(phys, sig, len);
        if (t && *len >= min_len)
            return t;
    }
    return NULL;
}

bool acpi_read_madt(uint64_t rsdp_phys, struct madt_info *out)
{
    *out = (struct madt_info){0};
    uint32_t len;
    const uint8_t *m = find_table(rsdp_phys, "APIC", 44, &len);
    if (!m)
        return false;
    parse_madt(m, len, out);
    return true;
}

/* One element of the \_S5 package: ZeroOp, OneOp or BytePrefix n (ACPI 20.2.3); *at moves on. */
static bool aml_small_int(const uint8_t *d, uint32_t len, uint32_t *at, uint8_t *v)
{
    if (*at >= len)
        return false;
    uint8_t op = d[(*at)++];
    if (op == 0x00 || op == 0x01) {
        *v = op;
        return true;
    }
    if (op != 0x0a || *at >= len)
        return false;
    *v = d[(*at)++];
    return true;
}

/* FADT fields (ACPI 6.5, 5.2.9): byte offsets. */
#define FADT_DSDT        40
#define FADT_SMI_CMD     48
#define FADT_ACPI_ENABLE 52
#define FADT_PM1A_CNT    64
#define FADT_PM1B_CNT    68
#define FADT_FLAGS       112
#define FADT_X_DSDT      140
#define FADT_HW_REDUCED  (1u << 20)

bool acpi_read_s5(uint64_t rsdp_phys, struct acpi_s5 *out)
{
    *out = (struct acpi_s5){0};
    uint32_t flen, dlen;
    const uint8_t *f = find_table(rsdp_phys, "FACP", FADT_PM1B_CNT + 4, &flen);
    if (!f || (flen >= FADT_FLAGS + 4 && (rd32(f + FADT_FLAGS) & FADT_HW_REDUCED)))
        return false;
    uint32_t pm1a = rd32(f + FADT_PM1A_CNT), pm1b = rd32(f + FADT_PM1B_CNT);
    if (!pm1a || pm1a > 0xffff || pm1b > 0xffff)
        return false;
    uint64_t dsdt_phys = flen >= FADT_X_DSDT + 8 ? rd64(f + FADT_X_DSDT) : 0;
    if (!dsdt_phys)
        dsdt_phys = rd32(f + FADT_DSDT);
    const uint8_t *d = table(dsdt_phys, "DSDT", &dlen);
    if (!d)
        return false;
    /* NameOp "_S5_" (or "\_S5_"), PackageOp, PkgLength (1-4 bytes), NumElements >= 2. */
    for (uint32_t i = SDT_HEADER + 2; i + 4 <= dlen; i++) {
        if (!sig_is(d + i, "_S5_", 4) ||
            !(d[i - 1] == 0x08 || (d[i - 1] == '\\' && d[i - 2] == 0x08)))
            continue;
        uint32_t at = i + 4;
        if (at + 1 >= dlen || d[at] != 0x12)
            return false;
        at += 2 + (d[at + 1] >> 6); /* PackageOp, PkgLength lead byte and its followers */
        if (at >= dlen || d[at] < 2)
            return false;
        at++;
        uint8_t a, b;
        if (!aml_small_int(d, dlen, &at, &a) || !aml_small_int(d, dlen, &at, &b) || a > 7 || b > 7)
            return false;
        *out = (struct acpi_s5){.pm1a_cnt = (uint16_t)pm1a,
                                .pm1b_cnt = (uint16_t)pm1b,
                                .slp_typa = a,
                                .slp_typb = b,
                                .smi_cmd = (uint16_t)rd32(f + FADT_SMI_CMD),
                                .acpi_enable = f[FADT_ACPI_ENABLE]};
        return true;
    }
    return false;
}
