/*
 * wal_writer.c - stream heads, batches, the journal, folds, retention (see wal.c for the design).
 */
#include "wal_int.h"

/* ---- heads ------------------------------------------------------------- */

uint64_t wal_name_hash(const char *name, size_t len)
{
    return (uint64_t)XXH3_64bits(name, len);
}

struct head *wal_head_find(wal_t *wal, const char *name, size_t len, uint64_t h)
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

int wal_head_set_id(wal_t *wal, struct head *e)
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
int wal_head_insert(wal_t *wal, const char *name, size_t len, uint64_t h, struct head **ret)
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

void wal_heads_free(wal_t *wal)
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

void wal_heads_reset(wal_t *wal)
{
    wal_heads_free(wal);
    wal->slots = NULL;
    wal->slots_cap = wal->n_heads = 0;
    wal->by_id = NULL;
    wal->by_id_cap = 0;
    wal->touched = NULL;
    wal->n_touched = wal->cap_touched = 0;
}

static uint64_t random_epoch(void)
{
    uint64_t v = 0;
    while (v == 0) {
        if (getrandom(&v, sizeof(v), 0) != (ssize_t)sizeof(v))
            v = (uint64_t)wal_now_us() ^ ((uint64_t)rand() << 32);
    }
    return v;
}

/* Mark a head as part of the current batch (snapshot its committed state). */
int wal_head_touch(wal_t *wal, struct head *e)
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
    uint64_t h = wal_name_hash(name, len);
    struct head *e = wal_head_find(wal, name, len, h);
    int rc;
    if (!e) {
        rc = wal_head_insert(wal, name, len, h, &e);
        if (rc)
            return rc;
    }
    if (e->gen != wal->gen) {
        rc = wal_head_touch(wal, e);
        if (rc)
            return rc;
        if (!e->committed) {
            /* New stream (or one whose creating batch failed: start over). */
            e->pending.id = wal->next_stream_id++;
            e->pending.epoch = random_epoch();
            e->pending.first_offset = 1;
            e->pending.next_offset = 1;
            e->pending.created_us = now;
            rc = wal_head_set_id(wal, e);
            if (rc)
                return rc;
        }
    }
    *ret = e;
    return 0;
}

/* ---- the writer -------------------------------------------------------- */

void wal_put_meta_u64(uint8_t *buf, uint64_t v)
{
    wal_put_le64(buf, v);
}

/*
 * Headroom above map_size_max that only retention may use: on a map that
 * is completely full LMDB cannot even delete (copy-on-write needs free
 * pages), so without it "storage full" could never be cleared by trimming.
 */
uint64_t wal_map_reserve(const wal_t *wal)
{
    uint64_t r = wal->opts.map_size_max / 32;
    if (r < (2ull << 20))
        r = 2ull << 20;
    if (r > (256ull << 20))
        r = 256ull << 20;
    return r;
}

int wal_map_set(wal_t *wal, uint64_t size)
{
    pthread_rwlock_wrlock(&wal->map_lock);
    int rc = mdb_env_set_mapsize(wal->env, (size_t)size);
    MDB_envinfo info;
    mdb_env_info(wal->env, &info);
    wal->map_size = info.me_mapsize; /* LMDB never goes below the data in use */
    pthread_rwlock_unlock(&wal->map_lock);
    return rc ? wal_map_mdb(rc) : 0;
}

/* Grow the map after MDB_MAP_FULL, up to map_size_max for appends or into
 * the reserve for retention, as far as the disk has room for its blocks
 * (wal_space.c). Returns 0 if it grew; WAL_EFULL if it cannot. */
int wal_map_grow(wal_t *wal, bool for_retention)
{
    uint64_t limit = wal->opts.map_size_max + (for_retention ? wal_map_reserve(wal) : 0);
    if (wal->map_size >= limit)
        return WAL_EFULL;
    uint64_t nsize = wal->map_size * 2;
    if (nsize > limit)
        nsize = limit;
    int rc = wal_space_grow(wal, nsize, for_retention, &nsize);
    if (rc)
        return WAL_EFULL; /* no room on the disk (or no allocation at all) */
    rc = wal_map_set(wal, nsize);
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
uint64_t wal_pages_in_use(wal_t *wal, MDB_txn *txn)
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
                      wal->no_sessions ? wal->dbi_dedup : wal->dbi_sessions,
                      wal->no_dedup2 ? wal->dbi_dedup : wal->dbi_dedup2};
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

int wal_txn_commit(wal_t *wal, MDB_txn *txn)
{
    int fault = fault_take(wal);
    if (fault) {
        mdb_txn_abort(txn);
        return fault;
    }
    int rc = mdb_txn_commit(txn);
    return rc ? rc : wal_meta_sync(wal);
}

