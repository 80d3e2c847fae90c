/*
 * wal_group_commit_test.c - group commit: many concurrent submitters share
 * transactions; completions run on the right thread, exactly once; batch
 * limits split work but never split a request; wal_close delivers what is
 * pending.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include <cmocka.h>

#include <event2/event.h>
#include <event2/thread.h>

#include "wal_test_util.h"

#define NTHREADS       16
#define PER_THREAD     200
#define NASYNC         400
#define ASYNC_INFLIGHT 32

static wal_t *open_wal(const wal_options_t *o, struct event_base *base)
{
    wal_t *wal = NULL;
    char err[256] = "";
    int rc = wal_open(o, base, &wal, err, sizeof err);
    if (rc)
        fail_msg("wal_open %s: %s (%s)", o->dir, wal_strerror(rc), err);
    return wal;
}

/* ---- sync submitters ------------------------------------------------------------- */

typedef struct sync_arg {
    wal_t *wal;
    unsigned idx;
    unsigned n;
    uint64_t seqs[PER_THREAD];
} sync_arg_t;

static void *sync_thread(void *p)
{
    sync_arg_t *a = p;
    char stream[32], payload[64];
    snprintf(stream, sizeof stream, "g.%u", a->idx);
    for (unsigned i = 0; i < a->n; i++) {
        snprintf(payload, sizeof payload, "t%u-m%u", a->idx, i);
        wal_msg_t m = tu_msg(stream, payload, strlen(payload));
        wal_result_t res;
        int rc = wal_append_sync(a->wal, &m, 1, &res);
        TU_CHECK(rc == 0, "thread %u: wal_append_sync: %s", a->idx, wal_strerror(rc));
        if (rc)
            break;
        TU_CHECK(res.offset == i + 1, "thread %u: offset %" PRIu64 ", expected %u", a->idx,
                 res.offset, i + 1);
        TU_CHECK(res.duplicate == 0, "duplicate");
        a->seqs[i] = res.seq;
    }
    return NULL;
}

/* ---- async submitter on the event loop ------------------------------------------- */

typedef struct async_run {
    wal_t *wal;
    struct event_base *base;
    pthread_t loop_thread;
    unsigned submitted, completed, busy, total;
    int calls[NASYNC];
    uint64_t offset[NASYNC], seq[NASYNC];
    const char *stream;
} async_run_t;

typedef struct async_req {
    async_run_t *run;
    unsigned idx;
    int64_t submitted_us; /* CLOCK_MONOTONIC, before wal_append_submit */
} async_req_t;

static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static async_req_t async_reqs[NASYNC];

static void async_submit(async_run_t *run);

static void async_cb(wal_append_t *req, void *arg)
{
    async_req_t *ar = arg;
    async_run_t *run = ar->run;
    TU_CHECK(pthread_equal(pthread_self(), run->loop_thread),
             "completion not on the event-loop thread");
    run->calls[ar->idx]++;
    int st = wal_append_status(req);
    TU_CHECK(st == 0, "async request %u: %s", ar->idx, wal_strerror(st));
    if (st == 0 && wal_append_count(req) == 1) {
        run->offset[ar->idx] = wal_append_result(req, 0)->offset;
        run->seq[ar->idx] = wal_append_result(req, 0)->seq;
    }
    /* the writer's time stamps: taken after the submit, completed after
     * that, and the completion runs after both */
    int64_t taken = 0, done = 0;
    wal_append_times(req, &taken, &done);
    TU_CHECK(taken >= ar->submitted_us && done >= taken && mono_us() >= done,
             "request %u: submitted %" PRId64 ", taken %" PRId64 ", done %" PRId64, ar->idx,
             ar->submitted_us, taken, done);
    wal_append_free(req);
    run->completed++;
    run->busy--;
    async_submit(run);
    if (run->busy == 0)
        event_base_loopbreak(run->base);
}

