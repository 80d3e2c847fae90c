/*
 * tools.c - MySQL for arq-replay (see sync_tools.h). Binary values go into
 * SQL as hex literals (X'..'), as the drain writes them; results are read
 * with their lengths, never as C strings.
 */
#include "sync_tools.h"
#include "sync_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <mysql.h>
#include <mysqld_error.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct sync_db {
    MYSQL *m;
};

static int db_err(sync_db_t *d, char *err, size_t errlen)
{
    unsigned no = mysql_errno(d->m);
    sync_errf(err, errlen, "MySQL error %u: %s", no, mysql_error(d->m));
    /* client-side errors (2000..2999): the connection is gone */
    return no >= 2000 && no < 3000 ? SYNC_ECONNECT : SYNC_ESQL;
}

/* ---- SQL text ---------------------------------------------------------- */

static int run(sync_db_t *d, sync_sqlbuf_t *b, char *err, size_t errlen)
{
    if (b->oom) {
        sync_errf(err, errlen, "out of memory building a query");
        return SYNC_ENOMEM;
    }
    if (mysql_real_query(d->m, b->p, (unsigned long)b->len) != 0)
        return db_err(d, err, errlen);
    return 0;
}

/* Run a statement that returns no rows we need. */
static int exec(sync_db_t *d, sync_sqlbuf_t *b, char *err, size_t errlen)
{
    int rc = run(d, b, err, errlen);
    if (rc)
        return rc;
    MYSQL_RES *r = mysql_store_result(d->m);
    if (r)
        mysql_free_result(r);
    else if (mysql_field_count(d->m) != 0)
        return db_err(d, err, errlen);
    return 0;
}

static uint64_t u64_of(const char *s)
{
    return s ? strtoull(s, NULL, 10) : 0;
}

/* ---- connection -------------------------------------------------------- */

int sync_db_open(const sync_url_t *u, sync_db_t **ret, char *err, size_t errlen)
{
    sync_db_t *d = calloc(1, sizeof(*d));
    if (!d)
        return SYNC_ENOMEM;
    d->m = sync_mysql_connect(u, err, errlen);
    if (!d->m) {
        free(d);
        return SYNC_ECONNECT;
    }
    *ret = d;
    return 0;
}

void sync_db_close(sync_db_t *d)
{
    if (!d)
        return;
    mysql_close(d->m);
    free(d);
}

/* ---- reads ------------------------------------------------------------- */

int sync_db_watermark(sync_db_t *d, uint64_t *ret_seq, int64_t *ret_updated_us, char *err,
                      size_t errlen)
{
    if (mysql_query(d->m, "SELECT watermark_seq, updated_us FROM arq_sync_state WHERE id = 1"))
        return db_err(d, err, errlen);
    MYSQL_RES *r = mysql_store_result(d->m);
    if (!r)
        return db_err(d, err, errlen);
    MYSQL_ROW row = mysql_fetch_row(r);
    int rc = 0;
    if (!row || !row[0]) {
        sync_errf(err, errlen, "arq_sync_state has no watermark row (was the schema migrated?)");
        rc = SYNC_ESCHEMA;
    } else {
        *ret_seq = u64_of(row[0]);
        if (ret_updated_us)
            *ret_updated_us = row[1] ? strtoll(row[1], NULL, 10) : 0;
    }
    mysql_free_result(r);
    return rc;
}

