/*
 * sync_test.c - the sync module against a real MariaDB: DATABASE_URL
 * parsing, migrations (empty database, idempotent re-run, refusal of a
 * changed or unknown migration, naming it), and the drain: every WAL record
 * lands in arq_messages exactly once with its checksum, with the watermark,
 * streams and cursors, across a lost connection; sessions copied into
 * arq_sessions and deleted with the WAL's, and read back for a restore.
 *
 * The server: ARQ_TEST_DATABASE_URL if set, else a private one started with
 * scripts/mariadb in a temporary directory (and stopped at the end).
 */
#include <inttypes.h>
#include <mysql.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "sync.h"
#include "sync_tools.h"

static char g_url[512];
static char g_mdb_dir[128];
static const char *g_script;

static int start_server(void **state)
{
    (void)state;
    const char *env = getenv("ARQ_TEST_DATABASE_URL");
    if (env && *env) {
        snprintf(g_url, sizeof(g_url), "%s", env);
        return 0;
    }
    strcpy(g_mdb_dir, "/var/tmp/arq-sync-mdb-XXXXXX");
    if (!mkdtemp(g_mdb_dir))
        return -1;
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "'%s' start '%s'", g_script, g_mdb_dir);
    FILE *p = popen(cmd, "r");
    if (!p)
        return -1;
    char line[512] = "";
    while (fgets(line, sizeof(line), p))
        if (strncmp(line, "DATABASE_URL=", 13) == 0)
            snprintf(g_url, sizeof(g_url), "%s", line + 13);
    int rc = pclose(p);
    g_url[strcspn(g_url, "\n")] = 0;
    if (rc != 0 || !g_url[0]) {
        fprintf(stderr, "could not start MariaDB with %s\n", g_script);
        return -1;
    }
    return 0;
}

static int stop_server(void **state)
{
    (void)state;
    if (g_mdb_dir[0]) {
        char cmd[512];
        snprintf(cmd, sizeof(cmd), "'%s' stop '%s' && rm -rf '%s'", g_script, g_mdb_dir, g_mdb_dir);
        if (system(cmd) != 0)
            return -1;
    }
    return 0;
}

static MYSQL *conn(const sync_url_t *u)
{
    MYSQL *m = mysql_init(NULL);
    assert_non_null(m);
    if (!mysql_real_connect(m, u->host, u->user, u->password, u->db, u->port, NULL, 0))
        fail_msg("connect: %s", mysql_error(m));
    return m;
}

static void q(MYSQL *m, const char *sql)
{
    if (mysql_query(m, sql))
        fail_msg("%s: %s", sql, mysql_error(m));
    MYSQL_RES *r = mysql_store_result(m);
    if (r)
        mysql_free_result(r);
}

static uint64_t q_u64(MYSQL *m, const char *sql)
{
    if (mysql_query(m, sql))
        fail_msg("%s: %s", sql, mysql_error(m));
    MYSQL_RES *r = mysql_store_result(m);
    assert_non_null(r);
    MYSQL_ROW row = mysql_fetch_row(r);
    uint64_t v = row && row[0] ? strtoull(row[0], NULL, 10) : 0;
    mysql_free_result(r);
    return v;
}

static void reset_db(MYSQL *m)
{
    q(m, "DROP TABLE IF EXISTS arq_messages, arq_streams, arq_cursors, arq_sync_state, "
         "arq_lease, arq_sessions, arq_schema_migrations");
}

/* ---- URL ---------------------------------------------------------------- */

