/*
 * Stage 2 of conformance mode: inside balloon mode's loop (the `step` hook), with the real
 * driver. A state machine that never blocks: every wait is a phase with a deadline, and the
 * device is served between steps. One function per phase; with blimp.conform.host=1 the phases
 * ask the host runner for what only the host can do (channel.c).
 */
#include "kernel/conform/conform_internal.h"
#include "lib/printf.h"

#define DONE_WAIT_NS (2000ull * 1000 * 1000) /* after a migration, for the cmd id to read DONE */

static void go(enum phase p)
{
    conform.phase = p;
    conform.phase_ns = platform_now_ns();
}

static bool phase_timed_out(uint64_t now)
{
    return now - conform.phase_ns > conform.timeout_ns;
}

static bool negotiated(const struct balloon_status *st, unsigned bit)
{
    return (st->features >> bit) & 1;
}

/* Skip verdict for a feature that is not there: declined by the guest, or not offered. */
static void feature_skip(enum check c, const struct balloon_status *st, unsigned bit,
                         const char *name)
{
    if ((st->offered >> bit) & 1)
        verdict(c, V_DECLINED, "declined: the guest declined %s", name);
    else
        verdict(c, V_NOT_OFFERED, "not offered: %s", name);
}

/* Every round id the driver saw (it may start and end a round within one poll: the last id
 * seen, STOP and DONE included, is what persists). */
static void track_hint_ids(void)
{
    struct balloon *b = balloon_mode_balloon();
    uint32_t id = b->hint_cmd_seen;
    if (id == conform.last_active)
        return;
    conform.last_active = id;
    if (id == BALLOON_HINT_CMD_STOP || id == BALLOON_HINT_CMD_DONE)
        return;
    /* A repeat is allowed once the device has used the driver's STOP for it. */
    bool stop_pending = b->hint_stop_owed || vq_in_flight(&b->hint_vq);
    for (unsigned i = 0; i < conform.n_ids; i++)
        if (conform.ids[i] == id && stop_pending)
            verdict(D11, V_VIOLATION,
                    "hint command id 0x%x reused before the device took the driver's STOP", id);
    if (conform.n_ids < sizeof(conform.ids) / sizeof(conform.ids[0]))
        conform.ids[conform.n_ids++] = id;
}

static uint32_t read_cmd_id(void)
{
    uint32_t v = 0;
    conform.t->ops->config_read(conform.t, BALLOON_CFG_HINT_CMD, 4, &v);
    return v;
}

static void no_host(const struct balloon_status *st)
{
    const char *why = "needs the host runner (./blimp conform, blimp.conform.host=1)";
    enum check host_checks[] = {D3, D4, D6, D7, D11, D13, D14, B1};
    for (unsigned i = 0; i < sizeof(host_checks) / sizeof(host_checks[0]); i++)
        verdict(host_checks[i], V_NEEDS_RUNNER, "%s", why);
    if (conform.t->legacy)
        verdict(D2, V_NEEDS_RUNNER, "%s", why);
    (void)st;
}

