/*
 * include/bus.h's PCI part for the kernel: configuration space through the legacy 0xCF8/0xCFC
 * mechanism, bus enumeration with BAR sizing (64-bit BARs included), and BAR windows as regions.
 */
#include "include/bus.h"
#include "include/platform.h"
#include "arch/x86/io.h"
#include "arch/x86/paging.h"

#define PCI_ADDR 0xcf8
#define PCI_DATA 0xcfc

static uint32_t addr_of(const struct pci_func *d, unsigned off)
{
    return 0x80000000u | (uint32_t)d->bus << 16 | (uint32_t)d->dev << 11 | (uint32_t)d->fn << 8 |
           (off & 0xfc);
}

/* This mechanism reaches only the first 256 bytes; an offset past them would wrap onto the
 * header, so it reads as all-ones and writes nothing. */
uint32_t pci_cfg_read32(const struct pci_func *d, unsigned off)
{
    if (off >= PCI_CFG_SIZE)
        return 0xffffffff;
    outl(PCI_ADDR, addr_of(d, off));
    return inl(PCI_DATA);
}

uint16_t pci_cfg_read16(const struct pci_func *d, unsigned off)
{
    return (uint16_t)(pci_cfg_read32(d, off) >> ((off & 2) * 8));
}

uint8_t pci_cfg_read8(const struct pci_func *d, unsigned off)
{
    return (uint8_t)(pci_cfg_read32(d, off) >> ((off & 3) * 8));
}

void pci_cfg_write32(const struct pci_func *d, unsigned off, uint32_t v)
{
    if (off >= PCI_CFG_SIZE)
        return;
    outl(PCI_ADDR, addr_of(d, off));
    outl(PCI_DATA, v);
}

void pci_cfg_write16(const struct pci_func *d, unsigned off, uint16_t v)
{
    if (off >= PCI_CFG_SIZE)
        return;
    outl(PCI_ADDR, addr_of(d, off));
    outw((uint16_t)(PCI_DATA + (off & 2)), v);
}

/* Size a BAR by writing all-ones with decoding off, then restore it. */
static unsigned read_bar(struct pci_func *d, unsigned i)
{
    unsigned off = 0x10 + 4 * i;
    uint32_t orig = pci_cfg_read32(d, off);
    struct pci_bar *b = &d->bar[i];
    b->io = orig & 1;
    bool is64 = !b->io && ((orig >> 1) & 3) == 2;
    uint32_t orig_hi = is64 ? pci_cfg_read32(d, off + 4) : 0;

    uint16_t cmd = pci_cfg_read16(d, 0x04);
    pci_cfg_write16(d, 0x04, cmd & ~0x3);
    pci_cfg_write32(d, off, 0xffffffff);
    uint32_t lo = pci_cfg_read32(d, off);
    uint32_t hi = 0xffffffff;
    if (is64) {
        pci_cfg_write32(d, off + 4, 0xffffffff);
        hi = pci_cfg_read32(d, off + 4);
        pci_cfg_write32(d, off + 4, orig_hi);
    }
    pci_cfg_write32(d, off, orig);
    pci_cfg_write16(d, 0x04, cmd);

    if (b->io) {
        uint32_t mask = lo & ~0x3u;
        b->size = mask ? (uint16_t)(~mask + 1) : 0;
        b->base = orig & ~0x3u;
    } else {
        uint64_t mask = ((uint64_t)hi << 32 | (lo & ~0xfu));
        if (!is64)
            mask |= 0xffffffff00000000ull;
        b->size = (lo & ~0xfu) || is64 ? ~mask + 1 : 0;
        b->base = ((uint64_t)orig_hi << 32) | (orig & ~0xfu);
    }
    return is64 ? 2 : 1;
}

static void read_header(struct pci_func *d)
{
    uint32_t id = pci_cfg_read32(d, 0x00);
    d->vendor = (uint16_t)id;
    d->device = (uint16_t)(id >> 16);
    uint32_t cls = pci_cfg_read32(d, 0x08);
    d->revision = (uint8_t)cls;
    d->class_code = cls >> 8;
    uint32_t sub = pci_cfg_read32(d, 0x2c);
    d->subsys_vendor = (uint16_t)sub;
    d->subsys_device = (uint16_t)(sub >> 16);
    for (unsigned i = 0; i < 6; i++)
        d->bar[i] = (struct pci_bar){0};
    if ((pci_cfg_read8(d, 0x0e) & 0x7f) == 0) /* only type-0 headers have six BARs */
        for (unsigned i = 0; i < 6;)
            i += read_bar(d, i);
}

bool pci_scan(pci_visit_fn visit, void *ctx)
{
    for (unsigned bus = 0; bus < 256; bus++) {
        for (unsigned dev = 0; dev < 32; dev++) {
            for (unsigned fn_no = 0; fn_no < 8; fn_no++) {
                struct pci_func d = {
                    .bus = (uint8_t)bus, .dev = (uint8_t)dev, .fn = (uint8_t)fn_no};
                uint16_t vendor = pci_cfg_read16(&d, 0x00);
                if (vendor == 0xffff) {
                    if (fn_no == 0)
                        break;
                    continue;
                }
                read_header(&d);
                if (visit(&d, ctx))
                    return true;
                if (fn_no == 0 && !(pci_cfg_read8(&d, 0x0e) & 0x80))
                    break; /* not multi-function */
            }
        }
    }
    return false;
}

void pci_enable(const struct pci_func *d)
{
    pci_cfg_write16(d, 0x04, pci_cfg_read16(d, 0x04) | 0x7); /* I/O, memory, bus master */
}

int pci_map_bar(const struct pci_func *d, unsigned bar, uint64_t off, uint64_t len,
                struct bus_region *out)
{
    if (bar >= PCI_BARS)
        return -1;
    const struct pci_bar *b = &d->bar[bar];
    if (!b->base || !b->size || off > b->size || len > b->size - off)
        return -1;
    uint64_t start = b->base + off;
    if (b->io) {
        if (start + len > 0x10000)
            return -1;
        *out = (struct bus_region){.base = start, .size = len, .port_io = true};
        return 0;
    }
    if (paging_map(start, len, MAP_MMIO) != 0)
        return -1;
    *out = (struct bus_region){.base = (uintptr_t)phys_to_virt(start), .size = len};
    return 0;
}
