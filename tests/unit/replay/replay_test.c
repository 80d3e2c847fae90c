/*
 * replay_test.c - catch-up reads: batches in offset order that resume where
 * the last stopped, the exact missing range after retention, an unknown
 * stream, and a corrupt-free WAL counting what it served.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "replay.h"

struct got {
    uint64_t offsets[64];
    size_t n;
};

static int got_cb(const wal_record_t *rec, void *arg)
{
    struct got *g = arg;
    if (g->n < 64)
        g->offsets[g->n] = rec->offset;
    g->n++;
    return 0;
}

static void test_replay(void **state)
{
    (void)state;
    char dir[] = "/var/tmp/arq-rpl-XXXXXX";
    assert_non_null(mkdtemp(dir));
    wal_options_t o = {.dir = dir};
    wal_t *wal;
    assert_int_equal(wal_open(&o, NULL, &wal, NULL, 0), 0);
    wal_msg_t m[20];
    for (int i = 0; i < 20; i++)
        m[i] = (wal_msg_t){
            .stream = i % 2 ? "b" : "a", .stream_len = 1, .payload = "p", .payload_len = 1};
    assert_int_equal(wal_append_sync(wal, m, 20, NULL), 0); /* a: 1..10, b: 1..10 */
    rpl_t *r;
    assert_int_equal(rpl_new(wal, &r), 0);

    struct got g = {0};
    rpl_result_t res;
    assert_int_equal(rpl_read(r, NULL, "a", 1, 3, 4, 1 << 20, got_cb, &g, &res), RPL_OK);
    assert_int_equal(res.count, 4);
    assert_int_equal(g.n, 4);
    assert_int_equal(g.offsets[0], 3);
    assert_int_equal(g.offsets[3], 6);
    assert_int_equal(res.next, 7);
    assert_int_equal(rpl_read(r, NULL, "a", 1, res.next, 100, 1 << 20, got_cb, &g, &res), RPL_OK);
    assert_int_equal(g.n, 8);
    assert_int_equal(g.offsets[7], 10);
    assert_int_equal(res.next, 11);
    /* at the end: nothing yet, not an error */
    assert_int_equal(rpl_read(r, NULL, "a", 1, 11, 100, 1 << 20, got_cb, &g, &res), RPL_OK);
    assert_int_equal(res.count, 0);
    assert_int_equal(res.next, 11);

    /* retention drops seq 1..8 (a: 1..4, b: 1..4): the exact range is missing */
    uint64_t dropped;
    assert_int_equal(wal_retain(wal, 8, &dropped), 0);
    assert_int_equal(dropped, 8);
    g.n = 0;
    assert_int_equal(rpl_read(r, NULL, "b", 1, 2, 100, 1 << 20, got_cb, &g, &res), RPL_GAP);
    assert_int_equal(res.gap_from, 2);
    assert_int_equal(res.gap_to, 4);
    assert_int_equal(res.next, 5);
    assert_int_equal(g.n, 0);
    assert_int_equal(rpl_read(r, NULL, "b", 1, res.next, 100, 1 << 20, got_cb, &g, &res), RPL_OK);
    assert_int_equal(g.n, 6);
    assert_int_equal(g.offsets[0], 5);

    assert_int_equal(rpl_read(r, NULL, "nope", 4, 1, 10, 1 << 20, got_cb, &g, &res), RPL_ENOSTREAM);
    assert_int_equal(rpl_read(r, NULL, "a", 1, 0, 10, 1 << 20, got_cb, &g, &res), RPL_EREAD);
    assert_int_equal(res.wal_error, WAL_EINVAL);

    rpl_stats_t st;
    rpl_stats_get(r, &st);
    assert_int_equal(st.records, 14);
    assert_int_equal(st.gaps, 1);
    assert_int_equal(st.errors, 1);
    rpl_free(r);
    wal_close(wal);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_replay)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
