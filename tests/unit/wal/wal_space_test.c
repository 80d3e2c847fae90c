/*
 * wal_space_test.c - storage faults told apart (wal_space.c, wal.h "state"):
 * data.mdb and lock.mdb hold their blocks ahead of the map; a disk with no
 * room for the map to grow refuses appends with WAL_EFULL and resumes by
 * itself when room returns (at the next append, or by the idle retry); a
 * fold that finds no space is deferred, refusing appends until the journal
 * is folded in, with nothing acknowledged lost; an open whose journal
 * cannot be folded in serves reads and refuses appends instead of failing;
 * real I/O errors fail-stop with their cause as the state's reason; a small
 * map_size_max is honoured; a failed open always says why.
 *
 * The full disk is the allocation fault of wal_testing.h (the real one is
 * tests/integration/storage_full_test.py, on a loop-mounted filesystem).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>
#include <event2/event.h>
#include <event2/thread.h>
#include <fcntl.h>
#include <sys/wait.h>

#include "wal_test_util.h"
#include "wal_testing.h"

static wal_t *open_opts(wal_options_t *o, struct event_base *base)
{
    wal_t *wal = NULL;
    char err[256];
    int rc = wal_open(o, base, &wal, err, sizeof(err));
    if (rc)
        fail_msg("wal_open: %s (%s)", wal_strerror(rc), err);
    return wal;
}

/* One durable publish of a `len`-byte payload derived from key, msgid
 * "k<key>". Returns the status; *ret_off gets the offset. */
static int publish(wal_t *wal, const char *stream, uint64_t key, size_t len, uint64_t *ret_off)
{
    static uint8_t buf[1 << 17];
    assert_true(len <= sizeof(buf));
    tu_fill(buf, len, key);
    char msgid[32];
    snprintf(msgid, sizeof(msgid), "k%llu", (unsigned long long)key);
    wal_msg_t m = tu_msg(stream, buf, len);
    m.producer = "p";
    m.producer_len = 1;
    m.msgid = msgid;
    m.msgid_len = strlen(msgid);
    wal_result_t res;
    int rc = wal_append_sync_durable(wal, &m, 1, &res);
    if (rc == 0 && ret_off)
        *ret_off = res.offset;
    return rc;
}

/* n publishes of keys[0..n) in one request (one batch): offsets in offs. */
static int publish_batch(wal_t *wal, const char *stream, const uint64_t *keys, size_t n, size_t len,
                         uint64_t *offs)
{
    static uint8_t bufs[20][512];
    char msgids[20][32];
    wal_msg_t m[20];
    wal_result_t res[20];
    assert_true(n <= 20 && len <= sizeof(bufs[0]));
    for (size_t i = 0; i < n; i++) {
        tu_fill(bufs[i], len, keys[i]);
        snprintf(msgids[i], sizeof(msgids[i]), "k%llu", (unsigned long long)keys[i]);
        m[i] = tu_msg(stream, bufs[i], len);
        m[i].producer = "p";
        m[i].producer_len = 1;
        m[i].msgid = msgids[i];
        m[i].msgid_len = strlen(msgids[i]);
    }
    int rc = wal_append_sync_durable(wal, m, n, res);
    for (size_t i = 0; i < n && rc == 0; i++)
        offs[i] = res[i].offset;
    return rc;
}

static enum wal_state state_of(wal_t *wal, char *reason, size_t len)
{
    wal_state_info_t st;
    wal_state_get(wal, &st);
    if (reason)
        snprintf(reason, len, "%s", st.reason);
    return st.state;
}

