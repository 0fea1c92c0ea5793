/* PCI configuration space through the legacy 0xCF8/0xCFC mechanism, enumeration and BARs. */
#ifndef ARCH_X86_PCI_H
#define ARCH_X86_PCI_H

#include <stdbool.h>
#include <stdint.h>

struct pci_bar {
    uint64_t base; /* 0 when unassigned */
    uint64_t size; /* 0 when absent */
    bool io;       /* I/O space (else memory) */
};

struct pci_dev {
    uint8_t bus, dev, fn;
    uint16_t vendor, device, subsys_vendor, subsys_device;
    uint8_t revision;
    uint32_t class_code; /* class << 16 | subclass << 8 | prog-if */
    struct pci_bar bar[6];
};

uint32_t pci_read32(const struct pci_dev *d, unsigned off);
uint16_t pci_read16(const struct pci_dev *d, unsigned off);
uint8_t pci_read8(const struct pci_dev *d, unsigned off);
void pci_write32(const struct pci_dev *d, unsigned off, uint32_t v);
void pci_write16(const struct pci_dev *d, unsigned off, uint16_t v);

/* Calls fn for every function present, until fn returns true; returns whether one did. */
typedef bool (*pci_visit_fn)(struct pci_dev *d, void *ctx);
bool pci_scan(pci_visit_fn fn, void *ctx);

/* Enables memory and I/O decoding and bus mastering (SeaBIOS leaves bus mastering off). */
void pci_enable(const struct pci_dev *d);

/* First capability of the given id at or after the capability at offset start (0 = from the
 * beginning); returns its config-space offset, or 0. */
unsigned pci_find_cap(const struct pci_dev *d, uint8_t id, unsigned start);

#endif
