/*
 * wal_retention_test.c - retention (dropping a prefix of the log), the map
 * growing and filling up, injected commit failures, and a format version
 * from the future.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include <errno.h>
#include <lmdb.h>

#include "wal_record.h"
#include "wal_test_util.h"
#include "wal_testing.h"

#define NSTREAMS    5
#define BATCH_MAX   64
#define FULL_ROUNDS 40 /* test_map_full_then_retain */

static const char *const names[NSTREAMS] = {"ret.a", "ret.b", "ret.c", "ret.d", "ret.e"};

/* What a test appended: every message by (stream, offset). */
typedef struct sent {
    uint32_t stream;
    uint64_t offset, seq;
    int keyed;
} sent_t;

typedef struct book {
    wal_t *wal;
    tu_rng_t rng;
    size_t pmax[NSTREAMS]; /* payload_max per stream */
    uint64_t next[NSTREAMS];
    sent_t *v;
    size_t n, cap;
    unsigned nstreams; /* streams 0..nstreams-1 are checked */
    unsigned pick;     /* appends go to streams 0..pick-1 ... */
    int force;         /* ... or all to this one (>= 0) */
} book_t;

static void book_init(book_t *b, wal_t *wal, uint64_t seed, size_t payload_max, unsigned nstreams)
{
    memset(b, 0, sizeof *b);
    b->wal = wal;
    b->rng.s = seed;
    for (int s = 0; s < NSTREAMS; s++)
        b->pmax[s] = payload_max;
    b->nstreams = nstreams;
    b->pick = nstreams;
    b->force = -1;
    for (int s = 0; s < NSTREAMS; s++)
        b->next[s] = 1;
}

static void key_of(uint32_t s, uint64_t off, char *buf, size_t cap)
{
    snprintf(buf, cap, "k-%u-%" PRIu64, s, off);
}

static int is_keyed(uint32_t s, uint64_t off)
{
    return tu_mix64(tu_pos_key(s, off) + 2) % 2 == 0;
}

/* Build n messages with content from (stream, predicted offset). */
static size_t build(book_t *b, size_t n, wal_msg_t *msgs, uint8_t **bufs, char (*keys)[32],
                    uint32_t *st, uint64_t *off)
{
    uint64_t next[NSTREAMS];
    memcpy(next, b->next, sizeof next);
    for (size_t i = 0; i < n; i++) {
        st[i] = b->force >= 0 ? (uint32_t)b->force : (uint32_t)tu_range(&b->rng, 0, b->pick - 1);
        off[i] = next[st[i]]++;
        size_t len = tu_pos_len(st[i], off[i], b->pmax[st[i]]);
        bufs[i] = malloc(len + 1);
        tu_fill(bufs[i], len, tu_pos_key(st[i], off[i]));
        msgs[i] = tu_msg(names[st[i]], bufs[i], len);
        if (is_keyed(st[i], off[i])) {
            key_of(st[i], off[i], keys[i], 32);
            msgs[i].producer = "ret-producer";
            msgs[i].producer_len = 12;
            msgs[i].msgid = keys[i];
            msgs[i].msgid_len = strlen(keys[i]);
        }
    }
    return n;
}

/* Append a batch of n; returns the status. On success the book records it
 * and checks the offsets were the predicted ones. */
static int book_append(book_t *b, size_t n)
{
    wal_msg_t msgs[BATCH_MAX];
    wal_result_t res[BATCH_MAX];
    uint8_t *bufs[BATCH_MAX];
    char keys[BATCH_MAX][32];
    uint32_t st[BATCH_MAX];
    uint64_t off[BATCH_MAX];
    assert_true(n >= 1 && n <= BATCH_MAX);
    build(b, n, msgs, bufs, keys, st, off);
    int rc = wal_append_sync(b->wal, msgs, n, res);
    for (size_t i = 0; i < n; i++)
        free(bufs[i]);
    if (rc)
        return rc;
    for (size_t i = 0; i < n; i++) {
        if (res[i].offset != off[i] || res[i].duplicate)
            fail_msg("stream %u: offset %" PRIu64 " (dup %d), expected %" PRIu64, st[i],
                     res[i].offset, res[i].duplicate, off[i]);
        b->next[st[i]] = off[i] + 1;
        if (b->n == b->cap) {
            b->cap = b->cap ? b->cap * 2 : 1024;
            b->v = realloc(b->v, b->cap * sizeof *b->v);
            assert_non_null(b->v);
        }
        b->v[b->n++] = (sent_t){st[i], off[i], res[i].seq, is_keyed(st[i], off[i])};
    }
    return 0;
}

