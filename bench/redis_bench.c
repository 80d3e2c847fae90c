/*
 * redis_bench.c - arq-redis-bench: Redis Streams measured like arq-bench,
 * with subscribers: the peer of the latency row of docs/benchmarks.md
 * ("Peers"). redis-benchmark gives the XADD rate, but it cannot publish
 * open-loop at a given rate, and nothing in it reads what was added, so it
 * says nothing about publish -> delivery latency.
 *
 * C publisher connections each keep W XADDs in flight (the next goes out when
 * a reply arrives), or, with --rate R, publish open-loop at R messages/s in
 * aggregate, sent every --tick-us round-robin over the publishers, exactly as
 * arq-bench does. Payloads (128 bytes by default, field "p") carry their send
 * time (CLOCK_MONOTONIC ns, little endian) in the first 8 bytes and go
 * round-robin over 8 streams arqbench:0 .. arqbench:7, which are deleted
 * first. S subscriber connections each loop on
 *
 *     XREAD COUNT N BLOCK 0 STREAMS arqbench:0 .. arqbench:7 ID0 .. ID7
 *
 * from ID 0-0, each time from the last ID it received per stream; the
 * delivery latency is "now - embedded send time", as in arq-bench.
 *
 * With `appendfsync always` Redis writes and fsyncs the AOF before it sends
 * the replies of an event loop turn (the XADD replies and the entries it
 * hands to blocked XREADs alike), so a delivery here, as in ARQ, follows the
 * message's fsync.
 *
 * With --wait N (the replicated peer of bench/ha_peers.sh) every XADD is
 * followed, pipelined on the same connection, by WAIT N TIMEOUT, and the
 * publish counts as acknowledged only when WAIT's reply says at least N
 * replicas have it; a WAIT that returns fewer (its timeout passed) is counted
 * as `wait_short`, not as an acknowledgement. Its latency is from the XADD's
 * send to the WAIT's reply. WAIT blocks the connection, so the next XADD of
 * the pipeline runs only after it: W in flight here is W queued, one
 * replicated at a time per connection. Redis 7.0's WAIT counts replicas that
 * have received and applied the entry (REPLCONF ACK), which is not a promise
 * that they have fsynced it (WAITAOF, 7.2, is that).
 *
 * Requests are RESP written by hand (one fixed command shape); replies are
 * parsed by hiredis's reader (libhiredis). One libevent loop, plain sockets,
 * as arq-nats-bench.
 */
#include <errno.h>
#include <event2/event.h>
#include <getopt.h>
#include <hiredis/read.h>
#include <hiredis/hiredis.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bench_run.h"
#include "bench_util.h"

#define RB_MAX_CONNS 1000u
#define RB_MAX_SUBS  64u
#define RB_STREAMS   8u
#define RB_RING      65536u /* send times of the XADDs in flight; a power of two */

struct opts {
    char host[256], port[16];
    unsigned conns, depth, subs, size, tick_us;
    unsigned wait;     /* --wait N: replicas each XADD must reach (0: no WAIT) */
    char wait_cmd[64]; /* the WAIT command in RESP, sent after each XADD */
    char count[16];    /* XREAD COUNT: entries per stream per reply, at most */
    double rate, seconds, warmup;
    long server_pid;
    int json;
};

struct conn {
    unsigned idx;
    bool sub;
    int fd;
    struct event *rev, *wev;
    redisReader *rd;
    bench_out_t out;
    /* publishers: send times in order (Redis answers in order) */
    uint64_t *sent_ns;
    uint64_t head, tail; /* sent_ns[tail..head) are in flight */
    bool xadd_answered;  /* --wait: the tail's XADD has been answered, its WAIT is next */
    bool xadd_ok;        /* ... and that XADD added the entry */
    unsigned k;          /* this publisher's next stream, round-robin */
    /* subscribers: the last ID received per stream */
    char last[RB_STREAMS][48];
};

