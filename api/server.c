/*
 * server.c - connections: HTTP request heads (api/http.h), the WebSocket
 * upgrade, framing (wslay parses what clients send; delivery frames are
 * written here from the broker's shared, reference-counted buffers without
 * a copy), the arq.v1 protocol dispatch (proto/proto.h -> broker), auth, ping
 * and timeouts, /health, /metrics and the server publish API.
 */
#include "server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <jansson.h>
#include <msgpack.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <wslay/wslay.h>

#include "admit.h"
#include "addr.h"
#include "auth.h"
#include "http.h"
#include "log.h"
#include "proto.h"

enum conn_state { C_HTTP, C_BODY, C_WS, C_DONE };

/* Publishes one connection may have waiting for their commit. */
#define MAX_PENDING_PUBS 1024u

typedef struct conn conn_t;

#define SESSION_ID_MAX 64 /* hello.session and resume_token, bytes */

struct api_pub_ctx {
    conn_t *conn; /* NULL once the connection is gone */
};

struct conn {
    api_server_t *srv;
    struct bufferevent *bev;
    enum conn_state state;
    http_request_t req; /* C_BODY: the request whose body we wait for */
    bool have_req;
    struct event *timer;      /* handshake/request deadline */
    struct event *ping_timer; /* periodic ping */
    struct event *pong_timer; /* deadline for the answer */
    wslay_event_context_ptr ws;
    brk_client_t *client;
    bool hello_done;
    bool hold_out; /* a new session's welcome waits until the session is durable */
    bool close_after_write;
    bool kicked;             /* its session was resumed elsewhere: free on the next turn */
    struct api_pub_ctx *pub; /* pending server API publish */
    char peer[64];
    char ip[48]; /* the client's address alone: the owner of its anonymous sessions */
    char session[SESSION_ID_MAX + 1];
    conn_t *prev, *next;
    /* output written directly at the end of the loop turn (flush_cb) */
    bool flush_queued;
    conn_t *flush_prev, *flush_next;
    struct event *rd_ev; /* our read event (the bufferevent never reads) */
    bool reading;
    /* The data message being received. wslay does not buffer data frames
     * (no_buffering): a fragment cost it an allocation of its own, so a
     * message of a million 1-byte fragments cost ~80 MiB. We assemble the
     * message in one buffer whose allocation is what counts against the
     * limits (ws_frame_start_cb). */
    uint8_t *rx;
    size_t rx_len, rx_cap;
    uint32_t rx_frames;
    uint8_t rx_opcode; /* WSLAY_TEXT_FRAME or WSLAY_BINARY_FRAME */
    bool rx_ctrl;      /* the frame being received is a control frame (wslay keeps it) */
    bool rx_over;      /* a limit was exceeded: the rest is dropped, 1009 is on its way */
    bool linger;       /* closing: our FIN is sent, input is drained until the peer's FIN */
    uint8_t addr[16];  /* the client's address (admit.h) */
    bool admitted;     /* counted by s->admit */
    bool admit_later; /* from a trusted proxy: counted by the forwarded address (admit_forwarded) */
    bool overflow;    /* accepted beyond max_connections: /health and /metrics only */
    /* who it is (conn_client_addr) and its token (issue #18) */
    api_addr_t peer_addr;   /* the TCP peer */
    api_addr_t client_addr; /* the peer, or the address a trusted proxy forwarded */
    bool via_proxy;         /* the request carried forwarding headers */
    bool proxy_trusted;     /* ... from a peer in trusted_proxies */
    struct event *expiry_timer;
    int64_t token_expires; /* unix seconds; 0: anonymous */
    char *subject;         /* the token's subject, for refresh */
};

/* Connections beyond max_connections that may still ask /health and
 * /metrics (so that monitoring sees a full server): at most OVERFLOW_PER_ADDR
 * of them per address, each with OVERFLOW_DEADLINE_MS to ask. arqd keeps
 * this many descriptors (and more) free below RLIMIT_NOFILE. */
#define OVERFLOW_SLOTS       16
#define OVERFLOW_PER_ADDR    2
#define OVERFLOW_DEADLINE_MS 1000

/* A log line that may repeat: at most one per RLOG_S, with the count of
 * the ones held back. */
#define RLOG_S 10

struct rlog {
    int64_t last_s;
    uint64_t held;
};

struct api_server {
    struct event_base *base;
    brk_t *brk;
    wal_t *wal;
    api_options_t o;
    struct evconnlistener *lis;
    uint16_t port;
    conn_t *conns;
    size_t n_conns;
    conn_t *flush_head; /* connections with output to write this turn */
    struct event *flush_ev;
    bool shutting_down;
    proto_limits_t limits;
    brk_client_ops_t ops;
    uint64_t rx_bytes;     /* allocated by message assembly buffers, all connections */
    char api_producer[64]; /* the server API's dedup namespace: arq:api:<key id> */
    api_admit_t *admit;
    struct event *tick; /* every second: the admit table's sweep */
    struct event *accept_retry;
    uint32_t accept_backoff_ms;
    struct rlog log_rejected, log_accept_err, log_hello;
    uint64_t rejected_addr, rejected_rate, rejected_overflow, accept_errors, hello_timeouts;
    conn_t *ovf[OVERFLOW_SLOTS]; /* the overflow connections */
    /* counters for /metrics */
    uint64_t conns_total, ws_total, http_requests, errors_protocol, errors_auth, errors_handshake,
        errors_timeout, errors_limit, errors_origin, rejected_full, rx_rejected;
    /* issue #18: address rules, parsed from o.trusted_proxies / o.monitor_allow */
    api_cidr_t *trusted, *monitor;
    size_t n_trusted, n_monitor;
    uint64_t tokens_expired, token_refreshes, monitor_denied;
    time_t takeover_logged; /* log_takeover: the last line, and what it did not say */
    uint64_t takeovers_unlogged;
};

static void conn_free(conn_t *c);
static int ws_flush(conn_t *c);
static int conn_verify_token(api_server_t *s, const proto_bytes_t *token, auth_token_t *ret);
static bool bearer_ok(const http_request_t *r, const char *secret);
static void conn_token_taken(conn_t *c, const auth_token_t *tok);
static void handle_refresh(conn_t *c, const proto_msg_t *m);
static void log_takeover(conn_t *c);

static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* 1 if a line of this kind may be logged now; *ret_held: lines held back
 * since the last one (logged as "held"). */
static int rlog_ok(struct rlog *r, uint64_t *ret_held)
{
    int64_t now = mono_us() / 1000000;
    if (r->last_s && now - r->last_s < RLOG_S) {
        r->held++;
        return 0;
    }
    *ret_held = r->held;
    r->held = 0;
    r->last_s = now ? now : 1;
    return 1;
}

/* ---- helpers ----------------------------------------------------------- */

static void random_hex(char *out, size_t bytes)
{
    uint8_t buf[32];
    if (bytes > sizeof(buf))
        bytes = sizeof(buf);
    if (getrandom(buf, bytes, 0) != (ssize_t)bytes)
        for (size_t i = 0; i < bytes; i++)
            buf[i] = (uint8_t)rand();
    for (size_t i = 0; i < bytes; i++)
        snprintf(out + 2 * i, 3, "%02x", buf[i]);
}

static struct timeval ms_tv(uint32_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};
    return tv;
}

static void http_reply(conn_t *c, int code, const char *reason, const char *ctype, const char *body,
                       size_t len)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    evbuffer_add_printf(out,
                        "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                        "Connection: close\r\nCache-Control: no-store\r\n\r\n",
                        code, reason, ctype, len);
    if (len)
        evbuffer_add(out, body, len);
    c->state = C_DONE;
    c->close_after_write = true;
}

static void http_error(conn_t *c, int code, const char *reason, const char *msg)
{
    char body[256];
    int n = snprintf(body, sizeof(body), "{\"error\":\"%s\"}", msg);
    http_reply(c, code, reason, "application/json", body, (size_t)n);
}

/* ---- frames to clients ------------------------------------------------- */

static void frame_cleanup(const void *data, size_t len, void *arg)
{
    (void)data;
    (void)len;
    brk_frame_unref(arg);
}

/* One binary message, written without a copy of the shared frame. wslay
 * never holds a partial frame (our send callback takes everything), so
 * writing beside it keeps the stream of frames intact. */
/* Frames up to this size are copied into the output buffer: cheaper than a
 * reference chain (an allocation and a cleanup call) for a few hundred
 * bytes, and they coalesce into one writev segment. */
#define SMALL_FRAME 1024

/* The header of an unmasked binary frame of len bytes; returns its size. */
static size_t ws_binary_header(uint8_t hdr[10], size_t len)
{
    hdr[0] = 0x82; /* FIN, binary */
    if (len < 126) {
        hdr[1] = (uint8_t)len;
        return 2;
    }
    if (len <= 0xffff) {
        hdr[1] = 126;
        hdr[2] = (uint8_t)(len >> 8);
        hdr[3] = (uint8_t)len;
        return 4;
    }
    hdr[1] = 127;
    for (int i = 0; i < 8; i++)
        hdr[2 + i] = (uint8_t)((uint64_t)len >> (8 * (7 - i)));
    return 10;
}

static void conn_send_bytes(void *connp, const void *data, size_t len)
{
    conn_t *c = connp;
    if (c->state != C_WS || wslay_event_get_close_sent(c->ws))
        return;
    uint8_t buf[10 + SMALL_FRAME];
    size_t hl = ws_binary_header(buf, len);
    struct evbuffer *out = bufferevent_get_output(c->bev);
    if (len <= SMALL_FRAME) {
        memcpy(buf + hl, data, len);
        evbuffer_add(out, buf, hl + len);
    } else {
        evbuffer_add(out, buf, hl);
        evbuffer_add(out, data, len);
    }
}

static void conn_send(void *connp, brk_frame_t *f)
{
    conn_t *c = connp;
    if (c->state != C_WS || wslay_event_get_close_sent(c->ws))
        return;
    if (f->len <= SMALL_FRAME) {
        conn_send_bytes(connp, f->data, f->len);
        return;
    }
    uint8_t hdr[10];
    size_t hl = ws_binary_header(hdr, f->len);
    struct evbuffer *out = bufferevent_get_output(c->bev);
    evbuffer_add(out, hdr, hl);
    brk_frame_ref(f);
    if (evbuffer_add_reference(out, f->data, f->len, frame_cleanup, f) != 0)
        brk_frame_unref(f);
}

static size_t conn_out_pending(void *connp)
{
    conn_t *c = connp;
    return evbuffer_get_length(bufferevent_get_output(c->bev));
}

/*
 * Input. The bufferevent's own read side stays disabled: its evbuffer_read
 * asks the kernel how much is readable (an ioctl FIONREAD) before every
 * read, a third syscall per publish. Our read event reads into the same
 * input buffer with one readv and runs the same callbacks.
 */
static void conn_read_off(conn_t *c)
{
    if (c->reading) {
        event_del(c->rd_ev);
        c->reading = false;
    }
}

static void conn_read_on(conn_t *c)
{
    if (!c->reading) {
        event_add(c->rd_ev, NULL);
        c->reading = true;
    }
}

/* Backpressure: stop reading a connection whose output is above the high
 * watermark or that has too many publishes waiting for their commit; a
 * client that never reads cannot make the server buffer without bound. */
static void conn_update_reading(conn_t *c)
{
    if (c->state != C_WS)
        return;
    bool full = evbuffer_get_length(bufferevent_get_output(c->bev)) > c->srv->o.max_output_bytes ||
                (c->client && brk_client_pending(c->client) >= MAX_PENDING_PUBS);
    if (full)
        conn_read_off(c);
    else if (!c->reading) {
        conn_read_on(c);
        /* Bytes that arrived meanwhile are already in the input buffer:
         * handle them on the next turn (not inside this call). */
        if (evbuffer_get_length(bufferevent_get_input(c->bev)))
            event_active(c->rd_ev, EV_READ, 0);
    }
}

static void conn_on_drain(void *connp)
{
    conn_update_reading(connp);
}

static void send_pb(conn_t *c, proto_buf_t *pb)
{
    if (!pb->len)
        return;
    brk_frame_t *f = malloc(sizeof(*f) + pb->len);
    if (!f)
        return;
    f->refs = 1;
    f->len = pb->len;
    memcpy(f->data, pb->data, pb->len);
    conn_send(c, f);
    brk_frame_unref(f);
}

/* Queue a close frame. Never frees the connection (it may run inside a
 * wslay callback); the caller's ws_flush sends it. */
static void ws_close(conn_t *c, uint16_t code, const char *reason)
{
    if (c->state != C_WS)
        return;
    wslay_event_queue_close(c->ws, code, (const uint8_t *)reason, strlen(reason));
}

