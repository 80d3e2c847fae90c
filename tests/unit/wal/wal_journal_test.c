/*
 * wal_journal_test.c - the WAL's journal (docs/wal-format.md, "Journal"):
 * appends acknowledged at their durable point (wal_append_when_durable)
 * before LMDB holds them survive the death of the process; recovery stops
 * at a damaged entry and never replays a stale lap of the file; a second
 * writer of the same WAL runs without the journal; the format codec
 * rejects damage.
 *
 * A "crash" is a forked child that appends, waits for its acknowledgements
 * and _exits with the WAL open and its journal not folded into LMDB (the
 * fold interval is set far beyond the test's length).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>
#include <fcntl.h>
#include <sys/wait.h>

#include "wal_journal.h"
#include "wal_record.h"
#include "wal_test_util.h"

#define STREAMS 3

static wal_t *open_wal(const char *dir, int read_only, uint32_t apply_us)
{
    wal_options_t o = {
        .dir = dir, .read_only = read_only, .apply_us = apply_us, .apply_idle_us = apply_us};
    wal_t *wal = NULL;
    char err[256];
    int rc = wal_open(&o, NULL, &wal, err, sizeof(err));
    if (rc)
        fail_msg("wal_open: %s (%s)", wal_strerror(rc), err);
    return wal;
}

static void stream_name(unsigned s, char *buf)
{
    snprintf(buf, 16, "j%u", s);
}

/* Append one batch of n messages (stream s, msgids "m<offset-key>"),
 * acknowledged at the durable point. Returns the status. */
static int append_batch(wal_t *wal, unsigned s, uint64_t first_key, unsigned n, wal_result_t *res)
{
    tu_waiter_t w;
    tu_waiter_init(&w);
    wal_append_t *req;
    assert_int_equal(wal_append_new(tu_waiter_cb, &w, &req), 0);
    char name[16];
    stream_name(s, name);
    uint8_t payload[200];
    char msgid[32];
    for (unsigned i = 0; i < n; i++) {
        uint64_t key = first_key + i;
        size_t len = tu_pos_len(s, key, sizeof(payload));
        tu_fill(payload, len, tu_pos_key(s, key));
        wal_msg_t m = tu_msg(name, payload, len);
        snprintf(msgid, sizeof(msgid), "m%u-%llu", s, (unsigned long long)key);
        m.producer = "p";
        m.producer_len = 1;
        m.msgid = (const uint8_t *)msgid;
        m.msgid_len = strlen(msgid);
        assert_int_equal(wal_append_add_msg(req, &m), 0);
    }
    wal_append_when_durable(req);
    assert_int_equal(wal_append_submit(wal, req), 0);
    tu_waiter_wait(&w);
    int st = wal_append_status(req);
    for (unsigned i = 0; i < n && !st; i++)
        res[i] = *wal_append_result(req, i);
    wal_append_free(req);
    tu_waiter_destroy(&w);
    return st;
}

/* Records of stream s, checked against their payloads; returns the count. */
static uint64_t check_stream(wal_t *wal, unsigned s, uint64_t expect_next)
{
    char name[16];
    stream_name(s, name);
    wal_stream_info_t info;
    if (wal_stream_get(wal, name, strlen(name), &info) != 0)
        return 0;
    assert_int_equal(info.next_offset, expect_next);
    tu_recs_t rs = {0};
    wal_read_result_t rr = {0};
    uint64_t from = 1;
    while (from < info.next_offset) {
        assert_int_equal(
            wal_stream_read(wal, name, strlen(name), from, 500, 1 << 20, tu_recs_cb, &rs, &rr), 0);
        assert_true(rr.count > 0);
        from = rr.next;
    }
    assert_int_equal(rs.n, info.next_offset - 1);
    for (size_t i = 0; i < rs.n; i++) {
        assert_int_equal(rs.v[i].offset, i + 1);
        /* offsets were assigned in key order: key = offset - 1 */
        assert_int_equal(rs.v[i].payload_len, tu_pos_len(s, i, 200));
        assert_true(tu_check_fill(rs.v[i].payload, rs.v[i].payload_len, tu_pos_key(s, i)));
    }
    uint64_t n = rs.n;
    tu_recs_free(&rs);
    return n;
}

