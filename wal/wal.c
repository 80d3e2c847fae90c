/*
 * wal.c - ARQ's write-ahead log on LMDB: environment, group commit writer,
 * reads, cursors, dedup, retention.
 *
 * On-disk layout (see wal_record.c for value layouts, docs/wal-format.md):
 *
 *   one LMDB environment (data.mdb, lock.mdb) in the data directory, with
 *   named databases:
 *     meta     "format_version" -> u32 LE; "next_seq" -> u64 LE;
 *              "created_us" -> u64 LE
 *     log      seq (u64 BE) -> message record
 *     index    stream id (u32 BE), offset (u64 BE) -> seq (u64 BE)
 *     streams  stream name -> stream metadata (id, epoch, first/next offset)
 *     ids      stream id (u32 BE) -> stream name
 *     cursors  u8 len, session, stream id (u32 BE) -> cursor value
 *     dedup    u8 len, producer, msgid -> dedup value
 *     sessions session id -> session value
 *   and <dir>/journal, a redo log in front of LMDB (wal_journal.h).
 *
 * Durability. Every write happens on the writer thread. A batch is written
 * into an LMDB child transaction of `outer` while its LMDB writes are
 * recorded as one journal entry; the entry is appended and fdatasynced (one
 * sequential flush: the batch's durable point, where requests marked
 * wal_append_when_durable complete), then the child commits into `outer`.
 * `outer` is committed (folded) every apply_us or after apply_idle_us idle:
 * mdb_txn_commit() returns only after the data pages and then the meta page
 * were fsynced (LMDB's two flushes); the other requests complete then, and
 * the journal restarts at offset 0. wal_open folds in whatever entries LMDB
 * lacks (journal_recover). Without a journal every batch is `outer` alone,
 * committed at once. Nothing is acknowledged before it is durable. A commit that fails with
 * anything but "no space" makes the WAL fail-stop: after an fsync error the
 * kernel may have dropped the dirty pages, so a retry could report success
 * for data that is not on disk (the PostgreSQL "fsyncgate" lesson). No
 * space (ENOSPC/EDQUOT, or the map at its configured maximum) fails only
 * the batch: LMDB had not yet written the meta page, so the last committed
 * state is intact and the next commit may succeed once space returns.
 *
 * Group commit. Submitters append requests to a queue under `mu`; the
 * writer takes every queued request (up to batch_max_msgs/bytes), writes
 * them in one transaction, commits once, then completes them all. Requests
 * that arrive during the commit wait for the next batch.
 *
 * Map size. The map starts at map_size and doubles (up to map_size_max)
 * when a transaction hits MDB_MAP_FULL; the batch is then retried from the
 * start. mdb_env_set_mapsize() needs every transaction of this process
 * closed, so readers hold `map_lock` (shared) for their short transactions
 * and the writer takes it exclusively to resize. Another process that grew
 * the map makes our read txns fail with MDB_MAP_RESIZED; we adopt the new
 * size (mdb_env_set_mapsize(env, 0)) under the same lock and retry.
 */
#include "wal.h"

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "wal_journal.h"
#include "wal_record.h"
#include "wal_testing.h"

#define DEF_MAP_SIZE     (64ull << 20)
#define DEF_MAP_MAX      (16ull << 30)
#define DEF_BATCH_MSGS   8192u
#define DEF_BATCH_BYTES  (32ull << 20)
#define DEF_RETAIN_CHUNK 20000u
#define DEF_MAX_READERS  512u
#define DEF_MAX_RECORD   (64ull << 20)
#define DEF_JOURNAL_MAX  (64ull << 20)
#define DEF_APPLY_US     10000u
#define DEF_APPLY_IDLE   1000u
#define JOURNAL_CHUNK    (1ull << 20) /* the file grows by zero-filled chunks */

/* ---- requests ---------------------------------------------------------- */

struct pmsg {
    size_t stream, producer, msgid, headers, payload; /* offsets into buf */
    uint32_t stream_len, producer_len, msgid_len, headers_len;
    uint64_t payload_len;
    uint8_t direction;
    int64_t timestamp_us;
};

/* A small keyed write of a request: a cursor or session put/delete. */
enum pc_kind { PC_CURSOR_PUT = 0, PC_CURSOR_DEL, PC_SESSION_PUT, PC_SESSION_DEL };

struct pcursor {
    size_t session, stream; /* offsets into buf (PC_SESSION_PUT: stream = the encoded value) */
    uint32_t session_len, stream_len;
    uint64_t offset;
    uint8_t kind;
};

struct wal_append {
    wal_append_cb cb;
    void *arg;
    int status;
    bool direct;       /* complete on the writer thread even when a base is set */
    bool when_durable; /* complete once journaled, before LMDB readers see it */
    struct pmsg *msgs;
    size_t n_msgs, cap_msgs;
    wal_result_t *results;
    struct pcursor *cursors;
    size_t n_cursors, cap_cursors;
    uint8_t *buf;
    size_t buf_len, buf_cap;
    uint64_t max_payload;
    int64_t taken_us, done_us; /* CLOCK_MONOTONIC: batch taken, completed */
    struct wal_append *next;
    /* Inline room for the common request (one small message): no
     * allocation besides the request itself. */
    struct pmsg inline_msg;
    wal_result_t inline_res;
    uint8_t inline_buf[448];
};

/* ---- writer-private stream heads ---------------------------------------- */

struct head {
    char *name;
    uint32_t name_len;
    uint64_t hash;
    bool committed;            /* false: created by a batch that has not committed */
    uint32_t gen;              /* batch generation that last touched it */
    wal_stream_meta_t meta;    /* committed state */
    wal_stream_meta_t pending; /* state inside the current batch */
};

struct retain_job {
    uint64_t upto;
    uint64_t dropped;
    uint32_t chunk;
    int status;
    bool done;
};

struct wal {
    MDB_env *env;
    MDB_dbi dbi_meta, dbi_log, dbi_index, dbi_streams, dbi_ids, dbi_cursors, dbi_dedup,
        dbi_sessions;
    wal_options_t opts;
    char *dir;
    bool read_only;
    bool no_sessions; /* read-only and the WAL has no sessions DB yet */
    pthread_rwlock_t map_lock;

    /* queue, shared with submitters */
    pthread_mutex_t mu;
    pthread_cond_t cond;      /* writer waits for work */
    pthread_cond_t done_cond; /* retention waiters */
    wal_append_t *q_head, *q_tail;
    struct retain_job *retain;
    bool closing;
    bool writer_busy; /* the writer is working on a batch or a retention chunk */
    bool restoring;   /* a wal_restore_* call holds the writer's place */
    int failed;       /* atomic: fail-stop */
    int fault_err;
    unsigned fault_count;
    pthread_t writer;
    bool writer_started;

    /* completions for the event loop */
    struct event_base *base;
    struct event *done_ev;
    pthread_mutex_t done_mu;
    wal_append_t *done_head, *done_tail;

    /* writer-private state */
    struct head **slots; /* open addressing by name hash */
    size_t slots_cap, n_heads;
    struct head **by_id; /* index: stream id -> head */
    size_t by_id_cap;
    uint32_t next_stream_id;
    uint64_t next_seq;
    uint32_t gen;
    struct head **touched;
    size_t n_touched, cap_touched;
    uint64_t map_size;
    uint64_t page_size;

    /* journal (docs/wal-format.md, "Journal"): writer-private after open */
    int jfd;        /* -1: no journal: every batch commits LMDB itself */
    uint64_t jfile; /* bytes of the file that exist (zero-filled past the entries) */
    uint64_t joff;  /* where the next entry goes */
    uint64_t jseq;  /* the next entry's sequence number */
    uint8_t *jbuf;  /* room for the header, then the ops of the batch */
    size_t jbuf_len, jbuf_cap;
    bool jrec;      /* record LMDB writes into jbuf */
    MDB_txn *outer; /* LMDB txn holding journaled batches, not yet committed */
    int64_t outer_t0;
    uint32_t outer_batches;
    wal_append_t *wait_head, *wait_tail; /* complete when outer commits */
    int visible_pending;                 /* atomic: an LMDB commit made records readable */
    void (*visible_cb)(void *arg);
    void *visible_arg;

    /* statistics (atomics) */
    uint64_t st_applies, st_apply_us_sum, st_recovered;
    uint64_t st_acked_next; /* next_seq after the last durable batch (journal included) */
    uint64_t st_commits, st_msgs, st_failed, st_grows;
    uint64_t st_commit_us[WAL_HIST_BUCKETS], st_commit_us_sum, st_batch[WAL_HIST_BUCKETS];
};

const uint64_t wal_commit_us_bounds[WAL_HIST_BUCKETS - 1] = {
    100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 1000000};
const uint64_t wal_batch_bounds[WAL_HIST_BUCKETS - 1] = {1,   2,    4,    8,    16,   64,
                                                         256, 1024, 4096, 8192, 65536};

static void hist_add(uint64_t *buckets, const uint64_t *bounds, uint64_t v)
{
    size_t i = 0;
    while (i < WAL_HIST_BUCKETS - 1 && v > bounds[i])
        i++;
    __atomic_add_fetch(&buckets[i], 1, __ATOMIC_RELAXED);
}

static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

const char *wal_strerror(int err)
{
    switch (err) {
    case WAL_OK:
        return "success";
    case WAL_EINVAL:
        return "invalid argument";
    case WAL_ENOMEM:
        return "out of memory";
    case WAL_ENOTFOUND:
        return "not found";
    case WAL_ECORRUPT:
        return "corrupt record (checksum or layout mismatch)";
    case WAL_EVERSION:
        return "data written by a newer format version";
    case WAL_EFULL:
        return "storage full";
    case WAL_EFATAL:
        return "wal stopped after a write/fsync error";
    case WAL_EIO:
        return "i/o error";
    case WAL_ECLOSED:
        return "wal closed or read-only";
    case WAL_ETRUNCATED:
        return "offset dropped by retention";
    case WAL_ELMDB:
        return "lmdb error";
    case WAL_EBUSY:
        return "environment busy (locked or out of reader slots)";
    default:
        return "unknown error";
    }
}

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Translate an LMDB / errno code at the module edge. */
static int map_mdb(int rc)
{
    switch (rc) {
    case 0:
        return 0;
    case MDB_NOTFOUND:
        return WAL_ENOTFOUND;
    case MDB_MAP_FULL:
    case ENOSPC:
    case EDQUOT:
        return WAL_EFULL;
    case MDB_READERS_FULL:
    case EAGAIN:
    case EBUSY:
        return WAL_EBUSY;
    case MDB_CORRUPTED:
    case MDB_PAGE_NOTFOUND:
        return WAL_ECORRUPT;
    case ENOMEM:
        return WAL_ENOMEM;
    case MDB_VERSION_MISMATCH:
    case MDB_INVALID:
        return WAL_ELMDB;
    case EIO:
        return WAL_EIO;
    default:
        return rc > 0 ? WAL_EIO : WAL_ELMDB;
    }
}

__attribute__((format(printf, 3, 4))) static void errf(char *buf, size_t len, const char *fmt, ...)
{
    if (!buf || !len)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
}

/* ---- read transactions --------------------------------------------------- */

static int rtxn_begin(wal_t *wal, MDB_txn **txn)
{
    for (;;) {
        pthread_rwlock_rdlock(&wal->map_lock);
        int rc = mdb_txn_begin(wal->env, NULL, MDB_RDONLY, txn);
        if (rc == 0)
            return 0;
        pthread_rwlock_unlock(&wal->map_lock);
        if (rc != MDB_MAP_RESIZED)
            return map_mdb(rc);
        /* Another process grew the map: adopt its size, then retry. */
        pthread_rwlock_wrlock(&wal->map_lock);
        rc = mdb_env_set_mapsize(wal->env, 0);
        pthread_rwlock_unlock(&wal->map_lock);
        if (rc)
            return map_mdb(rc);
    }
}

static void rtxn_end(wal_t *wal, MDB_txn *txn)
{
    mdb_txn_abort(txn);
    pthread_rwlock_unlock(&wal->map_lock);
}

/* A read transaction with a cursor on dbi; end both with rtxn_cursor_end. */
static int rtxn_cursor(wal_t *wal, MDB_dbi dbi, MDB_txn **txn, MDB_cursor **cur)
{
    int rc = rtxn_begin(wal, txn);
    if (rc)
        return rc;
    rc = mdb_cursor_open(*txn, dbi, cur);
    if (rc) {
        rtxn_end(wal, *txn);
        return map_mdb(rc);
    }
    return 0;
}

static void rtxn_cursor_end(wal_t *wal, MDB_txn *txn, MDB_cursor *cur)
{
    mdb_cursor_close(cur);
    rtxn_end(wal, txn);
}

/* ---- heads ------------------------------------------------------------- */

static uint64_t name_hash(const char *name, size_t len)
{
    return (uint64_t)XXH3_64bits(name, len);
}

static struct head *head_find(wal_t *wal, const char *name, size_t len, uint64_t h)
{
    if (!wal->slots_cap)
        return NULL;
    size_t mask = wal->slots_cap - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        struct head *e = wal->slots[i];
        if (!e)
            return NULL;
        if (e->hash == h && e->name_len == len && memcmp(e->name, name, len) == 0)
            return e;
    }
}

static int heads_grow(wal_t *wal)
{
    size_t ncap = wal->slots_cap ? wal->slots_cap * 2 : 64;
    struct head **ns = calloc(ncap, sizeof(*ns));
    if (!ns)
        return WAL_ENOMEM;
    for (size_t i = 0; i < wal->slots_cap; i++) {
        struct head *e = wal->slots[i];
        if (!e)
            continue;
        size_t j = e->hash & (ncap - 1);
        while (ns[j])
            j = (j + 1) & (ncap - 1);
        ns[j] = e;
    }
    free(wal->slots);
    wal->slots = ns;
    wal->slots_cap = ncap;
    return 0;
}

static int head_set_id(wal_t *wal, struct head *e)
{
    uint32_t id = e->pending.id;
    if (id >= wal->by_id_cap) {
        size_t ncap = wal->by_id_cap ? wal->by_id_cap : 64;
        while (ncap <= id)
            ncap *= 2;
        struct head **nb = realloc(wal->by_id, ncap * sizeof(*nb));
        if (!nb)
            return WAL_ENOMEM;
        memset(nb + wal->by_id_cap, 0, (ncap - wal->by_id_cap) * sizeof(*nb));
        wal->by_id = nb;
        wal->by_id_cap = ncap;
    }
    wal->by_id[id] = e;
    return 0;
}

/* Insert a new head (not yet committed). */
static int head_insert(wal_t *wal, const char *name, size_t len, uint64_t h, struct head **ret)
{
    if ((wal->n_heads + 1) * 4 > wal->slots_cap * 3) {
        int rc = heads_grow(wal);
        if (rc)
            return rc;
    }
    struct head *e = calloc(1, sizeof(*e));
    if (!e)
        return WAL_ENOMEM;
    e->name = malloc(len);
    if (!e->name) {
        free(e);
        return WAL_ENOMEM;
    }
    memcpy(e->name, name, len);
    e->name_len = (uint32_t)len;
    e->hash = h;
    size_t mask = wal->slots_cap - 1;
    size_t i = h & mask;
    while (wal->slots[i])
        i = (i + 1) & mask;
    wal->slots[i] = e;
    wal->n_heads++;
    *ret = e;
    return 0;
}

static void heads_free(wal_t *wal)
{
    for (size_t i = 0; i < wal->slots_cap; i++) {
        if (wal->slots[i]) {
            free(wal->slots[i]->name);
            free(wal->slots[i]);
        }
    }
    free(wal->slots);
    free(wal->by_id);
    free(wal->touched);
}

static uint64_t random_epoch(void)
{
    uint64_t v = 0;
    while (v == 0) {
        if (getrandom(&v, sizeof(v), 0) != (ssize_t)sizeof(v))
            v = (uint64_t)now_us() ^ ((uint64_t)rand() << 32);
    }
    return v;
}