typedef struct verify {
    uint32_t s;
    uint64_t expect;
    size_t payload_max;
    int bad;
} verify_t;

static int verify_cb(const wal_record_t *r, void *arg)
{
    verify_t *v = arg;
    size_t len = tu_pos_len(v->s, r->offset, v->payload_max);
    if (r->offset != v->expect || r->payload_len != len ||
        !tu_check_fill(r->payload, len, tu_pos_key(v->s, r->offset)) ||
        !tu_mem_eq(r->stream, r->stream_len, names[v->s], strlen(names[v->s])))
        v->bad++;
    v->expect = r->offset + 1;
    return 0;
}

/* Every stream holds exactly [first, next) with intact content, and each
 * recorded message with seq > dropped_upto is there. */
static void book_verify(book_t *b, uint64_t dropped_upto)
{
    for (uint32_t s = 0; s < b->nstreams; s++) {
        uint64_t first = b->next[s];
        for (size_t i = 0; i < b->n; i++)
            if (b->v[i].stream == s && b->v[i].seq > dropped_upto && b->v[i].offset < first)
                first = b->v[i].offset;
        wal_stream_info_t info;
        int rc = wal_stream_get(b->wal, names[s], strlen(names[s]), &info);
        if (b->next[s] == 1) {
            assert_int_equal(rc, WAL_ENOTFOUND);
            continue;
        }
        assert_int_equal(rc, 0);
        assert_int_equal(info.next_offset, b->next[s]);
        assert_int_equal(info.first_offset, first);
        verify_t v = {.s = s, .expect = first, .payload_max = b->pmax[s]};
        wal_read_result_t res;
        uint64_t from = first;
        for (;;) {
            memset(&res, 0, sizeof res);
            rc = wal_stream_read(b->wal, names[s], strlen(names[s]), from, 500, 4u << 20, verify_cb,
                                 &v, &res);
            assert_int_equal(rc, 0);
            if (res.count == 0)
                break;
            from = res.next;
        }
        assert_int_equal(v.bad, 0);
        assert_int_equal(v.expect, b->next[s]);
    }
}

static wal_t *open_opts(const wal_options_t *o)
{
    wal_t *wal = NULL;
    char err[256] = "";
    int rc = wal_open(o, NULL, &wal, err, sizeof err);
    if (rc)
        fail_msg("wal_open %s: %s (%s)", o->dir, wal_strerror(rc), err);
    return wal;
}

static wal_options_t opts(const char *dir)
{
    wal_options_t o;
    memset(&o, 0, sizeof o);
    o.dir = dir;
    return o;
}

/* ---- retention ------------------------------------------------------------------- */

static void check_after_retain(book_t *b, uint64_t upto)
{
    book_verify(b, upto);
    /* below the first offset: WAL_ETRUNCATED, res.next says where to go */
    for (uint32_t s = 0; s < b->nstreams; s++) {
        wal_stream_info_t info;
        assert_int_equal(wal_stream_get(b->wal, names[s], strlen(names[s]), &info), 0);
        if (info.first_offset == 1)
            continue;
        tu_recs_t recs = {0};
        wal_read_result_t res;
        uint64_t froms[2] = {1, info.first_offset - 1};
        for (int k = 0; k < 2; k++) {
            memset(&res, 0, sizeof res);
            assert_int_equal(wal_stream_read(b->wal, names[s], strlen(names[s]), froms[k], 10,
                                             1 << 20, tu_recs_cb, &recs, &res),
                             WAL_ETRUNCATED);
            assert_int_equal(res.next, info.first_offset);
            assert_int_equal(recs.n, 0);
        }
    }
    /* the log starts at the first kept sequence */
    uint64_t first_kept = UINT64_MAX;
    size_t kept = 0;
    for (size_t i = 0; i < b->n; i++)
        if (b->v[i].seq > upto) {
            kept++;
            if (b->v[i].seq < first_kept)
                first_kept = b->v[i].seq;
        }
    tu_recs_t recs = {0};
    wal_read_result_t res;
    assert_int_equal(wal_log_read(b->wal, 1, UINT32_MAX, UINT64_MAX, tu_recs_cb, &recs, &res), 0);
    assert_int_equal(recs.n, kept);
    if (kept)
        assert_int_equal(recs.v[0].seq, first_kept);
    for (size_t i = 1; i < recs.n; i++)
        assert_true(recs.v[i].seq > recs.v[i - 1].seq);
    tu_recs_free(&recs);
    wal_stats_t st;
    assert_int_equal(wal_stats_get(b->wal, &st), 0);
    if (kept)
        assert_int_equal(st.first_seq, first_kept);
    else
        assert_int_equal(st.first_seq, st.next_seq);
    /* dedup entries go with their records */
    for (size_t i = 0; i < b->n; i++) {
        if (!b->v[i].keyed)
            continue;
        char key[32];
        key_of(b->v[i].stream, b->v[i].offset, key, sizeof key);
        uint32_t sid;
        uint64_t off = 0;
        const char *sn = names[b->v[i].stream];
        int rc = wal_dedup_get(b->wal, "ret-producer", 12, sn, strlen(sn), key, strlen(key), &sid,
                               &off);
        if (b->v[i].seq <= upto) {
            assert_int_equal(rc, WAL_ENOTFOUND);
        } else {
            assert_int_equal(rc, 0);
            assert_int_equal(off, b->v[i].offset);
        }
    }
}