static void start(const struct balloon_status *st)
{
    conform.offered = st->offered;
    conform.resets0 = st->resets;
    verdict(D5, V_NOT_OBSERVABLE,
            "not observable: only the host sees when it uses actual (needs host-side tracing)");
    verdict(D8, V_NOT_OBSERVABLE, "not observable: host-side only");
    verdict(D12, V_NOT_OBSERVABLE,
            "not observable: which hints the host ignores is internal "
            "to its migration");
    if (!conform.t->legacy)
        verdict(D2, V_NOT_APPLICABLE, "not applicable: the modern interface is in use");
    else if (negotiated(st, VIRTIO_BALLOON_F_MUST_TELL_HOST))
        verdict(D2, V_NOT_APPLICABLE, "not applicable: MUST_TELL_HOST was negotiated");
    if (negotiated(st, VIRTIO_BALLOON_F_FREE_PAGE_HINT)) {
        uint32_t id = read_cmd_id();
        if (id == BALLOON_HINT_CMD_STOP || id == BALLOON_HINT_CMD_DONE)
            verdict(D10, V_CONFORMS, "free_page_hint_cmd_id reads %u outside migration", id);
        else
            verdict(D10, V_VIOLATION, "free_page_hint_cmd_id reads 0x%x with no migration", id);
    } else {
        feature_skip(D10, st, VIRTIO_BALLOON_F_FREE_PAGE_HINT, "FREE_PAGE_HINT");
        feature_skip(D11, st, VIRTIO_BALLOON_F_FREE_PAGE_HINT, "FREE_PAGE_HINT");
        feature_skip(D13, st, VIRTIO_BALLOON_F_FREE_PAGE_HINT, "FREE_PAGE_HINT");
        feature_skip(D14, st, VIRTIO_BALLOON_F_FREE_PAGE_HINT, "FREE_PAGE_HINT");
    }
    if (!negotiated(st, VIRTIO_BALLOON_F_STATS_VQ)) {
        feature_skip(D6, st, VIRTIO_BALLOON_F_STATS_VQ, "STATS_VQ");
        feature_skip(D7, st, VIRTIO_BALLOON_F_STATS_VQ, "STATS_VQ");
    }
    if (!negotiated(st, VIRTIO_BALLOON_F_PAGE_REPORTING)) {
        feature_skip(D15, st, VIRTIO_BALLOON_F_PAGE_REPORTING, "PAGE_REPORTING");
        feature_skip(D16, st, VIRTIO_BALLOON_F_PAGE_REPORTING, "PAGE_REPORTING");
    } else if (negotiated(st, VIRTIO_BALLOON_F_PAGE_POISON)) {
        verdict(D15, V_NOT_APPLICABLE, "not applicable: PAGE_POISON was negotiated (D16)");
    } else {
        feature_skip(D16, st, VIRTIO_BALLOON_F_PAGE_POISON,
                     "PAGE_POISON (accepted only with blimp.poison=1)");
    }
    if (!conform.host) {
        no_host(st);
        go(P_REPORT);
        return;
    }
    if (!build_layout()) {
        verdict(D4, V_NOT_EXERCISED, "not exercised: no free block for the isolated pages");
        verdict(B1, V_NOT_EXERCISED, "not exercised: no free block for the isolated pages");
        go(P_STATS_ON);
        return;
    }
    go(P_RSS0);
}

/* A request answered: true once acked; a nack or timeout sets `fail` for check c. */
static bool answered(uint64_t now, enum check c, enum phase on_fail, bool *failed)
{
    *failed = false;
    enum answer a = answer(now);
    if (a == A_WAITING)
        return false;
    if (a == A_ACK)
        return true;
    if (a == A_NACK)
        verdict(c, V_NOT_EXERCISED, "not exercised: the host runner could not %s: %s",
                conform.req.action, conform.req.rest);
    else
        verdict(c, V_TIMEOUT, "the host runner did not answer '%s' (request %lu) in time",
                conform.req.action, conform.req.seq);
    *failed = true;
    go(on_fail);
    return false;
}

static bool quiet(const struct balloon_status *st)
{
    return st->inflight_inflate == 0 && st->inflight_deflate == 0;
}

/* ---- the isolated-page inflate and deflate: B1, D3, D4, D2; D22/D23/D24 on the way ---------- */

static void ph_start(const struct balloon_status *st, uint64_t now)
{
    (void)now;
    start(st);
}

static void ph_rss0(const struct balloon_status *st, uint64_t now)
{
    (void)st, (void)now;
    request("rss", NULL, 0);
    go(P_TARGET);
}

static void ph_target(const struct balloon_status *st, uint64_t now)
{
    (void)st;
    bool failed;
    if (!answered(now, B1, P_TARGET, &failed)) {
        if (!failed)
            return;
        conform.rss0 = -1;
    } else if (!answer_value("kib", &conform.rss0)) {
        conform.rss0 = -1;
    }
    conform.gen0 = conform.t->ops->config_generation(conform.t);
    struct wait_stats ws;
    balloon_mode_wait_stats(&ws);
    conform.isr0 = ws.isr_config;
    conform.isr_rep0 = ws.isr_config_repeat;
    request("target", "pages", conform.target);
    go(P_TARGET_WAIT);
}