/* Mark a head as part of the current batch (snapshot its committed state). */
static int head_touch(wal_t *wal, struct head *e)
{
    if (e->gen == wal->gen)
        return 0;
    if (wal->n_touched == wal->cap_touched) {
        size_t ncap = wal->cap_touched ? wal->cap_touched * 2 : 64;
        struct head **nt = realloc(wal->touched, ncap * sizeof(*nt));
        if (!nt)
            return WAL_ENOMEM;
        wal->touched = nt;
        wal->cap_touched = ncap;
    }
    wal->touched[wal->n_touched++] = e;
    e->gen = wal->gen;
    e->pending = e->meta;
    return 0;
}

/* The head for a stream inside the current batch, created if needed. */
static int head_for_write(wal_t *wal, const char *name, size_t len, int64_t now, struct head **ret)
{
    uint64_t h = name_hash(name, len);
    struct head *e = head_find(wal, name, len, h);
    int rc;
    if (!e) {
        rc = head_insert(wal, name, len, h, &e);
        if (rc)
            return rc;
    }
    if (e->gen != wal->gen) {
        rc = head_touch(wal, e);
        if (rc)
            return rc;
        if (!e->committed) {
            /* New stream (or one whose creating batch failed: start over). */
            e->pending.id = wal->next_stream_id++;
            e->pending.epoch = random_epoch();
            e->pending.first_offset = 1;
            e->pending.next_offset = 1;
            e->pending.created_us = now;
            rc = head_set_id(wal, e);
            if (rc)
                return rc;
        }
    }
    *ret = e;
    return 0;
}

/* ---- append requests --------------------------------------------------- */

/* Freed requests kept for reuse (a publish allocates one, and its inline
 * room is what most publishes need): process-wide, so that requests freed
 * on another thread than the one that made them come back too. */
#define REQ_CACHE_MAX 256
static pthread_mutex_t req_cache_mu = PTHREAD_MUTEX_INITIALIZER;
static wal_append_t *req_cache;
static unsigned req_cached;

int wal_append_new(wal_append_cb cb, void *arg, wal_append_t **ret_req)
{
    pthread_mutex_lock(&req_cache_mu);
    wal_append_t *r = req_cache;
    if (r) {
        req_cache = r->next;
        req_cached--;
    }
    pthread_mutex_unlock(&req_cache_mu);
    if (r)
        memset(r, 0, offsetof(wal_append_t, inline_buf));
    else
        r = calloc(1, sizeof(*r));
    if (!r)
        return WAL_ENOMEM;
    r->cb = cb;
    r->arg = arg;
    *ret_req = r;
    return 0;
}

void wal_append_times(const wal_append_t *req, int64_t *ret_taken_us, int64_t *ret_done_us)
{
    *ret_taken_us = req->taken_us;
    *ret_done_us = req->done_us;
}

void wal_append_free(wal_append_t *req)
{
    if (!req)
        return;
    if (req->msgs != &req->inline_msg)
        free(req->msgs);
    if (req->results != &req->inline_res)
        free(req->results);
    free(req->cursors);
    if (req->buf != req->inline_buf)
        free(req->buf);
    pthread_mutex_lock(&req_cache_mu);
    if (req_cached < REQ_CACHE_MAX) {
        req->next = req_cache;
        req_cache = req;
        req_cached++;
        req = NULL;
    }
    pthread_mutex_unlock(&req_cache_mu);
    free(req);
}

/* Make room for `len` more bytes in the request's copy buffer. */
static int req_grow_buf(wal_append_t *r, size_t len)
{
    if (r->buf_cap - r->buf_len >= len)
        return 0;
    if (!r->buf && len <= sizeof(r->inline_buf)) {
        r->buf = r->inline_buf;
        r->buf_cap = sizeof(r->inline_buf);
        return 0;
    }
    size_t ncap = r->buf_cap ? r->buf_cap : 256;
    while (ncap - r->buf_len < len) {
        if (ncap > SIZE_MAX / 2)
            return WAL_ENOMEM;
        ncap *= 2;
    }
    uint8_t *nb;
    if (r->buf == r->inline_buf) {
        nb = malloc(ncap);
        if (nb)
            memcpy(nb, r->inline_buf, r->buf_len);
    } else {
        nb = realloc(r->buf, ncap);
    }
    if (!nb)
        return WAL_ENOMEM;
    r->buf = nb;
    r->buf_cap = ncap;
    return 0;
}

/* Make room for `n` more messages. */
static int req_grow_msgs(wal_append_t *r, size_t n)
{
    if (r->cap_msgs - r->n_msgs >= n)
        return 0;
    if (r->cap_msgs == 0 && n == 1) {
        r->msgs = &r->inline_msg;
        r->results = &r->inline_res;
        r->cap_msgs = 1;
        return 0;
    }
    size_t ncap = r->cap_msgs ? r->cap_msgs : 4;
    while (ncap - r->n_msgs < n) {
        if (ncap > SIZE_MAX / (2 * sizeof(struct pmsg)))
            return WAL_ENOMEM;
        ncap *= 2;
    }
    bool was_inline = r->msgs == &r->inline_msg;
    struct pmsg *nm =
        was_inline ? malloc(ncap * sizeof(*nm)) : realloc(r->msgs, ncap * sizeof(*nm));
    if (!nm)
        return WAL_ENOMEM;
    if (was_inline)
        memcpy(nm, r->msgs, r->n_msgs * sizeof(*nm));
    r->msgs = nm;
    wal_result_t *nr =
        was_inline ? malloc(ncap * sizeof(*nr)) : realloc(r->results, ncap * sizeof(*nr));
    if (!nr) {
        if (was_inline) { /* keep the request consistent: back to inline */
            free(nm);
            r->msgs = &r->inline_msg;
        }
        return WAL_ENOMEM;
    }
    if (was_inline)
        memcpy(nr, r->results, r->n_msgs * sizeof(*nr));
    r->results = nr;
    r->cap_msgs = ncap;
    return 0;
}

int wal_append_reserve(wal_append_t *r, size_t n_msgs, size_t bytes)
{
    int rc = req_grow_msgs(r, n_msgs);
    return rc ? rc : req_grow_buf(r, bytes);
}

static int req_copy(wal_append_t *r, const void *p, size_t len, size_t *ret_off)
{
    int rc = req_grow_buf(r, len);
    if (rc)
        return rc;
    *ret_off = r->buf_len;
    if (len)
        memcpy(r->buf + r->buf_len, p, len);
    r->buf_len += len;
    return 0;
}

int wal_append_add_msg(wal_append_t *r, const wal_msg_t *m)
{
    if (!m->stream || m->stream_len == 0 || m->stream_len > WAL_STREAM_NAME_MAX ||
        m->producer_len > WAL_PRODUCER_MAX || m->msgid_len > WAL_MSGID_MAX ||
        m->headers_len > WAL_HEADERS_MAX || m->payload_len > UINT32_MAX ||
        (m->payload_len && !m->payload) || (m->producer_len && !m->producer) ||
        (m->msgid_len && !m->msgid) || (m->headers_len && !m->headers) ||
        (m->direction != WAL_DIR_IN && m->direction != WAL_DIR_OUT))
        return WAL_EINVAL;
    int grc = req_grow_msgs(r, 1);
    if (grc)
        return grc;
    struct pmsg pm = {0};
    size_t mark = r->buf_len;
    int rc = req_copy(r, m->stream, m->stream_len, &pm.stream);
    if (!rc)
        rc = req_copy(r, m->producer, m->producer_len, &pm.producer);
    if (!rc)
        rc = req_copy(r, m->msgid, m->msgid_len, &pm.msgid);
    if (!rc)
        rc = req_copy(r, m->headers, m->headers_len, &pm.headers);
    if (!rc)
        rc = req_copy(r, m->payload, m->payload_len, &pm.payload);
    if (rc) {
        r->buf_len = mark;
        return rc;
    }
    pm.stream_len = (uint32_t)m->stream_len;
    pm.producer_len = (uint32_t)m->producer_len;
    pm.msgid_len = (uint32_t)m->msgid_len;
    pm.headers_len = (uint32_t)m->headers_len;
    pm.payload_len = m->payload_len;
    pm.direction = (uint8_t)m->direction;
    pm.timestamp_us = m->timestamp_us;
    if (m->payload_len > r->max_payload)
        r->max_payload = m->payload_len;
    memset(&r->results[r->n_msgs], 0, sizeof(r->results[0]));
    r->msgs[r->n_msgs++] = pm;
    return 0;
}

static int req_add_keyed(wal_append_t *r, enum pc_kind kind, const void *session,
                         size_t session_len, const void *data, size_t data_len, uint64_t offset)
{
    if (r->n_cursors == r->cap_cursors) {
        size_t ncap = r->cap_cursors ? r->cap_cursors * 2 : 4;
        struct pcursor *nc = realloc(r->cursors, ncap * sizeof(*nc));
        if (!nc)
            return WAL_ENOMEM;
        r->cursors = nc;
        r->cap_cursors = ncap;
    }
    struct pcursor pc = {0};
    size_t mark = r->buf_len;
    int rc = req_copy(r, session, session_len, &pc.session);
    if (!rc)
        rc = req_copy(r, data, data_len, &pc.stream);
    if (rc) {
        r->buf_len = mark;
        return rc;
    }
    pc.session_len = (uint32_t)session_len;
    pc.stream_len = (uint32_t)data_len;
    pc.offset = offset;
    pc.kind = (uint8_t)kind;
    r->cursors[r->n_cursors++] = pc;
    return 0;
}

static bool session_ok(const void *session, size_t session_len)
{
    return session && session_len > 0 && session_len <= WAL_SESSION_MAX;
}

static bool stream_ok(const char *stream, size_t stream_len)
{
    return stream && stream_len > 0 && stream_len <= WAL_STREAM_NAME_MAX;
}

int wal_append_add_cursor(wal_append_t *r, const void *session, size_t session_len,
                          const char *stream, size_t stream_len, uint64_t offset)
{
    if (!session_ok(session, session_len) || !stream_ok(stream, stream_len))
        return WAL_EINVAL;
    return req_add_keyed(r, PC_CURSOR_PUT, session, session_len, stream, stream_len, offset);
}

int wal_append_del_cursor(wal_append_t *r, const void *session, size_t session_len,
                          const char *stream, size_t stream_len)
{
    if (!session_ok(session, session_len) || !stream_ok(stream, stream_len))
        return WAL_EINVAL;
    return req_add_keyed(r, PC_CURSOR_DEL, session, session_len, stream, stream_len, 0);
}

int wal_append_put_session(wal_append_t *r, const void *session, size_t session_len,
                           const wal_session_t *s)
{
    if (!session_ok(session, session_len) || !s || s->secret_len > WAL_SECRET_MAX)
        return WAL_EINVAL;
    uint8_t val[WAL_SESSION_VAL_MIN + WAL_PRODUCER_MAX + WAL_SECRET_MAX];
    wal_session_val_encode(s, val);
    return req_add_keyed(r, PC_SESSION_PUT, session, session_len, val, wal_session_val_size(s), 0);
}

int wal_append_del_session(wal_append_t *r, const void *session, size_t session_len)
{
    if (!session_ok(session, session_len))
        return WAL_EINVAL;
    return req_add_keyed(r, PC_SESSION_DEL, session, session_len, NULL, 0, 0);
}

void wal_on_visible(wal_t *wal, void (*cb)(void *arg), void *arg)
{
    wal->visible_cb = cb;
    wal->visible_arg = arg;
}

void wal_append_when_durable(wal_append_t *req)
{
    req->when_durable = true;
}

int wal_append_status(const wal_append_t *req)
{
    return req->status;
}

size_t wal_append_count(const wal_append_t *req)
{
    return req->n_msgs;
}

const wal_result_t *wal_append_result(const wal_append_t *req, size_t i)
{
    return i < req->n_msgs ? &req->results[i] : NULL;
}

int wal_append_msg_data(const wal_append_t *req, size_t i, const uint8_t **ret_headers,
                        size_t *ret_headers_len, const uint8_t **ret_payload,
                        size_t *ret_payload_len)
{
    if (i >= req->n_msgs)
        return WAL_EINVAL;
    const struct pmsg *pm = &req->msgs[i];
    *ret_headers = req->buf + pm->headers;
    *ret_headers_len = pm->headers_len;
    *ret_payload = req->buf + pm->payload;
    *ret_payload_len = pm->payload_len;
    return 0;
}

int wal_append_submit(wal_t *wal, wal_append_t *req)
{
    if (req->n_msgs == 0 && req->n_cursors == 0)
        return WAL_EINVAL;
    if (req->max_payload > wal->opts.max_record_bytes)
        return WAL_EINVAL;
    if (wal->read_only)
        return WAL_ECLOSED;
    pthread_mutex_lock(&wal->mu);
    int rc = 0;
    if (__atomic_load_n(&wal->failed, __ATOMIC_ACQUIRE))
        rc = WAL_EFATAL;
    else if (wal->closing)
        rc = WAL_ECLOSED;
    else if (wal->restoring)
        rc = WAL_EBUSY;
    if (!rc) {
        req->status = 0;
        req->next = NULL;
        if (wal->q_tail)
            wal->q_tail->next = req;
        else
            wal->q_head = req;
        wal->q_tail = req;
        pthread_cond_signal(&wal->cond);
    }
    pthread_mutex_unlock(&wal->mu);
    return rc;
}

/* ---- completion -------------------------------------------------------- */

static void done_run(wal_t *wal)
{
    pthread_mutex_lock(&wal->done_mu);
    wal_append_t *list = wal->done_head;
    wal->done_head = wal->done_tail = NULL;
    pthread_mutex_unlock(&wal->done_mu);
    while (list) {
        wal_append_t *next = list->next;
        list->next = NULL;
        list->cb(list, list->arg);
        list = next;
    }
}

static void done_ev_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    wal_t *wal = arg;
    done_run(wal);
    if (__atomic_exchange_n(&wal->visible_pending, 0, __ATOMIC_ACQ_REL) && wal->visible_cb)
        wal->visible_cb(wal->visible_arg);
}

/* An LMDB commit made records readable: tell the loop (opts.visible_cb). */
static void notify_visible(wal_t *wal)
{
    if (!wal->base || !wal->visible_cb)
        return;
    __atomic_store_n(&wal->visible_pending, 1, __ATOMIC_RELEASE);
    event_active(wal->done_ev, EV_READ, 0);
}

/* Complete a linked list of requests (status: set on each, or 0 to keep
 * theirs) with one lock and one wake-up of the loop. */
static void complete_list(wal_t *wal, wal_append_t *list, int status)
{
    wal_append_t *head = NULL, *tail = NULL;
    int64_t t = list ? mono_us() : 0;
    while (list) {
        wal_append_t *r = list, *next = list->next;
        list = next;
        if (status)
            r->status = status;
        r->done_us = t;
        r->next = NULL;
        if (r->direct || !wal->base) {
            r->cb(r, r->arg);
            continue;
        }
        if (tail)
            tail->next = r;
        else
            head = r;
        tail = r;
    }
    if (!head)
        return;
    pthread_mutex_lock(&wal->done_mu);
    if (wal->done_tail)
        wal->done_tail->next = head;
    else
        wal->done_head = head;
    wal->done_tail = tail;
    pthread_mutex_unlock(&wal->done_mu);
    event_active(wal->done_ev, EV_READ, 0);
}

static void complete(wal_t *wal, wal_append_t *r, int status)
{
    r->status = status;
    r->next = NULL;
    complete_list(wal, r, 0);
}

/*
 * Complete a whole batch with one lock and one wake-up of the loop: per
 * request, event_active() costs a futex wake and an eventfd write on the
 * writer thread, between commits. own_status: each keeps its r->status.
 */
