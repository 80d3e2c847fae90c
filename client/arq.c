/*
 * arq.c - libarq: arq.v1 over WebSocket (wslay, client mode) on a libevent
 * bufferevent, msgpack-c for the messages.
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
#include "arq.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <inttypes.h>
#include <msgpack.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <time.h>
#include <wslay/wslay.h>

#define ARQ_LIB_VERSION      "0.1.0"
#define ARQ_MAX_FRAME        (16u << 20) /* largest message we accept or send */
#define ARQ_MAX_HTTP_HEAD    8192
#define ARQ_DEFAULT_TMO_MS   10000
#define ARQ_DEFAULT_BASE_MS  100
#define ARQ_DEFAULT_CAP_MS   10000
#define ARQ_DEFAULT_PENDING  10000
#define ARQ_DEFAULT_INFLIGHT 1024
#define ARQ_MSGID_MAX        255 /* the server's limit */
#define WS_GUID              "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

enum conn_state {
    CN_NONE = 0,
    CN_TCP,     /* connecting */
    CN_UPGRADE, /* request sent, waiting for 101 */
    CN_WELCOME, /* hello sent */
    CN_READY,   /* welcome received */
    CN_CLOSING, /* our close frame queued */
};

struct pub {
    TAILQ_ENTRY(pub) link;
    uint64_t id;
    arq_publish_cb cb;
    void *arg;
    uint8_t *frame; /* the encoded pub, kept with reconnect; else NULL */
    size_t frame_len;
    size_t payload_len;
    uint32_t retries; /* 503 answers so far */
    uint8_t on_wire;  /* sent on this connection, no answer yet */
    uint8_t waiting;  /* answered 503: re-send when ev_retry fires */
    uint8_t sent;     /* sent at least once */
};

enum sub_wire { SW_OFF = 0, SW_PENDING, SW_ACTIVE };

struct sub {
    TAILQ_ENTRY(sub) link;
    char *stream;
    arq_subok_cb subok_cb;
    arq_msg_cb msg_cb;
    void *arg;
    enum arq_from from; /* where the application asked to start ... */
    uint64_t from_offset;
    uint64_t want_epoch; /* ... and with which epoch (ARQ_EPOCH_ANY: none) */
    uint64_t epoch;      /* the stream's epoch as the server told, 0 unknown */
    uint64_t old_epoch;  /* epoch before a 409 to a re-subscription, 0 none */
    uint64_t pos;        /* next offset for the application, 0 until known */
    uint64_t acked;      /* the application's latest ack */
    uint64_t floor;      /* offsets before the one asked for: acked on its behalf */
    uint64_t wire_recv;  /* see the top of the file */
    uint64_t wire_acked;
    uint64_t req_id;    /* outstanding sub request */
    uint32_t retries;   /* 503 answers in a row */
    uint8_t wire;       /* enum sub_wire */
    uint8_t confirmed;  /* subok_cb called with 0 */
    uint8_t sent_epoch; /* the outstanding request carried an epoch */
    uint8_t recovering; /* counted in recover_pending */
    uint8_t waiting;    /* answered 503: re-send when ev_retry fires */
    uint8_t sent;       /* sent at least once */
};

struct arq_client {
    struct event_base *base;
    char *host, *path, *token, *client_name;
    uint16_t port;
    struct sockaddr_in addr;
    uint32_t timeout_ms;
    int reconnect;
    uint32_t backoff_base_ms, backoff_cap_ms, max_retries;
    uint32_t hb_interval_ms, hb_timeout_ms;
    size_t max_pending;

    arq_state_t state;
    enum conn_state conn;
    struct bufferevent *bev;
    wslay_event_context_ptr ws;
    struct event *ev_timer;     /* connect / close timeout */
    struct event *ev_defer;     /* teardown requested outside an event callback */
    struct event *ev_reconnect; /* backoff before the next attempt */
    struct event *ev_retry;     /* re-send after a 503 */
    struct event *ev_hb;        /* heartbeat (NULL without) */
    char ws_key[32];
    uint64_t last_rx_ms;      /* monotonic time of the last bytes received */
    int http_status;          /* of the upgrade answer */
    int close_code;           /* of the server's close frame, 0 if none */
    uint32_t retries;         /* reconnection attempts since the last welcome */
    uint32_t backoff_n;       /* backoff exponent: reset by a connection that lasted */
    uint64_t welcomed_ms;     /* when the current connection was welcomed, 0 if not */
    int ever_welcomed;        /* connect_cb was called with 0 */
    int user_closed;          /* arq_client_close() called */
    unsigned recover_pending; /* re-subscriptions not answered yet */
    uint64_t rng;

    arq_connect_cb connect_cb;
    void *connect_arg;
    arq_close_cb close_cb;
    void *close_arg;
    arq_error_cb error_cb;
    void *error_arg;
    arq_gap_cb gap_cb;
    void *gap_arg;
    arq_state_cb state_cb;
    void *state_arg;
    arq_epoch_cb epoch_cb;
    void *epoch_arg;

    char *session, *resume_token;
    uint64_t max_payload;  /* 0 until the first welcome */
    uint64_t max_inflight; /* from welcome */
    uint64_t next_id;
    TAILQ_HEAD(, pub) pubs; /* in publish order */
    size_t n_pubs;
    TAILQ_HEAD(, sub) subs; /* in subscription order */
    char msgid_prefix[17];
    uint64_t msgid_seq;
    arq_client_stats_t st;

    msgpack_sbuffer out;     /* encoder scratch */
    msgpack_sbuffer headers; /* re-encoded msg headers */

    int depth;            /* nesting of our libevent callbacks */
    int teardown_pending; /* conn_teardown() at the outermost return */
    int teardown_status;  /* ARQ_ECONNLOST, ARQ_ECLOSED, ... */
    int free_requested;
    int close_received;
    char last_error[512];
};

static void conn_teardown(arq_client_t *c);
static int start_attempt(arq_client_t *c);

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

static void set_error(arq_client_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_error(arq_client_t *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->last_error, sizeof(c->last_error), fmt, ap);
    va_end(ap);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    (void)clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static struct timeval ms_tv(uint64_t ms)
{
    struct timeval tv = {.tv_sec = (time_t)(ms / 1000), .tv_usec = (suseconds_t)(ms % 1000) * 1000};
    return tv;
}

static int fill_random(void *buf, size_t len)
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
static uint64_t backoff_ms(arq_client_t *c, uint32_t n)
{
    uint64_t cap = c->backoff_cap_ms, d = c->backoff_base_ms;
    for (uint32_t i = 0; i < n && d < cap; i++)
        d *= 2;
    if (d > cap)
        d = cap;
    return rng_next(c) % (d + 1);
}

/* ---- URL ---------------------------------------------------------------- */

static int parse_url(arq_client_t *c, const char *url)
{
    if (!url || strncasecmp(url, "ws://", 5) != 0)
        return ARQ_EINVAL;
    const char *h = url + 5;
    const char *end = h + strcspn(h, ":/?#");
    size_t hlen = (size_t)(end - h);
    if (hlen == 0 || hlen > 255)
        return ARQ_EINVAL;
    c->host = strndup(h, hlen);
    if (!c->host)
        return ARQ_ENOMEM;
    unsigned long port = 80;
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
    memset(&c->addr, 0, sizeof(c->addr));
    c->addr.sin_family = AF_INET;
    c->addr.sin_port = htons(c->port);
    const char *ip = strcasecmp(c->host, "localhost") == 0 ? "127.0.0.1" : c->host;
    if (inet_pton(AF_INET, ip, &c->addr.sin_addr) != 1)
        return ARQ_EINVAL;
    return 0;
}

/* ---- lifecycle -------------------------------------------------------- */

static void pub_free(struct pub *p)
{
    free(p->frame);
    free(p);
}

static void sub_free(struct sub *s)
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
        pub_free(p);
    }
    struct sub *s;
    while ((s = TAILQ_FIRST(&c->subs))) {
        TAILQ_REMOVE(&c->subs, s, link);
        sub_free(s);
    }
    msgpack_sbuffer_destroy(&c->out);
    msgpack_sbuffer_destroy(&c->headers);
    free(c->host);
    free(c->path);
    free(c->token);
    free(c->client_name);
    free(c->session);
    free(c->resume_token);
    free(c);
}