/* Child: append `batches` batches of 5 per stream, report acks on fd,
 * then die without closing. */
static void child_append(const char *dir, unsigned batches, uint64_t start_key, int fd)
{
    wal_t *wal = open_wal(dir, 0, 60000000);
    wal_result_t res[8];
    for (unsigned b = 0; b < batches; b++)
        for (unsigned s = 0; s < STREAMS; s++) {
            if (append_batch(wal, s, start_key + b * 5, 5, res) != 0)
                _exit(3);
            if (write(fd, &res[4].offset, 8) != 8)
                _exit(4);
        }
    _exit(0);
}

static uint64_t crash_run(const char *dir, unsigned batches, uint64_t start_key)
{
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(p[0]);
        child_append(dir, batches, start_key, p[1]);
    }
    close(p[1]);
    uint64_t off, acks = 0, last = 0;
    while (read(p[0], &off, 8) == 8) {
        acks++;
        last = off;
    }
    close(p[0]);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    assert_int_equal(acks, (uint64_t)batches * STREAMS);
    return last;
}

static void test_durable_acks_survive_process_death(void **state)
{
    const char *dir = *state;
    uint64_t last = crash_run(dir, 20, 0);
    assert_int_equal(last, 100);

    /* LMDB alone does not hold them: the journal is what carried them */
    wal_t *ro = open_wal(dir, 1, 0);
    char name[16];
    stream_name(0, name);
    wal_stream_info_t info;
    uint64_t in_lmdb =
        wal_stream_get(ro, name, strlen(name), &info) == 0 ? info.next_offset - 1 : 0;
    wal_close(ro);
    assert_true(in_lmdb < 100);

    wal_t *wal = open_wal(dir, 0, 0);
    wal_stats_t st;
    assert_int_equal(wal_stats_get(wal, &st), 0);
    assert_true(st.journal);
    assert_true(st.recovered_entries > 0);
    for (unsigned s = 0; s < STREAMS; s++)
        assert_int_equal(check_stream(wal, s, 101), 100);
    /* dedup entries came back too; offsets continue */
    wal_result_t res[8];
    assert_int_equal(append_batch(wal, 1, 95, 5, res), 0);
    for (unsigned i = 0; i < 5; i++) {
        assert_int_equal(res[i].duplicate, 1);
        assert_int_equal(res[i].offset, 96 + i);
    }
    assert_int_equal(append_batch(wal, 1, 100, 5, res), 0);
    assert_int_equal(res[0].duplicate, 0);
    assert_int_equal(res[0].offset, 101);
    wal_close(wal);

    /* a second recovery has nothing left to do */
    wal = open_wal(dir, 0, 0);
    assert_int_equal(wal_stats_get(wal, &st), 0);
    assert_int_equal(st.recovered_entries, 0);
    assert_int_equal(check_stream(wal, 1, 106), 105);
    wal_close(wal);
}

/* A long lap folded at close, then a shorter lap cut by a crash: the tail
 * of the first lap still lies in the file after the second's entries and
 * must not be replayed. */
static void test_stale_lap_not_replayed(void **state)
{
    const char *dir = *state;
    wal_t *wal = open_wal(dir, 0, 60000000);
    wal_result_t res[8];
    for (unsigned b = 0; b < 30; b++)
        for (unsigned s = 0; s < STREAMS; s++)
            assert_int_equal(append_batch(wal, s, b * 5, 5, res), 0);
    wal_close(wal); /* folds: the journal restarts at 0 */
    crash_run(dir, 4, 150);
    wal = open_wal(dir, 0, 0);
    for (unsigned s = 0; s < STREAMS; s++)
        assert_int_equal(check_stream(wal, s, 171), 170);
    wal_close(wal);
}

