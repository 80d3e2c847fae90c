/*
 * wal_reader_test.c - reads concurrent with appends: reader threads in the
 * writer's process and a read-only reader in another process must only ever
 * see committed prefixes (contiguous offsets, intact records), also while
 * the map grows underneath them. Plus read-only opens.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/wait.h>

#include "wal_test_util.h"

#define NSTREAMS    4
#define PAYLOAD_MAX 1500
#define BATCH_MAX   64

static const char *const names[NSTREAMS] = {"rd.alpha", "rd.beta", "rd.gamma", "rd.delta"};

static wal_t *open_rw(const char *dir, uint64_t map_size, uint64_t map_max)
{
    wal_options_t o;
    memset(&o, 0, sizeof o);
    o.dir = dir;
    o.map_size = map_size;
    o.map_size_max = map_max;
    wal_t *wal = NULL;
    char err[256] = "";
    int rc = wal_open(&o, NULL, &wal, err, sizeof err);
    if (rc)
        fail_msg("wal_open %s: %s (%s)", dir, wal_strerror(rc), err);
    return wal;
}

/* ---- the writer: deterministic content, predicted offsets ------------------- */

typedef struct writer {
    wal_t *wal;
    tu_rng_t rng;
    uint64_t next[NSTREAMS];
    uint64_t total;
    uint64_t last_seq;
} writer_t;

/* Append one random batch; content derives from (stream, offset). */
static void writer_batch(writer_t *w)
{
    size_t n = (size_t)tu_range(&w->rng, 1, BATCH_MAX);
    wal_msg_t msgs[BATCH_MAX];
    wal_result_t res[BATCH_MAX];
    uint8_t *bufs[BATCH_MAX];
    uint32_t st[BATCH_MAX];
    uint64_t off[BATCH_MAX];
    uint64_t next[NSTREAMS];
    memcpy(next, w->next, sizeof next);
    for (size_t i = 0; i < n; i++) {
        st[i] = (uint32_t)tu_range(&w->rng, 0, NSTREAMS - 1);
        off[i] = next[st[i]]++;
        size_t len = tu_pos_len(st[i], off[i], PAYLOAD_MAX);
        bufs[i] = malloc(len + 1);
        tu_fill(bufs[i], len, tu_pos_key(st[i], off[i]));
        msgs[i] = tu_msg(names[st[i]], bufs[i], len);
        msgs[i].direction = (enum wal_direction)(off[i] & 1);
    }
    int rc = wal_append_sync(w->wal, msgs, n, res);
    for (size_t i = 0; i < n; i++)
        free(bufs[i]);
    if (rc)
        fail_msg("wal_append_sync: %s", wal_strerror(rc));
    for (size_t i = 0; i < n; i++)
        if (res[i].offset != off[i])
            fail_msg("stream %u: offset %" PRIu64 ", expected %" PRIu64, st[i], res[i].offset,
                     off[i]);
    memcpy(w->next, next, sizeof next);
    w->total += n;
    w->last_seq = res[n - 1].seq;
}

/* ---- a reader's incremental view --------------------------------------------- */

typedef struct view {
    wal_t *wal;
    uint64_t next[NSTREAMS];    /* next offset expected from stream reads */
    uint64_t log_next;          /* next seq to ask the log for */
    uint64_t log_last_seq;      /* last seq seen in the log */
    uint64_t log_off[NSTREAMS]; /* next offset expected per stream in the log */
    uint64_t log_count;
    unsigned bad;
    char why[256];
    uint32_t cur;   /* stream being read */
    int retention;  /* the writer drops prefixes: jumps after WAL_ETRUNCATED */
    uint64_t jumps; /* WAL_ETRUNCATED seen */
} view_t;

static void view_init(view_t *v, wal_t *wal)
{
    memset(v, 0, sizeof *v);
    v->wal = wal;
    for (int s = 0; s < NSTREAMS; s++) {
        v->next[s] = 1;
        v->log_off[s] = 1;
    }
    v->log_next = 1;
}

