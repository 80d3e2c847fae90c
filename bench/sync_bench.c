/*
 * arq-sync-bench - the MySQL drain against MariaDB's own ceiling, on the
 * same server in the same run (issue #5's benchmark, docs/benchmarks.md):
 *
 *   ceiling  multi-row INSERTs of the same rows into a copy of arq_messages,
 *            --batch rows per statement and per transaction, from one
 *            connection; and the same rows through a prepared INSERT with
 *            MariaDB's array binding (what the drain does on MariaDB,
 *            without the WAL reads);
 *   drain    a WAL with --rows 128-byte records, synced into a fresh schema
 *            by the sync thread (sync_start): rows/s until the watermark
 *            reaches the last record;
 *   lag      records appended at half the measured drain rate for
 *            --seconds; per record, the time from its append returning to
 *            the watermark passing it (p50/p99/max).
 *
 * Usage: arq-sync-bench --database-url URL [--rows N] [--batch B]
 *                       [--seconds S] [--dir DIR] [--json]
 * The database's arq_* tables are dropped and recreated: use a scratch
 * database (bench/sync.sh starts a private MariaDB).
 */
#include <getopt.h>
#include <inttypes.h>
#include <mysql.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "sync.h"
#include "wal.h"

#define PAYLOAD 128

static const char *g_url_text;
static sync_url_t g_url;

static MYSQL *connect_db(void)
{
    MYSQL *m = mysql_init(NULL);
    if (!m || !mysql_real_connect(m, g_url.host, g_url.user, g_url.password, g_url.db, g_url.port,
                                  g_url.socket, 0)) {
        fprintf(stderr, "arq-sync-bench: connect: %s\n", m ? mysql_error(m) : "oom");
        exit(1);
    }
    return m;
}

static void q(MYSQL *m, const char *sql, size_t len)
{
    if (mysql_real_query(m, sql, (unsigned long)len)) {
        fprintf(stderr, "arq-sync-bench: %.80s: %s\n", sql, mysql_error(m));
        exit(1);
    }
    MYSQL_RES *r = mysql_store_result(m);
    if (r)
        mysql_free_result(r);
}

static void qs(MYSQL *m, const char *sql)
{
    q(m, sql, strlen(sql));
}

static void reset_schema(MYSQL *m)
{
    qs(m, "DROP TABLE IF EXISTS arq_messages, arq_streams, arq_cursors, arq_sync_state, "
          "arq_schema_migrations, bench_ceiling");
    char err[512];
    if (sync_migrate(&g_url, NULL, err, sizeof(err)) != 0) {
        fprintf(stderr, "arq-sync-bench: %s\n", err);
        exit(1);
    }
}

static double now_s(void)
{
    return (double)bench_now_ns() / 1e9;
}

/* MariaDB's multi-row INSERT ceiling for the same rows. */
static double ceiling(MYSQL *m, uint64_t rows, uint32_t batch)
{
    qs(m, "CREATE TABLE bench_ceiling LIKE arq_messages");
    char payload[PAYLOAD], hex[2 * PAYLOAD + 1];
    memset(payload, 'x', sizeof(payload));
    mysql_hex_string(hex, payload, PAYLOAD);
    size_t cap = (size_t)batch * (2 * PAYLOAD + 200) + 256, len;
    char *sql = malloc(cap);
    double t0 = now_s();
    for (uint64_t done = 0; done < rows;) {
        len = (size_t)snprintf(sql, cap,
                               "INSERT INTO bench_ceiling (stream, `offset`, seq, direction, "
                               "producer, msgid, ts_us, headers, payload, checksum) VALUES ");
        uint32_t n = 0;
        for (; n < batch && done < rows; n++, done++)
            len += (size_t)snprintf(sql + len, cap - len,
                                    "%s(X'62656e63682e30',%" PRIu64 ",%" PRIu64 ",0,'','',%" PRIu64
                                    ",'',X'%s',%" PRIu64 ")",
                                    n ? "," : "", done + 1, done + 1, done, hex, done * 7919);
        qs(m, "BEGIN");
        q(m, sql, len);
        qs(m, "COMMIT");
    }
    double t = now_s() - t0;
    free(sql);
    qs(m, "DROP TABLE bench_ceiling");
    return (double)rows / t;
}

/* The same rows through a prepared INSERT with MariaDB's array binding
 * (bulk execution) - the technique the drain uses on MariaDB. */