/* Poll (bounded) until the state is `want`. */
static int wait_state(wal_t *wal, enum wal_state want)
{
    for (int i = 0; i < 1000; i++) {
        if (state_of(wal, NULL, 0) == want)
            return 1;
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

/* Every offset 1..n of stream holds the payload of keys[offset-1]. */
static void check_stream(wal_t *wal, const char *stream, const uint64_t *keys, size_t n, size_t len)
{
    wal_stream_info_t info;
    assert_int_equal(wal_stream_get(wal, stream, strlen(stream), &info), 0);
    assert_int_equal(info.next_offset, n + 1);
    tu_recs_t rs = {0};
    uint64_t from = 1;
    while (from <= n) {
        wal_read_result_t rr = {0};
        assert_int_equal(
            wal_stream_read(wal, stream, strlen(stream), from, 64, 8u << 20, tu_recs_cb, &rs, &rr),
            0);
        assert_true(rr.count > 0);
        from = rr.next;
    }
    assert_int_equal(rs.n, n);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(rs.v[i].offset, i + 1);
        assert_int_equal(rs.v[i].payload_len, len);
        assert_true(tu_check_fill(rs.v[i].payload, len, keys[i]));
    }
    tu_recs_free(&rs);
}

static uint64_t allocated(const char *dir, const char *file)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", dir, file);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return (uint64_t)st.st_blocks * 512;
}

static void test_blocks_allocated_ahead_of_the_map(void **state)
{
    const char *dir = *state;
    wal_options_t o = {.dir = dir};
    wal_t *wal = open_opts(&o, NULL);
    wal_stats_t ws;
    assert_int_equal(wal_stats_get(wal, &ws), 0);
    wal_state_info_t st;
    wal_state_get(wal, &st);
    assert_int_equal(st.state, WAL_STATE_OK);
    assert_int_equal(st.reason[0], 0);
    assert_true(st.disk_total_bytes > 0);
    if (!st.preallocated) {
        print_message("# this filesystem has no fallocate: nothing to check here\n");
        wal_close(wal);
        return;
    }
    assert_true(allocated(dir, "data.mdb") >= ws.map_size);
    assert_true(allocated(dir, "lock.mdb") >= 512u * 64);
    /* after growth the blocks follow the map */
    uint64_t key = 0, off;
    while (ws.map_size < (128ull << 20)) {
        for (int i = 0; i < 64; i++)
            assert_int_equal(publish(wal, "big", key++, 100000, &off), 0);
        assert_int_equal(wal_stats_get(wal, &ws), 0);
    }
    assert_true(allocated(dir, "data.mdb") >= ws.map_size);
    wal_close(wal);
}

/* The disk has no room for the map to grow: appends that need room are
 * refused, nothing acknowledged is lost, and appends resume once there is
 * room, without a restart. */
static void test_disk_full_refuses_then_resumes(void **state)
{
    const char *dir = *state;
    wal_options_t o = {.dir = dir, .map_size = 1u << 20, .map_size_max = 1ull << 30};
    wal_t *wal = open_opts(&o, NULL);
    wal_state_info_t st;
    wal_state_get(wal, &st);
    if (!st.preallocated) {
        print_message("# this filesystem has no fallocate: skipped\n");
        wal_close(wal);
        return;
    }
    wal_testing_fail_alloc(wal, UINT32_MAX);
    enum { LEN = 20000, MAX = 4000 };
    static uint64_t keys[MAX];
    size_t acked = 0;
    uint64_t key = 1000, off;
    int rc = 0;
    while (acked < MAX && (rc = publish(wal, "s", key, LEN, &off)) == 0) {
        assert_int_equal(off, acked + 1);
        keys[acked++] = key++;
    }
    assert_int_equal(rc, WAL_EFULL);
    assert_true(acked > 0 && acked < MAX);
    assert_false(wal_is_failed(wal));
    char reason[WAL_STATE_REASON_MAX];
    assert_int_equal(state_of(wal, reason, sizeof(reason)), WAL_STATE_FULL);
    if (!strstr(reason, "no space left"))
        fail_msg("reason: %s", reason);
    /* refused again and again, never stored; reads go on */
    for (int i = 0; i < 5; i++)
        assert_int_equal(publish(wal, "s", 90000 + (uint64_t)i, LEN, NULL), WAL_EFULL);
    check_stream(wal, "s", keys, acked, LEN);

    /* room again: the next append grows the map */
    wal_testing_fail_alloc(wal, 0);
    assert_int_equal(publish(wal, "s", key, LEN, &off), 0);
    assert_int_equal(off, acked + 1);
    keys[acked++] = key++;
    assert_int_equal(state_of(wal, NULL, 0), WAL_STATE_OK);
    for (int i = 0; i < 200; i++) {
        assert_int_equal(publish(wal, "s", key, LEN, &off), 0);
        keys[acked++] = key++;
    }
    wal_close(wal);

    wal = open_opts(&o, NULL);
    check_stream(wal, "s", keys, acked, LEN);
    for (int i = 0; i < 5; i++) {
        uint32_t sid;
        uint64_t doff;
        char msgid[32];
        snprintf(msgid, sizeof(msgid), "k%d", 90000 + i);
        assert_int_equal(wal_dedup_get(wal, "p", 1, "s", 1, msgid, strlen(msgid), &sid, &doff),
                         WAL_ENOTFOUND);
    }
    wal_close(wal);
}