static void test_retain_prefix(void **state)
{
    const char *dir = *state;
    tu_rng_t r = tu_rng_for("retain_prefix");
    wal_options_t o = opts(dir);
    o.retain_chunk = 7; /* many chunks */
    wal_t *wal = open_opts(&o);
    book_t b;
    book_init(&b, wal, tu_rand(&r), 700, NSTREAMS);
    while (b.n < 600)
        assert_int_equal(book_append(&b, (size_t)tu_range(&r, 1, BATCH_MAX)), 0);
    /* a cursor is not retention's business */
    wal_append_t *req = NULL;
    tu_waiter_t w;
    tu_waiter_init(&w);
    assert_int_equal(wal_append_new(tu_waiter_cb, &w, &req), 0);
    assert_int_equal(wal_append_add_cursor(req, "sess", 4, names[0], strlen(names[0]), 3), 0);
    assert_int_equal(wal_append_submit(wal, req), 0);
    tu_waiter_wait(&w);
    assert_int_equal(wal_append_status(req), 0);
    wal_append_free(req);
    tu_waiter_destroy(&w);

    /* nothing below the first sequence */
    uint64_t dropped = 77;
    assert_int_equal(wal_retain(wal, 0, &dropped), 0);
    assert_int_equal(dropped, 0);

    uint64_t upto = b.v[tu_range(&r, b.n / 4, b.n / 2)].seq;
    size_t expect = 0;
    for (size_t i = 0; i < b.n; i++)
        expect += b.v[i].seq <= upto;
    assert_int_equal(wal_retain(wal, upto, &dropped), 0);
    assert_int_equal(dropped, expect);
    printf("# retained after seq %" PRIu64 ": dropped %" PRIu64 " of %zu\n", upto, dropped, b.n);
    check_after_retain(&b, upto);
    assert_int_equal(wal_retain(wal, upto, &dropped), 0);
    assert_int_equal(dropped, 0);
    uint64_t v = 0;
    assert_int_equal(wal_cursor_get(wal, "sess", 4, names[0], strlen(names[0]), &v), 0);
    assert_int_equal(v, 3);

    /* appends continue the offsets */
    for (int i = 0; i < 5; i++)
        assert_int_equal(book_append(&b, (size_t)tu_range(&r, 1, BATCH_MAX)), 0);
    check_after_retain(&b, upto);

    /* reopen: first offsets and heads are durable */
    wal_close(wal);
    b.wal = wal = open_opts(&o);
    check_after_retain(&b, upto);
    for (int i = 0; i < 5; i++)
        assert_int_equal(book_append(&b, (size_t)tu_range(&r, 1, BATCH_MAX)), 0);

    /* a dropped dedup key is new again */
    size_t first_keyed = b.n;
    for (size_t i = 0; i < b.n; i++)
        if (b.v[i].keyed && b.v[i].seq <= upto) {
            first_keyed = i;
            break;
        }
    assert_true(first_keyed < b.n);
    sent_t *old = &b.v[first_keyed];
    char key[32];
    key_of(old->stream, old->offset, key, sizeof key);
    wal_msg_t m = tu_msg(names[old->stream], "again", 5);
    m.producer = "ret-producer";
    m.producer_len = 12;
    m.msgid = key;
    m.msgid_len = strlen(key);
    wal_result_t ar;
    assert_int_equal(wal_append_sync(wal, &m, 1, &ar), 0);
    assert_int_equal(ar.duplicate, 0);
    assert_int_equal(ar.offset, b.next[old->stream]);
    b.next[old->stream]++; /* not in the book: the next step drops it */

    /* drop everything: streams stay, empty, and keep their offsets */
    wal_stats_t st;
    assert_int_equal(wal_stats_get(wal, &st), 0);
    assert_int_equal(wal_retain(wal, st.next_seq - 1, &dropped), 0);
    upto = st.next_seq - 1;
    check_after_retain(&b, upto);
    for (uint32_t s = 0; s < NSTREAMS; s++) {
        wal_stream_info_t info;
        assert_int_equal(wal_stream_get(wal, names[s], strlen(names[s]), &info), 0);
        assert_int_equal(info.first_offset, info.next_offset);
        tu_recs_t recs = {0};
        wal_read_result_t res;
        assert_int_equal(wal_stream_read(wal, names[s], strlen(names[s]), info.next_offset, 10, 100,
                                         tu_recs_cb, &recs, &res),
                         0);
        assert_int_equal(recs.n, 0);
    }
    assert_int_equal(book_append(&b, BATCH_MAX), 0);
    check_after_retain(&b, upto);
    wal_close(wal);
    wal = open_opts(&o);
    b.wal = wal;
    check_after_retain(&b, upto);
    wal_close(wal);
    free(b.v);
}

