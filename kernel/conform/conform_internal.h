/*
 * Conformance mode's own header: shared by the files of kernel/conform/ and nothing else (the
 * public entry is kernel/conform.h). One file per job:
 *
 *   checks.c   the check table, verdicts, the TAP points and events at the end (conform_finish)
 *   pages.c    patterned memory the checks hold, the isolated pages (D4) and their neighbours
 *   channel.c  the channel to the host runner: conform_request events, ack/nack answers
 *   stage1.c   before the driver: the transport's registers, feature subsets, one raw queue
 *   stage2.c   inside balloon mode's loop: one function per phase of the state machine
 *   mode.c     conform_mode_run and the state below
 */
#ifndef KERNEL_CONFORM_CONFORM_INTERNAL_H
#define KERNEL_CONFORM_CONFORM_INTERNAL_H

#include "kernel/balloon_mode.h"
#include "kernel/cmdline.h"
#include "kernel/mem.h"

/* ---- checks.c: the checks and their verdicts ----------------------------------------------- */

enum check {
    D1,
    D2,
    D3,
    D4,
    D5,
    D6,
    D7,
    D8,
    D9,
    D10,
    D11,
    D12,
    D13,
    D14,
    D15,
    D16,
    D17,
    D18,
    D19,
    D20,
    D21,
    D22,
    D23,
    D24,
    B1,
    N_CHECKS,
};

enum verdict {
    V_NONE,
    V_CONFORMS,
    /* skips */
    V_NOT_OFFERED,
    V_DECLINED,
    V_NOT_APPLICABLE,
    V_NOT_OBSERVABLE,
    V_NEEDS_RUNNER,
    V_NOT_EXERCISED,
    /* failures */
    V_ACKED_NOT_DISCARDED,
    V_WRONG_PAGE,
    V_VIOLATION,
    V_NEEDS_RESET,
    V_TIMEOUT,
    N_VERDICTS,
};

/* A failure sticks (the first one is reported); a pass replaces a skip or an earlier pass (the
 * later check saw more); a skip never replaces anything. */
void verdict(enum check c, enum verdict v, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
const char *check_id(enum check c);
/* The final D20 verdict, every point in order, the summary; exits. */
__attribute__((noreturn)) void conform_finish(void);

/* ---- pages.c: memory the checks hold, chained through the first words of each block ------- */

#define AREA_ORDER   12 /* the isolated pages: every odd page of 16 MiB */
#define RECORD_SLACK 64 /* isolated pages left for the driver's block records */
#define MAX_AREAS    2
#define PFN_4G       (1ull << (32 - PAGE_SHIFT)) /* the first page above 4 GiB */

struct chain {
    uint64_t head, pages;
};

/* Take every free page into the chain, each page patterned with gen. */
void take_all(struct chain *c, uint64_t gen);
/* The first bad address of the chain (0: all good); *found and *expected: the word there. */
uint64_t verify_chain(const struct chain *c, uint64_t gen, uint64_t *found, uint64_t *expected,
                      uint64_t *pages_checked);
void free_chain(struct chain *c);
/* Take every free page back into the chain without writing it; returns how many read 0. */
uint64_t take_all_count_zero(struct chain *c);
/* The isolated pages: false when no block could be found for them. */
bool build_layout(void);
/* D4: the area's even pages and the rest of memory still as written ("after inflating"...). */
void verify_neighbours(const char *when);
void release_layout(void);

/* ---- channel.c: requests to the host runner ------------------------------------------------ */

enum answer { A_WAITING, A_ACK, A_NACK, A_TIMEOUT };

void request(const char *action, const char *key, uint64_t value);
enum answer answer(uint64_t now);
/* key=value from the last answer (decimal, may be negative). */
bool answer_value(const char *key, int64_t *out);
/* The agent's handler for `ack`/`nack` lines (agent_set_answer_handler). */
bool conform_on_answer(void *ctx, bool ack, uint64_t seq, const char *rest);

/* ---- stage1.c / stage2.c ------------------------------------------------------------------- */

bool is_pci(const struct virtio_transport *t);
bool is_mmio(const struct virtio_transport *t);
/* Balloon mode's prepare hook: stage 1, then the driver's config for stage 2. */
void conform_prepare(void *ctx, struct virtio_transport *t, struct balloon_config *cfg);
/* Balloon mode's step hook: stage 2. */
uint64_t conform_step(void *ctx, const struct balloon_status *st);

enum phase {
    P_START,
    P_RSS0,
    P_TARGET,
    P_TARGET_WAIT,
    P_RSS1,
    P_DEFLATE,
    P_DEFLATE_WAIT,
    P_STATS_ON,
    P_STATS_WAIT,
    P_STATS_READ,
    P_STATS_OFF,
    P_MIGRATE1,
    P_MIGRATE1_WAIT,
    P_MIGRATE1_CHECK,
    P_MIGRATE2,
    P_MIGRATE2_WAIT,
    P_REPORT,
    P_REPORT_WAIT,
    P_RESET,
    P_RESET_WAIT,
    P_FINISH,
    N_PHASES,
};

/* ---- mode.c: the state every part shares --------------------------------------------------- */

struct conform_state {
    const struct options *opts;
    struct virtio_transport *t;
    struct balloon_config *cfg;
    bool host;           /* blimp.conform.host=1: a runner answers requests */
    uint64_t timeout_ns; /* blimp.conform.timeout_ms */
    /* the request in flight (channel.c) */
    struct {
        uint64_t seq;
        bool waiting, answered, acked;
        uint64_t deadline;
        char rest[256];
        const char *action;
    } req;
    /* stage 2 */
    enum phase phase;
    uint64_t phase_ns;
    uint64_t offered;
    /* isolated pages: a block below 4 GiB, and one above when RAM extends there */
    struct area {
        uint64_t pfn; /* first pfn of the 2^order block */
        unsigned order;
    } areas[MAX_AREAS];
    unsigned n_areas;
    uint64_t isolated; /* odd pages freed for the balloon */
    uint32_t target;
    struct chain fill; /* everything else, patterned */
    int64_t rss0, rss1;
    uint32_t gen0;
    uint64_t isr0, isr_rep0;
    uint64_t stats0;
    uint64_t resets0;
    /* hinting */
    uint32_t ids[16];
    unsigned n_ids;
    uint32_t last_active;
    uint64_t rounds0;
    /* reporting */
    uint64_t reported0, passes0, report_poison0, quiet_since, last_reported;
    uint16_t used_idx[3];
};

extern struct conform_state conform;

#endif
