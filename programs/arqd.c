/*
 * arqd - the ARQ broker. Wires config, WAL, broker and server together; the
 * only place that knows all of them.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/thread.h>
#include <getopt.h>
#include <malloc.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "broker.h"
#include "config.h"
#include "sync.h"
#include "log.h"
#include "server.h"
#include "wal.h"

#define ARQ_VERSION "0.1.0"

extern char **environ;

static void usage(FILE *f)
{
    fprintf(f, "usage: arqd [options]\n"
               "\n"
               "The ARQ broker: WebSocket (arq.v1) and HTTP on one port, every message\n"
               "durable in the WAL before it is acknowledged or delivered.\n"
               "\n"
               "Configuration: defaults, then the INI file (--config or ARQ_CONFIG), then\n"
               "the environment (API_HOST, API_PORT, LOG_LEVEL, SECRET_KEY, DATABASE_URL,\n"
               "ARQ_DATA_DIR, ARQ_API_KEY, ARQ_ORIGINS, ARQ_LOG_FORMAT, ARQ_SYNC), then flags.\n"
               "\n"
               "  -c, --config FILE       INI configuration file\n"
               "  -d, --data-dir DIR      WAL directory (default ./data)\n"
               "  -H, --host ADDR         listen address (default 127.0.0.1)\n"
               "  -p, --port PORT         listen port (default 8000; 0 = any free port)\n"
               "  -l, --log-level LEVEL   debug|info|warn|error\n"
               "  -s, --set SECTION.KEY=VALUE   any configuration key (see docs/operations.md)\n"
               "      --print-config      print the effective configuration (secrets masked)\n"
               "      --migrate           apply the MySQL schema migrations (DATABASE_URL), exit\n"
               "      --version           print the version\n"
               "  -h, --help              this text\n");
}

/* /health "sync": state, watermark and lag (api does not know sync). */
static void health_sync(void *arg, struct evbuffer *out)
{
    sync_stats_t st;
    sync_stats_get(arg, &st);
    uint64_t lag = st.wal_next > st.watermark + 1 ? st.wal_next - 1 - st.watermark : 0;
    evbuffer_add_printf(out,
                        "{\"state\":\"%s\",\"watermark\":%llu,\"lag_records\":%llu,"
                        "\"lag_seconds\":%.3f,\"last_error\":\"",
                        sync_state_name(st.state), (unsigned long long)st.watermark,
                        (unsigned long long)lag, st.lag_seconds);
    for (const char *p = st.last_error; *p; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch == '"' || ch == '\\')
            evbuffer_add_printf(out, "\\%c", ch);
        else if (ch < 0x20 || ch >= 0x7f)
            evbuffer_add_printf(out, "\\u%04x", ch);
        else
            evbuffer_add(out, p, 1);
    }
    evbuffer_add_printf(out, "\"}");
}