/* Requests that arrive together (one group commit) and do not all fit:
 * those that fit are stored, as many as when they come one by one. */
struct many {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    int done, ok;
};

static void many_cb(wal_append_t *req, void *arg)
{
    struct many *m = arg;
    pthread_mutex_lock(&m->mu);
    m->done++;
    m->ok += wal_append_status(req) == 0;
    pthread_cond_signal(&m->cond);
    pthread_mutex_unlock(&m->mu);
    wal_append_free(req);
}

static int fill_count(const char *dir, int together)
{
    enum { N = 60, LEN = 40000 };
    wal_options_t o = {.dir = dir, .map_size = 1u << 20, .map_size_max = 1ull << 30};
    wal_t *wal = open_opts(&o, NULL);
    wal_testing_fail_alloc(wal, UINT32_MAX);
    int ok = 0;
    if (!together) {
        for (int i = 0; i < N && publish(wal, "t", (uint64_t)i, LEN, NULL) == 0; i++)
            ok++;
    } else {
        static uint8_t buf[LEN];
        struct many m = {.done = 0};
        pthread_mutex_init(&m.mu, NULL);
        pthread_cond_init(&m.cond, NULL);
        for (int i = 0; i < N; i++) {
            wal_append_t *req;
            assert_int_equal(wal_append_new(many_cb, &m, &req), 0);
            wal_msg_t msg = tu_msg("t", buf, LEN);
            assert_int_equal(wal_append_add_msg(req, &msg), 0);
            wal_append_when_durable(req);
            assert_int_equal(wal_append_submit(wal, req), 0);
        }
        pthread_mutex_lock(&m.mu);
        while (m.done < N)
            pthread_cond_wait(&m.cond, &m.mu);
        ok = m.ok;
        pthread_mutex_unlock(&m.mu);
        pthread_cond_destroy(&m.cond);
        pthread_mutex_destroy(&m.mu);
    }
    wal_stream_info_t info;
    assert_int_equal(wal_stream_get(wal, "t", 1, &info), 0);
    assert_int_equal(info.next_offset, (uint64_t)ok + 1);
    wal_close(wal);
    return ok;
}

static void test_group_commit_at_full_stores_what_fits(void **state)
{
    const char *dir = *state;
    char a[200], b[200];
    snprintf(a, sizeof(a), "%s/one-by-one", dir);
    snprintf(b, sizeof(b), "%s/together", dir);
    int seq = fill_count(a, 0), together = fill_count(b, 1);
    print_message("# stored one by one: %d, together: %d\n", seq, together);
    assert_true(seq > 0 && seq < 60);
    assert_true(together >= seq - 1);
}

/* Room returns while nobody appends: the idle retry notices it. */
static void test_idle_retry_clears_full(void **state)
{
    const char *dir = *state;
    wal_options_t o = {.dir = dir, .map_size = 1u << 20, .map_size_max = 1ull << 30};
    wal_t *wal = open_opts(&o, NULL);
    wal_state_info_t st;
    wal_state_get(wal, &st);
    if (!st.preallocated) {
        wal_close(wal);
        return;
    }
    wal_testing_fail_alloc(wal, UINT32_MAX);
    uint64_t key = 0;
    while (publish(wal, "s", key++, 30000, NULL) == 0)
        assert_true(key < 1000);
    assert_int_equal(state_of(wal, NULL, 0), WAL_STATE_FULL);
    wal_state_get(wal, &st);
    uint64_t changes = st.changes;
    wal_testing_fail_alloc(wal, 0);
    wal_testing_retry_now(wal);
    assert_true(wait_state(wal, WAL_STATE_OK));
    wal_state_get(wal, &st);
    assert_int_equal(st.changes, changes + 1);
    assert_int_equal(publish(wal, "s", key, 30000, NULL), 0);
    wal_close(wal);
}

