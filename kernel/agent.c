#include "kernel/agent.h"
#include "kernel/cmdline.h"
#include "kernel/mem.h"
#include "lib/printf.h"
#include "lib/string.h"
#include "arch/x86/exit.h"
#include "arch/x86/serial.h"

#define MAX_HELD  64
#define LINE_MAX  256
#define REPLY_MAX 1024

/* One allocation the host asked for: its blocks and the seed its pattern derives from. */
struct held {
    bool used;
    unsigned id;
    uint64_t seed;
    struct blocklist blocks;
};

static struct held held[MAX_HELD];
static unsigned next_id = 1;
static struct balloon *balloon;
static bool enabled;
static char line[LINE_MAX];
static unsigned line_len;
static bool line_overflow;

static uint64_t balloon_reserve_pages(void);
static void reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void reply(const char *fmt, ...)
{
    char buf[REPLY_MAX];
    va_list ap;
    va_start(ap, fmt);
    int n = kvsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(buf) - 2)
        n = (int)sizeof(buf) - 2;
    buf[n++] = '\n';
    serial_write(COM2, buf, (size_t)n);
}

static void reply_error(const char *cmd, const char *msg)
{
    char esc[200];
    json_escape(esc, sizeof(esc), msg);
    reply("{\"ok\":false,\"cmd\":\"%s\",\"error\":\"%s\"}", cmd, esc);
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

struct touch_ctx {
    uint64_t seed;
};

static int touch_block(void *c, uint64_t pfn, unsigned order)
{
    fill_block(pfn, order, ((struct touch_ctx *)c)->seed);
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

/* Take `pages` pages, largest blocks first; on guest OOM ask the balloon for memory back. */
static int take_pages(struct held *h, uint64_t pages)
{
    uint64_t got = 0;
    while (got < pages) {
        uint64_t room = pages - got;
        unsigned max_order = 63 - (unsigned)__builtin_clzll(room);
        if (max_order > BUDDY_MAX_ORDER)
            max_order = BUDDY_MAX_ORDER;
        unsigned order;
        uint64_t pfn = buddy_alloc_largest(&kernel_buddy, max_order, &order);
        if (pfn == BUDDY_NONE) {
            /* Ask for enough to keep the balloon's reserve for the kernel's own needs too
             * (record pages, rings), not just for this allocation. */
            uint64_t need = pages - got + balloon_reserve_pages();
            if (need < 256)
                need = 256; /* 1 MiB at a time, as Linux does */
            if (balloon && balloon_release_for_oom(balloon, need, 5000ull * 1000 * 1000) > 0)
                continue;
            return -1;
        }
        if (blocklist_push(&h->blocks, pfn, order) != 0) {
            buddy_free(&kernel_buddy, pfn, order);
            if (balloon && balloon_release_for_oom(balloon, 256, 5000ull * 1000 * 1000) > 0)
                continue;
            return -1;
        }
        fill_block(pfn, order, h->seed);
        got += 1ull << order;
    }
    return 0;
}

static uint64_t balloon_reserve_pages(void)
{
    return balloon ? balloon->cfg.reserve_pages : 0;
}

static bool parse_num(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    if (!*s)
        return false;
    for (; *s >= '0' && *s <= '9'; s++)
        v = v * 10 + (uint64_t)(*s - '0');
    unsigned shift = *s == 'K' ? 10 : *s == 'M' ? 20 : *s == 'G' ? 30 : 0;
    if (shift)
        s++;
    if (*s)
        return false;
    *out = v << shift;
    return true;
}

static void cmd_alloc(char **argv, unsigned argc)
{
    uint64_t bytes, seed = 1;
    if (argc < 2 || !parse_num(argv[1], &bytes) || bytes == 0 ||
        (argc > 2 && !parse_num(argv[2], &seed))) {
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
    reply("{\"ok\":true,\"cmd\":\"alloc\",\"id\":%u,\"pages\":%lu,\"blocks\":%lu,\"ms\":%lu}",
          h->id, h->blocks.pages, h->blocks.blocks, (platform_now_ns() - t0) / 1000000);
}

/* "all" or a number; fills ids[] with the allocations named. */
static unsigned select_held(const char *arg, struct held **out)
{
    unsigned n = 0;
    uint64_t id;
    if (!arg || !strcmp(arg, "all")) {
        for (unsigned i = 0; i < MAX_HELD; i++)
            if (held[i].used)
                out[n++] = &held[i];
    } else if (parse_num(arg, &id) && find_held((unsigned)id)) {
        out[n++] = find_held((unsigned)id);
    }
    return n;
}

static void cmd_free(char **argv, unsigned argc)
{
    struct held *sel[MAX_HELD];
    unsigned n = select_held(argc > 1 ? argv[1] : NULL, sel);
    if (argc > 1 && strcmp(argv[1], "all") && n == 0) {
        reply_error("free", "no such allocation");
        return;
    }
    uint64_t pages = 0;
    for (unsigned i = 0; i < n; i++) {
        pages += sel[i]->blocks.pages;
        release(sel[i]);
    }
    reply("{\"ok\":true,\"cmd\":\"free\",\"allocations\":%u,\"pages\":%lu}", n, pages);
}

static void cmd_verify_or_touch(char **argv, unsigned argc, bool touch)
{
    const char *name = touch ? "touch" : "verify";
    struct held *sel[MAX_HELD];
    unsigned n = select_held(argc > 1 ? argv[1] : NULL, sel);
    if (argc > 1 && strcmp(argv[1], "all") && n == 0) {
        reply_error(name, "no such allocation");
        return;
    }
    struct verify_ctx v = {0};
    uint64_t t0 = platform_now_ns();
    for (unsigned i = 0; i < n; i++) {
        if (touch) {
            uint64_t seed;
            if (argc > 2 && parse_num(argv[2], &seed))
                sel[i]->seed = seed;
            struct touch_ctx t = {sel[i]->seed};
            blocklist_for_each(&sel[i]->blocks, touch_block, &t);
            v.pages += sel[i]->blocks.pages;
        } else {
            v.seed = sel[i]->seed;
            blocklist_for_each(&sel[i]->blocks, verify_block, &v);
        }
    }
    reply("{\"ok\":%s,\"cmd\":\"%s\",\"allocations\":%u,\"pages\":%lu,\"bad_pages\":%lu,"
          "\"first_bad\":%lu,\"found\":%lu,\"ms\":%lu}",
          v.bad_pages ? "false" : "true", name, n, v.pages, v.bad_pages, v.first_bad, v.found,
          (platform_now_ns() - t0) / 1000000);
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
    static const char *const states[] = {"running", "stalled", "broken"};
    const struct balloon *b = balloon;
    reply("{\"ok\":true,\"cmd\":\"state\",\"mm\":{\"total_pages\":%lu,\"free_pages\":%lu},"
          "\"held\":{\"allocations\":%u,\"pages\":%lu},\"balloon\":{\"state\":\"%s\","
          "\"target_pages\":%u,\"actual_pages\":%u,\"held_pages\":%lu,\"features\":%lu,"
          "\"inflate_buffers\":%lu,\"deflate_buffers\":%lu,\"stats_updates\":%lu,"
          "\"oom_deflated_pages\":%lu}}",
          st.total_pages, st.free_pages, n, held_pages, b ? states[b->state] : "absent",
          b ? b->device_target : 0, b ? b->actual : 0, b ? b->held.pages : 0,
          b ? (unsigned long)b->features : 0, b ? b->inflate_buffers : 0,
          b ? b->deflate_buffers : 0, b ? b->stats_updates : 0, b ? b->oom_deflated_pages : 0);
}

static void execute(char *cmd)
{
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
    if (!strcmp(argv[0], "ping"))
        reply("{\"ok\":true,\"cmd\":\"ping\"}");
    else if (!strcmp(argv[0], "alloc"))
        cmd_alloc(argv, argc);
    else if (!strcmp(argv[0], "free"))
        cmd_free(argv, argc);
    else if (!strcmp(argv[0], "verify"))
        cmd_verify_or_touch(argv, argc, false);
    else if (!strcmp(argv[0], "touch"))
        cmd_verify_or_touch(argv, argc, true);
    else if (!strcmp(argv[0], "state"))
        cmd_state();
    else if (!strcmp(argv[0], "quit")) {
        uint64_t code = EXIT_SUCCESS_CODE;
        if (argc > 1 && !parse_num(argv[1], &code)) {
            reply_error("quit", "usage: quit [code]");
            return;
        }
        reply("{\"ok\":true,\"cmd\":\"quit\",\"code\":%lu}", code);
        machine_exit((enum exit_code)code, "agent quit");
    } else {
        char msg[80];
        ksnprintf(msg, sizeof(msg), "unknown command '%.40s'", argv[0]);
        reply_error(argv[0], msg);
    }
}

bool agent_init(struct balloon *b)
{
    balloon = b;
    enabled = serial_init(COM2);
    if (enabled) {
        kprintf("agent: listening on COM2\n");
        reply("{\"event\":\"agent_ready\"}");
    }
    return enabled;
}

void agent_poll(void)
{
    if (!enabled)
        return;
    int c;
    while ((c = serial_getc(COM2)) >= 0) {
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
}
