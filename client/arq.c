/*
 * arq.c - libarq: arq.v1 over WebSocket (wslay, client mode) on a libevent
 * bufferevent, msgpack-c for the messages. This file: the client's URL,
 * lifecycle and states; arq_int.h lists the others.
 *
 * Two levels of state. The connection (enum conn_state): TCP connect ->
 * HTTP upgrade -> WebSocket, hello sent -> welcome received (READY) ->
 * CLOSING (our close frame queued) -> NONE. The client (arq_state_t, public):
 * IDLE -> CONNECTING -> CONNECTED and, with reconnection, DISCONNECTED ->
 * RECONNECTING -> RECOVERING -> CONNECTED ... until FAILED or CLOSED.
 *
 * What outlives a connection: the subscriptions (struct sub: where the
 * application is in the stream, its acks, the stream's epoch) and the
 * publishes without a puback (struct pub; with reconnection it keeps the
 * encoded message and re-sends it byte for byte: its request id stays unique
 * on the new connection because ids only grow).
 *
 * Per subscription, three offsets decide what is delivered and acked:
 * pos (the next offset the application may see: anything below is a
 * redelivery and dropped), wire_recv (the last offset the server delivered
 * or skipped on this connection) and wire_acked (what the server holds as
 * acked on this connection). An ack goes out only up to wire_recv, since
 * the server refuses acks beyond what it delivered: after a session resume
 * the server redelivers from its acked offset and our acks catch up as the
 * (dropped) redeliveries arrive.
 *
 * Teardown (freeing the wslay context and the bufferevent, then reconnecting
 * or ending) never happens inside wslay or user callbacks: it is flagged and
 * run when the outermost libevent callback of this client returns, or from a
 * deferred event when a public function hit the failure. arq_client_free()
 * called from inside a callback is deferred the same way.
 */
#include "arq_int.h"

static void conn_teardown(arq_client_t *c);

const char *arq_strerror(int code)
{
    switch (code) {
    case ARQ_OK:
        return "success";
    case ARQ_EINVAL:
        return "invalid argument";
    case ARQ_ENOMEM:
        return "out of memory";
    case ARQ_ECONNECT:
        return "connection failed";
    case ARQ_EHANDSHAKE:
        return "websocket handshake failed";
    case ARQ_ETIMEDOUT:
        return "timed out";
    case ARQ_EPROTO:
        return "protocol error";
    case ARQ_ECONNLOST:
        return "connection lost";
    case ARQ_ECLOSED:
        return "connection closed";
    case ARQ_ENOTCONN:
        return "not connected";
    case ARQ_ETOOBIG:
        return "payload too large";
    case ARQ_EBUSY:
        return "busy";
    case ARQ_ESESSION:
        return "session taken over by another connection";
    case ARQ_EFULL:
        return "too many publishes pending";
    case ARQ_ETLS:
        return "TLS failed";
    case -400:
        return "bad request";
    case -401:
        return "unauthorized";
    case -403:
        return "forbidden";
    case -404:
        return "not found";
    case -409:
        return "conflict";
    case -413:
        return "too large";
    case -429:
        return "limit reached";
    case -500:
        return "internal server error";
    case -503:
        return "unavailable";
    default:
        return code <= -100 ? "server error" : "unknown error";
    }
}

const char *arq_state_name(arq_state_t state)
{
    switch (state) {
    case ARQ_STATE_IDLE:
        return "idle";
    case ARQ_STATE_CONNECTING:
        return "connecting";
    case ARQ_STATE_CONNECTED:
        return "connected";
    case ARQ_STATE_DISCONNECTED:
        return "disconnected";
    case ARQ_STATE_RECONNECTING:
        return "reconnecting";
    case ARQ_STATE_RECOVERING:
        return "recovering";
    case ARQ_STATE_FAILED:
        return "failed";
    case ARQ_STATE_CLOSED:
        return "closed";
    }
    return "unknown";
}

void arq_set_error(arq_client_t *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->last_error, sizeof(c->last_error), fmt, ap);
    va_end(ap);
}

