#include "kernel/stress.h"
#include "arch/x86/exit.h"
#include "kernel/agent.h"
#include "kernel/balloon_mode.h"
#include "kernel/mem.h"
#include "kernel/stress_engine.h"
#include "lib/json.h"
#include "lib/printf.h"

#define STEP_NS     (1000ull * 1000)        /* operations per loop turn: about 1 ms of them */
#define PROGRESS_NS (1000ull * 1000 * 1000) /* a progress line at least every second */

enum phase { PH_START, PH_OPS, PH_SETTLE };

static struct {
    const struct options *opts;
    const struct stress_options *cfg;
    enum phase phase;
    struct stress s;
    uint64_t start_ns, end_ns, ops_ns, settle_until, last_progress_ns, next_progress_op;
    uint64_t inject_op;
    bool injected;
    uint64_t free_before, balloon_before, agent_before;
} run;

/* Every page the balloon driver has taken from the allocator since it came up: held (given to
 * the host, acknowledged or in flight), deflates in flight, hinted, out for a report, and the
 * pages of its block records. With the allocator's free pages, the agent's and the storm's,
 * they add up to the same total at any time between two loop turns. */
static uint64_t balloon_pages(const struct balloon_status *st)
{
    return st->held_pages + st->inflight_deflate + st->hinted_pages + st->inflight_report +
           st->record_pages;
}

static uint64_t free_pages(void)
{
    struct buddy_stats bs;
    buddy_get_stats(&kernel_buddy, &bs);
    return bs.free_pages;
}

static void fail_verify(void)
{
    const struct stress_failure *f = &run.s.failure;
    kprintf("stress: FAILED: seed %lu op %lu (%s, slot %u): page 0x%lx, word at 0x%lx: "
            "expected 0x%016lx found 0x%016lx (generation %lu)\n",
            run.cfg->seed, f->op, stress_kind_name(f->during), f->slot, f->page, f->addr,
            f->expected, f->found, f->gen);
    struct json j;
    event_begin(&j, "stress_failure");
    json_str(&j, "what", "verify");
    json_u64(&j, "seed", run.cfg->seed);
    json_u64(&j, "op", f->op);
    json_str(&j, "during", stress_kind_name(f->during));
    json_u64(&j, "slot", f->slot);
    json_u64(&j, "page", f->page);
    json_u64(&j, "addr", f->addr);
    json_u64(&j, "expected", f->expected);
    json_u64(&j, "found", f->found);
    json_u64(&j, "gen", f->gen);
    event_emit(&j);
    machine_exit(EXIT_TEST_FAILED, "stress: a held page did not verify");
}

static void progress(uint64_t now, const struct balloon_status *st)
{
    const struct stress *s = &run.s;
    kprintf("stress: %lu ops, %lu pages held, %lu pages verified, balloon %u pages (target %u)\n",
            s->ops, s->held_pages, s->pages_verified, st->actual, st->device_target);
    struct json j;
    event_begin(&j, "stress_progress");
    json_u64(&j, "ops", s->ops);
    json_u64(&j, "ms", (now - run.start_ns) / 1000000);
    json_u64(&j, "held_pages", s->held_pages);
    json_u64(&j, "held_blocks", s->held_blocks);
    json_u64(&j, "pages_verified", s->pages_verified);
    json_u64(&j, "alloc_failures", s->alloc_failures);
    json_u64(&j, "free_pages", free_pages());
    json_u64(&j, "balloon_actual", st->actual);
    json_u64(&j, "balloon_target", st->device_target);
    event_emit(&j);
    run.last_progress_ns = now;
    if (run.cfg->progress)
        run.next_progress_op = s->ops + run.cfg->progress;
}

static void inject(void)
{
    uint64_t addr, was, now;
    if (!stress_corrupt(&run.s, &addr, &was, &now))
        return; /* nothing held: try after the next operation */
    run.injected = true;
    kprintf("stress: injected: overwrote the word at 0x%lx (page 0x%lx) after op %lu\n", addr,
            addr & ~(uint64_t)(PAGE_SIZE - 1), run.s.ops - 1);
    struct json j;
    event_begin(&j, "inject");
    json_str(&j, "what", "stress_corrupt");
    json_u64(&j, "addr", addr);
    json_u64(&j, "op", run.s.ops - 1);
    json_u64(&j, "was", was);
    json_u64(&j, "now", now);
    event_emit(&j);
}