static void async_submit(async_run_t *run)
{
    while (run->busy < ASYNC_INFLIGHT && run->submitted < run->total) {
        unsigned i = run->submitted++;
        async_reqs[i] = (async_req_t){run, i, 0};
        wal_append_t *req = NULL;
        int rc = wal_append_new(async_cb, &async_reqs[i], &req);
        TU_CHECK(rc == 0, "wal_append_new");
        char payload[32];
        snprintf(payload, sizeof payload, "a%u", i);
        wal_msg_t m = tu_msg(run->stream, payload, strlen(payload));
        rc = wal_append_add_msg(req, &m);
        TU_CHECK(rc == 0, "wal_append_add_msg");
        int64_t t0 = 0, t1 = 0;
        wal_append_times(req, &t0, &t1);
        TU_CHECK(t0 == 0 && t1 == 0, "times before submit");
        async_reqs[i].submitted_us = mono_us();
        rc = wal_append_submit(run->wal, req);
        TU_CHECK(rc == 0, "wal_append_submit: %s", wal_strerror(rc));
        if (rc) {
            wal_append_free(req);
            return;
        }
        run->busy++;
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void test_many_submitters(void **state)
{
    const char *dir = *state;
    tu_errors_reset();
    struct event_base *base = event_base_new();
    assert_non_null(base);
    wal_t *wal = open_wal(&(wal_options_t){.dir = dir}, base);

    static sync_arg_t sa[NTHREADS];
    pthread_t th[NTHREADS];
    for (unsigned i = 0; i < NTHREADS; i++) {
        sa[i] = (sync_arg_t){.wal = wal, .idx = i, .n = PER_THREAD};
        assert_int_equal(pthread_create(&th[i], NULL, sync_thread, &sa[i]), 0);
    }
    static async_run_t run;
    memset(&run, 0, sizeof run);
    run.wal = wal;
    run.base = base;
    run.loop_thread = pthread_self();
    run.total = NASYNC;
    run.stream = "g.async";
    async_submit(&run);
    assert_int_equal(event_base_loop(base, EVLOOP_NO_EXIT_ON_EMPTY), 0);
    for (unsigned i = 0; i < NTHREADS; i++)
        pthread_join(th[i], NULL);
    if (tu_errors())
        fail_msg("%u errors; first: %s", tu_errors(), tu_err_first);

    assert_int_equal(run.completed, NASYNC);
    for (unsigned i = 0; i < NASYNC; i++)
        assert_int_equal(run.calls[i], 1);
    /* one submitter, one stream: offsets follow the submit order */
    for (unsigned i = 0; i < NASYNC; i++)
        assert_int_equal(run.offset[i], i + 1);

    unsigned requests = NTHREADS * PER_THREAD + NASYNC;
    uint64_t *seqs = malloc(requests * sizeof *seqs);
    size_t k = 0;
    for (unsigned i = 0; i < NTHREADS; i++)
        for (unsigned j = 0; j < PER_THREAD; j++)
            seqs[k++] = sa[i].seqs[j];
    for (unsigned i = 0; i < NASYNC; i++)
        seqs[k++] = run.seq[i];
    qsort(seqs, k, sizeof *seqs, cmp_u64);
    assert_true(seqs[0] >= 1);
    for (size_t i = 1; i < k; i++)
        assert_true(seqs[i] > seqs[i - 1]);
    free(seqs);

    wal_stats_t st;
    assert_int_equal(wal_stats_get(wal, &st), 0);
    printf("# %u requests (%u threads x %u sync + %u async) in %" PRIu64 " commits\n", requests,
           NTHREADS, PER_THREAD, NASYNC, st.commits);
    assert_int_equal(st.committed_msgs, requests);
    assert_true(st.commits >= 1);
    assert_true(st.commits < requests); /* they were grouped */
    assert_int_equal(st.failed_commits, 0);

    tu_recs_t recs = {0};
    wal_read_result_t res;
    assert_int_equal(wal_log_read(wal, 1, UINT32_MAX, UINT64_MAX, tu_recs_cb, &recs, &res), 0);
    assert_int_equal(recs.n, requests);
    tu_recs_free(&recs);
    assert_int_equal(
        wal_stream_read(wal, "g.async", 7, 1, UINT32_MAX, UINT64_MAX, tu_recs_cb, &recs, &res), 0);
    assert_int_equal(recs.n, NASYNC);
    for (unsigned i = 0; i < NASYNC; i++) {
        char payload[32];
        snprintf(payload, sizeof payload, "a%u", i);
        assert_true(tu_mem_eq(recs.v[i].payload, recs.v[i].payload_len, payload, strlen(payload)));
    }
    tu_recs_free(&recs);
    wal_close(wal);
    event_base_free(base);
}

/* wal_append_sync does not need the event loop that completions go to. */
static void test_sync_without_loop(void **state)
{
    const char *dir = *state;
    tu_errors_reset();
    struct event_base *base = event_base_new();
    assert_non_null(base);
    wal_t *wal = open_wal(&(wal_options_t){.dir = dir}, base);
    wal_msg_t m = tu_msg("nl", "x", 1);
    wal_result_t res;
    assert_int_equal(wal_append_sync(wal, &m, 1, &res), 0);
    assert_int_equal(res.offset, 1);
    sync_arg_t *sa = calloc(3, sizeof *sa);
    pthread_t th[3];
    for (unsigned i = 0; i < 3; i++) {
        sa[i] = (sync_arg_t){.wal = wal, .idx = 100 + i, .n = 20};
        assert_int_equal(pthread_create(&th[i], NULL, sync_thread, &sa[i]), 0);
    }
    for (unsigned i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    free(sa);
    if (tu_errors())
        fail_msg("%u errors; first: %s", tu_errors(), tu_err_first);
    wal_close(wal);
    event_base_free(base);
}

typedef struct pending {
    int calls;
    int status;
    pthread_t thread;
    uint64_t offset;
} pending_t;

static void pending_cb(wal_append_t *req, void *arg)
{
    pending_t *p = arg;
    p->calls++;
    p->thread = pthread_self();
    p->status = wal_append_status(req);
    if (p->status == 0)
        p->offset = wal_append_result(req, 0)->offset;
}

/* Requests submitted but not yet completed on the loop: wal_close runs
 * their callbacks inline. */
static void test_close_delivers_pending(void **state)
{
    const char *dir = *state;
    struct event_base *base = event_base_new();
    assert_non_null(base);
    wal_t *wal = open_wal(&(wal_options_t){.dir = dir}, base);
    enum { N = 50 };
    pending_t p[N];
    wal_append_t *reqs[N];
    memset(p, 0, sizeof p);
    for (int i = 0; i < N; i++) {
        assert_int_equal(wal_append_new(pending_cb, &p[i], &reqs[i]), 0);
        wal_msg_t m = tu_msg("pend", "x", 1);
        assert_int_equal(wal_append_add_msg(reqs[i], &m), 0);
        assert_int_equal(wal_append_submit(wal, reqs[i]), 0);
    }
    wal_close(wal); /* the loop never ran */
    for (int i = 0; i < N; i++) {
        assert_int_equal(p[i].calls, 1);
        assert_int_equal(p[i].status, 0);
        assert_true(pthread_equal(p[i].thread, pthread_self()));
        assert_int_equal(p[i].offset, (uint64_t)i + 1);
        wal_append_free(reqs[i]);
    }
    /* running the loop now must not call anything again */
    assert_true(event_base_loop(base, EVLOOP_NONBLOCK) >= 0); /* 1: nothing pending */
    for (int i = 0; i < N; i++)
        assert_int_equal(p[i].calls, 1);
    event_base_free(base);

    wal = open_wal(&(wal_options_t){.dir = dir}, NULL);
    wal_stream_info_t info;
    assert_int_equal(wal_stream_get(wal, "pend", 4, &info), 0);
    assert_int_equal(info.next_offset, N + 1);
    wal_close(wal);
}

typedef struct wt {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int done;
    int bad;
    int same_thread;
    pthread_t first;
} wt_t;

static void writer_thread_cb(wal_append_t *req, void *arg)
{
    wt_t *w = arg;
    pthread_mutex_lock(&w->lock);
    if (w->done == 0)
        w->first = pthread_self();
    else if (!pthread_equal(w->first, pthread_self()))
        w->same_thread = 0;
    if (wal_append_status(req) != 0)
        w->bad++;
    w->done++;
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

/* Without an event_base, completions run on the writer thread. */
static void test_null_base_completions(void **state)
{
    const char *dir = *state;
    wal_t *wal = open_wal(&(wal_options_t){.dir = dir}, NULL);
    enum { N = 64 };
    wt_t w = {
        .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER, .same_thread = 1};
    wal_append_t *reqs[N];
    for (int i = 0; i < N; i++) {
        assert_int_equal(wal_append_new(writer_thread_cb, &w, &reqs[i]), 0);
        wal_msg_t m = tu_msg("nb", "y", 1);
        assert_int_equal(wal_append_add_msg(reqs[i], &m), 0);
        assert_int_equal(wal_append_submit(wal, reqs[i]), 0);
    }
    pthread_mutex_lock(&w.lock);
    while (w.done < N)
        pthread_cond_wait(&w.cond, &w.lock);
    pthread_mutex_unlock(&w.lock);
    assert_int_equal(w.bad, 0);
    assert_int_equal(w.same_thread, 1);
    assert_false(pthread_equal(w.first, pthread_self()));
    for (int i = 0; i < N; i++) {
        assert_int_equal(wal_append_result(reqs[i], 0)->offset, (uint64_t)i + 1);
        wal_append_free(reqs[i]);
    }
    wal_close(wal);
}

/* batch_wait_us lingers for more appends, but only while fewer than
 * batch_wait_msgs are queued: with a linger of a minute and a threshold of
 * 3, a request waits for two more and the three commit together at once. */
static void test_linger_until_msgs(void **state)
{
    const char *dir = *state;
    wal_options_t o = {.dir = dir, .batch_wait_us = 60u * 1000000, .batch_wait_msgs = 3};
    wal_t *wal = open_wal(&o, NULL);
    wt_t w = {
        .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER, .same_thread = 1};
    wal_stats_t st0, st1;
    assert_int_equal(wal_stats_get(wal, &st0), 0);
    wal_append_t *reqs[3];
    for (int i = 0; i < 3; i++) {
        assert_int_equal(wal_append_new(writer_thread_cb, &w, &reqs[i]), 0);
        wal_msg_t m = tu_msg("linger", "z", 1);
        assert_int_equal(wal_append_add_msg(reqs[i], &m), 0);
        assert_int_equal(wal_append_submit(wal, reqs[i]), 0);
        if (i == 0) {
            /* give the writer time to take the first and start lingering:
             * without the linger it would commit it alone (2 commits) */
            struct timespec ts = {0, 50 * 1000000};
            nanosleep(&ts, NULL);
        }
    }
    /* a guard against waiting for the minute, not a speed limit */
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 30;
    pthread_mutex_lock(&w.lock);
    int rc = 0;
    while (w.done < 3 && rc == 0)
        rc = pthread_cond_timedwait(&w.cond, &w.lock, &dl);
    int done = w.done;
    pthread_mutex_unlock(&w.lock);
    assert_int_equal(done, 3);
    assert_int_equal(w.bad, 0);
    assert_int_equal(wal_stats_get(wal, &st1), 0);
    assert_int_equal(st1.commits - st0.commits, 1);
    assert_int_equal(st1.committed_msgs - st0.committed_msgs, 3);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(wal_append_result(reqs[i], 0)->offset, (uint64_t)i + 1);
        wal_append_free(reqs[i]);
    }
    wal_close(wal);
}

typedef struct loop_batch {
    struct event_base *base;
    int remaining;
    int bad;
} loop_batch_t;

static void loop_batch_cb(wal_append_t *req, void *arg)
{
    loop_batch_t *lb = arg;
    if (wal_append_status(req) != 0)
        lb->bad++;
    wal_append_free(req);
    if (--lb->remaining == 0)
        event_base_loopbreak(lb->base);
}

static void submit_n(wal_t *wal, loop_batch_t *lb, const char *stream, unsigned nreq,
                     unsigned msgs_per_req, size_t payload_len)
{
    uint8_t *buf = calloc(1, payload_len + 1);
    for (unsigned i = 0; i < nreq; i++) {
        wal_append_t *req = NULL;
        assert_int_equal(wal_append_new(loop_batch_cb, lb, &req), 0);
        for (unsigned j = 0; j < msgs_per_req; j++) {
            wal_msg_t m = tu_msg(stream, buf, payload_len);
            assert_int_equal(wal_append_add_msg(req, &m), 0);
        }
        assert_int_equal(wal_append_submit(wal, req), 0);
        lb->remaining++;
    }
    free(buf);
}

/* batch_max_msgs / batch_max_bytes bound a transaction, but a request
 * larger than either still commits (alone). */
static void test_batch_limits(void **state)
{
    const char *dir = *state;
    struct event_base *base = event_base_new();
    assert_non_null(base);
    wal_options_t o = {.dir = dir, .batch_max_msgs = 10, .batch_max_bytes = 10000};
    wal_t *wal = open_wal(&o, base);
    loop_batch_t lb = {.base = base};
    wal_stats_t st0, st1;

    assert_int_equal(wal_stats_get(wal, &st0), 0);
    submit_n(wal, &lb, "bl.msgs", 100, 1, 1);
    assert_int_equal(event_base_loop(base, EVLOOP_NO_EXIT_ON_EMPTY), 0);
    assert_int_equal(lb.bad, 0);
    assert_int_equal(wal_stats_get(wal, &st1), 0);
    printf("# 100 one-message requests, batch_max_msgs 10: %" PRIu64 " commits\n",
           st1.commits - st0.commits);
    assert_true(st1.commits - st0.commits >= 10);
    assert_int_equal(st1.committed_msgs - st0.committed_msgs, 100);

    st0 = st1;
    submit_n(wal, &lb, "bl.bytes", 20, 1, 4000);
    assert_int_equal(event_base_loop(base, EVLOOP_NO_EXIT_ON_EMPTY), 0);
    assert_int_equal(lb.bad, 0);
    assert_int_equal(wal_stats_get(wal, &st1), 0);
    printf("# 20 requests of 4000 bytes, batch_max_bytes 10000: %" PRIu64 " commits\n",
           st1.commits - st0.commits);
    assert_true(st1.commits - st0.commits >= 10);

    /* one request over both limits */
    submit_n(wal, &lb, "bl.big", 1, 50, 1000);
    assert_int_equal(event_base_loop(base, EVLOOP_NO_EXIT_ON_EMPTY), 0);
    assert_int_equal(lb.bad, 0);
    wal_stream_info_t info;
    assert_int_equal(wal_stream_get(wal, "bl.big", 6, &info), 0);
    assert_int_equal(info.next_offset, 51);
    assert_int_equal(wal_stream_get(wal, "bl.msgs", 7, &info), 0);
    assert_int_equal(info.next_offset, 101);
    assert_int_equal(wal_stream_get(wal, "bl.bytes", 8, &info), 0);
    assert_int_equal(info.next_offset, 21);
    wal_close(wal);
    event_base_free(base);
}

int main(void)
{
    evthread_use_pthreads();
    tu_master_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_many_submitters, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_sync_without_loop, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_close_delivers_pending, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_null_base_completions, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_batch_limits, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_linger_until_msgs, tu_setup_dir, tu_teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
