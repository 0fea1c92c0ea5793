/*
 * A fake PCI bus behind include/bus.h, for host unit tests. A test adds functions, fills their
 * 256-byte configuration space (ids, a capability list), describes their BARs (I/O, 32- or 64-bit
 * memory, anywhere -- above 4 GiB included) and backs each BAR with memory, optionally overlaid
 * by windows whose accesses go to the test's callbacks (a device model's registers).
 *
 * Regions use bus addresses as base: BAR base + offset (for I/O BARs, the port number). Every
 * region write is logged with its address and value, so tests can see notifications.
 *
 * Mistakes the fake can see in the code under test -- a region access outside the region or any
 * BAR, a misaligned access, a config access outside the 256 bytes -- are counted as errors with
 * the first message kept. pci_map_bar refuses what does not fit a BAR, as the interface says, and
 * counts it, so a test can check that the caller validated the device's values itself.
 */
#ifndef BLIMP_FAKE_PCI_H
#define BLIMP_FAKE_PCI_H

#include <stdbool.h>
#include <stdint.h>

#include "include/bus.h"

#define FAKE_PCI_MAX_FUNCS   4
#define FAKE_PCI_MAX_WINDOWS 8
#define FAKE_PCI_MAX_WRITES  1024
#define FAKE_PCI_MAX_BAR_MEM (1u << 20) /* backing memory per BAR */

enum fake_bar_kind { FAKE_BAR_IO, FAKE_BAR_MEM32, FAKE_BAR_MEM64 };

/* A window's callbacks get the offset inside the window and the access width (1, 2, 4). */
typedef uint32_t (*fake_pci_read_fn)(void *arg, uint64_t off, unsigned width);
typedef void (*fake_pci_write_fn)(void *arg, uint64_t off, unsigned width, uint32_t val);

struct fake_pci_window {
    unsigned bar;
    uint64_t off, len;
    fake_pci_read_fn read;
    fake_pci_write_fn write;
    void *arg;
};

struct fake_pci_func {
    uint8_t bus, dev, fn;
    uint8_t config[PCI_CFG_SIZE]; /* what pci_cfg_read* return; tests may poke it directly */
    struct pci_bar bar[PCI_BARS]; /* what enumeration reports */
    uint8_t *mem[PCI_BARS];       /* backing for each present BAR */
    struct fake_pci_window windows[FAKE_PCI_MAX_WINDOWS];
    unsigned nwindows;
    unsigned cap_next_free; /* where fake_pci_add_cap puts the next capability */
    unsigned cap_last;      /* the last one added, to link the next from */
};

struct fake_pci_write {
    uint64_t addr; /* region base + offset: bus address, or port */
    unsigned width;
    uint32_t value;
    bool port_io;
};

/* Forget every function, window, log entry and counter. */
void fake_pci_reset(void);

/* A function with the given ids (subsystem ids 0); enumerated in the order added. */
struct fake_pci_func *fake_pci_add(uint8_t bus, uint8_t dev, uint8_t fn, uint16_t vendor,
                                   uint16_t device);
void fake_pci_set_subsys(struct fake_pci_func *f, uint16_t vendor, uint16_t device);

void fake_pci_cfg_put8(struct fake_pci_func *f, unsigned off, uint8_t v);
void fake_pci_cfg_put16(struct fake_pci_func *f, unsigned off, uint16_t v);
void fake_pci_cfg_put32(struct fake_pci_func *f, unsigned off, uint32_t v);

/* Describe BAR i (also written into the config BAR registers; a 64-bit BAR takes i and i+1) and
 * give it zeroed backing memory. */
void fake_pci_set_bar(struct fake_pci_func *f, unsigned i, enum fake_bar_kind kind, uint64_t base,
                      uint64_t size);
uint8_t *fake_pci_bar_mem(struct fake_pci_func *f, unsigned i);

/* Append a capability (body: the bytes after the id and next pointer) to the list, linking it
 * from the previous one or from the capabilities pointer. Returns its offset. */
unsigned fake_pci_add_cap(struct fake_pci_func *f, uint8_t id, const void *body, unsigned len);

/* Route [off, off + len) of BAR bar to callbacks (a NULL one: reads 0 / writes dropped). */
void fake_pci_add_window(struct fake_pci_func *f, unsigned bar, uint64_t off, uint64_t len,
                         fake_pci_read_fn read, fake_pci_write_fn write, void *arg);

/* Every region write since the reset (the first FAKE_PCI_MAX_WRITES are kept). */
unsigned fake_pci_write_count(void);
const struct fake_pci_write *fake_pci_write_at(unsigned i);

unsigned fake_pci_cfg_reads(void);      /* config-space reads since the reset */
unsigned fake_pci_maps_refused(void);   /* pci_map_bar calls that did not fit a BAR */
unsigned fake_pci_errors(void);         /* misuses of the interface seen */
const char *fake_pci_first_error(void); /* "" when none */

#endif
