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
 * Files: this one (connections, the load mode, options, main), ab_catchup.c
 * and ab_storm.c; arq_bench.h holds what they share.
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
#include "arq_bench.h"

static const char *const mh_names[MH_N] = {"arq_publish_seconds", "arq_publish_wait_seconds",
                                           "arq_publish_dispatch_seconds"};

struct bench g_b;

__attribute__((format(printf, 2, 3))) void fail(struct bench *b, const char *fmt, ...)
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

void metrics_get(const struct opts *o, struct metrics *m)
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
    if (buf == NULL || bench_send_all(fd, req, (size_t)n) != 0)
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

/* wslay writes whole frames into the output buffer; conn_flush sends it. */
static ssize_t ws_send_cb(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                          void *user)
{
    (void)flags;
    struct conn *c = user;
    if (bench_out_add(&c->out, data, len) != 0) {
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

void conn_flush(struct conn *c)
{
    if (c->ws != NULL && wslay_event_want_write(c->ws) && wslay_event_send(c->ws) != 0) {
        if (c->role == ROLE_ST_SUB) {
            c->lost = 1;
            return;
        }
        fail(c->b, "wslay_event_send failed on connection %s", c->is_sub ? "(sub)" : "(pub)");
        return;
    }
    int rc = bench_out_flush(&c->out, c->fd);
    if (rc == 1) {
        event_add(c->wev, NULL);
        return;
    }
    if (rc < 0) {
        if (c->role == ROLE_ST_SUB) {
            c->lost = 1;
            return;
        }
        fail(c->b, "send: %s", strerror(errno));
        return;
    }
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

void stream_name(const struct bench *b, unsigned i, char *buf, size_t len)
{
    snprintf(buf, len, "%s.%u", b->stream_prefix, i);
}

/* With a session from an earlier welcome (--storm), asks to resume it. */
void send_hello(struct conn *c)
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
int send_pub(struct conn *c)
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

const msgpack_object *map_get(const msgpack_object *map, const char *key)
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

int obj_is(const msgpack_object *o, const char *s)
{
    size_t n = strlen(s);
    return o != NULL && o->type == MSGPACK_OBJECT_STR && o->via.str.size == n &&
           memcmp(o->via.str.ptr, s, n) == 0;
}

uint64_t obj_u64(const msgpack_object *o)
{
    return o != NULL && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? o->via.u64 : 0;
}

/* The stream index is the number after the last '.'. */
unsigned obj_stream_index(const struct bench *b, const msgpack_object *o)
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

void report_reason(const char *what, const msgpack_object *map)
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

void on_read(evutil_socket_t fd, short what, void *arg)
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

void on_write(evutil_socket_t fd, short what, void *arg)
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

int conn_ws_init(struct conn *c)
{
    static const struct wslay_event_callbacks cbs = {
        ws_recv_cb, ws_send_cb, ws_genmask_cb, NULL, NULL, NULL, ws_on_msg_cb,
    };
    if (wslay_event_context_client_init(&c->ws, &cbs, c) != 0)
        return -1;
    wslay_event_config_set_max_recv_msg_length(c->ws, 2u << 20);
    return 0;
}

int upgrade_request(const struct opts *o, char *buf, size_t len)
{
    return snprintf(buf, len,
                    "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: arq.v1\r\n\r\n",
                    o->path, o->host, o->port);
}

/* Connect and upgrade (blocking), then switch to non-blocking. */
int conn_open(struct bench *b, struct conn *c)
{
    const struct opts *o = &b->o;
    c->fd = tcp_connect(o);
    if (c->fd < 0)
        return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char req[1024];
    int n = upgrade_request(o, req, sizeof req);
    if (bench_send_all(c->fd, req, (size_t)n) != 0) {
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

void cpu_model(char *buf, size_t len)
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
void conn_close(struct conn *c, int rst)
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
    bench_out_free(&c->out);
    free(c->head);
    free(c->sent_ns);
    c->ws = NULL;
    c->rev = c->wev = NULL;
    c->fd = -1;
    c->pending = NULL;
    c->head = NULL;
    c->sent_ns = NULL;
    c->pending_len = c->pending_off = c->head_len = 0;
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

int never_done(const struct bench *b)
{
    (void)b;
    return 0;
}

/* Run the loop until done(b), a failure, an interrupt, or timeout_s seconds.
 * Returns 0 when done; -1 otherwise (a timeout fails the run unless done is
 * never_done: then it is a plain wait). */
int run_until(struct bench *b, int (*done)(const struct bench *), double timeout_s,
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

double cpu_now(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return rusage_sec(&ru);
}

void pack_sub(struct conn *c, const char *stream, uint64_t from, uint64_t epoch)
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

void pack_ack(struct conn *c, const char *stream, uint64_t offset)
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