/* blimp.inject=stress_leak: take 4 pages from the allocator and never give them back, so the
 * leak check must fail with lost_pages 4. */
static void inject_leak(void)
{
    uint64_t pfn = buddy_alloc(&kernel_buddy, 2);
    if (pfn == BUDDY_NONE)
        return;
    kprintf("stress: injected: 4 pages at 0x%lx taken and never freed\n", pfn << PAGE_SHIFT);
    struct json j;
    event_begin(&j, "inject");
    json_str(&j, "what", "stress_leak");
    json_u64(&j, "addr", pfn << PAGE_SHIFT);
    json_u64(&j, "pages", 4);
    event_emit(&j);
}

static void start(uint64_t now, const struct balloon_status *st)
{
    const struct stress_options *c = run.cfg;
    struct stress_config sc = {.seed = c->seed,
                               .slots = c->slots,
                               .max_order = c->max_order,
                               .verify_every = c->verify_every};
    stress_init(&run.s, &kernel_buddy, &sc);
    run.free_before = free_pages();
    run.balloon_before = balloon_pages(st);
    run.agent_before = agent_owned_pages();
    run.start_ns = run.last_progress_ns = now;
    run.end_ns = c->time_ns ? now + c->time_ns : UINT64_MAX;
    run.next_progress_op = c->progress ? c->progress : UINT64_MAX;
    run.inject_op = c->ops ? c->ops / 2 : 1000;
    kprintf("stress: seed %lu, %lu ops, %lu ms (0: no bound), %u slots up to order %u, full "
            "verify every %u ops; %lu pages free\n",
            c->seed, c->ops, c->time_ns / 1000000, c->slots, c->max_order, c->verify_every,
            run.free_before);
    struct json j;
    event_begin(&j, "stress_start");
    json_u64(&j, "seed", c->seed);
    json_u64(&j, "ops", c->ops);
    json_u64(&j, "ms", c->time_ns / 1000000);
    json_u64(&j, "slots", c->slots);
    json_u64(&j, "max_order", c->max_order);
    json_u64(&j, "verify_every", c->verify_every);
    json_u64(&j, "free_pages", run.free_before);
    json_u64(&j, "balloon_pages", run.balloon_before);
    event_emit(&j);
    run.phase = PH_OPS;
}

/* The last operation is done: verify everything, free everything, then settle. */
static void finish_ops(uint64_t now)
{
    run.ops_ns = now - run.start_ns;
    if (!stress_verify_all(&run.s) || !stress_free_all(&run.s))
        fail_verify();
    if (run.opts->inject == INJECT_STRESS_LEAK)
        inject_leak();
    run.settle_until = platform_now_ns() + run.cfg->settle_ns;
    run.phase = PH_SETTLE;
}

static bool at_rest(const struct balloon_status *st)
{
    return st->inflight_inflate == 0 && st->inflight_deflate == 0 && st->inflight_report == 0 &&
           !st->hinting && st->reinflate_pending == 0 && st->actual == st->target &&
           (!run.cfg->end_empty ||
            (st->device_target == 0 && st->actual == 0 && st->hinted_pages == 0));
}