static void cursor_waiter_cb(wal_append_t *req, void *arg)
{
    tu_waiter_cb(req, arg);
}

/* A fold that finds no space: the journal keeps the acknowledged batches,
 * appends are refused until the fold succeeds, then everything is there.
 * Folds come after 1 s idle: the test's steps between them take far less. */
static void test_fold_deferred_for_space(void **state)
{
    const char *dir = *state;
    wal_options_t o = {.dir = dir, .apply_us = 1000000, .apply_idle_us = 1000000};
    wal_t *wal = open_opts(&o, NULL);
    enum { N = 50, LEN = 300 };
    uint64_t keys[N + 1], off;
    size_t acked = 0;
    for (; acked < 10; acked++) {
        keys[acked] = 500 + acked;
        assert_int_equal(publish(wal, "f", keys[acked], LEN, &off), 0);
    }
    /* wait for these to be folded in (readable) */
    wal_stream_info_t info;
    for (int i = 0; i < 1000; i++) {
        if (wal_stream_get(wal, "f", 1, &info) == 0 && info.next_offset == 11)
            break;
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(info.next_offset, 11);

    wal_testing_fail_folds(wal, ENOSPC, 1);
    uint64_t offs[10];
    for (size_t i = 0; i < 10; i++)
        keys[acked + i] = 500 + acked + i;
    assert_int_equal(publish_batch(wal, "f", keys + acked, 10, LEN, offs), 0);
    for (size_t i = 0; i < 10; i++)
        assert_int_equal(offs[i], acked + i + 1);
    acked += 10;
    /* a cursor write: completes only once readable (after the fold) */
    tu_waiter_t w;
    tu_waiter_init(&w);
    wal_append_t *creq;
    assert_int_equal(wal_append_new(cursor_waiter_cb, &w, &creq), 0);
    assert_int_equal(wal_append_add_cursor(creq, "sess", 4, "f", 1, 7), 0);
    assert_int_equal(wal_append_submit(wal, creq), 0);

    assert_true(wait_state(wal, WAL_STATE_FULL));
    char reason[WAL_STATE_REASON_MAX];
    state_of(wal, reason, sizeof(reason));
    assert_non_null(strstr(reason, "fold"));
    assert_false(wal_is_failed(wal));
    assert_int_equal(publish(wal, "f", 99999, LEN, NULL), WAL_EFULL);
    pthread_mutex_lock(&w.lock);
    assert_int_equal(w.done, 0);
    pthread_mutex_unlock(&w.lock);
    /* LMDB still lacks the batches of the failed fold */
    assert_int_equal(wal_stream_get(wal, "f", 1, &info), 0);
    assert_int_equal(info.next_offset, 11);
    assert_int_equal(wal_reloads(wal), 0);

    wal_testing_retry_now(wal);
    assert_true(wait_state(wal, WAL_STATE_OK));
    tu_waiter_wait(&w);
    assert_int_equal(wal_append_status(creq), 0);
    wal_append_free(creq);
    tu_waiter_destroy(&w);
    assert_int_equal(wal_reloads(wal), 1);
    uint64_t c;
    assert_int_equal(wal_cursor_get(wal, "sess", 4, "f", 1, &c), 0);
    assert_int_equal(c, 7);
    check_stream(wal, "f", keys, acked, LEN);
    /* offsets go on where they were */
    keys[acked] = 800;
    assert_int_equal(publish(wal, "f", keys[acked], LEN, &off), 0);
    assert_int_equal(off, ++acked);
    wal_close(wal);

    wal = open_opts(&o, NULL);
    check_stream(wal, "f", keys, acked, LEN);
    wal_close(wal);
}

/* Closing while a fold is deferred: the journal holds the batches and the
 * next open folds them in. */
static void test_close_with_fold_deferred(void **state)
{
    const char *dir = *state;
    /* no fold before the close: the fold at close is the one that fails */
    wal_options_t o = {.dir = dir, .apply_us = 1000000, .apply_idle_us = 1000000};
    wal_t *wal = open_opts(&o, NULL);
    enum { N = 30, LEN = 100 };
    uint64_t keys[N], offs[N];
    wal_testing_fail_folds(wal, ENOSPC, 1000);
    for (size_t i = 0; i < N; i++)
        keys[i] = 7000 + i;
    assert_int_equal(publish_batch(wal, "c", keys, 15, LEN, offs), 0);
    assert_int_equal(publish_batch(wal, "c", keys + 15, 15, LEN, offs + 15), 0);
    wal_close(wal);
    wal = open_opts(&o, NULL);
    assert_int_equal(state_of(wal, NULL, 0), WAL_STATE_OK);
    check_stream(wal, "c", keys, N, LEN);
    wal_close(wal);
}

/* Real I/O errors stop the WAL for good, with their cause. */
static void test_fold_eio_fail_stops_with_reason(void **state)
{
    const char *dir = *state;
    wal_options_t o = {.dir = dir, .apply_us = 100000, .apply_idle_us = 100000};
    wal_t *wal = open_opts(&o, NULL);
    uint64_t keys[3] = {1, 2, 3};
    for (int i = 0; i < 3; i++)
        assert_int_equal(publish(wal, "e", keys[i], 64, NULL), 0);
    assert_true(wait_state(wal, WAL_STATE_OK));
    wal_testing_fail_folds(wal, EIO, 1);
    uint64_t more[2] = {4, 5};
    for (int i = 0; i < 2; i++)
        assert_int_equal(publish(wal, "e", more[i], 64, NULL), 0);
    assert_true(wait_state(wal, WAL_STATE_FAILED));
    assert_true(wal_is_failed(wal));
    char reason[WAL_STATE_REASON_MAX];
    state_of(wal, reason, sizeof(reason));
    assert_string_equal(reason, "folding the journal into LMDB: Input/output error");
    assert_int_equal(publish(wal, "e", 6, 64, NULL), WAL_EFATAL);
    wal_close(wal);
    /* what was acknowledged is in the journal */
    wal = open_opts(&o, NULL);
    uint64_t all[5] = {1, 2, 3, 4, 5};
    check_stream(wal, "e", all, 5, 64);
    wal_close(wal);
}

static void test_journal_fsync_eio_reason(void **state)
{
    const char *dir = *state;
    wal_options_t o = {.dir = dir};
    wal_t *wal = open_opts(&o, NULL);
    assert_int_equal(publish(wal, "e", 1, 64, NULL), 0);
    wal_testing_fail_commits(wal, EIO, 1);
    assert_int_equal(publish(wal, "e", 2, 64, NULL), WAL_EFATAL);
    char reason[WAL_STATE_REASON_MAX];
    assert_int_equal(state_of(wal, reason, sizeof(reason)), WAL_STATE_FAILED);
    assert_string_equal(reason, "writing the journal: Input/output error");
    /* a stop is final: the state does not go back */
    assert_int_equal(publish(wal, "e", 3, 64, NULL), WAL_EFATAL);
    assert_int_equal(state_of(wal, NULL, 0), WAL_STATE_FAILED);
    wal_close(wal);
}

/* Child: append `n` batches of one LEN-byte message, fold never, die. */
static void crash_child(const char *dir, unsigned n, size_t len)
{
    wal_options_t o = {.dir = dir, .apply_us = 60000000, .apply_idle_us = 60000000};
    wal_t *wal = NULL;
    if (wal_open(&o, NULL, &wal, NULL, 0) != 0)
        _exit(2);
    for (unsigned i = 0; i < n; i++)
        if (publish(wal, "r", 100 + i, len, NULL) != 0)
            _exit(3);
    _exit(0);
}

/* An open whose journal cannot be folded in for lack of room: it serves
 * what LMDB holds and refuses appends, instead of failing; an open with
 * room folds everything in. */
static void test_open_with_journal_that_does_not_fit(void **state)
{
    const char *dir = *state;
    enum { N = 120, LEN = 60000 };
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
        crash_child(dir, N, LEN);
    int wst;
    assert_int_equal(waitpid(pid, &wst, 0), pid);
    assert_true(WIFEXITED(wst) && WEXITSTATUS(wst) == 0);

    /* 7 MiB of journal into a map of at most 1 MiB (+2 MiB reserve) */
    wal_options_t o = {.dir = dir, .map_size_max = 1u << 20};
    char err[256] = "x";
    wal_t *wal = NULL;
    assert_int_equal(wal_open(&o, NULL, &wal, err, sizeof(err)), 0);
    assert_int_equal(err[0], 0);
    char reason[WAL_STATE_REASON_MAX];
    assert_int_equal(state_of(wal, reason, sizeof(reason)), WAL_STATE_FULL);
    assert_non_null(strstr(reason, "fold"));
    assert_int_equal(publish(wal, "r", 1, 10, NULL), WAL_EFULL);
    wal_stream_info_t info;
    assert_int_not_equal(wal_stream_get(wal, "r", 1, &info) == 0 ? info.next_offset : 0, N + 1);
    /* a read-only tool opens it too */
    wal_options_t ro = {.dir = dir, .read_only = 1};
    wal_t *rw = open_opts(&ro, NULL);
    wal_close(rw);
    wal_close(wal);

    wal_options_t big = {.dir = dir};
    wal = open_opts(&big, NULL);
    assert_int_equal(state_of(wal, NULL, 0), WAL_STATE_OK);
    uint64_t keys[N];
    for (unsigned i = 0; i < N; i++)
        keys[i] = 100 + i;
    check_stream(wal, "r", keys, N, LEN);
    wal_close(wal);
}

/* wal.map_size_max below the default initial map (64 MiB) is honoured. */
static void test_small_map_size_max_honoured(void **state)
{
    const char *dir = *state;
    wal_options_t o = {.dir = dir, .map_size_max = 8u << 20};
    wal_t *wal = open_opts(&o, NULL);
    wal_stats_t ws;
    assert_int_equal(wal_stats_get(wal, &ws), 0);
    assert_true(ws.map_size <= (8u << 20));
    uint64_t key = 0;
    int rc;
    while ((rc = publish(wal, "m", key++, 50000, NULL)) == 0)
        assert_true(key < 1000);
    assert_int_equal(rc, WAL_EFULL);
    assert_true(key * 50000 < (8u << 20) + (1u << 20));
    assert_int_equal(wal_stats_get(wal, &ws), 0);
    assert_true(ws.map_size <= (8u << 20) + (2u << 20));
    char reason[WAL_STATE_REASON_MAX];
    assert_int_equal(state_of(wal, reason, sizeof(reason)), WAL_STATE_FULL);
    assert_non_null(strstr(reason, "wal.map_size_max (8 MiB)"));
    wal_close(wal);
}

static void expect_open_error(const char *dir, int read_only)
{
    wal_options_t o = {.dir = dir, .read_only = read_only};
    wal_t *wal = NULL;
    char err[256] = "";
    int rc = wal_open(&o, NULL, &wal, err, sizeof(err));
    assert_int_not_equal(rc, 0);
    if (strlen(err) == 0 || !strstr(err, dir))
        fail_msg("open of '%s' failed (%s) with the reason \"%s\"", dir, wal_strerror(rc), err);
}

static void write_file(const char *path, const void *data, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, data, len), (ssize_t)len);
    close(fd);
}

