#include "kernel/cmdline.h"
#include "kernel/stress_engine.h"
#include "lib/json.h"
#include "lib/printf.h"
#include "lib/parse.h"
#include "lib/string.h"

#include <stddef.h>

/* How a value is parsed and stored. */
enum opt_type {
    OPT_ENUM, /* one of names[], stored as an int-sized enum */
    OPT_BOOL, /* 0 | 1 */
    OPT_U32,  /* number within [min, max] */
    OPT_U64,
    OPT_MS_NS, /* milliseconds within [min, max], stored as uint64_t nanoseconds */
    OPT_MMIO,  /* virtio_mmio.device=<size>@<base>:<irq>; may repeat */
    OPT_HOLD,  /* blimp.test.hold=<step>:<ms>[,<step>:<ms>...] into balloon.hold_ms */
};

struct option_def {
    const char *name;
    enum opt_type type;
    size_t offset;     /* of the field in struct options */
    const char *value; /* the default, parsed like a command-line value; NULL: the driver's own
                          default, already in place from balloon_default_config() */
    const char *help;
    uint64_t min, max;        /* OPT_U32, OPT_U64, OPT_MS_NS */
    const char *const *names; /* OPT_ENUM, NULL-terminated */
};

_Static_assert(sizeof(enum kernel_mode) == sizeof(int) &&
                   sizeof(enum fault_inject) == sizeof(int) &&
                   sizeof(enum virtio_choice) == sizeof(int) &&
                   sizeof(enum irq_choice) == sizeof(int) &&
                   sizeof(enum balloon_inject) == sizeof(int) &&
                   sizeof(enum balloon_on_reset) == sizeof(int) &&
                   sizeof(enum balloon_queues) == sizeof(int),
               "OPT_ENUM stores enums as int");

static const char *const mode_names[] = {
    [MODE_BALLOON] = "balloon",
    [MODE_BOOT] = "boot",
    [MODE_SELFTEST] = "selftest",
    [MODE_FAULT] = "fault",
    [MODE_STRESS] = "stress",
    [MODE_CONFORM] = "conform",
    NULL,
};
static const char *const virtio_names[] = {
    [VIRTIO_AUTO] = "auto",
    [VIRTIO_MODERN] = "modern",
    [VIRTIO_LEGACY] = "legacy",
    [VIRTIO_MMIO_ONLY] = "mmio",
    NULL,
};
static const char *const irq_names[] = {
    [IRQ_AUTO] = "auto",
    [IRQ_POLL] = "poll",
    NULL,
};
static const char *const balloon_inject_names[] = {
    [BALLOON_INJECT_NONE] = "none",
    [BALLOON_INJECT_CHUNK_ALIGN] = "chunk_align",
    [BALLOON_INJECT_CHUNK_OVERLAP] = "chunk_overlap",
    [BALLOON_INJECT_CHUNK_OUTSIDE] = "chunk_outside",
    [BALLOON_INJECT_CHUNK_WRITABLE] = "chunk_writable",
    [BALLOON_INJECT_BAD_NEXT] = "bad_next",
    NULL,
};
static const char *const on_reset_names[] = {
    [BALLOON_ON_RESET_RECOVER] = "recover",
    [BALLOON_ON_RESET_STOP] = "stop",
    NULL,
};
static const char *const queues_names[] = {
    [BALLOON_QUEUES_AUTO] = "auto",
    [BALLOON_QUEUES_NEGOTIATED] = "negotiated",
    [BALLOON_QUEUES_FIXED] = "fixed",
    NULL,
};
static const char *const inject_names[] = {
    [INJECT_NONE] = "none",
    [INJECT_STAMP] = "stamp",
    [INJECT_POISON] = "poison",
    [INJECT_STRESS_CORRUPT] = "stress_corrupt",
    [INJECT_STRESS_LEAK] = "stress_leak",
    NULL,
};

