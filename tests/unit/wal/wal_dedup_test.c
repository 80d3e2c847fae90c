/*
 * wal_dedup_test.c - message ids are unique per (producer, stream): the same
 * id on another stream is another message, a re-send on the same stream is
 * a duplicate, also right after a crash (the journal) and across an open;
 * ids at the size limits (a key over LMDB's limit stands in by its digest);
 * a format-2 WAL's dedup entries (keyed without the stream) are converted at
 * open and still found.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>
#include <lmdb.h>

#include "wal_record.h"
#include "wal_test_util.h"

static wal_t *open_dir(const char *dir)
{
    wal_options_t o = {.dir = dir};
    wal_t *wal = NULL;
    char err[256];
    int rc = wal_open(&o, NULL, &wal, err, sizeof(err));
    if (rc)
        fail_msg("wal_open: %s (%s)", wal_strerror(rc), err);
    return wal;
}

static wal_result_t pub(wal_t *wal, const char *stream, const char *producer, const char *msgid,
                        const char *payload)
{
    wal_msg_t m = tu_msg(stream, payload, strlen(payload));
    m.producer = producer;
    m.producer_len = strlen(producer);
    m.msgid = msgid;
    m.msgid_len = strlen(msgid);
    wal_result_t r;
    assert_int_equal(wal_append_sync(wal, &m, 1, &r), 0);
    return r;
}

static void test_per_stream(void **state)
{
    const char *dir = *state;
    wal_t *wal = open_dir(dir);
    wal_result_t a1 = pub(wal, "s.a", "alice", "order-1", "A");
    wal_result_t b1 = pub(wal, "s.b", "alice", "order-1", "B"); /* another stream: stored */
    assert_int_equal(a1.duplicate, 0);
    assert_int_equal(b1.duplicate, 0);
    assert_int_equal(b1.offset, 1);
    wal_result_t a2 = pub(wal, "s.a", "alice", "order-1", "A again");
    assert_int_equal(a2.duplicate, 1);
    assert_int_equal(a2.offset, a1.offset);
    wal_result_t c1 = pub(wal, "s.a", "bob", "order-1", "C"); /* another producer */
    assert_int_equal(c1.duplicate, 0);
    uint32_t sid;
    uint64_t off;
    assert_int_equal(wal_dedup_get(wal, "alice", 5, "s.b", 3, "order-1", 7, &sid, &off), 0);
    assert_int_equal(off, 1);
    assert_int_equal(wal_dedup_get(wal, "alice", 5, "s.c", 3, "order-1", 7, &sid, &off),
                     WAL_ENOTFOUND);
    /* within one batch, on a stream this batch creates */
    wal_msg_t two[2] = {tu_msg("s.new", "x", 1), tu_msg("s.new", "y", 1)};
    for (int i = 0; i < 2; i++) {
        two[i].producer = "alice";
        two[i].producer_len = 5;
        two[i].msgid = "n-1";
        two[i].msgid_len = 3;
    }
    wal_result_t r2[2];
    assert_int_equal(wal_append_sync(wal, two, 2, r2), 0);
    assert_int_equal(r2[0].duplicate, 0);
    assert_int_equal(r2[1].duplicate, 1);
    assert_int_equal(r2[1].offset, r2[0].offset);
    wal_close(wal);

    wal = open_dir(dir);
    assert_int_equal(pub(wal, "s.b", "alice", "order-1", "B").duplicate, 1);
    assert_int_equal(pub(wal, "s.new", "alice", "n-1", "x").duplicate, 1);
    wal_close(wal);
}

static void test_limits(void **state)
{
    const char *dir = *state;
    wal_t *wal = open_dir(dir);
    char prod[WAL_PRODUCER_MAX + 1], id1[WAL_MSGID_MAX + 1], id2[WAL_MSGID_MAX + 1];
    memset(prod, 'p', WAL_PRODUCER_MAX);
    prod[WAL_PRODUCER_MAX] = 0;
    memset(id1, 'i', WAL_MSGID_MAX);
    id1[WAL_MSGID_MAX] = 0;
    memcpy(id2, id1, sizeof(id2));
    id2[WAL_MSGID_MAX - 1] = 'j'; /* differs in the last byte only */
    wal_result_t a = pub(wal, "lim", prod, id1, "a");
    wal_result_t b = pub(wal, "lim", prod, id2, "b");
    assert_int_equal(a.duplicate, 0);
    assert_int_equal(b.duplicate, 0);
    assert_int_equal(pub(wal, "lim", prod, id1, "a").duplicate, 1);
    assert_int_equal(pub(wal, "lim", prod, id2, "b").offset, b.offset);
    uint32_t sid;
    uint64_t off;
    assert_int_equal(wal_dedup_get(wal, prod, WAL_PRODUCER_MAX, "lim", 3, id2, WAL_MSGID_MAX, &sid,
                                   &off),
                     0);
    assert_int_equal(off, b.offset);
    wal_close(wal);
}