static void send_error_close(conn_t *c, int code, const char *reason, uint16_t close_code)
{
    proto_buf_t pb = {0};
    if (proto_enc_error(&pb, 0, code, reason) == 0)
        send_pb(c, &pb);
    proto_buf_free(&pb);
    ws_close(c, close_code, reason);
}

/* ---- wslay callbacks --------------------------------------------------- */

static ssize_t ws_recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                          void *user)
{
    (void)flags;
    conn_t *c = user;
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
    (void)flags;
    conn_t *c = user;
    if (evbuffer_add(bufferevent_get_output(c->bev), data, len) != 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return (ssize_t)len;
}

static int utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t b = s[i];
        size_t k;
        uint32_t cp;
        if (b < 0x80) {
            i++;
            continue;
        } else if ((b & 0xe0) == 0xc0) {
            k = 1;
            cp = b & 0x1f;
        } else if ((b & 0xf0) == 0xe0) {
            k = 2;
            cp = b & 0x0f;
        } else if ((b & 0xf8) == 0xf0) {
            k = 3;
            cp = b & 0x07;
        } else {
            return 0;
        }
        for (size_t j = 1; j <= k; j++) {
            if (i + j >= n || (s[i + j] & 0xc0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
            cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += k + 1;
    }
    return 1;
}

/* Session ids and resume tokens we accept back: what we hand out (hex), at
 * most SESSION_ID_MAX bytes of [A-Za-z0-9_-]. */
static bool session_str_ok(const proto_bytes_t *b)
{
    if (b->len == 0 || b->len > SESSION_ID_MAX)
        return false;
    for (size_t i = 0; i < b->len; i++) {
        uint8_t ch = b->ptr[i];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
              ch == '_' || ch == '-'))
            return false;
    }
    return true;
}

/* The WAL keeps only a digest of a resume token. */
static void token_digest(const void *token, size_t len, uint8_t out[32])
{
    unsigned int n = 32;
    if (!EVP_Digest(token, len, out, &n, EVP_sha256(), NULL))
        memset(out, 0, 32);
}

struct welcome_subs {
    proto_resumed_sub_t *v;
    size_t n, cap;
};

static void welcome_sub_cb(const char *stream, size_t len, uint64_t epoch, uint64_t acked,
                           uint64_t next, void *arg)
{
    struct welcome_subs *ws = arg;
    if (ws->n == ws->cap) {
        size_t ncap = ws->cap ? ws->cap * 2 : 8;
        proto_resumed_sub_t *nv = realloc(ws->v, ncap * sizeof(*nv));
        if (!nv)
            return;
        ws->v = nv;
        ws->cap = ncap;
    }
    ws->v[ws->n++] = (proto_resumed_sub_t){stream, len, epoch, acked, next};
}

static void handle_hello(conn_t *c, const proto_msg_t *m)
{
    api_server_t *s = c->srv;
    const char *producer = NULL;
    char *const *pub = NULL, *const *subs = NULL;
    size_t n_pub = (size_t)-1, n_subs = (size_t)-1;
    auth_token_t tok = {0};
    bool have_tok = false;
    if (!s->o.anonymous) {
        if (!m->token.len) {
            s->errors_auth++;
            send_error_close(c, PROTO_CODE_UNAUTHORIZED, "token required", 1008);
            return;
        }
        int rc = conn_verify_token(s, &m->token, &tok);
        if (rc != AUTH_OK) {
            s->errors_auth++;
            arq_log(ARQ_LOG_INFO, "auth_failed", "peer", c->peer, "reason", auth_strerror(rc),
                    NULL);
            send_error_close(c, PROTO_CODE_UNAUTHORIZED, "invalid token", 1008);
            return;
        }
        have_tok = true;
        producer = tok.subject;
        pub = tok.pub;
        n_pub = tok.n_pub;
        subs = tok.subs;
        n_subs = tok.n_subs;
    }
    const char *owner = have_tok && tok.subject ? tok.subject : "";
    if ((m->session.len || m->resume_token.len) &&
        (!session_str_ok(&m->session) || !session_str_ok(&m->resume_token))) {
        /* A resume the client meant but cannot have: say so rather than
         * start a new session it would take for its own. */
        if (have_tok)
            auth_token_free(&tok);
        s->errors_protocol++;
        send_error_close(c, PROTO_CODE_BAD_REQUEST,
                         !m->session.len || !m->resume_token.len
                             ? "session and resume_token go together"
                             : "session and resume_token are 1-64 bytes of [A-Za-z0-9_-]",
                         1008);
        return;
    }
    /* Resume the session the client names, or start the one we drew. */
    char resume[SESSION_ID_MAX + 1];
    uint8_t digest[32];
    bool resumed = false;
    if (session_str_ok(&m->session) && session_str_ok(&m->resume_token)) {
        char want[SESSION_ID_MAX + 1];
        memcpy(want, m->session.ptr, m->session.len);
        want[m->session.len] = 0;
        token_digest(m->resume_token.ptr, m->resume_token.len, digest);
        if (brk_session_resumable(s->brk, want, owner, digest, sizeof(digest))) {
            resumed = true;
            memcpy(c->session, want, m->session.len + 1);
            memcpy(resume, m->resume_token.ptr, m->resume_token.len);
            resume[m->resume_token.len] = 0;
        }
    }
    if (!resumed) {
        random_hex(resume, 16);
        token_digest(resume, strlen(resume), digest);
    }
    char anon[sizeof(AUTH_RESERVED_PREFIX "session:") + SESSION_ID_MAX];
    if (!producer) {
        /* anonymous: the session is the dedup namespace, in arq:'s */
        snprintf(anon, sizeof(anon), AUTH_RESERVED_PREFIX "session:%s", c->session);
        producer = anon;
    }
    int rc = brk_client_new(s->brk, &s->ops, c, c->session, producer, pub, n_pub, subs, n_subs,
                            &c->client);
    bool ephemeral = false;
    if (rc) {
        rc = WAL_ENOMEM;
    } else if (resumed) {
        (void)brk_session_resume(c->client, owner, digest, sizeof(digest));
    } else if (wal_state_now(s->wal) != WAL_STATE_OK) {
        /* The WAL refuses writes (storage full or stopped): a session it
         * cannot store lasts this connection only, so that readers are
         * still served; the welcome says so ("durable": false). */
        ephemeral = true;
        brk_client_ephemeral(c->client);
    } else {
        rc = brk_session_create(c->client, owner, c->ip, digest, sizeof(digest));
    }
    if (have_tok && !rc)
        conn_token_taken(c, &tok);
    if (have_tok)
        auth_token_free(&tok);
    if (rc == BRK_ESESSION_RATE || rc == BRK_ESESSION_LIMIT) {
        s->errors_limit++;
        send_error_close(c, PROTO_CODE_LIMIT,
                         rc == BRK_ESESSION_RATE ? "new sessions too fast"
                                                 : "too many sessions held open",
                         rc == BRK_ESESSION_RATE ? 1013 : 1008);
        return;
    }
    if (rc) {
        int code;
        const char *why;
        brk_refusal(rc, &code, &why);
        if (rc == WAL_ENOMEM)
            why = "out of memory";
        send_error_close(c, code, why, code == PROTO_CODE_UNAVAILABLE ? 1013 : 1011);
        return;
    }
    c->hello_done = true;
    event_del(c->timer); /* the hello deadline */
    /* A new session's welcome (and whatever follows it) stays in the output
     * until the session is durable (conn_session_durable): a resume token
     * the client holds must survive a crash of arqd. */
    c->hold_out = !resumed && !ephemeral;
    struct welcome_subs ws = {0};
    if (resumed)
        brk_client_subs(c->client, welcome_sub_cb, &ws);
    proto_welcome_t w = {.session = c->session,
                         .resume_token = resume,
                         .server = s->o.version,
                         .max_payload = s->o.max_message_bytes,
                         .max_inflight = s->o.max_inflight,
                         .session_ttl_s = s->o.session_ttl_s ? s->o.session_ttl_s : 86400,
                         .resumed = resumed,
                         .ephemeral = ephemeral,
                         .subs = ws.v,
                         .n_subs = ws.n,
                         .token_expires = (uint64_t)c->token_expires};
    proto_buf_t pb = {0};
    if (proto_enc_welcome(&pb, &w) == 0)
        send_pb(c, &pb);
    proto_buf_free(&pb);
    free(ws.v);
    arq_log(ARQ_LOG_DEBUG, "hello", "peer", c->peer, "session", c->session, "resumed",
            resumed ? "true" : "false", "durable", ephemeral ? "false" : "true", NULL);
    brk_client_start(c->client);
}

static void handle_binary(conn_t *c, const uint8_t *data, size_t len)
{
    api_server_t *s = c->srv;
    proto_msg_t m;
    int rc = proto_decode(data, len, &s->limits, &m);
    if (rc != PROTO_OK) {
        s->errors_protocol++;
        int code = rc == PROTO_ELIMIT ? PROTO_CODE_TOO_LARGE : PROTO_CODE_BAD_REQUEST;
        proto_buf_t pb = {0};
        /* A request whose id was read is refused with it (nack); the rest
         * (ack, hello, unreadable) with an error. */
        bool request =
            c->hello_done && (m.type == PROTO_SUB || m.type == PROTO_UNSUB || m.type == PROTO_PUB);
        if ((request ? proto_enc_nack(&pb, m.id, code, m.error)
                     : proto_enc_error(&pb, 0, code, m.error)) == 0)
            send_pb(c, &pb);
        proto_buf_free(&pb);
        if (!c->hello_done)
            ws_close(c, 1008, "hello expected");
        return;
    }
    if (!c->hello_done) {
        if (m.type != PROTO_HELLO) {
            s->errors_protocol++;
            send_error_close(c, PROTO_CODE_BAD_REQUEST, "hello expected", 1008);
        } else {
            handle_hello(c, &m);
        }
        proto_msg_free(&m);
        return;
    }
    switch (m.type) {
    case PROTO_HELLO: {
        proto_buf_t pb = {0};
        if (proto_enc_error(&pb, 0, PROTO_CODE_BAD_REQUEST, "hello already done") == 0)
            send_pb(c, &pb);
        proto_buf_free(&pb);
        break;
    }
    case PROTO_PUB:
        brk_publish(c->client, m.id, m.stream.ptr, m.stream.len, m.payload.ptr, m.payload.len,
                    m.msgid.ptr, m.msgid.len, m.headers_raw.ptr, m.headers_raw.len,
                    m.ack == PROTO_ACK_REPLICATED ? BRK_ACK_REPLICATED
                    : m.ack == PROTO_ACK_LOCAL    ? BRK_ACK_LOCAL
                                                  : BRK_ACK_DEFAULT);
        break;
    case PROTO_SUB:
        brk_subscribe(c->client, m.id, m.stream.ptr, m.stream.len, (int)m.from, m.offset, m.epoch);
        break;
    case PROTO_UNSUB:
        brk_unsubscribe(c->client, m.id, m.stream.ptr, m.stream.len);
        break;
    case PROTO_ACK:
        brk_ack(c->client, m.stream.ptr, m.stream.len, m.offset);
        break;
    case PROTO_REFRESH:
        handle_refresh(c, &m);
        break;
    }
    proto_msg_free(&m);
}

static void pong_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    conn_t *c = arg;
    if (c->kicked) {
        /* the 4001 close goes out first: the write callback frees it */
        if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
            conn_free(c);
        return;
    }
    bool our_backlog =
        c->client && brk_client_pending(c->client) >= MAX_PENDING_PUBS &&
        evbuffer_get_length(bufferevent_get_output(c->bev)) <= c->srv->o.max_output_bytes;
    if (our_backlog) {
        /* We stopped reading while its publishes wait for commits: the pong
         * may be in our own input. Wait again rather than blame the peer. */
        struct timeval tv = ms_tv(c->srv->o.pong_timeout_ms);
        event_add(c->pong_timer, &tv);
        return;
    }
    c->srv->errors_timeout++;
    arq_log(ARQ_LOG_INFO, "ping_timeout", "peer", c->peer, NULL);
    conn_free(c); /* unresponsive: no close handshake */
}

/* ---- message assembly ---------------------------------------------------- */

/* A buffer larger than this is freed after its message: an idle connection
 * keeps at most this much. */
#define RX_KEEP (64u << 10)

static void rx_release(conn_t *c)
{
    c->srv->rx_bytes -= c->rx_cap;
    free(c->rx);
    c->rx = NULL;
    c->rx_cap = c->rx_len = 0;
}

/* The message broke a limit: refuse it with 1009 and stop reading (the
 * connection lingers: see conn_linger). */
static void rx_refuse(conn_t *c, wslay_event_context_ptr ctx, const char *why)
{
    c->rx_over = true;
    c->srv->rx_rejected++;
    c->srv->errors_limit++;
    rx_release(c);
    arq_log(ARQ_LOG_DEBUG, "message_refused", "peer", c->peer, "reason", why, NULL);
    ws_close(c, 1009, why);
    wslay_event_shutdown_read(ctx);
}