static void complete_batch(wal_t *wal, wal_append_t **reqs, size_t n, bool own_status, int status)
{
    wal_append_t *head = NULL, **tail = &head;
    for (size_t q = 0; q < n; q++) {
        if (!own_status)
            reqs[q]->status = status;
        *tail = reqs[q];
        tail = &reqs[q]->next;
    }
    *tail = NULL;
    complete_list(wal, head, 0);
}

/* ---- the writer -------------------------------------------------------- */

static void put_meta_u64(uint8_t *buf, uint64_t v)
{
    wal_put_le64(buf, v);
}

/*
 * Headroom above map_size_max that only retention may use: on a map that
 * is completely full LMDB cannot even delete (copy-on-write needs free
 * pages), so without it "storage full" could never be cleared by trimming.
 */
static uint64_t map_reserve(const wal_t *wal)
{
    uint64_t r = wal->opts.map_size_max / 32;
    if (r < (2ull << 20))
        r = 2ull << 20;
    if (r > (256ull << 20))
        r = 256ull << 20;
    return r;
}

static int map_set(wal_t *wal, uint64_t size)
{
    pthread_rwlock_wrlock(&wal->map_lock);
    int rc = mdb_env_set_mapsize(wal->env, (size_t)size);
    MDB_envinfo info;
    mdb_env_info(wal->env, &info);
    wal->map_size = info.me_mapsize; /* LMDB never goes below the data in use */
    pthread_rwlock_unlock(&wal->map_lock);
    return rc ? map_mdb(rc) : 0;
}

/* Grow the map after MDB_MAP_FULL, up to map_size_max for appends or into
 * the reserve for retention. Returns 0 if it grew. */
static int map_grow(wal_t *wal, bool for_retention)
{
    uint64_t limit = wal->opts.map_size_max + (for_retention ? map_reserve(wal) : 0);
    if (wal->map_size >= limit)
        return WAL_EFULL;
    uint64_t nsize = wal->map_size * 2;
    if (nsize > limit)
        nsize = limit;
    int rc = map_set(wal, nsize);
    if (rc)
        return rc;
    __atomic_add_fetch(&wal->st_grows, 1, __ATOMIC_RELAXED);
    return 0;
}

/*
 * Pages in use in txn's snapshot: every B-tree (ours, LMDB's main and free
 * DBs) plus the two meta pages; pages on the freelist do not count. Needed
 * once retention has pushed the map above map_size_max: the map cannot
 * shrink below its high-water mark, so LMDB alone would let appends fill
 * the reserve.
 */
static uint64_t pages_in_use(wal_t *wal, MDB_txn *txn)
{
    MDB_dbi dbis[] = {0,
                      1,
                      wal->dbi_meta,
                      wal->dbi_log,
                      wal->dbi_index,
                      wal->dbi_streams,
                      wal->dbi_ids,
                      wal->dbi_cursors,
                      wal->dbi_dedup,
                      wal->no_sessions ? wal->dbi_dedup : wal->dbi_sessions};
    uint64_t pages = 2;
    for (size_t i = 0; i < sizeof(dbis) / sizeof(dbis[0]); i++) {
        MDB_stat st;
        if (mdb_stat(txn, dbis[i], &st) == 0)
            pages += st.ms_branch_pages + st.ms_leaf_pages + st.ms_overflow_pages;
    }
    return pages;
}

/* Commit (or the injected fault). Returns an LMDB/errno code. */
static int fault_take(wal_t *wal);

static int txn_commit(wal_t *wal, MDB_txn *txn)
{
    int fault = fault_take(wal);
    if (fault) {
        mdb_txn_abort(txn);
        return fault;
    }
    return mdb_txn_commit(txn);
}

static void batch_rollback(wal_t *wal, uint64_t saved_seq, uint32_t saved_id)
{
    wal->next_seq = saved_seq;
    wal->next_stream_id = saved_id;
    for (size_t i = 0; i < wal->n_touched; i++) {
        struct head *e = wal->touched[i];
        if (!e->committed && e->pending.id < wal->by_id_cap && wal->by_id[e->pending.id] == e)
            wal->by_id[e->pending.id] = NULL;
        e->gen = 0;
    }
    wal->n_touched = 0;
}

static void batch_apply(wal_t *wal)
{
    for (size_t i = 0; i < wal->n_touched; i++) {
        struct head *e = wal->touched[i];
        e->meta = e->pending;
        e->committed = true;
    }
    wal->n_touched = 0;
}

/* ---- journal recording --------------------------------------------------- */

static uint8_t jdb_code(const wal_t *wal, MDB_dbi dbi)
{
    if (dbi == wal->dbi_meta)
        return WAL_JDB_META;
    if (dbi == wal->dbi_log)
        return WAL_JDB_LOG;
    if (dbi == wal->dbi_index)
        return WAL_JDB_INDEX;
    if (dbi == wal->dbi_streams)
        return WAL_JDB_STREAMS;
    if (dbi == wal->dbi_ids)
        return WAL_JDB_IDS;
    if (dbi == wal->dbi_cursors)
        return WAL_JDB_CURSORS;
    if (dbi == wal->dbi_dedup)
        return WAL_JDB_DEDUP;
    return WAL_JDB_SESSIONS;
}

static MDB_dbi jdb_dbi(const wal_t *wal, uint8_t db)
{
    switch (db) {
    case WAL_JDB_META:
        return wal->dbi_meta;
    case WAL_JDB_LOG:
        return wal->dbi_log;
    case WAL_JDB_INDEX:
        return wal->dbi_index;
    case WAL_JDB_STREAMS:
        return wal->dbi_streams;
    case WAL_JDB_IDS:
        return wal->dbi_ids;
    case WAL_JDB_CURSORS:
        return wal->dbi_cursors;
    case WAL_JDB_DEDUP:
        return wal->dbi_dedup;
    default:
        return wal->dbi_sessions;
    }
}

static int jbuf_reserve(wal_t *wal, size_t need)
{
    if (wal->jbuf_len + need <= wal->jbuf_cap)
        return 0;
    size_t ncap = wal->jbuf_cap ? wal->jbuf_cap * 2 : 65536;
    while (ncap < wal->jbuf_len + need)
        ncap *= 2;
    uint8_t *nb = realloc(wal->jbuf, ncap);
    if (!nb)
        return ENOMEM;
    wal->jbuf = nb;
    wal->jbuf_cap = ncap;
    return 0;
}

/* While a batch is written for the journal, note one LMDB write. */
static int jrec_op(wal_t *wal, uint8_t kind, MDB_dbi dbi, const void *key, size_t klen,
                   const void *val, size_t vlen)
{
    if (!wal->jrec)
        return 0;
    size_t need = wal_jop_size((uint32_t)klen, (uint32_t)vlen);
    if (jbuf_reserve(wal, need))
        return ENOMEM;
    wal_jop_encode(wal->jbuf + wal->jbuf_len, kind, jdb_code(wal, dbi), key, (uint32_t)klen, val,
                   (uint32_t)vlen);
    wal->jbuf_len += need;
    return 0;
}

static int jput(wal_t *wal, MDB_txn *txn, MDB_dbi dbi, MDB_val *k, MDB_val *v)
{
    int rc = mdb_put(txn, dbi, k, v, 0);
    return rc ? rc : jrec_op(wal, WAL_JOP_PUT, dbi, k->mv_data, k->mv_size, v->mv_data, v->mv_size);
}

/* Delete a key; MDB_NOTFOUND (nothing to note) is returned as is. */
static int jdel(wal_t *wal, MDB_txn *txn, MDB_dbi dbi, MDB_val *k)
{
    int rc = mdb_del(txn, dbi, k, NULL);
    return rc ? rc : jrec_op(wal, WAL_JOP_DEL, dbi, k->mv_data, k->mv_size, NULL, 0);
}

static int write_heads(wal_t *wal, MDB_txn *txn)
{
    for (size_t i = 0; i < wal->n_touched; i++) {
        struct head *e = wal->touched[i];
        uint8_t val[WAL_STREAM_META_SIZE];
        wal_stream_meta_encode(&e->pending, val);
        MDB_val k = {e->name_len, e->name}, v = {sizeof(val), val};
        int rc = jput(wal, txn, wal->dbi_streams, &k, &v);
        if (rc)
            return rc;
        if (!e->committed) {
            uint8_t idk[4];
            wal_put_be32(idk, e->pending.id);
            MDB_val ik = {4, idk}, iv = {e->name_len, e->name};
            rc = jput(wal, txn, wal->dbi_ids, &ik, &iv);
            if (rc)
                return rc;
        }
    }
    return 0;
}

static int write_next_seq(wal_t *wal, MDB_txn *txn)
{
    uint8_t buf[8];
    put_meta_u64(buf, wal->next_seq);
    MDB_val k = {8, "next_seq"}, v = {8, buf};
    return jput(wal, txn, wal->dbi_meta, &k, &v);
}

/* Check that every cursor of the request names a stream that exists,
 * exists in this batch, or is created by a message of the request. */
static bool req_cursors_valid(wal_t *wal, const wal_append_t *r)
{
    for (size_t c = 0; c < r->n_cursors; c++) {
        const struct pcursor *pc = &r->cursors[c];
        if (pc->kind != PC_CURSOR_PUT)
            continue;
        const char *name = (const char *)r->buf + pc->stream;
        struct head *e = head_find(wal, name, pc->stream_len, name_hash(name, pc->stream_len));
        if (e && (e->committed || e->gen == wal->gen))
            continue;
        bool found = false;
        for (size_t i = 0; i < r->n_msgs && !found; i++)
            found = r->msgs[i].stream_len == pc->stream_len &&
                    memcmp(r->buf + r->msgs[i].stream, name, pc->stream_len) == 0;
        if (!found)
            return false;
    }
    return true;
}

/* Store one record: the log entry (encoded straight into the page LMDB
 * reserves: no staging copy), its (stream, offset) index entry and, when
 * dkey_len, its dedup entry. log_flags: MDB_APPEND for appends in sequence
 * order, MDB_NOOVERWRITE for restores. */
static int put_record(wal_t *wal, MDB_txn *txn, wal_rec_t *rec, unsigned log_flags,
                      const uint8_t *dkey, size_t dkey_len, int64_t dedup_time_us)
{
    uint8_t seqk[8];
    wal_put_be64(seqk, rec->seq);
    MDB_val k = {8, seqk}, v = {wal_rec_size(rec), NULL};
    int rc = mdb_put(txn, wal->dbi_log, &k, &v, MDB_RESERVE | log_flags);
    if (rc)
        return rc;
    wal_rec_encode(rec, v.mv_data, v.mv_size);
    rc = jrec_op(wal, WAL_JOP_PUT, wal->dbi_log, seqk, 8, v.mv_data, v.mv_size);
    if (rc)
        return rc;

    uint8_t ik[12];
    wal_put_be32(ik, rec->stream_id);
    wal_put_be64(ik + 4, rec->offset);
    MDB_val ikv = {12, ik}, iv = {8, seqk};
    rc = jput(wal, txn, wal->dbi_index, &ikv, &iv);
    if (rc || !dkey_len)
        return rc;
    uint8_t dval[WAL_DEDUP_VAL_SIZE];
    wal_dedup_val_t dv = {
        .stream_id = rec->stream_id, .offset = rec->offset, .time_us = dedup_time_us};
    wal_dedup_val_encode(&dv, dval);
    MDB_val dk = {dkey_len, (void *)dkey}, dvv = {sizeof(dval), dval};
    return jput(wal, txn, wal->dbi_dedup, &dk, &dvv);
}

static int write_msg(wal_t *wal, MDB_txn *txn, wal_append_t *r, size_t i, int64_t now)
{
    const struct pmsg *pm = &r->msgs[i];
    wal_result_t *res = &r->results[i];
    const char *name = (const char *)r->buf + pm->stream;
    uint8_t dkey[1 + WAL_PRODUCER_MAX + WAL_MSGID_MAX];
    size_t dkey_len = 0;
    int rc;

    if (pm->msgid_len) {
        dkey[0] = (uint8_t)pm->producer_len;
        memcpy(dkey + 1, r->buf + pm->producer, pm->producer_len);
        memcpy(dkey + 1 + pm->producer_len, r->buf + pm->msgid, pm->msgid_len);
        dkey_len = 1 + pm->producer_len + pm->msgid_len;
        MDB_val k = {dkey_len, dkey}, v;
        rc = mdb_get(txn, wal->dbi_dedup, &k, &v);
        if (rc == 0) {
            wal_dedup_val_t dv;
            if (wal_dedup_val_decode(v.mv_data, v.mv_size, &dv) == 0) {
                struct head *e = dv.stream_id < wal->by_id_cap ? wal->by_id[dv.stream_id] : NULL;
                res->offset = dv.offset;
                res->seq = 0;
                res->epoch = e ? (e->gen == wal->gen ? e->pending.epoch : e->meta.epoch) : 0;
                res->duplicate = 1;
                return 0;
            }
            /* A corrupt dedup entry must not block publishing: overwrite. */
        } else if (rc != MDB_NOTFOUND) {
            return rc;
        }
    }

    struct head *e;
    rc = head_for_write(wal, name, pm->stream_len, now, &e);
    if (rc)
        return rc == WAL_ENOMEM ? ENOMEM : EINVAL;
    wal_rec_t rec = {
        .flags = pm->direction == WAL_DIR_OUT ? WAL_REC_FLAG_OUT : 0,
        .stream_id = e->pending.id,
        .seq = wal->next_seq,
        .offset = e->pending.next_offset,
        .timestamp_us = pm->timestamp_us ? pm->timestamp_us : now,
        .producer = r->buf + pm->producer,
        .producer_len = (uint16_t)pm->producer_len,
        .msgid = r->buf + pm->msgid,
        .msgid_len = (uint16_t)pm->msgid_len,
        .headers = r->buf + pm->headers,
        .headers_len = (uint16_t)pm->headers_len,
        .payload = r->buf + pm->payload,
        .payload_len = (uint32_t)pm->payload_len,
    };
    rc = put_record(wal, txn, &rec, MDB_APPEND, dkey, dkey_len, now);
    if (rc)
        return rc;
    res->offset = rec.offset;
    res->seq = rec.seq;
    res->epoch = e->pending.epoch;
    res->duplicate = 0;
    e->pending.next_offset++;
    wal->next_seq++;
    return 0;
}

/* Delete every key of dbi that starts with prefix (a session's cursors:
 * keys prefixed by the session's length and id). */
static int del_prefix(MDB_txn *txn, MDB_dbi dbi, const uint8_t *prefix, size_t plen)
{
    MDB_cursor *cur;
    int rc = mdb_cursor_open(txn, dbi, &cur);
    if (rc)
        return rc;
    for (;;) {
        MDB_val k = {plen, (void *)prefix}, v;
        rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
        if (rc || k.mv_size < plen || memcmp(k.mv_data, prefix, plen) != 0)
            break;
        rc = mdb_cursor_del(cur, 0);
        if (rc)
            break;
    }
    mdb_cursor_close(cur);
    return rc == MDB_NOTFOUND ? 0 : rc;
}

static int del_session_cursors(wal_t *wal, MDB_txn *txn, const uint8_t *prefix, size_t plen)
{
    int rc = del_prefix(txn, wal->dbi_cursors, prefix, plen);
    return rc ? rc : jrec_op(wal, WAL_JOP_DEL_PREFIX, wal->dbi_cursors, prefix, plen, NULL, 0);
}