#define OPT(field) offsetof(struct options, field)

static const struct option_def option_defs[] = {
    {"blimp.mode", OPT_ENUM, OPT(mode), "balloon",
     "balloon: follow the host's target | boot: report and exit | selftest | fault | stress: "
     "balloon plus a seeded storm on guest memory, verified page by page | conform: check the "
     "host's device against the spec (docs/conformance.md)",
     0, 0, mode_names},
    {"blimp.poison", OPT_BOOL, OPT(poison), "0",
     "1: fill free pages with a pattern, check it on "
     "allocation",
     0, 0, NULL},
    {"blimp.poison_pattern", OPT_U64, OPT(poison_pattern), "0xaaaaaaaaaaaaaaaa",
     "the 64-bit poison pattern", 0, UINT64_MAX, NULL},
    {"blimp.inject", OPT_ENUM, OPT(inject), "none",
     "damage done on purpose to prove a detector fires: none | stamp | poison (selftest) | "
     "stress_corrupt (stress: one word of one held page) | stress_leak (stress: 4 pages lost "
     "at the end)",
     0, 0, inject_names},
    {"blimp.seed", OPT_U64, OPT(stress.seed), "1",
     "stress: the seed of the operation sequence (the same seed replays it)", 0, UINT64_MAX, NULL},
    {"blimp.stress.ops", OPT_U64, OPT(stress.ops), "10000",
     "stress: operations to run (0: no bound)", 0, UINT64_MAX, NULL},
    {"blimp.stress.ms", OPT_MS_NS, OPT(stress.time_ns), "0",
     "stress: ms to run (0: no bound; the first bound reached ends the run)", 0, 86400000, NULL},
    {"blimp.stress.slots", OPT_U32, OPT(stress.slots), "256",
     "stress: blocks held at most, 1..1024", 1, STRESS_MAX_SLOTS, NULL},
    {"blimp.stress.max_order", OPT_U32, OPT(stress.max_order), "6",
     "stress: largest block as a buddy order, 0..10 (6: 256 KiB)", 0, STRESS_MAX_ORDER, NULL},
    {"blimp.stress.verify_every", OPT_U32, OPT(stress.verify_every), "1000",
     "stress: ops between verifies of everything held (0: only at the end)", 0, UINT32_MAX, NULL},
    {"blimp.stress.progress", OPT_U32, OPT(stress.progress), "1000",
     "stress: ops between progress lines, at least one a second (0: one a second)", 0, UINT32_MAX,
     NULL},
    {"blimp.stress.settle_ms", OPT_MS_NS, OPT(stress.settle_ns), "2000",
     "stress: at the end, ms to wait at most for the balloon to be at rest", 0, 600000, NULL},
    {"blimp.stress.end_empty", OPT_BOOL, OPT(stress.end_empty), "0",
     "stress: 1 = at the end, wait (settle_ms at most) for the host's target to be 0 and the "
     "balloon empty, so the leak check is exactly free pages after == before",
     0, 0, NULL},
    {"blimp.conform.host", OPT_BOOL, OPT(conform.host), "0",
     "conform: 1 = a host runner (./blimp conform) answers requests; 0 = checks that need the "
     "host are skipped",
     0, 0, NULL},
    {"blimp.conform.timeout_ms", OPT_MS_NS, OPT(conform.timeout_ns), "20000",
     "conform: ms to wait for one request to be answered and acted on", 1, 600000, NULL},
    {"blimp.virtio", OPT_ENUM, OPT(virtio), "auto",
     "auto (modern if the device has it) | modern | legacy | mmio (virtio-mmio only)", 0, 0,
     virtio_names},
    {"blimp.irq", OPT_ENUM, OPT(irq), "auto",
     "auto: sleep until a device interrupt, the agent or a deadline (polling when the device has "
     "no usable line) | poll: poll the device every ms",
     0, 0, irq_names},
    {"blimp.irq.look_ms", OPT_MS_NS, OPT(irq_look_ns), "100",
     "with interrupts, ms between the guest's own looks at the device (a lost interrupt costs at "
     "most this; each one found is an irq_missed event), 1..10000; 0 (tests only): never look, "
     "so a lost interrupt hangs the guest as it did before the look existed",
     0, 10000, NULL},
    {"blimp.balloon.pfns", OPT_U32, OPT(balloon.pfns_per_buffer), NULL,
     "PFNs per inflate/deflate buffer, 1..65536", 1, 65536, NULL},
    {"blimp.balloon.buffers", OPT_U32, OPT(balloon.buffers), NULL,
     "buffers in flight per queue, 1..64", 1, BALLOON_MAX_BUFFERS, NULL},
    {"blimp.balloon.chunks", OPT_BOOL, OPT(balloon.chunks), NULL,
     "accept the chunked inflate extension (bit 23, docs/chunked-inflate.md) when offered", 0, 0,
     NULL},
    {"blimp.balloon.chunks_per_buffer", OPT_U32, OPT(balloon.chunks_per_buffer), NULL,
     "chunks per buffer with the chunked extension, 1..256", 1, BALLOON_MAX_CHUNKS, NULL},
    {"blimp.balloon.stats", OPT_BOOL, OPT(balloon.stats), NULL,
     "accept STATS_VQ (memory statistics for the host) when offered", 0, 0, NULL},
    {"blimp.balloon.deflate_on_oom", OPT_BOOL, OPT(balloon.deflate_on_oom), NULL,
     "accept DEFLATE_ON_OOM when the device offers it", 0, 0, NULL},
    {"blimp.balloon.timeout_ms", OPT_MS_NS, OPT(balloon.ack_timeout_ns), NULL,
     "ms without an answer before the device counts as stalled, 1..3600000", 1, 3600000, NULL},
    {"blimp.balloon.hinting", OPT_BOOL, OPT(balloon.hinting), NULL,
     "accept FREE_PAGE_HINT (live migration skips hinted free pages) when offered", 0, 0, NULL},
    {"blimp.balloon.hint_order", OPT_U32, OPT(balloon.hint_order), NULL,
     "largest block hinted at once, as a buddy order 0..18 (18 = 1 GiB)", 0, BUDDY_MAX_ORDER, NULL},
    {"blimp.balloon.reporting", OPT_BOOL, OPT(balloon.reporting), NULL,
     "accept free page reporting (VIRTIO_BALLOON_F_PAGE_REPORTING) when offered", 0, 0, NULL},
    {"blimp.balloon.report_order", OPT_U32, OPT(balloon.report_order), NULL,
     "smallest free block reported: 2^order pages, 0..18 (9: 2 MiB)", 0, 18, NULL},
    {"blimp.balloon.report_delay_ms", OPT_U32, OPT(balloon.report_delay_ms), NULL,
     "ms free memory must stay unchanged before a reporting pass, 0..60000", 0, 60000, NULL},
    {"blimp.balloon.report_budget", OPT_U64, OPT(balloon.report_budget_pages), NULL,
     "pages a reporting pass stops after (0: no limit)", 0, UINT64_MAX, NULL},
    {"blimp.balloon.report_threshold", OPT_U64, OPT(balloon.report_threshold_pages), NULL,
     "unreported free pages (in blocks of at least report_order) needed to start a pass", 0,
     UINT64_MAX, NULL},
    {"blimp.balloon.inject", OPT_ENUM, OPT(balloon.inject), NULL,
     "send one bad buffer to prove the host rejects it: none | chunk_align | chunk_overlap | "
     "chunk_outside | chunk_writable | bad_next (a malformed chain: the device needs a reset)",
     0, 0, balloon_inject_names},
    {"blimp.balloon.on_reset", OPT_ENUM, OPT(balloon.on_reset), NULL,
     "when the device sets DEVICE_NEEDS_RESET: recover (reset it, re-inflate every held page) | "
     "stop (exit 0x18)",
     0, 0, on_reset_names},
    {"blimp.balloon.strict", OPT_BOOL, OPT(balloon.strict), NULL,
     "1: a used-length deviation (used len on a read-only buffer, QEMU < 7.0) is a violation", 0, 0,
     NULL},
    {"blimp.balloon.queues", OPT_ENUM, OPT(balloon.queues), NULL,
     "queue numbering after deflateq: auto (as the queue sizes show) | negotiated | fixed "
     "(stats 2, hint 3, reporting 4: crosvm before 2025)",
     0, 0, queues_names},
    {"blimp.test.hold", OPT_HOLD, OPT(balloon.hold_ms), "none",
     "tests: hold bring-up steps open, <step>:<ms>[,...] with step negotiate (features read, "
     "FEATURES_OK not written) | driver_ok (DRIVER_OK set, interrupt not routed) | routed "
     "(interrupt routed, loop not started), ms 1..60000 (a hold event marks each)",
     1, 60000, NULL},
    {"virtio_mmio.device", OPT_MMIO, OPT(virtio_mmio), NULL,
     "<size>@<base>:<irq>[:<id>], a virtio-mmio device (as Linux spells it); may repeat", 0, 0,
     NULL},
};

