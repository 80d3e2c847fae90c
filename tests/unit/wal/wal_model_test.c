/*
 * wal_model_test.c - the WAL against an in-memory model under random
 * operations: interleaved appends on ~20 streams from four threads calling
 * wal_append_sync and from an event loop submitting asynchronously, with
 * dedup keys, re-sends, headers, both directions, cursors and requests that
 * must fail as a whole. Everything the WAL returns and everything it reads
 * back is compared with the model, before and after a reopen.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include <event2/event.h>
#include <event2/thread.h>

#include "wal_test_util.h"

#define NSTREAMS    20
#define NSYNC       4     /* threads calling wal_append_sync */
#define OWNER_ASYNC NSYNC /* owner index of the event-loop submitter */
#define NOWNERS     (NSYNC + 1)
#define SYNC_MSGS   700  /* new messages per sync thread */
#define ASYNC_MSGS  1400 /* new messages from the event loop */
#define ASYNC_SLOTS 4    /* async requests in flight */
#define BATCH_MAX   64
#define PAYLOAD_MAX 2000
#define HEADERS_MAX 300

/* ---- the model -------------------------------------------------------------- */

typedef struct mmsg {
    uint32_t stream;
    uint8_t *payload;
    size_t payload_len;
    uint8_t *headers;
    size_t headers_len;
    char *producer;
    size_t producer_len;
    char *msgid;
    size_t msgid_len;
    enum wal_direction dir;
    int64_t ts;
    uint64_t offset, seq, epoch;
} mmsg_t;

typedef struct vec {
    void **v;
    size_t n, cap;
} vec_t;

static void vec_push(vec_t *v, void *p)
{
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 64;
        v->v = realloc(v->v, v->cap * sizeof *v->v);
        if (!v->v)
            abort();
    }
    v->v[v->n++] = p;
}

typedef struct model {
    char names[NSTREAMS][WAL_STREAM_NAME_MAX + 1];
    size_t name_len[NSTREAMS];
    pthread_mutex_t lock;
    vec_t acked;                            /* mmsg_t*: every appended (non-duplicate) message */
    uint64_t epoch[NSTREAMS];               /* 0 until the first result */
    int exists[NSTREAMS];                   /* a message to it was committed */
    vec_t keyed[NOWNERS];                   /* mmsg_t* with a dedup key, per owner (owner-only) */
    vec_t failed_keys;                      /* char* msgids of messages of failed requests */
    vec_t fresh_names;                      /* char* streams only named by failed requests */
    uint64_t cursor[ASYNC_SLOTS][NSTREAMS]; /* value + 1, 0: none */
    uint64_t appended_since_open;
    uint64_t dups_since_open; /* re-sends in successful requests */
} model_t;

static mmsg_t *mmsg_new(tu_rng_t *r, unsigned owner, unsigned *counter)
{
    mmsg_t *m = calloc(1, sizeof *m);
    if (!m)
        abort();
    m->stream = (uint32_t)tu_range(r, 0, NSTREAMS - 1);
    m->payload_len = tu_chance(r, 5) ? 0 : (size_t)tu_range(r, 0, PAYLOAD_MAX);
    m->payload = malloc(m->payload_len + 1);
    tu_fill(m->payload, m->payload_len, tu_rand(r));
    if (tu_chance(r, 30)) {
        m->headers_len = (size_t)tu_range(r, 1, HEADERS_MAX);
        m->headers = malloc(m->headers_len);
        tu_fill(m->headers, m->headers_len, tu_rand(r));
    }
    unsigned k = (unsigned)tu_range(r, 0, 99);
    if (k < 50) {
        char buf[64];
        snprintf(buf, sizeof buf, "prod-%u", owner);
        m->producer = strdup(buf);
        m->producer_len = strlen(buf);
        if (k < 40) {
            snprintf(buf, sizeof buf, "msg-%u-%u", owner, (*counter)++);
            m->msgid = strdup(buf);
            m->msgid_len = strlen(buf);
        }
    }
    m->dir = tu_chance(r, 50) ? WAL_DIR_OUT : WAL_DIR_IN;
    m->ts = tu_chance(r, 50) ? 0 : (int64_t)tu_range(r, 1, 1ull << 52);
    return m;
}

static void mmsg_free(mmsg_t *m)
{
    free(m->payload);
    free(m->headers);
    free(m->producer);
    free(m->msgid);
    free(m);
}

static int mmsg_keyed(const mmsg_t *m)
{
    return m->producer_len && m->msgid_len;
}

static wal_msg_t mmsg_wal(const model_t *md, const mmsg_t *m)
{
    wal_msg_t w;
    memset(&w, 0, sizeof w);
    w.stream = md->names[m->stream];
    w.stream_len = md->name_len[m->stream];
    w.payload = m->payload;
    w.payload_len = m->payload_len;
    w.producer = m->producer;
    w.producer_len = m->producer_len;
    w.msgid = m->msgid;
    w.msgid_len = m->msgid_len;
    w.headers = m->headers;
    w.headers_len = m->headers_len;
    w.direction = m->dir;
    w.timestamp_us = m->ts;
    return w;
}

static void model_init(model_t *md)
{
    memset(md, 0, sizeof *md);
    pthread_mutex_init(&md->lock, NULL);
    for (int i = 0; i < NSTREAMS; i++) {
        if (i == NSTREAMS - 1) {
            /* the longest legal name */
            memset(md->names[i], 'L', WAL_STREAM_NAME_MAX);
            memcpy(md->names[i], "long.", 5);
            md->names[i][WAL_STREAM_NAME_MAX] = 0;
        } else {
            snprintf(md->names[i], sizeof md->names[i], "model.%02d", i);
        }
        md->name_len[i] = strlen(md->names[i]);
    }
}

static void model_free(model_t *md)
{
    for (size_t i = 0; i < md->acked.n; i++)
        mmsg_free(md->acked.v[i]);
    free(md->acked.v);
    for (int o = 0; o < NOWNERS; o++)
        free(md->keyed[o].v);
    for (size_t i = 0; i < md->failed_keys.n; i++)
        free(md->failed_keys.v[i]);
    free(md->failed_keys.v);
    for (size_t i = 0; i < md->fresh_names.n; i++)
        free(md->fresh_names.v[i]);
    free(md->fresh_names.v);
    pthread_mutex_destroy(&md->lock);
}

/* Record a committed (new) message; called with its result. */
static void model_commit(model_t *md, unsigned owner, mmsg_t *m, const wal_result_t *res)
{
    m->offset = res->offset;
    m->seq = res->seq;
    m->epoch = res->epoch;
    pthread_mutex_lock(&md->lock);
    vec_push(&md->acked, m);
    md->appended_since_open++;
    if (md->epoch[m->stream] == 0)
        md->epoch[m->stream] = res->epoch;
    TU_CHECK(md->epoch[m->stream] == res->epoch,
             "stream %u: result epoch %" PRIu64 " != earlier %" PRIu64, m->stream, res->epoch,
             md->epoch[m->stream]);
    md->exists[m->stream] = 1;
    pthread_mutex_unlock(&md->lock);
    if (mmsg_keyed(m))
        vec_push(&md->keyed[owner], m);
}

