/*
 * arqd - the ARQ broker. Wires config, WAL, broker and server together; the
 * only place that knows all of them.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/thread.h>
#include <getopt.h>
#include <malloc.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include "broker.h"
#include "config.h"
#include "sync.h"
#include "log.h"
#include "server.h"
#include "standby.h"
#include "wal.h"

#ifndef ARQ_VERSION
#define ARQ_VERSION "0.1.0"
#endif

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
               "ARQ_DATA_DIR, ARQ_API_KEY, ARQ_ORIGINS, ARQ_LOG_FORMAT, ARQ_SYNC,\n"
               "SECRET_KEY_PREVIOUS, ARQ_ANONYMOUS, ARQ_TRUSTED_PROXIES, ARQ_MONITOR_TOKEN),\n"
               "then flags. SIGHUP reloads them (what can change without a restart).\n"
               "Under systemd: Type=notify, socket activation (arqd.socket) and the\n"
               "watchdog are supported (docs/operations.md).\n"
               "\n"
               "  -c, --config FILE       INI configuration file\n"
               "  -d, --data-dir DIR      WAL directory (default ./data)\n"
               "  -H, --host ADDR         listen address (default 127.0.0.1)\n"
               "  -p, --port PORT         listen port (default 8000; 0 = any free port)\n"
               "  -l, --log-level LEVEL   debug|info|warn|error\n"
               "  -s, --set SECTION.KEY=VALUE   any configuration key (see docs/operations.md)\n"
               "      --anonymous         shorthand for --set auth.anonymous=true (development:\n"
               "                          clients without a token get full access)\n"
               "      --print-config      print the effective configuration (secrets masked)\n"
               "      --migrate           apply the MySQL schema migrations (DATABASE_URL), exit\n"
               "      --version           print the version\n"
               "  -h, --help              this text\n");
}

/* The length of the valid UTF-8 sequence at p (1..4), or 0 if it is not
 * one (overlong, surrogate, beyond U+10FFFF, truncated). */
static size_t utf8_seq(const unsigned char *p)
{
    unsigned char b = p[0];
    size_t k;
    uint32_t cp;
    if (b < 0x80)
        return 1;
    if ((b & 0xe0) == 0xc0) {
        k = 1;
        cp = b & 0x1f;
    } else if ((b & 0xf0) == 0xe0) {
        k = 2;
        cp = b & 0x0f;
    } else if ((b & 0xf8) == 0xf0) {
        k = 3;
        cp = b & 0x07;
    } else {
        return 0;
    }
    for (size_t j = 1; j <= k; j++) {
        if ((p[j] & 0xc0) != 0x80) /* also stops at the NUL */
            return 0;
        cp = (cp << 6) | (p[j] & 0x3f);
    }
    if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
        cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return k + 1;
}

/* text as the inside of a JSON string: quotes, backslashes and control
 * characters escaped, UTF-8 as it is, an invalid byte as U+FFFD (a MySQL
 * error may quote bytes in another character set). */
static void json_utf8(struct evbuffer *out, const char *text)
{
    for (const unsigned char *p = (const unsigned char *)text; *p;) {
        size_t n = utf8_seq(p);
        if (n == 0) {
            evbuffer_add(out, "\\ufffd", 6);
            p++;
        } else if (*p == '"' || *p == '\\') {
            evbuffer_add_printf(out, "\\%c", *p);
            p++;
        } else if (*p < 0x20 || *p == 0x7f) {
            evbuffer_add_printf(out, "\\u%04x", *p);
            p++;
        } else {
            evbuffer_add(out, p, n);
            p += n;
        }
    }
}

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* /health "sync": state, watermark and lag (api does not know sync). */
static void health_sync(void *arg, struct evbuffer *out)
{
    sync_stats_t st;
    sync_stats_get(arg, &st);
    uint64_t lag = st.wal_next > st.watermark + 1 ? st.wal_next - 1 - st.watermark : 0;
    evbuffer_add_printf(out,
                        "{\"state\":\"%s\",\"watermark\":%llu,\"lag_records\":%llu,"
                        "\"lag_seconds\":%.3f,",
                        sync_state_name(st.state), (unsigned long long)st.watermark,
                        (unsigned long long)lag, st.lag_seconds);
    if (st.lease_generation)
        evbuffer_add_printf(
            out,
            "\"lease\":{\"generation\":%llu,\"renewed_ms_ago\":%lld,"
            "\"handoff\":%s},",
            (unsigned long long)st.lease_generation,
            st.lease_renewed_us ? (long long)((now_us() - st.lease_renewed_us) / 1000) : -1LL,
            st.handoff ? "true" : "false");
    evbuffer_add_printf(out, "\"last_error\":\"");
    json_utf8(out, st.last_error);
    evbuffer_add_printf(out, "\"}");
}