static void metrics_sync(void *arg, struct evbuffer *out)
{
    sync_stats_t st;
    sync_stats_get(arg, &st);
    uint64_t lag = st.wal_next > st.watermark + 1 ? st.wal_next - 1 - st.watermark : 0;
    static const enum sync_state states[] = {SYNC_STATE_CONNECTING, SYNC_STATE_OK,
                                             SYNC_STATE_DEGRADED, SYNC_STATE_FAILED};
    evbuffer_add_printf(out, "# HELP arq_sync_state MySQL sync state (1 for the current one).\n"
                             "# TYPE arq_sync_state gauge\n");
    for (size_t i = 0; i < 4; i++)
        evbuffer_add_printf(out, "arq_sync_state{state=\"%s\"} %d\n", sync_state_name(states[i]),
                            st.state == states[i]);
#define M(name, type, help, v)                                                                     \
    evbuffer_add_printf(out,                                                                       \
                        "# HELP " name " " help "\n# TYPE " name " " type "\n" name " %llu\n",     \
                        (unsigned long long)(v))
    M("arq_sync_watermark", "gauge", "Last WAL sequence in MySQL.", st.watermark);
    M("arq_sync_lag_records", "gauge", "WAL records not yet in MySQL.", lag);
    M("arq_sync_rows_total", "counter", "Rows written to MySQL.", st.rows);
    M("arq_sync_batches_total", "counter", "Sync transactions committed.", st.batches);
    M("arq_sync_errors_total", "counter", "Sync errors (each followed by a reconnect).", st.errors);
    M("arq_sync_reconnects_total", "counter", "Reconnects to MySQL after errors.", st.reconnects);
    M("arq_sync_cursors_total", "counter", "Cursor rows upserted into MySQL.", st.cursors);
    M("arq_sync_cursors_deleted_total", "counter",
      "Cursor rows deleted from MySQL because the WAL deleted them.", st.cursors_deleted);
#undef M
    evbuffer_add_printf(out,
                        "# HELP arq_sync_lag_seconds Age of the oldest record not yet in MySQL.\n"
                        "# TYPE arq_sync_lag_seconds gauge\narq_sync_lag_seconds %.3f\n",
                        st.lag_seconds);
    evbuffer_add_printf(out, "# HELP arq_sync_batch_rows Rows per sync transaction.\n"
                             "# TYPE arq_sync_batch_rows histogram\n");
    uint64_t cum = 0;
    for (int i = 0; i < SYNC_HIST_BUCKETS; i++) {
        cum += st.batch_buckets[i];
        if (i < SYNC_HIST_BUCKETS - 1)
            evbuffer_add_printf(out, "arq_sync_batch_rows_bucket{le=\"%llu\"} %llu\n",
                                (unsigned long long)sync_batch_bounds[i], (unsigned long long)cum);
        else
            evbuffer_add_printf(out,
                                "arq_sync_batch_rows_bucket{le=\"+Inf\"} %llu\n"
                                "arq_sync_batch_rows_count %llu\n",
                                (unsigned long long)cum, (unsigned long long)cum);
    }
}

static char *read_file(const char *path, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open config file '%s': %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (n == cap) {
            if (cap >= (1u << 20)) {
                snprintf(err, errlen, "config file '%s' is larger than 1 MiB", path);
                free(buf);
                buf = NULL;
                break;
            }
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0)
            break;
    }
    fclose(f);
    *len = n;
    return buf;
}

/*
 * Every connection takes a descriptor; so do the WAL's files, MySQL's
 * connections, the listener, the event loop and the connections accepted
 * beyond max_connections for /health (api/server.c). Raise the soft limit
 * to what max_connections needs (up to the hard limit), or lower
 * max_connections to what the limit allows, and say so: running out of
 * descriptors at accept() is the failure to avoid.
 */
#define FD_RESERVE 64

static void fit_fd_limit(uint32_t *max_connections)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    rlim_t need = (rlim_t)*max_connections + FD_RESERVE;
    if (rl.rlim_cur < need) {
        struct rlimit nl = rl;
        nl.rlim_cur = rl.rlim_max == RLIM_INFINITY || need < rl.rlim_max ? need : rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &nl) == 0)
            rl = nl;
    }
    if (rl.rlim_cur >= need)
        return;
    uint32_t fit =
        (uint32_t)(rl.rlim_cur > 2 * FD_RESERVE ? rl.rlim_cur - FD_RESERVE : rl.rlim_cur / 2);
    char want[24], have[24], now[24];
    snprintf(want, sizeof(want), "%u", *max_connections);
    snprintf(have, sizeof(have), "%llu", (unsigned long long)rl.rlim_cur);
    snprintf(now, sizeof(now), "%u", fit);
    arq_log(
        ARQ_LOG_WARN, "fd_limit", "max_connections", want, "nofile", have, "effect",
        "max_connections lowered to fit the descriptor limit; raise it (LimitNOFILE, ulimit -n)",
        "max_connections_now", now, NULL);
    *max_connections = fit;
}