static int model_exists(model_t *md, uint32_t s)
{
    pthread_mutex_lock(&md->lock);
    int e = md->exists[s];
    pthread_mutex_unlock(&md->lock);
    return e;
}

/* Check the result of one message of a successful request. `orig` is the
 * acked message a re-send duplicates (NULL for a new message). */
static void check_result(const mmsg_t *m, const mmsg_t *orig, const wal_result_t *res)
{
    if (orig) {
        TU_CHECK(res->duplicate == 1, "re-send of %.*s/%.*s: duplicate=%d", (int)orig->producer_len,
                 orig->producer, (int)orig->msgid_len, orig->msgid, res->duplicate);
        TU_CHECK(res->offset == orig->offset,
                 "re-send of %.*s: offset %" PRIu64 ", original %" PRIu64, (int)orig->msgid_len,
                 orig->msgid, res->offset, orig->offset);
        TU_CHECK(res->seq == 0, "duplicate with seq %" PRIu64, res->seq);
        TU_CHECK(res->epoch == orig->epoch, "duplicate epoch %" PRIu64 " != %" PRIu64, res->epoch,
                 orig->epoch);
    } else {
        TU_CHECK(res->duplicate == 0, "new message (stream %u) flagged duplicate", m->stream);
        TU_CHECK(res->offset >= 1, "offset 0");
        TU_CHECK(res->seq >= 1, "seq 0 for a new message");
    }
}

/* ---- writers ---------------------------------------------------------------- */

typedef struct run {
    wal_t *wal;
    model_t *md;
    uint64_t seed;
    /* event-loop side */
    struct event_base *base;
    pthread_t loop_thread;
    tu_rng_t arng;
    unsigned acounter;
    unsigned async_new;  /* new messages submitted so far */
    unsigned async_busy; /* requests in flight */
    unsigned async_reqs, async_failed_reqs, async_cursor_reqs;
    unsigned fail_seq;
} run_t;

typedef struct sync_arg {
    run_t *run;
    unsigned owner;
    unsigned reqs, dups;
} sync_arg_t;

static void *sync_thread(void *p)
{
    sync_arg_t *a = p;
    model_t *md = a->run->md;
    tu_rng_t r = {tu_mix64(a->run->seed + a->owner)};
    unsigned counter = 0, sent = 0;
    uint64_t last_seq = 0;
    mmsg_t *batch[BATCH_MAX];
    const mmsg_t *orig[BATCH_MAX];
    wal_msg_t msgs[BATCH_MAX];
    wal_result_t res[BATCH_MAX];

    while (sent < SYNC_MSGS && tu_errors() == 0) {
        size_t n = (size_t)tu_range(&r, 1, BATCH_MAX);
        vec_t *mine = &md->keyed[a->owner];
        for (size_t i = 0; i < n; i++) {
            if (mine->n && tu_chance(&r, 8)) {
                orig[i] = mine->v[tu_range(&r, 0, mine->n - 1)];
                batch[i] = (mmsg_t *)orig[i];
                a->dups++;
            } else {
                orig[i] = NULL;
                batch[i] = mmsg_new(&r, a->owner, &counter);
            }
            msgs[i] = mmsg_wal(md, batch[i]);
        }
        memset(res, 0xa5, sizeof res);
        int rc = wal_append_sync(a->run->wal, msgs, n, res);
        a->reqs++;
        TU_CHECK(rc == 0, "wal_append_sync: %s", wal_strerror(rc));
        if (rc != 0) {
            for (size_t i = 0; i < n; i++)
                if (!orig[i])
                    mmsg_free(batch[i]);
            break;
        }
        uint64_t prev = last_seq;
        for (size_t i = 0; i < n; i++) {
            check_result(batch[i], orig[i], &res[i]);
            if (orig[i]) {
                pthread_mutex_lock(&md->lock);
                md->dups_since_open++;
                pthread_mutex_unlock(&md->lock);
                continue;
            }
            /* commit order: within a request, and after the previous one */
            TU_CHECK(res[i].seq > prev, "seq %" PRIu64 " not after %" PRIu64, res[i].seq, prev);
            prev = res[i].seq;
            model_commit(md, a->owner, batch[i], &res[i]);
            sent++;
        }
        last_seq = prev;
    }
    return NULL;
}

typedef struct aslot {
    run_t *run;
    unsigned idx;
    wal_append_t *req;
    size_t n;
    mmsg_t *batch[BATCH_MAX];
    const mmsg_t *orig[BATCH_MAX];
    size_t ncur;
    uint32_t cur_stream[8];
    uint64_t cur_val[8];
    int expect_fail;
} aslot_t;

static void async_submit_next(aslot_t *s);

static void async_cb(wal_append_t *req, void *arg)
{
    aslot_t *s = arg;
    run_t *run = s->run;
    model_t *md = run->md;
    TU_CHECK(pthread_equal(pthread_self(), run->loop_thread),
             "async completion not on the event-loop thread");
    TU_CHECK(req == s->req, "callback for another request");
    int st = wal_append_status(req);
    if (s->expect_fail) {
        TU_CHECK(st == WAL_ENOTFOUND, "request with a cursor on an unknown stream: %s",
                 wal_strerror(st));
        for (size_t i = 0; i < s->n; i++) {
            if (s->orig[i])
                continue;
            if (mmsg_keyed(s->batch[i]))
                vec_push(&md->failed_keys, strdup(s->batch[i]->msgid));
            mmsg_free(s->batch[i]);
        }
    } else {
        TU_CHECK(st == 0, "async request failed: %s", wal_strerror(st));
        TU_CHECK(wal_append_count(req) == s->n, "wal_append_count %zu != %zu",
                 wal_append_count(req), s->n);
        uint64_t prev = 0;
        for (size_t i = 0; i < s->n; i++) {
            if (st != 0) {
                if (!s->orig[i])
                    mmsg_free(s->batch[i]);
                continue;
            }
            const wal_result_t *res = wal_append_result(req, i);
            check_result(s->batch[i], s->orig[i], res);
            if (s->orig[i]) {
                pthread_mutex_lock(&md->lock);
                md->dups_since_open++;
                pthread_mutex_unlock(&md->lock);
                continue;
            }
            TU_CHECK(res->seq > prev, "seq %" PRIu64 " not after %" PRIu64 " in one request",
                     res->seq, prev);
            prev = res->seq;
            model_commit(md, OWNER_ASYNC, s->batch[i], res);
        }
        if (st == 0)
            for (size_t c = 0; c < s->ncur; c++)
                md->cursor[s->idx][s->cur_stream[c]] = s->cur_val[c] + 1;
    }
    wal_append_free(req);
    s->req = NULL;
    run->async_busy--;
    async_submit_next(s);
    if (run->async_busy == 0)
        event_base_loopbreak(run->base);
}

