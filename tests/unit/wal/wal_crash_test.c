/*
 * wal_crash_test.c - kill -9 at a random moment. A child process appends
 * from several threads and reports every acknowledged message over a pipe;
 * the parent SIGKILLs it 1..40 ms after the first acknowledgement, reopens
 * the WAL and checks that every acknowledged message is there and intact
 * and that every stream is contiguous. The same directory is reused for a
 * few cycles (recovery after recovery), then started afresh; on a fresh
 * directory the child is sometimes killed within 3 ms of the fork (maybe
 * inside wal_open), and on odd cycles it starts with a 256 KiB map so that
 * kills also land around map growth.
 *
 * Usage: wal_crash_test [cycles] (default 50; the slow suite runs 300).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>

#include "wal_test_util.h"

#define NSTREAMS       6
#define NTHREADS       3 /* thread t owns the streams s with s % NTHREADS == t */
#define BATCH_MAX      50
#define PAYLOAD_MAX    300
#define CYCLES_PER_DIR 10
#define DELAY_MAX_MS   40

static int g_cycles = 50;

/* One acknowledged message (or, with stream == ACK_ERROR, a child error).
 * Written with one write() per request: at most 50 * 16 bytes < PIPE_BUF,
 * so a report is never torn. */
typedef struct ack {
    uint32_t stream;
    int32_t code;
    uint64_t offset;
} ack_t;

#define ACK_ERROR UINT32_MAX

static void stream_name(uint32_t s, char *buf, size_t cap)
{
    snprintf(buf, cap, "crash.%u", s);
}

static int crash_keyed(uint32_t s, uint64_t off)
{
    return tu_mix64(tu_pos_key(s, off) + 3) % 3 == 0;
}

static void key_of(uint32_t s, uint64_t off, char *prod, char *msgid)
{
    snprintf(prod, 16, "cp%u", s);
    snprintf(msgid, 32, "%" PRIu64, off);
}

/* ---- the child ------------------------------------------------------------------ */

typedef struct child {
    wal_t *wal;
    int fd;
    uint64_t seed;
} child_t;

static void child_fail(int fd, int line, int code, int status)
{
    ack_t a = {ACK_ERROR, code, (uint64_t)line};
    (void)!write(fd, &a, sizeof a);
    _exit(status);
}

typedef struct child_thread {
    child_t *c;
    uint32_t t;
} child_thread_t;

static void *child_thread(void *p)
{
    child_thread_t *ct = p;
    child_t *c = ct->c;
    tu_rng_t r = {tu_mix64(c->seed + ct->t)};
    uint32_t own[NSTREAMS];
    unsigned nown = 0;
    uint64_t next[NSTREAMS];
    for (uint32_t s = ct->t; s < NSTREAMS; s += NTHREADS) {
        char name[32];
        stream_name(s, name, sizeof name);
        wal_stream_info_t info;
        int rc = wal_stream_get(c->wal, name, strlen(name), &info);
        if (rc == WAL_ENOTFOUND)
            next[s] = 1;
        else if (rc == 0)
            next[s] = info.next_offset;
        else
            child_fail(c->fd, __LINE__, rc, 20);
        own[nown++] = s;
    }
    uint8_t bufs[BATCH_MAX][PAYLOAD_MAX + 1];
    char names[BATCH_MAX][32], prods[BATCH_MAX][16], ids[BATCH_MAX][32];
    for (;;) {
        size_t n = (size_t)tu_range(&r, 1, BATCH_MAX);
        wal_msg_t msgs[BATCH_MAX];
        wal_result_t res[BATCH_MAX];
        ack_t acks[BATCH_MAX];
        uint64_t nx[NSTREAMS];
        memcpy(nx, next, sizeof nx);
        for (size_t i = 0; i < n; i++) {
            uint32_t s = own[tu_range(&r, 0, nown - 1)];
            uint64_t off = nx[s]++;
            size_t len = tu_pos_len(s, off, PAYLOAD_MAX);
            tu_fill(bufs[i], len, tu_pos_key(s, off));
            stream_name(s, names[i], sizeof names[i]);
            msgs[i] = tu_msg(names[i], bufs[i], len);
            msgs[i].direction = (enum wal_direction)(off % 2);
            if (crash_keyed(s, off)) {
                key_of(s, off, prods[i], ids[i]);
                msgs[i].producer = prods[i];
                msgs[i].producer_len = strlen(prods[i]);
                msgs[i].msgid = ids[i];
                msgs[i].msgid_len = strlen(ids[i]);
            }
            acks[i] = (ack_t){s, 0, off};
        }
        int rc = wal_append_sync(c->wal, msgs, n, res);
        if (rc)
            child_fail(c->fd, __LINE__, rc, 21);
        for (size_t i = 0; i < n; i++)
            if (res[i].offset != acks[i].offset || res[i].duplicate)
                child_fail(c->fd, __LINE__, (int)res[i].offset, 22);
        memcpy(next, nx, sizeof next);
        ssize_t w = write(c->fd, acks, n * sizeof acks[0]);
        if (w != (ssize_t)(n * sizeof acks[0]))
            _exit(23);
    }
    return NULL;
}

