/*
 * arq_bench.c - arq-bench: an arq.v1 load generator for a running arqd.
 *
 * C publisher connections each keep W publishes in flight (the next `pub`
 * goes out when a `puback` or `nack` arrives), or, with --rate R, publish
 * open-loop at R messages/s in aggregate. Payloads (128 bytes by default)
 * carry their send time (CLOCK_MONOTONIC ns, little endian) in the first 8
 * bytes and go round-robin over a few streams. S subscriber connections
 * subscribe to every stream from "latest" and acknowledge every message
 * (one cumulative `ack` per stream after each read burst); the delivery
 * latency is "now - embedded send time", so publisher and subscriber must
 * share the host's monotonic clock.
 *
 * Reported over the measurement window (after a warm-up): durable
 * publishes/s (pubacks received / window), puback latency and delivery
 * latency p50/p99/p99.9 (log-linear histogram, ~3% resolution), deliveries/s,
 * this process's CPU use, optionally the server's CPU use (--server-pid) and
 * arqd's group-commit figures from its /metrics endpoint (commits and
 * messages per commit in the window).
 *
 * Two more modes (issue #4), each a sequence of phases rather than a timed
 * window:
 *
 * --catchup N: publish N messages to one fresh stream as fast as possible
 * (C publishers x W in flight), then one subscriber connection subscribes
 * from offset 1 and receives all N, acknowledging cumulatively every
 * max_inflight/4 messages (mid-burst, so the server's window never empties);
 * reported: msgs/s, payload and wire MB/s of the catch-up alone. With
 * --data-dir (arqd's), the same records are then read straight from the
 * LMDB environment (log_scan.h: a raw cursor over `log`, index+log lookups,
 * wal_stream_read) and the ratios printed.
 *
 * --storm C: C subscriber connections, each on one of K streams, are opened
 * all at once (non-blocking connects), receive and ack a few messages, are
 * dropped at once (RST), more messages are published while they are down,
 * and all reconnect at once with hello{session, resume_token}. Reported: how
 * many were resumed (welcome.resumed) and how long until all were welcomed,
 * resumed and caught up; a connection that was not resumed subscribes again
 * from its own offset (sub from = last offset + 1 with its epoch).
 *
 * The client side is implemented here directly: a TCP connect and HTTP
 * upgrade (blocking, or non-blocking in --storm), then non-blocking WebSocket
 * framing with wslay in client mode, msgpack-c for the messages, one libevent
 * loop in one thread.
 *
 * Exit status: 0; 1 on a connection failure, protocol error or nack (in
 * --storm: on a connection that could not be re-established, a hole in the
 * offsets or the timeout); 2 on bad usage; 130 if interrupted.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <msgpack.h>
#include <wslay/wslay.h>

#include "bench_util.h"
#include "log_scan.h"

#define AB_RING          65536u /* per-connection slots for send times of pending pubs */
#define AB_MAX_STREAMS   64u
#define AB_MAX_CONNS     10000u
#define AB_TICK_US       200u /* open-loop pacing timer (default of --tick-us) */
#define AB_MAX_BUCKETS   24u  /* arq_wal_batch_messages buckets kept */
#define AB_NACK_REPORTS  5u
#define AB_SETUP_TIMEOUT 10.0    /* seconds for all connections to be ready */
#define AB_STORM_MAX     100000u /* --storm connections and streams */
#define AB_SESSION_MAX   64u     /* session id and resume token, protocol.md 4a */
#define AB_STORM_RETRIES 50u     /* reconnect attempts per connection and phase */
#define AB_SCAN_BATCH    256u    /* records per read txn: the broker's CATCHUP_BATCH */

enum phase { PH_SETUP, PH_WARMUP, PH_MEASURE, PH_DONE };
enum mode { MODE_LOAD, MODE_CATCHUP, MODE_STORM };
enum role { ROLE_PUB, ROLE_SUB, ROLE_CU_SUB, ROLE_ST_SUB };
/* Connection state; the blocking conn_open() goes straight to CS_WS. */
enum cstate { CS_IDLE, CS_CONNECTING, CS_UPGRADE, CS_WS };
/* --storm phases */
enum sphase { SP_CONNECT, SP_BEFORE, SP_DOWN, SP_RECONNECT };

struct opts {
    char host[256];
    char port[16];
    char path[256];
    unsigned conns, depth, subs, streams;
    unsigned tick_us; /* open loop: pacing interval */
    double seconds, warmup, rate;
    unsigned size;
    int json;
    int metrics; /* scrape /metrics at the window's edges */
    long server_pid;
    enum mode mode;
    int conns_set, depth_set, streams_set;
    /* --catchup */
    uint64_t catchup_n;
    unsigned reps;
    char data_dir[4096];
    /* --storm */
    unsigned storm_conns;
    unsigned before, during; /* messages per stream before the drop / while down */
    int resume;              /* send session + resume_token on reconnect */
    double timeout;          /* seconds per phase */
    double settle;           /* seconds between the last ack and the drop */
};

/* A histogram of arqd's /metrics: bucket bounds and cumulative counts. */
struct mhist {
    double sum;
    unsigned n;
    double le[AB_MAX_BUCKETS];
    double cum[AB_MAX_BUCKETS];
};

/* arqd's publish-time histograms (api/server.c), in this order */
enum { MH_TOTAL, MH_WAIT, MH_DISPATCH, MH_N };
static const char *const mh_names[MH_N] = {"arq_publish_seconds", "arq_publish_wait_seconds",
                                           "arq_publish_dispatch_seconds"};

struct metrics {
    int ok;
    double commits, committed_msgs, commit_sec_sum, commit_sec_count;
    double catchup_reads;
    unsigned n_buckets;
    double le[AB_MAX_BUCKETS];
    double cum[AB_MAX_BUCKETS];
    struct mhist pub[MH_N];
};

struct bench;

struct conn {
    struct bench *b;
    unsigned idx;
    int is_sub;
    int fd;
    wslay_event_context_ptr ws;
    struct event *rev, *wev;
    uint8_t *pending; /* bytes read past the HTTP response head */
    size_t pending_len, pending_off;
    uint8_t *out;
    size_t out_len, out_off, out_cap;
    int ready;
    unsigned subs_ok;
    uint64_t next_id;
    uint64_t inflight;
    uint64_t k; /* publishes sent: picks the stream */
    uint64_t *sent_ns;
    uint64_t ack_off[AB_MAX_STREAMS];
    uint64_t acked_off[AB_MAX_STREAMS];
    /* --catchup and --storm */
    enum role role;
    enum cstate st;
    int ack_due; /* stop reading until an ack went out (ws_recv_cb) */
    int lost;    /* set inside wslay callbacks, handled after wslay_event_recv */
    uint64_t rx_bytes;
    char *head; /* non-blocking upgrade: the response head so far */
    size_t head_len;
    unsigned sidx; /* --storm: its stream */
    uint64_t epoch;
    uint64_t got;      /* highest offset processed, contiguous */
    uint64_t ack_sent; /* highest offset acknowledged */
    int connected, welcomed, resumed, fresh, subscribed, caught; /* in this phase */
    uint64_t conn_max; /* highest offset received on this connection: what may be acked */
    unsigned retries;
    uint64_t t_welcome, t_caught;
    char session[AB_SESSION_MAX + 1], token[AB_SESSION_MAX + 1];
};

/* One catch-up: the subscriber's `sub` to offset N received. */
struct cu_rep {
    double seconds, first_msg_s;
    uint64_t msgs, payload_bytes, wire_bytes, acks;
    double bench_cpu, srv_cpu; /* fraction of one core; srv_cpu < 0: unknown */
    uint64_t catchup_reads;    /* arq_catchup_reads_total delta, 0 if unknown */
};

/* Per-stage times of one storm phase, ns after its start (0: not reached). */
struct st_times {
    uint64_t start;   /* CLOCK_MONOTONIC of the phase's start */
    uint64_t started; /* every connect() issued */
    uint64_t connected, welcomed, resumed, subscribed, caught;
    unsigned n_connected, n_welcomed, n_resumed, n_fresh, n_nosub, n_subscribed, n_caught;
    uint64_t retries, dups, holes;
    double bench_cpu, srv_cpu;
    bench_hist_t welcome_lat, caught_lat;
    /* the kernel's counters over the phase (whole machine, /proc/net) */
    int64_t listen_overflows, listen_drops, retrans_segs;
};

struct bench {
    struct opts o;
    char cmdline[1024];
    char stream_prefix[64];
    struct event_base *base;
    struct conn *conns; /* publishers first, then subscribers */
    unsigned n_conns, n_ready;
    enum phase phase;
    int failed, interrupted;
    uint64_t t_start, t_meas, t_end;
    /* open loop */
    struct event *tick;
    uint64_t scheduled, not_sent;
    unsigned rr;
    /* counters over the window */
    uint64_t pubacks, nacks, deliveries, pubs_sent;
    uint64_t pubacks_total, deliveries_total;
    bench_hist_t puback_lat, deliv_lat;
    /* delivery latency split at the record's time stamp ("ts": arqd's
     * CLOCK_REALTIME when its loop decoded the publish) */
    bench_hist_t to_srv_lat, from_srv_lat;
    int64_t real_minus_mono_ns; /* CLOCK_REALTIME - CLOCK_MONOTONIC at start */
    struct rusage ru0, ru1;
    bench_stall_probe_t *stall_probe; /* runs during the window */
    bench_stalls_t stalls;
    double srv_cpu0, srv_cpu1;
    struct metrics m0, m1;
    double load_before[3], load_after[3];
    uint8_t *payload;
    uint32_t mask_state;
    int timed_out;
    struct sockaddr_storage addr; /* --storm: resolved once */
    socklen_t addr_len;
    /* --catchup */
    uint64_t cu_sent, cu_acked;
    uint64_t cu_fill_t0, cu_fill_t1;
    unsigned cu_max_inflight, cu_ack_every, cu_cur;
    uint64_t cu_t0, cu_t1, cu_tfirst, cu_next_after; /* cu_next_after: subok.next */
    double cu_cpu0, cu_srv0;
    struct cu_rep *cu_reps;
    /* --storm */
    enum sphase sphase;
    unsigned st_n;       /* subscriber connections (conns[1..st_n]) */
    uint64_t *st_target; /* per stream: the last offset published */
    uint64_t st_pub_total, st_pub_acked;
    int st_targets_final; /* every publish of the phase acknowledged */
    struct st_times st_init, st_re;
    struct st_times *st_cur;
    uint64_t st_t_drop, st_t_dropped, st_t_published;
    uint64_t st_errors, st_closes, st_bad_session;
    double st_cpu0, st_srv0;
};

static struct bench g_b;

__attribute__((format(printf, 2, 3))) static void fail(struct bench *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "arq-bench: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    b->failed = 1;
    if (b->base != NULL)
        event_base_loopbreak(b->base);
}

/* ---- CPU of this process and of the server ------------------------------- */

static double rusage_sec(const struct rusage *r)
{
    return (double)r->ru_utime.tv_sec + (double)r->ru_utime.tv_usec / 1e6 +
           (double)r->ru_stime.tv_sec + (double)r->ru_stime.tv_usec / 1e6;
}

/* ---- /metrics (a blocking HTTP GET; taken at the window's edges) -------- */

static int tcp_connect(const struct opts *o)
{
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(o->host, o->port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "arq-bench: %s:%s: %s\n", o->host, o->port, gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0)
            continue;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        close(fd);
        fd = -1;
    }
    if (fd < 0)
        fprintf(stderr, "arq-bench: connect %s:%s: %s\n", o->host, o->port, strerror(errno));
    freeaddrinfo(res);
    return fd;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* "NAME_bucket{le=\"X\"} N" or "NAME_sum V" into h; 1 if it was one. */
static int mhist_parse_line(struct mhist *h, const char *name, const char *line)
{
    size_t nl = strlen(name);
    if (strncmp(line, name, nl) != 0)
        return 0;
    const char *p = line + nl;
    if (strncmp(p, "_sum ", 5) == 0) {
        h->sum = strtod(p + 5, NULL);
        return 1;
    }
    if (strncmp(p, "_bucket{le=\"", 12) != 0 || h->n >= AB_MAX_BUCKETS)
        return 0;
    p += 12;
    const char *sp = strrchr(line, ' ');
    if (sp == NULL)
        return 0;
    h->le[h->n] = strncmp(p, "+Inf", 4) == 0 ? INFINITY : strtod(p, NULL);
    h->cum[h->n] = strtod(sp + 1, NULL);
    h->n++;
    return 1;
}

static void metrics_parse_line(struct metrics *m, const char *line)
{
    double v;
    for (unsigned i = 0; i < MH_N; i++)
        if (mhist_parse_line(&m->pub[i], mh_names[i], line))
            return;
    if (sscanf(line, "arq_wal_commits_total %lf", &v) == 1)
        m->commits = v;
    else if (sscanf(line, "arq_wal_committed_messages_total %lf", &v) == 1)
        m->committed_msgs = v;
    else if (sscanf(line, "arq_wal_commit_seconds_sum %lf", &v) == 1)
        m->commit_sec_sum = v;
    else if (sscanf(line, "arq_wal_commit_seconds_count %lf", &v) == 1)
        m->commit_sec_count = v;
    else if (sscanf(line, "arq_catchup_reads_total %lf", &v) == 1)
        m->catchup_reads = v;
    else if (strncmp(line, "arq_wal_batch_messages_bucket{le=\"", 34) == 0 &&
             m->n_buckets < AB_MAX_BUCKETS) {
        const char *p = line + 34;
        double le = strncmp(p, "+Inf", 4) == 0 ? INFINITY : strtod(p, NULL);
        const char *sp = strrchr(line, ' ');
        if (sp != NULL) {
            m->le[m->n_buckets] = le;
            m->cum[m->n_buckets] = strtod(sp + 1, NULL);
            m->n_buckets++;
        }
    }
}