int wal_meta_sync(wal_t *wal)
{
    /* Only a fold may leave its meta page to the next flush (outer_commit). */
    return wal->meta_lazy ? mdb_env_sync(wal->env, 1) : 0;
}

void wal_batch_rollback(wal_t *wal, uint64_t saved_seq, uint32_t saved_id)
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

void wal_batch_apply(wal_t *wal)
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
    if (dbi == wal->dbi_dedup2)
        return WAL_JDB_DEDUP2;
    if (dbi == wal->dbi_dedup)
        return WAL_JDB_DEDUP;
    return WAL_JDB_SESSIONS;
}

MDB_dbi wal_jdb_dbi(const wal_t *wal, uint8_t db)
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
    case WAL_JDB_DEDUP2:
        return wal->dbi_dedup2;
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

int wal_write_heads(wal_t *wal, MDB_txn *txn)
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

int wal_write_next_seq(wal_t *wal, MDB_txn *txn)
{
    uint8_t buf[8];
    wal_put_meta_u64(buf, wal->next_seq);
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
        struct head *e =
            wal_head_find(wal, name, pc->stream_len, wal_name_hash(name, pc->stream_len));
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
int wal_put_record(wal_t *wal, MDB_txn *txn, wal_rec_t *rec, unsigned log_flags,
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
    return jput(wal, txn, wal->dbi_dedup2, &dk, &dvv);
}

size_t wal_dedup_key(uint8_t *out, const void *producer, size_t producer_len, uint32_t stream_id,
                     const void *msgid, size_t msgid_len)
{
    out[0] = (uint8_t)producer_len;
    if (producer_len)
        memcpy(out + 1, producer, producer_len);
    wal_put_be32(out + 1 + producer_len, stream_id);
    if (5 + producer_len + msgid_len > WAL_JOP_KEY_MAX) {
        /* Over LMDB's key limit (a 255-byte producer with a long id): the
         * id's XXH3-128 stands for it. */
        XXH128_hash_t h = XXH3_128bits(msgid, msgid_len);
        wal_put_be64(out + 5 + producer_len, h.high64);
        wal_put_be64(out + 13 + producer_len, h.low64);
        return 21 + producer_len;
    }
    memcpy(out + 5 + producer_len, msgid, msgid_len);
    return 5 + producer_len + msgid_len;
}

static int write_msg(wal_t *wal, MDB_txn *txn, wal_append_t *r, size_t i, int64_t now)
{
    const struct pmsg *pm = &r->msgs[i];
    wal_result_t *res = &r->results[i];
    const char *name = (const char *)r->buf + pm->stream;
    uint8_t dkey[WAL_DEDUP_KEY_MAX];
    size_t dkey_len = 0;
    int rc;

    /* Dedup is per (producer, stream, msgid): only a stream that exists
     * (committed, or made by this batch) can hold the msgid already. */
    struct head *known = pm->msgid_len ? wal_head_find(wal, name, pm->stream_len,
                                                       wal_name_hash(name, pm->stream_len))
                                       : NULL;
    if (known && (known->committed || known->gen == wal->gen)) {
        uint32_t sid = known->gen == wal->gen ? known->pending.id : known->meta.id;
        dkey_len = wal_dedup_key(dkey, r->buf + pm->producer, pm->producer_len, sid,
                                 r->buf + pm->msgid, pm->msgid_len);
        MDB_val k = {dkey_len, dkey}, v;
        rc = mdb_get(txn, wal->dbi_dedup2, &k, &v);
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
        } else if (wal->old_dedup) {
            /* not yet converted (an open that deferred its fold): the
             * format-2 key, if it names this stream */
            uint8_t ok[1 + WAL_PRODUCER_MAX + WAL_MSGID_MAX];
            ok[0] = (uint8_t)pm->producer_len;
            memcpy(ok + 1, r->buf + pm->producer, pm->producer_len);
            memcpy(ok + 1 + pm->producer_len, r->buf + pm->msgid, pm->msgid_len);
            MDB_val okk = {1 + pm->producer_len + pm->msgid_len, ok}, ov;
            wal_dedup_val_t dv;
            if (mdb_get(txn, wal->dbi_dedup, &okk, &ov) == 0 &&
                wal_dedup_val_decode(ov.mv_data, ov.mv_size, &dv) == 0 && dv.stream_id == sid) {
                res->offset = dv.offset;
                res->seq = 0;
                res->epoch = known->gen == wal->gen ? known->pending.epoch : known->meta.epoch;
                res->duplicate = 1;
                return 0;
            }
        }
    }

    struct head *e;
    rc = head_for_write(wal, name, pm->stream_len, now, &e);
    if (rc)
        return rc == WAL_ENOMEM ? ENOMEM : EINVAL;
    if (pm->msgid_len && !dkey_len) /* a new stream: its id only now */
        dkey_len = wal_dedup_key(dkey, r->buf + pm->producer, pm->producer_len, e->pending.id,
                                 r->buf + pm->msgid, pm->msgid_len);
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
    rc = wal_put_record(wal, txn, &rec, MDB_APPEND, dkey, dkey_len, now);
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
int wal_del_prefix(MDB_txn *txn, MDB_dbi dbi, const uint8_t *prefix, size_t plen)
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
    int rc = wal_del_prefix(txn, wal->dbi_cursors, prefix, plen);
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
    struct head *e = wal_head_find(wal, name, pc->stream_len, wal_name_hash(name, pc->stream_len));
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
    int64_t now = wal_now_us();
    int rc = 0;
    if (!wal->outer) {
        rc = mdb_txn_begin(wal->env, NULL, 0, &wal->outer);
        if (rc) {
            wal->outer = NULL;
            return rc;
        }
        wal->outer_t0 = wal_mono_us();
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
        rc = wal_write_heads(wal, txn);
    if (!rc)
        rc = wal_write_next_seq(wal, txn);
    if (!rc && wal->map_size > wal->opts.map_size_max &&
        wal_pages_in_use(wal, txn) * wal->page_size > wal->opts.map_size_max)
        rc = MDB_MAP_FULL; /* the reserve above the limit is retention's */
    if (rc) {
        mdb_txn_abort(txn);
        return rc;
    }
    *ret_txn = txn;
    return 0;
}

/* ---- failures ------------------------------------------------------------- */

#define PROBE_US 1000000 /* while storage is full: retry a growth / the fold this often */

static bool no_space(int rc)
{
    return rc == ENOSPC || rc == EDQUOT;
}

/* The status a failed batch reports for an LMDB/errno code; what names the
 * operation in the fail-stop reason. */
static int batch_status(wal_t *wal, int rc, const char *what)
{
    if (rc == MDB_MAP_FULL)
        return WAL_EFULL;
    if (no_space(rc) || wal_space_nospace_eio(wal, rc)) {
        wal->nospace = true;
        return WAL_EFULL;
    }
    if (rc == MDB_TXN_FULL || rc == MDB_BAD_VALSIZE || rc == EINVAL)
        return WAL_EINVAL; /* one request too large for a txn */
    if (rc == ENOMEM)
        return WAL_ENOMEM;
    wal_fail_stop(wal, what, rc);
    return WAL_EFATAL;
}

/* Fail a whole batch: nothing of it was written. */
static void batch_fail(wal_t *wal, wal_append_t **reqs, size_t n, int status)
{
    __atomic_add_fetch(&wal->st_failed, 1, __ATOMIC_RELAXED);
    if (status == WAL_EFULL) {
        wal_state_full(wal);
        wal->probe_us = wal_mono_us() + PROBE_US;
    }
    wal_complete_batch(wal, reqs, n, false, status);
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

/* An injected fault (wal_testing_fail_folds) for the next fold. */
static int fold_fault_take(wal_t *wal)
{
    pthread_mutex_lock(&wal->mu);
    int fault = 0;
    if (wal->fault_fold) {
        wal->fault_fold--;
        fault = wal->fault_fold_err;
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
 * their fdatasync has no file metadata to write, and never need a block.
 * Only zeroes past every entry are written: a failure here (ENOSPC on a
 * full disk) touches nothing acknowledged. */
static int journal_extend(wal_t *wal, uint64_t upto)
{
    static const uint8_t zero[65536];
    unsigned f = wal->jcur;
    uint64_t target = (upto + JOURNAL_CHUNK - 1) / JOURNAL_CHUNK * JOURNAL_CHUNK;
    if (target > wal->opts.journal_max)
        target = wal->opts.journal_max;
    for (uint64_t off = wal->jfile[f]; off < target;) {
        size_t n = target - off < sizeof(zero) ? (size_t)(target - off) : sizeof(zero);
        int rc = pwrite_all(wal->jfd[f], zero, n, off);
        if (rc)
            return rc;
        off += n;
    }
    if (fdatasync(wal->jfd[f]) != 0)
        return errno;
    wal->jfile[f] = target;
    return 0;
}

/* Append the batch in jbuf as one entry at joff (the file already holds
 * blocks there: journal_extend) and make it durable. *ret_in_sync is set
 * when the fdatasync (not the write) failed. */
static int journal_write(wal_t *wal, uint64_t size, bool *ret_in_sync)
{
    uint32_t body_len = (uint32_t)(wal->jbuf_len - WAL_JOURNAL_HDR);
    *ret_in_sync = false;
    if (jbuf_reserve(wal, size - wal->jbuf_len))
        return ENOMEM;
    memset(wal->jbuf + wal->jbuf_len, 0, size - wal->jbuf_len);
    wal_jentry_header(wal->jbuf, wal->jseq, wal->jbuf + WAL_JOURNAL_HDR, body_len);
    int fd = wal->jfd[wal->jcur];
    int rc = pwrite_all(fd, wal->jbuf, (size_t)size, wal->joff);
    if (rc)
        return rc;
    if (fdatasync(fd) != 0) {
        *ret_in_sync = true;
        return errno;
    }
    wal->joff += size;
    wal->jseq++;
    return 0;
}

/* The map is within a journal's worth (at most a quarter of its cap) of
 * its cap: map_size_max, or as far as the disk lets it grow
 * (wal_space_cap). Then a batch must not wait in the journal for a fold
 * that may find no room: it commits directly, and "full" is decided before
 * it is acknowledged. */
static bool map_near_full(wal_t *wal)
{
    MDB_envinfo info;
    mdb_env_info(wal->env, &info);
    uint64_t used = ((uint64_t)info.me_last_pgno + 1) * wal->page_size;
    uint64_t room = wal->opts.map_size_max / 4;
    if (room > wal->opts.journal_max)
        room = wal->opts.journal_max;
    if (used + room <= wal->map_size)
        return false; /* room in the map as it is */
    uint64_t cap = wal_space_cap(wal);
    if (cap / 4 < room)
        room = cap / 4;
    return used + room > cap;
}

/* ---- deferred folds --------------------------------------------------------- */

/*
 * A fold (or the recovery at open) found no space: the acknowledged
 * batches it held are safe in the journal, and LMDB is at its last commit.
 * Nothing new may be written on top of them, so every batch is refused
 * with WAL_EFULL until refold_try folds the journal in (every PROBE_US).
 * The requests waiting for the fold stay waiting.
 */
void wal_refold_begin(wal_t *wal)
{
    wal->refold = true;
    wal->outer_batches = 0;
    wal->probe_us = wal_mono_us() + PROBE_US;
    wal_state_full(wal);
}

static int refold_try(wal_t *wal)
{
    int rc = wal_journal_recover(wal, NULL, 0);
    if (wal->map_size > wal->opts.map_size_max)
        (void)wal_map_set(wal, wal->opts.map_size_max);
    if (rc == WAL_EFULL || (rc == WAL_EIO && wal_space_nospace_eio(wal, EIO)))
        return WAL_EFULL;
    MDB_txn *txn = NULL;
    if (!rc)
        rc = wal_map_mdb(mdb_txn_begin(wal->env, NULL, MDB_RDONLY, &txn));
    if (!rc) {
        /* The folded entries add records and streams: rebuild the heads. */
        wal_heads_reset(wal);
        rc = wal_load_heads(wal, txn, NULL, 0);
        mdb_txn_abort(txn);
    }
    wal_append_t *list = wal->wait_head;
    wal->wait_head = wal->wait_tail = NULL;
    if (rc) {
        wal_fail_stop(wal, "folding the journal into LMDB", rc);
        wal_complete_list(wal, list, WAL_EFATAL);
        return WAL_EFATAL;
    }
    wal->refold = false;
    __atomic_store_n(&wal->st_acked_next, wal->next_seq, __ATOMIC_RELEASE);
    __atomic_add_fetch(&wal->reloads, 1, __ATOMIC_ACQ_REL);
    __atomic_add_fetch(&wal->st_applies, 1, __ATOMIC_RELAXED);
    wal_complete_list(wal, list, 0);
    wal_notify_visible(wal);
    wal_state_ok(wal);
    return 0;
}

/*
 * "Storage full" ends when there is room again, not at the first small
 * write that still fits: the live pages (free pages excluded, so what
 * retention freed counts) leave a journal's worth, or a quarter of the
 * map's cap, free below the cap.
 */
static bool map_has_room(wal_t *wal)
{
    uint64_t cap = wal->disk_limited ? wal->map_size : wal->opts.map_size_max;
    MDB_txn *txn;
    if (mdb_txn_begin(wal->env, NULL, MDB_RDONLY, &txn) != 0)
        return false;
    uint64_t live = wal_pages_in_use(wal, txn) * wal->page_size;
    mdb_txn_abort(txn);
    uint64_t room = cap / 4 < wal->opts.journal_max ? cap / 4 : wal->opts.journal_max;
    return live + room <= cap;
}

/* While storage is full and the writer is idle: try again what it waits
 * for (the fold; a map growth the disk refused), and see whether there is
 * room again. */
static void probe_run(wal_t *wal)
{
    wal->probe_us = wal_mono_us() + PROBE_US;
    if (wal->refold) {
        (void)refold_try(wal);
        return;
    }
    if (wal->disk_limited && wal->map_size < wal->opts.map_size_max)
        (void)wal_map_grow(wal, false);
    if (map_has_room(wal))
        wal_state_ok(wal);
}

static bool probe_wanted(wal_t *wal)
{
    return wal->refold || __atomic_load_n(&wal->state, __ATOMIC_ACQUIRE) == WAL_STATE_FULL;
}

/*
 * Commit wal->outer: every journaled batch becomes part of LMDB (and
 * readable), the journal moves to its other file, and the requests waiting
 * for readability complete.
 *
 * With meta_lazy (MDB_NOMETASYNC) the commit flushes the data pages and
 * writes the meta page without flushing it: one device flush instead of
 * two. LMDB stays consistent (a crash can only undo this last commit; the
 * pages of the commit before it are not reused until the next one), and
 * the entries this fold holds stay in their file until the next LMDB
 * commit's data flush has made this meta page durable: entries go to the
 * other file now, and come back to this one only after the next fold.
 *
 * A failure leaves acknowledged batches only in the journal. "Map full"
 * grows the map and folds the journal in now. No space (the map cannot
 * grow, ENOSPC): the fold is deferred (wal_refold_begin) and WAL_EFULL
 * returned. Anything else fail-stops the WAL (WAL_EFATAL); the next open
 * folds the journal in.
 */
static int outer_commit(wal_t *wal)
{
    if (!wal->outer)
        return 0;
    MDB_txn *txn = wal->outer;
    wal->outer = NULL;
    int64_t t0 = wal_mono_us();
    int rc = 0;
    if (wal->jfd[0] >= 0) {
        uint8_t b[8];
        wal_put_meta_u64(b, wal->jseq);
        MDB_val k = {12, "journal_next"}, v = {8, b};
        rc = mdb_put(txn, wal->dbi_meta, &k, &v, 0);
    }
    int fault = rc ? 0 : fold_fault_take(wal);
    if (rc || fault) {
        mdb_txn_abort(txn);
        rc = rc ? rc : fault;
    } else {
        rc = mdb_txn_commit(txn);
    }
    bool space = false;
    if (rc == MDB_MAP_FULL && wal->jfd[0] >= 0 &&
        (wal_map_grow(wal, false) == 0 || wal_map_grow(wal, true) == 0)) {
        /* Acknowledged batches need a home: grow (into retention's reserve
         * if need be), fold them in from the journal, give the reserve back. */
        int wrc = wal_journal_recover(wal, NULL, 0);
        if (wal->map_size > wal->opts.map_size_max)
            (void)wal_map_set(wal, wal->opts.map_size_max);
        rc = 0;
        space = wrc == WAL_EFULL;
        if (wrc && !space)
            rc = EIO; /* recover's own code is a WAL_E*: the fold failed */
    } else if (rc == MDB_MAP_FULL || no_space(rc) || wal_space_nospace_eio(wal, rc)) {
        space = true;
    }
    if (space) {
        __atomic_add_fetch(&wal->st_failed, 1, __ATOMIC_RELAXED);
        wal_refold_begin(wal); /* the waiting requests wait on */
        return WAL_EFULL;
    }
    wal_append_t *list = wal->wait_head;
    wal->wait_head = wal->wait_tail = NULL;
    if (rc) {
        wal_fail_stop(wal, "folding the journal into LMDB", rc);
        __atomic_add_fetch(&wal->st_failed, 1, __ATOMIC_RELAXED);
        wal_complete_list(wal, list, WAL_EFATAL);
        return WAL_EFATAL;
    }
    wal->jcur ^= 1;
    wal->joff = 0;
    wal->outer_batches = 0;
    __atomic_add_fetch(&wal->st_applies, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&wal->st_apply_us_sum, (uint64_t)(wal_mono_us() - t0), __ATOMIC_RELAXED);
    wal_complete_list(wal, list, 0);
    wal_notify_visible(wal);
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
    wal_complete_batch(wal, reqs, now, true, 0);
}

/*
 * Write a batch, make it durable and complete it, handling map growth and
 * splitting. With a journal the batch's durable point is its journal entry
 * (one sequential write and fdatasync) and its LMDB writes join wal->outer,
 * committed later by outer_commit; without one (or for a batch too large
 * for the journal, or one the journal has no room for on disk) wal->outer
 * holds just this batch and commits now.
 */
void wal_batch_run(wal_t *wal, wal_append_t **reqs, size_t n)
{
    if (wal->refold) {
        batch_fail(wal, reqs, n, WAL_EFULL);
        return;
    }
    bool direct = wal->jfd[0] < 0;
    if (!direct && map_near_full(wal)) {
        /* Near the map's cap, "full" must be decided by the commit that
         * acknowledges: no batch may be acknowledged that LMDB then has no
         * room for. Fold the journal in and commit directly. */
        direct = true;
        int st = outer_commit(wal);
        if (st) {
            batch_fail(wal, reqs, n, st);
            return;
        }
    }
    for (;;) {
        uint64_t saved_seq = wal->next_seq;
        uint32_t saved_id = wal->next_stream_id;
        int64_t t0 = wal_mono_us();
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
            bool never_fits = size > wal->opts.journal_max || body > WAL_JOURNAL_BODY_MAX;
            int xrc = 0;
            if (!never_fits && wal->joff + size <= wal->opts.journal_max &&
                wal->joff + size > wal->jfile[wal->jcur])
                xrc = wal_mono_us() < wal->jext_retry_us ? ENOSPC
                                                         : journal_extend(wal, wal->joff + size);
            if (xrc && !no_space(xrc) && !wal_space_nospace_eio(wal, xrc)) {
                mdb_txn_abort(child);
                wal_batch_rollback(wal, saved_seq, saved_id);
                wal_fail_stop(wal, "extending the journal", xrc);
                batch_fail(wal, reqs, n, WAL_EFATAL);
                return;
            }
            if (never_fits || xrc || wal->joff + size > wal->opts.journal_max) {
                /* No room: fold the journal into LMDB, then retry (into an
                 * empty journal, or straight into LMDB if it never fits or
                 * the disk has no room for the journal to grow). */
                mdb_txn_abort(child);
                wal_batch_rollback(wal, saved_seq, saved_id);
                if (never_fits || xrc)
                    direct = true;
                if (xrc && wal->jext_retry_us <= wal_mono_us())
                    wal->jext_retry_us = wal_mono_us() + PROBE_US;
                int st = outer_commit(wal);
                if (st) {
                    batch_fail(wal, reqs, n, st);
                    return;
                }
                continue;
            }
            bool in_sync = false;
            int fault = fault_take(wal);
            rc = fault ? fault : journal_write(wal, size, &in_sync);
            if (rc) {
                const char *what = in_sync ? "fdatasync of the journal" : "writing the journal";
                /* The entry may be partly on disk: a torn tail that recovery
                 * stops at (an entry whose write failed with "no space" may
                 * also be whole: a refused publish can be stored). A failed
                 * fdatasync, or any other write error, is fatal: we cannot
                 * know what reached the disk. */
                mdb_txn_abort(child);
                wal_batch_rollback(wal, saved_seq, saved_id);
                bool refusal = fault || (no_space(rc) && !in_sync);
                int status = refusal ? batch_status(wal, rc, what) : WAL_EFATAL;
                if (status == WAL_EFATAL)
                    wal_fail_stop(wal, what, rc);
                batch_fail(wal, reqs, n, status);
                return;
            }
            journaled = true;
        }
        if (rc == 0) {
            rc = mdb_txn_commit(child); /* into wal->outer: no I/O */
            if (rc && journaled) {
                wal_fail_stop(wal, "adding a journaled batch to the fold", rc);
                batch_fail(wal, reqs, n, WAL_EFATAL);
                return;
            }
        }
        if (rc == 0 && !journaled) {
            MDB_txn *txn = wal->outer;
            wal->outer = NULL;
            int64_t ta = wal_mono_us();
            rc = wal_txn_commit(wal, txn);
            if (rc == 0) {
                __atomic_add_fetch(&wal->st_applies, 1, __ATOMIC_RELAXED);
                __atomic_add_fetch(&wal->st_apply_us_sum, (uint64_t)(wal_mono_us() - ta),
                                   __ATOMIC_RELAXED);
                wal_notify_visible(wal);
            }
        }
        if (rc == 0) {
            wal_batch_apply(wal);
            __atomic_store_n(&wal->st_acked_next, wal->next_seq, __ATOMIC_RELEASE);
            if (journaled)
                wal->outer_batches++;
            uint64_t msgs = 0;
            for (size_t q = 0; q < n; q++)
                msgs += reqs[q]->status == 0 ? reqs[q]->n_msgs : 0;
            uint64_t took = (uint64_t)(wal_mono_us() - t0);
            wal_hist_add(wal->st_commit_us, wal_commit_us_bounds, took);
            __atomic_add_fetch(&wal->st_commit_us_sum, took, __ATOMIC_RELAXED);
            wal_hist_add(wal->st_batch, wal_batch_bounds, msgs);
            __atomic_add_fetch(&wal->st_commits, 1, __ATOMIC_RELAXED);
            __atomic_add_fetch(&wal->st_msgs, msgs, __ATOMIC_RELAXED);
            if (msgs && __atomic_load_n(&wal->state, __ATOMIC_ACQUIRE) == WAL_STATE_FULL &&
                map_has_room(wal))
                wal_state_ok(wal);
            batch_finish(wal, reqs, n, journaled);
            return;
        }
        wal_batch_rollback(wal, saved_seq, saved_id);
        if (wal->outer && wal->outer_batches > 0 && (rc == MDB_MAP_FULL || rc == MDB_TXN_FULL)) {
            /* The journaled batches waiting in wal->outer take room: fold
             * them into LMDB, then retry this batch alone. */
            int st = outer_commit(wal);
            if (st) {
                batch_fail(wal, reqs, n, st);
                return;
            }
            continue;
        }
        if (wal->outer && wal->outer_batches == 0) {
            mdb_txn_abort(wal->outer); /* begun for this batch only */
            wal->outer = NULL;
        }
        if (rc == MDB_MAP_FULL && wal_map_grow(wal, false) == 0)
            continue; /* retried: not a failed commit */
        if ((rc == MDB_TXN_FULL || rc == MDB_MAP_FULL) && n > 1) {
            /* Too many dirty pages for one txn, or no room for all of it
             * at the map's cap: split the batch, so that the requests that
             * fit are stored and only those that do not are refused. */
            wal_batch_run(wal, reqs, n / 2);
            wal_batch_run(wal, reqs + n / 2, n - n / 2);
            return;
        }
        batch_fail(wal, reqs, n, batch_status(wal, rc, "committing to LMDB"));
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
            uint8_t dkey[WAL_DEDUP_KEY_MAX];
            MDB_val dk = {wal_dedup_key(dkey, rec.producer, rec.producer_len, rec.stream_id,
                                        rec.msgid, rec.msgid_len),
                          dkey},
                    dv;
            wal_dedup_val_t d;
            if (mdb_get(txn, wal->dbi_dedup2, &dk, &dv) == 0 &&
                wal_dedup_val_decode(dv.mv_data, dv.mv_size, &d) == 0 &&
                d.stream_id == rec.stream_id && d.offset == rec.offset) {
                rc = mdb_del(txn, wal->dbi_dedup2, &dk, NULL);
                if (rc)
                    break;
            }
        }
        struct head *e = rec.stream_id < wal->by_id_cap ? wal->by_id[rec.stream_id] : NULL;
        if (e) {
            rc = wal_head_touch(wal, e);
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
        rc = wal_write_heads(wal, txn);
    if (rc) {
        mdb_txn_abort(txn);
        return rc;
    }
    rc = wal_txn_commit(wal, txn);
    if (rc == 0) {
        wal_batch_apply(wal);
        job->dropped += dropped;
    }
    return rc;
}

static void retain_step(wal_t *wal, struct retain_job *job)
{
    bool more = false;
    /* With a fold deferred for space, LMDB lacks acknowledged batches:
     * nothing may be written before they are folded in. */
    int rc = wal->refold ? MDB_MAP_FULL : retain_chunk(wal, job, &more);
    if (rc && !wal->refold) {
        wal_batch_rollback(wal, wal->next_seq, wal->next_stream_id);
        if (rc == MDB_MAP_FULL && wal_map_grow(wal, true) == 0)
            return; /* retried on the next step */
        if ((rc == MDB_MAP_FULL || rc == MDB_TXN_FULL) && job->chunk > 1) {
            job->chunk /= 2; /* deletes need pages too: take smaller bites */
            return;
        }
    }
    int status = 0;
    if (rc == MDB_CORRUPTED)
        status = WAL_ECORRUPT;
    else if (rc == MDB_MAP_FULL || no_space(rc) || wal_space_nospace_eio(wal, rc))
        status = WAL_EFULL;
    else if (rc) {
        wal_fail_stop(wal, "retention", rc);
        status = WAL_EFATAL;
    }
    if (rc || !more) {
        /* Give the reserve back: appends stop at map_size_max again. */
        if (wal->map_size > wal->opts.map_size_max)
            (void)wal_map_set(wal, wal->opts.map_size_max);
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

void *wal_writer_main(void *arg)
{
    wal_t *wal = arg;
    wal_append_t **batch = NULL;
    size_t batch_cap = 0;

    pthread_mutex_lock(&wal->mu);
    for (;;) {
        while (!wal->q_head && !wal->retain && !wal->closing) {
            bool probe = probe_wanted(wal) && !__atomic_load_n(&wal->failed, __ATOMIC_ACQUIRE);
            if (probe && wal_mono_us() >= wal->probe_us) {
                /* Storage full and idle: retry the growth or the fold. */
                wal->writer_busy = true;
                pthread_mutex_unlock(&wal->mu);
                probe_run(wal);
                pthread_mutex_lock(&wal->mu);
                wal->writer_busy = wal->refold;
                continue;
            }
            if (!wal->outer && !probe) {
                pthread_cond_wait(&wal->cond, &wal->mu);
                continue;
            }
            /* Journaled batches wait in wal->outer: fold them into LMDB
             * once no new work came for apply_idle_us. */
            int64_t wait_us = (int64_t)wal->opts.apply_idle_us;
            if (!wal->outer)
                wait_us = wal->probe_us - wal_mono_us();
            if (wait_us < 1)
                wait_us = 1;
            struct timespec dl;
            clock_gettime(CLOCK_REALTIME, &dl);
            dl.tv_sec += (time_t)(wait_us / 1000000);
            dl.tv_nsec += (long)(wait_us % 1000000) * 1000;
            dl.tv_sec += dl.tv_nsec / 1000000000;
            dl.tv_nsec %= 1000000000;
            int w = pthread_cond_timedwait(&wal->cond, &wal->mu, &dl);
            if (__atomic_load_n(&wal->failed, __ATOMIC_ACQUIRE))
                break;
            if (w == ETIMEDOUT && !wal->q_head && wal->outer) {
                pthread_mutex_unlock(&wal->mu);
                (void)outer_commit(wal);
                pthread_mutex_lock(&wal->mu);
                wal->writer_busy = wal->refold;
            }
        }
        if (__atomic_load_n(&wal->failed, __ATOMIC_ACQUIRE)) {
            if (wal->outer || wal->wait_head) {
                /* Journaled batches stay in the journal for the next open. */
                if (wal->outer)
                    mdb_txn_abort(wal->outer);
                wal->outer = NULL;
                wal_append_t *waiting = wal->wait_head;
                wal->wait_head = wal->wait_tail = NULL;
                pthread_mutex_unlock(&wal->mu);
                wal_complete_list(wal, waiting, WAL_EFATAL);
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
                wal_complete(wal, list, WAL_EFATAL);
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
            wal->writer_busy = wal->refold;
            continue;
        }
        if (!wal->q_head && wal->closing && wal->refold) {
            /* A last try; what stays deferred is in the journal, durable,
             * and the next open folds it in: its requests are done. */
            pthread_mutex_unlock(&wal->mu);
            if (refold_try(wal) != 0 && wal->refold) {
                wal_append_t *waiting = wal->wait_head;
                wal->wait_head = wal->wait_tail = NULL;
                wal->refold = false;
                wal_complete_list(wal, waiting, 0);
            }
            pthread_mutex_lock(&wal->mu);
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
                for (wal_append_t *r = wal->q_head; r && msgs < wal->opts.batch_wait_msgs;
                     r = r->next)
                    msgs += r->n_msgs + r->n_cursors; /* count only up to the threshold */
                if (msgs >= wal->opts.batch_wait_msgs || wal->closing)
                    break;
                if (pthread_cond_timedwait(&wal->cond, &wal->mu, &dl) == ETIMEDOUT)
                    break;
            }
        }
        /* Take whole requests up to the batch limits (at least one). */
        size_t n = 0;
        uint64_t msgs = 0, bytes = 0;
        int64_t taken = wal_mono_us();
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
            wal_batch_run(wal, batch, n);
            if (wal->outer && wal_mono_us() - wal->outer_t0 >= (int64_t)wal->opts.apply_us)
                (void)outer_commit(wal);
        }
        pthread_mutex_lock(&wal->mu);
        wal->writer_busy = wal->outer != NULL || wal->refold; /* restores wait for the fold */
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

void wal_testing_fail_folds(wal_t *wal, int err, unsigned count)
{
    pthread_mutex_lock(&wal->mu);
    wal->fault_fold_err = err;
    wal->fault_fold = count;
    pthread_mutex_unlock(&wal->mu);
}

void wal_testing_retry_now(wal_t *wal)
{
    pthread_mutex_lock(&wal->mu);
    wal->probe_us = 0;
    wal->jext_retry_us = 0;
    pthread_cond_broadcast(&wal->cond);
    pthread_mutex_unlock(&wal->mu);
}
