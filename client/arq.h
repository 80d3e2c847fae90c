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
 * client ends (ARQ_ECONNLOST, or ARQ_ECLOSED after arq_client_close()).
 * A request that was refused (negative return) never gets a callback.
 * arq_client_free() calls no callbacks. Callbacks may call any function of
 * this header on the same client, arq_client_free() included (the free is
 * then deferred until the library returns to the event loop).
 *
 * Reconnection (options.reconnect, off by default). Without it, on
 * connection loss pending requests fail, the error callback is called once
 * and the client stays closed. With it, the client reconnects with
 * exponential backoff and full jitter, resumes its session (hello.session +
 * resume_token, docs/protocol.md section 4a), and recovers by itself:
 *   - subscriptions the server did not restore are subscribed again from
 *     the offset after the last one passed to the message callback, with the
 *     stream's epoch; a stream whose history was reset (new epoch) is
 *     reported through the epoch callback and continues in the new history;
 *   - messages at or below the last offset passed to the message callback
 *     are dropped, so the application sees each offset of a subscription
 *     once, in order (gaps still go to the gap callback);
 *   - acks the server has not recorded are sent again;
 *   - publishes without a puback are sent again, in their order, with the
 *     same msgid; their callback is still called exactly once.
 * While it is reconnecting, arq_publish(), arq_subscribe() and arq_ack()
 * queue instead of failing with ARQ_ENOTCONN. The state callback reports
 * every transition (enum arq_state).
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
    ARQ_ETIMEDOUT = -5,  /* no welcome within connect_timeout_ms, or heartbeat timeout */
    ARQ_EPROTO = -6,     /* the server broke the protocol */
    ARQ_ECONNLOST = -7,  /* the connection ended unexpectedly */
    ARQ_ECLOSED = -8,    /* closed by arq_client_close() */
    ARQ_ENOTCONN = -9,   /* not connected (or not yet welcomed) */
    ARQ_ETOOBIG = -10,   /* payload over the server's max_payload */
    ARQ_EBUSY = -11,     /* already connecting/connected, or already subscribed */
    ARQ_ESESSION = -12,  /* the session was taken over by another connection (close 4001) */
    ARQ_EFULL = -13,     /* options.max_pending publishes are already waiting for a puback */
    ARQ_ETLS = -14,      /* TLS failed: handshake, or the server's certificate did not verify */
};

/* A static description of code (local or -server code). Never NULL. */
const char *arq_strerror(int code);

typedef struct arq_client arq_client_t;

/*
 * Options. A zero-initialised struct (plus url) gives a client without
 * reconnection or heartbeat, as before these options existed.
 */
