/*
 * replay.c - catch-up reads (see replay.h): the WAL, and below its first
 * offset the cold tier in MySQL.
 */
#include "replay.h"

#include <event2/event.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "sync.h"

#define COLD_BATCH    1000u /* rows per cold-tier read */
#define COLD_RETRY_MS 500u  /* after a failed cold read (MySQL down) */

struct rpl {
    wal_t *wal;
    sync_cold_t *cold;
    struct event_base *base;
    rpl_stats_t st;
};

struct rpl_sub {
    rpl_t *r;
    void (*wake)(void *arg);
    void *arg;
    sync_cold_req_t *pending; /* a cold read under way */
    struct event *retry;      /* after a failed cold read */
    bool retry_armed;
    /* rows of the last cold read, for offsets [buf_from, buf_to] */
    sync_cold_row_t *rows;
    uint8_t *blob;
    size_t n_rows, pos;
    uint64_t buf_from, buf_to;
    bool buf_short; /* fewer rows than asked: MySQL has nothing after the last up to buf_to */
    uint32_t asked; /* rows asked of the cold read */
    bool have_buf;
};

int rpl_new(wal_t *wal, rpl_t **ret)
{
    rpl_t *r = calloc(1, sizeof(*r));
    if (!r)
        return -1;
    r->wal = wal;
    *ret = r;
    return 0;
}

void rpl_free(rpl_t *r)
{
    free(r);
}

void rpl_set_cold(rpl_t *r, struct sync_cold *cold, struct event_base *base)
{
    r->cold = cold;
    r->base = base;
}

static void buf_clear(rpl_sub_t *s)
{
    free(s->rows);
    free(s->blob);
    s->rows = NULL;
    s->blob = NULL;
    s->n_rows = s->pos = 0;
    s->have_buf = false;
}

static void retry_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rpl_sub_t *s = arg;
    s->retry_armed = false;
    s->wake(s->arg);
}

rpl_sub_t *rpl_sub_new(rpl_t *r, void (*wake)(void *arg), void *arg)
{
    rpl_sub_t *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->r = r;
    s->wake = wake;
    s->arg = arg;
    return s;
}

void rpl_sub_free(rpl_sub_t *s)
{
    if (!s)
        return;
    sync_cold_cancel(s->pending);
    if (s->retry)
        event_free(s->retry);
    buf_clear(s);
    free(s);
}

static void cold_done(sync_cold_req_t *req, int status, const sync_cold_row_t *rows, size_t n,
                      void *arg)
{
    (void)req;
    rpl_sub_t *s = arg;
    rpl_t *r = s->r;
    s->pending = NULL;
    if (status != 0) {
        /* MySQL unreachable: never a silent skip; try again shortly. */
        r->st.cold_errors++;
        if (!s->retry)
            s->retry = evtimer_new(r->base, retry_cb, s);
        if (s->retry) {
            struct timeval tv = {0, COLD_RETRY_MS * 1000};
            evtimer_add(s->retry, &tv);
            s->retry_armed = true;
        }
        return;
    }
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++)
        bytes += rows[i].headers_len + rows[i].payload_len;
    s->rows = calloc(n ? n : 1, sizeof(*s->rows));
    s->blob = malloc(bytes ? bytes : 1);
    if (!s->rows || !s->blob) {
        buf_clear(s);
        r->st.cold_errors++;
        s->wake(s->arg); /* the next read asks again */
        return;
    }
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        s->rows[i] = rows[i];
        memcpy(s->blob + off, rows[i].headers, rows[i].headers_len);
        s->rows[i].headers = s->blob + off;
        off += rows[i].headers_len;
        memcpy(s->blob + off, rows[i].payload, rows[i].payload_len);
        s->rows[i].payload = s->blob + off;
        off += rows[i].payload_len;
    }
    s->n_rows = n;
    s->pos = 0;
    s->buf_short = n < s->asked;
    s->have_buf = true;
    r->st.cold_records += n;
    s->wake(s->arg);
}

/* Serve `from` out of the cold rows held; RPL_PENDING if they do not cover
 * it (the caller then reads the WAL). */