static void metrics_sync(void *arg, struct evbuffer *out)
{
    sync_stats_t st;
    sync_stats_get(arg, &st);
    uint64_t lag = st.wal_next > st.watermark + 1 ? st.wal_next - 1 - st.watermark : 0;
    static const enum sync_state states[] = {SYNC_STATE_CONNECTING, SYNC_STATE_OK,
                                             SYNC_STATE_DEGRADED, SYNC_STATE_FAILED,
                                             SYNC_STATE_FENCED};
    evbuffer_add_printf(out, "# HELP arq_sync_state MySQL sync state (1 for the current one).\n"
                             "# TYPE arq_sync_state gauge\n");
    for (size_t i = 0; i < sizeof(states) / sizeof(states[0]); i++)
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
    M("arq_sync_sessions_total", "counter", "Session rows upserted into MySQL.", st.sessions);
    M("arq_sync_sessions_deleted_total", "counter",
      "Session rows deleted from MySQL because the WAL deleted them.", st.sessions_deleted);
    if (st.lease_generation) {
        M("arq_ha_lease_generation", "gauge", "Generation of the lease this node holds.",
          st.lease_generation);
        M("arq_ha_lease_renewals_total", "counter",
          "Lease renewals (each drain transaction and the idle renewal).", st.lease_renewals);
        evbuffer_add_printf(out,
                            "# HELP arq_ha_lease_age_seconds Time since the lease was last "
                            "renewed.\n# TYPE arq_ha_lease_age_seconds gauge\n"
                            "arq_ha_lease_age_seconds %.3f\n",
                            st.lease_renewed_us ? (double)(now_us() - st.lease_renewed_us) / 1e6
                                                : 0.0);
    }
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

/* ---- configuration ------------------------------------------------------ */

enum { LOAD_OK = 0, LOAD_DONE = 1, LOAD_ERROR = 2 };

static const struct option longopts[] = {
    {"config", required_argument, NULL, 'c'},
    {"data-dir", required_argument, NULL, 'd'},
    {"host", required_argument, NULL, 'H'},
    {"port", required_argument, NULL, 'p'},
    {"log-level", required_argument, NULL, 'l'},
    {"set", required_argument, NULL, 's'},
    {"anonymous", no_argument, NULL, 'A'},
    {"print-config", no_argument, NULL, 'P'},
    {"migrate", no_argument, NULL, 'M'},
    {"version", no_argument, NULL, 'V'},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

/*
 * Defaults, the INI file, the environment, then the flags of argv into
 * *cfg (filled by this call; free it with arq_config_free unless
 * LOAD_ERROR). At start-up (interactive) --help and --version print and
 * return LOAD_DONE; on SIGHUP the same argv is read again, quietly. Returns
 * LOAD_ERROR with err set for any bad value.
 */
static int config_load(int argc, char **argv, int interactive, arq_config_t *cfg, int *print_config,
                       int *migrate_only, char *err, size_t errlen)
{
    if (arq_config_defaults(cfg) != 0) {
        snprintf(err, errlen, "out of memory");
        return LOAD_ERROR;
    }
    const char *config_path = getenv("ARQ_CONFIG");
    int opt;
    opterr = interactive;
    optind = 1;
    /* First pass: the config file, so that env and flags override it. */
    while ((opt = getopt_long(argc, argv, "c:d:H:p:l:s:h", longopts, NULL)) != -1) {
        if (opt == 'c') {
            config_path = optarg;
        } else if (opt == 'h' && interactive) {
            usage(stdout);
            arq_config_free(cfg);
            return LOAD_DONE;
        } else if (opt == 'V' && interactive) {
            printf("arqd %s\n", ARQ_VERSION);
            arq_config_free(cfg);
            return LOAD_DONE;
        } else if (opt == '?') {
            if (interactive)
                usage(stderr);
            snprintf(err, errlen, "bad command line");
            arq_config_free(cfg);
            return LOAD_ERROR;
        }
    }
    if (config_path) {
        size_t len;
        char *text = read_file(config_path, &len, err, errlen);
        if (!text || arq_config_apply_ini(cfg, text, len, err, errlen) != 0) {
            free(text);
            arq_config_free(cfg);
            return LOAD_ERROR;
        }
        free(text);
    }
    if (arq_config_apply_env(cfg, environ, err, errlen) != 0) {
        arq_config_free(cfg);
        return LOAD_ERROR;
    }
    optind = 1;
    while ((opt = getopt_long(argc, argv, "c:d:H:p:l:s:h", longopts, NULL)) != -1) {
        int rc = 0;
        switch (opt) {
        case 'd':
            rc = arq_config_set(cfg, "server", "data_dir", optarg, err, errlen);
            break;
        case 'H':
            rc = arq_config_set(cfg, "server", "host", optarg, err, errlen);
            break;
        case 'p':
            rc = arq_config_set(cfg, "server", "port", optarg, err, errlen);
            break;
        case 'l':
            rc = arq_config_set(cfg, "server", "log_level", optarg, err, errlen);
            break;
        case 'A':
            rc = arq_config_set(cfg, "auth", "anonymous", "true", err, errlen);
            break;
        case 's': {
            char *eq = strchr(optarg, '='), *dot = strchr(optarg, '.');
            if (!eq || !dot || dot > eq) {
                snprintf(err, errlen, "--set wants SECTION.KEY=VALUE");
                rc = -1;
                break;
            }
            char section[64], key[64];
            snprintf(section, sizeof(section), "%.*s", (int)(dot - optarg), optarg);
            snprintf(key, sizeof(key), "%.*s", (int)(eq - dot - 1), dot + 1);
            rc = arq_config_set(cfg, section, key, eq + 1, err, errlen);
            break;
        }
        case 'P':
            *print_config = 1;
            break;
        case 'M':
            *migrate_only = 1;
            break;
        default:
            break;
        }
        if (rc) {
            arq_config_free(cfg);
            return LOAD_ERROR;
        }
    }
    return LOAD_OK;
}

/*
 * Who may connect (docs/operations.md, "Security model"): tokens signed
 * with the secret key, or - only when asked for with auth.anonymous = true
 * - everyone, with full access. Never both, never neither.
 */
static int auth_policy_check(const arq_config_t *cfg, char *err, size_t errlen)
{
    if (cfg->anonymous && (cfg->secret_key || cfg->previous_secret_key)) {
        snprintf(err, errlen,
                 "auth.anonymous = true and a secret key (SECRET_KEY) are both set: choose "
                 "tokens or anonymous access");
        return -1;
    }
    if (!cfg->anonymous && !cfg->secret_key) {
        snprintf(err, errlen,
                 "no auth.secret_key (SECRET_KEY): clients could not authenticate. Set it, or "
                 "set auth.anonymous = true (--anonymous) to let every client in with full "
                 "access (development)");
        return -1;
    }
    if (cfg->previous_secret_key && !cfg->secret_key) {
        snprintf(err, errlen, "auth.previous_secret_key is set without auth.secret_key");
        return -1;
    }
    const char *const keys[] = {cfg->secret_key, cfg->previous_secret_key};
    for (size_t i = 0; i < 2; i++) {
        if (keys[i] && strlen(keys[i]) < 32) {
            snprintf(err, errlen,
                     "%s is too short for HS256: %zu bytes, at least 32 (256 bits); make one "
                     "with `openssl rand -base64 32`",
                     i == 0 ? "SECRET_KEY" : "SECRET_KEY_PREVIOUS", strlen(keys[i]));
            return -1;
        }
    }
    return 0;
}

/* ---- one owner per data directory --------------------------------------- */

/*
 * Take <dir>/arqd.lock (a POSIX record lock, released by the kernel when
 * the process ends however it ends) before anything else touches the
 * directory. A second arqd on the same directory learns the holder's PID
 * from the lock itself (F_GETLK), not from a file that may be stale.
 * Read-only openers (arq-replay) do not take it. Returns the lock's fd, or
 * -1 with err set.
 */
static int lock_data_dir(const char *dir, char *err, size_t errlen)
{
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        snprintf(err, errlen, "cannot create data directory '%s': %s", dir, strerror(errno));
        return -1;
    }
    char path[4096];
    if ((size_t)snprintf(path, sizeof(path), "%s/arqd.lock", dir) >= sizeof(path)) {
        snprintf(err, errlen, "data directory path too long");
        return -1;
    }
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open '%.300s': %s", path, strerror(errno));
        return -1;
    }
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (fcntl(fd, F_SETLK, &fl) != 0) {
        int e = errno;
        struct flock q = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
        if ((e == EACCES || e == EAGAIN) && fcntl(fd, F_GETLK, &q) == 0 && q.l_type != F_UNLCK)
            snprintf(
                err, errlen,
                "data directory '%.200s' is in use by another arqd (pid %ld holds %.200s); one "
                "arqd per data directory",
                dir, (long)q.l_pid, path);
        else
            snprintf(err, errlen, "cannot lock '%.300s': %s", path, strerror(e));
        close(fd);
        return -1;
    }
    char pid[32];
    int n = snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) != 0 || pwrite(fd, pid, (size_t)n, 0) != n) {
        /* the lock is what counts; the PID in the file is for people */
    }
    return fd;
}