static void async_submit_next(aslot_t *s)
{
    run_t *run = s->run;
    model_t *md = run->md;
    tu_rng_t *r = &run->arng;
    if (run->async_new >= ASYNC_MSGS || tu_errors())
        return;
    int rc = wal_append_new(async_cb, s, &s->req);
    TU_CHECK(rc == 0, "wal_append_new: %s", wal_strerror(rc));
    if (rc)
        return;
    s->expect_fail = tu_chance(r, 8);
    /* cursor-only requests once some stream exists (an empty request is
     * not a request) */
    s->n = tu_chance(r, 5) && model_exists(md, 0) ? 0 : (size_t)tu_range(r, 1, BATCH_MAX);
    s->ncur = 0;
    vec_t *mine = &md->keyed[OWNER_ASYNC];
    char fresh[64] = "";
    if (s->expect_fail && tu_chance(r, 50))
        snprintf(fresh, sizeof fresh, "fresh.%u", run->fail_seq);
    for (size_t i = 0; i < s->n; i++) {
        if (!s->expect_fail && mine->n && tu_chance(r, 8)) {
            s->orig[i] = mine->v[tu_range(r, 0, mine->n - 1)];
            s->batch[i] = (mmsg_t *)s->orig[i];
        } else {
            s->orig[i] = NULL;
            s->batch[i] = mmsg_new(r, OWNER_ASYNC, &run->acounter);
            run->async_new++;
        }
        wal_msg_t w = mmsg_wal(md, s->batch[i]);
        if (fresh[0] && i == 0) {
            /* a stream that only a failing request names: must never exist */
            w.stream = fresh;
            w.stream_len = strlen(fresh);
        }
        rc = wal_append_add_msg(s->req, &w);
        TU_CHECK(rc == 0, "wal_append_add_msg: %s", wal_strerror(rc));
    }
    if (fresh[0])
        vec_push(&md->fresh_names, strdup(fresh));
    /* cursors on committed streams; the same one twice means the last wins */
    if (s->n == 0 || tu_chance(r, 30)) {
        size_t want = (size_t)tu_range(r, 1, 4);
        for (size_t c = 0; c < want; c++) {
            /* the first committed stream from a random start */
            uint32_t st = (uint32_t)tu_range(r, 0, NSTREAMS - 1), tries = 0;
            while (!model_exists(md, st) && ++tries < NSTREAMS)
                st = (st + 1) % NSTREAMS;
            if (!model_exists(md, st))
                break;
            if (s->ncur && tu_chance(r, 30))
                st = s->cur_stream[s->ncur - 1];
            uint64_t val = tu_range(r, 0, 5000);
            char sess[32];
            snprintf(sess, sizeof sess, "sess-%u", s->idx);
            rc = wal_append_add_cursor(s->req, sess, strlen(sess), md->names[st], md->name_len[st],
                                       val);
            TU_CHECK(rc == 0, "wal_append_add_cursor: %s", wal_strerror(rc));
            s->cur_stream[s->ncur] = st;
            s->cur_val[s->ncur] = val;
            s->ncur++;
        }
        run->async_cursor_reqs++;
    }
    if (s->expect_fail) {
        char nx[64];
        snprintf(nx, sizeof nx, "nx.%u", run->fail_seq++);
        rc = wal_append_add_cursor(s->req, "sess-x", 6, nx, strlen(nx), 1);
        TU_CHECK(rc == 0, "wal_append_add_cursor: %s", wal_strerror(rc));
        run->async_failed_reqs++;
    }
    rc = wal_append_submit(run->wal, s->req);
    TU_CHECK(rc == 0, "wal_append_submit: %s", wal_strerror(rc));
    if (rc) {
        wal_append_free(s->req);
        s->req = NULL;
        return;
    }
    run->async_reqs++;
    run->async_busy++;
}

/* ---- checks against the model ------------------------------------------------ */