/* limits.tail_cache_bytes = 0: 1/32 of the machine's memory, at most 256 MiB. */
static uint64_t default_cache_bytes(void)
{
    long pages = sysconf(_SC_PHYS_PAGES), psize = sysconf(_SC_PAGESIZE);
    uint64_t ram = pages > 0 && psize > 0 ? (uint64_t)pages * (uint64_t)psize : 2ull << 30;
    uint64_t b = ram / 32;
    return b > (256ull << 20) ? 256ull << 20 : b;
}

static int is_loopback(const char *host)
{
    struct in_addr a;
    if (inet_pton(AF_INET, host, &a) != 1)
        return 0;
    return (ntohl(a.s_addr) >> 24) == 127;
}

struct app {
    struct event_base *base;
    api_server_t *srv;
    struct event *grace;
    int signals;
};

/*
 * The WAL's state changes, logged for operators: a stop once, at error
 * level, with its cause; "storage full" and its end at warning / info. Near
 * a full disk the state can flap (a small batch fits where a large one did
 * not): after a line, further changes within WATCH_QUIET_S are summed up in
 * one line at the end of that interval, with the state then.
 */
#define WATCH_QUIET_S 10

struct walwatch {
    wal_t *wal;
    struct event *later;
    int64_t last_log;      /* CLOCK_MONOTONIC seconds */
    enum wal_state logged; /* the state of the last line */
    uint64_t changes_seen; /* wal_state_info_t.changes at the last line */
};

static int64_t mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec;
}

static void watch_log(struct walwatch *w)
{
    wal_state_info_t st;
    wal_state_get(w->wal, &st);
    uint64_t n = st.changes - w->changes_seen;
    if (st.state == w->logged && n == 0)
        return;
    char changes[24], free_b[24];
    snprintf(changes, sizeof(changes), "%llu", (unsigned long long)n);
    snprintf(free_b, sizeof(free_b), "%llu", (unsigned long long)st.disk_free_bytes);
    if (st.state == WAL_STATE_FAILED)
        arq_log(ARQ_LOG_ERROR, "wal_stopped", "reason", st.reason, "effect",
                "publishes refused (503 storage stopped), readers served what the WAL holds; "
                "check the disk, then restart arqd (docs/runbook.md, \"fsync or write error\")",
                NULL);
    else if (st.state == WAL_STATE_FULL)
        arq_log(ARQ_LOG_WARN, "storage_full", "reason", st.reason, "disk_free_bytes", free_b,
                "changes", changes, "effect",
                "publishes refused (503 storage full) until there is room; readers are served",
                NULL);
    else
        arq_log(ARQ_LOG_INFO, "storage_available", "disk_free_bytes", free_b, "changes", changes,
                NULL);
    w->logged = st.state;
    w->changes_seen = st.changes;
    w->last_log = mono_s();
}

static void watch_later_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    watch_log(arg);
}

static void watch_cb(void *arg)
{
    struct walwatch *w = arg;
    if (wal_state_now(w->wal) == WAL_STATE_FAILED || mono_s() - w->last_log >= WATCH_QUIET_S) {
        watch_log(w);
        return;
    }
    if (w->later && !evtimer_pending(w->later, NULL)) {
        struct timeval tv = {(time_t)(w->last_log + WATCH_QUIET_S - mono_s()), 0};
        evtimer_add(w->later, &tv);
    }
}

/*
 * Memory back to the system. The heap keeps what was freed (a high
 * M_TRIM_THRESHOLD keeps the publish path out of page faults), so memory
 * that a burst of connections or a flood of large messages took would stay
 * with the process after they are gone. Every TRIM_EVERY_S, when the bytes
 * in use fell by TRIM_DROP since their peak, malloc_trim gives the free
 * pages of every arena back.
 */
#define TRIM_EVERY_S 5
#define TRIM_DROP    (32u << 20)

struct trimmer {
    struct event *ev;
    size_t peak;
    uint64_t trims;
};

static void trim_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct trimmer *t = arg;
    struct mallinfo2 m = mallinfo2();
    if (m.uordblks + TRIM_DROP < t->peak) {
        malloc_trim(0);
        t->trims++;
        t->peak = m.uordblks;
    } else if (m.uordblks > t->peak) {
        t->peak = m.uordblks;
    }
}

