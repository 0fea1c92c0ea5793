/*
 * The bus interface the portable transports (virtio/virtio_pci.c, virtio/virtio_mmio.c) use
 * to reach device registers and PCI configuration space. The kernel implements it in
 * arch/x86/bus.c and arch/x86/pci.c; host unit tests implement it in tests/unit/fake_pci.c
 * (PCI) and tests/unit/fake_mmio.c (virtio-mmio windows).
 * Capability-list walking is portable logic over the config accessors, in lib/pci.c.
 *
 * Why plain functions and not an ops table: like include/platform.h, every binary has exactly
 * one implementation (the kernel or the fake), chosen at link time, so an ops table would only
 * add an indirect call to every register access and a pointer to carry around. A region is a
 * small value (space, base, size), so MMIO and port I/O go through the same calls and a transport
 * does not care which one a BAR turned out to be.
 *
 * Every value read through this interface comes from the device and is untrusted.
 */
#ifndef BLIMP_BUS_H
#define BLIMP_BUS_H

#include <stdbool.h>
#include <stdint.h>

/* ---- Register regions ---------------------------------------------------------------------- */

/*
 * A window of device registers. base means what the implementation says: for the kernel, the
 * mapped (uncached) virtual address for MMIO and the first port for port I/O; the fake uses bus
 * addresses. Accesses are at off from base, must be naturally aligned, and must lie inside
 * [0, size): callers check device-supplied offsets first. The kernel ignores a write outside
 * and reads all-ones there (what a missing device returns); the fake records it as an error.
 */
struct bus_region {
    uint64_t base;
    uint64_t size; /* 0: nothing mapped */
    bool port_io;  /* x86 I/O ports, else memory-mapped */
};

uint8_t bus_read8(const struct bus_region *r, uint64_t off);
uint16_t bus_read16(const struct bus_region *r, uint64_t off);
uint32_t bus_read32(const struct bus_region *r, uint64_t off);
void bus_write8(const struct bus_region *r, uint64_t off, uint8_t v);
void bus_write16(const struct bus_region *r, uint64_t off, uint16_t v);
void bus_write32(const struct bus_region *r, uint64_t off, uint32_t v);

/* Makes the physical MMIO window [phys, phys + size) a region, mapped uncached (virtio-mmio
 * devices, the IOAPIC). Returns 0, or -1 when it cannot be mapped. */
int bus_map_mmio(uint64_t phys, uint64_t size, struct bus_region *out);

/* ---- PCI ----------------------------------------------------------------------------------- */

/* Standard configuration header offsets and bits used by the portable code. */
#define PCI_CFG_VENDOR      0x00
#define PCI_CFG_COMMAND     0x04
#define PCI_CFG_STATUS      0x06
#define PCI_CFG_BAR0        0x10
#define PCI_CFG_SUBSYS      0x2c
#define PCI_CFG_CAP_PTR     0x34
#define PCI_CFG_INT_LINE    0x3c  /* the 8259 IRQ the firmware routed INTx to (0xff: none) */
#define PCI_CFG_INT_PIN     0x3d  /* 1..4 = INTA#..INTD#, 0 = no INTx */
#define PCI_CMD_INTX_OFF    0x400 /* command register: INTx Disable */
#define PCI_CFG_SIZE        256   /* the part reachable through every config mechanism */
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_CAP_ID_VENDOR   0x09
#define PCI_CAP_FIRST       0x40 /* capabilities live after the standard header */
#define PCI_CAP_MAX_STEPS   48   /* (256 - 0x40) / 4: no list is longer than this */
#define PCI_BARS            6

/* What a BAR decodes, as the implementation sized it (a 64-bit BAR is described in the
 * lower of its two slots; the upper slot reads as absent). */
struct pci_bar {
    uint64_t base; /* 0 when unassigned */
    uint64_t size; /* 0 when absent */
    bool io;       /* I/O space (else memory) */
};

/* One PCI function as enumeration found it. */
struct pci_func {
    uint8_t bus, dev, fn;
    uint16_t vendor, device, subsys_vendor, subsys_device;
    uint8_t revision;
    uint32_t class_code; /* class << 16 | subclass << 8 | prog-if */
    struct pci_bar bar[PCI_BARS];
};

/* Configuration space of f, off < PCI_CFG_SIZE and naturally aligned. */
uint8_t pci_cfg_read8(const struct pci_func *f, unsigned off);
uint16_t pci_cfg_read16(const struct pci_func *f, unsigned off);
uint32_t pci_cfg_read32(const struct pci_func *f, unsigned off);
void pci_cfg_write16(const struct pci_func *f, unsigned off, uint16_t v);
void pci_cfg_write32(const struct pci_func *f, unsigned off, uint32_t v);

/* Calls visit for every function present, with its ids and BARs filled in, until visit returns
 * true; returns whether one did. */
typedef bool (*pci_visit_fn)(const struct pci_func *f, void *ctx);
bool pci_scan(pci_visit_fn visit, void *ctx);

/* Turns on memory and I/O decoding and bus mastering (SeaBIOS leaves bus mastering off). */
void pci_enable(const struct pci_func *f);

/* Makes [off, off + len) of BAR bar a region (memory BARs are mapped uncached). Returns 0, or
 * -1 when the BAR is absent or unassigned, the window does not fit it, or mapping failed. */
int pci_map_bar(const struct pci_func *f, unsigned bar, uint64_t off, uint64_t len,
                struct bus_region *out);

/* ---- Capability list (lib/pci.c, portable) ------------------------------------------------- */

/*
 * Walks the capability list. Offsets below PCI_CAP_FIRST end the walk, the two reserved low
 * bits are masked off, and at most PCI_CAP_MAX_STEPS entries are visited in all, so a list that
 * loops back on itself ends too.
 */
struct pci_cap_walk {
    const struct pci_func *f;
    unsigned next;  /* offset of the next entry to look at, 0 at the end */
    unsigned steps; /* entries visited so far */
};

void pci_cap_walk_start(struct pci_cap_walk *w, const struct pci_func *f);
/* Offset of the next capability with id cap_id, or 0 when the list ends. */
unsigned pci_cap_walk_next(struct pci_cap_walk *w, uint8_t cap_id);
/* Offset of the first capability with id cap_id, or 0. */
unsigned pci_find_cap(const struct pci_func *f, uint8_t cap_id);

#endif