static void ws_frame_start_cb(wslay_event_context_ptr ctx,
                              const struct wslay_event_on_frame_recv_start_arg *arg, void *user)
{
    conn_t *c = user;
    api_server_t *s = c->srv;
    c->rx_ctrl = (arg->opcode & 0x8) != 0;
    if (c->rx_ctrl)
        return; /* at most 125 bytes, buffered by wslay */
    if (arg->opcode != WSLAY_CONTINUATION_FRAME) {
        c->rx_opcode = arg->opcode;
        c->rx_len = 0;
        c->rx_frames = 0;
        c->rx_over = false;
    }
    if (c->rx_over)
        return;
    if (++c->rx_frames > s->o.max_fragments)
        rx_refuse(c, ctx, "too many fragments");
    else if (arg->payload_length > s->o.max_frame_bytes - c->rx_len)
        rx_refuse(c, ctx, "message too big");
}

static void ws_frame_chunk_cb(wslay_event_context_ptr ctx,
                              const struct wslay_event_on_frame_recv_chunk_arg *arg, void *user)
{
    conn_t *c = user;
    if (c->rx_ctrl || c->rx_over || arg->data_length == 0)
        return;
    size_t need = c->rx_len + arg->data_length; /* <= max_frame_bytes (frame start) */
    if (need > c->rx_cap) {
        size_t ncap = c->rx_cap ? c->rx_cap * 2 : 4096;
        if (ncap < need)
            ncap = need;
        if (ncap > c->srv->o.max_frame_bytes)
            ncap = c->srv->o.max_frame_bytes;
        uint8_t *nb = realloc(c->rx, ncap);
        if (!nb) {
            rx_refuse(c, ctx, "out of memory");
            return;
        }
        c->srv->rx_bytes += ncap - c->rx_cap;
        c->rx = nb;
        c->rx_cap = ncap;
    }
    memcpy(c->rx + c->rx_len, arg->data, arg->data_length);
    c->rx_len += arg->data_length;
}

static void ws_msg_cb(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                      void *user)
{
    (void)ctx;
    conn_t *c = user;
    switch (arg->opcode) {
    case WSLAY_BINARY_FRAME:
        if (!c->rx_over)
            handle_binary(c, c->rx, c->rx_len);
        c->rx_len = 0;
        if (c->rx_cap > RX_KEEP)
            rx_release(c);
        break;
    case WSLAY_TEXT_FRAME:
        c->srv->errors_protocol++;
        if (c->rx_over)
            break;
        if (!utf8_valid(c->rx, c->rx_len))
            ws_close(c, 1007, "invalid utf-8");
        else
            ws_close(c, 1003, "binary frames only");
        rx_release(c);
        break;
    case WSLAY_PONG:
        event_del(c->pong_timer);
        break;
    case WSLAY_CONNECTION_CLOSE: {
        /* RFC 6455 7.4: a close payload is empty or a valid code plus a
         * UTF-8 reason. Our close goes first; wslay then sends no echo. */
        uint16_t code = arg->status_code;
        bool valid_code = (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1011) ||
                          (code >= 3000 && code <= 4999);
        if (arg->msg_length == 1 || (arg->msg_length >= 2 && !valid_code)) {
            c->srv->errors_protocol++;
            ws_close(c, 1002, "invalid close frame");
        } else if (arg->msg_length > 2 && !utf8_valid(arg->msg + 2, arg->msg_length - 2)) {
            c->srv->errors_protocol++;
            ws_close(c, 1007, "invalid utf-8 in close reason");
        }
        break;
    }
    default:
        break; /* ping answered by wslay; close handled by wslay */
    }
}

/* How long a closing connection drains what the peer still sends. */
#define LINGER_MS 2000

/*
 * Our side is done: the close frame or the HTTP answer is written. Closing
 * the socket now would answer whatever the peer is still sending (the rest
 * of an oversized message, a request body) with a RST, which can destroy
 * our last bytes before the peer reads them: a client saw 1006 instead of
 * the 1009 we sent. So: send our FIN, read and drop input until the peer's
 * FIN or LINGER_MS, then free (event_cb, deadline_cb). Returns 1 if the
 * connection was freed.
 */
static int conn_finish(conn_t *c)
{
    if (c->linger)
        return 0;
    if (c->kicked) {
        conn_free(c);
        return 1;
    }
    c->linger = true;
    c->state = C_DONE;
    c->close_after_write = false;
    if (c->client) {
        brk_client_close(c->client); /* its acks are written now */
        c->client = NULL;
    }
    if (c->ping_timer)
        event_del(c->ping_timer);
    if (c->pong_timer)
        event_del(c->pong_timer);
    (void)shutdown(bufferevent_getfd(c->bev), SHUT_WR);
    conn_read_on(c);
    struct timeval tv = ms_tv(LINGER_MS);
    event_add(c->timer, &tv);
    return 0;
}

/* Send what wslay queued. Returns 1 if the connection was freed. */
static int ws_flush(conn_t *c)
{
    if (wslay_event_want_write(c->ws))
        wslay_event_send(c->ws);
    if (!wslay_event_want_read(c->ws) && !wslay_event_want_write(c->ws)) {
        /* Close handshake done (or failed): finish once the output is out. */
        c->close_after_write = true;
        if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
            return conn_finish(c);
    }
    return 0;
}

/* Feed what arrived to wslay, then send what it queued, then apply
 * backpressure. */
static void ws_recv(conn_t *c)
{
    int rc = wslay_event_recv(c->ws);
    if (rc == WSLAY_ERR_NOMEM) {
        conn_free(c);
        return;
    }
    if (rc != 0) {
        /* wslay 1.1 reports bad framing (a control frame over 125 bytes, a
         * fragmented ping, a 1-byte close...) as a callback failure and
         * stops writing; our callbacks do not fail, so it is the peer's
         * protocol error: send 1002 ourselves, then close. */
        c->srv->errors_protocol++;
        if (!wslay_event_get_close_sent(c->ws)) {
            static const uint8_t close1002[] = {0x88, 0x02, 0x03, 0xea};
            evbuffer_add(bufferevent_get_output(c->bev), close1002, sizeof(close1002));
        }
        c->close_after_write = true;
        c->state = C_DONE;
        if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
            conn_finish(c);
        return;
    }
    if (!ws_flush(c))
        conn_update_reading(c);
}

static void ping_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    conn_t *c = arg;
    if (c->state != C_WS || event_pending(c->pong_timer, EV_TIMEOUT, NULL))
        return;
    struct wslay_event_msg msg = {WSLAY_PING, NULL, 0};
    wslay_event_queue_msg(c->ws, &msg);
    struct timeval tv = ms_tv(c->srv->o.pong_timeout_ms);
    event_add(c->pong_timer, &tv);
    ws_flush(c);
}

/* ---- connections ------------------------------------------------------- */

/*
 * Output. A connection's bufferevent keeps EV_WRITE disabled while its
 * output is empty: whatever is added during a loop turn is written with one
 * writev at the end of the turn (flush_cb), and only a remainder (a full
 * socket buffer) enables EV_WRITE until it drains. Letting the bufferevent
 * schedule every write instead costs two epoll_ctl calls per reply on top
 * of the writev — at 50 publishers x 1 in flight, 40% of arqd's syscalls.
 */
static void write_cb(struct bufferevent *bev, void *arg);

static void flush_unlink(conn_t *c)
{
    if (!c->flush_queued)
        return;
    if (c->flush_prev)
        c->flush_prev->flush_next = c->flush_next;
    else
        c->srv->flush_head = c->flush_next;
    if (c->flush_next)
        c->flush_next->flush_prev = c->flush_prev;
    c->flush_prev = c->flush_next = NULL;
    c->flush_queued = false;
}

static void queue_flush(conn_t *c)
{
    if (c->flush_queued || (bufferevent_get_enabled(c->bev) & EV_WRITE))
        return;
    api_server_t *s = c->srv;
    if (!s->flush_head)
        event_active(s->flush_ev, EV_WRITE, 0);
    c->flush_queued = true;
    c->flush_prev = NULL;
    c->flush_next = s->flush_head;
    if (s->flush_head)
        s->flush_head->flush_prev = c;
    s->flush_head = c;
}

static void out_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
    (void)buf;
    if (info->n_added)
        queue_flush(arg);
}

static void conn_flush(conn_t *c)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    if (c->hold_out || evbuffer_get_length(out) == 0 ||
        (bufferevent_get_enabled(c->bev) & EV_WRITE))
        return;
    /* A socket bufferevent freezes its output's start; its own write path
     * unfreezes it around the write, and so do we. */
    evbuffer_unfreeze(out, 1);
    int n = evbuffer_write(out, bufferevent_getfd(c->bev));
    evbuffer_freeze(out, 1);
    if (evbuffer_get_length(out) > 0 || n < 0) {
        /* The rest (or the error, which the bufferevent reports through
         * event_cb) is the bufferevent's. */
        bufferevent_enable(c->bev, EV_WRITE);
        return;
    }
    write_cb(c->bev, c); /* drained: as the bufferevent would call it */
}

static void flush_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    api_server_t *s = arg;
    while (s->flush_head) {
        conn_t *c = s->flush_head;
        flush_unlink(c);
        conn_flush(c); /* may free c, queue others */
    }
}

static void conn_free(conn_t *c)
{
    api_server_t *s = c->srv;
    flush_unlink(c);
    if (c->client)
        brk_client_close(c->client);
    if (c->pub)
        c->pub->conn = NULL;
    if (c->ws)
        wslay_event_context_free(c->ws);
    rx_release(c);
    if (c->admitted)
        api_admit_release(s->admit, c->addr);
    if (c->overflow)
        for (int i = 0; i < OVERFLOW_SLOTS; i++)
            if (s->ovf[i] == c)
                s->ovf[i] = NULL;
    if (c->have_req)
        http_request_free(&c->req);
    if (c->timer)
        event_free(c->timer);
    if (c->ping_timer)
        event_free(c->ping_timer);
    if (c->pong_timer)
        event_free(c->pong_timer);
    if (c->expiry_timer)
        event_free(c->expiry_timer);
    free(c->subject);
    event_free(c->rd_ev);
    bufferevent_free(c->bev);
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->n_conns--;
    arq_log(ARQ_LOG_DEBUG, "conn_close", "peer", c->peer, NULL);
    free(c);
}

/*
 * A browser names the page that opens a WebSocket or posts to us in
 * Origin. With auth.origins, only those pages; without, only our own
 * origin (the page was served by the same host:port as the request's Host:
 * "https://h" and Host "h" match): any other page the user visits must not
 * use the broker on the user's behalf. Requests without Origin are not from
 * a page's script and pass.
 */
static bool origin_allowed(const api_server_t *s, const http_request_t *req)
{
    const char *origin = http_header_get(req, "Origin");
    if (!origin)
        return true;
    if (s->o.n_origins) {
        for (size_t i = 0; i < s->o.n_origins; i++)
            if (strcmp(origin, s->o.origins[i]) == 0)
                return true;
        return false;
    }
    const char *host = http_header_get(req, "Host");
    const char *sep = strstr(origin, "://");
    return host && sep && strcasecmp(sep + 3, host) == 0;
}

/* With server.hosts, only requests naming one of them in Host are served
 * (a DNS-rebinding page reaches us under a name of its own). */
static bool host_allowed(const api_server_t *s, const http_request_t *req)
{
    if (!s->o.n_hosts)
        return true;
    const char *host = http_header_get(req, "Host");
    for (size_t i = 0; host && i < s->o.n_hosts; i++)
        if (strcasecmp(host, s->o.hosts[i]) == 0)
            return true;
    return false;
}