#define N_OPTIONS (sizeof(option_defs) / sizeof(option_defs[0]))

const char *kernel_mode_name(enum kernel_mode m)
{
    return (unsigned)m < sizeof(mode_names) / sizeof(mode_names[0]) - 1 ? mode_names[m] : "unknown";
}

static void error(const char *word, const char *why)
{
    kprintf("blimp: error: bad command-line option '%s': %s\n", word, why);
    struct json j;
    event_begin(&j, "error");
    json_str(&j, "kind", "cmdline");
    json_str(&j, "option", word);
    json_str(&j, "message", why);
    event_emit(&j);
}

/* The option's current value as text (for the help listing of defaults). */
static void format_value(const struct option_def *d, const struct options *o, char *buf,
                         size_t size)
{
    const char *field = (const char *)o + d->offset;
    switch (d->type) {
    case OPT_ENUM:
        strlcpy(buf, d->names[*(const int *)field], size);
        return;
    case OPT_BOOL:
        strlcpy(buf, *(const bool *)field ? "1" : "0", size);
        return;
    case OPT_U32:
        ksnprintf(buf, size, "%u", *(const uint32_t *)field);
        return;
    case OPT_U64:
        ksnprintf(buf, size, "0x%lx", *(const uint64_t *)field);
        return;
    case OPT_MS_NS:
        ksnprintf(buf, size, "%lu", *(const uint64_t *)field / 1000000);
        return;
    case OPT_MMIO:
        strlcpy(buf, "none", size);
        return;
    case OPT_HOLD:
        strlcpy(buf, "none", size);
        for (unsigned i = 0, n = 0; i < BALLOON_HOLDS; i++) {
            uint32_t ms = ((const uint32_t *)field)[i];
            if (ms) {
                size_t len = n ? strlen(buf) : 0;
                ksnprintf(buf + len, size - len, "%s%s:%u", n++ ? "," : "", balloon_hold_names[i],
                          ms);
            }
        }
        return;
    }
}

