/* Host implementation of include/bus.h: a fake PCI bus with test-described functions. */
#include "tests/unit/fake_pci.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct fake_pci_func funcs[FAKE_PCI_MAX_FUNCS];
static unsigned nfuncs;
static struct fake_pci_write writes[FAKE_PCI_MAX_WRITES];
static unsigned nwrites;
static unsigned cfg_reads, maps_refused, errors;
static char first_error[256];

static void record_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void record_error(const char *fmt, ...)
{
    if (errors++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(first_error, sizeof(first_error), fmt, ap);
        va_end(ap);
    }
}

static void die(const char *what)
{
    fprintf(stderr, "fake_pci: %s\n", what);
    abort();
}

void fake_pci_reset(void)
{
    for (unsigned i = 0; i < nfuncs; i++)
        for (unsigned b = 0; b < PCI_BARS; b++)
            free(funcs[i].mem[b]);
    memset(funcs, 0, sizeof(funcs));
    nfuncs = nwrites = cfg_reads = maps_refused = errors = 0;
    first_error[0] = 0;
}

/* ---- Building functions ---------------------------------------------------------------------- */

void fake_pci_cfg_put8(struct fake_pci_func *f, unsigned off, uint8_t v)
{
    if (off >= PCI_CFG_SIZE)
        die("fake_pci_cfg_put outside config space");
    f->config[off] = v;
}

void fake_pci_cfg_put16(struct fake_pci_func *f, unsigned off, uint16_t v)
{
    fake_pci_cfg_put8(f, off, (uint8_t)v);
    fake_pci_cfg_put8(f, off + 1, (uint8_t)(v >> 8));
}

void fake_pci_cfg_put32(struct fake_pci_func *f, unsigned off, uint32_t v)
{
    fake_pci_cfg_put16(f, off, (uint16_t)v);
    fake_pci_cfg_put16(f, off + 2, (uint16_t)(v >> 16));
}

struct fake_pci_func *fake_pci_add(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t vendor,
                                   uint16_t device)
{
    if (nfuncs == FAKE_PCI_MAX_FUNCS)
        die("too many functions");
    struct fake_pci_func *f = &funcs[nfuncs++];
    memset(f, 0, sizeof(*f));
    f->bus = bus;
    f->dev = dev;
    f->fn = fn;
    fake_pci_cfg_put16(f, PCI_CFG_VENDOR, vendor);
    fake_pci_cfg_put16(f, PCI_CFG_VENDOR + 2, device);
    f->cap_next_free = PCI_CAP_FIRST;
    return f;
}

void fake_pci_set_subsys(struct fake_pci_func *f, uint16_t vendor, uint16_t device)
{
    fake_pci_cfg_put16(f, PCI_CFG_SUBSYS, vendor);
    fake_pci_cfg_put16(f, PCI_CFG_SUBSYS + 2, device);
}

void fake_pci_set_bar(struct fake_pci_func *f, unsigned i, enum fake_bar_kind kind, uint64_t base,
                      uint64_t size)
{
    if (i >= PCI_BARS || (kind == FAKE_BAR_MEM64 && i == PCI_BARS - 1))
        die("no such BAR slot");
    if (size > FAKE_PCI_MAX_BAR_MEM || (kind != FAKE_BAR_MEM64 && (base + size) >> 32))
        die("BAR too big or out of reach for its kind");
    free(f->mem[i]);
    f->mem[i] = calloc(1, size ? size : 1);
    if (!f->mem[i])
        die("out of memory");
    f->bar[i] = (struct pci_bar){.base = base, .size = size, .io = kind == FAKE_BAR_IO};
    unsigned reg = PCI_CFG_BAR0 + 4 * i;
    if (kind == FAKE_BAR_IO) {
        fake_pci_cfg_put32(f, reg, (uint32_t)base | 1);
    } else if (kind == FAKE_BAR_MEM32) {
        fake_pci_cfg_put32(f, reg, (uint32_t)base);
    } else {
        fake_pci_cfg_put32(f, reg, (uint32_t)base | 4); /* type 10b: 64-bit */
        fake_pci_cfg_put32(f, reg + 4, (uint32_t)(base >> 32));
        f->bar[i + 1] = (struct pci_bar){0};
    }
}

uint8_t *fake_pci_bar_mem(struct fake_pci_func *f, unsigned i)
{
    if (i >= PCI_BARS || !f->mem[i])
        die("no memory behind that BAR");
    return f->mem[i];
}

