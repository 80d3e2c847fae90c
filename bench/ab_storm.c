/*
 * ab_storm.c - arq-bench --storm: C subscriber connections dropped at once
 * and reconnected at once with their sessions; how many resume, and how
 * fast. See arq_bench.c and docs/benchmarks.md.
 */
#include "arq_bench.h"

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
void st_lost(struct conn *c)
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
void st_connected(struct conn *c)
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
    if (bench_out_add(&c->out, req, (size_t)n) != 0 || event_add(c->rev, NULL) != 0) {
        fail(b, "out of memory");
        return;
    }
    conn_flush(c);
    if (c->lost)
        st_lost(c);
}

/* Non-blocking upgrade: collect the response head, then speak WebSocket. */
void st_upgrade_read(struct conn *c)
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

void st_send_ack(struct conn *c)
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

void st_handle(struct conn *c, const msgpack_object *map, const msgpack_object *t)
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

int run_storm(struct bench *b)
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
