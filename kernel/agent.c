#include "kernel/agent.h"
#include "arch/x86/exit.h"
#include "arch/x86/serial.h"
#include "kernel/balloon_mode.h"
#include "kernel/mem.h"
#include "lib/json.h"
#include "lib/printf.h"
#include "lib/parse.h"
#include "lib/string.h"

#define MAX_HELD 64
#define LINE_MAX 256

/* One allocation the host asked for: its blocks and the seed its pattern derives from. */
struct held {
    bool used;
    unsigned id;
    uint64_t seed;
    struct blocklist blocks;
};

static struct held held[MAX_HELD];
static unsigned next_id = 1;
static const struct balloon *balloon;
static bool enabled;
static char line[LINE_MAX];
static unsigned line_len;
static bool line_overflow;

static void send_line(struct json *j)
{
    const char *s = json_finish(j);
    serial_write(COM2, s, strlen(s));
    serial_write(COM2, "\n", 1);
}

/* A reply starts {"ok":...,"cmd":...}; the caller adds its fields and sends it. */
static void reply_begin(struct json *j, const char *cmd, bool ok)
{
    json_begin(j);
    json_bool(j, "ok", ok);
    json_str(j, "cmd", cmd);
}

static void reply_error(const char *cmd, const char *msg)
{
    struct json j;
    reply_begin(&j, cmd, false);
    json_str(&j, "error", msg);
    send_line(&j);
}

/* The value every 8-byte word of held memory must hold: a function of its address and seed. */
static inline uint64_t pattern(uint64_t addr, uint64_t seed)
{
    return (addr * 0x9e3779b97f4a7c15ull) ^ seed;
}

static void fill_block(uint64_t pfn, unsigned order, uint64_t seed)
{
    uint64_t base = pfn << PAGE_SHIFT, bytes = PAGE_SIZE << order;
    uint64_t *p = phys_to_virt(base);
    for (uint64_t i = 0; i < bytes / 8; i++)
        p[i] = pattern(base + i * 8, seed);
}

struct verify_ctx {
    uint64_t seed, pages, bad_pages, first_bad, found;
};

static int verify_block(void *c, uint64_t pfn, unsigned order)
{
    struct verify_ctx *v = c;
    for (uint64_t pg = 0; pg < (1ull << order); pg++) {
        uint64_t base = (pfn + pg) << PAGE_SHIFT;
        const uint64_t *p = phys_to_virt(base);
        for (uint64_t i = 0; i < PAGE_SIZE / 8; i++) {
            if (p[i] != pattern(base + i * 8, v->seed)) {
                if (!v->bad_pages) {
                    v->first_bad = base + i * 8;
                    v->found = p[i];
                }
                v->bad_pages++;
                break;
            }
        }
        v->pages++;
    }
    return 0;
}

static int touch_block(void *c, uint64_t pfn, unsigned order)
{
    fill_block(pfn, order, *(const uint64_t *)c);
    return 0;
}

/* Finds the physical address of page `index` of an allocation, in the order verify walks it. */
struct page_ctx {
    uint64_t index, phys;
};

static int find_page(void *c, uint64_t pfn, unsigned order)
{
    struct page_ctx *p = c;
    if (p->index < (1ull << order)) {
        p->phys = (pfn + p->index) << PAGE_SHIFT;
        return 1;
    }
    p->index -= 1ull << order;
    return 0;
}

static struct held *find_held(unsigned id)
{
    for (unsigned i = 0; i < MAX_HELD; i++)
        if (held[i].used && held[i].id == id)
            return &held[i];
    return NULL;
}

static void release(struct held *h)
{
    uint64_t pfn;
    unsigned order;
    while (blocklist_pop(&h->blocks, &pfn, &order))
        buddy_free(&kernel_buddy, pfn, order);
    h->used = false;
}

/* Take `pages` pages, largest blocks first. On guest OOM the allocator's reclaim hook (the
 * balloon's deflate-on-OOM, when negotiated) has already been asked for memory. */
static int take_pages(struct held *h, uint64_t pages)
{
    uint64_t got = 0;
    while (got < pages) {
        unsigned max_order = 63 - (unsigned)__builtin_clzll(pages - got);
        unsigned order;
        uint64_t pfn = buddy_alloc_largest(&kernel_buddy, max_order, &order);
        if (pfn == BUDDY_NONE)
            return -1;
        if (blocklist_push(&h->blocks, pfn, order) != 0) {
            buddy_free(&kernel_buddy, pfn, order);
            return -1;
        }
        fill_block(pfn, order, h->seed);
        got += 1ull << order;
    }
    return 0;
}