static void grace_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct app *app = arg;
    if (api_server_connections(app->srv) == 0 || ++app->signals > 40)
        event_base_loopexit(app->base, NULL);
}

static void signal_cb(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    struct app *app = arg;
    if (app->grace) {
        arq_log(ARQ_LOG_WARN, "shutdown_forced", "signal", sig == SIGINT ? "INT" : "TERM", NULL);
        _exit(1); /* second signal: at once (the WAL is safe anyway) */
    }
    arq_log(ARQ_LOG_INFO, "shutdown", "signal", sig == SIGINT ? "INT" : "TERM", NULL);
    api_server_shutdown(app->srv);
    /* Wait (up to 2 s) for the close handshakes to flush. */
    app->grace = event_new(app->base, -1, EV_PERSIST, grace_cb, app);
    struct timeval tv = {0, 50000};
    event_add(app->grace, &tv);
}

int main(int argc, char **argv)
{
    arq_config_t cfg;
    char err[512];
    if (arq_config_defaults(&cfg) != 0) {
        fprintf(stderr, "arqd: out of memory\n");
        return 1;
    }
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},
        {"data-dir", required_argument, NULL, 'd'},
        {"host", required_argument, NULL, 'H'},
        {"port", required_argument, NULL, 'p'},
        {"log-level", required_argument, NULL, 'l'},
        {"set", required_argument, NULL, 's'},
        {"print-config", no_argument, NULL, 'P'},
        {"migrate", no_argument, NULL, 'M'},
        {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    /* First pass: the config file, so that env and flags override it. */
    const char *config_path = getenv("ARQ_CONFIG");
    int opt;
    while ((opt = getopt_long(argc, argv, "c:d:H:p:l:s:h", longopts, NULL)) != -1) {
        if (opt == 'c')
            config_path = optarg;
        else if (opt == 'h') {
            usage(stdout);
            return 0;
        } else if (opt == 'V') {
            printf("arqd %s\n", ARQ_VERSION);
            return 0;
        } else if (opt == '?') {
            usage(stderr);
            return 2;
        }
    }
    if (config_path) {
        size_t len;
        char *text = read_file(config_path, &len, err, sizeof(err));
        if (!text || arq_config_apply_ini(&cfg, text, len, err, sizeof(err)) != 0) {
            fprintf(stderr, "arqd: %s\n", err);
            free(text);
            arq_config_free(&cfg);
            return 2;
        }
        free(text);
    }
    if (arq_config_apply_env(&cfg, environ, err, sizeof(err)) != 0) {
        fprintf(stderr, "arqd: %s\n", err);
        arq_config_free(&cfg);
        return 2;
    }
    int print_config = 0, migrate_only = 0;
    optind = 1;
    while ((opt = getopt_long(argc, argv, "c:d:H:p:l:s:h", longopts, NULL)) != -1) {
        int rc = 0;
        switch (opt) {
        case 'd':
            rc = arq_config_set(&cfg, "server", "data_dir", optarg, err, sizeof(err));
            break;
        case 'H':
            rc = arq_config_set(&cfg, "server", "host", optarg, err, sizeof(err));
            break;
        case 'p':
            rc = arq_config_set(&cfg, "server", "port", optarg, err, sizeof(err));
            break;
        case 'l':
            rc = arq_config_set(&cfg, "server", "log_level", optarg, err, sizeof(err));
            break;
        case 's': {
            char *eq = strchr(optarg, '='), *dot = strchr(optarg, '.');
            if (!eq || !dot || dot > eq) {
                snprintf(err, sizeof(err), "--set wants SECTION.KEY=VALUE");
                rc = -1;
                break;
            }
            char section[64], key[64];
            snprintf(section, sizeof(section), "%.*s", (int)(dot - optarg), optarg);
            snprintf(key, sizeof(key), "%.*s", (int)(eq - dot - 1), dot + 1);
            rc = arq_config_set(&cfg, section, key, eq + 1, err, sizeof(err));
            break;
        }
        case 'P':
            print_config = 1;
            break;
        case 'M':
            migrate_only = 1;
            break;
        default:
            break;
        }
        if (rc) {
            fprintf(stderr, "arqd: %s\n", err);
            arq_config_free(&cfg);
            return 2;
        }
    }
    if (print_config) {
        char *text = NULL;
        if (arq_config_print(&cfg, &text) == 0)
            fputs(text, stdout);
        free(text);
        arq_config_free(&cfg);
        return 0;
    }
    arq_log_setup(cfg.log_level, strcmp(cfg.log_format, "json") == 0);

    sync_url_t db_url = {0};
    bool have_db = false;
    if (cfg.database_url) {
        if (sync_url_parse(cfg.database_url, &db_url, err, sizeof(err)) != 0) {
            fprintf(stderr, "arqd: %s\n", err);
            arq_config_free(&cfg);
            return 2;
        }
        have_db = true;
    }
    if (migrate_only) {
        if (!have_db) {
            fprintf(stderr, "arqd: --migrate needs DATABASE_URL (or database.url)\n");
            arq_config_free(&cfg);
            return 2;
        }
        int applied = 0;
        int mrc = sync_migrate(&db_url, &applied, err, sizeof(err));
        sync_url_free(&db_url);
        arq_config_free(&cfg);
        if (mrc) {
            fprintf(stderr, "arqd: %s\n", err);
            return 1;
        }
        printf("arqd: %d migration(s) applied, the schema is current\n", applied);
        return 0;
    }
    if (have_db) {
        /* Refuse a schema we must not touch now; an unreachable MySQL is
         * not a reason not to serve (the drain thread retries). */
        int applied = 0;
        int mrc = sync_migrate(&db_url, &applied, err, sizeof(err));
        if (mrc == SYNC_ESCHEMA) {
            arq_log(ARQ_LOG_ERROR, "refusing_to_start", "reason", err, NULL);
            sync_url_free(&db_url);
            arq_config_free(&cfg);
            return 1;
        }
        if (mrc)
            arq_log(ARQ_LOG_WARN, "sync_degraded", "reason", err, NULL);
        else if (applied) {
            char n[16];
            snprintf(n, sizeof(n), "%d", applied);
            arq_log(ARQ_LOG_INFO, "migrations_applied", "count", n, NULL);
        }
    }

    if (cfg.secret_key && strlen(cfg.secret_key) < 32) {
        char n[24];
        snprintf(n, sizeof(n), "%zu", strlen(cfg.secret_key));
        arq_log(ARQ_LOG_ERROR, "refusing_to_start", "reason",
                "SECRET_KEY is too short for HS256: at least 32 bytes (256 bits); make one with "
                "`openssl rand -base64 32`",
                "bytes", n, NULL);
        arq_config_free(&cfg);
        return 2;
    }
    if (!cfg.secret_key && !is_loopback(cfg.host)) {
        arq_log(ARQ_LOG_ERROR, "refusing_to_start", "reason",
                "no SECRET_KEY: anonymous access is allowed only on a loopback listener", "host",
                cfg.host, NULL);
        arq_config_free(&cfg);
        return 2;
    }
    if (!cfg.secret_key)
        arq_log(ARQ_LOG_WARN, "anonymous_access", "reason",
                "no SECRET_KEY set: any local client may publish and subscribe", NULL);
    int unsafe = strcmp(cfg.sync, "none") == 0;
    if (unsafe)
        arq_log(ARQ_LOG_WARN, "wal_sync_none_unsafe", "reason",
                "sync=none: no fsync, a machine crash can lose acknowledged messages", NULL);
    if (!cfg.database_url)
        arq_log(ARQ_LOG_WARN, "wal_only", "reason", "DATABASE_URL not set: MySQL sync disabled",
                NULL);

    fit_fd_limit(&cfg.max_connections);
    /* Every publish allocates and frees a few small buffers; with glibc's
     * default thresholds the heap top is trimmed and faulted back in over
     * and over (measured: ~7% of arqd's time in page faults at 50x16). */
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
    mallopt(M_MMAP_THRESHOLD, 4 << 20);
    evthread_use_pthreads();
    struct event_base *base = event_base_new();
    if (!base) {
        arq_log(ARQ_LOG_ERROR, "startup_failed", "reason", "event_base_new", NULL);
        return 1;
    }
    wal_options_t wo = {
        .dir = cfg.data_dir,
        .sync = unsafe ? WAL_SYNC_NONE : WAL_SYNC_FULL,
        .map_size_max = cfg.map_size_max,
        .batch_max_msgs = cfg.batch_max_msgs,
        .batch_wait_us = cfg.batch_wait_us,
        .batch_wait_msgs = cfg.batch_wait_msgs,
        .no_journal = strcmp(cfg.journal, "off") == 0,
        .apply_us = cfg.apply_us,
        .apply_idle_us = cfg.apply_idle_us,
        .journal_max = cfg.journal_max,
    };
    wal_t *wal;
    int rc = wal_open(&wo, base, &wal, err, sizeof(err));
    if (rc) {
        arq_log(ARQ_LOG_ERROR, "wal_open_failed", "dir", cfg.data_dir, "reason", err, NULL);
        event_base_free(base);
        sync_url_free(&db_url);
        arq_config_free(&cfg);
        return 1;
    }
    struct walwatch watch = {.wal = wal, .logged = WAL_STATE_OK, .last_log = -WATCH_QUIET_S};
    watch.later = evtimer_new(base, watch_later_cb, &watch);
    wal_on_state(wal, watch_cb, &watch);
    watch_log(&watch); /* an open on a full disk starts "full" */
    brk_options_t bo = {
        .max_payload = cfg.max_message_bytes,
        .max_subscriptions = cfg.max_subscriptions,
        .max_inflight = cfg.max_inflight,
        .out_high_watermark = cfg.max_output_bytes,
        .session_ttl_s = cfg.session_ttl_s,
        .tail_cache_bytes = cfg.tail_cache_bytes ? cfg.tail_cache_bytes : default_cache_bytes(),
        .stream_idle_s = cfg.stream_idle_s,
        .max_sessions_per_owner = cfg.max_sessions_per_owner,
        .max_sessions_per_addr = cfg.max_sessions_per_addr,
        .session_rate = cfg.session_rate,
        .session_burst = cfg.session_burst,
    };
    brk_t *brk;
    if (brk_new(base, wal, &bo, &brk) != 0) {
        arq_log(ARQ_LOG_ERROR, "startup_failed", "reason", "broker", NULL);
        return 1;
    }
    api_options_t ao = {
        .host = cfg.host,
        .port = cfg.port,
        .max_connections = cfg.max_connections,
        .max_conns_per_addr = cfg.max_conns_per_addr,
        .conn_rate_per_s = cfg.conn_rate,
        .conn_burst = cfg.conn_burst,
        .hello_timeout_ms = cfg.hello_timeout_ms,
        .handshake_timeout_ms = cfg.handshake_timeout_ms,
        .max_header_bytes = cfg.max_header_bytes,
        .ping_interval_ms = cfg.ping_interval_ms,
        .pong_timeout_ms = cfg.pong_timeout_ms,
        .max_frame_bytes = cfg.max_frame_bytes,
        .max_fragments = cfg.max_fragments,
        .max_message_bytes = cfg.max_message_bytes,
        .max_inflight = cfg.max_inflight,
        .session_ttl_s = cfg.session_ttl_s,
        .max_output_bytes = cfg.max_output_bytes,
        .secret_key = cfg.secret_key,
        .api_key = cfg.api_key,
        .origins = cfg.origins,
        .n_origins = cfg.n_origins,
        .hosts = cfg.hosts,
        .n_hosts = cfg.n_hosts,
        .version = "arq/" ARQ_VERSION,
    };
    sync_t *sync = NULL;
    sync_cold_t *cold = NULL;
    if (have_db) {
        if (sync_cold_open(&db_url, base, &cold) != 0) {
            arq_log(ARQ_LOG_ERROR, "startup_failed", "reason", "cold tier thread", NULL);
            return 1;
        }
        brk_set_cold(brk, cold);
        uint64_t retain_bytes = cfg.map_size_max / 4 * 3;
        if (cfg.retain_bytes && cfg.retain_bytes < retain_bytes)
            retain_bytes = cfg.retain_bytes;
        sync_options_t so = {.url = &db_url,
                             .batch_rows = cfg.sync_batch_rows,
                             .batch_wait_ms = cfg.sync_batch_wait_ms,
                             .retain_age_s = cfg.retain_age_s,
                             .retain_bytes = retain_bytes,
                             .retain_every_ms = cfg.retain_every_ms,
                             .cursor_ttl_s = cfg.session_ttl_s};
        if (sync_start(wal, &so, &sync) != 0) {
            arq_log(ARQ_LOG_ERROR, "startup_failed", "reason", "sync thread", NULL);
            return 1;
        }
        ao.health_sync = health_sync;
        ao.metrics_extra = metrics_sync;
        ao.extra_arg = sync;
    }
    api_server_t *srv;
    if (api_server_start(base, brk, wal, &ao, &srv, err, sizeof(err)) != 0) {
        arq_log(ARQ_LOG_ERROR, "listen_failed", "reason", err, NULL);
        sync_stop(sync);
        wal_close(wal);
        brk_free(brk);
        sync_cold_close(cold);
        event_base_free(base);
        sync_url_free(&db_url);
        arq_config_free(&cfg);
        return 1;
    }
    char port[16];
    snprintf(port, sizeof(port), "%u", api_server_port(srv));
    arq_log(ARQ_LOG_INFO, "listening", "host", cfg.host, "port", port, "data_dir", cfg.data_dir,
            "version", ARQ_VERSION, NULL);
    /* A plain line for scripts and people: where to connect. */
    printf("arqd listening on ws://%s:%s/ws (health: http://%s:%s/health)\n", cfg.host, port,
           cfg.host, port);
    fflush(stdout);

    struct trimmer trim = {0};
    trim.ev = event_new(base, -1, EV_PERSIST, trim_cb, &trim);
    if (trim.ev) {
        struct timeval ttv = {TRIM_EVERY_S, 0};
        event_add(trim.ev, &ttv);
    }
    signal(SIGPIPE, SIG_IGN);
    struct app app = {.base = base, .srv = srv};
    struct event *sigterm = evsignal_new(base, SIGTERM, signal_cb, &app);
    struct event *sigint = evsignal_new(base, SIGINT, signal_cb, &app);
    event_add(sigterm, NULL);
    event_add(sigint, NULL);
    event_base_dispatch(base);

    /* Acked offsets not yet persisted go out now; wal_close then finishes
     * every commit in flight (their callbacks run) before closing. */
    brk_flush(brk);
    sync_stop(sync); /* its batch in flight commits or rolls back */
    sync_url_free(&db_url);
    watch_log(&watch); /* a change the quiet interval held back */
    wal_state_info_t wst;
    wal_state_get(wal, &wst);
    wal_close(wal);
    if (watch.later)
        event_free(watch.later);
    if (trim.ev)
        event_free(trim.ev);
    api_server_free(srv);
    brk_free(brk);
    sync_cold_close(cold); /* after the broker: no subscription waits for it any more */
    event_free(sigterm);
    event_free(sigint);
    if (app.grace)
        event_free(app.grace);
    event_base_free(base);
    arq_config_free(&cfg);
    if (wst.state == WAL_STATE_FAILED) {
        /* A supervisor must see that this run ended in a fail-stop. */
        arq_log(ARQ_LOG_ERROR, "stopped", "exit", "1", "reason", wst.reason, NULL);
        return 1;
    }
    arq_log(ARQ_LOG_INFO, "stopped", NULL);
    return 0;
}