static int write_cursor(wal_t *wal, MDB_txn *txn, wal_append_t *r, size_t c, int64_t now)
{
    const struct pcursor *pc = &r->cursors[c];
    uint8_t key[1 + WAL_SESSION_MAX + 4];
    key[0] = (uint8_t)pc->session_len;
    memcpy(key + 1, r->buf + pc->session, pc->session_len);
    if (pc->kind == PC_SESSION_PUT || pc->kind == PC_SESSION_DEL) {
        MDB_val sk = {pc->session_len, r->buf + pc->session};
        if (pc->kind == PC_SESSION_PUT) {
            MDB_val sv = {pc->stream_len, r->buf + pc->stream};
            return jput(wal, txn, wal->dbi_sessions, &sk, &sv);
        }
        int rc = jdel(wal, txn, wal->dbi_sessions, &sk);
        if (rc && rc != MDB_NOTFOUND)
            return rc;
        return del_session_cursors(wal, txn, key, 1 + pc->session_len);
    }
    const char *name = (const char *)r->buf + pc->stream;
    struct head *e = head_find(wal, name, pc->stream_len, name_hash(name, pc->stream_len));
    if (!e || (!e->committed && e->gen != wal->gen)) {
        if (pc->kind == PC_CURSOR_DEL)
            return 0;  /* no such stream: no such cursor */
        return EINVAL; /* validated before: cannot happen */
    }
    uint32_t id = e->gen == wal->gen ? e->pending.id : e->meta.id;
    wal_put_be32(key + 1 + pc->session_len, id);
    if (pc->kind == PC_CURSOR_DEL) {
        MDB_val k = {1 + pc->session_len + 4, key};
        int rc = jdel(wal, txn, wal->dbi_cursors, &k);
        return rc == MDB_NOTFOUND ? 0 : rc;
    }
    uint8_t val[WAL_CURSOR_VAL_SIZE];
    wal_cursor_val_t cv = {.offset = pc->offset, .updated_us = now};
    wal_cursor_val_encode(&cv, val);
    MDB_val k = {1 + pc->session_len + 4, key}, v = {sizeof(val), val};
    return jput(wal, txn, wal->dbi_cursors, &k, &v);
}

/*
 * Write reqs[0..n) in a child transaction of wal->outer (begun if needed),
 * returned in *ret_txn, not committed. Returns an LMDB/errno code (the
 * child is then aborted); on success every request that passed validation
 * has results. Requests failing validation get their own status and are
 * skipped.
 */
static int batch_write(wal_t *wal, wal_append_t **reqs, size_t n, MDB_txn **ret_txn)
{
    MDB_txn *txn;
    int64_t now = now_us();
    int rc = 0;
    if (!wal->outer) {
        rc = mdb_txn_begin(wal->env, NULL, 0, &wal->outer);
        if (rc) {
            wal->outer = NULL;
            return rc;
        }
        wal->outer_t0 = mono_us();
        wal->outer_batches = 0;
    }
    rc = mdb_txn_begin(wal->env, wal->outer, 0, &txn);
    if (rc)
        return rc;
    wal->gen++;
    if (wal->gen == 0)
        wal->gen = 1;
    wal->n_touched = 0;
    for (size_t q = 0; q < n && !rc; q++) {
        wal_append_t *r = reqs[q];
        r->status = 0;
        if (!req_cursors_valid(wal, r)) {
            r->status = WAL_ENOTFOUND;
            continue;
        }
        for (size_t i = 0; i < r->n_msgs && !rc; i++)
            rc = write_msg(wal, txn, r, i, now);
        for (size_t c = 0; c < r->n_cursors && !rc; c++)
            rc = write_cursor(wal, txn, r, c, now);
    }
    if (!rc)
        rc = write_heads(wal, txn);
    if (!rc)
        rc = write_next_seq(wal, txn);
    if (!rc && wal->map_size > wal->opts.map_size_max &&
        pages_in_use(wal, txn) * wal->page_size > wal->opts.map_size_max)
        rc = MDB_MAP_FULL; /* the reserve above the limit is retention's */
    if (rc) {
        mdb_txn_abort(txn);
        return rc;
    }
    *ret_txn = txn;
    return 0;
}

static void fail_stop(wal_t *wal)
{
    __atomic_store_n(&wal->failed, 1, __ATOMIC_RELEASE);
}

/* The status a failed batch reports for an LMDB/errno code. */
static int batch_status(wal_t *wal, int rc)
{
    if (rc == MDB_MAP_FULL || rc == ENOSPC || rc == EDQUOT)
        return WAL_EFULL;
    if (rc == MDB_TXN_FULL || rc == MDB_BAD_VALSIZE || rc == EINVAL)
        return WAL_EINVAL; /* one request too large for a txn */
    if (rc == ENOMEM)
        return WAL_ENOMEM;
    fail_stop(wal);
    return WAL_EFATAL;
}

/* An injected fault (wal_testing_fail_commits) for the next durable point. */
static int fault_take(wal_t *wal)
{
    pthread_mutex_lock(&wal->mu);
    int fault = 0;
    if (wal->fault_count) {
        wal->fault_count--;
        fault = wal->fault_err;
    }
    pthread_mutex_unlock(&wal->mu);
    return fault;
}

/* ---- journal I/O ---------------------------------------------------------- */

static int pwrite_all(int fd, const uint8_t *p, size_t len, uint64_t off)
{
    while (len) {
        ssize_t w = pwrite(fd, p, len, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)
            return EIO;
        p += w;
        len -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

/* Extend the journal file with zeroes to at least upto bytes and make the
 * new size durable: entries later overwrite allocated blocks in place, so
 * their fdatasync has no file metadata to write. */
static int journal_extend(wal_t *wal, uint64_t upto)
{
    static const uint8_t zero[65536];
    uint64_t target = (upto + JOURNAL_CHUNK - 1) / JOURNAL_CHUNK * JOURNAL_CHUNK;
    if (target > wal->opts.journal_max)
        target = wal->opts.journal_max;
    for (uint64_t off = wal->jfile; off < target;) {
        size_t n = target - off < sizeof(zero) ? (size_t)(target - off) : sizeof(zero);
        int rc = pwrite_all(wal->jfd, zero, n, off);
        if (rc)
            return rc;
        off += n;
    }
    if (fdatasync(wal->jfd) != 0)
        return errno;
    wal->jfile = target;
    return 0;
}

/* Append the batch in jbuf as one entry at joff and make it durable. */
static int journal_write(wal_t *wal, uint64_t size)
{
    uint32_t body_len = (uint32_t)(wal->jbuf_len - WAL_JOURNAL_HDR);
    if (jbuf_reserve(wal, size - wal->jbuf_len))
        return ENOMEM;
    memset(wal->jbuf + wal->jbuf_len, 0, size - wal->jbuf_len);
    wal_jentry_header(wal->jbuf, wal->jseq, wal->jbuf + WAL_JOURNAL_HDR, body_len);
    int rc = 0;
    if (wal->joff + size > wal->jfile)
        rc = journal_extend(wal, wal->joff + size);
    if (!rc)
        rc = pwrite_all(wal->jfd, wal->jbuf, (size_t)size, wal->joff);
    if (!rc && fdatasync(wal->jfd) != 0)
        rc = errno;
    if (rc)
        return rc;
    wal->joff += size;
    wal->jseq++;
    return 0;
}

/*
 * Commit wal->outer: every journaled batch becomes part of LMDB (and
 * readable), the journal restarts at offset 0, and the requests waiting for
 * readability complete. A failure here leaves acknowledged batches only in
 * the journal: the WAL fails-stop and the next open folds them in, except
 * for "map full", where we grow the map and fold the journal in now.
 */
static int journal_recover(wal_t *wal, char *errbuf, size_t errlen);

/* The map is at its maximum and its used pages are within a journal's worth
 * (at most a quarter of the maximum) of it. */
static bool map_near_full(wal_t *wal)
{
    if (wal->map_size < wal->opts.map_size_max)
        return false;
    MDB_envinfo info;
    mdb_env_info(wal->env, &info);
    uint64_t used = ((uint64_t)info.me_last_pgno + 1) * wal->page_size;
    uint64_t room = wal->opts.map_size_max / 4;
    if (room > wal->opts.journal_max)
        room = wal->opts.journal_max;
    return used + room > wal->opts.map_size_max;
}

static int outer_commit(wal_t *wal)
{
    if (!wal->outer)
        return 0;
    MDB_txn *txn = wal->outer;
    wal->outer = NULL;
    int64_t t0 = mono_us();
    int rc = 0;
    if (wal->jfd >= 0) {
        uint8_t b[8];
        put_meta_u64(b, wal->jseq);
        MDB_val k = {12, "journal_next"}, v = {8, b};
        rc = mdb_put(txn, wal->dbi_meta, &k, &v, 0);
    }
    if (rc)
        mdb_txn_abort(txn);
    else
        rc = mdb_txn_commit(txn);
    if (rc == MDB_MAP_FULL && wal->jfd >= 0 &&
        (map_grow(wal, false) == 0 || map_grow(wal, true) == 0)) {
        /* Acknowledged batches need a home: grow (into retention's reserve
         * if need be), fold them in from the journal, give the reserve back. */
        rc = journal_recover(wal, NULL, 0);
        if (wal->map_size > wal->opts.map_size_max)
            (void)map_set(wal, wal->opts.map_size_max);
    }
    wal_append_t *list = wal->wait_head;
    wal->wait_head = wal->wait_tail = NULL;
    if (rc) {
        fail_stop(wal);
        __atomic_add_fetch(&wal->st_failed, 1, __ATOMIC_RELAXED);
        complete_list(wal, list, WAL_EFATAL);
        return rc;
    }
    wal->joff = 0;
    wal->outer_batches = 0;
    __atomic_add_fetch(&wal->st_applies, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&wal->st_apply_us_sum, (uint64_t)(mono_us() - t0), __ATOMIC_RELAXED);
    complete_list(wal, list, 0);
    notify_visible(wal);
    return 0;
}

/* After a batch reached its durable point: complete the requests that may
 * complete now; queue the others until wal->outer commits. */
static void batch_finish(wal_t *wal, wal_append_t **reqs, size_t n, bool journaled)
{
    size_t now = 0;
    for (size_t q = 0; q < n; q++) {
        wal_append_t *r = reqs[q];
        if (journaled && r->status == 0 && (!r->when_durable || r->n_cursors)) {
            r->next = NULL;
            if (wal->wait_tail)
                wal->wait_tail->next = r;
            else
                wal->wait_head = r;
            wal->wait_tail = r;
            continue;
        }
        reqs[now++] = r;
    }
    complete_batch(wal, reqs, now, true, 0);
}

/*
 * Write a batch, make it durable and complete it, handling map growth and
 * splitting. With a journal the batch's durable point is its journal entry
 * (one sequential write and fdatasync) and its LMDB writes join wal->outer,
 * committed later by outer_commit; without one (or for a batch too large
 * for the journal) wal->outer holds just this batch and commits now.
 */
static void batch_run(wal_t *wal, wal_append_t **reqs, size_t n)
{
    bool direct = wal->jfd < 0;
    if (!direct && map_near_full(wal)) {
        /* Near map_size_max, "full" must be decided by the commit that
         * acknowledges: no batch may be acknowledged that LMDB then has no
         * room for. Fold the journal in and commit directly. */
        direct = true;
        if (outer_commit(wal)) {
            complete_batch(wal, reqs, n, false, WAL_EFATAL);
            return;
        }
    }
    for (;;) {
        uint64_t saved_seq = wal->next_seq;
        uint32_t saved_id = wal->next_stream_id;
        int64_t t0 = mono_us();
        MDB_txn *child = NULL;
        wal->jrec = !direct;
        wal->jbuf_len = 0;
        int rc = direct ? 0 : jbuf_reserve(wal, WAL_JOURNAL_HDR);
        wal->jbuf_len = WAL_JOURNAL_HDR;
        if (!rc)
            rc = batch_write(wal, reqs, n, &child);
        wal->jrec = false;
        bool journaled = false;
        if (rc == 0 && !direct) {
            uint64_t body = wal->jbuf_len - WAL_JOURNAL_HDR;
            uint64_t size = wal_jentry_size(body);
            if (size > wal->opts.journal_max || body > WAL_JOURNAL_BODY_MAX ||
                wal->joff + size > wal->opts.journal_max) {
                /* No room: fold the journal into LMDB, then retry (into an
                 * empty journal, or straight into LMDB if it never fits). */
                mdb_txn_abort(child);
                batch_rollback(wal, saved_seq, saved_id);
                if (size > wal->opts.journal_max || body > WAL_JOURNAL_BODY_MAX)
                    direct = true;
                if (outer_commit(wal)) {
                    complete_batch(wal, reqs, n, false, WAL_EFATAL);
                    return;
                }
                continue;
            }
            int fault = fault_take(wal);
            rc = fault ? fault : journal_write(wal, size);
            if (rc) {
                /* The entry may be partly on disk: a torn tail that recovery
                 * stops at. A real write or fdatasync error is fatal (we
                 * cannot know what reached the disk). */
                mdb_txn_abort(child);
                batch_rollback(wal, saved_seq, saved_id);
                __atomic_add_fetch(&wal->st_failed, 1, __ATOMIC_RELAXED);
                int status = fault ? batch_status(wal, rc) : WAL_EFATAL;
                if (!fault)
                    fail_stop(wal);
                complete_batch(wal, reqs, n, false, status);
                return;
            }
            journaled = true;
        }
        if (rc == 0) {
            rc = mdb_txn_commit(child); /* into wal->outer: no I/O */
            if (rc && journaled) {
                fail_stop(wal);
                __atomic_add_fetch(&wal->st_failed, 1, __ATOMIC_RELAXED);
                complete_batch(wal, reqs, n, false, WAL_EFATAL);
                return;
            }
        }
        if (rc == 0 && !journaled) {
            MDB_txn *txn = wal->outer;
            wal->outer = NULL;
            int64_t ta = mono_us();
            rc = txn_commit(wal, txn);
            if (rc == 0) {
                __atomic_add_fetch(&wal->st_applies, 1, __ATOMIC_RELAXED);
                __atomic_add_fetch(&wal->st_apply_us_sum, (uint64_t)(mono_us() - ta),
                                   __ATOMIC_RELAXED);
                notify_visible(wal);
            }
        }
        if (rc == 0) {
            batch_apply(wal);
            __atomic_store_n(&wal->st_acked_next, wal->next_seq, __ATOMIC_RELEASE);
            if (journaled)
                wal->outer_batches++;
            uint64_t msgs = 0;
            for (size_t q = 0; q < n; q++)
                msgs += reqs[q]->status == 0 ? reqs[q]->n_msgs : 0;
            uint64_t took = (uint64_t)(mono_us() - t0);
            hist_add(wal->st_commit_us, wal_commit_us_bounds, took);
            __atomic_add_fetch(&wal->st_commit_us_sum, took, __ATOMIC_RELAXED);
            hist_add(wal->st_batch, wal_batch_bounds, msgs);
            __atomic_add_fetch(&wal->st_commits, 1, __ATOMIC_RELAXED);
            __atomic_add_fetch(&wal->st_msgs, msgs, __ATOMIC_RELAXED);
            batch_finish(wal, reqs, n, journaled);
            return;
        }
        batch_rollback(wal, saved_seq, saved_id);
        if (wal->outer && wal->outer_batches > 0 && (rc == MDB_MAP_FULL || rc == MDB_TXN_FULL)) {
            /* The journaled batches waiting in wal->outer take room: fold
             * them into LMDB, then retry this batch alone. */
            if (outer_commit(wal)) {
                complete_batch(wal, reqs, n, false, WAL_EFATAL);
                return;
            }
            continue;
        }
        if (wal->outer && wal->outer_batches == 0) {
            mdb_txn_abort(wal->outer); /* begun for this batch only */
            wal->outer = NULL;
        }
        if (rc == MDB_MAP_FULL && map_grow(wal, false) == 0)
            continue; /* retried: not a failed commit */
        if (rc == MDB_TXN_FULL && n > 1) {
            /* Too many dirty pages for one txn: split the batch. */
            batch_run(wal, reqs, n / 2);
            batch_run(wal, reqs + n / 2, n - n / 2);
            return;
        }
        __atomic_add_fetch(&wal->st_failed, 1, __ATOMIC_RELAXED);
        complete_batch(wal, reqs, n, false, batch_status(wal, rc));
        return;
    }
}

/* One chunk of retention. Returns 0 and sets *more if work remains. */
static int retain_chunk(wal_t *wal, struct retain_job *job, bool *more)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    *more = false;
    int rc = mdb_txn_begin(wal->env, NULL, 0, &txn);
    if (rc)
        return rc;
    rc = mdb_cursor_open(txn, wal->dbi_log, &cur);
    if (rc) {
        mdb_txn_abort(txn);
        return rc;
    }
    wal->gen++;
    if (wal->gen == 0)
        wal->gen = 1;
    wal->n_touched = 0;
    uint64_t dropped = 0;
    MDB_val k, v;
    int grc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
    while (grc == 0) {
        uint64_t seq = wal_get_be64(k.mv_data);
        if (seq > job->upto)
            break;
        if (dropped == job->chunk) {
            *more = true;
            break;
        }
        wal_rec_t rec;
        if (wal_rec_decode(v.mv_data, v.mv_size, &rec) != 0 || rec.seq != seq) {
            rc = MDB_CORRUPTED;
            break;
        }
        uint8_t ik[12];
        wal_put_be32(ik, rec.stream_id);
        wal_put_be64(ik + 4, rec.offset);
        MDB_val ikv = {12, ik};
        rc = mdb_del(txn, wal->dbi_index, &ikv, NULL);
        if (rc && rc != MDB_NOTFOUND)
            break;
        if (rec.msgid_len) {
            uint8_t dkey[1 + WAL_PRODUCER_MAX + WAL_MSGID_MAX];
            dkey[0] = (uint8_t)rec.producer_len;
            memcpy(dkey + 1, rec.producer, rec.producer_len);
            memcpy(dkey + 1 + rec.producer_len, rec.msgid, rec.msgid_len);
            MDB_val dk = {1u + rec.producer_len + rec.msgid_len, dkey}, dv;
            wal_dedup_val_t d;
            if (mdb_get(txn, wal->dbi_dedup, &dk, &dv) == 0 &&
                wal_dedup_val_decode(dv.mv_data, dv.mv_size, &d) == 0 &&
                d.stream_id == rec.stream_id && d.offset == rec.offset) {
                rc = mdb_del(txn, wal->dbi_dedup, &dk, NULL);
                if (rc)
                    break;
            }
        }
        struct head *e = rec.stream_id < wal->by_id_cap ? wal->by_id[rec.stream_id] : NULL;
        if (e) {
            rc = head_touch(wal, e);
            if (rc) {
                rc = ENOMEM;
                break;
            }
            if (rec.offset + 1 > e->pending.first_offset)
                e->pending.first_offset = rec.offset + 1;
        }
        rc = mdb_cursor_del(cur, 0);
        if (rc)
            break;
        dropped++;
        rc = 0;
        grc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); /* we always drop the head */
    }
    mdb_cursor_close(cur);
    if (!rc && grc != 0 && grc != MDB_NOTFOUND)
        rc = grc;
    if (!rc)
        rc = write_heads(wal, txn);
    if (rc) {
        mdb_txn_abort(txn);
        return rc;
    }
    rc = txn_commit(wal, txn);
    if (rc == 0) {
        batch_apply(wal);
        job->dropped += dropped;
    }
    return rc;
}