static void list_known(void)
{
    struct options defaults;
    cmdline_parse("", &defaults);
    kprintf("blimp: known options (default in brackets):\n");
    for (unsigned i = 0; i < N_OPTIONS; i++) {
        char def[32];
        format_value(&option_defs[i], &defaults, def, sizeof(def));
        kprintf("  %-30s [%s] %s\n", option_defs[i].name, def, option_defs[i].help);
    }
}

static bool apply_mmio(struct options *o, const char *word, const char *value)
{
    struct virtio_mmio_device dev;
    const char *why;
    if (!virtio_mmio_parse_device(value, &dev, &why)) {
        error(word, why);
        return false;
    }
    for (unsigned i = 0; i < o->n_virtio_mmio; i++) {
        const struct virtio_mmio_device *e = &o->virtio_mmio[i];
        /* The same window twice (a user's entry that QEMU appends again) is one device. */
        if (e->base == dev.base && e->size == dev.size && e->irq.gsi == dev.irq.gsi &&
            e->id == dev.id) {
            kprintf("blimp: virtio_mmio.device=%s given twice; using it once\n", value);
            return true;
        }
        if (virtio_mmio_overlap(e, &dev)) {
            char why_buf[120];
            ksnprintf(why_buf, sizeof(why_buf),
                      "overlaps the window 0x%lx-0x%lx of an earlier virtio_mmio.device", e->base,
                      e->base + e->size - 1);
            error(word, why_buf);
            return false;
        }
    }
    if (o->n_virtio_mmio == MAX_VIRTIO_MMIO) {
        error(word, "too many virtio_mmio.device options");
        return false;
    }
    o->virtio_mmio[o->n_virtio_mmio++] = dev;
    return true;
}