/* Appends from another thread while retention runs in small chunks. */
typedef struct appender {
    wal_t *wal;
    uint64_t next;
    unsigned batches;
} appender_t;

static void *appender_thread(void *p)
{
    appender_t *a = p;
    const uint32_t s = 3;
    for (unsigned b = 0; b < a->batches && tu_errors() == 0; b++) {
        enum { N = 8 };
        wal_msg_t msgs[N];
        wal_result_t res[N];
        uint8_t bufs[N][701];
        for (unsigned i = 0; i < N; i++) {
            uint64_t off = a->next + i;
            size_t len = tu_pos_len(s, off, 700);
            tu_fill(bufs[i], len, tu_pos_key(s, off));
            msgs[i] = tu_msg(names[s], bufs[i], len);
        }
        int rc = wal_append_sync(a->wal, msgs, N, res);
        TU_CHECK(rc == 0, "append during retention: %s", wal_strerror(rc));
        if (rc)
            break;
        for (unsigned i = 0; i < N; i++)
            TU_CHECK(res[i].offset == a->next + i, "offset %" PRIu64 ", expected %" PRIu64,
                     res[i].offset, a->next + i);
        a->next += N;
    }
    return NULL;
}

static void test_retain_concurrent_appends(void **state)
{
    const char *dir = *state;
    tu_rng_t r = tu_rng_for("retain_concurrent");
    tu_errors_reset();
    wal_options_t o = opts(dir);
    o.retain_chunk = 7;
    wal_t *wal = open_opts(&o);
    book_t b;
    book_init(&b, wal, tu_rand(&r), 700, 3);
    while (b.n < 3000)
        assert_int_equal(book_append(&b, (size_t)tu_range(&r, 1, BATCH_MAX)), 0);
    uint64_t upto = b.v[tu_range(&r, b.n / 2, b.n - 1)].seq;
    size_t expect = 0;
    for (size_t i = 0; i < b.n; i++)
        expect += b.v[i].seq <= upto;
    appender_t a = {.wal = wal, .next = 1, .batches = 200};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, appender_thread, &a), 0);
    uint64_t dropped = 0;
    int rc = wal_retain(wal, upto, &dropped);
    pthread_join(th, NULL);
    if (tu_errors())
        fail_msg("%u errors; first: %s", tu_errors(), tu_err_first);
    assert_int_equal(rc, 0);
    assert_int_equal(dropped, expect);
    book_verify(&b, upto);
    verify_t v = {.s = 3, .expect = 1, .payload_max = 700};
    tu_recs_t none = {0};
    wal_read_result_t res;
    assert_int_equal(wal_stream_read(wal, names[3], strlen(names[3]), 1, UINT32_MAX, UINT64_MAX,
                                     verify_cb, &v, &res),
                     0);
    assert_int_equal(v.bad, 0);
    assert_int_equal(v.expect, a.next);
    assert_int_equal(res.count, a.next - 1);
    assert_int_equal(wal_log_read(wal, 1, UINT32_MAX, UINT64_MAX, tu_recs_cb, &none, &res), 0);
    assert_int_equal(none.n, b.n - expect + (a.next - 1));
    for (size_t i = 1; i < none.n; i++)
        assert_true(none.v[i].seq > none.v[i - 1].seq);
    assert_true(none.v[0].seq > upto);
    tu_recs_free(&none);
    wal_close(wal);
    free(b.v);
}

/* ---- the map grows, then fills up ------------------------------------------------ */