static void metrics_get(const struct opts *o, struct metrics *m)
{
    memset(m, 0, sizeof *m);
    int fd = tcp_connect(o);
    if (fd < 0)
        return;
    char req[512];
    int n = snprintf(req, sizeof req,
                     "GET /metrics HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n", o->host,
                     o->port);
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    if (buf == NULL || write_all(fd, req, (size_t)n) != 0)
        goto out;
    for (;;) {
        if (len + 1 >= cap) {
            char *nb = realloc(buf, cap * 2);
            if (nb == NULL)
                goto out;
            buf = nb;
            cap *= 2;
        }
        ssize_t r = recv(fd, buf + len, cap - len - 1, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        len += (size_t)r;
    }
    buf[len] = '\0';
    if (strncmp(buf, "HTTP/1.1 200", 12) != 0)
        goto out;
    char *body = strstr(buf, "\r\n\r\n");
    if (body == NULL)
        goto out;
    for (char *line = body + 4; line != NULL && *line;) {
        char *nl = strchr(line, '\n');
        if (nl != NULL)
            *nl = '\0';
        metrics_parse_line(m, line);
        line = nl ? nl + 1 : NULL;
    }
    m->ok = 1;
out:
    free(buf);
    close(fd);
}

/* ---- connection: output ------------------------------------------------ */

static int out_append(struct conn *c, const void *p, size_t n)
{
    if (c->out_off > 0 && c->out_off == c->out_len)
        c->out_off = c->out_len = 0;
    if (c->out_len + n > c->out_cap) {
        if (c->out_off > 0) {
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
        }
        size_t cap = c->out_cap ? c->out_cap : 4096;
        while (c->out_len + n > cap)
            cap *= 2;
        if (cap != c->out_cap) {
            uint8_t *nb = realloc(c->out, cap);
            if (nb == NULL)
                return -1;
            c->out = nb;
            c->out_cap = cap;
        }
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
    return 0;
}

/* wslay writes whole frames into the output buffer; conn_flush sends it. */
static ssize_t ws_send_cb(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                          void *user)
{
    (void)flags;
    struct conn *c = user;
    if (out_append(c, data, len) != 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return (ssize_t)len;
}

static ssize_t ws_recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                          void *user)
{
    (void)flags;
    struct conn *c = user;
    if (c->ack_due) { /* on_read sends the ack, then reads on */
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    if (c->pending_off < c->pending_len) {
        size_t n = c->pending_len - c->pending_off;
        if (n > len)
            n = len;
        memcpy(buf, c->pending + c->pending_off, n);
        c->pending_off += n;
        c->rx_bytes += n;
        return (ssize_t)n;
    }
    for (;;) {
        ssize_t r = recv(c->fd, buf, len, 0);
        if (r > 0) {
            c->rx_bytes += (uint64_t)r;
            return r;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
            return -1;
        }
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
}

static int ws_genmask_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, void *user)
{
    (void)ctx;
    struct conn *c = user;
    uint32_t x = c->b->mask_state;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        buf[i] = (uint8_t)x;
    }
    c->b->mask_state = x;
    return 0;
}

static void conn_flush(struct conn *c)
{
    if (c->ws != NULL && wslay_event_want_write(c->ws) && wslay_event_send(c->ws) != 0) {
        if (c->role == ROLE_ST_SUB) {
            c->lost = 1;
            return;
        }
        fail(c->b, "wslay_event_send failed on connection %s", c->is_sub ? "(sub)" : "(pub)");
        return;
    }
    while (c->out_off < c->out_len) {
        ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (w > 0) {
            c->out_off += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            event_add(c->wev, NULL);
            return;
        }
        if (c->role == ROLE_ST_SUB) {
            c->lost = 1;
            return;
        }
        fail(c->b, "send: %s", strerror(errno));
        return;
    }
    c->out_off = c->out_len = 0;
}

/* ---- msgpack ------------------------------------------------------------- */

struct fixbuf {
    uint8_t *p;
    size_t len, cap;
};

static int fixbuf_write(void *data, const char *buf, size_t len)
{
    struct fixbuf *f = data;
    if (f->len + len > f->cap)
        return -1;
    memcpy(f->p + f->len, buf, len);
    f->len += len;
    return 0;
}

static void pack_str(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

static void queue_msg(struct conn *c, const uint8_t *p, size_t n)
{
    struct wslay_event_msg m = {WSLAY_BINARY_FRAME, p, n};
    if (wslay_event_queue_msg(c->ws, &m) != 0)
        fail(c->b, "wslay_event_queue_msg failed");
}

static void stream_name(const struct bench *b, unsigned i, char *buf, size_t len)
{
    snprintf(buf, len, "%s.%u", b->stream_prefix, i);
}

/* With a session from an earlier welcome (--storm), asks to resume it. */
static void send_hello(struct conn *c)
{
    uint8_t raw[512];
    struct fixbuf fb = {raw, 0, sizeof raw};
    msgpack_packer pk;
    msgpack_packer_init(&pk, &fb, fixbuf_write);
    int resume = c->b->o.resume && c->session[0] != '\0' && c->token[0] != '\0';
    msgpack_pack_map(&pk, resume ? 4 : 2);
    pack_str(&pk, "t");
    pack_str(&pk, "hello");
    pack_str(&pk, "client");
    pack_str(&pk, "arq-bench/0.1");
    if (resume) {
        pack_str(&pk, "session");
        pack_str(&pk, c->session);
        pack_str(&pk, "resume_token");
        pack_str(&pk, c->token);
    }
    queue_msg(c, raw, fb.len);
}

static void send_subs(struct conn *c)
{
    for (unsigned i = 0; i < c->b->o.streams; i++) {
        uint8_t raw[512];
        char name[128];
        struct fixbuf fb = {raw, 0, sizeof raw};
        msgpack_packer pk;
        msgpack_packer_init(&pk, &fb, fixbuf_write);
        stream_name(c->b, i, name, sizeof name);
        msgpack_pack_map(&pk, 4);
        pack_str(&pk, "t");
        pack_str(&pk, "sub");
        pack_str(&pk, "id");
        msgpack_pack_uint64(&pk, ++c->next_id);
        pack_str(&pk, "stream");
        pack_str(&pk, name);
        pack_str(&pk, "from");
        pack_str(&pk, "latest");
        queue_msg(c, raw, fb.len);
    }
}

static void send_acks(struct conn *c)
{
    for (unsigned i = 0; i < c->b->o.streams; i++) {
        if (c->ack_off[i] <= c->acked_off[i])
            continue;
        uint8_t raw[256];
        char name[128];
        struct fixbuf fb = {raw, 0, sizeof raw};
        msgpack_packer pk;
        msgpack_packer_init(&pk, &fb, fixbuf_write);
        stream_name(c->b, i, name, sizeof name);
        msgpack_pack_map(&pk, 3);
        pack_str(&pk, "t");
        pack_str(&pk, "ack");
        pack_str(&pk, "stream");
        pack_str(&pk, name);
        pack_str(&pk, "offset");
        msgpack_pack_uint64(&pk, c->ack_off[i]);
        queue_msg(c, raw, fb.len);
        c->acked_off[i] = c->ack_off[i];
    }
}

/* Returns 0, or -1 when this connection's ring of send times is full. */
static int send_pub(struct conn *c)
{
    struct bench *b = c->b;
    if (c->inflight >= AB_RING - 1)
        return -1;
    uint8_t raw[64 + 256 + 65536];
    char name[128];
    struct fixbuf fb = {raw, 0, sizeof raw};
    msgpack_packer pk;
    msgpack_packer_init(&pk, &fb, fixbuf_write);
    stream_name(b, (unsigned)((c->idx + c->k++) % b->o.streams), name, sizeof name);
    uint64_t id = ++c->next_id;
    uint64_t t = bench_now_ns();
    for (unsigned i = 0; i < 8; i++)
        b->payload[i] = (uint8_t)(t >> (8 * i));
    msgpack_pack_map(&pk, 4);
    pack_str(&pk, "t");
    pack_str(&pk, "pub");
    pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, id);
    pack_str(&pk, "stream");
    pack_str(&pk, name);
    pack_str(&pk, "payload");
    msgpack_pack_bin(&pk, b->o.size);
    msgpack_pack_bin_body(&pk, b->payload, b->o.size);
    c->sent_ns[id & (AB_RING - 1)] = t;
    c->inflight++;
    if (b->phase == PH_MEASURE)
        b->pubs_sent++;
    queue_msg(c, raw, fb.len);
    return 0;
}

/* ---- the run ------------------------------------------------------------- */

static void on_tick(evutil_socket_t fd, short what, void *arg);

static void start_publishing(struct bench *b)
{
    b->phase = PH_WARMUP;
    b->t_start = bench_now_ns();
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    b->real_minus_mono_ns = (int64_t)rt.tv_sec * 1000000000 + rt.tv_nsec - (int64_t)bench_now_ns();
    if (b->o.rate > 0) {
        struct timeval tv = {(time_t)(b->o.tick_us / 1000000),
                             (suseconds_t)(b->o.tick_us % 1000000)};
        b->tick = event_new(b->base, -1, EV_PERSIST, on_tick, b);
        event_add(b->tick, &tv);
        return;
    }
    for (unsigned i = 0; i < b->o.conns; i++) {
        struct conn *c = &b->conns[i];
        for (unsigned k = 0; k < b->o.depth; k++)
            (void)send_pub(c);
        conn_flush(c);
    }
}

static void check_ready(struct bench *b)
{
    if (b->phase == PH_SETUP && b->n_ready == b->n_conns)
        start_publishing(b);
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct bench *b = arg;
    if (b->phase != PH_WARMUP && b->phase != PH_MEASURE)
        return;
    uint64_t due = (uint64_t)((double)(bench_now_ns() - b->t_start) * b->o.rate / 1e9);
    if (due <= b->scheduled)
        return;
    uint64_t n = due - b->scheduled;
    b->scheduled = due;
    unsigned first = b->rr;
    for (uint64_t i = 0; i < n; i++) {
        struct conn *c = &b->conns[b->rr];
        b->rr = (b->rr + 1) % b->o.conns;
        if (send_pub(c) != 0 && b->phase == PH_MEASURE)
            b->not_sent++;
    }
    /* Flush the connections that got something (all of them if n >= conns). */
    unsigned touched = n >= b->o.conns ? b->o.conns : (unsigned)n;
    for (unsigned i = 0; i < touched; i++)
        conn_flush(&b->conns[(first + i) % b->o.conns]);
}

static const msgpack_object *map_get(const msgpack_object *map, const char *key)
{
    size_t kl = strlen(key);
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object_kv *kv = &map->via.map.ptr[i];
        if (kv->key.type == MSGPACK_OBJECT_STR && kv->key.via.str.size == kl &&
            memcmp(kv->key.via.str.ptr, key, kl) == 0)
            return &kv->val;
    }
    return NULL;
}

static int obj_is(const msgpack_object *o, const char *s)
{
    size_t n = strlen(s);
    return o != NULL && o->type == MSGPACK_OBJECT_STR && o->via.str.size == n &&
           memcmp(o->via.str.ptr, s, n) == 0;
}

static uint64_t obj_u64(const msgpack_object *o)
{
    return o != NULL && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? o->via.u64 : 0;
}

/* The stream index is the number after the last '.'. */
static unsigned obj_stream_index(const struct bench *b, const msgpack_object *o)
{
    if (o == NULL || o->type != MSGPACK_OBJECT_STR)
        return UINT_MAX;
    unsigned v = 0;
    uint32_t i = o->via.str.size;
    uint32_t end = i;
    while (i > 0 && o->via.str.ptr[i - 1] >= '0' && o->via.str.ptr[i - 1] <= '9')
        i--;
    if (i == end)
        return UINT_MAX;
    for (; i < end; i++)
        v = v * 10 + (unsigned)(o->via.str.ptr[i] - '0');
    return v < b->o.streams ? v : UINT_MAX;
}

static void report_reason(const char *what, const msgpack_object *map)
{
    const msgpack_object *code = map_get(map, "code"), *reason = map_get(map, "reason");
    fprintf(stderr, "arq-bench: %s %llu: %.*s\n", what, (unsigned long long)obj_u64(code),
            reason && reason->type == MSGPACK_OBJECT_STR ? (int)reason->via.str.size : 0,
            reason && reason->type == MSGPACK_OBJECT_STR ? reason->via.str.ptr : "");
}

static void on_puback(struct conn *c, const msgpack_object *map, int nack)
{
    struct bench *b = c->b;
    uint64_t id = obj_u64(map_get(map, "id"));
    uint64_t t = bench_now_ns();
    if (c->inflight > 0)
        c->inflight--;
    if (nack) {
        if (b->nacks++ < AB_NACK_REPORTS)
            report_reason("nack", map);
    } else {
        b->pubacks_total++;
        if (b->phase == PH_MEASURE) {
            b->pubacks++;
            bench_hist_add(&b->puback_lat, t - c->sent_ns[id & (AB_RING - 1)]);
        }
    }
    if (b->o.rate <= 0 && (b->phase == PH_WARMUP || b->phase == PH_MEASURE))
        (void)send_pub(c);
}

static void on_delivery(struct conn *c, const msgpack_object *map)
{
    struct bench *b = c->b;
    const msgpack_object *payload = map_get(map, "payload");
    unsigned si = obj_stream_index(b, map_get(map, "stream"));
    uint64_t off = obj_u64(map_get(map, "offset"));
    if (si != UINT_MAX && off > c->ack_off[si])
        c->ack_off[si] = off;
    b->deliveries_total++;
    if (b->phase != PH_MEASURE || payload == NULL || payload->type != MSGPACK_OBJECT_BIN ||
        payload->via.bin.size < 8)
        return;
    uint64_t sent = 0;
    for (unsigned i = 0; i < 8; i++)
        sent |= (uint64_t)(uint8_t)payload->via.bin.ptr[i] << (8 * i);
    uint64_t t = bench_now_ns();
    b->deliveries++;
    bench_hist_add(&b->deliv_lat, t > sent ? t - sent : 0);
    uint64_t ts_us = obj_u64(map_get(map, "ts"));
    if (ts_us > 0) {
        /* the stamp on the monotonic clock; the two clocks only drift by
         * NTP slewing over a run, far below the buckets' resolution */
        int64_t dec = (int64_t)(ts_us * 1000) - b->real_minus_mono_ns;
        bench_hist_add(&b->to_srv_lat, dec > (int64_t)sent ? (uint64_t)(dec - (int64_t)sent) : 0);
        bench_hist_add(&b->from_srv_lat, (int64_t)t > dec ? (uint64_t)((int64_t)t - dec) : 0);
    }
}

static void cu_handle(struct conn *c, const msgpack_object *map, const msgpack_object *t);
static void st_handle(struct conn *c, const msgpack_object *map, const msgpack_object *t);
static void st_lost(struct conn *c);
static void cu_send_ack(struct conn *c);
static void st_send_ack(struct conn *c);
static void st_upgrade_read(struct conn *c);
static void st_connected(struct conn *c);

static void handle_proto(struct conn *c, const uint8_t *p, size_t n)
{
    struct bench *b = c->b;
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    if (msgpack_unpack_next(&u, (const char *)p, n, &off) != MSGPACK_UNPACK_SUCCESS ||
        u.data.type != MSGPACK_OBJECT_MAP) {
        fail(b, "undecodable server message");
        goto out;
    }
    const msgpack_object *map = &u.data, *t = map_get(map, "t");
    if (b->o.mode == MODE_CATCHUP) {
        cu_handle(c, map, t);
    } else if (b->o.mode == MODE_STORM) {
        st_handle(c, map, t);
    } else if (obj_is(t, "puback")) {
        on_puback(c, map, 0);
    } else if (obj_is(t, "msg")) {
        on_delivery(c, map);
    } else if (obj_is(t, "nack")) {
        on_puback(c, map, 1);
    } else if (obj_is(t, "welcome")) {
        if (c->is_sub) {
            send_subs(c);
        } else {
            c->ready = 1;
            b->n_ready++;
            check_ready(b);
        }
    } else if (obj_is(t, "subok")) {
        if (++c->subs_ok == b->o.streams) {
            c->ready = 1;
            b->n_ready++;
            check_ready(b);
        }
    } else if (obj_is(t, "error")) {
        report_reason("error", map);
        fail(b, "server reported an error");
    } else if (obj_is(t, "gap")) {
        fail(b, "unexpected gap");
    }
out:
    msgpack_unpacked_destroy(&u);
}

static void ws_on_msg_cb(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *a,
                         void *user)
{
    (void)ctx;
    struct conn *c = user;
    if (a->opcode == WSLAY_BINARY_FRAME) {
        handle_proto(c, a->msg, a->msg_length);
    } else if (a->opcode == WSLAY_CONNECTION_CLOSE) {
        char code[32];
        snprintf(code, sizeof code, "%u", (unsigned)a->status_code);
        if (c->role == ROLE_ST_SUB) {
            c->b->st_closes++;
            c->lost = 1;
        } else if (c->b->phase != PH_DONE) {
            fail(c->b, "server closed the connection with %s", code);
        }
    }
}

static void on_read(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct conn *c = arg;
    if (c->st == CS_UPGRADE) {
        st_upgrade_read(c);
        return;
    }
    int rc;
    do { /* again after an ack that stopped the reading (ws_recv_cb) */
        c->ack_due = 0;
        rc = wslay_event_recv(c->ws);
        if (rc == 0 && c->role == ROLE_CU_SUB)
            cu_send_ack(c);
        else if (rc == 0 && c->role == ROLE_ST_SUB && !c->lost)
            st_send_ack(c);
        if (rc == 0 && c->ack_due)
            conn_flush(c);
    } while (rc == 0 && c->ack_due && !c->lost && !c->b->failed);
    if (c->role == ROLE_ST_SUB && (rc != 0 || c->lost)) {
        st_lost(c);
        return;
    }
    if (rc != 0) {
        if (c->b->phase != PH_DONE)
            fail(c->b, "connection lost (%s)", c->is_sub ? "subscriber" : "publisher");
        return;
    }
    if (c->role == ROLE_SUB)
        send_acks(c);
    conn_flush(c);
    if (c->lost)
        st_lost(c);
}

static void on_write(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct conn *c = arg;
    if (c->st == CS_CONNECTING) {
        st_connected(c);
        return;
    }
    conn_flush(c);
    if (c->lost)
        st_lost(c);
}

static void on_measure(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct bench *b = arg;
    if (b->o.metrics)
        metrics_get(&b->o, &b->m0);
    b->srv_cpu0 = bench_proc_cpu_sec(b->o.server_pid);
    getrusage(RUSAGE_SELF, &b->ru0);
    b->stall_probe = bench_stall_start();
    b->phase = PH_MEASURE;
    b->t_meas = bench_now_ns();
}

static void on_end(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct bench *b = arg;
    b->t_end = bench_now_ns();
    b->phase = PH_DONE;
    bench_stall_stop(b->stall_probe, &b->stalls);
    b->stall_probe = NULL;
    getrusage(RUSAGE_SELF, &b->ru1);
    b->srv_cpu1 = bench_proc_cpu_sec(b->o.server_pid);
    if (b->o.metrics)
        metrics_get(&b->o, &b->m1);
    event_base_loopbreak(b->base);
}

static void on_setup_timeout(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct bench *b = arg;
    if (b->phase == PH_SETUP)
        fail(b, "connections not ready within the set-up timeout");
}

static void on_sigint(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct bench *b = arg;
    b->interrupted = 1;
    event_base_loopbreak(b->base);
}

static int conn_ws_init(struct conn *c)
{
    static const struct wslay_event_callbacks cbs = {
        ws_recv_cb, ws_send_cb, ws_genmask_cb, NULL, NULL, NULL, ws_on_msg_cb,
    };
    if (wslay_event_context_client_init(&c->ws, &cbs, c) != 0)
        return -1;
    wslay_event_config_set_max_recv_msg_length(c->ws, 2u << 20);
    return 0;
}

static int upgrade_request(const struct opts *o, char *buf, size_t len)
{
    return snprintf(buf, len,
                    "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: arq.v1\r\n\r\n",
                    o->path, o->host, o->port);
}

/* Connect and upgrade (blocking), then switch to non-blocking. */
static int conn_open(struct bench *b, struct conn *c)
{
    const struct opts *o = &b->o;
    c->fd = tcp_connect(o);
    if (c->fd < 0)
        return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char req[1024];
    int n = upgrade_request(o, req, sizeof req);
    if (write_all(c->fd, req, (size_t)n) != 0) {
        fprintf(stderr, "arq-bench: sending the upgrade request: %s\n", strerror(errno));
        return -1;
    }
    char head[8192];
    size_t len = 0;
    char *end = NULL;
    while (end == NULL) {
        if (len + 1 >= sizeof head) {
            fprintf(stderr, "arq-bench: upgrade response head too long\n");
            return -1;
        }
        ssize_t r = recv(c->fd, head + len, sizeof head - 1 - len, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            fprintf(stderr, "arq-bench: connection closed during the upgrade\n");
            return -1;
        }
        len += (size_t)r;
        head[len] = '\0';
        end = strstr(head, "\r\n\r\n");
    }
    if (strncmp(head, "HTTP/1.1 101", 12) != 0) {
        head[strcspn(head, "\r\n")] = '\0';
        fprintf(stderr, "arq-bench: upgrade refused: %s\n", head);
        return -1;
    }
    size_t used = (size_t)(end + 4 - head);
    if (used < len) {
        c->pending = malloc(len - used);
        if (c->pending == NULL)
            return -1;
        memcpy(c->pending, head + used, len - used);
        c->pending_len = len - used;
    }
    int fl = fcntl(c->fd, F_GETFL);
    if (fl < 0 || fcntl(c->fd, F_SETFL, fl | O_NONBLOCK) != 0)
        return -1;

    if (conn_ws_init(c) != 0)
        return -1;
    c->st = CS_WS;
    c->rev = event_new(b->base, c->fd, EV_READ | EV_PERSIST, on_read, c);
    c->wev = event_new(b->base, c->fd, EV_WRITE, on_write, c);
    if (c->rev == NULL || c->wev == NULL || event_add(c->rev, NULL) != 0)
        return -1;
    if (c->role == ROLE_PUB && (c->sent_ns = calloc(AB_RING, sizeof *c->sent_ns)) == NULL)
        return -1;
    send_hello(c);
    conn_flush(c);
    if (c->pending_len > 0) /* frames that came with the upgrade response */
        on_read(c->fd, EV_READ, c);
    return 0;
}

/* ---- output --------------------------------------------------------------- */

static void cpu_model(char *buf, size_t len)
{
    snprintf(buf, len, "unknown cpu");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f == NULL)
        return;
    char line[512];
    while (fgets(line, sizeof line, f) != NULL) {
        char *colon = strchr(line, ':');
        if (strncmp(line, "model name", 10) == 0 && colon != NULL) {
            colon += 1 + (colon[1] == ' ');
            colon[strcspn(colon, "\n")] = '\0';
            snprintf(buf, len, "%s", colon);
            break;
        }
    }
    fclose(f);
}

