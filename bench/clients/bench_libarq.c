/*
 * arq-client-bench (bench/clients/bench_libarq.c) - libarq (client/arq.h) as
 * a C application uses it, timed: the libarq row of bench/clients.sh
 * (docs/benchmarks.md, "Client libraries"). The options, the modes and the
 * JSON line are those of bench_py.py and bench_js.mjs (bench_py.py's header
 * describes them in full):
 *
 *   arq-client-bench --url URL --prefix PREFIX --mode publish|delivery|reconnect
 *                    [--count N=20000] [--size BYTES=100] [--window W=10000]
 *                    [--warmup M=1000] [--cuts K=20] [--control HOST:PORT]
 *                    [--server-pid PID] [--timeout SEC=120]
 *
 * One libevent loop that this program runs (libarq never does). The steps of
 * a mode are written one after the other: each starts requests and then runs
 * the loop until their callbacks say they are done (run_until()), as a
 * program with a sequential start-up would. The message callback acks every
 * message with arq_ack(), as libarq's contract asks and the `arq` CLI does
 * (libarq has no auto-ack). The reconnect mode talks to the cut proxy's
 * control port with a blocking socket between two runs of the loop: the time
 * is taken from the proxy's reading of CLOCK_MONOTONIC, so that wait is not
 * billed to anyone.
 *
 * Exit: 0; 1 on a failure (message on stderr); 2 usage.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <event2/event.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "arq.h"

#ifndef ARQ_BENCH_VERSION
#define ARQ_BENCH_VERSION "?"
#endif

enum mode { MODE_PUBLISH, MODE_DELIVERY, MODE_RECONNECT };

struct opts {
    const char *url, *prefix, *control;
    enum mode mode;
    uint64_t count, window, warmup, cuts;
    size_t size;
    long server_pid; /* 0: none */
    double timeout_s;
};

/* The whole run: options, the loop, the payload and the first failure. */
struct bench {
    struct opts o;
    struct event_base *base;
    struct event *deadline;
    int timed_out;
    int failed;
    char err[512];
    uint8_t *data;
};

