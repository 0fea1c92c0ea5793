/*
 * An in-memory virtio device behind struct virtio_transport_ops, for host unit tests. It knows
 * nothing about any device type: status register (with FEATURES_OK semantics on the modern
 * interface), 64-bit features, a config byte array with a generation counter, queues with maximum
 * sizes (each enabled queue gets a struct fake_vq attached to its rings), notify counting, ISR
 * bits. A test's device model hooks in through on_notify (process the queue), on_config_write
 * and accept_features, and drives the device side with fake_transport_config_set and the
 * fake_vq functions.
 *
 * Driver mistakes the model can see (status bits cleared without reset, features changed after
 * FEATURES_OK, notify before DRIVER_OK, queue setup after DRIVER_OK, bad queue addresses, ...)
 * are counted in driver_errors with the first message kept, so tests can assert on them.
 */
#ifndef BLIMP_FAKE_TRANSPORT_H
#define BLIMP_FAKE_TRANSPORT_H

#include <stdbool.h>
#include <stdint.h>

#include "virtio/transport.h"
#include "tests/unit/fake_device.h"

#define FT_MAX_QUEUES 8
#define FT_CONFIG_MAX 256

struct fake_transport;

struct ft_queue {
    uint16_t max_size; /* 0: the queue does not exist */
    uint16_t size;     /* as enabled */
    bool enabled;
    struct vq_addrs addrs;
    unsigned long notifies;
    struct fake_vq vq; /* device view of the ring, valid while enabled */
};

struct fake_transport {
    struct virtio_transport t; /* hand &ft->t to the driver; t.priv points back here */

    uint8_t status;
    uint64_t device_features; /* offered (legacy: only bits 0-31 are visible) */
    uint64_t driver_features; /* last written by the driver */
    uint8_t config[FT_CONFIG_MAX];
    uint32_t generation;
    uint8_t isr;
    struct ft_queue q[FT_MAX_QUEUES];

    /* Counters for tests. */
    unsigned resets, status_writes, config_reads, config_writes, isr_reads;

    /* Knobs. */
    bool reset_fails;             /* reset() returns -1 and status stays as it was */
    bool require_version_1;       /* modern: refuse FEATURES_OK without VERSION_1 (default true) */
    unsigned unstable_generation; /* the next N config_generation reads each see a new value */

    /* Hooks (all optional); hook_arg is passed back. */
    void *hook_arg;
    void (*on_notify)(struct fake_transport *ft, unsigned index, void *arg);
    void (*on_config_write)(struct fake_transport *ft, unsigned off, unsigned width, uint32_t val,
                            void *arg);
    /* Extra device policy at FEATURES_OK (after the subset check): false refuses. */
    bool (*accept_features)(struct fake_transport *ft, uint64_t features, void *arg);
    void (*on_status)(struct fake_transport *ft, uint8_t old, uint8_t new_status, void *arg);
    /* The driver reset the device (status 0 or reset()), after the queues were dropped. */
    void (*on_reset)(struct fake_transport *ft, void *arg);

    /* Driver protocol errors seen (first message kept). */
    unsigned driver_errors;
    char driver_error[256];
};

void fake_transport_init(struct fake_transport *ft, bool legacy, uint16_t device_id,
                         uint64_t device_features, unsigned config_size);
void fake_transport_fini(struct fake_transport *ft); /* detaches queue models */

/* Declare queue index with the given maximum size (0 removes it). */
void fake_transport_add_queue(struct fake_transport *ft, unsigned index, uint16_t max_size);
/* The device-side view of an enabled queue, or NULL. */
struct fake_vq *fake_transport_vq(struct fake_transport *ft, unsigned index);
bool fake_transport_negotiated(const struct fake_transport *ft, unsigned bit);

/* Device-side config access: set bumps the generation and raises a config interrupt. */
void fake_transport_config_set(struct fake_transport *ft, unsigned off, unsigned width,
                               uint32_t val);
uint32_t fake_transport_config_get(const struct fake_transport *ft, unsigned off, unsigned width);
/* The device asks for a reset: NEEDS_RESET plus a config interrupt. */
void fake_transport_needs_reset(struct fake_transport *ft);

#endif
