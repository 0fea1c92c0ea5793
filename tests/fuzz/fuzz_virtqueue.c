/*
 * libFuzzer target: one split virtqueue (virtio/virtqueue.c) against a device whose every move
 * comes from the input. The device mixes honest completions (through the unit tests' device
 * model, so the fuzzer reaches deep states) with raw writes of any id, length and used index.
 *
 * What must hold whatever the device does: no crash or sanitizer report; vq_get_used returns only
 * tokens that are in flight, each once; the driver's private state passes vq_selfcheck; a
 * violation breaks the queue for good; after a reset every token still in flight comes back
 * exactly once through vq_detach_unused.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/fuzz/fuzz_input.h"
#include "tests/unit/fake_device.h"
#include "tests/unit/fake_platform.h"
#include "virtio/virtqueue.h"

#define RAM_BASE  0x100000ull
#define RAM_BYTES (192 * 1024ull)
#define MAX_SIZE  64
#define DATA_LEN  4096

static bool outstanding[MAX_SIZE];
static int tokens[MAX_SIZE]; /* token i is &tokens[i] */
static unsigned n_outstanding;

static void check(bool ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_virtqueue: invariant broken: %s\n", what);
        abort();
    }
}

static void take_token(void *token)
{
    check(token >= (void *)tokens && token < (void *)(tokens + MAX_SIZE),
          "a token the driver never added");
    unsigned i = (unsigned)((int *)token - tokens);
    check(outstanding[i], "a token returned twice");
    outstanding[i] = false;
    n_outstanding--;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz f = {data, size};
    static bool ready;
    if (!ready) {
        fake_log_echo(false);
        fake_mem_init(RAM_BASE, RAM_BYTES);
        ready = true;
    }
    fake_log_reset();
    fake_clock_virtual(1000 * 1000); /* 1 ms a reading: deadlines pass in steps, not waits */
    fake_mem_rewind();
    memset(outstanding, 0, sizeof(outstanding));
    n_outstanding = 0;

    uint16_t qsize = (uint16_t)(1u << fz_below(&f, 7)); /* 1..64 */
    uint8_t mode = fz_u8(&f);
    bool legacy = mode & 1, indirect = mode & 2, event_idx = mode & 4;
    unsigned max_ind = (mode & 8) ? qsize : 0;
    size_t bytes = vq_mem_bytes(qsize, legacy, max_ind);
    check(bytes > 0, "vq_mem_bytes refused a valid size");
    void *mem = fake_mem_alloc(bytes, 4096);
    uint64_t data_phys = fake_mem_alloc_phys(DATA_LEN, 4096);
    struct virtqueue vq;
    check(vq_init(&vq, "fuzz", 0, qsize, mem, legacy, max_ind, indirect, event_idx) == VQ_OK,
          "vq_init failed");
    struct vq_addrs a;
    vq_addrs(&vq, &a);
    struct fake_vq dev;
    memset(&dev, 0, sizeof(dev));
    fake_vq_attach(&dev, &a, qsize, event_idx);

    for (unsigned step = 0; step < 4096 && fz_more(&f); step++) {
        switch (fz_below(&f, 10)) {
        case 0:
        case 1: { /* driver: add a buffer */
            unsigned n_out = fz_below(&f, 4), n_in = fz_below(&f, 4);
            struct vq_seg segs[8];
            for (unsigned i = 0; i < n_out + n_in; i++) {
                uint32_t off = fz_below(&f, DATA_LEN / 16) * 16;
                uint32_t len = 1 + fz_below(&f, DATA_LEN - off);
                segs[i] = (struct vq_seg){.addr = data_phys + off, .len = len};
            }
            unsigned slot = 0;
            while (slot < MAX_SIZE && outstanding[slot])
                slot++;
            if (slot == MAX_SIZE)
                break;
            int rc = vq_add(&vq, segs, n_out, n_in, &tokens[slot]);
            if (rc == VQ_OK) {
                outstanding[slot] = true;
                n_outstanding++;
            } else {
                check(rc == VQ_ERR_FULL || rc == VQ_ERR_INVALID || rc == VQ_ERR_BROKEN,
                      "vq_add returned an unknown code");
                unsigned n = n_out + n_in;
                bool fits = n <= qsize || (indirect && max_ind >= 2 && n <= max_ind);
                check(rc != VQ_ERR_INVALID || n == 0 || !fits, "vq_add refused a valid buffer");
            }
            vq_kick_prepare(&vq);
            break;
        }
        case 2: { /* honest device: take what is published, complete some */
            fake_vq_pop_all(&dev);
            unsigned k = fz_below(&f, 4);
            while (k-- && dev.npending) {
                unsigned which = fz_below(&f, dev.npending);
                fake_vq_complete(&dev, which, (uint32_t)dev.pending[which].in_bytes);
            }
            break;
        }
        case 3: /* hostile device: any used entry, then publish it */
            fake_vq_push_raw(&dev, fz_len(&f, qsize), fz_len(&f, DATA_LEN));
            break;
        case 4: /* hostile device: overwrite a used slot */
            fake_vq_write_used_raw(&dev, fz_u16(&f), fz_len(&f, qsize), fz_len(&f, DATA_LEN));
            break;
        case 5: /* hostile device: move used.idx anywhere */
            fake_vq_set_used_idx_raw(&dev, (uint16_t)(dev.used_idx + fz_u16(&f)));
            break;
        case 6:
        case 7: { /* driver: collect */
            uint32_t len;
            void *token;
            unsigned k = 0;
            while ((token = vq_get_used(&vq, &len)) && k++ < MAX_SIZE)
                take_token(token);
            break;
        }
        case 8:
            if (fz_bool(&f))
                vq_disable_interrupts(&vq);
            else
                vq_enable_interrupts(&vq);
            break;
        case 9: /* device side flags and events */
            fake_vq_set_no_notify(&dev, fz_bool(&f));
            if (event_idx)
                fake_vq_set_avail_event(&dev, fz_u16(&f));
            break;
        }
        check(vq_selfcheck(&vq), "vq_selfcheck failed");
        if (!vq_is_broken(&vq)) {
            check(vq_in_flight(&vq) == n_outstanding, "in-flight count drifted");
            check(vq_violation(&vq)[0] == 0, "a violation on a queue that is not broken");
        } else {
            check(vq_violation(&vq)[0] != 0, "broken without a reason");
            check(vq_get_used(&vq, NULL) == NULL, "a broken queue returned a buffer");
        }
    }

    /* Reset: every buffer still in flight comes back exactly once. */
    void *token;
    while ((token = vq_detach_unused(&vq)))
        take_token(token);
    check(n_outstanding == 0, "a buffer was lost across the reset");
    fake_vq_detach(&dev);
    return 0;
}
