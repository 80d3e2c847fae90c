/*
 * broker_test.c - the broker on a real WAL and event loop, with a recording
 * ops table in place of a connection: fan-out shares one encoded frame,
 * flow control stops at max_inflight, acks become durable cursors (timer,
 * close, flush), ack beyond delivered is refused.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <event2/event.h>
#include <event2/thread.h>
#include <msgpack.h>

#include "broker.h"
#include "wal.h"
#include "wal_testing.h"

#define MAX_FRAMES 4096

typedef struct rec_conn {
    brk_frame_t *frames[MAX_FRAMES];
    size_t n;
    int kicked;
    int durable_calls, durable_status;
} rec_conn_t;

static void rec_send(void *conn, brk_frame_t *f)
{
    rec_conn_t *r = conn;
    assert_true(r->n < MAX_FRAMES);
    brk_frame_ref(f);
    r->frames[r->n++] = f;
}

static size_t rec_pending(void *conn)
{
    (void)conn;
    return 0;
}

static void rec_kick(void *conn)
{
    ((rec_conn_t *)conn)->kicked++;
}

static void rec_durable(void *conn, int status)
{
    rec_conn_t *r = conn;
    r->durable_calls++;
    r->durable_status = status;
}

static const brk_client_ops_t rec_ops = {rec_send, rec_pending, NULL, rec_kick, NULL, rec_durable};

static void rec_clear(rec_conn_t *r)
{
    for (size_t i = 0; i < r->n; i++)
        brk_frame_unref(r->frames[i]);
    r->n = 0;
}

/* The "t" of frame i, and its "offset" for msg frames. */
static void frame_info(const rec_conn_t *r, size_t i, char *type, size_t tlen, uint64_t *offset)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    assert_int_equal(
        msgpack_unpack_next(&u, (const char *)r->frames[i]->data, r->frames[i]->len, NULL),
        MSGPACK_UNPACK_SUCCESS);
    assert_int_equal(u.data.type, MSGPACK_OBJECT_MAP);
    *offset = 0;
    type[0] = '\0';
    for (uint32_t k = 0; k < u.data.via.map.size; k++) {
        msgpack_object_kv *kv = &u.data.via.map.ptr[k];
        const char *key = kv->key.via.str.ptr;
        size_t kl = kv->key.via.str.size;
        if (kl == 1 && key[0] == 't')
            snprintf(type, tlen, "%.*s", (int)kv->val.via.str.size, kv->val.via.str.ptr);
        if (kl == 6 && memcmp(key, "offset", 6) == 0)
            *offset = kv->val.via.u64;
    }
    msgpack_unpacked_destroy(&u);
}

static size_t count_type(const rec_conn_t *r, const char *t)
{
    size_t n = 0;
    for (size_t i = 0; i < r->n; i++) {
        char type[16];
        uint64_t off;
        frame_info(r, i, type, sizeof(type), &off);
        n += strcmp(type, t) == 0;
    }
    return n;
}