/* The balloon reached the target: D3, and the config change as the transport showed it. */
static void target_reached(const struct balloon_status *st)
{
    struct virtio_transport *t = conform.t;
    verdict(D3, V_CONFORMS, "num_pages read 0x%08x = %u, as the host set it", st->device_target,
            st->device_target);
    uint32_t gen = t->ops->config_generation(t);
    if (is_pci(t) && !t->legacy) {
        if (gen == conform.gen0)
            verdict(D22, V_VIOLATION, "config_generation stayed %u across a change of num_pages",
                    gen);
        else
            verdict(D22, V_CONFORMS,
                    "registers after a reset as required; config_generation %u -> %u "
                    "when num_pages changed",
                    conform.gen0, gen);
    } else if (is_pci(t)) {
        verdict(D22, V_CONFORMS, "legacy registers after a reset as required");
    }
    struct wait_stats ws;
    balloon_mode_wait_stats(&ws);
    if (is_pci(t)) {
        if (ws.isr_config == conform.isr0)
            verdict(D23, V_VIOLATION,
                    "no ISR read showed the configuration-change bit after num_pages "
                    "changed");
        else if (ws.isr_config_repeat != conform.isr_rep0)
            verdict(D23, V_VIOLATION,
                    "the configuration-change bit was still set on "
                    "the read after the one that saw it");
        else
            verdict(D23, V_CONFORMS,
                    "queue and configuration bits set before being read, cleared by "
                    "the read");
    } else if (is_mmio(t)) {
        verdict(D24, V_CONFORMS,
                "magic, version, Status/QueueReady after a reset; InterruptStatus held "
                "until InterruptACK; config generation %u -> %u",
                conform.gen0, gen);
    }
}

static void ph_target_wait(const struct balloon_status *st, uint64_t now)
{
    bool failed;
    if (conform.req.waiting && !answered(now, D3, P_DEFLATE, &failed))
        return;
    if (st->device_target == conform.target && st->actual == conform.target && quiet(st)) {
        target_reached(st);
        verify_neighbours("after inflating");
        request("rss", NULL, 0);
        go(P_RSS1);
    } else if (phase_timed_out(now)) {
        if (st->device_target != conform.target && st->device_target != 0)
            verdict(D3, V_VIOLATION, "num_pages reads 0x%08x, the host set 0x%08x",
                    st->device_target, conform.target);
        else
            verdict(D3, V_TIMEOUT, "the balloon reached %u of %u pages (num_pages %u)", st->actual,
                    conform.target, st->device_target);
        verdict(B1, V_NOT_EXERCISED, "not exercised: the balloon did not fill");
        go(P_DEFLATE);
    }
}

static void ph_rss1(const struct balloon_status *st, uint64_t now)
{
    (void)st;
    bool failed;
    if (!answered(now, B1, P_DEFLATE, &failed))
        return;
    if (answer_value("kib", &conform.rss1) && conform.rss0 >= 0) {
        int64_t drop = conform.rss0 - conform.rss1, want = (int64_t)conform.target * 4;
        if (drop * 2 >= want)
            verdict(B1, V_CONFORMS, "host RSS fell by %ld KiB for %ld KiB inflated", drop, want);
        else
            verdict(B1, V_ACKED_NOT_DISCARDED,
                    "the host acknowledged %ld KiB but its RSS fell by %ld KiB (%ld -> %ld)", want,
                    drop, conform.rss0, conform.rss1);
    } else {
        verdict(B1, V_NOT_EXERCISED, "not exercised: the runner gave no RSS");
    }
    go(P_DEFLATE);
}

static void ph_deflate(const struct balloon_status *st, uint64_t now)
{
    (void)st, (void)now;
    request("target", "pages", 0);
    go(P_DEFLATE_WAIT);
}

static void ph_deflate_wait(const struct balloon_status *st, uint64_t now)
{
    bool failed;
    if (conform.req.waiting && !answered(now, D4, P_STATS_ON, &failed))
        return;
    if (st->device_target == 0 && st->actual == 0 && quiet(st)) {
        verify_neighbours("after deflating");
        if (conform.t->legacy && !negotiated(st, VIRTIO_BALLOON_F_MUST_TELL_HOST))
            verdict(D2, V_CONFORMS,
                    "legacy interface without MUST_TELL_HOST: %u pages "
                    "inflated and deflated",
                    conform.target);
        go(P_STATS_ON);
    } else if (phase_timed_out(now)) {
        verdict(D4, V_TIMEOUT, "the balloon still held %u pages after num_pages went to 0",
                st->actual);
        go(P_STATS_ON);
    }
}

/* ---- stats: D6, D7 -------------------------------------------------------------------------- */

static void ph_stats_on(const struct balloon_status *st, uint64_t now)
{
    (void)now;
    if (!negotiated(st, VIRTIO_BALLOON_F_STATS_VQ)) {
        go(P_MIGRATE1);
        return;
    }
    conform.stats0 = st->stats_updates;
    request("stats_interval", "seconds", 1);
    go(P_STATS_WAIT);
}

