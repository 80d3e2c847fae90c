/*
 * wal_bench.c - arq-wal-bench: WAL append throughput under full durability,
 * measured against a plain LMDB loop that does the same puts.
 *
 * Two tables (docs/benchmarks.md explains how to read them):
 *
 * Appends complete at their durable point, as arqd acknowledges publishes
 * (wal_append_sync_durable: the batch's journal entry is fdatasynced; LMDB
 * takes it in a later fold; docs/wal-format.md "Journal").
 *
 *  (a) One submitter calls wal_append_sync_durable() with B 128-byte messages per
 *      call (one commit per batch), spread round-robin over 8 streams, for
 *      B = 1, 10, 100, 1000. In the same run, alternating with it, a plain
 *      LMDB loop in its own fresh environment does per message what the WAL
 *      writes per message: a 176-byte value (48-byte record header + payload)
 *      put with MDB_APPEND into "log" under the 8-byte big-endian sequence, a
 *      12-byte (stream id, offset) -> seq put into "index", and per batch one
 *      48-byte put per touched stream into "streams"; one synced
 *      mdb_txn_commit per batch (env flags MDB_NOTLS only, same map size).
 *      The ratio WAL/LMDB per batch size is the figure of merit (goal: >= 0.8).
 *
 *  (b) Group commit: T threads (1, 8, 64) each calling wal_append_sync_durable() with
 *      one message at a time: many single publishes in flight at once, as the
 *      broker's event loop will submit them. Records/s, commits/s, messages
 *      per commit (wal_stats) and the latency of one wal_append_sync call,
 *      next to the baseline's synced single-put commit rate.
 *
 * Each measurement gets a fresh directory (removed afterwards) under one run
 * directory, lasts a fixed time, and is repeated; medians are reported, and
 * for (a) also the median of the per-repetition WAL/LMDB ratios, which a
 * shared disk whose fsync latency drifts during the run disturbs less.
 * Exit status: 0, 1 on any append or setup error, 2 on bad usage, 130 when
 * interrupted.
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <getopt.h>
#include <limits.h>
#include <mntent.h>
#include <stddef.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statfs.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <lmdb.h>

#include "bench_util.h"
#include "wal.h"
#include "wal_record.h"

#define BENCH_STREAMS     8u
#define BENCH_PAYLOAD     128u
#define BENCH_MAP_SIZE    (16ull << 30) /* both sides: the WAL's default maximum */
#define BENCH_GOAL        0.8
#define BENCH_MAX_REPS    100u
#define BENCH_MAX_LIST    16u
#define BENCH_MAX_BATCH   8192u /* the WAL's default batch_max_msgs */
#define BENCH_MAX_THREADS 1024u
#define BENCH_TMPFS_MAGIC 0x01021994L
#define BENCH_RAMFS_MAGIC 0x858458f6L
#define BENCH_ONLY_WAL    1
#define BENCH_ONLY_LMDB   2
#define BENCH_MET         1
#define BENCH_MISSED      (-1)
#define BENCH_UNCLEAR     0

struct bench_opts {
    double seconds;
    unsigned reps;
    int quick;
    int json;
    int sync_none;
    int only;           /* 0: both sides; BENCH_ONLY_WAL or BENCH_ONLY_LMDB (for profiling) */
    const char *parent; /* where the run directory is created */
    size_t batches[BENCH_MAX_LIST];
    unsigned n_batches;
    unsigned threads[BENCH_MAX_LIST];
    unsigned n_threads;
};

/* One measurement. */
struct run_result {
    double rps;        /* records per second */
    double commits_ps; /* commits per second */
    double msgs_per_commit;
    double p50_us, p99_us; /* wal_append_sync latency (group runs only) */
};

/* Medians over the repetitions of one table row. */
struct row {
    size_t param; /* batch size or thread count */
    struct run_result wal[BENCH_MAX_REPS];
    struct run_result lmdb[BENCH_MAX_REPS];
    double wal_rps, lmdb_rps;
    double ratio;        /* median WAL rec/s / median LMDB rec/s */
    double ratio_paired; /* median over reps of (WAL / LMDB of the same rep) */
    double ratio_min, ratio_max;
    int verdict; /* BENCH_MET, BENCH_MISSED or BENCH_UNCLEAR */
    double commits_ps, msgs_per_commit, p50_us, p99_us;
};

struct machine {
    long nproc;
    char cpu[128];
    unsigned long long mem_bytes;
    char kernel[256];
    double load_before[3], load_after[3];
    char fs_type[64];
    char fs_device[256];
    long fs_magic;
    int fs_tmpfs;
    char lmdb_version[128];
};

static volatile sig_atomic_t g_interrupted;
static char g_stream_names[BENCH_STREAMS][16];
static uint8_t g_payload[BENCH_PAYLOAD];

