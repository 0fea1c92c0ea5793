/*
 * Unit tests for the balloon driver's per-buffer latency histograms (virtio/balloon.c,
 * struct balloon_latency): the bucket and percentile arithmetic, the JSON the guest prints, and
 * what the driver records against the device model in fake_balloon.c with a virtual clock, so
 * that every buffer's latency is exactly the time a test let pass while the device held it.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "virtio/balloon.h"
#include "lib/json.h"
#include "mm/buddy.h"
#include "tests/unit/fake_balloon.h"
#include "tests/unit/fake_platform.h"
#include "tests/unit/fake_transport.h"
#include "include/platform.h"

#define RAM_BASE  0x100000ULL
#define RAM_BYTES (64ULL << 20)
#define RAM_PFN   (RAM_BASE >> PAGE_SHIFT)
#define RAM_PAGES (RAM_BYTES >> PAGE_SHIFT)
#define QSIZE     128
#define US        1000ULL
#define MS        (1000ULL * 1000)

#define F(bit) (1ULL << (bit))
#define MODERN                                                                                     \
    (F(VIRTIO_F_VERSION_1) | F(VIRTIO_BALLOON_F_STATS_VQ) | F(VIRTIO_BALLOON_F_MUST_TELL_HOST) |   \
     F(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) | F(VIRTIO_F_EVENT_IDX))
#define REPORTING (MODERN | F(VIRTIO_BALLOON_F_PAGE_REPORTING) | F(VIRTIO_F_INDIRECT_DESC))

/* A clock reading moves time this far: the readings between a buffer's send and its collection
 * add at most a few microseconds to what a test skips. */
#define STEP_NS 1

/* ---- Fixture -------------------------------------------------------------------------------- */

struct env {
    struct buddy mm;
    void *meta;
    struct fake_transport ft;
    struct fake_balloon fb;
    struct balloon b;
    struct balloon_config cfg;
};

/* hold_reports: the device keeps report chains unanswered from the start (balloon_init's own
 * poll may already send the first pass). */
static struct env *env_up(uint64_t features, bool hold_reports)
{
    struct env *e = calloc(1, sizeof(*e));
    assert_non_null(e);
    fake_log_echo(false);
    fake_log_reset();
    fake_clock_virtual(STEP_NS);
    fake_ram_init(RAM_BASE, RAM_BYTES);
    size_t mb = buddy_meta_bytes(RAM_PAGES);
    e->meta = aligned_alloc(8, (mb + 7) & ~(size_t)7);
    assert_non_null(e->meta);
    assert_int_equal(buddy_init(&e->mm, e->meta, mb, RAM_PFN, RAM_PAGES), 0);
    buddy_add_range(&e->mm, RAM_PFN, RAM_PAGES);
    fake_transport_init(&e->ft, false, VIRTIO_ID_BALLOON, features, 16);
    fake_balloon_init(&e->fb, &e->ft, RAM_BASE, RAM_BYTES, QSIZE);
    e->fb.mm = &e->mm;
    e->fb.hold_reports = hold_reports;
    balloon_default_config(&e->cfg);
    e->cfg.report_delay_ms = 0;
    assert_int_equal(balloon_init(&e->b, &e->ft.t, &e->mm, &e->cfg), 0);
    assert_int_equal(e->b.state, BALLOON_RUNNING);
    return e;
}

static void env_free(struct env *e)
{
    fake_balloon_fini(&e->fb);
    fake_transport_fini(&e->ft);
    free(e->meta);
    fake_ram_fini();
    free(e);
    fake_clock_virtual(0);
}

static void poll_n(struct env *e, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
        assert_int_not_equal(e->b.state, BALLOON_BROKEN);
    }
}

static struct balloon_latency lat_of(const struct env *e, enum balloon_lat_kind k)
{
    struct balloon_latency lat[BLAT_KINDS];
    balloon_get_latency(&e->b, lat);
    return lat[k];
}

/* Buckets other than those listed are empty. */
static void assert_only_buckets(const struct balloon_latency *l, unsigned n, const unsigned *idx,
                                const uint64_t *counts)
{
    for (unsigned i = 0; i < BALLOON_LAT_BUCKETS; i++) {
        uint64_t want = 0;
        for (unsigned k = 0; k < n; k++)
            if (idx[k] == i)
                want = counts[k];
        if (l->buckets[i] != want)
            fail_msg("bucket %u: %llu, expected %llu", i, (unsigned long long)l->buckets[i],
                     (unsigned long long)want);
    }
}

/* ---- Arithmetic ----------------------------------------------------------------------------- */