static void test_url(void **state)
{
    (void)state;
    sync_url_t u;
    char err[256];
    assert_int_equal(sync_url_parse("mysql://arq:p%40ss@db.example:3307/arq_1?connect_timeout=2&"
                                    "read_timeout=9&write_timeout=8&tls=1",
                                    &u, err, sizeof(err)),
                     0);
    assert_string_equal(u.user, "arq");
    assert_string_equal(u.password, "p@ss");
    assert_string_equal(u.host, "db.example");
    assert_int_equal(u.port, 3307);
    assert_string_equal(u.db, "arq_1");
    assert_int_equal(u.connect_timeout_s, 2);
    assert_int_equal(u.read_timeout_s, 9);
    assert_int_equal(u.write_timeout_s, 8);
    assert_int_equal(u.tls, 1);
    sync_url_free(&u);
    assert_int_equal(sync_url_parse("mysql://root@localhost/x?socket=/run/mysqld/mysqld.sock", &u,
                                    err, sizeof(err)),
                     0);
    assert_string_equal(u.socket, "/run/mysqld/mysqld.sock");
    assert_int_equal(u.port, 3306);
    assert_string_equal(u.password, "");
    sync_url_free(&u);
    assert_int_equal(sync_url_parse("mysql://arq:pw@[::1]:3307/arq", &u, err, sizeof(err)), 0);
    assert_string_equal(u.host, "::1");
    assert_int_equal(u.port, 3307);
    sync_url_free(&u);
    assert_int_equal(sync_url_parse("mysql://a@h/d", &u, err, sizeof(err)), 0);
    assert_int_equal(u.tls, 0);
    assert_null(u.tls_ca);
    sync_url_free(&u);
    /* tls_ca= verifies the server, which means TLS (even after tls=0) */
    assert_int_equal(
        sync_url_parse("mysql://a@h/d?tls=0&tls_ca=/etc/arq/db%20ca.pem", &u, err, sizeof(err)), 0);
    assert_string_equal(u.tls_ca, "/etc/arq/db ca.pem");
    assert_int_equal(u.tls, 1);
    /* a copy owns every string (the drain and the cold tier each keep one) */
    sync_url_t c;
    assert_int_equal(sync_url_copy(&c, &u), 0);
    sync_url_free(&u);
    assert_string_equal(c.tls_ca, "/etc/arq/db ca.pem");
    assert_string_equal(c.user, "a");
    assert_string_equal(c.host, "h");
    assert_null(c.socket);
    assert_int_equal(c.tls, 1);
    sync_url_free(&c);
    const char *bad[] = {"",
                         "postgres://a@b/c",
                         "mysql://b/c",
                         "mysql://a@b",
                         "mysql://a@b/",
                         "mysql://a@b:0/c",
                         "mysql://a@b:99999/c",
                         "mysql://a@b/c?x=1",
                         "mysql://a@b/c?socket=rel",
                         "mysql://a@b/c?tls=2",
                         "mysql://a@b/c?tls_ca=ca.pem",
                         "mysql://a@b/c?tls_ca=",
                         "mysql://a@b/c d",
                         "mysql://a:%4@b/c",
                         "mysql://a:%00@b/c",
                         "mysql://:pw@b/c",
                         "mysql://a@b/c;drop",
                         "mysql://a@b/c?read_timeout=0",
                         "mysql://a@[]/c",
                         "mysql://a@[::1/c",
                         "mysql://a@[::1]x/c"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = 0;
        if (sync_url_parse(bad[i], &u, err, sizeof(err)) == 0)
            fail_msg("accepted '%s'", bad[i]);
        assert_true(err[0] != 0);
    }
    /* the password never appears in an error */
    assert_int_not_equal(sync_url_parse("mysql://u:sekrit@h/d?nope=1", &u, err, sizeof(err)), 0);
    assert_null(strstr(err, "sekrit"));
}

/* ---- migrations -------------------------------------------------------- */

static void test_migrations(void **state)
{
    (void)state;
    sync_url_t u;
    char err[512];
    assert_int_equal(sync_url_parse(g_url, &u, err, sizeof(err)), 0);
    MYSQL *m = conn(&u);
    reset_db(m);
    int applied = -1;
    assert_int_equal(sync_migrate(&u, &applied, err, sizeof(err)), 0);
    assert_int_equal(applied, 3);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_schema_migrations"), 3);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_lease WHERE id = 1 AND generation = 0"), 1);
    assert_int_equal(q_u64(m, "SELECT watermark_seq FROM arq_sync_state WHERE id = 1"), 0);
    /* idempotent */
    assert_int_equal(sync_migrate(&u, &applied, err, sizeof(err)), 0);
    assert_int_equal(applied, 0);
    /* a changed applied migration is refused, by name */
    q(m, "UPDATE arq_schema_migrations SET checksum = '0000000000000000' WHERE version = 1");
    assert_int_equal(sync_migrate(&u, &applied, err, sizeof(err)), SYNC_ESCHEMA);
    assert_non_null(strstr(err, "0001_init"));
    assert_non_null(strstr(err, "changed"));
    q(m, "DELETE FROM arq_schema_migrations");
    assert_int_equal(sync_migrate(&u, &applied, err, sizeof(err)), SYNC_ESQL); /* tables exist */
    reset_db(m);
    assert_int_equal(sync_migrate(&u, &applied, err, sizeof(err)), 0);
    /* a newer schema than this build knows is refused */
    q(m, "INSERT INTO arq_schema_migrations VALUES (99, 'future', 'ffffffffffffffff', 0)");
    assert_int_equal(sync_migrate(&u, &applied, err, sizeof(err)), SYNC_ESCHEMA);
    assert_non_null(strstr(err, "newer"));
    assert_non_null(strstr(err, "99"));
    q(m, "DELETE FROM arq_schema_migrations WHERE version = 99");
    /* unreachable */
    sync_url_t bad;
    assert_int_equal(
        sync_url_parse("mysql://arq:x@127.0.0.1:1/arq?connect_timeout=1", &bad, err, sizeof(err)),
        0);
    assert_int_equal(sync_migrate(&bad, &applied, err, sizeof(err)), SYNC_ECONNECT);
    assert_null(strstr(err, ":x@"));
    sync_url_free(&bad);
    mysql_close(m);
    sync_url_free(&u);
}

/* ---- drain ------------------------------------------------------------- */

struct sums {
    uint64_t n;
    uint64_t checksum[4000]; /* by seq */
};

static int sum_cb(const wal_record_t *rec, void *arg)
{
    struct sums *s = arg;
    s->n++;
    if (rec->seq < 4000)
        s->checksum[rec->seq] = rec->checksum;
    return 0;
}