static int cmp_by_seq(const void *a, const void *b)
{
    const mmsg_t *x = *(mmsg_t *const *)a, *y = *(mmsg_t *const *)b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* NULL if the record is the model message, else what differs. */
static const char *rec_diff(const model_t *md, const tu_rec_t *r, const mmsg_t *m, uint32_t sid)
{
    if (r->offset != m->offset)
        return "offset";
    if (r->seq != m->seq)
        return "seq";
    if (r->stream_id != sid)
        return "stream_id";
    if (!tu_mem_eq(r->stream, r->stream_len, md->names[m->stream], md->name_len[m->stream]))
        return "stream name";
    if (r->direction != m->dir)
        return "direction";
    if (!tu_mem_eq(r->payload, r->payload_len, m->payload, m->payload_len))
        return "payload";
    if (!tu_mem_eq(r->headers, r->headers_len, m->headers, m->headers_len))
        return "headers";
    if (!tu_mem_eq(r->producer, r->producer_len, m->producer, m->producer_len))
        return "producer";
    if (!tu_mem_eq(r->msgid, r->msgid_len, m->msgid, m->msgid_len))
        return "msgid";
    if (m->ts ? r->timestamp_us != m->ts : r->timestamp_us <= 0)
        return "timestamp";
    return NULL;
}

typedef struct list_ctx {
    wal_t *wal;
    const model_t *md;
    unsigned count;
    int bad;
    uint32_t ids[64];
} list_ctx_t;

static int list_cb(const wal_stream_info_t *info, void *arg)
{
    list_ctx_t *c = arg;
    wal_stream_info_t g;
    if (c->count < 64)
        c->ids[c->count] = info->id;
    c->count++;
    if (!info->name || wal_stream_get(c->wal, info->name, info->name_len, &g) != 0 ||
        g.id != info->id || g.epoch != info->epoch || g.first_offset != info->first_offset ||
        g.next_offset != info->next_offset) {
        c->bad++;
        return 0;
    }
    int known = 0;
    for (int s = 0; s < NSTREAMS; s++)
        known |= tu_mem_eq(info->name, info->name_len, c->md->names[s], c->md->name_len[s]);
    if (!known)
        c->bad++;
    return 0;
}

/* Everything the WAL holds must be exactly the model. */
static void check_all(wal_t *wal, model_t *md, tu_rng_t *r)
{
    size_t total = md->acked.n;
    mmsg_t **all = malloc((total + 1) * sizeof *all);
    memcpy(all, md->acked.v, total * sizeof *all);
    qsort(all, total, sizeof *all, cmp_by_seq);
    for (size_t i = 1; i < total; i++)
        if (all[i]->seq == all[i - 1]->seq)
            fail_msg("seq %" PRIu64 " given twice", all[i]->seq);

    /* per stream, in commit (seq) order: offsets 1, 2, 3, ... */
    size_t per[NSTREAMS] = {0};
    mmsg_t **by_stream[NSTREAMS];
    for (int s = 0; s < NSTREAMS; s++)
        by_stream[s] = malloc((total + 1) * sizeof(mmsg_t *));
    for (size_t i = 0; i < total; i++) {
        mmsg_t *m = all[i];
        by_stream[m->stream][per[m->stream]++] = m;
        if (m->offset != per[m->stream])
            fail_msg("stream %u: offset %" PRIu64 " at position %zu in commit order", m->stream,
                     m->offset, per[m->stream]);
    }

    unsigned nexist = 0;
    uint32_t ids[NSTREAMS] = {0};
    tu_recs_t recs = {0};
    for (int s = 0; s < NSTREAMS; s++) {
        wal_stream_info_t info;
        memset(&info, 0, sizeof info);
        int rc = wal_stream_get(wal, md->names[s], md->name_len[s], &info);
        if (per[s] == 0) {
            assert_int_equal(rc, WAL_ENOTFOUND);
            continue;
        }
        nexist++;
        assert_int_equal(rc, 0);
        ids[s] = info.id;
        assert_int_equal(info.first_offset, 1);
        assert_int_equal(info.next_offset, per[s] + 1);
        assert_int_equal(info.epoch, md->epoch[s]);
        assert_true(info.created_us > 0);
        for (int t = 0; t < s; t++)
            if (per[t])
                assert_int_not_equal(ids[t], info.id);

        /* one big read */
        wal_read_result_t res;
        memset(&res, 0, sizeof res);
        tu_recs_clear(&recs);
        rc = wal_stream_read(wal, md->names[s], md->name_len[s], 1, UINT32_MAX, UINT64_MAX,
                             tu_recs_cb, &recs, &res);
        assert_int_equal(rc, 0);
        assert_int_equal(recs.n, per[s]);
        assert_int_equal(res.count, per[s]);
        assert_int_equal(res.next, per[s] + 1);
        for (size_t i = 0; i < recs.n; i++) {
            const char *d = rec_diff(md, &recs.v[i], by_stream[s][i], info.id);
            if (d)
                fail_msg("stream %d offset %zu: %s differs", s, i + 1, d);
        }

        /* bounded reads resume at res.next */
        uint64_t from = 1;
        size_t got = 0;
        for (int guard = 0; guard < 100000; guard++) {
            uint32_t max_msgs = (uint32_t)tu_range(r, 1, 7);
            uint64_t max_bytes = tu_range(r, 1, 4000);
            tu_recs_clear(&recs);
            memset(&res, 0, sizeof res);
            rc = wal_stream_read(wal, md->names[s], md->name_len[s], from, max_msgs, max_bytes,
                                 tu_recs_cb, &recs, &res);
            assert_int_equal(rc, 0);
            assert_int_equal(res.count, recs.n);
            assert_true(recs.n <= max_msgs);
            if (from <= per[s])
                assert_true(recs.n >= 1); /* always at least one record */
            else
                assert_int_equal(recs.n, 0);
            for (size_t i = 0; i < recs.n; i++) {
                const char *d = rec_diff(md, &recs.v[i], by_stream[s][got + i], info.id);
                if (d)
                    fail_msg("bounded read, stream %d offset %zu: %s differs", s, got + i + 1, d);
            }
            got += recs.n;
            assert_int_equal(res.next, from + recs.n);
            if (recs.n == 0)
                break;
            from = res.next;
        }
        assert_int_equal(got, per[s]);

        /* a callback that stops early: count says how many it got */
        if (per[s] >= 3) {
            tu_recs_clear(&recs);
            recs.stop_after = 2;
            rc = wal_stream_read(wal, md->names[s], md->name_len[s], 1, 100, UINT64_MAX, tu_recs_cb,
                                 &recs, &res);
            recs.stop_after = 0;
            assert_int_equal(rc, 0);
            assert_int_equal(recs.n, 2);
            assert_int_equal(res.count, 2);
            assert_int_equal(res.next, 3);
        }
    }
    assert_true(nexist > 0);

    /* streams only failed requests named were never created */
    for (size_t i = 0; i < md->fresh_names.n; i++) {
        wal_stream_info_t info;
        const char *nm = md->fresh_names.v[i];
        assert_int_equal(wal_stream_get(wal, nm, strlen(nm), &info), WAL_ENOTFOUND);
    }
    tu_recs_t none = {0};
    wal_read_result_t res;
    assert_int_equal(wal_stream_read(wal, "no.such", 7, 1, 10, 1000, tu_recs_cb, &none, &res),
                     WAL_ENOTFOUND);
    assert_int_equal(none.n, 0);

    /* stream list */
    list_ctx_t lc = {.wal = wal, .md = md};
    assert_int_equal(wal_stream_list(wal, list_cb, &lc), 0);
    assert_int_equal(lc.count, nexist);
    assert_int_equal(lc.bad, 0);

    /* the whole log in seq order */
    tu_recs_clear(&recs);
    assert_int_equal(wal_log_read(wal, 1, UINT32_MAX, UINT64_MAX, tu_recs_cb, &recs, &res), 0);
    assert_int_equal(recs.n, total);
    for (size_t i = 0; i < total; i++) {
        const char *d = rec_diff(md, &recs.v[i], all[i], ids[all[i]->stream]);
        if (d)
            fail_msg("log read, seq %" PRIu64 ": %s differs", all[i]->seq, d);
    }
    if (total)
        assert_int_equal(res.next, all[total - 1]->seq + 1);

    /* bounded log reads */
    uint64_t from = 1;
    size_t got = 0;
    for (int guard = 0; guard < 100000; guard++) {
        uint32_t max_msgs = (uint32_t)tu_range(r, 1, 50);
        tu_recs_clear(&recs);
        memset(&res, 0, sizeof res);
        int rc = wal_log_read(wal, from, max_msgs, tu_range(r, 1, 20000), tu_recs_cb, &recs, &res);
        assert_int_equal(rc, 0);
        assert_int_equal(res.count, recs.n);
        assert_true(recs.n <= max_msgs);
        for (size_t i = 0; i < recs.n; i++) {
            assert_true(got + i < total);
            const char *d = rec_diff(md, &recs.v[i], all[got + i], ids[all[got + i]->stream]);
            if (d)
                fail_msg("bounded log read, seq %" PRIu64 ": %s differs", all[got + i]->seq, d);
        }
        got += recs.n;
        if (recs.n == 0)
            break;
        assert_int_equal(res.next, recs.v[recs.n - 1].seq + 1);
        from = res.next;
    }
    assert_int_equal(got, total);

    wal_stats_t st;
    assert_int_equal(wal_stats_get(wal, &st), 0);
    if (total) {
        assert_true(st.first_seq <= all[0]->seq);
        assert_true(st.next_seq > all[total - 1]->seq);
    }

    /* dedup entries */
    for (size_t i = 0; i < total; i++) {
        mmsg_t *m = all[i];
        if (!mmsg_keyed(m))
            continue;
        uint32_t sid = 0;
        uint64_t off = 0;
        assert_int_equal(
            wal_dedup_get(wal, m->producer, m->producer_len, md->names[m->stream],
                          strlen(md->names[m->stream]), m->msgid, m->msgid_len, &sid, &off),
            0);
        assert_int_equal(sid, ids[m->stream]);
        assert_int_equal(off, m->offset);
    }
    for (size_t i = 0; i < md->failed_keys.n; i++) {
        uint32_t sid;
        uint64_t off;
        char prod[32];
        snprintf(prod, sizeof prod, "prod-%u", OWNER_ASYNC);
        const char *id = md->failed_keys.v[i];
        for (uint32_t si = 0; si < NSTREAMS; si++) {
            int rc = wal_dedup_get(wal, prod, strlen(prod), md->names[si], strlen(md->names[si]),
                                   id, strlen(id), &sid, &off);
            assert_true(rc == WAL_ENOTFOUND);
        }
    }

    /* cursors: the latest value of each (session, stream) */
    for (unsigned k = 0; k < ASYNC_SLOTS; k++) {
        char sess[32];
        snprintf(sess, sizeof sess, "sess-%u", k);
        for (int s = 0; s < NSTREAMS; s++) {
            uint64_t v = 0xdead;
            int rc = wal_cursor_get(wal, sess, strlen(sess), md->names[s], md->name_len[s], &v);
            if (md->cursor[k][s]) {
                assert_int_equal(rc, 0);
                assert_int_equal(v, md->cursor[k][s] - 1);
            } else {
                assert_int_equal(rc, WAL_ENOTFOUND);
                assert_int_equal(v, 0xdead); /* untouched on failure */
            }
        }
    }
    uint64_t v;
    assert_int_equal(wal_cursor_get(wal, "sess-x", 6, md->names[0], md->name_len[0], &v),
                     WAL_ENOTFOUND);

    tu_recs_free(&recs);
    for (int s = 0; s < NSTREAMS; s++)
        free(by_stream[s]);
    free(all);
}

/* ---- tests ------------------------------------------------------------------ */

static wal_t *open_wal(const char *dir, struct event_base *base)
{
    wal_options_t o;
    memset(&o, 0, sizeof o);
    o.dir = dir;
    wal_t *wal = NULL;
    char err[256] = "";
    int rc = wal_open(&o, base, &wal, err, sizeof err);
    if (rc)
        fail_msg("wal_open %s: %s (%s)", dir, wal_strerror(rc), err);
    assert_non_null(wal);
    return wal;
}

static struct event_base *new_base(void)
{
    struct event_base *b = event_base_new();
    assert_non_null(b);
    return b;
}

static void test_model_random(void **state)
{
    const char *dir = *state;
    tu_rng_t r = tu_rng_for("model_random");
    model_t md;
    model_init(&md);
    tu_errors_reset();

    run_t run;
    memset(&run, 0, sizeof run);
    run.md = &md;
    run.seed = tu_rand(&r);
    run.arng.s = tu_rand(&r);
    run.base = new_base();
    run.loop_thread = pthread_self();
    run.wal = open_wal(dir, run.base);

    pthread_t th[NSYNC];
    sync_arg_t sa[NSYNC];
    for (unsigned i = 0; i < NSYNC; i++) {
        sa[i] = (sync_arg_t){.run = &run, .owner = i};
        assert_int_equal(pthread_create(&th[i], NULL, sync_thread, &sa[i]), 0);
    }
    aslot_t slots[ASYNC_SLOTS];
    memset(slots, 0, sizeof slots);
    for (unsigned i = 0; i < ASYNC_SLOTS; i++) {
        slots[i].run = &run;
        slots[i].idx = i;
        async_submit_next(&slots[i]);
    }
    if (run.async_busy)
        assert_int_equal(event_base_loop(run.base, EVLOOP_NO_EXIT_ON_EMPTY), 0);
    unsigned reqs = run.async_reqs, dups = 0;
    for (unsigned i = 0; i < NSYNC; i++) {
        pthread_join(th[i], NULL);
        reqs += sa[i].reqs;
        dups += sa[i].dups;
    }
    if (tu_errors())
        fail_msg("%u errors while appending; first: %s", tu_errors(), tu_err_first);
    assert_int_equal(run.async_busy, 0);
    printf("# model: %zu messages, %u requests (%u async, %u failing, %u with cursors), "
           "%u sync re-sends\n",
           md.acked.n, reqs, run.async_reqs, run.async_failed_reqs, run.async_cursor_reqs, dups);
    assert_true(md.acked.n >= NSYNC * SYNC_MSGS);

    wal_stats_t st;
    assert_int_equal(wal_stats_get(run.wal, &st), 0);
    /* duplicates are part of committed requests but append nothing */
    printf("# stats: commits %" PRIu64 ", committed_msgs %" PRIu64 ", appended %" PRIu64
           ", duplicates %" PRIu64 "\n",
           st.commits, st.committed_msgs, md.appended_since_open, md.dups_since_open);
    /* every message of a successful request, duplicates included; nothing
     * of a failed one */
    assert_int_equal(st.committed_msgs, md.appended_since_open + md.dups_since_open);
    assert_true(st.commits >= 1);
    check_all(run.wal, &md, &r);

    /* reopen: the heads are rebuilt from the data */
    wal_close(run.wal);
    event_base_free(run.base);
    run.base = new_base();
    run.wal = open_wal(dir, run.base);
    md.appended_since_open = 0;
    md.dups_since_open = 0;
    check_all(run.wal, &md, &r);

    /* appends continue every stream's offsets; epochs stay; dedup still works */
    uint64_t max_seq = 0;
    for (size_t i = 0; i < md.acked.n; i++) {
        mmsg_t *m = md.acked.v[i];
        if (m->seq > max_seq)
            max_seq = m->seq;
    }
    unsigned counter = 0;
    for (uint32_t s = 0; s < NSTREAMS; s++) {
        wal_stream_info_t info;
        int exists = wal_stream_get(run.wal, md.names[s], md.name_len[s], &info) == 0;
        mmsg_t *m[2];
        wal_msg_t w[2];
        wal_result_t res[2];
        for (int i = 0; i < 2; i++) {
            m[i] = mmsg_new(&r, 9, &counter);
            m[i]->stream = s;
            w[i] = mmsg_wal(&md, m[i]);
        }
        assert_int_equal(wal_append_sync(run.wal, w, 2, res), 0);
        for (int i = 0; i < 2; i++) {
            assert_int_equal(res[i].duplicate, 0);
            assert_true(res[i].seq > max_seq);
            max_seq = res[i].seq;
            if (exists) {
                assert_int_equal(res[i].offset, info.next_offset + (uint64_t)i);
                assert_int_equal(res[i].epoch, info.epoch);
            } else {
                assert_int_equal(res[i].offset, 1 + (uint64_t)i);
            }
            model_commit(&md, 0, m[i], &res[i]);
        }
    }
    for (unsigned o = 0; o < NOWNERS; o++) {
        for (size_t k = 0; k < md.keyed[o].n && k < 5; k++) {
            const mmsg_t *orig = md.keyed[o].v[k];
            wal_msg_t w = mmsg_wal(&md, orig);
            wal_result_t res;
            assert_int_equal(wal_append_sync(run.wal, &w, 1, &res), 0);
            check_result(orig, orig, &res);
            md.dups_since_open++;
        }
    }
    if (tu_errors())
        fail_msg("%u errors; first: %s", tu_errors(), tu_err_first);
    check_all(run.wal, &md, &r);
    assert_int_equal(wal_stats_get(run.wal, &st), 0);
    assert_int_equal(st.committed_msgs, md.appended_since_open + md.dups_since_open);

    wal_close(run.wal);
    event_base_free(run.base);
    model_free(&md);
}

/* Limits are checked when a message or cursor is added. */
static void test_limits(void **state)
{
    const char *dir = *state;
    wal_t *wal = open_wal(dir, NULL);
    static char big[WAL_HEADERS_MAX + 2];
    memset(big, 'x', sizeof big);
    wal_append_t *req = NULL;
    tu_waiter_t w;
    tu_waiter_init(&w);
    assert_int_equal(wal_append_new(tu_waiter_cb, &w, &req), 0);
    assert_non_null(req);

    wal_msg_t m = tu_msg("ok", "p", 1);
    m.stream_len = 0;
    assert_int_equal(wal_append_add_msg(req, &m), WAL_EINVAL);
    m.stream = big;
    m.stream_len = WAL_STREAM_NAME_MAX + 1;
    assert_int_equal(wal_append_add_msg(req, &m), WAL_EINVAL);
    m = tu_msg("ok", "p", 1);
    m.producer = big;
    m.producer_len = WAL_PRODUCER_MAX + 1;
    m.msgid = "id";
    m.msgid_len = 2;
    assert_int_equal(wal_append_add_msg(req, &m), WAL_EINVAL);
    m = tu_msg("ok", "p", 1);
    m.producer = "pr";
    m.producer_len = 2;
    m.msgid = big;
    m.msgid_len = WAL_MSGID_MAX + 1;
    assert_int_equal(wal_append_add_msg(req, &m), WAL_EINVAL);
    m = tu_msg("ok", "p", 1);
    m.headers = big;
    m.headers_len = WAL_HEADERS_MAX + 1;
    assert_int_equal(wal_append_add_msg(req, &m), WAL_EINVAL);
    assert_int_equal(wal_append_add_cursor(req, big, WAL_SESSION_MAX + 1, "ok", 2, 1), WAL_EINVAL);
    assert_int_equal(wal_append_add_cursor(req, "s", 1, "ok", 0, 1), WAL_EINVAL);
    assert_int_equal(wal_append_add_cursor(req, "s", 1, big, WAL_STREAM_NAME_MAX + 1, 1),
                     WAL_EINVAL);
    assert_int_equal(wal_append_count(req), 0);
    wal_append_free(req);

    /* the same through wal_append_sync: refused, nothing written */
    wal_msg_t two[2] = {tu_msg("ok", "a", 1), tu_msg("ok", "b", 1)};
    two[1].stream_len = 0;
    assert_int_equal(wal_append_sync(wal, two, 2, NULL), WAL_EINVAL);
    two[1] = tu_msg("ok", "b", 1);
    two[1].producer = big;
    two[1].producer_len = WAL_PRODUCER_MAX + 1;
    two[1].msgid = "i";
    two[1].msgid_len = 1;
    assert_int_equal(wal_append_sync(wal, two, 2, NULL), WAL_EINVAL);
    wal_stream_info_t info;
    assert_int_equal(wal_stream_get(wal, "ok", 2, &info), WAL_ENOTFOUND);

    /* exactly at the limits is fine */
    m.stream = big;
    m.stream_len = WAL_STREAM_NAME_MAX;
    m.payload = "";
    m.payload_len = 0;
    m.producer = big;
    m.producer_len = WAL_PRODUCER_MAX;
    m.msgid = big;
    m.msgid_len = WAL_MSGID_MAX;
    m.headers = big;
    m.headers_len = WAL_HEADERS_MAX;
    m.direction = WAL_DIR_OUT;
    m.timestamp_us = 0;
    wal_result_t res;
    assert_int_equal(wal_append_sync(wal, &m, 1, &res), 0);
    assert_int_equal(res.offset, 1);
    tu_recs_t recs = {0};
    wal_read_result_t rr;
    assert_int_equal(
        wal_stream_read(wal, big, WAL_STREAM_NAME_MAX, 1, 10, 1 << 20, tu_recs_cb, &recs, &rr), 0);
    assert_int_equal(recs.n, 1);
    assert_int_equal(recs.v[0].producer_len, WAL_PRODUCER_MAX);
    assert_int_equal(recs.v[0].msgid_len, WAL_MSGID_MAX);
    assert_int_equal(recs.v[0].headers_len, WAL_HEADERS_MAX);
    assert_int_equal(recs.v[0].payload_len, 0);
    assert_int_equal(recs.v[0].direction, WAL_DIR_OUT);
    assert_memory_equal(recs.v[0].headers, big, WAL_HEADERS_MAX);
    tu_recs_free(&recs);
    req = NULL;
    assert_int_equal(wal_append_new(tu_waiter_cb, &w, &req), 0);
    assert_int_equal(wal_append_add_cursor(req, big, WAL_SESSION_MAX, big, WAL_STREAM_NAME_MAX, 7),
                     0);
    wal_append_free(req);
    wal_close(wal);

    /* max_record_bytes: a larger payload is refused at submit */
    wal_options_t o;
    memset(&o, 0, sizeof o);
    o.dir = dir;
    o.max_record_bytes = 1000;
    wal = NULL;
    assert_int_equal(wal_open(&o, NULL, &wal, NULL, 0), 0);
    wal_msg_t p = tu_msg("sized", big, 1001);
    assert_int_equal(wal_append_sync(wal, &p, 1, NULL), WAL_EINVAL);
    assert_int_equal(wal_append_new(tu_waiter_cb, &w, &req), 0);
    assert_int_equal(wal_append_add_msg(req, &p), 0);
    assert_int_equal(wal_append_submit(wal, req), WAL_EINVAL);
    wal_append_free(req); /* still ours: the callback is never called */
    p.payload_len = 1000;
    assert_int_equal(wal_append_sync(wal, &p, 1, &res), 0);
    assert_int_equal(res.offset, 1);
    wal_close(wal);
    assert_int_equal(w.calls, 0);
    tu_waiter_destroy(&w);
}

typedef struct loop_req {
    wal_append_t *req;
    int calls;
    int status;
    wal_result_t res[8];
    size_t n;
    pthread_t thread;
    int *pending;
    struct event_base *base;
} loop_req_t;

static void loop_req_cb(wal_append_t *req, void *arg)
{
    loop_req_t *l = arg;
    l->calls++;
    l->thread = pthread_self();
    l->status = wal_append_status(req);
    l->n = wal_append_count(req);
    if (l->status == 0)
        for (size_t i = 0; i < l->n && i < 8; i++)
            l->res[i] = *wal_append_result(req, i);
    if (--*l->pending == 0)
        event_base_loopbreak(l->base);
}

static void loop_req_new(loop_req_t *l, struct event_base *base, int *pending)
{
    memset(l, 0, sizeof *l);
    l->pending = pending;
    l->base = base;
    assert_int_equal(wal_append_new(loop_req_cb, l, &l->req), 0);
}

static void loop_run(struct event_base *base, wal_t *wal, loop_req_t *l, size_t n, int *pending)
{
    *pending = (int)n;
    for (size_t i = 0; i < n; i++)
        assert_int_equal(wal_append_submit(wal, l[i].req), 0);
    assert_int_equal(event_base_loop(base, EVLOOP_NO_EXIT_ON_EMPTY), 0);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(l[i].calls, 1);
        assert_true(pthread_equal(l[i].thread, pthread_self()));
    }
}