static struct opts g_o;
static struct event_base *g_base;
static struct conn *g_cs;
static unsigned g_n; /* connections set up */
static int g_failed;
static bench_run_t g_sched; /* warm-up, window, drain */
static uint64_t g_acks, g_sent, g_not_sent, g_errors, g_inflight_total, g_deliveries;
static uint64_t g_wait_short; /* --wait: WAIT replies below N in the window */
static unsigned g_wait_ms;    /* --wait-timeout */
static uint64_t g_t_start, g_scheduled;
static unsigned g_rr;
static bench_hist_t g_pub_lat, g_deliv_lat;
static uint8_t *g_payload;

__attribute__((format(printf, 1, 2))) static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "arq-redis-bench: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    g_failed = 1;
    if (g_base != NULL)
        event_base_loopbreak(g_base);
}

/* ---- output --------------------------------------------------------------- */

static void out_add(struct conn *c, const void *p, size_t n)
{
    if (bench_out_add(&c->out, p, n) != 0)
        fail("out of memory");
}

static void out_bulk(struct conn *c, const void *p, size_t n)
{
    char hdr[32];
    int h = snprintf(hdr, sizeof hdr, "$%zu\r\n", n);
    out_add(c, hdr, (size_t)h);
    out_add(c, p, n);
    out_add(c, "\r\n", 2);
}

static void out_cmd(struct conn *c, int argc, const char **argv)
{
    char hdr[32];
    int h = snprintf(hdr, sizeof hdr, "*%d\r\n", argc);
    out_add(c, hdr, (size_t)h);
    for (int i = 0; i < argc; i++)
        out_bulk(c, argv[i], strlen(argv[i]));
}

static void flush(struct conn *c)
{
    int rc = bench_out_flush(&c->out, c->fd);
    if (rc == 1)
        event_add(c->wev, NULL);
    else if (rc < 0)
        fail("send on connection %u: %s", c->idx, strerror(errno));
}

static void stream_name(unsigned i, char *buf, size_t cap)
{
    snprintf(buf, cap, "arqbench:%u", i);
}

/* Queues one XADD on publisher c; -1 when RB_RING are already in flight. */
static int send_pub(struct conn *c)
{
    if (c->head - c->tail >= RB_RING)
        return -1;
    char name[32];
    stream_name(c->k++ % RB_STREAMS, name, sizeof name);
    uint64_t t = bench_now_ns();
    for (unsigned i = 0; i < 8; i++)
        g_payload[i] = (uint8_t)(t >> (8 * i));
    out_add(c, "*5\r\n$4\r\nXADD\r\n", 14);
    out_bulk(c, name, strlen(name));
    out_add(c, "$1\r\n*\r\n$1\r\np\r\n", 14);
    out_bulk(c, g_payload, g_o.size);
    if (g_o.wait > 0)
        out_add(c, g_o.wait_cmd, strlen(g_o.wait_cmd));
    c->sent_ns[c->head++ & (RB_RING - 1)] = t;
    g_inflight_total++;
    if (g_sched.phase == BENCH_PH_MEASURE)
        g_sent++;
    return 0;
}

/* Queues subscriber c's next XREAD, from the last IDs it has seen. */
static void send_xread(struct conn *c)
{
    const char *argv[6 + 2 * RB_STREAMS];
    char names[RB_STREAMS][32];
    int n = 0;
    argv[n++] = "XREAD";
    argv[n++] = "COUNT";
    argv[n++] = g_o.count;
    argv[n++] = "BLOCK";
    argv[n++] = "0";
    argv[n++] = "STREAMS";
    for (unsigned i = 0; i < RB_STREAMS; i++) {
        stream_name(i, names[i], sizeof names[i]);
        argv[n++] = names[i];
    }
    for (unsigned i = 0; i < RB_STREAMS; i++)
        argv[n++] = c->last[i];
    out_cmd(c, n, argv);
}

/* ---- input ------------------------------------------------------------------ */

/* A publisher's reply: an XADD's, or with --wait the XADD's and then its
 * WAIT's (Redis answers a connection's commands in order). */
