/*
 * Results in the spirit of kvm-unit-tests: report(cond, "what must hold"), report_skip(),
 * report_info(), then report_summary(). Output is TAP version 14 on the console, closed by a
 * plan line and "SUMMARY: N tests, F failed, S skipped" (docs/serial-output.md).
 */
#ifndef KERNEL_REPORT_H
#define KERNEL_REPORT_H

#include <stdbool.h>

bool report(bool pass, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void report_skip(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void report_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* One point whose result the caller has decided (conformance checks, which add a YAML block
 * after it): pass, fail, or skip with the reason. */
enum report_kind { REPORT_PASS, REPORT_FAIL, REPORT_SKIP };
void report_point(enum report_kind kind, const char *skip_reason, const char *title);
unsigned report_count(void); /* points so far (the last one's number) */
/* Prints the plan and summary; returns EXIT_SUCCESS_CODE or EXIT_TEST_FAILED. */
int report_summary(void);

#endif