static int streams_query(sync_db_t *d, const char *name, size_t name_len, sync_db_stream_cb cb,
                         void *arg, char *err, size_t errlen)
{
    sync_sqlbuf_t b = {0};
    sync_sb_adds(&b, "SELECT n.name, COALESCE(m.c, 0), COALESCE(m.lo, 0), COALESCE(m.hi, 0), "
                     "COALESCE(m.ms, 0), s.id, s.epoch, s.created_us FROM (SELECT name FROM "
                     "arq_streams");
    if (name) {
        sync_sb_adds(&b, " WHERE name = ");
        sync_sb_hex(&b, name, name_len);
    }
    sync_sb_adds(&b, " UNION SELECT DISTINCT stream FROM arq_messages");
    if (name) {
        sync_sb_adds(&b, " WHERE stream = ");
        sync_sb_hex(&b, name, name_len);
    }
    sync_sb_adds(&b,
                 ") n LEFT JOIN (SELECT stream, COUNT(*) c, MIN(`offset`) lo, MAX(`offset`) hi, "
                 "MAX(seq) ms FROM arq_messages");
    if (name) {
        sync_sb_adds(&b, " WHERE stream = ");
        sync_sb_hex(&b, name, name_len);
    }
    sync_sb_adds(&b, " GROUP BY stream) m ON m.stream = n.name LEFT JOIN arq_streams s ON s.name = "
                     "n.name ORDER BY n.name");
    int rc = run(d, &b, err, errlen);
    sync_sb_free(&b);
    if (rc)
        return rc;
    MYSQL_RES *r = mysql_use_result(d->m);
    if (!r)
        return db_err(d, err, errlen);
    MYSQL_ROW row;
    bool stop = false;
    while ((row = mysql_fetch_row(r))) {
        if (stop)
            continue; /* use_result: read to the end */
        unsigned long *len = mysql_fetch_lengths(r);
        sync_db_stream_t s = {
            .name = row[0],
            .name_len = len[0],
            .rows = u64_of(row[1]),
            .min_offset = u64_of(row[2]),
            .max_offset = u64_of(row[3]),
            .max_seq = u64_of(row[4]),
            .has_meta = row[5] != NULL,
            .id = (uint32_t)u64_of(row[5]),
            .epoch = u64_of(row[6]),
            .created_us = row[7] ? strtoll(row[7], NULL, 10) : 0,
        };
        if (cb(&s, arg))
            stop = true;
    }
    if (mysql_errno(d->m)) {
        rc = db_err(d, err, errlen);
    }
    mysql_free_result(r);
    return rc;
}

int sync_db_streams(sync_db_t *d, sync_db_stream_cb cb, void *arg, char *err, size_t errlen)
{
    return streams_query(d, NULL, 0, cb, arg, err, errlen);
}

struct one_stream {
    sync_db_stream_t *out;
    int found;
};

static int one_stream_cb(const sync_db_stream_t *s, void *arg)
{
    struct one_stream *o = arg;
    *o->out = *s;
    o->out->name = NULL; /* borrowed from the result: not valid after it */
    o->out->name_len = 0;
    o->found = 1;
    return 1;
}

int sync_db_stream_get(sync_db_t *d, const char *name, size_t name_len, sync_db_stream_t *ret,
                       char *err, size_t errlen)
{
    sync_db_stream_t s = {0};
    struct one_stream o = {&s, 0};
    int rc = streams_query(d, name, name_len, one_stream_cb, &o, err, errlen);
    if (rc)
        return rc;
    *ret = s;
    return 0;
}

int sync_db_rows(sync_db_t *d, const char *stream, size_t stream_len, uint64_t from, uint64_t to,
                 uint32_t max, sync_db_row_cb cb, void *arg, uint64_t *ret_count, char *err,
                 size_t errlen)
{
    uint64_t count = 0;
    if (ret_count)
        *ret_count = 0;
    if (from > to)
        return 0;
    sync_sqlbuf_t b = {0};
    sync_sb_adds(&b, "SELECT `offset`, seq, direction, producer, msgid, ts_us, headers, payload, "
                     "checksum FROM arq_messages WHERE stream = ");
    sync_sb_hex(&b, stream, stream_len);
    sync_sb_addf(&b, " AND `offset` BETWEEN %" PRIu64 " AND %" PRIu64 " ORDER BY `offset`", from,
                 to);
    if (max)
        sync_sb_addf(&b, " LIMIT %u", max);
    int rc = run(d, &b, err, errlen);
    sync_sb_free(&b);
    if (rc)
        return rc;
    MYSQL_RES *r = mysql_use_result(d->m);
    if (!r)
        return db_err(d, err, errlen);
    MYSQL_ROW row;
    bool stop = false;
    while ((row = mysql_fetch_row(r))) {
        if (stop)
            continue;
        unsigned long *len = mysql_fetch_lengths(r);
        sync_db_row_t x = {
            .offset = u64_of(row[0]),
            .seq = u64_of(row[1]),
            .direction = u64_of(row[2]) ? WAL_DIR_OUT : WAL_DIR_IN,
            .producer = (const uint8_t *)row[3],
            .producer_len = len[3],
            .msgid = (const uint8_t *)row[4],
            .msgid_len = len[4],
            .ts_us = row[5] ? strtoll(row[5], NULL, 10) : 0,
            .headers = (const uint8_t *)row[6],
            .headers_len = len[6],
            .payload = (const uint8_t *)row[7],
            .payload_len = len[7],
            .checksum = u64_of(row[8]),
        };
        count++;
        if (cb(&x, arg))
            stop = true;
    }
    if (mysql_errno(d->m))
        rc = db_err(d, err, errlen);
    mysql_free_result(r);
    if (ret_count)
        *ret_count = count;
    return rc;
}