static void on_xadd_reply(struct conn *c, const redisReply *r)
{
    uint64_t t = bench_now_ns();
    if (c->tail == c->head) {
        fail("connection %u: a reply to nothing", c->idx);
        return;
    }
    bool ok;
    if (g_o.wait > 0 && !c->xadd_answered) {
        /* the XADD's reply; the publish is answered by its WAIT, next */
        c->xadd_answered = true;
        c->xadd_ok = r->type == REDIS_REPLY_STRING;
        if (!c->xadd_ok && g_errors++ < 5)
            fprintf(stderr, "arq-redis-bench: XADD refused: %.*s\n",
                    r->type == REDIS_REPLY_ERROR ? (int)r->len : 0,
                    r->type == REDIS_REPLY_ERROR ? r->str : "");
        return;
    }
    uint64_t s = c->sent_ns[c->tail++ & (RB_RING - 1)];
    g_inflight_total--;
    if (g_o.wait > 0) {
        c->xadd_answered = false;
        if (r->type != REDIS_REPLY_INTEGER) {
            if (g_errors++ < 5)
                fprintf(stderr, "arq-redis-bench: WAIT refused: %.*s\n",
                        r->type == REDIS_REPLY_ERROR ? (int)r->len : 0,
                        r->type == REDIS_REPLY_ERROR ? r->str : "");
            ok = false;
        } else if (r->integer < (long long)g_o.wait) {
            /* the timeout passed with fewer replicas: not acknowledged */
            if (g_sched.phase == BENCH_PH_MEASURE)
                g_wait_short++;
            ok = false;
        } else
            ok = c->xadd_ok;
    } else {
        ok = r->type == REDIS_REPLY_STRING;
        if (!ok && g_errors++ < 5)
            fprintf(stderr, "arq-redis-bench: XADD refused: %.*s\n",
                    r->type == REDIS_REPLY_ERROR ? (int)r->len : 0,
                    r->type == REDIS_REPLY_ERROR ? r->str : "");
    }
    if (ok && g_sched.phase == BENCH_PH_MEASURE) {
        g_acks++;
        bench_hist_add(&g_pub_lat, t > s ? t - s : 0);
    }
    if (g_o.rate <= 0 && g_sched.phase != BENCH_PH_STOP)
        (void)send_pub(c);
}

/* One XREAD reply: [[stream, [[id, [field, value, ...]], ...]], ...], or nil. */
static void on_xread_reply(struct conn *c, const redisReply *r)
{
    uint64_t t = bench_now_ns();
    if (r->type == REDIS_REPLY_ERROR) {
        fail("XREAD refused: %.*s", (int)r->len, r->str);
        return;
    }
    if (r->type == REDIS_REPLY_ARRAY) {
        for (size_t i = 0; i < r->elements; i++) {
            const redisReply *s = r->element[i];
            if (s->type != REDIS_REPLY_ARRAY || s->elements != 2 ||
                s->element[0]->type != REDIS_REPLY_STRING ||
                s->element[1]->type != REDIS_REPLY_ARRAY)
                goto bad;
            const char *name = s->element[0]->str, *dot = strrchr(name, ':');
            unsigned si = dot != NULL ? (unsigned)strtoul(dot + 1, NULL, 10) : RB_STREAMS;
            if (si >= RB_STREAMS)
                goto bad;
            const redisReply *es = s->element[1];
            for (size_t j = 0; j < es->elements; j++) {
                const redisReply *e = es->element[j];
                if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
                    e->element[0]->type != REDIS_REPLY_STRING ||
                    e->element[0]->len >= sizeof c->last[si] ||
                    e->element[1]->type != REDIS_REPLY_ARRAY)
                    goto bad;
                memcpy(c->last[si], e->element[0]->str, e->element[0]->len + 1);
                const redisReply *fv = e->element[1];
                if (g_sched.phase != BENCH_PH_MEASURE || fv->elements != 2 ||
                    fv->element[1]->type != REDIS_REPLY_STRING || fv->element[1]->len < 8)
                    continue;
                uint64_t sent = 0;
                for (unsigned b = 0; b < 8; b++)
                    sent |= (uint64_t)(uint8_t)fv->element[1]->str[b] << (8 * b);
                g_deliveries++;
                bench_hist_add(&g_deliv_lat, t > sent ? t - sent : 0);
            }
        }
    } else if (r->type != REDIS_REPLY_NIL)
        goto bad;
    if (g_sched.phase != BENCH_PH_STOP)
        send_xread(c);
    return;
