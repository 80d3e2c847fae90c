/*
 * wal_powerloss_test.c - acknowledged appends survive a simulated power cut.
 *
 * A child process (this executable with --child) runs under the pl_shim
 * LD_PRELOAD: writes to data.mdb and to the journal stay in memory until
 * fsync, and at a random
 * write/sync event the shim cuts power (applies a random, possibly torn,
 * subset of the unsynced writes and exits). The child reports every
 * acknowledged (stream, offset) through a pipe. Appends are acknowledged at
 * their durable point (wal_append_when_durable: the journal entry's
 * fdatasync, before LMDB holds them), as arqd acknowledges publishes. The parent reopens the WAL
 * and checks that every acknowledged record is present and intact and that
 * offsets are contiguous. A second case runs the same loop with sync=none
 * and asserts that the harness does catch the loss there, so the first case
 * could fail.
 *
 * Usage (meson): wal_powerloss_test SHIM_PATH [CYCLES]
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "wal.h"

#define N_STREAMS 4
#define ACK_FD    3

struct ack {
    uint32_t stream;
    uint32_t pad;
    uint64_t offset;
};

static const char *shim_path;
static unsigned cycles = 40;
static uint64_t seed;

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

/* The payload of (stream, offset) is a pure function of both. */
static size_t payload_for(uint32_t s, uint64_t off, uint8_t *buf)
{
    size_t len = 16 + (size_t)((off * 7 + s) % 300);
    uint64_t x = mix(((uint64_t)s << 40) ^ off);
    for (size_t i = 0; i < len; i++) {
        if (i % 8 == 0)
            x = mix(x + i);
        buf[i] = (uint8_t)(x >> (8 * (i % 8)));
    }
    return len;
}

static void stream_name(uint32_t s, char *buf)
{
    snprintf(buf, 16, "pl.%u", s);
}

/* ---- child ------------------------------------------------------------- */

struct child_ctx {
    wal_t *wal;
    unsigned batches;
    unsigned id;
    pthread_mutex_t *mu;
    uint64_t *next; /* per stream: next offset the child expects to get */
};

static void *child_thread(void *arg)
{
    struct child_ctx *c = arg;
    uint64_t r = mix(seed + c->id);
    for (unsigned b = 0; b < c->batches; b++) {
        r = mix(r);
        uint32_t s = (uint32_t)(r % N_STREAMS);
        size_t n = 1 + (size_t)((r >> 8) % 8);
        /* Payloads depend on the offsets, which are known only after the
         * commit; appends of one stream are serialised by this lock so the
         * child can predict them (the lock is not part of what is tested). */
        pthread_mutex_lock(&c->mu[s]);
        wal_msg_t msgs[8];
        uint8_t bufs[8][320];
        char name[16];
        stream_name(s, name);
        for (size_t i = 0; i < n; i++) {
            size_t len = payload_for(s, c->next[s] + i, bufs[i]);
            msgs[i] = (wal_msg_t){
                .stream = name, .stream_len = strlen(name), .payload = bufs[i], .payload_len = len};
        }
        wal_result_t res[8];
        int rc = wal_append_sync_durable(c->wal, msgs, n, res);
        if (rc != 0)
            _exit(20);
        for (size_t i = 0; i < n; i++) {
            if (res[i].offset != c->next[s] + i)
                _exit(21);
            struct ack a = {.stream = s, .offset = res[i].offset};
            if (write(ACK_FD, &a, sizeof(a)) != (ssize_t)sizeof(a))
                _exit(22);
        }
        c->next[s] += n;
        pthread_mutex_unlock(&c->mu[s]);
    }
    return NULL;
}