static void ph_stats_wait(const struct balloon_status *st, uint64_t now)
{
    bool failed;
    if (conform.req.waiting && !answered(now, D6, P_MIGRATE1, &failed))
        return;
    if (st->stats_updates >= conform.stats0 + 2) {
        verdict(D6, V_CONFORMS,
                "the device kept polling stats (%lu updates) with %u entries of unknown tags "
                "(0x%x, 0x%x..0x%x) among the %u known in every buffer, %u in all",
                st->stats_updates - conform.stats0, 1 + BALLOON_STATS_PROBE_EXTRA,
                BALLOON_STATS_PROBE_TAG, BALLOON_STATS_PROBE_TAG_BASE,
                BALLOON_STATS_PROBE_TAG_BASE + BALLOON_STATS_PROBE_EXTRA - 1, BALLOON_NUM_STATS,
                1 + BALLOON_NUM_STATS + BALLOON_STATS_PROBE_EXTRA);
        request("stats_read", NULL, 0);
        go(P_STATS_READ);
    } else if (phase_timed_out(now)) {
        verdict(D6, V_TIMEOUT, "%lu stats updates in %lu ms at a 1 s interval",
                st->stats_updates - conform.stats0, conform.timeout_ns / 1000000);
        verdict(D7, V_NOT_EXERCISED, "not exercised: the host did not poll stats");
        go(P_STATS_OFF);
    }
}

static void ph_stats_read(const struct balloon_status *st, uint64_t now)
{
    (void)st;
    bool failed;
    if (!answered(now, D7, P_STATS_OFF, &failed))
        return;
    struct buddy_stats bs;
    buddy_get_stats(&kernel_buddy, &bs);
    int64_t total, freev;
    /* The last buffer the host read: the same numbers balloon_fill_stats writes now, as
     * nothing has allocated or freed since (the guest holds its memory still). */
    if (!answer_value("total_memory", &total) || !answer_value("free_memory", &freev))
        verdict(D7, V_VIOLATION, "the host reports no total/free memory: %s", conform.req.rest);
    else if ((uint64_t)total != bs.total_pages * PAGE_SIZE ||
             (uint64_t)freev != bs.free_pages * PAGE_SIZE)
        verdict(D7, V_VIOLATION,
                "entries sent in reverse order: the host reports total %ld free %ld, the "
                "guest sent %lu and %lu",
                total, freev, (uint64_t)(bs.total_pages * PAGE_SIZE),
                (uint64_t)(bs.free_pages * PAGE_SIZE));
    else
        verdict(D7, V_CONFORMS,
                "entries sent in reverse tag order read back as sent "
                "(total %ld, free %ld bytes)",
                total, freev);
    go(P_STATS_OFF);
}

static void ph_stats_off(const struct balloon_status *st, uint64_t now)
{
    (void)st, (void)now;
    request("stats_interval", "seconds", 0);
    go(P_MIGRATE1);
}

/* ---- free page hinting over two live migrations: D10, D11, D13, D14 ------------------------- */

static void ph_migrate1(const struct balloon_status *st, uint64_t now)
{
    if (conform.req.waiting && answer(now) == A_WAITING)
        return; /* the stats_interval 0 answer (its outcome does not matter) */
    release_layout();
    if (!conform.host || !negotiated(st, VIRTIO_BALLOON_F_FREE_PAGE_HINT)) {
        go(P_REPORT);
        return;
    }
    conform.rounds0 = st->hint_rounds;
    request("migrate", NULL, 0);
    go(P_MIGRATE1_WAIT);
}

static void ph_migrate1_wait(const struct balloon_status *st, uint64_t now)
{
    (void)st;
    bool failed;
    if (!answered(now, D13, P_REPORT, &failed)) {
        if (failed) {
            verdict(D11, V_NOT_EXERCISED, "not exercised: no migration");
            verdict(D14, V_NOT_EXERCISED, "not exercised: no migration");
        }
        return;
    }
    go(P_MIGRATE1_CHECK);
}

static void ph_migrate1_check(const struct balloon_status *st, uint64_t now)
{
    uint32_t id = read_cmd_id();
    if (st->hint_rounds == conform.rounds0) {
        verdict(D14, V_NOT_EXERCISED,
                "not exercised: the host started no hinting round "
                "during the migration");
    } else if (id == BALLOON_HINT_CMD_DONE) {
        verdict(D14, V_CONFORMS, "after the migration the cmd id reads DONE (%lu round(s))",
                st->hint_rounds - conform.rounds0);
    } else if (now - conform.phase_ns > DONE_WAIT_NS) {
        verdict(D14, V_VIOLATION, "the cmd id reads 0x%x 2 s after the migration completed", id);
    } else {
        return; /* it may still be on its way to DONE */
    }
    if (id != BALLOON_HINT_CMD_STOP && id != BALLOON_HINT_CMD_DONE)
        verdict(D10, V_VIOLATION, "free_page_hint_cmd_id reads 0x%x after the migration", id);
    /* Everything free now (hinted pages included, back after DONE) is written, then a
     * second migration must carry it. */
    take_all(&conform.fill, 3);
    go(P_MIGRATE2);
}