static void test_map_growth(void **state)
{
    const char *dir = *state;
    tu_rng_t r = tu_rng_for("map_growth");
    wal_options_t o = opts(dir);
    o.map_size = 1u << 20;
    o.map_size_max = 64u << 20;
    wal_t *wal = open_opts(&o);
    book_t b;
    book_init(&b, wal, tu_rand(&r), 8000, NSTREAMS); /* about 4 KB each */
    while (b.n * 4000 < (20u << 20))
        assert_int_equal(book_append(&b, (size_t)tu_range(&r, 16, BATCH_MAX)), 0);
    wal_stats_t st;
    assert_int_equal(wal_stats_get(wal, &st), 0);
    printf("# growth: %zu messages, map %" PRIu64 " bytes after %" PRIu64 " grows, used %" PRIu64
           "\n",
           b.n, st.map_size, st.map_grows, st.used_bytes);
    assert_true(st.map_grows > 0);
    assert_true(st.map_size > (1u << 20));
    assert_true(st.map_size <= (64u << 20));
    assert_true(st.used_bytes > (16u << 20));
    assert_true(st.used_bytes <= st.map_size);
    /* a commit retried after growing the map may count as failed; nothing else */
    assert_true(st.failed_commits <= st.map_grows);
    book_verify(&b, 0);
    wal_close(wal);
    b.wal = wal = open_opts(&o);
    book_verify(&b, 0);
    assert_int_equal(book_append(&b, BATCH_MAX), 0);
    book_verify(&b, 0);
    wal_close(wal);
    free(b.v);
}

/* Fill a WAL with map_size_max 4 MiB until appends fail with WAL_EFULL;
 * check that it stays full without failing, and survives a reopen (if
 * `reopen`). Returns
 * with the WAL open (b->wal) and *o its options. */
static void fill_to_full(const char *dir, const char *tag, wal_options_t *o, book_t *bp, int reopen)
{
    tu_rng_t r = tu_rng_for(tag);
    *o = opts(dir);
    o->map_size = 1u << 20;
    o->map_size_max = 4u << 20;
    o->retain_chunk = 50;
    wal_t *wal = open_opts(o);
    book_t b;
    book_init(&b, wal, tu_rand(&r), 2000, 4);
    b.pick = 3;
    b.pmax[3] = 0; /* stream 3: empty payloads, to fill the last gaps */
    b.force = 3;
    assert_int_equal(book_append(&b, 1), 0);
    b.force = -1;
    int rc = 0;
    unsigned batches = 0;
    tu_rng_t before16, before1; /* the generator before the failed appends */
    do {
        before16 = b.rng;
        rc = book_append(&b, 16);
    } while (rc == 0 && ++batches < 100000);
    assert_int_equal(rc, WAL_EFULL);
    size_t after_batches = b.n;
    /* fill the rest with single messages */
    do {
        before1 = b.rng;
        rc = book_append(&b, 1);
    } while (rc == 0 && b.n < after_batches + 100000);
    assert_int_equal(rc, WAL_EFULL);
    /* and the last gaps with empty messages */
    size_t after_singles = b.n;
    tu_rng_t before0;
    b.force = 3;
    do {
        before0 = b.rng;
        rc = book_append(&b, 1);
    } while (rc == 0 && b.n < after_singles + 100000);
    b.force = -1;
    assert_int_equal(rc, WAL_EFULL);
    assert_int_equal(wal_is_failed(wal), 0);
    wal_stats_t st;
    assert_int_equal(wal_stats_get(wal, &st), 0);
    printf("# full: %zu messages acked (%zu in batches of 16, %zu empty), map %" PRIu64
           ", used %" PRIu64 ", %" PRIu64 " grows, %" PRIu64 " failed commits\n",
           b.n, after_batches, b.n - after_singles, st.map_size, st.used_bytes, st.map_grows,
           st.failed_commits);
    assert_true(st.map_size <= (4u << 20));
    /* the same requests keep failing, and that is not fatal */
    book_t retry = b;
    for (int i = 0; i < 3; i++) {
        retry.rng = before1;
        assert_int_equal(book_append(&retry, 1), WAL_EFULL);
        retry.rng = before16;
        assert_int_equal(book_append(&retry, 16), WAL_EFULL);
        retry.rng = before0;
        retry.force = 3;
        assert_int_equal(book_append(&retry, 1), WAL_EFULL);
        retry.force = -1;
    }
    assert_int_equal(wal_is_failed(wal), 0);
    book_verify(&b, 0);

    if (!reopen) {
        *bp = b;
        return;
    }
    /* reopen at full */
    wal_close(wal);
    b.wal = wal = open_opts(o);
    book_verify(&b, 0);
    retry = b;
    rc = book_append(&retry, 16);
    assert_true(rc == WAL_EFULL || rc == 0);
    if (rc == 0) {
        b = retry; /* freed pages were found after the reopen */
        printf("# after reopen a 16-message batch fit\n");
    }
    assert_int_equal(wal_is_failed(wal), 0);

    *bp = b;
}

