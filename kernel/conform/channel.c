/*
 * The channel to the host runner (docs/conformance.md, "Guest -> runner"): a check that needs
 * the host to act prints a conform_request event on the console and waits, as a phase with a
 * deadline, for `ack <seq> key=value...` or `nack <seq> reason` on the agent channel.
 */
#include "kernel/conform/conform_internal.h"
#include "lib/json.h"
#include "lib/parse.h"
#include "lib/printf.h"
#include "lib/string.h"

bool conform_on_answer(void *ctx, bool ack, uint64_t seq, const char *rest)
{
    (void)ctx;
    if (!conform.req.waiting || seq != conform.req.seq)
        return false;
    strlcpy(conform.req.rest, rest, sizeof(conform.req.rest));
    conform.req.answered = true;
    conform.req.acked = ack;
    conform.req.waiting = false;
    return true;
}

void request(const char *action, const char *key, uint64_t value)
{
    conform.req.seq++;
    conform.req.waiting = true;
    conform.req.answered = false;
    conform.req.action = action;
    conform.req.rest[0] = '\0';
    uint64_t wait = conform.timeout_ns;
    if (!strcmp(action, "migrate"))
        wait *= 6; /* a live migration of the whole guest under TCG */
    conform.req.deadline = platform_now_ns() + wait;
    kprintf("conform: request %lu: %s\n", conform.req.seq, action);
    struct json j;
    event_begin(&j, "conform_request");
    json_u64(&j, "seq", conform.req.seq);
    json_str(&j, "action", action);
    if (key)
        json_u64(&j, key, value);
    event_emit(&j);
}

enum answer answer(uint64_t now)
{
    if (conform.req.answered)
        return conform.req.acked ? A_ACK : A_NACK;
    if (now > conform.req.deadline) {
        conform.req.waiting = false;
        return A_TIMEOUT;
    }
    return A_WAITING;
}

/* key=value from the last answer (decimal, may be negative). */
bool answer_value(const char *key, int64_t *out)
{
    size_t kl = strlen(key);
    for (const char *p = conform.req.rest; *p;) {
        while (*p == ' ')
            p++;
        if (!strncmp(p, key, kl) && p[kl] == '=') {
            const char *v = p + kl + 1;
            bool neg = *v == '-';
            char num[24];
            size_t n = 0;
            for (v += neg; *v && *v != ' ' && n + 1 < sizeof(num); v++)
                num[n++] = *v;
            num[n] = '\0';
            uint64_t u;
            if (!parse_u64(num, &u) || u > INT64_MAX)
                return false; /* the runner is untrusted input too */
            *out = neg ? -(int64_t)u : (int64_t)u;
            return true;
        }
        while (*p && *p != ' ')
            p++;
    }
    return false;
}