static void ph_migrate2(const struct balloon_status *st, uint64_t now)
{
    if (st->hinted_pages) {
        if (phase_timed_out(now)) {
            verdict(D14, V_VIOLATION, "%lu pages still hinted after the migration",
                    st->hinted_pages);
            go(P_REPORT);
        }
        return;
    }
    request("migrate", NULL, 0);
    go(P_MIGRATE2_WAIT);
}

static void ph_migrate2_wait(const struct balloon_status *st, uint64_t now)
{
    bool failed;
    if (!answered(now, D13, P_REPORT, &failed)) {
        if (failed)
            free_chain(&conform.fill);
        return;
    }
    uint64_t found = 0, expected = 0, checked = 0;
    uint64_t bad = verify_chain(&conform.fill, 3, &found, &expected, &checked);
    if (bad)
        verdict(D13, V_WRONG_PAGE,
                "page 0x%lx, written after the hinting round's DONE, reads 0x%lx at 0x%lx "
                "after the next migration (expected 0x%lx)",
                bad & ~(uint64_t)(PAGE_SIZE - 1), found, bad, expected);
    else if (st->hint_rounds == conform.rounds0)
        verdict(D13, V_NOT_EXERCISED, "not exercised: no hinting round");
    else
        verdict(D13, V_CONFORMS,
                "%lu pages written after DONE verified after a second "
                "migration",
                checked);
    if (conform.n_ids >= 2)
        verdict(D11, V_CONFORMS, "%u rounds over two migrations, each with its own id",
                conform.n_ids);
    else
        verdict(D11, V_NOT_EXERCISED, "not exercised: %u hinting round(s) seen", conform.n_ids);
    free_chain(&conform.fill);
    go(P_REPORT);
}

/* ---- free page reporting: D15, D16 ---------------------------------------------------------- */

static void ph_report(const struct balloon_status *st, uint64_t now)
{
    if (!negotiated(st, VIRTIO_BALLOON_F_PAGE_REPORTING)) {
        go(P_RESET);
        return;
    }
    /* Pattern all free memory, give it back: the driver reports it after its delay. */
    take_all(&conform.fill, 4);
    free_chain(&conform.fill);
    conform.reported0 = st->reported_pages;
    conform.last_reported = st->reported_pages;
    conform.quiet_since = now;
    go(P_REPORT_WAIT);
}

/* Reporting settled: take all free memory back (the allocator verifies poison as it goes). */
static void report_settled(const struct balloon_status *st, enum check c)
{
    uint64_t reported = st->reported_pages - conform.reported0;
    struct buddy_stats before, after;
    buddy_get_stats(&kernel_buddy, &before);
    struct chain all = {BUDDY_NONE, 0};
    uint64_t zero = take_all_count_zero(&all);
    buddy_get_stats(&kernel_buddy, &after);
    if (c == D16) {
        uint64_t errs = after.poison_errors - before.poison_errors;
        if (errs)
            verdict(D16, V_VIOLATION,
                    "%lu reported blocks did not hold poison_val 0x%x (first bad byte at "
                    "0x%lx)",
                    errs, conform.cfg->poison_val, kernel_buddy.poison_bad_phys);
        else
            verdict(D16, V_CONFORMS,
                    "%lu pages reported; all free memory read back as "
                    "poison_val 0x%x",
                    reported, conform.cfg->poison_val);
    } else if (zero > reported) {
        verdict(D15, V_WRONG_PAGE,
                "%lu free pages read back as zero but only %lu were "
                "reported",
                zero, reported);
    } else {
        verdict(D15, V_CONFORMS,
                "%lu pages reported; %lu read back as zero (discarded), "
                "every other free page as written",
                reported, zero);
    }
    free_chain(&all);
}

