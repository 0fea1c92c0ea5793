#include "kernel/cmdline.h"
#include "lib/printf.h"
#include "lib/string.h"

struct options options;

enum opt_type { OPT_MODE, OPT_VIRTIO, OPT_BOOL, OPT_U64, OPT_MMIO };

struct option_def {
    const char *name;
    enum opt_type type;
    void *target;
    const char *help;
    uint64_t min, max; /* OPT_U64 range */
};

static const struct option_def option_defs[] = {
    {"blimp.mode", OPT_MODE, &options.mode, "balloon (default) | boot | selftest | fault", 0, 0},
    {"blimp.poison", OPT_BOOL, &options.poison, "0 (default) | 1: poison free pages", 0, 0},
    {"blimp.poison_pattern", OPT_U64, &options.poison_pattern,
     "64-bit fill pattern for blimp.poison (default 0xaaaaaaaaaaaaaaaa)", 0, UINT64_MAX},
    {"blimp.virtio", OPT_VIRTIO, &options.virtio,
     "auto (default: modern if offered) | modern | legacy", 0, 0},
    {"blimp.balloon.pfns", OPT_U64, &options.balloon_pfns,
     "PFNs per inflate/deflate buffer, 1..65536 (default 256)", 1, 65536},
    {"blimp.balloon.buffers", OPT_U64, &options.balloon_buffers,
     "buffers in flight per queue, 1..64 (default 16)", 1, 64},
    {"blimp.balloon.deflate_on_oom", OPT_BOOL, &options.balloon_oom,
     "1 (default) | 0: accept DEFLATE_ON_OOM when offered", 0, 0},
    {"blimp.balloon.timeout_ms", OPT_U64, &options.balloon_timeout_ms,
     "ms without an answer before the device counts as stalled (default 5000)", 1, 3600000},
    {"virtio_mmio.device", OPT_MMIO, NULL, "<size>@<base>:<irq>, a virtio-mmio device", 0, 0},
};

static const char *const virtio_names[] = {
    [VIRTIO_AUTO] = "auto",
    [VIRTIO_MODERN] = "modern",
    [VIRTIO_LEGACY] = "legacy",
};

static const char *const mode_names[] = {
    [MODE_BALLOON] = "balloon",
    [MODE_BOOT] = "boot",
    [MODE_SELFTEST] = "selftest",
    [MODE_FAULT] = "fault",
};

const char *kernel_mode_name(enum kernel_mode m)
{
    return m < sizeof(mode_names) / sizeof(mode_names[0]) ? mode_names[m] : "unknown";
}

static void set_defaults(void)
{
    memset(&options, 0, sizeof(options));
    options.mode = MODE_BALLOON;
    options.poison_pattern = 0xaaaaaaaaaaaaaaaaull;
    options.virtio = VIRTIO_AUTO;
    options.balloon_pfns = 256;
    options.balloon_buffers = 16;
    options.balloon_oom = true;
    options.balloon_timeout_ms = 5000;
}

/* Decimal or 0x-hex, with an optional K/M/G suffix; the whole string must be consumed. */
static bool parse_u64(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    unsigned base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    if (!*s)
        return false;
    for (; *s; s++) {
        unsigned d;
        if (*s >= '0' && *s <= '9')
            d = (unsigned)(*s - '0');
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = (unsigned)(*s - 'a' + 10);
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = (unsigned)(*s - 'A' + 10);
        else
            break;
        if (v > (UINT64_MAX - d) / base)
            return false;
        v = v * base + d;
    }
    unsigned shift = 0;
    if (*s == 'K' || *s == 'k')
        shift = 10;
    else if (*s == 'M' || *s == 'm')
        shift = 20;
    else if (*s == 'G' || *s == 'g')
        shift = 30;
    if (shift) {
        if (v > (UINT64_MAX >> shift))
            return false;
        v <<= shift;
        s++;
    }
    if (*s)
        return false;
    *out = v;
    return true;
}

static void error(const char *word, const char *why)
{
    char esc[200], esc_why[200];
    json_escape(esc, sizeof(esc), word);
    json_escape(esc_why, sizeof(esc_why), why);
    kprintf("blimp: error: bad command-line option '%s': %s\n", word, why);
    kprintf("{\"event\":\"error\",\"kind\":\"cmdline\",\"option\":\"%s\",\"message\":\"%s\"}\n",
            esc, esc_why);
}

static void list_known(void)
{
    kprintf("blimp: known options:\n");
    for (unsigned i = 0; i < sizeof(option_defs) / sizeof(option_defs[0]); i++)
        kprintf("  %-22s %s\n", option_defs[i].name, option_defs[i].help);
}

static bool apply(const struct option_def *d, const char *word, const char *value)
{
    char why[160];
    switch (d->type) {
    case OPT_MODE:
    case OPT_VIRTIO: {
        const char *const *names = d->type == OPT_MODE ? mode_names : virtio_names;
        unsigned count = d->type == OPT_MODE ? sizeof(mode_names) / sizeof(mode_names[0])
                                             : sizeof(virtio_names) / sizeof(virtio_names[0]);
        for (unsigned m = 0; m < count; m++) {
            if (!strcmp(value, names[m])) {
                *(unsigned *)d->target = m;
                return true;
            }
        }
        ksnprintf(why, sizeof(why), "unknown value '%s' (expected %s)", value, d->help);
        error(word, why);
        return false;
    }
    case OPT_BOOL:
        if (!strcmp(value, "0") || !strcmp(value, "1")) {
            *(bool *)d->target = value[0] == '1';
            return true;
        }
        error(word, "expected 0 or 1");
        return false;
    case OPT_U64:
        if (!parse_u64(value, (uint64_t *)d->target)) {
            error(word, "expected a number (decimal or 0x hex, optional K/M/G)");
            return false;
        }
        if (*(uint64_t *)d->target < d->min || *(uint64_t *)d->target > d->max) {
            ksnprintf(why, sizeof(why), "out of range (%s)", d->help);
            error(word, why);
            return false;
        }
        return true;
    case OPT_MMIO:
        if (options.n_virtio_mmio == sizeof(options.virtio_mmio) / sizeof(options.virtio_mmio[0])) {
            error(word, "too many virtio_mmio.device options");
            return false;
        }
        if (strlcpy(options.virtio_mmio[options.n_virtio_mmio], value, 64) >= 64 ||
            !strchr(value, '@')) {
            error(word, "expected <size>@<base>:<irq>");
            return false;
        }
        options.n_virtio_mmio++;
        return true;
    }
    return false;
}

int cmdline_parse(const char *cmdline)
{
    set_defaults();
    int errors = 0;
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
        const struct option_def *d = NULL;
        for (unsigned i = 0; i < sizeof(option_defs) / sizeof(option_defs[0]); i++)
            if (!strcmp(word, option_defs[i].name))
                d = &option_defs[i];
        if (eq)
            *eq = '=';
        if (!d) {
            error(word, "unknown option");
            errors++;
        } else if (!eq) {
            error(word, "missing '=value'");
            errors++;
        } else if (!apply(d, word, eq + 1)) {
            errors++;
        }
    }
    if (errors)
        list_known();
    return errors;
}