static void retain_step(wal_t *wal, struct retain_job *job)
{
    bool more = false;
    int rc = retain_chunk(wal, job, &more);
    if (rc) {
        batch_rollback(wal, wal->next_seq, wal->next_stream_id);
        if (rc == MDB_MAP_FULL && map_grow(wal, true) == 0)
            return; /* retried on the next step */
        if ((rc == MDB_MAP_FULL || rc == MDB_TXN_FULL) && job->chunk > 1) {
            job->chunk /= 2; /* deletes need pages too: take smaller bites */
            return;
        }
    }
    int status = 0;
    if (rc == MDB_CORRUPTED)
        status = WAL_ECORRUPT;
    else if (rc == MDB_MAP_FULL || rc == ENOSPC || rc == EDQUOT)
        status = WAL_EFULL;
    else if (rc) {
        fail_stop(wal);
        status = WAL_EFATAL;
    }
    if (rc || !more) {
        /* Give the reserve back: appends stop at map_size_max again. */
        if (wal->map_size > wal->opts.map_size_max)
            (void)map_set(wal, wal->opts.map_size_max);
        pthread_mutex_lock(&wal->mu);
        job->status = status;
        job->done = true;
        wal->retain = NULL;
        pthread_cond_broadcast(&wal->done_cond);
        pthread_mutex_unlock(&wal->mu);
    }
}

static void fail_queue_locked(wal_t *wal, wal_append_t **list)
{
    *list = wal->q_head;
    wal->q_head = wal->q_tail = NULL;
}

static void *writer_main(void *arg)
{
    wal_t *wal = arg;
    wal_append_t **batch = NULL;
    size_t batch_cap = 0;

    pthread_mutex_lock(&wal->mu);
    for (;;) {
        while (!wal->q_head && !wal->retain && !wal->closing) {
            if (!wal->outer) {
                pthread_cond_wait(&wal->cond, &wal->mu);
                continue;
            }
            /* Journaled batches wait in wal->outer: fold them into LMDB
             * once no new work came for apply_idle_us. */
            struct timespec dl;
            clock_gettime(CLOCK_REALTIME, &dl);
            dl.tv_nsec += (long)wal->opts.apply_idle_us * 1000;
            dl.tv_sec += dl.tv_nsec / 1000000000;
            dl.tv_nsec %= 1000000000;
            int w = pthread_cond_timedwait(&wal->cond, &wal->mu, &dl);
            if (__atomic_load_n(&wal->failed, __ATOMIC_ACQUIRE))
                break;
            if (w == ETIMEDOUT && !wal->q_head) {
                pthread_mutex_unlock(&wal->mu);
                (void)outer_commit(wal);
                pthread_mutex_lock(&wal->mu);
                wal->writer_busy = false;
            }
        }
        if (__atomic_load_n(&wal->failed, __ATOMIC_ACQUIRE)) {
            if (wal->outer) {
                /* Journaled batches stay in the journal for the next open. */
                mdb_txn_abort(wal->outer);
                wal->outer = NULL;
                wal_append_t *waiting = wal->wait_head;
                wal->wait_head = wal->wait_tail = NULL;
                pthread_mutex_unlock(&wal->mu);
                complete_list(wal, waiting, WAL_EFATAL);
                pthread_mutex_lock(&wal->mu);
            }
            wal_append_t *list;
            fail_queue_locked(wal, &list);
            if (wal->retain) {
                wal->retain->status = WAL_EFATAL;
                wal->retain->done = true;
                wal->retain = NULL;
                pthread_cond_broadcast(&wal->done_cond);
            }
            pthread_mutex_unlock(&wal->mu);
            while (list) {
                wal_append_t *next = list->next;
                complete(wal, list, WAL_EFATAL);
                list = next;
            }
            pthread_mutex_lock(&wal->mu);
            if (wal->closing && !wal->q_head)
                break;
            continue;
        }
        if (!wal->q_head && (wal->retain || wal->closing) && wal->outer) {
            pthread_mutex_unlock(&wal->mu);
            (void)outer_commit(wal); /* before retention or exit */
            pthread_mutex_lock(&wal->mu);
            wal->writer_busy = false;
            continue;
        }
        if (!wal->q_head && wal->retain) {
            struct retain_job *job = wal->retain;
            wal->writer_busy = true;
            pthread_mutex_unlock(&wal->mu);
            retain_step(wal, job);
            pthread_mutex_lock(&wal->mu);
            wal->writer_busy = false;
            continue;
        }
        if (!wal->q_head) {
            if (wal->closing)
                break;
            continue;
        }
        if (wal->opts.batch_wait_us && !wal->closing) {
            /* Optionally linger for more appends to share this commit, while
             * fewer than batch_wait_msgs are queued: a batch that is already
             * that large does not wait. */
            struct timespec dl;
            clock_gettime(CLOCK_REALTIME, &dl);
            dl.tv_nsec += (long)wal->opts.batch_wait_us * 1000;
            dl.tv_sec += dl.tv_nsec / 1000000000;
            dl.tv_nsec %= 1000000000;
            for (;;) {
                size_t msgs = 0;
                for (wal_append_t *r = wal->q_head; r; r = r->next)
                    msgs += r->n_msgs + r->n_cursors;
                if (msgs >= wal->opts.batch_wait_msgs || wal->closing)
                    break;
                if (pthread_cond_timedwait(&wal->cond, &wal->mu, &dl) == ETIMEDOUT)
                    break;
            }
        }
        /* Take whole requests up to the batch limits (at least one). */
        size_t n = 0;
        uint64_t msgs = 0, bytes = 0;
        int64_t taken = mono_us();
        while (wal->q_head) {
            wal_append_t *r = wal->q_head;
            if (n > 0 && (msgs + r->n_msgs + r->n_cursors > wal->opts.batch_max_msgs ||
                          bytes + r->buf_len > wal->opts.batch_max_bytes))
                break;
            if (n == batch_cap) {
                size_t ncap = batch_cap ? batch_cap * 2 : 64;
                wal_append_t **nb = realloc(batch, ncap * sizeof(*nb));
                if (!nb)
                    break;
                batch = nb;
                batch_cap = ncap;
            }
            wal->q_head = r->next;
            if (!wal->q_head)
                wal->q_tail = NULL;
            r->next = NULL;
            r->taken_us = taken;
            batch[n++] = r;
            msgs += r->n_msgs + r->n_cursors;
            bytes += r->buf_len;
        }
        wal->writer_busy = true;
        pthread_mutex_unlock(&wal->mu);
        if (n == 0) {
            /* Could not even allocate the batch array: back off briefly. */
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        } else {
            batch_run(wal, batch, n);
            if (wal->outer && mono_us() - wal->outer_t0 >= (int64_t)wal->opts.apply_us)
                (void)outer_commit(wal);
        }
        pthread_mutex_lock(&wal->mu);
        wal->writer_busy = wal->outer != NULL; /* restores wait for the fold */
    }
    pthread_mutex_unlock(&wal->mu);
    free(batch);
    return NULL;
}

void wal_testing_fail_commits(wal_t *wal, int err, unsigned count)
{
    pthread_mutex_lock(&wal->mu);
    wal->fault_err = err;
    wal->fault_count = count;
    pthread_mutex_unlock(&wal->mu);
}

/* ---- synchronous helpers ----------------------------------------------- */

struct sync_wait {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool done;
};

static void sync_cb(wal_append_t *req, void *arg)
{
    (void)req;
    struct sync_wait *w = arg;
    pthread_mutex_lock(&w->mu);
    w->done = true;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->mu);
}

static int append_sync(wal_t *wal, const wal_msg_t *msgs, size_t n, wal_result_t *results,
                       bool when_durable)
{
    struct sync_wait w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false};
    wal_append_t *req;
    int rc = wal_append_new(sync_cb, &w, &req);
    if (rc)
        return rc;
    req->direct = true;
    req->when_durable = when_durable;
    /* Size the request once: growing it by doubling costs more than the
     * append itself for large batches (realloc, and glibc trimming it). */
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++)
        bytes += msgs[i].stream_len + msgs[i].producer_len + msgs[i].msgid_len +
                 msgs[i].headers_len + msgs[i].payload_len;
    rc = wal_append_reserve(req, n, bytes);
    for (size_t i = 0; i < n && !rc; i++)
        rc = wal_append_add_msg(req, &msgs[i]);
    if (!rc)
        rc = wal_append_submit(wal, req);
    if (rc) {
        wal_append_free(req);
        return rc;
    }
    pthread_mutex_lock(&w.mu);
    while (!w.done)
        pthread_cond_wait(&w.cond, &w.mu);
    pthread_mutex_unlock(&w.mu);
    rc = req->status;
    if (!rc && results)
        memcpy(results, req->results, n * sizeof(*results));
    wal_append_free(req);
    pthread_cond_destroy(&w.cond);
    pthread_mutex_destroy(&w.mu);
    return rc;
}

int wal_append_sync(wal_t *wal, const wal_msg_t *msgs, size_t n, wal_result_t *results)
{
    return append_sync(wal, msgs, n, results, false);
}

int wal_append_sync_durable(wal_t *wal, const wal_msg_t *msgs, size_t n, wal_result_t *results)
{
    return append_sync(wal, msgs, n, results, true);
}

int wal_retain(wal_t *wal, uint64_t upto_seq, uint64_t *ret_dropped)
{
    if (wal->read_only)
        return WAL_ECLOSED;
    struct retain_job job = {.upto = upto_seq, .chunk = wal->opts.retain_chunk};
    pthread_mutex_lock(&wal->mu);
    /* One retention job at a time; later callers wait their turn. */
    while (wal->retain && !wal->closing)
        pthread_cond_wait(&wal->done_cond, &wal->mu);
    int rc = 0;
    if (__atomic_load_n(&wal->failed, __ATOMIC_ACQUIRE))
        rc = WAL_EFATAL;
    else if (wal->closing)
        rc = WAL_ECLOSED;
    else if (wal->restoring)
        rc = WAL_EBUSY;
    if (!rc) {
        wal->retain = &job;
        pthread_cond_signal(&wal->cond);
        while (!job.done)
            pthread_cond_wait(&wal->done_cond, &wal->mu);
        rc = job.status;
    }
    pthread_mutex_unlock(&wal->mu);
    if (!rc && ret_dropped)
        *ret_dropped = job.dropped;
    return rc;
}

/* ---- open / close ------------------------------------------------------ */

static int open_dbis(wal_t *wal, MDB_txn *txn, unsigned flags)
{
    struct {
        const char *name;
        MDB_dbi *dbi;
    } dbs[] = {
        {"meta", &wal->dbi_meta},   {"log", &wal->dbi_log},
        {"index", &wal->dbi_index}, {"streams", &wal->dbi_streams},
        {"ids", &wal->dbi_ids},     {"cursors", &wal->dbi_cursors},
        {"dedup", &wal->dbi_dedup}, {"sessions", &wal->dbi_sessions},
    };
    for (size_t i = 0; i < sizeof(dbs) / sizeof(dbs[0]); i++) {
        int rc = mdb_dbi_open(txn, dbs[i].name, flags, dbs[i].dbi);
        if (rc == MDB_NOTFOUND && dbs[i].dbi == &wal->dbi_sessions) {
            wal->no_sessions = true; /* a read-only open of a WAL from before sessions */
            continue;
        }
        if (rc)
            return rc;
    }
    return 0;
}

static int check_version(wal_t *wal, MDB_txn *txn, bool create, char *errbuf, size_t errlen)
{
    MDB_val k = {14, "format_version"}, v;
    int rc = mdb_get(txn, wal->dbi_meta, &k, &v);
    if (rc == MDB_NOTFOUND) {
        if (!create) {
            errf(errbuf, errlen, "'%s' holds no ARQ format version", wal->dir);
            return WAL_ECORRUPT;
        }
        uint8_t buf[8];
        wal_put_le32(buf, WAL_FORMAT_VERSION);
        v.mv_size = 4;
        v.mv_data = buf;
        rc = mdb_put(txn, wal->dbi_meta, &k, &v, 0);
        if (rc)
            return map_mdb(rc);
        wal_put_le64(buf, (uint64_t)now_us());
        MDB_val ck = {10, "created_us"}, cv = {8, buf};
        return map_mdb(mdb_put(txn, wal->dbi_meta, &ck, &cv, 0));
    }
    if (rc)
        return map_mdb(rc);
    if (v.mv_size != 4) {
        errf(errbuf, errlen, "'%s': format version entry has %zu bytes, expected 4", wal->dir,
             v.mv_size);
        return WAL_ECORRUPT;
    }
    uint32_t ver = wal_get_le32(v.mv_data);
    if (ver > WAL_FORMAT_VERSION) {
        errf(errbuf, errlen,
             "'%s' was written with WAL format version %u; this build reads up to version %u: "
             "upgrade ARQ",
             wal->dir, ver, WAL_FORMAT_VERSION);
        return WAL_EVERSION;
    }
    if (ver == 0) {
        errf(errbuf, errlen, "'%s': format version 0 is invalid", wal->dir);
        return WAL_ECORRUPT;
    }
    if (ver < WAL_FORMAT_VERSION && create) {
        /* Version 1 had no journal. A writer of this build may leave
         * acknowledged batches in the journal alone, which a version-1
         * build would not read: mark the WAL so that such a build refuses
         * it instead of losing them. */
        uint8_t buf[4];
        wal_put_le32(buf, WAL_FORMAT_VERSION);
        MDB_val nv = {4, buf};
        return map_mdb(mdb_put(txn, wal->dbi_meta, &k, &nv, 0));
    }
    return 0;
}