struct results {
    double window_s;
    double pub_rate, deliv_rate, sent_rate;
    double bench_cpu, srv_cpu; /* fraction of one core; srv_cpu < 0: unknown */
    double commits_ps, msgs_per_commit, commit_ms;
    double bucket_le[AB_MAX_BUCKETS], bucket_n[AB_MAX_BUCKETS];
    unsigned n_buckets;
    /* arqd's publish time over the window (ms): mean, and the upper bound
     * of the bucket holding the p50 / p99 (INFINITY past the last bound);
     * pub_n[i] == 0: not reported */
    double pub_n[MH_N], pub_mean_ms[MH_N], pub_p50_ms[MH_N], pub_p99_ms[MH_N];
};

/* The bound (ms) of the first bucket whose window count reaches q of all. */
static double mhist_q_ms(const struct mhist *h0, const struct mhist *h1, double n, double q)
{
    for (unsigned i = 0; i < h1->n; i++)
        if (h1->cum[i] - h0->cum[i] >= q * n)
            return h1->le[i] * 1e3;
    return INFINITY;
}

static void compute(const struct bench *b, struct results *r)
{
    memset(r, 0, sizeof *r);
    r->window_s = (double)(b->t_end - b->t_meas) / 1e9;
    if (r->window_s <= 0)
        r->window_s = 1e-9;
    r->pub_rate = (double)b->pubacks / r->window_s;
    r->sent_rate = (double)b->pubs_sent / r->window_s;
    r->deliv_rate = (double)b->deliveries / r->window_s;
    r->bench_cpu = (rusage_sec(&b->ru1) - rusage_sec(&b->ru0)) / r->window_s;
    r->srv_cpu =
        b->srv_cpu0 >= 0 && b->srv_cpu1 >= 0 ? (b->srv_cpu1 - b->srv_cpu0) / r->window_s : -1;
    if (b->m0.ok && b->m1.ok) {
        double commits = b->m1.commits - b->m0.commits;
        r->commits_ps = commits / r->window_s;
        r->msgs_per_commit =
            commits > 0 ? (b->m1.committed_msgs - b->m0.committed_msgs) / commits : 0;
        double cc = b->m1.commit_sec_count - b->m0.commit_sec_count;
        r->commit_ms = cc > 0 ? (b->m1.commit_sec_sum - b->m0.commit_sec_sum) / cc * 1e3 : 0;
        if (b->m0.n_buckets == b->m1.n_buckets) {
            double prev = 0;
            for (unsigned i = 0; i < b->m1.n_buckets; i++) {
                double cum = b->m1.cum[i] - b->m0.cum[i];
                r->bucket_le[i] = b->m1.le[i];
                r->bucket_n[i] = cum - prev;
                prev = cum;
            }
            r->n_buckets = b->m1.n_buckets;
        }
        for (unsigned i = 0; i < MH_N; i++) {
            const struct mhist *h0 = &b->m0.pub[i], *h1 = &b->m1.pub[i];
            if (h1->n == 0 || h0->n != h1->n)
                continue;
            double n = h1->cum[h1->n - 1] - h0->cum[h0->n - 1];
            if (n <= 0)
                continue;
            r->pub_n[i] = n;
            r->pub_mean_ms[i] = (h1->sum - h0->sum) / n * 1e3;
            r->pub_p50_ms[i] = mhist_q_ms(h0, h1, n, 0.50);
            r->pub_p99_ms[i] = mhist_q_ms(h0, h1, n, 0.99);
        }
    }
}

static void print_lat(FILE *f, const char *name, const bench_hist_t *h)
{
    fprintf(f, "%-22s p50 %8.3f ms   p99 %8.3f ms   p99.9 %8.3f ms   (%llu samples)\n", name,
            bench_hist_q_us(h, 0.50) / 1e3, bench_hist_q_us(h, 0.99) / 1e3,
            bench_hist_q_us(h, 0.999) / 1e3, (unsigned long long)h->n);
}

static void print_text(FILE *f, const struct bench *b, const struct results *r)
{
    const struct opts *o = &b->o;
    char cpu[128], c1[32], c2[32];
    struct utsname u;
    cpu_model(cpu, sizeof cpu);
    if (uname(&u) != 0)
        memset(&u, 0, sizeof u);
    fprintf(f, "arq-bench: %s\n", b->cmdline);
    fprintf(f, "machine: %ld x %s, %s %s %s\n", sysconf(_SC_NPROCESSORS_ONLN), cpu, u.sysname,
            u.release, u.machine);
    fprintf(f, "load average: %.2f %.2f %.2f before, %.2f %.2f %.2f after\n", b->load_before[0],
            b->load_before[1], b->load_before[2], b->load_after[0], b->load_after[1],
            b->load_after[2]);
    if (o->rate > 0)
        fprintf(f, "load: %u publishers, open loop at %s msg/s in aggregate (sent every %u us)",
                o->conns, bench_fmt_count(c1, sizeof c1, o->rate), o->tick_us);
    else
        fprintf(f, "load: %u publishers x %u in flight", o->conns, o->depth);
    fprintf(f,
            ", %u subscribers, %u streams, %u-byte payloads, %.1f s window after %.1f s warm-up\n",
            o->subs, o->streams, o->size, r->window_s, o->warmup);
    fprintf(f, "durable publishes/s:   %s  (pubacks in the window / window)\n",
            bench_fmt_count(c1, sizeof c1, r->pub_rate));
    if (o->rate > 0)
        fprintf(f, "publishes sent/s:      %s  (not sent, ring full: %llu)\n",
                bench_fmt_count(c2, sizeof c2, r->sent_rate), (unsigned long long)b->not_sent);
    print_lat(f, "puback latency:", &b->puback_lat);
    if (o->subs > 0) {
        fprintf(f, "deliveries/s:          %s  (all subscribers together)\n",
                bench_fmt_count(c1, sizeof c1, r->deliv_rate));
        print_lat(f, "delivery latency:", &b->deliv_lat);
        if (b->to_srv_lat.n > 0) {
            print_lat(f, "  sent -> arqd decoded:", &b->to_srv_lat);
            print_lat(f, "  decoded -> delivered:", &b->from_srv_lat);
        }
    }
    fprintf(f, "nacks: %llu\n", (unsigned long long)b->nacks);
    fprintf(f, "CPU: arq-bench %.0f%% of one core", r->bench_cpu * 100);
    if (r->srv_cpu >= 0)
        fprintf(f, ", arqd (pid %ld) %.0f%%", o->server_pid, r->srv_cpu * 100);
    fputc('\n', f);
    fprintf(f,
            "machine stalls: %llu (a 1 ms sleep woke > %.0f ms late), %.0f ms of the window, "
            "longest %.1f ms\n",
            (unsigned long long)b->stalls.stalls, BENCH_STALL_NS / 1e6, b->stalls.stalled_ms,
            b->stalls.max_ms);
    if (b->m0.ok && b->m1.ok) {
        fprintf(
            f, "arqd WAL (/metrics, window): %s commits/s, %.1f msgs/commit, mean commit %.3f ms\n",
            bench_fmt_count(c1, sizeof c1, r->commits_ps), r->msgs_per_commit, r->commit_ms);
        fprintf(f, "  batch sizes (commits with <= le msgs):");
        for (unsigned i = 0; i < r->n_buckets; i++)
            if (r->bucket_n[i] > 0)
                fprintf(f, " le%g:%.0f", r->bucket_le[i], r->bucket_n[i]);
        fputc('\n', f);
        static const char *const what[MH_N] = {"decoded -> puback", "decoded -> in a batch",
                                               "durable -> loop ran it"};
        if (r->pub_n[MH_TOTAL] > 0)
            fprintf(f, "arqd publish time (/metrics, window; p50/p99 as bucket bounds):\n");
        for (unsigned i = 0; i < MH_N; i++)
            if (r->pub_n[i] > 0)
                fprintf(f, "  %-24s mean %7.3f ms   p50 <= %g ms   p99 <= %g ms\n", what[i],
                        r->pub_mean_ms[i], r->pub_p50_ms[i], r->pub_p99_ms[i]);
    }
}

