/*
 * wal.c - ARQ's write-ahead log on LMDB: environment, group commit writer,
 * reads, cursors, dedup, retention. This file: open (with journal
 * recovery), close, backup and shared helpers; wal_int.h lists the others.
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
 *   and <dir>/journal + <dir>/journal.1, a redo log in front of LMDB
 *   (wal_journal.h).
 *
 * Durability. Every write happens on the writer thread. A batch is written
 * into an LMDB child transaction of `outer` while its LMDB writes are
 * recorded as one journal entry; the entry is appended and fdatasynced (one
 * sequential flush: the batch's durable point, where requests marked
 * wal_append_when_durable complete), then the child commits into `outer`.
 * `outer` is committed (folded) every apply_us or after apply_idle_us idle:
 * mdb_txn_commit() flushes the data pages and writes the meta page, which
 * MDB_NOMETASYNC leaves to the next LMDB commit's flush; the other requests
 * complete then, and the entries go to the journal's other file from offset
 * 0, so the fold's entries outlive its unflushed meta page (outer_commit).
 * Every other LMDB commit is flushed whole (wal_meta_sync). wal_open folds
 * in whatever entries LMDB lacks (journal_recover). Without a journal every batch is `outer` alone,
 * committed at once. Nothing is acknowledged before it is durable. A commit that fails with
 * anything but "no space" makes the WAL fail-stop: after an fsync error the
 * kernel may have dropped the dirty pages, so a retry could report success
 * for data that is not on disk (the PostgreSQL "fsyncgate" lesson). No
 * space fails only the batch, before anything is written: data.mdb keeps
 * its blocks allocated ahead of the map (wal_space.c), so a full disk is
 * met where the map must grow, not as a short write inside LMDB's commit
 * (which LMDB would report as EIO). A fold that finds no space is deferred
 * (the journal keeps its batches) and retried.
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
#include "wal_int.h"

/* Latency buckets reach 10 s: an alert on "p95 over 200 ms" needs buckets
 * around and far above it (a stalled disk takes seconds). */
const uint64_t wal_commit_us_bounds[WAL_HIST_BUCKETS - 1] = {
    25,    50,    100,    250,    500,    1000,    2500,    5000,    10000,
    25000, 50000, 100000, 200000, 500000, 1000000, 2500000, 5000000, 10000000};
const uint64_t wal_batch_bounds[WAL_HIST_BUCKETS - 1] = {
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072};

void wal_hist_add(uint64_t *buckets, const uint64_t *bounds, uint64_t v)
{
    size_t i = 0;
    while (i < WAL_HIST_BUCKETS - 1 && v > bounds[i])
        i++;
    __atomic_add_fetch(&buckets[i], 1, __ATOMIC_RELAXED);
}

int64_t wal_mono_us(void)
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

int64_t wal_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Translate an LMDB / errno code at the module edge. */
int wal_map_mdb(int rc)
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