/* Cursors: stream created earlier in the same request, cursor-only requests,
 * latest wins, and a request naming an unknown stream fails alone. */
static void test_cursors(void **state)
{
    const char *dir = *state;
    struct event_base *base = new_base();
    wal_t *wal = open_wal(dir, base);
    int pending = 0;
    loop_req_t l[4];
    wal_msg_t m = tu_msg("c.one", "x", 1);

    /* created by a message earlier in the same request */
    loop_req_new(&l[0], base, &pending);
    assert_int_equal(wal_append_add_msg(l[0].req, &m), 0);
    assert_int_equal(wal_append_add_cursor(l[0].req, "s1", 2, "c.one", 5, 1), 0);
    assert_int_equal(wal_append_add_cursor(l[0].req, "s2", 2, "c.one", 5, 0), 0);
    loop_run(base, wal, l, 1, &pending);
    assert_int_equal(l[0].status, 0);
    uint64_t v = 99;
    assert_int_equal(wal_cursor_get(wal, "s1", 2, "c.one", 5, &v), 0);
    assert_int_equal(v, 1);
    assert_int_equal(wal_cursor_get(wal, "s2", 2, "c.one", 5, &v), 0);
    assert_int_equal(v, 0);
    wal_append_free(l[0].req);

    /* a cursor added before the message that creates its stream. wal.h
     * says "created by a message earlier in the same request"; a WAL that
     * applies the request as a whole may accept it too. Either way the
     * request is atomic. */
    loop_req_new(&l[0], base, &pending);
    assert_int_equal(wal_append_add_cursor(l[0].req, "s1", 2, "c.two", 5, 1), 0);
    m = tu_msg("c.two", "y", 1);
    assert_int_equal(wal_append_add_msg(l[0].req, &m), 0);
    loop_run(base, wal, l, 1, &pending);
    int st = l[0].status;
    wal_append_free(l[0].req);
    wal_stream_info_t info;
    if (st == 0) {
        assert_int_equal(wal_stream_get(wal, "c.two", 5, &info), 0);
        assert_int_equal(info.next_offset, 2);
        assert_int_equal(wal_cursor_get(wal, "s1", 2, "c.two", 5, &v), 0);
        assert_int_equal(v, 1);
    } else {
        assert_int_equal(st, WAL_ENOTFOUND);
        assert_int_equal(wal_stream_get(wal, "c.two", 5, &info), WAL_ENOTFOUND);
        assert_int_equal(wal_cursor_get(wal, "s1", 2, "c.two", 5, &v), WAL_ENOTFOUND);
    }

    /* A ok, B fails (unknown stream), C ok: submitted together, so they may
     * share a transaction; only B is dropped and offsets have no hole. */
    for (int i = 0; i < 3; i++)
        loop_req_new(&l[i], base, &pending);
    m = tu_msg("c.one", "a", 1);
    m.producer = "pB";
    m.producer_len = 2;
    m.msgid = "a";
    m.msgid_len = 1;
    assert_int_equal(wal_append_add_msg(l[0].req, &m), 0);
    assert_int_equal(wal_append_add_cursor(l[0].req, "s1", 2, "c.one", 5, 2), 0);
    m.payload = "b";
    m.msgid = "b";
    assert_int_equal(wal_append_add_msg(l[1].req, &m), 0);
    wal_msg_t mnew = tu_msg("c.three", "b", 1);
    assert_int_equal(wal_append_add_msg(l[1].req, &mnew), 0);
    assert_int_equal(wal_append_add_cursor(l[1].req, "s1", 2, "c.one", 5, 77), 0);
    assert_int_equal(wal_append_add_cursor(l[1].req, "s1", 2, "c.nope", 6, 3), 0);
    m.payload = "c";
    m.msgid = "c";
    assert_int_equal(wal_append_add_msg(l[2].req, &m), 0);
    assert_int_equal(wal_append_add_cursor(l[2].req, "s1", 2, "c.one", 5, 3), 0);
    assert_int_equal(wal_append_add_cursor(l[2].req, "s1", 2, "c.one", 5, 4), 0);
    loop_run(base, wal, l, 3, &pending);
    assert_int_equal(l[0].status, 0);
    assert_int_equal(l[1].status, WAL_ENOTFOUND);
    assert_int_equal(l[2].status, 0);
    assert_int_equal(l[0].res[0].offset, 2);
    assert_int_equal(l[2].res[0].offset, 3);
    assert_int_equal(l[0].res[0].duplicate, 0);
    assert_int_equal(l[2].res[0].duplicate, 0);
    assert_true(l[2].res[0].seq > l[0].res[0].seq);
    assert_int_equal(wal_stream_get(wal, "c.one", 5, &info), 0);
    assert_int_equal(info.next_offset, 4);
    assert_int_equal(wal_stream_get(wal, "c.three", 7, &info), WAL_ENOTFOUND);
    uint32_t sid;
    uint64_t off;
    assert_int_equal(wal_dedup_get(wal, "pB", 2, "c.one", 5, "b", 1, &sid, &off), WAL_ENOTFOUND);
    assert_int_equal(wal_dedup_get(wal, "pB", 2, "c.one", 5, "c", 1, &sid, &off), 0);
    assert_int_equal(off, 3);
    assert_int_equal(wal_cursor_get(wal, "s1", 2, "c.one", 5, &v), 0);
    assert_int_equal(v, 4);
    tu_recs_t recs = {0};
    wal_read_result_t rr;
    assert_int_equal(wal_stream_read(wal, "c.one", 5, 1, 100, 1 << 20, tu_recs_cb, &recs, &rr), 0);
    assert_int_equal(recs.n, 3);
    assert_memory_equal(recs.v[1].payload, "a", 1);
    assert_memory_equal(recs.v[2].payload, "c", 1);
    tu_recs_free(&recs);
    for (int i = 0; i < 3; i++)
        wal_append_free(l[i].req);

    /* the failed request's dedup key was never taken: re-sending appends */
    m = tu_msg("c.one", "b", 1);
    m.producer = "pB";
    m.producer_len = 2;
    m.msgid = "b";
    m.msgid_len = 1;
    wal_result_t rres;
    assert_int_equal(wal_append_sync(wal, &m, 1, &rres), 0);
    assert_int_equal(rres.duplicate, 0);
    assert_int_equal(rres.offset, 4);

    /* cursor-only request; a lower value later still wins (latest, not max) */
    loop_req_new(&l[0], base, &pending);
    assert_int_equal(wal_append_add_cursor(l[0].req, "s1", 2, "c.one", 5, 1), 0);
    loop_run(base, wal, l, 1, &pending);
    assert_int_equal(l[0].status, 0);
    assert_int_equal(wal_append_count(l[0].req), 0);
    wal_append_free(l[0].req);
    assert_int_equal(wal_cursor_get(wal, "s1", 2, "c.one", 5, &v), 0);
    assert_int_equal(v, 1);
    assert_int_equal(wal_cursor_get(wal, "s3", 2, "c.one", 5, &v), WAL_ENOTFOUND);
    assert_int_equal(wal_cursor_get(wal, "s1", 2, "c.zzz", 5, &v), WAL_ENOTFOUND);

    /* cursors survive a reopen */
    wal_close(wal);
    wal = open_wal(dir, base);
    assert_int_equal(wal_cursor_get(wal, "s1", 2, "c.one", 5, &v), 0);
    assert_int_equal(v, 1);
    assert_int_equal(wal_cursor_get(wal, "s2", 2, "c.one", 5, &v), 0);
    assert_int_equal(v, 0);
    wal_close(wal);
    event_base_free(base);
}