static void test_buckets(void **state)
{
    (void)state;
    assert_int_equal(balloon_latency_bucket(0), 0);
    assert_int_equal(balloon_latency_bucket(1999), 0); /* [0, 2) us */
    assert_int_equal(balloon_latency_bucket(2 * US), 1);
    assert_int_equal(balloon_latency_bucket(4 * US - 1), 1);
    assert_int_equal(balloon_latency_bucket(4 * US), 2);
    assert_int_equal(balloon_latency_bucket(1 * MS), 9);     /* 1000 us: [512, 1024) */
    assert_int_equal(balloon_latency_bucket(1024 * US), 10); /* [1024, 2048) */
    /* An hour is in a bounded bucket; the last one is open-ended. */
    assert_int_equal(balloon_latency_bucket(3600ULL * 1000 * MS), 31);
    assert_int_equal(balloon_latency_bucket((1ULL << 32) * US), BALLOON_LAT_BUCKETS - 1);
    assert_int_equal(balloon_latency_bucket(UINT64_MAX), BALLOON_LAT_BUCKETS - 1);
    assert_int_equal(balloon_latency_bucket_lo_us(0), 0);
    assert_int_equal(balloon_latency_bucket_lo_us(1), 2);
    assert_int_equal(balloon_latency_bucket_lo_us(11), 2048);
}

static void test_percentiles(void **state)
{
    (void)state;
    struct balloon_latency l = {0};
    assert_int_equal(balloon_latency_percentile_us(&l, 50), 0);
    /* 90 at 3 us, 9 at 100 us, 1 at 5 ms. */
    for (unsigned i = 0; i < 90; i++)
        balloon_latency_record(&l, 3 * US);
    for (unsigned i = 0; i < 9; i++)
        balloon_latency_record(&l, 100 * US);
    balloon_latency_record(&l, 5 * MS);
    assert_int_equal(l.count, 100);
    assert_int_equal(l.min_ns, 3 * US);
    assert_int_equal(l.max_ns, 5 * MS);
    assert_int_equal(l.sum_ns, 90 * 3 * US + 9 * 100 * US + 5 * MS);
    unsigned idx[] = {1, 6, 12};
    uint64_t counts[] = {90, 9, 1};
    assert_only_buckets(&l, 3, idx, counts);
    /* The upper bound of the bucket holding the rank: [2, 4) -> 4, [64, 128) -> 128. */
    assert_int_equal(balloon_latency_percentile_us(&l, 50), 4);
    assert_int_equal(balloon_latency_percentile_us(&l, 90), 4);
    assert_int_equal(balloon_latency_percentile_us(&l, 91), 128);
    assert_int_equal(balloon_latency_percentile_us(&l, 99), 128);
    /* ... but never above the maximum ([4096, 8192) holds 5000 us). */
    assert_int_equal(balloon_latency_percentile_us(&l, 100), 5000);

    /* One value: every percentile is the value itself (clamped to max). */
    struct balloon_latency one = {0};
    balloon_latency_record(&one, 3 * US);
    assert_int_equal(balloon_latency_percentile_us(&one, 50), 3);
    assert_int_equal(balloon_latency_percentile_us(&one, 99), 3);
    assert_int_equal(one.min_ns, 3 * US);

    /* The open-ended bucket: its percentile is the maximum. */
    struct balloon_latency big = {0};
    balloon_latency_record(&big, 5000ULL * 1000 * 1000 * MS);
    assert_int_equal(big.buckets[BALLOON_LAT_BUCKETS - 1], 1);
    assert_int_equal(balloon_latency_percentile_us(&big, 50), 5000ULL * 1000 * 1000 * 1000);

    /* A smaller later value lowers min; 0 ns is a value like any other. */
    balloon_latency_record(&l, 0);
    assert_int_equal(l.min_ns, 0);
    assert_int_equal(l.buckets[0], 1);
}

