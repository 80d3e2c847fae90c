/*
 * wal_restore_test.c - the calls arq-replay builds on: wal_restore_* (a WAL
 * rebuilt from copies of its records keeps sequences, offsets, stream ids
 * and epochs, so every record is byte for byte the original; dedup entries
 * come back; appends continue after it) with their refusals, and
 * wal_backup (a consistent copy taken while a writer appends).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "wal_test_util.h"

static wal_t *open_wal(const char *dir, int read_only, uint64_t map_size)
{
    wal_options_t o = {.dir = dir, .read_only = read_only, .map_size = map_size};
    wal_t *wal = NULL;
    char err[256];
    int rc = wal_open(&o, NULL, &wal, err, sizeof(err));
    if (rc)
        fail_msg("wal_open %s: %s (%s)", dir, wal_strerror(rc), err);
    return wal;
}

static void subdir(char *out, size_t cap, const char *base, const char *name)
{
    snprintf(out, cap, "%s/%s", base, name);
}

static void read_log(wal_t *wal, tu_recs_t *rs)
{
    uint64_t from = 1;
    wal_read_result_t res;
    do {
        assert_int_equal(wal_log_read(wal, from, 1000, UINT64_MAX, tu_recs_cb, rs, &res), 0);
        from = res.next;
    } while (res.count);
}

static const char *names[] = {"chat.a", "chat.b", "user.7.inbox"};

/* A source WAL: 3 streams, 60 messages, some with producer/msgid/headers. */
static void build_source(const char *dir)
{
    wal_t *wal = open_wal(dir, 0, 0);
    for (int i = 0; i < 60; i++) {
        char payload[64], msgid[32], headers[8] = {(char)0x81, (char)0xa1, 'k', (char)0xa1, 'v'};
        int n = snprintf(payload, sizeof(payload), "payload %d", i);
        snprintf(msgid, sizeof(msgid), "m-%d", i);
        wal_msg_t m = tu_msg(names[i % 3], payload, (size_t)n);
        if (i % 2) {
            m.producer = "alice";
            m.producer_len = 5;
            m.msgid = msgid;
            m.msgid_len = strlen(msgid);
        }
        if (i % 5 == 0) {
            m.headers = headers;
            m.headers_len = 5;
        }
        m.direction = i % 7 == 0 ? WAL_DIR_OUT : WAL_DIR_IN;
        assert_int_equal(wal_append_sync(wal, &m, 1, NULL), 0);
    }
    wal_close(wal);
}

static wal_restore_msg_t as_restore(const tu_rec_t *r)
{
    wal_restore_msg_t m = {.seq = r->seq, .offset = r->offset};
    m.msg.stream = r->stream;
    m.msg.stream_len = r->stream_len;
    m.msg.payload = r->payload;
    m.msg.payload_len = r->payload_len;
    m.msg.producer = r->producer;
    m.msg.producer_len = r->producer_len;
    m.msg.msgid = r->msgid;
    m.msg.msgid_len = r->msgid_len;
    m.msg.headers = r->headers;
    m.msg.headers_len = r->headers_len;
    m.msg.direction = r->direction;
    m.msg.timestamp_us = r->timestamp_us;
    return m;
}