bad:
    fail("subscriber %u: an XREAD reply of an unexpected shape", c->idx);
}

static void on_read(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct conn *c = arg;
    uint8_t buf[65536];
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (n <= 0) {
            if (g_sched.phase != BENCH_PH_STOP || !c->sub)
                fail("connection %u closed by the server", c->idx);
            return;
        }
        if (redisReaderFeed(c->rd, (const char *)buf, (size_t)n) != REDIS_OK) {
            fail("connection %u: %s", c->idx, c->rd->errstr);
            return;
        }
        for (;;) {
            void *reply = NULL;
            if (redisReaderGetReply(c->rd, &reply) != REDIS_OK) {
                fail("connection %u: %s", c->idx, c->rd->errstr);
                return;
            }
            if (reply == NULL)
                break;
            if (c->sub)
                on_xread_reply(c, reply);
            else
                on_xadd_reply(c, reply);
            freeReplyObject(reply);
            if (g_failed)
                return;
        }
        if ((size_t)n < sizeof buf)
            break;
    }
    if (c->out.len > c->out.off)
        flush(c);
    bench_run_check_drained(&g_sched);
}

static void on_write(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    flush(arg);
}

/* ---- open loop ------------------------------------------------------------- */

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (g_sched.phase == BENCH_PH_STOP)
        return;
    uint64_t due = (uint64_t)((double)(bench_now_ns() - g_t_start) * g_o.rate / 1e9);
    if (due <= g_scheduled)
        return;
    uint64_t n = due - g_scheduled;
    g_scheduled = due;
    unsigned first = g_rr;
    for (uint64_t i = 0; i < n; i++) {
        struct conn *c = &g_cs[g_rr];
        g_rr = (g_rr + 1) % g_o.conns;
        if (send_pub(c) != 0 && g_sched.phase == BENCH_PH_MEASURE)
            g_not_sent++;
    }
    unsigned touched = n >= g_o.conns ? g_o.conns : (unsigned)n;
    for (unsigned i = 0; i < touched; i++)
        flush(&g_cs[(first + i) % g_o.conns]);
}

/* ---- set-up ---------------------------------------------------------------- */

/* Blocking, before the loop: sends c's queued output and reads one reply. */
static redisReply *roundtrip(struct conn *c)
{
    if (bench_send_all(c->fd, c->out.p, c->out.len) != 0)
        return NULL;
    c->out.len = 0;
    for (;;) {
        void *reply = NULL;
        if (redisReaderGetReply(c->rd, &reply) != REDIS_OK)
            return NULL;
        if (reply != NULL)
            return reply;
        char buf[4096];
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || redisReaderFeed(c->rd, buf, (size_t)n) != REDIS_OK)
            return NULL;
    }
}

static int connect_one(struct conn *c)
{
    c->fd = bench_tcp_connect(g_o.host, g_o.port);
    c->rd = redisReaderCreate();
    c->sent_ns = c->sub ? NULL : calloc(RB_RING, sizeof *c->sent_ns);
    if (c->fd < 0 || c->rd == NULL || (!c->sub && c->sent_ns == NULL)) {
        fprintf(stderr, "arq-redis-bench: connect %s:%s: %s\n", g_o.host, g_o.port,
                c->fd < 0 ? strerror(errno) : "out of memory");
        return -1;
    }
    const char *ping[] = {"PING"};
    out_cmd(c, 1, ping);
    redisReply *r = roundtrip(c);
    bool ok = r != NULL && r->type == REDIS_REPLY_STATUS && strcmp(r->str, "PONG") == 0;
    if (!ok)
        fprintf(stderr, "arq-redis-bench: no PONG from %s:%s%s%s\n", g_o.host, g_o.port,
                r != NULL && r->type == REDIS_REPLY_ERROR ? ": " : "",
                r != NULL && r->type == REDIS_REPLY_ERROR ? r->str : "");
    if (r != NULL)
        freeReplyObject(r);
    for (unsigned i = 0; i < RB_STREAMS; i++)
        snprintf(c->last[i], sizeof c->last[i], "0-0");
    return ok ? 0 : -1;
}