static void child_main(const char *dir, int fd, uint64_t seed, int small_map)
{
    alarm(60); /* never outlive a broken parent */
    child_t c = {.fd = fd, .seed = seed};
    wal_options_t o;
    memset(&o, 0, sizeof o);
    o.dir = dir;
    o.sync = WAL_SYNC_FULL;
    if (small_map)
        o.map_size = 256u << 10; /* the map grows while appending (and being killed) */
    int rc = wal_open(&o, NULL, &c.wal, NULL, 0);
    if (rc)
        child_fail(fd, __LINE__, rc, 24);
    pthread_t th[NTHREADS];
    child_thread_t ct[NTHREADS];
    for (uint32_t t = 0; t < NTHREADS; t++) {
        ct[t] = (child_thread_t){&c, t};
        if (pthread_create(&th[t], NULL, child_thread, &ct[t]) != 0)
            child_fail(fd, __LINE__, 0, 25);
    }
    for (uint32_t t = 0; t < NTHREADS; t++)
        pthread_join(th[t], NULL);
    _exit(26);
}

/* ---- the parent ------------------------------------------------------------------ */

typedef struct verify {
    uint32_t s;
    uint64_t expect;
    uint64_t bad;
    uint64_t first_bad;
} verify_t;

static int rec_ok(const wal_record_t *r, uint32_t s)
{
    char name[32], prod[16], id[32];
    stream_name(s, name, sizeof name);
    size_t len = tu_pos_len(s, r->offset, PAYLOAD_MAX);
    if (!tu_mem_eq(r->stream, r->stream_len, name, strlen(name)) || r->payload_len != len ||
        !tu_check_fill(r->payload, len, tu_pos_key(s, r->offset)) ||
        r->direction != (enum wal_direction)(r->offset % 2))
        return 0;
    if (crash_keyed(s, r->offset)) {
        key_of(s, r->offset, prod, id);
        return tu_mem_eq(r->producer, r->producer_len, prod, strlen(prod)) &&
               tu_mem_eq(r->msgid, r->msgid_len, id, strlen(id));
    }
    return r->producer_len == 0 && r->msgid_len == 0;
}

static int verify_cb(const wal_record_t *r, void *arg)
{
    verify_t *v = arg;
    if (r->offset != v->expect || !rec_ok(r, v->s)) {
        if (v->bad++ == 0)
            v->first_bad = r->offset;
    }
    v->expect = r->offset + 1;
    return 0;
}

typedef struct log_check {
    uint64_t last_seq;
    uint64_t count;
    uint64_t bad;
} log_check_t;

static int log_cb(const wal_record_t *r, void *arg)
{
    log_check_t *l = arg;
    /* names are "crash.N" with one digit */
    unsigned s = r->stream_len == 7 ? (unsigned)(r->stream[6] - '0') : NSTREAMS;
    if (r->seq <= l->last_seq || s >= NSTREAMS || memcmp(r->stream, "crash.", 6) != 0 ||
        !rec_ok(r, s))
        l->bad++;
    l->last_seq = r->seq;
    l->count++;
    return 0;
}

typedef struct totals {
    uint64_t acked_checked;
    uint64_t records_verified;
    uint64_t unacked_found; /* committed but not (yet) reported acked */
    uint64_t cycles;
    uint64_t early; /* cycles killed right after the fork */
} totals_t;