static void upgrade(conn_t *c, const http_request_t *req)
{
    api_server_t *s = c->srv;
    char accept[29];
    const char *why = NULL;
    int hrc = http_ws_check(req, accept, &why);
    if (hrc == HTTP_ENOMEM) {
        http_error(c, 500, "Internal Server Error", "handshake failed");
        return;
    }
    if (hrc != HTTP_OK) {
        s->errors_handshake++;
        http_error(c, 400, "Bad Request", why ? why : "bad websocket handshake");
        return;
    }
    if (!http_ws_offers_protocol(req, "arq.v1")) {
        s->errors_handshake++;
        http_error(c, 400, "Bad Request", "subprotocol arq.v1 required");
        return;
    }
    if (!origin_allowed(s, req)) {
        s->errors_origin++;
        http_error(c, 403, "Forbidden", "origin not allowed");
        return;
    }
    struct wslay_event_callbacks cbs = {ws_recv_cb,        ws_send_cb, NULL,     ws_frame_start_cb,
                                        ws_frame_chunk_cb, NULL,       ws_msg_cb};
    if (wslay_event_context_server_init(&c->ws, &cbs, c) != 0) {
        http_error(c, 500, "Internal Server Error", "out of memory");
        return;
    }
    /* Data messages are assembled by ws_frame_*_cb; wslay checks each frame
     * against the limit, we check the message. */
    wslay_event_config_set_no_buffering(c->ws, 1);
    wslay_event_config_set_max_recv_msg_length(c->ws, s->o.max_frame_bytes);
    evbuffer_add_printf(bufferevent_get_output(c->bev),
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n"
                        "Sec-WebSocket-Protocol: arq.v1\r\n\r\n",
                        accept);
    c->state = C_WS;
    /* hello must follow within hello_timeout_ms: a connection that answers
     * pings but never says hello would hold its slot for ever */
    struct timeval htv = ms_tv(s->o.hello_timeout_ms);
    event_add(c->timer, &htv);
    random_hex(c->session, 16);
    s->ws_total++;
    c->ping_timer = event_new(s->base, -1, EV_PERSIST, ping_cb, c);
    c->pong_timer = evtimer_new(s->base, pong_timeout_cb, c);
    if (c->ping_timer) {
        struct timeval tv = ms_tv(s->o.ping_interval_ms);
        event_add(c->ping_timer, &tv);
    }
    arq_log(ARQ_LOG_DEBUG, "ws_open", "peer", c->peer, "session", c->session, NULL);
}

/* The new session of this connection is durable (status 0): its welcome may
 * go. If it could not be stored, the welcome (and anything queued after it)
 * is dropped unsent and the client is refused. */
static void conn_session_durable(void *conn, int status)
{
    conn_t *c = conn;
    if (!c->hold_out)
        return;
    c->hold_out = false;
    if (status != 0) {
        struct evbuffer *out = bufferevent_get_output(c->bev);
        evbuffer_unfreeze(out, 1); /* as in conn_flush */
        evbuffer_drain(out, evbuffer_get_length(out));
        evbuffer_freeze(out, 1);
        arq_log(ARQ_LOG_WARN, "session_not_stored", "peer", c->peer, "reason", wal_strerror(status),
                NULL);
        send_error_close(c, PROTO_CODE_UNAVAILABLE, "session could not be stored", 1013);
    }
    queue_flush(c);
}

/* The broker gave this connection's session to another one: say so with
 * close code 4001 and drop the connection on the next loop turn (never
 * inside the broker's call). */
static void conn_kick(void *conn)
{
    conn_t *c = conn;
    if (c->kicked)
        return;
    c->kicked = true;
    log_takeover(c);
    if (c->state == C_WS && c->ws) {
        ws_close(c, 4001, "session resumed elsewhere");
        if (wslay_event_want_write(c->ws))
            wslay_event_send(c->ws);
    }
    conn_read_off(c);
    c->close_after_write = true;
    /* a dead peer may never take the close: give it a pong timeout */
    struct timeval wtv = ms_tv(c->srv->o.pong_timeout_ms);
    bufferevent_set_timeouts(c->bev, NULL, &wtv);
    if (c->ping_timer)
        event_del(c->ping_timer);
    if (c->pong_timer) {
        event_del(c->pong_timer);
        event_active(c->pong_timer, EV_TIMEOUT, 0);
    }
}

static void write_metrics(api_server_t *s, struct evbuffer *b);
static void write_health(api_server_t *s, struct evbuffer *b, int *code);

static void api_pub_done(int status, uint64_t offset, int dup, void *arg)
{
    struct api_pub_ctx *p = arg;
    conn_t *c = p->conn;
    free(p);
    if (!c)
        return;
    c->pub = NULL;
    char body[160];
    int n;
    if (status == 0) {
        n = snprintf(body, sizeof(body), "{\"offset\":%llu,\"duplicate\":%s}",
                     (unsigned long long)offset, dup ? "true" : "false");
        http_reply(c, 200, "OK", "application/json", body, (size_t)n);
    } else {
        int code;
        const char *reason;
        brk_refusal(status, &code, &reason);
        http_error(c, code == 400 ? 400 : 503, code == 400 ? "Bad Request" : "Service Unavailable",
                   reason);
    }
    bufferevent_enable(c->bev, EV_WRITE);
}

static int b64_decode(const char *in, size_t len, uint8_t **out, size_t *out_len)
{
    if (len % 4)
        return -1;
    uint8_t *buf = malloc(len / 4 * 3 + 1);
    if (!buf)
        return -1;
    int n = len ? EVP_DecodeBlock(buf, (const unsigned char *)in, (int)len) : 0;
    if (n < 0) {
        free(buf);
        return -1;
    }
    if (len >= 1 && in[len - 1] == '=')
        n--;
    if (len >= 2 && in[len - 2] == '=')
        n--;
    *out = buf;
    *out_len = (size_t)n;
    return 0;
}

static void api_publish(conn_t *c, const char *body, size_t len)
{
    api_server_t *s = c->srv;
    if (s->o.api_key) {
        if (!bearer_ok(&c->req, s->o.api_key)) {
            s->errors_auth++;
            http_error(c, 401, "Unauthorized", "api key required");
            return;
        }
    } else if (!s->o.api_open) {
        http_error(c, 403, "Forbidden",
                   "server API disabled: set auth.api_key (or auth.api_open = true)");
        return;
    }
    json_error_t jerr;
    json_t *j = json_loadb(body, len, 0, &jerr);
    const char *stream = j ? json_string_value(json_object_get(j, "stream")) : NULL;
    json_t *jp = j ? json_object_get(j, "payload") : NULL;
    json_t *jb = j ? json_object_get(j, "payload_base64") : NULL;
    json_t *jm = j ? json_object_get(j, "msgid") : NULL;
    json_t *jh = j ? json_object_get(j, "headers") : NULL;
    json_t *ja = j ? json_object_get(j, "ack") : NULL;
    const char *ack_s = json_string_value(ja);
    int ack = !ja                                         ? BRK_ACK_DEFAULT
              : ack_s && strcmp(ack_s, "local") == 0      ? BRK_ACK_LOCAL
              : ack_s && strcmp(ack_s, "replicated") == 0 ? BRK_ACK_REPLICATED
                                                          : -2;
    uint8_t *payload = NULL;
    size_t payload_len = 0;
    bool ok = j && json_is_object(j) && stream && (json_is_string(jp) ^ json_is_string(jb)) &&
              (!jm || json_is_string(jm)) && (!jh || json_is_object(jh)) && ack != -2;
    if (ok && json_is_string(jb))
        ok = b64_decode(json_string_value(jb), json_string_length(jb), &payload, &payload_len) == 0;
    msgpack_sbuffer hb;
    msgpack_sbuffer_init(&hb);
    /* the limits a WebSocket pub's headers have (docs/protocol.md) */
    uint32_t max_h = s->limits.max_headers ? s->limits.max_headers : 32;
    uint32_t max_hb = s->limits.max_header_bytes ? s->limits.max_header_bytes : 8192;
    size_t hbytes = 0;
    if (ok && jh) {
        const char *k;
        json_t *v;
        json_object_foreach(jh, k, v)
        {
            hbytes += strlen(k) + (json_is_string(v) ? json_string_length(v) : 0);
        }
    }
    if (ok && jh && (json_object_size(jh) > max_h || hbytes > max_hb)) {
        http_error(c, 413, "Payload Too Large", "headers over their limits (32 entries, 8 KiB)");
        msgpack_sbuffer_destroy(&hb);
        free(payload);
        json_decref(j);
        return;
    }
    if (ok && jh && json_object_size(jh) > 0) {
        msgpack_packer pk;
        msgpack_packer_init(&pk, &hb, msgpack_sbuffer_write);
        msgpack_pack_map(&pk, json_object_size(jh));
        const char *k;
        json_t *v;
        json_object_foreach(jh, k, v)
        {
            if (!json_is_string(v)) {
                ok = false;
                break;
            }
            size_t kl = strlen(k);
            msgpack_pack_str(&pk, kl);
            msgpack_pack_str_body(&pk, k, kl);
            msgpack_pack_str(&pk, json_string_length(v));
            msgpack_pack_str_body(&pk, json_string_value(v), json_string_length(v));
        }
    }
    if (!ok) {
        http_error(c, 400, "Bad Request",
                   "expected JSON {stream, payload | payload_base64, msgid?, headers?, "
                   "ack? (\"local\" | \"replicated\")}");
    } else {
        const uint8_t *pay = payload ? payload : (const uint8_t *)json_string_value(jp);
        size_t pl = payload ? payload_len : json_string_length(jp);
        struct api_pub_ctx *p = calloc(1, sizeof(*p));
        int rc = p ? brk_publish_api(s->brk, s->api_producer, stream, strlen(stream), pay, pl,
                                     jm ? (const uint8_t *)json_string_value(jm) : NULL,
                                     jm ? json_string_length(jm) : 0, (const uint8_t *)hb.data,
                                     hb.size, ack, api_pub_done, p)
                   : WAL_ENOMEM;
        if (rc) {
            free(p);
            int code;
            const char *reason;
            brk_refusal(rc, &code, &reason);
            if (rc == WAL_EINVAL)
                http_error(c, pl > s->o.max_message_bytes ? 413 : 400,
                           pl > s->o.max_message_bytes ? "Payload Too Large" : "Bad Request",
                           "invalid stream name, payload or msgid");
            else if (code == 400)
                http_error(c, 400, "Bad Request", reason);
            else
                http_error(c, 503, "Service Unavailable", reason);
        } else {
            p->conn = c;
            c->pub = p;
            c->state = C_DONE; /* answered by api_pub_done */
        }
    }
    msgpack_sbuffer_destroy(&hb);
    free(payload);
    json_decref(j);
}

static bool monitor_allowed(conn_t *c, const http_request_t *r);
static void write_health_brief(api_server_t *s, struct evbuffer *b, int *code);
static void conn_set_forwarded(conn_t *c, const http_request_t *r);

/*
 * A connection from a trusted proxy, now that its request head told who the
 * client is: the per-address limits apply to that address (the proxy's own
 * when it forwarded none). Refused: 429 to the proxy, which tells its
 * client. Returns whether the request goes on.
 */
static bool admit_forwarded(conn_t *c)
{
    api_server_t *s = c->srv;
    const api_addr_t *a = &c->client_addr;
    uint8_t key[16];
    if (a->family == 4) {
        uint32_t be;
        memcpy(&be, a->bytes, 4);
        api_admit_addr4(be, key);
    } else {
        api_admit_addr6(a->bytes, key);
    }
    c->admit_later = false;
    int counted = 0;
    enum api_admit_verdict v = api_admit_take(s->admit, key, mono_us(), &counted);
    if (v != API_ADMIT_OK) {
        if (v == API_ADMIT_TOO_MANY)
            s->rejected_addr++;
        else
            s->rejected_rate++;
        uint64_t held;
        if (rlog_ok(&s->log_rejected, &held)) {
            char h[24];
            snprintf(h, sizeof(h), "%llu", (unsigned long long)held);
            arq_log(ARQ_LOG_WARN, "connection_refused", "reason",
                    v == API_ADMIT_TOO_MANY ? "address_limit" : "address_rate", "address", c->ip,
                    "via", "trusted proxy", "held", h, NULL);
        }
        http_error(c, 429, "Too Many Requests", "too many connections from this client address");
        return false;
    }
    memcpy(c->addr, key, sizeof(key));
    c->admitted = counted;
    return true;
}

