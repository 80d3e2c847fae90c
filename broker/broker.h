/*
 * broker.h - streams, subscriptions, the publish path and flow control.
 *
 * Runs on one event-loop thread. The broker never touches sockets: each
 * client is represented by an ops table (send a frame, how much output is
 * pending) implemented by the api layer. Every protocol message it sends is
 * already encoded (arq.v1 msgpack, proto/proto.h); a delivered message is
 * encoded once and the same frame is shared by every subscriber at the tail.
 *
 * Delivery is a read of the log: a subscription is a position in a stream.
 * Subscribers at the tail take frames from the stream's in-memory tail cache
 * (filled by publishes as they commit); subscribers behind it read the WAL
 * in bounded batches. A subscription sends at most max_inflight unacked
 * messages and stops while its connection's output is above the high
 * watermark; memory is bounded by these limits, not by the backlog.
 */
#ifndef ARQ_BROKER_H
#define ARQ_BROKER_H

#include <stddef.h>
#include <stdint.h>

#include "wal.h"

struct event_base;

/* A reference-counted encoded protocol message. */
typedef struct brk_frame {
    int refs;
    size_t len;
    uint8_t data[];
} brk_frame_t;
void brk_frame_ref(brk_frame_t *f);
void brk_frame_unref(brk_frame_t *f);

typedef struct brk_client_ops {
    /* Queue frame f (one binary WebSocket message) on the connection. The
     * callee takes its own reference if it keeps f. */
    void (*send)(void *conn, brk_frame_t *f);
    /* Bytes queued for output and not yet written to the socket. */
    size_t (*out_pending)(void *conn);
    /* Optional: a pending publish was answered (reading may resume). */
    void (*on_drain)(void *conn);
    /* Optional: another connection resumed this client's session. The
     * broker has already detached the client (it sends nothing more); the
     * api closes the connection (close code 4001) and later calls
     * brk_client_close as usual. Must not free the connection inside the
     * call. */
    void (*kick)(void *conn);
    /* Optional: queue data[0..len) as one binary message, copied (replies
     * such as puback, built once for one connection: no frame allocation).
     * Without it the broker wraps the bytes in a frame for send. */
    void (*send_bytes)(void *conn, const void *data, size_t len);
    /* Optional: the session brk_session_create recorded is durable
     * (status 0), or could not be stored (a WAL status). The api holds the
     * welcome back until then, so that a resume token a client got always
     * survives a crash. Not called once the client is closed. */
    void (*session_durable)(void *conn, int status);
} brk_client_ops_t;

typedef struct brk_options {
    uint32_t max_payload;            /* 1 MiB */
    uint32_t max_subscriptions;      /* per client, 256 */
    uint32_t max_inflight;           /* per subscription, 1024 */
    size_t out_high_watermark;       /* per connection, 4 MiB */
    uint32_t tail_cache_msgs;        /* frames kept per stream, 1024 */
    uint64_t tail_cache_bytes;       /* frames kept in all streams' tail caches, 64 MiB */
    uint32_t stream_idle_s;          /* an idle stream without subscribers is freed, 60 */
    uint32_t max_sessions_per_owner; /* sessions per token subject (0: no limit) */
    uint32_t max_sessions_per_addr;  /* sessions per anonymous address (0: no limit) */
    uint32_t session_rate;           /* new sessions per second per owner (0: no limit) */
    uint32_t session_burst;          /* ... at once */
    uint64_t session_ttl_s;          /* sessions kept after their last connection, 86400 */
    uint32_t expire_interval_ms;     /* how often expired sessions are deleted, 60000 */
    /* Acknowledgement level of a publish that names none (docs/ha.md):
     * BRK_ACK_LOCAL (0, the default) answers once the local journal is
     * fdatasynced; BRK_ACK_REPLICATED once MySQL committed the record
     * (brk_replicated). */
    int ack;
    uint32_t ack_timeout_ms; /* a replicated publish waits this long, 5000 */
    /* Optional: someone waits for replication (wakes the drain: sync_kick). */
    void (*repl_kick)(void *arg);
    void *repl_kick_arg;
} brk_options_t;

enum { BRK_ACK_DEFAULT = -1, BRK_ACK_LOCAL = 0, BRK_ACK_REPLICATED = 1 };
/* Statuses of a replicated publish (beside the WAL_E* codes), refused by
 * brk_refusal with 503: the publish was not appended (replication is not
 * working now), or it was and MySQL did not commit it within
 * ack_timeout_ms (it may still arrive: retry with the same msgid). 400
 * BRK_EREPL_NONE: no MySQL configured, nothing to replicate to. */
#define BRK_EREPL_DOWN    (-103)
#define BRK_EREPL_TIMEOUT (-104)
#define BRK_EREPL_NONE    (-105)

typedef struct brk brk_t;
typedef struct brk_client brk_client_t;

/*
 * Change the per-client limits of a running broker (a reload): the payload
 * limit, subscriptions per client, in-flight deliveries per subscription and
 * the output high watermark; 0 leaves a value as it is. They apply to the
 * next request or delivery decision of every client, existing ones included
 * (a subscription over a lowered in-flight limit pauses until acks bring it
 * under). The other options need a new broker.
 */