static int single_u64(sync_db_t *d, sync_sqlbuf_t *b, uint64_t *ret, char *err, size_t errlen)
{
    int rc = run(d, b, err, errlen);
    if (rc)
        return rc;
    MYSQL_RES *r = mysql_store_result(d->m);
    if (!r)
        return db_err(d, err, errlen);
    MYSQL_ROW row = mysql_fetch_row(r);
    *ret = row ? u64_of(row[0]) : 0;
    mysql_free_result(r);
    return 0;
}

int sync_db_holes(sync_db_t *d, const char *stream, size_t stream_len, uint64_t from, uint64_t to,
                  sync_db_range_cb cb, void *arg, char *err, size_t errlen)
{
    if (from > to)
        return 0;
    sync_sqlbuf_t b = {0};
    sync_sb_adds(&b, "SELECT COUNT(*) FROM arq_messages WHERE stream = ");
    sync_sb_hex(&b, stream, stream_len);
    sync_sb_addf(&b, " AND `offset` BETWEEN %" PRIu64 " AND %" PRIu64, from, to);
    uint64_t n = 0;
    int rc = single_u64(d, &b, &n, err, errlen);
    sync_sb_free(&b);
    if (rc || n == to - from + 1)
        return rc;
    if (n == 0) {
        (void)cb(from, to, arg);
        return 0;
    }
    sync_sb_adds(&b, "SELECT `offset` FROM arq_messages WHERE stream = ");
    sync_sb_hex(&b, stream, stream_len);
    sync_sb_addf(&b, " AND `offset` BETWEEN %" PRIu64 " AND %" PRIu64 " ORDER BY `offset`", from,
                 to);
    rc = run(d, &b, err, errlen);
    sync_sb_free(&b);
    if (rc)
        return rc;
    MYSQL_RES *r = mysql_use_result(d->m);
    if (!r)
        return db_err(d, err, errlen);
    uint64_t expect = from;
    bool stop = false;
    MYSQL_ROW row;
    while ((row = mysql_fetch_row(r))) {
        uint64_t off = u64_of(row[0]);
        if (!stop && off > expect && cb(expect, off - 1, arg))
            stop = true;
        expect = off + 1;
    }
    if (mysql_errno(d->m))
        rc = db_err(d, err, errlen);
    mysql_free_result(r);
    if (!rc && !stop && expect <= to)
        (void)cb(expect, to, arg);
    return rc;
}

int sync_db_cursor_max(sync_db_t *d, sync_db_cursor_cb cb, void *arg, char *err, size_t errlen)
{
    if (mysql_query(d->m, "SELECT stream, MAX(`offset`) FROM arq_cursors GROUP BY stream"))
        return db_err(d, err, errlen);
    MYSQL_RES *r = mysql_store_result(d->m);
    if (!r)
        return db_err(d, err, errlen);
    MYSQL_ROW row;
    while ((row = mysql_fetch_row(r))) {
        unsigned long *len = mysql_fetch_lengths(r);
        if (cb(row[0], len[0], u64_of(row[1]), arg))
            break;
    }
    mysql_free_result(r);
    return 0;
}

#define SESSIONS_PER_PAGE 1000