uint64_t arq_now_ms(void)
{
    struct timespec ts;
    (void)clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

struct timeval arq_ms_tv(uint64_t ms)
{
    struct timeval tv = {.tv_sec = (time_t)(ms / 1000), .tv_usec = (suseconds_t)(ms % 1000) * 1000};
    return tv;
}

int arq_fill_random(void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = getrandom(p, len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* xorshift64*: jitter only, no secrets. */
static uint64_t rng_next(arq_client_t *c)
{
    uint64_t x = c->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    c->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* Full jitter: uniform in [0, min(cap, base * 2^n)]. */
uint64_t arq_backoff_ms(arq_client_t *c, uint32_t n)
{
    uint64_t cap = c->backoff_cap_ms, d = c->backoff_base_ms;
    for (uint32_t i = 0; i < n && d < cap; i++)
        d *= 2;
    if (d > cap)
        d = cap;
    return rng_next(c) % (d + 1);
}

/* ---- URL ---------------------------------------------------------------- */

static int host_char_ok(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '.' || ch == '-' || ch == '_';
}

/* ws://HOST[:PORT][/PATH] or wss://...; HOST a name, IPv4, or [IPv6]. */
static int parse_url(arq_client_t *c, const char *url)
{
    const char *h;
    if (url && strncasecmp(url, "ws://", 5) == 0) {
        h = url + 5;
    } else if (url && strncasecmp(url, "wss://", 6) == 0) {
        h = url + 6;
        c->tls = 1;
    } else {
        return ARQ_EINVAL;
    }
    const char *end;
    int v6 = *h == '[';
    if (v6) {
        end = strchr(h, ']');
        if (!end || end == h + 1)
            return ARQ_EINVAL;
        c->host = strndup(h + 1, (size_t)(end - h - 1));
        end++;
    } else {
        end = h + strcspn(h, ":/?#");
        if (end == h || end - h > 255)
            return ARQ_EINVAL;
        for (const char *q = h; q < end; q++)
            if (!host_char_ok(*q))
                return ARQ_EINVAL;
        c->host = strndup(h, (size_t)(end - h));
    }
    if (!c->host)
        return ARQ_ENOMEM;
    if (v6) {
        struct in6_addr a6;
        if (inet_pton(AF_INET6, c->host, &a6) != 1)
            return ARQ_EINVAL;
    }
    unsigned long port = c->tls ? 443 : 80;
    const char *p = end;
    if (*p == ':') {
        char *pe;
        errno = 0;
        if (p[1] < '0' || p[1] > '9')
            return ARQ_EINVAL;
        port = strtoul(p + 1, &pe, 10);
        if (errno || port == 0 || port > 65535)
            return ARQ_EINVAL;
        p = pe;
    }
    if (*p != '\0' && *p != '/')
        return ARQ_EINVAL;
    const char *path = *p ? p : "/";
    /* The path goes into the request line: no spaces or control bytes. */
    for (const char *q = path; *q; q++)
        if ((unsigned char)*q <= 0x20 || *q == 0x7f)
            return ARQ_EINVAL;
    c->path = strdup(path);
    if (!c->path)
        return ARQ_ENOMEM;
    c->port = (uint16_t)port;
    char hh[300];
    snprintf(hh, sizeof(hh), v6 ? "[%s]:%u" : "%s:%u", c->host, c->port);
    c->host_header = strdup(hh);
    return c->host_header ? 0 : ARQ_ENOMEM;
}

/* Make urls[i] the URL of the next connection attempt. */
static int use_url(arq_client_t *c, size_t i)
{
    free(c->host);
    free(c->path);
    free(c->host_header);
    c->host = c->path = c->host_header = NULL;
    c->tls = 0;
    c->url_i = i;
    return parse_url(c, c->urls[i]);
}

/* options.url: one URL or several separated by commas, each checked. *any_tls
 * is set when one of them is wss://. */
static int parse_urls(arq_client_t *c, const char *list, int *any_tls)
{
    if (!list || !*list)
        return ARQ_EINVAL;
    size_t n = 1;
    for (const char *q = list; *q; q++)
        n += *q == ',';
    c->urls = calloc(n, sizeof(*c->urls));
    if (!c->urls)
        return ARQ_ENOMEM;
    for (const char *q = list;; q++) {
        const char *e = q + strcspn(q, ",");
        if (!(c->urls[c->n_urls] = strndup(q, (size_t)(e - q))))
            return ARQ_ENOMEM;
        c->n_urls++;
        if (!*e)
            break;
        q = e;
    }
    *any_tls = 0;
    for (size_t i = c->n_urls; i-- > 0;) { /* urls[0] last: the first attempt's */
        int rc = use_url(c, i);
        if (rc)
            return rc;
        *any_tls |= c->tls;
    }
    return 0;
}

/* The next attempt goes to the next URL (several given: fail over). */
static void next_url(arq_client_t *c)
{
    if (c->n_urls > 1)
        (void)use_url(c, (c->url_i + 1) % c->n_urls); /* each was checked at creation */
}

/* wss://: one TLS context per client, verifying the server. Returns 0, or
 * ARQ_EINVAL when ca_file cannot be loaded. */
static int tls_setup(arq_client_t *c, const char *ca_file)
{
    c->ssl_ctx = SSL_CTX_new(TLS_client_method());
    if (!c->ssl_ctx)
        return ARQ_ENOMEM;
    SSL_CTX_set_min_proto_version(c->ssl_ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(c->ssl_ctx, SSL_VERIFY_PEER, NULL);
    int ok = ca_file ? SSL_CTX_load_verify_locations(c->ssl_ctx, ca_file, NULL)
                     : SSL_CTX_set_default_verify_paths(c->ssl_ctx);
    return ok == 1 ? 0 : ARQ_EINVAL;
}

/* ---- the token provider ----------------------------------------------- */

void arq_client_on_token(arq_client_t *c, arq_token_cb cb, void *arg)
{
    c->token_cb = cb;
    c->token_arg = arg;
}

/* Ask the provider for a token; a new one replaces c->token. */
int arq_token_fetch(arq_client_t *c)
{
    if (!c->token_cb)
        return 0;
    char *t = NULL;
    int rc = c->token_cb(c, &t, c->token_arg);
    if (rc != 0) {
        free(t);
        return rc < 0 ? rc : ARQ_EINVAL;
    }
    if (t) {
        free(c->token);
        c->token = t;
    }
    return 0;
}

/* When the server says the token expires: fetch a new one ahead of it
 * (three quarters of the remaining life, at least 5 s before). */
void arq_token_schedule(arq_client_t *c, uint64_t expires)
{
    c->token_expires = expires;
    if (!c->ev_refresh)
        return;
    evtimer_del(c->ev_refresh);
    if (!c->token_cb || !expires)
        return;
    uint64_t now = (uint64_t)time(NULL);
    uint64_t left = expires > now ? expires - now : 0;
    uint64_t wait = left * 3 / 4;
    if (left > 5 && wait > left - 5)
        wait = left - 5;
    if (left <= 5)
        wait = left / 2;
    struct timeval tv = arq_ms_tv(wait * 1000);
    (void)evtimer_add(c->ev_refresh, &tv);
}

/* ---- lifecycle -------------------------------------------------------- */

void arq_pub_free(struct pub *p)
{
    free(p->frame);
    free(p);
}

void arq_sub_free(struct sub *s)
{
    free(s->stream);
    free(s);
}

static void client_destroy(arq_client_t *c)
{
    if (c->ws)
        wslay_event_context_free(c->ws);
    if (c->bev)
        bufferevent_free(c->bev);
    struct event *evs[] = {c->ev_timer, c->ev_defer, c->ev_reconnect, c->ev_retry, c->ev_hb};
    for (size_t i = 0; i < sizeof(evs) / sizeof(evs[0]); i++)
        if (evs[i])
            event_free(evs[i]);
    struct pub *p;
    while ((p = TAILQ_FIRST(&c->pubs))) {
        TAILQ_REMOVE(&c->pubs, p, link);
        arq_pub_free(p);
    }
    struct sub *s;
    while ((s = TAILQ_FIRST(&c->subs))) {
        TAILQ_REMOVE(&c->subs, s, link);
        arq_sub_free(s);
    }
    msgpack_sbuffer_destroy(&c->out);
    msgpack_sbuffer_destroy(&c->headers);
    if (c->ev_refresh)
        event_free(c->ev_refresh);
    if (c->ssl_ctx)
        SSL_CTX_free(c->ssl_ctx);
    free(c->host_header);
    free(c->host);
    free(c->path);
    for (size_t i = 0; i < c->n_urls; i++)
        free(c->urls[i]);
    free(c->urls);
    free(c->token);
    free(c->client_name);
    free(c->session);
    free(c->resume_token);
    free(c);
}

void arq_enter(arq_client_t *c)
{
    c->depth++;
}

/* Leave a libevent callback: run deferred teardown/free at the outermost.
 * A loop: a state callback run by a teardown may ask for another one (an
 * arq_client_close() while disconnected). */
void arq_leave(arq_client_t *c)
{
    while (c->depth == 1 && c->teardown_pending && !c->free_requested)
        conn_teardown(c);
    if (--c->depth == 0 && c->free_requested)
        client_destroy(c);
}

/* Leave a public function that may have called a callback. */
void arq_api_leave(arq_client_t *c)
{
    if (--c->depth > 0)
        return;
    if (c->free_requested)
        client_destroy(c);
    else if (c->teardown_pending)
        event_active(c->ev_defer, 0, 0);
}

int arq_final_state(const arq_client_t *c)
{
    return c->state == ARQ_STATE_FAILED || c->state == ARQ_STATE_CLOSED;
}

void arq_set_state(arq_client_t *c, arq_state_t st, int status, const char *reason)
{
    arq_state_t old = c->state;
    if (old == st)
        return;
    c->state = st;
    if (c->state_cb && !c->free_requested)
        c->state_cb(c, old, st, status, reason ? reason : "", c->state_arg);
}

void arq_request_teardown(arq_client_t *c, int status)
{
    if (c->teardown_pending || arq_final_state(c))
        return;
    c->teardown_pending = 1;
    c->teardown_status = status;
    if (c->depth == 0)
        event_active(c->ev_defer, 0, 0);
}

static void defer_cb(evutil_socket_t fd, short what, void *arg)
{
    arq_client_t *c = arg;
    arq_enter(c);
    arq_leave(c);
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
    arq_client_t *c = arg;
    arq_enter(c);
    if (c->conn == CN_CLOSING) {
        arq_request_teardown(c, ARQ_ECLOSED);
    } else if (c->conn != CN_READY && c->conn != CN_NONE) {
        arq_set_error(c, "no welcome from %s:%u within %u ms", c->host, c->port, c->timeout_ms);
        arq_request_teardown(c, ARQ_ETIMEDOUT);
    }
    arq_leave(c);
}

static void reconnect_cb(evutil_socket_t fd, short what, void *arg)
{
    arq_client_t *c = arg;
    arq_enter(c);
    if (c->state == ARQ_STATE_DISCONNECTED && !c->user_closed && !c->teardown_pending) {
        arq_set_state(c, ARQ_STATE_RECONNECTING, 0, NULL);
        if (!c->free_requested && c->state == ARQ_STATE_RECONNECTING && !c->teardown_pending &&
            arq_start_attempt(c) != 0) {
            arq_set_error(c, "out of memory");
            arq_request_teardown(c, ARQ_ENOMEM);
        }
    }
    arq_leave(c);
}

static void retry_cb(evutil_socket_t fd, short what, void *arg)
{
    arq_client_t *c = arg;
    arq_enter(c);
    if (c->conn == CN_READY && !c->teardown_pending)
        arq_resend_waiting(c);
    arq_leave(c);
}

/* Ahead of the token's expiry: a new token from the provider, sent as a
 * refresh on the live connection (arq_session.c answers refreshok). */
static void refresh_cb(evutil_socket_t fd, short what, void *arg)
{
    arq_client_t *c = arg;
    arq_enter(c);
    if (c->conn == CN_READY && !c->teardown_pending && !c->close_received) {
        char *before = c->token ? strdup(c->token) : NULL;
        int rc = arq_token_fetch(c);
        if (rc == 0 && c->token && (!before || strcmp(before, c->token) != 0)) {
            arq_send_refresh(c);
        } else {
            if (rc != 0)
                arq_set_error(c, "token provider failed: %s", arq_strerror(rc));
            /* nothing new yet: ask again in a second while the token lasts */
            if ((uint64_t)time(NULL) + 1 < c->token_expires) {
                struct timeval tv = arq_ms_tv(1000);
                (void)evtimer_add(c->ev_refresh, &tv);
            }
        }
        free(before);
    }
    arq_leave(c);
}

static void hb_cb(evutil_socket_t fd, short what, void *arg)
{
    arq_client_t *c = arg;
    arq_enter(c);
    if (c->conn == CN_READY && !c->teardown_pending) {
        uint64_t idle = arq_now_ms() - c->last_rx_ms;
        int queued = 0;
        if (c->hb_timeout_ms && idle >= c->hb_timeout_ms &&
            ioctl(bufferevent_getfd(c->bev), FIONREAD, &queued) == 0 && queued > 0) {
            /* Bytes wait in the socket: the server is alive, only our loop
             * is late (busy with other clients). Not a reason to reconnect. */
            c->last_rx_ms = arq_now_ms();
            idle = 0;
        }
        if (c->hb_timeout_ms && idle >= c->hb_timeout_ms) {
            arq_set_error(c, "nothing received from %s:%u for %" PRIu64 " ms", c->host, c->port,
                          idle);
            arq_request_teardown(c, ARQ_ETIMEDOUT);
        } else {
            struct wslay_event_msg m = {WSLAY_PING, NULL, 0};
            if (wslay_event_queue_msg(c->ws, &m) == 0)
                (void)arq_ws_flush(c);
        }
    }
    arq_leave(c);
}

int arq_client_new(struct event_base *base, const arq_client_options_t *options,
                   arq_client_t **ret_client)
{
    if (!base || !options || !ret_client)
        return ARQ_EINVAL;
    arq_client_t *c = calloc(1, sizeof(*c));
    if (!c)
        return ARQ_ENOMEM;
    c->base = base;
    TAILQ_INIT(&c->pubs);
    TAILQ_INIT(&c->subs);
    msgpack_sbuffer_init(&c->out);
    msgpack_sbuffer_init(&c->headers);
    c->next_id = 1;
    c->timeout_ms = options->connect_timeout_ms ? options->connect_timeout_ms : ARQ_DEFAULT_TMO_MS;
    c->reconnect = options->reconnect != 0;
    c->backoff_base_ms = options->backoff_base_ms ? options->backoff_base_ms : ARQ_DEFAULT_BASE_MS;
    c->backoff_cap_ms = options->backoff_cap_ms ? options->backoff_cap_ms : ARQ_DEFAULT_CAP_MS;
    c->max_retries = options->max_retries;
    c->hb_interval_ms = options->heartbeat_interval_ms;
    c->hb_timeout_ms = options->heartbeat_interval_ms ? options->heartbeat_timeout_ms : 0;
    c->max_pending = options->max_pending ? options->max_pending : ARQ_DEFAULT_PENDING;
    c->ack = options->ack;
    c->max_inflight = ARQ_DEFAULT_INFLIGHT;
    int any_tls = 0;
    int rc = parse_urls(c, options->url, &any_tls);
    if (rc == 0 && any_tls)
        rc = tls_setup(c, options->ca_file);
    uint8_t rnd[16];
    if (rc == 0 && arq_fill_random(rnd, sizeof(rnd)) != 0)
        rc = ARQ_ENOMEM; /* no entropy: treated as a resource failure */
    if (rc == 0) {
        for (int i = 0; i < 8; i++)
            snprintf(c->msgid_prefix + 2 * i, 3, "%02x", rnd[i]);
        memcpy(&c->rng, rnd + 8, sizeof(c->rng));
        c->rng |= 1; /* xorshift needs a non-zero state */
    }
    if (rc == 0 && options->token && !(c->token = strdup(options->token)))
        rc = ARQ_ENOMEM;
    if (rc == 0 && !(c->client_name = strdup(options->client_name ? options->client_name
                                                                  : "libarq/" ARQ_LIB_VERSION)))
        rc = ARQ_ENOMEM;
    if (rc == 0) {
        c->ev_timer = evtimer_new(base, timer_cb, c);
        c->ev_defer = event_new(base, -1, 0, defer_cb, c);
        c->ev_reconnect = evtimer_new(base, reconnect_cb, c);
        c->ev_retry = evtimer_new(base, retry_cb, c);
        c->ev_refresh = evtimer_new(base, refresh_cb, c);
        if (c->hb_interval_ms)
            c->ev_hb = event_new(base, -1, EV_PERSIST, hb_cb, c);
        if (!c->ev_timer || !c->ev_defer || !c->ev_reconnect || !c->ev_retry || !c->ev_refresh ||
            (c->hb_interval_ms && !c->ev_hb))
            rc = ARQ_ENOMEM;
    }
    if (rc != 0) {
        client_destroy(c);
        return rc;
    }
    *ret_client = c;
    return 0;
}

void arq_client_free(arq_client_t *c)
{
    if (!c)
        return;
    if (c->depth > 0) {
        c->free_requested = 1;
        return;
    }
    client_destroy(c);
}

const char *arq_client_session(const arq_client_t *c)
{
    return c->session;
}

const char *arq_client_last_error(const arq_client_t *c)
{
    return c->last_error;
}

uint64_t arq_client_max_payload(const arq_client_t *c)
{
    return c->max_payload;
}

arq_state_t arq_client_state(const arq_client_t *c)
{
    return c->state;
}

void arq_client_stats(const arq_client_t *c, arq_client_stats_t *ret_stats)
{
    *ret_stats = c->st;
    ret_stats->pending_publishes = c->n_pubs;
}

void arq_client_on_error(arq_client_t *c, arq_error_cb cb, void *arg)
{
    c->error_cb = cb;
    c->error_arg = arg;
}

void arq_client_on_gap(arq_client_t *c, arq_gap_cb cb, void *arg)
{
    c->gap_cb = cb;
    c->gap_arg = arg;
}

void arq_client_on_state(arq_client_t *c, arq_state_cb cb, void *arg)
{
    c->state_cb = cb;
    c->state_arg = arg;
}

void arq_client_on_epoch(arq_client_t *c, arq_epoch_cb cb, void *arg)
{
    c->epoch_cb = cb;
    c->epoch_arg = arg;
}

void arq_arm_timer(arq_client_t *c)
{
    struct timeval tv = arq_ms_tv(c->timeout_ms);
    (void)evtimer_add(c->ev_timer, &tv);
}

static void transport_free(arq_client_t *c)
{
    evtimer_del(c->ev_timer);
    evtimer_del(c->ev_refresh);
    c->refresh_id = 0;
    if (c->ev_hb)
        event_del(c->ev_hb);
    if (c->ws) {
        wslay_event_context_free(c->ws);
        c->ws = NULL;
    }
    if (c->bev) {
        bufferevent_free(c->bev);
        c->bev = NULL;
    }
    c->conn = CN_NONE;
}

/* A refusal that another attempt would get again. */
static int permanent(const arq_client_t *c, int status)
{
    if (c->close_code == 1008)
        return 1;
    if (status == -401 && c->token_cb)
        return 0; /* the provider may have a new token for the next attempt */
    switch (status) {
    case ARQ_ETLS:
    case -400:
    case -401:
    case -403:
    case ARQ_ESESSION:
    case ARQ_EINVAL:
        return 1;
    case ARQ_EHANDSHAKE:
        return c->http_status >= 400 && c->http_status < 500 && c->http_status != 408 &&
               c->http_status != 429;
    default:
        return 0;
    }
}

/* Everything goes back to "not on this connection", to be sent again. */
static void requeue(arq_client_t *c)
{
    struct pub *p;
    TAILQ_FOREACH(p, &c->pubs, link)
    {
        p->on_wire = 0;
        p->waiting = 0;
    }
    struct sub *s;
    TAILQ_FOREACH(s, &c->subs, link)
    {
        s->wire = SW_OFF;
        s->req_id = 0;
        s->recovering = 0;
        s->waiting = 0;
    }
    c->recover_pending = 0;
    evtimer_del(c->ev_retry);
}

/*
 * The connection is gone (or never came): free the transport, then either
 * schedule the next attempt or end, telling the user: the state callback,
 * then the pending requests, then the connect callback if the client never
 * connected, else the error callback (unless the user closed it).
 */
static void conn_teardown(arq_client_t *c)
{
    int status = c->teardown_status;
    c->teardown_pending = 0;
    transport_free(c);
    if (!c->last_error[0])
        arq_set_error(c, "%s", arq_strerror(status));

    arq_state_t end = ARQ_STATE_FAILED;
    int again = 0;
    if (c->user_closed) {
        end = ARQ_STATE_CLOSED;
        status = ARQ_ECLOSED;
    } else if (c->close_code == 4001) {
        status = ARQ_ESESSION;
    } else if (c->close_code == 1000) {
        end = ARQ_STATE_CLOSED; /* the server ended it: do not come back */
    } else {
        again = c->reconnect && !permanent(c, status) &&
                (c->max_retries == 0 || c->retries < c->max_retries);
    }
    if (again) {
        requeue(c);
        /* A connection that dies right after its welcome does not reset the
         * backoff: a server that accepts and drops is not hammered. */
        if (c->welcomed_ms && arq_now_ms() - c->welcomed_ms >= c->backoff_cap_ms)
            c->backoff_n = 0;
        c->welcomed_ms = 0;
        struct timeval tv = arq_ms_tv(arq_backoff_ms(c, c->backoff_n));
        if (c->backoff_n < 32)
            c->backoff_n++;
        c->retries++;
        next_url(c);
        (void)evtimer_add(c->ev_reconnect, &tv);
        arq_set_state(c, ARQ_STATE_DISCONNECTED, status, c->last_error);
        return;
    }

    evtimer_del(c->ev_reconnect);
    evtimer_del(c->ev_retry);
    arq_set_state(c, end, status, c->last_error);
    /* Fail what waits for an answer, in order; callbacks may free the client
     * (but add nothing: the client is in a final state). */
    struct pub *p;
    while ((p = TAILQ_FIRST(&c->pubs)) && !c->free_requested)
        arq_pub_complete(c, p, status, 0, 0);
    struct sub *s, *next;
    for (s = TAILQ_FIRST(&c->subs); s && !c->free_requested; s = next) {
        next = TAILQ_NEXT(s, link);
        if (s->confirmed)
            continue;
        TAILQ_REMOVE(&c->subs, s, link);
        arq_subok_cb cb = s->subok_cb;
        void *arg = s->arg;
        arq_sub_free(s);
        if (cb)
            cb(c, status, 0, 0, 0, arg);
    }
    if (c->free_requested)
        return;
    if (c->connect_cb) {
        arq_connect_cb cb = c->connect_cb;
        c->connect_cb = NULL;
        cb(c, status, c->connect_arg);
    } else if (status != ARQ_ECLOSED && c->error_cb) {
        c->error_cb(c, status, c->last_error, c->error_arg);
    }
    if (c->close_cb && !c->free_requested) {
        arq_close_cb cb = c->close_cb;
        c->close_cb = NULL;
        cb(c, c->close_arg);
    }
}