/* MySQL holds exactly the WAL's records: same seqs, same checksums. */
static void compare_all(MYSQL *m, wal_t *wal, uint64_t n)
{
    static struct sums ws;
    memset(&ws, 0, sizeof(ws));
    wal_read_result_t rr;
    uint64_t from = 1;
    do {
        assert_int_equal(wal_log_read(wal, from, 1000, UINT64_MAX, sum_cb, &ws, &rr), 0);
        from = rr.next;
    } while (rr.count);
    assert_int_equal(ws.n, n);
    assert_int_equal(mysql_query(m, "SELECT seq, checksum FROM arq_messages ORDER BY seq"), 0);
    MYSQL_RES *r = mysql_store_result(m);
    assert_non_null(r);
    uint64_t rows = 0;
    MYSQL_ROW row;
    while ((row = mysql_fetch_row(r))) {
        uint64_t seq = strtoull(row[0], NULL, 10), sum = strtoull(row[1], NULL, 10);
        assert_int_equal(seq, rows + 1);
        assert_true(seq < 4000 && ws.checksum[seq] == sum);
        rows++;
    }
    mysql_free_result(r);
    assert_int_equal(rows, n);
}

struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    int done, status;
};

static void waiter_cb(wal_append_t *req, void *arg)
{
    struct waiter *w = arg;
    pthread_mutex_lock(&w->mu);
    w->status = wal_append_status(req);
    w->done = 1;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->mu);
}

/* Submit req (made with waiter_cb and w) and wait for it to complete
 * successfully; frees it. */
static void submit_wait(wal_t *wal, wal_append_t *req, struct waiter *w)
{
    assert_int_equal(wal_append_submit(wal, req), 0);
    pthread_mutex_lock(&w->mu);
    while (!w->done)
        pthread_cond_wait(&w->cond, &w->mu);
    pthread_mutex_unlock(&w->mu);
    assert_int_equal(w->status, 0);
    wal_append_free(req);
}

/* n cursors (sessions PREFIX-00000...) on stream s.1 in one request: one
 * commit, so they share their updated_us. */
static void put_cursors(wal_t *wal, const char *prefix, int n, uint64_t off)
{
    struct waiter w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
    wal_append_t *req;
    assert_int_equal(wal_append_new(waiter_cb, &w, &req), 0);
    for (int i = 0; i < n; i++) {
        char sess[64];
        int len = snprintf(sess, sizeof(sess), "%s-%05d", prefix, i);
        assert_int_equal(wal_append_add_cursor(req, sess, (size_t)len, "s.1", 3, off), 0);
    }
    submit_wait(wal, req, &w);
}

static void put_cursor(wal_t *wal, const char *session, const char *stream, uint64_t off)
{
    struct waiter w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
    wal_append_t *req;
    assert_int_equal(wal_append_new(waiter_cb, &w, &req), 0);
    assert_int_equal(
        wal_append_add_cursor(req, session, strlen(session), stream, strlen(stream), off), 0);
    submit_wait(wal, req, &w);
}