static void view_bad(view_t *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void view_bad(view_t *v, const char *fmt, ...)
{
    if (v->bad++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(v->why, sizeof v->why, fmt, ap);
        va_end(ap);
    }
}

static int stream_index(const char *name, size_t len)
{
    for (int s = 0; s < NSTREAMS; s++)
        if (tu_mem_eq(name, len, names[s], strlen(names[s])))
            return s;
    return -1;
}

static int rec_intact(const wal_record_t *r, uint32_t s)
{
    return r->payload_len == tu_pos_len(s, r->offset, PAYLOAD_MAX) &&
           tu_check_fill(r->payload, r->payload_len, tu_pos_key(s, r->offset)) &&
           r->direction == (enum wal_direction)(r->offset & 1) && r->producer_len == 0 &&
           r->msgid_len == 0 && r->headers_len == 0;
}

static int view_stream_cb(const wal_record_t *r, void *arg)
{
    view_t *v = arg;
    uint32_t s = v->cur;
    if (r->offset != v->next[s])
        view_bad(v, "stream %u: got offset %" PRIu64 ", expected %" PRIu64, s, r->offset,
                 v->next[s]);
    else if (!tu_mem_eq(r->stream, r->stream_len, names[s], strlen(names[s])))
        view_bad(v, "stream %u offset %" PRIu64 ": wrong stream name", s, r->offset);
    else if (!rec_intact(r, s))
        view_bad(v, "stream %u offset %" PRIu64 ": content differs", s, r->offset);
    v->next[s] = r->offset + 1;
    return 0;
}

static int view_log_cb(const wal_record_t *r, void *arg)
{
    view_t *v = arg;
    int s = stream_index(r->stream, r->stream_len);
    if (r->seq <= v->log_last_seq)
        view_bad(v, "log: seq %" PRIu64 " after %" PRIu64, r->seq, v->log_last_seq);
    v->log_last_seq = r->seq;
    if (s < 0) {
        view_bad(v, "log seq %" PRIu64 ": unknown stream", r->seq);
        return 0;
    }
    if (r->offset != v->log_off[s] && !(v->retention && r->offset > v->log_off[s]))
        view_bad(v, "log seq %" PRIu64 ": stream %d offset %" PRIu64 ", expected %" PRIu64, r->seq,
                 s, r->offset, v->log_off[s]);
    else if (!rec_intact(r, (uint32_t)s))
        view_bad(v, "log seq %" PRIu64 ": content differs", r->seq);
    v->log_off[s] = r->offset + 1;
    v->log_count++;
    return 0;
}

/* One pass over every stream and the log, in small reads. Returns the
 * number of records seen in stream reads. */
static uint64_t view_pass(view_t *v, tu_rng_t *r)
{
    uint64_t seen = 0;
    for (uint32_t s = 0; s < NSTREAMS; s++) {
        v->cur = s;
        for (int k = 0; k < 1000; k++) {
            wal_read_result_t res;
            memset(&res, 0, sizeof res);
            uint64_t from = v->next[s];
            int rc = wal_stream_read(v->wal, names[s], strlen(names[s]), from,
                                     (uint32_t)tu_range(r, 1, 100), tu_range(r, 1, 64000),
                                     view_stream_cb, v, &res);
            if (rc == WAL_ENOTFOUND && from == 1)
                break; /* not created yet */
            if (rc == WAL_ETRUNCATED && v->retention) {
                if (res.next <= from || res.count != 0)
                    view_bad(v, "stream %u: truncated at %" PRIu64 ", next %" PRIu64 ", count %u",
                             s, from, res.next, res.count);
                v->next[s] = res.next;
                v->jumps++;
                continue;
            }
            if (rc) {
                view_bad(v, "stream read %u from %" PRIu64 ": %s", s, from, wal_strerror(rc));
                return seen;
            }
            if (res.next != v->next[s])
                view_bad(v, "stream %u: res.next %" PRIu64 " but next is %" PRIu64, s, res.next,
                         v->next[s]);
            seen += res.count;
            if (res.count == 0)
                break;
        }
        /* what was seen was committed: the head is at least there */
        wal_stream_info_t info;
        if (v->next[s] > 1 && wal_stream_get(v->wal, names[s], strlen(names[s]), &info) == 0 &&
            info.next_offset < v->next[s])
            view_bad(v, "stream %u: head %" PRIu64 " behind what was read %" PRIu64, s,
                     info.next_offset, v->next[s]);
    }
    for (int k = 0; k < 1000; k++) {
        wal_read_result_t res;
        memset(&res, 0, sizeof res);
        int rc = wal_log_read(v->wal, v->log_next, (uint32_t)tu_range(r, 1, 200),
                              tu_range(r, 1, 128000), view_log_cb, v, &res);
        if (rc) {
            view_bad(v, "log read from %" PRIu64 ": %s", v->log_next, wal_strerror(rc));
            break;
        }
        if (res.count == 0)
            break;
        v->log_next = res.next;
    }
    return seen;
}

static uint64_t view_total(const view_t *v)
{
    uint64_t t = 0;
    for (int s = 0; s < NSTREAMS; s++)
        t += v->next[s] - 1;
    return t;
}

/* ---- readers in the writer's process ----------------------------------------- */

typedef struct rthread {
    view_t view;
    tu_rng_t rng;
    atomic_int *stop;
    unsigned passes;
} rthread_t;

static void *reader_thread(void *p)
{
    rthread_t *t = p;
    /* bounded: the writer finishes in a bounded number of batches */
    while (!atomic_load(t->stop) && t->view.bad == 0 && t->passes < 10000000) {
        view_pass(&t->view, &t->rng);
        t->passes++;
    }
    view_pass(&t->view, &t->rng); /* after the last commit: sees everything */
    return NULL;
}

static void run_threads(const char *dir, uint64_t map_size, uint64_t map_max, const char *tag,
                        uint64_t target_bytes)
{
    tu_rng_t r = tu_rng_for(tag);
    wal_t *wal = open_rw(dir, map_size, map_max);
    writer_t w = {.wal = wal, .rng = {tu_rand(&r)}};
    for (int s = 0; s < NSTREAMS; s++)
        w.next[s] = 1;
    atomic_int stop = 0;
    rthread_t rt[2];
    pthread_t th[2];
    for (int i = 0; i < 2; i++) {
        memset(&rt[i], 0, sizeof rt[i]);
        view_init(&rt[i].view, wal);
        rt[i].rng.s = tu_rand(&r);
        rt[i].stop = &stop;
        assert_int_equal(pthread_create(&th[i], NULL, reader_thread, &rt[i]), 0);
    }
    /* about PAYLOAD_MAX/2 bytes per message */
    while (w.total * (PAYLOAD_MAX / 2) < target_bytes)
        writer_batch(&w);
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    wal_stats_t st;
    assert_int_equal(wal_stats_get(wal, &st), 0);
    printf("# %s: %" PRIu64 " messages, reader passes %u/%u, map %" PRIu64 " (%" PRIu64 " grows)\n",
           tag, w.total, rt[0].passes, rt[1].passes, st.map_size, st.map_grows);
    for (int i = 0; i < 2; i++) {
        if (rt[i].view.bad)
            fail_msg("reader %d: %u bad, first: %s", i, rt[i].view.bad, rt[i].view.why);
        assert_int_equal(view_total(&rt[i].view), w.total);
        assert_int_equal(rt[i].view.log_count, w.total);
        for (int s = 0; s < NSTREAMS; s++)
            assert_int_equal(rt[i].view.next[s], w.next[s]);
    }
    if (map_size && map_max > map_size)
        assert_true(st.map_grows > 0);
    wal_close(wal);
}

static void test_reader_threads(void **state)
{
    run_threads(*state, 0, 0, "reader_threads", 6u << 20);
}

/* The map grows (mdb_env_set_mapsize) while other threads read. */
static void test_reader_threads_growing_map(void **state)
{
    run_threads(*state, 1u << 20, 64u << 20, "reader_threads_growing", 8u << 20);
}

/* Readers while the writer also drops prefixes: a reader below the first
 * offset gets WAL_ETRUNCATED and resumes at res.next; otherwise it sees
 * contiguous, intact records. */
static void test_reader_threads_during_retention(void **state)
{
    tu_rng_t r = tu_rng_for("reader_retention");
    wal_options_t o = {.dir = *state, .retain_chunk = 50};
    wal_t *wal = NULL;
    assert_int_equal(wal_open(&o, NULL, &wal, NULL, 0), 0);
    writer_t w = {.wal = wal, .rng = {tu_rand(&r)}};
    for (int s = 0; s < NSTREAMS; s++)
        w.next[s] = 1;
    atomic_int stop = 0;
    rthread_t rt[2];
    pthread_t th[2];
    for (int i = 0; i < 2; i++) {
        memset(&rt[i], 0, sizeof rt[i]);
        view_init(&rt[i].view, wal);
        rt[i].view.retention = 1;
        rt[i].rng.s = tu_rand(&r);
        rt[i].stop = &stop;
        assert_int_equal(pthread_create(&th[i], NULL, reader_thread, &rt[i]), 0);
    }
    uint64_t marks[8] = {0}, dropped_total = 0, upto = 0;
    for (int batch = 0; batch < 400; batch++) {
        writer_batch(&w);
        marks[batch % 8] = w.last_seq;
        if (batch % 8 == 7) {
            uint64_t dropped = 0;
            upto = marks[0]; /* keep the last 7 batches */
            assert_int_equal(wal_retain(wal, upto, &dropped), 0);
            dropped_total += dropped;
        }
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    wal_stats_t st;
    assert_int_equal(wal_stats_get(wal, &st), 0);
    printf("# reader_retention: %" PRIu64 " messages, %" PRIu64 " dropped, jumps %" PRIu64
           "/%" PRIu64 ", first_seq %" PRIu64 "\n",
           w.total, dropped_total, rt[0].view.jumps, rt[1].view.jumps, st.first_seq);
    assert_true(dropped_total > 0);
    assert_true(st.first_seq > upto);
    assert_int_equal(st.first_seq, upto + 1); /* seqs are dense here: one writer */
    for (int i = 0; i < 2; i++) {
        if (rt[i].view.bad)
            fail_msg("reader %d: %u bad, first: %s", i, rt[i].view.bad, rt[i].view.why);
        for (int s = 0; s < NSTREAMS; s++)
            assert_int_equal(rt[i].view.next[s], w.next[s]);
    }
    /* what is left is exactly the records after upto */
    tu_recs_t recs = {0};
    wal_read_result_t res;
    assert_int_equal(wal_log_read(wal, 1, UINT32_MAX, UINT64_MAX, tu_recs_cb, &recs, &res), 0);
    assert_int_equal(recs.n, w.total - dropped_total);
    assert_int_equal(recs.v[0].seq, upto + 1);
    tu_recs_free(&recs);
    wal_close(wal);
}

/* ---- a read-only reader in another process ----------------------------------- */

/* Child -> parent reports. */
typedef struct report {
    uint64_t seen;     /* records seen in stream reads so far */
    uint64_t log_seen; /* records seen in the log so far */
    uint32_t passes;
    uint32_t final;  /* 1: the last report */
    uint32_t bad;    /* mismatches seen */
    uint32_t status; /* final: 0 ok, else a wal error code negated */
    char why[200];
} report_t;

/* Parent -> child: sent once, after the last append. */
typedef struct done_msg {
    uint64_t next[NSTREAMS];
} done_msg_t;

static int write_all(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t k = write(fd, p, len);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        p += k;
        len -= (size_t)k;
    }
    return 0;
}

static int read_all(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t k = read(fd, p, len);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        p += k;
        len -= (size_t)k;
    }
    return 0;
}

