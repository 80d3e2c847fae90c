/* log_scan.c - see log_scan.h. Layouts: docs/wal-format.md. */
#include "log_scan.h"

#include <lmdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "bench_util.h"
#include "wal.h"

#define REC_HEADER       48u
#define STREAM_META_SIZE 48u

__attribute__((format(printf, 3, 4))) static void seterr(char *errbuf, size_t errlen,
                                                         const char *fmt, ...)
{
    if (errbuf == NULL || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
}

static uint32_t get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint16_t get_le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static void put_be32(uint8_t *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

/* The payload length of a record value, after checking the lengths add up. */
static int rec_payload_len(const MDB_val *v, uint32_t *ret_stream_id, uint64_t *ret_len)
{
    if (v->mv_size < REC_HEADER)
        return -1;
    const uint8_t *p = v->mv_data;
    uint64_t pl = get_le32(p + 20);
    if (REC_HEADER + get_le16(p + 10) + get_le16(p + 12) + get_le16(p + 14) + pl != v->mv_size)
        return -1;
    *ret_stream_id = get_le32(p + 16);
    *ret_len = pl;
    return 0;
}

struct env {
    MDB_env *env;
    MDB_dbi log, index, streams;
    uint32_t stream_id;
};

static int txn_begin(struct env *e, MDB_txn **txn)
{
    int rc = mdb_txn_begin(e->env, NULL, MDB_RDONLY, txn);
    if (rc == MDB_MAP_RESIZED) { /* arqd grew the map: adopt its size */
        rc = mdb_env_set_mapsize(e->env, 0);
        if (rc == 0)
            rc = mdb_txn_begin(e->env, NULL, MDB_RDONLY, txn);
    }
    return rc;
}

/* Open the environment read-only, its named DBs, and find the stream's id. */
static int env_open(struct env *e, const char *dir, const char *stream, char *errbuf, size_t errlen)
{
    memset(e, 0, sizeof *e);
    MDB_txn *txn = NULL;
    int rc = mdb_env_create(&e->env);
    if (rc == 0)
        rc = mdb_env_set_maxdbs(e->env, 8);
    if (rc == 0)
        rc = mdb_env_open(e->env, dir, MDB_RDONLY | MDB_NOTLS, 0600);
    if (rc != 0) {
        seterr(errbuf, errlen, "opening LMDB environment '%s' read-only: %s", dir,
               mdb_strerror(rc));
        goto fail;
    }
    rc = txn_begin(e, &txn);
    if (rc == 0)
        rc = mdb_dbi_open(txn, "log", 0, &e->log);
    if (rc == 0)
        rc = mdb_dbi_open(txn, "index", 0, &e->index);
    if (rc == 0)
        rc = mdb_dbi_open(txn, "streams", 0, &e->streams);
    if (rc != 0) {
        seterr(errbuf, errlen, "'%s': named databases log/index/streams: %s", dir,
               mdb_strerror(rc));
        goto fail;
    }
    MDB_val k = {strlen(stream), (void *)stream}, v;
    rc = mdb_get(txn, e->streams, &k, &v);
    if (rc != 0 || v.mv_size != STREAM_META_SIZE) {
        seterr(errbuf, errlen, "stream '%s' not in '%s': %s", stream, dir,
               rc ? mdb_strerror(rc) : "bad metadata size");
        goto fail;
    }
    e->stream_id = get_le32((const uint8_t *)v.mv_data + 12);
    /* A read-only transaction's commit makes its DB handles usable in later ones. */
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc != 0) {
        seterr(errbuf, errlen, "mdb_txn_commit: %s", mdb_strerror(rc));
        goto fail;
    }
    return 0;
fail:
    if (txn != NULL)
        mdb_txn_abort(txn);
    if (e->env != NULL)
        mdb_env_close(e->env);
    e->env = NULL;
    return -1;
}

static int seq_of(struct env *e, MDB_txn *txn, uint64_t off, uint64_t *ret_seq)
{
    uint8_t ik[12];
    put_be32(ik, e->stream_id);
    put_be64(ik + 4, off);
    MDB_val k = {sizeof ik, ik}, v;
    int rc = mdb_get(txn, e->index, &k, &v);
    if (rc != 0 || v.mv_size != 8)
        return rc ? rc : MDB_CORRUPTED;
    *ret_seq = get_be64(v.mv_data);
    return 0;
}

int log_scan_cursor(const char *dir, const char *stream, uint64_t first, uint64_t last,
                    struct log_scan_result *ret, char *errbuf, size_t errlen)
{
    struct env e;
    if (env_open(&e, dir, stream, errbuf, errlen) != 0)
        return -1;
    struct log_scan_result r = {0};
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    uint64_t seq_first = 0, seq_last = 0;
    int rc = txn_begin(&e, &txn);
    if (rc == 0)
        rc = seq_of(&e, txn, first, &seq_first);
    if (rc == 0)
        rc = seq_of(&e, txn, last, &seq_last);
    if (rc != 0) {
        seterr(errbuf, errlen, "stream '%s' offsets %llu..%llu: %s", stream,
               (unsigned long long)first, (unsigned long long)last, mdb_strerror(rc));
        goto out;
    }
    /* The clock starts here: a cursor over `log` from the first record to the last. */
    uint64_t t0 = bench_now_ns();
    rc = mdb_cursor_open(txn, e.log, &cur);
    uint8_t sk[8];
    put_be64(sk, seq_first);
    MDB_val k = {sizeof sk, sk}, v;
    if (rc == 0)
        rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    while (rc == 0 && k.mv_size == 8 && get_be64(k.mv_data) <= seq_last) {
        uint32_t sid;
        uint64_t pl;
        if (rec_payload_len(&v, &sid, &pl) != 0) {
            rc = MDB_CORRUPTED;
            break;
        }
        if (sid == e.stream_id) {
            r.records++;
            r.value_bytes += v.mv_size;
            r.payload_bytes += pl;
        } else {
            r.other++;
        }
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    r.seconds = (double)(bench_now_ns() - t0) / 1e9;
    if (rc == MDB_NOTFOUND || rc == 0)
        rc = 0;
    else
        seterr(errbuf, errlen, "cursor over log: %s", mdb_strerror(rc));
out:
    if (cur != NULL)
        mdb_cursor_close(cur);
    if (txn != NULL)
        mdb_txn_abort(txn);
    mdb_env_close(e.env);
    if (rc != 0)
        return -1;
    *ret = r;
    return 0;
}

int log_scan_lookup(const char *dir, const char *stream, uint64_t first, uint64_t last,
                    unsigned batch, struct log_scan_result *ret, char *errbuf, size_t errlen)
{
    struct env e;
    if (env_open(&e, dir, stream, errbuf, errlen) != 0)
        return -1;
    struct log_scan_result r = {0};
    int rc = 0;
    uint64_t t0 = bench_now_ns();
    for (uint64_t off = first; off <= last && rc == 0;) {
        MDB_txn *txn;
        rc = txn_begin(&e, &txn);
        if (rc != 0)
            break;
        for (unsigned i = 0; i < batch && off <= last; i++, off++) {
            uint64_t seq;
            rc = seq_of(&e, txn, off, &seq);
            if (rc != 0)
                break;
            uint8_t lk[8];
            put_be64(lk, seq);
            MDB_val k = {sizeof lk, lk}, v;
            rc = mdb_get(txn, e.log, &k, &v);
            uint32_t sid;
            uint64_t pl;
            if (rc == 0 && (rec_payload_len(&v, &sid, &pl) != 0 || sid != e.stream_id))
                rc = MDB_CORRUPTED;
            if (rc != 0)
                break;
            r.records++;
            r.value_bytes += v.mv_size;
            r.payload_bytes += pl;
        }
        mdb_txn_abort(txn);
    }
    r.seconds = (double)(bench_now_ns() - t0) / 1e9;
    mdb_env_close(e.env);
    if (rc != 0) {
        seterr(errbuf, errlen, "index/log lookups of '%s': %s", stream, mdb_strerror(rc));
        return -1;
    }
    *ret = r;
    return 0;
}

int log_scan_cursors(const char *dir, const char *stream, uint64_t first, uint64_t last,
                     unsigned batch, struct log_scan_result *ret, char *errbuf, size_t errlen)
{
    struct env e;
    if (env_open(&e, dir, stream, errbuf, errlen) != 0)
        return -1;
    struct log_scan_result r = {0};
    int rc = 0;
    uint64_t t0 = bench_now_ns();
    for (uint64_t off = first; off <= last && rc == 0;) {
        MDB_txn *txn;
        MDB_cursor *ic = NULL, *lc = NULL;
        rc = txn_begin(&e, &txn);
        if (rc != 0)
            break;
        rc = mdb_cursor_open(txn, e.index, &ic);
        if (rc == 0)
            rc = mdb_cursor_open(txn, e.log, &lc);
        uint8_t ik[12];
        put_be32(ik, e.stream_id);
        put_be64(ik + 4, off);
        MDB_val k = {sizeof ik, ik}, v;
        if (rc == 0)
            rc = mdb_cursor_get(ic, &k, &v, MDB_SET_KEY);
        uint64_t prev_seq = 0;
        for (unsigned i = 0; rc == 0 && i < batch && off <= last; i++, off++) {
            if (i > 0 && (rc = mdb_cursor_get(ic, &k, &v, MDB_NEXT)) != 0)
                break;
            if (k.mv_size != 12 || v.mv_size != 8 ||
                get_be64((const uint8_t *)k.mv_data + 4) != off) {
                rc = MDB_CORRUPTED;
                break;
            }
            uint64_t seq = get_be64(v.mv_data);
            MDB_val lk, lv;
            if (prev_seq != 0 && seq == prev_seq + 1) {
                rc = mdb_cursor_get(lc, &lk, &lv, MDB_NEXT); /* the usual case: adjacent */
                if (rc == 0 && (lk.mv_size != 8 || get_be64(lk.mv_data) != seq))
                    rc = MDB_CORRUPTED;
            } else {
                uint8_t sk[8];
                put_be64(sk, seq);
                lk = (MDB_val){sizeof sk, sk};
                rc = mdb_cursor_get(lc, &lk, &lv, MDB_SET_KEY);
            }
            uint32_t sid;
            uint64_t pl;
            if (rc == 0 && (rec_payload_len(&lv, &sid, &pl) != 0 || sid != e.stream_id))
                rc = MDB_CORRUPTED;
            if (rc != 0)
                break;
            prev_seq = seq;
            r.records++;
            r.value_bytes += lv.mv_size;
            r.payload_bytes += pl;
        }
        if (ic != NULL)
            mdb_cursor_close(ic);
        if (lc != NULL)
            mdb_cursor_close(lc);
        mdb_txn_abort(txn);
    }
    r.seconds = (double)(bench_now_ns() - t0) / 1e9;
    mdb_env_close(e.env);
    if (rc != 0) {
        seterr(errbuf, errlen, "index/log cursors over '%s': %s", stream, mdb_strerror(rc));
        return -1;
    }
    *ret = r;
    return 0;
}

static int wal_cb(const wal_record_t *rec, void *arg)
{
    struct log_scan_result *r = arg;
    r->records++;
    r->payload_bytes += rec->payload_len;
    r->value_bytes +=
        REC_HEADER + rec->producer_len + rec->msgid_len + rec->headers_len + rec->payload_len;
    return 0;
}

int log_scan_wal(const char *dir, const char *stream, uint64_t first, uint64_t last, unsigned batch,
                 struct log_scan_result *ret, char *errbuf, size_t errlen)
{
    wal_t *wal = NULL;
    wal_options_t o = {.dir = dir, .read_only = 1};
    char werr[256] = "";
    int rc = wal_open(&o, NULL, &wal, werr, sizeof werr);
    if (rc != 0) {
        seterr(errbuf, errlen, "wal_open('%s', read-only): %s: %s", dir, wal_strerror(rc), werr);
        return -1;
    }
    struct log_scan_result r = {0};
    size_t sl = strlen(stream);
    uint64_t t0 = bench_now_ns();
    for (uint64_t from = first; from <= last;) {
        uint64_t want = last - from + 1;
        wal_read_result_t res;
        rc = wal_stream_read(wal, stream, sl, from, (uint32_t)(want < batch ? want : batch),
                             1u << 20, wal_cb, &r, &res);
        if (rc != 0 || res.count == 0) {
            seterr(errbuf, errlen, "wal_stream_read('%s', %llu): %s", stream,
                   (unsigned long long)from, rc ? wal_strerror(rc) : "no records");
            rc = -1;
            break;
        }
        from = res.next;
    }
    r.seconds = (double)(bench_now_ns() - t0) / 1e9;
    wal_close(wal);
    if (rc != 0)
        return -1;
    *ret = r;
    return 0;
}