/* Entry boundaries of the journal file, found with the format's decoder. */
static size_t journal_entries(const char *dir, uint64_t *offs, size_t max)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/journal", dir);
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    uint8_t hdr[WAL_JOURNAL_HDR];
    uint64_t off = 0, expect = 0;
    size_t n = 0;
    off_t size = lseek(fd, 0, SEEK_END);
    while (n < max && pread(fd, hdr, sizeof(hdr), (off_t)off) == (ssize_t)sizeof(hdr)) {
        wal_jentry_t e;
        if (wal_jentry_decode_header(hdr, (uint64_t)size - off, &e) != 0 || (n && e.jseq != expect))
            break;
        offs[n++] = off;
        expect = e.jseq + 1;
        off += e.size;
    }
    close(fd);
    return n;
}

static void test_damaged_entry_ends_recovery(void **state)
{
    const char *dir = *state;
    crash_run(dir, 4, 0); /* 12 entries: streams 0,1,2 in turn, 5 messages each */
    uint64_t offs[64];
    size_t n = journal_entries(dir, offs, 64);
    assert_true(n >= 12);
    /* flip one body byte of the 8th entry (stream 1's third batch) */
    char path[256];
    snprintf(path, sizeof(path), "%s/journal", dir);
    int fd = open(path, O_RDWR);
    assert_true(fd >= 0);
    uint8_t b;
    off_t at = (off_t)(offs[n - 5] + WAL_JOURNAL_HDR + 40);
    assert_int_equal(pread(fd, &b, 1, at), 1);
    b ^= 0x5a;
    assert_int_equal(pwrite(fd, &b, 1, at), 1);
    close(fd);

    wal_t *wal = open_wal(dir, 0, 0);
    /* entries before the damaged one are in; it and all after are not */
    assert_int_equal(check_stream(wal, 0, 16), 15);
    assert_int_equal(check_stream(wal, 1, 11), 10);
    assert_int_equal(check_stream(wal, 2, 11), 10);
    /* and the WAL goes on from there */
    wal_result_t res[8];
    assert_int_equal(append_batch(wal, 1, 10, 5, res), 0);
    assert_int_equal(res[0].offset, 11);
    assert_int_equal(res[0].duplicate, 0);
    wal_close(wal);
}

/* Write len bytes of src (at src_off) into dir/name at offset 0, then
 * zeroes up to size: a journal file made by hand. */
static void write_journal_file(const char *dir, const char *name, const uint8_t *src, size_t len,
                               size_t size)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    uint8_t *buf = calloc(1, size);
    assert_non_null(buf);
    memcpy(buf, src, len);
    assert_int_equal(pwrite(fd, buf, size, 0), (ssize_t)size);
    free(buf);
    close(fd);
}

static uint8_t *read_journal_file(const char *dir, size_t *len)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/journal", dir);
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    off_t size = lseek(fd, 0, SEEK_END);
    uint8_t *buf = malloc((size_t)size);
    assert_non_null(buf);
    assert_int_equal(pread(fd, buf, (size_t)size, 0), size);
    close(fd);
    *len = (size_t)size;
    return buf;
}

/* A fold moves the writer to the other file, so the entries LMDB lacks may
 * start in either file and continue in the other: recovery follows the
 * sequence numbers through both, and ignores entries no chain from
 * meta.journal_next reaches. */
