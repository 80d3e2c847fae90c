/*
 * arq_int.h - what the files of libarq share (not installed: applications
 * include arq.h). The design (connection and client states, what outlives a
 * connection, the three offsets per subscription, deferred teardown) is
 * described at the top of arq.c; the files are
 *   arq.c          the client: URL, lifecycle, states, reconnection timers
 *   arq_wire.c     WebSocket framing (wslay), msgpack helpers, HTTP upgrade
 *   arq_session.c  requests and replies, recovery after a reconnect, and
 *                  the public request functions
 */
#ifndef ARQ_CLIENT_INT_H
#define ARQ_CLIENT_INT_H

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
#include <openssl/ssl.h>
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
    int tls;           /* wss:// */
    SSL_CTX *ssl_ctx;  /* wss://: shared by the client's connections */
    char *host_header; /* HOST[:PORT] as the Host header, IPv6 in brackets */
    char **urls;       /* options.url split at commas; host..host_header are urls[url_i]'s */
    size_t n_urls, url_i;
    arq_token_cb token_cb; /* token provider (NULL: options.token) */
    void *token_arg;
    struct event *ev_refresh; /* ahead of the token's expiry */
    uint64_t token_expires;   /* welcome / refreshok token_expires, 0 unknown */
    uint64_t refresh_id;      /* outstanding refresh request, 0 none */
    uint32_t timeout_ms;
    int reconnect;
    uint32_t backoff_base_ms, backoff_cap_ms, max_retries;
    uint32_t hb_interval_ms, hb_timeout_ms;
    size_t max_pending;
    int ack; /* options.ack */

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

/* arq.c: the client: URL, lifecycle, connection state, reconnection timers */
void arq_set_error(arq_client_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
uint64_t arq_now_ms(void);
struct timeval arq_ms_tv(uint64_t ms);
int arq_fill_random(void *buf, size_t len);
uint64_t arq_backoff_ms(arq_client_t *c, uint32_t n);
void arq_pub_free(struct pub *p);
void arq_sub_free(struct sub *s);
void arq_enter(arq_client_t *c);
void arq_leave(arq_client_t *c);
void arq_api_leave(arq_client_t *c);
int arq_final_state(const arq_client_t *c);
void arq_set_state(arq_client_t *c, arq_state_t st, int status, const char *reason);
void arq_request_teardown(arq_client_t *c, int status);
void arq_arm_timer(arq_client_t *c);

/* arq_wire.c: the wire: WebSocket (wslay), msgpack helpers, the HTTP upgrade */
int arq_ws_flush(arq_client_t *c);
int arq_ws_send(arq_client_t *c, const void *data, size_t len);
int arq_ws_send_out(arq_client_t *c);
void arq_pack_str(msgpack_packer *pk, const char *s);
void arq_pack_kv_str(msgpack_packer *pk, const char *k, const char *v);
int arq_mp_precheck(const uint8_t *p, size_t len);
const msgpack_object *arq_mp_get(const msgpack_object *map, const char *key);
int arq_mp_uint(const msgpack_object *map, const char *key, uint64_t *out);
char *arq_mp_str(const msgpack_object *map, const char *key, msgpack_zone *z);
int arq_start_attempt(arq_client_t *c);

/* arq.c: the token provider */
int arq_token_fetch(arq_client_t *c);
void arq_token_schedule(arq_client_t *c, uint64_t expires);

/* arq_session.c: requests, replies and recovery after a reconnect; the public requests */
void arq_send_hello(arq_client_t *c);
void arq_send_refresh(arq_client_t *c);
void arq_resend_waiting(arq_client_t *c);
void arq_pub_complete(arq_client_t *c, struct pub *p, int status, uint64_t offset, int dup);
void arq_ws_msg_cb(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                   void *user);

#endif
