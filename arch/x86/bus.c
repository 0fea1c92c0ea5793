/* include/bus.h register regions for the kernel: volatile loads and stores for MMIO (mapped
 * uncached by pci_map_bar), in/out instructions for port I/O. */
#include "include/bus.h"
#include "arch/x86/io.h"
#include "arch/x86/paging.h"

/* Callers validate device-supplied offsets; this is the last line against a slip. */
static bool inside(const struct bus_region *r, uint64_t off, unsigned width)
{
    return off < r->size && width <= r->size - off;
}

static uint16_t port_of(const struct bus_region *r, uint64_t off)
{
    return (uint16_t)(r->base + off);
}

static volatile void *mmio_of(const struct bus_region *r, uint64_t off)
{
    return (volatile void *)(uintptr_t)(r->base + off);
}

uint8_t bus_read8(const struct bus_region *r, uint64_t off)
{
    if (!inside(r, off, 1))
        return 0xff;
    if (r->port_io)
        return inb(port_of(r, off));
    return *(volatile uint8_t *)mmio_of(r, off);
}

uint16_t bus_read16(const struct bus_region *r, uint64_t off)
{
    if (!inside(r, off, 2))
        return 0xffff;
    if (r->port_io)
        return inw(port_of(r, off));
    return *(volatile uint16_t *)mmio_of(r, off);
}

uint32_t bus_read32(const struct bus_region *r, uint64_t off)
{
    if (!inside(r, off, 4))
        return 0xffffffff;
    if (r->port_io)
        return inl(port_of(r, off));
    return *(volatile uint32_t *)mmio_of(r, off);
}

void bus_write8(const struct bus_region *r, uint64_t off, uint8_t v)
{
    if (!inside(r, off, 1))
        return;
    if (r->port_io)
        outb(port_of(r, off), v);
    else
        *(volatile uint8_t *)mmio_of(r, off) = v;
}

void bus_write16(const struct bus_region *r, uint64_t off, uint16_t v)
{
    if (!inside(r, off, 2))
        return;
    if (r->port_io)
        outw(port_of(r, off), v);
    else
        *(volatile uint16_t *)mmio_of(r, off) = v;
}

void bus_write32(const struct bus_region *r, uint64_t off, uint32_t v)
{
    if (!inside(r, off, 4))
        return;
    if (r->port_io)
        outl(port_of(r, off), v);
    else
        *(volatile uint32_t *)mmio_of(r, off) = v;
}

int bus_map_mmio(uint64_t phys, uint64_t size, struct bus_region *out)
{
    *out = (struct bus_region){0};
    if (size == 0 || phys + size < phys || paging_map(phys, size, MAP_MMIO) != 0)
        return -1;
    *out = (struct bus_region){.base = phys, .size = size}; /* identity-mapped */
    return 0;
}