int sync_db_sessions(sync_db_t *d, sync_db_session_cb cb, void *arg, char *err, size_t errlen)
{
    char last[256];
    size_t last_len = 0;
    for (bool first = true;; first = false) {
        sync_sqlbuf_t b = {0};
        sync_sb_adds(&b, "SELECT session, owner, secret, created_us, seen_us, updated_us FROM "
                         "arq_sessions");
        if (!first) {
            sync_sb_adds(&b, " WHERE session > ");
            sync_sb_hex(&b, last, last_len);
        }
        sync_sb_addf(&b, " ORDER BY session LIMIT %d", SESSIONS_PER_PAGE);
        int rc = run(d, &b, err, errlen);
        sync_sb_free(&b);
        if (rc == SYNC_ESQL && mysql_errno(d->m) == ER_NO_SUCH_TABLE) {
            sync_errf(err, errlen,
                      "arq_sessions is missing: the database was last migrated by an arqd "
                      "older than migration 0003");
            return SYNC_ESCHEMA;
        }
        if (rc)
            return rc;
        /* stored, not streamed: the callbacks may use the connection */
        MYSQL_RES *r = mysql_store_result(d->m);
        if (!r)
            return db_err(d, err, errlen);
        int n = 0;
        bool stop = false;
        MYSQL_ROW row;
        while (!stop && (row = mysql_fetch_row(r))) {
            unsigned long *len = mysql_fetch_lengths(r);
            n++;
            if (!len || len[0] > sizeof last || !row[3] || !row[4] || !row[5]) {
                mysql_free_result(r);
                sync_errf(err, errlen, "arq_sessions holds a row this build cannot read");
                return SYNC_ESQL;
            }
            memcpy(last, row[0], len[0]);
            last_len = len[0];
            sync_db_session_t x = {
                .session = row[0],
                .session_len = len[0],
                .owner = (const uint8_t *)row[1],
                .owner_len = len[1],
                .secret = (const uint8_t *)row[2],
                .secret_len = len[2],
                .created_us = strtoll(row[3], NULL, 10),
                .seen_us = strtoll(row[4], NULL, 10),
                .updated_us = strtoll(row[5], NULL, 10),
            };
            stop = cb(&x, arg) != 0;
        }
        mysql_free_result(r);
        if (stop || n < SESSIONS_PER_PAGE)
            return 0;
    }
}

int sync_db_session_cursors(sync_db_t *d, const void *session, size_t session_len, wal_cursor_cb cb,
                            void *arg, char *err, size_t errlen)
{
    sync_sqlbuf_t b = {0};
    sync_sb_adds(&b, "SELECT stream, `offset`, updated_us FROM arq_cursors WHERE session = ");
    sync_sb_hex(&b, session, session_len);
    sync_sb_adds(&b, " ORDER BY stream");
    int rc = run(d, &b, err, errlen);
    sync_sb_free(&b);
    if (rc)
        return rc;
    MYSQL_RES *r = mysql_use_result(d->m);
    if (!r)
        return db_err(d, err, errlen);
    MYSQL_ROW row;
    bool stop = false;
    while ((row = mysql_fetch_row(r))) {
        if (stop)
            continue; /* use_result: read to the end */
        unsigned long *len = mysql_fetch_lengths(r);
        if (cb(row[0], len[0], u64_of(row[1]), row[2] ? strtoll(row[2], NULL, 10) : 0, arg))
            stop = true;
    }
    if (mysql_errno(d->m))
        rc = db_err(d, err, errlen);
    mysql_free_result(r);
    return rc;
}

int sync_db_stream_put(sync_db_t *d, const char *name, size_t name_len, uint32_t id, uint64_t epoch,
                       int64_t created_us, char *err, size_t errlen)
{
    sync_sqlbuf_t b = {0};
    sync_sb_adds(&b, "INSERT INTO arq_streams (name, id, epoch, created_us) VALUES (");
    sync_sb_hex(&b, name, name_len);
    sync_sb_addf(&b,
                 ", %u, %" PRIu64 ", %" PRId64 ") ON DUPLICATE KEY UPDATE id = VALUES(id), "
                 "epoch = VALUES(epoch)",
                 id, epoch, created_us);
    int rc = exec(d, &b, err, errlen);
    sync_sb_free(&b);
    return rc;
}

/* ---- comparison -------------------------------------------------------- */

static bool bytes_eq(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
    return alen == blen && (alen == 0 || memcmp(a, b, alen) == 0);
}

unsigned sync_db_row_diff(const sync_db_row_t *row, const wal_record_t *rec)
{
    unsigned m = 0;
    if (row->seq != rec->seq)
        m |= SYNC_DIFF_SEQ;
    if (row->direction != rec->direction)
        m |= SYNC_DIFF_DIRECTION;
    if (!bytes_eq(row->producer, row->producer_len, rec->producer, rec->producer_len))
        m |= SYNC_DIFF_PRODUCER;
    if (!bytes_eq(row->msgid, row->msgid_len, rec->msgid, rec->msgid_len))
        m |= SYNC_DIFF_MSGID;
    if (row->ts_us != rec->timestamp_us)
        m |= SYNC_DIFF_TS;
    if (!bytes_eq(row->headers, row->headers_len, rec->headers, rec->headers_len))
        m |= SYNC_DIFF_HEADERS;
    if (!bytes_eq(row->payload, row->payload_len, rec->payload, rec->payload_len))
        m |= SYNC_DIFF_PAYLOAD;
    if (row->checksum != rec->checksum)
        m |= SYNC_DIFF_CHECKSUM;
    return m;
}