static void wait_watermark(sync_t *s, uint64_t want)
{
    sync_stats_t st;
    for (int i = 0; i < 3000; i++) {
        sync_stats_get(s, &st);
        if (st.watermark >= want && st.state == SYNC_STATE_OK)
            return;
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
    fail_msg("watermark %" PRIu64 " (state %s: %s), want %" PRIu64, st.watermark,
             sync_state_name(st.state), st.last_error, want);
}

static void append_n(wal_t *wal, int n, int base)
{
    for (int i = 0; i < n; i++) {
        char stream[16], payload[64], msgid[32];
        snprintf(stream, sizeof(stream), "s.%d", (base + i) % 7);
        int pl = snprintf(payload, sizeof(payload), "payload %d \x01\x02'\"\\", base + i);
        snprintf(msgid, sizeof(msgid), "m-%d", base + i);
        wal_msg_t m = {.stream = stream,
                       .stream_len = strlen(stream),
                       .payload = payload,
                       .payload_len = (size_t)pl,
                       .producer = "p",
                       .producer_len = 1,
                       .msgid = msgid,
                       .msgid_len = strlen(msgid),
                       .direction = i % 3 ? WAL_DIR_IN : WAL_DIR_OUT};
        assert_int_equal(wal_append_sync(wal, &m, 1, NULL), 0);
    }
}

static void test_drain(void **state)
{
    (void)state;
    sync_url_t u;
    char err[512];
    assert_int_equal(sync_url_parse(g_url, &u, err, sizeof(err)), 0);
    MYSQL *m = conn(&u);
    reset_db(m);
    char dir[] = "/var/tmp/arq-sync-wal-XXXXXX";
    assert_non_null(mkdtemp(dir));
    wal_options_t wo = {.dir = dir};
    wal_t *wal;
    assert_int_equal(wal_open(&wo, NULL, &wal, NULL, 0), 0);
    append_n(wal, 2500, 0);
    put_cursor(wal, "sess-a", "s.1", 5);

    sync_options_t so = {.url = &u,
                         .batch_rows = 700,
                         .cursor_every_ms = 50,
                         .cursor_gc_every_ms = 50,
                         .cursor_ttl_s = 3600};
    sync_t *s;
    assert_int_equal(sync_start(wal, &so, &s), 0);
    wait_watermark(s, 2500);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_messages"), 2500);
    assert_int_equal(q_u64(m, "SELECT COUNT(DISTINCT seq) FROM arq_messages"), 2500);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_streams"), 7);
    assert_int_equal(q_u64(m, "SELECT MAX(`offset`) FROM arq_messages WHERE stream = 's.3'"),
                     2500 / 7 + (3 < 2500 % 7));
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_messages WHERE direction = 1"),
                     (2500 + 2) / 3);
    /* the bytes survived: a payload with quotes, backslash and control bytes */
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_messages WHERE stream = 's.0' AND "
                              "`offset` = 1 AND payload = CONCAT('payload 0 ', X'0102', "
                              "'''\"\\\\') AND msgid = 'm-0' AND producer = 'p'"),
                     1);
    compare_all(m, wal, 2500);
    /* cursors: latest value wins */
    for (int i = 0; i < 300 && q_u64(m, "SELECT COUNT(*) FROM arq_cursors") == 0; i++)
        usleep(10000);
    assert_int_equal(q_u64(m, "SELECT `offset` FROM arq_cursors WHERE session = 'sess-a' AND "
                              "stream = 's.1'"),
                     5);
    put_cursor(wal, "sess-a", "s.1", 9);
    for (int i = 0; i < 300 && q_u64(m, "SELECT `offset` FROM arq_cursors") != 9; i++)
        usleep(10000);
    assert_int_equal(q_u64(m, "SELECT `offset` FROM arq_cursors"), 9);
    /* More changed cursors than one INSERT takes (5,000): all of them arrive,
     * not just the first statement's worth. */
    put_cursors(wal, "bulk", 6200, 3);
    for (int i = 0; i < 500 && q_u64(m, "SELECT COUNT(*) FROM arq_cursors") != 6201; i++)
        usleep(10000);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_cursors WHERE `offset` = 3"), 6200);

    /* Cursors the WAL deletes leave MySQL: an unsubscribe (one cursor) and an
     * expired session (all of its cursors). A row of this WAL's era that the
     * WAL does not hold goes too; a row from before the WAL was created (an
     * earlier WAL's history, which a restore reads back) stays while it is
     * younger than cursor_ttl_s, and goes after. */
    struct waiter w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
    wal_append_t *req;
    assert_int_equal(wal_append_new(waiter_cb, &w, &req), 0);
    assert_int_equal(wal_append_del_cursor(req, "bulk-00007", 10, "s.1", 3), 0);
    assert_int_equal(wal_append_del_session(req, "sess-a", 6), 0);
    submit_wait(wal, req, &w);
    wal_stats_t ws;
    assert_int_equal(wal_stats_get(wal, &ws), 0);
    assert_true(ws.created_us > 0);
    char ins[256];
    snprintf(ins, sizeof ins,
             "INSERT INTO arq_cursors VALUES ('old-era', 's.1', 4, %" PRId64 "), "
             "('expired-era', 's.1', 4, 1), "
             "('ghost', 's.1', 4, UNIX_TIMESTAMP(NOW(6)) * 1000000)",
             ws.created_us - 1000000);
    q(m, ins);
    for (int i = 0; i < 500 && q_u64(m, "SELECT COUNT(*) FROM arq_cursors") != 6200; i++)
        usleep(10000);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_cursors"), 6200);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_cursors WHERE session IN "
                              "('bulk-00007', 'sess-a', 'ghost', 'expired-era')"),
                     0);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_cursors WHERE session = 'old-era'"), 1);
    /* the counter moves after the DELETE returns, just after the rows go */
    sync_stats_t gst;
    for (int i = 0; i < 500; i++) {
        sync_stats_get(s, &gst);
        if (gst.cursors_deleted >= 4)
            break;
        usleep(10000);
    }
    assert_int_equal(gst.cursors_deleted, 4);

    /* connection lost: kill the drain's connection, keep appending */
    q(m, "SELECT 1");
    MYSQL_RES *r;
    assert_int_equal(mysql_query(m, "SELECT id FROM information_schema.processlist WHERE "
                                    "db = DATABASE() AND id <> CONNECTION_ID()"),
                     0);
    r = mysql_store_result(m);
    MYSQL_ROW row;
    while ((row = mysql_fetch_row(r))) {
        char kill[64];
        snprintf(kill, sizeof(kill), "KILL CONNECTION %s", row[0]);
        (void)mysql_query(m, kill);
    }
    mysql_free_result(r);
    append_n(wal, 1200, 2500);
    wait_watermark(s, 3700);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_messages"), 3700);
    assert_int_equal(q_u64(m, "SELECT MIN(seq) FROM arq_messages"), 1);
    assert_int_equal(q_u64(m, "SELECT MAX(seq) FROM arq_messages"), 3700);
    sync_stats_t st;
    sync_stats_get(s, &st);
    assert_int_equal(st.rows, 3700);
    assert_true(st.batches >= 6);
    sync_stop(s);

    /* a restart continues from MySQL's watermark: nothing twice */
    append_n(wal, 10, 3700);
    assert_int_equal(sync_start(wal, &so, &s), 0);
    wait_watermark(s, 3710);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_messages"), 3710);
    sync_stats_get(s, &st);
    assert_int_equal(st.rows, 10);
    compare_all(m, wal, 3710);
    sync_stop(s);

    wal_close(wal);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    mysql_close(m);
    sync_url_free(&u);
}

