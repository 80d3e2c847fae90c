/*
 * arq.c - libarq: arq.v1 over WebSocket (wslay, client mode) on a libevent
 * bufferevent, msgpack-c for the messages.
 *
 * Connection states: TCP connect -> HTTP upgrade -> WebSocket, hello sent ->
 * welcome received (READY) -> CLOSING (our close frame queued) -> CLOSED.
 *
 * Teardown (freeing the wslay context and the bufferevent, failing pending
 * requests) never happens inside wslay or user callbacks: it is flagged and
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
#include <msgpack.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <sys/random.h>
#include <wslay/wslay.h>

#define ARQ_LIB_VERSION    "0.1.0"
#define ARQ_MAX_FRAME      (16u << 20) /* largest message we accept or send */
#define ARQ_MAX_HTTP_HEAD  8192
#define ARQ_DEFAULT_TMO_MS 10000
#define WS_GUID            "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

enum conn_state {
    ST_IDLE = 0,
    ST_TCP,     /* connecting */
    ST_UPGRADE, /* request sent, waiting for 101 */
    ST_WELCOME, /* hello sent */
    ST_READY,   /* welcome received */
    ST_CLOSING, /* our close frame queued */
    ST_CLOSED,  /* done; no reconnection */
};

enum req_kind { REQ_PUB = 1, REQ_SUB };

struct sub;

struct req {
    TAILQ_ENTRY(req) link;
    uint64_t id;
    enum req_kind kind;
    arq_publish_cb pub_cb;
    void *arg;
    struct sub *sub; /* REQ_SUB */
};

struct sub {
    LIST_ENTRY(sub) link;
    char *stream;
    int active; /* subok received */
    arq_subok_cb subok_cb;
    arq_msg_cb msg_cb;
    void *arg;
};

struct arq_client {
    struct event_base *base;
    char *host, *path, *token, *client_name;
    uint16_t port;
    struct sockaddr_in addr;
    uint32_t timeout_ms;

    enum conn_state state;
    struct bufferevent *bev;
    wslay_event_context_ptr ws;
    struct event *ev_timer; /* connect / close timeout */
    struct event *ev_defer; /* teardown requested outside an event callback */
    char ws_key[32];

    arq_connect_cb connect_cb;
    void *connect_arg;
    arq_close_cb close_cb;
    void *close_arg;
    arq_error_cb error_cb;
    void *error_arg;
    arq_gap_cb gap_cb;
    void *gap_arg;