void sync_db_diff_names(unsigned mask, char *buf, size_t cap)
{
    static const char *const names[] = {"seq",   "direction", "producer", "msgid",
                                        "ts_us", "headers",   "payload",  "checksum"};
    size_t len = 0;
    if (!cap)
        return;
    buf[0] = 0;
    for (unsigned i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (!(mask & (1u << i)))
            continue;
        int n = snprintf(buf + len, cap - len, "%s%s", len ? "," : "", names[i]);
        if (n < 0 || (size_t)n >= cap - len)
            break;
        len += (size_t)n;
    }
}

/* ---- resync ------------------------------------------------------------ */

/* The existing rows of [lo, hi], copied (the result is freed before the
 * writes). */
struct rowset {
    sync_db_row_t *v;
    size_t n, cap;
    uint8_t **blobs;
    bool oom;
};

static void rowset_free(struct rowset *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->blobs[i]);
    free(s->v);
    free(s->blobs);
    memset(s, 0, sizeof(*s));
}

static int rowset_cb(const sync_db_row_t *row, void *arg)
{
    struct rowset *s = arg;
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        sync_db_row_t *nv = realloc(s->v, cap * sizeof(*nv));
        if (!nv)
            goto oom;
        s->v = nv;
        uint8_t **nb = realloc(s->blobs, cap * sizeof(*nb));
        if (!nb)
            goto oom;
        s->blobs = nb;
        s->cap = cap;
    }
    size_t total = row->producer_len + row->msgid_len + row->headers_len + row->payload_len;
    uint8_t *blob = malloc(total ? total : 1);
    if (!blob)
        goto oom;
    sync_db_row_t c = *row;
    size_t off = 0;