/* ---- metrics of the process --------------------------------------------- */

struct app;
static void metrics_arqd(void *arg, struct evbuffer *out);

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

/* ---- the running broker ------------------------------------------------- */

struct app {
    struct event_base *base;
    brk_t *brk;
    api_server_t *srv;
    wal_t *wal;
    sync_t *sync;
    struct event *grace;
    int signals;
    int argc;
    char **argv;
    arq_config_t *boot; /* the configuration arqd started with */
    arq_config_t *live; /* the latest reloaded one (NULL: boot) */
    api_options_t ao;   /* what the server was given (strings borrowed from boot / live) */
    double start_time;  /* unix seconds */
    /* watchers (housekeeping_cb) */
    enum sync_state sync_logged;
    struct event *repl_ev; /* the drain moved (ack = replicated): tell the broker */
    int storage_high;
    int stepping_down; /* STEP_FENCED / STEP_HANDOFF: this node gives up serving */
    unsigned ticks;
    size_t heap_peak; /* bytes in use at their peak since the last trim */
};

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

static void trim_heap(struct app *app)
{
    struct mallinfo2 m = mallinfo2();
    if (m.uordblks + TRIM_DROP < app->heap_peak) {
        malloc_trim(0);
        app->heap_peak = m.uordblks;
    } else if (m.uordblks > app->heap_peak) {
        app->heap_peak = m.uordblks;
    }
}

static const arq_config_t *app_cfg(const struct app *app)
{
    return app->live ? app->live : app->boot;
}

/* sd_notify(3) does nothing without $NOTIFY_SOCKET (not under systemd). */
static void notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void notify_status(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    (void)sd_notifyf(0, "STATUS=%s", buf);
}

