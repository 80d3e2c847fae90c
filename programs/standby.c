/*
 * standby.c - arqd's standby phase (standby.h, docs/ha.md "Standby and
 * takeover").
 *
 * A thread of its own takes the lease when it is free and decides whether
 * the WAL in data_dir may be served as it is: only when MySQL's history was
 * written from it (the lease's previous owner was this node, with this WAL)
 * or MySQL has never had a lease and the WAL is ahead of its watermark.
 * Otherwise it rebuilds the WAL from MySQL with `arq-replay restore`
 * (streamed, memory bounded by a batch) into data_dir/rebuild, renewing the
 * lease meanwhile, and swaps it in; the replaced WAL stays in
 * data_dir/replaced for inspection (one, the latest). The loop meanwhile
 * answers HTTP on the listener with 503 and the phase.
 */
#include "standby.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/listener.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "sync_tools.h"
#include "wal.h"

struct sb {
    const arq_standby_opts_t *o;
    struct event_base *base;
    struct event *done_ev;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool stop;
    /* under mu: for /health */
    const char *phase; /* "waiting", "rebuilding", "opening" */
    uint64_t done, total;
    int result; /* 0 done, -1 failed */
    uint64_t generation;
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void set_phase(struct sb *b, const char *phase)
{
    pthread_mutex_lock(&b->mu);
    b->phase = phase;
    pthread_mutex_unlock(&b->mu);
    (void)phase;
}

/* Sleep ms unless stopped; true if stopped. */
static bool nap(struct sb *b, uint32_t ms)
{
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += (time_t)(ms / 1000);
    dl.tv_nsec += (long)(ms % 1000) * 1000000;
    if (dl.tv_nsec >= 1000000000) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&b->mu);
    while (!b->stop && pthread_cond_timedwait(&b->cond, &b->mu, &dl) != ETIMEDOUT)
        ;
    bool stop = b->stop;
    pthread_mutex_unlock(&b->mu);
    return stop;
}

static bool stopped(struct sb *b)
{
    pthread_mutex_lock(&b->mu);
    bool stop = b->stop;
    pthread_mutex_unlock(&b->mu);
    return stop;
}

/* ---- the WAL files ------------------------------------------------------ */

/* A WAL's own files: data.mdb, lock.mdb, journal, journal.N. */
static bool wal_file(const char *name)
{
    return !strcmp(name, "data.mdb") || !strcmp(name, "lock.mdb") || !strncmp(name, "journal", 7);
}

static void path_of(char *out, size_t cap, const char *dir, const char *name)
{
    if ((size_t)snprintf(out, cap, "%s/%s", dir, name) >= cap)
        out[0] = '\0'; /* config.c bounds data_dir well below */
}

/* Move (to != NULL) or remove dir's WAL files. */
static int wal_files_each(const char *dir, const char *to)
{
    DIR *d = opendir(dir);
    if (!d)
        return errno == ENOENT ? 0 : -1;
    struct dirent *e;
    char from[4096], dst[4096];
    int rc = 0;
    while ((e = readdir(d))) {
        if (!wal_file(e->d_name))
            continue;
        path_of(from, sizeof(from), dir, e->d_name);
        if (to) {
            path_of(dst, sizeof(dst), to, e->d_name);
            if (rename(from, dst) != 0)
                rc = -1;
        } else {
            (void)unlink(from);
        }
    }
    closedir(d);
    return rc;
}

static void remove_wal_dir(const char *dir)
{
    (void)wal_files_each(dir, NULL);
    (void)rmdir(dir);
}

static int fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

/* data_dir's WAL files into data_dir/replaced, rebuild's into data_dir. */
static int swap_in(const char *dir, const char *rebuilt, char *err, size_t errlen)
{
    char old[4096];
    path_of(old, sizeof(old), dir, "replaced");
    remove_wal_dir(old);
    if (mkdir(old, 0700) != 0 && errno != EEXIST) {
        snprintf(err, errlen, "mkdir '%s': %s", old, strerror(errno));
        return -1;
    }
    if (wal_files_each(dir, old) != 0) {
        snprintf(err, errlen, "moving the WAL in '%s' aside: %s", dir, strerror(errno));
        return -1;
    }
    if (wal_files_each(rebuilt, dir) != 0) {
        snprintf(err, errlen, "moving the rebuilt WAL in: %s", strerror(errno));
        return -1;
    }
    remove_wal_dir(rebuilt);
    if (fsync_dir(dir) != 0) {
        snprintf(err, errlen, "fsync '%s': %s", dir, strerror(errno));
        return -1;
    }
    return 0;
}