typedef struct arq_client_options {
    /* ws://HOST[:PORT][/PATH] or wss://... (TLS). HOST is a name (resolved at
     * each connection attempt, blocking: getaddrinfo), an IPv4 address or an
     * IPv6 one in brackets. Ports default to 80 / 443. Several URLs,
     * separated by commas (e.g. an active node and a standby): the client
     * stays on one while it works and, after a failed attempt or a lost
     * connection, tries the next (in order, round robin), resuming there. */
    const char *url;
    const char *token; /* JWT for hello.token; NULL for anonymous (see also arq_client_on_token) */
    const char *client_name;     /* hello.client; NULL for "libarq/VERSION" */
    uint32_t connect_timeout_ms; /* connect + upgrade + welcome, per attempt; 0 = 10000 */

    /*
     * Reconnect after a failed connection attempt or a lost connection
     * (anything but a close by arq_client_close(), a server close 1000 or
     * 4001, or a permanent refusal: HTTP 4xx upgrade answer, error 400/401/
     * 403 to hello, close 1008). The first connection is retried too.
     */
    int reconnect;
    /* Delay before reconnection attempt n (0-based): uniform random in
     * [0, min(backoff_cap_ms, backoff_base_ms * 2^n)]. 0 = 100 / 10000. n
     * restarts at 0 after a connection that lasted backoff_cap_ms. */
    uint32_t backoff_base_ms, backoff_cap_ms;
    /* Reconnection attempts in a row (since the last welcome) before giving
     * up (ARQ_STATE_FAILED); also bounds the retries of one publish or
     * subscribe answered with 503. 0 = unlimited. */
    uint32_t max_retries;
    /* Send a WebSocket ping every heartbeat_interval_ms once welcomed (0 =
     * none); with heartbeat_timeout_ms > 0, a connection on which nothing
     * arrived for that long is declared dead (ARQ_ETIMEDOUT) and, with
     * reconnect, replaced. Both need heartbeat_interval_ms > 0. */
    uint32_t heartbeat_interval_ms, heartbeat_timeout_ms;
    /* Publishes waiting for their puback (sent or queued) before
     * arq_publish() returns ARQ_EFULL; 0 = 10000. Applies with or without
     * reconnect. */
    size_t max_pending;
    /*
     * wss:// only. The server's certificate is always verified, against the
     * system's CA store (OpenSSL's default paths), or against ca_file alone
     * (a PEM file of one or more CAs: a private CA) when it is set, and must
     * name HOST (or its IP address). A failure is ARQ_ETLS, a permanent
     * refusal.
     */
    const char *ca_file;
    /*
     * The acknowledgement level every publish asks for (pub.ack,
     * docs/ha.md): ARQ_ACK_DEFAULT (the server's wal.ack), ARQ_ACK_LOCAL
     * (the puback means: in this arqd's fdatasynced journal) or
     * ARQ_ACK_REPLICATED (... and committed in MySQL, e.g. certified by a
     * Galera cluster). A replicated publish the server cannot replicate now
     * is answered 503 and retried like any 503 (same msgid: stored once).
     */
    int ack;
} arq_client_options_t;

enum { ARQ_ACK_DEFAULT = 0, ARQ_ACK_LOCAL = 1, ARQ_ACK_REPLICATED = 2 };

/* The client's state, as reported by arq_client_state() and the state callback. */
typedef enum arq_state {
    ARQ_STATE_IDLE = 0,     /* created; arq_client_connect() not called yet */
    ARQ_STATE_CONNECTING,   /* first connection attempt (TCP, upgrade, hello) */
    ARQ_STATE_CONNECTED,    /* welcomed; everything from before a reconnect is recovered */
    ARQ_STATE_DISCONNECTED, /* connection lost or attempt failed; next attempt after a backoff */
    ARQ_STATE_RECONNECTING, /* a reconnection attempt is under way */
    ARQ_STATE_RECOVERING,   /* welcomed again; waiting for re-subscriptions' answers */
    ARQ_STATE_FAILED,       /* gave up: retries exhausted, permanent error, or lost
                             * without reconnect. Final */
    ARQ_STATE_CLOSED,       /* closed by arq_client_close() or by the server (1000). Final */
} arq_state_t;

/* A static name for state ("connected", ...). Never NULL. */
const char *arq_state_name(arq_state_t state);

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
 * called once: status 0 after the server's first welcome, else a negative
 * code (ARQ_ECONNECT, ARQ_EHANDSHAKE, ARQ_ETIMEDOUT, -401 for a refused
 * token...); with reconnect, only once the client gave up
 * (ARQ_STATE_FAILED). Returns ARQ_EBUSY if a connection was already started
 * (a client connects once; create a new one after a final state).
 */
int arq_client_connect(arq_client_t *client, arq_connect_cb cb, void *arg);

/*
 * The session id from welcome, or NULL before it. Owned by the client,
 * valid until arq_client_free().
 */
const char *arq_client_session(const arq_client_t *client);

/* The current state. */
arq_state_t arq_client_state(const arq_client_t *client);

/*
 * Called on every state transition. On the way to a final state it comes
 * before the callbacks that follow (failed requests, connect/error/close
 * callbacks); after a welcome it comes once what the welcome restored was
 * handled (epoch and subok callbacks of restored subscriptions) and the
 * rest was sent again. status is 0 or the negative code that caused it
 * (ARQ_ECONNLOST, ARQ_ETIMEDOUT for a heartbeat timeout, ARQ_ESESSION,
 * -401, ...); reason is a text for logs ("" if none), borrowed for the
 * duration of the call.
 */
