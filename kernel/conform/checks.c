/*
 * Conformance mode's checks: the table of requirements (D1-D24 of
 * ../shared/docs/balloon-protocol.md section 5.2, and B1), the verdict each one gets, and the
 * report at the end: one TAP point per check with a YAML block carrying the verdict, one
 * conform_check event per point, the summary and the exit (docs/conformance.md).
 */
#include "arch/x86/exit.h"
#include "kernel/conform/conform_internal.h"
#include "kernel/report.h"
#include "lib/json.h"
#include "lib/printf.h"
#include "lib/string.h"

static const struct {
    const char *id, *section, *title;
} checks[N_CHECKS] = {
    [D1] = {"D1", "5.5.3.2", "FEATURES_OK is answered when MUST_TELL_HOST is declined"},
    [D2] = {"D2", "5.5.3.2", "legacy interface: the device works without MUST_TELL_HOST"},
    [D3] = {"D3", "5.5.4", "num_pages reads exactly the target the host set (little-endian)"},
    [D4] = {"D4", "5.5.6.2", "the device changes no page outside the balloon"},
    [D5] = {"D5", "5.5.6.2.1", "legacy: actual is not used before its last byte is written"},
    [D6] = {"D6", "5.5.6.3.2", "the device ignores an unknown stats tag"},
    [D7] = {"D7", "5.5.6.3.2", "the device accepts stats entries in any order"},
    [D8] = {"D8", "5.5.6.3.3", "legacy: the values of the first stats buffer are ignored"},
    [D9] = {"D9", "2.1.2", "the device uses no buffer before DRIVER_OK"},
    [D10] = {"D10", "5.5.6.5.2", "free_page_hint_cmd_id reads STOP or DONE outside migration"},
    [D11] = {"D11", "5.5.6.5.2", "a hint command id is not reused"},
    [D12] = {"D12", "5.5.6.5.2", "hints tagged with a stale id are ignored"},
    [D13] = {"D13", "5.5.6.5.2", "pages written after DONE arrive intact after a migration"},
    [D14] = {"D14", "5.5.6.5.2", "the cmd id becomes DONE once the migration needs no hints"},
    [D15] = {"D15", "5.5.6.7.2", "without PAGE_POISON only reported pages may change"},
    [D16] = {"D16", "5.5.6.7.2", "with PAGE_POISON reported pages keep poison_val"},
    [D17] = {"D17", "2.2.2", "FEATURES_OK sticks for valid subsets of the offered features"},
    [D18] = {"D18", "2.4.1", "after a reset status reads 0 and no queue moves"},
    [D19] = {"D19", "2.5.2", "the config (offered features' fields too) reads before FEATURES_OK"},
    [D20] = {"D20", "2.7.5.1", "no write to device-readable buffers; used len 0 on them"},
    [D21] = {"D21", "2.7.7.2", "used flags 0 or 1; VRING_AVAIL_F_NO_INTERRUPT is honoured"},
    [D22] = {"D22", "4.1.4.3.1", "PCI registers after a reset; config_generation moves"},
    [D23] = {"D23", "4.1.4.5.1", "PCI ISR: a bit is set before the interrupt, reading clears it"},
    [D24] = {"D24", "4.2.2.1", "MMIO: magic, version, registers after a reset, ISR until ACK"},
    [B1] = {"B1", "blimp", "inflated pages go back to the host (its RSS falls)"},
};

static const char *const verdict_names[N_VERDICTS] = {
    [V_NONE] = "none",
    [V_CONFORMS] = "conforms",
    [V_NOT_OFFERED] = "not-offered",
    [V_DECLINED] = "declined",
    [V_NOT_APPLICABLE] = "not-applicable",
    [V_NOT_OBSERVABLE] = "not-observable",
    [V_NEEDS_RUNNER] = "needs-runner",
    [V_NOT_EXERCISED] = "not-exercised",
    [V_ACKED_NOT_DISCARDED] = "acked-not-discarded",
    [V_WRONG_PAGE] = "wrong-page-discarded",
    [V_VIOLATION] = "protocol-violation",
    [V_NEEDS_RESET] = "needs-reset",
    [V_TIMEOUT] = "timeout",
};

static bool failing(enum verdict v)
{
    return v >= V_ACKED_NOT_DISCARDED;
}

static struct {
    enum verdict v;
    char detail[200];
} res[N_CHECKS];

/* A failure sticks (the first one is reported); a pass replaces a skip or an earlier pass (the
 * later check saw more); a skip never replaces anything. */