static void cmd_alloc(char **argv, unsigned argc)
{
    uint64_t bytes, seed = 1;
    if (argc < 2 || !parse_u64(argv[1], &bytes) || bytes == 0 ||
        (argc > 2 && !parse_u64(argv[2], &seed))) {
        reply_error("alloc", "usage: alloc <bytes>[K|M|G] [seed]");
        return;
    }
    struct held *h = NULL;
    for (unsigned i = 0; i < MAX_HELD && !h; i++)
        if (!held[i].used)
            h = &held[i];
    if (!h) {
        reply_error("alloc", "too many allocations held (64); free some first");
        return;
    }
    *h = (struct held){.used = true, .id = next_id++, .seed = seed};
    blocklist_init(&h->blocks, &kernel_buddy);
    uint64_t pages = (bytes + PAGE_SIZE - 1) / PAGE_SIZE;
    uint64_t t0 = platform_now_ns();
    if (take_pages(h, pages) != 0) {
        uint64_t got = h->blocks.pages;
        release(h);
        char msg[128];
        ksnprintf(msg, sizeof(msg), "out of memory after %lu of %lu pages", got, pages);
        reply_error("alloc", msg);
        return;
    }
    struct json j;
    reply_begin(&j, "alloc", true);
    json_u64(&j, "id", h->id);
    json_u64(&j, "pages", h->blocks.pages);
    json_u64(&j, "blocks", h->blocks.blocks);
    json_u64(&j, "ms", (platform_now_ns() - t0) / 1000000);
    send_line(&j);
}

/* "all" (or nothing) or one id; fills out[] with the allocations named, returns how many, or
 * -1 (the error was replied) when an id names nothing. */
static int select_held(const char *cmd, const char *arg, struct held **out)
{
    unsigned n = 0;
    uint64_t id;
    if (!arg || !strcmp(arg, "all")) {
        for (unsigned i = 0; i < MAX_HELD; i++)
            if (held[i].used)
                out[n++] = &held[i];
        return (int)n;
    }
    if (parse_u64(arg, &id) && id <= UINT32_MAX && find_held((unsigned)id)) {
        out[0] = find_held((unsigned)id);
        return 1;
    }
    reply_error(cmd, "no such allocation");
    return -1;
}

static void cmd_free(char **argv, unsigned argc)
{
    struct held *sel[MAX_HELD];
    int n = select_held("free", argc > 1 ? argv[1] : NULL, sel);
    if (n < 0)
        return;
    uint64_t pages = 0;
    for (int i = 0; i < n; i++) {
        pages += sel[i]->blocks.pages;
        release(sel[i]);
    }
    struct json j;
    reply_begin(&j, "free", true);
    json_u64(&j, "allocations", (uint64_t)n);
    json_u64(&j, "pages", pages);
    send_line(&j);
}

static void cmd_verify_or_touch(char **argv, unsigned argc, bool touch)
{
    const char *name = touch ? "touch" : "verify";
    struct held *sel[MAX_HELD];
    uint64_t new_seed = 0;
    bool reseed = touch && argc > 2;
    if (reseed && !parse_u64(argv[2], &new_seed)) {
        reply_error(name, "usage: touch [id|all] [seed]");
        return;
    }
    int n = select_held(name, argc > 1 ? argv[1] : NULL, sel);
    if (n < 0)
        return;
    struct verify_ctx v = {0};
    uint64_t t0 = platform_now_ns();
    for (int i = 0; i < n; i++) {
        if (touch) {
            if (reseed)
                sel[i]->seed = new_seed;
            blocklist_for_each(&sel[i]->blocks, touch_block, &sel[i]->seed);
            v.pages += sel[i]->blocks.pages;
        } else {
            v.seed = sel[i]->seed;
            blocklist_for_each(&sel[i]->blocks, verify_block, &v);
        }
    }
    struct json j;
    reply_begin(&j, name, v.bad_pages == 0);
    json_u64(&j, "allocations", (uint64_t)n);
    json_u64(&j, "pages", v.pages);
    json_u64(&j, "bad_pages", v.bad_pages);
    json_u64(&j, "first_bad", v.first_bad);
    json_u64(&j, "found", v.found);
    json_u64(&j, "ms", (platform_now_ns() - t0) / 1000000);
    send_line(&j);
}

/* corrupt <id> <page> [word]: damage one word of held memory on purpose, so a test can prove
 * that verify notices (and says where). */