unsigned fake_pci_add_cap(struct fake_pci_func *f, uint8_t id, const void *body, unsigned len)
{
    unsigned at = f->cap_next_free;
    if (at + 2 + len > PCI_CFG_SIZE)
        die("capability does not fit config space");
    f->config[at] = id;
    f->config[at + 1] = 0;
    memcpy(&f->config[at + 2], body, len);
    if (f->cap_last)
        f->config[f->cap_last + 1] = (uint8_t)at;
    else
        f->config[PCI_CFG_CAP_PTR] = (uint8_t)at;
    f->config[PCI_CFG_STATUS] |= PCI_STATUS_CAP_LIST;
    f->cap_last = at;
    f->cap_next_free = (at + 2 + len + 3) & ~3u;
    return at;
}

void fake_pci_add_window(struct fake_pci_func *f, unsigned bar, uint64_t off, uint64_t len,
                         fake_pci_read_fn read, fake_pci_write_fn write, void *arg)
{
    if (f->nwindows == FAKE_PCI_MAX_WINDOWS)
        die("too many windows");
    if (bar >= PCI_BARS || off > f->bar[bar].size || len > f->bar[bar].size - off)
        die("window outside its BAR");
    f->windows[f->nwindows++] = (struct fake_pci_window){bar, off, len, read, write, arg};
}

unsigned fake_pci_write_count(void)
{
    return nwrites;
}

const struct fake_pci_write *fake_pci_write_at(unsigned i)
{
    return i < nwrites && i < FAKE_PCI_MAX_WRITES ? &writes[i] : NULL;
}

unsigned fake_pci_cfg_reads(void)
{
    return cfg_reads;
}

unsigned fake_pci_maps_refused(void)
{
    return maps_refused;
}

unsigned fake_pci_errors(void)
{
    return errors;
}

const char *fake_pci_first_error(void)
{
    return first_error;
}

/* ---- include/bus.h: configuration space ------------------------------------------------------ */

static struct fake_pci_func *func_of(const struct pci_func *pf)
{
    for (unsigned i = 0; i < nfuncs; i++)
        if (funcs[i].bus == pf->bus && funcs[i].dev == pf->dev && funcs[i].fn == pf->fn)
            return &funcs[i];
    return NULL;
}

/* The function and a valid (inside, aligned) config offset, or NULL after recording why not. */
static struct fake_pci_func *cfg_access(const struct pci_func *pf, unsigned off, unsigned width)
{
    struct fake_pci_func *f = func_of(pf);
    if (!f)
        record_error("config access to absent function %02x:%02x.%u", pf->bus, pf->dev, pf->fn);
    else if (off % width || off + width > PCI_CFG_SIZE)
        record_error("config access of %u bytes at 0x%x", width, off);
    else
        return f;
    return NULL;
}

static uint32_t cfg_read(const struct pci_func *pf, unsigned off, unsigned width)
{
    cfg_reads++;
    struct fake_pci_func *f = cfg_access(pf, off, width);
    if (!f)
        return 0xffffffff >> (32 - 8 * width);
    uint32_t v = 0;
    for (unsigned i = 0; i < width; i++)
        v |= (uint32_t)f->config[off + i] << (8 * i);
    return v;
}

static void cfg_write(const struct pci_func *pf, unsigned off, unsigned width, uint32_t v)
{
    struct fake_pci_func *f = cfg_access(pf, off, width);
    if (!f)
        return;
    for (unsigned i = 0; i < width; i++)
        f->config[off + i] = (uint8_t)(v >> (8 * i));
}

uint8_t pci_cfg_read8(const struct pci_func *f, unsigned off)
{
    return (uint8_t)cfg_read(f, off, 1);
}

uint16_t pci_cfg_read16(const struct pci_func *f, unsigned off)
{
    return (uint16_t)cfg_read(f, off, 2);
}

uint32_t pci_cfg_read32(const struct pci_func *f, unsigned off)
{
    return cfg_read(f, off, 4);
}

void pci_cfg_write16(const struct pci_func *f, unsigned off, uint16_t v)
{
    cfg_write(f, off, 2, v);
}

void pci_cfg_write32(const struct pci_func *f, unsigned off, uint32_t v)
{
    cfg_write(f, off, 4, v);
}

bool pci_scan(pci_visit_fn visit, void *ctx)
{
    for (unsigned i = 0; i < nfuncs; i++) {
        const struct fake_pci_func *ff = &funcs[i];
        struct pci_func f = {.bus = ff->bus, .dev = ff->dev, .fn = ff->fn};
        const uint8_t *c = ff->config;
        f.vendor = (uint16_t)(c[0] | c[1] << 8);
        if (f.vendor == 0xffff)
            continue;
        f.device = (uint16_t)(c[2] | c[3] << 8);
        f.revision = c[8];
        f.class_code = (uint32_t)c[9] | (uint32_t)c[10] << 8 | (uint32_t)c[11] << 16;
        f.subsys_vendor = (uint16_t)(c[0x2c] | c[0x2d] << 8);
        f.subsys_device = (uint16_t)(c[0x2e] | c[0x2f] << 8);
        memcpy(f.bar, ff->bar, sizeof(f.bar));
        if (visit(&f, ctx))
            return true;
    }
    return false;
}