__attribute__((format(printf, 3, 4))) static void wal_errf(char *buf, size_t len, const char *fmt,
                                                           ...)
{
    if (!buf || !len)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
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
        {"dedup2", &wal->dbi_dedup2},
    };
    for (size_t i = 0; i < sizeof(dbs) / sizeof(dbs[0]); i++) {
        int rc = mdb_dbi_open(txn, dbs[i].name, flags, dbs[i].dbi);
        if (rc == MDB_NOTFOUND && dbs[i].dbi == &wal->dbi_sessions) {
            wal->no_sessions = true; /* a read-only open of a WAL from before sessions */
            continue;
        }
        if (rc == MDB_NOTFOUND && dbs[i].dbi == &wal->dbi_dedup2) {
            wal->no_dedup2 = true; /* a read-only open of a format-2 WAL */
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
            wal_errf(errbuf, errlen, "'%s' holds no ARQ format version", wal->dir);
            return WAL_ECORRUPT;
        }
        uint8_t buf[8];
        wal_put_le32(buf, WAL_FORMAT_VERSION);
        v.mv_size = 4;
        v.mv_data = buf;
        rc = mdb_put(txn, wal->dbi_meta, &k, &v, 0);
        if (rc)
            return wal_map_mdb(rc);
        wal_put_le64(buf, (uint64_t)wal_now_us());
        MDB_val ck = {10, "created_us"}, cv = {8, buf};
        return wal_map_mdb(mdb_put(txn, wal->dbi_meta, &ck, &cv, 0));
    }
    if (rc)
        return wal_map_mdb(rc);
    if (v.mv_size != 4) {
        wal_errf(errbuf, errlen, "'%s': format version entry has %zu bytes, expected 4", wal->dir,
                 v.mv_size);
        return WAL_ECORRUPT;
    }
    uint32_t ver = wal_get_le32(v.mv_data);
    if (ver > WAL_FORMAT_VERSION) {
        wal_errf(errbuf, errlen,
                 "'%s' was written with WAL format version %u; this build reads up to version %u: "
                 "upgrade ARQ",
                 wal->dir, ver, WAL_FORMAT_VERSION);
        return WAL_EVERSION;
    }
    if (ver == 0) {
        wal_errf(errbuf, errlen, "'%s': format version 0 is invalid", wal->dir);
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
        return wal_map_mdb(mdb_put(txn, wal->dbi_meta, &k, &nv, 0));
    }
    return 0;
}

/*
 * Format 2 keyed dedup entries by (producer, msgid) in `dedup`; format 3
 * by (producer, stream id, msgid) in `dedup2`, so that a msgid reused on
 * another stream is not taken for a duplicate. Move every old entry (its
 * value names its stream) in transactions of DEDUP_MOVE_CHUNK: each moves
 * entries atomically, so an interrupted conversion resumes at the next
 * open, and lookups meanwhile find either form (wal_dedup_get).
 */
#define DEDUP_MOVE_CHUNK 20000

static int dedup_convert(wal_t *wal, uint64_t *ret_moved, char *errbuf, size_t errlen)
{
    *ret_moved = 0;
    for (;;) {
        MDB_txn *txn;
        int rc = mdb_txn_begin(wal->env, NULL, 0, &txn);
        if (rc)
            return rc;
        MDB_cursor *cur;
        rc = mdb_cursor_open(txn, wal->dbi_dedup, &cur);
        unsigned n = 0;
        MDB_val k, v;
        while (!rc && n < DEDUP_MOVE_CHUNK && mdb_cursor_get(cur, &k, &v, MDB_FIRST) == 0) {
            wal_dedup_val_t dv;
            const uint8_t *key = k.mv_data;
            if (k.mv_size < 2 || (size_t)key[0] + 1 >= k.mv_size ||
                wal_dedup_val_decode(v.mv_data, v.mv_size, &dv) != 0) {
                rc = mdb_cursor_del(cur, 0); /* unreadable: a dedup entry is a hint only */
                n++;
                continue;
            }
            uint8_t nk[WAL_DEDUP_KEY_MAX];
            uint8_t val[WAL_DEDUP_VAL_SIZE];
            memcpy(val, v.mv_data, sizeof(val) <= v.mv_size ? sizeof(val) : v.mv_size);
            MDB_val nkv = {wal_dedup_key(nk, key + 1, key[0], dv.stream_id, key + 1 + key[0],
                                         k.mv_size - 1 - key[0]),
                           nk},
                    nvv = {sizeof(val), val};
            rc = mdb_cursor_del(cur, 0);
            if (!rc)
                rc = mdb_put(txn, wal->dbi_dedup2, &nkv, &nvv, 0);
            n++;
        }
        mdb_cursor_close(cur);
        if (rc || n == 0) {
            mdb_txn_abort(txn);
            if (rc)
                wal_errf(errbuf, errlen, "converting dedup entries in '%s': %s", wal->dir,
                         mdb_strerror(rc));
            return rc;
        }
        rc = wal_txn_commit(wal, txn);
        if (rc == MDB_MAP_FULL && wal_map_grow(wal, false) == 0)
            continue;
        if (rc) {
            wal_errf(errbuf, errlen, "converting dedup entries in '%s': %s", wal->dir,
                     mdb_strerror(rc));
            return rc;
        }
        *ret_moved += n;
    }
}