/* ---- deciding ----------------------------------------------------------- */

/* The WAL in data_dir: 1 with its id and next sequence, 0 if there is none
 * (or it cannot be opened: it is rebuilt then, and moved aside). */
static int local_wal(const char *dir, int64_t *id, uint64_t *acked_next)
{
    char p[4096], err[256];
    path_of(p, sizeof(p), dir, "data.mdb");
    if (access(p, F_OK) != 0)
        return 0;
    wal_options_t wo = {.dir = dir};
    wal_t *w;
    if (wal_open(&wo, NULL, &w, err, sizeof(err)) != 0) {
        arq_log(ARQ_LOG_WARN, "standby_wal_unreadable", "dir", dir, "reason", err, "effect",
                "it is rebuilt from MySQL", NULL);
        return 0;
    }
    wal_stats_t st;
    int rc = wal_stats_get(w, &st);
    wal_close(w);
    if (rc)
        return 0;
    *id = st.created_us;
    *acked_next = st.acked_next_seq;
    return 1;
}

/* ---- the rebuild -------------------------------------------------------- */

static void find_replay(const char *self, char *out, size_t cap)
{
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", self);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = '\0';
        if ((size_t)snprintf(out, cap, "%s/arq-replay", dir) < cap && access(out, X_OK) == 0)
            return;
        /* installed: /usr/sbin/arqd, /usr/bin/arq-replay */
        if ((size_t)snprintf(out, cap, "%s/../bin/arq-replay", dir) < cap && access(out, X_OK) == 0)
            return;
    }
    snprintf(out, cap, "arq-replay"); /* $PATH */
}

/* "restoring [###   ]  45% 4500/10000 1234/s": the last such report in buf. */
static void parse_progress(struct sb *b, const char *buf)
{
    const char *p = NULL, *q = buf;
    while ((q = strstr(q, "restoring")))
        p = q++;
    if (!p)
        return;
    unsigned long long done = 0, total = 0;
    const char *pct = strchr(p, '%');
    if (pct && sscanf(pct + 1, " %llu/%llu", &done, &total) == 2) {
        pthread_mutex_lock(&b->mu);
        b->done = done;
        b->total = total;
        pthread_mutex_unlock(&b->mu);
    }
}