typedef struct fixture {
    char dir[64];
    struct event_base *base;
    wal_t *wal;
    brk_t *brk;
    int api_done;
} fixture_t;

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    strcpy(f->dir, "/var/tmp/arq-brk-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    evthread_use_pthreads();
    f->base = event_base_new();
    wal_options_t o = {.dir = f->dir};
    assert_int_equal(wal_open(&o, f->base, &f->wal, NULL, 0), 0);
    brk_options_t bo = {.max_inflight = 4};
    assert_int_equal(brk_new(f->base, f->wal, &bo, &f->brk), 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    wal_close(f->wal);
    brk_free(f->brk);
    event_base_free(f->base);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", f->dir);
    assert_int_equal(system(cmd), 0);
    free(f);
    return 0;
}

static void api_cb(int status, uint64_t offset, int dup, void *arg)
{
    (void)offset;
    (void)dup;
    fixture_t *f = arg;
    assert_int_equal(status, 0);
    f->api_done++;
}

static void publish_n(fixture_t *f, const char *stream, int n)
{
    int want = f->api_done + n;
    for (int i = 0; i < n; i++)
        assert_int_equal(brk_publish_api(f->brk, "arq:api:test", stream, strlen(stream),
                                         (const uint8_t *)"data", 4, NULL, 0, NULL, 0,
                                         BRK_ACK_DEFAULT, api_cb, f),
                         0);
    for (int i = 0; i < 1000 && f->api_done < want; i++)
        event_base_loop(f->base, EVLOOP_ONCE);
    assert_int_equal(f->api_done, want);
}

/* Run the loop until the cursor reads `want` (bounded). */
static void wait_cursor(fixture_t *f, const char *session, const char *stream, uint64_t want)
{
    uint64_t got = 0;
    for (int i = 0; i < 200; i++) {
        if (wal_cursor_get(f->wal, session, strlen(session), stream, strlen(stream), &got) == 0 &&
            got == want)
            return;
        struct timeval tv = {0, 20000};
        event_base_loopexit(f->base, &tv);
        event_base_dispatch(f->base);
    }
    fail_msg("cursor (%s, %s) is %llu, want %llu", session, stream, (unsigned long long)got,
             (unsigned long long)want);
}

static void test_fanout_shares_frames(void **state)
{
    fixture_t *f = *state;
    rec_conn_t a = {0}, b = {0};
    brk_client_t *ca, *cb;
    assert_int_equal(
        brk_client_new(f->brk, &rec_ops, &a, "sa", "pa", NULL, (size_t)-1, NULL, (size_t)-1, &ca),
        0);
    assert_int_equal(
        brk_client_new(f->brk, &rec_ops, &b, "sb", "pb", NULL, (size_t)-1, NULL, (size_t)-1, &cb),
        0);
    brk_subscribe(ca, 1, (const uint8_t *)"fan.s", 5, 2 /* latest */, 0, 0);
    brk_subscribe(cb, 1, (const uint8_t *)"fan.s", 5, 2, 0, 0);
    assert_int_equal(count_type(&a, "subok"), 1);
    rec_clear(&a);
    rec_clear(&b);
    publish_n(f, "fan.s", 3);
    assert_int_equal(a.n, 3);
    assert_int_equal(b.n, 3);
    for (size_t i = 0; i < 3; i++) {
        /* the very same buffer: encoded once, not per subscriber */
        assert_ptr_equal(a.frames[i], b.frames[i]);
        char t[16];
        uint64_t off;
        frame_info(&a, i, t, sizeof(t), &off);
        assert_string_equal(t, "msg");
        assert_int_equal(off, i + 1);
    }
    brk_client_close(ca);
    brk_client_close(cb);
    rec_clear(&a);
    rec_clear(&b);
}

static void test_flow_control_and_cursors(void **state)
{
    fixture_t *f = *state;
    publish_n(f, "flow.s", 10);
    rec_conn_t r = {0};
    brk_client_t *c;
    assert_int_equal(
        brk_client_new(f->brk, &rec_ops, &r, "sess-1", "p", NULL, (size_t)-1, NULL, (size_t)-1, &c),
        0);
    brk_subscribe(c, 7, (const uint8_t *)"flow.s", 6, 1 /* earliest */, 0, 0);
    /* subok + max_inflight (4) messages, then nothing until an ack */
    assert_int_equal(count_type(&r, "subok"), 1);
    assert_int_equal(count_type(&r, "msg"), 4);
    brk_ack(c, (const uint8_t *)"flow.s", 6, 2);
    assert_int_equal(count_type(&r, "msg"), 6);
    /* ack beyond what was delivered (6) is refused, nothing changes */
    brk_ack(c, (const uint8_t *)"flow.s", 6, 9);
    assert_int_equal(count_type(&r, "error"), 1);
    assert_int_equal(count_type(&r, "msg"), 6);
    /* the batched flush makes the ack durable */
    wait_cursor(f, "sess-1", "flow.s", 2);
    brk_ack(c, (const uint8_t *)"flow.s", 6, 5);
    brk_flush(f->brk);
    wait_cursor(f, "sess-1", "flow.s", 5);
    /* closing with an unpersisted ack persists it */
    brk_ack(c, (const uint8_t *)"flow.s", 6, 6);
    brk_client_close(c);
    wait_cursor(f, "sess-1", "flow.s", 6);
    brk_stats_t st;
    brk_stats_get(f->brk, &st);
    assert_true(st.cursor_commits >= 3);
    assert_int_equal(st.cursor_errors, 0);
    rec_clear(&r);
}

static void test_gap_and_catchup_from_wal(void **state)
{
    fixture_t *f = *state;
    /* more than the tail cache holds: early offsets come from WAL reads */
    publish_n(f, "big.s", 1100);
    uint64_t dropped = 0;
    wal_stats_t ws;
    assert_int_equal(wal_stats_get(f->wal, &ws), 0);
    assert_int_equal(wal_retain(f->wal, ws.first_seq + 9, &dropped), 0); /* offsets 1..10 */
    assert_int_equal(dropped, 10);
    rec_conn_t r = {0};
    brk_client_t *c;
    assert_int_equal(
        brk_client_new(f->brk, &rec_ops, &r, "sess-g", "p", NULL, (size_t)-1, NULL, (size_t)-1, &c),
        0);
    brk_subscribe(c, 1, (const uint8_t *)"big.s", 5, 3 /* offset */, 1, 0);
    assert_int_equal(count_type(&r, "gap"), 1);
    size_t msgs = count_type(&r, "msg");
    assert_int_equal(msgs, 4); /* max_inflight */
    char t[16];
    uint64_t off;
    frame_info(&r, r.n - 4, t, sizeof(t), &off);
    assert_int_equal(off, 11); /* right after the gap */
    brk_stats_t st;
    brk_stats_get(f->brk, &st);
    assert_true(st.catchup_reads > 0);
    brk_client_close(c);
    rec_clear(&r);
}

/* Offsets of the msg frames in r, in order, from index `from`. */
static size_t msg_offsets(const rec_conn_t *r, size_t from, uint64_t *out, size_t cap)
{
    size_t n = 0;
    for (size_t i = from; i < r->n && n < cap; i++) {
        char t[16];
        uint64_t off;
        frame_info(r, i, t, sizeof(t), &off);
        if (strcmp(t, "msg") == 0)
            out[n++] = off;
    }
    return n;
}

struct subs_seen {
    char stream[32];
    uint64_t epoch, acked, next;
    int n;
};

static void subs_cb(const char *stream, size_t len, uint64_t epoch, uint64_t acked, uint64_t next,
                    void *arg)
{
    struct subs_seen *ss = arg;
    snprintf(ss->stream, sizeof(ss->stream), "%.*s", (int)len, stream);
    ss->epoch = epoch;
    ss->acked = acked;
    ss->next = next;
    ss->n++;
}

static const uint8_t SECRET[32] = {1, 2, 3};
static const uint8_t OTHER[32] = {9};

/* A session survives its connection: a new connection presenting the
 * secret gets its subscription back, delivering after the acked offset,
 * so what was delivered but not acked comes again. */
static void test_session_resume(void **state)
{
    fixture_t *f = *state;
    publish_n(f, "res.s", 6);
    rec_conn_t r1 = {0}, r2 = {0}, r3 = {0};
    brk_client_t *c1, *c2, *c3;
    assert_int_equal(brk_client_new(f->brk, &rec_ops, &r1, "sess-r", "sess-r", NULL, (size_t)-1,
                                    NULL, (size_t)-1, &c1),
                     0);
    assert_int_equal(brk_session_create(c1, "", "127.0.0.1", SECRET, sizeof(SECRET)), 0);
    brk_subscribe(c1, 1, (const uint8_t *)"res.s", 5, 3 /* offset */, 2, 0);
    assert_int_equal(count_type(&r1, "msg"), 4); /* 2..5 (max_inflight 4) */
    brk_ack(c1, (const uint8_t *)"res.s", 5, 3);
    brk_client_close(c1);
    wait_cursor(f, "sess-r", "res.s", 3);

    assert_true(brk_session_resumable(f->brk, "sess-r", "", SECRET, sizeof(SECRET)));
    assert_false(brk_session_resumable(f->brk, "sess-r", "", OTHER, sizeof(OTHER)));
    assert_false(brk_session_resumable(f->brk, "sess-r", "mallory", SECRET, sizeof(SECRET)));
    assert_false(brk_session_resumable(f->brk, "sess-x", "", SECRET, sizeof(SECRET)));

    assert_int_equal(brk_client_new(f->brk, &rec_ops, &r2, "sess-r", "sess-r", NULL, (size_t)-1,
                                    NULL, (size_t)-1, &c2),
                     0);
    assert_int_equal(brk_session_resume(c2, "", SECRET, sizeof(SECRET)), 1);
    struct subs_seen ss = {0};
    brk_client_subs(c2, subs_cb, &ss);
    assert_int_equal(ss.n, 1);
    assert_string_equal(ss.stream, "res.s");
    assert_int_equal(ss.acked, 3);
    assert_int_equal(ss.next, 7);
    assert_int_not_equal(ss.epoch, 0);
    assert_int_equal(r2.n, 0); /* nothing before brk_client_start (the welcome goes first) */
    brk_client_start(c2);
    uint64_t offs[8];
    assert_int_equal(msg_offsets(&r2, 0, offs, 8), 3);
    assert_int_equal(offs[0], 4); /* 4 and 5 again: delivered, not acked */
    assert_int_equal(offs[2], 6);
    brk_ack(c2, (const uint8_t *)"res.s", 5, 5);

    /* Taken over while connected: c2 is kicked, its in-memory ack (5, not
     * yet flushed) carries over to c3. */
    assert_true(brk_session_resumable(f->brk, "sess-r", "", SECRET, sizeof(SECRET)));
    assert_int_equal(brk_client_new(f->brk, &rec_ops, &r3, "sess-r", "sess-r", NULL, (size_t)-1,
                                    NULL, (size_t)-1, &c3),
                     0);
    assert_int_equal(brk_session_resume(c3, "", SECRET, sizeof(SECRET)), 1);
    assert_int_equal(r2.kicked, 1);
    memset(&ss, 0, sizeof(ss));
    brk_client_subs(c3, subs_cb, &ss);
    assert_int_equal(ss.acked, 5);
    brk_client_start(c3);
    assert_int_equal(msg_offsets(&r3, 0, offs, 8), 1);
    assert_int_equal(offs[0], 6);
    /* the kicked client gets nothing more, and closing it later is harmless */
    size_t before = r2.n;
    publish_n(f, "res.s", 1);
    assert_int_equal(r2.n, before);
    brk_client_close(c2);
    assert_int_equal(msg_offsets(&r3, 0, offs, 8), 2);
    wait_cursor(f, "sess-r", "res.s", 5);

    /* unsubscribe removes the subscription from the session */
    brk_unsubscribe(c3, 2, (const uint8_t *)"res.s", 5);
    brk_client_close(c3);
    uint64_t got = 0;
    for (int i = 0; i < 200; i++) {
        if (wal_cursor_get(f->wal, "sess-r", 6, "res.s", 5, &got) == WAL_ENOTFOUND)
            break;
        struct timeval tv = {0, 20000};
        event_base_loopexit(f->base, &tv);
        event_base_dispatch(f->base);
    }
    assert_int_equal(wal_cursor_get(f->wal, "sess-r", 6, "res.s", 5, &got), WAL_ENOTFOUND);
    brk_stats_t st;
    brk_stats_get(f->brk, &st);
    assert_int_equal(st.sessions_created, 1);
    assert_int_equal(st.sessions_resumed, 2);
    assert_int_equal(st.sessions_taken_over, 1);
    assert_int_equal(st.sessions_live, 0);
    assert_int_equal(st.cursor_errors, 0);
    rec_clear(&r1);
    rec_clear(&r2);
    rec_clear(&r3);
}

struct sub_list {
    char names[8][32];
    uint64_t acked[8];
    int n;
};

static void sub_list_cb(const char *stream, size_t len, uint64_t epoch, uint64_t acked,
                        uint64_t next, void *arg)
{
    (void)epoch;
    (void)next;
    struct sub_list *l = arg;
    if (l->n < 8) {
        snprintf(l->names[l->n], sizeof(l->names[0]), "%.*s", (int)len, stream);
        l->acked[l->n] = acked;
    }
    l->n++;
}

/* Resume session on a new client at once (no loop turn before). */
static brk_client_t *resume_now(fixture_t *f, rec_conn_t *r, const char *session,
                                struct sub_list *l)
{
    brk_client_t *c;
    assert_int_equal(brk_client_new(f->brk, &rec_ops, r, session, session, NULL, (size_t)-1, NULL,
                                    (size_t)-1, &c),
                     0);
    assert_true(brk_session_resumable(f->brk, session, "", SECRET, sizeof(SECRET)));
    (void)brk_session_resume(c, "", SECRET, sizeof(SECRET));
    memset(l, 0, sizeof(*l));
    brk_client_subs(c, sub_list_cb, l);
    return c;
}

static void loop_until_gone(fixture_t *f, const char *session, const char *stream)
{
    uint64_t got;
    for (int i = 0; i < 200; i++) {
        if (wal_cursor_get(f->wal, session, strlen(session), stream, strlen(stream), &got) ==
            WAL_ENOTFOUND)
            return;
        struct timeval tv = {0, 20000};
        event_base_loopexit(f->base, &tv);
        event_base_dispatch(f->base);
    }
    fail_msg("cursor (%s, %s) still there", session, stream);
}

/* Run the loop for about ms milliseconds. */
static void run_ms(fixture_t *f, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    event_base_loopexit(f->base, &tv);
    event_base_dispatch(f->base);
}

/* A resume right after a close, before the WAL has written what the
 * closing connection did (no loop turn in between), sees all of it: a
 * subscription just made, its ack, an unsubscription, a subscription to a
 * stream that does not exist yet. Once written, the WAL says the same,
 * and a subscription to a stream not yet born survives even that. */
static void test_session_resume_handoff(void **state)
{
    fixture_t *f = *state;
    publish_n(f, "ho.a", 3);
    rec_conn_t r1 = {0}, r2 = {0}, r3 = {0}, r4 = {0};
    struct sub_list l;
    brk_client_t *c1;
    assert_int_equal(brk_client_new(f->brk, &rec_ops, &r1, "sess-h", "sess-h", NULL, (size_t)-1,
                                    NULL, (size_t)-1, &c1),
                     0);
    assert_int_equal(brk_session_create(c1, "", NULL, SECRET, sizeof(SECRET)), 0);
    for (int i = 0; i < 1000 && r1.durable_calls == 0; i++)
        event_base_loop(f->base, EVLOOP_ONCE);
    assert_int_equal(r1.durable_calls, 1); /* the api sends the welcome now */
    brk_subscribe(c1, 1, (const uint8_t *)"ho.a", 4, 1 /* earliest */, 0, 0);
    assert_int_equal(count_type(&r1, "msg"), 3);
    brk_ack(c1, (const uint8_t *)"ho.a", 4, 2);
    brk_subscribe(c1, 2, (const uint8_t *)"ho.b", 4, 3 /* offset */, 1, 0); /* no stream yet */
    brk_client_close(c1);

    brk_client_t *c2 = resume_now(f, &r2, "sess-h", &l);
    assert_int_equal(l.n, 2);
    assert_string_equal(l.names[0], "ho.a");
    assert_int_equal(l.acked[0], 2);
    assert_string_equal(l.names[1], "ho.b");
    assert_int_equal(l.acked[1], 0);
    brk_unsubscribe(c2, 3, (const uint8_t *)"ho.a", 4);
    brk_client_close(c2);

    brk_client_t *c3 = resume_now(f, &r3, "sess-h", &l);
    assert_int_equal(l.n, 1);
    assert_string_equal(l.names[0], "ho.b");
    brk_client_start(c3);
    /* the stream is born while c3 holds it unacked: the session records it */
    publish_n(f, "ho.b", 1);
    assert_int_equal(count_type(&r3, "msg"), 1);
    brk_client_close(c3);
    wait_cursor(f, "sess-h", "ho.b", 0);
    loop_until_gone(f, "sess-h", "ho.a");
    for (int i = 0; i < 20; i++) /* let the writes' completions run */
        event_base_loop(f->base, EVLOOP_NONBLOCK);

    brk_client_t *c4 = resume_now(f, &r4, "sess-h", &l);
    assert_int_equal(l.n, 1);
    assert_string_equal(l.names[0], "ho.b");
    assert_int_equal(l.acked[0], 0);
    brk_client_start(c4);
    assert_int_equal(count_type(&r4, "msg"), 1); /* not acked: again */
    /* a subscription to a stream that does not exist yet has no cursor:
     * it survives a resume that comes after the close's write is done */
    brk_subscribe(c4, 5, (const uint8_t *)"ho.c", 4, 1, 0, 0);
    brk_client_close(c4);
    run_ms(f, 100); /* the close's write completes */
    rec_conn_t r5 = {0};
    brk_client_t *c5 = resume_now(f, &r5, "sess-h", &l);
    assert_int_equal(l.n, 2);
    assert_string_equal(l.names[0], "ho.b");
    assert_string_equal(l.names[1], "ho.c");
    brk_client_close(c5);
    brk_stats_t st;
    brk_stats_get(f->brk, &st);
    assert_int_equal(st.cursor_errors, 0);
    assert_int_equal(st.sessions_resumed, 4);
    rec_clear(&r1);
    rec_clear(&r2);
    rec_clear(&r3);
    rec_clear(&r4);
    rec_clear(&r5);
}

/* A subscription to a stream that does not exist yet is recorded once the
 * stream exists; sessions past their TTL are not resumable and are deleted. */
static void test_session_record_and_expiry(void **state)
{
    fixture_t *f = *state;
    brk_free(f->brk);
    brk_options_t bo = {.max_inflight = 4, .session_ttl_s = 1, .expire_interval_ms = 3600000};
    assert_int_equal(brk_new(f->base, f->wal, &bo, &f->brk), 0);
    rec_conn_t r1 = {0};
    brk_client_t *c1;
    assert_int_equal(brk_client_new(f->brk, &rec_ops, &r1, "sess-e", "sess-e", NULL, (size_t)-1,
                                    NULL, (size_t)-1, &c1),
                     0);
    assert_int_equal(brk_session_create(c1, "alice", NULL, SECRET, sizeof(SECRET)), 0);
    brk_subscribe(c1, 1, (const uint8_t *)"new.s", 5, 2 /* latest */, 0, 0);
    publish_n(f, "new.s", 2); /* creates the stream; delivered, not acked */
    brk_client_close(c1);
    wait_cursor(f, "sess-e", "new.s", 0);
    wal_session_t ws;
    assert_int_equal(wal_session_get(f->wal, "sess-e", 6, &ws), 0);
    assert_int_equal(ws.owner_len, 5);
    assert_true(brk_session_resumable(f->brk, "sess-e", "alice", SECRET, sizeof(SECRET)));
    /* wait past the TTL (1 s) */
    struct timespec ts = {2, 100000000};
    nanosleep(&ts, NULL);
    assert_false(brk_session_resumable(f->brk, "sess-e", "alice", SECRET, sizeof(SECRET)));
    brk_sessions_expire(f->brk);
    for (int i = 0; i < 200 && wal_session_get(f->wal, "sess-e", 6, &ws) == 0; i++) {
        struct timeval tv = {0, 20000};
        event_base_loopexit(f->base, &tv);
        event_base_dispatch(f->base);
    }
    assert_int_equal(wal_session_get(f->wal, "sess-e", 6, &ws), WAL_ENOTFOUND);
    uint64_t got;
    assert_int_equal(wal_cursor_get(f->wal, "sess-e", 6, "new.s", 5, &got), WAL_ENOTFOUND);
    brk_stats_t st;
    brk_stats_get(f->brk, &st);
    assert_int_equal(st.sessions_expired, 1);
    rec_clear(&r1);
}

/* brk_session_create tells when the session is durable (the api sends the
 * welcome then), and that it is not when the WAL could not store it. */
static void test_session_durable_callback(void **state)
{
    fixture_t *f = *state;
    rec_conn_t r1 = {0}, r2 = {0};
    brk_client_t *c1, *c2;
    assert_int_equal(brk_client_new(f->brk, &rec_ops, &r1, "sess-d1", "sess-d1", NULL, (size_t)-1,
                                    NULL, (size_t)-1, &c1),
                     0);
    assert_int_equal(brk_session_create(c1, "", "127.0.0.1", SECRET, sizeof(SECRET)), 0);
    assert_int_equal(r1.durable_calls, 0); /* not before the WAL has it */
    for (int i = 0; i < 1000 && !r1.durable_calls; i++)
        event_base_loop(f->base, EVLOOP_ONCE);
    assert_int_equal(r1.durable_calls, 1);
    assert_int_equal(r1.durable_status, 0);
    wal_session_t ws;
    for (int i = 0; i < 200 && wal_session_get(f->wal, "sess-d1", 7, &ws) != 0; i++) {
        struct timeval tv = {0, 5000};
        event_base_loopexit(f->base, &tv);
        event_base_dispatch(f->base);
    }
    assert_int_equal(wal_session_get(f->wal, "sess-d1", 7, &ws), 0);

    wal_testing_fail_commits(f->wal, ENOSPC, 1);
    assert_int_equal(brk_client_new(f->brk, &rec_ops, &r2, "sess-d2", "sess-d2", NULL, (size_t)-1,
                                    NULL, (size_t)-1, &c2),
                     0);
    assert_int_equal(brk_session_create(c2, "", "127.0.0.1", SECRET, sizeof(SECRET)), 0);
    for (int i = 0; i < 1000 && !r2.durable_calls; i++)
        event_base_loop(f->base, EVLOOP_ONCE);
    assert_int_equal(r2.durable_calls, 1);
    assert_int_equal(r2.durable_status, WAL_EFULL);
    brk_client_close(c1);
    brk_client_close(c2);
    rec_clear(&r1);
    rec_clear(&r2);
}

/* ---- ack = replicated ---------------------------------------------------- */

typedef struct repl_rec {
    int calls, status, dup, kicks;
    uint64_t offset;
} repl_rec_t;

static void repl_cb(int status, uint64_t offset, int dup, void *arg)
{
    repl_rec_t *r = arg;
    r->calls++;
    r->status = status;
    r->offset = offset;
    r->dup = dup;
}

static void repl_kick_cb(void *arg)
{
    ((repl_rec_t *)arg)->kicks++;
}

static void run_until(fixture_t *f, const repl_rec_t *r, int calls)
{
    for (int i = 0; i < 500 && r->calls < calls; i++)
        run_ms(f, 10);
    assert_int_equal(r->calls, calls);
}

static int pub_repl(fixture_t *f, const char *msgid, int ack, repl_rec_t *r)
{
    return brk_publish_api(f->brk, "arq:api:test", "r", 1, (const uint8_t *)"data", 4,
                           (const uint8_t *)msgid, msgid ? strlen(msgid) : 0, NULL, 0, ack, repl_cb,
                           r);
}

/* The puback of a replicated publish waits for the watermark to cover its
 * record (a duplicate's: everything acknowledged before it), never goes
 * out while replication is down, and times out into a 503; ack = local
 * answers at once in the same deployment. */
static void test_ack_replicated(void **state)
{
    fixture_t *f = *state;
    brk_free(f->brk);
    repl_rec_t r = {0}, k = {0};
    brk_options_t bo = {.ack = BRK_ACK_REPLICATED,
                        .ack_timeout_ms = 300,
                        .repl_kick = repl_kick_cb,
                        .repl_kick_arg = &k};
    assert_int_equal(brk_new(f->base, f->wal, &bo, &f->brk), 0);
    int code;
    const char *reason;

    /* no MySQL known: refused before appending, 400 */
    assert_int_equal(pub_repl(f, "m0", BRK_ACK_DEFAULT, &r), BRK_EREPL_NONE);
    brk_refusal(BRK_EREPL_NONE, &code, &reason);
    assert_int_equal(code, 400);
    assert_true(brk_replication_down(f->brk));

    /* MySQL known but the drain down: refused (503), nothing stored */
    brk_replicated(f->brk, 0, 0);
    assert_int_equal(pub_repl(f, "m1", BRK_ACK_DEFAULT, &r), BRK_EREPL_DOWN);
    brk_refusal(BRK_EREPL_DOWN, &code, &reason);
    assert_int_equal(code, 503);
    assert_string_equal(reason, "replication unavailable");
    assert_true(wal_acked_next_seq(f->wal) == 1);
    /* ... but ack = local is taken and answered at the local durable point */
    assert_int_equal(pub_repl(f, "m2", BRK_ACK_LOCAL, &r), 0);
    run_until(f, &r, 1);
    assert_int_equal(r.status, 0);
    assert_int_equal(r.offset, 1);

    /* the drain works: appended, durable, and held until the watermark */
    brk_replicated(f->brk, 0, 1);
    assert_false(brk_replication_down(f->brk));
    assert_int_equal(pub_repl(f, "m3", BRK_ACK_DEFAULT, &r), 0);
    run_ms(f, 100);
    assert_int_equal(r.calls, 1); /* durable here, not yet in MySQL */
    assert_true(k.kicks >= 1);    /* the drain was woken */
    brk_stats_t st;
    brk_stats_get(f->brk, &st);
    assert_int_equal(st.repl_waiting, 1);
    uint64_t seq = wal_acked_next_seq(f->wal) - 1; /* m3's record */
    brk_replicated(f->brk, seq - 1, 1);
    run_ms(f, 20);
    assert_int_equal(r.calls, 1); /* the watermark below it: still waiting */
    brk_replicated(f->brk, seq, 1);
    assert_int_equal(r.calls, 2);
    assert_int_equal(r.status, 0);
    assert_int_equal(r.offset, 2);

    /* a retry of m3 is a duplicate: MySQL holds the original already */
    assert_int_equal(pub_repl(f, "m3", BRK_ACK_DEFAULT, &r), 0);
    run_until(f, &r, 3);
    assert_int_equal(r.status, 0);
    assert_int_equal(r.dup, 1);
    assert_int_equal(r.offset, 2);

    /* the watermark stays: the publish times out into a retryable 503 */
    assert_int_equal(pub_repl(f, "m4", BRK_ACK_DEFAULT, &r), 0);
    run_until(f, &r, 4);
    assert_int_equal(r.status, BRK_EREPL_TIMEOUT);
    brk_refusal(BRK_EREPL_TIMEOUT, &code, &reason);
    assert_int_equal(code, 503);
    /* m4 was stored all the same: its retry is a duplicate, answered only
     * once the watermark covers everything acknowledged before it */
    uint64_t all = wal_acked_next_seq(f->wal) - 1;
    assert_int_equal(pub_repl(f, "m4", BRK_ACK_DEFAULT, &r), 0);
    run_ms(f, 100);
    assert_int_equal(r.calls, 4);
    brk_replicated(f->brk, all, 1);
    assert_int_equal(r.calls, 5);
    assert_int_equal(r.status, 0);
    assert_int_equal(r.dup, 1);
    assert_int_equal(r.offset, 3);
    brk_stats_get(f->brk, &st);
    assert_int_equal(st.repl_acked, 3);
    assert_int_equal(st.repl_timeouts, 1);
    assert_int_equal(st.repl_refused, 2);
    assert_int_equal(st.repl_waiting, 0);

    /* waiting publishes are dropped without a call when the broker goes */
    assert_int_equal(pub_repl(f, "m5", BRK_ACK_DEFAULT, &r), 0);
    run_ms(f, 50);
    assert_int_equal(r.calls, 5);
}

/* In a replicated deployment a subscriber is sent a record only once MySQL
 * holds it, whatever the publish's own ack level: the loss of this machine
 * can never take back what a subscriber saw. */
static void test_deliveries_held_for_replication(void **state)
{
    fixture_t *f = *state;
    brk_free(f->brk);
    repl_rec_t r = {0};
    brk_options_t bo = {.ack = BRK_ACK_REPLICATED, .ack_timeout_ms = 5000};
    assert_int_equal(brk_new(f->base, f->wal, &bo, &f->brk), 0);
    brk_replicated(f->brk, 0, 1);
    rec_conn_t a = {0};
    brk_client_t *ca;
    assert_int_equal(
        brk_client_new(f->brk, &rec_ops, &a, "sa", "pa", NULL, (size_t)-1, NULL, (size_t)-1, &ca),
        0);
    brk_subscribe(ca, 1, (const uint8_t *)"r", 1, 1 /* earliest */, 0, 0);
    run_ms(f, 20);
    assert_int_equal(count_type(&a, "msg"), 0);

    /* ack local: the puback at once, the delivery not before MySQL */
    assert_int_equal(pub_repl(f, "h1", BRK_ACK_LOCAL, &r), 0);
    assert_int_equal(pub_repl(f, "h2", BRK_ACK_LOCAL, &r), 0);
    run_until(f, &r, 2);
    run_ms(f, 50);
    assert_int_equal(count_type(&a, "msg"), 0);
    brk_stats_t st;
    brk_stats_get(f->brk, &st);
    assert_int_equal(st.repl_held, 2);
    /* a subscriber joining now does not see them either */
    rec_conn_t b = {0};
    brk_client_t *cb;
    assert_int_equal(
        brk_client_new(f->brk, &rec_ops, &b, "sb", "pb", NULL, (size_t)-1, NULL, (size_t)-1, &cb),
        0);
    brk_subscribe(cb, 1, (const uint8_t *)"r", 1, 1, 0, 0);
    run_ms(f, 50);
    assert_int_equal(count_type(&b, "msg"), 0);

    /* MySQL holds the first: exactly that one goes out, to both */
    uint64_t last = wal_acked_next_seq(f->wal) - 1;
    brk_replicated(f->brk, last - 1, 1);
    run_ms(f, 20);
    assert_int_equal(count_type(&a, "msg"), 1);
    assert_int_equal(count_type(&b, "msg"), 1);
    brk_replicated(f->brk, last, 1);
    run_ms(f, 20);
    assert_int_equal(count_type(&a, "msg"), 2);
    assert_int_equal(count_type(&b, "msg"), 2);
    brk_stats_get(f->brk, &st);
    assert_int_equal(st.repl_held, 0);
    brk_client_close(ca);
    brk_client_close(cb);
    rec_clear(&a);
    rec_clear(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_fanout_shares_frames, setup, teardown),
        cmocka_unit_test_setup_teardown(test_flow_control_and_cursors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_gap_and_catchup_from_wal, setup, teardown),
        cmocka_unit_test_setup_teardown(test_session_resume, setup, teardown),
        cmocka_unit_test_setup_teardown(test_session_resume_handoff, setup, teardown),
        cmocka_unit_test_setup_teardown(test_session_record_and_expiry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_session_durable_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ack_replicated, setup, teardown),
        cmocka_unit_test_setup_teardown(test_deliveries_held_for_replication, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
