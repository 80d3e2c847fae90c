/*
 * nats_bench.c - arq-nats-bench: acknowledged publishes to NATS JetStream,
 * the second peer of docs/benchmarks.md ("Peers"), measured like arq-bench's
 * closed loop: C connections, each with W publishes in flight, 128-byte
 * payloads, acknowledgements per second over a window after a warm-up, and
 * the publish -> acknowledgement latency.
 *
 * A JetStream publish is a core NATS message, with a reply subject, on a
 * subject a stream captures; the server stores it and answers on the reply
 * subject with a PubAck ({"stream":..,"seq":N}). This speaks the NATS client
 * protocol itself (INFO / CONNECT / SUB / PUB / MSG / PING / PONG: text lines
 * plus sized payloads) on one libevent loop, as arq-bench speaks arq.v1.
 * Debian's libnats was tried first: its threads per connection (reader,
 * flusher, delivery) cost ~37 us of futex wake-ups per message on this VM,
 * so the generator used 1.2 cores and was the bottleneck, not the server
 * (docs/benchmarks.md).
 *
 * Each message's reply subject is _INBOX.<run>.<conn>.<id>; one wildcard
 * subscription per connection receives the acks, and <id> finds the send
 * time. Subjects arqbench.0 .. arqbench.7 (as arq-bench's 8 streams), one
 * file-storage stream capturing them, created if missing.
 *
 * Debian's nats-server 2.9.10 fsyncs its file store on a timer (2 minutes by
 * default) and cannot be told to sync before acknowledging, so these acks
 * are not durable: see docs/benchmarks.md.
 *
 * Against a JetStream cluster (bench/ha_peers.sh): --replicas N creates the
 * stream with num_replicas N, and --url may be given several times, the
 * connections then going round-robin over the servers (connection i to URL
 * i mod n), as an application's clients spread over a cluster; a publish
 * reaching a server other than the stream's leader is forwarded to it. In
 * clustered mode the leader proposes each message to the stream's raft
 * group and sends the PubAck once the entry is committed, i.e. held by a
 * quorum (2 of 3 for R3) - in memory: the same 2.9.10 file store, no fsync
 * before the ack. The stream's replica count, leader and peers are read back
 * with STREAM.INFO before the run and reported.
 */
#include <errno.h>
#include <stdarg.h>
#include <event2/event.h>
#include <getopt.h>
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

#define NB_MAX_CONNS 1000u
#define NB_SUBJECTS  8u
#define NB_RING      65536u /* send times per connection, by id; a power of two */
#define NB_IN_MAX    (1u << 20)
#define NB_MAX_URLS  16u

struct opts {
    struct {
        char host[256], port[16];
    } url[NB_MAX_URLS];
    unsigned n_urls;
    const char *stream;
    unsigned conns, depth, size, replicas;
    double seconds, warmup;
    long server_pid;
    int json;
};

struct conn {
    unsigned idx;
    int fd;
    struct event *rev, *wev;
    uint8_t *in;
    size_t in_len;
    bench_out_t out;
    unsigned inflight;
    uint64_t next_id;
    uint64_t *sent_ns; /* NB_RING */
    char subj[32];
};

static struct opts g_o;
static struct event_base *g_base;
static struct conn *g_cs;
static int g_failed;
static bench_run_t g_sched; /* warm-up, window, drain */
static unsigned g_run;      /* this run's id in the reply subjects */
static uint64_t g_acks, g_errors, g_inflight_total;
static bench_hist_t g_lat;
static uint8_t *g_payload;
static char g_leader[64]; /* the stream's raft leader (STREAM.INFO), or "" */
static char g_peers[256]; /* its other replicas, "name:current ..." */

__attribute__((format(printf, 1, 2))) static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "arq-nats-bench: ");
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

static void flush(struct conn *c)
{
    int rc = bench_out_flush(&c->out, c->fd);
    if (rc == 1)
        event_add(c->wev, NULL);
    else if (rc < 0)
        fail("send on connection %u: %s", c->idx, strerror(errno));
}