/* A re-send in flight together with the original, and a duplicate inside
 * one request: appended once, the other copy gets the same offset. */
static void test_dup_in_flight(void **state)
{
    const char *dir = *state;
    struct event_base *base = new_base();
    wal_t *wal = open_wal(dir, base);
    int pending = 0;
    loop_req_t l[2];
    wal_msg_t m = tu_msg("d.one", "first", 5);
    m.producer = "prod";
    m.producer_len = 4;
    m.msgid = "k1";
    m.msgid_len = 2;
    wal_msg_t filler = tu_msg("d.one", "f", 1);
    assert_int_equal(wal_append_sync(wal, &filler, 1, NULL), 0);

    loop_req_new(&l[0], base, &pending);
    loop_req_new(&l[1], base, &pending);
    assert_int_equal(wal_append_add_msg(l[0].req, &m), 0);
    assert_int_equal(wal_append_add_msg(l[1].req, &m), 0);
    loop_run(base, wal, l, 2, &pending);
    assert_int_equal(l[0].status, 0);
    assert_int_equal(l[1].status, 0);
    assert_int_equal(l[0].res[0].duplicate + l[1].res[0].duplicate, 1);
    assert_int_equal(l[0].res[0].offset, 2);
    assert_int_equal(l[1].res[0].offset, 2);
    assert_int_equal(l[0].res[0].epoch, l[1].res[0].epoch);
    wal_append_free(l[0].req);
    wal_append_free(l[1].req);

    /* inside one request: [k2, other, k2] */
    wal_msg_t three[3] = {m, tu_msg("d.one", "o", 1), m};
    three[0].msgid = "k2";
    three[2].msgid = "k2";
    three[2].payload = "changed";
    three[2].payload_len = 7;
    wal_result_t res[3];
    assert_int_equal(wal_append_sync(wal, three, 3, res), 0);
    assert_int_equal(res[0].duplicate, 0);
    assert_int_equal(res[0].offset, 3);
    assert_int_equal(res[1].duplicate, 0);
    assert_int_equal(res[1].offset, 4);
    assert_int_equal(res[2].duplicate, 1);
    assert_int_equal(res[2].offset, 3);
    assert_int_equal(res[2].seq, 0);

    /* producer without msgid: no dedup */
    wal_msg_t nokey = tu_msg("d.one", "n", 1);
    nokey.producer = "prod";
    nokey.producer_len = 4;
    assert_int_equal(wal_append_sync(wal, &nokey, 1, res), 0);
    assert_int_equal(wal_append_sync(wal, &nokey, 1, res + 1), 0);
    assert_int_equal(res[0].offset, 5);
    assert_int_equal(res[1].offset, 6);
    assert_int_equal(res[1].duplicate, 0);

    /* the same msgid from another producer is another key */
    wal_msg_t other = m;
    other.producer = "prod2";
    other.producer_len = 5;
    assert_int_equal(wal_append_sync(wal, &other, 1, res), 0);
    assert_int_equal(res[0].duplicate, 0);
    assert_int_equal(res[0].offset, 7);

    tu_recs_t recs = {0};
    wal_read_result_t rr;
    assert_int_equal(wal_stream_read(wal, "d.one", 5, 1, 100, 1 << 20, tu_recs_cb, &recs, &rr), 0);
    assert_int_equal(recs.n, 7);
    assert_memory_equal(recs.v[2].payload, "first", 5); /* the first copy is kept */
    for (size_t i = 0; i < recs.n; i++)
        assert_int_equal(recs.v[i].offset, i + 1);
    tu_recs_free(&recs);

    wal_close(wal);
    event_base_free(base);
}