static void cmd_corrupt(char **argv, unsigned argc)
{
    uint64_t page, word = 0;
    if (argc < 3 || !parse_u64(argv[2], &page) || (argc > 3 && !parse_u64(argv[3], &word))) {
        reply_error("corrupt", "usage: corrupt <id> <page> [word]");
        return;
    }
    struct held *sel[MAX_HELD];
    if (select_held("corrupt", argv[1], sel) < 0)
        return;
    if (!strcmp(argv[1], "all")) {
        reply_error("corrupt", "name one allocation");
        return;
    }
    struct page_ctx pc = {.index = page, .phys = 0};
    if (page >= sel[0]->blocks.pages || word >= PAGE_SIZE / 8) {
        reply_error("corrupt", "page or word outside the allocation");
        return;
    }
    blocklist_for_each(&sel[0]->blocks, find_page, &pc);
    uint64_t addr = pc.phys + word * 8;
    uint64_t *p = phys_to_virt(addr);
    uint64_t was = *p;
    *p = ~was;
    struct json j;
    reply_begin(&j, "corrupt", true);
    json_u64(&j, "id", sel[0]->id);
    json_u64(&j, "addr", addr);
    json_u64(&j, "was", was);
    json_u64(&j, "now", *p);
    send_line(&j);
}

/* Per-buffer latency, compact: count, p50, p99 and max per kind (the `latency` command has all). */
static void state_latency(struct json *j)
{
    struct balloon_latency lat[BLAT_KINDS];
    balloon_get_latency(balloon, lat);
    json_open_object(j, "latency");
    for (unsigned k = 0; k < BLAT_KINDS; k++) {
        json_open_object(j, balloon_latency_kind_name(k));
        json_u64(j, "count", lat[k].count);
        json_u64(j, "p50_us", balloon_latency_percentile_us(&lat[k], 50));
        json_u64(j, "p99_us", balloon_latency_percentile_us(&lat[k], 99));
        json_u64(j, "max_us", lat[k].max_ns / 1000);
        json_close(j);
    }
    json_close(j);
}

/* latency: the balloon_latency event's three histograms (docs/agent.md); without the buckets
 * (and "buckets_omitted":true) if they would not fit one line. */
static void cmd_latency(void)
{
    if (!balloon) {
        reply_error("latency", "no balloon device");
        return;
    }
    struct balloon_latency lat[BLAT_KINDS];
    balloon_get_latency(balloon, lat);
    struct json j;
    reply_begin(&j, "latency", true);
    balloon_latency_json(&j, lat, true);
    if (j.overflow || j.len + j.depth >= JSON_LINE_MAX) {
        reply_begin(&j, "latency", true);
        balloon_latency_json(&j, lat, false);
        json_bool(&j, "buckets_omitted", true);
    }
    send_line(&j);
}