/* Rebuild the writer's in-memory heads and counters from the streams DB. */
static int load_heads(wal_t *wal, MDB_txn *txn, char *errbuf, size_t errlen)
{
    MDB_cursor *cur;
    int rc = mdb_cursor_open(txn, wal->dbi_streams, &cur);
    if (rc)
        return map_mdb(rc);
    MDB_val k, v;
    wal->next_stream_id = 1;
    for (int g = mdb_cursor_get(cur, &k, &v, MDB_FIRST); g == 0;
         g = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        wal_stream_meta_t m;
        rc = wal_stream_meta_decode(v.mv_data, v.mv_size, &m);
        if (rc) {
            errf(errbuf, errlen, "stream '%.*s': metadata %s", (int)k.mv_size,
                 (const char *)k.mv_data, wal_strerror(rc));
            break;
        }
        struct head *e;
        rc = head_insert(wal, k.mv_data, k.mv_size, name_hash(k.mv_data, k.mv_size), &e);
        if (rc)
            break;
        e->meta = e->pending = m;
        e->committed = true;
        rc = head_set_id(wal, e);
        if (rc)
            break;
        if (m.id >= wal->next_stream_id)
            wal->next_stream_id = m.id + 1;
    }
    mdb_cursor_close(cur);
    if (rc)
        return rc;

    wal->next_seq = 1;
    MDB_val mk = {8, "next_seq"}, mv;
    rc = mdb_get(txn, wal->dbi_meta, &mk, &mv);
    if (rc == 0 && mv.mv_size == 8)
        wal->next_seq = wal_get_le64(mv.mv_data);
    else if (rc && rc != MDB_NOTFOUND)
        return map_mdb(rc);
    /* The log's last key is the ground truth if it is ahead. */
    rc = mdb_cursor_open(txn, wal->dbi_log, &cur);
    if (rc)
        return map_mdb(rc);
    if (mdb_cursor_get(cur, &k, &v, MDB_LAST) == 0 && k.mv_size == 8) {
        uint64_t last = wal_get_be64(k.mv_data);
        if (last >= wal->next_seq)
            wal->next_seq = last + 1;
    }
    mdb_cursor_close(cur);
    return 0;
}

/* ---- journal: open and recovery ------------------------------------------ */

/* Open (creating) the journal and lock it. Another process that has this
 * WAL open for writing holds the lock: we then commit every batch to LMDB
 * directly and leave its journal alone. */
static int journal_open(wal_t *wal, char *errbuf, size_t errlen)
{
    size_t plen = strlen(wal->dir) + sizeof("/journal");
    char *path = malloc(plen);
    if (!path)
        return WAL_ENOMEM;
    snprintf(path, plen, "%s/journal", wal->dir);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        errf(errbuf, errlen, "cannot open journal '%s': %s", path, strerror(errno));
        free(path);
        return WAL_EIO;
    }
    free(path);
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        close(fd);
        return 0;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        errf(errbuf, errlen, "journal: %s", strerror(errno));
        close(fd);
        return WAL_EIO;
    }
    wal->jfd = fd;
    wal->jfile = (uint64_t)st.st_size;
    if (st.st_size == 0) {
        /* A new file: its directory entry must be durable before any
         * entry in it is acknowledged. */
        int dfd = open(wal->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            (void)fsync(dfd);
            close(dfd);
        }
    }
    return 0;
}

static int journal_apply_op(wal_t *wal, MDB_txn *txn, const wal_jop_t *op)
{
    MDB_dbi dbi = jdb_dbi(wal, op->db);
    MDB_val k = {op->key_len, (void *)op->key};
    if (op->kind == WAL_JOP_PUT) {
        MDB_val v = {op->val_len, (void *)op->val};
        return mdb_put(txn, dbi, &k, &v, 0);
    }
    if (op->kind == WAL_JOP_DEL) {
        int rc = mdb_del(txn, dbi, &k, NULL);
        return rc == MDB_NOTFOUND ? 0 : rc;
    }
    return del_prefix(txn, dbi, op->key, op->key_len);
}

/*
 * Fold into LMDB, in one durable transaction, every journal entry that
 * LMDB does not hold yet: the entries from offset 0 that form an unbroken
 * run of sequence numbers with valid checksums, from meta "journal_next"
 * on. The run ends at zeroes, a torn or stale entry (an older lap of the
 * file) or the end of the file. Sets wal->jseq; the journal restarts at 0.
 */
static int journal_recover(wal_t *wal, char *errbuf, size_t errlen)
{
    uint8_t hdr[WAL_JOURNAL_HDR];
    uint8_t *body = NULL;
    size_t body_cap = 0;
    int rc;
    for (;;) {
        MDB_txn *txn;
        rc = mdb_txn_begin(wal->env, NULL, 0, &txn);
        if (rc)
            break;
        uint64_t next = 0, expect = 0, off = 0, applied = 0;
        bool have = false;
        MDB_val mk = {12, "journal_next"}, mv;
        if (mdb_get(txn, wal->dbi_meta, &mk, &mv) == 0 && mv.mv_size == 8)
            next = wal_get_le64(mv.mv_data);
        while (!rc && off + WAL_JOURNAL_HDR <= wal->jfile) {
            ssize_t got = pread(wal->jfd, hdr, sizeof(hdr), (off_t)off);
            wal_jentry_t e;
            if (got != (ssize_t)sizeof(hdr) ||
                wal_jentry_decode_header(hdr, wal->jfile - off, &e) != 0 ||
                (have && e.jseq != expect))
                break;
            if (e.body_len > body_cap) {
                uint8_t *nb = realloc(body, e.body_len);
                if (!nb) {
                    rc = ENOMEM;
                    break;
                }
                body = nb;
                body_cap = e.body_len;
            }
            if (e.body_len && pread(wal->jfd, body, e.body_len, (off_t)(off + WAL_JOURNAL_HDR)) !=
                                  (ssize_t)e.body_len)
                break;
            e.body = body;
            if (wal_jentry_verify(hdr, &e) != 0)
                break;
            if (e.jseq >= next) {
                size_t pos = 0;
                wal_jop_t op;
                int g;
                while (!rc && (g = wal_jop_next(e.body, e.body_len, &pos, &op)) == 1)
                    rc = journal_apply_op(wal, txn, &op);
                if (!rc && g < 0) {
                    errf(errbuf, errlen, "journal entry %llu at byte %llu: malformed op",
                         (unsigned long long)e.jseq, (unsigned long long)off);
                    rc = MDB_CORRUPTED;
                }
                applied++;
            }
            have = true;
            expect = e.jseq + 1;
            off += e.size;
        }
        uint64_t last = have && expect > next ? expect : next;
        if (!rc && last == next) {
            mdb_txn_abort(txn); /* nothing to fold in: write nothing */
            wal->jseq = last;
            wal->joff = 0;
            break;
        }
        if (!rc) {
            uint8_t b[8];
            put_meta_u64(b, last);
            MDB_val v = {8, b};
            rc = mdb_put(txn, wal->dbi_meta, &mk, &v, 0);
        }
        if (rc) {
            mdb_txn_abort(txn);
            if (rc == MDB_MAP_FULL && (map_grow(wal, false) == 0 || map_grow(wal, true) == 0)) {
                rc = 0;
                continue;
            }
            break;
        }
        rc = mdb_txn_commit(txn);
        if (rc == MDB_MAP_FULL && (map_grow(wal, false) == 0 || map_grow(wal, true) == 0)) {
            rc = 0;
            continue;
        }
        if (!rc) {
            wal->jseq = last;
            wal->joff = 0;
            __atomic_add_fetch(&wal->st_recovered, applied, __ATOMIC_RELAXED);
        }
        break;
    }
    free(body);
    if (rc && rc != MDB_CORRUPTED)
        errf(errbuf, errlen, "journal recovery in '%s': %s", wal->dir, mdb_strerror(rc));
    return rc == MDB_CORRUPTED ? WAL_ECORRUPT : rc ? map_mdb(rc) : 0;
}

static void opts_defaults(wal_options_t *o)
{
    if (!o->map_size)
        o->map_size = DEF_MAP_SIZE;
    if (!o->map_size_max)
        o->map_size_max = DEF_MAP_MAX;
    if (o->map_size_max < o->map_size)
        o->map_size_max = o->map_size;
    if (!o->batch_max_msgs)
        o->batch_max_msgs = DEF_BATCH_MSGS;
    if (!o->batch_wait_msgs || o->batch_wait_msgs > o->batch_max_msgs)
        o->batch_wait_msgs = o->batch_max_msgs;
    if (!o->batch_max_bytes)
        o->batch_max_bytes = DEF_BATCH_BYTES;
    if (!o->retain_chunk)
        o->retain_chunk = DEF_RETAIN_CHUNK;
    if (!o->max_readers)
        o->max_readers = DEF_MAX_READERS;
    if (!o->max_record_bytes)
        o->max_record_bytes = DEF_MAX_RECORD;
    if (!o->journal_max)
        o->journal_max = DEF_JOURNAL_MAX;
    o->journal_max = o->journal_max / WAL_JOURNAL_ALIGN * WAL_JOURNAL_ALIGN;
    if (o->journal_max < 2 * JOURNAL_CHUNK)
        o->journal_max = 2 * JOURNAL_CHUNK;
    if (!o->apply_us)
        o->apply_us = DEF_APPLY_US;
    if (!o->apply_idle_us)
        o->apply_idle_us = DEF_APPLY_IDLE;
}

static void wal_free(wal_t *wal)
{
    if (wal->env)
        mdb_env_close(wal->env);
    if (wal->done_ev)
        event_free(wal->done_ev);
    heads_free(wal);
    if (wal->jfd >= 0)
        close(wal->jfd); /* releases the flock */
    free(wal->jbuf);
    pthread_rwlock_destroy(&wal->map_lock);
    pthread_mutex_destroy(&wal->mu);
    pthread_cond_destroy(&wal->cond);
    pthread_cond_destroy(&wal->done_cond);
    pthread_mutex_destroy(&wal->done_mu);
    free(wal->dir);
    free(wal);
}

int wal_open(const wal_options_t *opts, struct event_base *base, wal_t **ret_wal, char *errbuf,
             size_t errlen)
{
    if (!opts || !opts->dir || !*opts->dir || !ret_wal) {
        errf(errbuf, errlen, "no data directory given");
        return WAL_EINVAL;
    }
    if (opts->sync != WAL_SYNC_FULL && opts->sync != WAL_SYNC_NONE) {
        errf(errbuf, errlen, "unknown sync mode %d", (int)opts->sync);
        return WAL_EINVAL;
    }
    wal_t *wal = calloc(1, sizeof(*wal));
    if (!wal)
        return WAL_ENOMEM;
    wal->opts = *opts;
    opts_defaults(&wal->opts);
    wal->dir = strdup(opts->dir);
    wal->read_only = opts->read_only != 0;
    wal->base = wal->read_only ? NULL : base;
    wal->jfd = -1;
    /* Prefer the writer: a stream of short reads must not starve a resize. */
    pthread_rwlockattr_t rwa;
    pthread_rwlockattr_init(&rwa);
    pthread_rwlockattr_setkind_np(&rwa, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&wal->map_lock, &rwa);
    pthread_rwlockattr_destroy(&rwa);
    pthread_mutex_init(&wal->mu, NULL);
    pthread_cond_init(&wal->cond, NULL);
    pthread_cond_init(&wal->done_cond, NULL);
    pthread_mutex_init(&wal->done_mu, NULL);
    int rc = 0;
    MDB_txn *txn = NULL;
    if (!wal->dir) {
        rc = WAL_ENOMEM;
        goto fail;
    }
    if (!wal->read_only && mkdir(wal->dir, 0700) != 0 && errno != EEXIST) {
        errf(errbuf, errlen, "cannot create data directory '%s': %s", wal->dir, strerror(errno));
        rc = WAL_EIO;
        goto fail;
    }
    int mrc = mdb_env_create(&wal->env);
    if (!mrc)
        mrc = mdb_env_set_maxdbs(wal->env, 10);
    if (!mrc)
        mrc = mdb_env_set_maxreaders(wal->env, wal->opts.max_readers);
    if (!mrc)
        mrc = mdb_env_set_mapsize(wal->env, (size_t)wal->opts.map_size);
    if (mrc) {
        errf(errbuf, errlen, "lmdb setup: %s", mdb_strerror(mrc));
        rc = map_mdb(mrc);
        goto fail;
    }
    unsigned flags = MDB_NOTLS;
    if (wal->read_only)
        flags |= MDB_RDONLY;
    if (wal->opts.sync == WAL_SYNC_NONE)
        flags |= MDB_NOSYNC;
    mrc = mdb_env_open(wal->env, wal->dir, flags, 0600);
    if (mrc) {
        errf(errbuf, errlen, "cannot open WAL in '%s': %s", wal->dir, mdb_strerror(mrc));
        rc = mrc == ENOENT ? WAL_ENOTFOUND : map_mdb(mrc);
        goto fail;
    }
    int dead = 0;
    (void)mdb_reader_check(wal->env, &dead); /* clears slots of dead processes */
    MDB_envinfo info;
    mdb_env_info(wal->env, &info);
    wal->map_size = info.me_mapsize;
    MDB_stat est;
    mdb_env_stat(wal->env, &est);
    wal->page_size = est.ms_psize;

    mrc = mdb_txn_begin(wal->env, NULL, wal->read_only ? MDB_RDONLY : 0, &txn);
    if (mrc) {
        errf(errbuf, errlen, "cannot begin a transaction in '%s': %s", wal->dir, mdb_strerror(mrc));
        rc = map_mdb(mrc);
        goto fail;
    }
    mrc = open_dbis(wal, txn, wal->read_only ? 0 : MDB_CREATE);
    if (mrc) {
        errf(errbuf, errlen, "'%s' is not an ARQ WAL (%s)", wal->dir, mdb_strerror(mrc));
        rc = mrc == MDB_NOTFOUND ? WAL_ENOTFOUND : map_mdb(mrc);
        goto fail;
    }
    rc = check_version(wal, txn, !wal->read_only, errbuf, errlen);
    if (rc)
        goto fail;
    if (!wal->read_only && !wal->opts.no_journal && wal->opts.sync == WAL_SYNC_FULL) {
        /* Create the DBs for good, then fold in what the journal holds. */
        mrc = mdb_txn_commit(txn);
        txn = NULL;
        if (mrc) {
            errf(errbuf, errlen, "initial commit in '%s': %s", wal->dir, mdb_strerror(mrc));
            rc = map_mdb(mrc);
            goto fail;
        }
        rc = journal_open(wal, errbuf, errlen);
        if (!rc && wal->jfd >= 0)
            rc = journal_recover(wal, errbuf, errlen);
        if (rc)
            goto fail;
        mrc = mdb_txn_begin(wal->env, NULL, 0, &txn);
        if (mrc) {
            rc = map_mdb(mrc);
            goto fail;
        }
    }
    if (!wal->read_only) {
        rc = load_heads(wal, txn, errbuf, errlen);
        if (rc)
            goto fail;
        wal->st_acked_next = wal->next_seq;
        mrc = mdb_txn_commit(txn);
        txn = NULL;
        if (mrc) {
            errf(errbuf, errlen, "initial commit in '%s': %s", wal->dir, mdb_strerror(mrc));
            rc = map_mdb(mrc);
            goto fail;
        }
        if (wal->base) {
            wal->done_ev = event_new(wal->base, -1, 0, done_ev_cb, wal);
            if (!wal->done_ev) {
                rc = WAL_ENOMEM;
                goto fail;
            }
        }
        if (pthread_create(&wal->writer, NULL, writer_main, wal) != 0) {
            errf(errbuf, errlen, "cannot start the WAL writer thread");
            rc = WAL_ENOMEM;
            goto fail;
        }
        wal->writer_started = true;
    } else {
        /* Commit (not abort) so the DBI handles stay open for later txns. */
        mrc = mdb_txn_commit(txn);
        txn = NULL;
        if (mrc) {
            rc = map_mdb(mrc);
            goto fail;
        }
    }
    *ret_wal = wal;
    return 0;
fail:
    if (txn)
        mdb_txn_abort(txn);
    wal_free(wal);
    return rc;
}