/* Reads at and past the end, and an empty stream read position. */
static void test_read_edges(void **state)
{
    const char *dir = *state;
    wal_t *wal = open_wal(dir, NULL);
    wal_msg_t m[3] = {tu_msg("e", "", 0), tu_msg("e", "1", 1), tu_msg("e", "22", 2)};
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t t0 = (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
    assert_int_equal(wal_append_sync(wal, m, 3, NULL), 0);
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t t1 = (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
    tu_recs_t recs = {0};
    wal_read_result_t rr;
    /* stamped times are wall-clock microseconds of the append */
    wal_stream_info_t info;
    assert_int_equal(wal_stream_get(wal, "e", 1, &info), 0);
    assert_true(info.created_us >= t0 && info.created_us <= t1);
    assert_int_equal(wal_stream_read(wal, "e", 1, 1, 10, 1 << 20, tu_recs_cb, &recs, &rr), 0);
    assert_int_equal(recs.n, 3);
    for (size_t i = 0; i < recs.n; i++)
        assert_true(recs.v[i].timestamp_us >= t0 && recs.v[i].timestamp_us <= t1);
    tu_recs_clear(&recs);
    /* from 0 is outside the contract (from >= 1): refused or read as 1 */
    int rc = wal_stream_read(wal, "e", 1, 0, 10, 1 << 20, tu_recs_cb, &recs, &rr);
    assert_true(rc == WAL_EINVAL || (rc == WAL_ETRUNCATED && rr.next == 1 && recs.n == 0) ||
                (rc == 0 && recs.n == 3 && recs.v[0].offset == 1));
    tu_recs_clear(&recs);
    rc = wal_log_read(wal, 0, 10, 1 << 20, tu_recs_cb, &recs, &rr);
    assert_true(rc == WAL_EINVAL || (rc == 0 && recs.n == 3));
    tu_recs_clear(&recs);
    /* every code has a name */
    for (int e = WAL_EBUSY; e <= 0; e++) {
        assert_non_null(wal_strerror(e));
        assert_true(wal_strerror(e)[0] != 0);
        for (int f = WAL_EBUSY; f < e; f++)
            assert_string_not_equal(wal_strerror(e), wal_strerror(f));
    }
    assert_non_null(wal_strerror(-1000));
    assert_non_null(wal_strerror(5));
    memset(&rr, 0, sizeof rr);
    assert_int_equal(wal_stream_read(wal, "e", 1, 4, 10, 100, tu_recs_cb, &recs, &rr), 0);
    assert_int_equal(recs.n, 0);
    assert_int_equal(rr.count, 0);
    assert_int_equal(rr.next, 4);
    assert_int_equal(wal_stream_read(wal, "e", 1, 50, 10, 100, tu_recs_cb, &recs, &rr), 0);
    assert_int_equal(recs.n, 0);
    /* max_bytes smaller than the first record still yields one */
    assert_int_equal(wal_stream_read(wal, "e", 1, 3, 10, 1, tu_recs_cb, &recs, &rr), 0);
    assert_int_equal(recs.n, 1);
    assert_int_equal(rr.next, 4);
    tu_recs_clear(&recs);
    assert_int_equal(wal_stream_read(wal, "e", 1, 1, 10, 1 << 20, tu_recs_cb, &recs, &rr), 0);
    assert_int_equal(recs.n, 3);
    assert_int_equal(recs.v[0].payload_len, 0);
    assert_int_equal(recs.v[0].producer_len, 0);
    assert_int_equal(recs.v[0].headers_len, 0);
    assert_int_equal(recs.v[2].payload_len, 2);
    tu_recs_clear(&recs);
    assert_int_equal(wal_log_read(wal, 100, 10, 100, tu_recs_cb, &recs, &rr), 0);
    assert_int_equal(recs.n, 0);
    tu_recs_free(&recs);
    wal_close(wal);
}

int main(void)
{
    evthread_use_pthreads();
    tu_master_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_limits, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_read_edges, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_cursors, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_dup_in_flight, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_model_random, tu_setup_dir, tu_teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
