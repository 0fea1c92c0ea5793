/*
 * Proves that the unit-test build's sanitizers stop a run: `./blimp test` runs this with each
 * argument and expects "overflow" and "leak" to fail with the sanitizer's report, and "clean"
 * to pass. If a flag or an environment setting ever turns a report back into a warning, these
 * expectations, not a silent green, are what breaks.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static volatile int sink;

int main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "";
    if (!strcmp(what, "overflow")) {
        volatile int big = INT_MAX;
        sink = big + 1; /* UBSan: signed integer overflow */
    } else if (!strcmp(what, "leak")) {
        char *p = malloc(4096);
        p[0] = 1;
        sink = p[0];
        p = NULL; /* LeakSanitizer: 4096 bytes lost at exit */
    } else if (strcmp(what, "clean")) {
        fprintf(stderr, "usage: sanitizer_canary overflow|leak|clean\n");
        return 2;
    }
    printf("sanitizer_canary %s: returned normally\n", what);
    return 0;
}
