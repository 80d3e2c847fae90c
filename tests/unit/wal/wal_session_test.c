/*
 * wal_session_test.c - sessions and their cursors in the WAL: put, get,
 * list, cursor listing, cursor and session deletion (a session's deletion
 * takes its cursors and no one else's), persistence across a reopen, a
 * read-only reader, and the session value codec against corruption.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "wal_record.h"
#include "wal_test_util.h"

static wal_t *open_wal(const char *dir, int read_only)
{
    wal_options_t o = {.dir = dir, .read_only = read_only};
    wal_t *wal = NULL;
    char err[256];
    int rc = wal_open(&o, NULL, &wal, err, sizeof(err));
    if (rc)
        fail_msg("wal_open: %s (%s)", wal_strerror(rc), err);
    return wal;
}

/* One synchronous request built by the caller's add_* calls. */
struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    int done, status;
};

static void waiter_cb(wal_append_t *req, void *arg)
{
    struct waiter *w = arg;
    pthread_mutex_lock(&w->mu);
    w->status = wal_append_status(req);
    w->done = 1;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->mu);
}

static int submit_wait(wal_t *wal, wal_append_t *req, struct waiter *w)
{
    int rc = wal_append_submit(wal, req);
    if (rc)
        return rc;
    pthread_mutex_lock(&w->mu);
    while (!w->done)
        pthread_cond_wait(&w->cond, &w->mu);
    pthread_mutex_unlock(&w->mu);
    return w->status;
}

static void publish(wal_t *wal, const char *stream)
{
    wal_msg_t m = {
        .stream = stream, .stream_len = strlen(stream), .payload = "x", .payload_len = 1};
    assert_int_equal(wal_append_sync(wal, &m, 1, NULL), 0);
}

static wal_session_t mk_session(const char *owner, uint8_t fill, int64_t seen)
{
    wal_session_t s = {.created_us = 1000, .seen_us = seen};
    s.owner_len = (uint8_t)strlen(owner);
    memcpy(s.owner, owner, s.owner_len);
    s.secret_len = 32;
    memset(s.secret, fill, 32);
    return s;
}

struct listed {
    char names[8][64];
    uint64_t offsets[8];
    int n;
};

static int cursor_cb(const char *stream, size_t len, uint64_t offset, int64_t updated, void *arg)
{
    (void)updated;
    struct listed *l = arg;
    if (l->n < 8) {
        snprintf(l->names[l->n], 64, "%.*s", (int)len, stream);
        l->offsets[l->n] = offset;
    }
    l->n++;
    return 0;
}

static int session_cb(const char *id, size_t len, const wal_session_t *s, void *arg)
{
    (void)s;
    struct listed *l = arg;
    if (l->n < 8)
        snprintf(l->names[l->n], 64, "%.*s", (int)len, id);
    l->n++;
    return 0;
}