/* ---- sessions ---------------------------------------------------------- */

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Session id with owner and a 32-byte secret of `fill`. */
static void put_session(wal_t *wal, const char *id, const char *owner, uint8_t fill,
                        int64_t created_us, int64_t seen_us)
{
    wal_session_t ws = {.created_us = created_us, .seen_us = seen_us};
    ws.owner_len = (uint8_t)strlen(owner);
    memcpy(ws.owner, owner, ws.owner_len);
    ws.secret_len = 32;
    memset(ws.secret, fill, 32);
    struct waiter w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
    wal_append_t *req;
    assert_int_equal(wal_append_new(waiter_cb, &w, &req), 0);
    assert_int_equal(wal_append_put_session(req, id, strlen(id), &ws), 0);
    submit_wait(wal, req, &w);
}

/* The arq_sessions row of id is exactly this. */
static uint64_t session_row_is(MYSQL *m, const char *id, const char *owner, uint8_t fill,
                               int64_t created_us, int64_t seen_us)
{
    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT COUNT(*) FROM arq_sessions WHERE session = '%s' AND owner = '%s' AND "
             "secret = REPEAT(X'%02x', 32) AND created_us = %" PRId64 " AND seen_us = %" PRId64
             " AND updated_us = GREATEST(created_us, seen_us)",
             id, owner, fill, created_us, seen_us);
    return q_u64(m, sql);
}

static void wait_rows(MYSQL *m, const char *sql, uint64_t want)
{
    for (int i = 0; i < 500 && q_u64(m, sql) != want; i++)
        usleep(10000);
    assert_int_equal(q_u64(m, sql), want);
}

struct sess_seen {
    int n;
    char ids[4][32];
    sync_db_session_t first[4]; /* their pointers are not kept */
    uint8_t secret2[64];        /* sess-2's */
    int stop_after;             /* 0: never */
    int64_t total;
    char last[32];
    int out_of_order;
};

static int sess_list_cb(const sync_db_session_t *x, void *arg)
{
    struct sess_seen *v = arg;
    char id[32];
    snprintf(id, sizeof id, "%.*s", (int)x->session_len, x->session);
    if (strcmp(id, "sess-2") == 0)
        memcpy(v->secret2, x->secret, x->secret_len < 64 ? x->secret_len : 64);
    if (v->total && strcmp(id, v->last) <= 0)
        v->out_of_order++;
    snprintf(v->last, sizeof v->last, "%s", id);
    if (v->n < 4) {
        snprintf(v->ids[v->n], sizeof v->ids[v->n], "%s", id);
        v->first[v->n] = *x;
        v->n++;
    }
    v->total++;
    return v->stop_after && v->total == v->stop_after;
}

struct cur_seen {
    int n;
    char streams[4][8];
    uint64_t offsets[4];
};

static int sess_cur_cb(const char *stream, size_t len, uint64_t offset, int64_t updated_us,
                       void *arg)
{
    (void)updated_us;
    struct cur_seen *c = arg;
    if (c->n < 4) {
        snprintf(c->streams[c->n], sizeof c->streams[c->n], "%.*s", (int)len, stream);
        c->offsets[c->n] = offset;
    }
    c->n++;
    return 0;
}

/* Sessions reach arq_sessions (latest write wins), leave it when the WAL
 * deletes them (by the cursors' era rule), and sync_db_sessions reads them
 * back in order, page after page, with sync_db_session_cursors their
 * cursors: what arq-replay restore rebuilds a WAL's sessions from. */