static void route(conn_t *c)
{
    api_server_t *s = c->srv;
    http_request_t *r = &c->req;
    s->http_requests++;
    const char *path = r->target;
    size_t plen = strcspn(path, "?");
    bool get = strcmp(r->method, "GET") == 0 || strcmp(r->method, "HEAD") == 0;
    bool monitoring = (plen == 7 && memcmp(path, "/health", 7) == 0) ||
                      (plen == 8 && memcmp(path, "/metrics", 8) == 0);
    if (c->overflow && !monitoring) {
        http_error(c, 503, "Service Unavailable", "too many connections");
        return;
    }
    if (!host_allowed(s, r)) {
        s->errors_origin++;
        http_error(c, 421, "Misdirected Request", "host not served here");
        return;
    }
    if (plen == 3 && memcmp(path, "/ws", 3) == 0 && strcmp(r->method, "GET") == 0) {
        upgrade(c, r);
    } else if (plen == 7 && memcmp(path, "/health", 7) == 0 && get) {
        struct evbuffer *b = evbuffer_new();
        int code = 200;
        if (monitor_allowed(c, r))
            write_health(s, b, &code);
        else
            write_health_brief(s, b, &code);
        size_t n = evbuffer_get_length(b);
        char *body = malloc(n + 1);
        evbuffer_remove(b, body, n);
        http_reply(c, code, code == 200 ? "OK" : "Service Unavailable", "application/json", body,
                   strcmp(r->method, "HEAD") == 0 ? 0 : n);
        free(body);
        evbuffer_free(b);
    } else if (plen == 8 && memcmp(path, "/metrics", 8) == 0 && get) {
        if (!monitor_allowed(c, r)) {
            s->monitor_denied++;
            http_error(c, 403, "Forbidden",
                       "metrics: not an allowed address (server.monitor_allow) and no valid "
                       "server.monitor_token");
            return;
        }
        struct evbuffer *b = evbuffer_new();
        write_metrics(s, b);
        size_t n = evbuffer_get_length(b);
        char *body = malloc(n + 1);
        evbuffer_remove(b, body, n);
        http_reply(c, 200, "OK", "text/plain; version=0.0.4", body,
                   strcmp(r->method, "HEAD") == 0 ? 0 : n);
        free(body);
        evbuffer_free(b);
    } else if (plen == 12 && memcmp(path, "/api/publish", 12) == 0) {
        if (strcmp(r->method, "POST") != 0) {
            http_error(c, 405, "Method Not Allowed", "use POST");
            return;
        }
        /* JSON only: a page can post text/plain (a "simple" request) to any
         * site without a CORS preflight; application/json needs one, which
         * we never grant */
        const char *ct = http_header_get(r, "Content-Type");
        size_t ctl = ct ? strcspn(ct, "; \t") : 0;
        if (!ct || ctl != 16 || strncasecmp(ct, "application/json", 16) != 0) {
            http_error(c, 415, "Unsupported Media Type", "Content-Type: application/json required");
            return;
        }
        if (!origin_allowed(s, r)) {
            s->errors_origin++;
            http_error(c, 403, "Forbidden", "origin not allowed");
            return;
        }
        if (r->content_length > (uint64_t)s->o.max_message_bytes * 2 + 65536) {
            s->errors_limit++;
            http_error(c, 413, "Payload Too Large", "body too large");
            return;
        }
        c->state = C_BODY;
        return;
    } else {
        http_error(c, 404, "Not Found", "not found");
    }
}

static void read_http(conn_t *c)
{
    api_server_t *s = c->srv;
    struct evbuffer *in = bufferevent_get_input(c->bev);
    if (c->state == C_HTTP) {
        size_t len = evbuffer_get_length(in);
        size_t take = len < s->o.max_header_bytes ? len : s->o.max_header_bytes;
        const char *data = (const char *)evbuffer_pullup(in, (ev_ssize_t)take);
        int rc = http_parse_request(data, take, s->o.max_header_bytes, &c->req);
        if (rc == HTTP_EAGAIN)
            return;
        if (rc != HTTP_OK) {
            s->errors_handshake++;
            switch (rc) {
            case HTTP_ETOOBIG:
                http_error(c, 431, "Request Header Fields Too Large", "request head too large");
                break;
            case HTTP_EMETHOD:
                http_error(c, 405, "Method Not Allowed", "method not allowed");
                break;
            case HTTP_EVERSION:
                http_error(c, 505, "HTTP Version Not Supported", "HTTP/1.1 required");
                break;
            case HTTP_ELENGTH:
                http_error(c, 411, "Length Required",
                           "a request body needs Content-Length (no Transfer-Encoding)");
                break;
            default:
                http_error(c, 400, "Bad Request", "malformed request");
            }
            return;
        }
        c->have_req = true;
        evbuffer_drain(in, c->req.head_len);
        conn_set_forwarded(c, &c->req);
        if (c->admit_later && !admit_forwarded(c))
            return;
        route(c);
    }
    if (c->state == C_BODY) {
        size_t need = (size_t)c->req.content_length;
        if (evbuffer_get_length(in) < need)
            return;
        const char *body = (const char *)evbuffer_pullup(in, (ev_ssize_t)need);
        event_del(c->timer);
        api_publish(c, body ? body : "", need);
        evbuffer_drain(in, need);
    }
    if (c->state == C_WS && evbuffer_get_length(in) > 0)
        ws_recv(c);
}

static void read_cb(struct bufferevent *bev, void *arg)
{
    (void)bev;
    conn_t *c = arg;
    if (c->state == C_WS) {
        ws_recv(c);
        return;
    }
    if (c->state == C_DONE) {
        evbuffer_drain(bufferevent_get_input(c->bev),
                       evbuffer_get_length(bufferevent_get_input(c->bev)));
        return;
    }
    read_http(c);
}

static void write_cb(struct bufferevent *bev, void *arg)
{
    conn_t *c = arg;
    if (evbuffer_get_length(bufferevent_get_output(bev)) == 0) {
        if (c->close_after_write) {
            conn_finish(c);
            return;
        }
        bufferevent_disable(bev, EV_WRITE); /* direct writes again (flush_cb) */
    }
    if (c->state == C_WS && c->client)
        brk_client_writable(c->client);
    conn_update_reading(c);
}

static void event_cb(struct bufferevent *bev, short what, void *arg)
{
    (void)bev;
    conn_t *c = arg;
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT))
        conn_free(c);
}

#define READ_CHUNK 16384

static void sock_read_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    conn_t *c = arg;
    struct evbuffer *in = bufferevent_get_input(c->bev);
    struct evbuffer_iovec v[2];
    struct iovec iov[2];
    /* the bufferevent freezes its input's end; unfreeze around the read as
     * its own read path does */
    evbuffer_unfreeze(in, 0);
    int nv = evbuffer_reserve_space(in, READ_CHUNK, v, 2);
    ssize_t n = -1;
    int err = ENOMEM;
    if (nv > 0) {
        for (int i = 0; i < nv; i++) {
            iov[i].iov_base = v[i].iov_base;
            iov[i].iov_len = v[i].iov_len;
        }
        n = readv(fd, iov, nv);
        err = errno;
        size_t left = n > 0 ? (size_t)n : 0;
        for (int i = 0; i < nv; i++) {
            size_t take = left < v[i].iov_len ? left : v[i].iov_len;
            v[i].iov_len = take;
            left -= take;
        }
        evbuffer_commit_space(in, v, nv);
    }
    evbuffer_freeze(in, 0);
    if (n == 0) {
        event_cb(c->bev, BEV_EVENT_READING | BEV_EVENT_EOF, c);
        return;
    }
    if (n < 0 && err != EAGAIN && err != EWOULDBLOCK && err != EINTR) {
        event_cb(c->bev, BEV_EVENT_READING | BEV_EVENT_ERROR, c);
        return;
    }
    if (evbuffer_get_length(in))
        read_cb(c->bev, c);
}

static void deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    conn_t *c = arg;
    api_server_t *s = c->srv;
    if (c->linger) {
        conn_free(c);
        return;
    }
    s->errors_timeout++;
    if (c->state == C_WS && !c->hello_done) {
        s->hello_timeouts++;
        uint64_t held;
        if (rlog_ok(&s->log_hello, &held)) {
            char h[24];
            snprintf(h, sizeof(h), "%llu", (unsigned long long)held);
            arq_log(ARQ_LOG_INFO, "hello_timeout", "peer", c->peer, "held", h, NULL);
        }
        send_error_close(c, PROTO_CODE_BAD_REQUEST, "no hello in time", 1008);
        ws_flush(c);
        return;
    }
    arq_log(ARQ_LOG_DEBUG, "handshake_timeout", "peer", c->peer, NULL);
    conn_free(c);
}

static void conn_peer_init(conn_t *c, const struct sockaddr *sa);

static void accept_cb(struct evconnlistener *lis, evutil_socket_t fd, struct sockaddr *sa,
                      int salen, void *arg)
{
    (void)lis;
    (void)salen;
    api_server_t *s = arg;
    s->accept_backoff_ms = 0;
    bool overflow = s->n_conns >= s->o.max_connections;
    uint8_t addr[16] = {0};
    if (sa->sa_family == AF_INET)
        api_admit_addr4(((struct sockaddr_in *)sa)->sin_addr.s_addr, addr);
    else if (sa->sa_family == AF_INET6)
        api_admit_addr6(((struct sockaddr_in6 *)sa)->sin6_addr.s6_addr, addr);
    int counted = 0, slot = -1;
    enum api_admit_verdict v = API_ADMIT_OK;
    /* A trusted proxy carries many clients: they are counted by the address
     * it forwards, once the request head is read (admit_forwarded). */
    api_addr_t peer;
    conn_t probe = {.srv = s};
    conn_peer_init(&probe, sa);
    peer = probe.peer_addr;
    bool later = !overflow && api_cidr_match(s->trusted, s->n_trusted, &peer);
    if (!overflow && !later) {
        v = api_admit_take(s->admit, addr, mono_us(), &counted);
    } else if (overflow) {
        int same = 0;
        for (int i = 0; i < OVERFLOW_SLOTS; i++) {
            if (!s->ovf[i])
                slot = slot < 0 ? i : slot;
            else if (memcmp(s->ovf[i]->addr, addr, sizeof(addr)) == 0)
                same++;
        }
        if (same >= OVERFLOW_PER_ADDR)
            slot = -1;
    }
    if (s->shutting_down || v != API_ADMIT_OK || (overflow && slot < 0)) {
        const char *why = v == API_ADMIT_TOO_MANY   ? "address_limit"
                          : v == API_ADMIT_TOO_FAST ? "address_rate"
                                                    : "max_connections";
        if (v == API_ADMIT_TOO_MANY)
            s->rejected_addr++;
        else if (v == API_ADMIT_TOO_FAST)
            s->rejected_rate++;
        else if (!s->shutting_down)
            s->rejected_full++;
        uint64_t held;
        if (!s->shutting_down && rlog_ok(&s->log_rejected, &held)) {
            char ip[INET6_ADDRSTRLEN] = "?", h[24];
            if (sa->sa_family == AF_INET)
                inet_ntop(AF_INET, &((struct sockaddr_in *)sa)->sin_addr, ip, sizeof(ip));
            else if (sa->sa_family == AF_INET6)
                inet_ntop(AF_INET6, &((struct sockaddr_in6 *)sa)->sin6_addr, ip, sizeof(ip));
            snprintf(h, sizeof(h), "%llu", (unsigned long long)held);
            arq_log(ARQ_LOG_WARN, "connection_refused", "reason", why, "address", ip, "held", h,
                    NULL);
        }
        evutil_closesocket(fd);
        return;
    }
    conn_t *c = calloc(1, sizeof(*c));
    if (!c) {
        if (counted)
            api_admit_release(s->admit, addr);
        evutil_closesocket(fd);
        return;
    }
    memcpy(c->addr, addr, sizeof(addr));
    c->admitted = counted;
    c->admit_later = later;
    c->overflow = overflow;
    if (overflow) {
        s->rejected_overflow++;
        s->ovf[slot] = c;
    }
    c->srv = s;
    c->bev = bufferevent_socket_new(s->base, fd, BEV_OPT_CLOSE_ON_FREE);
    c->timer = evtimer_new(s->base, deadline_cb, c);
    c->rd_ev = event_new(s->base, fd, EV_READ | EV_PERSIST, sock_read_cb, c);
    if (!c->bev || !c->timer || !c->rd_ev) {
        if (c->bev)
            bufferevent_free(c->bev);
        else
            evutil_closesocket(fd);
        if (c->timer)
            event_free(c->timer);
        if (c->rd_ev)
            event_free(c->rd_ev);
        free(c);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (sa->sa_family == AF_INET) {
        struct sockaddr_in *in4 = (struct sockaddr_in *)sa;
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &in4->sin_addr, ip, sizeof(ip));
        snprintf(c->peer, sizeof(c->peer), "%s:%u", ip, ntohs(in4->sin_port));
        snprintf(c->ip, sizeof(c->ip), "%s", ip);
    }
    conn_peer_init(c, sa);
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    s->n_conns++;
    s->conns_total++;
    bufferevent_setcb(c->bev, read_cb, write_cb, event_cb, c);
    bufferevent_setwatermark(c->bev, EV_WRITE, s->o.max_output_bytes / 2, 0);
    evbuffer_add_cb(bufferevent_get_output(c->bev), out_cb, c);
    bufferevent_disable(c->bev, EV_WRITE); /* enabled by default: see flush_cb */
    conn_read_on(c);                       /* our read event: see sock_read_cb */
    uint32_t deadline = s->o.handshake_timeout_ms;
    if (overflow && deadline > OVERFLOW_DEADLINE_MS)
        deadline = OVERFLOW_DEADLINE_MS;
    struct timeval tv = ms_tv(deadline);
    event_add(c->timer, &tv);
}

/* ---- health and metrics ------------------------------------------------ */

static const char *wal_state_name(enum wal_state st)
{
    return st == WAL_STATE_OK ? "ok" : st == WAL_STATE_FULL ? "full" : "failed";
}

/* A JSON string of text (quotes, backslashes and control bytes escaped;
 * UTF-8 passes through). */
static void json_text(struct evbuffer *b, const char *text)
{
    evbuffer_add(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
        if (*p == '"' || *p == '\\')
            evbuffer_add_printf(b, "\\%c", *p);
        else if (*p < 0x20)
            evbuffer_add_printf(b, "\\u%04x", *p);
        else
            evbuffer_add(b, p, 1);
    }
    evbuffer_add(b, "\"", 1);
}