/* "none", or <step>:<ms> entries separated by commas; a step named twice keeps the last. */
static bool apply_hold(const struct option_def *d, uint32_t *hold_ms, const char *word,
                       const char *value)
{
    for (unsigned i = 0; i < BALLOON_HOLDS; i++)
        hold_ms[i] = 0;
    if (!strcmp(value, "none"))
        return true;
    char why[200];
    const char *p = value;
    for (;;) {
        const char *colon = strchr(p, ':'), *comma = strchr(p, ',');
        size_t entry = comma ? (size_t)(comma - p) : strlen(p);
        unsigned step = BALLOON_HOLDS;
        for (unsigned i = 0; colon && colon < p + entry && i < BALLOON_HOLDS; i++)
            if (strlen(balloon_hold_names[i]) == (size_t)(colon - p) &&
                !memcmp(p, balloon_hold_names[i], (size_t)(colon - p)))
                step = i;
        char num[24];
        size_t nlen = colon ? entry - (size_t)(colon + 1 - p) : 0;
        uint64_t ms;
        if (step == BALLOON_HOLDS || nlen == 0 || nlen >= sizeof(num)) {
            ksnprintf(why, sizeof(why), "bad entry '%.*s' (%s)", (int)entry, p, d->help);
            error(word, why);
            return false;
        }
        memcpy(num, colon + 1, nlen);
        num[nlen] = '\0';
        if (!parse_u64(num, &ms) || ms < d->min || ms > d->max) {
            ksnprintf(why, sizeof(why), "bad hold time '%s' for %s (ms %lu..%lu)", num,
                      balloon_hold_names[step], d->min, d->max);
            error(word, why);
            return false;
        }
        hold_ms[step] = (uint32_t)ms;
        if (!comma)
            return true;
        p = comma + 1;
    }
}

static bool apply(const struct option_def *d, struct options *o, const char *word,
                  const char *value)
{
    char why[200];
    char *field = (char *)o + d->offset;
    uint64_t v;
    switch (d->type) {
    case OPT_ENUM:
        for (unsigned m = 0; d->names[m]; m++) {
            if (!strcmp(value, d->names[m])) {
                *(int *)field = (int)m;
                return true;
            }
        }
        ksnprintf(why, sizeof(why), "unknown value '%.40s' (expected %s)", value, d->help);
        error(word, why);
        return false;
    case OPT_BOOL:
        if (!strcmp(value, "0") || !strcmp(value, "1")) {
            *(bool *)field = value[0] == '1';
            return true;
        }
        error(word, "expected 0 or 1");
        return false;
    case OPT_U32:
    case OPT_U64:
    case OPT_MS_NS:
        if (!parse_u64(value, &v)) {
            error(word, "expected a number (decimal or 0x hex, optional K/M/G)");
            return false;
        }
        if (v < d->min || v > d->max) {
            ksnprintf(why, sizeof(why), "out of range (%s)", d->help);
            error(word, why);
            return false;
        }
        if (d->type == OPT_U32)
            *(uint32_t *)field = (uint32_t)v;
        else if (d->type == OPT_U64)
            *(uint64_t *)field = v;
        else
            *(uint64_t *)field = v * 1000000;
        return true;
    case OPT_MMIO:
        return apply_mmio(o, word, value);
    case OPT_HOLD:
        return apply_hold(d, (uint32_t *)field, word, value);
    }
    return false;
}