static void metrics_arqd(void *arg, struct evbuffer *out)
{
    struct app *app = arg;
    evbuffer_add_printf(out,
                        "# HELP arq_build_info The running arqd's version (value 1).\n"
                        "# TYPE arq_build_info gauge\n"
                        "arq_build_info{version=\"%s\"} 1\n",
                        ARQ_VERSION);
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) == 0)
        evbuffer_add_printf(out,
                            "# HELP process_cpu_seconds_total User and system CPU time.\n"
                            "# TYPE process_cpu_seconds_total counter\n"
                            "process_cpu_seconds_total %.6f\n",
                            (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
                                (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long long vsz = 0, rss = 0;
    if (f) {
        if (fscanf(f, "%llu %llu", &vsz, &rss) == 2) {
            long page = sysconf(_SC_PAGESIZE);
            evbuffer_add_printf(out,
                                "# HELP process_resident_memory_bytes Resident memory size.\n"
                                "# TYPE process_resident_memory_bytes gauge\n"
                                "process_resident_memory_bytes %llu\n"
                                "# HELP process_virtual_memory_bytes Virtual memory size.\n"
                                "# TYPE process_virtual_memory_bytes gauge\n"
                                "process_virtual_memory_bytes %llu\n",
                                rss * (unsigned long long)page, vsz * (unsigned long long)page);
        }
        fclose(f);
    }
    DIR *d = opendir("/proc/self/fd");
    if (d) {
        unsigned long long n = 0;
        struct dirent *e;
        while ((e = readdir(d)))
            n += e->d_name[0] != '.';
        closedir(d);
        evbuffer_add_printf(out,
                            "# HELP process_open_fds Open file descriptors.\n"
                            "# TYPE process_open_fds gauge\nprocess_open_fds %llu\n",
                            n > 0 ? n - 1 : 0); /* minus the one reading the directory */
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0)
        evbuffer_add_printf(out,
                            "# HELP process_max_fds Limit of open file descriptors.\n"
                            "# TYPE process_max_fds gauge\nprocess_max_fds %llu\n",
                            (unsigned long long)rl.rlim_cur);
    evbuffer_add_printf(out,
                        "# HELP process_start_time_seconds Start time of the process (unix "
                        "seconds).\n# TYPE process_start_time_seconds gauge\n"
                        "process_start_time_seconds %.3f\n",
                        app->start_time);
    evbuffer_add_printf(out,
                        "# HELP arq_wal_map_max_bytes wal.map_size_max: how far the WAL's map "
                        "may grow (arq_wal_used_bytes against it: WAL usage).\n"
                        "# TYPE arq_wal_map_max_bytes gauge\narq_wal_map_max_bytes %llu\n",
                        (unsigned long long)app->boot->map_size_max);
    if (app->sync)
        metrics_sync(app->sync, out);
}

static void watch_lease(struct app *app);

/* Runs on the drain thread: wake the loop (repl_ev_cb). */
static void sync_progress(void *arg)
{
    struct app *app = arg;
    if (app->repl_ev)
        event_active(app->repl_ev, EV_TIMEOUT, 0);
}

/* On the loop: what MySQL holds now, for pubacks of replicated publishes. */
static void repl_ev_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct app *app = arg;
    if (!app->sync)
        return;
    sync_stats_t st;
    sync_stats_get(app->sync, &st);
    brk_replicated(app->brk, st.watermark, st.state == SYNC_STATE_OK);
    watch_lease(app);
}

enum { STEP_FENCED = 1, STEP_HANDOFF = 2 };
static void begin_shutdown(struct app *app);

/* The lease: lost (another node took it) or asked for (switchover). */
static void watch_lease(struct app *app)
{
    if (!app->sync || !app->srv || app->stepping_down || app->grace)
        return;
    sync_stats_t st;
    sync_stats_get(app->sync, &st);
    if (st.state == SYNC_STATE_FENCED) {
        arq_log(ARQ_LOG_ERROR, "lease_lost", "reason", st.last_error, "effect",
                "closing every connection (1001) and standing by: clients move to the active "
                "node",
                NULL);
        app->stepping_down = STEP_FENCED;
    } else if (st.handoff) {
        arq_log(ARQ_LOG_INFO, "switchover", "effect",
                "closing every connection (1001), draining into MySQL, handing the lease over, "
                "then standing by",
                NULL);
        app->stepping_down = STEP_HANDOFF;
    } else {
        return;
    }
    begin_shutdown(app);
}

static void repl_kick(void *arg)
{
    struct app *app = arg;
    if (app->sync)
        sync_kick(app->sync);
}

static void health_arqd(void *arg, struct evbuffer *out)
{
    health_sync(((struct app *)arg)->sync, out);
}

/*
 * Once a second: state changes an operator must act on, logged once each
 * (MySQL sync down and back; the WAL near its limit or its filesystem near
 * full), and a STATUS= line for systemd every 10 s.
 */
#define STORAGE_HIGH_PCT 90
#define STORAGE_LOW_PCT  85

static void watch_sync(struct app *app)
{
    if (!app->sync)
        return;
    sync_stats_t st;
    sync_stats_get(app->sync, &st);
    enum sync_state was = app->sync_logged;
    if (st.state == was || st.state == SYNC_STATE_CONNECTING)
        return;
    uint64_t lag = st.wal_next > st.watermark + 1 ? st.wal_next - 1 - st.watermark : 0;
    char lag_s[24];
    snprintf(lag_s, sizeof(lag_s), "%llu", (unsigned long long)lag);
    if (st.state == SYNC_STATE_DEGRADED)
        arq_log(ARQ_LOG_WARN, "sync_down", "reason", st.last_error, "lag_records", lag_s, "effect",
                "publishing and delivery go on; the WAL keeps what MySQL lacks and the drain "
                "retries (docs/runbook.md, \"MySQL outage\")",
                NULL);
    else if (st.state == SYNC_STATE_FAILED)
        arq_log(ARQ_LOG_ERROR, "sync_failed", "reason", st.last_error, "effect",
                "the drain stopped for good; fix the schema, then restart arqd", NULL);
    else if (was != SYNC_STATE_CONNECTING)
        arq_log(ARQ_LOG_INFO, "sync_up", "lag_records", lag_s, NULL);
    app->sync_logged = st.state;
}

static void watch_storage(struct app *app)
{
    const arq_config_t *cfg = app->boot; /* map_size_max changes only with a restart */
    wal_stats_t ws;
    wal_state_info_t st;
    if (wal_stats_get(app->wal, &ws) != 0)
        return;
    wal_state_get(app->wal, &st);
    unsigned map_pct = cfg->map_size_max
                           ? (unsigned)((double)ws.used_bytes * 100.0 / (double)cfg->map_size_max)
                           : 0;
    unsigned disk_pct =
        st.disk_total_bytes
            ? (unsigned)(100.0 - (double)st.disk_free_bytes * 100.0 / (double)st.disk_total_bytes)
            : 0;
    unsigned pct = map_pct > disk_pct ? map_pct : disk_pct;
    if (!app->storage_high && pct >= STORAGE_HIGH_PCT) {
        char reason[160], free_b[24];
        if (map_pct >= disk_pct)
            snprintf(reason, sizeof(reason), "the WAL uses %u%% of wal.map_size_max (%llu MiB)",
                     map_pct, (unsigned long long)(cfg->map_size_max >> 20));
        else
            snprintf(reason, sizeof(reason), "the WAL's filesystem is %u%% full", disk_pct);
        snprintf(free_b, sizeof(free_b), "%llu", (unsigned long long)st.disk_free_bytes);
        arq_log(ARQ_LOG_WARN, "storage_nearly_full", "reason", reason, "disk_free_bytes", free_b,
                "effect",
                "publishes are refused (storage full) when it is; make room, or check the "
                "MySQL sync (retention drops only synced records)",
                NULL);
        app->storage_high = 1;
    } else if (app->storage_high && pct < STORAGE_LOW_PCT) {
        arq_log(ARQ_LOG_INFO, "storage_nearly_full_cleared", NULL);
        app->storage_high = 0;
    }
}

static void housekeeping_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct app *app = arg;
    watch_sync(app);
    watch_lease(app);
    watch_storage(app);
    if (app->ticks % TRIM_EVERY_S == 0)
        trim_heap(app);
    if (app->ticks++ % 10 == 0) {
        wal_state_info_t st;
        wal_state_get(app->wal, &st);
        notify_status("serving: %zu connections, wal %s%s%s", api_server_connections(app->srv),
                      st.state == WAL_STATE_OK     ? "ok"
                      : st.state == WAL_STATE_FULL ? "full"
                                                   : "stopped",
                      app->sync ? ", sync " : "",
                      app->sync ? sync_state_name(app->sync_logged) : "");
    }
}

/* The watchdog ping comes from the event loop: a loop that is stuck stops
 * it, and systemd restarts arqd (WatchdogSec= in arqd.service). */
static void watchdog_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    (void)sd_notify(0, "WATCHDOG=1");
}

/* ---- SIGHUP: reload ------------------------------------------------------ */