/* Write format-2 dedup entries straight into LMDB, as an older arqd left
 * them, and mark the WAL format 2. */
static void make_format2(const char *dir, uint32_t sid, const char *producer, const char *msgid,
                         uint64_t offset)
{
    MDB_env *env;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 10), 0);
    assert_int_equal(mdb_env_set_mapsize(env, 64u << 20), 0);
    assert_int_equal(mdb_env_open(env, dir, MDB_NOTLS, 0600), 0);
    MDB_txn *txn;
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    MDB_dbi dedup, meta;
    assert_int_equal(mdb_dbi_open(txn, "dedup", 0, &dedup), 0);
    assert_int_equal(mdb_dbi_open(txn, "meta", 0, &meta), 0);
    uint8_t key[600];
    size_t pl = strlen(producer), ml = strlen(msgid);
    key[0] = (uint8_t)pl;
    memcpy(key + 1, producer, pl);
    memcpy(key + 1 + pl, msgid, ml);
    uint8_t val[WAL_DEDUP_VAL_SIZE];
    wal_dedup_val_t dv = {.stream_id = sid, .offset = offset, .time_us = 1};
    wal_dedup_val_encode(&dv, val);
    MDB_val k = {1 + pl + ml, key}, v = {sizeof(val), val};
    assert_int_equal(mdb_put(txn, dedup, &k, &v, 0), 0);
    uint8_t ver[4];
    wal_put_le32(ver, 2);
    MDB_val vk = {14, "format_version"}, vv = {4, ver};
    assert_int_equal(mdb_put(txn, meta, &vk, &vv, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
}

static uint32_t read_version(const char *dir, size_t *ret_old)
{
    MDB_env *env;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 10), 0);
    assert_int_equal(mdb_env_open(env, dir, MDB_NOTLS | MDB_RDONLY, 0600), 0);
    MDB_txn *txn;
    assert_int_equal(mdb_txn_begin(env, NULL, MDB_RDONLY, &txn), 0);
    MDB_dbi dedup, meta;
    assert_int_equal(mdb_dbi_open(txn, "dedup", 0, &dedup), 0);
    assert_int_equal(mdb_dbi_open(txn, "meta", 0, &meta), 0);
    MDB_stat st;
    assert_int_equal(mdb_stat(txn, dedup, &st), 0);
    *ret_old = st.ms_entries;
    MDB_val vk = {14, "format_version"}, vv;
    assert_int_equal(mdb_get(txn, meta, &vk, &vv), 0);
    uint32_t ver = wal_get_le32(vv.mv_data);
    mdb_txn_abort(txn);
    mdb_env_close(env);
    return ver;
}

static void test_format2_converted(void **state)
{
    const char *dir = *state;
    wal_t *wal = open_dir(dir);
    wal_result_t r = pub(wal, "old.s", "carol", "keep", "x");
    (void)pub(wal, "old.t", "carol", "other", "y");
    wal_stream_info_t info;
    assert_int_equal(wal_stream_get(wal, "old.s", 5, &info), 0);
    wal_close(wal);
    /* an entry in the old layout, for a second message id */
    make_format2(dir, info.id, "carol", "legacy", r.offset);

    /* read-only (arq-replay next to a not yet upgraded WAL): found */
    wal_options_t ro = {.dir = dir, .read_only = 1};
    wal_t *rw;
    assert_int_equal(wal_open(&ro, NULL, &rw, NULL, 0), 0);
    uint32_t sid;
    uint64_t off;
    assert_int_equal(wal_dedup_get(rw, "carol", 5, "old.s", 5, "legacy", 6, &sid, &off), 0);
    assert_int_equal(wal_dedup_get(rw, "carol", 5, "old.t", 5, "legacy", 6, &sid, &off),
                     WAL_ENOTFOUND); /* it names old.s */
    wal_close(rw);

    wal = open_dir(dir);
    size_t old;
    assert_int_equal(read_version(dir, &old), WAL_FORMAT_VERSION);
    assert_int_equal(old, 0);
    assert_int_equal(wal_dedup_get(wal, "carol", 5, "old.s", 5, "legacy", 6, &sid, &off), 0);
    assert_int_equal(off, r.offset);
    wal_result_t again = pub(wal, "old.s", "carol", "legacy", "z");
    assert_int_equal(again.duplicate, 1);
    assert_int_equal(again.offset, r.offset);
    assert_int_equal(pub(wal, "old.t", "carol", "legacy", "z").duplicate, 0);
    wal_close(wal);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_per_stream, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_limits, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_format2_converted, tu_setup_dir, tu_teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