typedef void (*arq_state_cb)(arq_client_t *client, arq_state_t old_state, arq_state_t new_state,
                             int status, const char *reason, void *arg);
void arq_client_on_state(arq_client_t *client, arq_state_cb cb, void *arg);

/*
 * Called when a subscription's stream turns out to have a new epoch after a
 * reconnect (its history was reset: the offsets delivered so far are
 * meaningless). The subscription continues in the new epoch: from where the
 * resumed session's server restarts it, or from the stream's earliest offset
 * when a re-subscription was refused with 409. new_epoch is 0 when the
 * stream does not exist at all any more (it gets an epoch with its next
 * publish, and is delivered from offset 1). Called before any message of
 * the new epoch; stream is borrowed.
 */
typedef void (*arq_epoch_cb)(arq_client_t *client, const char *stream, uint64_t old_epoch,
                             uint64_t new_epoch, void *arg);
void arq_client_on_epoch(arq_client_t *client, arq_epoch_cb cb, void *arg);

/*
 * A token provider, for clients that outlive their tokens. Called (on the
 * loop's thread, synchronously: keep it short) before every hello - the
 * first connection and each reconnection - and again ahead of the current
 * token's expiry (welcome.token_expires: when three quarters of its
 * remaining life are gone, and at least 5 s before it), to send a `refresh`
 * on the live connection. Set *ret_token to a malloc'd NUL-terminated token
 * (the library takes it and frees it) and return 0; return 0 with
 * *ret_token left NULL to keep the current token, or a negative code to
 * report a failure (the current token is kept; at connection time the
 * attempt fails with that code). With a provider, a hello refused with 401
 * is retried (a new token may come) instead of being final. Without one,
 * options.token is sent, and a connection whose token expires is closed by
 * the server (close 4002; with reconnect, the same token is then refused).
 */
typedef int (*arq_token_cb)(arq_client_t *client, char **ret_token, void *arg);
void arq_client_on_token(arq_client_t *client, arq_token_cb cb, void *arg);

/* Counters since arq_client_new(). */
typedef struct arq_client_stats {
    uint64_t connects;             /* welcomes received */
    uint64_t reconnects;           /* welcomes after the first */
    uint64_t resumed;              /* welcomes with resumed: true */
    uint64_t redeliveries_dropped; /* messages dropped: already passed to the application,
                                    * or before the offset it subscribed from */
    uint64_t publishes_resent;     /* publishes sent again (reconnect or 503) */
    uint64_t resubscribes;         /* subscriptions sent again */
    uint64_t pending_publishes;    /* publishes waiting for a puback now */
    uint64_t token_refreshes;      /* refresh messages the server accepted */
} arq_client_stats_t;
void arq_client_stats(const arq_client_t *client, arq_client_stats_t *ret_stats);

/*
 * The text of the most recent failure (a server reason, or e.g. "connect to
 * 127.0.0.1:1: Connection refused"); "" if none. Owned by the client; valid
 * until the next call into the library or the next callback.
 */
const char *arq_client_last_error(const arq_client_t *client);

/* welcome.max_payload (0 before welcome). */
uint64_t arq_client_max_payload(const arq_client_t *client);

/*
 * Called when the client ends by an error after it was connected once
 * (status ARQ_ECONNLOST, ARQ_EPROTO, ARQ_ETIMEDOUT, ARQ_ESESSION...; reason
 * as for arq_client_last_error): without reconnect when the connection is
 * lost, with reconnect when it gives up (ARQ_STATE_FAILED) or the server
 * closed with 1000. Also for server `error` messages not tied to a pending
 * request (status -code). reason is borrowed for the duration of the call.
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
 * (-413, -403, -503, ARQ_ECONNLOST, ARQ_ETOOBIG...) with offset 0. With
 * reconnect, a publish re-sent after a reconnect may be answered with
 * duplicate != 0: the server had stored it before the connection broke.
 */
typedef void (*arq_publish_cb)(arq_client_t *client, int status, uint64_t offset, int duplicate,
                               void *arg);

