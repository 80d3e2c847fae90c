/*
 * arq.h - libarq, the C client of the ARQ broker (arq.v1, docs/protocol.md).
 *
 * Built on libevent: the caller owns the event_base and runs the loop; the
 * library only registers events on it and never runs or breaks the loop.
 * Not thread-safe: use a client from the thread that runs its event_base.
 *
 * Errors: functions return 0 or a negative code. Codes -1 .. -99 are local
 * (ARQ_E*); a server nack or error with code N is reported as -N (e.g. -401,
 * -503). arq_strerror() names any of them; arq_client_last_error() gives the
 * text of the most recent failure (a server reason or a local message).
 *
 * Callbacks: a request that was accepted (its function returned 0) gets its
 * callback exactly once, with status 0 or a negative code, including when the
 * connection ends (ARQ_ECONNLOST, or ARQ_ECLOSED after arq_client_close()).
 * A request that was refused (negative return) never gets a callback.
 * arq_client_free() calls no callbacks. Callbacks may call any function of
 * this header on the same client, arq_client_free() included (the free is
 * then deferred until the library returns to the event loop).
 *
 * Reconnection arrives with the replay issue (#4): today, on connection loss the error callback is
 * called once and the client stays closed.
 */
#ifndef ARQ_CLIENT_ARQ_H
#define ARQ_CLIENT_ARQ_H

#include <stddef.h>
#include <stdint.h>

struct event_base;

enum {
    ARQ_OK = 0,
    ARQ_EINVAL = -1,     /* bad argument (URL, stream name, options) */
    ARQ_ENOMEM = -2,     /* out of memory */
    ARQ_ECONNECT = -3,   /* TCP connect failed */
    ARQ_EHANDSHAKE = -4, /* WebSocket upgrade refused or invalid */
    ARQ_ETIMEDOUT = -5,  /* connect_timeout_ms elapsed before welcome */
    ARQ_EPROTO = -6,     /* the server broke the protocol */
    ARQ_ECONNLOST = -7,  /* the connection ended unexpectedly */
    ARQ_ECLOSED = -8,    /* closed by arq_client_close() */
    ARQ_ENOTCONN = -9,   /* not connected (or not yet welcomed) */
    ARQ_ETOOBIG = -10,   /* payload over the server's max_payload */
    ARQ_EBUSY = -11,     /* already connecting/connected, or already subscribed */
};

/* A static description of code (local or -server code). Never NULL. */
const char *arq_strerror(int code);

typedef struct arq_client arq_client_t;

typedef struct arq_client_options {
    const char *url;             /* ws://HOST[:PORT][/PATH]; HOST is IPv4 or "localhost" */
    const char *token;           /* JWT for hello.token; NULL for anonymous */
    const char *client_name;     /* hello.client; NULL for "libarq/VERSION" */
    uint32_t connect_timeout_ms; /* connect + upgrade + welcome; 0 = 10000 */
} arq_client_options_t;

/*
 * Create a client (not connected). The option strings are copied. base is
 * borrowed and must outlive the client. On success *ret_client is set;
 * ARQ_EINVAL for a bad URL (the reason is not retrievable: no client
 * exists), ARQ_ENOMEM.
 */
int arq_client_new(struct event_base *base, const arq_client_options_t *options,
                   arq_client_t **ret_client);

/*
 * Release the client: closes the socket without a close handshake (use
 * arq_client_close() first for a clean close), drops pending requests
 * without calling their callbacks. NULL is a no-op.
 */
void arq_client_free(arq_client_t *client);

typedef void (*arq_connect_cb)(arq_client_t *client, int status, void *arg);

/*
 * Connect, upgrade to WebSocket (subprotocol arq.v1), send hello. cb is
 * called once: status 0 after the server's welcome, else a negative code
 * (ARQ_ECONNECT, ARQ_EHANDSHAKE, ARQ_ETIMEDOUT, -401 for a refused token...).
 * Returns ARQ_EBUSY if a connection was already started.
 */
int arq_client_connect(arq_client_t *client, arq_connect_cb cb, void *arg);

/*
 * The session id from welcome, or NULL before it. Owned by the client,
 * valid until arq_client_free().
 */
const char *arq_client_session(const arq_client_t *client);

/*
 * The text of the most recent failure (a server reason, or e.g. "connect to
 * 127.0.0.1:1: Connection refused"); "" if none. Owned by the client; valid
 * until the next call into the library or the next callback.
 */