static void test_chain_across_files(void **state)
{
    const char *dir = *state;
    crash_run(dir, 4, 0); /* 12 entries in `journal`, LMDB has none */
    uint64_t offs[64];
    size_t n = journal_entries(dir, offs, 64);
    assert_int_equal(n, 12);
    size_t len;
    uint8_t *j = read_journal_file(dir, &len);
    /* entries 0-4 in journal.1, 5-11 at the start of journal, then an
     * entry of an older lap (entry 2 again) */
    write_journal_file(dir, "journal.1", j, offs[5], 1 << 20);
    uint8_t *rest = calloc(1, len);
    assert_non_null(rest);
    size_t tail = offs[11] + (offs[11] - offs[10]) - offs[5]; /* entries 5..11 */
    memcpy(rest, j + offs[5], tail);
    memcpy(rest + tail, j + offs[2], offs[3] - offs[2]);
    write_journal_file(dir, "journal", rest, tail + (offs[3] - offs[2]), len);
    wal_t *wal = open_wal(dir, 0, 0);
    for (unsigned s = 0; s < STREAMS; s++)
        assert_int_equal(check_stream(wal, s, 21), 20);
    wal_close(wal);

    /* The same entries 5-11 alone, in a WAL whose LMDB expects entry 0:
     * no chain reaches them, so none is applied, and the journal goes on
     * past their sequence numbers. */
    char dir2[128];
    tu_tmpdir(dir2, sizeof(dir2), "wal");
    wal = open_wal(dir2, 0, 0);
    wal_close(wal);
    write_journal_file(dir2, "journal.1", rest, 0, 1 << 20);
    write_journal_file(dir2, "journal", rest, tail, len);
    wal = open_wal(dir2, 0, 0);
    for (unsigned s = 0; s < STREAMS; s++)
        assert_int_equal(check_stream(wal, s, 1), 0);
    wal_result_t res[8];
    assert_int_equal(append_batch(wal, 0, 0, 5, res), 0);
    assert_int_equal(res[4].offset, 5);
    wal_close(wal);
    wal = open_wal(dir2, 0, 0);
    assert_int_equal(check_stream(wal, 0, 6), 5);
    assert_int_equal(check_stream(wal, 1, 1), 0);
    wal_close(wal);
    assert_int_equal(tu_rmrf(dir2), 0);
    free(rest);
    free(j);
}

/* Read-only tools fold a dead writer's journal in first (wal_fold_journal). */
static void test_fold_for_readers(void **state)
{
    const char *dir = *state;
    uint64_t n = 99;
    char err[256] = "";
    assert_int_equal(wal_fold_journal(dir, &n, err, sizeof(err)), 0); /* no WAL yet */
    assert_int_equal(n, 0);
    crash_run(dir, 6, 0);
    wal_t *w = open_wal(dir, 0, 0); /* folds these 6 x 3 at open, and again at close */
    wal_close(w);
    crash_run(dir, 2, 30);
    assert_int_equal(wal_fold_journal(dir, &n, err, sizeof(err)), 0);
    assert_int_equal(n, 6); /* 2 batches x 3 streams */
    wal_t *ro = open_wal(dir, 1, 0);
    for (unsigned s = 0; s < STREAMS; s++)
        assert_int_equal(check_stream(ro, s, 41), 40);
    wal_close(ro);
    assert_int_equal(wal_fold_journal(dir, &n, err, sizeof(err)), 0);
    assert_int_equal(n, 0);
}

static void test_fold_skipped_while_writer_runs(void **state)
{
    const char *dir = *state;
    crash_run(dir, 1, 0);
    wal_t *w = open_wal(dir, 0, 60000000); /* folds the dead writer's entries, holds the lock */
    wal_result_t res[8];
    assert_int_equal(append_batch(w, 0, 5, 5, res), 0);
    /* acknowledged, not folded: readers (and LMDB's next_seq) do not have
     * them yet, the acknowledged count does (the MySQL sync's lag uses it) */
    wal_stats_t st;
    assert_int_equal(wal_stats_get(w, &st), 0);
    assert_int_equal(st.acked_next_seq, st.next_seq + 5);
    assert_int_equal(wal_acked_next_seq(w), st.acked_next_seq);
    uint64_t n = 99;
    char err[256] = "";
    assert_int_equal(wal_fold_journal(dir, &n, err, sizeof(err)), 0);
    assert_int_equal(n, 0);
    wal_close(w);
}