/* A failed open always says what is wrong, naming the directory. */
static void test_open_errors_say_why(void **state)
{
    const char *dir = *state;
    char path[300], sub[200];
    uint8_t junk[8192];
    tu_fill(junk, sizeof(junk), 42);

    snprintf(sub, sizeof(sub), "%s/garbage", dir);
    assert_int_equal(mkdir(sub, 0700), 0);
    snprintf(path, sizeof(path), "%s/data.mdb", sub);
    write_file(path, junk, sizeof(junk));
    expect_open_error(sub, 0);
    expect_open_error(sub, 1);

    snprintf(sub, sizeof(sub), "%s/afile", dir);
    write_file(sub, "x", 1);
    expect_open_error(sub, 0);
    expect_open_error(sub, 1);

    snprintf(sub, sizeof(sub), "%s/dirdata", dir);
    assert_int_equal(mkdir(sub, 0700), 0);
    snprintf(path, sizeof(path), "%s/data.mdb", sub);
    assert_int_equal(mkdir(path, 0700), 0);
    expect_open_error(sub, 0);

    snprintf(sub, sizeof(sub), "%s/missing", dir);
    expect_open_error(sub, 1);

    /* a good WAL whose data file was cut short */
    snprintf(sub, sizeof(sub), "%s/short", dir);
    wal_options_t o = {.dir = sub};
    wal_t *wal = open_opts(&o, NULL);
    assert_int_equal(publish(wal, "t", 1, 100, NULL), 0);
    wal_close(wal);
    snprintf(path, sizeof(path), "%s/data.mdb", sub);
    assert_int_equal(truncate(path, 100), 0);
    expect_open_error(sub, 0);
}