/*
 * 200 "healthy"; 200 "degraded" while the WAL refuses publishes for lack of
 * space (arqd still serves readers, and recovers by itself when there is
 * room: a load balancer should keep it); 503 "unhealthy" once the WAL
 * stopped after an I/O error (restart and follow the runbook).
 */
static void write_health(api_server_t *s, struct evbuffer *b, int *code)
{
    wal_stats_t ws;
    int rc = wal_stats_get(s->wal, &ws);
    wal_state_info_t st;
    wal_state_get(s->wal, &st);
    bool failed = st.state == WAL_STATE_FAILED;
    bool repl_down = brk_replication_down(s->brk);
    *code = failed || rc ? 503 : 200;
    const char *status = *code != 200                              ? "unhealthy"
                         : st.state == WAL_STATE_FULL || repl_down ? "degraded"
                                                                   : "healthy";
    evbuffer_add_printf(b, "{\"status\":\"%s\",", status);
    if (st.state == WAL_STATE_OK && !rc && repl_down) {
        evbuffer_add_printf(b, "\"reason\":\"replication unavailable: wal.ack = replicated "
                               "publishes are refused until MySQL sync works\",");
    } else if (st.state != WAL_STATE_OK) {
        evbuffer_add_printf(b, "\"reason\":");
        char why[WAL_STATE_REASON_MAX + 40];
        snprintf(why, sizeof(why), "%s: %s", failed ? "wal stopped" : "storage full", st.reason);
        json_text(b, why);
        evbuffer_add_printf(b, ",");
    } else if (rc) {
        evbuffer_add_printf(b, "\"reason\":\"wal unreadable\",");
    }
    evbuffer_add_printf(b,
                        "\"version\":\"%s\",\"connections\":%zu,"
                        "\"wal\":{\"ok\":%s,\"state\":\"%s\",",
                        s->o.version, s->n_conns, st.state == WAL_STATE_OK ? "true" : "false",
                        wal_state_name(st.state));
    if (st.state != WAL_STATE_OK) {
        evbuffer_add_printf(b, "\"reason\":");
        json_text(b, st.reason);
        evbuffer_add_printf(b, ",\"since_us\":%lld,", (long long)st.since_us);
    }
    evbuffer_add_printf(b,
                        "\"first_seq\":%llu,\"next_seq\":%llu,"
                        "\"map_bytes\":%llu,\"used_bytes\":%llu,\"commits\":%llu,"
                        "\"disk_free_bytes\":%llu,\"disk_bytes\":%llu},"
                        "\"sync\":",
                        (unsigned long long)ws.first_seq, (unsigned long long)ws.next_seq,
                        (unsigned long long)ws.map_size, (unsigned long long)ws.used_bytes,
                        (unsigned long long)ws.commits, (unsigned long long)st.disk_free_bytes,
                        (unsigned long long)st.disk_total_bytes);
    if (s->o.health_sync)
        s->o.health_sync(s->o.extra_arg, b);
    else
        evbuffer_add_printf(b, "{\"state\":\"disabled\"}");
    evbuffer_add_printf(b, "}");
}

static void metric(struct evbuffer *b, const char *name, const char *type, const char *help,
                   unsigned long long v)
{
    evbuffer_add_printf(b, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", name, help, name, type, name,
                        v);
}

static void histogram(struct evbuffer *b, const char *name, const char *help,
                      const uint64_t *buckets, const uint64_t *bounds, double scale,
                      unsigned long long sum_raw, int has_sum)
{
    evbuffer_add_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < WAL_HIST_BUCKETS; i++) {
        cum += buckets[i];
        if (i < WAL_HIST_BUCKETS - 1)
            evbuffer_add_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, (double)bounds[i] * scale,
                                (unsigned long long)cum);
        else
            evbuffer_add_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)cum);
    }
    if (has_sum)
        evbuffer_add_printf(b, "%s_sum %g\n", name, (double)sum_raw * scale);
    evbuffer_add_printf(b, "%s_count %llu\n", name, (unsigned long long)cum);
}

static void write_metrics_deploy(api_server_t *s, struct evbuffer *b);

static void write_metrics(api_server_t *s, struct evbuffer *b)
{
    brk_stats_t bs;
    brk_stats_get(s->brk, &bs);
    wal_stats_t ws = {0};
    (void)wal_stats_get(s->wal, &ws);
    metric(b, "arq_connections", "gauge", "Open connections.", s->n_conns);
    metric(b, "arq_connections_total", "counter", "Accepted connections.", s->conns_total);
    metric(b, "arq_websocket_sessions_total", "counter", "Completed WebSocket upgrades.",
           s->ws_total);
    metric(b, "arq_http_requests_total", "counter", "HTTP requests parsed.", s->http_requests);
    metric(b, "arq_publishes_total", "counter", "Messages appended.", bs.publishes);
    metric(b, "arq_publish_duplicates_total", "counter", "Publishes answered from dedup.",
           bs.publish_dups);
    metric(b, "arq_deliveries_total", "counter", "Messages delivered.", bs.deliveries);
    metric(b, "arq_delivered_bytes_total", "counter", "Encoded bytes delivered.",
           bs.delivered_bytes);
    metric(b, "arq_acks_total", "counter", "Acks received.", bs.acks);
    metric(b, "arq_catchup_reads_total", "counter", "WAL reads for subscribers behind the tail.",
           bs.catchup_reads);
    metric(b, "arq_gaps_total", "counter", "Gap reports sent.", bs.gaps);
    metric(b, "arq_subscriptions", "gauge", "Active subscriptions.", bs.subscriptions);
    metric(b, "arq_cursors_persisted_total", "counter",
           "Acked offsets handed to the WAL as durable cursors.", bs.cursors_persisted);
    metric(b, "arq_cursor_commits_total", "counter", "Committed cursor requests.",
           bs.cursor_commits);
    metric(b, "arq_cursor_errors_total", "counter", "Cursor requests that failed.",
           bs.cursor_errors);
    metric(b, "arq_sessions_live", "gauge", "Durable sessions held by a connection now.",
           bs.sessions_live);
    metric(b, "arq_sessions_created_total", "counter", "New sessions.", bs.sessions_created);
    metric(b, "arq_sessions_resumed_total", "counter", "Sessions resumed by a new connection.",
           bs.sessions_resumed);
    metric(b, "arq_sessions_taken_over_total", "counter",
           "Connections closed (4001) because their session was resumed elsewhere.",
           bs.sessions_taken_over);
    metric(b, "arq_sessions_expired_total", "counter", "Sessions deleted after their TTL.",
           bs.sessions_expired);
    metric(b, "arq_sessions_evicted_total", "counter",
           "Sessions deleted to make room for their owner's new one (limits.max_sessions_per_*).",
           bs.sessions_evicted);
    metric(b, "arq_sessions_refused_total", "counter",
           "New sessions refused: the owner's rate, or its limit with every session held open.",
           bs.sessions_refused);
    metric(b, "arq_cold_reads_total", "counter",
           "Catch-up reads served from MySQL (offsets the WAL no longer holds).", bs.cold_reads);
    metric(b, "arq_cold_records_total", "counter", "Records delivered from MySQL.",
           bs.cold_records);
    metric(b, "arq_cold_errors_total", "counter", "Cold-tier reads that failed (retried).",
           bs.cold_errors);
    metric(b, "arq_read_errors_total", "counter",
           "Subscriptions stopped because a record could not be read (corrupt).", bs.read_errors);
    metric(b, "arq_streams", "gauge", "Streams known to the broker.", bs.streams);
    metric(b, "arq_streams_evicted_total", "counter",
           "Idle streams without subscribers freed (read back from the WAL when used).",
           bs.streams_evicted);
    metric(b, "arq_tail_cache_bytes", "gauge",
           "Frames held in all streams' tail caches (bounded by limits.tail_cache_bytes).",
           bs.cache_bytes);
    metric(b, "arq_tail_cache_evictions_total", "counter",
           "Frames dropped from tail caches to stay within limits.tail_cache_bytes.",
           bs.cache_evictions);
    evbuffer_add_printf(b, "# HELP arq_connections_refused_total Connections closed at accept, "
                           "by reason.\n# TYPE arq_connections_refused_total counter\n");
    struct {
        const char *reason;
        uint64_t v;
    } refused[] = {{"max_connections", s->rejected_full},
                   {"address_limit", s->rejected_addr},
                   {"address_rate", s->rejected_rate}};
    for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++)
        evbuffer_add_printf(b, "arq_connections_refused_total{reason=\"%s\"} %llu\n",
                            refused[i].reason, (unsigned long long)refused[i].v);
    metric(b, "arq_connections_overflow_total", "counter",
           "Connections accepted beyond max_connections for /health and /metrics only.",
           s->rejected_overflow);
    metric(b, "arq_connection_addresses", "gauge", "Client addresses with connections open.",
           api_admit_connected(s->admit));
    metric(b, "arq_accept_errors_total", "counter",
           "accept() failures (EMFILE and the like pause accepting for a moment).",
           s->accept_errors);
    metric(b, "arq_hello_timeouts_total", "counter",
           "WebSocket connections closed for sending no hello in server.hello_timeout_ms.",
           s->hello_timeouts);
    metric(b, "arq_ws_messages_refused_total", "counter",
           "WebSocket messages refused (close 1009) for their size or fragment count.",
           s->rx_rejected);
    metric(b, "arq_ws_assembly_bytes", "gauge",
           "Memory held by connections' message assembly buffers.", s->rx_bytes);
    evbuffer_add_printf(b, "# HELP arq_errors_total Errors by kind.\n"
                           "# TYPE arq_errors_total counter\n");
    struct {
        const char *kind;
        uint64_t v;
    } errs[] = {{"publish", bs.publish_errors}, {"protocol", s->errors_protocol},
                {"auth", s->errors_auth},       {"handshake", s->errors_handshake},
                {"timeout", s->errors_timeout}, {"limit", s->errors_limit},
                {"origin", s->errors_origin},   {"connection_limit", s->rejected_full}};
    for (size_t i = 0; i < sizeof(errs) / sizeof(errs[0]); i++)
        evbuffer_add_printf(b, "arq_errors_total{kind=\"%s\"} %llu\n", errs[i].kind,
                            (unsigned long long)errs[i].v);
    metric(b, "arq_wal_commits_total", "counter",
           "WAL group commits (durable points: journal entries or direct LMDB commits).",
           ws.commits);
    metric(b, "arq_wal_folds_total", "counter", "LMDB commits (journal folds included).",
           ws.applies);
    evbuffer_add_printf(b,
                        "# HELP arq_wal_fold_seconds_total Time spent in LMDB commits (folds).\n"
                        "# TYPE arq_wal_fold_seconds_total counter\n"
                        "arq_wal_fold_seconds_total %.6f\n",
                        (double)ws.apply_us_sum * 1e-6);
    metric(b, "arq_wal_journal", "gauge", "1: group commits go through the journal.",
           (uint64_t)ws.journal);
    metric(b, "arq_wal_journal_recovered_entries", "gauge",
           "Journal entries folded into LMDB when the WAL was opened.", ws.recovered_entries);
    metric(b, "arq_wal_committed_messages_total", "counter", "Messages in WAL commits.",
           ws.committed_msgs);
    metric(b, "arq_wal_failed_commits_total", "counter", "WAL batches that failed.",
           ws.failed_commits);
    wal_state_info_t wst;
    wal_state_get(s->wal, &wst);
    evbuffer_add_printf(b, "# HELP arq_wal_state 1 for the WAL's state: ok, full (publishes "
                           "refused for lack of space), failed (stopped after an I/O error).\n"
                           "# TYPE arq_wal_state gauge\n");
    for (int i = WAL_STATE_OK; i <= WAL_STATE_FAILED; i++)
        evbuffer_add_printf(b, "arq_wal_state{state=\"%s\"} %d\n",
                            wal_state_name((enum wal_state)i), (int)wst.state == i);
    metric(b, "arq_wal_state_changes_total", "counter", "Changes of arq_wal_state.", wst.changes);
    metric(b, "arq_wal_disk_free_bytes", "gauge",
           "Free space on the WAL's filesystem (for unprivileged users).", wst.disk_free_bytes);
    metric(b, "arq_wal_disk_bytes", "gauge", "Size of the WAL's filesystem.", wst.disk_total_bytes);
    metric(b, "arq_wal_preallocated", "gauge",
           "1: data.mdb's disk blocks are allocated ahead of the map (a full disk is told from "
           "an I/O error).",
           (uint64_t)wst.preallocated);
    metric(b, "arq_wal_map_bytes", "gauge", "LMDB map size.", ws.map_size);
    metric(b, "arq_wal_used_bytes", "gauge", "LMDB pages in use (high-water mark).", ws.used_bytes);
    metric(b, "arq_wal_next_seq", "gauge", "Next WAL sequence.", ws.next_seq);
    histogram(b, "arq_wal_commit_seconds", "WAL group commit latency, batch start to durable.",
              ws.commit_us_buckets, wal_commit_us_bounds, 1e-6, ws.commit_us_sum, 1);
    histogram(b, "arq_wal_batch_messages", "Messages per WAL commit.", ws.batch_buckets,
              wal_batch_bounds, 1.0, 0, 0);
    histogram(b, "arq_publish_seconds",
              "Acknowledged publishes: decoded to puback queued (inside arqd).", bs.pub_total_us,
              brk_pub_us_bounds, 1e-6, bs.pub_total_us_sum, 1);
    histogram(b, "arq_publish_wait_seconds",
              "Acknowledged publishes: decoded to taken into a WAL batch by the writer.",
              bs.pub_wait_us, brk_pub_us_bounds, 1e-6, bs.pub_wait_us_sum, 1);
    histogram(b, "arq_publish_dispatch_seconds",
              "Acknowledged publishes: WAL batch durable to its completion run on the event "
              "loop.",
              bs.pub_dispatch_us, brk_pub_us_bounds, 1e-6, bs.pub_dispatch_us_sum, 1);
    histogram(b, "arq_publish_replicated_seconds",
              "ack = replicated publishes: decoded to puback queued, MySQL's commit included.",
              bs.pub_repl_us, brk_pub_us_bounds, 1e-6, bs.pub_repl_us_sum, 1);
    metric(b, "arq_publish_replicated_total", "counter",
           "ack = replicated publishes answered once MySQL committed them.", bs.repl_acked);
    metric(b, "arq_publish_replication_refused_total", "counter",
           "ack = replicated publishes refused before appending (replication unavailable).",
           bs.repl_refused);
    metric(b, "arq_publish_replication_timeouts_total", "counter",
           "ack = replicated publishes appended but not in MySQL within wal.ack_timeout_ms.",
           bs.repl_timeouts);
    metric(b, "arq_publish_replication_waiting", "gauge",
           "ack = replicated publishes waiting for MySQL now.", bs.repl_waiting);
    metric(b, "arq_deliveries_held_for_replication", "gauge",
           "wal.ack = replicated: records committed here whose delivery waits for MySQL.",
           bs.repl_held);
    write_metrics_deploy(s, b);
    if (s->o.metrics_extra)
        s->o.metrics_extra(s->o.extra_arg, b);
}

