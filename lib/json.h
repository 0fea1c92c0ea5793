/*
 * One-line JSON objects for machine-readable output: the guest's events (one object per line,
 * first key "event", docs/serial-output.md) and the agent's replies. Every string is escaped, so
 * text that came from the device or the command line cannot break a line's JSON.
 *
 *     struct json j;
 *     event_begin(&j, "balloon_target");
 *     json_u64(&j, "target_pages", t);
 *     event_emit(&j);                       // {"event":"balloon_target","target_pages":...}
 *
 * Output that does not fit JSON_LINE_MAX is never cut mid-value: the line becomes
 * {"event":"<name>","truncated":true} (or {"truncated":true} without an event name).
 */
#ifndef LIB_JSON_H
#define LIB_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define JSON_LINE_MAX  2048
#define JSON_MAX_DEPTH 8

struct json {
    char buf[JSON_LINE_MAX];
    size_t len;
    const char *event;         /* the event's name, kept for the truncated fallback */
    char open[JSON_MAX_DEPTH]; /* closing bracket of each open container */
    unsigned depth;
    bool need_comma, overflow;
};

/* Start an object ("{"). */
void json_begin(struct json *j);
/* Members: key is NULL for an element of an array. */
void json_str(struct json *j, const char *key, const char *value);
void json_u64(struct json *j, const char *key, uint64_t value);
void json_i64(struct json *j, const char *key, int64_t value);
void json_bool(struct json *j, const char *key, bool value);
void json_open_object(struct json *j, const char *key);
void json_open_array(struct json *j, const char *key);
void json_close(struct json *j); /* the innermost open object or array */
/* Close everything still open; the finished line (no newline), valid until j changes. */
const char *json_finish(struct json *j);

/* json_begin plus "event":name first. */
void event_begin(struct json *j, const char *name);
/* json_finish, then one line through platform_log (the console in the kernel). */
void event_emit(struct json *j);

/* Escape src as the inside of a JSON string into dst (always terminated; cut at a whole
 * character when dst is too small). Returns the length written. */
size_t json_escape(char *dst, size_t size, const char *src);

#endif