void wal_close(wal_t *wal)
{
    if (!wal)
        return;
    pthread_mutex_lock(&wal->mu);
    wal->closing = true;
    pthread_cond_broadcast(&wal->cond);
    pthread_cond_broadcast(&wal->done_cond);
    pthread_mutex_unlock(&wal->mu);
    if (wal->writer_started)
        pthread_join(wal->writer, NULL);
    if (wal->base)
        done_run(wal); /* completions the loop has not run yet */
    wal_free(wal);
}

int wal_fold_journal(const char *dir, uint64_t *ret_entries, char *errbuf, size_t errlen)
{
    *ret_entries = 0;
    if (!dir || !*dir)
        return WAL_EINVAL;
    size_t plen = strlen(dir) + sizeof("/journal");
    char *path = malloc(plen);
    if (!path)
        return WAL_ENOMEM;
    snprintf(path, plen, "%s/journal", dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    free(path);
    if (fd < 0)
        return 0; /* no journal (or not ours to read): nothing to fold */
    struct stat st;
    bool idle = fstat(fd, &st) == 0 && st.st_size > 0 && flock(fd, LOCK_EX | LOCK_NB) == 0;
    close(fd);
    if (!idle)
        return 0;
    wal_options_t o = {.dir = dir};
    wal_t *wal;
    int rc = wal_open(&o, NULL, &wal, errbuf, errlen);
    if (rc)
        return rc;
    *ret_entries = __atomic_load_n(&wal->st_recovered, __ATOMIC_RELAXED);
    wal_close(wal);
    return 0;
}

uint64_t wal_acked_next_seq(wal_t *wal)
{
    return __atomic_load_n(&wal->st_acked_next, __ATOMIC_ACQUIRE);
}

int wal_is_failed(const wal_t *wal)
{
    return __atomic_load_n(&wal->failed, __ATOMIC_ACQUIRE);
}

/* ---- reads ------------------------------------------------------------- */

static int stream_meta_get(wal_t *wal, MDB_txn *txn, const char *name, size_t len,
                           wal_stream_meta_t *m)
{
    MDB_val k = {len, (void *)name}, v;
    int rc = mdb_get(txn, wal->dbi_streams, &k, &v);
    if (rc)
        return map_mdb(rc);
    return wal_stream_meta_decode(v.mv_data, v.mv_size, m);
}

static void rec_view(const wal_rec_t *r, wal_record_t *out)
{
    out->seq = r->seq;
    out->offset = r->offset;
    out->timestamp_us = r->timestamp_us;
    out->stream_id = r->stream_id;
    out->direction = (r->flags & WAL_REC_FLAG_OUT) ? WAL_DIR_OUT : WAL_DIR_IN;
    out->producer = r->producer;
    out->producer_len = r->producer_len;
    out->msgid = r->msgid;
    out->msgid_len = r->msgid_len;
    out->headers = r->headers;
    out->headers_len = r->headers_len;
    out->payload = r->payload;
    out->payload_len = r->payload_len;
    out->checksum = r->checksum;
}

int wal_stream_read(wal_t *wal, const char *stream, size_t stream_len, uint64_t from,
                    uint32_t max_msgs, uint64_t max_bytes, wal_record_cb cb, void *arg,
                    wal_read_result_t *res)
{
    if (!stream || !stream_len || stream_len > WAL_STREAM_NAME_MAX || from == 0 || !cb || !res)
        return WAL_EINVAL;
    memset(res, 0, sizeof(*res));
    res->next = from;
    MDB_txn *txn;
    int rc = rtxn_begin(wal, &txn);
    if (rc)
        return rc;
    wal_stream_meta_t m;
    rc = stream_meta_get(wal, txn, stream, stream_len, &m);
    if (rc)
        goto out;
    if (from < m.first_offset) {
        res->next = m.first_offset;
        rc = WAL_ETRUNCATED;
        goto out;
    }
    uint64_t bytes = 0;
    for (uint64_t off = from; off < m.next_offset && res->count < max_msgs; off++) {
        if (res->count > 0 && bytes >= max_bytes)
            break;
        uint8_t ik[12];
        wal_put_be32(ik, m.id);
        wal_put_be64(ik + 4, off);
        MDB_val k = {12, ik}, v;
        int g = mdb_get(txn, wal->dbi_index, &k, &v);
        wal_rec_t r;
        if (g == 0 && v.mv_size == 8) {
            uint64_t seq = wal_get_be64(v.mv_data);
            MDB_val lk = {8, v.mv_data}, lv;
            g = mdb_get(txn, wal->dbi_log, &lk, &lv);
            if (g == 0 && wal_rec_decode(lv.mv_data, lv.mv_size, &r) == 0 && r.seq == seq &&
                r.stream_id == m.id && r.offset == off)
                goto good;
            res->bad_seq = seq;
        }
        if (g && g != MDB_NOTFOUND) {
            rc = map_mdb(g);
            goto out;
        }
        /* Missing index entry or record, or one that fails verification. */
        res->bad_offset = off;
        rc = WAL_ECORRUPT;
        goto out;
    good:;
        wal_record_t view;
        rec_view(&r, &view);
        view.stream = stream;
        view.stream_len = stream_len;
        bytes += r.payload_len;
        res->count++;
        res->next = off + 1;
        if (cb(&view, arg))
            break;
    }
out:
    rtxn_end(wal, txn);
    return rc;
}

int wal_log_read(wal_t *wal, uint64_t from, uint32_t max_msgs, uint64_t max_bytes, wal_record_cb cb,
                 void *arg, wal_read_result_t *res)
{
    if (!cb || !res)
        return WAL_EINVAL;
    memset(res, 0, sizeof(*res));
    if (from == 0)
        from = 1;
    res->next = from;
    MDB_txn *txn;
    MDB_cursor *cur;
    int rc = rtxn_cursor(wal, wal->dbi_log, &txn, &cur);
    if (rc)
        return rc;
    uint8_t sk[8];
    wal_put_be64(sk, from);
    MDB_val k = {8, sk}, v;
    uint64_t bytes = 0;
    uint32_t name_id = 0;
    MDB_val name = {0, NULL};
    int g = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    while (g == 0 && res->count < max_msgs && (res->count == 0 || bytes < max_bytes)) {
        uint64_t seq = k.mv_size == 8 ? wal_get_be64(k.mv_data) : 0;
        wal_rec_t r;
        if (k.mv_size != 8 || wal_rec_decode(v.mv_data, v.mv_size, &r) != 0 || r.seq != seq) {
            res->bad_seq = seq;
            rc = WAL_ECORRUPT;
            break;
        }
        if (r.stream_id != name_id || !name.mv_data) {
            uint8_t idk[4];
            wal_put_be32(idk, r.stream_id);
            MDB_val ik = {4, idk};
            if (mdb_get(txn, wal->dbi_ids, &ik, &name) != 0) {
                res->bad_seq = seq;
                res->bad_offset = r.offset;
                rc = WAL_ECORRUPT;
                break;
            }
            name_id = r.stream_id;
        }
        wal_record_t view;
        rec_view(&r, &view);
        view.stream = name.mv_data;
        view.stream_len = name.mv_size;
        bytes += r.payload_len;
        res->count++;
        res->next = seq + 1;
        if (cb(&view, arg))
            break;
        g = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    if (!rc && g != 0 && g != MDB_NOTFOUND)
        rc = map_mdb(g);
    rtxn_cursor_end(wal, txn, cur);
    return rc;
}

int wal_stream_get(wal_t *wal, const char *stream, size_t stream_len, wal_stream_info_t *ret)
{
    if (!stream || !stream_len || stream_len > WAL_STREAM_NAME_MAX || !ret)
        return WAL_EINVAL;
    MDB_txn *txn;
    int rc = rtxn_begin(wal, &txn);
    if (rc)
        return rc;
    wal_stream_meta_t m;
    rc = stream_meta_get(wal, txn, stream, stream_len, &m);
    rtxn_end(wal, txn);
    if (rc)
        return rc;
    ret->id = m.id;
    ret->epoch = m.epoch;
    ret->first_offset = m.first_offset;
    ret->next_offset = m.next_offset;
    ret->created_us = m.created_us;
    ret->name = NULL;
    ret->name_len = 0;
    return 0;
}

int wal_stream_list(wal_t *wal, wal_stream_cb cb, void *arg)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    int rc = rtxn_cursor(wal, wal->dbi_streams, &txn, &cur);
    if (rc)
        return rc;
    MDB_val k, v;
    for (int g = mdb_cursor_get(cur, &k, &v, MDB_FIRST); g == 0;
         g = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        wal_stream_meta_t m;
        rc = wal_stream_meta_decode(v.mv_data, v.mv_size, &m);
        if (rc)
            break;
        wal_stream_info_t info = {
            .id = m.id,
            .epoch = m.epoch,
            .first_offset = m.first_offset,
            .next_offset = m.next_offset,
            .created_us = m.created_us,
            .name = k.mv_data,
            .name_len = k.mv_size,
        };
        if (cb(&info, arg))
            break;
    }
    rtxn_cursor_end(wal, txn, cur);
    return rc;
}

int wal_cursor_get(wal_t *wal, const void *session, size_t session_len, const char *stream,
                   size_t stream_len, uint64_t *ret_offset)
{
    if (!session || !session_len || session_len > WAL_SESSION_MAX || !stream || !stream_len ||
        stream_len > WAL_STREAM_NAME_MAX || !ret_offset)
        return WAL_EINVAL;
    MDB_txn *txn;
    int rc = rtxn_begin(wal, &txn);
    if (rc)
        return rc;
    wal_stream_meta_t m;
    rc = stream_meta_get(wal, txn, stream, stream_len, &m);
    if (!rc) {
        uint8_t key[1 + WAL_SESSION_MAX + 4];
        key[0] = (uint8_t)session_len;
        memcpy(key + 1, session, session_len);
        wal_put_be32(key + 1 + session_len, m.id);
        MDB_val k = {1 + session_len + 4, key}, v;
        rc = map_mdb(mdb_get(txn, wal->dbi_cursors, &k, &v));
        wal_cursor_val_t cv;
        if (!rc)
            rc = wal_cursor_val_decode(v.mv_data, v.mv_size, &cv);
        if (!rc)
            *ret_offset = cv.offset;
    }
    rtxn_end(wal, txn);
    return rc;
}

/* ---- sessions -------------------------------------------------------- */

int wal_session_get(wal_t *wal, const void *session, size_t session_len, wal_session_t *ret)
{
    if (!session_ok(session, session_len) || !ret)
        return WAL_EINVAL;
    if (wal->no_sessions)
        return WAL_ENOTFOUND;
    MDB_txn *txn;
    int rc = rtxn_begin(wal, &txn);
    if (rc)
        return rc;
    MDB_val k = {session_len, (void *)session}, v;
    rc = map_mdb(mdb_get(txn, wal->dbi_sessions, &k, &v));
    if (!rc)
        rc = wal_session_val_decode(v.mv_data, v.mv_size, ret);
    rtxn_end(wal, txn);
    return rc;
}

int wal_session_list(wal_t *wal, wal_session_cb cb, void *arg)
{
    if (!cb)
        return WAL_EINVAL;
    if (wal->no_sessions)
        return 0;
    MDB_txn *txn;
    MDB_cursor *cur;
    int rc = rtxn_cursor(wal, wal->dbi_sessions, &txn, &cur);
    if (rc)
        return rc;
    MDB_val k, v;
    int grc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
    while (grc == 0) {
        wal_session_t s;
        if (wal_session_val_decode(v.mv_data, v.mv_size, &s) != 0) {
            rc = WAL_ECORRUPT;
            break;
        }
        if (cb(k.mv_data, k.mv_size, &s, arg))
            break;
        grc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    if (!rc && grc && grc != MDB_NOTFOUND)
        rc = map_mdb(grc);
    rtxn_cursor_end(wal, txn, cur);
    return rc;
}

int wal_session_cursors(wal_t *wal, const void *session, size_t session_len, wal_cursor_cb cb,
                        void *arg)
{
    if (!session_ok(session, session_len) || !cb)
        return WAL_EINVAL;
    uint8_t prefix[1 + WAL_SESSION_MAX];
    prefix[0] = (uint8_t)session_len;
    memcpy(prefix + 1, session, session_len);
    size_t plen = 1 + session_len;
    MDB_txn *txn;
    MDB_cursor *cur;
    int rc = rtxn_cursor(wal, wal->dbi_cursors, &txn, &cur);
    if (rc)
        return rc;
    MDB_val k = {plen, prefix}, v;
    int grc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    while (grc == 0 && k.mv_size == plen + 4 && memcmp(k.mv_data, prefix, plen) == 0) {
        wal_cursor_val_t cv;
        if (wal_cursor_val_decode(v.mv_data, v.mv_size, &cv) != 0) {
            rc = WAL_ECORRUPT;
            break;
        }
        MDB_val ik = {4, (uint8_t *)k.mv_data + plen}, name;
        if (mdb_get(txn, wal->dbi_ids, &ik, &name) == 0 &&
            cb(name.mv_data, name.mv_size, cv.offset, cv.updated_us, arg))
            break;
        grc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    if (!rc && grc && grc != MDB_NOTFOUND)
        rc = map_mdb(grc);
    rtxn_cursor_end(wal, txn, cur);
    return rc;
}

int wal_cursor_list(wal_t *wal, wal_cursor_all_cb cb, void *arg)
{
    if (!cb)
        return WAL_EINVAL;
    MDB_txn *txn;
    MDB_cursor *cur;
    int rc = rtxn_cursor(wal, wal->dbi_cursors, &txn, &cur);
    if (rc)
        return rc;
    MDB_val k, v;
    int grc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
    while (grc == 0) {
        const uint8_t *kp = k.mv_data;
        wal_cursor_val_t cv;
        if (k.mv_size < 6 || (size_t)kp[0] + 5 != k.mv_size ||
            wal_cursor_val_decode(v.mv_data, v.mv_size, &cv) != 0) {
            rc = WAL_ECORRUPT;
            break;
        }
        MDB_val ik = {4, (void *)(kp + 1 + kp[0])}, name;
        if (mdb_get(txn, wal->dbi_ids, &ik, &name) == 0 &&
            cb((const char *)kp + 1, kp[0], name.mv_data, name.mv_size, cv.offset, cv.updated_us,
               arg))
            break;
        grc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    if (!rc && grc && grc != MDB_NOTFOUND)
        rc = map_mdb(grc);
    rtxn_cursor_end(wal, txn, cur);
    return rc;
}

int wal_dedup_get(wal_t *wal, const void *producer, size_t producer_len, const void *msgid,
                  size_t msgid_len, uint32_t *ret_stream_id, uint64_t *ret_offset)
{
    if (producer_len > WAL_PRODUCER_MAX || (producer_len && !producer) || !msgid || !msgid_len ||
        msgid_len > WAL_MSGID_MAX)
        return WAL_EINVAL;
    uint8_t key[1 + WAL_PRODUCER_MAX + WAL_MSGID_MAX];
    key[0] = (uint8_t)producer_len;
    if (producer_len)
        memcpy(key + 1, producer, producer_len);
    memcpy(key + 1 + producer_len, msgid, msgid_len);
    MDB_txn *txn;
    int rc = rtxn_begin(wal, &txn);
    if (rc)
        return rc;
    MDB_val k = {1 + producer_len + msgid_len, key}, v;
    rc = map_mdb(mdb_get(txn, wal->dbi_dedup, &k, &v));
    wal_dedup_val_t dv;
    if (!rc)
        rc = wal_dedup_val_decode(v.mv_data, v.mv_size, &dv);
    rtxn_end(wal, txn);
    if (rc)
        return rc;
    if (ret_stream_id)
        *ret_stream_id = dv.stream_id;
    if (ret_offset)
        *ret_offset = dv.offset;
    return 0;
}

int wal_stats_get(wal_t *wal, wal_stats_t *ret)
{
    MDB_txn *txn;
    int rc = rtxn_begin(wal, &txn);
    if (rc)
        return rc;
    wal_stats_t s = {0};
    MDB_envinfo info;
    MDB_stat st;
    mdb_env_info(wal->env, &info);
    mdb_env_stat(wal->env, &st);
    s.map_size = info.me_mapsize;
    s.used_bytes = (uint64_t)(info.me_last_pgno + 1) * st.ms_psize;
    s.live_bytes = pages_in_use(wal, txn) * st.ms_psize;
    MDB_val k = {8, "next_seq"}, v;
    s.next_seq = 1;
    if (mdb_get(txn, wal->dbi_meta, &k, &v) == 0 && v.mv_size == 8)
        s.next_seq = wal_get_le64(v.mv_data);
    MDB_val ck = {10, "created_us"};
    if (mdb_get(txn, wal->dbi_meta, &ck, &v) == 0 && v.mv_size == 8)
        s.created_us = (int64_t)wal_get_le64(v.mv_data);
    MDB_cursor *cur;
    s.first_seq = s.next_seq;
    if (mdb_cursor_open(txn, wal->dbi_log, &cur) == 0) {
        MDB_val lk, lv;
        if (mdb_cursor_get(cur, &lk, &lv, MDB_FIRST) == 0 && lk.mv_size == 8)
            s.first_seq = wal_get_be64(lk.mv_data);
        mdb_cursor_close(cur);
    }
    rtxn_end(wal, txn);
    s.commits = __atomic_load_n(&wal->st_commits, __ATOMIC_RELAXED);
    s.committed_msgs = __atomic_load_n(&wal->st_msgs, __ATOMIC_RELAXED);
    s.failed_commits = __atomic_load_n(&wal->st_failed, __ATOMIC_RELAXED);
    s.map_grows = __atomic_load_n(&wal->st_grows, __ATOMIC_RELAXED);
    for (size_t i = 0; i < WAL_HIST_BUCKETS; i++) {
        s.commit_us_buckets[i] = __atomic_load_n(&wal->st_commit_us[i], __ATOMIC_RELAXED);
        s.batch_buckets[i] = __atomic_load_n(&wal->st_batch[i], __ATOMIC_RELAXED);
    }
    s.commit_us_sum = __atomic_load_n(&wal->st_commit_us_sum, __ATOMIC_RELAXED);
    s.applies = __atomic_load_n(&wal->st_applies, __ATOMIC_RELAXED);
    s.apply_us_sum = __atomic_load_n(&wal->st_apply_us_sum, __ATOMIC_RELAXED);
    s.recovered_entries = __atomic_load_n(&wal->st_recovered, __ATOMIC_RELAXED);
    s.acked_next_seq = __atomic_load_n(&wal->st_acked_next, __ATOMIC_ACQUIRE);
    if (s.acked_next_seq < s.next_seq)
        s.acked_next_seq = s.next_seq;
    s.journal = wal->jfd >= 0;
    *ret = s;
    return 0;
}

/* ---- restore ----------------------------------------------------------- */

/* Take the writer's place for one restore call (see wal.h): nothing queued,
 * no batch or retention running; appends submitted meanwhile get
 * WAL_EBUSY. The writer thread stays asleep: it wakes only for queued work,
 * which submit now refuses. */
static int restore_enter(wal_t *wal)
{
    if (wal->read_only)
        return WAL_ECLOSED;
    pthread_mutex_lock(&wal->mu);
    int rc = 0;
    if (__atomic_load_n(&wal->failed, __ATOMIC_ACQUIRE))
        rc = WAL_EFATAL;
    else if (wal->closing)
        rc = WAL_ECLOSED;
    else if (wal->q_head || wal->retain || wal->writer_busy || wal->restoring)
        rc = WAL_EBUSY;
    else
        wal->restoring = true;
    pthread_mutex_unlock(&wal->mu);
    return rc;
}

static void restore_leave(wal_t *wal)
{
    pthread_mutex_lock(&wal->mu);
    wal->restoring = false;
    pthread_mutex_unlock(&wal->mu);
}

/* The status of a failed restore transaction, as batch_run maps a batch's. */
static int restore_status(wal_t *wal, int rc)
{
    if (rc == WAL_EINVAL || rc == MDB_KEYEXIST || rc == MDB_BAD_VALSIZE || rc == EINVAL ||
        rc == MDB_TXN_FULL)
        return WAL_EINVAL;
    if (rc == MDB_MAP_FULL || rc == ENOSPC || rc == EDQUOT)
        return WAL_EFULL;
    if (rc == ENOMEM || rc == WAL_ENOMEM)
        return WAL_ENOMEM;
    fail_stop(wal);
    return WAL_EFATAL;
}

static void restore_begin_batch(wal_t *wal)
{
    wal->gen++;
    if (wal->gen == 0)
        wal->gen = 1;
    wal->n_touched = 0;
}

static int restore_put(wal_t *wal, MDB_txn *txn, const wal_restore_msg_t *r);

/* One restore transaction: the records (if any), the touched stream heads,
 * and next_seq when asked. Returns an LMDB/errno code. */
static int restore_txn(wal_t *wal, const wal_restore_msg_t *msgs, size_t n, bool with_seq)
{
    MDB_txn *txn;
    int mrc = mdb_txn_begin(wal->env, NULL, 0, &txn);
    if (mrc)
        return mrc;
    for (size_t i = 0; i < n && !mrc; i++)
        mrc = restore_put(wal, txn, &msgs[i]);
    if (!mrc)
        mrc = write_heads(wal, txn);
    if (!mrc && with_seq)
        mrc = write_next_seq(wal, txn);
    if (mrc) {
        mdb_txn_abort(txn);
        return mrc;
    }
    return txn_commit(wal, txn);
}

int wal_restore_stream(wal_t *wal, const wal_restore_stream_t *s)
{
    if (!s || !stream_ok(s->stream, s->stream_len) || s->epoch == 0 || s->first_offset == 0 ||
        s->first_offset == UINT64_MAX)
        return WAL_EINVAL;
    int rc = restore_enter(wal);
    if (rc)
        return rc;
    uint64_t h = name_hash(s->stream, s->stream_len);
    struct head *e = head_find(wal, s->stream, s->stream_len, h);
    uint32_t id = s->id ? s->id : wal->next_stream_id;
    if ((e && e->committed) || id == 0 || id == UINT32_MAX ||
        (id < wal->by_id_cap && wal->by_id[id] && wal->by_id[id] != e)) {
        rc = WAL_EINVAL;
        goto out;
    }
    if (!e) {
        rc = head_insert(wal, s->stream, s->stream_len, h, &e);
        if (rc)
            goto out;
    }
    for (;;) {
        uint64_t saved_seq = wal->next_seq;
        uint32_t saved_id = wal->next_stream_id;
        restore_begin_batch(wal);
        rc = head_touch(wal, e);
        if (rc)
            break;
        e->pending.id = id;
        e->pending.epoch = s->epoch;
        e->pending.first_offset = s->first_offset;
        e->pending.next_offset = s->first_offset;
        e->pending.created_us = s->created_us;
        if (id >= wal->next_stream_id)
            wal->next_stream_id = id + 1;
        rc = head_set_id(wal, e);
        if (rc) {
            batch_rollback(wal, saved_seq, saved_id);
            break;
        }
        int mrc = restore_txn(wal, NULL, 0, false);
        if (!mrc) {
            batch_apply(wal);
            rc = 0;
            break;
        }
        batch_rollback(wal, saved_seq, saved_id);
        if (mrc == MDB_MAP_FULL && map_grow(wal, false) == 0)
            continue;
        rc = restore_status(wal, mrc);
        break;
    }
out:
    restore_leave(wal);
    return rc;
}

static bool restore_msg_ok(const wal_t *wal, const wal_restore_msg_t *r)
{
    const wal_msg_t *m = &r->msg;
    return r->seq != 0 && r->seq != UINT64_MAX && r->offset != 0 &&
           stream_ok(m->stream, m->stream_len) && m->producer_len <= WAL_PRODUCER_MAX &&
           m->msgid_len <= WAL_MSGID_MAX && m->headers_len <= WAL_HEADERS_MAX &&
           m->payload_len <= UINT32_MAX && m->payload_len <= wal->opts.max_record_bytes &&
           (!m->payload_len || m->payload) && (!m->producer_len || m->producer) &&
           (!m->msgid_len || m->msgid) && (!m->headers_len || m->headers) &&
           (m->direction == WAL_DIR_IN || m->direction == WAL_DIR_OUT);
}

/* One restored record into txn (the stream's head is touched). */
static int restore_put(wal_t *wal, MDB_txn *txn, const wal_restore_msg_t *r)
{
    const wal_msg_t *m = &r->msg;
    struct head *e = head_find(wal, m->stream, m->stream_len, name_hash(m->stream, m->stream_len));
    if (!e || !e->committed)
        return WAL_EINVAL;
    int rc = head_touch(wal, e);
    if (rc)
        return rc;
    if (r->offset != e->pending.next_offset)
        return WAL_EINVAL;
    wal_rec_t rec = {
        .flags = m->direction == WAL_DIR_OUT ? WAL_REC_FLAG_OUT : 0,
        .stream_id = e->pending.id,
        .seq = r->seq,
        .offset = r->offset,
        .timestamp_us = m->timestamp_us,
        .producer = m->producer,
        .producer_len = (uint16_t)m->producer_len,
        .msgid = m->msgid,
        .msgid_len = (uint16_t)m->msgid_len,
        .headers = m->headers,
        .headers_len = (uint16_t)m->headers_len,
        .payload = m->payload,
        .payload_len = (uint32_t)m->payload_len,
    };
    uint8_t dkey[1 + WAL_PRODUCER_MAX + WAL_MSGID_MAX];
    size_t dkey_len = 0;
    if (m->msgid_len) {
        dkey[0] = (uint8_t)m->producer_len;
        if (m->producer_len)
            memcpy(dkey + 1, m->producer, m->producer_len);
        memcpy(dkey + 1 + m->producer_len, m->msgid, m->msgid_len);
        dkey_len = 1 + m->producer_len + m->msgid_len;
    }
    rc = put_record(wal, txn, &rec, MDB_NOOVERWRITE, dkey, dkey_len, m->timestamp_us);
    if (rc)
        return rc;
    e->pending.next_offset++;
    if (rec.seq >= wal->next_seq)
        wal->next_seq = rec.seq + 1;
    return 0;
}

int wal_restore_append(wal_t *wal, const wal_restore_msg_t *msgs, size_t n)
{
    if (n == 0 || !msgs)
        return WAL_EINVAL;
    for (size_t i = 0; i < n; i++)
        if (!restore_msg_ok(wal, &msgs[i]))
            return WAL_EINVAL;
    int rc = restore_enter(wal);
    if (rc)
        return rc;
    for (;;) {
        uint64_t saved_seq = wal->next_seq;
        uint32_t saved_id = wal->next_stream_id;
        restore_begin_batch(wal);
        int mrc = restore_txn(wal, msgs, n, true);
        if (!mrc) {
            batch_apply(wal);
            rc = 0;
            break;
        }
        batch_rollback(wal, saved_seq, saved_id);
        if (mrc == MDB_MAP_FULL && map_grow(wal, false) == 0)
            continue;
        rc = restore_status(wal, mrc);
        break;
    }
    restore_leave(wal);
    return rc;
}

int wal_restore_seq(wal_t *wal, uint64_t next_seq)
{
    if (next_seq == 0 || next_seq == UINT64_MAX)
        return WAL_EINVAL;
    int rc = restore_enter(wal);
    if (rc)
        return rc;
    if (next_seq > wal->next_seq) {
        uint64_t saved = wal->next_seq;
        wal->next_seq = next_seq;
        restore_begin_batch(wal); /* no heads touched: only next_seq is written */
        int mrc = restore_txn(wal, NULL, 0, true);
        if (mrc) {
            wal->next_seq = saved;
            rc = restore_status(wal, mrc);
        }
    }
    restore_leave(wal);
    return rc;
}

/* ---- backup ------------------------------------------------------------ */

static int fsync_path(const char *path, int flags)
{
    int fd = open(path, flags | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = fsync(fd);
    int saved = errno;
    (void)close(fd);
    errno = saved;
    return rc;
}

int wal_backup(wal_t *wal, const char *dir, char *errbuf, size_t errlen)
{
    if (!dir || !*dir)
        return WAL_EINVAL;
    size_t dlen = strlen(dir);
    char *file = malloc(dlen + sizeof("/data.mdb"));
    if (!file)
        return WAL_ENOMEM;
    memcpy(file, dir, dlen);
    memcpy(file + dlen, "/data.mdb", sizeof("/data.mdb"));
    struct stat st;
    int rc = 0;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        errf(errbuf, errlen, "backup directory '%s' does not exist", dir);
        rc = WAL_EINVAL;
        goto out;
    }
    if (stat(file, &st) == 0) {
        errf(errbuf, errlen, "'%s' already exists: refusing to overwrite it", file);
        rc = WAL_EINVAL;
        goto out;
    }
    int mrc;
    for (;;) {
        pthread_rwlock_rdlock(&wal->map_lock);
        mrc = mdb_env_copy2(wal->env, dir, MDB_CP_COMPACT);
        pthread_rwlock_unlock(&wal->map_lock);
        if (mrc != MDB_MAP_RESIZED)
            break;
        /* Another process grew the map: adopt its size and copy again. */
        (void)unlink(file);
        pthread_rwlock_wrlock(&wal->map_lock);
        mrc = mdb_env_set_mapsize(wal->env, 0);
        pthread_rwlock_unlock(&wal->map_lock);
        if (mrc)
            break;
    }
    if (mrc) {
        errf(errbuf, errlen, "copy to '%s': %s", file, mdb_strerror(mrc));
        (void)unlink(file);
        rc = map_mdb(mrc);
        goto out;
    }
    /* mdb_env_copy2 neither fsyncs nor sets a private mode. */
    if (chmod(file, 0600) != 0 || fsync_path(file, O_RDONLY) != 0 ||
        fsync_path(dir, O_RDONLY | O_DIRECTORY) != 0) {
        errf(errbuf, errlen, "sync '%s': %s", file, strerror(errno));
        (void)unlink(file);
        rc = WAL_EIO;
    }
out:
    free(file);
    return rc;
}