/* Runs in the child: never returns into cmocka. */
static void child_reader(const char *dir, int ctl_fd, int rep_fd, uint64_t seed)
{
    alarm(120); /* never outlive a broken parent */
    report_t rep;
    memset(&rep, 0, sizeof rep);
    char go;
    if (read_all(ctl_fd, &go, 1) != 0)
        _exit(10);
    wal_options_t o;
    memset(&o, 0, sizeof o);
    o.dir = dir;
    o.read_only = 1;
    wal_t *wal = NULL;
    char err[128] = "";
    int rc = wal_open(&o, NULL, &wal, err, sizeof err);
    if (rc) {
        rep.final = 1;
        rep.status = (uint32_t)-rc;
        snprintf(rep.why, sizeof rep.why, "read-only wal_open: %s (%s)", wal_strerror(rc), err);
        (void)write_all(rep_fd, &rep, sizeof rep);
        _exit(11);
    }
    int fl = fcntl(ctl_fd, F_GETFL);
    (void)fcntl(ctl_fd, F_SETFL, fl | O_NONBLOCK);
    view_t v;
    view_init(&v, wal);
    tu_rng_t r = {seed};
    done_msg_t done;
    size_t done_got = 0;
    uint64_t last_sent = UINT64_MAX;
    unsigned sent = 0;
    for (;;) {
        ssize_t k = read(ctl_fd, (uint8_t *)&done + done_got, sizeof done - done_got);
        if (k > 0)
            done_got += (size_t)k;
        int finished = done_got == sizeof done;
        rep.seen += view_pass(&v, &r);
        rep.log_seen = v.log_count;
        rep.passes++;
        if (v.bad)
            break;
        if (finished)
            break; /* this pass started after the last commit */
        if (rep.seen != last_sent && sent < 1000) {
            if (write_all(rep_fd, &rep, sizeof rep) != 0)
                _exit(12);
            last_sent = rep.seen;
            sent++;
        }
    }
    rep.final = 1;
    rep.bad = v.bad;
    memcpy(rep.why, v.why, sizeof rep.why < sizeof v.why ? sizeof rep.why : sizeof v.why);
    rep.why[sizeof rep.why - 1] = 0;
    if (!v.bad && done_got == sizeof done) {
        for (int s = 0; s < NSTREAMS; s++)
            if (v.next[s] != done.next[s]) {
                rep.bad++;
                snprintf(rep.why, sizeof rep.why,
                         "stream %d: read up to %" PRIu64 ", parent wrote up to %" PRIu64, s,
                         v.next[s], done.next[s]);
            }
    }
    /* and a write on a read-only WAL is refused */
    wal_msg_t m = tu_msg(names[0], "x", 1);
    rc = wal_append_sync(wal, &m, 1, NULL);
    if (rc != WAL_ECLOSED) {
        rep.bad++;
        snprintf(rep.why, sizeof rep.why, "append on read-only wal: %s", wal_strerror(rc));
    }
    wal_close(wal);
    if (write_all(rep_fd, &rep, sizeof rep) != 0)
        _exit(13);
    _exit(rep.bad ? 1 : 0);
}