static int rebuild(struct sb *b, uint64_t generation, sync_lease_t *lease)
{
    const arq_config_t *cfg = b->o->cfg;
    char tmp[4096], tool[4096], tail[32], err[512];
    path_of(tmp, sizeof(tmp), cfg->data_dir, "rebuild");
    remove_wal_dir(tmp); /* an earlier attempt's */
    find_replay(b->o->self_path, tool, sizeof(tool));
    snprintf(tail, sizeof(tail), "%u", cfg->rebuild_tail);
    char *argv[] = {tool, "restore", "--data-dir", tmp, "--progress", "--tail", tail, NULL};
    if (!cfg->rebuild_tail)
        argv[5] = NULL;
    int pe[2];
    if (pipe2(pe, O_CLOEXEC) != 0)
        return -1;
    set_phase(b, "rebuilding");
    arq_log(ARQ_LOG_INFO, "rebuild_started", "dir", cfg->data_dir, "tool", tool, "tail", tail,
            NULL);
    int64_t t0 = mono_ms();
    pid_t pid = fork();
    if (pid < 0) {
        close(pe[0]);
        close(pe[1]);
        return -1;
    }
    if (pid == 0) {
        dup2(pe[1], STDERR_FILENO); /* progress */
        dup2(pe[1], STDOUT_FILENO); /* the report */
        setenv("DATABASE_URL", b->o->database_url, 1);
        if (strchr(tool, '/'))
            execv(tool, argv);
        else
            execvp(tool, argv);
        _exit(127);
    }
    close(pe[1]);
    char buf[8192];
    size_t len = 0;
    char last[512] = "";
    int64_t next_renew = mono_ms() + cfg->lease_ms / 3;
    int status = 0, lease_rc = 0;
    bool open_pipe = true;
    for (;;) {
        if (open_pipe) {
            struct pollfd pfd = {.fd = pe[0], .events = POLLIN};
            if (poll(&pfd, 1, 100) > 0) {
                ssize_t n = read(pe[0], buf + len, sizeof(buf) - 1 - len);
                if (n <= 0) {
                    open_pipe = false;
                } else {
                    len += (size_t)n;
                    buf[len] = '\0';
                    parse_progress(b, buf);
                    /* keep the last line for the log (an error's text) */
                    char *nl = strrchr(buf, '\n');
                    if (nl && nl != buf) {
                        *nl = '\0';
                        char *start = strrchr(buf, '\n');
                        char *cr = strrchr(start ? start : buf, '\r');
                        const char *l = cr ? cr + 1 : start ? start + 1 : buf;
                        size_t ll = strlen(l) < sizeof(last) - 1 ? strlen(l) : sizeof(last) - 1;
                        memcpy(last, l, ll);
                        last[ll] = '\0';
                        *nl = '\n';
                    }
                    if (len > sizeof(buf) / 2) { /* keep the tail */
                        memmove(buf, buf + len - 1024, 1024);
                        len = 1024;
                        buf[len] = '\0';
                    }
                }
            }
        } else {
            struct timespec ts = {0, 100 * 1000000};
            nanosleep(&ts, NULL);
        }
        if (mono_ms() >= next_renew) {
            lease_rc = sync_lease_renew(lease, generation, err, sizeof(err));
            if (lease_rc == SYNC_EFENCED) {
                arq_log(ARQ_LOG_ERROR, "lease_lost", "reason", err, "effect",
                        "the rebuild is abandoned", NULL);
                kill(pid, SIGTERM);
            } else if (lease_rc) {
                arq_log(ARQ_LOG_WARN, "lease_renew_failed", "reason", err, NULL);
            }
            next_renew = mono_ms() + cfg->lease_ms / 3;
        }
        if (stopped(b))
            kill(pid, SIGTERM);
        pid_t w = waitpid(pid, &status, WNOHANG);
        if (w == pid)
            break;
    }
    close(pe[0]);
    char path[4096];
    path_of(path, sizeof(path), tmp, "data.mdb");
    bool built = WIFEXITED(status) && WEXITSTATUS(status) <= 1 && access(path, F_OK) == 0;
    if (!built || stopped(b) || lease_rc == SYNC_EFENCED) {
        char code[16];
        snprintf(code, sizeof(code), "%d", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        arq_log(ARQ_LOG_ERROR, "rebuild_failed", "exit", code, "reason", last, NULL);
        remove_wal_dir(tmp);
        return -1;
    }
    if (swap_in(cfg->data_dir, tmp, err, sizeof(err)) != 0) {
        arq_log(ARQ_LOG_ERROR, "rebuild_failed", "reason", err, NULL);
        return -1;
    }
    pthread_mutex_lock(&b->mu);
    uint64_t records = b->total ? b->total : b->done;
    pthread_mutex_unlock(&b->mu);
    /* "restored 3 streams, 1234 records into '...'" */
    const char *sum = strstr(buf, "streams, ");
    unsigned long long n = 0;
    if (sum && sscanf(sum + 9, "%llu records", &n) == 1)
        records = n;
    double secs = (double)(mono_ms() - t0) / 1000.0;
    char recs[24], sec_s[24], rate[24];
    snprintf(recs, sizeof(recs), "%" PRIu64, records);
    snprintf(sec_s, sizeof(sec_s), "%.3f", secs);
    snprintf(rate, sizeof(rate), "%.0f", secs > 0 ? (double)records / secs : 0);
    arq_log(WEXITSTATUS(status) == 0 ? ARQ_LOG_INFO : ARQ_LOG_WARN, "rebuild_done", "records", recs,
            "seconds", sec_s, "records_per_s", rate, "report", last, "replaced",
            "the previous WAL is in <data_dir>/replaced", NULL);
    return 0;
}

/* ---- the thread --------------------------------------------------------- */

static int take_over(struct sb *b, sync_lease_t *lease)
{
    const arq_config_t *cfg = b->o->cfg;
    char err[512];
    sync_lease_row_t before;
    uint64_t gen = 0;
    char last_holder[300] = "";
    unsigned failures = 0;
    if (b->o->cooldown_ms && nap(b, b->o->cooldown_ms))
        return -1;
    for (;;) {
        int rc = sync_lease_try(lease, &before, &gen, err, sizeof(err));
        if (rc == SYNC_OK)
            break;
        if (rc == SYNC_EBUSY) {
            char holder[300];
            snprintf(holder, sizeof(holder), "%s#%" PRIu64, before.owner, before.generation);
            if (strcmp(holder, last_holder)) {
                arq_log(ARQ_LOG_INFO, "standby", "lease_owner", before.owner, "reason", err, NULL);
                snprintf(last_holder, sizeof(last_holder), "%s", holder);
            }
            failures = 0;
        } else if (failures++ % 20 == 0) {
            arq_log(ARQ_LOG_WARN, "standby_mysql_error", "reason", err, NULL);
        }
        uint32_t wait = cfg->lease_ms / 4 < 100 ? 100 : cfg->lease_ms / 4;
        if (nap(b, wait))
            return -1;
    }
    char g[24], pg[24];
    snprintf(g, sizeof(g), "%" PRIu64, gen);
    snprintf(pg, sizeof(pg), "%" PRIu64, before.generation);
    arq_log(ARQ_LOG_INFO, "lease_acquired", "generation", g, "previous_owner",
            before.owner[0] ? before.owner : "(none)", "previous_generation", pg, NULL);
    pthread_mutex_lock(&b->mu);
    b->generation = gen;
    pthread_mutex_unlock(&b->mu);

    int64_t wal_id = 0;
    uint64_t acked_next = 0, wm = 0;
    int have = local_wal(cfg->data_dir, &wal_id, &acked_next);
    sync_db_t *d = NULL;
    int rc = sync_db_open(b->o->url, &d, err, sizeof(err));
    if (!rc)
        rc = sync_db_watermark(d, &wm, NULL, err, sizeof(err));
    sync_db_close(d);
    if (rc) {
        arq_log(ARQ_LOG_ERROR, "takeover_failed", "reason", err, NULL);
        return -1;
    }
    bool ours = strcmp(before.owner, cfg->ha_node) == 0 && before.wal_id == wal_id;
    bool never_leased = before.generation == 0 && before.wal_id == 0;
    const char *why;
    bool keep;
    if (!have && wm == 0) {
        keep = true;
        why = "MySQL holds nothing yet: a new WAL";
    } else if (have && wm < acked_next && (ours || never_leased)) {
        keep = true;
        why = ours ? "this node's WAL wrote MySQL's history (a restart)"
                   : "MySQL had no lease before; the WAL is ahead of its watermark";
    } else {
        keep = false;
        why = have ? "MySQL's history was written by another node (or another WAL)"
                   : "no WAL in the data directory";
    }
    arq_log(ARQ_LOG_INFO, "takeover", "generation", g, "wal", keep ? "kept" : "rebuilt", "reason",
            why, NULL);
    if (!keep && rebuild(b, gen, lease) != 0)
        return -1;
    set_phase(b, "opening");
    /* the drain renews from here on: one more now spans its start */
    (void)sync_lease_renew(lease, gen, err, sizeof(err));
    return 0;
}

static void *lease_main(void *arg)
{
    struct sb *b = arg;
    sync_lease_t *lease = NULL;
    int rc = -1;
    if (sync_lease_open(b->o->url, b->o->cfg->ha_node, b->o->cfg->lease_ms, &lease) == SYNC_OK)
        rc = take_over(b, lease);
    sync_lease_close(lease);
    pthread_mutex_lock(&b->mu);
    b->result = rc;
    pthread_mutex_unlock(&b->mu);
    event_active(b->done_ev, EV_TIMEOUT, 0);
    return NULL;
}

/* ---- the loop ------------------------------------------------------------ */

static void http_cb(struct evhttp_request *req, void *arg)
{
    struct sb *b = arg;
    struct evbuffer *out = evbuffer_new();
    if (!out)
        return;
    const char *uri = evhttp_request_get_uri(req);
    pthread_mutex_lock(&b->mu);
    if (uri && strncmp(uri, "/health", 7) == 0)
        evbuffer_add_printf(out,
                            "{\"status\":\"standby\",\"role\":\"standby\",\"phase\":\"%s\","
                            "\"rebuild\":{\"records\":%" PRIu64 ",\"total\":%" PRIu64 "}}\n",
                            b->phase, b->done, b->total);
    else
        evbuffer_add_printf(out, "{\"error\":\"standby: this node does not hold the lease; "
                                 "connect to the active node\"}\n");
    pthread_mutex_unlock(&b->mu);
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Content-Type", "application/json");
    evhttp_add_header(h, "Retry-After", "1");
    evhttp_add_header(h, "Connection", "close");
    evhttp_send_reply(req, 503, "Service Unavailable", out);
    evbuffer_free(out);
}

static void done_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    event_base_loopbreak(((struct sb *)arg)->base);
}