#define COPY(f)                                                                                    \
    do {                                                                                           \
        if (row->f##_len)                                                                          \
            memcpy(blob + off, row->f, row->f##_len);                                              \
        c.f = blob + off;                                                                          \
        off += row->f##_len;                                                                       \
    } while (0)
    COPY(producer);
    COPY(msgid);
    COPY(headers);
    COPY(payload);
#undef COPY
    s->blobs[s->n] = blob;
    s->v[s->n++] = c;
    return 0;
oom:
    s->oom = true;
    return 1;
}

static void sql_row(sync_sqlbuf_t *b, const wal_record_t *r)
{
    sync_sb_adds(b, "(");
    sync_sb_hex(b, r->stream, r->stream_len);
    sync_sb_addf(b, ",%" PRIu64 ",%" PRIu64 ",%d,", r->offset, r->seq,
                 r->direction == WAL_DIR_OUT ? 1 : 0);
    sync_sb_hex(b, r->producer, r->producer_len);
    sync_sb_adds(b, ",");
    sync_sb_hex(b, r->msgid, r->msgid_len);
    sync_sb_addf(b, ",%" PRId64 ",", r->timestamp_us);
    sync_sb_hex(b, r->headers, r->headers_len);
    sync_sb_adds(b, ",");
    sync_sb_hex(b, r->payload, r->payload_len);
    sync_sb_addf(b, ",%" PRIu64 ")", r->checksum);
}

int sync_db_resync(sync_db_t *d, const wal_record_t *recs, size_t n, uint32_t stream_id,
                   uint64_t epoch, int64_t created_us, int dry_run, sync_resync_stats_t *st,
                   char *err, size_t errlen)
{
    if (n == 0)
        return 0;
    const wal_record_t *r0 = &recs[0];
    for (size_t i = 1; i < n; i++) {
        if (recs[i].offset <= recs[i - 1].offset || recs[i].stream_len != r0->stream_len ||
            memcmp(recs[i].stream, r0->stream, r0->stream_len) != 0) {
            sync_errf(err, errlen, "resync: records must be of one stream, in offset order");
            return SYNC_ESQL;
        }
    }
    sync_resync_stats_t local = {0};
    struct rowset rows = {0};
    sync_sqlbuf_t b = {0};
    bool *write = NULL;
    int rc;
    if (mysql_autocommit(d->m, 0))
        return db_err(d, err, errlen);
    /* The watermark, locked: the drain's UPDATE of it waits for our commit. */
    uint64_t wm = 0;
    sync_sb_adds(&b, "SELECT watermark_seq FROM arq_sync_state WHERE id = 1 FOR UPDATE");
    rc = single_u64(d, &b, &wm, err, errlen);
    sync_sb_free(&b);
    if (rc)
        goto fail;
    rc = sync_db_rows(d, r0->stream, r0->stream_len, r0->offset, recs[n - 1].offset, 0, rowset_cb,
                      &rows, NULL, err, errlen);
    if (!rc && rows.oom)
        rc = SYNC_ENOMEM;
    if (rc)
        goto fail;
    /* Classify by merging the two offset-ordered lists. */
    write = calloc(n, sizeof(*write));
    if (!write) {
        rc = SYNC_ENOMEM;
        sync_errf(err, errlen, "out of memory");
        goto fail;
    }
    size_t j = 0, n_write = 0, n_replace = 0;
    for (size_t i = 0; i < n; i++) {
        const wal_record_t *r = &recs[i];
        while (j < rows.n && rows.v[j].offset < r->offset)
            j++;
        const sync_db_row_t *row = j < rows.n && rows.v[j].offset == r->offset ? &rows.v[j] : NULL;
        if (r->seq > wm) {
            local.pending++;
        } else if (!row) {
            local.inserted++;
            write[i] = true;
            n_write++;
        } else if (sync_db_row_diff(row, r)) {
            local.replaced++;
            write[i] = true;
            n_write++;
            n_replace++;
        } else {
            local.same++;
        }
    }
    if (!dry_run && n_replace) {
        sync_sb_adds(&b, "DELETE FROM arq_messages WHERE stream = ");
        sync_sb_hex(&b, r0->stream, r0->stream_len);
        sync_sb_adds(&b, " AND `offset` IN (");
        bool first = true;
        j = 0;
        for (size_t i = 0; i < n; i++) {
            if (!write[i])
                continue;
            while (j < rows.n && rows.v[j].offset < recs[i].offset)
                j++;
            if (j < rows.n && rows.v[j].offset == recs[i].offset) {
                sync_sb_addf(&b, "%s%" PRIu64, first ? "" : ",", recs[i].offset);
                first = false;
            }
        }
        sync_sb_adds(&b, ")");
        rc = exec(d, &b, err, errlen);
        sync_sb_free(&b);
    }
    if (!rc && !dry_run && n_write) {
        sync_sb_adds(&b,
                     "INSERT INTO arq_messages (stream, `offset`, seq, direction, producer, msgid, "
                     "ts_us, headers, payload, checksum) VALUES ");
        bool first = true;
        for (size_t i = 0; i < n; i++) {
            if (!write[i])
                continue;
            if (!first)
                sync_sb_adds(&b, ",");
            sql_row(&b, &recs[i]);
            first = false;
        }
        rc = exec(d, &b, err, errlen);
        sync_sb_free(&b);
    }
    if (!rc && !dry_run && n_write) {
        sync_sb_adds(&b, "INSERT IGNORE INTO arq_streams (name, id, epoch, created_us) VALUES (");
        sync_sb_hex(&b, r0->stream, r0->stream_len);
        sync_sb_addf(&b, ",%u,%" PRIu64 ",%" PRId64 ")", stream_id, epoch, created_us);
        rc = exec(d, &b, err, errlen);
        sync_sb_free(&b);
    }
    if (rc)
        goto fail;
    if (dry_run ? mysql_rollback(d->m) : mysql_commit(d->m)) {
        rc = db_err(d, err, errlen);
        goto fail;
    }
    (void)mysql_autocommit(d->m, 1);
    rowset_free(&rows);
    free(write);
    if (st) {
        st->inserted += local.inserted;
        st->replaced += local.replaced;
        st->same += local.same;
        st->pending += local.pending;
    }
    return 0;
fail:
    if (rc == SYNC_ENOMEM && err && !err[0])
        sync_errf(err, errlen, "out of memory");
    (void)mysql_rollback(d->m);
    (void)mysql_autocommit(d->m, 1);
    rowset_free(&rows);
    free(write);
    sync_sb_free(&b);
    return rc;
}