static int child_main(const char *dir, const char *sync, unsigned batches)
{
    wal_options_t o = {.dir = dir,
                       .sync = strcmp(sync, "none") == 0 ? WAL_SYNC_NONE : WAL_SYNC_FULL};
    /* Every other cycle folds the journal into LMDB only at close, so the
     * acknowledged appends a cut hits live in the journal alone. */
    const char *apply = getenv("ARQ_PL_APPLY_US");
    if (apply && *apply) {
        o.apply_us = (uint32_t)strtoul(apply, NULL, 10);
        o.apply_idle_us = o.apply_us;
    }
    wal_t *wal;
    char err[256];
    if (wal_open(&o, NULL, &wal, err, sizeof(err)) != 0) {
        fprintf(stderr, "child: open: %s\n", err);
        return 10;
    }
    uint64_t next[N_STREAMS];
    pthread_mutex_t mu[N_STREAMS];
    for (uint32_t s = 0; s < N_STREAMS; s++) {
        char name[16];
        stream_name(s, name);
        wal_stream_info_t info;
        next[s] = wal_stream_get(wal, name, strlen(name), &info) == 0 ? info.next_offset : 1;
        pthread_mutex_init(&mu[s], NULL);
    }
    pthread_t th[2];
    struct child_ctx ctx[2];
    for (unsigned i = 0; i < 2; i++) {
        ctx[i] = (struct child_ctx){wal, batches, i, mu, next};
        pthread_create(&th[i], NULL, child_thread, &ctx[i]);
    }
    for (unsigned i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    wal_close(wal);
    return 0;
}

/* ---- parent ------------------------------------------------------------ */

struct verdict {
    uint64_t checked, lost, corrupt, gaps;
    int open_rc;
};

struct check_ctx {
    uint32_t s;
    uint64_t expect;
    struct verdict *v;
};

static int check_rec(const wal_record_t *rec, void *arg)
{
    struct check_ctx *c = arg;
    uint8_t buf[320];
    if (rec->offset != c->expect)
        c->v->gaps++;
    size_t len = payload_for(c->s, rec->offset, buf);
    if (rec->payload_len != len || memcmp(rec->payload, buf, len) != 0)
        c->v->corrupt++;
    c->v->checked++;
    c->expect = rec->offset + 1;
    return 0;
}

static struct verdict verify(const char *dir, const uint64_t *acked)
{
    struct verdict v = {0};
    wal_options_t o = {.dir = dir};
    wal_t *wal;
    char err[256];
    v.open_rc = wal_open(&o, NULL, &wal, err, sizeof(err));
    if (v.open_rc) {
        fprintf(stderr, "verify: open failed: %s\n", err);
        return v;
    }
    for (uint32_t s = 0; s < N_STREAMS; s++) {
        char name[16];
        stream_name(s, name);
        wal_stream_info_t info;
        uint64_t next = 1;
        if (wal_stream_get(wal, name, strlen(name), &info) == 0)
            next = info.next_offset;
        if (acked[s] >= next)
            v.lost += acked[s] - next + 1;
        struct check_ctx c = {s, 1, &v};
        wal_read_result_t res = {0};
        uint64_t from = 1;
        while (from < next) {
            int rc =
                wal_stream_read(wal, name, strlen(name), from, 1000, 1 << 20, check_rec, &c, &res);
            if (rc != 0 || res.count == 0) {
                v.corrupt++;
                break;
            }
            from = res.next;
        }
    }
    wal_close(wal);
    return v;
}

static int run_cycle(const char *dir, const char *sync, unsigned long crash_at, uint64_t cseed,
                     uint64_t *acked, int *exit_code)
{
    int p[2];
    if (pipe(p) != 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        close(p[0]);
        if (dup2(p[1], ACK_FD) < 0)
            _exit(30);
        char crash[32], sd[32];
        snprintf(crash, sizeof(crash), "%lu", crash_at);
        snprintf(sd, sizeof(sd), "%llu", (unsigned long long)cseed);
        setenv("LD_PRELOAD", shim_path, 1);
        setenv("ARQ_PL_CRASH_AT", crash, 1);
        setenv("ARQ_PL_SEED", sd, 1);
        setenv("ARQ_PL_APPLY_US", (cseed >> 7) & 1 ? "1000000" : "", 1);
        /* Under ASan the shim comes first in the link order; that is fine. */
        const char *asan = getenv("ASAN_OPTIONS");
        char ao[512];
        snprintf(ao, sizeof(ao), "%s%sverify_asan_link_order=0:detect_leaks=0", asan ? asan : "",
                 asan && *asan ? ":" : "");
        setenv("ASAN_OPTIONS", ao, 1);
        char *args[] = {"wal_powerloss_test", "--child", (char *)dir, (char *)sync, "60", sd, NULL};
        execv("/proc/self/exe", args);
        _exit(31);
    }
    close(p[1]);
    struct ack a;
    ssize_t n;
    while ((n = read(p[0], &a, sizeof(a))) == (ssize_t)sizeof(a)) {
        if (a.stream < N_STREAMS && a.offset > acked[a.stream])
            acked[a.stream] = a.offset;
    }
    close(p[0]);
    int st;
    waitpid(pid, &st, 0);
    *exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return 0;
}

static char *cur_dir; /* the test's directory, removed by its teardown too */

static char *make_dir(void)
{
    char *d = strdup("/var/tmp/arq-pl-XXXXXX");
    assert_non_null(mkdtemp(d));
    cur_dir = d;
    /* Create the environment before any simulated crash: LMDB's very first
     * meta pages are written without a sync, and no append can have been
     * acknowledged before this open returned. */
    wal_options_t o = {.dir = d};
    wal_t *wal;
    assert_int_equal(wal_open(&o, NULL, &wal, NULL, 0), 0);
    wal_close(wal);
    return d;
}

static void remove_dir(char *d)
{
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", d);
    assert_int_equal(system(cmd), 0);
    free(d);
    cur_dir = NULL;
}

/* A failed test leaves through cmocka's longjmp: remove its directory. */
static int teardown_dir(void **state)
{
    (void)state;
    if (cur_dir)
        remove_dir(cur_dir);
    return 0;
}

static void test_power_loss_keeps_acked(void **state)
{
    (void)state;
    char *dir = make_dir();
    uint64_t acked[N_STREAMS] = {0};
    unsigned crashed = 0;
    uint64_t total_checked = 0;
    for (unsigned c = 0; c < cycles; c++) {
        uint64_t r = mix(seed + c);
        unsigned long crash_at = 1 + (unsigned long)(r % 400);
        int code;
        assert_int_equal(run_cycle(dir, "full", crash_at, r, acked, &code), 0);
        if (code != 0 && code != 86)
            fail_msg("cycle %u: child exited with %d", c, code);
        crashed += code == 86;
        struct verdict v = verify(dir, acked);
        if (v.open_rc || v.lost || v.corrupt || v.gaps)
            fail_msg("cycle %u (crash at event %lu, seed %llu): open %d, lost %llu, corrupt "
                     "%llu, gaps %llu",
                     c, crash_at, (unsigned long long)seed, v.open_rc, (unsigned long long)v.lost,
                     (unsigned long long)v.corrupt, (unsigned long long)v.gaps);
        total_checked += v.checked;
    }
    uint64_t acks = 0;
    for (int s = 0; s < N_STREAMS; s++)
        acks += acked[s];
    printf("power loss: %u cycles, %u cut mid-run, %llu acknowledged, %llu records verified\n",
           cycles, crashed, (unsigned long long)acks, (unsigned long long)total_checked);
    assert_true(crashed > 0);
    assert_true(acks > 0);
    remove_dir(dir);
}

/* The same cut with sync=none must lose acknowledged data in some cycle:
 * proof that the check above can fail. */
static void test_harness_detects_loss_without_fsync(void **state)
{
    (void)state;
    unsigned detected = 0;
    for (unsigned c = 0; c < 8 && !detected; c++) {
        char *dir = make_dir();
        uint64_t acked[N_STREAMS] = {0};
        uint64_t r = mix(seed ^ 0xabcdefull ^ c);
        int code;
        assert_int_equal(run_cycle(dir, "none", 30 + (unsigned long)(r % 60), r, acked, &code), 0);
        struct verdict v = verify(dir, acked);
        if (v.open_rc || v.lost || v.corrupt || v.gaps)
            detected++;
        remove_dir(dir);
    }
    printf("sync=none: loss detected: %s\n", detected ? "yes" : "no");
    assert_true(detected > 0);
}

int main(int argc, char **argv)
{
    if (argc >= 6 && strcmp(argv[1], "--child") == 0) {
        seed = strtoull(argv[5], NULL, 10);
        return child_main(argv[2], argv[3], (unsigned)atoi(argv[4]));
    }
    if (argc < 2) {
        fprintf(stderr, "usage: %s SHIM_PATH [CYCLES]\n", argv[0]);
        return 2;
    }
    shim_path = argv[1];
    if (argc >= 3)
        cycles = (unsigned)atoi(argv[2]);
    const char *es = getenv("ARQ_TEST_SEED");
    seed = es ? strtoull(es, NULL, 10) : (uint64_t)getpid() * 1000003u ^ (uint64_t)time(NULL);
    printf("seed %llu (set ARQ_TEST_SEED to reproduce)\n", (unsigned long long)seed);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_power_loss_keeps_acked, teardown_dir),
        cmocka_unit_test_teardown(test_harness_detects_loss_without_fsync, teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