static struct bench B;

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
    if (B.failed)
        return;
    B.failed = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(B.err, sizeof B.err, fmt, ap);
    va_end(ap);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double cpu_self_s(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* arqd's user + system CPU seconds so far; -1 without --server-pid or /proc. */
static double cpu_server_s(void)
{
    if (B.o.server_pid <= 0)
        return -1;
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", B.o.server_pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    unsigned long ut, st;
    /* after "pid (comm)": state ppid pgrp session tty tpgid flags minflt
     * cminflt majflt cmajflt utime stime */
    if (!p || sscanf(p + 1, " %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %lu %lu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* Wall time, this process's CPU and arqd's CPU over a timed part. */
struct timed {
    uint64_t t0;
    double c0, s0;
    double seconds, cpu, server; /* server < 0: unknown */
};

static void timed_start(struct timed *t)
{
    t->t0 = now_ns();
    t->c0 = cpu_self_s();
    t->s0 = cpu_server_s();
}

static void timed_stop(struct timed *t)
{
    t->seconds = (double)(now_ns() - t->t0) / 1e9;
    t->cpu = cpu_self_s() - t->c0;
    double s1 = cpu_server_s();
    t->server = t->s0 < 0 || s1 < 0 ? -1 : (s1 - t->s0) / t->seconds;
}

static void on_deadline(evutil_socket_t fd, short what, void *arg)
{
    B.timed_out = 1;
}

/* Run the loop until *flag is set; 0, or -1 after a failure or the deadline. */
static int run_until(const int *flag)
{
    while (!*flag && !B.failed && !B.timed_out) {
        if (event_base_loop(B.base, EVLOOP_ONCE) < 0) {
            fail("event_base_loop failed");
            break;
        }
    }
    if (B.timed_out)
        fail("not done within %g s", B.o.timeout_s);
    return B.failed ? -1 : 0;
}

static void on_sleep(evutil_socket_t fd, short what, void *arg)
{
    *(int *)arg = 1;
}

/* Let the loop run for ms milliseconds. */
static int run_for_ms(long ms)
{
    int done = 0;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    if (event_base_once(B.base, -1, EV_TIMEOUT, on_sleep, &done, &tv) != 0) {
        fail("event_base_once failed");
        return -1;
    }
    return run_until(&done);
}

/* ---- clients ---- */

struct conn {
    arq_client_t *c;
    int connected, closed;
    uint64_t n_connected;                    /* state events "connected" */
    uint64_t t_connected;                    /* now_ns() at the last one */
    uint64_t t_disconnected, t_reconnecting; /* at the last of those events */
};

static void on_connect(arq_client_t *c, int status, void *arg)
{
    struct conn *k = arg;
    if (status != 0)
        fail("connect to %s: %s (%s)", B.o.url, arq_strerror(status), arq_client_last_error(c));
    else
        k->connected = 1;
}

static void on_state(arq_client_t *c, arq_state_t old_state, arq_state_t new_state, int status,
                     const char *reason, void *arg)
{
    struct conn *k = arg;
    if (new_state == ARQ_STATE_CONNECTED) {
        k->t_connected = now_ns();
        k->n_connected++;
    } else if (new_state == ARQ_STATE_DISCONNECTED) {
        k->t_disconnected = now_ns();
    } else if (new_state == ARQ_STATE_RECONNECTING) {
        k->t_reconnecting = now_ns();
    } else if (new_state == ARQ_STATE_FAILED) {
        fail("client failed: %s (%s)", arq_strerror(status), reason);
    }
}

static void on_error(arq_client_t *c, int status, const char *reason, void *arg)
{
    fail("client error: %s (%s)", arq_strerror(status), reason);
}

static void on_close(arq_client_t *c, void *arg)
{
    ((struct conn *)arg)->closed = 1;
}

/* A new client connected to url (reconnect with the given backoff, if base_ms > 0). */
static int conn_open(struct conn *k, const char *url, uint32_t backoff_base_ms,
                     uint32_t backoff_cap_ms)
{
    memset(k, 0, sizeof *k);
    arq_client_options_t o = {
        .url = url,
        .reconnect = backoff_base_ms > 0,
        .backoff_base_ms = backoff_base_ms,
        .backoff_cap_ms = backoff_cap_ms,
    };
    int rc = arq_client_new(B.base, &o, &k->c);
    if (rc != 0) {
        fail("arq_client_new(%s): %s", url, arq_strerror(rc));
        return -1;
    }
    arq_client_on_state(k->c, on_state, k);
    arq_client_on_error(k->c, on_error, k);
    rc = arq_client_connect(k->c, on_connect, k);
    if (rc != 0) {
        fail("arq_client_connect: %s", arq_strerror(rc));
        return -1;
    }
    return run_until(&k->connected);
}

/* Close cleanly (the close handshake), then free; after a failure only free
 * (which drops the socket and calls no callbacks). */
static void conn_close(struct conn *k)
{
    if (!k->c)
        return;
    if (!B.failed && arq_client_close(k->c, on_close, k) == 0)
        (void)run_until(&k->closed);
    arq_client_free(k->c);
    k->c = NULL;
}

/* ---- publishing ---- */

/* n publishes to one stream, at most window waiting for a puback. */
struct pubrun {
    struct conn *k;
    char stream[256];
    char msgid_prefix[256];
    uint64_t n, sent, acked;
    uint8_t *seen; /* offsets 1..n, each once */
    int done;
};

static void pub_next(struct pubrun *r);

static void on_puback(arq_client_t *c, int status, uint64_t offset, int duplicate, void *arg)
{
    struct pubrun *r = arg;
    if (r->done)
        return;
    if (status != 0) {
        fail("publish to '%s' failed: %s (%s)", r->stream, arq_strerror(status),
             arq_client_last_error(c));
        return;
    }
    if (duplicate || offset < 1 || offset > r->n || r->seen[offset - 1]) {
        fail("publish to '%s': offset %" PRIu64 " unexpected or twice (a new stream has 1..%" PRIu64
             ")",
             r->stream, offset, r->n);
        return;
    }
    r->seen[offset - 1] = 1;
    r->acked++;
    if (r->sent < r->n)
        pub_next(r);
    if (r->acked == r->n)
        r->done = 1;
}

static void pub_next(struct pubrun *r)
{
    char msgid[300];
    snprintf(msgid, sizeof msgid, "%s-%" PRIu64, r->msgid_prefix, r->sent);
    int rc = arq_publish(r->k->c, r->stream, B.data, B.o.size, msgid, on_puback, r);
    if (rc != 0) {
        fail("arq_publish to '%s': %s", r->stream, arq_strerror(rc));
        return;
    }
    r->sent++;
}

static int publish_n(struct conn *k, const char *suffix, const char *tag, uint64_t n)
{
    if (n == 0)
        return 0;
    struct pubrun r = {.k = k, .n = n};
    snprintf(r.stream, sizeof r.stream, "%s.%s", B.o.prefix, suffix);
    snprintf(r.msgid_prefix, sizeof r.msgid_prefix, "%s-%s", B.o.prefix, tag);
    r.seen = calloc(n, 1);
    if (!r.seen) {
        fail("out of memory");
        return -1;
    }
    for (uint64_t i = 0; i < n && i < B.o.window && !B.failed; i++)
        pub_next(&r);
    int rc = run_until(&r.done);
    /* After a failure callbacks for r may still be due: the caller frees the
     * client (which calls none) before the loop runs again. */
    free(r.seen);
    r.seen = NULL;
    return rc;
}

/* ---- receiving ---- */

struct subrun {
    char stream[256];
    uint64_t n, expect;
    struct timed *t; /* stopped at the n-th message, if not NULL */
    int done;
};

static void on_subok(arq_client_t *c, int status, uint64_t epoch, uint64_t first, uint64_t next,
                     void *arg)
{
    struct subrun *r = arg;
    if (status != 0)
        fail("subscribe to '%s': %s (%s)", r->stream, arq_strerror(status),
             arq_client_last_error(c));
}

static void on_msg(arq_client_t *c, const arq_message_t *m, void *arg)
{
    struct subrun *r = arg;
    if (r->done)
        return;
    if (m->offset != r->expect || m->payload_len != B.o.size) {
        fail("'%s': offset %" PRIu64 " (%zu bytes) where %" PRIu64 " (%zu bytes) was due",
             r->stream, m->offset, m->payload_len, r->expect, B.o.size);
        return;
    }
    int rc = arq_ack(c, m->stream, m->offset);
    if (rc != 0) {
        fail("arq_ack('%s', %" PRIu64 "): %s", r->stream, m->offset, arq_strerror(rc));
        return;
    }
    if (++r->expect > r->n) {
        if (r->t)
            timed_stop(r->t);
        r->done = 1;
    }
}

/* Subscribe to PREFIX.suffix from earliest and wait for offsets 1..n; with
 * t, timed from the subscribe call to the n-th message. r must outlive the
 * client (its callbacks point at it). */
static int receive_n(struct conn *k, struct subrun *r, const char *suffix, uint64_t n,
                     struct timed *t)
{
    memset(r, 0, sizeof *r);
    snprintf(r->stream, sizeof r->stream, "%s.%s", B.o.prefix, suffix);
    r->n = n;
    r->expect = 1;
    r->t = t;
    if (t)
        timed_start(t);
    int rc =
        arq_subscribe(k->c, r->stream, ARQ_FROM_EARLIEST, 0, ARQ_EPOCH_ANY, on_subok, on_msg, r);
    if (rc != 0) {
        fail("arq_subscribe('%s'): %s", r->stream, arq_strerror(rc));
        return -1;
    }
    return run_until(&r->done);
}

/* ---- modes ---- */

static void print_rate(const char *mode, const struct timed *t)
{
    char server[32] = "null";
    if (t->server >= 0)
        snprintf(server, sizeof server, "%.3f", t->server);
    printf(
        "{\"client\": \"libarq\", \"library\": \"libarq %s\", \"mode\": \"%s\", \"count\": %" PRIu64
        ", \"size\": %zu, \"window\": %" PRIu64 ", \"seconds\": %.6f, \"msgs_per_s\": %.1f"
        ", \"cpu_s\": %.4f, \"cpu_us_per_msg\": %.3f, \"server_cpu\": %s}\n",
        ARQ_BENCH_VERSION, mode, B.o.count, B.o.size, B.o.window, t->seconds,
        (double)B.o.count / t->seconds, t->cpu, t->cpu / (double)B.o.count * 1e6, server);
}

static int mode_publish(void)
{
    struct conn k;
    struct timed t;
    int rc = conn_open(&k, B.o.url, 0, 0);
    if (rc == 0)
        rc = publish_n(&k, "pub.warm", "pw", B.o.warmup);
    if (rc == 0) {
        timed_start(&t);
        rc = publish_n(&k, "pub", "p", B.o.count);
        timed_stop(&t);
    }
    conn_close(&k);
    if (rc == 0 && !B.failed)
        print_rate("publish", &t);
    return B.failed ? -1 : 0;
}

static int mode_delivery(void)
{
    struct conn p, k;
    struct subrun warm, del;
    struct timed t;
    int rc = conn_open(&p, B.o.url, 0, 0);
    if (rc == 0)
        rc = publish_n(&p, "del", "d", B.o.count);
    if (rc == 0)
        rc = publish_n(&p, "del.warm", "dw", B.o.warmup);
    conn_close(&p);
    if (rc == 0)
        rc = conn_open(&k, B.o.url, 0, 0);
    else
        k.c = NULL;
    if (rc == 0 && B.o.warmup)
        rc = receive_n(&k, &warm, "del.warm", B.o.warmup, NULL);
    if (rc == 0)
        rc = receive_n(&k, &del, "del", B.o.count, &t);
    conn_close(&k);
    if (rc == 0 && !B.failed)
        print_rate("delivery", &t);
    return B.failed ? -1 : 0;
}

/* A blocking connection to the cut proxy's control port. */
static int control_open(const char *hostport)
{
    char host[64];
    const char *colon = strrchr(hostport, ':');
    if (!colon || (size_t)(colon - hostport) >= sizeof host) {
        fail("--control %s: not HOST:PORT", hostport);
        return -1;
    }
    memcpy(host, hostport, (size_t)(colon - hostport));
    host[colon - hostport] = '\0';
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fail("--control %s: not an IPv4 address", hostport);
        return -1;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        fail("connect to the cut proxy %s: %s", hostport, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* Ask the proxy to cut; *ret_t = its CLOCK_MONOTONIC reading of the cut (ns). */
static int control_cut(int fd, uint64_t *ret_t)
{
    if (write(fd, "cut\n", 4) != 4) {
        fail("write to the cut proxy: %s", strerror(errno));
        return -1;
    }
    char line[128];
    size_t len = 0;
    while (len < sizeof line - 1 && (len == 0 || line[len - 1] != '\n')) {
        ssize_t n = read(fd, line + len, sizeof line - 1 - len);
        if (n <= 0) {
            fail("read from the cut proxy: %s", n == 0 ? "closed" : strerror(errno));
            return -1;
        }
        len += (size_t)n;
    }
    line[len] = '\0';
    uint64_t t;
    unsigned cut;
    if (sscanf(line, "cut %" SCNu64 " %u", &t, &cut) != 2 || cut < 1) {
        fail("cut proxy answered '%.*s' (no connection to cut?)", (int)strcspn(line, "\n"), line);
        return -1;
    }
    *ret_t = t;
    return 0;
}

struct rcsub {
    uint64_t got, want;
    int arrived; /* got >= want */
};

static void on_rc_msg(arq_client_t *c, const arq_message_t *m, void *arg)
{
    struct rcsub *s = arg;
    if (++s->got >= s->want)
        s->arrived = 1;
    int rc = arq_ack(c, m->stream, m->offset);
    if (rc != 0)
        fail("arq_ack('%s', %" PRIu64 "): %s", m->stream, m->offset, arq_strerror(rc));
}

struct one_pub {
    int done;
};

static void on_one_puback(arq_client_t *c, int status, uint64_t offset, int duplicate, void *arg)
{
    if (status != 0)
        fail("publish failed: %s (%s)", arq_strerror(status), arq_client_last_error(c));
    ((struct one_pub *)arg)->done = 1;
}

/* One publish, back through the subscription: the subscription is live. */
static int round_trip(struct conn *k, const char *stream, struct rcsub *s, uint64_t i)
{
    char msgid[300];
    snprintf(msgid, sizeof msgid, "%s-r-%" PRIu64, B.o.prefix, i);
    s->want = s->got + 1;
    s->arrived = 0;
    struct one_pub p = {0};
    int rc = arq_publish(k->c, stream, B.data, B.o.size, msgid, on_one_puback, &p);
    if (rc != 0) {
        fail("arq_publish('%s'): %s", stream, arq_strerror(rc));
        return -1;
    }
    if (run_until(&p.done) != 0)
        return -1;
    return run_until(&s->arrived);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Sorts v[0..n) (n >= 1) and returns its median. */
static double median_of(double *v, size_t n)
{
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static int mode_reconnect(void)
{
    if (!B.o.control) {
        fail("--mode reconnect needs --control HOST:PORT (the cut proxy)");
        return -1;
    }
    int ctl = control_open(B.o.control);
    if (ctl < 0)
        return -1;
    double *ms = calloc(B.o.cuts, sizeof *ms), *sorted = calloc(B.o.cuts, sizeof *sorted);
    /* the parts of each sample: detect, backoff, handshake (bench_py.py) */
    double *parts[3] = {calloc(B.o.cuts, sizeof(double)), calloc(B.o.cuts, sizeof(double)),
                        calloc(B.o.cuts, sizeof(double))};
    struct conn k = {0};
    struct rcsub sub = {0};
    char stream[256];
    snprintf(stream, sizeof stream, "%s.rc", B.o.prefix);
    arq_client_stats_t st = {0};
    if (!ms || !sorted || !parts[0] || !parts[1] || !parts[2]) {
        fail("out of memory");
        goto out;
    }
    /* backoff 1 ms .. 10 ms: see bench_py.py */
    if (conn_open(&k, B.o.url, 1, 10) != 0)
        goto out;
    int rc = arq_subscribe(k.c, stream, ARQ_FROM_LATEST, 0, ARQ_EPOCH_ANY, NULL, on_rc_msg, &sub);
    if (rc != 0) {
        fail("arq_subscribe('%s'): %s", stream, arq_strerror(rc));
        goto out;
    }
    for (uint64_t i = 0; i < B.o.cuts; i++) {
        if (round_trip(&k, stream, &sub, i) != 0 || run_for_ms(20) != 0)
            goto out;
        uint64_t before = k.n_connected, t_cut;
        arq_client_stats(k.c, &st);
        uint64_t resumed = st.resumed;
        if (control_cut(ctl, &t_cut) != 0)
            goto out;
        while (k.n_connected == before)
            if (event_base_loop(B.base, EVLOOP_ONCE) < 0 || B.failed || B.timed_out) {
                fail("cut %" PRIu64 ": not connected again%s", i + 1,
                     B.timed_out ? " within the timeout" : "");
                goto out;
            }
        ms[i] = (double)(k.t_connected - t_cut) / 1e6;
        parts[0][i] = (double)(k.t_disconnected - t_cut) / 1e6;
        parts[1][i] = (double)(k.t_reconnecting - k.t_disconnected) / 1e6;
        parts[2][i] = (double)(k.t_connected - k.t_reconnecting) / 1e6;
        arq_client_stats(k.c, &st);
        if (st.resumed != resumed + 1) {
            fail("cut %" PRIu64 ": the welcome did not resume the session", i + 1);
            goto out;
        }
    }
    if (round_trip(&k, stream, &sub, B.o.cuts) != 0) /* and once more after the last cut */
        goto out;
    arq_client_stats(k.c, &st);
    memcpy(sorted, ms, B.o.cuts * sizeof *ms);
    size_t n = (size_t)B.o.cuts;
    double median = median_of(sorted, n);
    size_t p90 = (9 * n + 9) / 10; /* nearest rank: ceil(0.9 n), 1-based */
    printf(
        "{\"client\": \"libarq\", \"library\": \"libarq %s\", \"mode\": \"reconnect\", \"cuts\": "
        "%" PRIu64 ", \"size\": %zu, \"resumed\": %" PRIu64 ", \"median_ms\": %.3f, \"p90_ms\": "
        "%.3f, \"min_ms\": %.3f, \"max_ms\": %.3f, \"detect_ms\": %.3f, \"backoff_ms\": %.3f, "
        "\"handshake_ms\": %.3f, \"samples_ms\": [",
        ARQ_BENCH_VERSION, B.o.cuts, B.o.size, st.resumed, median, sorted[p90 > 0 ? p90 - 1 : 0],
        sorted[0], sorted[n - 1], median_of(parts[0], n), median_of(parts[1], n),
        median_of(parts[2], n));
    for (size_t i = 0; i < n; i++)
        printf("%s%.3f", i ? ", " : "", ms[i]);
    printf("]}\n");
out:
    conn_close(&k);
    close(ctl);
    free(ms);
    free(sorted);
    for (int i = 0; i < 3; i++)
        free(parts[i]);
    return B.failed ? -1 : 0;
}

/* ---- options ---- */

static void usage(const char *msg)
{
    if (msg)
        fprintf(stderr, "arq-client-bench: %s\n", msg);
    fprintf(
        stderr,
        "usage: arq-client-bench --url URL --prefix PREFIX --mode publish|delivery|reconnect\n"
        "         [--count N=20000] [--size BYTES=100] [--window W=10000] [--warmup M=1000]\n"
        "         [--cuts K=20] [--control HOST:PORT] [--server-pid PID] [--timeout SEC=120]\n");
    exit(2);
}

static uint64_t parse_u64(const char *name, const char *s, uint64_t min)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || *s == '-' || v < min) {
        char msg[128];
        snprintf(msg, sizeof msg, "--%s: not an integer >= %" PRIu64 ": '%s'", name, min, s);
        usage(msg);
    }
    return v;
}

static void parse_opts(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"url", required_argument, NULL, 'u'},
        {"prefix", required_argument, NULL, 'P'},
        {"mode", required_argument, NULL, 'm'},
        {"count", required_argument, NULL, 'n'},
        {"size", required_argument, NULL, 's'},
        {"window", required_argument, NULL, 'w'},
        {"warmup", required_argument, NULL, 'W'},
        {"cuts", required_argument, NULL, 'k'},
        {"control", required_argument, NULL, 'C'},
        {"server-pid", required_argument, NULL, 'S'},
        {"timeout", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct opts *o = &B.o;
    *o = (struct opts){
        .count = 20000,
        .window = 10000,
        .warmup = 1000,
        .cuts = 20,
        .size = 100,
        .timeout_s = 120,
    };
    const char *mode = NULL;
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'u':
            o->url = optarg;
            break;
        case 'P':
            o->prefix = optarg;
            break;
        case 'm':
            mode = optarg;
            break;
        case 'n':
            o->count = parse_u64("count", optarg, 1);
            break;
        case 's':
            o->size = (size_t)parse_u64("size", optarg, 0);
            break;
        case 'w':
            o->window = parse_u64("window", optarg, 1);
            break;
        case 'W':
            o->warmup = parse_u64("warmup", optarg, 0);
            break;
        case 'k':
            o->cuts = parse_u64("cuts", optarg, 1);
            break;
        case 'C':
            o->control = optarg;
            break;
        case 'S':
            o->server_pid = (long)parse_u64("server-pid", optarg, 1);
            break;
        case 't':
            o->timeout_s = (double)parse_u64("timeout", optarg, 1);
            break;
        case 'h':
            usage(NULL);
            break;
        default:
            usage("unknown option");
        }
    }
    if (optind != argc)
        usage("unexpected argument");
    if (!o->url || !o->prefix || !mode)
        usage("--url, --prefix and --mode are required");
    if (strcmp(mode, "publish") == 0)
        o->mode = MODE_PUBLISH;
    else if (strcmp(mode, "delivery") == 0)
        o->mode = MODE_DELIVERY;
    else if (strcmp(mode, "reconnect") == 0)
        o->mode = MODE_RECONNECT;
    else
        usage("--mode is publish, delivery or reconnect");
    if (strlen(o->prefix) > 200)
        usage("--prefix: at most 200 bytes");
}

int main(int argc, char **argv)
{
    parse_opts(argc, argv);
    B.data = malloc(B.o.size ? B.o.size : 1);
    B.base = event_base_new();
    if (!B.data || !B.base) {
        fprintf(stderr, "arq-client-bench: out of memory\n");
        return 1;
    }
    memset(B.data, 'x', B.o.size);
    B.deadline = evtimer_new(B.base, on_deadline, NULL);
    struct timeval tv = {(time_t)B.o.timeout_s, 0};
    if (!B.deadline || evtimer_add(B.deadline, &tv) != 0) {
        fprintf(stderr, "arq-client-bench: cannot arm the deadline\n");
        return 1;
    }
    int rc;
    switch (B.o.mode) {
    case MODE_PUBLISH:
        rc = mode_publish();
        break;
    case MODE_DELIVERY:
        rc = mode_delivery();
        break;
    default:
        rc = mode_reconnect();
        break;
    }
    if (rc != 0)
        fprintf(stderr, "arq-client-bench: %s: %s\n",
                B.o.mode == MODE_PUBLISH    ? "publish"
                : B.o.mode == MODE_DELIVERY ? "delivery"
                                            : "reconnect",
                B.err);
    event_free(B.deadline);
    event_base_free(B.base);
    free(B.data);
    return rc == 0 ? 0 : 1;
}