/* At the maximum map size, retention must still be able to free space:
 * otherwise a full WAL can never resume ("service resumes when space
 * returns"). */
static void test_map_full_then_retain(void **state)
{
    wal_options_t o;
    book_t b;
    fill_to_full(*state, "map_full_then_retain", &o, &b, 0);
    /* retention frees pages; appends resume where the offsets stopped */
    uint64_t upto = b.v[b.n / 2].seq;
    uint64_t dropped = 0;
    int rc = wal_retain(b.wal, upto, &dropped);
    if (rc)
        fail_msg("wal_retain on a full map: %s", wal_strerror(rc));
    assert_true(dropped > 0);
    for (int i = 0; i < 10; i++)
        assert_int_equal(book_append(&b, 16), 0);
    check_after_retain(&b, upto);

    /* full again, trimmed again, many times: it keeps recovering (the
     * headroom retention needs must not be eaten by appends over time) */
    for (int round = 0; round < FULL_ROUNDS; round++) {
        unsigned batches = 0;
        while ((rc = book_append(&b, 16)) == 0 && ++batches < 100000)
            ;
        assert_int_equal(rc, WAL_EFULL);
        do
            rc = book_append(&b, 1);
        while (rc == 0);
        assert_int_equal(rc, WAL_EFULL);
        assert_int_equal(wal_is_failed(b.wal), 0);
        /* drop all but the newest quarter of what is held */
        size_t held = 0, k = 0;
        for (size_t i = 0; i < b.n; i++)
            held += b.v[i].seq > upto;
        for (size_t i = 0; i < b.n; i++)
            if (b.v[i].seq > upto && ++k == held * 3 / 4) {
                upto = b.v[i].seq;
                break;
            }
        wal_stats_t rs;
        assert_int_equal(wal_stats_get(b.wal, &rs), 0);
        if (round % 10 == 0)
            printf("# round %d full: map %" PRIu64 ", used %" PRIu64 "\n", round, rs.map_size,
                   rs.used_bytes);
        rc = wal_retain(b.wal, upto, &dropped);
        if (rc)
            fail_msg("round %d: wal_retain on a full map (map %" PRIu64 ", used %" PRIu64
                     ", map_size_max %" PRIu64 "): %s",
                     round, rs.map_size, rs.used_bytes, o.map_size_max, wal_strerror(rc));
        assert_true(dropped > 0);
        for (int i = 0; i < 5; i++)
            assert_int_equal(book_append(&b, 16), 0);
        check_after_retain(&b, upto);
    }
    wal_stats_t st;
    assert_int_equal(wal_stats_get(b.wal, &st), 0);
    printf("# after %d rounds of full and trim: map %" PRIu64 " (max %" PRIu64
           "), %zu messages written\n",
           FULL_ROUNDS + 1, st.map_size, o.map_size_max, b.n);
    wal_close(b.wal);
    free(b.v);
}

/* The other way out: reopen with a larger map_size_max. */
static void test_map_full_then_bigger_map(void **state)
{
    wal_options_t o;
    book_t b;
    fill_to_full(*state, "map_full_then_bigger", &o, &b, 1);
    wal_close(b.wal);
    o.map_size_max = 16u << 20;
    b.wal = open_opts(&o);
    for (int i = 0; i < 20; i++)
        assert_int_equal(book_append(&b, 16), 0);
    book_verify(&b, 0);
    uint64_t upto = b.v[b.n / 2].seq, dropped = 0;
    assert_int_equal(wal_retain(b.wal, upto, &dropped), 0);
    assert_true(dropped > 0);
    check_after_retain(&b, upto);
    wal_close(b.wal);
    free(b.v);
}

/* ---- injected commit failures ------------------------------------------------------ */