static void test_second_writer_runs_without_journal(void **state)
{
    const char *dir = *state;
    wal_t *a = open_wal(dir, 0, 0);
    wal_t *b = open_wal(dir, 0, 0);
    wal_stats_t sa, sb;
    assert_int_equal(wal_stats_get(a, &sa), 0);
    assert_int_equal(wal_stats_get(b, &sb), 0);
    assert_true(sa.journal);
    assert_false(sb.journal);
    wal_result_t res[8];
    assert_int_equal(append_batch(b, 0, 0, 5, res), 0);
    assert_int_equal(res[4].offset, 5);
    wal_close(b);
    wal_close(a);
}

static void test_format_rejects_damage(void **state)
{
    (void)state;
    uint8_t body[256], entry[4096 + 512];
    size_t len = 0;
    wal_jop_encode(body + len, WAL_JOP_PUT, WAL_JDB_LOG, "k1", 2, "value", 5);
    len += wal_jop_size(2, 5);
    wal_jop_encode(body + len, WAL_JOP_DEL, WAL_JDB_DEDUP, "k2", 2, NULL, 0);
    len += wal_jop_size(2, 0);
    memset(entry, 0, sizeof(entry));
    wal_jentry_header(entry, 42, body, (uint32_t)len);
    memcpy(entry + WAL_JOURNAL_HDR, body, len);
    wal_jentry_t e;
    assert_int_equal(wal_jentry_decode_header(entry, sizeof(entry), &e), 0);
    assert_int_equal(e.jseq, 42);
    assert_int_equal(e.size, 4096);
    e.body = entry + WAL_JOURNAL_HDR;
    assert_int_equal(wal_jentry_verify(entry, &e), 0);
    size_t pos = 0;
    wal_jop_t op;
    assert_int_equal(wal_jop_next(e.body, e.body_len, &pos, &op), 1);
    assert_int_equal(op.kind, WAL_JOP_PUT);
    assert_memory_equal(op.val, "value", 5);
    assert_int_equal(wal_jop_next(e.body, e.body_len, &pos, &op), 1);
    assert_int_equal(op.kind, WAL_JOP_DEL);
    assert_int_equal(wal_jop_next(e.body, e.body_len, &pos, &op), 0);
    /* any flipped bit in the body fails the checksum */
    for (size_t i = 0; i < len; i++) {
        entry[WAL_JOURNAL_HDR + i] ^= 1;
        assert_int_equal(wal_jentry_verify(entry, &e), -1);
        entry[WAL_JOURNAL_HDR + i] ^= 1;
    }
    /* a length beyond the input, zeroes, a truncated header */
    assert_int_equal(wal_jentry_decode_header(entry, WAL_JOURNAL_HDR + len - 1, &e), -1);
    uint8_t zero[64] = {0};
    assert_int_equal(wal_jentry_decode_header(zero, sizeof(zero), &e), -1);
    assert_int_equal(wal_jentry_decode_header(entry, 10, &e), -1);
    /* malformed ops: unknown kind, a value on a delete, a key beyond the body */
    uint8_t bad[64];
    wal_jop_encode(bad, 9, WAL_JDB_LOG, "k", 1, NULL, 0);
    pos = 0;
    assert_int_equal(wal_jop_next(bad, wal_jop_size(1, 0), &pos, &op), -1);
    wal_jop_encode(bad, WAL_JOP_DEL, WAL_JDB_LOG, "k", 1, "v", 1);
    pos = 0;
    assert_int_equal(wal_jop_next(bad, wal_jop_size(1, 1), &pos, &op), -1);
    wal_jop_encode(bad, WAL_JOP_PUT, WAL_JDB_LOG, "key", 3, "v", 1);
    pos = 0;
    assert_int_equal(wal_jop_next(bad, wal_jop_size(3, 1) - 1, &pos, &op), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_durable_acks_survive_process_death, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_stale_lap_not_replayed, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_damaged_entry_ends_recovery, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_chain_across_files, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_fold_for_readers, tu_setup_dir, tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_fold_skipped_while_writer_runs, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test_setup_teardown(test_second_writer_runs_without_journal, tu_setup_dir,
                                        tu_teardown_dir),
        cmocka_unit_test(test_format_rejects_damage),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