void verdict(enum check c, enum verdict v, const char *fmt, ...)
{
    enum verdict old = res[c].v;
    if (old != V_NONE && (failing(old) || (!failing(v) && v != V_CONFORMS)))
        return;
    res[c].v = v;
    va_list ap;
    va_start(ap, fmt);
    kvsnprintf(res[c].detail, sizeof(res[c].detail), fmt, ap);
    va_end(ap);
    if (failing(v))
        kprintf("conform: %s %s: %s\n", checks[c].id, verdict_names[v], res[c].detail);
}

const char *check_id(enum check c)
{
    return checks[c].id;
}

static void emit_check(unsigned i)
{
    enum verdict v = res[i].v == V_NONE ? V_NOT_EXERCISED : res[i].v;
    if (res[i].v == V_NONE)
        strlcpy(res[i].detail, "not exercised: this configuration never reached the check",
                sizeof(res[i].detail));
    char title[160];
    ksnprintf(title, sizeof(title), "%s \xc2\xa7%s %s", checks[i].id, checks[i].section,
              checks[i].title);
    enum report_kind kind = failing(v) ? REPORT_FAIL : v == V_CONFORMS ? REPORT_PASS : REPORT_SKIP;
    for (char *p = res[i].detail; *p; p++)
        if (*p == '"' || *p == '\\')
            *p = '\'';
    report_point(kind, res[i].detail, title);
    kprintf("  ---\n  verdict: %s\n  detail: \"%s\"\n  ...\n", verdict_names[v], res[i].detail);
    struct json j;
    event_begin(&j, "conform_check");
    json_u64(&j, "n", report_count());
    json_str(&j, "id", checks[i].id);
    json_str(&j, "section", checks[i].section);
    json_str(&j, "title", checks[i].title);
    json_str(&j, "verdict", verdict_names[v]);
    json_str(&j, "detail", res[i].detail);
    event_emit(&j);
}

__attribute__((noreturn)) void conform_finish(void)
{
    struct balloon_status st;
    balloon_get_status(balloon_mode_balloon(), &st);
    /* D20 over the whole session: every used inflate/deflate buffer was re-checked, and every
     * queue's used lengths conformed. */
    if (st.state == BALLOON_BROKEN) {
        verdict(D20, V_VIOLATION, "%s", st.violation);
    } else {
        for (unsigned q = 0; q < BQ_COUNT; q++)
            if (st.queues[q].present && strcmp(st.queues[q].verdict, "conforms"))
                verdict(D20, V_VIOLATION, "%s: used lengths %s (%lu on read-only buffers)",
                        st.queues[q].name, st.queues[q].verdict, st.queues[q].deviations);
        if (st.readonly_checked)
            verdict(D20, V_CONFORMS,
                    "%lu used inflate/deflate buffers read back as written; "
                    "used len 0 on every read-only buffer",
                    st.readonly_checked);
        else
            verdict(D20, V_NOT_EXERCISED, "not exercised: no inflate or deflate buffer used");
    }
    balloon_emit_latency(balloon_mode_balloon()); /* per-buffer timing of this host */
    unsigned counts[N_VERDICTS] = {0};
    for (unsigned i = 0; i < N_CHECKS; i++) {
        emit_check(i);
        counts[res[i].v == V_NONE ? V_NOT_EXERCISED : res[i].v]++;
    }
    int code = report_summary();
    struct json j;
    event_begin(&j, "conform_summary");
    json_u64(&j, "tests", N_CHECKS);
    unsigned failed = 0, skipped = 0;
    for (unsigned v = V_CONFORMS; v < N_VERDICTS; v++) {
        failed += failing((enum verdict)v) ? counts[v] : 0;
        skipped += !failing((enum verdict)v) && v != V_CONFORMS ? counts[v] : 0;
    }
    json_u64(&j, "failed", failed);
    json_u64(&j, "skipped", skipped);
    json_str(&j, "transport", conform.t->name);
    struct wait_stats w;
    balloon_mode_wait_stats(&w);
    json_str(&j, "irq_mode", w.mode);
    json_u64(&j, "irq_missed", w.missed);
    json_u64(&j, "offered", st.offered);
    json_u64(&j, "features", st.features);
    json_open_object(&j, "verdicts");
    for (unsigned v = V_CONFORMS; v < N_VERDICTS; v++)
        if (counts[v])
            json_u64(&j, verdict_names[v], counts[v]);
    json_close(&j);
    event_emit(&j);
    machine_exit((enum exit_code)code, failed ? "conformance failures" : "conformance checks done");
}