static void run_fork(const char *dir, uint64_t map_size, uint64_t map_max, const char *tag,
                     uint64_t target_bytes)
{
    tu_rng_t r = tu_rng_for(tag);
    uint64_t child_seed = tu_rand(&r);
    int ctl[2], rep[2];
    assert_int_equal(pipe(ctl), 0);
    assert_int_equal(pipe(rep), 0);
    fflush(stdout);
    fflush(stderr);
    /* fork before any LMDB environment exists in this process */
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(ctl[1]);
        close(rep[0]);
        child_reader(dir, ctl[0], rep[1], child_seed);
        _exit(99);
    }
    close(ctl[0]);
    close(rep[1]);
    signal(SIGPIPE, SIG_IGN);

    wal_t *wal = open_rw(dir, map_size, map_max);
    writer_t w = {.wal = wal, .rng = {tu_rand(&r)}};
    for (int s = 0; s < NSTREAMS; s++)
        w.next[s] = 1;
    writer_batch(&w);
    assert_int_equal(write_all(ctl[1], "g", 1), 0);

    /* append while collecting the child's progress reports */
    uint64_t last_seen = 0, reports = 0, max_seen_during = 0;
    report_t rp;
    memset(&rp, 0, sizeof rp);
    int child_done = 0;
    size_t got = 0;
    while (w.total * (PAYLOAD_MAX / 2) < target_bytes) {
        writer_batch(&w);
        struct pollfd pfd = {.fd = rep[0], .events = POLLIN};
        while (!child_done && poll(&pfd, 1, 0) > 0) {
            ssize_t k = read(rep[0], (uint8_t *)&rp + got, sizeof rp - got);
            if (k <= 0) {
                child_done = 1;
                break;
            }
            got += (size_t)k;
            if (got < sizeof rp)
                continue;
            got = 0;
            if (rp.final) {
                child_done = 1;
                break;
            }
            reports++;
            /* consistent prefixes: never shrinks, never beyond what was written */
            if (rp.seen < last_seen || rp.seen > w.total)
                fail_msg("child saw %" PRIu64 " after %" PRIu64 " (written %" PRIu64 ")", rp.seen,
                         last_seen, w.total);
            last_seen = rp.seen;
            max_seen_during = rp.seen;
        }
        if (child_done)
            break;
    }
    wal_stats_t st;
    assert_int_equal(wal_stats_get(wal, &st), 0);
    done_msg_t done;
    memcpy(done.next, w.next, sizeof done.next);
    if (!child_done)
        assert_int_equal(write_all(ctl[1], &done, sizeof done), 0);
    close(ctl[1]);
    /* the rest of the reports, up to the final one */
    while (!child_done) {
        if (read_all(rep[0], (uint8_t *)&rp + got, sizeof rp - got) != 0)
            fail_msg("child closed its pipe without a final report");
        got = 0;
        if (rp.final)
            break;
        reports++;
        if (rp.seen < last_seen || rp.seen > w.total)
            fail_msg("child saw %" PRIu64 " after %" PRIu64 " (written %" PRIu64 ")", rp.seen,
                     last_seen, w.total);
        last_seen = rp.seen;
    }
    close(rep[0]);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    printf("# %s: %" PRIu64 " messages, child passes %u, %" PRIu64 " progress reports (%" PRIu64
           " seen while appending), map %" PRIu64 " (%" PRIu64 " grows)\n",
           tag, w.total, rp.passes, reports, max_seen_during, st.map_size, st.map_grows);
    if (rp.final && (rp.bad || rp.status))
        fail_msg("child: %u bad, status %u: %s", rp.bad, rp.status, rp.why);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_int_equal(rp.final, 1);
    assert_int_equal(rp.seen, w.total);
    assert_int_equal(rp.log_seen, w.total);
    if (map_size && map_max > map_size)
        assert_true(st.map_grows > 0);
    wal_close(wal);
}