/* ---- lifecycle --------------------------------------------------------- */

static void tick_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    api_server_t *s = arg;
    api_admit_sweep(s->admit, mono_us());
}

static void accept_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    api_server_t *s = arg;
    if (s->lis && !s->shutting_down)
        evconnlistener_enable(s->lis);
}

/*
 * accept() failed. Out of descriptors (EMFILE, ENFILE) or memory, the
 * pending connection stays in the queue and the listener would fire again
 * at once, for ever (100% CPU and a log line each time): stop accepting for
 * a while (50 ms doubling to 1 s while it lasts), log once per RLOG_S.
 */
static void accept_error_cb(struct evconnlistener *lis, void *arg)
{
    api_server_t *s = arg;
    int err = EVUTIL_SOCKET_ERROR();
    s->accept_errors++;
    if (err != EMFILE && err != ENFILE && err != ENOBUFS && err != ENOMEM)
        return; /* the peer gave up (ECONNABORTED...): nothing to wait for */
    evconnlistener_disable(lis);
    s->accept_backoff_ms = s->accept_backoff_ms ? s->accept_backoff_ms * 2 : 50;
    if (s->accept_backoff_ms > 1000)
        s->accept_backoff_ms = 1000;
    struct timeval tv = ms_tv(s->accept_backoff_ms);
    evtimer_add(s->accept_retry, &tv);
    uint64_t held;
    if (rlog_ok(&s->log_accept_err, &held)) {
        char h[24], n[24];
        snprintf(h, sizeof(h), "%llu", (unsigned long long)held);
        snprintf(n, sizeof(n), "%zu", s->n_conns);
        arq_log(ARQ_LOG_WARN, "accept_failed", "reason", strerror(err), "connections", n, "held", h,
                "effect", "not accepting for a moment; raise the descriptor limit (LimitNOFILE)",
                NULL);
    }
}
static int server_set_rules(api_server_t *s, const api_options_t *o, char *errbuf, size_t errlen);
static int server_take_listener(api_server_t *s, int fd, char *errbuf, size_t errlen);

int api_server_start(struct event_base *base, brk_t *brk, wal_t *wal, const api_options_t *opts,
                     api_server_t **ret, char *errbuf, size_t errlen)
{
    api_server_t *s = calloc(1, sizeof(*s));
    if (!s)
        return -1;
    s->base = base;
    s->brk = brk;
    s->wal = wal;
    s->o = *opts;
    s->flush_ev = event_new(base, -1, 0, flush_cb, s);
    if (!s->flush_ev) {
        snprintf(errbuf, errlen, "out of memory");
        free(s);
        return -1;
    }
    /* The frame limit bounds memory; the payload limit is the broker's, so
     * that an oversized pub gets a nack carrying its request id. */
    s->limits.max_payload = opts->max_frame_bytes;
    if (!s->o.max_fragments)
        s->o.max_fragments = 128;
    if (!s->o.hello_timeout_ms)
        s->o.hello_timeout_ms = 10000;
    if (opts->api_key) {
        /* one namespace per key, named by its digest (the key stays secret) */
        uint8_t d[32];
        unsigned int dn = sizeof(d);
        if (!EVP_Digest(opts->api_key, strlen(opts->api_key), d, &dn, EVP_sha256(), NULL))
            memset(d, 0, sizeof(d));
        snprintf(s->api_producer, sizeof(s->api_producer),
                 AUTH_RESERVED_PREFIX "api:%02x%02x%02x%02x%02x%02x%02x%02x", d[0], d[1], d[2],
                 d[3], d[4], d[5], d[6], d[7]);
    } else {
        snprintf(s->api_producer, sizeof(s->api_producer), AUTH_RESERVED_PREFIX "api:open");
    }
    s->ops.send = conn_send;
    s->ops.out_pending = conn_out_pending;
    s->ops.on_drain = conn_on_drain;
    s->ops.kick = conn_kick;
    s->ops.send_bytes = conn_send_bytes;
    s->ops.session_durable = conn_session_durable;
    if (server_set_rules(s, opts, errbuf, errlen) != 0) {
        event_free(s->flush_ev);
        free(s);
        return -1;
    }
    api_admit_options_t ao = {.max_per_addr = opts->max_conns_per_addr,
                              .rate_per_s = opts->conn_rate_per_s,
                              .burst = opts->conn_burst};
    s->tick = event_new(base, -1, EV_PERSIST, tick_cb, s);
    s->accept_retry = evtimer_new(base, accept_retry_cb, s);
    if (api_admit_new(&ao, &s->admit) != 0 || !s->tick || !s->accept_retry) {
        snprintf(errbuf, errlen, "out of memory");
        api_server_free(s);
        return -1;
    }
    struct timeval one = {1, 0};
    event_add(s->tick, &one);
    if (opts->use_listen_fd) {
        if (server_take_listener(s, opts->listen_fd, errbuf, errlen) != 0) {
            api_server_free(s);
            return -1;
        }
        evconnlistener_set_error_cb(s->lis, accept_error_cb);
        *ret = s;
        return 0;
    }
    struct sockaddr_in sin = {0};
    sin.sin_family = AF_INET;
    sin.sin_port = htons(opts->port);
    if (inet_pton(AF_INET, opts->host, &sin.sin_addr) != 1) {
        snprintf(errbuf, errlen, "listen address '%s' is not an IPv4 address", opts->host);
        api_server_free(s);
        return -1;
    }
    /* A deep accept queue: thousands of clients reconnect at once after a
     * network blip, and a full queue drops their SYNs (1 s, then 2 s retries;
     * measured in docs/benchmarks.md). The kernel caps it at somaxconn. */
    s->lis = evconnlistener_new_bind(base, accept_cb, s, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE,
                                     4096, (struct sockaddr *)&sin, sizeof(sin));
    if (!s->lis) {
        snprintf(errbuf, errlen, "cannot listen on %s:%u: %s", opts->host, opts->port,
                 strerror(errno));
        api_server_free(s);
        return -1;
    }
    evconnlistener_set_error_cb(s->lis, accept_error_cb);
    struct sockaddr_in bound;
    socklen_t bl = sizeof(bound);
    getsockname(evconnlistener_get_fd(s->lis), (struct sockaddr *)&bound, &bl);
    s->port = ntohs(bound.sin_port);
    *ret = s;
    return 0;
}

uint16_t api_server_port(const api_server_t *srv)
{
    return srv->port;
}

size_t api_server_connections(const api_server_t *srv)
{
    return srv->n_conns;
}

void api_server_shutdown(api_server_t *s)
{
    s->shutting_down = true;
    if (s->lis) {
        evconnlistener_free(s->lis);
        s->lis = NULL;
    }
    conn_t *c = s->conns;
    while (c) {
        conn_t *next = c->next;
        if (c->state == C_WS && !wslay_event_get_close_sent(c->ws)) {
            ws_close(c, 1001, "server shutting down");
            ws_flush(c); /* may free c */
        } else if (c->state != C_WS && !c->pub) {
            conn_free(c);
        }
        c = next;
    }
}

void api_server_free(api_server_t *s)
{
    if (!s)
        return;
    if (s->lis)
        evconnlistener_free(s->lis);
    while (s->conns)
        conn_free(s->conns);
    if (s->flush_ev)
        event_free(s->flush_ev);
    if (s->tick)
        event_free(s->tick);
    if (s->accept_retry)
        event_free(s->accept_retry);
    api_admit_free(s->admit);
    free(s->trusted);
    free(s->monitor);
    free(s);
}

/* ---- deployment: client addresses, monitoring access, tokens (#18) ----- */

static void conn_peer_init(conn_t *c, const struct sockaddr *sa)
{
    memset(&c->peer_addr, 0, sizeof(c->peer_addr));
    if (sa->sa_family == AF_INET) {
        c->peer_addr.family = 4;
        memcpy(c->peer_addr.bytes, &((const struct sockaddr_in *)(const void *)sa)->sin_addr, 4);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)sa;
        char ip[INET6_ADDRSTRLEN];
        inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip));
        (void)api_addr_parse(ip, strlen(ip), &c->peer_addr);
        snprintf(c->peer, sizeof(c->peer), "[%s]:%u", ip, ntohs(in6->sin6_port));
        snprintf(c->ip, sizeof(c->ip), "%s", ip);
    }
    c->client_addr = c->peer_addr;
}

/*
 * The client address of this connection: the address a trusted proxy
 * forwarded (X-Forwarded-For, else X-Real-IP) once the request head was
 * read, else the TCP peer. What logs show as "peer" and what per-address
 * rules (monitoring access, limits per address) should use.
 */
static const api_addr_t *conn_client_addr(const conn_t *c)
{
    return &c->client_addr;
}

/* The rightmost address of the X-Forwarded-For lines (in order) that is not
 * a trusted proxy; the leftmost if all are. Returns 0 with *ret set, -1 if a
 * field does not parse (then nothing forwarded is believed). */
static int xff_client(const api_server_t *s, const http_request_t *r, api_addr_t *ret)
{
    bool found = false;
    for (size_t h = r->n_headers; h-- > 0;) {
        if (strcasecmp(r->headers[h].name, "X-Forwarded-For") != 0)
            continue;
        const char *v = r->headers[h].value;
        size_t end = strlen(v);
        while (end > 0) {
            size_t start = end;
            while (start > 0 && v[start - 1] != ',')
                start--;
            size_t a = start, b = end;
            while (a < b && (v[a] == ' ' || v[a] == '\t'))
                a++;
            while (b > a && (v[b - 1] == ' ' || v[b - 1] == '\t'))
                b--;
            api_addr_t addr;
            if (api_addr_parse(v + a, b - a, &addr) != 0)
                return found ? 0 : -1;
            *ret = addr;
            found = true;
            if (!api_cidr_match(s->trusted, s->n_trusted, &addr))
                return 0;
            end = start > 0 ? start - 1 : 0;
        }
    }
    return found ? 0 : -1;
}