static void enter(arq_client_t *c)
{
    c->depth++;
}

/* Leave a libevent callback: run deferred teardown/free at the outermost.
 * A loop: a state callback run by a teardown may ask for another one (an
 * arq_client_close() while disconnected). */
static void leave(arq_client_t *c)
{
    while (c->depth == 1 && c->teardown_pending && !c->free_requested)
        conn_teardown(c);
    if (--c->depth == 0 && c->free_requested)
        client_destroy(c);
}

/* Leave a public function that may have called a callback. */
static void api_leave(arq_client_t *c)
{
    if (--c->depth > 0)
        return;
    if (c->free_requested)
        client_destroy(c);
    else if (c->teardown_pending)
        event_active(c->ev_defer, 0, 0);
}

static int final_state(const arq_client_t *c)
{
    return c->state == ARQ_STATE_FAILED || c->state == ARQ_STATE_CLOSED;
}

static void set_state(arq_client_t *c, arq_state_t st, int status, const char *reason)
{
    arq_state_t old = c->state;
    if (old == st)
        return;
    c->state = st;
    if (c->state_cb && !c->free_requested)
        c->state_cb(c, old, st, status, reason ? reason : "", c->state_arg);
}

static void request_teardown(arq_client_t *c, int status)
{
    if (c->teardown_pending || final_state(c))
        return;
    c->teardown_pending = 1;
    c->teardown_status = status;
    if (c->depth == 0)
        event_active(c->ev_defer, 0, 0);
}

static void defer_cb(evutil_socket_t fd, short what, void *arg)
{
    arq_client_t *c = arg;
    enter(c);
    leave(c);
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
    arq_client_t *c = arg;
    enter(c);
    if (c->conn == CN_CLOSING) {
        request_teardown(c, ARQ_ECLOSED);
    } else if (c->conn != CN_READY && c->conn != CN_NONE) {
        set_error(c, "no welcome from %s:%u within %u ms", c->host, c->port, c->timeout_ms);
        request_teardown(c, ARQ_ETIMEDOUT);
    }
    leave(c);
}

static void reconnect_cb(evutil_socket_t fd, short what, void *arg)
{
    arq_client_t *c = arg;
    enter(c);
    if (c->state == ARQ_STATE_DISCONNECTED && !c->user_closed && !c->teardown_pending) {
        set_state(c, ARQ_STATE_RECONNECTING, 0, NULL);
        if (!c->free_requested && c->state == ARQ_STATE_RECONNECTING && !c->teardown_pending &&
            start_attempt(c) != 0) {
            set_error(c, "out of memory");
            request_teardown(c, ARQ_ENOMEM);
        }
    }
    leave(c);
}

static int ws_flush(arq_client_t *c);
static void resend_waiting(arq_client_t *c);

static void retry_cb(evutil_socket_t fd, short what, void *arg)
{
    arq_client_t *c = arg;
    enter(c);
    if (c->conn == CN_READY && !c->teardown_pending)
        resend_waiting(c);
    leave(c);
}