static void json_lat(FILE *f, const char *name, const bench_hist_t *h)
{
    fprintf(f, ",\"%s\":{\"samples\":%llu,\"p50_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f}", name,
            (unsigned long long)h->n, bench_hist_q_us(h, 0.50), bench_hist_q_us(h, 0.99),
            bench_hist_q_us(h, 0.999));
}

static void print_json(FILE *f, const struct bench *b, const struct results *r)
{
    const struct opts *o = &b->o;
    char cpu[128];
    struct utsname u;
    cpu_model(cpu, sizeof cpu);
    if (uname(&u) != 0)
        memset(&u, 0, sizeof u);
    char kernel[512];
    snprintf(kernel, sizeof kernel, "%s %s %s", u.sysname, u.release, u.machine);
    fprintf(f, "{\"tool\":\"arq-bench\",\"command\":");
    bench_json_str(f, b->cmdline);
    fprintf(f, ",\"machine\":{\"nproc\":%ld,\"cpu\":", sysconf(_SC_NPROCESSORS_ONLN));
    bench_json_str(f, cpu);
    fprintf(f, ",\"kernel\":");
    bench_json_str(f, kernel);
    fprintf(f, ",\"load_before\":[%.2f,%.2f,%.2f],\"load_after\":[%.2f,%.2f,%.2f]}",
            b->load_before[0], b->load_before[1], b->load_before[2], b->load_after[0],
            b->load_after[1], b->load_after[2]);
    fprintf(f,
            ",\"config\":{\"conns\":%u,\"depth\":%u,\"subscribers\":%u,\"streams\":%u,"
            "\"payload_bytes\":%u,\"seconds\":%g,\"warmup\":%g,\"rate\":%g,\"tick_us\":%u}",
            o->conns, o->rate > 0 ? 0 : o->depth, o->subs, o->streams, o->size, o->seconds,
            o->warmup, o->rate, o->tick_us);
    fprintf(f,
            ",\"window_s\":%.3f,\"publishes_per_s\":%.1f,\"sent_per_s\":%.1f,\"not_sent\":%llu,"
            "\"deliveries_per_s\":%.1f,\"nacks\":%llu",
            r->window_s, r->pub_rate, r->sent_rate, (unsigned long long)b->not_sent, r->deliv_rate,
            (unsigned long long)b->nacks);
    json_lat(f, "puback_latency", &b->puback_lat);
    json_lat(f, "delivery_latency", &b->deliv_lat);
    json_lat(f, "sent_to_decoded", &b->to_srv_lat);
    json_lat(f, "decoded_to_delivered", &b->from_srv_lat);
    fprintf(f, ",\"stalls\":{\"count\":%llu,\"ms\":%.1f,\"max_ms\":%.1f}",
            (unsigned long long)b->stalls.stalls, b->stalls.stalled_ms, b->stalls.max_ms);
    fprintf(f, ",\"bench_cpu\":%.3f,\"server_cpu\":", r->bench_cpu);
    if (r->srv_cpu >= 0)
        fprintf(f, "%.3f", r->srv_cpu);
    else
        fprintf(f, "null");
    if (b->m0.ok && b->m1.ok) {
        fprintf(f,
                ",\"wal\":{\"commits_per_s\":%.1f,\"msgs_per_commit\":%.2f,\"mean_commit_ms\":%.3f,"
                "\"batch_messages\":[",
                r->commits_ps, r->msgs_per_commit, r->commit_ms);
        for (unsigned i = 0; i < r->n_buckets; i++) {
            if (isinf(r->bucket_le[i]))
                fprintf(f, "%s{\"le\":\"+Inf\",\"commits\":%.0f}", i ? "," : "", r->bucket_n[i]);
            else
                fprintf(f, "%s{\"le\":%g,\"commits\":%.0f}", i ? "," : "", r->bucket_le[i],
                        r->bucket_n[i]);
        }
        fprintf(f, "]}");
    } else {
        fprintf(f, ",\"wal\":null");
    }
    /* arqd's own publish time (null: not in its /metrics); an upper bound
     * past the last bucket is written as null */
    static const char *const key[MH_N] = {"total", "wait", "dispatch"};
    fprintf(f, ",\"arqd_publish_ms\":");
    if (r->pub_n[MH_TOTAL] > 0) {
        fputc('{', f);
        for (unsigned i = 0; i < MH_N; i++) {
            fprintf(f, "%s\"%s\":{\"mean\":%.3f", i ? "," : "", key[i], r->pub_mean_ms[i]);
            const double q[2] = {r->pub_p50_ms[i], r->pub_p99_ms[i]};
            const char *qn[2] = {"p50_le", "p99_le"};
            for (unsigned j = 0; j < 2; j++) {
                if (isinf(q[j]))
                    fprintf(f, ",\"%s\":null", qn[j]);
                else
                    fprintf(f, ",\"%s\":%g", qn[j], q[j]);
            }
            fputc('}', f);
        }
        fputc('}', f);
    } else {
        fprintf(f, "null");
    }
    fprintf(f, "}\n");
}

/* Free everything a connection holds; with rst, close with an RST (SO_LINGER 0),
 * as a client whose network vanished would leave it. Keeps its identity
 * (role, stream, session, offsets). */
static void conn_close(struct conn *c, int rst)
{
    if (c->ws != NULL)
        wslay_event_context_free(c->ws);
    if (c->rev != NULL)
        event_free(c->rev);
    if (c->wev != NULL)
        event_free(c->wev);
    if (c->fd > 0) {
        if (rst) {
            struct linger l = {1, 0};
            (void)setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
        }
        close(c->fd);
    }
    free(c->pending);
    free(c->out);
    free(c->head);
    free(c->sent_ns);
    c->ws = NULL;
    c->rev = c->wev = NULL;
    c->fd = -1;
    c->pending = c->out = NULL;
    c->head = NULL;
    c->sent_ns = NULL;
    c->pending_len = c->pending_off = c->out_len = c->out_off = c->out_cap = c->head_len = 0;
    c->st = CS_IDLE;
    c->ack_due = c->lost = 0;
    c->inflight = 0;
}

/* ---- phases (--catchup, --storm) ------------------------------------------- */

static void on_deadline(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct bench *b = arg;
    b->timed_out = 1;
    event_base_loopbreak(b->base);
}

static int never_done(const struct bench *b)
{
    (void)b;
    return 0;
}

/* Run the loop until done(b), a failure, an interrupt, or timeout_s seconds.
 * Returns 0 when done; -1 otherwise (a timeout fails the run unless done is
 * never_done: then it is a plain wait). */
static int run_until(struct bench *b, int (*done)(const struct bench *), double timeout_s,
                     const char *what)
{
    struct timeval tv = {(time_t)timeout_s,
                         (suseconds_t)((timeout_s - (double)(time_t)timeout_s) * 1e6)};
    struct event *dl = evtimer_new(b->base, on_deadline, b);
    if (dl == NULL || evtimer_add(dl, &tv) != 0) {
        if (dl != NULL)
            event_free(dl);
        fail(b, "out of memory");
        return -1;
    }
    b->timed_out = 0;
    while (!done(b) && !b->failed && !b->interrupted && !b->timed_out)
        event_base_loop(b->base, EVLOOP_ONCE);
    event_free(dl);
    if (b->failed || b->interrupted)
        return -1;
    if (done == never_done)
        return 0;
    if (!done(b)) {
        fail(b, "%s: not done within %g s", what, timeout_s);
        return -1;
    }
    return 0;
}

static double cpu_now(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return rusage_sec(&ru);
}

static void pack_sub(struct conn *c, const char *stream, uint64_t from, uint64_t epoch)
{
    uint8_t raw[512];
    struct fixbuf fb = {raw, 0, sizeof raw};
    msgpack_packer pk;
    msgpack_packer_init(&pk, &fb, fixbuf_write);
    msgpack_pack_map(&pk, epoch ? 5 : 4);
    pack_str(&pk, "t");
    pack_str(&pk, "sub");
    pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, ++c->next_id);
    pack_str(&pk, "stream");
    pack_str(&pk, stream);
    pack_str(&pk, "from");
    if (from == 0) {
        pack_str(&pk, "latest");
    } else {
        msgpack_pack_uint64(&pk, from);
    }
    if (epoch) {
        pack_str(&pk, "epoch");
        msgpack_pack_uint64(&pk, epoch);
    }
    queue_msg(c, raw, fb.len);
}

static void pack_ack(struct conn *c, const char *stream, uint64_t offset)
{
    uint8_t raw[512];
    struct fixbuf fb = {raw, 0, sizeof raw};
    msgpack_packer pk;
    msgpack_packer_init(&pk, &fb, fixbuf_write);
    msgpack_pack_map(&pk, 3);
    pack_str(&pk, "t");
    pack_str(&pk, "ack");
    pack_str(&pk, "stream");
    pack_str(&pk, stream);
    pack_str(&pk, "offset");
    msgpack_pack_uint64(&pk, offset);
    queue_msg(c, raw, fb.len);
}

/* ---- --catchup ------------------------------------------------------------- */

static int cu_all_ready(const struct bench *b)
{
    return b->n_ready >= b->o.conns;
}

static int cu_filled(const struct bench *b)
{
    return b->cu_acked >= b->o.catchup_n;
}

static int cu_done(const struct bench *b)
{
    return b->cu_t1 != 0;
}

static void cu_publish_more(struct conn *c)
{
    struct bench *b = c->b;
    while (c->inflight < b->o.depth && b->cu_sent < b->o.catchup_n && send_pub(c) == 0)
        b->cu_sent++;
}

static void cu_send_ack(struct conn *c)
{
    if (c->got <= c->ack_sent)
        return;
    char name[128];
    stream_name(c->b, 0, name, sizeof name);
    pack_ack(c, name, c->got);
    c->ack_sent = c->got;
    c->b->cu_reps[c->b->cu_cur].acks++;
}

static void cu_on_welcome(struct conn *c, const msgpack_object *map)
{
    struct bench *b = c->b;
    uint64_t mi = obj_u64(map_get(map, "max_inflight"));
    b->cu_max_inflight = mi > 0 && mi < UINT_MAX ? (unsigned)mi : 1024;
    b->cu_ack_every = b->cu_max_inflight / 4 ? b->cu_max_inflight / 4 : 1;
    char name[128];
    stream_name(b, 0, name, sizeof name);
    pack_sub(c, name, 1, 0);
    b->cu_cpu0 = cpu_now();
    b->cu_srv0 = bench_proc_cpu_sec(b->o.server_pid);
    b->cu_t0 = bench_now_ns();
    c->rx_bytes = 0;
}

static void cu_on_msg(struct conn *c, const msgpack_object *map)
{
    struct bench *b = c->b;
    struct cu_rep *r = &b->cu_reps[b->cu_cur];
    uint64_t off = obj_u64(map_get(map, "offset"));
    const msgpack_object *pl = map_get(map, "payload");
    if (off != c->got + 1) {
        fail(b, "catch-up: offset %llu after %llu", (unsigned long long)off,
             (unsigned long long)c->got);
        return;
    }
    uint64_t now = bench_now_ns();
    if (b->cu_tfirst == 0)
        b->cu_tfirst = now;
    c->got = off;
    r->msgs++;
    if (pl != NULL && pl->type == MSGPACK_OBJECT_BIN)
        r->payload_bytes += pl->via.bin.size;
    if (c->got - c->ack_sent >= b->cu_ack_every)
        c->ack_due = 1;
    if (off >= b->o.catchup_n && b->cu_t1 == 0) {
        b->cu_t1 = now;
        r->bench_cpu = cpu_now() - b->cu_cpu0;
        double s1 = bench_proc_cpu_sec(b->o.server_pid);
        r->srv_cpu = b->cu_srv0 >= 0 && s1 >= 0 ? s1 - b->cu_srv0 : -1;
        r->wire_bytes = c->rx_bytes;
        c->ack_due = 1;
    }
}

static void cu_on_puback(struct conn *c, const msgpack_object *map, int nack)
{
    struct bench *b = c->b;
    if (c->inflight > 0)
        c->inflight--;
    if (nack) {
        report_reason("nack", map);
        fail(b, "a publish was refused");
        return;
    }
    b->cu_acked++;
    cu_publish_more(c);
}

static void cu_handle(struct conn *c, const msgpack_object *map, const msgpack_object *t)
{
    struct bench *b = c->b;
    if (obj_is(t, "msg")) {
        cu_on_msg(c, map);
    } else if (obj_is(t, "puback")) {
        cu_on_puback(c, map, 0);
    } else if (obj_is(t, "nack")) {
        cu_on_puback(c, map, 1);
    } else if (obj_is(t, "welcome")) {
        if (c->role == ROLE_PUB)
            b->n_ready++;
        else
            cu_on_welcome(c, map);
    } else if (obj_is(t, "subok")) {
        b->cu_next_after = obj_u64(map_get(map, "next"));
        if (obj_u64(map_get(map, "first")) != 1)
            fail(b, "catch-up: the stream no longer starts at offset 1 (retention?)");
    } else if (obj_is(t, "error")) {
        report_reason("error", map);
        fail(b, "server reported an error");
    } else if (obj_is(t, "gap")) {
        fail(b, "catch-up: unexpected gap");
    }
}