const char *arq_client_last_error(const arq_client_t *client);

/* welcome.max_payload (0 before welcome). */
uint64_t arq_client_max_payload(const arq_client_t *client);

/*
 * Called when an established connection ends unexpectedly (status
 * ARQ_ECONNLOST or ARQ_EPROTO; reason as for arq_client_last_error), and for
 * server `error` messages not tied to a pending request (status -code).
 * reason is borrowed for the duration of the call.
 */
typedef void (*arq_error_cb)(arq_client_t *client, int status, const char *reason, void *arg);
void arq_client_on_error(arq_client_t *client, arq_error_cb cb, void *arg);

/* A `gap`: offsets from..to of stream no longer exist. stream is borrowed. */
typedef void (*arq_gap_cb)(arq_client_t *client, const char *stream, uint64_t from, uint64_t to,
                           void *arg);
void arq_client_on_gap(arq_client_t *client, arq_gap_cb cb, void *arg);

/*
 * Publish status: 0 with the durable offset (duplicate != 0 when the msgid
 * was already published: offset is the original one), or a negative code
 * (-413, -403, -503, ARQ_ECONNLOST...) with offset 0.
 */
typedef void (*arq_publish_cb)(arq_client_t *client, int status, uint64_t offset, int duplicate,
                               void *arg);

/*
 * Publish payload[0..len) to stream, pipelined (does not wait for earlier
 * publishes). stream, payload and msgid (nullable: no idempotency key) are
 * copied into the outgoing frame before returning. cb may be NULL.
 * Returns ARQ_ENOTCONN before welcome or after the connection ended,
 * ARQ_ETOOBIG when len exceeds welcome.max_payload, ARQ_EINVAL.
 */
int arq_publish(arq_client_t *client, const char *stream, const void *payload, size_t len,
                const char *msgid, arq_publish_cb cb, void *arg);

enum arq_from { ARQ_FROM_EARLIEST = 1, ARQ_FROM_LATEST, ARQ_FROM_OFFSET };

#define ARQ_EPOCH_ANY UINT64_MAX /* arq_subscribe(): send no epoch */

/* A delivered message. Every pointer is borrowed for the callback only. */
typedef struct arq_message {
    const char *stream; /* NUL-terminated */
    uint64_t offset;
    uint64_t ts_us; /* when it became durable, unix microseconds */
    const uint8_t *payload;
    size_t payload_len;
    const uint8_t *headers; /* raw msgpack map str -> str, NULL if none */
    size_t headers_len;
} arq_message_t;

typedef void (*arq_subok_cb)(arq_client_t *client, int status, uint64_t epoch, uint64_t first,
                             uint64_t next, void *arg);
typedef void (*arq_msg_cb)(arq_client_t *client, const arq_message_t *m, void *arg);

/*
 * Subscribe to stream (at most one subscription per stream). from is one of
 * enum arq_from; offset is used only with ARQ_FROM_OFFSET (>= 1); epoch is
 * sent unless ARQ_EPOCH_ANY. subok_cb (nullable) gets 0 with the stream's
 * epoch/first/next, or a negative code (-409 epoch mismatch, -403...) after
 * which the subscription is gone. msg_cb (required) is called for every
 * message in offset order until the connection ends; the client must
 * arq_ack() them (the server pauses after max_inflight unacked messages).
 * stream is copied.
 */
int arq_subscribe(arq_client_t *client, const char *stream, enum arq_from from, uint64_t offset,
                  uint64_t epoch, arq_subok_cb subok_cb, arq_msg_cb msg_cb, void *arg);

/* Cumulative ack: every message of stream up to offset is processed. */
int arq_ack(arq_client_t *client, const char *stream, uint64_t offset);

typedef void (*arq_close_cb)(arq_client_t *client, void *arg);

/*
 * Close cleanly: everything already queued is sent, then a close frame
 * (1000); the socket is closed once the server answers the close (or after
 * connect_timeout_ms). Replies that arrive before the server's close are
 * still delivered; requests still pending then get ARQ_ECLOSED. cb
 * (nullable) is called once the socket is closed. Closing a client that is
 * still connecting aborts the attempt (its connect callback gets
 * ARQ_ECLOSED). Returns ARQ_ENOTCONN if there is nothing to close.
 */
int arq_client_close(arq_client_t *client, arq_close_cb cb, void *arg);

#endif