static void stop_cb(evutil_socket_t sig, short what, void *arg)
{
    (void)sig;
    (void)what;
    struct sb *b = arg;
    pthread_mutex_lock(&b->mu);
    b->stop = true;
    pthread_cond_broadcast(&b->cond);
    pthread_mutex_unlock(&b->mu);
    arq_log(ARQ_LOG_INFO, "shutdown", "phase", "standby", NULL);
}

/* systemd's watchdog (WatchdogSec=) is fed while standing by too. */
static void watchdog_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    (void)sd_notify(0, "WATCHDOG=1");
}

static int bind_listener(const arq_config_t *cfg)
{
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(cfg->port)};
    if (inet_pton(AF_INET, cfg->host, &sin.sin_addr) != 1)
        return -1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    int on = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) != 0 ||
        bind(fd, (struct sockaddr *)&sin, sizeof(sin)) != 0 || listen(fd, 4096) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

int arq_standby_run(const arq_standby_opts_t *o, uint64_t *generation, int *listen_fd)
{
    struct sb b = {.o = o, .phase = "waiting"};
    int fd = o->listen_fd >= 0 ? o->listen_fd : bind_listener(o->cfg);
    if (fd < 0) {
        char port[16];
        snprintf(port, sizeof(port), "%u", o->cfg->port);
        arq_log(ARQ_LOG_ERROR, "listen_failed", "host", o->cfg->host, "port", port, "reason",
                strerror(errno), NULL);
        return -1;
    }
    b.base = event_base_new();
    struct evhttp *http = b.base ? evhttp_new(b.base) : NULL;
    struct evconnlistener *lis =
        http ? evconnlistener_new(b.base, NULL, NULL, LEV_OPT_REUSEABLE, -1, fd) : NULL;
    b.done_ev = b.base ? event_new(b.base, -1, 0, done_cb, &b) : NULL;
    struct event *sigterm = b.base ? evsignal_new(b.base, SIGTERM, stop_cb, &b) : NULL;
    struct event *sigint = b.base ? evsignal_new(b.base, SIGINT, stop_cb, &b) : NULL;
    struct event *watchdog = NULL;
    int rc = -1;
    if (!lis || !b.done_ev || !sigterm || !sigint || !evhttp_bind_listener(http, lis)) {
        arq_log(ARQ_LOG_ERROR, "startup_failed", "reason", "standby listener", NULL);
        goto out;
    }
    evhttp_set_gencb(http, http_cb, &b);
    evhttp_set_timeout(http, 5);
    event_add(sigterm, NULL);
    event_add(sigint, NULL);
    uint64_t wd_usec = 0;
    if (sd_watchdog_enabled(0, &wd_usec) > 0 && wd_usec > 0) {
        watchdog = event_new(b.base, -1, EV_PERSIST, watchdog_cb, NULL);
        struct timeval wtv = {(time_t)(wd_usec / 2 / 1000000),
                              (suseconds_t)(wd_usec / 2 % 1000000)};
        if (watchdog)
            event_add(watchdog, &wtv);
    }
    /* A standby is up (Type=notify must not time out waiting for a lease
     * that another node holds); READY comes again once it serves. */
    (void)sd_notify(0, "READY=1\nSTATUS=standby: waiting for the lease");
    pthread_mutex_init(&b.mu, NULL);
    pthread_cond_init(&b.cond, NULL);
    if (pthread_create(&b.thread, NULL, lease_main, &b) != 0)
        goto out;
    char port[16];
    snprintf(port, sizeof(port), "%u", o->cfg->port);
    arq_log(ARQ_LOG_INFO, "standby_listening", "host", o->cfg->host, "port", port, "node",
            o->cfg->ha_node, NULL);
    printf("arqd standby on %s:%s (node %s): waiting for the lease\n", o->cfg->host, port,
           o->cfg->ha_node);
    fflush(stdout);
    event_base_dispatch(b.base);
    pthread_join(b.thread, NULL);
    rc = b.stop ? 1 : b.result;
    *generation = b.generation;
    pthread_mutex_destroy(&b.mu);
    pthread_cond_destroy(&b.cond);
out:
    if (http)
        evhttp_free(http); /* frees lis; fd stays open (no LEV_OPT_CLOSE_ON_FREE) */
    else if (lis)
        evconnlistener_free(lis);
    if (sigterm)
        event_free(sigterm);
    if (sigint)
        event_free(sigint);
    if (watchdog)
        event_free(watchdog);
    if (b.done_ev)
        event_free(b.done_ev);
    if (b.base)
        event_base_free(b.base);
    if (rc == 0) {
        *listen_fd = fd;
    } else if (o->listen_fd < 0) {
        close(fd);
    }
    return rc;
}