static double ceiling_bulk(MYSQL *m, uint64_t rows, uint32_t batch)
{
    qs(m, "CREATE TABLE bench_ceiling LIKE arq_messages");
    static const char ins[] = "INSERT INTO bench_ceiling (stream, `offset`, seq, direction, "
                              "producer, msgid, ts_us, headers, payload, checksum) "
                              "VALUES (?,?,?,?,?,?,?,?,?,?)";
    MYSQL_STMT *st = mysql_stmt_init(m);
    if (!st || mysql_stmt_prepare(st, ins, sizeof(ins) - 1)) {
        fprintf(stderr, "arq-sync-bench: prepare: %s\n", mysql_error(m));
        exit(1);
    }
    static char payload[PAYLOAD], empty[1];
    memset(payload, 'x', sizeof(payload));
    char **sp = calloc(batch, sizeof(char *)), **ep = calloc(batch, sizeof(char *)),
         **pp = calloc(batch, sizeof(char *));
    unsigned long *sl = calloc(batch, sizeof(unsigned long)),
                  *el = calloc(batch, sizeof(unsigned long)),
                  *pl = calloc(batch, sizeof(unsigned long));
    unsigned long long *off = calloc(batch, 8), *seq = calloc(batch, 8), *ck = calloc(batch, 8);
    long long *ts = calloc(batch, 8);
    unsigned char *dir = calloc(batch, 1);
    for (uint32_t i = 0; i < batch; i++) {
        sp[i] = "bench.0";
        sl[i] = 7;
        ep[i] = empty;
        pp[i] = payload;
        pl[i] = PAYLOAD;
    }
    MYSQL_BIND b[10];
    memset(b, 0, sizeof(b));
    b[0] = (MYSQL_BIND){.buffer_type = MYSQL_TYPE_STRING, .buffer = sp, .length = sl};
    b[1] = (MYSQL_BIND){.buffer_type = MYSQL_TYPE_LONGLONG, .buffer = off, .is_unsigned = 1};
    b[2] = (MYSQL_BIND){.buffer_type = MYSQL_TYPE_LONGLONG, .buffer = seq, .is_unsigned = 1};
    b[3] = (MYSQL_BIND){.buffer_type = MYSQL_TYPE_TINY, .buffer = dir, .is_unsigned = 1};
    b[4] = (MYSQL_BIND){.buffer_type = MYSQL_TYPE_BLOB, .buffer = ep, .length = el};
    b[5] = (MYSQL_BIND){.buffer_type = MYSQL_TYPE_BLOB, .buffer = ep, .length = el};
    b[6] = (MYSQL_BIND){.buffer_type = MYSQL_TYPE_LONGLONG, .buffer = ts};
    b[7] = (MYSQL_BIND){.buffer_type = MYSQL_TYPE_BLOB, .buffer = ep, .length = el};
    b[8] = (MYSQL_BIND){.buffer_type = MYSQL_TYPE_BLOB, .buffer = pp, .length = pl};
    b[9] = (MYSQL_BIND){.buffer_type = MYSQL_TYPE_LONGLONG, .buffer = ck, .is_unsigned = 1};
    double t0 = now_s();
    for (uint64_t done = 0; done < rows;) {
        unsigned int n = 0;
        for (; n < batch && done < rows; n++, done++) {
            off[n] = seq[n] = done + 1;
            ts[n] = (long long)done;
            ck[n] = done * 7919;
        }
        qs(m, "BEGIN");
        if (mysql_stmt_attr_set(st, STMT_ATTR_ARRAY_SIZE, &n) || mysql_stmt_bind_param(st, b) ||
            mysql_stmt_execute(st)) {
            fprintf(stderr, "arq-sync-bench: bulk insert: %s\n", mysql_stmt_error(st));
            exit(1);
        }
        qs(m, "COMMIT");
    }
    double t = now_s() - t0;
    mysql_stmt_close(st);
    free(sp);
    free(ep);
    free(pp);
    free(sl);
    free(el);
    free(pl);
    free(off);
    free(seq);
    free(ck);
    free(ts);
    free(dir);
    qs(m, "DROP TABLE bench_ceiling");
    return (double)rows / t;
}