static void test_sessions(void **state)
{
    (void)state;
    sync_url_t u;
    char err[512];
    assert_int_equal(sync_url_parse(g_url, &u, err, sizeof(err)), 0);
    MYSQL *m = conn(&u);
    reset_db(m);
    assert_int_equal(sync_migrate(&u, NULL, err, sizeof err), 0); /* the table to poll */
    char dir[] = "/var/tmp/arq-sync-sess-XXXXXX";
    assert_non_null(mkdtemp(dir));
    wal_options_t wo = {.dir = dir};
    wal_t *wal;
    assert_int_equal(wal_open(&wo, NULL, &wal, NULL, 0), 0);
    append_n(wal, 14, 0); /* streams s.0 .. s.6 */
    int64_t t0 = now_us();
    put_session(wal, "sess-1", "alice", 0x11, t0 - 5000000, t0);
    put_session(wal, "sess-2", "", 0x22, t0 - 4000000, t0 - 3000000);
    put_session(wal, "sess-3", "bob", 0x33, t0 - 2000000, t0 - 1000000);
    put_cursor(wal, "sess-2", "s.2", 2);
    put_cursor(wal, "sess-2", "s.1", 1);

    sync_options_t so = {
        .url = &u, .cursor_every_ms = 50, .cursor_gc_every_ms = 50, .cursor_ttl_s = 3600};
    sync_t *s;
    assert_int_equal(sync_start(wal, &so, &s), 0);
    wait_rows(m, "SELECT COUNT(*) FROM arq_sessions", 3);
    assert_int_equal(session_row_is(m, "sess-1", "alice", 0x11, t0 - 5000000, t0), 1);
    assert_int_equal(session_row_is(m, "sess-2", "", 0x22, t0 - 4000000, t0 - 3000000), 1);
    assert_int_equal(session_row_is(m, "sess-3", "bob", 0x33, t0 - 2000000, t0 - 1000000), 1);
    sync_stats_t st;
    sync_stats_get(s, &st);
    assert_int_equal(st.sessions, 3);

    /* seen again: the row follows (only changed sessions are sent again) */
    put_session(wal, "sess-2", "", 0x22, t0 - 4000000, t0 + 1000);
    wait_rows(m, "SELECT seen_us FROM arq_sessions WHERE session = 'sess-2'",
              (uint64_t)(t0 + 1000));
    assert_int_equal(session_row_is(m, "sess-2", "", 0x22, t0 - 4000000, t0 + 1000), 1);
    for (int i = 0; i < 300; i++) {
        sync_stats_get(s, &st);
        if (st.sessions >= 4)
            break;
        usleep(10000);
    }
    assert_int_equal(st.sessions, 4);

    /* an older write never replaces a newer row (a row written by a newer
     * WAL meanwhile, here faked): the pass runs, the row stays */
    char sql[256];
    snprintf(sql, sizeof sql,
             "UPDATE arq_sessions SET owner = 'other', seen_us = %" PRId64 ", updated_us = %" PRId64
             " WHERE session = 'sess-3'",
             t0 + 3600000000, t0 + 3600000000);
    q(m, sql);
    put_session(wal, "sess-3", "bob", 0x33, t0 - 2000000, t0 + 2000);
    for (int i = 0; i < 300; i++) {
        sync_stats_get(s, &st);
        if (st.sessions >= 5)
            break;
        usleep(10000);
    }
    assert_int_equal(st.sessions, 5);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_sessions WHERE session = 'sess-3' AND "
                              "owner = 'other'"),
                     1);

    /* Deleted from the WAL (expired, evicted): deleted from MySQL, with rows
     * of this WAL's era it does not hold and those of an earlier era older
     * than cursor_ttl_s; a younger earlier-era row stays (a restore's). */
    wal_stats_t ws;
    assert_int_equal(wal_stats_get(wal, &ws), 0);
    snprintf(sql, sizeof sql,
             "INSERT INTO arq_sessions VALUES ('old-era', '', '', 0, %" PRId64 ", %" PRId64 "), "
             "('expired-era', '', '', 0, 1, 1), ('ghost', '', '', 0, %" PRId64 ", %" PRId64 ")",
             ws.created_us - 1000000, ws.created_us - 1000000, t0, t0);
    q(m, sql);
    struct waiter w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
    wal_append_t *req;
    assert_int_equal(wal_append_new(waiter_cb, &w, &req), 0);
    assert_int_equal(wal_append_del_session(req, "sess-1", 6), 0);
    submit_wait(wal, req, &w);
    wait_rows(m, "SELECT COUNT(*) FROM arq_sessions", 3);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_sessions WHERE session IN "
                              "('old-era', 'sess-2', 'sess-3')"),
                     3);
    for (int i = 0; i < 300; i++) {
        sync_stats_get(s, &st);
        if (st.sessions_deleted >= 3)
            break;
        usleep(10000);
    }
    assert_int_equal(st.sessions_deleted, 3);
    /* sess-2's cursors are in arq_cursors too */
    wait_rows(m, "SELECT COUNT(*) FROM arq_cursors WHERE session = 'sess-2'", 2);
    sync_stop(s);

    /* read back: in session order, every column */
    sync_db_t *d;
    assert_int_equal(sync_db_open(&u, &d, err, sizeof err), 0);
    struct sess_seen v = {0};
    assert_int_equal(sync_db_sessions(d, sess_list_cb, &v, err, sizeof err), 0);
    assert_int_equal(v.total, 3);
    assert_string_equal(v.ids[0], "old-era");
    assert_string_equal(v.ids[1], "sess-2");
    assert_string_equal(v.ids[2], "sess-3");
    assert_int_equal(v.first[1].owner_len, 0);
    assert_int_equal(v.first[1].secret_len, 32);
    uint8_t want[32];
    memset(want, 0x22, sizeof want);
    assert_memory_equal(v.secret2, want, 32);
    assert_int_equal(v.first[1].created_us, t0 - 4000000);
    assert_int_equal(v.first[1].seen_us, t0 + 1000);
    assert_int_equal(v.first[1].updated_us, t0 + 1000);
    struct cur_seen c = {0};
    assert_int_equal(sync_db_session_cursors(d, "sess-2", 6, sess_cur_cb, &c, err, sizeof err), 0);
    assert_int_equal(c.n, 2);
    assert_string_equal(c.streams[0], "s.1");
    assert_int_equal(c.offsets[0], 1);
    assert_string_equal(c.streams[1], "s.2");
    assert_int_equal(c.offsets[1], 2);
    c.n = 0;
    assert_int_equal(sync_db_session_cursors(d, "nobody", 6, sess_cur_cb, &c, err, sizeof err), 0);
    assert_int_equal(c.n, 0);
    /* more rows than one page: each once, in order; a callback may stop */
    static char bulk[2500 * 48 + 64];
    size_t bl = (size_t)snprintf(bulk, sizeof bulk, "INSERT INTO arq_sessions VALUES ");
    for (int i = 1; i <= 2500; i++)
        bl += (size_t)snprintf(bulk + bl, sizeof bulk - bl, "%s('bulk-%05d','o',X'aa',1,2,2)",
                               i > 1 ? "," : "", i);
    q(m, bulk);
    memset(&v, 0, sizeof v);
    assert_int_equal(sync_db_sessions(d, sess_list_cb, &v, err, sizeof err), 0);
    assert_int_equal(v.total, 2503);
    assert_int_equal(v.out_of_order, 0);
    assert_string_equal(v.ids[0], "bulk-00001");
    assert_string_equal(v.last, "sess-3");
    memset(&v, 0, sizeof v);
    v.stop_after = 1500;
    assert_int_equal(sync_db_sessions(d, sess_list_cb, &v, err, sizeof err), 0);
    assert_int_equal(v.total, 1500);
    /* a database an older arqd migrated: said so, not a plain SQL error */
    q(m, "DROP TABLE arq_sessions");
    assert_int_equal(sync_db_sessions(d, sess_list_cb, &v, err, sizeof err), SYNC_ESCHEMA);
    assert_non_null(strstr(err, "0003"));
    sync_db_close(d);

    wal_close(wal);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    mysql_close(m);
    sync_url_free(&u);
}