/* Keys a reload applies; every other change waits for a restart. */
static const char *const reloadable[] = {
    "server.log_level",
    "server.max_connections",
    "server.handshake_timeout_ms",
    "server.max_header_bytes",
    "server.ping_interval_ms",
    "server.pong_timeout_ms",
    "server.trusted_proxies",
    "server.monitor_allow",
    "server.monitor_token",
    "auth.secret_key",
    "auth.previous_secret_key",
    "auth.anonymous",
    "auth.api_key",
    "auth.api_open",
    "auth.origins",
    "auth.expiry_grace_s",
    "limits.max_message_bytes",
    "limits.max_frame_bytes",
    "limits.max_subscriptions",
    "limits.max_inflight",
    "limits.max_output_bytes",
};

static int is_reloadable(const char *key)
{
    for (size_t i = 0; i < sizeof(reloadable) / sizeof(reloadable[0]); i++)
        if (strcmp(key, reloadable[i]) == 0)
            return 1;
    return 0;
}

/* The value of "section.key" in arq_config_print's text; "" if absent. */
static void print_lookup(const char *text, const char *key, char *out, size_t outlen)
{
    const char *dot = strchr(key, '.');
    char section[80];
    snprintf(section, sizeof(section), "[%.*s]", (int)(dot - key), key);
    const char *p = strstr(text, section);
    out[0] = '\0';
    if (!p)
        return;
    size_t kl = strlen(dot + 1);
    for (p = strchr(p, '\n'); p && p[1] && p[1] != '['; p = strchr(p + 1, '\n')) {
        const char *line = p + 1;
        if (strncmp(line, dot + 1, kl) == 0 && strncmp(line + kl, " =", 2) == 0) {
            const char *v = line + kl + 2;
            if (*v == ' ')
                v++;
            size_t n = strcspn(v, "\n");
            snprintf(out, outlen, "%.*s", (int)n, v);
            return;
        }
    }
}

static int secret_changed(const char *a, const char *b)
{
    return (a == NULL) != (b == NULL) || (a && strcmp(a, b) != 0);
}

/*
 * Log what differs between two configurations, key by key (secrets as
 * "changed", never their values). Returns how many reloadable keys changed;
 * *ret_restart gets how many others did (they wait for a restart).
 */
static int config_diff(const arq_config_t *old, const arq_config_t *nw, int *ret_restart)
{
    char *a = NULL, *b = NULL;
    int changed = 0, restart = 0;
    if (arq_config_print(old, &a) != 0 || arq_config_print(nw, &b) != 0) {
        free(a);
        free(b);
        *ret_restart = 0;
        return 0;
    }
    /* every "name = value" line of b, under its section */
    char section[64] = "";
    for (const char *line = b; *line;) {
        size_t n = strcspn(line, "\n");
        char key[160], va[1100], vb[1100];
        if (line[0] == '[') {
            snprintf(section, sizeof(section), "%.*s", (int)(n > 2 ? n - 2 : 0), line + 1);
        } else if (n > 0 && strstr(line, " =")) {
            size_t kl = (size_t)(strstr(line, " =") - line);
            snprintf(key, sizeof(key), "%s.%.*s", section, (int)kl, line);
            print_lookup(a, key, va, sizeof(va));
            print_lookup(b, key, vb, sizeof(vb));
            int secret = strcmp(va, "***") == 0 || strcmp(vb, "***") == 0;
            int diff = strcmp(va, vb) != 0;
            if (!diff && secret) {
                const char *sa = NULL, *sb = NULL;
                if (strcmp(key, "auth.secret_key") == 0) {
                    sa = old->secret_key;
                    sb = nw->secret_key;
                } else if (strcmp(key, "auth.previous_secret_key") == 0) {
                    sa = old->previous_secret_key;
                    sb = nw->previous_secret_key;
                } else if (strcmp(key, "auth.api_key") == 0) {
                    sa = old->api_key;
                    sb = nw->api_key;
                } else if (strcmp(key, "server.monitor_token") == 0) {
                    sa = old->monitor_token;
                    sb = nw->monitor_token;
                }
                diff = secret_changed(sa, sb);
            }
            if (diff && is_reloadable(key)) {
                changed++;
                if (secret)
                    arq_log(ARQ_LOG_INFO, "reload_changed", "key", key, "value", "(secret)", NULL);
                else
                    arq_log(ARQ_LOG_INFO, "reload_changed", "key", key, "from", va, "to", vb, NULL);
            } else if (diff) {
                restart++;
                arq_log(ARQ_LOG_WARN, "reload_needs_restart", "key", key, "reason",
                        "this setting changes only with a restart; the old value stays", NULL);
            }
        }
        line += n + (line[n] == '\n');
    }
    free(a);
    free(b);
    *ret_restart = restart;
    return changed;
}

/* The reloadable fields of cfg into *ao (strings borrowed from cfg). */
static void ao_reloadable(api_options_t *ao, const arq_config_t *cfg)
{
    ao->secret_key = cfg->secret_key;
    ao->previous_secret_key = cfg->previous_secret_key;
    ao->anonymous = (int)cfg->anonymous;
    ao->api_key = cfg->api_key;
    ao->api_open = (int)cfg->api_open;
    ao->origins = cfg->origins;
    ao->n_origins = cfg->n_origins;
    ao->trusted_proxies = cfg->trusted_proxies;
    ao->n_trusted_proxies = cfg->n_trusted_proxies;
    ao->monitor_allow = cfg->monitor_allow;
    ao->n_monitor_allow = cfg->n_monitor_allow;
    ao->monitor_token = cfg->monitor_token;
    ao->expiry_grace_s = cfg->expiry_grace_s;
    uint32_t max_connections = cfg->max_connections;
    fit_fd_limit(&max_connections);
    ao->max_connections = max_connections;
    ao->handshake_timeout_ms = cfg->handshake_timeout_ms;
    ao->max_header_bytes = cfg->max_header_bytes;
    ao->ping_interval_ms = cfg->ping_interval_ms;
    ao->pong_timeout_ms = cfg->pong_timeout_ms;
    ao->max_message_bytes = cfg->max_message_bytes;
    ao->max_frame_bytes = cfg->max_frame_bytes;
    ao->max_inflight = cfg->max_inflight;
    ao->max_output_bytes = cfg->max_output_bytes;
}