static void on_signal(int sig)
{
    (void)sig;
    g_interrupted = 1;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(const double *v, unsigned n)
{
    double s[BENCH_MAX_REPS];
    memcpy(s, v, n * sizeof *s);
    qsort(s, n, sizeof *s, cmp_double);
    return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

/* ---- directories ------------------------------------------------------- */

static int rm_entry(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    (void)st;
    (void)type;
    (void)ftw;
    if (remove(path) != 0 && errno != ENOENT)
        fprintf(stderr, "arq-wal-bench: cannot remove %s: %s\n", path, strerror(errno));
    return 0;
}

static void remove_tree(const char *path)
{
    if (path[0] != '\0')
        (void)nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/*
 * Flush the filesystem that holds dir, so that the journal commit for the
 * previous measurement's deleted files (and, on a `discard` mount, the TRIM
 * of their blocks) is not billed to the next measurement's fsyncs.
 */
static void settle_fs(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return;
    (void)syncfs(fd);
    (void)close(fd);
}

/* A fresh directory parent/label.XXXXXX into buf. */
static int make_dir(char *buf, size_t len, const char *parent, const char *label)
{
    int n = snprintf(buf, len, "%s/%s.XXXXXX", parent, label);
    if (n < 0 || (size_t)n >= len) {
        fprintf(stderr, "arq-wal-bench: path too long under %s\n", parent);
        return -1;
    }
    if (mkdtemp(buf) == NULL) {
        fprintf(stderr, "arq-wal-bench: mkdtemp %s: %s\n", buf, strerror(errno));
        buf[0] = '\0';
        return -1;
    }
    return 0;
}

/* ---- the machine --------------------------------------------------------- */

static void machine_probe(struct machine *m, const char *dir)
{
    memset(m, 0, sizeof *m);
    m->nproc = sysconf(_SC_NPROCESSORS_ONLN);
    long pages = sysconf(_SC_PHYS_PAGES), psize = sysconf(_SC_PAGESIZE);
    if (pages > 0 && psize > 0)
        m->mem_bytes = (unsigned long long)pages * (unsigned long long)psize;
    snprintf(m->cpu, sizeof m->cpu, "unknown cpu");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f != NULL) {
        char line[512];
        while (fgets(line, sizeof line, f) != NULL) {
            char *colon = strchr(line, ':');
            if (strncmp(line, "model name", 10) == 0 && colon != NULL) {
                colon += 1 + (colon[1] == ' ');
                colon[strcspn(colon, "\n")] = '\0';
                snprintf(m->cpu, sizeof m->cpu, "%s", colon);
                break;
            }
        }
        fclose(f);
    }
    struct utsname u;
    if (uname(&u) == 0)
        snprintf(m->kernel, sizeof m->kernel, "%s %s %s", u.sysname, u.release, u.machine);
    if (getloadavg(m->load_before, 3) != 3)
        m->load_before[0] = m->load_before[1] = m->load_before[2] = -1;

    struct statfs sfs;
    if (statfs(dir, &sfs) == 0) {
        m->fs_magic = (long)sfs.f_type;
        m->fs_tmpfs = m->fs_magic == BENCH_TMPFS_MAGIC || m->fs_magic == BENCH_RAMFS_MAGIC;
    }
    /* Name the filesystem as df would: the longest mount point above dir. */
    char real[PATH_MAX];
    snprintf(m->fs_type, sizeof m->fs_type, "unknown");
    snprintf(m->fs_device, sizeof m->fs_device, "unknown");
    FILE *mt = setmntent("/proc/self/mounts", "r");
    if (realpath(dir, real) != NULL && mt != NULL) {
        size_t best = 0;
        struct mntent *me;
        while ((me = getmntent(mt)) != NULL) {
            size_t n = strlen(me->mnt_dir);
            int above = strncmp(real, me->mnt_dir, n) == 0 &&
                        (real[n] == '/' || real[n] == '\0' || strcmp(me->mnt_dir, "/") == 0);
            if (above && n >= best) {
                best = n;
                snprintf(m->fs_type, sizeof m->fs_type, "%s", me->mnt_type);
                snprintf(m->fs_device, sizeof m->fs_device, "%s", me->mnt_fsname);
            }
        }
    }
    if (mt != NULL)
        endmntent(mt);
    snprintf(m->lmdb_version, sizeof m->lmdb_version, "%s", mdb_version(NULL, NULL, NULL));
}

/* ---- (a) WAL, one submitter ------------------------------------------------ */

static int wal_open_fresh(const struct bench_opts *o, const char *dir, wal_t **ret)
{
    wal_options_t wo;
    memset(&wo, 0, sizeof wo);
    wo.dir = dir;
    wo.sync = o->sync_none ? WAL_SYNC_NONE : WAL_SYNC_FULL;
    wo.map_size = BENCH_MAP_SIZE;
    wo.map_size_max = BENCH_MAP_SIZE;
    char err[256] = "";
    int rc = wal_open(&wo, NULL, ret, err, sizeof err);
    if (rc != 0)
        fprintf(stderr, "arq-wal-bench: wal_open %s: %s: %s\n", dir, wal_strerror(rc), err);
    return rc;
}

/* msgs[j] goes to stream j % BENCH_STREAMS; n >= BENCH_STREAMS. */
static wal_msg_t *msgs_new(size_t n)
{
    wal_msg_t *msgs = calloc(n, sizeof *msgs);
    if (msgs == NULL) {
        fprintf(stderr, "arq-wal-bench: out of memory\n");
        return NULL;
    }
    for (size_t j = 0; j < n; j++) {
        const char *name = g_stream_names[j % BENCH_STREAMS];
        msgs[j].stream = name;
        msgs[j].stream_len = strlen(name);
        msgs[j].payload = g_payload;
        msgs[j].payload_len = BENCH_PAYLOAD;
        msgs[j].direction = WAL_DIR_IN;
    }
    return msgs;
}

static int wal_stats_or_fail(wal_t *w, wal_stats_t *st)
{
    int rc = wal_stats_get(w, st);
    if (rc != 0)
        fprintf(stderr, "arq-wal-bench: wal_stats_get: %s\n", wal_strerror(rc));
    return rc;
}

static int run_wal_batch(const struct bench_opts *o, const char *dir, size_t batch,
                         struct run_result *res)
{
    wal_t *w = NULL;
    /* batch + 7 messages so that &msgs[k] for k < 8 is a round-robin batch. */
    wal_msg_t *msgs = msgs_new(batch + BENCH_STREAMS - 1);
    int rc = -1;
    if (msgs == NULL || wal_open_fresh(o, dir, &w) != 0)
        goto out;
    /* Create the streams before the clock starts (the baseline does too). */
    rc = wal_append_sync(w, msgs, BENCH_STREAMS, NULL);
    if (rc != 0) {
        fprintf(stderr, "arq-wal-bench: wal_append_sync (warm-up): %s\n", wal_strerror(rc));
        goto out;
    }
    wal_stats_t st0, st1;
    if ((rc = wal_stats_or_fail(w, &st0)) != 0)
        goto out;

    uint64_t n = 0, k = 0, t0 = bench_now_ns(), t = t0;
    uint64_t deadline = t0 + (uint64_t)(o->seconds * 1e9);
    while (t < deadline && !g_interrupted) {
        rc = wal_append_sync_durable(w, &msgs[k], batch, NULL);
        if (rc != 0) {
            fprintf(stderr, "arq-wal-bench: wal_append_sync (batch %zu): %s\n", batch,
                    wal_strerror(rc));
            goto out;
        }
        n += batch;
        k = (k + batch) % BENCH_STREAMS;
        t = bench_now_ns();
    }
    if ((rc = wal_stats_or_fail(w, &st1)) != 0)
        goto out;
    double secs = (double)(t - t0) / 1e9;
    uint64_t commits = st1.commits - st0.commits;
    res->rps = (double)n / secs;
    res->commits_ps = (double)commits / secs;
    res->msgs_per_commit =
        commits ? (double)(st1.committed_msgs - st0.committed_msgs) / commits : 0;
    rc = 0;
out:
    if (w != NULL)
        wal_close(w);
    free(msgs);
    return rc;
}

/* ---- (a) plain LMDB baseline ----------------------------------------------- */

static int lmdb_fail(const char *what, int rc)
{
    fprintf(stderr, "arq-wal-bench: lmdb baseline: %s: %s\n", what, mdb_strerror(rc));
    return -1;
}

static void stream_meta_fill(uint8_t meta[WAL_STREAM_META_SIZE], uint32_t id, uint64_t next)
{
    memset(meta, 0, WAL_STREAM_META_SIZE);
    wal_put_le32(meta, id);
    wal_put_le64(meta + 8, 0x5eedull * id); /* epoch */
    wal_put_le64(meta + 16, 1);             /* first offset */
    wal_put_le64(meta + 24, next);          /* next offset */
}

static int run_lmdb_batch(const struct bench_opts *o, const char *dir, size_t batch,
                          struct run_result *res)
{
    MDB_env *env = NULL;
    MDB_txn *txn = NULL;
    MDB_dbi log_db, index_db, streams_db;
    uint64_t next_off[BENCH_STREAMS];
    uint8_t meta[WAL_STREAM_META_SIZE];
    int rc, ret = -1;

    if ((rc = mdb_env_create(&env)) != 0)
        return lmdb_fail("mdb_env_create", rc);
    if ((rc = mdb_env_set_maxdbs(env, 8)) != 0 ||
        (rc = mdb_env_set_mapsize(env, BENCH_MAP_SIZE)) != 0) {
        lmdb_fail("env setup", rc);
        goto out;
    }
    if ((rc = mdb_env_open(env, dir, MDB_NOTLS | (o->sync_none ? MDB_NOSYNC : 0), 0600)) != 0) {
        lmdb_fail("mdb_env_open", rc);
        goto out;
    }
    /* Set-up commit: the three databases and the 8 stream rows. */
    if ((rc = mdb_txn_begin(env, NULL, 0, &txn)) != 0 ||
        (rc = mdb_dbi_open(txn, "log", MDB_CREATE, &log_db)) != 0 ||
        (rc = mdb_dbi_open(txn, "index", MDB_CREATE, &index_db)) != 0 ||
        (rc = mdb_dbi_open(txn, "streams", MDB_CREATE, &streams_db)) != 0) {
        lmdb_fail("set-up txn", rc);
        goto out;
    }
    for (uint32_t s = 0; s < BENCH_STREAMS; s++) {
        next_off[s] = 1;
        stream_meta_fill(meta, s + 1, 1);
        MDB_val key = {strlen(g_stream_names[s]), g_stream_names[s]};
        MDB_val val = {sizeof meta, meta};
        if ((rc = mdb_put(txn, streams_db, &key, &val, 0)) != 0) {
            lmdb_fail("set-up put", rc);
            goto out;
        }
    }
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc != 0) {
        lmdb_fail("set-up commit", rc);
        goto out;
    }

    uint8_t rec[WAL_RECORD_HEADER + BENCH_PAYLOAD];
    uint8_t seq_key[8], idx_key[12];
    uint64_t seq = 0, k = 0, n = 0, commits = 0, t0 = bench_now_ns(), t = t0;
    uint64_t deadline = t0 + (uint64_t)(o->seconds * 1e9);
    memset(rec, 0, sizeof rec);
    memcpy(rec + WAL_RECORD_HEADER, g_payload, BENCH_PAYLOAD);
    while (t < deadline && !g_interrupted) {
        unsigned touched = 0;
        if ((rc = mdb_txn_begin(env, NULL, 0, &txn)) != 0) {
            lmdb_fail("mdb_txn_begin", rc);
            goto out;
        }
        for (size_t i = 0; i < batch; i++) {
            uint32_t s = (uint32_t)(k++ % BENCH_STREAMS);
            uint64_t off = next_off[s]++;
            seq++;
            /* A header with the fields the WAL's has (contents don't matter to LMDB). */
            wal_put_le32(rec + 8, s + 1);
            wal_put_le64(rec + 16, seq);
            wal_put_le64(rec + 24, off);
            wal_put_be64(seq_key, seq);
            MDB_val key = {sizeof seq_key, seq_key}, val = {sizeof rec, rec};
            if ((rc = mdb_put(txn, log_db, &key, &val, MDB_APPEND)) != 0) {
                lmdb_fail("put log", rc);
                goto out;
            }
            wal_put_be32(idx_key, s + 1);
            wal_put_be64(idx_key + 4, off);
            MDB_val ikey = {sizeof idx_key, idx_key}, ival = {sizeof seq_key, seq_key};
            if ((rc = mdb_put(txn, index_db, &ikey, &ival, 0)) != 0) {
                lmdb_fail("put index", rc);
                goto out;
            }
            touched |= 1u << s;
        }
        for (uint32_t s = 0; s < BENCH_STREAMS; s++) {
            if (!(touched & (1u << s)))
                continue;
            stream_meta_fill(meta, s + 1, next_off[s]);
            MDB_val key = {strlen(g_stream_names[s]), g_stream_names[s]};
            MDB_val val = {sizeof meta, meta};
            if ((rc = mdb_put(txn, streams_db, &key, &val, 0)) != 0) {
                lmdb_fail("put streams", rc);
                goto out;
            }
        }
        rc = mdb_txn_commit(txn);
        txn = NULL;
        if (rc != 0) {
            lmdb_fail("mdb_txn_commit", rc);
            goto out;
        }
        n += batch;
        commits++;
        t = bench_now_ns();
    }
    double secs = (double)(t - t0) / 1e9;
    res->rps = (double)n / secs;
    res->commits_ps = (double)commits / secs;
    res->msgs_per_commit = (double)batch;
    ret = 0;
out:
    if (txn != NULL)
        mdb_txn_abort(txn);
    mdb_env_close(env);
    return ret;
}

/* ---- (b) group commit: T threads, one message per call --------------------- */

struct group;

struct worker {
    struct group *g;
    pthread_t thread;
    unsigned id;
    uint64_t done;
    int err;
    uint64_t hist[BENCH_LAT_BUCKETS];
};

struct group {
    wal_t *wal;
    pthread_mutex_t lock; /* with cond: the start gate */
    pthread_cond_t cond;
    int go;
    atomic_int stop;
};

static void group_release(struct group *g)
{
    pthread_mutex_lock(&g->lock);
    g->go = 1;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
}

static void *worker_main(void *arg)
{
    struct worker *wk = arg;
    struct group *g = wk->g;
    wal_msg_t msg;
    memset(&msg, 0, sizeof msg);
    msg.stream = g_stream_names[wk->id % BENCH_STREAMS];
    msg.stream_len = strlen(msg.stream);
    msg.payload = g_payload;
    msg.payload_len = BENCH_PAYLOAD;
    msg.direction = WAL_DIR_IN;

    pthread_mutex_lock(&g->lock);
    while (!g->go)
        pthread_cond_wait(&g->cond, &g->lock);
    pthread_mutex_unlock(&g->lock);
    while (!atomic_load_explicit(&g->stop, memory_order_relaxed)) {
        uint64_t t0 = bench_now_ns();
        int rc = wal_append_sync_durable(g->wal, &msg, 1, NULL);
        if (rc != 0) {
            wk->err = rc;
            atomic_store(&g->stop, 1);
            break;
        }
        wk->hist[bench_lat_bucket(bench_now_ns() - t0)]++;
        wk->done++;
    }
    return NULL;
}

static int run_wal_group(const struct bench_opts *o, const char *dir, unsigned nthreads,
                         struct run_result *res)
{
    struct group g;
    struct worker *wk = calloc(nthreads, sizeof *wk);
    wal_msg_t *warm = msgs_new(BENCH_STREAMS);
    unsigned started = 0;
    uint64_t t0 = 0;
    int rc = -1;
    memset(&g, 0, sizeof g);
    pthread_mutex_init(&g.lock, NULL);
    pthread_cond_init(&g.cond, NULL);
    atomic_init(&g.stop, 0);
    if (wk == NULL || warm == NULL)
        goto out;
    if (wal_open_fresh(o, dir, &g.wal) != 0)
        goto out;
    if ((rc = wal_append_sync(g.wal, warm, BENCH_STREAMS, NULL)) != 0) {
        fprintf(stderr, "arq-wal-bench: wal_append_sync (warm-up): %s\n", wal_strerror(rc));
        goto out;
    }
    rc = -1;
    wal_stats_t st0, st1;
    if (wal_stats_or_fail(g.wal, &st0) != 0)
        goto out;
    for (; started < nthreads; started++) {
        wk[started].g = &g;
        wk[started].id = started;
        int e = pthread_create(&wk[started].thread, NULL, worker_main, &wk[started]);
        if (e != 0) {
            fprintf(stderr, "arq-wal-bench: pthread_create (thread %u of %u): %s\n", started,
                    nthreads, strerror(e));
            atomic_store(&g.stop, 1);
            group_release(&g);
            goto join;
        }
    }
    group_release(&g);
    t0 = bench_now_ns();
    struct timespec until;
    uint64_t deadline = t0 + (uint64_t)(o->seconds * 1e9);
    /* Sleep in slices so that an interrupt or a failed worker ends the run early. */
    while (!g_interrupted && !atomic_load(&g.stop)) {
        uint64_t t = bench_now_ns();
        if (t >= deadline)
            break;
        uint64_t slice = deadline - t < 50000000u ? deadline - t : 50000000u;
        until.tv_sec = (time_t)(slice / 1000000000u);
        until.tv_nsec = (long)(slice % 1000000000u);
        (void)nanosleep(&until, NULL);
    }
    atomic_store(&g.stop, 1);
join:
    for (unsigned i = 0; i < started; i++)
        (void)pthread_join(wk[i].thread, NULL);
    uint64_t t1 = bench_now_ns();
    uint64_t n = 0;
    if (started < nthreads)
        goto out;
    for (unsigned i = 0; i < started; i++) {
        if (wk[i].err != 0) {
            fprintf(stderr, "arq-wal-bench: wal_append_sync (thread %u of %u): %s\n", i, nthreads,
                    wal_strerror(wk[i].err));
            goto out;
        }
        n += wk[i].done;
    }
    if (g_interrupted || wal_stats_or_fail(g.wal, &st1) != 0)
        goto out;

    double secs = (double)(t1 - t0) / 1e9;
    uint64_t commits = st1.commits - st0.commits;
    res->rps = (double)n / secs;
    res->commits_ps = (double)commits / secs;
    res->msgs_per_commit =
        commits ? (double)(st1.committed_msgs - st0.committed_msgs) / commits : 0;
    /* Merge the histograms and read off p50 and p99. */
    uint64_t *hist = wk[0].hist;
    for (unsigned i = 1; i < started; i++)
        for (unsigned b = 0; b < BENCH_LAT_BUCKETS; b++)
            hist[b] += wk[i].hist[b];
    uint64_t seen = 0, p50 = (n + 1) / 2, p99 = n - n / 100;
    res->p50_us = res->p99_us = 0;
    for (unsigned b = 0; b < BENCH_LAT_BUCKETS && n > 0; b++) {
        if (hist[b] == 0)
            continue;
        if (seen < p50 && seen + hist[b] >= p50)
            res->p50_us = bench_lat_bucket_mid_ns(b) / 1e3;
        if (seen < p99 && seen + hist[b] >= p99)
            res->p99_us = bench_lat_bucket_mid_ns(b) / 1e3;
        seen += hist[b];
    }
    rc = 0;
out:
    pthread_cond_destroy(&g.cond);
    pthread_mutex_destroy(&g.lock);
    if (g.wal != NULL)
        wal_close(g.wal);
    free(warm);
    free(wk);
    return rc;
}

/* ---- the run ----------------------------------------------------------------- */

struct bench {
    struct bench_opts o;
    struct machine m;
    char cmdline[4096];
    char rundir[PATH_MAX];
    struct row batch_rows[BENCH_MAX_LIST];
    struct row group_rows[BENCH_MAX_LIST];
    double single_put_commits_ps; /* baseline, batch 1; 0 if batch 1 wasn't run */
};

typedef int (*run_fn)(const struct bench_opts *o, const char *dir, size_t param,
                      struct run_result *res);

static int run_group_adapter(const struct bench_opts *o, const char *dir, size_t param,
                             struct run_result *res)
{
    return run_wal_group(o, dir, (unsigned)param, res);
}

/* One measurement in a fresh directory under the run directory. */
static int measure(struct bench *b, run_fn fn, const char *label, size_t param, unsigned rep,
                   struct run_result *res)
{
    char dir[PATH_MAX], name[64];
    snprintf(name, sizeof name, "%s-%zu-r%u", label, param, rep + 1);
    if (make_dir(dir, sizeof dir, b->rundir, name) != 0)
        return -1;
    /* Progress on stderr: a human watching a slow run knows where it is. */
    fprintf(stderr, "  rep %u/%u %-5s %5zu ... ", rep + 1, b->o.reps, label, param);
    settle_fs(b->rundir);
    int rc = fn(&b->o, dir, param, res);
    remove_tree(dir);
    if (rc == 0)
        fprintf(stderr, "%.0f rec/s\n", res->rps);
    else
        fprintf(stderr, "%s\n", g_interrupted ? "interrupted" : "failed");
    return rc;
}

static int bench_run(struct bench *b)
{
    const struct bench_opts *o = &b->o;
    for (unsigned rep = 0; rep < o->reps; rep++) {
        for (unsigned i = 0; i < o->n_batches; i++) {
            struct row *r = &b->batch_rows[i];
            size_t batch = o->batches[i];
            /* Alternate which side goes first, so neither always runs just
             * after the other's files were deleted. */
            int wal_first = rep % 2 == 0;
            for (int side = 0; side < 2; side++) {
                int is_wal = (side == 0) == wal_first;
                if (o->only == (is_wal ? BENCH_ONLY_LMDB : BENCH_ONLY_WAL))
                    continue;
                int rc = is_wal ? measure(b, run_wal_batch, "wal", batch, rep, &r->wal[rep])
                                : measure(b, run_lmdb_batch, "lmdb", batch, rep, &r->lmdb[rep]);
                if (rc != 0)
                    return -1;
            }
        }
        for (unsigned i = 0; i < o->n_threads && o->only != BENCH_ONLY_LMDB; i++) {
            struct row *r = &b->group_rows[i];
            if (measure(b, run_group_adapter, "group", o->threads[i], rep, &r->wal[rep]) != 0)
                return -1;
        }
    }
    return 0;
}

/* Median of one double field (at byte offset `field`) over n results. */
static double median_of(const struct run_result *rr, unsigned n, size_t field)
{
    double v[BENCH_MAX_REPS];
    for (unsigned k = 0; k < n; k++)
        memcpy(&v[k], (const char *)&rr[k] + field, sizeof v[k]);
    return median(v, n);
}

static void bench_summarise(struct bench *b)
{
    const struct bench_opts *o = &b->o;
    double v[BENCH_MAX_REPS], w[BENCH_MAX_REPS], q[BENCH_MAX_REPS];
    for (unsigned i = 0; i < o->n_batches; i++) {
        struct row *r = &b->batch_rows[i];
        r->param = o->batches[i];
        r->ratio_min = 1e300;
        r->ratio_max = 0;
        for (unsigned k = 0; k < o->reps; k++) {
            v[k] = r->wal[k].rps;
            w[k] = r->lmdb[k].rps;
            q[k] = w[k] > 0 ? v[k] / w[k] : 0;
            r->ratio_min = q[k] < r->ratio_min ? q[k] : r->ratio_min;
            r->ratio_max = q[k] > r->ratio_max ? q[k] : r->ratio_max;
        }
        r->wal_rps = median(v, o->reps);
        r->lmdb_rps = median(w, o->reps);
        r->ratio = r->lmdb_rps > 0 ? r->wal_rps / r->lmdb_rps : 0;
        r->ratio_paired = median(q, o->reps);
        /* Both estimates must agree before we call it: on a noisy disk one
         * slow period can sink one side's median but not the paired ratios. */
        if (r->ratio >= BENCH_GOAL && r->ratio_paired >= BENCH_GOAL)
            r->verdict = BENCH_MET;
        else if (r->ratio < BENCH_GOAL && r->ratio_paired < BENCH_GOAL)
            r->verdict = BENCH_MISSED;
        else
            r->verdict = BENCH_UNCLEAR;
        r->msgs_per_commit =
            median_of(r->wal, o->reps, offsetof(struct run_result, msgs_per_commit));
        if (r->param == 1)
            b->single_put_commits_ps =
                median_of(r->lmdb, o->reps, offsetof(struct run_result, commits_ps));
    }
    for (unsigned i = 0; i < o->n_threads; i++) {
        struct row *r = &b->group_rows[i];
        r->param = o->threads[i];
        r->wal_rps = median_of(r->wal, o->reps, offsetof(struct run_result, rps));
        r->commits_ps = median_of(r->wal, o->reps, offsetof(struct run_result, commits_ps));
        r->msgs_per_commit =
            median_of(r->wal, o->reps, offsetof(struct run_result, msgs_per_commit));
        r->p50_us = median_of(r->wal, o->reps, offsetof(struct run_result, p50_us));
        r->p99_us = median_of(r->wal, o->reps, offsetof(struct run_result, p99_us));
    }
}

/* BENCH_MET if met at every batch size, BENCH_MISSED if missed at one. */
static int bench_goal(const struct bench *b)
{
    int v = BENCH_MET;
    if (b->o.only != 0 || b->o.n_batches == 0)
        return BENCH_UNCLEAR;
    for (unsigned i = 0; i < b->o.n_batches; i++) {
        if (b->batch_rows[i].verdict == BENCH_MISSED)
            return BENCH_MISSED;
        if (b->batch_rows[i].verdict == BENCH_UNCLEAR)
            v = BENCH_UNCLEAR;
    }
    return v;
}

static const char *verdict_name(int v)
{
    return v == BENCH_MET ? "met" : v == BENCH_MISSED ? "MISSED" : "unclear (noisy: more --reps)";
}

static void print_table(FILE *f, const struct bench *b)
{
    const struct bench_opts *o = &b->o;
    const struct machine *m = &b->m;
    const char *unsafe =
        o->sync_none ? " (UNSAFE: no fsync, figures say nothing about durability)" : "";
    char c1[32], c2[32], c3[32];

    fprintf(f, "\narq-wal-bench: WAL appends vs plain LMDB, %u-byte messages, %u streams\n",
            BENCH_PAYLOAD, BENCH_STREAMS);
    fprintf(f, "command:  %s\n", b->cmdline);
    fprintf(f, "machine:  %ld cpus (%s), %.1f GiB RAM, %s\n", m->nproc, m->cpu,
            (double)m->mem_bytes / (1024.0 * 1024 * 1024), m->kernel);
    fprintf(f, "load:     %.2f %.2f %.2f before, %.2f %.2f %.2f after (1/5/15 min)\n",
            m->load_before[0], m->load_before[1], m->load_before[2], m->load_after[0],
            m->load_after[1], m->load_after[2]);
    fprintf(f, "data dir: %s (%s on %s, statfs type 0x%lx)%s\n", b->rundir, m->fs_type,
            m->fs_device, (unsigned long)m->fs_magic,
            m->fs_tmpfs ? " WARNING: tmpfs, fsync is free here" : "");
    fprintf(f, "lmdb:     %s; map size %llu GiB on both sides\n", m->lmdb_version,
            BENCH_MAP_SIZE >> 30);
    fprintf(f, "sync:     %s%s\n",
            o->sync_none ? "none (WAL_SYNC_NONE / MDB_NOSYNC)"
                         : "full (WAL_SYNC_FULL / synced mdb_txn_commit)",
            unsafe);
    fprintf(f, "runs:     %g s per measurement, %u rep%s, median reported%s\n", o->seconds, o->reps,
            o->reps == 1 ? "" : "s",
            o->only == BENCH_ONLY_WAL    ? "; --only wal: no baseline, no ratios"
            : o->only == BENCH_ONLY_LMDB ? "; --only lmdb: no WAL runs, no ratios"
                                         : "");

    if (o->n_batches > 0) {
        fprintf(f,
                "\n(a) one submitter, B messages per wal_append_sync_durable (one group commit per "
                "batch)%s\n",
                o->sync_none ? " UNSAFE" : "");
        fprintf(f, "    vs plain LMDB doing the same puts, one %scommit per batch\n",
                o->sync_none ? "unsynced " : "synced ");
        fprintf(f, "%7s %13s %13s %9s %7s %11s %8s  %s\n", "batch", "WAL rec/s", "LMDB rec/s",
                "WAL/LMDB", "paired", "pair range", "msg/cmt", "goal >= 0.80");
        for (unsigned i = 0; i < o->n_batches; i++) {
            const struct row *r = &b->batch_rows[i];
            char range[32], ratio[32], paired[32], mpc[32];
            snprintf(range, sizeof range, "%.2f-%.2f", r->ratio_min, r->ratio_max);
            snprintf(ratio, sizeof ratio, "%.3f", r->ratio);
            snprintf(paired, sizeof paired, "%.3f", r->ratio_paired);
            if (o->only != 0) {
                snprintf(range, sizeof range, "-");
                snprintf(ratio, sizeof ratio, "-");
                snprintf(paired, sizeof paired, "-");
            }
            snprintf(mpc, sizeof mpc, "%.1f", r->msgs_per_commit);
            if (o->only == BENCH_ONLY_LMDB)
                snprintf(mpc, sizeof mpc, "-");
            fprintf(f, "%7zu %13s %13s %9s %7s %11s %8s  %s\n", r->param,
                    o->only == BENCH_ONLY_LMDB ? "-" : bench_fmt_count(c1, sizeof c1, r->wal_rps),
                    o->only == BENCH_ONLY_WAL ? "-" : bench_fmt_count(c2, sizeof c2, r->lmdb_rps),
                    ratio, paired, range, mpc, o->only != 0 ? "-" : verdict_name(r->verdict));
        }
    }
    if (o->n_threads > 0 && o->only != BENCH_ONLY_LMDB) {
        fprintf(f, "\n(b) group commit: T threads, 1 message per wal_append_sync_durable%s\n",
                o->sync_none ? " UNSAFE" : "");
        fprintf(f, "%7s %13s %13s %9s %11s %11s\n", "threads", "rec/s", "commits/s", "msg/cmt",
                "p50 us", "p99 us");
        for (unsigned i = 0; i < o->n_threads; i++) {
            const struct row *r = &b->group_rows[i];
            fprintf(f, "%7zu %13s %13s %9.1f %11.0f %11.0f\n", r->param,
                    bench_fmt_count(c1, sizeof c1, r->wal_rps),
                    bench_fmt_count(c2, sizeof c2, r->commits_ps), r->msgs_per_commit, r->p50_us,
                    r->p99_us);
        }
        if (b->single_put_commits_ps > 0)
            fprintf(f, "    plain LMDB, one put per %scommit (batch 1 baseline): %s commits/s\n",
                    o->sync_none ? "unsynced " : "synced ",
                    bench_fmt_count(c3, sizeof c3, b->single_put_commits_ps));
    }
    if (o->n_batches > 0 && o->only == 0)
        fprintf(f, "\ngoal (WAL >= 0.80 x plain LMDB at every batch size): %s\n",
                verdict_name(bench_goal(b)));
}

static void json_reps(FILE *f, const char *name, const struct run_result *rr, unsigned n)
{
    fprintf(f, "\"%s\":[", name);
    for (unsigned k = 0; k < n; k++)
        fprintf(f, "%s%.1f", k ? "," : "", rr[k].rps);
    fputc(']', f);
}

static const char *json_verdict(int v)
{
    return v == BENCH_MET ? "met" : v == BENCH_MISSED ? "missed" : "unclear";
}

static void print_json(FILE *f, const struct bench *b)
{
    const struct bench_opts *o = &b->o;
    const struct machine *m = &b->m;
    fprintf(f, "{\"tool\":\"arq-wal-bench\",\"command\":");
    bench_json_str(f, b->cmdline);
    fprintf(f, ",\"machine\":{\"nproc\":%ld,\"cpu\":", m->nproc);
    bench_json_str(f, m->cpu);
    fprintf(f, ",\"mem_bytes\":%llu,\"kernel\":", m->mem_bytes);
    bench_json_str(f, m->kernel);
    fprintf(f, ",\"load_before\":[%.2f,%.2f,%.2f],\"load_after\":[%.2f,%.2f,%.2f]}",
            m->load_before[0], m->load_before[1], m->load_before[2], m->load_after[0],
            m->load_after[1], m->load_after[2]);
    fprintf(f, ",\"dir\":");
    bench_json_str(f, b->rundir);
    fprintf(f, ",\"fs\":{\"type\":");
    bench_json_str(f, m->fs_type);
    fprintf(f, ",\"device\":");
    bench_json_str(f, m->fs_device);
    fprintf(f, ",\"statfs_magic\":%ld,\"tmpfs\":%s}", m->fs_magic, m->fs_tmpfs ? "true" : "false");
    fprintf(f, ",\"lmdb_version\":");
    bench_json_str(f, m->lmdb_version);
    fprintf(f,
            ",\"config\":{\"seconds\":%g,\"reps\":%u,\"sync\":\"%s\",\"unsafe\":%s,"
            "\"message_bytes\":%u,\"streams\":%u,\"map_size\":%llu}",
            o->seconds, o->reps, o->sync_none ? "none" : "full", o->sync_none ? "true" : "false",
            BENCH_PAYLOAD, BENCH_STREAMS, BENCH_MAP_SIZE);
    fprintf(f, ",\"batch\":[");
    for (unsigned i = 0; i < o->n_batches; i++) {
        const struct row *r = &b->batch_rows[i];
        fprintf(f,
                "%s{\"batch\":%zu,\"wal_rps\":%.1f,\"lmdb_rps\":%.1f,\"ratio\":%.4f,"
                "\"ratio_paired\":%.4f,\"ratio_min\":%.4f,\"ratio_max\":%.4f,"
                "\"wal_msgs_per_commit\":%.2f,\"goal\":\"%s\",",
                i ? "," : "", r->param, r->wal_rps, r->lmdb_rps, r->ratio, r->ratio_paired,
                r->ratio_min, r->ratio_max, r->msgs_per_commit, json_verdict(r->verdict));
        json_reps(f, "wal_rps_reps", r->wal, o->reps);
        fputc(',', f);
        json_reps(f, "lmdb_rps_reps", r->lmdb, o->reps);
        fputc('}', f);
    }
    fprintf(f, "],\"group\":[");
    for (unsigned i = 0; i < o->n_threads; i++) {
        const struct row *r = &b->group_rows[i];
        fprintf(f,
                "%s{\"threads\":%zu,\"rps\":%.1f,\"commits_per_s\":%.1f,\"msgs_per_commit\":%.2f,"
                "\"p50_us\":%.1f,\"p99_us\":%.1f,",
                i ? "," : "", r->param, r->wal_rps, r->commits_ps, r->msgs_per_commit, r->p50_us,
                r->p99_us);
        json_reps(f, "rps_reps", r->wal, o->reps);
        fputc('}', f);
    }
    fprintf(f, "],\"lmdb_single_put_commits_per_s\":%.1f,\"goal_ratio\":%.2f,\"goal\":\"%s\"}\n",
            b->single_put_commits_ps, BENCH_GOAL, json_verdict(bench_goal(b)));
}

/* ---- options ----------------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: arq-wal-bench [--seconds S] [--reps R] [--dir DIR] [--quick] [--json]\n"
            "                     [--sync full|none] [--batches LIST] [--threads LIST]\n"
            "                     [--only wal|lmdb]\n"
            "\n"
            "Measures WAL appends of %u-byte messages (wal_append_sync, one commit per\n"
            "batch) against a plain LMDB loop doing the same puts, then group commit with\n"
            "concurrent submitters. See docs/benchmarks.md.\n"
            "\n"
            "  --seconds S      length of each measurement (default 2)\n"
            "  --reps R         repetitions; the median is reported (default 3)\n"
            "  --dir DIR        where to create the temporary data directories\n"
            "                   (default /var/tmp; must not be tmpfs to mean anything)\n"
            "  --quick          0.5 s, 1 rep (unless --seconds/--reps say otherwise)\n"
            "  --json           print one JSON object on stdout (the table goes to stderr)\n"
            "  --sync MODE      full (default) or none (UNSAFE, for comparison only)\n"
            "  --batches LIST   batch sizes for table (a), e.g. 1,10,100,1000 or none\n"
            "  --threads LIST   submitter threads for table (b), e.g. 1,8,64 or none\n"
            "  --only SIDE      run only the WAL or only the LMDB baseline (for perf;\n"
            "                   no ratios)\n",
            BENCH_PAYLOAD);
}

/* "1,10,100" -> out[]; "none" -> empty. */
static int parse_list(const char *s, unsigned long max, unsigned long *out, unsigned *n)
{
    *n = 0;
    if (strcmp(s, "none") == 0)
        return 0;
    while (*s) {
        char *end;
        errno = 0;
        unsigned long v = strtoul(s, &end, 10);
        if (errno != 0 || end == s || v == 0 || v > max || *n == BENCH_MAX_LIST)
            return -1;
        out[(*n)++] = v;
        if (*end == ',' && end[1] != '\0')
            end++;
        else if (*end != '\0')
            return -1;
        s = end;
    }
    return *n > 0 ? 0 : -1;
}

static int parse_opts(int argc, char **argv, struct bench_opts *o)
{
    static const struct option longopts[] = {
        {"seconds", required_argument, NULL, 's'},
        {"reps", required_argument, NULL, 'r'},
        {"dir", required_argument, NULL, 'd'},
        {"quick", no_argument, NULL, 'q'},
        {"json", no_argument, NULL, 'j'},
        {"sync", required_argument, NULL, 'y'},
        {"batches", required_argument, NULL, 'b'},
        {"threads", required_argument, NULL, 't'},
        {"only", required_argument, NULL, 'o'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int seconds_set = 0, reps_set = 0, c;
    unsigned long list[BENCH_MAX_LIST], reps;
    unsigned n;
    char *end;

    memset(o, 0, sizeof *o);
    o->seconds = 2;
    o->reps = 3;
    o->parent = "/var/tmp";
    static const size_t def_batches[] = {1, 10, 100, 1000};
    static const unsigned def_threads[] = {1, 8, 64};
    o->n_batches = 4;
    memcpy(o->batches, def_batches, sizeof def_batches);
    o->n_threads = 3;
    memcpy(o->threads, def_threads, sizeof def_threads);

    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 's':
            errno = 0;
            o->seconds = strtod(optarg, &end);
            if (errno != 0 || *end != '\0' || !(o->seconds > 0 && o->seconds <= 3600)) {
                fprintf(stderr, "arq-wal-bench: --seconds wants a number in (0, 3600]\n");
                return -1;
            }
            seconds_set = 1;
            break;
        case 'r':
            errno = 0;
            reps = strtoul(optarg, &end, 10);
            if (errno != 0 || *end != '\0' || reps < 1 || reps > BENCH_MAX_REPS) {
                fprintf(stderr, "arq-wal-bench: --reps wants 1..%u\n", BENCH_MAX_REPS);
                return -1;
            }
            o->reps = (unsigned)reps;
            reps_set = 1;
            break;
        case 'd':
            o->parent = optarg;
            break;
        case 'q':
            o->quick = 1;
            break;
        case 'j':
            o->json = 1;
            break;
        case 'y':
            if (strcmp(optarg, "full") == 0) {
                o->sync_none = 0;
            } else if (strcmp(optarg, "none") == 0) {
                o->sync_none = 1;
            } else {
                fprintf(stderr, "arq-wal-bench: --sync wants full or none\n");
                return -1;
            }
            break;
        case 'b':
            if (parse_list(optarg, BENCH_MAX_BATCH, list, &n) != 0) {
                fprintf(stderr, "arq-wal-bench: --batches wants up to %u sizes in 1..%u, or none\n",
                        BENCH_MAX_LIST, BENCH_MAX_BATCH);
                return -1;
            }
            o->n_batches = n;
            for (unsigned i = 0; i < n; i++)
                o->batches[i] = list[i];
            break;
        case 't':
            if (parse_list(optarg, BENCH_MAX_THREADS, list, &n) != 0) {
                fprintf(stderr,
                        "arq-wal-bench: --threads wants up to %u counts in 1..%u, or none\n",
                        BENCH_MAX_LIST, BENCH_MAX_THREADS);
                return -1;
            }
            o->n_threads = n;
            for (unsigned i = 0; i < n; i++)
                o->threads[i] = (unsigned)list[i];
            break;
        case 'o':
            if (strcmp(optarg, "wal") == 0) {
                o->only = BENCH_ONLY_WAL;
            } else if (strcmp(optarg, "lmdb") == 0) {
                o->only = BENCH_ONLY_LMDB;
            } else {
                fprintf(stderr, "arq-wal-bench: --only wants wal or lmdb\n");
                return -1;
            }
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            usage(stderr);
            return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "arq-wal-bench: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return -1;
    }
    if (o->quick && !seconds_set)
        o->seconds = 0.5;
    if (o->quick && !reps_set)
        o->reps = 1;
    return 0;
}

int main(int argc, char **argv)
{
    static struct bench b; /* large: rows of per-rep results */
    if (parse_opts(argc, argv, &b.o) != 0)
        return 2;

    size_t o = 0;
    for (int i = 0; i < argc && o + 1 < sizeof b.cmdline; i++) {
        int n = snprintf(b.cmdline + o, sizeof b.cmdline - o, "%s%s", i ? " " : "", argv[i]);
        if (n < 0)
            break;
        o += (size_t)n;
    }
    for (unsigned s = 0; s < BENCH_STREAMS; s++)
        snprintf(g_stream_names[s], sizeof g_stream_names[s], "bench.%u", s);
    for (unsigned i = 0; i < BENCH_PAYLOAD; i++)
        g_payload[i] = (uint8_t)(i * 131u + 7u);

    if (make_dir(b.rundir, sizeof b.rundir, b.o.parent, "arq-wal-bench") != 0)
        return 1;
    machine_probe(&b.m, b.rundir);
    if (b.m.fs_tmpfs)
        fprintf(stderr,
                "arq-wal-bench: WARNING: %s is on tmpfs/ramfs, where fsync costs nothing; "
                "these figures say nothing about durable appends (use --dir on a disk)\n",
                b.rundir);
    if (b.o.sync_none)
        fprintf(stderr, "arq-wal-bench: --sync none: UNSAFE mode, no fsync on either side\n");

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    (void)sigaction(SIGINT, &sa, NULL);
    (void)sigaction(SIGTERM, &sa, NULL);
    (void)sigaction(SIGHUP, &sa, NULL);

    fprintf(stderr, "arq-wal-bench: data in %s (%s on %s)\n", b.rundir, b.m.fs_type, b.m.fs_device);
    int rc = bench_run(&b);
    remove_tree(b.rundir);
    if (g_interrupted) {
        fprintf(stderr, "arq-wal-bench: interrupted\n");
        return 130;
    }
    if (rc != 0)
        return 1;
    if (getloadavg(b.m.load_after, 3) != 3)
        b.m.load_after[0] = b.m.load_after[1] = b.m.load_after[2] = -1;
    bench_summarise(&b);
    print_table(b.o.json ? stderr : stdout, &b);
    if (b.o.json)
        print_json(stdout, &b);
    return 0;
}