void brk_set_limits(brk_t *b, uint32_t max_payload, uint32_t max_subscriptions,
                    uint32_t max_inflight, size_t out_high_watermark);

typedef struct brk_stats {
    uint64_t publishes, publish_dups, publish_errors, deliveries, delivered_bytes, acks;
    uint64_t catchup_reads, gaps, subscriptions, streams;
    uint64_t cursor_commits, cursors_persisted, cursor_errors;
    uint64_t sessions_created, sessions_resumed, sessions_taken_over, sessions_expired;
    uint64_t sessions_live;
    uint64_t cold_reads, cold_records, cold_errors; /* catch-up served from MySQL */
    uint64_t read_errors;      /* subscriptions stopped by a failed read (corrupt record) */
    uint64_t cache_bytes;      /* frames in all tail caches now */
    uint64_t cache_evictions;  /* frames dropped for tail_cache_bytes */
    uint64_t streams_evicted;  /* idle streams freed (read back from the WAL when used) */
    uint64_t sessions_evicted; /* deleted to make room for an owner's new one */
    uint64_t sessions_refused; /* new sessions refused: an owner's rate or limit */
    /* Publish latency inside arqd, per acknowledged publish (microseconds,
     * buckets by brk_pub_us_bounds, the last one +Inf): wait = decoded ->
     * the WAL writer took it into a batch; dispatch = the batch durable ->
     * the loop ran its completion; total = decoded -> puback queued. */
    uint64_t pub_wait_us[WAL_HIST_BUCKETS], pub_dispatch_us[WAL_HIST_BUCKETS],
        pub_total_us[WAL_HIST_BUCKETS];
    uint64_t pub_wait_us_sum, pub_dispatch_us_sum, pub_total_us_sum;
    /* ack = replicated: answered (puback), refused before appending
     * (replication down), timed out after appending; waiting now; and the
     * decoded -> puback time of those answered. */
    uint64_t repl_acked, repl_refused, repl_timeouts, repl_waiting;
    uint64_t repl_held; /* deliveries held back until MySQL has their record, now */
    uint64_t pub_repl_us[WAL_HIST_BUCKETS], pub_repl_us_sum;
} brk_stats_t;

extern const uint64_t brk_pub_us_bounds[WAL_HIST_BUCKETS - 1];

/* Registers the broker for the WAL's visible callback (wal_on_visible): close
 * the WAL before brk_free, or stop running the loop. */
int brk_new(struct event_base *base, wal_t *wal, const brk_options_t *opts, brk_t **ret);
/*
 * Replication (docs/ha.md): every WAL record up to sequence watermark is
 * committed in MySQL, and ok says whether the drain works now. Call on the
 * loop thread whenever either changes (sync_options_t.on_progress), first
 * before any client connects: without a call replicated publishes are
 * refused with BRK_EREPL_NONE. Pubacks of replicated publishes at or below
 * the watermark are sent; while !ok new replicated publishes are refused
 * (BRK_EREPL_DOWN), and those already waiting time out unless MySQL comes
 * back in time.
 */
void brk_replicated(brk_t *b, uint64_t watermark, int ok);
/* 1 while publishes at the deployment's ack level are refused for lack of
 * replication (ack = replicated, the drain not working): /health degraded. */
int brk_replication_down(const brk_t *b);
/* Serve offsets the WAL dropped from MySQL (sync_cold_open); NULL: gaps. */
struct sync_cold;
void brk_set_cold(brk_t *b, struct sync_cold *cold);
void brk_free(brk_t *b);
void brk_stats_get(const brk_t *b, brk_stats_t *ret);

/* Stream names: 1..200 bytes of [A-Za-z0-9._-], no leading/trailing '.',
 * no "..". */
int brk_stream_name_valid(const char *name, size_t len);

/*
 * A client (one WebSocket connection after hello). session: the key its
 * acked offsets are persisted under (durable cursors). producer: the dedup
 * namespace for its publishes (token subject, or session id). pub/sub
 * patterns as in api/auth.h (NULL with n = (size_t)-1: everything allowed).
 * The broker copies what it keeps.
 */
int brk_client_new(brk_t *b, const brk_client_ops_t *ops, void *conn, const char *session,
                   const char *producer, char *const *pub, size_t n_pub, char *const *subs,
                   size_t n_subs, brk_client_t **ret);
/*
 * Replace the client's publish/subscribe patterns (a refreshed token: the
 * subject stays, its grants may change). They apply to later requests;
 * subscriptions already made stay. Copies them. Returns 0, or -1 when out
 * of memory (the old patterns then stay).
 */
int brk_client_set_perms(brk_client_t *c, char *const *pub, size_t n_pub, char *const *subs,
                         size_t n_subs);
/* The connection is gone: drop subscriptions; pending publishes complete
 * without sending anything. */
void brk_client_close(brk_client_t *c);
/* Output drained below the low watermark: resume deliveries. */
void brk_client_writable(brk_client_t *c);
/* Publishes submitted and not yet answered (the api layer stops reading a
 * connection with too many, so memory stays bounded). */
