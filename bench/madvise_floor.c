/*
 * Host floor for balloon inflation: what QEMU itself must do for every ballooned 4 KiB page
 * (virtio-balloon -> ram_block_discard_range -> one madvise(MADV_DONTNEED) per page), without
 * any guest or virtqueue in the way.  Compiled on the fly by bench/balloon_bench.py into
 * build/bench/madvise_floor; not part of the ninja build.
 *
 *   madvise_floor <bytes> <touched 0|1> <thp 0|1> [step]
 *
 * Maps <bytes> of private anonymous memory like QEMU maps guest RAM (2 MiB aligned, and with
 * MADV_HUGEPAGE when thp=1, as QEMU does for anonymous RAM blocks), optionally touches every
 * page, then times one madvise(MADV_DONTNEED) per 4 KiB page over the whole range, and then
 * one madvise(MADV_WILLNEED) per page (what QEMU does on deflate).  Prints one JSON line.
 * With a step (bytes, a multiple of 4 KiB), each madvise covers that much instead: step =
 * bytes is the floor of the chunked extension, where the host discards a range with one call.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE  4096ul
#define ALIGN (2ul << 20)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;
    if (!f)
        return -1;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
            break;
    fclose(f);
    return kib;
}

int main(int argc, char **argv)
{
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s <bytes> <touched 0|1> <thp 0|1> [step]\n", argv[0]);
        return 2;
    }
    unsigned long bytes = strtoul(argv[1], NULL, 0) / PAGE * PAGE;
    unsigned long step = argc == 5 ? strtoul(argv[4], NULL, 0) / PAGE * PAGE : PAGE;
    if (step == 0 || step > bytes)
        step = bytes;
    int touched = atoi(argv[2]), thp = atoi(argv[3]);
    void *raw = mmap(NULL, bytes + ALIGN, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    char *p = (char *)(((uintptr_t)raw + ALIGN - 1) & ~(ALIGN - 1));
    if (madvise(p, bytes, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) != 0)
        perror("madvise(HUGEPAGE/NOHUGEPAGE)"); /* not fatal: THP may be off */
    double t_touch = 0;
    if (touched) {
        double t0 = now();
        for (unsigned long off = 0; off < bytes; off += PAGE)
            p[off] = (char)(off >> 12 | 1);
        t_touch = now() - t0;
    }
    long rss_before = rss_kib();
    double t0 = now();
    for (unsigned long off = 0; off < bytes; off += step) {
        if (madvise(p + off, step < bytes - off ? step : bytes - off, MADV_DONTNEED) != 0) {
            perror("madvise(DONTNEED)");
            return 1;
        }
    }
    double t_dontneed = now() - t0;
    long rss_after = rss_kib();
    t0 = now();
    for (unsigned long off = 0; off < bytes; off += step) {
        if (madvise(p + off, step < bytes - off ? step : bytes - off, MADV_WILLNEED) != 0) {
            perror("madvise(WILLNEED)");
            return 1;
        }
    }
    double t_willneed = now() - t0;
    printf("{\"bytes\":%lu,\"step\":%lu,\"touched\":%d,\"thp\":%d,\"pages\":%lu,\"touch_s\":%.6f,"
           "\"dontneed_s\":%.6f,\"willneed_s\":%.6f,\"rss_before_kib\":%ld,"
           "\"rss_after_kib\":%ld}\n",
           bytes, step, touched, thp, bytes / PAGE, t_touch, t_dontneed, t_willneed, rss_before,
           rss_after);
    munmap(raw, bytes + ALIGN);
    return 0;
}