/* Retention drops old records only once they are in MySQL. */
static void test_retention(void **state)
{
    (void)state;
    sync_url_t u;
    char err[512];
    assert_int_equal(sync_url_parse(g_url, &u, err, sizeof(err)), 0);
    MYSQL *m = conn(&u);
    reset_db(m);
    char dir[] = "/var/tmp/arq-sync-ret-XXXXXX";
    assert_non_null(mkdtemp(dir));
    wal_options_t wo = {.dir = dir};
    wal_t *wal;
    assert_int_equal(wal_open(&wo, NULL, &wal, NULL, 0), 0);
    append_n(wal, 300, 0);

    /* MySQL unreachable: nothing is synced, so nothing may be dropped however old */
    sync_url_t down;
    assert_int_equal(
        sync_url_parse("mysql://arq:x@127.0.0.1:1/arq?connect_timeout=1", &down, err, sizeof(err)),
        0);
    sync_options_t so = {
        .url = &down, .retain_age_s = 1, .retain_every_ms = 20, .backoff_cap_ms = 50};
    sync_t *s;
    assert_int_equal(sync_start(wal, &so, &s), 0);
    struct timespec ts = {1, 500000000};
    nanosleep(&ts, NULL);
    wal_stats_t ws;
    assert_int_equal(wal_stats_get(wal, &ws), 0);
    assert_int_equal(ws.first_seq, 1);
    sync_stats_t st;
    sync_stats_get(s, &st);
    assert_int_equal(st.state, SYNC_STATE_DEGRADED);
    assert_int_equal(st.retained, 0);
    sync_stop(s);
    sync_url_free(&down);

    /* reachable: synced, then dropped once older than a second */
    so.url = &u;
    assert_int_equal(sync_start(wal, &so, &s), 0);
    wait_watermark(s, 300);
    for (int i = 0; i < 300; i++) {
        assert_int_equal(wal_stats_get(wal, &ws), 0);
        if (ws.first_seq == 301)
            break;
        usleep(20000);
    }
    assert_int_equal(ws.first_seq, 301);
    /* the counter moves when wal_retain returns, just after first_seq does */
    for (int i = 0; i < 300; i++) {
        sync_stats_get(s, &st);
        if (st.retained == 300)
            break;
        usleep(10000);
    }
    assert_int_equal(st.retained, 300);
    /* the rows are still in MySQL */
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_messages"), 300);
    sync_stop(s);
    wal_close(wal);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    mysql_close(m);
    sync_url_free(&u);
}

/* ---- lease and fencing ---------------------------------------------------- */

static void wait_state(sync_t *s, enum sync_state want)
{
    sync_stats_t st;
    for (int i = 0; i < 1000; i++) {
        sync_stats_get(s, &st);
        if (st.state == want)
            return;
        usleep(10000);
    }
    fail_msg("state %s (%s), want %s", sync_state_name(st.state), st.last_error,
             sync_state_name(want));
}

