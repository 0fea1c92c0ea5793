/* Host implementation of include/platform.h for unit tests and benchmarks. */
#define _POSIX_C_SOURCE 200809L
#include "tests/unit/fake_platform.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "include/platform.h"

static uint8_t *ram;
static uint64_t ram_base, ram_bytes;

static char log_lines[FAKE_LOG_KEEP][FAKE_LOG_LINE];
static unsigned log_count;
static bool log_echo = true;

void fake_ram_init(uint64_t base_phys, uint64_t bytes)
{
    fake_ram_fini();
    if (!bytes)
        return;
    /* Round up so aligned_alloc gets a multiple of the alignment. */
    size_t size = (size_t)((bytes + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1));
    ram = aligned_alloc(PAGE_SIZE, size);
    if (!ram) {
        fprintf(stderr, "fake_ram_init: cannot allocate %zu bytes\n", size);
        abort();
    }
    memset(ram, 0, size);
    ram_base = base_phys;
    ram_bytes = bytes;
}

void fake_ram_fini(void)
{
    free(ram);
    ram = NULL;
    ram_base = ram_bytes = 0;
}

void *phys_to_virt(uint64_t phys)
{
    /* A stray access is a bug in the code under test: fail loudly rather than scribble. */
    if (!ram || phys < ram_base || phys - ram_base >= ram_bytes) {
        fprintf(stderr, "phys_to_virt(0x%llx): outside the fake RAM [0x%llx, 0x%llx)\n",
                (unsigned long long)phys, (unsigned long long)ram_base,
                (unsigned long long)(ram_base + ram_bytes));
        abort();
    }
    return ram + (phys - ram_base);
}

uint64_t virt_to_phys(const void *virt)
{
    const uint8_t *p = virt;
    if (!ram || p < ram || (uint64_t)(p - ram) >= ram_bytes) {
        fprintf(stderr, "virt_to_phys(%p): outside the fake RAM\n", virt);
        abort();
    }
    return ram_base + (uint64_t)(p - ram);
}

static uint64_t clock_skip_ns;
static uint64_t virtual_step_ns; /* 0: the host's clock; else each reading moves time this far */
static uint64_t virtual_now_ns;

void fake_clock_virtual(uint64_t step_ns)
{
    virtual_step_ns = step_ns;
    virtual_now_ns = 0;
    clock_skip_ns = 0;
}

uint64_t platform_now_ns(void)
{
    if (virtual_step_ns)
        return (virtual_now_ns += virtual_step_ns) + clock_skip_ns;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec + clock_skip_ns;
}

void fake_clock_skip(uint64_t ns)
{
    clock_skip_ns += ns;
}

static char log_watch[FAKE_LOG_LINE];
static unsigned log_watch_count;

void fake_log_watch(const char *needle)
{
    snprintf(log_watch, sizeof(log_watch), "%s", needle);
    log_watch_count = 0;
}

unsigned fake_log_watched(void)
{
    return log_watch_count;
}

void platform_log(const char *fmt, ...)
{
    char *line = log_lines[log_count % FAKE_LOG_KEEP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, FAKE_LOG_LINE, fmt, ap);
    va_end(ap);
    log_count++;
    if (log_watch[0] && strstr(line, log_watch))
        log_watch_count++;
    if (log_echo)
        fprintf(stderr, "[log] %s\n", line);
}

void fake_log_reset(void)
{
    log_count = 0;
    memset(log_lines, 0, sizeof(log_lines));
}

unsigned fake_log_count(void)
{
    return log_count;
}

const char *fake_log_last(void)
{
    return log_count ? log_lines[(log_count - 1) % FAKE_LOG_KEEP] : "";
}

bool fake_log_contains(const char *needle)
{
    unsigned n = log_count < FAKE_LOG_KEEP ? log_count : FAKE_LOG_KEEP;
    for (unsigned i = 0; i < n; i++)
        if (strstr(log_lines[(log_count - 1 - i) % FAKE_LOG_KEEP], needle))
            return true;
    return false;
}

void fake_log_echo(bool on)
{
    log_echo = on;
}