static void cmd_state(void)
{
    struct buddy_stats st;
    buddy_get_stats(&kernel_buddy, &st);
    uint64_t held_pages = 0;
    unsigned n = 0;
    for (unsigned i = 0; i < MAX_HELD; i++) {
        if (held[i].used) {
            held_pages += held[i].blocks.pages;
            n++;
        }
    }
    struct json j;
    reply_begin(&j, "state", true);
    json_open_object(&j, "mm");
    json_u64(&j, "total_pages", st.total_pages);
    json_u64(&j, "free_pages", st.free_pages);
    json_u64(&j, "reclaimed_pages", kernel_buddy.reclaimed_pages);
    json_close(&j);
    json_open_object(&j, "held");
    json_u64(&j, "allocations", n);
    json_u64(&j, "pages", held_pages);
    json_close(&j);
    json_open_object(&j, "balloon");
    if (balloon) {
        struct balloon_status b;
        balloon_get_status(balloon, &b);
        json_str(&j, "state", b.state_name);
        json_u64(&j, "target_pages", b.device_target);
        json_u64(&j, "actual_pages", b.actual);
        json_u64(&j, "held_pages", b.held_pages);
        json_u64(&j, "features", b.features);
        json_u64(&j, "inflate_buffers", b.inflate_buffers);
        json_u64(&j, "deflate_buffers", b.deflate_buffers);
        json_u64(&j, "stats_updates", b.stats_updates);
        json_u64(&j, "oom_deflated_pages", b.oom_deflated_pages);
        json_u64(&j, "hinted_pages", b.hinted_pages);
        json_u64(&j, "hint_rounds", b.hint_rounds);
        json_u64(&j, "hint_released_pages", b.hint_released_pages);
        json_u64(&j, "reported_pages", b.reported_pages);
        json_u64(&j, "report_chains", b.report_chains);
        json_u64(&j, "report_passes", b.report_passes);
        json_u64(&j, "inflight_report_pages", b.inflight_report);
        json_u64(&j, "resets", b.resets);
        json_u64(&j, "reinflate_pending_pages", b.reinflate_pending);
        json_str(&j, "numbering", b.numbering);
        json_str(&j, "numbering_used", b.numbering_used);
        state_latency(&j);
        /* Each queue's used-length verdict: conforms | deviates | violated. */
        json_open_object(&j, "queues");
        for (unsigned q = 0; q < BQ_COUNT; q++) {
            if (!b.queues[q].present)
                continue;
            json_open_object(&j, b.queues[q].name);
            json_u64(&j, "index", b.queues[q].index);
            json_str(&j, "verdict", b.queues[q].verdict);
            json_u64(&j, "deviations", b.queues[q].deviations);
            json_close(&j);
        }
        json_close(&j);
    } else {
        json_str(&j, "state", "absent");
    }
    json_close(&j);
    struct wait_stats w;
    balloon_mode_wait_stats(&w);
    json_open_object(&j, "irq");
    json_str(&j, "mode", w.mode);
    json_u64(&j, "uptime_ns", w.uptime_ns);
    json_u64(&j, "device", w.device_irqs);
    json_u64(&j, "spurious", w.spurious);
    json_u64(&j, "late", w.late);
    json_u64(&j, "looks", w.looks);
    json_u64(&j, "missed", w.missed);
    json_u64(&j, "raised_while_masked", w.raised_while_masked);
    json_u64(&j, "agent", w.agent_irqs);
    json_u64(&j, "timer", w.timer_irqs);
    json_u64(&j, "lapic_spurious", w.lapic_spurious);
    json_u64(&j, "sleeps", w.sleeps);
    json_close(&j);
    json_open_object(&j, "exits");
    json_u64(&j, "config_reads", w.exits.config_reads);
    json_u64(&j, "config_writes", w.exits.config_writes);
    json_u64(&j, "status", w.exits.status);
    json_u64(&j, "notifies", w.exits.notifies);
    json_u64(&j, "isr_reads", w.exits.isr_reads);
    json_close(&j);
    send_line(&j);
}

/* spurious [n]: n interrupts on the balloon's vector that the device did not raise. */
static void cmd_spurious(char **argv, unsigned argc)
{
    uint64_t n = 1;
    if (argc > 1 && (!parse_u64(argv[1], &n) || n > 1000)) {
        reply_error("spurious", "usage: spurious [n], n <= 1000");
        return;
    }
    unsigned sent = balloon_mode_inject_spurious((unsigned)n);
    if (n && !sent) {
        reply_error("spurious", "the balloon has no INTx vector (polling, or MSI-X)");
        return;
    }
    struct json j;
    reply_begin(&j, "spurious", true);
    json_u64(&j, "sent", sent);
    send_line(&j);
}

/* lose-irq: mask the device's interrupt line behind the loop's back; the bounded look must find
 * the next event the device raises, count it as missed and route the line again. */
static void cmd_lose_irq(void)
{
    if (!balloon_mode_lose_irq()) {
        reply_error("lose-irq", "the balloon has no IOAPIC line (polling, or MSI-X)");
        return;
    }
    struct wait_stats w;
    balloon_mode_wait_stats(&w);
    struct json j;
    reply_begin(&j, "lose-irq", true);
    json_u64(&j, "missed", w.missed);
    send_line(&j);
}

/* reset-device: reset the balloon device now and re-inflate what the driver holds. */
static void cmd_reset_device(void)
{
    if (!balloon || balloon_mode_reset_device() != 0) {
        reply_error("reset-device", "the balloon driver is not running");
        return;
    }
    struct balloon_status b;
    balloon_get_status(balloon, &b);
    struct json j;
    reply_begin(&j, "reset-device", true);
    json_u64(&j, "resets", b.resets);
    json_u64(&j, "reinflate_pages", b.reinflate_pending);
    json_u64(&j, "target_pages", b.device_target);
    send_line(&j);
}

static void cmd_quit(char **argv, unsigned argc)
{
    uint64_t code = EXIT_SUCCESS_CODE;
    if (argc > 1 && (!parse_u64(argv[1], &code) || code > 0xff)) {
        reply_error("quit", "usage: quit [code]");
        return;
    }
    struct json j;
    reply_begin(&j, "quit", true);
    json_u64(&j, "code", code);
    send_line(&j);
    machine_exit((enum exit_code)code, "agent quit");
}