/* The state callback runs on the loop after a change. Publishes go one
 * at a time (each submitted from the previous one's completion), so the
 * first refusal is the change to FULL and nothing succeeds after it. */
struct cbctx {
    wal_t *wal;
    struct event_base *base;
    int calls, saw_full, refused, published;
};

/* Done once both the refusal and the callback that saw FULL came (they
 * may come in either order: the change is noted before the completion). */
static void maybe_done(struct cbctx *x)
{
    if (x->refused && x->saw_full)
        event_base_loopexit(x->base, NULL);
}

static void on_state(void *arg)
{
    struct cbctx *x = arg;
    x->calls++;
    if (state_of(x->wal, NULL, 0) == WAL_STATE_FULL)
        x->saw_full = 1;
    maybe_done(x);
}

static void submit_one(struct cbctx *x);

static void pub_cb(wal_append_t *req, void *arg)
{
    struct cbctx *x = arg;
    int st = wal_append_status(req);
    wal_append_free(req);
    if (st == 0 && ++x->published < 1000)
        submit_one(x);
    else if (st == WAL_EFULL) {
        x->refused = 1;
        maybe_done(x);
    } else
        event_base_loopexit(x->base, NULL);
}

static void submit_one(struct cbctx *x)
{
    static uint8_t buf[40000];
    wal_append_t *req;
    assert_int_equal(wal_append_new(pub_cb, x, &req), 0);
    wal_msg_t m = tu_msg("cb", buf, sizeof(buf));
    assert_int_equal(wal_append_add_msg(req, &m), 0);
    wal_append_when_durable(req);
    assert_int_equal(wal_append_submit(x->wal, req), 0);
}

