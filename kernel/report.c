#include "kernel/report.h"
#include "lib/printf.h"
#include "arch/x86/exit.h"

static unsigned tests, failed, skipped;
static bool started;

static void header(void)
{
    if (!started)
        kprintf("TAP version 14\n");
    started = true;
}

static void line(const char *status, const char *directive, const char *fmt, va_list ap)
{
    char text[256];
    kvsnprintf(text, sizeof(text), fmt, ap);
    header();
    tests++;
    kprintf("%s %u - %s%s\n", status, tests, text, directive);
}

bool report(bool pass, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    line(pass ? "ok" : "not ok", "", fmt, ap);
    va_end(ap);
    if (!pass)
        failed++;
    return pass;
}

void report_skip(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    line("ok", " # SKIP", fmt, ap);
    va_end(ap);
    skipped++;
}

void report_info(const char *fmt, ...)
{
    char text[256];
    va_list ap;
    va_start(ap, fmt);
    kvsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    header();
    kprintf("# %s\n", text);
}

void report_point(enum report_kind kind, const char *skip_reason, const char *title)
{
    header();
    tests++;
    if (kind == REPORT_FAIL)
        failed++;
    if (kind == REPORT_SKIP)
        skipped++;
    kprintf("%s %u - %s%s%s\n", kind == REPORT_FAIL ? "not ok" : "ok", tests, title,
            kind == REPORT_SKIP ? " # SKIP " : "", kind == REPORT_SKIP ? skip_reason : "");
}

unsigned report_count(void)
{
    return tests;
}

int report_summary(void)
{
    header();
    kprintf("1..%u\n", tests);
    kprintf("SUMMARY: %u tests, %u failed, %u skipped\n", tests, failed, skipped);
    return failed ? EXIT_TEST_FAILED : EXIT_SUCCESS_CODE;
}