static void send_pub(struct conn *c)
{
    uint64_t id = c->next_id++;
    uint64_t t = bench_now_ns();
    for (unsigned i = 0; i < 8; i++)
        g_payload[i] = (uint8_t)(t >> (8 * i));
    char hdr[128];
    int n = snprintf(hdr, sizeof hdr, "PUB %s _INBOX.%u.%u.%llu %u\r\n", c->subj, g_run, c->idx,
                     (unsigned long long)id, g_o.size);
    out_add(c, hdr, (size_t)n);
    out_add(c, g_payload, g_o.size);
    out_add(c, "\r\n", 2);
    c->sent_ns[id & (NB_RING - 1)] = t;
    c->inflight++;
    g_inflight_total++;
}

/* ---- input: the server's protocol lines ----------------------------------- */

/* An ack arrived for id on c: payload is the PubAck JSON. */
static void on_ack(struct conn *c, uint64_t id, const uint8_t *p, size_t n)
{
    uint64_t t = bench_now_ns();
    if (c->inflight > 0) {
        c->inflight--;
        g_inflight_total--;
    }
    /* {"stream":"ARQBENCH","seq":N} or {"error":{...}} */
    bool ok = memmem(p, n, "\"seq\"", 5) != NULL && memmem(p, n, "\"error\"", 7) == NULL;
    if (!ok) {
        if (g_errors++ < 5)
            fprintf(stderr, "arq-nats-bench: publish refused: %.*s\n", (int)(n > 300 ? 300 : n),
                    (const char *)p);
    } else if (g_sched.phase == BENCH_PH_MEASURE) {
        g_acks++;
        uint64_t s = c->sent_ns[id & (NB_RING - 1)];
        bench_hist_add(&g_lat, t > s ? t - s : 0);
    }
    if (g_sched.phase != BENCH_PH_STOP)
        send_pub(c);
}

/* Parses what is in c->in; returns bytes consumed, or -1 on a protocol error. */
static long parse(struct conn *c)
{
    size_t off = 0;
    while (off < c->in_len) {
        const uint8_t *line = c->in + off;
        const uint8_t *eol = memmem(line, c->in_len - off, "\r\n", 2);
        if (eol == NULL)
            break;
        size_t ll = (size_t)(eol - line);
        if (ll >= 3 && memcmp(line, "MSG", 3) == 0) {
            /* MSG <subject> <sid> [reply-to] <#bytes> */
            char buf[512];
            if (ll >= sizeof buf)
                return -1;
            memcpy(buf, line, ll);
            buf[ll] = '\0';
            char *f[5];
            int nf = 0;
            for (char *tok = strtok(buf, " "); tok && nf < 5; tok = strtok(NULL, " "))
                f[nf++] = tok;
            if (nf < 4)
                return -1;
            char *end;
            unsigned long long len = strtoull(f[nf - 1], &end, 10);
            if (*end || len > NB_IN_MAX)
                return -1;
            size_t need = ll + 2 + (size_t)len + 2;
            if (c->in_len - off < need)
                break; /* the payload is not all here yet */
            const uint8_t *payload = eol + 2;
            /* _INBOX.<run>.<conn>.<id> */
            unsigned run, ci;
            unsigned long long id;
            if (sscanf(f[1], "_INBOX.%u.%u.%llu", &run, &ci, &id) == 3 && run == g_run &&
                ci == c->idx)
                on_ack(c, id, payload, (size_t)len);
            off += need;
            continue;
        }
        if (ll == 4 && memcmp(line, "PING", 4) == 0)
            out_add(c, "PONG\r\n", 6);
        else if (ll >= 4 && memcmp(line, "-ERR", 4) == 0) {
            fail("server error on connection %u: %.*s", c->idx, (int)ll, (const char *)line);
            return -1;
        }
        /* INFO, PONG, +OK: nothing to do */
        off += ll + 2;
    }
    return (long)off;
}