/*
 * Publish payload[0..len) to stream, pipelined (does not wait for earlier
 * publishes). Every publish carries a msgid: msgid if not NULL (at most 255
 * bytes; unique per producer), else one the library makes (16 random hex
 * digits, '-', a per-client counter). stream, payload and msgid are copied
 * before returning (with reconnect, the encoded message is kept until its
 * puback, to be re-sent). cb may be NULL.
 * Without reconnect: ARQ_ENOTCONN before welcome or after the connection
 * ended. With reconnect: queued while (re)connecting; ARQ_ENOTCONN only
 * before arq_client_connect() or in a final state. ARQ_ETOOBIG when len
 * exceeds welcome.max_payload (a publish queued before the first welcome
 * that turns out too big gets ARQ_ETOOBIG in its callback), ARQ_EFULL
 * (options.max_pending), ARQ_EINVAL.
 */
int arq_publish(arq_client_t *client, const char *stream, const void *payload, size_t len,
                const char *msgid, arq_publish_cb cb, void *arg);

/*
 * arq_publish() with headers: headers[0..headers_len) is one msgpack map of
 * str -> str (the form arq_message_t.headers is delivered in, so a consumer
 * can pass a message's headers on as they are); NULL or 0 bytes for none.
 * It is copied. ARQ_EINVAL unless it is exactly one map whose keys and values
 * are all strings; the broker checks the rest (UTF-8, at most 32 entries and
 * 8 KiB, docs/protocol.md) and refuses with -400 / -413 in cb.
 */
int arq_publish_headers(arq_client_t *client, const char *stream, const void *payload, size_t len,
                        const char *msgid, const uint8_t *headers, size_t headers_len,
                        arq_publish_cb cb, void *arg);

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
 * which the subscription is gone. With reconnect it is called once more,
 * with a negative code, if a later re-subscription is refused for good (the
 * subscription is then gone); a subscription the server restores by a
 * session resume before its first subok gets first = the offset delivery
 * restarts at. msg_cb (required) is called for every message in offset
 * order, each offset once, until the client ends (without reconnect: until
 * the connection ends); the client must arq_ack() them (the server pauses
 * after max_inflight unacked messages). stream is copied. Returns ARQ_EBUSY
 * if stream is already subscribed; queued while reconnecting, as
 * arq_publish().
 */
int arq_subscribe(arq_client_t *client, const char *stream, enum arq_from from, uint64_t offset,
                  uint64_t epoch, arq_subok_cb subok_cb, arq_msg_cb msg_cb, void *arg);

/*
 * Cumulative ack: every message of stream up to offset is processed. For a
 * subscribed stream, offset must not exceed the last offset passed to the
 * message callback (ARQ_EINVAL otherwise); the library sends it when the
 * server can take it, and again after a reconnect (with reconnect, while
 * disconnected it is only recorded). Acks of an offset already acked send
 * nothing. For a stream not subscribed the ack is sent as is (the server
 * answers with an `error`).
 */
int arq_ack(arq_client_t *client, const char *stream, uint64_t offset);

/*
 * The epoch of stream's subscription as last told by the server (subok or
 * a resumed welcome; 0 while unknown or when the stream did not exist at
 * subscription time). ARQ_EINVAL when stream is not subscribed.
 */
int arq_subscription_epoch(const arq_client_t *client, const char *stream, uint64_t *ret_epoch);

typedef void (*arq_close_cb)(arq_client_t *client, void *arg);

/*
 * Close cleanly and stop reconnecting: everything already sent is followed
 * by a close frame (1000); the socket is closed once the server answers the
 * close (or after connect_timeout_ms). Replies that arrive before the
 * server's close are still delivered; requests still pending then (and
 * those queued for a reconnect) get ARQ_ECLOSED. cb (nullable) is called
 * once the client is closed (ARQ_STATE_CLOSED). Closing a client that is
 * still connecting, or waiting to reconnect, aborts that (a connect callback
 * not yet called gets ARQ_ECLOSED). Returns ARQ_ENOTCONN if there is
 * nothing to close (never connected, already closing, or in a final state).
 */
int arq_client_close(arq_client_t *client, arq_close_cb cb, void *arg);

#endif