static void test_fail_eio(void **state)
{
    const char *dir = *state;
    tu_rng_t r = tu_rng_for("fail_eio");
    wal_options_t o = opts(dir);
    wal_t *wal = open_opts(&o);
    book_t b;
    book_init(&b, wal, tu_rand(&r), 500, NSTREAMS);
    for (int i = 0; i < 10; i++)
        assert_int_equal(book_append(&b, (size_t)tu_range(&r, 1, BATCH_MAX)), 0);
    assert_int_equal(wal_is_failed(wal), 0);

    wal_testing_fail_commits(wal, EIO, 1);
    book_t lost = b;
    assert_int_equal(book_append(&lost, 20), WAL_EFATAL);
    assert_int_equal(wal_is_failed(wal), 1);
    /* fail-stop: no later append is tried, even though the injection is spent */
    assert_int_equal(book_append(&lost, 3), WAL_EFATAL);
    tu_waiter_t w;
    tu_waiter_init(&w);
    wal_append_t *req = NULL;
    wal_msg_t m = tu_msg(names[0], "late", 4);
    assert_int_equal(wal_append_new(tu_waiter_cb, &w, &req), 0);
    assert_int_equal(wal_append_add_msg(req, &m), 0);
    {
        int rc = wal_append_submit(wal, req);
        if (rc == 0) {
            tu_waiter_wait(&w);
            fail_msg("submit on a failed WAL was accepted (callback status %s)",
                     wal_strerror(wal_append_status(req)));
        }
        assert_int_equal(rc, WAL_EFATAL);
    }
    wal_append_free(req);
    assert_int_equal(w.calls, 0);
    tu_waiter_destroy(&w);
    wal_stats_t st;
    assert_int_equal(wal_stats_get(wal, &st), 0);
    assert_true(st.failed_commits >= 1);
    wal_close(wal);

    /* the data before the failure is intact; the WAL works again */
    b.wal = wal = open_opts(&o);
    assert_int_equal(wal_is_failed(wal), 0);
    book_verify(&b, 0);
    assert_int_equal(book_append(&b, 20), 0);
    book_verify(&b, 0);
    wal_close(wal);
    free(b.v);
}

/* An asynchronous request in the failing commit gets WAL_EFATAL in its
 * callback. */
static void test_fail_eio_async(void **state)
{
    const char *dir = *state;
    wal_t *wal = open_opts(&(wal_options_t){.dir = dir});
    wal_msg_t m = tu_msg("async", "one", 3);
    assert_int_equal(wal_append_sync(wal, &m, 1, NULL), 0);
    wal_testing_fail_commits(wal, EIO, 1);
    tu_waiter_t w;
    tu_waiter_init(&w);
    wal_append_t *req = NULL;
    assert_int_equal(wal_append_new(tu_waiter_cb, &w, &req), 0);
    assert_int_equal(wal_append_add_msg(req, &m), 0);
    assert_int_equal(wal_append_submit(wal, req), 0);
    tu_waiter_wait(&w);
    assert_int_equal(w.calls, 1);
    assert_int_equal(wal_append_status(req), WAL_EFATAL);
    wal_append_free(req);
    tu_waiter_destroy(&w);
    assert_int_equal(wal_is_failed(wal), 1);
    wal_close(wal);
    wal = open_opts(&(wal_options_t){.dir = dir});
    wal_stream_info_t info;
    assert_int_equal(wal_stream_get(wal, "async", 5, &info), 0);
    assert_int_equal(info.next_offset, 2);
    wal_close(wal);
}

static void test_fail_enospc(void **state)
{
    const char *dir = *state;
    tu_rng_t r = tu_rng_for("fail_enospc");
    wal_options_t o = opts(dir);
    wal_t *wal = open_opts(&o);
    book_t b;
    book_init(&b, wal, tu_rand(&r), 500, NSTREAMS);
    for (int i = 0; i < 10; i++)
        assert_int_equal(book_append(&b, (size_t)tu_range(&r, 1, BATCH_MAX)), 0);

    /* the failed batch leaves no trace: retrying it gets the same offsets */
    for (unsigned count = 1; count <= 2; count++) {
        wal_testing_fail_commits(wal, ENOSPC, count);
        for (unsigned k = 0; k < count; k++) {
            book_t again = b;
            assert_int_equal(book_append(&again, 20), WAL_EFULL);
            assert_int_equal(wal_is_failed(wal), 0);
        }
        assert_int_equal(book_append(&b, 20), 0); /* checks the predicted offsets */
        book_verify(&b, 0);
    }
    wal_stats_t st;
    assert_int_equal(wal_stats_get(wal, &st), 0);
    assert_int_equal(st.failed_commits, 3);

    /* a failed batch that would have created a stream leaves no stream */
    wal_testing_fail_commits(wal, ENOSPC, 1);
    wal_msg_t m = tu_msg("ret.fresh", "x", 1);
    m.producer = "fp";
    m.producer_len = 2;
    m.msgid = "f1";
    m.msgid_len = 2;
    wal_result_t res;
    assert_int_equal(wal_append_sync(wal, &m, 1, &res), WAL_EFULL);
    wal_stream_info_t info;
    assert_int_equal(wal_stream_get(wal, "ret.fresh", 9, &info), WAL_ENOTFOUND);
    uint32_t sid;
    uint64_t off;
    assert_int_equal(wal_dedup_get(wal, "fp", 2, "ret.fresh", 9, "f1", 2, &sid, &off),
                     WAL_ENOTFOUND);
    assert_int_equal(wal_append_sync(wal, &m, 1, &res), 0);
    assert_int_equal(res.offset, 1);
    assert_int_equal(res.duplicate, 0);
    assert_int_equal(wal_stream_get(wal, "ret.fresh", 9, &info), 0);
    uint32_t fresh_id = info.id;
    uint64_t fresh_epoch = info.epoch;
    for (uint32_t s = 0; s < NSTREAMS; s++) {
        wal_stream_info_t other;
        assert_int_equal(wal_stream_get(wal, names[s], strlen(names[s]), &other), 0);
        assert_int_not_equal(other.id, fresh_id);
    }
    wal_close(wal);
    b.wal = wal = open_opts(&o);
    book_verify(&b, 0);
    assert_int_equal(wal_stream_get(wal, "ret.fresh", 9, &info), 0);
    assert_int_equal(info.id, fresh_id);
    assert_int_equal(info.epoch, fresh_epoch);
    assert_int_equal(info.next_offset, 2);
    assert_int_equal(wal_dedup_get(wal, "fp", 2, "ret.fresh", 9, "f1", 2, &sid, &off), 0);
    assert_int_equal(sid, fresh_id);
    assert_int_equal(off, 1);
    wal_close(wal);
    free(b.v);
}