static void append_rows(wal_t *wal, uint64_t rows)
{
    char payload[PAYLOAD];
    memset(payload, 'y', sizeof(payload));
    enum { CHUNK = 1000 };
    static wal_msg_t msgs[CHUNK];
    for (size_t i = 0; i < CHUNK; i++)
        msgs[i] = (wal_msg_t){
            .stream = "bench.0", .stream_len = 7, .payload = payload, .payload_len = PAYLOAD};
    for (uint64_t done = 0; done < rows;) {
        size_t n = rows - done < CHUNK ? (size_t)(rows - done) : CHUNK;
        if (wal_append_sync(wal, msgs, n, NULL) != 0) {
            fprintf(stderr, "arq-sync-bench: WAL append failed\n");
            exit(1);
        }
        done += n;
    }
}

static uint64_t watermark(sync_t *s)
{
    sync_stats_t st;
    sync_stats_get(s, &st);
    return st.watermark;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Lag: append at `rate` rows/s for `seconds` while the drain runs (what
 * is due is appended as one group commit about every millisecond, as the
 * broker would); per row, append return -> watermark past it. */
static void lag_run(wal_t *wal, sync_t *s, uint64_t first_seq, double rate, double seconds,
                    uint64_t *p50_us, uint64_t *p99_us, uint64_t *max_us, uint64_t *count,
                    double *achieved)
{
    uint64_t n = (uint64_t)(rate * seconds);
    uint64_t *t_append = calloc(n + 1, sizeof(uint64_t));
    uint64_t *lag = calloc(n + 1, sizeof(uint64_t));
    char payload[PAYLOAD];
    memset(payload, 'z', sizeof(payload));
    enum { CHUNK = 4096 };
    static wal_msg_t msgs[CHUNK];
    for (size_t i = 0; i < CHUNK; i++)
        msgs[i] = (wal_msg_t){
            .stream = "bench.0", .stream_len = 7, .payload = payload, .payload_len = PAYLOAD};
    uint64_t start = bench_now_ns(), seen = 0, done = 0;
    while (done < n) {
        uint64_t now = bench_now_ns();
        uint64_t due = (uint64_t)((double)(now - start) / 1e9 * rate);
        if (due > n)
            due = n;
        if (due > done) {
            size_t k = due - done < CHUNK ? (size_t)(due - done) : CHUNK;
            if (wal_append_sync(wal, msgs, k, NULL) != 0) {
                fprintf(stderr, "arq-sync-bench: WAL append failed\n");
                exit(1);
            }
            uint64_t t = bench_now_ns();
            for (size_t i = 0; i < k; i++)
                t_append[done++] = t;
        }
        uint64_t wm = watermark(s);
        now = bench_now_ns();
        while (seen < done && first_seq + seen <= wm) {
            lag[seen] = now - t_append[seen];
            seen++;
        }
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    *achieved = (double)done / ((double)(bench_now_ns() - start) / 1e9);
    for (uint64_t spins = 0; seen < done && spins < 600000; spins++) {
        uint64_t wm = watermark(s), now = bench_now_ns();
        while (seen < done && first_seq + seen <= wm) {
            lag[seen] = now - t_append[seen];
            seen++;
        }
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    qsort(lag, seen, sizeof(uint64_t), cmp_u64);
    *count = seen;
    *p50_us = seen ? lag[seen / 2] / 1000 : 0;
    *p99_us = seen ? lag[seen * 99 / 100] / 1000 : 0;
    *max_us = seen ? lag[seen - 1] / 1000 : 0;
    free(t_append);
    free(lag);
}

int main(int argc, char **argv)
{
    uint64_t rows = 300000;
    uint32_t batch = 1000;
    double seconds = 5;
    const char *dir = NULL;
    int json = 0;
    static const struct option opts[] = {
        {"database-url", required_argument, NULL, 'u'},
        {"rows", required_argument, NULL, 'n'},
        {"batch", required_argument, NULL, 'b'},
        {"seconds", required_argument, NULL, 's'},
        {"dir", required_argument, NULL, 'd'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int o;
    while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (o) {
        case 'u':
            g_url_text = optarg;
            break;
        case 'n':
            rows = strtoull(optarg, NULL, 10);
            break;
        case 'b':
            batch = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 's':
            seconds = strtod(optarg, NULL);
            break;
        case 'd':
            dir = optarg;
            break;
        case 'j':
            json = 1;
            break;
        default:
            fprintf(o == 'h' ? stdout : stderr,
                    "usage: arq-sync-bench --database-url URL [--rows N] [--batch B] "
                    "[--seconds S] [--dir DIR] [--json]\n(drops and recreates the arq_* "
                    "tables of that database; see docs/benchmarks.md)\n");
            return o == 'h' ? 0 : 2;
        }
    }
    if (!g_url_text)
        g_url_text = getenv("DATABASE_URL");
    char err[512];
    if (!g_url_text || sync_url_parse(g_url_text, &g_url, err, sizeof(err)) != 0 || !rows ||
        !batch || seconds <= 0) {
        fprintf(stderr, "arq-sync-bench: %s\n", g_url_text ? err : "--database-url required");
        return 2;
    }
    char tmpl[] = "/var/tmp/arq-sync-bench-XXXXXX";
    if (!dir) {
        if (!mkdtemp(tmpl)) {
            perror("mkdtemp");
            return 1;
        }
        dir = tmpl;
    }
    MYSQL *m = connect_db();
    reset_schema(m);
    double ceil_rps = ceiling(m, rows, batch);
    fprintf(stderr, "ceiling: %.0f rows/s (multi-row INSERT, %u rows per statement)\n", ceil_rps,
            batch);
    double bulk_rps = ceiling_bulk(m, rows, batch);
    fprintf(stderr, "ceiling: %.0f rows/s (prepared INSERT, array binding of %u rows)\n", bulk_rps,
            batch);

    wal_options_t wo = {.dir = dir};
    wal_t *wal;
    if (wal_open(&wo, NULL, &wal, err, sizeof(err)) != 0) {
        fprintf(stderr, "arq-sync-bench: %s\n", err);
        return 1;
    }
    append_rows(wal, rows);
    sync_options_t so = {
        .url = &g_url, .batch_rows = batch, .batch_wait_ms = 1, .cursor_every_ms = 3600000};
    sync_t *s;
    double t0 = now_s();
    if (sync_start(wal, &so, &s) != 0)
        return 1;
    /* a drain that stops moving (a failing server) ends the run, not hangs it */
    uint64_t last = 0;
    double moved = now_s();
    while (watermark(s) < rows) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
        uint64_t wm = watermark(s);
        if (wm != last) {
            last = wm;
            moved = now_s();
        } else if (now_s() - moved > 60) {
            sync_stats_t st;
            sync_stats_get(s, &st);
            fprintf(stderr, "arq-sync-bench: the drain stopped at %" PRIu64 " (%s: %s)\n", wm,
                    sync_state_name(st.state), st.last_error);
            return 1;
        }
    }
    double drain_rps = (double)rows / (now_s() - t0);
    fprintf(stderr,
            "drain: %.0f rows/s (%.2f of the multi-row INSERT ceiling, %.2f of the bulk one)\n",
            drain_rps, drain_rps / ceil_rps, drain_rps / bulk_rps);

    uint64_t p50, p99, mx, cnt;
    double achieved;
    lag_run(wal, s, rows + 1, drain_rps / 2, seconds, &p50, &p99, &mx, &cnt, &achieved);
    fprintf(stderr,
            "lag at %.0f rows/s (half the drain rate; achieved %.0f), %" PRIu64
            " rows: p50 %.1f ms, p99 %.1f ms, max %.1f ms\n",
            drain_rps / 2, achieved, cnt, p50 / 1e3, p99 / 1e3, mx / 1e3);
    sync_stats_t st;
    sync_stats_get(s, &st);
    sync_stop(s);
    wal_close(wal);
    if (json)
        printf(
            "{\"rows\":%" PRIu64 ",\"batch\":%u,\"ceiling_rows_per_s\":%.0f,"
            "\"bulk_ceiling_rows_per_s\":%.0f,\"drain_rows_per_s\":%.0f,\"drain_vs_ceiling\":%.3f,"
            "\"drain_vs_bulk_ceiling\":%.3f,\"lag_rate\":%.0f,"
            "\"lag_rate_achieved\":%.0f,"
            "\"lag_rows\":%" PRIu64 ",\"lag_p50_ms\":%.2f,\"lag_p99_ms\":%.2f,"
            "\"lag_max_ms\":%.2f,\"sync_batches\":%" PRIu64 "}\n",
            rows, batch, ceil_rps, bulk_rps, drain_rps, drain_rps / ceil_rps, drain_rps / bulk_rps,
            drain_rps / 2, achieved, cnt, p50 / 1e3, p99 / 1e3, mx / 1e3, st.batches);
    mysql_close(m);
    if (dir == tmpl) {
        char cmd[128];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpl);
        if (system(cmd) != 0)
            return 1;
    }
    sync_url_free(&g_url);
    return 0;
}