static void on_read(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct conn *c = arg;
    for (;;) {
        if (c->in_len == NB_IN_MAX) {
            fail("connection %u: a protocol line over %u bytes", c->idx, NB_IN_MAX);
            return;
        }
        ssize_t r = recv(c->fd, c->in + c->in_len, NB_IN_MAX - c->in_len, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (r <= 0) {
            fail("connection %u closed by the server", c->idx);
            return;
        }
        c->in_len += (size_t)r;
        long used = parse(c);
        if (used < 0) {
            if (!g_failed)
                fail("connection %u: protocol error", c->idx);
            return;
        }
        memmove(c->in, c->in + used, c->in_len - (size_t)used);
        c->in_len -= (size_t)used;
        if ((size_t)r < 16384)
            break;
    }
    flush(c);
    bench_run_check_drained(&g_sched);
}

static void on_write(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    flush(arg);
}

/* ---- set-up ---------------------------------------------------------------- */

/* Blocking: read until a line starting with want (skipping INFO, +OK and
 * PINGs, which get their PONG); copies the line (and, for MSG, its payload)
 * into buf. */
static int read_until(struct conn *c, const char *want, char *buf, size_t cap)
{
    for (;;) {
        uint8_t *eol = memmem(c->in, c->in_len, "\r\n", 2);
        if (eol != NULL) {
            size_t ll = (size_t)(eol - c->in), take = ll + 2;
            if (ll >= 3 && memcmp(c->in, "MSG", 3) == 0) {
                const uint8_t *sp = eol;
                while (sp > c->in && sp[-1] != ' ')
                    sp--;
                size_t plen = strtoul((const char *)sp, NULL, 10);
                if (c->in_len < take + plen + 2)
                    goto more;
                take += plen + 2;
            }
            bool match = ll >= strlen(want) && memcmp(c->in, want, strlen(want)) == 0;
            bool ping = ll == 4 && memcmp(c->in, "PING", 4) == 0;
            bool err = ll >= 4 && memcmp(c->in, "-ERR", 4) == 0;
            if (match || err) {
                size_t n = take < cap ? take : cap - 1;
                memcpy(buf, c->in, n);
                buf[n] = '\0';
            }
            memmove(c->in, c->in + take, c->in_len - take);
            c->in_len -= take;
            if (ping && write(c->fd, "PONG\r\n", 6) != 6)
                return -1;
            if (err)
                return -1;
            if (match)
                return 0;
            continue;
        }
    more:
        if (c->in_len == NB_IN_MAX)
            return -1;
        ssize_t r = recv(c->fd, c->in + c->in_len, NB_IN_MAX - c->in_len, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        c->in_len += (size_t)r;
    }
}

static int connect_one(struct conn *c)
{
    c->in = malloc(NB_IN_MAX);
    c->sent_ns = calloc(NB_RING, sizeof *c->sent_ns);
    if (c->in == NULL || c->sent_ns == NULL)
        return -1;
    const char *host = g_o.url[c->idx % g_o.n_urls].host, *port = g_o.url[c->idx % g_o.n_urls].port;
    c->fd = bench_tcp_connect(host, port);
    if (c->fd < 0) {
        fprintf(stderr, "arq-nats-bench: connect %s:%s: %s\n", host, port, strerror(errno));
        return -1;
    }
    /* the set-up reads block; a server that never answers (a cluster
     * without a JetStream leader yet) fails the run instead of hanging it */
    struct timeval tv = {10, 0};
    (void)setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char line[4096], hello[512];
    if (read_until(c, "INFO", line, sizeof line) != 0) {
        fprintf(stderr, "arq-nats-bench: no INFO from %s:%s\n", host, port);
        return -1;
    }
    int n = snprintf(hello, sizeof hello,
                     "CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false,"
                     "\"protocol\":1,\"name\":\"arq-nats-bench\",\"lang\":\"c\","
                     "\"version\":\"0\"}\r\nSUB _INBOX.%u.%u.* 1\r\nPING\r\n",
                     g_run, c->idx);
    if (bench_send_all(c->fd, hello, (size_t)n) != 0 || read_until(c, "PONG", line, sizeof line)) {
        fprintf(stderr, "arq-nats-bench: CONNECT refused: %s\n", line);
        return -1;
    }
    snprintf(c->subj, sizeof c->subj, "arqbench.%u", c->idx % NB_SUBJECTS);
    return 0;
}

/* Copies the JSON string value after `"key":"` in text into buf; 0, or -1. */
static int json_str_after(const char *text, const char *key, char *buf, size_t cap)
{
    const char *p = strstr(text, key);
    if (p == NULL)
        return -1;
    p += strlen(key);
    size_t n = strcspn(p, "\"");
    if (n >= cap || p[n] != '"')
        return -1;
    memcpy(buf, p, n);
    buf[n] = '\0';
    return 0;
}

/* Sends a JetStream API request on c (blocking) and reads its answer into line. */
static int js_request(struct conn *c, const char *api, const char *tag, const char *body,
                      char *line, size_t cap)
{
    char req[1024];
    int rn = snprintf(req, sizeof req, "PUB $JS.API.%s _INBOX.%u.%u.%s %zu\r\n%s\r\n", api, g_run,
                      c->idx, tag, strlen(body), body);
    if (rn < 0 || (size_t)rn >= sizeof req || bench_send_all(c->fd, req, (size_t)rn) != 0)
        return -1;
    return read_until(c, "MSG", line, cap);
}

/* The stream capturing arqbench.*, created through the JetStream API on
 * connection c (before it goes non-blocking); an existing one is used if it
 * has the replica count asked for. Then STREAM.INFO: its leader and peers. */
static int ensure_stream(struct conn *c)
{
    char body[512], api[128], line[8192];
    snprintf(body, sizeof body,
             "{\"name\":\"%s\",\"subjects\":[\"arqbench.*\"],\"storage\":\"file\","
             "\"retention\":\"limits\",\"num_replicas\":%u}",
             g_o.stream, g_o.replicas);
    snprintf(api, sizeof api, "STREAM.CREATE.%s", g_o.stream);
    if (js_request(c, api, "create", body, line, sizeof line) != 0) {
        fprintf(stderr, "arq-nats-bench: no answer to the stream creation (JetStream on? "
                        "a cluster with a meta leader?)\n");
        return -1;
    }
    /* {"type":"io.nats.jetstream.api.v1.stream_create_response","config":..} or an error;
     * 10058: "stream name already in use" */
    if (strstr(line, "\"error\"") != NULL && strstr(line, "10058") == NULL) {
        fprintf(stderr, "arq-nats-bench: creating stream %s: %s\n", g_o.stream, line);
        return -1;
    }
    snprintf(api, sizeof api, "STREAM.INFO.%s", g_o.stream);
    if (js_request(c, api, "info", "", line, sizeof line) != 0 ||
        strstr(line, "\"error\"") != NULL) {
        fprintf(stderr, "arq-nats-bench: STREAM.INFO %s: %s\n", g_o.stream, line);
        return -1;
    }
    char want[32];
    snprintf(want, sizeof want, "\"num_replicas\":%u", g_o.replicas);
    if (strstr(line, want) == NULL) {
        fprintf(stderr,
                "arq-nats-bench: stream %s exists with another replica count (want %u): %s\n",
                g_o.stream, g_o.replicas, line);
        return -1;
    }
    /* "cluster":{"name":..,"leader":"n1","replicas":[{"name":"n2","current":true,..},..]} */
    const char *cl = strstr(line, "\"cluster\":");
    if (cl != NULL)
        (void)json_str_after(cl, "\"leader\":\"", g_leader, sizeof g_leader);
    const char *rp = cl != NULL ? strstr(cl, "\"replicas\":[") : NULL;
    size_t used = 0;
    while (rp != NULL && (rp = strstr(rp, "{\"name\":\"")) != NULL) {
        char name[64];
        if (json_str_after(rp, "{\"name\":\"", name, sizeof name) != 0)
            break;
        const char *cur = strstr(rp, "\"current\":");
        bool current = cur != NULL && strncmp(cur + 10, "true", 4) == 0;
        int k = snprintf(g_peers + used, sizeof g_peers - used, "%s%s:%s", used ? " " : "", name,
                         current ? "current" : "behind");
        if (k < 0 || (size_t)k >= sizeof g_peers - used)
            break;
        used += (size_t)k;
        rp++;
    }
    if (g_o.replicas > 1 && g_leader[0] == '\0') {
        fprintf(stderr, "arq-nats-bench: stream %s has no leader yet: %s\n", g_o.stream, line);
        return -1;
    }
    return 0;
}

/* ---- the run ------------------------------------------------------------- */

static void on_drain_timeout(void)
{
    fail("%llu publishes were never acknowledged", (unsigned long long)g_inflight_total);
}

/* ---- options --------------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f, "usage: arq-nats-bench --url nats://HOST:PORT [--url ...] [-c CONNS] [-w DEPTH]\n"
               "                      [--seconds S] [--warmup S] [--size BYTES] [--stream NAME]\n"
               "                      [--replicas N] [--server-pid PID] [--json]\n"
               "\n"
               "JetStream publishes acknowledged per second, like arq-bench's closed loop\n"
               "(docs/benchmarks.md, \"Peers\"). Needs a nats-server with JetStream (-js).\n"
               "\n"
               "  --url URL          a server; given several times (a cluster's), connection i\n"
               "                     goes to URL i mod n\n"
               "  -c, --conns C      connections (default 50)\n"
               "  -w, --depth W      publishes in flight per connection (default 1)\n"
               "  --seconds S        measurement window (default 5)\n"
               "  --warmup S         warm-up before the window (default 1)\n"
               "  --size BYTES       payload size, >= 8 (default 128)\n"
               "  --stream NAME      the JetStream stream (default ARQBENCH; created if missing,\n"
               "                     file storage, subjects arqbench.*)\n"
               "  --replicas N       the stream's num_replicas (default 1; 3 for an R3 stream\n"
               "                     on a 3-node cluster); an existing stream must match\n"
               "  --server-pid PID   also report this process's CPU use (the server's)\n"
               "  --json             one JSON object on stdout; the text goes to stderr\n");
}

static int parse_opts(int argc, char **argv)
{
    static const struct option lo[] = {
        {"url", required_argument, NULL, 'u'},
        {"conns", required_argument, NULL, 'c'},
        {"depth", required_argument, NULL, 'w'},
        {"seconds", required_argument, NULL, 'S'},
        {"warmup", required_argument, NULL, 'W'},
        {"size", required_argument, NULL, 'z'},
        {"stream", required_argument, NULL, 'n'},
        {"replicas", required_argument, NULL, 'R'},
        {"server-pid", required_argument, NULL, 'p'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    g_o.stream = "ARQBENCH";
    g_o.replicas = 1;
    g_o.conns = 50;
    g_o.depth = 1;
    g_o.size = 128;
    g_o.seconds = 5;
    g_o.warmup = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, "c:w:h", lo, NULL)) != -1) {
        double v = 0;
        int bad = 0;
        switch (ch) {
        case 'u':
            bad = g_o.n_urls == NB_MAX_URLS ||
                  bench_parse_url(optarg, "nats", g_o.url[g_o.n_urls].host,
                                  sizeof g_o.url[g_o.n_urls].host, g_o.url[g_o.n_urls].port,
                                  sizeof g_o.url[g_o.n_urls].port);
            if (!bad)
                g_o.n_urls++;
            break;
        case 'R':
            bad = bench_parse_num(optarg, 1, 5, &v) || v != (unsigned)v;
            g_o.replicas = (unsigned)v;
            break;
        case 'c':
            bad = bench_parse_num(optarg, 1, NB_MAX_CONNS, &v) || v != (unsigned)v;
            g_o.conns = (unsigned)v;
            break;
        case 'w':
            bad = bench_parse_num(optarg, 1, NB_RING / 2, &v) || v != (unsigned)v;
            g_o.depth = (unsigned)v;
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
        case 'n':
            g_o.stream = optarg;
            bad = optarg[0] == '\0' || strlen(optarg) > 64 ||
                  strspn(optarg,
                         "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-") !=
                      strlen(optarg);
            break;
        case 'p':
            bad = bench_parse_num(optarg, 1, 1e9, &v) || v != (long)v;
            g_o.server_pid = (long)v;
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
            fprintf(stderr, "arq-nats-bench: bad value for an option: '%s'\n", optarg);
            return -1;
        }
    }
    if (optind != argc || g_o.n_urls == 0) {
        usage(stderr);
        return -1;
    }
    return 0;
}

static void report(FILE *out, const bench_window_t *w)
{
    double win = bench_window_s(w), rate = (double)g_acks / win;
    double bcpu = bench_window_cpu(w), scpu = bench_window_server_cpu(w);
    char c1[32];
    fprintf(out, "acknowledged publishes/s: %s  (acks in the window / window, %.2f s)\n",
            bench_fmt_count(c1, sizeof c1, rate), win);
    fprintf(out, "ack latency: p50 %8.3f ms   p99 %8.3f ms   p99.9 %8.3f ms   (%llu samples)\n",
            bench_hist_q_us(&g_lat, 0.5) / 1e3, bench_hist_q_us(&g_lat, 0.99) / 1e3,
            bench_hist_q_us(&g_lat, 0.999) / 1e3, (unsigned long long)g_lat.n);
    fprintf(out, "errors: %llu\n", (unsigned long long)g_errors);
    fprintf(out, "CPU: arq-nats-bench %.0f%% of one core", bcpu * 100);
    if (scpu >= 0)
        fprintf(out, ", nats-server (pid %ld) %.0f%%", g_o.server_pid, scpu * 100);
    fprintf(out,
            "\nmachine stalls: %llu (a 1 ms sleep woke > %.0f ms late), %.0f ms, longest %.1f ms\n",
            (unsigned long long)w->stalls.stalls, BENCH_STALL_NS / 1e6, w->stalls.stalled_ms,
            w->stalls.max_ms);
    if (!g_o.json)
        return;
    printf("{\"tool\":\"arq-nats-bench\",\"config\":{\"conns\":%u,\"depth\":%u,"
           "\"payload_bytes\":%u,\"seconds\":%g,\"warmup\":%g,\"replicas\":%u,\"servers\":%u,"
           "\"stream\":",
           g_o.conns, g_o.depth, g_o.size, g_o.seconds, g_o.warmup, g_o.replicas, g_o.n_urls);
    bench_json_str(stdout, g_o.stream);
    printf("},\"stream_leader\":");
    bench_json_str(stdout, g_leader);
    printf(",\"stream_peers\":");
    bench_json_str(stdout, g_peers);
    printf(",\"window_s\":%.3f,\"publishes_per_s\":%.1f,\"errors\":%llu,"
           "\"ack_latency\":{\"samples\":%llu,\"p50_us\":%.1f,\"p99_us\":%.1f,"
           "\"p999_us\":%.1f},\"stalls\":{\"count\":%llu,\"ms\":%.1f,\"max_ms\":%.1f},"
           "\"bench_cpu\":%.3f,\"server_cpu\":",
           win, rate, (unsigned long long)g_errors, (unsigned long long)g_lat.n,
           bench_hist_q_us(&g_lat, 0.5), bench_hist_q_us(&g_lat, 0.99),
           bench_hist_q_us(&g_lat, 0.999), (unsigned long long)w->stalls.stalls,
           w->stalls.stalled_ms, w->stalls.max_ms, bcpu);
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
    g_run = (unsigned)getpid();
    g_cs = calloc(g_o.conns, sizeof *g_cs);
    g_payload = malloc(g_o.size);
    g_base = event_base_new();
    if (g_cs == NULL || g_payload == NULL || g_base == NULL) {
        fprintf(stderr, "arq-nats-bench: out of memory\n");
        return 1;
    }
    memset(g_payload, 'x', g_o.size);
    int rc = 1;
    unsigned n = 0;
    for (; n < g_o.conns; n++) {
        g_cs[n].idx = n;
        g_cs[n].fd = -1;
        if (connect_one(&g_cs[n]) != 0) {
            n++;
            goto out;
        }
    }
    if (ensure_stream(&g_cs[0]) != 0)
        goto out;
    fprintf(out,
            "arq-nats-bench: %u connections x %u in flight over %u server(s), %u-byte payloads, "
            "stream %s R%u",
            g_o.conns, g_o.depth, g_o.n_urls, g_o.size, g_o.stream, g_o.replicas);
    if (g_leader[0] != '\0')
        fprintf(out, ", leader %s, peers %s", g_leader, g_peers);
    fputc('\n', out);
    for (unsigned i = 0; i < n; i++) {
        struct conn *c = &g_cs[i];
        evutil_make_socket_nonblocking(c->fd);
        c->rev = event_new(g_base, c->fd, EV_READ | EV_PERSIST, on_read, c);
        c->wev = event_new(g_base, c->fd, EV_WRITE, on_write, c);
        if (c->rev == NULL || c->wev == NULL)
            goto out;
        event_add(c->rev, NULL);
        for (unsigned k = 0; k < g_o.depth; k++)
            send_pub(c);
        flush(c);
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
    rc = g_errors == 0 && g_acks > 0 && !g_failed ? 0 : 1;
out:
    bench_run_free(&g_sched);
    for (unsigned i = 0; i < n; i++) {
        struct conn *c = &g_cs[i];
        if (c->rev != NULL)
            event_free(c->rev);
        if (c->wev != NULL)
            event_free(c->wev);
        if (c->fd >= 0)
            close(c->fd);
        free(c->in);
        bench_out_free(&c->out);
        free(c->sent_ns);
    }
    event_base_free(g_base);
    free(g_cs);
    free(g_payload);
    return rc;
}