/* Open the WAL after a crash and check it against what was acknowledged. */
static void verify_dir(const char *dir, const uint64_t *max_acked, uint64_t *prev_next,
                       const ack_t *acks, size_t nacks, totals_t *tot)
{
    wal_t *wal = NULL;
    char err[256] = "";
    wal_options_t o;
    memset(&o, 0, sizeof o);
    o.dir = dir;
    int rc = wal_open(&o, NULL, &wal, err, sizeof err);
    if (rc)
        fail_msg("reopen after kill: %s (%s)", wal_strerror(rc), err);
    uint64_t total = 0;
    uint32_t ids[NSTREAMS] = {0};
    uint64_t next[NSTREAMS] = {0};
    for (uint32_t s = 0; s < NSTREAMS; s++) {
        char name[32];
        stream_name(s, name, sizeof name);
        wal_stream_info_t info;
        rc = wal_stream_get(wal, name, strlen(name), &info);
        if (rc == WAL_ENOTFOUND) {
            if (max_acked[s] || prev_next[s] > 1)
                fail_msg("stream %u lost (acked up to %" PRIu64 ")", s, max_acked[s]);
            next[s] = 1;
            continue;
        }
        assert_int_equal(rc, 0);
        ids[s] = info.id;
        next[s] = info.next_offset;
        assert_int_equal(info.first_offset, 1);
        if (info.next_offset <= max_acked[s])
            fail_msg("stream %u: next offset %" PRIu64 " but offset %" PRIu64 " was acked", s,
                     info.next_offset, max_acked[s]);
        if (info.next_offset < prev_next[s])
            fail_msg("stream %u: next offset %" PRIu64 " went back from %" PRIu64, s,
                     info.next_offset, prev_next[s]);
        verify_t v = {.s = s, .expect = 1};
        uint64_t from = 1;
        for (int guard = 0; guard < 1000000; guard++) {
            wal_read_result_t res;
            memset(&res, 0, sizeof res);
            rc =
                wal_stream_read(wal, name, strlen(name), from, 1000, 1u << 20, verify_cb, &v, &res);
            if (rc)
                fail_msg("stream %u read from %" PRIu64 ": %s", s, from, wal_strerror(rc));
            if (res.count == 0)
                break;
            from = res.next;
        }
        if (v.bad)
            fail_msg("stream %u: %" PRIu64 " bad records, first at offset %" PRIu64, s, v.bad,
                     v.first_bad);
        if (v.expect != info.next_offset)
            fail_msg("stream %u: records end at %" PRIu64 ", next offset %" PRIu64, s, v.expect,
                     info.next_offset);
        total += info.next_offset - 1;
        tot->records_verified += info.next_offset - 1;
        if (info.next_offset - 1 > max_acked[s])
            tot->unacked_found += info.next_offset - 1 - max_acked[s];
        prev_next[s] = info.next_offset;
    }
    /* each acknowledged message of this cycle, one by one */
    unsigned dedup_checks = 0;
    for (size_t i = 0; i < nacks; i++) {
        const ack_t *a = &acks[i];
        if (a->offset < 1 || a->offset >= next[a->stream])
            fail_msg("acked stream %u offset %" PRIu64 " missing", a->stream, a->offset);
        if (crash_keyed(a->stream, a->offset) && dedup_checks < 32) {
            char prod[16], id[32];
            key_of(a->stream, a->offset, prod, id);
            uint32_t sid = 0;
            uint64_t off = 0;
            char sname[32];
            stream_name(a->stream, sname, sizeof sname);
            rc = wal_dedup_get(wal, prod, strlen(prod), sname, strlen(sname), id, strlen(id), &sid,
                               &off);
            if (rc || sid != ids[a->stream] || off != a->offset)
                fail_msg("dedup entry of stream %u offset %" PRIu64 ": %s", a->stream, a->offset,
                         wal_strerror(rc));
            dedup_checks++;
        }
        tot->acked_checked++;
    }
    /* the log holds the same records, in sequence order */
    log_check_t lc = {0};
    uint64_t from = 1;
    for (int guard = 0; guard < 1000000; guard++) {
        wal_read_result_t res;
        memset(&res, 0, sizeof res);
        rc = wal_log_read(wal, from, 5000, 4u << 20, log_cb, &lc, &res);
        if (rc)
            fail_msg("log read from %" PRIu64 ": %s", from, wal_strerror(rc));
        if (res.count == 0)
            break;
        from = res.next;
    }
    assert_int_equal(lc.bad, 0);
    assert_int_equal(lc.count, total);
    wal_close(wal);
}

