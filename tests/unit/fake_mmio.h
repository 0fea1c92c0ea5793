/*
 * A register-level fake of virtio-mmio devices (virtio spec 4.2, versions 1 and 2) behind
 * include/bus.h, for host unit tests. A test adds windows ("slots") at bus addresses; each plays
 * one device: identification registers, feature windows, status with FEATURES_OK semantics
 * (version 2), queues with a maximum size, GuestPageSize / QueueAlign / QueuePFN (version 1) or
 * QueueReady and split addresses (version 2), InterruptStatus / InterruptACK, ConfigGeneration
 * and a config byte array at 0x100. A queue the driver enables gets the device-side ring model of
 * fake_device.c attached at the addresses the device itself computes from the registers, so a
 * driver that tells the device one thing and writes its rings elsewhere is caught.
 *
 * Errors the fake sees are counted with the first message kept: bus misuse (an access outside
 * its region, misaligned, a register access that is not 32 bits wide, config access past the
 * window) and driver mistakes (a read-only register written, a write-only one read, a register of
 * the other version used, QueuePFN before GuestPageSize, queue set-up on a live queue, features
 * changed after FEATURES_OK, notify before DRIVER_OK). Reads where no slot is return 0, as QEMU's
 * unassigned memory does, and are counted apart: probing reads there on purpose.
 */
#ifndef BLIMP_FAKE_MMIO_H
#define BLIMP_FAKE_MMIO_H

#include <stdbool.h>
#include <stdint.h>

#include "include/bus.h"
#include "tests/unit/fake_device.h"

#define FAKE_MMIO_MAX_SLOTS  32
#define FAKE_MMIO_MAX_QUEUES 8
#define FAKE_MMIO_CONFIG_MAX 0x100

struct fake_mmio_queue {
    uint32_t max; /* QueueNumMax (0: absent) */
    uint32_t num, align, pfn, ready;
    uint64_t desc, driver, device;
    bool live;             /* the ring model is attached */
    struct vq_addrs addrs; /* where the device looks, as it computed them */
    unsigned notifies;
    struct fake_vq vq;
};

struct fake_mmio {
    uint64_t base, size;
    uint32_t magic, version, device_id, vendor;
    uint64_t device_features, driver_features;
    uint32_t dev_sel, drv_sel, page_size, queue_sel;
    uint8_t status;
    uint32_t isr, generation;
    uint8_t config[FAKE_MMIO_CONFIG_MAX];
    struct fake_mmio_queue q[FAKE_MMIO_MAX_QUEUES];

    /* Knobs. */
    bool never_resets;       /* a status write of 0 is ignored */
    bool reset_keeps_queues; /* a reset leaves QueueReady/QueuePFN as they were (a device bug) */
    unsigned reset_delay;    /* status reads that still show the old status after a reset */
    unsigned reset_countdown;
    bool reset_pending;

    /* What the device saw. */
    unsigned resets, status_reads, acks, features_writes;
    uint32_t last_ack;
    unsigned driver_errors;
    char driver_error[256];
};

void fake_mmio_clear(void); /* forget every slot and counter */
/* A slot at base of size bytes: magic "virt", the version, device type and QEMU's vendor id. */
struct fake_mmio *fake_mmio_add(uint64_t base, uint64_t size, uint32_t version, uint32_t device_id);
void fake_mmio_add_queue(struct fake_mmio *m, unsigned index, uint32_t max);

unsigned fake_mmio_bus_errors(void);
const char *fake_mmio_first_bus_error(void);
unsigned fake_mmio_unassigned_reads(void);
unsigned fake_mmio_maps(void);
unsigned fake_mmio_accesses(void); /* every register and config access through the bus */

#endif