void pci_enable(const struct pci_func *pf)
{
    struct fake_pci_func *f = func_of(pf);
    if (!f) {
        record_error("pci_enable on an absent function");
        return;
    }
    f->config[PCI_CFG_COMMAND] |= 0x7; /* I/O, memory, bus master */
}

int pci_map_bar(const struct pci_func *pf, unsigned bar, uint64_t off, uint64_t len,
                struct bus_region *out)
{
    struct fake_pci_func *f = func_of(pf);
    if (!f || bar >= PCI_BARS || !f->bar[bar].size || !f->bar[bar].base || off > f->bar[bar].size ||
        len > f->bar[bar].size - off) {
        maps_refused++;
        return -1;
    }
    *out =
        (struct bus_region){.base = f->bar[bar].base + off, .size = len, .port_io = f->bar[bar].io};
    return 0;
}

/* ---- include/bus.h: regions ------------------------------------------------------------------ */

struct target {
    struct fake_pci_func *f;
    unsigned bar;
    uint64_t off; /* inside the BAR */
};

/* Which BAR a region access lands in; false (recorded) when it is outside the region or all. */
static bool resolve(const struct bus_region *r, uint64_t off, unsigned width, struct target *t)
{
    if (off >= r->size || width > r->size - off) {
        record_error("%u-byte access at +0x%llx outside a 0x%llx-byte region", width,
                     (unsigned long long)off, (unsigned long long)r->size);
        return false;
    }
    uint64_t addr = r->base + off;
    if (addr % width) {
        record_error("misaligned %u-byte access at 0x%llx", width, (unsigned long long)addr);
        return false;
    }
    for (unsigned i = 0; i < nfuncs; i++) {
        for (unsigned b = 0; b < PCI_BARS; b++) {
            const struct pci_bar *bar = &funcs[i].bar[b];
            if (bar->size && bar->io == r->port_io && addr >= bar->base &&
                addr - bar->base + width <= bar->size) {
                *t = (struct target){&funcs[i], b, addr - bar->base};
                return true;
            }
        }
    }
    record_error("%u-byte access at 0x%llx hits no BAR", width, (unsigned long long)addr);
    return false;
}

static const struct fake_pci_window *window_of(const struct target *t, unsigned width)
{
    for (unsigned i = 0; i < t->f->nwindows; i++) {
        const struct fake_pci_window *w = &t->f->windows[i];
        if (w->bar == t->bar && t->off >= w->off && t->off + width <= w->off + w->len)
            return w;
    }
    return NULL;
}

static uint32_t region_read(const struct bus_region *r, uint64_t off, unsigned width)
{
    struct target t;
    if (!resolve(r, off, width, &t))
        return 0xffffffff >> (32 - 8 * width);
    const struct fake_pci_window *w = window_of(&t, width);
    if (w)
        return w->read ? w->read(w->arg, t.off - w->off, width) : 0;
    uint32_t v = 0;
    memcpy(&v, t.f->mem[t.bar] + t.off, width); /* little-endian host, like the bus */
    return v;
}

static void region_write(const struct bus_region *r, uint64_t off, unsigned width, uint32_t v)
{
    if (nwrites < FAKE_PCI_MAX_WRITES)
        writes[nwrites] = (struct fake_pci_write){r->base + off, width, v, r->port_io};
    nwrites++;
    struct target t;
    if (!resolve(r, off, width, &t))
        return;
    const struct fake_pci_window *w = window_of(&t, width);
    if (w) {
        if (w->write)
            w->write(w->arg, t.off - w->off, width, v);
        return;
    }
    memcpy(t.f->mem[t.bar] + t.off, &v, width);
}

uint8_t bus_read8(const struct bus_region *r, uint64_t off)
{
    return (uint8_t)region_read(r, off, 1);
}

uint16_t bus_read16(const struct bus_region *r, uint64_t off)
{
    return (uint16_t)region_read(r, off, 2);
}

uint32_t bus_read32(const struct bus_region *r, uint64_t off)
{
    return region_read(r, off, 4);
}

void bus_write8(const struct bus_region *r, uint64_t off, uint8_t v)
{
    region_write(r, off, 1, v);
}

void bus_write16(const struct bus_region *r, uint64_t off, uint16_t v)
{
    region_write(r, off, 2, v);
}

void bus_write32(const struct bus_region *r, uint64_t off, uint32_t v)
{
    region_write(r, off, 4, v);
}