static void test_json(void **state)
{
    (void)state;
    struct balloon_latency lat[BLAT_KINDS] = {{0}};
    balloon_latency_record(&lat[BLAT_INFLATE], 3 * US);
    balloon_latency_record(&lat[BLAT_INFLATE], 5 * US);
    balloon_latency_record(&lat[BLAT_INFLATE], 1500 * US);
    balloon_latency_record(&lat[BLAT_REPORT], 1 * US);
    struct json j;
    balloon_latency_event(&j, lat);
    assert_string_equal(
        json_finish(&j),
        "{\"event\":\"balloon_latency\","
        "\"inflate\":{\"count\":3,\"min_us\":3,\"mean_us\":502,\"p50_us\":8,\"p90_us\":1500,"
        "\"p99_us\":1500,\"max_us\":1500,\"buckets\":[[2,1],[4,1],[1024,1]]},"
        "\"deflate\":{\"count\":0,\"min_us\":0,\"mean_us\":0,\"p50_us\":0,\"p90_us\":0,"
        "\"p99_us\":0,\"max_us\":0,\"buckets\":[]},"
        "\"report\":{\"count\":1,\"min_us\":1,\"mean_us\":1,\"p50_us\":1,\"p90_us\":1,"
        "\"p99_us\":1,\"max_us\":1,\"buckets\":[[0,1]]}}");

    /* Every bucket of every kind full with huge counts: too long for one line, so the event
     * goes without its buckets instead of being truncated. */
    for (unsigned k = 0; k < BLAT_KINDS; k++) {
        for (unsigned i = 0; i < BALLOON_LAT_BUCKETS; i++)
            lat[k].buckets[i] = UINT64_MAX / 64;
        lat[k].count = UINT64_MAX / 2;
        lat[k].max_ns = UINT64_MAX;
    }
    balloon_latency_event(&j, lat);
    const char *s = json_finish(&j);
    assert_null(strstr(s, "truncated"));
    assert_null(strstr(s, "buckets\""));
    assert_non_null(strstr(s, "\"buckets_omitted\":true"));
    assert_non_null(strstr(s, "\"report\":{\"count\":"));
}

/* ---- What the driver records ---------------------------------------------------------------- */

static void test_inflate_deflate_latency(void **state)
{
    (void)state;
    struct env *e = env_up(MODERN, false);
    assert_int_equal(e->cfg.pfns_per_buffer, 256);
    /* Three inflate buffers of 256 pages, held: one answered after 3 ms, two after 13 ms. */
    e->fb.hold[FB_INFLATE] = true;
    fake_balloon_set_target(&e->fb, 768);
    poll_n(e, 1);
    assert_int_equal(fake_balloon_held(&e->fb, FB_INFLATE), 3);
    assert_int_equal(lat_of(e, BLAT_INFLATE).count, 0);
    fake_clock_skip(3 * MS);
    assert_int_equal(fake_balloon_answer(&e->fb, FB_INFLATE, 1), 1);
    poll_n(e, 1);
    assert_int_equal(lat_of(e, BLAT_INFLATE).count, 1);
    fake_clock_skip(10 * MS);
    assert_int_equal(fake_balloon_answer(&e->fb, FB_INFLATE, ~0u), 2);
    poll_n(e, 1);
    assert_int_equal(e->b.actual, 768);

    struct balloon_latency in = lat_of(e, BLAT_INFLATE);
    assert_int_equal(in.count, 3);
    assert_int_equal(in.count, e->b.inflate_buffers);
    unsigned idx_in[] = {11, 13}; /* 3000 us in [2048, 4096), 13000 us in [8192, 16384) */
    uint64_t cnt_in[] = {1, 2};
    assert_only_buckets(&in, 2, idx_in, cnt_in);
    assert_in_range(in.min_ns, 3 * MS, 3 * MS + 10 * US);
    assert_in_range(in.max_ns, 13 * MS, 13 * MS + 10 * US);
    assert_in_range(in.sum_ns, 29 * MS, 29 * MS + 30 * US);
    assert_int_equal(balloon_latency_percentile_us(&in, 50), 13000); /* max, under 16384 */
    assert_int_equal(balloon_latency_percentile_us(&in, 10), 4096);
    assert_int_equal(lat_of(e, BLAT_DEFLATE).count, 0);
    assert_int_equal(lat_of(e, BLAT_REPORT).count, 0);
    /* The event a mode with its own struct balloon prints (the log keeps 256 characters). */
    fake_log_reset();
    balloon_emit_latency(&e->b);
    assert_true(fake_log_contains("{\"event\":\"balloon_latency\",\"inflate\":{\"count\":3,"));

    /* Deflate: two buffers, answered after 100 us. */
    e->fb.hold[FB_DEFLATE] = true;
    fake_balloon_set_target(&e->fb, 256);
    poll_n(e, 1);
    assert_int_equal(fake_balloon_held(&e->fb, FB_DEFLATE), 2);
    fake_clock_skip(100 * US);
    assert_int_equal(fake_balloon_answer(&e->fb, FB_DEFLATE, ~0u), 2);
    poll_n(e, 1);
    assert_int_equal(e->b.actual, 256);
    struct balloon_latency de = lat_of(e, BLAT_DEFLATE);
    assert_int_equal(de.count, 2);
    assert_int_equal(de.count, e->b.deflate_buffers);
    unsigned idx_de[] = {6}; /* [64, 128) */
    uint64_t cnt_de[] = {2};
    assert_only_buckets(&de, 1, idx_de, cnt_de);
    assert_int_equal(de.min_ns / US, 100);
    assert_int_equal(lat_of(e, BLAT_INFLATE).count, 3); /* untouched */

    /* Answered at once (the model completes on notify): under 2 us, bucket 0. */
    e->fb.hold[FB_INFLATE] = false;
    fake_balloon_set_target(&e->fb, 512);
    poll_n(e, 3);
    assert_int_equal(e->b.actual, 512);
    in = lat_of(e, BLAT_INFLATE);
    assert_int_equal(in.count, 4);
    assert_int_equal(in.buckets[0], 1);
    assert_true(in.min_ns < 2 * US);
    env_free(e);
}

