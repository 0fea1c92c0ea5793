/* Virtio balloon device model for host unit tests: see fake_balloon.h. */
#include "tests/unit/fake_balloon.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "virtio/balloon.h"
#include "mm/buddy.h"
#include "tests/unit/fake_platform.h"
#include "include/platform.h"

#define STATS_ENTRY 10

static void fb_error(struct fake_balloon *fb, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void fb_error(struct fake_balloon *fb, const char *fmt, ...)
{
    if (fb->errors++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(fb->error, sizeof(fb->error), fmt, ap);
        va_end(ap);
        fprintf(stderr, "[fake balloon] driver error: %s\n", fb->error);
    }
}

static const char *role_name(enum fb_role r)
{
    return r == FB_INFLATE   ? "inflateq"
           : r == FB_DEFLATE ? "deflateq"
           : r == FB_STATS   ? "statsq"
           : r == FB_HINT    ? "free_page_vq"
                             : "reporting_vq";
}

static int role_of(const struct fake_balloon *fb, unsigned index)
{
    for (int r = 0; r < FB_ROLES; r++)
        if (fb->qidx[r] == index)
            return r;
    return -1;
}

static struct fake_vq *role_vq(struct fake_balloon *fb, enum fb_role role)
{
    return fb->qidx[role] == FB_NO_QUEUE ? NULL : fake_transport_vq(fb->ft, fb->qidx[role]);
}

/* ---- Pages ---------------------------------------------------------------------------------- */

static bool in_ram(const struct fake_balloon *fb, uint64_t pfn)
{
    return pfn >= fb->ram_pfn && pfn - fb->ram_pfn < fb->ram_pages;
}

static uint64_t canary_word(uint64_t pfn, unsigned i)
{
    return FB_CANARY_KEY ^ (pfn << 12 | (uint64_t)i * 8);
}

static void canary_fill(uint64_t pfn)
{
    uint64_t *w = phys_to_virt(pfn << PAGE_SHIFT);
    for (unsigned i = 0; i < PAGE_SIZE / 8; i++)
        w[i] = canary_word(pfn, i);
}

static bool canary_intact(uint64_t pfn)
{
    const uint64_t *w = phys_to_virt(pfn << PAGE_SHIFT);
    for (unsigned i = 0; i < PAGE_SIZE / 8; i++)
        if (w[i] != canary_word(pfn, i))
            return false;
    return true;
}

bool fake_balloon_is_ballooned(const struct fake_balloon *fb, uint64_t pfn)
{
    return in_ram(fb, pfn) && fb->ballooned[pfn - fb->ram_pfn];
}

unsigned fake_balloon_check_canaries(struct fake_balloon *fb)
{
    unsigned bad = 0;
    for (uint64_t i = 0; i < fb->ram_pages; i++)
        if (fb->ballooned[i] && !canary_intact(fb->ram_pfn + i)) {
            if (bad++ == 0)
                fb_error(fb, "ballooned page 0x%llx was written by the guest",
                         (unsigned long long)(fb->ram_pfn + i));
        }
    fb->canary_errors += bad;
    return bad;
}

/* ---- Inflate / deflate ---------------------------------------------------------------------- */

static struct fb_snapshot *snap_slot(struct fake_balloon *fb, enum fb_role role,
                                     const struct fake_vq *d, uint16_t head)
{
    if (fb->snap_size[role] != d->size) {
        for (unsigned i = 0; i < fb->snap_size[role]; i++) {
            free(fb->snap[role][i].pfns);
            free(fb->snap[role][i].raw);
        }
        free(fb->snap[role]);
        fb->snap[role] = calloc(d->size, sizeof(struct fb_snapshot));
        if (!fb->snap[role])
            abort();
        fb->snap_size[role] = d->size;
    }
    return &fb->snap[role][head];
}

int64_t fake_balloon_check_chunks(const struct fake_balloon *fb, const void *raw, size_t len,
                                  char *why, size_t why_size)
{
    if (len == 0 || len % sizeof(struct balloon_chunk)) {
        snprintf(why, why_size, "%zu bytes is not a non-empty array of 16-byte chunks", len);
        return -1;
    }
    size_t n = len / sizeof(struct balloon_chunk);
    if (n > BALLOON_MAX_CHUNKS) {
        snprintf(why, why_size, "%zu chunks in one buffer (at most %u)", n, BALLOON_MAX_CHUNKS);
        return -1;
    }
    const uint8_t *p = raw;
    uint64_t prev_end = 0, pages = 0;
    uint64_t ram_start = fb->ram_pfn << PAGE_SHIFT, ram_end = ram_start + (fb->ram_pages << 12);
    for (size_t i = 0; i < n; i++) {
        struct balloon_chunk ch;
        memcpy(&ch, p + i * sizeof(ch), sizeof(ch));
        const char *rule = NULL;
        if (ch.len == 0 || (ch.addr | ch.len) & (PAGE_SIZE - 1))
            rule = "is empty or not 4 KiB-aligned";
        else if (ch.addr + ch.len < ch.addr)
            rule = "wraps around";
        else if (ch.addr < prev_end)
            rule = "overlaps or precedes the previous chunk";
        else if (ch.addr < ram_start || ch.addr + ch.len > ram_end)
            rule = "is not inside guest RAM";
        if (rule) {
            snprintf(why, why_size, "chunk %zu of %zu (addr 0x%llx, len 0x%llx) %s", i, n,
                     (unsigned long long)ch.addr, (unsigned long long)ch.len, rule);
            return -1;
        }
        prev_end = ch.addr + ch.len;
        pages += ch.len >> PAGE_SHIFT;
    }
    return (int64_t)pages;
}

/* Chunked: check the array and expand it into the pages it names (s->pfns). */
static void expand_chunks(struct fake_balloon *fb, enum fb_role role, uint16_t head,
                          struct fb_snapshot *s)
{
    char why[160];
    int64_t pages = fake_balloon_check_chunks(fb, s->raw, s->raw_len, why, sizeof(why));
    if (pages < 0) {
        fb_error(fb, "%s buffer %u: %s", role_name(role), head, why);
        pages = 0;
    }
    s->nchunks = pages ? (unsigned)(s->raw_len / sizeof(struct balloon_chunk)) : 0;
    s->n = (unsigned)pages;
    s->pfns = malloc((s->n ? s->n : 1) * sizeof(uint32_t));
    if (!s->pfns)
        abort();
    unsigned k = 0;
    for (unsigned i = 0; i < s->nchunks; i++) {
        struct balloon_chunk ch;
        memcpy(&ch, s->raw + i * sizeof(ch), sizeof(ch));
        for (uint64_t a = ch.addr; a < ch.addr + ch.len; a += PAGE_SIZE)
            s->pfns[k++] = (uint32_t)(a >> PAGE_SHIFT);
    }
    fb->chunk_buffers++;
    if (s->nchunks > fb->max_chunks)
        fb->max_chunks = s->nchunks;
}

/* Copy the PFN (or chunk) array of a just-popped chain: what the device read at that moment. */
static void take_snapshot(struct fake_balloon *fb, enum fb_role role, struct fake_vq *d,
                          const struct fake_chain *c)
{
    struct fb_snapshot *s = snap_slot(fb, role, d, c->head);
    free(s->pfns);
    free(s->raw);
    memset(s, 0, sizeof(*s));
    bool chunked = fake_transport_negotiated(fb->ft, VIRTIO_BALLOON_F_X_CHUNKS);
    if (c->in_bytes)
        fb_error(fb, "%s buffer %u has %llu device-writable bytes (must be read-only)",
                 role_name(role), c->head, (unsigned long long)c->in_bytes);
    s->raw_len = (size_t)c->out_bytes;
    s->raw = malloc(s->raw_len ? s->raw_len : 1);
    if (!s->raw)
        abort();
    fake_chain_read(c, s->raw, s->raw_len);
    if (chunked && c->in_bytes) {
        s->pfns = malloc(1); /* rejected whole, as the reference host does: no pages */
        if (!s->pfns)
            abort();
    } else if (chunked) {
        expand_chunks(fb, role, c->head, s);
    } else {
        if (c->out_bytes == 0 || c->out_bytes % 4)
            fb_error(fb, "%s buffer %u is %llu bytes: not a non-empty array of le32 PFNs",
                     role_name(role), c->head, (unsigned long long)c->out_bytes);
        s->n = (unsigned)(c->out_bytes / 4);
        s->pfns = malloc((s->n ? s->n : 1) * sizeof(uint32_t));
        if (!s->pfns)
            abort();
        memcpy(s->pfns, s->raw, (size_t)s->n * 4);
    }
    s->valid = true;
    /* The device owns inflated pages from the moment it has read their PFNs (QEMU discards
     * them right away), so the canary goes in now: a driver that writes a page between handing
     * it over and the acknowledgement is caught too. */
    if (role == FB_INFLATE)
        for (unsigned i = 0; i < s->n; i++)
            if (in_ram(fb, s->pfns[i]) && !fb->ballooned[s->pfns[i] - fb->ram_pfn])
                canary_fill(s->pfns[i]);
}

static void log_buffer(struct fake_balloon *fb, enum fb_role role, unsigned n, uint32_t *pfns,
                       unsigned nchunks)
{
    if (fb->nlog == fb->caplog) {
        fb->caplog = fb->caplog ? 2 * fb->caplog : 64;
        fb->log = realloc(fb->log, fb->caplog * sizeof(*fb->log));
        if (!fb->log)
            abort();
    }
    fb->log[fb->nlog++] = (struct fb_buffer){role, n, pfns, nchunks};
    if (n > fb->max_pfns)
        fb->max_pfns = n;
}

/* The device acts on a buffer: pages go into or come out of the balloon. */
static void process(struct fake_balloon *fb, enum fb_role role, struct fake_vq *d,
                    const struct fake_chain *c)
{
    struct fb_snapshot *s = snap_slot(fb, role, d, c->head);
    if (!s->valid) {
        fb_error(fb, "%s buffer %u completed without being popped", role_name(role), c->head);
        return;
    }
    /* The driver must leave the array alone while the device holds the buffer. */
    uint8_t *now = malloc(s->raw_len ? s->raw_len : 1);
    if (!now)
        abort();
    fake_chain_read(c, now, s->raw_len);
    if (memcmp(now, s->raw, s->raw_len))
        fb_error(fb, "%s buffer %u: %s array changed while the device held it", role_name(role),
                 c->head, s->nchunks ? "chunk" : "PFN");
    free(now);

    for (unsigned i = 0; i < s->n; i++) {
        uint64_t pfn = s->pfns[i];
        if (!in_ram(fb, pfn)) {
            fb_error(fb, "%s: PFN 0x%llx is outside the guest's RAM", role_name(role),
                     (unsigned long long)pfn);
            continue;
        }
        uint8_t *bit = &fb->ballooned[pfn - fb->ram_pfn];
        if (role == FB_INFLATE) {
            if (*bit) {
                fb_error(fb, "inflate: PFN 0x%llx is already in the balloon",
                         (unsigned long long)pfn);
                continue;
            }
            *bit = 1; /* the canary went in when the buffer was popped */
            fb->balloon_pages++;
        } else {
            if (!*bit) {
                fb_error(fb, "deflate: PFN 0x%llx is not in the balloon", (unsigned long long)pfn);
                continue;
            }
            if (!canary_intact(pfn)) {
                fb->canary_errors++;
                fb_error(fb, "deflate: ballooned page 0x%llx was written by the guest",
                         (unsigned long long)pfn);
            }
            *bit = 0;
            fb->balloon_pages--;
            if (fb->zero_on_deflate)
                memset(phys_to_virt(pfn << PAGE_SHIFT), 0, PAGE_SIZE);
        }
    }
    if (role == FB_INFLATE)
        fb->inflated_pages += s->n;
    else
        fb->deflated_pages += s->n;
    log_buffer(fb, role, s->n, s->pfns, s->nchunks); /* the log takes the array */
    s->pfns = NULL;
    free(s->raw);
    s->raw = NULL;
    s->valid = false;
}

/* ---- Free page reporting ------------------------------------------------------------------- */

/* Is any page of [pfn, pfn + n) free in the driver's allocator (when the model knows it)? */
static bool any_free_in_driver(const struct fake_balloon *fb, uint64_t pfn, uint64_t n)
{
    for (uint64_t p = pfn; fb->mm && p < pfn + n; p++)
        if (buddy_is_free(fb->mm, p))
            return true;
    return false;
}

/* A report chain was popped: check each block (QEMU's rules plus the driver's promises), then
 * take the pages: mark them held and put the canary in. */
static void take_report(struct fake_balloon *fb, const struct fake_chain *c)
{
    if (c->out_bytes)
        fb_error(fb, "reporting_vq chain %u has %llu device-readable bytes (must be writable only)",
                 c->head, (unsigned long long)c->out_bytes);
    for (unsigned i = 0; i < c->nsegs; i++) {
        const struct fake_seg *sg = &c->segs[i];
        uint64_t pfn = sg->addr >> PAGE_SHIFT, n = sg->len >> PAGE_SHIFT;
        const char *rule = NULL;
        if (!sg->write)
            rule = "is not device-writable";
        else if (sg->len == 0 || ((sg->addr | sg->len) & (PAGE_SIZE - 1)))
            rule = "is empty or not 4 KiB-aligned";
        else if (!in_ram(fb, pfn) || !in_ram(fb, pfn + n - 1))
            rule = "is not inside guest RAM";
        for (uint64_t p = pfn; !rule && p < pfn + n; p++) {
            if (fb->ballooned[p - fb->ram_pfn])
                rule = "holds a page that is in the balloon";
            else if (fb->reporting[p - fb->ram_pfn])
                rule = "overlaps a block the device already holds for a report";
        }
        if (!rule && any_free_in_driver(fb, pfn, n))
            rule = "is free in the driver's allocator (not held out while reported)";
        if (rule) {
            fb_error(fb, "reporting_vq chain %u block %u (addr 0x%llx, len 0x%x) %s", c->head, i,
                     (unsigned long long)sg->addr, sg->len, rule);
            continue;
        }
        for (uint64_t p = pfn; p < pfn + n; p++) {
            fb->reporting[p - fb->ram_pfn] = 1;
            canary_fill(p);
        }
        fb->report_pages_held += n;
    }
}

static void log_report_block(struct fake_balloon *fb, uint64_t addr, uint64_t len)
{
    if (fb->nreports == fb->capreports) {
        fb->capreports = fb->capreports ? 2 * fb->capreports : 256;
        fb->reports = realloc(fb->reports, fb->capreports * sizeof(*fb->reports));
        if (!fb->reports)
            abort();
    }
    fb->reports[fb->nreports++] = (struct fb_report_block){addr, len, fb->report_chains};
}

/* The device acts on a report chain: the canary must be intact and the pages still held out of
 * the driver's allocator; then they are discarded. */
static void discard_report(struct fake_balloon *fb, const struct fake_chain *c)
{
    for (unsigned i = 0; i < c->nsegs; i++) {
        const struct fake_seg *sg = &c->segs[i];
        uint64_t pfn = sg->addr >> PAGE_SHIFT, n = sg->len >> PAGE_SHIFT;
        if (!in_ram(fb, pfn) || !n || !fb->reporting[pfn - fb->ram_pfn])
            continue; /* rejected when popped */
        for (uint64_t p = pfn; p < pfn + n; p++) {
            if (!canary_intact(p)) {
                fb->canary_errors++;
                fb_error(fb, "reporting_vq: page 0x%llx was written while the device held it",
                         (unsigned long long)p);
            }
            fb->reporting[p - fb->ram_pfn] = 0;
            if (fb->discard_reports)
                memset(phys_to_virt(p << PAGE_SHIFT), 0, PAGE_SIZE);
        }
        if (any_free_in_driver(fb, pfn, n))
            fb_error(fb,
                     "reporting_vq: block 0x%llx went back to the allocator before the device "
                     "used its chain",
                     (unsigned long long)sg->addr);
        fb->report_pages_held -= n;
        fb->reported_pages += n;
        log_report_block(fb, sg->addr, sg->len);
    }
    if (c->nsegs > fb->max_report_blocks)
        fb->max_report_blocks = c->nsegs;
    fb->indirect_report_chains += c->indirect;
    fb->report_chains++;
}

/* Write the one-shot broken entry for pending[0]; true if the buffer was completed anyway. */
static bool misbehave(struct fake_balloon *fb, enum fb_role role, struct fake_vq *d)
{
    enum fb_misbehave m = fb->misbehave[role];
    fb->misbehave[role] = FB_OK;
    switch (m) {
    case FB_BAD_ID_RANGE:
        fake_vq_push_raw(d, (uint32_t)d->size + 3, 0);
        return false;
    case FB_BAD_ID_FREE: {
        unsigned id = 0;
        while (id < d->size && d->owned[id])
            id++;
        if (id == d->size)
            abort(); /* every descriptor in flight: the test set this up wrongly */
        fake_vq_push_raw(d, id, 0);
        return false;
    }
    case FB_IDX_JUMP:
        fake_vq_set_used_idx_raw(d, (uint16_t)(d->used_idx + d->size + 1));
        return false;
    case FB_LEN_TOO_LARGE: {
        uint32_t len = (uint32_t)d->pending[0].out_bytes;
        if (role == FB_REPORT) {
            len = (uint32_t)d->pending[0].in_bytes + 1;
            discard_report(fb, &d->pending[0]);
        } else if (role == FB_INFLATE || role == FB_DEFLATE) {
            process(fb, role, d, &d->pending[0]);
        }
        fake_vq_complete(d, 0, len ? len : 1);
        return true;
    }
    case FB_OK:
        break;
    }
    abort();
}

unsigned fake_balloon_answer(struct fake_balloon *fb, enum fb_role role, unsigned max)
{
    struct fake_vq *d = role_vq(fb, role);
    unsigned done = 0;
    if (!d || role == FB_STATS || role == FB_HINT || fb->broken)
        return 0;
    while (done < max && d->npending) {
        if (fb->misbehave[role] != FB_OK) {
            if (!misbehave(fb, role, d))
                return done;
        } else {
            /* The device wrote nothing: QEMU >= 7.0 says 0, older QEMU the bytes it read. */
            uint32_t len = fb->used_len_bytes_read && role != FB_REPORT
                               ? (uint32_t)d->pending[0].out_bytes
                               : 0;
            if (role == FB_REPORT)
                discard_report(fb, &d->pending[0]);
            else
                process(fb, role, d, &d->pending[0]);
            fake_vq_complete(d, 0, len);
        }
        done++;
    }
    return done;
}

unsigned fake_balloon_held(struct fake_balloon *fb, enum fb_role role)
{
    struct fake_vq *d = role_vq(fb, role);
    return d ? d->npending : 0;
}

/* ---- Stats ---------------------------------------------------------------------------------- */

static void take_stats(struct fake_balloon *fb, const struct fake_chain *c)
{
    if (fb->stats_held)
        fb_error(fb, "statsq: a second buffer arrived while the device holds one (at most one "
                     "may be available)");
    if (c->in_bytes)
        fb_error(fb, "statsq: buffer has %llu device-writable bytes",
                 (unsigned long long)c->in_bytes);
    if (c->out_bytes == 0 || c->out_bytes % STATS_ENTRY)
        fb_error(fb, "statsq: buffer of %llu bytes is not a multiple of 10-byte entries",
                 (unsigned long long)c->out_bytes);
    uint8_t raw[FB_MAX_STATS * STATS_ENTRY];
    size_t len = fake_chain_read(c, raw, sizeof(raw));
    uint16_t old_tag[FB_MAX_STATS];
    unsigned old_n = fb->n_stats;
    memcpy(old_tag, fb->stat_tag, sizeof(old_tag));
    fb->n_stats = 0;
    for (size_t off = 0; off + STATS_ENTRY <= len; off += STATS_ENTRY) {
        uint16_t tag = (uint16_t)(raw[off] | raw[off + 1] << 8);
        uint64_t val = 0;
        for (unsigned k = 0; k < 8; k++)
            val |= (uint64_t)raw[off + 2 + k] << (8 * k);
        fb->stat_tag[fb->n_stats] = tag;
        fb->stat_val[fb->n_stats] = val;
        fb->n_stats++;
    }
    /* The same subset of tags every time (spec 5.5.6.3.1), in any order. */
    if (fb->stats_buffers) {
        bool same = old_n == fb->n_stats;
        for (unsigned i = 0; same && i < old_n; i++) {
            bool found = false;
            for (unsigned j = 0; j < fb->n_stats && !found; j++)
                found = fb->stat_tag[j] == old_tag[i];
            same = found;
        }
        if (!same)
            fb_error(fb, "statsq: the set of tags changed between buffers");
    }
    fb->stats_buffers++;
    fb->stats_held = true;
}

bool fake_balloon_stat(const struct fake_balloon *fb, uint16_t tag, uint64_t *val)
{
    for (unsigned i = fb->n_stats; i-- > 0;)
        if (fb->stat_tag[i] == tag) {
            if (val)
                *val = fb->stat_val[i];
            return true;
        }
    return false;
}

bool fake_balloon_request_stats(struct fake_balloon *fb)
{
    struct fake_vq *d = role_vq(fb, FB_STATS);
    if (!d || !d->npending || fb->broken)
        return false;
    fb->stats_requests++;
    if (fb->misbehave[FB_STATS] != FB_OK) {
        if (misbehave(fb, FB_STATS, d))
            fb->stats_held = d->npending > 0;
        return true;
    }
    fake_vq_complete(d, 0, fb->used_len_bytes_read ? (uint32_t)d->pending[0].out_bytes : 0);
    fb->stats_held = d->npending > 0;
    return true;
}

/* ---- Free page hinting ---------------------------------------------------------------------- */

static uint32_t set_hint_cmd(struct fake_balloon *fb, enum fb_hint_status status, uint32_t id)
{
    fb->hint_status = status;
    fake_transport_config_set(fb->ft, BALLOON_CFG_HINT_CMD, 4, id);
    return id;
}

uint32_t fake_balloon_hint_request(struct fake_balloon *fb)
{
    fb->hint_cmd_id = fb->hint_cmd_id < 0x80000001u ? 0x80000001u : fb->hint_cmd_id + 1;
    return set_hint_cmd(fb, FB_HINT_REQUESTED, fb->hint_cmd_id);
}

uint32_t fake_balloon_hint_stop(struct fake_balloon *fb)
{
    return set_hint_cmd(fb, FB_HINT_STOP, BALLOON_HINT_CMD_STOP);
}

uint32_t fake_balloon_hint_done(struct fake_balloon *fb)
{
    memset(fb->hinted, 0, fb->ram_pages ? fb->ram_pages : 1);
    return set_hint_cmd(fb, FB_HINT_DONE, BALLOON_HINT_CMD_DONE);
}

bool fake_balloon_is_hinted(const struct fake_balloon *fb, uint64_t pfn)
{
    return in_ram(fb, pfn) && fb->hinted[pfn - fb->ram_pfn];
}

/* One free_page_vq element: a 4-byte command id (out) or hinted blocks (in), never both. */
static void take_hint(struct fake_balloon *fb, const struct fake_chain *c)
{
    fb->hint_buffers++;
    if (c->out_bytes && c->in_bytes) {
        fb_error(fb, "free_page_vq: buffer %u mixes an id and hints", c->head);
        return;
    }
    if (c->out_bytes) {
        uint32_t id = 0;
        if (c->out_bytes != 4)
            fb_error(fb, "free_page_vq: command id buffer of %llu bytes (must be 4)",
                     (unsigned long long)c->out_bytes);
        fake_chain_read(c, &id, 4);
        if (id == BALLOON_HINT_CMD_STOP)
            fb->hint_stops++; /* the driver ends every round it started with one */
        if (fb->hint_status == FB_HINT_REQUESTED && id == fb->hint_cmd_id) {
            fb->hint_status = FB_HINT_START;
            fb->hint_starts++;
        } else if (fb->hint_status == FB_HINT_START && id == BALLOON_HINT_CMD_STOP) {
            fb->hint_status = FB_HINT_STOP;
        } else {
            fb->hint_stale_ids++; /* QEMU ignores ids that do not fit its state */
        }
        return;
    }
    for (unsigned i = 0; i < c->nsegs; i++) {
        const struct fake_seg *s = &c->segs[i];
        if (!s->write || (s->addr | s->len) & (PAGE_SIZE - 1) || !s->len ||
            !in_ram(fb, s->addr >> PAGE_SHIFT) ||
            !in_ram(fb, ((s->addr + s->len) >> PAGE_SHIFT) - 1)) {
            fb_error(fb, "free_page_vq: hint 0x%llx+0x%x is not a writable, aligned RAM block",
                     (unsigned long long)s->addr, s->len);
            continue;
        }
        if (fb->hint_status != FB_HINT_START)
            continue; /* QEMU only acts on hints while a round runs */
        for (uint64_t pfn = s->addr >> PAGE_SHIFT; pfn < (s->addr + s->len) >> PAGE_SHIFT; pfn++) {
            if (fb->ballooned[pfn - fb->ram_pfn] || fb->hinted[pfn - fb->ram_pfn]) {
                fb_error(fb, "free_page_vq: page 0x%llx hinted while %s", (unsigned long long)pfn,
                         fb->ballooned[pfn - fb->ram_pfn] ? "in the balloon" : "already hinted");
                break;
            }
            fb->hinted[pfn - fb->ram_pfn] = 1;
            fb->hinted_pages++;
        }
    }
}

/* ---- Transport hooks ------------------------------------------------------------------------ */

unsigned fake_balloon_pop(struct fake_balloon *fb, enum fb_role role)
{
    struct fake_vq *d = role_vq(fb, role);
    unsigned n = 0;
    if (!d || fb->broken)
        return 0;
    int rc;
    while ((rc = fake_vq_pop(d)) == 1) {
        const struct fake_chain *c = &d->pending[d->npending - 1];
        if (role == FB_STATS)
            take_stats(fb, c);
        else if (role == FB_HINT)
            take_hint(fb, c);
        else if (role == FB_REPORT)
            take_report(fb, c);
        else
            take_snapshot(fb, role, d, c);
        n++;
    }
    if (rc < 0) {
        fb_error(fb, "%s: the ring was malformed (%s)", role_name(role), d->error);
        fake_balloon_break(fb); /* what QEMU's virtio_error does */
    }
    return n;
}

void fake_balloon_break(struct fake_balloon *fb)
{
    fb->broken = true;
    fb->breaks++;
    if (fake_transport_negotiated(fb->ft, VIRTIO_F_VERSION_1))
        fake_transport_needs_reset(fb->ft); /* QEMU sets the bit for VERSION_1 devices only */
}

/* A reset: the device forgets the balloon (QEMU keeps no list of ballooned pages; `actual`
 * starts again from what the driver writes), every buffer it held, and that it was broken. */
static void on_reset(struct fake_transport *ft, void *arg)
{
    struct fake_balloon *fb = arg;
    (void)ft;
    fb->broken = false;
    fb->resets++;
    fb->forgotten_pages += fb->balloon_pages;
    memset(fb->ballooned, 0, fb->ram_pages ? fb->ram_pages : 1);
    memset(fb->reporting, 0, fb->ram_pages ? fb->ram_pages : 1);
    fb->balloon_pages = 0;
    fb->report_pages_held = 0;
    fb->stats_held = false;
    for (unsigned r = 0; r < 2; r++)
        for (unsigned i = 0; i < fb->snap_size[r]; i++) {
            free(fb->snap[r][i].pfns);
            free(fb->snap[r][i].raw);
            memset(&fb->snap[r][i], 0, sizeof(fb->snap[r][i]));
        }
}

static void on_notify(struct fake_transport *ft, unsigned index, void *arg)
{
    struct fake_balloon *fb = arg;
    (void)ft;
    if (fb->broken)
        return; /* QEMU: a broken device pops nothing */
    int role = role_of(fb, index);
    if (role < 0) {
        fb_error(fb, "notify on queue %u, which the balloon driver does not use", index);
        return;
    }
    fake_balloon_pop(fb, (enum fb_role)role);
    if (role == FB_HINT) {
        struct fake_vq *d = role_vq(fb, FB_HINT);
        while (d->npending) /* QEMU's iothread uses every element at once, used len 0 */
            fake_vq_complete(d, 0, 0);
        return;
    }
    bool hold = role == FB_REPORT ? fb->hold_reports : role != FB_STATS && fb->hold[role];
    if (role != FB_STATS && !hold) {
        fake_balloon_answer(fb, (enum fb_role)role, ~0u);
    }
}

static void on_config_write(struct fake_transport *ft, unsigned off, unsigned width, uint32_t val,
                            void *arg)
{
    struct fake_balloon *fb = arg;
    if (off == BALLOON_CFG_ACTUAL) {
        fb->actual_writes++;
        if (width != 4) /* spec 5.5.6.2.1: one 4-byte access */
            fb_error(fb, "actual written with a %u-byte access", width);
        return;
    }
    if (off == BALLOON_CFG_POISON && fake_transport_negotiated(ft, VIRTIO_BALLOON_F_PAGE_POISON)) {
        /* Spec 5.5.6.6: written before DRIVER_OK, never changed while DRIVER_OK. */
        if (width != 4 || (ft->status & VIRTIO_STATUS_DRIVER_OK))
            fb_error(fb, "poison_val written %s",
                     width != 4 ? "with a partial access" : "after DRIVER_OK");
        fb->poison_val = val;
        fb->poison_val_writes++;
        return;
    }
    fb_error(fb, "driver wrote config offset %u (width %u), which it must not", off, width);
}

/* ---- Setup ---------------------------------------------------------------------------------- */

void fake_balloon_init(struct fake_balloon *fb, struct fake_transport *ft, uint64_t ram_base_phys,
                       uint64_t ram_bytes, uint16_t queue_size)
{
    memset(fb, 0, sizeof(*fb));
    fb->ft = ft;
    fb->ram_pfn = ram_base_phys >> PAGE_SHIFT;
    fb->ram_pages = ram_bytes >> PAGE_SHIFT;
    fb->ballooned = calloc(fb->ram_pages ? fb->ram_pages : 1, 1);
    fb->reporting = calloc(fb->ram_pages ? fb->ram_pages : 1, 1);
    if (!fb->ballooned || !fb->reporting)
        abort();
    fb->zero_on_deflate = true;
    fb->discard_reports = true;

    uint64_t f = ft->device_features;
    if (ft->t.legacy)
        f &= 0xffffffffULL;
    unsigned next = 0;
    fb->qidx[FB_INFLATE] = next++;
    fb->qidx[FB_DEFLATE] = next++;
    fb->qidx[FB_STATS] = FB_NO_QUEUE;
    fb->qidx[FB_HINT] = FB_NO_QUEUE;
    fb->hinted = calloc(fb->ram_pages ? fb->ram_pages : 1, 1);
    if (!fb->hinted)
        abort();
    fb->qidx[FB_REPORT] = FB_NO_QUEUE;
    fake_transport_add_queue(ft, fb->qidx[FB_INFLATE], queue_size);
    fake_transport_add_queue(ft, fb->qidx[FB_DEFLATE], queue_size);
    if (f & (1ULL << VIRTIO_BALLOON_F_STATS_VQ)) {
        fb->qidx[FB_STATS] = next;
        fake_transport_add_queue(ft, next++, queue_size);
    }
    if (f & (1ULL << VIRTIO_BALLOON_F_FREE_PAGE_HINT)) {
        fb->qidx[FB_HINT] = next;
        fake_transport_add_queue(ft, next++, 1024);
    }
    if (f & (1ULL << VIRTIO_BALLOON_F_PAGE_REPORTING)) {
        fb->qidx[FB_REPORT] = next;
        fake_transport_add_queue(ft, next++, 32);
    }

    ft->hook_arg = fb;
    ft->on_notify = on_notify;
    ft->on_config_write = on_config_write;
    ft->on_reset = on_reset;
}

void fake_balloon_number_fixed(struct fake_balloon *fb, bool placeholder)
{
    struct fake_transport *ft = fb->ft;
    uint64_t f = ft->device_features;
    for (unsigned i = 2; i < FT_MAX_QUEUES; i++)
        fake_transport_add_queue(ft, i, 0);
    fb->qidx[FB_STATS] = fb->qidx[FB_HINT] = fb->qidx[FB_REPORT] = FB_NO_QUEUE;
    uint16_t qsize = ft->q[0].max_size;
    if (f & (1ULL << VIRTIO_BALLOON_F_STATS_VQ)) {
        fb->qidx[FB_STATS] = 2;
        fake_transport_add_queue(ft, 2, qsize);
    }
    if (f & (1ULL << VIRTIO_BALLOON_F_FREE_PAGE_HINT)) {
        fb->qidx[FB_HINT] = 3;
        fake_transport_add_queue(ft, 3, 1024);
    } else if (placeholder) {
        fake_transport_add_queue(ft, 3, 128); /* no role: a notify there is a driver error */
    }
    if (f & (1ULL << VIRTIO_BALLOON_F_PAGE_REPORTING)) {
        fb->qidx[FB_REPORT] = 4;
        fake_transport_add_queue(ft, 4, 32);
    }
}

void fake_balloon_fini(struct fake_balloon *fb)
{
    for (unsigned i = 0; i < fb->nlog; i++)
        free(fb->log[i].pfns);
    free(fb->log);
    for (unsigned r = 0; r < 2; r++) {
        for (unsigned i = 0; i < fb->snap_size[r]; i++) {
            free(fb->snap[r][i].pfns);
            free(fb->snap[r][i].raw);
        }
        free(fb->snap[r]);
    }
    free(fb->ballooned);
    free(fb->hinted);
    free(fb->reporting);
    free(fb->reports);
    if (fb->ft && fb->ft->hook_arg == fb) {
        fb->ft->on_notify = NULL;
        fb->ft->on_config_write = NULL;
        fb->ft->on_reset = NULL;
        fb->ft->hook_arg = NULL;
    }
    memset(fb, 0, sizeof(*fb));
}

void fake_balloon_set_target(struct fake_balloon *fb, uint32_t pages)
{
    fake_transport_config_set(fb->ft, BALLOON_CFG_NUM_PAGES, 4, pages);
}

uint32_t fake_balloon_actual(const struct fake_balloon *fb)
{
    return fake_transport_config_get(fb->ft, BALLOON_CFG_ACTUAL, 4);
}