static agent_answer_fn answer_fn;
static void *answer_ctx;

void agent_set_answer_handler(agent_answer_fn fn, void *ctx)
{
    answer_fn = fn;
    answer_ctx = ctx;
}

/* `ack <seq> [key=value ...]` / `nack <seq> <reason>`: a host runner answering the guest's
 * request (docs/conformance.md). The whole line goes to the mode that asked; too many values
 * for the usual argv. */
static bool host_answer(char *cmd)
{
    bool ack = !strncmp(cmd, "ack ", 4);
    if (!ack && strncmp(cmd, "nack ", 5))
        return false;
    const char *name = ack ? "ack" : "nack";
    char *p = cmd + (ack ? 4 : 5), *end = p;
    while (*end && *end != ' ')
        end++;
    char save = *end;
    *end = '\0';
    uint64_t seq;
    bool ok = parse_u64(p, &seq);
    *end = save;
    while (*end == ' ')
        end++;
    if (!ok) {
        reply_error(name, "usage: ack <seq> [key=value ...] | nack <seq> <reason>");
        return true;
    }
    if (!answer_fn || !answer_fn(answer_ctx, ack, seq, end)) {
        reply_error(name, "no request with that number is waiting");
        return true;
    }
    struct json j;
    reply_begin(&j, name, true);
    json_u64(&j, "seq", seq);
    send_line(&j);
    return true;
}

static void execute(char *cmd)
{
    if (host_answer(cmd))
        return;
    char *argv[8];
    unsigned argc = 0;
    for (char *p = cmd; *p && argc < 8;) {
        while (*p == ' ')
            *p++ = '\0';
        if (!*p)
            break;
        argv[argc++] = p;
        while (*p && *p != ' ')
            p++;
    }
    if (argc == 0)
        return;
    if (!strcmp(argv[0], "ping")) {
        struct json j;
        reply_begin(&j, "ping", true);
        send_line(&j);
    } else if (!strcmp(argv[0], "alloc")) {
        cmd_alloc(argv, argc);
    } else if (!strcmp(argv[0], "free")) {
        cmd_free(argv, argc);
    } else if (!strcmp(argv[0], "verify")) {
        cmd_verify_or_touch(argv, argc, false);
    } else if (!strcmp(argv[0], "touch")) {
        cmd_verify_or_touch(argv, argc, true);
    } else if (!strcmp(argv[0], "corrupt")) {
        cmd_corrupt(argv, argc);
    } else if (!strcmp(argv[0], "state")) {
        cmd_state();
    } else if (!strcmp(argv[0], "spurious")) {
        cmd_spurious(argv, argc);
    } else if (!strcmp(argv[0], "latency")) {
        cmd_latency();
    } else if (!strcmp(argv[0], "lose-irq")) {
        cmd_lose_irq();
    } else if (!strcmp(argv[0], "reset-device")) {
        cmd_reset_device();
    } else if (!strcmp(argv[0], "quit")) {
        cmd_quit(argv, argc);
    } else {
        char msg[80];
        ksnprintf(msg, sizeof(msg), "unknown command '%.40s'", argv[0]);
        reply_error(argv[0], msg);
    }
}

uint64_t agent_owned_pages(void)
{
    uint64_t pages = 0;
    for (unsigned i = 0; i < MAX_HELD; i++)
        if (held[i].used)
            pages += held[i].blocks.pages + held[i].blocks.chunks;
    return pages;
}

bool agent_init(const struct balloon *b)
{
    balloon = b;
    enabled = serial_init(COM2);
    if (enabled) {
        kprintf("agent: listening on COM2\n");
        struct json j;
        event_begin(&j, "agent_ready");
        send_line(&j);
    }
    return enabled;
}

bool agent_poll(void)
{
    if (!enabled)
        return false;
    int c;
    bool got = false;
    while ((c = serial_getc(COM2)) >= 0) {
        got = true;
        if (c == '\r')
            continue;
        if (c == '\n') {
            line[line_len] = '\0';
            if (line_overflow)
                reply_error("?", "line too long (255 characters at most)");
            else
                execute(line);
            line_len = 0;
            line_overflow = false;
        } else if (line_len + 1 < LINE_MAX) {
            line[line_len++] = (char)c;
        } else {
            line_overflow = true;
        }
    }
    return got;
}