/* Deletes the bench streams (on c, before the loop), so IDs start from 0-0. */
static int reset_streams(struct conn *c)
{
    const char *argv[1 + RB_STREAMS];
    char names[RB_STREAMS][32];
    argv[0] = "DEL";
    for (unsigned i = 0; i < RB_STREAMS; i++) {
        stream_name(i, names[i], sizeof names[i]);
        argv[1 + i] = names[i];
    }
    out_cmd(c, 1 + RB_STREAMS, argv);
    redisReply *r = roundtrip(c);
    int rc = r != NULL && r->type == REDIS_REPLY_INTEGER ? 0 : -1;
    if (rc != 0)
        fprintf(stderr, "arq-redis-bench: DEL of the bench streams failed\n");
    if (r != NULL)
        freeReplyObject(r);
    return rc;
}

/* ---- the run ------------------------------------------------------------- */

static void on_drain_timeout(void)
{
    fail("%llu XADDs were never answered", (unsigned long long)g_inflight_total);
}

/* ---- options --------------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f, "usage: arq-redis-bench --url redis://HOST:PORT [-c CONNS] [-w DEPTH]\n"
               "                       [-s SUBSCRIBERS] [--rate R [--tick-us US]]\n"
               "                       [--seconds S] [--warmup S] [--size BYTES]\n"
               "                       [--count N] [--wait N [--wait-timeout MS]]\n"
               "                       [--server-pid PID] [--json]\n"
               "\n"
               "Redis Streams measured like arq-bench: XADDs answered per second and, with\n"
               "subscribers (XREAD BLOCK), publish -> delivery latency (docs/benchmarks.md,\n"
               "\"Peers\"). Uses and first deletes the keys arqbench:0 .. arqbench:7.\n"
               "\n"
               "  -c, --conns C        publisher connections (default 50)\n"
               "  -w, --depth W        XADDs in flight per publisher (default 1)\n"
               "  -s, --subscribers S  subscriber connections, each reading every stream\n"
               "                       (default 0)\n"
               "  --rate R             open loop: R XADDs/s in aggregate (-w is then ignored)\n"
               "  --tick-us US         open loop: send what is due every US microseconds,\n"
               "                       round-robin over the publishers (default 200)\n"
               "  --seconds S          measurement window (default 5)\n"
               "  --warmup S           warm-up before the window (default 1)\n"
               "  --size BYTES         payload size, >= 8 (default 128)\n"
               "  --count N            XREAD COUNT: entries per stream per reply (default 1000)\n"
               "  --wait N             send WAIT N MS after each XADD; a publish is acknowledged\n"
               "                       when WAIT says >= N replicas have it (fewer: wait_short)\n"
               "  --wait-timeout MS    WAIT's timeout (default 1000)\n"
               "  --server-pid PID     also report this process's CPU use (the server's)\n"
               "  --json               one JSON object on stdout; the text goes to stderr\n");
}

static int parse_opts(int argc, char **argv)
{
    static const struct option lo[] = {
        {"url", required_argument, NULL, 'u'},     {"conns", required_argument, NULL, 'c'},
        {"depth", required_argument, NULL, 'w'},   {"subscribers", required_argument, NULL, 's'},
        {"rate", required_argument, NULL, 'r'},    {"tick-us", required_argument, NULL, 't'},
        {"seconds", required_argument, NULL, 'S'}, {"warmup", required_argument, NULL, 'W'},
        {"size", required_argument, NULL, 'z'},    {"server-pid", required_argument, NULL, 'p'},
        {"count", required_argument, NULL, 'n'},   {"json", no_argument, NULL, 'j'},
        {"wait", required_argument, NULL, 'a'},    {"wait-timeout", required_argument, NULL, 'T'},
        {"help", no_argument, NULL, 'h'},          {NULL, 0, NULL, 0},
    };
    snprintf(g_o.count, sizeof g_o.count, "1000");
    g_o.conns = 50;
    g_o.depth = 1;
    g_o.size = 128;
    g_o.tick_us = 200;
    g_o.seconds = 5;
    g_o.warmup = 1;
    unsigned wait_ms = 1000;
    int ch, have_url = 0;
    while ((ch = getopt_long(argc, argv, "c:w:s:h", lo, NULL)) != -1) {
        double v = 0;
        int bad = 0;
        switch (ch) {
        case 'u':
            bad = bench_parse_url(optarg, "redis", g_o.host, sizeof g_o.host, g_o.port,
                                  sizeof g_o.port);
            have_url = !bad;
            break;
        case 'c':
            bad = bench_parse_num(optarg, 1, RB_MAX_CONNS, &v) || v != (unsigned)v;
            g_o.conns = (unsigned)v;
            break;
        case 'w':
            bad = bench_parse_num(optarg, 1, RB_RING / 2, &v) || v != (unsigned)v;
            g_o.depth = (unsigned)v;
            break;
        case 's':
            bad = bench_parse_num(optarg, 0, RB_MAX_SUBS, &v) || v != (unsigned)v;
            g_o.subs = (unsigned)v;
            break;
        case 'r':
            bad = bench_parse_num(optarg, 1, 1e8, &g_o.rate);
            break;
        case 't':
            bad = bench_parse_num(optarg, 10, 1000000, &v) || v != (unsigned)v;
            g_o.tick_us = (unsigned)v;
            break;
        case 'S':
            bad = bench_parse_num(optarg, 0.1, 3600, &g_o.seconds);
            break;
        case 'W':
            bad = bench_parse_num(optarg, 0, 3600, &g_o.warmup);
            break;
        case 'z':
            bad = bench_parse_num(optarg, 8, 1 << 20, &v) || v != (unsigned)v;
            g_o.size = (unsigned)v;
            break;
        case 'p':
            bad = bench_parse_num(optarg, 1, 1e9, &v) || v != (long)v;
            g_o.server_pid = (long)v;
            break;
        case 'n':
            bad = bench_parse_num(optarg, 1, 1e6, &v) || v != (unsigned)v;
            snprintf(g_o.count, sizeof g_o.count, "%u", (unsigned)v);
            break;
        case 'a':
            bad = bench_parse_num(optarg, 1, 1000, &v) || v != (unsigned)v;
            g_o.wait = (unsigned)v;
            break;
        case 'T':
            bad = bench_parse_num(optarg, 0, 3600000, &v) || v != (unsigned)v;
            wait_ms = (unsigned)v;
            break;
        case 'j':
            g_o.json = 1;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            usage(stderr);
            return -1;
        }
        if (bad) {
            fprintf(stderr, "arq-redis-bench: bad value for an option: '%s'\n", optarg);
            return -1;
        }
    }
    if (optind != argc || !have_url) {
        usage(stderr);
        return -1;
    }
    if (g_o.wait > 0) {
        char n[16], ms[16];
        int nl = snprintf(n, sizeof n, "%u", g_o.wait), ml = snprintf(ms, sizeof ms, "%u", wait_ms);
        snprintf(g_o.wait_cmd, sizeof g_o.wait_cmd,
                 "*3\r\n$4\r\nWAIT\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", nl, n, ml, ms);
    }
    g_wait_ms = wait_ms;
    return 0;
}

static void print_lat(FILE *f, const char *what, const bench_hist_t *h)
{
    fprintf(f, "%-22s p50 %9.3f ms   p99 %9.3f ms   p99.9 %9.3f ms   (%llu samples)\n", what,
            bench_hist_q_us(h, 0.5) / 1e3, bench_hist_q_us(h, 0.99) / 1e3,
            bench_hist_q_us(h, 0.999) / 1e3, (unsigned long long)h->n);
}

static void json_lat(const char *name, const bench_hist_t *h)
{
    printf(",\"%s\":{\"samples\":%llu,\"p50_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f}", name,
           (unsigned long long)h->n, bench_hist_q_us(h, 0.5), bench_hist_q_us(h, 0.99),
           bench_hist_q_us(h, 0.999));
}

static void report(FILE *out, const bench_window_t *w)
{
    double win = bench_window_s(w), rate = (double)g_acks / win;
    double sent = (double)g_sent / win, deliv = (double)g_deliveries / win;
    double bcpu = bench_window_cpu(w), scpu = bench_window_server_cpu(w);
    char c1[32], c2[32];
    if (g_o.rate > 0)
        fprintf(out, "load: %u publishers, open loop at %s XADD/s (sent every %u us), ", g_o.conns,
                bench_fmt_count(c1, sizeof c1, g_o.rate), g_o.tick_us);
    else
        fprintf(out, "load: %u publishers x %u in flight, ", g_o.conns, g_o.depth);
    fprintf(out, "%u subscribers, %u streams, %u-byte payloads, %.1f s window\n", g_o.subs,
            RB_STREAMS, g_o.size, win);
    fprintf(out, "answered XADDs/s:      %s  (%s in the window / window)\n",
            bench_fmt_count(c1, sizeof c1, rate),
            g_o.wait > 0 ? "XADDs whose WAIT reached N replicas" : "XADD replies");
    fprintf(out, "XADDs sent/s:          %s  (not sent, ring full: %llu)\n",
            bench_fmt_count(c2, sizeof c2, sent), (unsigned long long)g_not_sent);
    print_lat(out, "XADD reply latency:", &g_pub_lat);
    if (g_o.subs > 0) {
        fprintf(out, "deliveries/s:          %s  (all subscribers together)\n",
                bench_fmt_count(c1, sizeof c1, deliv));
        print_lat(out, "delivery latency:", &g_deliv_lat);
    }
    if (g_o.wait > 0)
        fprintf(out,
                "WAIT %u %u: publishes acknowledged only with >= %u replicas; "
                "short of them (timeout): %llu\n",
                g_o.wait, g_wait_ms, g_o.wait, (unsigned long long)g_wait_short);
    fprintf(out, "errors: %llu\n", (unsigned long long)g_errors);
    fprintf(out, "CPU: arq-redis-bench %.0f%% of one core", bcpu * 100);
    if (scpu >= 0)
        fprintf(out, ", redis-server (pid %ld) %.0f%%", g_o.server_pid, scpu * 100);
    fprintf(out,
            "\nmachine stalls: %llu (a 1 ms sleep woke > %.0f ms late), %.0f ms, longest %.1f ms\n",
            (unsigned long long)w->stalls.stalls, BENCH_STALL_NS / 1e6, w->stalls.stalled_ms,
            w->stalls.max_ms);
    if (!g_o.json)
        return;
    printf("{\"tool\":\"arq-redis-bench\",\"config\":{\"conns\":%u,\"depth\":%u,"
           "\"subscribers\":%u,\"streams\":%u,\"payload_bytes\":%u,\"seconds\":%g,"
           "\"warmup\":%g,\"rate\":%g,\"tick_us\":%u,\"xread_count\":%s,\"wait\":%u,"
           "\"wait_timeout_ms\":%u}",
           g_o.conns, g_o.depth, g_o.subs, RB_STREAMS, g_o.size, g_o.seconds, g_o.warmup, g_o.rate,
           g_o.tick_us, g_o.count, g_o.wait, g_wait_ms);
    printf(",\"window_s\":%.3f,\"publishes_per_s\":%.1f,\"sent_per_s\":%.1f,\"not_sent\":%llu,"
           "\"deliveries_per_s\":%.1f,\"errors\":%llu,\"wait_short\":%llu",
           win, rate, sent, (unsigned long long)g_not_sent, deliv, (unsigned long long)g_errors,
           (unsigned long long)g_wait_short);
    json_lat("puback_latency", &g_pub_lat);
    json_lat("delivery_latency", &g_deliv_lat);
    printf(",\"stalls\":{\"count\":%llu,\"ms\":%.1f,\"max_ms\":%.1f},\"bench_cpu\":%.3f,"
           "\"server_cpu\":",
           (unsigned long long)w->stalls.stalls, w->stalls.stalled_ms, w->stalls.max_ms, bcpu);
    if (scpu >= 0)
        printf("%.3f}\n", scpu);
    else
        printf("null}\n");
}

int main(int argc, char **argv)
{
    if (parse_opts(argc, argv) != 0)
        return 2;
    FILE *out = g_o.json ? stderr : stdout;
    unsigned total = g_o.conns + g_o.subs;
    g_cs = calloc(total, sizeof *g_cs);
    g_payload = malloc(g_o.size);
    /* As arq-bench: a timerfd, so that a 200 us tick is 200 us and not
     * epoll_wait's millisecond (which would send the same load in 5x
     * larger, 5x rarer bursts). */
    struct event_config *cfg = event_config_new();
    if (cfg != NULL)
        event_config_set_flag(cfg, EVENT_BASE_FLAG_PRECISE_TIMER);
    g_base = cfg ? event_base_new_with_config(cfg) : NULL;
    if (cfg != NULL)
        event_config_free(cfg);
    if (g_cs == NULL || g_payload == NULL || g_base == NULL) {
        fprintf(stderr, "arq-redis-bench: out of memory\n");
        return 1;
    }
    memset(g_payload, 'x', g_o.size);
    int rc = 1;
    struct event *tick = NULL;
    for (; g_n < total; g_n++) {
        struct conn *c = &g_cs[g_n];
        c->idx = g_n;
        c->sub = g_n >= g_o.conns;
        if (connect_one(c) != 0) {
            g_n++;
            goto out;
        }
    }
    if (reset_streams(&g_cs[0]) != 0)
        goto out;
    fprintf(out, "arq-redis-bench: %s:%s, %u publishers, %u subscribers\n", g_o.host, g_o.port,
            g_o.conns, g_o.subs);
    for (unsigned i = 0; i < g_n; i++) {
        struct conn *c = &g_cs[i];
        evutil_make_socket_nonblocking(c->fd);
        c->rev = event_new(g_base, c->fd, EV_READ | EV_PERSIST, on_read, c);
        c->wev = event_new(g_base, c->fd, EV_WRITE, on_write, c);
        if (c->rev == NULL || c->wev == NULL)
            goto out;
        event_add(c->rev, NULL);
        c->k = i; /* publishers start on different streams */
    }
    /* subscribers block first, then the publishers start */
    for (unsigned i = g_o.conns; i < g_n; i++) {
        send_xread(&g_cs[i]);
        flush(&g_cs[i]);
    }
    g_t_start = bench_now_ns();
    if (g_o.rate > 0) {
        struct timeval tv = {(time_t)(g_o.tick_us / 1000000), (suseconds_t)(g_o.tick_us % 1000000)};
        tick = event_new(g_base, -1, EV_PERSIST, on_tick, NULL);
        if (tick == NULL)
            goto out;
        event_add(tick, &tv);
    } else {
        for (unsigned i = 0; i < g_o.conns; i++) {
            for (unsigned k = 0; k < g_o.depth; k++)
                (void)send_pub(&g_cs[i]);
            flush(&g_cs[i]);
        }
    }
    if (bench_run_start(&g_sched, g_base, &g_inflight_total, g_o.warmup, g_o.seconds,
                        g_o.server_pid, on_drain_timeout) != 0)
        goto out;
    event_base_dispatch(g_base);
    bench_run_free(&g_sched);
    if (g_sched.m.t1 == 0) {
        if (!g_failed)
            fail("the run ended before its window");
        goto out;
    }
    report(out, &g_sched.m);
    rc = g_errors == 0 && g_acks > 0 && (g_o.subs == 0 || g_deliveries > 0) && !g_failed ? 0 : 1;
out:
    if (tick != NULL)
        event_free(tick);
    bench_run_free(&g_sched);
    for (unsigned i = 0; i < g_n; i++) {
        struct conn *c = &g_cs[i];
        if (c->rev != NULL)
            event_free(c->rev);
        if (c->wev != NULL)
            event_free(c->wev);
        if (c->fd >= 0)
            close(c->fd);
        if (c->rd != NULL)
            redisReaderFree(c->rd);
        bench_out_free(&c->out);
        free(c->sent_ns);
    }
    event_base_free(g_base);
    free(g_cs);
    free(g_payload);
    return rc;
}