static const struct option_def *lookup(const char *name)
{
    for (unsigned i = 0; i < N_OPTIONS; i++)
        if (!strcmp(name, option_defs[i].name))
            return &option_defs[i];
    return NULL;
}

static void set_defaults(struct options *o)
{
    memset(o, 0, sizeof(*o));
    balloon_default_config(&o->balloon);
    for (unsigned i = 0; i < N_OPTIONS; i++)
        if (option_defs[i].value &&
            !apply(&option_defs[i], o, option_defs[i].name, option_defs[i].value))
            kprintf("blimp: bug: the default of %s does not parse\n", option_defs[i].name);
}

/* Ours: blimp's own keys and virtio_mmio.device. Every other word is another VMM's default for
 * Linux (kvmtool's `noapic ... console=ttyS0`, Firecracker's `reboot=k panic=1 pci=off`): not
 * ours to judge, so it is ignored and listed once. */
static bool is_ours(const char *word)
{
    return !strncmp(word, "blimp.", 6) || !strncmp(word, "virtio_mmio.", 12);
}

/* One human line and one event listing the foreign words (NUL-separated in `words`). */
static void report_foreign(const char *words, unsigned n)
{
    kprintf("blimp: ignoring foreign kernel arguments:");
    const char *w = words;
    for (unsigned i = 0; i < n; i++, w += strlen(w) + 1)
        kprintf(" %s", w);
    kprintf("\n");
    struct json j;
    event_begin(&j, "cmdline_ignored");
    json_open_array(&j, "words");
    w = words;
    for (unsigned i = 0; i < n; i++, w += strlen(w) + 1)
        json_str(&j, NULL, w);
    json_close(&j);
    event_emit(&j);
}

int cmdline_parse(const char *cmdline, struct options *o)
{
    set_defaults(o);
    int errors = 0;
    char foreign[1024]; /* the foreign words, each NUL-terminated (boot_info's line is shorter) */
    size_t foreign_len = 0;
    unsigned n_foreign = 0;
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p)
            break;
        char word[256];
        size_t n = 0;
        while (p[n] && p[n] != ' ' && p[n] != '\t')
            n++;
        if (!is_ours(p)) {
            if (foreign_len + n + 1 <= sizeof(foreign)) {
                memcpy(foreign + foreign_len, p, n);
                foreign[foreign_len + n] = '\0';
                foreign_len += n + 1;
                n_foreign++;
            }
            p += n;
            continue;
        }
        if (n >= sizeof(word)) {
            error("(long word)", "option longer than 255 characters");
            errors++;
            p += n;
            continue;
        }
        memcpy(word, p, n);
        word[n] = '\0';
        p += n;

        char *eq = strchr(word, '=');
        if (eq)
            *eq = '\0';
        const struct option_def *d = lookup(word);
        if (eq)
            *eq = '=';
        if (!d) {
            error(word, "unknown option");
            errors++;
        } else if (!eq) {
            error(word, "missing '=value'");
            errors++;
        } else if (!apply(d, o, word, eq + 1)) {
            errors++;
        }
    }
    if (n_foreign)
        report_foreign(foreign, n_foreign);
    if (errors)
        list_known();
    return errors;
}