/* Rebuild the writer's in-memory heads and counters from the streams DB. */
int wal_load_heads(wal_t *wal, MDB_txn *txn, char *errbuf, size_t errlen)
{
    MDB_cursor *cur;
    int rc = mdb_cursor_open(txn, wal->dbi_streams, &cur);
    if (rc)
        return wal_map_mdb(rc);
    MDB_val k, v;
    wal->next_stream_id = 1;
    for (int g = mdb_cursor_get(cur, &k, &v, MDB_FIRST); g == 0;
         g = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        wal_stream_meta_t m;
        rc = wal_stream_meta_decode(v.mv_data, v.mv_size, &m);
        if (rc) {
            wal_errf(errbuf, errlen, "stream '%.*s': metadata %s", (int)k.mv_size,
                     (const char *)k.mv_data, wal_strerror(rc));
            break;
        }
        struct head *e;
        rc = wal_head_insert(wal, k.mv_data, k.mv_size, wal_name_hash(k.mv_data, k.mv_size), &e);
        if (rc)
            break;
        e->meta = e->pending = m;
        e->committed = true;
        rc = wal_head_set_id(wal, e);
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
        return wal_map_mdb(rc);
    /* The log's last key is the ground truth if it is ahead. */
    rc = mdb_cursor_open(txn, wal->dbi_log, &cur);
    if (rc)
        return wal_map_mdb(rc);
    if (mdb_cursor_get(cur, &k, &v, MDB_LAST) == 0 && k.mv_size == 8) {
        uint64_t last = wal_get_be64(k.mv_data);
        if (last >= wal->next_seq)
            wal->next_seq = last + 1;
    }
    mdb_cursor_close(cur);
    return 0;
}

/* ---- journal: open and recovery ------------------------------------------ */

/* Open (creating) journal file f: `journal` (0) or `journal.1` (1). */
static int journal_open_file(wal_t *wal, unsigned f, int *ret_fd, bool *ret_new, char *errbuf,
                             size_t errlen)
{
    const char *name = f ? "/journal.1" : "/journal";
    size_t plen = strlen(wal->dir) + strlen(name) + 1;
    char *path = malloc(plen);
    if (!path)
        return WAL_ENOMEM;
    snprintf(path, plen, "%s%s", wal->dir, name);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        wal_errf(errbuf, errlen, "cannot open journal '%s': %s", path, strerror(errno));
        free(path);
        return WAL_EIO;
    }
    free(path);
    struct stat st;
    if (fstat(fd, &st) != 0) {
        wal_errf(errbuf, errlen, "journal: %s", strerror(errno));
        close(fd);
        return WAL_EIO;
    }
    *ret_fd = fd;
    *ret_new = st.st_size == 0;
    wal->jfile[f] = (uint64_t)st.st_size;
    return 0;
}

/* Open (creating) the journal's two files and lock the first. Another
 * process that has this WAL open for writing holds the lock: we then commit
 * every batch to LMDB directly and leave the journal alone. */