static void test_crash_cycles(void **state)
{
    const char *root = *state;
    tu_rng_t r = tu_rng_for("crash_cycles");
    signal(SIGPIPE, SIG_IGN);
    totals_t tot = {0};
    char dir[256] = "";
    uint64_t max_acked[NSTREAMS], prev_next[NSTREAMS];
    size_t cap = 1 << 16;
    ack_t *acks = malloc(cap * sizeof *acks);
    assert_non_null(acks);
    uint64_t delay_sum = 0;

    for (int cycle = 0; cycle < g_cycles; cycle++) {
        if (cycle % CYCLES_PER_DIR == 0) {
            if (dir[0])
                assert_int_equal(tu_rmrf(dir), 0);
            snprintf(dir, sizeof dir, "%s/w%d", root, cycle / CYCLES_PER_DIR);
            memset(max_acked, 0, sizeof max_acked);
            for (int s = 0; s < NSTREAMS; s++)
                prev_next[s] = 1;
        }
        uint64_t child_seed = tu_rand(&r);
        unsigned delay_ms = (unsigned)tu_range(&r, 1, DELAY_MAX_MS);
        /* on a fresh directory, sometimes kill within 3 ms of the fork, maybe
         * while wal_open is creating the environment */
        int early = cycle % CYCLES_PER_DIR == 0 && tu_chance(&r, 50);
        uint64_t early_us = tu_range(&r, 0, 3000);
        if (!early)
            delay_sum += delay_ms;
        int p[2];
        assert_int_equal(pipe(p), 0);
        fflush(stdout);
        fflush(stderr);
        /* nothing of LMDB is open in this process here */
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            close(p[0]);
            child_main(dir, p[1], child_seed, cycle % 2);
            _exit(27);
        }
        close(p[1]);

        size_t nacks = 0, partial = 0;
        uint8_t buf[4096 + sizeof(ack_t)];
        struct timespec t0, now;
        int started = 0, killed = 0, eof = 0;
        ack_t err = {0};
        int child_err = 0;
        uint64_t deadline_ns = 0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        uint64_t start_ns = (uint64_t)t0.tv_sec * 1000000000ull + (uint64_t)t0.tv_nsec;
        if (early) {
            started = 1;
            deadline_ns = start_ns + early_us * 1000ull;
        }
        while (!eof) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            uint64_t now_ns = (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
            /* a child that never acknowledges is killed after 30 s (and fails below) */
            if (!killed &&
                ((started && now_ns >= deadline_ns) || now_ns - start_ns > 30ull * 1000000000ull)) {
                assert_int_equal(kill(pid, SIGKILL), 0);
                killed = 1;
            }
            int timeout = -1;
            if (!killed) {
                uint64_t until = started ? deadline_ns : start_ns + 30ull * 1000000000ull;
                timeout = until > now_ns ? (int)((until - now_ns) / 1000000 + 1) : 0;
            }
            struct pollfd pfd = {.fd = p[0], .events = POLLIN};
            int pr = poll(&pfd, 1, timeout);
            if (pr < 0 && errno == EINTR)
                continue;
            assert_true(pr >= 0);
            if (pr == 0)
                continue;
            ssize_t k = read(p[0], buf + partial, sizeof buf - partial);
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0) {
                eof = 1;
                break;
            }
            size_t have = partial + (size_t)k, whole = have / sizeof(ack_t);
            for (size_t i = 0; i < whole; i++) {
                ack_t a;
                memcpy(&a, buf + i * sizeof a, sizeof a);
                if (a.stream == ACK_ERROR) {
                    err = a;
                    child_err = 1;
                    continue;
                }
                if (a.stream >= NSTREAMS) {
                    kill(pid, SIGKILL);
                    fail_msg("bad ack from child (stream %u)", a.stream);
                }
                if (nacks == cap) {
                    cap *= 2;
                    acks = realloc(acks, cap * sizeof *acks);
                    assert_non_null(acks);
                }
                acks[nacks++] = a;
                if (a.offset > max_acked[a.stream])
                    max_acked[a.stream] = a.offset;
                if (!started) {
                    started = 1;
                    deadline_ns = now_ns + (uint64_t)delay_ms * 1000000ull;
                }
            }
            partial = have - whole * sizeof(ack_t);
            memmove(buf, buf + whole * sizeof(ack_t), partial);
        }
        close(p[0]);
        int status = 0;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        if (child_err)
            fail_msg("cycle %d: child failed at wal_crash_test.c:%" PRIu64 " (code %d: %s)", cycle,
                     err.offset, err.code, err.code < 0 ? wal_strerror(err.code) : "");
        if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL))
            fail_msg("cycle %d: child ended by itself (status 0x%x)", cycle, status);
        if (!started)
            fail_msg("cycle %d: child acknowledged nothing in 30 s", cycle);
        assert_int_equal(partial, 0);
        verify_dir(dir, max_acked, prev_next, acks, nacks, &tot);
        tot.cycles++;
        tot.early += early;
    }
    free(acks);
    uint64_t normal = tot.cycles - tot.early;
    printf("# crash: %" PRIu64 " cycles (%" PRIu64 " killed within 3 ms of the fork), %" PRIu64
           " acked records checked, %" PRIu64 " records verified, %" PRIu64
           " committed beyond the last ack, mean kill delay %" PRIu64 " ms after the first ack\n",
           tot.cycles, tot.early, tot.acked_checked, tot.records_verified, tot.unacked_found,
           normal ? delay_sum / normal : 0);
    assert_int_equal(tot.cycles, (uint64_t)g_cycles);
    assert_true(tot.acked_checked >= normal);
}

int main(int argc, char **argv)
{
    if (argc > 1) {
        g_cycles = atoi(argv[1]);
        if (g_cycles < 1) {
            fprintf(stderr, "usage: %s [cycles]\n", argv[0]);
            return 2;
        }
    }
    tu_master_seed();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_crash_cycles, tu_setup_dir, tu_teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
