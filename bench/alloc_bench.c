/*
 * Host benchmark of mm/buddy.c over 4 GiB of simulated RAM. Only the metadata is real: poisoning
 * stays off, so page contents (phys_to_virt) are never touched. Each figure is the median of
 * several runs; one human-readable line each, then one JSON line.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "mm/buddy.h"
#include "tests/unit/fake_platform.h"

#define SPAN_PAGES (1ULL << 20) /* 4 GiB */
#define REPS       7
#define TARGET_NS  25.0

static struct buddy B;
static void *meta;
static uint64_t *pfns;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void fresh(void)
{
    if (buddy_init(&B, meta, buddy_meta_bytes(SPAN_PAGES), 0, SPAN_PAGES)) {
        fprintf(stderr, "buddy_init failed\n");
        exit(1);
    }
    buddy_add_range(&B, 0, SPAN_PAGES);
}

static uint64_t must_alloc(unsigned order)
{
    uint64_t pfn = buddy_alloc(&B, order);
    if (pfn == BUDDY_NONE) {
        fprintf(stderr, "allocation of order %u failed\n", order);
        exit(1);
    }
    return pfn;
}

static void must_free(uint64_t pfn, unsigned order)
{
    if (buddy_free(&B, pfn, order)) {
        fprintf(stderr, "free of pfn %llu failed\n", (unsigned long long)pfn);
        exit(1);
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v)
{
    qsort(v, REPS, sizeof(*v), cmp_double);
    return v[REPS / 2];
}

/* Allocate n blocks, then free them in the same order: ns per pair. */
static double batch(unsigned order, unsigned n)
{
    double t[REPS];
    for (int r = 0; r < REPS; r++) {
        fresh();
        uint64_t t0 = now_ns();
        for (unsigned i = 0; i < n; i++)
            pfns[i] = must_alloc(order);
        for (unsigned i = 0; i < n; i++)
            must_free(pfns[i], order);
        t[r] = (double)(now_ns() - t0) / n;
    }
    return median(t);
}

/* Allocate and free at once, n times: ns per pair. pre pages stay allocated at order 0 first. */
static double ping_pong(unsigned order, unsigned n, unsigned pre)
{
    double t[REPS];
    for (int r = 0; r < REPS; r++) {
        fresh();
        for (unsigned i = 0; i < pre; i++)
            must_alloc(0);
        uint64_t t0 = now_ns();
        for (unsigned i = 0; i < n; i++)
            must_free(must_alloc(order), order);
        t[r] = (double)(now_ns() - t0) / n;
    }
    return median(t);
}

static int count_cb(void *ctx, uint64_t pfn, unsigned order, bool reported)
{
    (void)pfn;
    (void)order;
    (void)reported;
    ++*(uint64_t *)ctx;
    return 0;
}

/* ns per full walk of the current state, and blocks visited. */
static double walk(unsigned loops, uint64_t *blocks)
{
    double t[REPS];
    for (int r = 0; r < REPS; r++) {
        uint64_t t0 = now_ns();
        for (unsigned i = 0; i < loops; i++) {
            *blocks = 0;
            buddy_walk_free(&B, 0, count_cb, blocks);
        }
        t[r] = (double)(now_ns() - t0) / loops;
    }
    return median(t);
}

static const char *verdict(double ns)
{
    return ns <= TARGET_NS ? "met" : "MISSED";
}

int main(void)
{
    fake_log_echo(true);
    fake_ram_init(0, 0); /* no page contents: any phys_to_virt aborts */
    size_t mb = buddy_meta_bytes(SPAN_PAGES);
    meta = aligned_alloc(8, (mb + 7) & ~(size_t)7);
    pfns = malloc(SPAN_PAGES * sizeof(*pfns));
    if (!meta || !pfns)
        return 1;
    uint64_t t_start = now_ns();

    const unsigned nbatch0 = 100000, npp = 2000000, nbatch9 = 1024;
    char label[64];
    double b0 = batch(0, nbatch0);
    snprintf(label, sizeof(label), "order-0 alloc+free, batch of %u:", nbatch0);
    printf("%-44s %8.1f ns/pair (target %.0f ns: %s)\n", label, b0, TARGET_NS, verdict(b0));
    double p0 = ping_pong(0, npp, 0);
    printf("%-44s %8.1f ns/pair (target %.0f ns: %s; worst case, 18 splits + 18 merges each)\n",
           "order-0 alloc+free, ping-pong, all free:", p0, TARGET_NS, verdict(p0));
    double p0w = ping_pong(0, npp, 1);
    printf("%-44s %8.1f ns/pair (target %.0f ns: %s; no split or merge)\n",
           "order-0 alloc+free, ping-pong, buddy in use:", p0w, TARGET_NS, verdict(p0w));
    double b9 = batch(9, nbatch9);
    snprintf(label, sizeof(label), "order-9 alloc+free, batch of %u:", nbatch9);
    printf("%-44s %8.1f ns/pair\n", label, b9);
    double p9 = ping_pong(9, npp, 0);
    printf("%-44s %8.1f ns/pair (9 splits + 9 merges each)\n",
           "order-9 alloc+free, ping-pong, all free:", p9);

    uint64_t blocks_free = 0, blocks_frag = 0;
    fresh();
    double w_free = walk(100000, &blocks_free);
    printf("%-44s %8.1f ns/walk, %llu blocks\n", "walk of 4 GiB, all free:", w_free,
           (unsigned long long)blocks_free);
    fresh();
    for (uint64_t i = 0; i < SPAN_PAGES; i++)
        pfns[i] = must_alloc(0);
    for (uint64_t i = 0; i < SPAN_PAGES; i++)
        if (!(pfns[i] & 1))
            must_free(pfns[i], 0);
    double w_frag = walk(5, &blocks_frag);
    printf("%-44s %8.3f ms/walk, %llu blocks (%.2f ns/block)\n",
           "walk of 4 GiB, every other page allocated:", w_frag / 1e6,
           (unsigned long long)blocks_frag, w_frag / (double)blocks_frag);

    double per_gib = (double)buddy_meta_bytes(1ULL << 18);
    printf("%-44s %8.0f bytes per GiB of RAM (%.3f %%, %.3f bytes/page)\n", "metadata:", per_gib,
           per_gib * 100.0 / (1ULL << 30), per_gib / (1ULL << 18));
    double secs = (double)(now_ns() - t_start) / 1e9;
    printf("%-44s %8.2f s\n", "total benchmark time:", secs);

    printf("{\"span_pages\":%llu,\"order0_batch_ns\":%.1f,\"order0_pingpong_ns\":%.1f,"
           "\"order0_pingpong_nosplit_ns\":%.1f,\"order9_batch_ns\":%.1f,"
           "\"order9_pingpong_ns\":%.1f,\"walk_free_ns\":%.1f,\"walk_free_blocks\":%llu,"
           "\"walk_frag_ns\":%.0f,\"walk_frag_blocks\":%llu,\"meta_bytes_per_gib\":%.0f,"
           "\"target_ns\":%.0f,\"order0_batch_met\":%s,\"order0_pingpong_met\":%s}\n",
           (unsigned long long)SPAN_PAGES, b0, p0, p0w, b9, p9, w_free,
           (unsigned long long)blocks_free, w_frag, (unsigned long long)blocks_frag, per_gib,
           TARGET_NS, b0 <= TARGET_NS ? "true" : "false", p0 <= TARGET_NS ? "true" : "false");
    free(meta);
    free(pfns);
    return 0;
}