static void test_sessions(void **state)
{
    const char *dir = *state;
    wal_t *wal = open_wal(dir, 0);
    publish(wal, "a");
    publish(wal, "b");

    struct waiter w1 = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
    wal_append_t *req;
    assert_int_equal(wal_append_new(waiter_cb, &w1, &req), 0);
    wal_session_t s1 = mk_session("alice", 0xab, 5000), s2 = mk_session("", 0xcd, 6000);
    assert_int_equal(wal_append_put_session(req, "s1", 2, &s1), 0);
    assert_int_equal(wal_append_put_session(req, "s10", 3, &s2), 0);
    assert_int_equal(wal_append_add_cursor(req, "s1", 2, "a", 1, 7), 0);
    assert_int_equal(wal_append_add_cursor(req, "s1", 2, "b", 1, 0), 0);
    assert_int_equal(wal_append_add_cursor(req, "s10", 3, "a", 1, 3), 0);
    /* deleting a cursor of a stream that does not exist is not an error */
    assert_int_equal(wal_append_del_cursor(req, "s1", 2, "nope", 4), 0);
    assert_int_equal(submit_wait(wal, req, &w1), 0);
    wal_append_free(req);

    wal_session_t got;
    assert_int_equal(wal_session_get(wal, "s1", 2, &got), 0);
    assert_int_equal(got.owner_len, 5);
    assert_memory_equal(got.owner, "alice", 5);
    assert_int_equal(got.secret_len, 32);
    assert_memory_equal(got.secret, s1.secret, 32);
    assert_true(got.seen_us == 5000 && got.created_us == 1000);
    assert_int_equal(wal_session_get(wal, "s2", 2, &got), WAL_ENOTFOUND);

    struct listed l = {0};
    assert_int_equal(wal_session_cursors(wal, "s1", 2, cursor_cb, &l), 0);
    assert_int_equal(l.n, 2);
    assert_string_equal(l.names[0], "a");
    assert_int_equal(l.offsets[0], 7);
    assert_string_equal(l.names[1], "b");
    assert_int_equal(l.offsets[1], 0);

    /* delete one cursor of s1, then the whole of s1: s10 (a longer id with
     * the same prefix) keeps its cursor */
    struct waiter w2 = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
    assert_int_equal(wal_append_new(waiter_cb, &w2, &req), 0);
    assert_int_equal(wal_append_del_cursor(req, "s1", 2, "b", 1), 0);
    assert_int_equal(submit_wait(wal, req, &w2), 0);
    wal_append_free(req);
    memset(&l, 0, sizeof(l));
    assert_int_equal(wal_session_cursors(wal, "s1", 2, cursor_cb, &l), 0);
    assert_int_equal(l.n, 1);

    struct waiter w3 = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
    assert_int_equal(wal_append_new(waiter_cb, &w3, &req), 0);
    assert_int_equal(wal_append_del_session(req, "s1", 2), 0);
    assert_int_equal(submit_wait(wal, req, &w3), 0);
    wal_append_free(req);
    assert_int_equal(wal_session_get(wal, "s1", 2, &got), WAL_ENOTFOUND);
    memset(&l, 0, sizeof(l));
    assert_int_equal(wal_session_cursors(wal, "s1", 2, cursor_cb, &l), 0);
    assert_int_equal(l.n, 0);
    uint64_t off = 0;
    assert_int_equal(wal_cursor_get(wal, "s10", 3, "a", 1, &off), 0);
    assert_int_equal(off, 3);
    wal_close(wal);

    /* persisted: a reopen and a read-only reader see s10 only */
    wal = open_wal(dir, 0);
    memset(&l, 0, sizeof(l));
    assert_int_equal(wal_session_list(wal, session_cb, &l), 0);
    assert_int_equal(l.n, 1);
    assert_string_equal(l.names[0], "s10");
    wal_t *ro = open_wal(dir, 1);
    assert_int_equal(wal_session_get(ro, "s10", 3, &got), 0);
    assert_true(got.seen_us == 6000 && got.owner_len == 0);
    memset(&l, 0, sizeof(l));
    assert_int_equal(wal_session_cursors(ro, "s10", 3, cursor_cb, &l), 0);
    assert_int_equal(l.n, 1);
    wal_close(ro);
    wal_close(wal);
}

static void test_session_limits(void **state)
{
    (void)state;
    wal_append_t *req;
    assert_int_equal(wal_append_new(waiter_cb, NULL, &req), 0);
    wal_session_t s = mk_session("x", 1, 1);
    assert_int_equal(wal_append_put_session(req, "", 0, &s), WAL_EINVAL);
    char big[WAL_SESSION_MAX + 2];
    memset(big, 'a', sizeof(big));
    assert_int_equal(wal_append_put_session(req, big, sizeof(big), &s), WAL_EINVAL);
    s.secret_len = WAL_SECRET_MAX + 1;
    assert_int_equal(wal_append_put_session(req, "id", 2, &s), WAL_EINVAL);
    assert_int_equal(wal_append_del_session(req, NULL, 0), WAL_EINVAL);
    assert_int_equal(wal_append_del_cursor(req, "id", 2, "", 0), WAL_EINVAL);
    wal_append_free(req);
}

static void test_session_codec(void **state)
{
    (void)state;
    wal_session_t s = mk_session("bob", 0x5a, 77);
    uint8_t buf[WAL_SESSION_VAL_MIN + WAL_PRODUCER_MAX + WAL_SECRET_MAX];
    size_t n = wal_session_val_size(&s);
    assert_int_equal(n, WAL_SESSION_VAL_MIN + 3 + 32);
    wal_session_val_encode(&s, buf);
    wal_session_t d;
    assert_int_equal(wal_session_val_decode(buf, n, &d), 0);
    assert_memory_equal(d.owner, "bob", 3);
    for (size_t i = 0; i < n; i++) {
        uint8_t c[sizeof(buf)];
        memcpy(c, buf, n);
        c[i] ^= 0x10;
        if (wal_session_val_decode(c, n, &d) == 0)
            fail_msg("flip at byte %zu not detected", i);
    }
    assert_int_not_equal(wal_session_val_decode(buf, n - 1, &d), 0);
    assert_int_not_equal(wal_session_val_decode(buf, 10, &d), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_sessions, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test(test_session_limits),
        cmocka_unit_test(test_session_codec),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