static void test_reset_detached_not_counted(void **state)
{
    (void)state;
    struct env *e = env_up(MODERN, false);
    fake_balloon_set_target(&e->fb, 512);
    poll_n(e, 3);
    assert_int_equal(e->b.actual, 512);
    assert_int_equal(lat_of(e, BLAT_INFLATE).count, 2);

    /* Three inflate buffers in flight when the device breaks: the reset takes them back, and
     * they are not latencies. */
    e->fb.hold[FB_INFLATE] = true;
    fake_balloon_set_target(&e->fb, 1280);
    poll_n(e, 1);
    assert_int_equal(fake_balloon_held(&e->fb, FB_INFLATE), 3);
    uint64_t sent = e->b.inflate_buffers;
    assert_int_equal(sent, 5);
    fake_clock_skip(1 * MS);
    fake_balloon_break(&e->fb);
    poll_n(e, 1);
    assert_int_equal(e->b.resets, 1);
    /* The histogram survived the reset, with nothing added. */
    struct balloon_latency in = lat_of(e, BLAT_INFLATE);
    assert_int_equal(in.count, 2);
    assert_true(in.max_ns < 2 * US);

    /* The fresh device gets the held pages again, then the rest: each of those counts. */
    e->fb.hold[FB_INFLATE] = false;
    fake_balloon_answer(&e->fb, FB_INFLATE, ~0u);
    for (unsigned i = 0; i < 100 && (e->b.actual != 1280 || e->b.inflight_inflate); i++)
        poll_n(e, 1);
    assert_int_equal(e->b.actual, 1280);
    in = lat_of(e, BLAT_INFLATE);
    assert_int_equal(in.count, e->b.inflate_buffers - 3);
    assert_true(in.count > 2);
    assert_true(in.max_ns < 1 * MS); /* none of the detached buffers' millisecond */
    env_free(e);
}

static void test_report_latency(void **state)
{
    (void)state;
    struct env *e = env_up(REPORTING, true);
    /* Boot-time free memory goes out as report chains: held 40 ms, then answered. */
    poll_n(e, 2);
    uint64_t inflight = e->b.inflight_report;
    assert_true(inflight > 0);
    fake_clock_skip(40 * MS);
    unsigned chains = fake_balloon_answer(&e->fb, FB_REPORT, ~0u);
    assert_true(chains >= 1);
    e->fb.hold_reports = false;
    for (unsigned i = 0; i < 100 && (e->b.pass_active || e->b.inflight_report); i++)
        poll_n(e, 1);
    assert_int_equal(e->b.inflight_report, 0);
    struct balloon_latency r = lat_of(e, BLAT_REPORT);
    assert_int_equal(r.count, e->b.report_chains);
    assert_int_equal(r.count, e->fb.report_chains);
    assert_int_equal(r.buckets[15], chains); /* 40000 us in [32768, 65536) */
    assert_in_range(r.min_ns, 0, 40 * MS + 100 * US);
    assert_in_range(r.max_ns, 40 * MS, 40 * MS + 100 * US);
    assert_int_equal(lat_of(e, BLAT_INFLATE).count, 0);
    env_free(e);
}

int main(void)
{
    if (getenv("BLIMP_TEST_FILTER"))
        cmocka_set_test_filter(getenv("BLIMP_TEST_FILTER"));
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_buckets),
        cmocka_unit_test(test_percentiles),
        cmocka_unit_test(test_json),
        cmocka_unit_test(test_inflate_deflate_latency),
        cmocka_unit_test(test_reset_detached_not_counted),
        cmocka_unit_test(test_report_latency),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
