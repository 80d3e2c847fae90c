/*
 * wal_restore.c - restores (see wal.c for the design).
 */
#include "wal_int.h"

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
    int rc = wal_accepting_locked(wal);
    if (!rc && (wal->q_head || wal->retain || wal->writer_busy))
        rc = WAL_EBUSY;
    if (!rc)
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
    wal_fail_stop(wal, "restoring records", rc);
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
        mrc = wal_write_heads(wal, txn);
    if (!mrc && with_seq)
        mrc = wal_write_next_seq(wal, txn);
    if (mrc) {
        mdb_txn_abort(txn);
        return mrc;
    }
    return wal_txn_commit(wal, txn);
}

int wal_restore_stream(wal_t *wal, const wal_restore_stream_t *s)
{
    if (!s || !wal_stream_ok(s->stream, s->stream_len) || s->epoch == 0 || s->first_offset == 0 ||
        s->first_offset == UINT64_MAX)
        return WAL_EINVAL;
    int rc = restore_enter(wal);
    if (rc)
        return rc;
    uint64_t h = wal_name_hash(s->stream, s->stream_len);
    struct head *e = wal_head_find(wal, s->stream, s->stream_len, h);
    uint32_t id = s->id ? s->id : wal->next_stream_id;
    if ((e && e->committed) || id == 0 || id == UINT32_MAX ||
        (id < wal->by_id_cap && wal->by_id[id] && wal->by_id[id] != e)) {
        rc = WAL_EINVAL;
        goto out;
    }
    if (!e) {
        rc = wal_head_insert(wal, s->stream, s->stream_len, h, &e);
        if (rc)
            goto out;
    }
    for (;;) {
        uint64_t saved_seq = wal->next_seq;
        uint32_t saved_id = wal->next_stream_id;
        restore_begin_batch(wal);
        rc = wal_head_touch(wal, e);
        if (rc)
            break;
        e->pending.id = id;
        e->pending.epoch = s->epoch;
        e->pending.first_offset = s->first_offset;
        e->pending.next_offset = s->first_offset;
        e->pending.created_us = s->created_us;
        if (id >= wal->next_stream_id)
            wal->next_stream_id = id + 1;
        rc = wal_head_set_id(wal, e);
        if (rc) {
            wal_batch_rollback(wal, saved_seq, saved_id);
            break;
        }
        int mrc = restore_txn(wal, NULL, 0, false);
        if (!mrc) {
            wal_batch_apply(wal);
            rc = 0;
            break;
        }
        wal_batch_rollback(wal, saved_seq, saved_id);
        if (mrc == MDB_MAP_FULL && wal_map_grow(wal, false) == 0)
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
           wal_stream_ok(m->stream, m->stream_len) && m->producer_len <= WAL_PRODUCER_MAX &&
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
    struct head *e =
        wal_head_find(wal, m->stream, m->stream_len, wal_name_hash(m->stream, m->stream_len));
    if (!e || !e->committed)
        return WAL_EINVAL;
    int rc = wal_head_touch(wal, e);
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
    uint8_t dkey[WAL_DEDUP_KEY_MAX];
    size_t dkey_len = 0;
    if (m->msgid_len)
        dkey_len = wal_dedup_key(dkey, m->producer, m->producer_len, rec.stream_id, m->msgid,
                                 m->msgid_len);
    rc = wal_put_record(wal, txn, &rec, MDB_NOOVERWRITE, dkey, dkey_len, m->timestamp_us);
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
            wal_batch_apply(wal);
            rc = 0;
            break;
        }
        wal_batch_rollback(wal, saved_seq, saved_id);
        if (mrc == MDB_MAP_FULL && wal_map_grow(wal, false) == 0)
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