    char *session;
    uint64_t max_payload;
    uint64_t next_id;
    TAILQ_HEAD(, req) reqs;
    LIST_HEAD(, sub) subs;

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

static void set_error(arq_client_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_error(arq_client_t *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->last_error, sizeof(c->last_error), fmt, ap);
    va_end(ap);
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

static void client_destroy(arq_client_t *c)
{
    if (c->ws)
        wslay_event_context_free(c->ws);
    if (c->bev)
        bufferevent_free(c->bev);
    if (c->ev_timer)
        event_free(c->ev_timer);
    if (c->ev_defer)
        event_free(c->ev_defer);
    struct req *r;
    while ((r = TAILQ_FIRST(&c->reqs))) {
        TAILQ_REMOVE(&c->reqs, r, link);
        free(r);
    }
    struct sub *s;
    while ((s = LIST_FIRST(&c->subs))) {
        LIST_REMOVE(s, link);
        free(s->stream);
        free(s);
    }
    msgpack_sbuffer_destroy(&c->out);
    msgpack_sbuffer_destroy(&c->headers);
    free(c->host);
    free(c->path);
    free(c->token);
    free(c->client_name);
    free(c->session);
    free(c);
}

static void enter(arq_client_t *c)
{
    c->depth++;
}

/* Leave a libevent callback: run deferred teardown/free at the outermost. */
static void leave(arq_client_t *c)
{
    if (c->depth == 1 && c->teardown_pending && !c->free_requested)
        conn_teardown(c);
    if (--c->depth == 0 && c->free_requested)
        client_destroy(c);
}

/* Complete a request that will get no answer, and free it. */
static void fail_req(arq_client_t *c, struct req *r, int status)
{
    if (r->kind == REQ_PUB) {
        if (r->pub_cb)
            r->pub_cb(c, status, 0, 0, r->arg);
    } else if (r->sub) {
        struct sub *s = r->sub;
        LIST_REMOVE(s, link);
        if (s->subok_cb)
            s->subok_cb(c, status, 0, 0, 0, s->arg);
        free(s->stream);
        free(s);
    }
    free(r);
}

static void request_teardown(arq_client_t *c, int status)
{
    if (c->teardown_pending || c->state == ST_CLOSED)
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
    if (c->state == ST_CLOSING) {
        request_teardown(c, ARQ_ECLOSED);
    } else if (c->state != ST_READY && c->state != ST_CLOSED) {
        set_error(c, "no welcome from %s:%u within %u ms", c->host, c->port, c->timeout_ms);
        request_teardown(c, ARQ_ETIMEDOUT);
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
    TAILQ_INIT(&c->reqs);
    LIST_INIT(&c->subs);
    msgpack_sbuffer_init(&c->out);
    msgpack_sbuffer_init(&c->headers);
    c->next_id = 1;
    c->timeout_ms = options->connect_timeout_ms ? options->connect_timeout_ms : ARQ_DEFAULT_TMO_MS;
    int rc = parse_url(c, options->url);
    if (rc == 0 && options->token && !(c->token = strdup(options->token)))
        rc = ARQ_ENOMEM;
    if (rc == 0 && !(c->client_name = strdup(options->client_name ? options->client_name
                                                                  : "libarq/" ARQ_LIB_VERSION)))
        rc = ARQ_ENOMEM;
    if (rc == 0) {
        c->ev_timer = evtimer_new(base, timer_cb, c);
        c->ev_defer = event_new(base, -1, 0, defer_cb, c);
        if (!c->ev_timer || !c->ev_defer)
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

static void arm_timer(arq_client_t *c)
{
    struct timeval tv = {.tv_sec = c->timeout_ms / 1000,
                         .tv_usec = (suseconds_t)(c->timeout_ms % 1000) * 1000};
    (void)evtimer_add(c->ev_timer, &tv);
}

/*
 * Free the transport, then tell the user: the connect callback if the
 * connection never became ready, else the pending requests and the error
 * callback (unless the user closed it).
 */
static void conn_teardown(arq_client_t *c)
{
    int status = c->teardown_status;
    enum conn_state was = c->state;
    c->teardown_pending = 0;
    c->state = ST_CLOSED;
    evtimer_del(c->ev_timer);
    event_del(c->ev_defer);
    if (c->ws) {
        wslay_event_context_free(c->ws);
        c->ws = NULL;
    }
    if (c->bev) {
        bufferevent_free(c->bev);
        c->bev = NULL;
    }
    if (!c->last_error[0])
        set_error(c, "%s", arq_strerror(status));

    /* Fail pending requests first, in order; callbacks may free the client. */
    struct req *r;
    while ((r = TAILQ_FIRST(&c->reqs)) && !c->free_requested) {
        TAILQ_REMOVE(&c->reqs, r, link);
        fail_req(c, r, status);
    }
    if (c->free_requested)
        return;
    if (c->connect_cb) {
        arq_connect_cb cb = c->connect_cb;
        c->connect_cb = NULL;
        cb(c, status, c->connect_arg);
    } else if (was == ST_READY && status != ARQ_ECLOSED && c->error_cb) {
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
    while (len > 0) {
        ssize_t n = getrandom(buf, len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
            return -1;
        }
        buf += n;
        len -= (size_t)n;
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

/* Send c->out as one binary message (wslay copies it). */
static int ws_send_out(arq_client_t *c)
{
    if (c->out.size > ARQ_MAX_FRAME)
        return ARQ_ETOOBIG;
    struct wslay_event_msg m = {WSLAY_BINARY_FRAME, (const uint8_t *)c->out.data, c->out.size};
    int rc = wslay_event_queue_msg(c->ws, &m);
    if (rc == WSLAY_ERR_NOMEM)
        return ARQ_ENOMEM;
    if (rc != 0)
        return ARQ_ENOTCONN;
    return ws_flush(c);
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

static struct req *req_take(arq_client_t *c, uint64_t id)
{
    struct req *r;
    TAILQ_FOREACH(r, &c->reqs, link)
    {
        if (r->id == id) {
            TAILQ_REMOVE(&c->reqs, r, link);
            return r;
        }
    }
    return NULL;
}

static struct sub *sub_find(arq_client_t *c, const char *stream)
{
    struct sub *s;
    LIST_FOREACH(s, &c->subs, link)
    {
        if (strcmp(s->stream, stream) == 0)
            return s;
    }
    return NULL;
}

static void proto_violation(arq_client_t *c, const char *what)
{
    set_error(c, "protocol error: %s", what);
    if (c->ws && c->state != ST_CLOSING && c->state != ST_CLOSED) {
        (void)wslay_event_queue_close(c->ws, 1002, NULL, 0);
        (void)wslay_event_send(c->ws);
    }
    request_teardown(c, ARQ_EPROTO);
}

static void send_hello(arq_client_t *c)
{
    msgpack_packer pk;
    c->out.size = 0;
    msgpack_packer_init(&pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, c->token ? 3 : 2);
    pack_kv_str(&pk, "t", "hello");
    pack_kv_str(&pk, "client", c->client_name);
    if (c->token)
        pack_kv_str(&pk, "token", c->token);
    int rc = ws_send_out(c);
    if (rc != 0) {
        set_error(c, "cannot send hello: %s", arq_strerror(rc));
        request_teardown(c, rc);
    }
}

static void handle_message(arq_client_t *c, const msgpack_object *m, msgpack_zone *z)
{
    char *t = mp_str(m, "t", z);
    if (!t) {
        proto_violation(c, "message without a str \"t\"");
        return;
    }
    uint64_t id = 0, code = 0;

    if (c->state == ST_WELCOME) {
        if (strcmp(t, "welcome") == 0) {
            char *session = mp_str(m, "session", z);
            if (!session) {
                proto_violation(c, "welcome without session");
                return;
            }
            free(c->session);
            c->session = strdup(session);
            uint64_t mp = 0;
            c->max_payload = mp_uint(m, "max_payload", &mp) == 0 ? mp : (1u << 20);
            c->state = ST_READY;
            evtimer_del(c->ev_timer);
            arq_connect_cb cb = c->connect_cb;
            c->connect_cb = NULL;
            if (cb)
                cb(c, 0, c->connect_arg);
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
        arq_message_t msg = {0};
        char *stream = mp_str(m, "stream", z);
        const msgpack_object *pl = mp_get(m, "payload");
        if (!stream || mp_uint(m, "offset", &msg.offset) != 0 || !pl ||
            (pl->type != MSGPACK_OBJECT_BIN && pl->type != MSGPACK_OBJECT_STR)) {
            proto_violation(c, "malformed msg");
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
        struct sub *s = sub_find(c, stream);
        if (s && s->msg_cb)
            s->msg_cb(c, &msg, s->arg);
        return;
    }
    if (strcmp(t, "puback") == 0 || strcmp(t, "nack") == 0 || strcmp(t, "subok") == 0) {
        if (mp_uint(m, "id", &id) != 0) {
            proto_violation(c, "reply without id");
            return;
        }
        struct req *r = req_take(c, id);
        if (!r)
            return; /* not ours (or already failed): ignore */
        if (t[0] == 'n') {
            char *reason = mp_str(m, "reason", z);
            if (mp_uint(m, "code", &code) != 0 || code < 100 || code > 999)
                code = 500;
            set_error(c, "%s", reason ? reason : arq_strerror(-(int)code));
            {
                fail_req(c, r, -(int)code);
                return;
            }
        }
        if (t[0] == 'p') {
            uint64_t off = 0;
            const msgpack_object *dup = mp_get(m, "dup");
            if (r->kind != REQ_PUB || mp_uint(m, "offset", &off) != 0) {
                fail_req(c, r, ARQ_EPROTO);
                {
                    proto_violation(c, "malformed puback");
                    return;
                }
            }
            int d = dup && dup->type == MSGPACK_OBJECT_BOOLEAN && dup->via.boolean;
            if (r->pub_cb)
                r->pub_cb(c, 0, off, d, r->arg);
            free(r);
            return;
        }
        uint64_t epoch = 0, first = 0, next = 0;
        if (r->kind != REQ_SUB || mp_uint(m, "epoch", &epoch) || mp_uint(m, "first", &first) ||
            mp_uint(m, "next", &next)) {
            fail_req(c, r, ARQ_EPROTO);
            {
                proto_violation(c, "malformed subok");
                return;
            }
        }
        struct sub *s = r->sub;
        free(r);
        s->active = 1;
        if (s->subok_cb)
            s->subok_cb(c, 0, epoch, first, next, s->arg);
        return;
    }
    if (strcmp(t, "gap") == 0) {
        char *stream = mp_str(m, "stream", z);
        uint64_t from = 0, to = 0;
        if (!stream || mp_uint(m, "from", &from) || mp_uint(m, "to", &to)) {
            proto_violation(c, "malformed gap");
            return;
        }
        if (c->gap_cb && sub_find(c, stream))
            c->gap_cb(c, stream, from, to, c->gap_arg);
        return;
    }
    if (strcmp(t, "error") == 0) {
        char *reason = mp_str(m, "reason", z);
        if (mp_uint(m, "code", &code) != 0 || code < 100 || code > 999)
            code = 500;
        set_error(c, "%s", reason ? reason : arq_strerror(-(int)code));
        struct req *r = mp_uint(m, "id", &id) == 0 ? req_take(c, id) : NULL;
        if (r) {
            fail_req(c, r, -(int)code);
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
        if (c->state != ST_CLOSING)
            set_error(c, "server closed the connection (%u%s%.*s)", arg->status_code,
                      arg->msg_length > 2 ? " " : "",
                      arg->msg_length > 2 ? (int)(arg->msg_length - 2) : 0,
                      arg->msg_length > 2 ? (const char *)arg->msg + 2 : "");
        return;
    }
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
            request_teardown(c, c->state == ST_CLOSING ? ARQ_ECLOSED : ARQ_EPROTO);
        }
        return;
    }
    if (c->teardown_pending)
        return;
    (void)ws_flush(c);
    if (c->close_received) {
        /* wslay queued the close answer; close once it is written. */
        if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
            request_teardown(c, c->state == ST_CLOSING ? ARQ_ECLOSED : ARQ_ECONNLOST);
    }
}

static void bev_read_cb(struct bufferevent *bev, void *arg)
{
    arq_client_t *c = arg;
    enter(c);
    if (c->state == ST_UPGRADE) {
        int rc = read_upgrade(c);
        if (rc < 0) {
            request_teardown(c, rc);
        } else if (rc == 1) {
            rc = start_ws(c);
            if (rc != 0) {
                set_error(c, "out of memory");
                request_teardown(c, rc);
            } else {
                c->state = ST_WELCOME;
                send_hello(c);
            }
        }
    }
    if ((c->state == ST_WELCOME || c->state == ST_READY || c->state == ST_CLOSING) && c->ws &&
        !c->teardown_pending)
        ws_pump(c);
    leave(c);
}

static void bev_write_cb(struct bufferevent *bev, void *arg)
{
    arq_client_t *c = arg;
    enter(c);
    if (c->close_received && !c->teardown_pending)
        request_teardown(c, c->state == ST_CLOSING ? ARQ_ECLOSED : ARQ_ECONNLOST);
    leave(c);
}

static void bev_event_cb(struct bufferevent *bev, short what, void *arg)
{
    arq_client_t *c = arg;
    enter(c);
    if (what & BEV_EVENT_CONNECTED) {
        c->state = ST_UPGRADE;
        if (send_upgrade(c) != 0) {
            set_error(c, "cannot send the upgrade request");
            request_teardown(c, ARQ_ENOMEM);
        }
    } else if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
        int err = EVUTIL_SOCKET_ERROR();
        if (c->state == ST_TCP) {
            set_error(c, "connect to %s:%u: %s", c->host, c->port,
                      evutil_socket_error_to_string(err));
            request_teardown(c, ARQ_ECONNECT);
        } else if (c->state == ST_CLOSING) {
            request_teardown(c, ARQ_ECLOSED);
        } else {
            if (!c->close_received)
                set_error(c, "connection to %s:%u lost: %s", c->host, c->port,
                          (what & BEV_EVENT_EOF) ? "closed by peer"
                                                 : evutil_socket_error_to_string(err));
            request_teardown(c, c->state == ST_UPGRADE ? ARQ_EHANDSHAKE : ARQ_ECONNLOST);
        }
    }
    leave(c);
}

int arq_client_connect(arq_client_t *c, arq_connect_cb cb, void *arg)
{
    if (c->state != ST_IDLE)
        return ARQ_EBUSY;
    c->last_error[0] = '\0';
    c->bev = bufferevent_socket_new(c->base, -1, BEV_OPT_CLOSE_ON_FREE);
    if (!c->bev)
        return ARQ_ENOMEM;
    bufferevent_setcb(c->bev, bev_read_cb, bev_write_cb, bev_event_cb, c);
    if (bufferevent_enable(c->bev, EV_READ | EV_WRITE) != 0) {
        bufferevent_free(c->bev);
        c->bev = NULL;
        return ARQ_ENOMEM;
    }
    c->connect_cb = cb;
    c->connect_arg = arg;
    c->state = ST_TCP;
    arm_timer(c);
    if (bufferevent_socket_connect(c->bev, (struct sockaddr *)&c->addr, sizeof(c->addr)) != 0) {
        /* Immediate failure: reported through the callback, like a refusal. */
        set_error(c, "connect to %s:%u: %s", c->host, c->port,
                  evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
        request_teardown(c, ARQ_ECONNECT);
    }
    return 0;
}

/* ---- requests ------------------------------------------------------------ */

static int valid_stream(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    return n >= 1 && n <= 200;
}

static int ready(arq_client_t *c)
{
    return c->state == ST_READY && !c->teardown_pending;
}

int arq_publish(arq_client_t *c, const char *stream, const void *payload, size_t len,
                const char *msgid, arq_publish_cb cb, void *arg)
{
    if (!valid_stream(stream) || (len && !payload))
        return ARQ_EINVAL;
    if (!ready(c))
        return ARQ_ENOTCONN;
    if (len > c->max_payload)
        return ARQ_ETOOBIG;
    struct req *r = calloc(1, sizeof(*r));
    if (!r)
        return ARQ_ENOMEM;
    r->id = c->next_id++;
    r->kind = REQ_PUB;
    r->pub_cb = cb;
    r->arg = arg;

    msgpack_packer pk;
    c->out.size = 0;
    msgpack_packer_init(&pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, msgid ? 5 : 4);
    pack_kv_str(&pk, "t", "pub");
    pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, r->id);
    pack_kv_str(&pk, "stream", stream);
    pack_str(&pk, "payload");
    msgpack_pack_bin(&pk, len);
    msgpack_pack_bin_body(&pk, payload, len);
    if (msgid)
        pack_kv_str(&pk, "msgid", msgid);
    int rc = ws_send_out(c);
    if (rc != 0) {
        free(r);
        return rc;
    }
    TAILQ_INSERT_TAIL(&c->reqs, r, link);
    return 0;
}

int arq_subscribe(arq_client_t *c, const char *stream, enum arq_from from, uint64_t offset,
                  uint64_t epoch, arq_subok_cb subok_cb, arq_msg_cb msg_cb, void *arg)
{
    if (!valid_stream(stream) || !msg_cb ||
        (from != ARQ_FROM_EARLIEST && from != ARQ_FROM_LATEST && from != ARQ_FROM_OFFSET) ||
        (from == ARQ_FROM_OFFSET && offset == 0))
        return ARQ_EINVAL;
    if (!ready(c))
        return ARQ_ENOTCONN;
    if (sub_find(c, stream))
        return ARQ_EBUSY;
    struct req *r = calloc(1, sizeof(*r));
    struct sub *s = calloc(1, sizeof(*s));
    if (!r || !s || !(s->stream = strdup(stream))) {
        free(r);
        free(s);
        return ARQ_ENOMEM;
    }
    r->id = c->next_id++;
    r->kind = REQ_SUB;
    r->sub = s;
    s->subok_cb = subok_cb;
    s->msg_cb = msg_cb;
    s->arg = arg;

    msgpack_packer pk;
    c->out.size = 0;
    msgpack_packer_init(&pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, epoch == ARQ_EPOCH_ANY ? 4 : 5);
    pack_kv_str(&pk, "t", "sub");
    pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, r->id);
    pack_kv_str(&pk, "stream", stream);
    pack_str(&pk, "from");
    if (from == ARQ_FROM_OFFSET)
        msgpack_pack_uint64(&pk, offset);
    else
        pack_str(&pk, from == ARQ_FROM_EARLIEST ? "earliest" : "latest");
    if (epoch != ARQ_EPOCH_ANY) {
        pack_str(&pk, "epoch");
        msgpack_pack_uint64(&pk, epoch);
    }
    int rc = ws_send_out(c);
    if (rc != 0) {
        free(s->stream);
        free(s);
        free(r);
        return rc;
    }
    LIST_INSERT_HEAD(&c->subs, s, link);
    TAILQ_INSERT_TAIL(&c->reqs, r, link);
    return 0;
}

int arq_ack(arq_client_t *c, const char *stream, uint64_t offset)
{
    if (!valid_stream(stream))
        return ARQ_EINVAL;
    if (!ready(c))
        return ARQ_ENOTCONN;
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

int arq_client_close(arq_client_t *c, arq_close_cb cb, void *arg)
{
    if (c->state == ST_IDLE || c->state == ST_CLOSED || c->state == ST_CLOSING ||
        c->teardown_pending)
        return ARQ_ENOTCONN;
    c->close_cb = cb;
    c->close_arg = arg;
    if (c->state != ST_READY || !c->ws) {
        set_error(c, "closed while connecting");
        request_teardown(c, ARQ_ECLOSED);
        return 0;
    }
    c->state = ST_CLOSING;
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