/* ---- format version ---------------------------------------------------------------- */

static void set_format_version(const char *dir, uint32_t version, uint32_t *ret_old)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 8), 0);
    assert_int_equal(mdb_env_open(env, dir, 0, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "meta", 0, &dbi), 0);
    MDB_val k = {14, (void *)"format_version"}, v;
    int rc = mdb_get(txn, dbi, &k, &v);
    if (rc)
        fail_msg("meta/format_version: %s", mdb_strerror(rc));
    assert_int_equal(v.mv_size, 4);
    *ret_old = wal_get_le32(v.mv_data);
    uint8_t buf[4];
    wal_put_le32(buf, version);
    v.mv_size = 4;
    v.mv_data = buf;
    assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
}

static void test_newer_version(void **state)
{
    const char *dir = *state;
    wal_options_t o = opts(dir);
    wal_t *wal = open_opts(&o);
    wal_msg_t m = tu_msg("v", "x", 1);
    assert_int_equal(wal_append_sync(wal, &m, 1, NULL), 0);
    wal_close(wal);

    uint32_t old = 0;
    set_format_version(dir, 99, &old);
    assert_int_equal(old, WAL_FORMAT_VERSION);
    wal = (wal_t *)(uintptr_t)0x1;
    char err[256] = "";
    assert_int_equal(wal_open(&o, NULL, &wal, err, sizeof err), WAL_EVERSION);
    assert_true(wal == (wal_t *)(uintptr_t)0x1);
    printf("# errbuf: %s\n", err);
    assert_non_null(strstr(err, "99"));
    o.read_only = 1;
    err[0] = 0;
    assert_int_equal(wal_open(&o, NULL, &wal, err, sizeof err), WAL_EVERSION);
    assert_non_null(strstr(err, "99"));
    o.read_only = 0;

    /* the refused open changed nothing; the old version opens again */
    set_format_version(dir, WAL_FORMAT_VERSION, &old);
    assert_int_equal(old, 99);
    wal = open_opts(&o);
    wal_stream_info_t info;
    assert_int_equal(wal_stream_get(wal, "v", 1, &info), 0);
    assert_int_equal(info.next_offset, 2);
    wal_close(wal);
}

/* A crash between LMDB creating data.mdb and the WAL's first commit leaves
 * an environment with no databases: the next open must initialise it. */
static void test_open_empty_env(void **state)
{
    const char *dir = *state;
    MDB_env *env;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_open(env, dir, 0, 0600), 0);
    mdb_env_close(env);
    char path[256];
    snprintf(path, sizeof path, "%s/data.mdb", dir);
    assert_true(tu_exists(path));
    wal_t *wal = open_opts(&(wal_options_t){.dir = dir});
    wal_msg_t m = tu_msg("e", "x", 1);
    wal_result_t res;
    assert_int_equal(wal_append_sync(wal, &m, 1, &res), 0);
    assert_int_equal(res.offset, 1);
    wal_close(wal);
    wal = open_opts(&(wal_options_t){.dir = dir});
    wal_stream_info_t info;
    assert_int_equal(wal_stream_get(wal, "e", 1, &info), 0);
    assert_int_equal(info.next_offset, 2);
    wal_close(wal);
}

int main(void)
{
    tu_master_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_retain_prefix, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_retain_concurrent_appends, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_map_growth, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_map_full_then_retain, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_map_full_then_bigger_map, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_fail_eio, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_fail_eio_async, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_fail_enospc, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_newer_version, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_open_empty_env, tu_setup_dir, tu_teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