size_t brk_client_pending(const brk_client_t *c);

/*
 * Sessions (docs/protocol.md section 4a). A session made durable by
 * brk_session_create or brk_session_resume is recorded in the WAL: its
 * owner, the digest of its resume token, when it was last connected, and
 * one cursor per subscription (recorded when the subscription is made,
 * then moved by acks, removed by unsubscribe). Sessions unseen for
 * session_ttl_s are deleted.
 */
/* 1 if session id can be resumed by owner ("" for anonymous) presenting a
 * token whose digest is secret: it is connected now, or recorded and not
 * expired, and owner and secret match. */
int brk_session_resumable(brk_t *b, const char *id, const char *owner, const uint8_t *secret,
                          size_t secret_len);
/* Make c's session (the id given to brk_client_new) a new durable one;
 * ops->session_durable tells when it is. The session limits apply to owner
 * (a token subject), or to addr for an anonymous client (owner ""): at
 * max_sessions_per_owner / _per_addr the owner's oldest session that no
 * connection holds is deleted to make room. 0, BRK_ESESSION_RATE (the
 * owner creates sessions faster than session_rate), BRK_ESESSION_LIMIT (at
 * the limit and every session held open), or a WAL_E* code when it cannot
 * even be submitted (WAL_EFATAL after a fail-stop, WAL_ECLOSED while
 * closing, WAL_ENOMEM; WAL_EINVAL for an ephemeral or durable client). */
#define BRK_ESESSION_RATE  (-101)
#define BRK_ESESSION_LIMIT (-102)
int brk_session_create(brk_client_t *c, const char *owner, const char *addr, const uint8_t *secret,
                       size_t secret_len);
/* Give c a session that is not stored (while the WAL refuses writes: storage
 * full or stopped): it lasts as long as the connection, cannot be resumed,
 * and its acks are not persisted. For a client without a durable session. */
void brk_client_ephemeral(brk_client_t *c);
/* Resume c's session (brk_session_resumable said yes): a connection still
 * holding it is detached and kicked (its acked offsets carry over), and
 * the session's subscriptions are restored, delivering from acked + 1 once
 * brk_client_start is called. Returns the number restored. */
size_t brk_session_resume(brk_client_t *c, const char *owner, const uint8_t *secret,
                          size_t secret_len);
/* The client's subscriptions (for the welcome), in subscription order. */
typedef void (*brk_sub_cb)(const char *stream, size_t stream_len, uint64_t epoch, uint64_t acked,
                           uint64_t next, void *arg);
void brk_client_subs(const brk_client_t *c, brk_sub_cb cb, void *arg);
/* Start delivering restored subscriptions (after the welcome went out). */
void brk_client_start(brk_client_t *c);
/* Delete expired sessions now (also runs every expire_interval_ms). */
void brk_sessions_expire(brk_t *b);

/* Requests from a client. Replies (puback/nack/subok/...) go through ops->send. */
/* ack: BRK_ACK_DEFAULT (the deployment's), BRK_ACK_LOCAL or BRK_ACK_REPLICATED. */
void brk_publish(brk_client_t *c, uint64_t id, const uint8_t *stream, size_t stream_len,
                 const uint8_t *payload, size_t payload_len, const uint8_t *msgid, size_t msgid_len,
                 const uint8_t *headers_raw, size_t headers_len, int ack);
void brk_subscribe(brk_client_t *c, uint64_t id, const uint8_t *stream, size_t stream_len, int from,
                   uint64_t offset, uint64_t epoch);
void brk_unsubscribe(brk_client_t *c, uint64_t id, const uint8_t *stream, size_t stream_len);
/* Cumulative ack. Acked offsets become durable cursors (session, stream)
 * in the WAL: collected and written as one WAL request every 100 ms, when
 * the client closes, and on brk_flush. */
void brk_ack(brk_client_t *c, const uint8_t *stream, size_t stream_len, uint64_t offset);
/* Submit every acked offset not yet persisted (e.g. at shutdown, before
 * wal_close, which then waits for the commit). */
void brk_flush(brk_t *b);

/* The protocol code (503, 400, 500) and reason ("storage full", "storage
 * stopped", "shutting down", ...) that refuse a request for WAL status
 * `status`, as publishes are refused. The reason is static. */
void brk_refusal(int status, int *ret_code, const char **ret_reason);

/* Server API publish (direction out). producer: its dedup namespace (the
 * api names one per API key). cb runs after the commit (ack = replicated:
 * after MySQL's) with status 0, a WAL_E* or a BRK_EREPL_* code; it is not
 * called when the return value is non-zero. */
typedef void (*brk_api_cb)(int status, uint64_t offset, int duplicate, void *arg);
int brk_publish_api(brk_t *b, const char *producer, const char *stream, size_t stream_len,
                    const uint8_t *payload, size_t payload_len, const uint8_t *msgid,
                    size_t msgid_len, const uint8_t *headers_raw, size_t headers_len, int ack,
                    brk_api_cb cb, void *arg);

#endif