static void ph_report_wait(const struct balloon_status *st, uint64_t now)
{
    if (st->reported_pages != conform.last_reported || st->inflight_report) {
        conform.last_reported = st->reported_pages;
        conform.quiet_since = now;
    }
    bool settled = st->reported_pages > conform.reported0 && !st->inflight_report &&
                   now - conform.quiet_since > 300ull * 1000 * 1000;
    if (!settled && !phase_timed_out(now))
        return;
    enum check c = negotiated(st, VIRTIO_BALLOON_F_PAGE_POISON) ? D16 : D15;
    if (!settled)
        verdict(c, st->reported_pages > conform.reported0 ? V_TIMEOUT : V_NOT_EXERCISED,
                "reporting did not settle: %lu pages reported, %lu in flight",
                st->reported_pages - conform.reported0, st->inflight_report);
    else
        report_settled(st, c);
    go(P_RESET);
}

/* ---- a reset of the running device: D18 ----------------------------------------------------- */

static void used_indices(uint16_t idx[3])
{
    struct balloon *b = balloon_mode_balloon();
    idx[0] = b->inflate_vq.used->idx;
    idx[1] = b->deflate_vq.used->idx;
    idx[2] = b->has_stats ? b->stats_vq.used->idx : 0;
}

static void ph_reset(const struct balloon_status *st, uint64_t now)
{
    (void)st, (void)now;
    int rc = conform.t->ops->reset(conform.t);
    uint8_t s = conform.t->ops->get_status(conform.t);
    used_indices(conform.used_idx);
    if (rc != 0 || s != 0)
        verdict(D18, V_VIOLATION, "status reads 0x%02x after a reset of the running device", s);
    go(P_RESET_WAIT);
}

static void ph_reset_wait(const struct balloon_status *st, uint64_t now)
{
    (void)st;
    if (now - conform.phase_ns < 50ull * 1000 * 1000)
        return;
    uint16_t now_idx[3];
    used_indices(now_idx);
    const uint16_t *was = conform.used_idx;
    if (now_idx[0] != was[0] || now_idx[1] != was[1] || now_idx[2] != was[2])
        verdict(D18, V_VIOLATION,
                "used indices moved after the reset (inflate %u->%u, "
                "deflate %u->%u, stats %u->%u)",
                was[0], now_idx[0], was[1], now_idx[1], was[2], now_idx[2]);
    else
        verdict(D18, V_CONFORMS,
                "status 0 after resets of a fresh and of the running "
                "device; no used index moved after either");
    conform_finish();
}

static void ph_finish(const struct balloon_status *st, uint64_t now)
{
    (void)st, (void)now;
    conform_finish();
}

static void (*const phases[N_PHASES])(const struct balloon_status *st, uint64_t now) = {
    [P_START] = ph_start,
    [P_RSS0] = ph_rss0,
    [P_TARGET] = ph_target,
    [P_TARGET_WAIT] = ph_target_wait,
    [P_RSS1] = ph_rss1,
    [P_DEFLATE] = ph_deflate,
    [P_DEFLATE_WAIT] = ph_deflate_wait,
    [P_STATS_ON] = ph_stats_on,
    [P_STATS_WAIT] = ph_stats_wait,
    [P_STATS_READ] = ph_stats_read,
    [P_STATS_OFF] = ph_stats_off,
    [P_MIGRATE1] = ph_migrate1,
    [P_MIGRATE1_WAIT] = ph_migrate1_wait,
    [P_MIGRATE1_CHECK] = ph_migrate1_check,
    [P_MIGRATE2] = ph_migrate2,
    [P_MIGRATE2_WAIT] = ph_migrate2_wait,
    [P_REPORT] = ph_report,
    [P_REPORT_WAIT] = ph_report_wait,
    [P_RESET] = ph_reset,
    [P_RESET_WAIT] = ph_reset_wait,
    [P_FINISH] = ph_finish,
};

uint64_t conform_step(void *ctx, const struct balloon_status *st)
{
    (void)ctx;
    uint64_t now = platform_now_ns();
    if (st->state == BALLOON_BROKEN) {
        enum check c = conform.phase <= P_DEFLATE_WAIT ? D4 : D20;
        verdict(c, V_VIOLATION, "%s", st->violation);
        verdict(D20, V_VIOLATION, "%s", st->violation);
        conform_finish();
    }
    if (st->resets != conform.resets0) {
        conform.resets0 = st->resets;
        verdict(conform.phase <= P_DEFLATE_WAIT ? D4 : D20, V_NEEDS_RESET,
                "the device set DEVICE_NEEDS_RESET (the driver reset it and went on)");
    }
    track_hint_ids();
    phases[conform.phase](st, now);
    return now;
}
