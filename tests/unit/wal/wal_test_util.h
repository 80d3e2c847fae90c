/*
 * wal_test_util.h - helpers shared by the WAL unit tests (header-only, one
 * copy per test executable): a seeded PRNG whose seed is printed and can be
 * forced with ARQ_TEST_SEED, per-test temporary directories, deterministic
 * payload patterns, owned copies of read records, and an error recorder for
 * threads and forked children (cmocka asserts are only safe on the thread
 * that runs the test).
 */
#ifndef ARQ_WAL_TEST_UTIL_H
#define ARQ_WAL_TEST_UTIL_H

#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "wal.h"

/* ---- seeded PRNG ---------------------------------------------------------- */

static inline uint64_t tu_mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

typedef struct tu_rng {
    uint64_t s;
} tu_rng_t;

static inline uint64_t tu_rand(tu_rng_t *r)
{
    r->s += 0x9e3779b97f4a7c15ull;
    uint64_t x = r->s;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Uniform-ish in [lo, hi] (inclusive). */
static inline uint64_t tu_range(tu_rng_t *r, uint64_t lo, uint64_t hi)
{
    return lo + tu_rand(r) % (hi - lo + 1);
}

/* 1 with probability pct/100. */
static inline int tu_chance(tu_rng_t *r, unsigned pct)
{
    return tu_rand(r) % 100 < pct;
}

static inline uint64_t tu_hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static uint64_t tu_master_seed_value;
static int tu_master_seed_set;

/* The run's seed: ARQ_TEST_SEED if set, else time and pid. Printed once. */
static inline uint64_t tu_master_seed(void)
{
    if (!tu_master_seed_set) {
        const char *env = getenv("ARQ_TEST_SEED");
        if (env && *env) {
            tu_master_seed_value = strtoull(env, NULL, 0);
        } else {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            tu_master_seed_value =
                tu_mix64((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec) ^
                (uint64_t)getpid();
        }
        tu_master_seed_set = 1;
        printf("# seed %" PRIu64 " (ARQ_TEST_SEED=%" PRIu64 " reproduces)\n", tu_master_seed_value,
               tu_master_seed_value);
        fflush(stdout);
    }
    return tu_master_seed_value;
}

/* A PRNG for one test, so that a test run alone sees the same numbers. */
static inline tu_rng_t tu_rng_for(const char *test_name)
{
    tu_rng_t r = {tu_master_seed() ^ tu_hash_str(test_name)};
    return r;
}

/* ---- temporary directories ------------------------------------------------ */

static inline void tu_tmpdir(char *buf, size_t cap, const char *tag)
{
    snprintf(buf, cap, "/tmp/arq-%s-XXXXXX", tag);
    if (!mkdtemp(buf)) {
        fprintf(stderr, "mkdtemp %s: %s\n", buf, strerror(errno));
        abort();
    }
}

static inline int tu_rm_cb(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path) == 0 || errno == ENOENT ? 0 : -1;
}

static inline int tu_rmrf(const char *dir)
{
    return nftw(dir, tu_rm_cb, 16, FTW_DEPTH | FTW_PHYS);
}

/* cmocka fixtures: *state is a fresh directory, removed after the test
 * (teardown also runs when the test failed). */
static inline int tu_setup_dir(void **state)
{
    char *d = malloc(128);
    if (!d)
        return -1;
    tu_tmpdir(d, 128, "wal");
    *state = d;
    return 0;
}

static inline int tu_teardown_dir(void **state)
{
    char *d = *state;
    int rc = tu_rmrf(d);
    free(d);
    return rc;
}

static inline int tu_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* ---- deterministic payloads ------------------------------------------------ */

static inline void tu_fill(uint8_t *buf, size_t len, uint64_t key)
{
    uint64_t s = tu_mix64(key);
    size_t i = 0;
    while (i < len) {
        s = tu_mix64(s);
        for (int b = 0; b < 8 && i < len; b++, i++)
            buf[i] = (uint8_t)(s >> (8 * b));
    }
}

static inline int tu_check_fill(const uint8_t *buf, size_t len, uint64_t key)
{
    uint64_t s = tu_mix64(key);
    size_t i = 0;
    while (i < len) {
        s = tu_mix64(s);
        for (int b = 0; b < 8 && i < len; b++, i++)
            if (buf[i] != (uint8_t)(s >> (8 * b)))
                return 0;
    }
    return 1;
}

/* Key and length of the payload of (stream index, offset) for tests that
 * derive content from the position alone. */
static inline uint64_t tu_pos_key(uint32_t stream, uint64_t offset)
{
    return tu_mix64(((uint64_t)stream << 40) ^ offset ^ 0x5eedull);
}

static inline size_t tu_pos_len(uint32_t stream, uint64_t offset, size_t max)
{
    return (size_t)(tu_mix64(tu_pos_key(stream, offset) + 1) % (max + 1));
}

/* ---- errors recorded off the test thread ----------------------------------- */

static pthread_mutex_t tu_err_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned tu_err_count;
static char tu_err_first[512];

static inline void tu_failf(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static inline void tu_failf(const char *file, int line, const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&tu_err_lock);
    if (tu_err_count++ == 0)
        snprintf(tu_err_first, sizeof tu_err_first, "%s:%d: %s", file, line, msg);
    if (tu_err_count <= 5)
        fprintf(stderr, "%s:%d: %s\n", file, line, msg);
    pthread_mutex_unlock(&tu_err_lock);
}

/* Check without leaving the thread: records the first failure. */
#define TU_CHECK(cond, ...)                                                                        \
    do {                                                                                           \
        if (!(cond))                                                                               \
            tu_failf(__FILE__, __LINE__, __VA_ARGS__);                                             \
    } while (0)

static inline unsigned tu_errors(void)
{
    pthread_mutex_lock(&tu_err_lock);
    unsigned n = tu_err_count;
    pthread_mutex_unlock(&tu_err_lock);
    return n;
}

static inline void tu_errors_reset(void)
{
    pthread_mutex_lock(&tu_err_lock);
    tu_err_count = 0;
    tu_err_first[0] = 0;
    pthread_mutex_unlock(&tu_err_lock);
}

/* ---- owned copies of read records ------------------------------------------ */

typedef struct tu_rec {
    uint64_t seq, offset, checksum;
    int64_t timestamp_us;
    uint32_t stream_id;
    enum wal_direction direction;
    char *stream;
    size_t stream_len;
    uint8_t *producer, *msgid, *headers, *payload;
    size_t producer_len, msgid_len, headers_len, payload_len;
} tu_rec_t;

typedef struct tu_recs {
    tu_rec_t *v;
    size_t n, cap;
    size_t stop_after; /* callback returns 1 after this many (0: never) */
} tu_recs_t;

static inline void *tu_dup(const void *p, size_t n)
{
    void *d = malloc(n ? n : 1);
    if (!d)
        abort();
    if (n)
        memcpy(d, p, n);
    return d;
}

static inline int tu_recs_cb(const wal_record_t *r, void *arg)
{
    tu_recs_t *rs = arg;
    if (rs->n == rs->cap) {
        rs->cap = rs->cap ? rs->cap * 2 : 64;
        rs->v = realloc(rs->v, rs->cap * sizeof *rs->v);
        if (!rs->v)
            abort();
    }
    tu_rec_t *c = &rs->v[rs->n++];
    c->seq = r->seq;
    c->offset = r->offset;
    c->checksum = r->checksum;
    c->timestamp_us = r->timestamp_us;
    c->stream_id = r->stream_id;
    c->direction = r->direction;
    c->stream = tu_dup(r->stream, r->stream_len);
    c->stream_len = r->stream_len;
    c->producer = tu_dup(r->producer, r->producer_len);
    c->producer_len = r->producer_len;
    c->msgid = tu_dup(r->msgid, r->msgid_len);
    c->msgid_len = r->msgid_len;
    c->headers = tu_dup(r->headers, r->headers_len);
    c->headers_len = r->headers_len;
    c->payload = tu_dup(r->payload, r->payload_len);
    c->payload_len = r->payload_len;
    return rs->stop_after && rs->n >= rs->stop_after;
}

static inline void tu_recs_clear(tu_recs_t *rs)
{
    for (size_t i = 0; i < rs->n; i++) {
        tu_rec_t *c = &rs->v[i];
        free(c->stream);
        free(c->producer);
        free(c->msgid);
        free(c->headers);
        free(c->payload);
    }
    rs->n = 0;
}

static inline void tu_recs_free(tu_recs_t *rs)
{
    tu_recs_clear(rs);
    free(rs->v);
    memset(rs, 0, sizeof *rs);
}

static inline int tu_mem_eq(const void *a, size_t alen, const void *b, size_t blen)
{
    return alen == blen && (alen == 0 || memcmp(a, b, alen) == 0);
}

/* ---- event loop completions ------------------------------------------------ */

/* A request's completion collected for later checks. */
typedef struct tu_waiter {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int done;
    int calls;
    pthread_t thread;
} tu_waiter_t;

static inline void tu_waiter_init(tu_waiter_t *w)
{
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->cond, NULL);
    w->done = 0;
    w->calls = 0;
}

static inline void tu_waiter_destroy(tu_waiter_t *w)
{
    pthread_mutex_destroy(&w->lock);
    pthread_cond_destroy(&w->cond);
}

static inline void tu_waiter_cb(wal_append_t *req, void *arg)
{
    (void)req;
    tu_waiter_t *w = arg;
    pthread_mutex_lock(&w->lock);
    w->calls++;
    w->done = 1;
    w->thread = pthread_self();
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

static inline void tu_waiter_wait(tu_waiter_t *w)
{
    pthread_mutex_lock(&w->lock);
    while (!w->done)
        pthread_cond_wait(&w->cond, &w->lock);
    pthread_mutex_unlock(&w->lock);
}

/* A message on a NUL-terminated stream name. */
static inline wal_msg_t tu_msg(const char *stream, const void *payload, size_t len)
{
    wal_msg_t m;
    memset(&m, 0, sizeof m);
    m.stream = stream;
    m.stream_len = strlen(stream);
    m.payload = payload;
    m.payload_len = len;
    return m;
}

#endif