struct scan_stats {
    int ok;
    double rate, rate_min, rate_max; /* records/s: median, min, max */
    double mbps;                     /* value bytes/s / 1e6 at the median */
    struct log_scan_result r;        /* the median run */
};

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, unsigned n)
{
    qsort(v, n, sizeof *v, cmp_double);
    return n == 0 ? 0 : n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

#define SCAN_RUNS 3u
enum { SCAN_CURSOR, SCAN_LOOKUP, SCAN_CURSORS, SCAN_WAL, SCAN_KINDS };

static void scan_run(struct bench *b, int kind, struct scan_stats *st)
{
    char name[128], err[512];
    stream_name(b, 0, name, sizeof name);
    struct log_scan_result r[SCAN_RUNS];
    double rate[SCAN_RUNS];
    memset(st, 0, sizeof *st);
    for (unsigned i = 0; i < SCAN_RUNS; i++) {
        uint64_t n = b->o.catchup_n;
        const char *d = b->o.data_dir;
        int rc;
        if (kind == SCAN_CURSOR)
            rc = log_scan_cursor(d, name, 1, n, &r[i], err, sizeof err);
        else if (kind == SCAN_LOOKUP)
            rc = log_scan_lookup(d, name, 1, n, AB_SCAN_BATCH, &r[i], err, sizeof err);
        else if (kind == SCAN_CURSORS)
            rc = log_scan_cursors(d, name, 1, n, AB_SCAN_BATCH, &r[i], err, sizeof err);
        else
            rc = log_scan_wal(d, name, 1, n, AB_SCAN_BATCH, &r[i], err, sizeof err);
        if (rc != 0) {
            fprintf(stderr, "arq-bench: %s\n", err);
            return;
        }
        if (r[i].records != b->o.catchup_n) {
            fprintf(stderr, "arq-bench: scan found %llu records, not %llu\n",
                    (unsigned long long)r[i].records, (unsigned long long)b->o.catchup_n);
            return;
        }
        rate[i] = (double)r[i].records / (r[i].seconds > 0 ? r[i].seconds : 1e-9);
    }
    double sorted[SCAN_RUNS];
    memcpy(sorted, rate, sizeof sorted);
    st->rate = median(sorted, SCAN_RUNS);
    st->rate_min = sorted[0];
    st->rate_max = sorted[SCAN_RUNS - 1];
    for (unsigned i = 0; i < SCAN_RUNS; i++)
        if (rate[i] == st->rate)
            st->r = r[i];
    st->mbps = (double)st->r.value_bytes / (st->r.seconds > 0 ? st->r.seconds : 1e-9) / 1e6;
    st->ok = 1;
}

static void cu_print(FILE *f, const struct bench *b, const struct scan_stats *sc, double med_rate,
                     int json);

static int run_catchup(struct bench *b)
{
    const struct opts *o = &b->o;
    b->cu_reps = calloc(o->reps, sizeof *b->cu_reps);
    if (b->cu_reps == NULL) {
        fprintf(stderr, "arq-bench: out of memory\n");
        return 1;
    }
    for (unsigned i = 0; i < o->conns; i++) {
        struct conn *c = &b->conns[i];
        c->b = b;
        c->idx = i;
        c->role = ROLE_PUB;
        if (conn_open(b, c) != 0) {
            fprintf(stderr, "arq-bench: could not open publisher %u of %u\n", i + 1, o->conns);
            return 1;
        }
    }
    if (run_until(b, cu_all_ready, AB_SETUP_TIMEOUT, "publishers' welcome") != 0)
        return b->interrupted ? 130 : 1;
    b->cu_fill_t0 = bench_now_ns();
    for (unsigned i = 0; i < o->conns; i++) {
        cu_publish_more(&b->conns[i]);
        conn_flush(&b->conns[i]);
    }
    if (run_until(b, cu_filled, o->timeout, "publishing") != 0)
        return b->interrupted ? 130 : 1;
    b->cu_fill_t1 = bench_now_ns();
    for (unsigned i = 0; i < o->conns; i++)
        conn_close(&b->conns[i], 0);

    /* One subscriber connection per repetition, each from offset 1, in the
     * slot conns[o->conns]. */
    for (unsigned rep = 0; rep < o->reps; rep++) {
        struct conn *c = &b->conns[o->conns];
        conn_close(c, 0);
        memset(c, 0, sizeof *c);
        c->b = b;
        c->idx = o->conns;
        c->role = ROLE_CU_SUB;
        c->is_sub = 1;
        b->cu_cur = rep;
        b->cu_t0 = b->cu_t1 = b->cu_tfirst = 0;
        struct metrics m0, m1;
        memset(&m0, 0, sizeof m0);
        memset(&m1, 0, sizeof m1);
        if (o->metrics)
            metrics_get(o, &m0);
        if (conn_open(b, c) != 0) {
            fprintf(stderr, "arq-bench: could not open the subscriber\n");
            return 1;
        }
        if (run_until(b, cu_done, o->timeout, "catch-up") != 0)
            return b->interrupted ? 130 : 1;
        struct cu_rep *r = &b->cu_reps[rep];
        r->seconds = (double)(b->cu_t1 - b->cu_t0) / 1e9;
        r->first_msg_s = (double)(b->cu_tfirst - b->cu_t0) / 1e9;
        conn_flush(c); /* the last ack */
        if (o->metrics) {
            metrics_get(o, &m1);
            if (m0.ok && m1.ok)
                r->catchup_reads = (uint64_t)(m1.catchup_reads - m0.catchup_reads);
        }
        conn_close(c, 0);
    }
    if (getloadavg(b->load_after, 3) != 3)
        b->load_after[0] = b->load_after[1] = b->load_after[2] = -1;

    struct scan_stats sc[SCAN_KINDS];
    memset(sc, 0, sizeof sc);
    if (o->data_dir[0] != '\0')
        for (int k = 0; k < SCAN_KINDS; k++)
            scan_run(b, k, &sc[k]);
    double rates[64];
    unsigned n = o->reps < 64 ? o->reps : 64;
    for (unsigned i = 0; i < n; i++)
        rates[i] = (double)b->cu_reps[i].msgs / b->cu_reps[i].seconds;
    double med = median(rates, n);
    cu_print(o->json ? stderr : stdout, b, sc, med, 0);
    if (o->json)
        cu_print(stdout, b, sc, med, 1);
    return o->data_dir[0] != '\0' && !sc[0].ok ? 1 : 0;
}

static void cu_print_text(FILE *f, const struct bench *b, const struct scan_stats *sc, double med)
{
    const struct opts *o = &b->o;
    char c1[32], c2[32], c3[32];
    double fill_s = (double)(b->cu_fill_t1 - b->cu_fill_t0) / 1e9;
    fprintf(f, "catch-up: %s messages of %u bytes in one stream (%s.0)\n",
            bench_fmt_count(c1, sizeof c1, (double)o->catchup_n), o->size, b->stream_prefix);
    fprintf(f, "publishing them: %u publishers x %u in flight, %.2f s, %s durable publishes/s\n",
            o->conns, o->depth, fill_s,
            bench_fmt_count(c2, sizeof c2, (double)o->catchup_n / fill_s));
    fprintf(f,
            "subscriber: one connection, sub from offset 1; server max_inflight %u (welcome), "
            "cumulative ack every %u messages\n",
            b->cu_max_inflight, b->cu_ack_every);
    for (unsigned i = 0; i < o->reps; i++) {
        const struct cu_rep *r = &b->cu_reps[i];
        fprintf(f,
                "catch-up %u: %s msgs in %.3f s = %s msgs/s; payload %.1f MB/s, wire %.1f MB/s "
                "(%.1f bytes/msg); first msg after %.2f ms; %s acks",
                i + 1, bench_fmt_count(c1, sizeof c1, (double)r->msgs), r->seconds,
                bench_fmt_count(c2, sizeof c2, (double)r->msgs / r->seconds),
                (double)r->payload_bytes / r->seconds / 1e6,
                (double)r->wire_bytes / r->seconds / 1e6,
                (double)r->wire_bytes / (double)(r->msgs ? r->msgs : 1), r->first_msg_s * 1e3,
                bench_fmt_count(c3, sizeof c3, (double)r->acks));
        if (r->catchup_reads)
            fprintf(f, ", %s WAL catch-up reads",
                    bench_fmt_count(c1, sizeof c1, (double)r->catchup_reads));
        fprintf(f, "\n    CPU: arq-bench %.0f%% of one core", r->bench_cpu / r->seconds * 100);
        if (r->srv_cpu >= 0)
            fprintf(f, ", arqd (pid %ld) %.0f%%", o->server_pid, r->srv_cpu / r->seconds * 100);
        fputc('\n', f);
    }
    fprintf(f, "catch-up (median of %u): %s msgs/s, %.1f MB/s of payload\n", o->reps,
            bench_fmt_count(c1, sizeof c1, med), med * o->size / 1e6);
    static const char *const names[SCAN_KINDS] = {
        "LMDB cursor over `log`          ",
        "LMDB index+log gets (256/txn)   ",
        "LMDB index+log cursors (256/txn)",
        "wal_stream_read (256/call)      ",
    };
    if (o->data_dir[0] != '\0') {
        fprintf(f, "the same records read from %s (%u runs each, median [min-max]):\n", o->data_dir,
                SCAN_RUNS);
        for (int k = 0; k < SCAN_KINDS; k++) {
            if (!sc[k].ok) {
                fprintf(f, "  %s  failed\n", names[k]);
                continue;
            }
            fprintf(f,
                    "  %s  %s records/s [%s-%s], %.0f MB/s of values, %.3f s; catch-up/this %.3f",
                    names[k], bench_fmt_count(c1, sizeof c1, sc[k].rate),
                    bench_fmt_count(c2, sizeof c2, sc[k].rate_min),
                    bench_fmt_count(c3, sizeof c3, sc[k].rate_max), sc[k].mbps, sc[k].r.seconds,
                    med / sc[k].rate);
            if (k == 0 && sc[k].r.other)
                fprintf(f, " (%llu records of other streams skipped)",
                        (unsigned long long)sc[k].r.other);
            fputc('\n', f);
        }
    }
    fprintf(f, "goal >= 500,000 msgs/s catch-up: %s\n", med >= 500000 ? "met" : "MISSED");
}

static void cu_print(FILE *f, const struct bench *b, const struct scan_stats *sc, double med,
                     int json)
{
    const struct opts *o = &b->o;
    char cpu[128];
    cpu_model(cpu, sizeof cpu);
    if (!json) {
        fprintf(f, "arq-bench: %s\n", b->cmdline);
        fprintf(f, "machine: %ld x %s\n", sysconf(_SC_NPROCESSORS_ONLN), cpu);
        fprintf(f, "load average: %.2f %.2f %.2f before, %.2f %.2f %.2f after\n", b->load_before[0],
                b->load_before[1], b->load_before[2], b->load_after[0], b->load_after[1],
                b->load_after[2]);
        cu_print_text(f, b, sc, med);
        return;
    }
    double fill_s = (double)(b->cu_fill_t1 - b->cu_fill_t0) / 1e9;
    fprintf(f, "{\"tool\":\"arq-bench\",\"mode\":\"catchup\",\"command\":");
    bench_json_str(f, b->cmdline);
    fprintf(f, ",\"machine\":{\"nproc\":%ld,\"cpu\":", sysconf(_SC_NPROCESSORS_ONLN));
    bench_json_str(f, cpu);
    fprintf(f, ",\"load_before\":[%.2f,%.2f,%.2f],\"load_after\":[%.2f,%.2f,%.2f]}",
            b->load_before[0], b->load_before[1], b->load_before[2], b->load_after[0],
            b->load_after[1], b->load_after[2]);
    fprintf(f,
            ",\"config\":{\"messages\":%llu,\"payload_bytes\":%u,\"publishers\":%u,\"depth\":%u,"
            "\"reps\":%u,\"max_inflight\":%u,\"ack_every\":%u}",
            (unsigned long long)o->catchup_n, o->size, o->conns, o->depth, o->reps,
            b->cu_max_inflight, b->cu_ack_every);
    fprintf(f, ",\"publish\":{\"seconds\":%.3f,\"per_s\":%.1f}", fill_s,
            (double)o->catchup_n / fill_s);
    fprintf(f, ",\"catchup\":[");
    for (unsigned i = 0; i < o->reps; i++) {
        const struct cu_rep *r = &b->cu_reps[i];
        fprintf(f,
                "%s{\"seconds\":%.4f,\"msgs\":%llu,\"msgs_per_s\":%.1f,\"payload_mb_per_s\":%.2f,"
                "\"wire_mb_per_s\":%.2f,\"wire_bytes\":%llu,\"first_msg_ms\":%.3f,\"acks\":%llu,"
                "\"catchup_reads\":%llu,\"bench_cpu\":%.3f,\"server_cpu\":",
                i ? "," : "", r->seconds, (unsigned long long)r->msgs, (double)r->msgs / r->seconds,
                (double)r->payload_bytes / r->seconds / 1e6,
                (double)r->wire_bytes / r->seconds / 1e6, (unsigned long long)r->wire_bytes,
                r->first_msg_s * 1e3, (unsigned long long)r->acks,
                (unsigned long long)r->catchup_reads, r->bench_cpu / r->seconds);
        if (r->srv_cpu >= 0)
            fprintf(f, "%.3f}", r->srv_cpu / r->seconds);
        else
            fprintf(f, "null}");
    }
    fprintf(f, "],\"catchup_msgs_per_s\":%.1f,\"catchup_payload_mb_per_s\":%.2f", med,
            med * o->size / 1e6);
    static const char *const keys[SCAN_KINDS] = {"lmdb_cursor", "lmdb_lookup", "lmdb_cursors",
                                                 "wal_stream_read"};
    fprintf(f, ",\"raw\":");
    if (o->data_dir[0] == '\0') {
        fprintf(f, "null");
    } else {
        fputc('{', f);
        for (int k = 0; k < SCAN_KINDS; k++) {
            fprintf(f, "%s\"%s\":", k ? "," : "", keys[k]);
            if (!sc[k].ok) {
                fprintf(f, "null");
                continue;
            }
            fprintf(f,
                    "{\"records_per_s\":%.1f,\"min\":%.1f,\"max\":%.1f,\"value_mb_per_s\":%.2f,"
                    "\"seconds\":%.4f,\"value_bytes\":%llu,\"other_records\":%llu,"
                    "\"catchup_ratio\":%.4f}",
                    sc[k].rate, sc[k].rate_min, sc[k].rate_max, sc[k].mbps, sc[k].r.seconds,
                    (unsigned long long)sc[k].r.value_bytes, (unsigned long long)sc[k].r.other,
                    med / sc[k].rate);
        }
        fputc('}', f);
    }
    fprintf(f, ",\"goal_500k\":%s}\n", med >= 500000 ? "true" : "false");
}

/* ---- --storm ---------------------------------------------------------------- */

static void st_start(struct conn *c);

static int st_resolve(struct bench *b)
{
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(b->o.host, b->o.port, &hints, &res);
    if (rc != 0 || res == NULL || res->ai_addrlen > sizeof b->addr) {
        fprintf(stderr, "arq-bench: %s:%s: %s\n", b->o.host, b->o.port,
                rc ? gai_strerror(rc) : "no address");
        if (res != NULL)
            freeaddrinfo(res);
        return -1;
    }
    memcpy(&b->addr, res->ai_addr, res->ai_addrlen);
    b->addr_len = (socklen_t)res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* A counter from /proc/net/netstat or /proc/net/snmp, whose lines come in
 * pairs: "Prefix: name name ..." then "Prefix: value value ...". -1 if absent. */
static int64_t proc_net_counter(const char *file, const char *prefix, const char *name)
{
    FILE *f = fopen(file, "r");
    if (f == NULL)
        return -1;
    static char names[8192], vals[8192];
    int64_t v = -1;
    size_t pl = strlen(prefix);
    while (v < 0 && fgets(names, sizeof names, f) != NULL && fgets(vals, sizeof vals, f) != NULL) {
        if (strncmp(names, prefix, pl) != 0 || strncmp(vals, prefix, pl) != 0)
            continue;
        char *sn, *sv;
        char *n = strtok_r(names + pl, " \n", &sn);
        char *x = strtok_r(vals + pl, " \n", &sv);
        for (; n != NULL && x != NULL;
             n = strtok_r(NULL, " \n", &sn), x = strtok_r(NULL, " \n", &sv))
            if (strcmp(n, name) == 0) {
                v = strtoll(x, NULL, 10);
                break;
            }
    }
    fclose(f);
    return v;
}

static void kernel_tcp(int64_t *overflows, int64_t *drops, int64_t *retrans)
{
    *overflows = proc_net_counter("/proc/net/netstat", "TcpExt:", "ListenOverflows");
    *drops = proc_net_counter("/proc/net/netstat", "TcpExt:", "ListenDrops");
    *retrans = proc_net_counter("/proc/net/snmp", "Tcp:", "RetransSegs");
}

static uint64_t st_ms_since(const struct st_times *t, uint64_t now)
{
    return now - t->start;
}

static void st_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct conn *c = arg;
    if (!c->b->failed && !c->b->interrupted)
        st_start(c);
}

/* The connection failed or was closed before its phase was over: close it
 * and connect again after 50-150 ms (a client's reconnect with jitter). */
static void st_lost(struct conn *c)
{
    struct bench *b = c->b;
    conn_close(c, 0);
    b->st_cur->retries++;
    if (++c->retries > AB_STORM_RETRIES) {
        fail(b, "connection %u: gave up after %u attempts", c->idx, AB_STORM_RETRIES);
        return;
    }
    uint32_t x = b->mask_state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    b->mask_state = x;
    struct timeval tv = {0, (suseconds_t)(50000 + x % 100000)};
    if (event_base_once(b->base, -1, EV_TIMEOUT, st_retry_cb, c, &tv) != 0)
        fail(b, "event_base_once failed");
}

static void st_start(struct conn *c)
{
    struct bench *b = c->b;
    c->fd = socket(b->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        fail(b, "socket: %s (ulimit -n?)", strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->st = CS_CONNECTING;
    c->conn_max = c->ack_sent = 0;
    c->rev = event_new(b->base, c->fd, EV_READ | EV_PERSIST, on_read, c);
    c->wev = event_new(b->base, c->fd, EV_WRITE, on_write, c);
    if (c->rev == NULL || c->wev == NULL) {
        fail(b, "out of memory");
        return;
    }
    if (connect(c->fd, (const struct sockaddr *)&b->addr, b->addr_len) != 0 &&
        errno != EINPROGRESS) {
        st_lost(c);
        return;
    }
    event_add(c->wev, NULL);
}

/* connect() finished: send the upgrade request. */
static void st_connected(struct conn *c)
{
    struct bench *b = c->b;
    struct st_times *t = b->st_cur;
    int err = 0;
    socklen_t l = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l) != 0 || err != 0) {
        st_lost(c);
        return;
    }
    if (!c->connected) {
        c->connected = 1;
        if (++t->n_connected == b->st_n)
            t->connected = st_ms_since(t, bench_now_ns());
    }
    char req[1024];
    int n = upgrade_request(&b->o, req, sizeof req);
    c->st = CS_UPGRADE;
    if (out_append(c, req, (size_t)n) != 0 || event_add(c->rev, NULL) != 0) {
        fail(b, "out of memory");
        return;
    }
    conn_flush(c);
    if (c->lost)
        st_lost(c);
}

/* Non-blocking upgrade: collect the response head, then speak WebSocket. */
static void st_upgrade_read(struct conn *c)
{
    struct bench *b = c->b;
    const size_t cap = 8192;
    if (c->head == NULL && (c->head = malloc(cap)) == NULL) {
        fail(b, "out of memory");
        return;
    }
    ssize_t r = recv(c->fd, c->head + c->head_len, cap - 1 - c->head_len, 0);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (r <= 0) {
        st_lost(c);
        return;
    }
    c->head_len += (size_t)r;
    c->head[c->head_len] = '\0';
    char *end = strstr(c->head, "\r\n\r\n");
    if (end == NULL) {
        if (c->head_len + 1 >= cap)
            st_lost(c);
        return;
    }
    if (strncmp(c->head, "HTTP/1.1 101", 12) != 0) {
        if (b->st_errors++ < AB_NACK_REPORTS) {
            c->head[strcspn(c->head, "\r\n")] = '\0';
            fprintf(stderr, "arq-bench: upgrade refused: %s\n", c->head);
        }
        st_lost(c);
        return;
    }
    size_t used = (size_t)(end + 4 - c->head);
    if (used < c->head_len) {
        c->pending = malloc(c->head_len - used);
        if (c->pending == NULL) {
            fail(b, "out of memory");
            return;
        }
        memcpy(c->pending, c->head + used, c->head_len - used);
        c->pending_len = c->head_len - used;
        c->pending_off = 0;
    }
    free(c->head);
    c->head = NULL;
    c->head_len = 0;
    if (conn_ws_init(c) != 0) {
        fail(b, "out of memory");
        return;
    }
    c->st = CS_WS;
    send_hello(c);
    conn_flush(c);
    if (c->lost) {
        st_lost(c);
        return;
    }
    if (c->pending_len > 0)
        on_read(c->fd, EV_READ, c);
}

static void st_check_caught(struct conn *c)
{
    struct bench *b = c->b;
    struct st_times *t = b->st_cur;
    if (c->caught || !b->st_targets_final || c->got < b->st_target[c->sidx])
        return;
    /* After a reconnect, only a connection that is receiving again counts. */
    if (b->sphase == SP_RECONNECT && !(c->welcomed && (c->resumed || c->subscribed)))
        return;
    uint64_t now = bench_now_ns();
    c->caught = 1;
    c->t_caught = now;
    bench_hist_add(&t->caught_lat, st_ms_since(t, now));
    if (++t->n_caught == b->st_n)
        t->caught = st_ms_since(t, now);
}

static void st_send_ack(struct conn *c)
{
    if (c->st != CS_WS || c->conn_max <= c->ack_sent)
        return;
    char name[128];
    stream_name(c->b, c->sidx, name, sizeof name);
    pack_ack(c, name, c->conn_max);
    c->ack_sent = c->conn_max;
}

static void st_copy_str(char *dst, const msgpack_object *o, uint64_t *bad)
{
    if (o == NULL || o->type != MSGPACK_OBJECT_STR || o->via.str.size > AB_SESSION_MAX) {
        dst[0] = '\0';
        (*bad)++;
        return;
    }
    memcpy(dst, o->via.str.ptr, o->via.str.size);
    dst[o->via.str.size] = '\0';
}

/* welcome.subs: the entry for this connection's stream, or NULL. */
static const msgpack_object *st_find_sub(const struct conn *c, const msgpack_object *subs)
{
    if (subs == NULL || subs->type != MSGPACK_OBJECT_ARRAY)
        return NULL;
    for (uint32_t i = 0; i < subs->via.array.size; i++) {
        const msgpack_object *e = &subs->via.array.ptr[i];
        if (e->type == MSGPACK_OBJECT_MAP &&
            obj_stream_index(c->b, map_get(e, "stream")) == c->sidx)
            return e;
    }
    return NULL;
}

static void st_on_welcome(struct conn *c, const msgpack_object *map)
{
    struct bench *b = c->b;
    struct st_times *t = b->st_cur;
    uint64_t now = bench_now_ns();
    const msgpack_object *res = map_get(map, "resumed");
    int resumed = res != NULL && res->type == MSGPACK_OBJECT_BOOLEAN && res->via.boolean;
    st_copy_str(c->session, map_get(map, "session"), &b->st_bad_session);
    st_copy_str(c->token, map_get(map, "resume_token"), &b->st_bad_session);
    int first = !c->welcomed;
    if (first) {
        c->welcomed = 1;
        c->t_welcome = now;
        bench_hist_add(&t->welcome_lat, st_ms_since(t, now));
        if (++t->n_welcomed == b->st_n)
            t->welcomed = st_ms_since(t, now);
    }
    char name[128];
    stream_name(b, c->sidx, name, sizeof name);
    if (b->sphase != SP_RECONNECT) {
        pack_sub(c, name, 0, 0); /* from "latest" */
        return;
    }
    if (resumed) {
        const msgpack_object *e = st_find_sub(c, map_get(map, "subs"));
        if (e != NULL) {
            uint64_t epoch = obj_u64(map_get(e, "epoch"));
            uint64_t acked = obj_u64(map_get(e, "acked"));
            if (epoch != c->epoch) /* history reset: offsets meaningless (4a) */
                b->st_errors++;
            if (acked > c->got) /* the server holds an ack beyond what this client processed */
                t->holes++;
            if (!c->resumed) {
                c->resumed = 1;
                if (++t->n_resumed == b->st_n)
                    t->resumed = st_ms_since(t, now);
            }
            st_check_caught(c);
            return;
        }
        if (first)
            t->n_nosub++;
    } else if (first) {
        c->fresh = 1;
        t->n_fresh++;
    }
    /* Not resumed (or resumed without this subscription): resubscribe from the
     * client's own offset, as protocol.md section 4a says. */
    pack_sub(c, name, c->got + 1, c->epoch);
    st_check_caught(c);
}

static void st_on_subok(struct conn *c, const msgpack_object *map)
{
    struct bench *b = c->b;
    struct st_times *t = b->st_cur;
    uint64_t epoch = obj_u64(map_get(map, "epoch"));
    if (b->sphase == SP_CONNECT) {
        uint64_t next = obj_u64(map_get(map, "next"));
        c->epoch = epoch;
        c->got = next > 0 ? next - 1 : 0;
    } else if (c->epoch != 0 && epoch != c->epoch) {
        b->st_errors++;
    }
    if (!c->subscribed) {
        c->subscribed = 1;
        if (++t->n_subscribed == b->st_n)
            t->subscribed = st_ms_since(t, bench_now_ns());
    }
    st_check_caught(c); /* nothing was missed (--during 0) */
}

static void st_on_msg(struct conn *c, const msgpack_object *map)
{
    struct bench *b = c->b;
    struct st_times *t = b->st_cur;
    if (obj_stream_index(b, map_get(map, "stream")) != c->sidx) {
        b->st_errors++;
        return;
    }
    uint64_t off = obj_u64(map_get(map, "offset"));
    if (off > c->conn_max)
        c->conn_max = off;
    if (off <= c->got) {
        t->dups++; /* delivered again: at-least-once after a resume from the acked offset */
    } else {
        if (off != c->got + 1)
            t->holes++;
        c->got = off;
    }
    st_check_caught(c);
}

static void st_publish_more(struct conn *c)
{
    struct bench *b = c->b;
    while (c->inflight < 1024 && b->st_pub_total > b->pubs_sent && send_pub(c) == 0)
        b->pubs_sent++;
}

static void st_on_puback(struct conn *c, const msgpack_object *map, int nack)
{
    struct bench *b = c->b;
    if (c->inflight > 0)
        c->inflight--;
    if (nack) {
        report_reason("nack", map);
        fail(b, "a publish was refused");
        return;
    }
    unsigned si = obj_stream_index(b, map_get(map, "stream"));
    uint64_t off = obj_u64(map_get(map, "offset"));
    if (si != UINT_MAX && off > b->st_target[si])
        b->st_target[si] = off;
    b->st_pub_acked++;
    st_publish_more(c);
}

static void st_handle(struct conn *c, const msgpack_object *map, const msgpack_object *t)
{
    struct bench *b = c->b;
    if (obj_is(t, "msg")) {
        st_on_msg(c, map);
    } else if (obj_is(t, "welcome")) {
        if (c->role == ROLE_PUB)
            b->n_ready++;
        else
            st_on_welcome(c, map);
    } else if (obj_is(t, "subok")) {
        st_on_subok(c, map);
    } else if (obj_is(t, "puback")) {
        st_on_puback(c, map, 0);
    } else if (obj_is(t, "nack")) {
        report_reason("nack", map);
        if (c->role == ROLE_PUB)
            st_on_puback(c, map, 1);
        else
            fail(b, "a subscription was refused");
    } else if (obj_is(t, "error")) {
        report_reason("error", map);
        fail(b, "server reported an error");
    } else if (obj_is(t, "gap")) {
        b->st_cur->holes++;
    }
}

static int st_pub_ready(const struct bench *b)
{
    return b->n_ready >= 1;
}

static int st_all_subscribed(const struct bench *b)
{
    return b->st_cur->n_subscribed >= b->st_n;
}

static int st_all_caught(const struct bench *b)
{
    return b->st_cur->n_caught >= b->st_n;
}

static int st_published(const struct bench *b)
{
    return b->st_pub_acked >= b->st_pub_total;
}

/* Publish `per_stream` messages to every stream and wait for their pubacks. */
static int st_publish(struct bench *b, unsigned per_stream)
{
    struct conn *p = &b->conns[0];
    b->st_targets_final = 0;
    b->st_pub_total += (uint64_t)per_stream * b->o.streams;
    st_publish_more(p);
    conn_flush(p);
    if (run_until(b, st_published, b->o.timeout, "publishing") != 0)
        return -1;
    b->st_targets_final = 1;
    return 0;
}

static void st_phase_begin(struct bench *b, struct st_times *t, enum sphase ph)
{
    memset(t, 0, sizeof *t);
    b->st_cur = t;
    b->sphase = ph;
    for (unsigned i = 1; i <= b->st_n; i++) {
        struct conn *c = &b->conns[i];
        c->connected = c->welcomed = c->resumed = c->fresh = c->subscribed = c->caught = 0;
        c->retries = 0;
    }
    b->st_cpu0 = cpu_now();
    b->st_srv0 = bench_proc_cpu_sec(b->o.server_pid);
    kernel_tcp(&t->listen_overflows, &t->listen_drops, &t->retrans_segs);
    t->start = bench_now_ns();
}

static void st_phase_end(struct bench *b, struct st_times *t)
{
    double s = (double)(bench_now_ns() - t->start) / 1e9;
    double s1 = bench_proc_cpu_sec(b->o.server_pid);
    t->bench_cpu = (cpu_now() - b->st_cpu0) / s;
    t->srv_cpu = b->st_srv0 >= 0 && s1 >= 0 ? (s1 - b->st_srv0) / s : -1;
    int64_t o, d, r;
    kernel_tcp(&o, &d, &r);
    t->listen_overflows = o >= 0 && t->listen_overflows >= 0 ? o - t->listen_overflows : -1;
    t->listen_drops = d >= 0 && t->listen_drops >= 0 ? d - t->listen_drops : -1;
    t->retrans_segs = r >= 0 && t->retrans_segs >= 0 ? r - t->retrans_segs : -1;
}

static void st_connect_all(struct bench *b, struct st_times *t)
{
    for (unsigned i = 1; i <= b->st_n && !b->failed; i++)
        st_start(&b->conns[i]);
    t->started = st_ms_since(t, bench_now_ns());
}

static void st_print(FILE *f, const struct bench *b, int json);

static int run_storm(struct bench *b)
{
    const struct opts *o = &b->o;
    b->st_n = o->storm_conns;
    b->st_target = calloc(o->streams, sizeof *b->st_target);
    if (b->st_target == NULL || st_resolve(b) != 0)
        return 1;
    struct conn *p = &b->conns[0];
    p->b = b;
    p->role = ROLE_PUB;
    for (unsigned i = 1; i <= b->st_n; i++) {
        struct conn *c = &b->conns[i];
        c->b = b;
        c->idx = i;
        c->fd = -1;
        c->role = ROLE_ST_SUB;
        c->is_sub = 1;
        c->sidx = (i - 1) % o->streams;
    }
    struct st_times scratch;
    b->st_cur = &scratch;
    memset(&scratch, 0, sizeof scratch);
    if (conn_open(b, p) != 0) {
        fprintf(stderr, "arq-bench: could not open the publisher\n");
        return 1;
    }
    if (run_until(b, st_pub_ready, AB_SETUP_TIMEOUT, "publisher's welcome") != 0)
        goto out;
    /* One message per stream creates the streams, so that every subok carries
     * the epoch a client needs to resubscribe from its own offset. */
    if (st_publish(b, 1) != 0)
        goto out;

    /* 1. All subscribers connect at once (fresh sessions), subscribe from "latest". */
    st_phase_begin(b, &b->st_init, SP_CONNECT);
    st_connect_all(b, &b->st_init);
    if (run_until(b, st_all_subscribed, o->timeout, "initial connect") != 0)
        goto out;
    st_phase_end(b, &b->st_init);

    /* 2. A few messages per stream, received and acked by everyone. */
    st_phase_begin(b, &scratch, SP_BEFORE);
    if (st_publish(b, o->before) != 0)
        goto out;
    for (unsigned i = 1; i <= b->st_n; i++)
        st_check_caught(&b->conns[i]);
    if (run_until(b, st_all_caught, o->timeout, "delivery before the drop") != 0)
        goto out;
    /* Acks go out with the read that completed a connection; the server
     * persists them within ~100 ms (protocol.md 4a). */
    if (run_until(b, never_done, o->settle, "settle") != 0)
        goto out;

    /* 3. Drop every subscriber at once, publish while they are down. */
    b->st_t_drop = bench_now_ns();
    for (unsigned i = 1; i <= b->st_n; i++)
        conn_close(&b->conns[i], 1);
    b->st_t_dropped = bench_now_ns();
    b->sphase = SP_DOWN;
    if (st_publish(b, o->during) != 0)
        goto out;
    b->st_t_published = bench_now_ns();

    /* 4. Everyone reconnects at once with its session. */
    st_phase_begin(b, &b->st_re, SP_RECONNECT);
    st_connect_all(b, &b->st_re);
    if (run_until(b, st_all_caught, o->timeout, "reconnect") != 0)
        goto out;
    st_phase_end(b, &b->st_re);
    if (getloadavg(b->load_after, 3) != 3)
        b->load_after[0] = b->load_after[1] = b->load_after[2] = -1;
    b->st_cur = &b->st_re;
    st_print(o->json ? stderr : stdout, b, 0);
    if (o->json)
        st_print(stdout, b, 1);
    return b->st_re.holes > 0 || b->st_init.holes > 0 ? 1 : 0;
out:
    if (b->st_cur != NULL && b->st_cur != &scratch) {
        fprintf(stderr,
                "arq-bench: phase %d: %u connected, %u welcomed (%u resumed, %u fresh), "
                "%u subscribed, %u caught up of %u; %llu retries\n",
                (int)b->sphase, b->st_cur->n_connected, b->st_cur->n_welcomed, b->st_cur->n_resumed,
                b->st_cur->n_fresh, b->st_cur->n_subscribed, b->st_cur->n_caught, b->st_n,
                (unsigned long long)b->st_cur->retries);
    }
    return b->interrupted ? 130 : 1;
}

static double ms(uint64_t ns)
{
    return (double)ns / 1e6;
}

static void st_print_lat(FILE *f, const char *what, const bench_hist_t *h)
{
    fprintf(f, "    %-26s p50 %8.1f ms   p99 %8.1f ms   max %8.1f ms\n", what,
            bench_hist_q_us(h, 0.50) / 1e3, bench_hist_q_us(h, 0.99) / 1e3,
            bench_hist_q_us(h, 1.0) / 1e3);
}

static void st_print_cpu(FILE *f, const struct bench *b, const struct st_times *t)
{
    fprintf(f, "    CPU: arq-bench %.0f%% of one core", t->bench_cpu * 100);
    if (t->srv_cpu >= 0)
        fprintf(f, ", arqd (pid %ld) %.0f%%", b->o.server_pid, t->srv_cpu * 100);
    fprintf(f,
            "; kernel (whole machine): %lld listen-queue overflows, %lld listen drops, %lld TCP "
            "retransmits\n",
            (long long)t->listen_overflows, (long long)t->listen_drops, (long long)t->retrans_segs);
}

static void st_json_times(FILE *f, const char *name, const struct st_times *t)
{
    fprintf(f,
            ",\"%s\":{\"connects_issued_ms\":%.3f,\"all_connected_ms\":%.3f,"
            "\"all_welcomed_ms\":%.3f,\"all_resumed_ms\":",
            name, ms(t->started), ms(t->connected), ms(t->welcomed));
    if (t->resumed)
        fprintf(f, "%.3f", ms(t->resumed));
    else
        fprintf(f, "null");
    fprintf(f, ",\"all_subscribed_ms\":");
    if (t->subscribed)
        fprintf(f, "%.3f", ms(t->subscribed));
    else
        fprintf(f, "null");
    fprintf(f, ",\"all_caught_up_ms\":");
    if (t->caught)
        fprintf(f, "%.3f", ms(t->caught));
    else
        fprintf(f, "null");
    fprintf(f,
            ",\"welcomed\":%u,\"resumed\":%u,\"fresh\":%u,\"resumed_without_sub\":%u,"
            "\"retries\":%llu,\"redelivered\":%llu,\"holes\":%llu,"
            "\"welcome_ms\":{\"p50\":%.2f,\"p99\":%.2f,\"max\":%.2f},"
            "\"caught_up_ms\":{\"p50\":%.2f,\"p99\":%.2f,\"max\":%.2f},\"listen_overflows\":%lld,"
            "\"listen_drops\":%lld,\"tcp_retransmits\":%lld,\"bench_cpu\":%.3f,\"server_cpu\":",
            t->n_welcomed, t->n_resumed, t->n_fresh, t->n_nosub, (unsigned long long)t->retries,
            (unsigned long long)t->dups, (unsigned long long)t->holes,
            bench_hist_q_us(&t->welcome_lat, 0.5) / 1e3,
            bench_hist_q_us(&t->welcome_lat, 0.99) / 1e3,
            bench_hist_q_us(&t->welcome_lat, 1.0) / 1e3, bench_hist_q_us(&t->caught_lat, 0.5) / 1e3,
            bench_hist_q_us(&t->caught_lat, 0.99) / 1e3, bench_hist_q_us(&t->caught_lat, 1.0) / 1e3,
            (long long)t->listen_overflows, (long long)t->listen_drops, (long long)t->retrans_segs,
            t->bench_cpu);
    if (t->srv_cpu >= 0)
        fprintf(f, "%.3f}", t->srv_cpu);
    else
        fprintf(f, "null}");
}

static void st_print(FILE *f, const struct bench *b, int json)
{
    const struct opts *o = &b->o;
    const struct st_times *i = &b->st_init, *r = &b->st_re;
    char cpu[128], c1[32];
    cpu_model(cpu, sizeof cpu);
    uint64_t down = r->start - b->st_t_drop; /* drop -> first reconnect */
    if (json) {
        fprintf(f, "{\"tool\":\"arq-bench\",\"mode\":\"storm\",\"command\":");
        bench_json_str(f, b->cmdline);
        fprintf(f, ",\"machine\":{\"nproc\":%ld,\"cpu\":", sysconf(_SC_NPROCESSORS_ONLN));
        bench_json_str(f, cpu);
        fprintf(f, ",\"load_before\":[%.2f,%.2f,%.2f],\"load_after\":[%.2f,%.2f,%.2f]}",
                b->load_before[0], b->load_before[1], b->load_before[2], b->load_after[0],
                b->load_after[1], b->load_after[2]);
        fprintf(f,
                ",\"config\":{\"connections\":%u,\"streams\":%u,\"before\":%u,\"during\":%u,"
                "\"resume\":%s,\"settle_s\":%g}",
                b->st_n, o->streams, o->before, o->during, o->resume ? "true" : "false", o->settle);
        st_json_times(f, "connect", i);
        fprintf(f, ",\"drop_ms\":%.3f,\"down_ms\":%.3f", ms(b->st_t_dropped - b->st_t_drop),
                ms(down));
        st_json_times(f, "reconnect", r);
        fprintf(f, ",\"from_drop_ms\":{\"all_resumed\":");
        if (r->resumed)
            fprintf(f, "%.3f", ms(down + r->resumed));
        else
            fprintf(f, "null");
        fprintf(f, ",\"all_caught_up\":%.3f}", ms(down + r->caught));
        fprintf(f, ",\"welcomes_per_s\":%.1f,\"errors\":%llu,\"server_closes\":%llu}\n",
                (double)b->st_n / ((double)r->welcomed / 1e9), (unsigned long long)b->st_errors,
                (unsigned long long)b->st_closes);
        return;
    }
    fprintf(f, "arq-bench: %s\n", b->cmdline);
    fprintf(f, "machine: %ld x %s\n", sysconf(_SC_NPROCESSORS_ONLN), cpu);
    fprintf(f, "load average: %.2f %.2f %.2f before, %.2f %.2f %.2f after\n", b->load_before[0],
            b->load_before[1], b->load_before[2], b->load_after[0], b->load_after[1],
            b->load_after[2]);
    fprintf(f,
            "storm: %u subscriber connections on %u streams; %u msgs/stream before the drop, %u "
            "while down; reconnect %s\n",
            b->st_n, o->streams, o->before, o->during,
            o->resume ? "with hello{session, resume_token}" : "without session (--no-resume)");
    fprintf(f,
            "1. connect, all at once (fresh sessions): connect() issued %.0f ms, all connected "
            "%.0f ms, welcomed %.0f ms, subscribed %.0f ms (%s connects/s); %llu retries\n",
            ms(i->started), ms(i->connected), ms(i->welcomed), ms(i->subscribed),
            bench_fmt_count(c1, sizeof c1, (double)b->st_n / ((double)i->subscribed / 1e9)),
            (unsigned long long)i->retries);
    st_print_lat(f, "welcome per connection:", &i->welcome_lat);
    st_print_cpu(f, b, i);
    fprintf(f,
            "2. drop: %u sockets closed with RST in %.0f ms; %u messages published while down; "
            "first reconnect %.0f ms after the drop\n",
            b->st_n, ms(b->st_t_dropped - b->st_t_drop), o->during * o->streams, ms(down));
    fprintf(f, "3. reconnect, all at once (times from the first connect()):\n");
    fprintf(f, "    connect() issued for all   %8.0f ms\n", ms(r->started));
    fprintf(f, "    all TCP connected          %8.0f ms\n", ms(r->connected));
    fprintf(f, "    all welcomed               %8.0f ms   (%s welcomes/s)\n", ms(r->welcomed),
            bench_fmt_count(c1, sizeof c1, (double)b->st_n / ((double)r->welcomed / 1e9)));
    fprintf(f, "    resumed: %u of %u (fresh sessions %u, resumed without the subscription %u)\n",
            r->n_resumed, b->st_n, r->n_fresh, r->n_nosub);
    if (r->resumed)
        fprintf(f, "    all resumed                %8.0f ms   (%.0f ms after the drop)\n",
                ms(r->resumed), ms(down + r->resumed));
    else
        fprintf(f, "    all resumed                     n/a   (%u not resumed)\n",
                b->st_n - r->n_resumed);
    fprintf(f, "    all caught up              %8.0f ms   (%.0f ms after the drop)\n",
            ms(r->caught), ms(down + r->caught));
    st_print_lat(f, "welcome per connection:", &r->welcome_lat);
    st_print_lat(f, "caught up per connection:", &r->caught_lat);
    fprintf(f,
            "    retries %llu, redelivered (already processed) %llu, holes %llu, errors %llu, "
            "server closes %llu\n",
            (unsigned long long)r->retries, (unsigned long long)r->dups,
            (unsigned long long)r->holes, (unsigned long long)b->st_errors,
            (unsigned long long)b->st_closes);
    st_print_cpu(f, b, r);
    if (r->resumed)
        fprintf(f, "goal: %u clients resumed in < 5 s: %s (%.2f s after the drop)\n", b->st_n,
                ms(down + r->resumed) < 5000 ? "met" : "MISSED", ms(down + r->resumed) / 1e3);
    else
        fprintf(f, "goal: %u clients resumed in < 5 s: not measurable (%s)\n", b->st_n,
                o->resume ? "the server did not resume them" : "--no-resume");
}

/* ---- options --------------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: arq-bench --url ws://HOST:PORT/ws [-c CONNS] [-w DEPTH] [-s SUBSCRIBERS]\n"
            "                 [--rate R [--tick-us US]] [--seconds S] [--warmup S] [--size BYTES]\n"
            "                 [--streams N] [--server-pid PID] [--no-metrics] [--json]\n"
            "       arq-bench --url URL --catchup N [--data-dir DIR] [--reps R] [-c C] [-w W]\n"
            "       arq-bench --url URL --storm C [--streams K] [--before M] [--during M]\n"
            "                 [--no-resume] [--settle S] [--timeout S]\n"
            "\n"
            "Load generator for a running arqd (arq.v1 over WebSocket). See docs/benchmarks.md.\n"
            "\n"
            "  --url URL          the server's WebSocket URL (required)\n"
            "  -c, --conns C      publisher connections (default 50)\n"
            "  -w, --depth W      publishes in flight per publisher (default 1)\n"
            "  -s, --subscribers S  subscriber connections, each on every stream (default 0)\n"
            "  --rate R           open loop: R publishes/s in aggregate (-w is then ignored)\n"
            "  --tick-us US       open loop: send what is due every US microseconds, round-\n"
            "                     robin over the publishers (default 200)\n"
            "  --seconds S        measurement window (default 5)\n"
            "  --warmup S         warm-up before the window (default 1)\n"
            "  --size BYTES       payload size, >= 8 (default 128)\n"
            "  --streams N        streams, publishes go round-robin (default 8)\n"
            "  --server-pid PID   also report this process's CPU use (the server's)\n"
            "  --no-metrics       do not read the server's /metrics\n"
            "  --json             one JSON object on stdout; the text goes to stderr\n"
            "\n"
            "  --catchup N        publish N messages to one stream (-c publishers, default 50,\n"
            "                     x -w in flight, default 64), then time one subscriber\n"
            "                     receiving all N from offset 1\n"
            "  --data-dir DIR     arqd's data directory: also read the same records from LMDB\n"
            "                     (read-only) and compare\n"
            "  --reps R           catch-ups to time, each on a new connection (default 1)\n"
            "  --storm C          C subscriber connections on --streams K streams (default\n"
            "                     100), dropped and reconnected at once with their session\n"
            "  --before M         messages per stream before the drop (default 2)\n"
            "  --during M         messages per stream while down (default 5)\n"
            "  --no-resume        reconnect without session: resubscribe from own offsets\n"
            "  --settle S         wait between the last ack and the drop (default 0.5)\n"
            "  --timeout S        per phase (default 60; --catchup 600)\n");
}

static int parse_url(const char *url, struct opts *o)
{
    if (strncmp(url, "ws://", 5) != 0)
        return -1;
    const char *h = url + 5, *slash = strchr(h, '/');
    const char *colon = memchr(h, ':', slash ? (size_t)(slash - h) : strlen(h));
    if (colon == NULL || (size_t)(colon - h) >= sizeof o->host)
        return -1;
    snprintf(o->host, sizeof o->host, "%.*s", (int)(colon - h), h);
    size_t pl = slash ? (size_t)(slash - colon - 1) : strlen(colon + 1);
    if (pl == 0 || pl >= sizeof o->port)
        return -1;
    snprintf(o->port, sizeof o->port, "%.*s", (int)pl, colon + 1);
    snprintf(o->path, sizeof o->path, "%s", slash ? slash : "/ws");
    return 0;
}

static int parse_uint(const char *s, unsigned lo, unsigned hi, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi)
        return -1;
    *out = (unsigned)v;
    return 0;
}

static int parse_pos_double(const char *s, double *out)
{
    char *end;
    double v = strtod(s, &end);
    if (*end || end == s || !(v > 0) || v > 1e9)
        return -1;
    *out = v;
    return 0;
}

static int parse_opts(int argc, char **argv, struct opts *o)
{
    static const struct option longopts[] = {
        {"url", required_argument, NULL, 'u'},
        {"conns", required_argument, NULL, 'c'},
        {"depth", required_argument, NULL, 'w'},
        {"subscribers", required_argument, NULL, 's'},
        {"rate", required_argument, NULL, 'r'},
        {"tick-us", required_argument, NULL, 1010},
        {"seconds", required_argument, NULL, 'S'},
        {"warmup", required_argument, NULL, 'W'},
        {"size", required_argument, NULL, 'z'},
        {"streams", required_argument, NULL, 'n'},
        {"server-pid", required_argument, NULL, 'p'},
        {"no-metrics", no_argument, NULL, 'M'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {"catchup", required_argument, NULL, 1001},
        {"data-dir", required_argument, NULL, 1002},
        {"reps", required_argument, NULL, 1003},
        {"storm", required_argument, NULL, 1004},
        {"before", required_argument, NULL, 1005},
        {"during", required_argument, NULL, 1006},
        {"no-resume", no_argument, NULL, 1007},
        {"settle", required_argument, NULL, 1008},
        {"timeout", required_argument, NULL, 1009},
        {NULL, 0, NULL, 0},
    };
    memset(o, 0, sizeof *o);
    o->conns = 50;
    o->depth = 1;
    o->streams = 8;
    o->seconds = 5;
    o->warmup = 1;
    o->size = 128;
    o->metrics = 1;
    o->reps = 1;
    o->before = 2;
    o->during = 5;
    o->resume = 1;
    o->settle = 0.5;
    o->tick_us = AB_TICK_US;
    int have_url = 0, ch;
    unsigned pid, n;
    char *end;
    while ((ch = getopt_long(argc, argv, "c:w:s:h", longopts, NULL)) != -1) {
        int bad = 0;
        switch (ch) {
        case 'u':
            bad = parse_url(optarg, o);
            have_url = !bad;
            break;
        case 'c':
            bad = parse_uint(optarg, 1, AB_MAX_CONNS, &o->conns);
            o->conns_set = 1;
            break;
        case 'w':
            bad = parse_uint(optarg, 1, AB_RING / 2, &o->depth);
            o->depth_set = 1;
            break;
        case 's':
            bad = parse_uint(optarg, 0, AB_MAX_CONNS, &o->subs);
            break;
        case 'r':
            bad = parse_pos_double(optarg, &o->rate);
            break;
        case 1010:
            bad = parse_uint(optarg, 10, 1000000, &o->tick_us);
            break;
        case 'S':
            bad = parse_pos_double(optarg, &o->seconds);
            break;
        case 'W':
            if (strcmp(optarg, "0") == 0)
                o->warmup = 0;
            else
                bad = parse_pos_double(optarg, &o->warmup);
            break;
        case 'z':
            bad = parse_uint(optarg, 8, 65536, &o->size);
            break;
        case 'n':
            bad = parse_uint(optarg, 1, AB_STORM_MAX, &o->streams);
            o->streams_set = 1;
            break;
        case 'p':
            bad = parse_uint(optarg, 1, INT_MAX, &pid);
            o->server_pid = (long)pid;
            break;
        case 'M':
            o->metrics = 0;
            break;
        case 'j':
            o->json = 1;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        case 1001:
            errno = 0;
            o->catchup_n = strtoull(optarg, &end, 10);
            bad = errno || *end || end == optarg || o->catchup_n < 1 || o->catchup_n > 1000000000;
            o->mode = MODE_CATCHUP;
            break;
        case 1002:
            bad = strlen(optarg) >= sizeof o->data_dir || optarg[0] == '\0';
            if (!bad)
                snprintf(o->data_dir, sizeof o->data_dir, "%s", optarg);
            break;
        case 1003:
            bad = parse_uint(optarg, 1, 64, &o->reps);
            break;
        case 1004:
            bad = parse_uint(optarg, 1, AB_STORM_MAX, &o->storm_conns);
            o->mode = MODE_STORM;
            break;
        case 1005:
            bad = parse_uint(optarg, 1, 1000, &o->before);
            break;
        case 1006:
            bad = parse_uint(optarg, 0, 1000, &n);
            o->during = n;
            break;
        case 1007:
            o->resume = 0;
            break;
        case 1008:
            if (strcmp(optarg, "0") == 0)
                o->settle = 0;
            else
                bad = parse_pos_double(optarg, &o->settle);
            break;
        case 1009:
            bad = parse_pos_double(optarg, &o->timeout);
            break;
        default:
            usage(stderr);
            return -1;
        }
        if (bad) {
            fprintf(stderr, "arq-bench: bad value for an option: '%s'\n", optarg);
            return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "arq-bench: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    if (!have_url) {
        fprintf(stderr, "arq-bench: --url ws://HOST:PORT/PATH is required\n");
        usage(stderr);
        return -1;
    }
    if (o->catchup_n > 0 && o->storm_conns > 0) {
        fprintf(stderr, "arq-bench: --catchup and --storm are separate runs\n");
        return -1;
    }
    if (o->mode == MODE_LOAD && o->streams > AB_MAX_STREAMS) {
        fprintf(stderr, "arq-bench: --streams: at most %u without --storm\n", AB_MAX_STREAMS);
        return -1;
    }
    if (o->mode == MODE_CATCHUP) {
        o->streams = 1;
        if (!o->depth_set)
            o->depth = 64;
        if (o->timeout <= 0)
            o->timeout = 600;
    }
    if (o->mode == MODE_STORM) {
        if (!o->streams_set)
            o->streams = 100;
        if (o->streams > o->storm_conns)
            o->streams = o->storm_conns;
        if (o->timeout <= 0)
            o->timeout = 60;
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct bench *b = &g_b;
    if (parse_opts(argc, argv, &b->o) != 0)
        return 2;
    size_t o = 0;
    for (int i = 0; i < argc && o + 1 < sizeof b->cmdline; i++) {
        int n = snprintf(b->cmdline + o, sizeof b->cmdline - o, "%s%s", i ? " " : "", argv[i]);
        if (n < 0)
            break;
        o += (size_t)n;
    }
    if (o >= sizeof b->cmdline)
        b->cmdline[sizeof b->cmdline - 1] = '\0';
    signal(SIGPIPE, SIG_IGN);
    if (getloadavg(b->load_before, 3) != 3)
        b->load_before[0] = b->load_before[1] = b->load_before[2] = -1;
    uint64_t t = bench_now_ns();
    b->mask_state = (uint32_t)(t ^ (t >> 32) ^ (uint64_t)getpid()) | 1u;
    /* Fresh stream names per run, so "latest" and offsets never mix runs. */
    snprintf(b->stream_prefix, sizeof b->stream_prefix, "bench.%ld.%llu", (long)getpid(),
             (unsigned long long)(t % 1000000u));
    b->payload = malloc(b->o.size);
    b->n_conns = b->o.mode == MODE_CATCHUP ? b->o.conns + 1
                 : b->o.mode == MODE_STORM ? b->o.storm_conns + 1
                                           : b->o.conns + b->o.subs;
    b->conns = calloc(b->n_conns, sizeof *b->conns);
    struct event_config *cfg = event_config_new();
    if (cfg != NULL)
        event_config_set_flag(cfg, EVENT_BASE_FLAG_PRECISE_TIMER);
    b->base = cfg ? event_base_new_with_config(cfg) : NULL;
    if (cfg != NULL)
        event_config_free(cfg);
    if (b->payload == NULL || b->conns == NULL || b->base == NULL) {
        fprintf(stderr, "arq-bench: out of memory\n");
        return 1;
    }
    for (unsigned i = 0; i < b->o.size; i++)
        b->payload[i] = (uint8_t)('a' + i % 26);

    struct event *sig = evsignal_new(b->base, SIGINT, on_sigint, b);
    struct event *sig2 = evsignal_new(b->base, SIGTERM, on_sigint, b);
    evsignal_add(sig, NULL);
    evsignal_add(sig2, NULL);
    int rc = 0;
    if (b->o.mode == MODE_CATCHUP) {
        rc = run_catchup(b);
        goto cleanup;
    }
    if (b->o.mode == MODE_STORM) {
        rc = run_storm(b);
        goto cleanup;
    }
    /* Subscribers first, so that they are subscribed before anything is published. */
    for (unsigned k = 0; k < b->n_conns; k++) {
        unsigned i = (k + b->o.conns) % b->n_conns;
        struct conn *c = &b->conns[i];
        c->b = b;
        c->idx = i;
        c->is_sub = i >= b->o.conns;
        c->role = c->is_sub ? ROLE_SUB : ROLE_PUB;
        if (conn_open(b, c) != 0) {
            fprintf(stderr, "arq-bench: could not open connection %u of %u\n", k + 1, b->n_conns);
            return 1;
        }
    }
    struct timeval tv_setup = {(time_t)AB_SETUP_TIMEOUT, 0};
    event_base_once(b->base, -1, EV_TIMEOUT, on_setup_timeout, b, &tv_setup);
    /* Run until all connections are ready, then time the warm-up and window. */
    while (b->phase == PH_SETUP && !b->failed && !b->interrupted)
        event_base_loop(b->base, EVLOOP_ONCE);
    if (!b->failed && !b->interrupted) {
        struct timeval tw = {(time_t)b->o.warmup,
                             (suseconds_t)((b->o.warmup - (double)(time_t)b->o.warmup) * 1e6)};
        double end = b->o.warmup + b->o.seconds;
        struct timeval te = {(time_t)end, (suseconds_t)((end - (double)(time_t)end) * 1e6)};
        event_base_once(b->base, -1, EV_TIMEOUT, on_measure, b, &tw);
        event_base_once(b->base, -1, EV_TIMEOUT, on_end, b, &te);
        event_base_dispatch(b->base);
    }
    if (getloadavg(b->load_after, 3) != 3)
        b->load_after[0] = b->load_after[1] = b->load_after[2] = -1;
    if (b->interrupted) {
        fprintf(stderr, "arq-bench: interrupted\n");
        rc = 130;
    } else if (b->failed || b->phase != PH_DONE) {
        rc = 1;
    } else {
        struct results r;
        compute(b, &r);
        print_text(b->o.json ? stderr : stdout, b, &r);
        if (b->o.json)
            print_json(stdout, b, &r);
        if (b->nacks > 0)
            rc = 1;
    }
cleanup:
    if (b->interrupted && rc != 130) {
        fprintf(stderr, "arq-bench: interrupted\n");
        rc = 130;
    }
    /* RST for --storm's subscribers, so that 10,000 client ports are not left
     * in TIME_WAIT for the next run's connects. */
    for (unsigned i = 0; i < b->n_conns; i++)
        conn_close(&b->conns[i], b->conns[i].role == ROLE_ST_SUB);
    free(b->cu_reps);
    free(b->st_target);
    if (b->tick != NULL)
        event_free(b->tick);
    if (b->stall_probe != NULL) { /* the run ended before its window did */
        bench_stalls_t unused;
        bench_stall_stop(b->stall_probe, &unused);
    }
    event_free(sig);
    event_free(sig2);
    event_base_free(b->base);
    free(b->conns);
    free(b->payload);
    return rc;
}