static void hb_cb(evutil_socket_t fd, short what, void *arg)
{
    arq_client_t *c = arg;
    enter(c);
    if (c->conn == CN_READY && !c->teardown_pending) {
        uint64_t idle = now_ms() - c->last_rx_ms;
        int queued = 0;
        if (c->hb_timeout_ms && idle >= c->hb_timeout_ms &&
            ioctl(bufferevent_getfd(c->bev), FIONREAD, &queued) == 0 && queued > 0) {
            /* Bytes wait in the socket: the server is alive, only our loop
             * is late (busy with other clients). Not a reason to reconnect. */
            c->last_rx_ms = now_ms();
            idle = 0;
        }
        if (c->hb_timeout_ms && idle >= c->hb_timeout_ms) {
            set_error(c, "nothing received from %s:%u for %" PRIu64 " ms", c->host, c->port, idle);
            request_teardown(c, ARQ_ETIMEDOUT);
        } else {
            struct wslay_event_msg m = {WSLAY_PING, NULL, 0};
            if (wslay_event_queue_msg(c->ws, &m) == 0)
                (void)ws_flush(c);
        }
    }
    leave(c);
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
    c->max_inflight = ARQ_DEFAULT_INFLIGHT;
    int rc = parse_url(c, options->url);
    uint8_t rnd[16];
    if (rc == 0 && fill_random(rnd, sizeof(rnd)) != 0)
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
        if (c->hb_interval_ms)
            c->ev_hb = event_new(base, -1, EV_PERSIST, hb_cb, c);
        if (!c->ev_timer || !c->ev_defer || !c->ev_reconnect || !c->ev_retry ||
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

static void arm_timer(arq_client_t *c)
{
    struct timeval tv = ms_tv(c->timeout_ms);
    (void)evtimer_add(c->ev_timer, &tv);
}

static void transport_free(arq_client_t *c)
{
    evtimer_del(c->ev_timer);
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
    switch (status) {
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
        set_error(c, "%s", arq_strerror(status));

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
        if (c->welcomed_ms && now_ms() - c->welcomed_ms >= c->backoff_cap_ms)
            c->backoff_n = 0;
        c->welcomed_ms = 0;
        struct timeval tv = ms_tv(backoff_ms(c, c->backoff_n));
        if (c->backoff_n < 32)
            c->backoff_n++;
        c->retries++;
        (void)evtimer_add(c->ev_reconnect, &tv);
        set_state(c, ARQ_STATE_DISCONNECTED, status, c->last_error);
        return;
    }

    evtimer_del(c->ev_reconnect);
    evtimer_del(c->ev_retry);
    set_state(c, end, status, c->last_error);
    /* Fail what waits for an answer, in order; callbacks may free the client
     * (but add nothing: the client is in a final state). */
    struct pub *p;
    while ((p = TAILQ_FIRST(&c->pubs)) && !c->free_requested) {
        TAILQ_REMOVE(&c->pubs, p, link);
        c->n_pubs--;
        arq_publish_cb cb = p->cb;
        void *arg = p->arg;
        pub_free(p);
        if (cb)
            cb(c, status, 0, 0, arg);
    }
    struct sub *s, *next;
    for (s = TAILQ_FIRST(&c->subs); s && !c->free_requested; s = next) {
        next = TAILQ_NEXT(s, link);
        if (s->confirmed)
            continue;
        TAILQ_REMOVE(&c->subs, s, link);
        arq_subok_cb cb = s->subok_cb;
        void *arg = s->arg;
        sub_free(s);
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

/* ---- WebSocket (wslay) -------------------------------------------------- */

static ssize_t ws_recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                          void *user)
{
    arq_client_t *c = user;
    int n = evbuffer_remove(bufferevent_get_input(c->bev), buf, len);
    if (n <= 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    return n;
}

static ssize_t ws_send_cb(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                          void *user)
{
    arq_client_t *c = user;
    if (evbuffer_add(bufferevent_get_output(c->bev), data, len) != 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return (ssize_t)len;
}

static int ws_genmask_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, void *user)
{
    if (fill_random(buf, len) != 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return 0;
}

/* Hand wslay's queued frames to the bufferevent. */
static int ws_flush(arq_client_t *c)
{
    if (!c->ws)
        return ARQ_ENOTCONN;
    if (wslay_event_send(c->ws) != 0) {
        set_error(c, "websocket send failed");
        request_teardown(c, ARQ_ECONNLOST);
        return ARQ_ECONNLOST;
    }
    return 0;
}

/* Send data as one binary message (wslay copies it). */
static int ws_send(arq_client_t *c, const void *data, size_t len)
{
    if (len > ARQ_MAX_FRAME)
        return ARQ_ETOOBIG;
    struct wslay_event_msg m = {WSLAY_BINARY_FRAME, data, len};
    int rc = wslay_event_queue_msg(c->ws, &m);
    if (rc == WSLAY_ERR_NOMEM)
        return ARQ_ENOMEM;
    if (rc != 0)
        return ARQ_ENOTCONN;
    return ws_flush(c);
}

static int ws_send_out(arq_client_t *c)
{
    return ws_send(c, c->out.data, c->out.size);
}

/* ---- msgpack helpers ---------------------------------------------------- */

static void pack_str(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

static void pack_kv_str(msgpack_packer *pk, const char *k, const char *v)
{
    pack_str(pk, k);
    pack_str(pk, v);
}

/*
 * Check that every declared length fits in the bytes that remain, so
 * msgpack_unpack never allocates for a size the input cannot back (a map
 * declaring 2^32 entries in a 10-byte message). Depth is bounded by
 * msgpack-c itself. Returns 0 if plausible.
 */
static int mp_precheck(const uint8_t *p, size_t len)
{
    size_t pos = 0, items = 1;
    while (items > 0) {
        if (pos >= len)
            return -1;
        uint8_t b = p[pos++];
        size_t rem = len - pos;
        uint64_t n = 0, skip = 0, kids = 0;
        int nb = 0;
        items--;
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3)
            continue;
        if (b >= 0x80 && b <= 0x8f) {
            kids = 2u * (b & 0x0f);
        } else if (b >= 0x90 && b <= 0x9f) {
            kids = b & 0x0f;
        } else if (b >= 0xa0 && b <= 0xbf) {
            skip = b & 0x1f;
        } else {
            switch (b) {
            case 0xcc:
            case 0xd0:
                skip = 1;
                break;
            case 0xcd:
            case 0xd1:
                skip = 2;
                break;
            case 0xca:
            case 0xce:
            case 0xd2:
                skip = 4;
                break;
            case 0xcb:
            case 0xcf:
            case 0xd3:
                skip = 8;
                break;
            case 0xd4:
                skip = 2;
                break;
            case 0xd5:
                skip = 3;
                break;
            case 0xd6:
                skip = 5;
                break;
            case 0xd7:
                skip = 9;
                break;
            case 0xd8:
                skip = 17;
                break;
            case 0xc4:
            case 0xd9:
                nb = 1;
                break;
            case 0xc5:
            case 0xda:
                nb = 2;
                break;
            case 0xc6:
            case 0xdb:
                nb = 4;
                break;
            case 0xc7:
                nb = 1;
                break; /* ext: +1 type byte */
            case 0xc8:
                nb = 2;
                break;
            case 0xc9:
                nb = 4;
                break;
            case 0xdc:
            case 0xde:
                nb = 2;
                break;
            case 0xdd:
            case 0xdf:
                nb = 4;
                break;
            default:
                return -1; /* 0xc1 */
            }
            if (nb) {
                if (rem < (size_t)nb)
                    return -1;
                for (int i = 0; i < nb; i++)
                    n = (n << 8) | p[pos + (size_t)i];
                pos += (size_t)nb;
                rem -= (size_t)nb;
                if (b == 0xdc || b == 0xdd)
                    kids = n;
                else if (b == 0xde || b == 0xdf)
                    kids = 2 * n;
                else if (b >= 0xc7 && b <= 0xc9)
                    skip = n + 1;
                else
                    skip = n;
            }
        }
        if (skip > rem || kids > rem)
            return -1;
        pos += skip;
        items += kids;
    }
    return pos == len ? 0 : -1;
}

static const msgpack_object *mp_get(const msgpack_object *map, const char *key)
{
    size_t klen = strlen(key);
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object_kv *kv = &map->via.map.ptr[i];
        if (kv->key.type == MSGPACK_OBJECT_STR && kv->key.via.str.size == klen &&
            memcmp(kv->key.via.str.ptr, key, klen) == 0)
            return kv->val.type == MSGPACK_OBJECT_NIL ? NULL : &kv->val;
    }
    return NULL;
}

static int mp_uint(const msgpack_object *map, const char *key, uint64_t *out)
{
    const msgpack_object *o = mp_get(map, key);
    if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return -1;
    *out = o->via.u64;
    return 0;
}

/* A str field as a NUL-terminated copy in the zone. */
static char *mp_str(const msgpack_object *map, const char *key, msgpack_zone *z)
{
    const msgpack_object *o = mp_get(map, key);
    if (!o || o->type != MSGPACK_OBJECT_STR)
        return NULL;
    char *s = msgpack_zone_malloc(z, o->via.str.size + 1);
    if (!s)
        return NULL;
    memcpy(s, o->via.str.ptr, o->via.str.size);
    s[o->via.str.size] = '\0';
    if (strlen(s) != o->via.str.size)
        return NULL; /* embedded NUL: not a name we could have sent */
    return s;
}

/* ---- requests and recovery ------------------------------------------- */

static struct sub *sub_find(arq_client_t *c, const char *stream)
{
    struct sub *s;
    TAILQ_FOREACH(s, &c->subs, link)
    {
        if (strcmp(s->stream, stream) == 0)
            return s;
    }
    return NULL;
}

static int can_send(const arq_client_t *c)
{
    return c->conn == CN_READY && !c->teardown_pending;
}

/* With reconnect, requests made while not connected wait for the next welcome. */
static int may_queue(const arq_client_t *c)
{
    return c->reconnect && !c->user_closed && c->state != ARQ_STATE_IDLE && !final_state(c);
}

static void proto_violation(arq_client_t *c, const char *what)
{
    set_error(c, "protocol error: %s", what);
    if (c->ws && c->conn != CN_CLOSING) {
        (void)wslay_event_queue_close(c->ws, 1002, NULL, 0);
        (void)wslay_event_send(c->ws);
    }
    request_teardown(c, ARQ_EPROTO);
}

static void send_hello(arq_client_t *c)
{
    int resume = c->session && c->resume_token;
    msgpack_packer pk;
    c->out.size = 0;
    msgpack_packer_init(&pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 2 + (c->token ? 1 : 0) + (resume ? 2 : 0));
    pack_kv_str(&pk, "t", "hello");
    pack_kv_str(&pk, "client", c->client_name);
    if (c->token)
        pack_kv_str(&pk, "token", c->token);
    if (resume) {
        pack_kv_str(&pk, "session", c->session);
        pack_kv_str(&pk, "resume_token", c->resume_token);
    }
    int rc = ws_send_out(c);
    if (rc != 0) {
        set_error(c, "cannot send hello: %s", arq_strerror(rc));
        request_teardown(c, rc);
    }
}

/* Send s's sub: from its position if it has one, else as the application asked. */
static int send_sub(arq_client_t *c, struct sub *s)
{
    uint64_t id = c->next_id++;
    uint64_t epoch = s->pos ? (s->epoch ? s->epoch : ARQ_EPOCH_ANY) : s->want_epoch;
    msgpack_packer pk;
    c->out.size = 0;
    msgpack_packer_init(&pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, epoch == ARQ_EPOCH_ANY ? 4 : 5);
    pack_kv_str(&pk, "t", "sub");
    pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, id);
    pack_kv_str(&pk, "stream", s->stream);
    pack_str(&pk, "from");
    if (s->pos)
        msgpack_pack_uint64(&pk, s->pos);
    else if (s->from == ARQ_FROM_OFFSET)
        msgpack_pack_uint64(&pk, s->from_offset);
    else
        pack_str(&pk, s->from == ARQ_FROM_EARLIEST ? "earliest" : "latest");
    if (epoch != ARQ_EPOCH_ANY) {
        pack_str(&pk, "epoch");
        msgpack_pack_uint64(&pk, epoch);
    }
    int rc = ws_send_out(c);
    if (rc != 0)
        return rc;
    if (s->sent)
        c->st.resubscribes++;
    s->sent = 1;
    s->req_id = id;
    s->wire = SW_PENDING;
    s->sent_epoch = epoch != ARQ_EPOCH_ANY;
    return 0;
}

/* Drop a subscription the server restored but we do not want (as it is). */
static void send_unsub(arq_client_t *c, const char *stream)
{
    msgpack_packer pk;
    c->out.size = 0;
    msgpack_packer_init(&pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 3);
    pack_kv_str(&pk, "t", "unsub");
    pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, c->next_id++);
    pack_kv_str(&pk, "stream", stream);
    (void)ws_send_out(c); /* a failure tears the connection down */
}

static int send_ack(arq_client_t *c, const char *stream, uint64_t offset)
{
    msgpack_packer pk;
    c->out.size = 0;
    msgpack_packer_init(&pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 3);
    pack_kv_str(&pk, "t", "ack");
    pack_kv_str(&pk, "stream", stream);
    pack_str(&pk, "offset");
    msgpack_pack_uint64(&pk, offset);
    return ws_send_out(c);
}

/*
 * Send the application's ack as far as the server can take it (up to
 * wire_recv). While it cannot take all of it (redeliveries after a resume),
 * ack in steps of a quarter window so the server does not pause.
 */
static int sub_flush_ack(arq_client_t *c, struct sub *s)
{
    if (s->wire != SW_ACTIVE || !can_send(c))
        return 0;
    uint64_t want = s->acked > s->floor ? s->acked : s->floor;
    uint64_t target = want < s->wire_recv ? want : s->wire_recv;
    if (target <= s->wire_acked)
        return 0;
    uint64_t step = c->max_inflight / 4 ? c->max_inflight / 4 : 1;
    if (target != want && target - s->wire_acked < step)
        return 0;
    int rc = send_ack(c, s->stream, target);
    if (rc == 0)
        s->wire_acked = target;
    return rc;
}

static int pub_send(arq_client_t *c, struct pub *p)
{
    int rc = ws_send(c, p->frame, p->frame_len);
    if (rc != 0)
        return rc;
    if (p->sent)
        c->st.publishes_resent++;
    p->sent = 1;
    p->on_wire = 1;
    p->waiting = 0;
    return 0;
}

static void schedule_retry(arq_client_t *c, uint32_t n)
{
    if (evtimer_pending(c->ev_retry, NULL))
        return;
    struct timeval tv = ms_tv(backoff_ms(c, n));
    (void)evtimer_add(c->ev_retry, &tv);
}

/* Re-send what a 503 put on hold. */
static void resend_waiting(arq_client_t *c)
{
    struct sub *s;
    TAILQ_FOREACH(s, &c->subs, link)
    {
        if (s->waiting && s->wire == SW_OFF) {
            s->waiting = 0;
            if (send_sub(c, s) != 0)
                return;
        }
    }
    struct pub *p;
    TAILQ_FOREACH(p, &c->pubs, link)
    {
        if (p->waiting && !p->on_wire && pub_send(c, p) != 0)
            return;
    }
}

static void recover_done(arq_client_t *c, struct sub *s)
{
    if (!s->recovering)
        return;
    s->recovering = 0;
    c->recover_pending--;
    if (c->recover_pending == 0 && c->state == ARQ_STATE_RECOVERING)
        set_state(c, ARQ_STATE_CONNECTED, 0, NULL);
}

/*
 * After a welcome: subscribe again what the server did not restore, then
 * re-send the publishes without a puback, in their order. Stops at a send
 * failure (the connection is then being torn down) or a freed client.
 */
static void resend_all(arq_client_t *c)
{
    struct sub *s;
    TAILQ_FOREACH(s, &c->subs, link)
    {
        if (s->wire != SW_OFF)
            continue;
        s->waiting = 0;
        if (send_sub(c, s) != 0)
            return;
        s->recovering = 1;
        c->recover_pending++;
    }
    struct pub *p, *next;
    for (p = TAILQ_FIRST(&c->pubs); p; p = next) {
        next = TAILQ_NEXT(p, link);
        if (p->on_wire || !p->frame)
            continue;
        if (p->payload_len > c->max_payload) {
            /* queued before we knew the limit */
            TAILQ_REMOVE(&c->pubs, p, link);
            c->n_pubs--;
            arq_publish_cb cb = p->cb;
            void *arg = p->arg;
            pub_free(p);
            if (cb)
                cb(c, ARQ_ETOOBIG, 0, 0, arg);
            if (c->free_requested || c->teardown_pending)
                return;
            continue;
        }
        if (pub_send(c, p) != 0)
            return;
    }
}

/* welcome.subs of a resumed session. Returns 0, or -1 after a protocol error. */
static int restore_subs(arq_client_t *c, const msgpack_object *arr, msgpack_zone *z)
{
    for (uint32_t i = 0; i < arr->via.array.size; i++) {
        const msgpack_object *e = &arr->via.array.ptr[i];
        uint64_t epoch = 0, acked = 0, next = 0;
        char *stream = e->type == MSGPACK_OBJECT_MAP ? mp_str(e, "stream", z) : NULL;
        if (!stream || mp_uint(e, "epoch", &epoch) || mp_uint(e, "acked", &acked) ||
            mp_uint(e, "next", &next)) {
            proto_violation(c, "malformed welcome.subs");
            return -1;
        }
    }
    for (uint32_t i = 0; i < arr->via.array.size; i++) {
        const msgpack_object *e = &arr->via.array.ptr[i];
        uint64_t epoch = 0, acked = 0, next = 0;
        char *stream = mp_str(e, "stream", z);
        if (!stream)
            return -1; /* out of zone memory */
        (void)mp_uint(e, "epoch", &epoch);
        (void)mp_uint(e, "acked", &acked);
        (void)mp_uint(e, "next", &next);
        struct sub *s = sub_find(c, stream);
        int new_epoch = s && s->epoch && epoch && s->epoch != epoch;
        if (!s || s->wire != SW_OFF || (!new_epoch && s->pos && s->pos <= acked)) {
            /* Not ours, or the server would skip offsets the application has
             * not seen (a gap we never got): drop it; resend_all subscribes
             * ours again and ignores this one's messages until its subok. */
            send_unsub(c, stream);
            continue;
        }
        s->wire = SW_ACTIVE;
        s->req_id = 0;
        s->wire_recv = s->wire_acked = acked;
        if (new_epoch) {
            uint64_t old = s->epoch;
            s->epoch = epoch;
            s->pos = acked + 1;
            s->acked = acked;
            s->floor = 0;
            if (c->epoch_cb)
                c->epoch_cb(c, s->stream, old, epoch, c->epoch_arg);
        } else {
            if (epoch)
                s->epoch = epoch;
            if (!s->pos && s->from == ARQ_FROM_OFFSET && s->from_offset > acked + 1) {
                s->pos = s->from_offset; /* as in on_subok */
                s->floor = s->from_offset - 1;
            }
            if (!s->pos)
                s->pos = acked + 1;
        }
        if (!s->confirmed && !c->free_requested) {
            s->confirmed = 1;
            if (s->subok_cb)
                s->subok_cb(c, 0, s->epoch, acked + 1, next, s->arg);
        }
        if (c->free_requested || c->teardown_pending)
            return -1;
        (void)sub_flush_ack(c, s);
    }
    return 0;
}

static void on_welcome(arq_client_t *c, const msgpack_object *m, msgpack_zone *z)
{
    char *session = mp_str(m, "session", z);
    char *token = mp_str(m, "resume_token", z);
    const msgpack_object *res = mp_get(m, "resumed");
    int resumed = res && res->type == MSGPACK_OBJECT_BOOLEAN && res->via.boolean;
    const msgpack_object *subs = resumed ? mp_get(m, "subs") : NULL;
    if (!session) {
        proto_violation(c, "welcome without session");
        return;
    }
    if (subs && subs->type != MSGPACK_OBJECT_ARRAY) {
        proto_violation(c, "welcome.subs is not an array");
        return;
    }
    char *ns = strdup(session);
    char *nt = token ? strdup(token) : NULL;
    if (!ns || (token && !nt)) {
        free(ns);
        free(nt);
        set_error(c, "out of memory");
        request_teardown(c, ARQ_ENOMEM);
        return;
    }
    free(c->session);
    c->session = ns;
    free(c->resume_token);
    c->resume_token = nt;
    uint64_t v = 0;
    c->max_payload = mp_uint(m, "max_payload", &v) == 0 ? v : (1u << 20);
    c->max_inflight = mp_uint(m, "max_inflight", &v) == 0 && v ? v : ARQ_DEFAULT_INFLIGHT;
    c->conn = CN_READY;
    evtimer_del(c->ev_timer);
    c->last_rx_ms = now_ms();
    if (c->ev_hb) {
        struct timeval tv = ms_tv(c->hb_interval_ms);
        (void)event_add(c->ev_hb, &tv);
    }
    c->retries = 0;
    c->welcomed_ms = now_ms();
    int first = !c->ever_welcomed;
    c->ever_welcomed = 1;
    c->st.connects++;
    if (!first)
        c->st.reconnects++;
    if (resumed)
        c->st.resumed++;

    if (subs && restore_subs(c, subs, z) != 0)
        return;
    if (c->free_requested || c->teardown_pending)
        return;
    resend_all(c);
    if (c->free_requested || c->teardown_pending)
        return;
    if (first) {
        set_state(c, ARQ_STATE_CONNECTED, 0, NULL);
        arq_connect_cb cb = c->connect_cb;
        c->connect_cb = NULL;
        if (cb && !c->free_requested)
            cb(c, 0, c->connect_arg);
        return;
    }
    set_state(c, ARQ_STATE_RECOVERING, 0, resumed ? "session resumed" : "new session");
    if (!c->free_requested && c->state == ARQ_STATE_RECOVERING && c->recover_pending == 0)
        set_state(c, ARQ_STATE_CONNECTED, 0, NULL);
}

static struct pub *pub_on_wire(arq_client_t *c, uint64_t id)
{
    struct pub *p;
    TAILQ_FOREACH(p, &c->pubs, link)
    {
        if (p->on_wire && p->id == id)
            return p;
    }
    return NULL;
}

static struct sub *sub_by_req(arq_client_t *c, uint64_t id)
{
    struct sub *s;
    TAILQ_FOREACH(s, &c->subs, link)
    {
        if (s->wire == SW_PENDING && s->req_id == id)
            return s;
    }
    return NULL;
}

static void pub_complete(arq_client_t *c, struct pub *p, int status, uint64_t offset, int dup)
{
    TAILQ_REMOVE(&c->pubs, p, link);
    c->n_pubs--;
    arq_publish_cb cb = p->cb;
    void *arg = p->arg;
    pub_free(p);
    if (cb)
        cb(c, status, offset, dup, arg);
}

/* A sub refused for good: gone, the application is told. */
static void sub_refused(arq_client_t *c, struct sub *s, int status)
{
    TAILQ_REMOVE(&c->subs, s, link);
    if (s->recovering) {
        s->recovering = 0;
        c->recover_pending--;
    }
    arq_subok_cb cb = s->subok_cb;
    void *arg = s->arg;
    sub_free(s);
    if (cb)
        cb(c, status, 0, 0, 0, arg);
    if (!c->free_requested && c->recover_pending == 0 && c->state == ARQ_STATE_RECOVERING)
        set_state(c, ARQ_STATE_CONNECTED, 0, NULL);
}

/* A nack (or an error with an id) for request id. */
static void on_refusal(arq_client_t *c, uint64_t id, int code)
{
    struct pub *p = pub_on_wire(c, id);
    if (p) {
        p->on_wire = 0;
        if (code == 503 && p->frame && (c->max_retries == 0 || p->retries < c->max_retries)) {
            p->waiting = 1;
            schedule_retry(c, p->retries++);
            return;
        }
        pub_complete(c, p, -code, 0, 0);
        return;
    }
    struct sub *s = sub_by_req(c, id);
    if (!s)
        return; /* not ours (an unsub): ignore */
    s->wire = SW_OFF;
    s->req_id = 0;
    if (code == 503 && c->reconnect && (c->max_retries == 0 || s->retries < c->max_retries)) {
        s->waiting = 1;
        schedule_retry(c, s->retries++);
        return;
    }
    if (code == 409 && s->confirmed && s->sent_epoch) {
        /* The stream's history was reset: start over in the new epoch,
         * from its earliest offset; the subok tells the application. */
        if (!s->old_epoch)
            s->old_epoch = s->epoch;
        s->epoch = 0;
        s->pos = 0;
        s->acked = 0;
        s->floor = 0;
        s->from = ARQ_FROM_EARLIEST;
        s->want_epoch = ARQ_EPOCH_ANY;
        (void)send_sub(c, s);
        return;
    }
    sub_refused(c, s, -code);
}

static void on_subok(arq_client_t *c, struct sub *s, uint64_t epoch, uint64_t first, uint64_t next)
{
    if (s->pos && s->epoch && epoch != s->epoch) {
        /* A re-subscription with our epoch passes the server's check only
         * when the stream does not exist (epoch 0): its history was reset
         * and it starts over at 1. Our offsets are meaningless there. */
        if (!s->old_epoch)
            s->old_epoch = s->epoch;
        s->epoch = 0;
        s->pos = 0;
        s->acked = 0;
        s->floor = 0;
        s->from = ARQ_FROM_EARLIEST;
        s->want_epoch = ARQ_EPOCH_ANY;
    }
    uint64_t start;
    if (s->pos)
        start = s->pos < next ? s->pos : next;
    else if (s->from == ARQ_FROM_EARLIEST)
        start = first;
    else if (s->from == ARQ_FROM_LATEST)
        start = next;
    else
        start = s->from_offset < next ? s->from_offset : next;
    if (start == 0)
        start = 1;
    s->wire = SW_ACTIVE;
    s->req_id = 0;
    s->retries = 0;
    s->wire_recv = s->wire_acked = start - 1;
    if (epoch)
        s->epoch = epoch;
    if (!s->pos && s->from == ARQ_FROM_OFFSET && s->from_offset > start) {
        /* The server starts at its tail, before the offset asked for: what
         * comes before it is dropped, and acked for the application. */
        s->pos = s->from_offset;
        s->floor = s->from_offset - 1;
    }
    if (!s->pos)
        s->pos = start;
    if (s->old_epoch) {
        uint64_t old = s->old_epoch;
        s->old_epoch = 0;
        if (c->epoch_cb)
            c->epoch_cb(c, s->stream, old, epoch, c->epoch_arg);
        if (c->free_requested || c->teardown_pending)
            return;
    }
    if (!s->confirmed) {
        s->confirmed = 1;
        if (s->subok_cb)
            s->subok_cb(c, 0, epoch, first, next, s->arg);
        if (c->free_requested || c->teardown_pending)
            return;
    }
    recover_done(c, s);
}

static void on_msg(arq_client_t *c, const msgpack_object *m, msgpack_zone *z)
{
    arq_message_t msg = {0};
    char *stream = mp_str(m, "stream", z);
    const msgpack_object *pl = mp_get(m, "payload");
    if (!stream || mp_uint(m, "offset", &msg.offset) != 0 || !pl ||
        (pl->type != MSGPACK_OBJECT_BIN && pl->type != MSGPACK_OBJECT_STR)) {
        proto_violation(c, "malformed msg");
        return;
    }
    struct sub *s = sub_find(c, stream);
    if (!s || s->wire != SW_ACTIVE)
        return; /* not (yet) subscribed on this connection */
    if (msg.offset > s->wire_recv)
        s->wire_recv = msg.offset;
    if (msg.offset < s->pos) {
        c->st.redeliveries_dropped++;
        (void)sub_flush_ack(c, s);
        return;
    }
    (void)mp_uint(m, "ts", &msg.ts_us);
    msg.stream = stream;
    msg.payload =
        (const uint8_t *)(pl->type == MSGPACK_OBJECT_BIN ? pl->via.bin.ptr : pl->via.str.ptr);
    msg.payload_len = pl->via.bin.size; /* same layout for str */
    const msgpack_object *h = mp_get(m, "headers");
    if (h) {
        if (h->type != MSGPACK_OBJECT_MAP) {
            proto_violation(c, "msg headers not a map");
            return;
        }
        for (uint32_t i = 0; i < h->via.map.size; i++)
            if (h->via.map.ptr[i].key.type != MSGPACK_OBJECT_STR ||
                h->via.map.ptr[i].val.type != MSGPACK_OBJECT_STR) {
                proto_violation(c, "msg headers not str -> str");
                return;
            }
        msgpack_packer pk;
        c->headers.size = 0;
        msgpack_packer_init(&pk, &c->headers, msgpack_sbuffer_write);
        if (msgpack_pack_object(&pk, *h) != 0) {
            proto_violation(c, "cannot re-encode headers");
            return;
        }
        msg.headers = (const uint8_t *)c->headers.data;
        msg.headers_len = c->headers.size;
    }
    s->pos = msg.offset + 1;
    s->msg_cb(c, &msg, s->arg);
}

static void on_gap(arq_client_t *c, const msgpack_object *m, msgpack_zone *z)
{
    char *stream = mp_str(m, "stream", z);
    uint64_t from = 0, to = 0;
    if (!stream || mp_uint(m, "from", &from) || mp_uint(m, "to", &to) || to < from) {
        proto_violation(c, "malformed gap");
        return;
    }
    struct sub *s = sub_find(c, stream);
    if (!s || s->wire != SW_ACTIVE)
        return;
    /* The server counts a gap as delivered and acked. */
    if (to > s->wire_recv)
        s->wire_recv = to;
    if (to > s->wire_acked)
        s->wire_acked = to;
    if (to < s->pos)
        return; /* reported before */
    if (from < s->pos)
        from = s->pos;
    s->pos = to + 1;
    if (c->gap_cb)
        c->gap_cb(c, stream, from, to, c->gap_arg);
}

static void handle_message(arq_client_t *c, const msgpack_object *m, msgpack_zone *z)
{
    char *t = mp_str(m, "t", z);
    if (!t) {
        proto_violation(c, "message without a str \"t\"");
        return;
    }
    uint64_t id = 0, code = 0;

    if (c->conn == CN_WELCOME) {
        if (strcmp(t, "welcome") == 0) {
            on_welcome(c, m, z);
        } else if (strcmp(t, "error") == 0) {
            char *reason = mp_str(m, "reason", z);
            set_error(c, "%s", reason ? reason : "hello refused");
            int st = mp_uint(m, "code", &code) == 0 && code >= 100 && code < 1000 ? -(int)code
                                                                                  : ARQ_EPROTO;
            request_teardown(c, st);
        }
        return; /* anything else before welcome: ignore */
    }

    if (strcmp(t, "msg") == 0) {
        on_msg(c, m, z);
        return;
    }
    if (strcmp(t, "puback") == 0 || strcmp(t, "nack") == 0 || strcmp(t, "subok") == 0) {
        if (mp_uint(m, "id", &id) != 0) {
            proto_violation(c, "reply without id");
            return;
        }
        if (t[0] == 'n') {
            char *reason = mp_str(m, "reason", z);
            if (mp_uint(m, "code", &code) != 0 || code < 100 || code > 999)
                code = 500;
            set_error(c, "%s", reason ? reason : arq_strerror(-(int)code));
            on_refusal(c, id, (int)code);
            return;
        }
        if (t[0] == 'p') {
            struct pub *p = pub_on_wire(c, id);
            if (!p)
                return; /* not ours (or already failed): ignore */
            uint64_t off = 0;
            if (mp_uint(m, "offset", &off) != 0) {
                proto_violation(c, "malformed puback");
                return;
            }
            const msgpack_object *dup = mp_get(m, "dup");
            int d = dup && dup->type == MSGPACK_OBJECT_BOOLEAN && dup->via.boolean;
            pub_complete(c, p, 0, off, d);
            return;
        }
        struct sub *s = sub_by_req(c, id);
        if (!s)
            return;
        uint64_t epoch = 0, first = 0, next = 0;
        if (mp_uint(m, "epoch", &epoch) || mp_uint(m, "first", &first) ||
            mp_uint(m, "next", &next)) {
            proto_violation(c, "malformed subok");
            return;
        }
        on_subok(c, s, epoch, first, next);
        return;
    }
    if (strcmp(t, "gap") == 0) {
        on_gap(c, m, z);
        return;
    }
    if (strcmp(t, "error") == 0) {
        char *reason = mp_str(m, "reason", z);
        if (mp_uint(m, "code", &code) != 0 || code < 100 || code > 999)
            code = 500;
        set_error(c, "%s", reason ? reason : arq_strerror(-(int)code));
        if (mp_uint(m, "id", &id) == 0 && (pub_on_wire(c, id) || sub_by_req(c, id))) {
            on_refusal(c, id, (int)code);
            return;
        }
        if (c->error_cb)
            c->error_cb(c, -(int)code, c->last_error, c->error_arg);
        return;
    }
    /* unsubok and unknown types: ignored (forward compatibility). */
}

static void ws_msg_cb(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                      void *user)
{
    arq_client_t *c = user;
    if (c->teardown_pending || c->free_requested)
        return;
    if (arg->opcode == WSLAY_CONNECTION_CLOSE) {
        c->close_received = 1;
        c->close_code = arg->status_code;
        if (c->conn != CN_CLOSING)
            set_error(c, "server closed the connection (%u%s%.*s)", arg->status_code,
                      arg->msg_length > 2 ? " " : "",
                      arg->msg_length > 2 ? (int)(arg->msg_length - 2) : 0,
                      arg->msg_length > 2 ? (const char *)arg->msg + 2 : "");
        return;
    }
    if (arg->opcode == WSLAY_PING || arg->opcode == WSLAY_PONG)
        return; /* wslay answers pings; any frame counts for the heartbeat */
    if (arg->opcode != WSLAY_BINARY_FRAME) {
        proto_violation(c, "non-binary message");
        return;
    }
    if (mp_precheck(arg->msg, arg->msg_length) != 0) {
        proto_violation(c, "malformed msgpack");
        return;
    }
    msgpack_zone z;
    if (!msgpack_zone_init(&z, 2048)) {
        set_error(c, "out of memory");
        request_teardown(c, ARQ_ENOMEM);
        return;
    }
    msgpack_object obj;
    size_t off = 0;
    int rc = msgpack_unpack((const char *)arg->msg, arg->msg_length, &off, &z, &obj);
    if (rc != MSGPACK_UNPACK_SUCCESS || obj.type != MSGPACK_OBJECT_MAP)
        proto_violation(c, "message is not one msgpack map");
    else
        handle_message(c, &obj, &z);
    msgpack_zone_destroy(&z);
}

/* ---- HTTP upgrade ------------------------------------------------------ */

static int b64(const uint8_t *in, size_t n, char *out, size_t outlen)
{
    if (outlen < 4 * ((n + 2) / 3) + 1)
        return -1;
    EVP_EncodeBlock((unsigned char *)out, in, (int)n);
    return 0;
}

static int expected_accept(const char *key, char *out, size_t outlen)
{
    char buf[128];
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    int n = snprintf(buf, sizeof(buf), "%s%s", key, WS_GUID);
    if (n < 0 || (size_t)n >= sizeof(buf))
        return -1;
    if (EVP_Digest(buf, (size_t)n, md, &mdlen, EVP_sha1(), NULL) != 1)
        return -1;
    return b64(md, mdlen, out, outlen);
}

static int send_upgrade(arq_client_t *c)
{
    uint8_t raw[16];
    if (getrandom(raw, sizeof(raw), 0) != (ssize_t)sizeof(raw))
        return -1;
    if (b64(raw, sizeof(raw), c->ws_key, sizeof(c->ws_key)) != 0)
        return -1;
    return evbuffer_add_printf(bufferevent_get_output(c->bev),
                               "GET %s HTTP/1.1\r\n"
                               "Host: %s:%u\r\n"
                               "Upgrade: websocket\r\n"
                               "Connection: Upgrade\r\n"
                               "Sec-WebSocket-Key: %s\r\n"
                               "Sec-WebSocket-Version: 13\r\n"
                               "Sec-WebSocket-Protocol: arq.v1\r\n"
                               "User-Agent: %s\r\n"
                               "\r\n",
                               c->path, c->host, c->port, c->ws_key, c->client_name) < 0
               ? -1
               : 0;
}

static int token_has(const char *v, const char *tok)
{
    size_t n = strlen(tok);
    while (*v) {
        while (*v == ' ' || *v == '\t' || *v == ',')
            v++;
        const char *e = v + strcspn(v, ",");
        const char *te = e;
        while (te > v && (te[-1] == ' ' || te[-1] == '\t'))
            te--;
        if ((size_t)(te - v) == n && strncasecmp(v, tok, n) == 0)
            return 1;
        v = e;
    }
    return 0;
}

/* Returns 1 when the head is complete and valid, 0 for more, <0 on error. */
static int read_upgrade(arq_client_t *c)
{
    struct evbuffer *in = bufferevent_get_input(c->bev);
    struct evbuffer_ptr end = evbuffer_search(in, "\r\n\r\n", 4, NULL);
    if (end.pos < 0) {
        if (evbuffer_get_length(in) > ARQ_MAX_HTTP_HEAD) {
            set_error(c, "handshake failed: response head over %d bytes", ARQ_MAX_HTTP_HEAD);
            return ARQ_EHANDSHAKE;
        }
        return 0;
    }
    if (end.pos > ARQ_MAX_HTTP_HEAD) {
        set_error(c, "handshake failed: response head over %d bytes", ARQ_MAX_HTTP_HEAD);
        return ARQ_EHANDSHAKE;
    }
    size_t hlen = (size_t)end.pos + 4;
    char *head = malloc(hlen + 1);
    if (!head)
        return ARQ_ENOMEM;
    (void)evbuffer_remove(in, head, hlen);
    head[hlen] = '\0';

    int rc = ARQ_EHANDSHAKE;
    int upgrade = 0, connection = 0, proto = 0, accept = 0;
    char want[64];
    char *save = NULL;
    char *line = strtok_r(head, "\r\n", &save);
    int status = 0;
    char reason[128] = "";
    if (!line || sscanf(line, "HTTP/1.%*1[01] %3d %127[^\r\n]", &status, reason) < 1) {
        set_error(c, "handshake failed: not an HTTP response");
        goto out;
    }
    c->http_status = status;
    if (status != 101) {
        set_error(c, "handshake failed: HTTP %d %s", status, reason);
        goto out;
    }
    if (expected_accept(c->ws_key, want, sizeof(want)) != 0) {
        set_error(c, "handshake failed: cannot compute accept");
        goto out;
    }
    while ((line = strtok_r(NULL, "\r\n", &save))) {
        char *colon = strchr(line, ':');
        if (!colon)
            continue;
        *colon = '\0';
        char *v = colon + 1;
        while (*v == ' ' || *v == '\t')
            v++;
        size_t vl = strlen(v);
        while (vl > 0 && (v[vl - 1] == ' ' || v[vl - 1] == '\t'))
            v[--vl] = '\0';
        if (strcasecmp(line, "Upgrade") == 0)
            upgrade = strcasecmp(v, "websocket") == 0;
        else if (strcasecmp(line, "Connection") == 0)
            connection = token_has(v, "upgrade");
        else if (strcasecmp(line, "Sec-WebSocket-Protocol") == 0)
            proto = strcmp(v, "arq.v1") == 0;
        else if (strcasecmp(line, "Sec-WebSocket-Accept") == 0)
            accept = strcmp(v, want) == 0;
    }
    if (!upgrade || !connection)
        set_error(c, "handshake failed: 101 without Upgrade: websocket");
    else if (!accept)
        set_error(c, "handshake failed: wrong Sec-WebSocket-Accept");
    else if (!proto)
        set_error(c, "handshake failed: server did not select subprotocol arq.v1");
    else
        rc = 1;
out:
    free(head);
    return rc;
}

static int start_ws(arq_client_t *c)
{
    struct wslay_event_callbacks cbs = {ws_recv_cb, ws_send_cb, ws_genmask_cb, NULL,
                                        NULL,       NULL,       ws_msg_cb};
    if (wslay_event_context_client_init(&c->ws, &cbs, c) != 0)
        return ARQ_ENOMEM;
    wslay_event_config_set_max_recv_msg_length(c->ws, ARQ_MAX_FRAME);
    return 0;
}

/* Feed received bytes to wslay, then flush what it wants to send. */
static void ws_pump(arq_client_t *c)
{
    if (wslay_event_recv(c->ws) != 0) {
        if (!c->teardown_pending) {
            set_error(c, "websocket protocol error from server");
            request_teardown(c, c->conn == CN_CLOSING ? ARQ_ECLOSED : ARQ_EPROTO);
        }
        return;
    }
    if (c->teardown_pending)
        return;
    (void)ws_flush(c);
    if (c->close_received) {
        /* wslay queued the close answer; close once it is written. */
        if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
            request_teardown(c, c->conn == CN_CLOSING ? ARQ_ECLOSED : ARQ_ECONNLOST);
    }
}

static void bev_read_cb(struct bufferevent *bev, void *arg)
{
    arq_client_t *c = arg;
    enter(c);
    if (c->hb_timeout_ms)
        c->last_rx_ms = now_ms();
    if (c->conn == CN_UPGRADE) {
        int rc = read_upgrade(c);
        if (rc < 0) {
            request_teardown(c, rc);
        } else if (rc == 1) {
            rc = start_ws(c);
            if (rc != 0) {
                set_error(c, "out of memory");
                request_teardown(c, rc);
            } else {
                c->conn = CN_WELCOME;
                send_hello(c);
            }
        }
    }
    if ((c->conn == CN_WELCOME || c->conn == CN_READY || c->conn == CN_CLOSING) && c->ws &&
        !c->teardown_pending)
        ws_pump(c);
    leave(c);
}

static void bev_write_cb(struct bufferevent *bev, void *arg)
{
    arq_client_t *c = arg;
    enter(c);
    if (c->close_received && !c->teardown_pending)
        request_teardown(c, c->conn == CN_CLOSING ? ARQ_ECLOSED : ARQ_ECONNLOST);
    leave(c);
}

static void bev_event_cb(struct bufferevent *bev, short what, void *arg)
{
    arq_client_t *c = arg;
    enter(c);
    if (what & BEV_EVENT_CONNECTED) {
        c->conn = CN_UPGRADE;
        if (send_upgrade(c) != 0) {
            set_error(c, "cannot send the upgrade request");
            request_teardown(c, ARQ_ENOMEM);
        }
    } else if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
        int err = EVUTIL_SOCKET_ERROR();
        if (c->conn == CN_TCP) {
            set_error(c, "connect to %s:%u: %s", c->host, c->port,
                      evutil_socket_error_to_string(err));
            request_teardown(c, ARQ_ECONNECT);
        } else if (c->conn == CN_CLOSING) {
            request_teardown(c, ARQ_ECLOSED);
        } else {
            if (!c->close_received)
                set_error(c, "connection to %s:%u lost: %s", c->host, c->port,
                          (what & BEV_EVENT_EOF) ? "closed by peer"
                                                 : evutil_socket_error_to_string(err));
            request_teardown(c, c->conn == CN_UPGRADE ? ARQ_EHANDSHAKE : ARQ_ECONNLOST);
        }
    }
    leave(c);
}

/* Open a new transport. Failures after the socket exists go through teardown. */
static int start_attempt(arq_client_t *c)
{
    c->last_error[0] = '\0';
    c->close_received = 0;
    c->close_code = 0;
    c->http_status = 0;
    c->bev = bufferevent_socket_new(c->base, -1, BEV_OPT_CLOSE_ON_FREE);
    if (!c->bev)
        return ARQ_ENOMEM;
    bufferevent_setcb(c->bev, bev_read_cb, bev_write_cb, bev_event_cb, c);
    if (bufferevent_enable(c->bev, EV_READ | EV_WRITE) != 0) {
        bufferevent_free(c->bev);
        c->bev = NULL;
        return ARQ_ENOMEM;
    }
    c->conn = CN_TCP;
    arm_timer(c);
    if (bufferevent_socket_connect(c->bev, (struct sockaddr *)&c->addr, sizeof(c->addr)) != 0) {
        /* Immediate failure: reported through the callback, like a refusal. */
        set_error(c, "connect to %s:%u: %s", c->host, c->port,
                  evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
        request_teardown(c, ARQ_ECONNECT);
    }
    return 0;
}

int arq_client_connect(arq_client_t *c, arq_connect_cb cb, void *arg)
{
    if (c->state != ARQ_STATE_IDLE)
        return ARQ_EBUSY;
    c->depth++;
    int rc = start_attempt(c);
    if (rc == 0) {
        c->connect_cb = cb;
        c->connect_arg = arg;
        set_state(c, ARQ_STATE_CONNECTING, 0, NULL);
    }
    api_leave(c);
    return rc;
}

/* ---- public requests ------------------------------------------------- */

static int valid_stream(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    return n >= 1 && n <= 200;
}

/* One msgpack map of str -> str filling raw[0..len) exactly. */
static int headers_ok(const uint8_t *raw, size_t len)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    int ok = msgpack_unpack_next(&u, (const char *)raw, len, &off) == MSGPACK_UNPACK_SUCCESS &&
             off == len && u.data.type == MSGPACK_OBJECT_MAP;
    for (uint32_t i = 0; ok && i < u.data.via.map.size; i++)
        ok = u.data.via.map.ptr[i].key.type == MSGPACK_OBJECT_STR &&
             u.data.via.map.ptr[i].val.type == MSGPACK_OBJECT_STR;
    msgpack_unpacked_destroy(&u);
    return ok;
}

int arq_publish(arq_client_t *c, const char *stream, const void *payload, size_t len,
                const char *msgid, arq_publish_cb cb, void *arg)
{
    return arq_publish_headers(c, stream, payload, len, msgid, NULL, 0, cb, arg);
}

int arq_publish_headers(arq_client_t *c, const char *stream, const void *payload, size_t len,
                        const char *msgid, const uint8_t *headers, size_t headers_len,
                        arq_publish_cb cb, void *arg)
{
    if (!valid_stream(stream) || (len && !payload))
        return ARQ_EINVAL;
    if (!headers)
        headers_len = 0;
    if (headers_len && (headers_len > ARQ_MAX_FRAME || !headers_ok(headers, headers_len)))
        return ARQ_EINVAL;
    if (msgid && (msgid[0] == '\0' || strlen(msgid) > ARQ_MSGID_MAX))
        return ARQ_EINVAL;
    int live = can_send(c);
    if (!live && !may_queue(c))
        return ARQ_ENOTCONN;
    if (c->ever_welcomed && len > c->max_payload)
        return ARQ_ETOOBIG;
    if (c->n_pubs >= c->max_pending)
        return ARQ_EFULL;
    char gen[sizeof(c->msgid_prefix) + 24];
    if (!msgid) {
        snprintf(gen, sizeof(gen), "%s-%" PRIu64, c->msgid_prefix, ++c->msgid_seq);
        msgid = gen;
    }
    struct pub *p = calloc(1, sizeof(*p));
    if (!p)
        return ARQ_ENOMEM;
    p->id = c->next_id++;
    p->cb = cb;
    p->arg = arg;
    p->payload_len = len;

    msgpack_packer pk;
    c->out.size = 0;
    msgpack_packer_init(&pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, headers_len ? 6 : 5);
    pack_kv_str(&pk, "t", "pub");
    pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, p->id);
    pack_kv_str(&pk, "stream", stream);
    pack_str(&pk, "payload");
    msgpack_pack_bin(&pk, len);
    msgpack_pack_bin_body(&pk, payload, len);
    pack_kv_str(&pk, "msgid", msgid);
    if (headers_len) {
        pack_str(&pk, "headers");
        /* one str -> str map (checked above), appended as it is */
        if (msgpack_sbuffer_write(&c->out, (const char *)headers, headers_len) != 0) {
            free(p);
            return ARQ_ENOMEM;
        }
    }
    if (c->out.size > ARQ_MAX_FRAME) {
        free(p);
        return ARQ_ETOOBIG;
    }
    if (c->reconnect) {
        p->frame = malloc(c->out.size);
        if (!p->frame) {
            free(p);
            return ARQ_ENOMEM;
        }
        memcpy(p->frame, c->out.data, c->out.size);
        p->frame_len = c->out.size;
    }
    if (live) {
        int rc = p->frame ? pub_send(c, p) : ws_send_out(c);
        if (rc == 0) {
            p->sent = 1;
            p->on_wire = 1;
        } else if (!(rc == ARQ_ECONNLOST && c->reconnect)) {
            pub_free(p);
            return rc;
        }
    }
    TAILQ_INSERT_TAIL(&c->pubs, p, link);
    c->n_pubs++;
    return 0;
}