static void test_reader_process(void **state)
{
    run_fork(*state, 0, 0, "reader_process", 6u << 20);
}

/* The writer grows the map while the other process reads. */
static void test_reader_process_growing_map(void **state)
{
    run_fork(*state, 1u << 20, 64u << 20, "reader_process_growing", 8u << 20);
}

/* ---- read-only opens ------------------------------------------------------------ */

static void test_read_only_missing_dir(void **state)
{
    char path[256];
    snprintf(path, sizeof path, "%s/absent", (const char *)*state);
    wal_options_t o;
    memset(&o, 0, sizeof o);
    o.dir = path;
    o.read_only = 1;
    wal_t *wal = (wal_t *)(uintptr_t)0x1;
    char err[256] = "";
    int rc = wal_open(&o, NULL, &wal, err, sizeof err);
    assert_true(rc < 0);
    assert_true(wal == (wal_t *)(uintptr_t)0x1); /* untouched */
    assert_true(err[0] != 0);
    assert_false(tu_exists(path)); /* a read-only open creates nothing */
    /* an existing but empty directory is no WAL either */
    rc = wal_open(&(wal_options_t){.dir = *state, .read_only = 1}, NULL, &wal, NULL, 0);
    assert_true(rc < 0);
    assert_true(wal == (wal_t *)(uintptr_t)0x1);
}