static void test_restore_roundtrip(void **state)
{
    const char *base = *state;
    char src[256], dst[256];
    subdir(src, sizeof(src), base, "src");
    subdir(dst, sizeof(dst), base, "dst");
    build_source(src);

    wal_t *s = open_wal(src, 1, 0);
    tu_recs_t all = {0};
    read_log(s, &all);
    assert_int_equal(all.n, 60);
    wal_stream_info_t info[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(wal_stream_get(s, names[i], strlen(names[i]), &info[i]), 0);
    wal_close(s);

    /* Stream 0 whole, stream 1 from offset 5 (as if 1..4 were retained),
     * stream 2 not at all; written stream by stream, so sequences arrive
     * out of order and with holes. */
    wal_t *d = open_wal(dst, 0, 0);
    for (int i = 0; i < 2; i++) {
        wal_restore_stream_t rs = {.stream = names[i],
                                   .stream_len = strlen(names[i]),
                                   .id = info[i].id,
                                   .epoch = info[i].epoch,
                                   .first_offset = i == 0 ? 1 : 5,
                                   .created_us = info[i].created_us};
        assert_int_equal(wal_restore_stream(d, &rs), 0);
    }
    size_t written = 0;
    for (int i = 1; i >= 0; i--) {
        wal_restore_msg_t batch[32];
        size_t n = 0;
        for (size_t j = 0; j < all.n; j++) {
            tu_rec_t *r = &all.v[j];
            if (r->stream_id != info[i].id || (i == 1 && r->offset < 5))
                continue;
            batch[n++] = as_restore(r);
            if (n == 3) { /* several transactions per stream */
                assert_int_equal(wal_restore_append(d, batch, n), 0);
                written += n;
                n = 0;
            }
        }
        if (n) {
            assert_int_equal(wal_restore_append(d, batch, n), 0);
            written += n;
        }
    }
    assert_int_equal(written, 20 + 16);
    assert_int_equal(wal_restore_seq(d, 100), 0);
    assert_int_equal(wal_restore_seq(d, 50), 0); /* never lowers */
    wal_close(d);

    /* Read back: byte-identical records (same checksums), same metadata. */
    d = open_wal(dst, 1, 0);
    tu_recs_t got = {0};
    read_log(d, &got);
    assert_int_equal(got.n, written);
    size_t k = 0;
    for (size_t j = 0; j < all.n; j++) {
        tu_rec_t *r = &all.v[j];
        if (r->stream_id == info[2].id || (r->stream_id == info[1].id && r->offset < 5))
            continue;
        tu_rec_t *g = &got.v[k++];
        assert_int_equal(g->seq, r->seq);
        assert_int_equal(g->offset, r->offset);
        assert_int_equal(g->checksum, r->checksum);
        assert_int_equal(g->timestamp_us, r->timestamp_us);
        assert_int_equal(g->direction, r->direction);
        assert_true(tu_mem_eq(g->payload, g->payload_len, r->payload, r->payload_len));
        assert_true(tu_mem_eq(g->msgid, g->msgid_len, r->msgid, r->msgid_len));
        assert_true(tu_mem_eq(g->headers, g->headers_len, r->headers, r->headers_len));
    }
    for (int i = 0; i < 2; i++) {
        wal_stream_info_t gi;
        assert_int_equal(wal_stream_get(d, names[i], strlen(names[i]), &gi), 0);
        assert_int_equal(gi.id, info[i].id);
        assert_int_equal(gi.epoch, info[i].epoch);
        assert_int_equal(gi.first_offset, i == 0 ? 1 : 5);
        assert_int_equal(gi.next_offset, info[i].next_offset);
    }
    wal_read_result_t res;
    tu_recs_t one = {0};
    assert_int_equal(
        wal_stream_read(d, names[1], strlen(names[1]), 1, 10, UINT64_MAX, tu_recs_cb, &one, &res),
        WAL_ETRUNCATED);
    assert_int_equal(res.next, 5);
    /* dedup entries came back with the records */
    uint32_t sid;
    uint64_t off;
    assert_int_equal(
        wal_dedup_get(d, "alice", 5, names[1], strlen(names[1]), "m-13", 4, &sid, &off), 0);
    assert_int_equal(sid, info[1].id);
    assert_int_equal(off, 5);
    assert_int_equal(
        wal_dedup_get(d, "alice", 5, names[1], strlen(names[1]), "m-1", 3, &sid, &off),
        WAL_ENOTFOUND);
    wal_stats_t st;
    assert_int_equal(wal_stats_get(d, &st), 0);
    assert_int_equal(st.next_seq, 100);
    wal_close(d);

    /* Appends continue after it: next offsets, sequences from 100, dedup. */
    d = open_wal(dst, 0, 0);
    wal_msg_t m = tu_msg(names[0], "new", 3);
    wal_result_t wr;
    assert_int_equal(wal_append_sync(d, &m, 1, &wr), 0);
    assert_int_equal(wr.offset, info[0].next_offset);
    assert_int_equal(wr.seq, 100);
    assert_int_equal(wr.epoch, info[0].epoch);
    m.producer = "alice";
    m.producer_len = 5;
    m.msgid = "m-3";
    m.msgid_len = 3;
    assert_int_equal(wal_append_sync(d, &m, 1, &wr), 0);
    assert_int_equal(wr.duplicate, 1);
    m = tu_msg("fresh", "x", 1); /* a new stream gets an id after the restored ones */
    assert_int_equal(wal_append_sync(d, &m, 1, &wr), 0);
    wal_stream_info_t fi;
    assert_int_equal(wal_stream_get(d, "fresh", 5, &fi), 0);
    assert_true(fi.id > info[0].id && fi.id > info[1].id);
    wal_close(d);
    tu_recs_free(&all);
    tu_recs_free(&got);
    tu_recs_free(&one);
}

static void test_restore_refusals(void **state)
{
    const char *dir = *state;
    wal_t *w = open_wal(dir, 0, 0);
    wal_restore_stream_t rs = {
        .stream = "s", .stream_len = 1, .id = 7, .epoch = 42, .first_offset = 10};
    assert_int_equal(wal_restore_stream(w, &rs), 0);
    assert_int_equal(wal_restore_stream(w, &rs), WAL_EINVAL); /* exists */
    wal_restore_stream_t other = rs;
    other.stream = "t";
    assert_int_equal(wal_restore_stream(w, &other), WAL_EINVAL); /* id 7 taken */
    other.id = 0;
    other.epoch = 0;
    assert_int_equal(wal_restore_stream(w, &other), WAL_EINVAL); /* epoch 0 */
    other.epoch = 1;
    other.first_offset = 0;
    assert_int_equal(wal_restore_stream(w, &other), WAL_EINVAL);

    wal_restore_msg_t m[2] = {{.msg = tu_msg("s", "a", 1), .seq = 5, .offset = 10},
                              {.msg = tu_msg("s", "b", 1), .seq = 6, .offset = 12}};
    /* all or nothing: the second record's offset is wrong */
    assert_int_equal(wal_restore_append(w, m, 2), WAL_EINVAL);
    m[1].offset = 11;
    m[1].seq = 5; /* a sequence twice */
    assert_int_equal(wal_restore_append(w, m, 2), WAL_EINVAL);
    m[1].seq = 3;
    assert_int_equal(wal_restore_append(w, m, 2), 0);
    assert_int_equal(wal_restore_append(w, m, 1), WAL_EINVAL); /* offset 10 is taken now */
    wal_restore_msg_t u = {.msg = tu_msg("unknown", "a", 1), .seq = 9, .offset = 1};
    assert_int_equal(wal_restore_append(w, &u, 1), WAL_EINVAL);
    wal_stream_info_t si;
    assert_int_equal(wal_stream_get(w, "s", 1, &si), 0);
    assert_int_equal(si.first_offset, 10);
    assert_int_equal(si.next_offset, 12);
    assert_int_equal(si.id, 7);
    wal_close(w);

    w = open_wal(dir, 1, 0);
    other.first_offset = 1;
    assert_int_equal(wal_restore_stream(w, &other), WAL_ECLOSED);
    assert_int_equal(wal_restore_seq(w, 10), WAL_ECLOSED);
    tu_recs_t rs2 = {0};
    wal_read_result_t res;
    assert_int_equal(wal_stream_read(w, "s", 1, 10, 10, UINT64_MAX, tu_recs_cb, &rs2, &res), 0);
    assert_int_equal(rs2.n, 2);
    assert_int_equal(rs2.v[0].seq, 5);
    assert_int_equal(rs2.v[1].seq, 3);
    tu_recs_free(&rs2);
    wal_close(w);
}

/* A restore larger than the initial map grows it. */
static void test_restore_grows_map(void **state)
{
    const char *dir = *state;
    wal_t *w = open_wal(dir, 0, 1u << 20);
    wal_restore_stream_t rs = {.stream = "big", .stream_len = 3, .epoch = 9, .first_offset = 1};
    assert_int_equal(wal_restore_stream(w, &rs), 0);
    static uint8_t payload[64 * 1024];
    memset(payload, 'p', sizeof(payload));
    wal_restore_msg_t m[16];
    uint64_t off = 1;
    for (int round = 0; round < 8; round++) {
        for (int i = 0; i < 16; i++, off++)
            m[i] = (wal_restore_msg_t){
                .msg = tu_msg("big", payload, sizeof(payload)), .seq = off * 2, .offset = off};
        assert_int_equal(wal_restore_append(w, m, 16), 0);
    }
    wal_stats_t st;
    assert_int_equal(wal_stats_get(w, &st), 0);
    assert_true(st.map_size > (1u << 20));
    assert_int_equal(st.next_seq, (off - 1) * 2 + 1);
    wal_close(w);
}

struct appender {
    wal_t *wal;
    volatile int stop;
    uint64_t count;
};

static void *append_loop(void *arg)
{
    struct appender *a = arg;
    while (!a->stop) {
        wal_msg_t m = tu_msg("busy", "0123456789", 10);
        TU_CHECK(wal_append_sync(a->wal, &m, 1, NULL) == 0, "append");
        a->count++;
    }
    return NULL;
}

struct offsets {
    uint64_t expect;
    int bad;
};

static int contiguous_cb(const wal_record_t *r, void *arg)
{
    struct offsets *o = arg;
    if (r->offset != o->expect)
        o->bad = 1;
    o->expect++;
    return 0;
}

static void test_backup_hot(void **state)
{
    const char *base = *state;
    char src[256], out[256];
    subdir(src, sizeof(src), base, "src");
    subdir(out, sizeof(out), base, "out");
    wal_t *w = open_wal(src, 0, 0);
    struct appender a = {.wal = w};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, append_loop, &a), 0);
    while (__atomic_load_n(&a.count, __ATOMIC_RELAXED) < 200)
        usleep(1000);
    /* A read-only handle next to the writer, as arq-replay backup does. */
    wal_t *ro = open_wal(src, 1, 0);
    char err[256] = "";
    assert_int_equal(wal_backup(ro, out, err, sizeof(err)), WAL_EINVAL); /* no such dir */
    assert_int_equal(mkdir(out, 0700), 0);
    assert_int_equal(wal_backup(ro, out, err, sizeof(err)), 0);
    assert_int_equal(wal_backup(ro, out, err, sizeof(err)), WAL_EINVAL); /* never overwrites */
    assert_non_null(strstr(err, "already exists"));
    wal_close(ro);
    a.stop = 1;
    pthread_join(t, NULL);
    assert_int_equal(tu_errors(), 0);
    wal_close(w);

    char file[300];
    snprintf(file, sizeof(file), "%s/data.mdb", out);
    struct stat st;
    assert_int_equal(stat(file, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    /* The copy is a consistent snapshot: a contiguous prefix of the stream. */
    wal_t *c = open_wal(out, 1, 0);
    wal_stream_info_t info;
    assert_int_equal(wal_stream_get(c, "busy", 4, &info), 0);
    assert_true(info.next_offset > 200);
    assert_true(info.next_offset <= a.count + 1);
    struct offsets o = {.expect = 1};
    wal_read_result_t res;
    uint64_t from = 1;
    do {
        assert_int_equal(
            wal_stream_read(c, "busy", 4, from, 1000, UINT64_MAX, contiguous_cb, &o, &res), 0);
        from = res.next;
    } while (res.count);
    assert_int_equal(o.bad, 0);
    assert_int_equal(o.expect, info.next_offset);
    wal_close(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_restore_roundtrip, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_restore_refusals, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_restore_grows_map, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_backup_hot, tu_setup_dir, tu_teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
