/* lib/json: the one place that turns values into the guest's machine-readable lines. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "lib/json.h"
#include "tests/unit/fake_platform.h"

static void test_event_fields_in_order(void **state)
{
    (void)state;
    struct json j;
    event_begin(&j, "balloon_target");
    json_u64(&j, "target_pages", 262144);
    json_i64(&j, "delta", -5);
    json_bool(&j, "clamped", false);
    json_str(&j, "transport", "virtio-pci-modern");
    assert_string_equal(json_finish(&j), "{\"event\":\"balloon_target\",\"target_pages\":262144,"
                                         "\"delta\":-5,\"clamped\":false,"
                                         "\"transport\":\"virtio-pci-modern\"}");
}

static void test_extreme_numbers(void **state)
{
    (void)state;
    struct json j;
    json_begin(&j);
    json_u64(&j, "max", UINT64_MAX);
    json_u64(&j, "zero", 0);
    json_i64(&j, "min", INT64_MIN);
    assert_string_equal(json_finish(&j),
                        "{\"max\":18446744073709551615,\"zero\":0,\"min\":-9223372036854775808}");
}

static void test_strings_are_escaped(void **state)
{
    (void)state;
    struct json j;
    event_begin(&j, "error");
    /* What a host or a command line could put into a message: quotes, backslashes, newlines,
     * other control characters and bytes that are not ASCII. */
    json_str(&j, "message", "bad \"value\" \\ here\nnext\tline\x01\xff");
    json_str(&j, "we\"ird", "");
    assert_string_equal(json_finish(&j),
                        "{\"event\":\"error\",\"message\":\"bad \\\"value\\\" \\\\ here\\u000anext"
                        "\\u0009line\\u0001\\u00ff\",\"we\\\"ird\":\"\"}");
}

static void test_nesting_and_commas(void **state)
{
    (void)state;
    struct json j;
    event_begin(&j, "memmap");
    json_open_array(&j, "entries");
    for (unsigned i = 0; i < 2; i++) {
        json_open_object(&j, NULL);
        json_u64(&j, "base", i * 4096);
        json_str(&j, "type", "ram");
        json_close(&j);
    }
    json_close(&j);
    json_open_array(&j, "empty");
    json_close(&j);
    json_open_array(&j, "nums");
    json_u64(&j, NULL, 1);
    json_u64(&j, NULL, 2);
    json_close(&j);
    json_open_object(&j, "left_open");
    json_u64(&j, "x", 1);
    /* finish closes what is still open */
    assert_string_equal(json_finish(&j),
                        "{\"event\":\"memmap\",\"entries\":[{\"base\":0,\"type\":\"ram\"},"
                        "{\"base\":4096,\"type\":\"ram\"}],\"empty\":[],\"nums\":[1,2],"
                        "\"left_open\":{\"x\":1}}");
}

static void test_overflow_is_never_cut_mid_value(void **state)
{
    (void)state;
    static char big[JSON_LINE_MAX * 2];
    memset(big, 'x', sizeof(big) - 1);
    struct json j;
    event_begin(&j, "boot");
    json_str(&j, "cmdline", big);
    json_u64(&j, "after", 1);
    assert_string_equal(json_finish(&j), "{\"event\":\"boot\",\"truncated\":true}");

    /* Just below the limit fits whole. */
    json_begin(&j);
    big[JSON_LINE_MAX - 20] = '\0';
    json_str(&j, "s", big);
    const char *s = json_finish(&j);
    assert_int_equal(strlen(s), JSON_LINE_MAX - 20 + 8);
    assert_int_equal(s[strlen(s) - 1], '}');

    /* Too deep is an overflow too, without an event name the fallback has none. */
    json_begin(&j);
    for (unsigned i = 0; i < JSON_MAX_DEPTH + 1; i++)
        json_open_array(&j, i ? NULL : "a");
    assert_string_equal(json_finish(&j), "{\"truncated\":true}");
}

static void test_escape_into_small_buffer(void **state)
{
    (void)state;
    char out[8];
    /* "a\"b" escapes to a\"b (4 characters); then \u0001 (6) does not fit: cut before it. */
    assert_int_equal(json_escape(out, sizeof(out), "a\"b\x01z"), 4);
    assert_string_equal(out, "a\\\"b");
    assert_int_equal(json_escape(out, 1, "abc"), 0);
    assert_string_equal(out, "");
}

static void test_event_emit_logs_one_line(void **state)
{
    (void)state;
    fake_log_echo(false);
    fake_log_reset();
    struct json j;
    event_begin(&j, "ready");
    json_u64(&j, "boot_us", 6500);
    event_emit(&j);
    assert_int_equal(fake_log_count(), 1);
    assert_string_equal(fake_log_last(), "{\"event\":\"ready\",\"boot_us\":6500}");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_event_fields_in_order),
        cmocka_unit_test(test_extreme_numbers),
        cmocka_unit_test(test_strings_are_escaped),
        cmocka_unit_test(test_nesting_and_commas),
        cmocka_unit_test(test_overflow_is_never_cut_mid_value),
        cmocka_unit_test(test_escape_into_small_buffer),
        cmocka_unit_test(test_event_emit_logs_one_line),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