int arq_subscribe(arq_client_t *c, const char *stream, enum arq_from from, uint64_t offset,
                  uint64_t epoch, arq_subok_cb subok_cb, arq_msg_cb msg_cb, void *arg)
{
    if (!valid_stream(stream) || !msg_cb ||
        (from != ARQ_FROM_EARLIEST && from != ARQ_FROM_LATEST && from != ARQ_FROM_OFFSET) ||
        (from == ARQ_FROM_OFFSET && offset == 0))
        return ARQ_EINVAL;
    int live = can_send(c);
    if (!live && !may_queue(c))
        return ARQ_ENOTCONN;
    if (sub_find(c, stream))
        return ARQ_EBUSY;
    struct sub *s = calloc(1, sizeof(*s));
    if (!s || !(s->stream = strdup(stream))) {
        free(s);
        return ARQ_ENOMEM;
    }
    s->subok_cb = subok_cb;
    s->msg_cb = msg_cb;
    s->arg = arg;
    s->from = from;
    s->from_offset = from == ARQ_FROM_OFFSET ? offset : 0;
    s->want_epoch = epoch;
    if (live) {
        int rc = send_sub(c, s);
        if (rc != 0 && !(rc == ARQ_ECONNLOST && c->reconnect)) {
            sub_free(s);
            return rc;
        }
    }
    TAILQ_INSERT_TAIL(&c->subs, s, link);
    return 0;
}