static void test_state_callback_on_loop(void **state)
{
    const char *dir = *state;
    evthread_use_pthreads();
    struct cbctx x = {0};
    x.base = event_base_new();
    assert_non_null(x.base);
    wal_options_t o = {.dir = dir, .map_size = 1u << 20, .map_size_max = 1ull << 30};
    x.wal = open_opts(&o, x.base);
    wal_state_info_t st;
    wal_state_get(x.wal, &st);
    if (!st.preallocated) {
        wal_close(x.wal);
        event_base_free(x.base);
        return;
    }
    wal_on_state(x.wal, on_state, &x);
    wal_testing_fail_alloc(x.wal, UINT32_MAX);
    submit_one(&x);
    struct timeval limit = {30, 0}; /* a bound, not a measurement */
    event_base_loopexit(x.base, &limit);
    event_base_dispatch(x.base);
    assert_true(x.published > 0);
    assert_true(x.refused);
    assert_int_equal(x.calls, 1);
    assert_true(x.saw_full);
    wal_close(x.wal);
    event_base_free(x.base);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_blocks_allocated_ahead_of_the_map, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_disk_full_refuses_then_resumes, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_idle_retry_clears_full, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_group_commit_at_full_stores_what_fits, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_fold_deferred_for_space, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_close_with_fold_deferred, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_fold_eio_fail_stops_with_reason, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_journal_fsync_eio_reason, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_open_with_journal_that_does_not_fit, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_small_map_size_max_honoured, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_open_errors_say_why, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_state_callback_on_loop, tu_setup_dir, tu_teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