static void reload(struct app *app)
{
    (void)sd_notify(0, "RELOADING=1");
    arq_log(ARQ_LOG_INFO, "reloading", NULL);
    arq_config_t *nc = malloc(sizeof(*nc));
    char err[512] = "out of memory";
    int pc = 0, mo = 0;
    api_options_t ao = app->ao;
    if (!nc || config_load(app->argc, app->argv, 0, nc, &pc, &mo, err, sizeof(err)) != LOAD_OK) {
        free(nc);
        arq_log(ARQ_LOG_ERROR, "reload_failed", "reason", err, "effect",
                "the running configuration stays", NULL);
        goto done;
    }
    if (auth_policy_check(nc, err, sizeof(err)) != 0) {
        arq_log(ARQ_LOG_ERROR, "reload_failed", "reason", err, "effect",
                "the running configuration stays", NULL);
        arq_config_free(nc);
        free(nc);
        goto done;
    }
    ao_reloadable(&ao, nc);
    if (api_server_reload(app->srv, &ao, err, sizeof(err)) != 0) {
        arq_log(ARQ_LOG_ERROR, "reload_failed", "reason", err, "effect",
                "the running configuration stays", NULL);
        arq_config_free(nc);
        free(nc);
        goto done;
    }
    int restart = 0;
    int changed = config_diff(app_cfg(app), nc, &restart);
    const arq_config_t *old = app_cfg(app);
    arq_log_setup(nc->log_level, strcmp(old->log_format, "json") == 0);
    if (nc->anonymous && !old->anonymous)
        arq_log(ARQ_LOG_WARN, "anonymous_access", "reason",
                "auth.anonymous = true: clients without a token get full access", NULL);
    brk_set_limits(app->brk, nc->max_message_bytes, nc->max_subscriptions, nc->max_inflight,
                   nc->max_output_bytes);
    app->ao = ao;
    if (app->live) {
        arq_config_free(app->live);
        free(app->live);
    }
    app->live = nc;
    char n1[16], n2[16];
    snprintf(n1, sizeof(n1), "%d", changed);
    snprintf(n2, sizeof(n2), "%d", restart);
    arq_log(ARQ_LOG_INFO, "reloaded", "changed", n1, "need_restart", n2, NULL);
done:
    (void)sd_notify(0, "READY=1");
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
    if (sig == SIGHUP) {
        reload(app);
        return;
    }
    if (app->grace) {
        arq_log(ARQ_LOG_WARN, "shutdown_forced", "signal", sig == SIGINT ? "INT" : "TERM", NULL);
        _exit(1); /* second signal: at once (the WAL is safe anyway) */
    }
    arq_log(ARQ_LOG_INFO, "shutdown", "signal", sig == SIGINT ? "INT" : "TERM", NULL);
    begin_shutdown(app);
}

static void begin_shutdown(struct app *app)
{
    (void)sd_notify(0, "STOPPING=1\nSTATUS=draining: closing connections with 1001");
    api_server_shutdown(app->srv);
    /* Wait (up to 2 s) for the close handshakes to flush. */
    app->grace = event_new(app->base, -1, EV_PERSIST, grace_cb, app);
    struct timeval tv = {0, 50000};
    event_add(app->grace, &tv);
}

/*
 * Socket activation (sd_listen_fds(3)): systemd - or a supervisor doing
 * the same - holds the listening socket across restarts, so a connection
 * attempt during an upgrade waits in its backlog instead of being refused.
 * Returns the fd, -1 when there is none, -2 (err set) when it is unusable.
 */
static int inherited_listener(char *err, size_t errlen)
{
    int n = sd_listen_fds(1);
    if (n == 0)
        return -1;
    if (n < 0) {
        snprintf(err, errlen, "socket activation: %s", strerror(-n));
        return -2;
    }
    if (n > 1) {
        snprintf(err, errlen, "socket activation passed %d sockets; arqd takes exactly one", n);
        return -2;
    }
    if (sd_is_socket(SD_LISTEN_FDS_START, AF_UNSPEC, SOCK_STREAM, 1) <= 0) {
        snprintf(err, errlen, "socket activation: fd %d is not a listening stream socket",
                 SD_LISTEN_FDS_START);
        return -2;
    }
    return SD_LISTEN_FDS_START;
}