static void conn_set_forwarded(conn_t *c, const http_request_t *r)
{
    api_server_t *s = c->srv;
    const char *xri = http_header_get(r, "X-Real-IP");
    bool xff = http_header_get(r, "X-Forwarded-For") != NULL;
    c->via_proxy = xff || xri || http_header_get(r, "Forwarded");
    c->proxy_trusted = c->via_proxy && api_cidr_match(s->trusted, s->n_trusted, &c->peer_addr);
    if (!c->proxy_trusted)
        return;
    api_addr_t a;
    int rc = xff ? xff_client(s, r, &a) : -1;
    if (rc != 0 && xri)
        rc = api_addr_parse(xri, strlen(xri), &a);
    if (rc != 0) {
        c->proxy_trusted = false; /* nothing usable: judged as an unknown client */
        return;
    }
    c->client_addr = a;
    char ip[INET6_ADDRSTRLEN];
    api_addr_format(&a, ip, sizeof(ip));
    snprintf(c->peer, sizeof(c->peer), "%s", ip);
    snprintf(c->ip, sizeof(c->ip), "%s", ip); /* the owner of its anonymous sessions */
}

/* "Authorization: Bearer <secret>", compared in constant time. */
static bool bearer_ok(const http_request_t *r, const char *secret)
{
    /* compare digests, in constant time: the length of the secret and its
     * bytes do not show in the time of a refusal */
    const char *auth = http_header_get(r, "Authorization");
    uint8_t want[32], got[32];
    unsigned int wn = sizeof(want), gn = sizeof(got);
    bool bearer = auth && strncmp(auth, "Bearer ", 7) == 0;
    if (!EVP_Digest(secret, strlen(secret), want, &wn, EVP_sha256(), NULL) ||
        !EVP_Digest(bearer ? auth + 7 : "", bearer ? strlen(auth + 7) : 0, got, &gn, EVP_sha256(),
                    NULL))
        return false;
    return bearer && CRYPTO_memcmp(want, got, sizeof(want)) == 0;
}

/*
 * /metrics and the details of /health: with the monitoring token from
 * anywhere; otherwise from a client address in monitor_allow (default
 * loopback). A request that came through a proxy is judged by the address
 * the proxy forwarded when the proxy is trusted, and refused when it is not
 * (its client is unknown): a local nginx does not open /metrics to the
 * world.
 */
static bool monitor_allowed(conn_t *c, const http_request_t *r)
{
    api_server_t *s = c->srv;
    if (s->o.monitor_token && bearer_ok(r, s->o.monitor_token))
        return true;
    if (c->via_proxy && !c->proxy_trusted)
        return false;
    return api_cidr_match(s->monitor, s->n_monitor, conn_client_addr(c));
}

/* /health for anyone else: the status (and its HTTP code) only. */
static void write_health_brief(api_server_t *s, struct evbuffer *b, int *code)
{
    wal_stats_t ws;
    int rc = wal_stats_get(s->wal, &ws);
    wal_state_info_t st;
    wal_state_get(s->wal, &st);
    *code = st.state == WAL_STATE_FAILED || rc ? 503 : 200;
    evbuffer_add_printf(b, "{\"status\":\"%s\"}",
                        *code != 200                                                 ? "unhealthy"
                        : st.state == WAL_STATE_FULL || brk_replication_down(s->brk) ? "degraded"
                                                                                     : "healthy");
}

/* Verify with the current key, then with the previous one (rotation). */
static int conn_verify_token(api_server_t *s, const proto_bytes_t *token, auth_token_t *ret)
{
    int64_t now = (int64_t)time(NULL);
    int rc = AUTH_ESIGNATURE;
    if (s->o.secret_key)
        rc = auth_verify((const char *)token->ptr, token->len, (const uint8_t *)s->o.secret_key,
                         strlen(s->o.secret_key), now, ret);
    if (rc == AUTH_ESIGNATURE && s->o.previous_secret_key)
        rc = auth_verify((const char *)token->ptr, token->len,
                         (const uint8_t *)s->o.previous_secret_key,
                         strlen(s->o.previous_secret_key), now, ret);
    return rc;
}

static void expiry_cb(evutil_socket_t fd, short what, void *arg);

/* (Re)arm the close at the token's exp plus the grace. */
static void conn_arm_expiry(conn_t *c)
{
    if (!c->expiry_timer)
        c->expiry_timer = evtimer_new(c->srv->base, expiry_cb, c);
    if (!c->expiry_timer)
        return;
    int64_t left = c->token_expires - (int64_t)time(NULL);
    struct timeval tv = {(time_t)((left > 0 ? left : 0) + (int64_t)c->srv->o.expiry_grace_s), 0};
    evtimer_add(c->expiry_timer, &tv);
}

static void expiry_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    conn_t *c = arg;
    if (c->state != C_WS || !c->token_expires)
        return;
    if (c->token_expires + (int64_t)c->srv->o.expiry_grace_s > (int64_t)time(NULL)) {
        conn_arm_expiry(c); /* refreshed meanwhile, or the clock moved */
        return;
    }
    c->srv->tokens_expired++;
    arq_log(ARQ_LOG_INFO, "token_expired", "peer", c->peer, "subject", c->subject ? c->subject : "",
            NULL);
    send_error_close(c, PROTO_CODE_UNAUTHORIZED, "token expired", 4002);
    ws_flush(c); /* may free c */
}

/* hello verified tok: remember its subject and expiry, arm the close. */
static void conn_token_taken(conn_t *c, const auth_token_t *tok)
{
    free(c->subject);
    c->subject = tok->subject ? strdup(tok->subject) : NULL;
    c->token_expires = tok->expires > 0 ? tok->expires : 1;
    conn_arm_expiry(c);
}

static void send_nack(conn_t *c, uint64_t id, int code, const char *reason)
{
    proto_buf_t pb = {0};
    if (proto_enc_nack(&pb, id, code, reason) == 0)
        send_pb(c, &pb);
    proto_buf_free(&pb);
}

/*
 * refresh: a new token for this connection, before the old one expires. It
 * must verify and name the same subject (the session and the dedup
 * namespace belong to it); its grants replace the old ones for later
 * requests. Refused: nack 401 (invalid or expired) or 403 (another
 * subject); the connection keeps its old token until that expires.
 */
static void handle_refresh(conn_t *c, const proto_msg_t *m)
{
    api_server_t *s = c->srv;
    if (!c->token_expires) {
        send_nack(c, m->id, PROTO_CODE_BAD_REQUEST, "anonymous connection: no token to refresh");
        return;
    }
    auth_token_t tok = {0};
    int rc = conn_verify_token(s, &m->token, &tok);
    if (rc != AUTH_OK) {
        s->errors_auth++;
        arq_log(ARQ_LOG_INFO, "refresh_failed", "peer", c->peer, "reason", auth_strerror(rc), NULL);
        send_nack(c, m->id, PROTO_CODE_UNAUTHORIZED, "invalid token");
        return;
    }
    if (!tok.subject || !c->subject || strcmp(tok.subject, c->subject) != 0) {
        s->errors_auth++;
        send_nack(c, m->id, PROTO_CODE_FORBIDDEN, "the token names another subject");
    } else if (brk_client_set_perms(c->client, tok.pub, tok.n_pub, tok.subs, tok.n_subs) != 0) {
        send_nack(c, m->id, PROTO_CODE_INTERNAL, "out of memory");
    } else {
        s->token_refreshes++;
        c->token_expires = tok.expires > 0 ? tok.expires : 1;
        conn_arm_expiry(c);
        proto_buf_t pb = {0};
        if (proto_enc_refreshok(&pb, m->id, (uint64_t)c->token_expires) == 0)
            send_pb(c, &pb);
        proto_buf_free(&pb);
    }
    auth_token_free(&tok);
}

static void write_metrics_deploy(api_server_t *s, struct evbuffer *b)
{
    metric(b, "arq_tokens_expired_total", "counter",
           "Connections closed (4002) because their token expired without a refresh.",
           s->tokens_expired);
    metric(b, "arq_token_refreshes_total", "counter", "Tokens replaced by a refresh message.",
           s->token_refreshes);
    metric(b, "arq_monitor_denied_total", "counter",
           "/metrics requests refused (address not in server.monitor_allow, no token).",
           s->monitor_denied);
}

static int parse_cidrs(char *const *list, size_t n, const char *what, api_cidr_t **ret,
                       char *errbuf, size_t errlen)
{
    api_cidr_t *v = calloc(n ? n : 1, sizeof(*v));
    if (!v) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        const char *why = NULL;
        if (api_cidr_parse(list[i], &v[i], &why) != 0) {
            snprintf(errbuf, errlen, "%s: '%s': %s", what, list[i], why);
            free(v);
            return -1;
        }
    }
    *ret = v;
    return 0;
}

/* Parse o's address rules into s (replacing what it had); all or nothing. */
static int server_set_rules(api_server_t *s, const api_options_t *o, char *errbuf, size_t errlen)
{
    api_cidr_t *t, *m;
    if (parse_cidrs(o->trusted_proxies, o->n_trusted_proxies, "server.trusted_proxies", &t, errbuf,
                    errlen) != 0)
        return -1;
    if (parse_cidrs(o->monitor_allow, o->n_monitor_allow, "server.monitor_allow", &m, errbuf,
                    errlen) != 0) {
        free(t);
        return -1;
    }
    free(s->trusted);
    free(s->monitor);
    s->trusted = t;
    s->n_trusted = o->n_trusted_proxies;
    s->monitor = m;
    s->n_monitor = o->n_monitor_allow;
    return 0;
}

/* A socket systemd (or a supervisor) bound and listens on: take it as is. */
static int server_take_listener(api_server_t *s, int fd, char *errbuf, size_t errlen)
{
    int type = 0, listening = 0;
    socklen_t l = sizeof(type);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l) != 0 || type != SOCK_STREAM) {
        snprintf(errbuf, errlen, "inherited fd %d is not a stream socket", fd);
        return -1;
    }
    l = sizeof(listening);
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &l) != 0 || !listening) {
        snprintf(errbuf, errlen, "inherited fd %d is not listening", fd);
        return -1;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0 ||
        (ss.ss_family != AF_INET && ss.ss_family != AF_INET6)) {
        snprintf(errbuf, errlen, "inherited fd %d is not an IPv4/IPv6 socket", fd);
        return -1;
    }
    evutil_make_socket_nonblocking(fd);
    evutil_make_socket_closeonexec(fd);
    /* backlog 0: listen() was called by the owner of the socket */
    s->lis = evconnlistener_new(s->base, accept_cb, s, LEV_OPT_CLOSE_ON_FREE, 0, fd);
    if (!s->lis) {
        snprintf(errbuf, errlen, "cannot use inherited fd %d: %s", fd, strerror(errno));
        return -1;
    }
    s->port = ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
                                            : ((struct sockaddr_in6 *)&ss)->sin6_port);
    return 0;
}

int api_server_reload(api_server_t *s, const api_options_t *o, char *errbuf, size_t errlen)
{
    if (server_set_rules(s, o, errbuf, errlen) != 0)
        return -1;
    s->o.secret_key = o->secret_key;
    s->o.previous_secret_key = o->previous_secret_key;
    s->o.anonymous = o->anonymous;
    s->o.api_key = o->api_key;
    s->o.api_open = o->api_open;
    s->o.origins = o->origins;
    s->o.n_origins = o->n_origins;
    s->o.trusted_proxies = o->trusted_proxies;
    s->o.n_trusted_proxies = o->n_trusted_proxies;
    s->o.monitor_allow = o->monitor_allow;
    s->o.n_monitor_allow = o->n_monitor_allow;
    s->o.monitor_token = o->monitor_token;
    s->o.expiry_grace_s = o->expiry_grace_s;
    s->o.max_connections = o->max_connections;
    s->o.handshake_timeout_ms = o->handshake_timeout_ms;
    s->o.max_header_bytes = o->max_header_bytes;
    s->o.ping_interval_ms = o->ping_interval_ms;
    s->o.pong_timeout_ms = o->pong_timeout_ms;
    /* limits: welcome's announcements, the frame limit of new connections,
     * backpressure (the broker's own copies: brk_set_limits) */
    s->o.max_message_bytes = o->max_message_bytes;
    s->o.max_inflight = o->max_inflight;
    s->o.max_frame_bytes = o->max_frame_bytes;
    s->limits.max_payload = o->max_frame_bytes;
    s->o.max_output_bytes = o->max_output_bytes;
    return 0;
}

/*
 * A session taken over (close 4001): said at warn, since many of them mean
 * clients that reconnect before their old connection died or processes
 * sharing a session. At most one line per 10 s; it counts the ones in
 * between (arq_sessions_taken_over_total has them all).
 */
static void log_takeover(conn_t *c)
{
    api_server_t *s = c->srv;
    time_t now = time(NULL);
    if (s->takeover_logged && now - s->takeover_logged < 10) {
        s->takeovers_unlogged++;
        return;
    }
    char more[24];
    snprintf(more, sizeof(more), "%llu", (unsigned long long)s->takeovers_unlogged);
    arq_log(ARQ_LOG_WARN, "session_taken_over", "peer", c->peer, "session", c->session, "reason",
            "the session was resumed by another connection: closed with 4001", "since_last_line",
            more, NULL);
    s->takeover_logged = now;
    s->takeovers_unlogged = 0;
}