static enum rpl_status serve_cold(rpl_sub_t *s, const char *stream, size_t stream_len,
                                  uint64_t from, uint32_t max_msgs, uint64_t max_bytes,
                                  wal_record_cb cb, void *arg, rpl_result_t *res)
{
    /* skip rows below `from` (the subscriber moved on) */
    while (s->pos < s->n_rows && s->rows[s->pos].offset < from)
        s->pos++;
    if (from < s->buf_from || from > s->buf_to) {
        buf_clear(s);
        return RPL_PENDING;
    }
    if (s->pos < s->n_rows && s->rows[s->pos].offset > from) {
        /* MySQL lacks [from, that row) */
        res->gap_from = from;
        res->gap_to = s->rows[s->pos].offset - 1;
        res->next = s->rows[s->pos].offset;
        return RPL_GAP;
    }
    if (s->pos == s->n_rows) {
        bool short_read = s->buf_short;
        uint64_t to = s->buf_to;
        buf_clear(s);
        if (short_read) {
            /* nothing in MySQL from `from` up to what the WAL dropped */
            res->gap_from = from;
            res->gap_to = to;
            res->next = to + 1;
            return RPL_GAP;
        }
        return RPL_PENDING;
    }
    uint64_t bytes = 0;
    while (s->pos < s->n_rows && res->count < max_msgs && (res->count == 0 || bytes < max_bytes)) {
        const sync_cold_row_t *row = &s->rows[s->pos];
        if (row->offset != from + res->count)
            break; /* a hole: reported by the next call */
        wal_record_t rec = {.offset = row->offset,
                            .timestamp_us = row->ts_us,
                            .stream = stream,
                            .stream_len = stream_len,
                            .headers = row->headers,
                            .headers_len = row->headers_len,
                            .payload = row->payload,
                            .payload_len = row->payload_len};
        s->pos++;
        res->count++;
        bytes += row->payload_len;
        res->next = row->offset + 1;
        if (cb(&rec, arg))
            break;
    }
    s->r->st.records += res->count;
    s->r->st.bytes += bytes;
    return RPL_OK;
}

struct count_ctx {
    wal_record_cb cb;
    void *arg;
    uint64_t bytes;
};

static int count_cb(const wal_record_t *rec, void *arg)
{
    struct count_ctx *cc = arg;
    cc->bytes += rec->payload_len;
    return cc->cb(rec, cc->arg);
}

enum rpl_status rpl_read(rpl_t *r, rpl_sub_t *rs, const char *stream, size_t stream_len,
                         uint64_t from, uint32_t max_msgs, uint64_t max_bytes, wal_record_cb cb,
                         void *arg, rpl_result_t *res)
{
    memset(res, 0, sizeof(*res));
    res->next = from;
    r->st.reads++;
    bool cold = r->cold && rs;
    if (cold && (rs->pending || rs->retry_armed))
        return RPL_PENDING;
    if (cold && rs->have_buf) {
        enum rpl_status st =
            serve_cold(rs, stream, stream_len, from, max_msgs, max_bytes, cb, arg, res);
        if (st == RPL_GAP)
            r->st.gaps++;
        if (st != RPL_PENDING)
            return st;
        res->next = from;
    }
    struct count_ctx cc = {cb, arg, 0};
    wal_read_result_t wr = {.next = from};
    int rc =
        wal_stream_read(r->wal, stream, stream_len, from, max_msgs, max_bytes, count_cb, &cc, &wr);
    res->count = wr.count;
    r->st.records += wr.count;
    r->st.bytes += cc.bytes;
    switch (rc) {
    case 0:
        res->next = wr.next;
        return RPL_OK;
    case WAL_ETRUNCATED:
        if (cold) {
            /* [from, first) left the WAL for MySQL: read it there. */
            uint64_t to = wr.next - 1;
            uint32_t max = max_msgs < COLD_BATCH ? COLD_BATCH : max_msgs;
            rs->pending = sync_cold_read(r->cold, stream, stream_len, from, to, max, cold_done, rs);
            if (rs->pending) {
                rs->buf_from = from;
                rs->buf_to = to;
                rs->asked = max;
                r->st.cold_reads++;
                return RPL_PENDING;
            }
        }
        res->gap_from = from;
        res->gap_to = wr.next - 1;
        res->next = wr.next;
        r->st.gaps++;
        return RPL_GAP;
    case WAL_ENOTFOUND:
        return RPL_ENOSTREAM;
    default:
        res->wal_error = rc;
        res->bad_offset = wr.bad_offset;
        res->next = wr.count ? wr.next : from;
        r->st.errors++;
        return RPL_EREAD;
    }
}

void rpl_stats_get(const rpl_t *r, rpl_stats_t *ret)
{
    *ret = r->st;
}
