/*
 * Conformance mode's entry: the host's balloon device against the device requirements of virtio
 * 1.2/1.3 (../shared/docs/balloon-protocol.md section 5.2 numbers them D1-D24;
 * docs/conformance.md). Stage 1 (stage1.c) runs in balloon mode's `prepare` hook, stage 2
 * (stage2.c) as its `step` hook; every result is kept until the end, then printed in a fixed
 * order (checks.c).
 */
#include "kernel/agent.h"
#include "kernel/conform.h"
#include "kernel/conform/conform_internal.h"

struct conform_state conform;

void conform_mode_run(const struct options *opts, uint64_t rsdp_phys)
{
    conform.opts = opts;
    conform.host = opts->conform.host;
    conform.fill.head = BUDDY_NONE;
    conform.timeout_ns = opts->conform.timeout_ns;
    agent_set_answer_handler(conform_on_answer, NULL);
    static const struct balloon_mode_hook hook = {
        .step = conform_step,
        .ctx = NULL,
        .prepare = conform_prepare,
        .poll_only = true,
    };
    balloon_mode_run(opts, rsdp_phys, &hook);
}