int arq_ack(arq_client_t *c, const char *stream, uint64_t offset)
{
    if (!valid_stream(stream))
        return ARQ_EINVAL;
    struct sub *s = sub_find(c, stream);
    if (!s)
        return can_send(c) ? send_ack(c, stream, offset) : ARQ_ENOTCONN;
    if (!can_send(c) && !may_queue(c))
        return ARQ_ENOTCONN;
    if (offset >= s->pos)
        return ARQ_EINVAL; /* beyond what the application was given */
    if (offset > s->acked)
        s->acked = offset;
    int rc = sub_flush_ack(c, s);
    /* With reconnect a lost connection is not the caller's failure: the ack
     * is recorded and goes out again after the reconnect if still needed. */
    return rc == ARQ_ECONNLOST && c->reconnect ? 0 : rc;
}

int arq_subscription_epoch(const arq_client_t *c, const char *stream, uint64_t *ret_epoch)
{
    struct sub *s = valid_stream(stream) ? sub_find((arq_client_t *)c, stream) : NULL;
    if (!s)
        return ARQ_EINVAL;
    *ret_epoch = s->epoch;
    return 0;
}

int arq_client_close(arq_client_t *c, arq_close_cb cb, void *arg)
{
    if (c->state == ARQ_STATE_IDLE || final_state(c) || c->user_closed || c->conn == CN_CLOSING)
        return ARQ_ENOTCONN;
    c->user_closed = 1;
    c->close_cb = cb;
    c->close_arg = arg;
    evtimer_del(c->ev_reconnect);
    evtimer_del(c->ev_retry);
    if (c->conn != CN_READY || !c->ws || c->teardown_pending) {
        set_error(c, "closed while %s", c->conn == CN_NONE ? "waiting to reconnect" : "connecting");
        request_teardown(c, ARQ_ECLOSED);
        return 0;
    }
    c->conn = CN_CLOSING;
    if (c->ev_hb)
        event_del(c->ev_hb);
    if (wslay_event_queue_close(c->ws, 1000, NULL, 0) != 0) {
        request_teardown(c, ARQ_ECLOSED);
        return 0;
    }
    arm_timer(c);
    (void)ws_flush(c);
    if (c->close_received && evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
        request_teardown(c, ARQ_ECLOSED);
    return 0;
}