__attribute__((noreturn)) static void done(const struct balloon_status *st)
{
    const struct stress *s = &run.s;
    uint64_t free_after = free_pages(), balloon_after = balloon_pages(st);
    uint64_t agent_after = agent_owned_pages();
    uint64_t before = run.free_before + run.balloon_before + run.agent_before;
    uint64_t after = free_after + balloon_after + agent_after;
    uint64_t ms = run.ops_ns / 1000000;
    uint64_t ops_per_s = run.ops_ns ? s->ops * 1000000000ull / run.ops_ns : 0;
    kprintf("stress: done: %lu ops in %lu ms (%lu ops/s), %lu pages verified (%lu MiB), %lu "
            "written; free pages %lu before, %lu after (balloon %lu / %lu pages)\n",
            s->ops, ms, ops_per_s, s->pages_verified, s->pages_verified >> 8, s->pages_written,
            run.free_before, free_after, run.balloon_before, balloon_after);
    balloon_mode_emit_latency();
    struct json j;
    event_begin(&j, "stress_done");
    json_u64(&j, "seed", run.cfg->seed);
    json_u64(&j, "ops", s->ops);
    json_u64(&j, "ms", ms);
    json_u64(&j, "ops_per_s", ops_per_s);
    json_u64(&j, "pages_verified", s->pages_verified);
    json_u64(&j, "bytes_verified", s->pages_verified * PAGE_SIZE);
    json_u64(&j, "pages_written", s->pages_written);
    json_u64(&j, "allocs", s->allocs);
    json_u64(&j, "frees", s->frees);
    json_u64(&j, "rewrites", s->rewrites);
    json_u64(&j, "alloc_failures", s->alloc_failures);
    json_u64(&j, "full_verifies", s->full_verifies);
    json_u64(&j, "sequence", s->sequence);
    json_u64(&j, "outcomes", s->outcomes);
    json_u64(&j, "free_pages_before", run.free_before);
    json_u64(&j, "free_pages_after", free_after);
    json_u64(&j, "balloon_pages_before", run.balloon_before);
    json_u64(&j, "balloon_pages_after", balloon_after);
    json_u64(&j, "balloon_actual", st->actual);
    json_bool(&j, "settled", at_rest(st));
    struct wait_stats w;
    balloon_mode_wait_stats(&w);
    json_str(&j, "irq_mode", w.mode);
    json_u64(&j, "irq_missed", w.missed);
    event_emit(&j);
    if (after != before) {
        kprintf("stress: FAILED: seed %lu: %ld pages leaked (free + balloon + agent pages: %lu "
                "before, %lu after)\n",
                run.cfg->seed, (int64_t)(before - after), before, after);
        event_begin(&j, "stress_failure");
        json_str(&j, "what", "leak");
        json_u64(&j, "seed", run.cfg->seed);
        json_u64(&j, "op", s->ops);
        json_i64(&j, "lost_pages", (int64_t)(before - after));
        json_u64(&j, "free_pages_before", run.free_before);
        json_u64(&j, "free_pages_after", free_after);
        json_u64(&j, "balloon_pages_before", run.balloon_before);
        json_u64(&j, "balloon_pages_after", balloon_after);
        event_emit(&j);
        machine_exit(EXIT_TEST_FAILED, "stress: pages leaked");
    }
    machine_exit(EXIT_SUCCESS_CODE, "stress done");
}

static uint64_t step(void *ctx, const struct balloon_status *st)
{
    (void)ctx;
    uint64_t now = platform_now_ns();
    if (run.phase == PH_START)
        start(now, st);
    if (run.phase == PH_OPS) {
        uint64_t turn_end = now + STEP_NS;
        const uint64_t max_ops = run.cfg->ops ? run.cfg->ops : UINT64_MAX;
        for (;;) {
            if (run.s.ops >= max_ops || now >= run.end_ns) {
                finish_ops(now);
                /* Settle from the next turn on: this turn's allocations may have made the
                 * balloon deflate (on OOM) since `st` was taken. */
                return 0;
            }
            if (!stress_op(&run.s))
                fail_verify();
            if (run.opts->inject == INJECT_STRESS_CORRUPT && !run.injected &&
                run.s.ops > run.inject_op)
                inject();
            now = platform_now_ns();
            if (run.s.ops >= run.next_progress_op || now - run.last_progress_ns >= PROGRESS_NS)
                progress(now, st);
            if (now >= turn_end)
                return 0; /* serve the device, then go on */
        }
    }
    /* Settle: wait (following the host) until the balloon is at rest, or the time is up. */
    if (at_rest(st) || platform_now_ns() >= run.settle_until)
        done(st);
    return run.settle_until;
}

void stress_mode_run(const struct options *opts, uint64_t rsdp_phys)
{
    run.opts = opts;
    run.cfg = &opts->stress;
    run.phase = PH_START;
    struct balloon_mode_hook hook = {.step = step, .ctx = NULL};
    balloon_mode_run(opts, rsdp_phys, &hook);
}