static int journal_open(wal_t *wal, char *errbuf, size_t errlen)
{
    int fd0, fd1;
    bool new0, new1;
    int rc = journal_open_file(wal, 0, &fd0, &new0, errbuf, errlen);
    if (rc)
        return rc;
    if (flock(fd0, LOCK_EX | LOCK_NB) != 0) {
        close(fd0);
        wal->jfile[0] = 0;
        return 0;
    }
    rc = journal_open_file(wal, 1, &fd1, &new1, errbuf, errlen);
    if (rc) {
        close(fd0);
        return rc;
    }
    wal->jfd[0] = fd0;
    wal->jfd[1] = fd1;
    if (new0 || new1) {
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
    MDB_dbi dbi = wal_jdb_dbi(wal, op->db);
    MDB_val k = {op->key_len, (void *)op->key};
    if (op->kind == WAL_JOP_PUT) {
        MDB_val v = {op->val_len, (void *)op->val};
        return mdb_put(txn, dbi, &k, &v, 0);
    }
    if (op->kind == WAL_JOP_DEL) {
        int rc = mdb_del(txn, dbi, &k, NULL);
        return rc == MDB_NOTFOUND ? 0 : rc;
    }
    return wal_del_prefix(txn, dbi, op->key, op->key_len);
}

/* The unbroken run of entries at the start of one journal file. */
struct jrun {
    bool have;
    uint64_t first, end; /* jseq of its first entry; one past its last */
};

struct jscan {
    uint8_t *body;
    size_t body_cap;
    uint64_t applied;
};

/*
 * Read journal file f from offset 0 while each entry has the magic, a body
 * inside the file, a valid checksum and the jseq one above the previous
 * one's; fill *run. With txn, apply the ops of the entries with jseq in
 * [from, to) to it. Returns an LMDB/errno code (MDB_CORRUPTED for a
 * malformed op inside an entry whose checksum is valid).
 */
static int journal_run(wal_t *wal, unsigned f, MDB_txn *txn, uint64_t from, uint64_t to,
                       struct jscan *sc, struct jrun *run, char *errbuf, size_t errlen)
{
    uint8_t hdr[WAL_JOURNAL_HDR];
    uint64_t off = 0, size = wal->jfile[f];
    int rc = 0;
    *run = (struct jrun){0};
    while (!rc && off + WAL_JOURNAL_HDR <= size) {
        ssize_t got = pread(wal->jfd[f], hdr, sizeof(hdr), (off_t)off);
        wal_jentry_t e;
        if (got != (ssize_t)sizeof(hdr) || wal_jentry_decode_header(hdr, size - off, &e) != 0 ||
            (run->have && e.jseq != run->end))
            break;
        if (e.body_len > sc->body_cap) {
            uint8_t *nb = realloc(sc->body, e.body_len);
            if (!nb)
                return ENOMEM;
            sc->body = nb;
            sc->body_cap = e.body_len;
        }
        if (e.body_len && pread(wal->jfd[f], sc->body, e.body_len,
                                (off_t)(off + WAL_JOURNAL_HDR)) != (ssize_t)e.body_len)
            break;
        e.body = sc->body;
        if (wal_jentry_verify(hdr, &e) != 0)
            break;
        if (txn && e.jseq >= from && e.jseq < to) {
            size_t pos = 0;
            wal_jop_t op;
            int g;
            while (!rc && (g = wal_jop_next(e.body, e.body_len, &pos, &op)) == 1)
                rc = journal_apply_op(wal, txn, &op);
            if (!rc && g < 0) {
                wal_errf(errbuf, errlen, "journal%s entry %llu at byte %llu: malformed op",
                         f ? ".1" : "", (unsigned long long)e.jseq, (unsigned long long)off);
                rc = MDB_CORRUPTED;
            }
            sc->applied++;
        }
        if (!run->have)
            run->first = e.jseq;
        run->have = true;
        run->end = e.jseq + 1;
        off += e.size;
    }
    return rc;
}

/*
 * Fold into LMDB, in one durable transaction, every journal entry that
 * LMDB does not hold yet: from meta "journal_next" on, the chain of
 * entries with consecutive sequence numbers through the runs at the start
 * of the two files (a fold moves the writer to the other file, so the
 * chain may start in either and continue in the other). A run ends at
 * zeroes, a torn or stale entry (an older lap of the file) or the end of
 * the file. Sets wal->jseq past every entry seen; the journal restarts at
 * offset 0 of its first file.
 */
int wal_journal_recover(wal_t *wal, char *errbuf, size_t errlen)
{
    struct jscan sc = {0};
    int rc;
    for (;;) {
        MDB_txn *txn;
        rc = mdb_txn_begin(wal->env, NULL, 0, &txn);
        if (rc)
            break;
        uint64_t next = 0;
        MDB_val mk = {12, "journal_next"}, mv;
        if (mdb_get(txn, wal->dbi_meta, &mk, &mv) == 0 && mv.mv_size == 8)
            next = wal_get_le64(mv.mv_data);
        struct jrun runs[2];
        for (unsigned f = 0; f < 2 && !rc; f++)
            rc = journal_run(wal, f, NULL, 0, 0, &sc, &runs[f], errbuf, errlen);
        /* Follow the chain from next: at most once through each file. */
        uint64_t last = next, seen = next;
        bool used[2] = {false, false};
        sc.applied = 0;
        for (unsigned step = 0; step < 2 && !rc; step++) {
            unsigned f = 0;
            while (f < 2 &&
                   (used[f] || !runs[f].have || runs[f].first > last || runs[f].end <= last))
                f++;
            if (f == 2)
                break;
            struct jrun again;
            rc = journal_run(wal, f, txn, last, runs[f].end, &sc, &again, errbuf, errlen);
            used[f] = true;
            last = runs[f].end;
        }
        for (unsigned f = 0; f < 2; f++)
            if (runs[f].have && runs[f].end > seen)
                seen = runs[f].end;
        if (!rc && last == next) {
            /* Nothing to fold in. The files are rewritten from here on, so
             * LMDB's last commit must be durable: a killed writer may have
             * left its last fold's meta page unflushed (MDB_NOMETASYNC). */
            mdb_txn_abort(txn);
            rc = mdb_env_sync(wal->env, 1);
            if (!rc) {
                wal->jseq = seen;
                wal->jcur = 0;
                wal->joff = 0;
            }
            break;
        }
        if (!rc) {
            uint8_t b[8];
            wal_put_meta_u64(b, last);
            MDB_val v = {8, b};
            rc = mdb_put(txn, wal->dbi_meta, &mk, &v, 0);
        }
        if (rc) {
            mdb_txn_abort(txn);
            if (rc == MDB_MAP_FULL &&
                (wal_map_grow(wal, false) == 0 || wal_map_grow(wal, true) == 0)) {
                rc = 0;
                continue;
            }
            break;
        }
        rc = mdb_txn_commit(txn);
        if (rc == MDB_MAP_FULL && (wal_map_grow(wal, false) == 0 || wal_map_grow(wal, true) == 0)) {
            rc = 0;
            continue;
        }
        if (!rc)
            rc = mdb_env_sync(wal->env, 1); /* as above */
        if (!rc) {
            wal->jseq = seen;
            wal->jcur = 0;
            wal->joff = 0;
            __atomic_add_fetch(&wal->st_recovered, sc.applied, __ATOMIC_RELAXED);
        }
        break;
    }
    free(sc.body);
    if (rc && rc != MDB_CORRUPTED)
        wal_errf(errbuf, errlen, "journal recovery in '%s': %s", wal->dir, mdb_strerror(rc));
    return rc == MDB_CORRUPTED ? WAL_ECORRUPT : rc ? wal_map_mdb(rc) : 0;
}

static void opts_defaults(wal_options_t *o)
{
    if (!o->map_size)
        o->map_size = DEF_MAP_SIZE;
    if (!o->map_size_max)
        o->map_size_max = DEF_MAP_MAX;
    if (o->map_size_max < MIN_MAP_MAX)
        o->map_size_max = MIN_MAP_MAX;
    if (o->map_size > o->map_size_max)
        o->map_size = o->map_size_max; /* a small maximum is honoured */
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
    wal_heads_free(wal);
    for (unsigned f = 0; f < 2; f++)
        if (wal->jfd[f] >= 0)
            close(wal->jfd[f]); /* the first one releases the flock */
    free(wal->jbuf);
    pthread_rwlock_destroy(&wal->map_lock);
    pthread_mutex_destroy(&wal->mu);
    pthread_cond_destroy(&wal->cond);
    pthread_cond_destroy(&wal->done_cond);
    pthread_mutex_destroy(&wal->done_mu);
    pthread_mutex_destroy(&wal->st_mu);
    free(wal->dir);
    free(wal);
}

/* fsync a file or directory (flags: O_RDONLY, | O_DIRECTORY): a new entry
 * in a directory (a file, or the data directory in its parent) survives a
 * power cut only once that directory is synced. -1 with errno on failure. */
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

static int fsync_parent(const char *path)
{
    char *copy = strdup(path);
    if (!copy)
        return ENOMEM;
    size_t n = strlen(copy);
    while (n > 1 && copy[n - 1] == '/')
        copy[--n] = 0;
    char *slash = strrchr(copy, '/');
    const char *parent = ".";
    if (slash == copy)
        parent = "/";
    else if (slash) {
        *slash = 0;
        parent = copy;
    }
    int rc = fsync_path(parent, O_RDONLY | O_DIRECTORY) == 0 ? 0 : errno;
    free(copy);
    return rc;
}

int wal_open(const wal_options_t *opts, struct event_base *base, wal_t **ret_wal, char *errbuf,
             size_t errlen)
{
    if (!opts || !opts->dir || !*opts->dir || !ret_wal) {
        wal_errf(errbuf, errlen, "no data directory given");
        return WAL_EINVAL;
    }
    if (opts->sync != WAL_SYNC_FULL && opts->sync != WAL_SYNC_NONE) {
        wal_errf(errbuf, errlen, "unknown sync mode %d", (int)opts->sync);
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
    wal->jfd[0] = wal->jfd[1] = -1;
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
    pthread_mutex_init(&wal->st_mu, NULL);
    wal->data_fd = -1;
    if (errbuf && errlen)
        errbuf[0] = 0;
    int rc = 0;
    MDB_txn *txn = NULL;
    bool new_env = false;
    if (!wal->dir) {
        rc = WAL_ENOMEM;
        goto fail;
    }
    if (!wal->read_only) {
        if (mkdir(wal->dir, 0700) == 0) {
            int frc = fsync_parent(wal->dir);
            if (frc) {
                wal_errf(errbuf, errlen, "cannot sync the directory holding '%s': %s", wal->dir,
                         strerror(frc));
                rc = WAL_EIO;
                goto fail;
            }
        } else if (errno != EEXIST) {
            wal_errf(errbuf, errlen, "cannot create data directory '%s': %s", wal->dir,
                     strerror(errno));
            rc = errno == ENOSPC || errno == EDQUOT ? WAL_EFULL : WAL_EIO;
            goto fail;
        }
        struct stat dst;
        if (stat(wal->dir, &dst) != 0 || !S_ISDIR(dst.st_mode)) {
            wal_errf(errbuf, errlen, "data directory '%s' is not a directory", wal->dir);
            rc = WAL_EINVAL;
            goto fail;
        }
        size_t plen = strlen(wal->dir) + sizeof("/data.mdb");
        char *dpath = malloc(plen);
        if (!dpath) {
            rc = WAL_ENOMEM;
            goto fail;
        }
        snprintf(dpath, plen, "%s/data.mdb", wal->dir);
        new_env = access(dpath, F_OK) != 0;
        free(dpath);
        /* LMDB's reader table is written through a shared mapping: give it
         * its blocks now, while that can still fail cleanly. */
        int lrc = wal_space_lock_prepare(wal->dir, wal->opts.max_readers);
        if (lrc == EACCES || lrc == EPERM || lrc == EROFS) {
            wal_errf(errbuf, errlen, "cannot open '%s/lock.mdb' for writing: %s", wal->dir,
                     strerror(lrc));
            rc = WAL_EIO;
            goto fail;
        }
    }
    int mrc = mdb_env_create(&wal->env);
    if (!mrc)
        mrc = mdb_env_set_maxdbs(wal->env, 10);
    if (!mrc)
        mrc = mdb_env_set_maxreaders(wal->env, wal->opts.max_readers);
    if (!mrc)
        mrc = mdb_env_set_mapsize(wal->env, (size_t)wal->opts.map_size);
    if (mrc) {
        wal_errf(errbuf, errlen, "lmdb setup: %s", mdb_strerror(mrc));
        rc = wal_map_mdb(mrc);
        goto fail;
    }
    unsigned flags = MDB_NOTLS;
    if (wal->read_only)
        flags |= MDB_RDONLY;
    if (wal->opts.sync == WAL_SYNC_NONE)
        flags |= MDB_NOSYNC;
    mrc = mdb_env_open(wal->env, wal->dir, flags, 0600);
    if (mrc) {
        wal_errf(errbuf, errlen, "cannot open WAL in '%s': %s", wal->dir, mdb_strerror(mrc));
        rc = mrc == ENOENT ? WAL_ENOTFOUND : wal_map_mdb(mrc);
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
    if (new_env && wal->opts.sync == WAL_SYNC_FULL &&
        fsync_path(wal->dir, O_RDONLY | O_DIRECTORY) != 0) {
        /* data.mdb and lock.mdb are new entries of the directory */
        wal_errf(errbuf, errlen, "cannot sync data directory '%s': %s", wal->dir, strerror(errno));
        rc = WAL_EIO;
        goto fail;
    }
    if (!wal->read_only) {
        /* data.mdb's blocks ahead of the map (wal_space.c) */
        mrc = wal_space_init(wal);
        if (mrc) {
            wal_errf(errbuf, errlen, "cannot allocate disk space for '%s/data.mdb': %s", wal->dir,
                     strerror(mrc));
            rc = WAL_EIO;
            goto fail;
        }
    }

    mrc = mdb_txn_begin(wal->env, NULL, wal->read_only ? MDB_RDONLY : 0, &txn);
    if (mrc) {
        wal_errf(errbuf, errlen, "cannot begin a transaction in '%s': %s", wal->dir,
                 mdb_strerror(mrc));
        rc = wal_map_mdb(mrc);
        goto fail;
    }
    mrc = open_dbis(wal, txn, wal->read_only ? 0 : MDB_CREATE);
    if (mrc == MDB_MAP_FULL) {
        wal_errf(errbuf, errlen, "no space left in '%s' to create the WAL's databases", wal->dir);
        rc = WAL_EFULL;
        goto fail;
    }
    if (mrc) {
        wal_errf(errbuf, errlen, "'%s' is not an ARQ WAL (%s)", wal->dir, mdb_strerror(mrc));
        rc = mrc == MDB_NOTFOUND ? WAL_ENOTFOUND : wal_map_mdb(mrc);
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
            wal_errf(errbuf, errlen, "initial commit in '%s': %s", wal->dir, mdb_strerror(mrc));
            rc = wal_map_mdb(mrc);
            goto fail;
        }
        rc = journal_open(wal, errbuf, errlen);
        if (!rc && wal->jfd[0] >= 0) {
            rc = wal_journal_recover(wal, errbuf, errlen);
            if (rc == WAL_EFULL || (rc == WAL_EIO && wal_space_nospace_eio(wal, EIO))) {
                /* A full disk: open anyway, serving what LMDB holds, and
                 * fold the journal in once there is room (refold). */
                rc = 0;
                if (errbuf && errlen)
                    errbuf[0] = 0;
                wal_refold_begin(wal);
            }
        }
        if (rc)
            goto fail;
        mrc = mdb_txn_begin(wal->env, NULL, 0, &txn);
        if (mrc) {
            rc = wal_map_mdb(mrc);
            goto fail;
        }
    }
    if (!wal->read_only && !wal->refold) {
        /* After the journal: the entries of a format-2 writer hold old keys.
         * Commit first (without a journal this txn created the DBs). */
        mrc = mdb_txn_commit(txn);
        txn = NULL;
        uint64_t moved = 0;
        if (!mrc)
            mrc = dedup_convert(wal, &moved, errbuf, errlen);
        if (mrc) {
            rc = wal_map_mdb(mrc);
            goto fail;
        }
        mrc = mdb_txn_begin(wal->env, NULL, 0, &txn);
        if (mrc) {
            rc = wal_map_mdb(mrc);
            goto fail;
        }
    }
    if (!wal->read_only) {
        rc = wal_load_heads(wal, txn, errbuf, errlen);
        if (rc)
            goto fail;
        MDB_stat ds;
        wal->old_dedup = mdb_stat(txn, wal->dbi_dedup, &ds) == 0 && ds.ms_entries > 0;
        wal->st_acked_next = wal->next_seq;
        mrc = mdb_txn_commit(txn);
        txn = NULL;
        if (!mrc && wal->jfd[0] >= 0) {
            /* Folds flush LMDB once, not twice: see outer_commit. */
            mrc = mdb_env_set_flags(wal->env, MDB_NOMETASYNC, 1);
            wal->meta_lazy = mrc == 0;
        }
        if (mrc) {
            wal_errf(errbuf, errlen, "initial commit in '%s': %s", wal->dir, mdb_strerror(mrc));
            rc = wal_map_mdb(mrc);
            goto fail;
        }
        if (wal->base) {
            wal->done_ev = event_new(wal->base, -1, 0, wal_done_ev_cb, wal);
            if (!wal->done_ev) {
                rc = WAL_ENOMEM;
                goto fail;
            }
        }
        if (pthread_create(&wal->writer, NULL, wal_writer_main, wal) != 0) {
            wal_errf(errbuf, errlen, "cannot start the WAL writer thread");
            rc = WAL_ENOMEM;
            goto fail;
        }
        wal->writer_started = true;
    } else {
        /* Commit (not abort) so the DBI handles stay open for later txns. */
        mrc = mdb_txn_commit(txn);
        txn = NULL;
        if (mrc) {
            rc = wal_map_mdb(mrc);
            goto fail;
        }
    }
    *ret_wal = wal;
    return 0;
fail:
    if (txn)
        mdb_txn_abort(txn);
    if (errbuf && errlen && !errbuf[0])
        wal_errf(errbuf, errlen, "cannot open the WAL in '%s': %s", opts->dir, wal_strerror(rc));
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
    if (wal->meta_lazy)
        (void)wal_meta_sync(wal); /* the last fold's meta page */
    if (wal->base)
        wal_done_run(wal); /* completions the loop has not run yet */
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

/* ---- backup ------------------------------------------------------------ */

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
        wal_errf(errbuf, errlen, "backup directory '%s' does not exist", dir);
        rc = WAL_EINVAL;
        goto out;
    }
    if (stat(file, &st) == 0) {
        wal_errf(errbuf, errlen, "'%s' already exists: refusing to overwrite it", file);
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
        wal_errf(errbuf, errlen, "copy to '%s': %s", file, mdb_strerror(mrc));
        (void)unlink(file);
        rc = wal_map_mdb(mrc);
        goto out;
    }
    /* mdb_env_copy2 neither fsyncs nor sets a private mode. */
    if (chmod(file, 0600) != 0 || fsync_path(file, O_RDONLY) != 0 ||
        fsync_path(dir, O_RDONLY | O_DIRECTORY) != 0) {
        wal_errf(errbuf, errlen, "sync '%s': %s", file, strerror(errno));
        (void)unlink(file);
        rc = WAL_EIO;
    }
out:
    free(file);
    return rc;
}
