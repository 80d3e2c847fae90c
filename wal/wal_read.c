/*
 * wal_read.c - read transactions and reads (see wal.c for the design).
 */
#include "wal_int.h"

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
            return wal_map_mdb(rc);
        /* Another process grew the map: adopt its size, then retry. */
        pthread_rwlock_wrlock(&wal->map_lock);
        rc = mdb_env_set_mapsize(wal->env, 0);
        pthread_rwlock_unlock(&wal->map_lock);
        if (rc)
            return wal_map_mdb(rc);
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
        return wal_map_mdb(rc);
    }
    return 0;
}

static void rtxn_cursor_end(wal_t *wal, MDB_txn *txn, MDB_cursor *cur)
{
    mdb_cursor_close(cur);
    rtxn_end(wal, txn);
}

/* ---- reads ------------------------------------------------------------- */

static int stream_meta_get(wal_t *wal, MDB_txn *txn, const char *name, size_t len,
                           wal_stream_meta_t *m)
{
    MDB_val k = {len, (void *)name}, v;
    int rc = mdb_get(txn, wal->dbi_streams, &k, &v);
    if (rc)
        return wal_map_mdb(rc);
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
            rc = wal_map_mdb(g);
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
        rc = wal_map_mdb(g);
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
        rc = wal_map_mdb(mdb_get(txn, wal->dbi_cursors, &k, &v));
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
    if (!wal_session_ok(session, session_len) || !ret)
        return WAL_EINVAL;
    if (wal->no_sessions)
        return WAL_ENOTFOUND;
    MDB_txn *txn;
    int rc = rtxn_begin(wal, &txn);
    if (rc)
        return rc;
    MDB_val k = {session_len, (void *)session}, v;
    rc = wal_map_mdb(mdb_get(txn, wal->dbi_sessions, &k, &v));
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
        rc = wal_map_mdb(grc);
    rtxn_cursor_end(wal, txn, cur);
    return rc;
}

int wal_session_cursors(wal_t *wal, const void *session, size_t session_len, wal_cursor_cb cb,
                        void *arg)
{
    if (!wal_session_ok(session, session_len) || !cb)
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
        rc = wal_map_mdb(grc);
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
        rc = wal_map_mdb(grc);
    rtxn_cursor_end(wal, txn, cur);
    return rc;
}

int wal_dedup_get(wal_t *wal, const void *producer, size_t producer_len, const char *stream,
                  size_t stream_len, const void *msgid, size_t msgid_len, uint32_t *ret_stream_id,
                  uint64_t *ret_offset)
{
    if (producer_len > WAL_PRODUCER_MAX || (producer_len && !producer) || !msgid || !msgid_len ||
        msgid_len > WAL_MSGID_MAX || !wal_stream_ok(stream, stream_len))
        return WAL_EINVAL;
    MDB_txn *txn;
    int rc = rtxn_begin(wal, &txn);
    if (rc)
        return rc;
    MDB_val sk = {stream_len, (void *)stream}, sv, v;
    wal_stream_meta_t m;
    rc = wal_map_mdb(mdb_get(txn, wal->dbi_streams, &sk, &sv));
    if (!rc)
        rc = wal_stream_meta_decode(sv.mv_data, sv.mv_size, &m);
    if (!rc && !wal->no_dedup2) {
        uint8_t key[WAL_DEDUP_KEY_MAX];
        MDB_val k = {wal_dedup_key(key, producer, producer_len, m.id, msgid, msgid_len), key};
        rc = wal_map_mdb(mdb_get(txn, wal->dbi_dedup2, &k, &v));
    }
    if ((!rc && wal->no_dedup2) || rc == WAL_ENOTFOUND) {
        /* a format-2 entry not converted yet (see dedup_convert) */
        uint8_t key[1 + WAL_PRODUCER_MAX + WAL_MSGID_MAX];
        key[0] = (uint8_t)producer_len;
        if (producer_len)
            memcpy(key + 1, producer, producer_len);
        memcpy(key + 1 + producer_len, msgid, msgid_len);
        MDB_val k = {1 + producer_len + msgid_len, key};
        int orc = wal_map_mdb(mdb_get(txn, wal->dbi_dedup, &k, &v));
        rc = orc ? orc : rc == WAL_ENOTFOUND ? 0 : rc;
    }
    wal_dedup_val_t dv;
    if (!rc)
        rc = wal_dedup_val_decode(v.mv_data, v.mv_size, &dv);
    rtxn_end(wal, txn);
    if (!rc && dv.stream_id != m.id)
        rc = WAL_ENOTFOUND; /* the old key's entry names another stream */
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
    s.live_bytes = wal_pages_in_use(wal, txn) * st.ms_psize;
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
    s.journal = wal->jfd[0] >= 0;
    *ret = s;
    return 0;
}