int main(int argc, char **argv)
{
    arq_config_t cfg;
    char err[512];
    int print_config = 0, migrate_only = 0;
    struct timespec t0;
    clock_gettime(CLOCK_REALTIME, &t0);
    int lrc = config_load(argc, argv, 1, &cfg, &print_config, &migrate_only, err, sizeof(err));
    if (lrc == LOAD_DONE)
        return 0;
    if (lrc == LOAD_ERROR) {
        if (strcmp(err, "bad command line") != 0)
            fprintf(stderr, "arqd: %s\n", err);
        return 2;
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
    bool replicated = strcmp(cfg.ack, "replicated") == 0;
    if (!have_db && replicated) {
        arq_log(ARQ_LOG_ERROR, "refusing_to_start", "reason",
                "wal.ack = replicated needs DATABASE_URL: acknowledgements wait for MySQL", NULL);
        arq_config_free(&cfg);
        return 2;
    }
    bool ha = strcmp(cfg.ha_role, "single") != 0;
    if (ha && !have_db) {
        arq_log(ARQ_LOG_ERROR, "refusing_to_start", "reason",
                "ha.role = active | standby needs DATABASE_URL: the lease lives in MySQL", NULL);
        arq_config_free(&cfg);
        return 2;
    }
    if (ha && !replicated)
        arq_log(ARQ_LOG_WARN, "ha_ack_local", "reason",
                "ha.role with wal.ack = local: a failover loses the acknowledged publishes the "
                "drain had not copied yet, and subscribers may have seen them; use wal.ack = "
                "replicated (docs/ha.md)",
                NULL);
    if (auth_policy_check(&cfg, err, sizeof(err)) != 0) {
        arq_log(ARQ_LOG_ERROR, "refusing_to_start", "reason", err, NULL);
        sync_url_free(&db_url);
        arq_config_free(&cfg);
        return 2;
    }
    /* One owner per data directory, before anything else touches it. */
    int lock_fd = lock_data_dir(cfg.data_dir, err, sizeof(err));
    if (lock_fd < 0) {
        arq_log(ARQ_LOG_ERROR, "refusing_to_start", "dir", cfg.data_dir, "reason", err, NULL);
        fprintf(stderr, "arqd: %s\n", err);
        sync_url_free(&db_url);
        arq_config_free(&cfg);
        return 1;
    }
    int listen_fd = inherited_listener(err, sizeof(err));
    if (listen_fd == -2) {
        arq_log(ARQ_LOG_ERROR, "refusing_to_start", "reason", err, NULL);
        sync_url_free(&db_url);
        arq_config_free(&cfg);
        return 1;
    }
    (void)sd_notify(0, "STATUS=opening the WAL");
    enum sync_state sync_at_start = SYNC_STATE_CONNECTING;
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
        if (mrc) {
            arq_log(ARQ_LOG_WARN, "sync_degraded", "reason", err, NULL);
            sync_at_start = SYNC_STATE_DEGRADED; /* logged: the watcher says only the change */
        } else if (applied) {
            char n[16];
            snprintf(n, sizeof(n), "%d", applied);
            arq_log(ARQ_LOG_INFO, "migrations_applied", "count", n, NULL);
        }
    }

    /* High availability: serve only while holding the lease. */
    uint64_t lease_gen = 0;
    int own_listen_fd = -1;
    signal(SIGPIPE, SIG_IGN);
    evthread_use_pthreads(); /* before any event_base: threads wake loops */
    if (ha) {
        const char *cool = getenv("ARQ_HA_COOLDOWN_MS"); /* set by a handover's re-exec */
        uint32_t cooldown = cool ? (uint32_t)strtoul(cool, NULL, 10) : 0;
        unsetenv("ARQ_HA_COOLDOWN_MS");
        char self[4096];
        ssize_t sl = readlink("/proc/self/exe", self, sizeof(self) - 1);
        self[sl > 0 ? sl : 0] = '\0';
        arq_standby_opts_t sbo = {.cfg = &cfg,
                                  .url = &db_url,
                                  .database_url = cfg.database_url,
                                  .self_path = sl > 0 ? self : argv[0],
                                  .listen_fd = listen_fd,
                                  .cooldown_ms = cooldown};
        int fd = -1;
        int src = arq_standby_run(&sbo, &lease_gen, &fd);
        if (src != 0) {
            sync_url_free(&db_url);
            arq_config_free(&cfg);
            close(lock_fd);
            return src == 1 ? 0 : 1;
        }
        if (listen_fd < 0)
            own_listen_fd = fd;
    }

    if (cfg.anonymous)
        arq_log(ARQ_LOG_WARN, "anonymous_access", "host", cfg.host, "reason",
                "auth.anonymous = true: any client that reaches this listener may publish and "
                "subscribe, with no token",
                NULL);
    if (!cfg.api_key && cfg.api_open)
        arq_log(ARQ_LOG_WARN, "server_api_open", "reason",
                "auth.api_open = true and no api key: anyone who reaches the listener may "
                "POST /api/publish",
                NULL);
    int unsafe = strcmp(cfg.sync, "none") == 0;
    if (unsafe)
        arq_log(ARQ_LOG_WARN, "wal_sync_none_unsafe", "reason",
                "sync=none: no fsync, a machine crash can lose acknowledged messages", NULL);
    if (!cfg.database_url)
        arq_log(ARQ_LOG_WARN, "wal_only", "reason", "DATABASE_URL not set: MySQL sync disabled",
                NULL);

    /* Every publish allocates and frees a few small buffers; with glibc's
     * default thresholds the heap top is trimmed and faulted back in over
     * and over (measured: ~7% of arqd's time in page faults at 50x16). */
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
    mallopt(M_MMAP_THRESHOLD, 4 << 20);
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
    struct app app = {.base = base,
                      .wal = wal,
                      .argc = argc,
                      .argv = argv,
                      .boot = &cfg,
                      .start_time = (double)t0.tv_sec + (double)t0.tv_nsec / 1e9,
                      .sync_logged = sync_at_start};
    brk_options_t bo = {
        .ack = replicated ? BRK_ACK_REPLICATED : BRK_ACK_LOCAL,
        .ack_timeout_ms = cfg.ack_timeout_ms,
        .repl_kick = repl_kick,
        .repl_kick_arg = &app,
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
        .handshake_timeout_ms = cfg.handshake_timeout_ms,
        .max_header_bytes = cfg.max_header_bytes,
        .ping_interval_ms = cfg.ping_interval_ms,
        .pong_timeout_ms = cfg.pong_timeout_ms,
        .max_frame_bytes = cfg.max_frame_bytes,
        .max_fragments = cfg.max_fragments,
        .max_conns_per_addr = cfg.max_conns_per_addr,
        .conn_rate_per_s = cfg.conn_rate,
        .conn_burst = cfg.conn_burst,
        .hello_timeout_ms = cfg.hello_timeout_ms,
        .hosts = cfg.hosts,
        .n_hosts = cfg.n_hosts,
        .max_message_bytes = cfg.max_message_bytes,
        .max_inflight = cfg.max_inflight,
        .session_ttl_s = cfg.session_ttl_s,
        .max_output_bytes = cfg.max_output_bytes,
        .version = "arq/" ARQ_VERSION,
        .use_listen_fd = listen_fd >= 0 || own_listen_fd >= 0,
        .listen_fd = listen_fd >= 0 ? listen_fd : own_listen_fd,
    };
    ao_reloadable(&ao, &cfg);
    ao.metrics_extra = metrics_arqd;
    ao.extra_arg = &app;
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
                             .cursor_ttl_s = cfg.session_ttl_s,
                             .on_progress = sync_progress,
                             .progress_arg = &app,
                             .lease_ms = ha ? cfg.lease_ms : 0,
                             .lease_owner = cfg.ha_node,
                             .lease_generation = lease_gen};
        /* before the thread runs: its first report must find it */
        app.repl_ev = event_new(base, -1, 0, repl_ev_cb, &app);
        app.brk = brk;
        if (!app.repl_ev || sync_start(wal, &so, &sync) != 0) {
            arq_log(ARQ_LOG_ERROR, "startup_failed", "reason", "sync thread", NULL);
            return 1;
        }
        app.sync = sync;
        brk_replicated(brk, 0, 0); /* there is a MySQL; not yet reached */
        ao.health_sync = health_arqd;
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
    app.srv = srv;
    app.brk = brk;
    app.ao = ao;
    char port[16], host[INET6_ADDRSTRLEN] = "";
    snprintf(port, sizeof(port), "%u", api_server_port(srv));
    if (listen_fd >= 0) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        if (getsockname(listen_fd, (struct sockaddr *)&ss, &sl) == 0)
            inet_ntop(ss.ss_family,
                      ss.ss_family == AF_INET ? (void *)&((struct sockaddr_in *)&ss)->sin_addr
                                              : (void *)&((struct sockaddr_in6 *)&ss)->sin6_addr,
                      host, sizeof(host));
        arq_log(ARQ_LOG_INFO, "socket_activated", "fd", "3", "host", host, "port", port, NULL);
    } else {
        snprintf(host, sizeof(host), "%s", cfg.host);
    }
    struct event *sigterm = evsignal_new(base, SIGTERM, signal_cb, &app);
    struct event *sigint = evsignal_new(base, SIGINT, signal_cb, &app);
    struct event *sighup = evsignal_new(base, SIGHUP, signal_cb, &app);
    event_add(sigterm, NULL);
    event_add(sigint, NULL);
    event_add(sighup, NULL);
    struct event *house = event_new(base, -1, EV_PERSIST, housekeeping_cb, &app);
    struct timeval one_s = {1, 0};
    if (house)
        event_add(house, &one_s);
    uint64_t wd_usec = 0;
    struct event *watchdog = NULL;
    if (sd_watchdog_enabled(0, &wd_usec) > 0 && wd_usec > 0) {
        watchdog = event_new(base, -1, EV_PERSIST, watchdog_cb, &app);
        struct timeval wtv = {(time_t)(wd_usec / 2 / 1000000),
                              (suseconds_t)(wd_usec / 2 % 1000000)};
        if (watchdog)
            event_add(watchdog, &wtv);
    }
    /* Said once the signal handlers are in place: a supervisor that reads
     * this line and sends SIGTERM at once gets a clean stop. */
    arq_log(ARQ_LOG_INFO, "listening", "host", host, "port", port, "data_dir", cfg.data_dir,
            "version", ARQ_VERSION, NULL);
    /* A plain line for scripts and people: where to connect. */
    printf("arqd listening on ws://%s:%s/ws (health: http://%s:%s/health)\n", host, port, host,
           port);
    fflush(stdout);

    /* READY: the WAL is open and recovered, the listener bound. */
    (void)sd_notifyf(0, "READY=1\nSTATUS=serving on %s:%s\nMAINPID=%ld", host, port,
                     (long)getpid());
    event_base_dispatch(base);

    /* Acked offsets not yet persisted go out now; wal_close then finishes
     * every commit in flight (their callbacks run) before closing. */
    brk_flush(brk);
    if (app.stepping_down == STEP_HANDOFF) {
        /* Switchover: no client is connected any more; everything they
         * were acknowledged goes into MySQL, then the lease is given up. */
        int rr = sync_release(sync, 30000);
        if (rr == SYNC_OK)
            arq_log(ARQ_LOG_INFO, "lease_released", "effect",
                    "MySQL holds every acknowledged message; a standby takes over", NULL);
        else
            arq_log(ARQ_LOG_ERROR, "lease_release_failed", "reason",
                    rr == SYNC_EBUSY ? "the drain did not catch up within 30 s"
                                     : "the drain failed or the lease was lost",
                    "effect", "the lease expires by itself; a standby then takes over", NULL);
    }
    sync_stop(sync); /* its batch in flight commits or rolls back */
    app.sync = NULL; /* repl_ev may still run (wal_close's completions) */
    sync_url_free(&db_url);
    watch_log(&watch); /* a change the quiet interval held back */
    wal_state_info_t wst;
    wal_state_get(wal, &wst);
    wal_close(wal);
    if (watch.later)
        event_free(watch.later);
    api_server_free(srv);
    brk_free(brk);
    sync_cold_close(cold); /* after the broker: no subscription waits for it any more */
    event_free(sigterm);
    event_free(sigint);
    event_free(sighup);
    if (house)
        event_free(house);
    if (watchdog)
        event_free(watchdog);
    if (app.live) {
        arq_config_free(app.live);
        free(app.live);
    }
    if (app.grace)
        event_free(app.grace);
    if (app.repl_ev)
        event_free(app.repl_ev);
    event_base_free(base);
    uint32_t lease_ms = cfg.lease_ms; /* for the handover below */
    arq_config_free(&cfg);
    if (wst.state == WAL_STATE_FAILED) {
        /* A supervisor must see that this run ended in a fail-stop. */
        arq_log(ARQ_LOG_ERROR, "stopped", "exit", "1", "reason", wst.reason, NULL);
        close(lock_fd);
        return 1;
    }
    close(lock_fd); /* last: the directory is ours until everything is closed */
    if (app.stepping_down) {
        /* Stand by: this node serves again only once it holds the lease
         * again (after a handover, the others get the first chance). */
        if (listen_fd >= 0) {
            /* socket-activated: systemd restarts us (Restart=on-failure) */
            arq_log(ARQ_LOG_INFO, "stopped", "exit", "3", "effect", "restarts as standby", NULL);
            return 3;
        }
        char cool[24];
        snprintf(cool, sizeof(cool), "%u", app.stepping_down == STEP_HANDOFF ? 2 * lease_ms : 0);
        setenv("ARQ_HA_COOLDOWN_MS", cool, 1);
        arq_log(ARQ_LOG_INFO, "standing_by", "effect", "arqd starts again as standby", NULL);
        execv("/proc/self/exe", argv);
        arq_log(ARQ_LOG_ERROR, "reexec_failed", "reason", strerror(errno), NULL);
        return 3;
    }
    arq_log(ARQ_LOG_INFO, "stopped", NULL);
    return 0;
}