static void test_lease(void **state)
{
    (void)state;
    sync_url_t u;
    char err[512];
    assert_int_equal(sync_url_parse(g_url, &u, err, sizeof(err)), 0);
    MYSQL *m = conn(&u);
    reset_db(m);
    assert_int_equal(sync_migrate(&u, NULL, err, sizeof(err)), 0);
    /* a takes the free lease; b cannot while it is a's and unexpired */
    sync_lease_t *la, *lb;
    assert_int_equal(sync_lease_open(&u, "node-a", 1000, &la), 0);
    assert_int_equal(sync_lease_open(&u, "node-b", 1000, &lb), 0);
    sync_lease_row_t before;
    uint64_t ga = 0, gb = 0;
    assert_int_equal(sync_lease_try(la, &before, &ga, err, sizeof(err)), SYNC_OK);
    assert_int_equal(ga, 1);
    assert_int_equal(before.generation, 0);
    assert_int_equal(sync_lease_try(lb, &before, &gb, err, sizeof(err)), SYNC_EBUSY);
    assert_string_equal(before.owner, "node-a");
    assert_non_null(strstr(err, "node-a"));
    /* the same node takes it back at once (a restart) */
    assert_int_equal(sync_lease_try(la, &before, &ga, err, sizeof(err)), SYNC_OK);
    assert_int_equal(ga, 2);

    /* a drains at generation 2: its rows and the lease's wal_id arrive */
    char dir[] = "/var/tmp/arq-sync-wal-XXXXXX";
    assert_non_null(mkdtemp(dir));
    wal_options_t wo = {.dir = dir};
    wal_t *wal;
    assert_int_equal(wal_open(&wo, NULL, &wal, NULL, 0), 0);
    append_n(wal, 100, 0);
    sync_options_t so = {.url = &u,
                         .cursor_every_ms = 50,
                         .lease_ms = 1000,
                         .lease_owner = "node-a",
                         .lease_generation = ga};
    sync_t *s;
    assert_int_equal(sync_start(wal, &so, &s), 0);
    wait_watermark(s, 100);
    wal_stats_t ws;
    assert_int_equal(wal_stats_get(wal, &ws), 0);
    char sql[256];
    snprintf(sql, sizeof(sql),
             "SELECT COUNT(*) FROM arq_lease WHERE wal_id = %" PRId64
             " AND generation = 2 AND owner = 'node-a'",
             ws.created_us);
    assert_int_equal(q_u64(m, sql), 1);
    sync_stats_t st;
    sync_stats_get(s, &st);
    assert_int_equal(st.lease_generation, 2);
    assert_true(st.lease_renewals >= 1);
    /* renewed by the idle drain: b stays out past one lease */
    usleep(1500 * 1000);
    assert_int_equal(sync_lease_try(lb, &before, &gb, err, sizeof(err)), SYNC_EBUSY);

    /* a is replaced (as if it had been paused past its lease): b raises the
     * generation; a's next write rolls back and it stops for good */
    int trc = SYNC_EBUSY;
    for (int i = 0; i < 20 && trc == SYNC_EBUSY; i++) { /* a may renew in between */
        q(m, "UPDATE arq_lease SET expires_us = 0");
        trc = sync_lease_try(lb, &before, &gb, err, sizeof(err));
    }
    assert_int_equal(trc, SYNC_OK);
    assert_int_equal(gb, 3);
    append_n(wal, 50, 100);
    put_cursor(wal, "sess-z", "s.1", 7);
    wait_state(s, SYNC_STATE_FENCED);
    sync_stats_get(s, &st);
    assert_non_null(strstr(st.last_error, "lost the lease"));
    usleep(200 * 1000);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_messages"), 100);
    assert_int_equal(q_u64(m, "SELECT watermark_seq FROM arq_sync_state"), 100);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_cursors WHERE session = 'sess-z'"), 0);
    assert_int_equal(q_u64(m, "SELECT generation FROM arq_lease"), 3);
    assert_int_equal(sync_lease_renew(la, 2, err, sizeof(err)), SYNC_EFENCED);
    sync_stop(s);

    /* switchover: b (now draining) is asked, drains all, releases */
    sync_options_t sb = so;
    sb.lease_owner = "node-b";
    sb.lease_generation = gb;
    assert_int_equal(sync_start(wal, &sb, &s), 0);
    wait_watermark(s, 150);
    sync_lease_row_t row;
    assert_int_equal(sync_lease_request_handoff(&u, &row, err, sizeof(err)), SYNC_OK);
    assert_string_equal(row.owner, "node-b");
    for (int i = 0; i < 500; i++) {
        sync_stats_get(s, &st);
        if (st.handoff)
            break;
        usleep(10000);
    }
    assert_int_equal(st.handoff, 1);
    append_n(wal, 20, 150);
    assert_int_equal(sync_release(s, 10000), SYNC_OK);
    assert_int_equal(q_u64(m, "SELECT COUNT(*) FROM arq_messages"), 170);
    assert_int_equal(q_u64(m, "SELECT expires_us FROM arq_lease"), 0);
    sync_stop(s);
    /* released: a may take it at once */
    assert_int_equal(sync_lease_try(la, &before, &ga, err, sizeof(err)), SYNC_OK);
    assert_int_equal(ga, 4);
    sync_lease_close(la);
    sync_lease_close(lb);
    wal_close(wal);
    char cmd[256];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    mysql_close(m);
    sync_url_free(&u);
}

int main(int argc, char **argv)
{
    g_script = argc > 1 ? argv[1] : "scripts/mariadb";
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_url),       cmocka_unit_test(test_migrations),
        cmocka_unit_test(test_drain),     cmocka_unit_test(test_sessions),
        cmocka_unit_test(test_retention), cmocka_unit_test(test_lease),
    };
    return cmocka_run_group_tests(tests, start_server, stop_server);
}