typedef struct cb_count {
    int calls;
} cb_count_t;

static void count_cb(wal_append_t *req, void *arg)
{
    (void)req;
    ((cb_count_t *)arg)->calls++;
}

static void test_read_only_refuses_writes(void **state)
{
    const char *dir = *state;
    wal_t *wal = open_rw(dir, 0, 0);
    wal_msg_t m = tu_msg("ro", "abc", 3);
    assert_int_equal(wal_append_sync(wal, &m, 1, NULL), 0);
    wal_close(wal);

    wal_options_t o;
    memset(&o, 0, sizeof o);
    o.dir = dir;
    o.read_only = 1;
    wal = NULL;
    char err[256] = "";
    int rc = wal_open(&o, NULL, &wal, err, sizeof err);
    if (rc)
        fail_msg("read-only open: %s (%s)", wal_strerror(rc), err);
    assert_int_equal(wal_append_sync(wal, &m, 1, NULL), WAL_ECLOSED);
    cb_count_t cc = {0};
    wal_append_t *req = NULL;
    assert_int_equal(wal_append_new(count_cb, &cc, &req), 0);
    assert_int_equal(wal_append_add_msg(req, &m), 0);
    assert_int_equal(wal_append_submit(wal, req), WAL_ECLOSED);
    wal_append_free(req); /* still ours */
    uint64_t dropped = 7;
    assert_int_equal(wal_retain(wal, 1, &dropped), WAL_ECLOSED);
    assert_int_equal(wal_is_failed(wal), 0);
    /* reads work */
    tu_recs_t recs = {0};
    wal_read_result_t res;
    assert_int_equal(wal_stream_read(wal, "ro", 2, 1, 10, 100, tu_recs_cb, &recs, &res), 0);
    assert_int_equal(recs.n, 1);
    assert_memory_equal(recs.v[0].payload, "abc", 3);
    tu_recs_free(&recs);
    wal_stream_info_t info;
    assert_int_equal(wal_stream_get(wal, "ro", 2, &info), 0);
    assert_int_equal(info.next_offset, 2);
    wal_close(wal);
    assert_int_equal(cc.calls, 0);

    /* nothing was written by the read-only handle */
    wal = open_rw(dir, 0, 0);
    assert_int_equal(wal_stream_get(wal, "ro", 2, &info), 0);
    assert_int_equal(info.next_offset, 2);
    wal_close(wal);
}

int main(void)
{
    tu_master_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_read_only_missing_dir, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_read_only_refuses_writes, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_reader_threads, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_reader_threads_growing_map, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_reader_threads_during_retention, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_reader_process, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_reader_process_growing_map, tu_setup_dir,
                                        tu_teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
