/*
 * sync.h - everything MySQL: the DATABASE_URL, schema migrations, and the
 * drain thread that copies the WAL into MySQL exactly once.
 *
 * The drain thread has its own connection. It reads the WAL by global
 * sequence after the watermark stored in MySQL (arq_sync_state), verifies
 * each record (every WAL read checks its checksum), and writes a batch as
 * one multi-row INSERT plus the new watermark in ONE transaction: a crash
 * anywhere leaves MySQL before or after the whole batch, never half, never
 * twice. On any error it rolls back, reconnects with exponential backoff
 * and full jitter, and continues from the watermark in MySQL. Publishing
 * and delivery never wait for it: the WAL absorbs the backlog.
 *
 * MariaDB Connector/C (the MySQL C API); MariaDB here, MySQL 8 by design
 * (only portable SQL: no RETURNING, no sequences).
 */
#ifndef ARQ_SYNC_H
#define ARQ_SYNC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "wal.h"

/* mysql://USER[:PASSWORD]@HOST[:PORT]/DB[?OPTIONS] with OPTIONS
 * socket=PATH (connect through a unix socket; HOST is then ignored, use
 * "localhost"), connect_timeout=S, read_timeout=S, write_timeout=S (1..3600,
 * defaults 5/30/30), tls=0|1 (require TLS, encrypted but the server not
 * authenticated; default 0), tls_ca=PATH (require TLS and verify the
 * server's certificate, and that it names HOST, against the CA certificates
 * in PATH). USER, PASSWORD and the PATHs may be percent-encoded. */
typedef struct sync_url {
    char *user, *password, *host, *db, *socket;
    char *tls_ca;  /* NULL: no verification */
    unsigned port; /* default 3306 */
    unsigned connect_timeout_s, read_timeout_s, write_timeout_s;
    int tls; /* 1 also when tls_ca is set */
} sync_url_t;
/* 0, or -1 with a one-line reason in err (never containing the password). */
int sync_url_parse(const char *url, sync_url_t *out, char *err, size_t errlen);
/* A deep copy of src into *dst: 0, or SYNC_ENOMEM with *dst all NULL. */
int sync_url_copy(sync_url_t *dst, const sync_url_t *src);
void sync_url_free(sync_url_t *u);

/*
 * Apply the migrations this build knows (sync/migrations/NNNN_*.sql) that
 * the database has not applied yet, in order, each recorded with its
 * checksum in arq_schema_migrations. Refuses (SYNC_ESCHEMA, with a message
 * naming the migration) a database with a migration this build does not
 * know (newer schema) or whose recorded checksum differs from ours (an
 * applied migration was changed). SYNC_ECONNECT when MySQL cannot be
 * reached. *applied (nullable) gets the number applied now.
 */
enum {
    SYNC_OK = 0,
    SYNC_ECONNECT = -1,
    SYNC_ESCHEMA = -2,
    SYNC_ESQL = -3,
    SYNC_ENOMEM = -4,
    SYNC_EBUSY = -5,   /* the lease is another node's and not expired */
    SYNC_EFENCED = -6, /* the lease was taken by a higher generation */
};
int sync_migrate(const sync_url_t *u, int *applied, char *err, size_t errlen);

typedef struct sync_options {
    const sync_url_t *url;    /* copied */
    uint32_t batch_rows;      /* rows per INSERT/transaction (default 1000) */
    uint64_t batch_bytes;     /* payload bytes per transaction (default 8 MiB) */
    uint32_t batch_wait_ms;   /* idle poll of the WAL (default 20) */
    uint32_t backoff_base_ms; /* reconnect backoff (default 100) */
    uint32_t backoff_cap_ms;  /* (default 10000) */
    uint32_t cursor_every_ms; /* cursor and session sync period (default 1000) */
    /* how often cursors and sessions the WAL deleted are deleted from MySQL
     * (default 60000) */
    uint32_t cursor_gc_every_ms;
    /* rows of arq_cursors and arq_sessions from before this WAL's creation
     * (an earlier WAL's) that this WAL does not hold are deleted once they
     * were not updated for this long: their sessions are gone (arqd passes
     * server.session_ttl_s; 0 keeps them for good) */
    uint64_t cursor_ttl_s;
    /* WAL retention, run by the drain thread every retain_every_ms (default
     * 5000): drop records older than retain_age_s and, while the WAL's data
     * exceeds retain_bytes, the oldest ones - but only records already in
     * MySQL (at or below the watermark). 0 disables either limit. */
    uint64_t retain_age_s;
    uint64_t retain_bytes;
    uint32_t retain_every_ms;
    /* Optional: called on the drain thread after every committed batch and
     * every state change (sync_stats_get then shows the new watermark and
     * state). Must be quick and thread-safe (e.g. event_active on a loop
     * made with evthread_use_pthreads). It is how `ack = replicated`
     * publishes learn that MySQL holds them (docs/ha.md). */
    void (*on_progress)(void *arg);
    void *progress_arg;
    /* High availability (docs/ha.md), with lease_ms > 0: this node holds
     * the lease (arq_lease) at lease_generation, taken by sync_lease_try.
     * Every write of the drain (a batch, the cursor upserts and deletes)
     * commits in a transaction that ends with an UPDATE renewing the lease
     * WHERE generation = lease_generation AND owner = lease_owner, and the
     * drain renews it every lease_ms / 3 when idle. When that UPDATE finds
     * no row (a higher generation took the lease), the transaction rolls
     * back and the drain stops for good: state SYNC_STATE_FENCED. A paused
     * or partitioned old owner so never writes again once replaced. */
    uint32_t lease_ms;
    const char *lease_owner; /* copied */
    uint64_t lease_generation;
} sync_options_t;

typedef struct sync sync_t;

/* Start the drain thread (it connects and migrates by itself, retrying). */
int sync_start(wal_t *wal, const sync_options_t *opts, sync_t **ret);
/* Stop it: the batch in flight finishes or rolls back; joins the thread. */
void sync_stop(sync_t *s);
/* Wake the drain thread if it is waiting for the WAL to grow (batch_wait_ms):
 * someone waits for the records just made readable. Thread-safe. */
void sync_kick(sync_t *s);
/* Switchover, the old owner's part: make the drain copy every acknowledged
 * record and every cursor, then release the lease (expired now) and
 * stop. The caller has stopped appends. Waits at most timeout_ms: SYNC_OK
 * released, SYNC_EBUSY not yet (timeout), SYNC_EFENCED lease lost, or the
 * drain's error. Only with lease_ms. */
int sync_release(sync_t *s, uint32_t timeout_ms);

enum sync_state {
    SYNC_STATE_CONNECTING = 0, /* not yet connected (or migrating) */
    SYNC_STATE_OK = 1,         /* connected, draining */
    SYNC_STATE_DEGRADED = 2,   /* MySQL unreachable or failing: retrying with backoff */
    SYNC_STATE_FAILED = 3,     /* refused the schema: not retrying (see last_error) */
    SYNC_STATE_FENCED = 4,     /* lost the lease to another node: stopped for good */
};

#define SYNC_HIST_BUCKETS 8
typedef struct sync_stats {
    enum sync_state state;
    uint64_t watermark; /* last sequence known to be in MySQL */
    uint64_t wal_next;  /* the WAL's next sequence, acknowledged appends counted
                           (lag = wal_next - 1 - watermark) */
    double lag_seconds; /* age of the oldest record not yet in MySQL (0 if none) */
    uint64_t rows, batches, errors, reconnects, cursors;
    uint64_t cursors_deleted;  /* rows of arq_cursors deleted because the WAL deleted them */
    uint64_t sessions;         /* rows upserted into arq_sessions */
    uint64_t sessions_deleted; /* rows of arq_sessions deleted because the WAL deleted them */
    uint64_t retained;         /* WAL records dropped by retention (all already in MySQL) */
    uint64_t batch_buckets[SYNC_HIST_BUCKETS]; /* rows per batch, bounds sync_batch_bounds */
    /* with a lease: its generation, when it was last renewed (this host's
     * wall clock, unix us; 0: not yet), renewals, and whether a switchover
     * asked this node to hand the lease over (arq_lease.handoff) */
    uint64_t lease_generation, lease_renewals;
    int64_t lease_renewed_us;
    int handoff;
    char last_error[256];
} sync_stats_t;
extern const uint64_t sync_batch_bounds[SYNC_HIST_BUCKETS - 1];
void sync_stats_get(sync_t *s, sync_stats_t *ret);
const char *sync_state_name(enum sync_state st);

/*
 * The cold tier's read side: rows of arq_messages for offsets the WAL no
 * longer holds, read on a thread with its own connection; the callback
 * runs on the thread of `base` (libevent with pthreads). A request can be
 * cancelled until its callback ran (its callback then never runs). Rows
 * and their bytes are valid during the callback only. status: 0, or
 * SYNC_ECONNECT / SYNC_ESQL / SYNC_ENOMEM (the caller retries later).
 */
struct event_base;
typedef struct sync_cold sync_cold_t;
typedef struct sync_cold_req sync_cold_req_t;
typedef struct sync_cold_row {
    uint64_t offset;
    int64_t ts_us;
    const uint8_t *headers, *payload;
    size_t headers_len, payload_len;
} sync_cold_row_t;
typedef void (*sync_cold_cb)(sync_cold_req_t *req, int status, const sync_cold_row_t *rows,
                             size_t n, void *arg);
int sync_cold_open(const sync_url_t *u, struct event_base *base, sync_cold_t **ret);
/* Offsets from..to of stream, at most max rows, in offset order. NULL when
 * out of memory. */
sync_cold_req_t *sync_cold_read(sync_cold_t *c, const char *stream, size_t stream_len,
                                uint64_t from, uint64_t to, uint32_t max, sync_cold_cb cb,
                                void *arg);
void sync_cold_cancel(sync_cold_req_t *req);
void sync_cold_stats(sync_cold_t *c, uint64_t *reads, uint64_t *rows, uint64_t *errors);
void sync_cold_close(sync_cold_t *c);

/*
 * The lease (arq_lease, one row): which node may drain into this database.
 * A node takes it when it is free - expired by the MySQL server's clock,
 * released, or its own (the same ha.node: a restart) - by raising the
 * generation; the drain then renews it (sync_options_t.lease_*). Taking an
 * expired lease first kills the old owner's drain connection when it is on
 * the same MySQL server (a paused owner may hold row locks there; on
 * another Galera node, certification aborts its transaction instead).
 * One connection, used on the caller's thread; an error closes it and the
 * next call reconnects.
 */
typedef struct sync_lease_row {
    char owner[256];
    uint64_t generation;
    int64_t expires_us; /* the server's clock, unix us */
    int64_t now_us;     /* the server's clock when read */
    int64_t wal_id;     /* created_us of the WAL the watermark counts in */
    int handoff;
} sync_lease_row_t;
typedef struct sync_lease sync_lease_t;
int sync_lease_open(const sync_url_t *u, const char *owner, uint32_t lease_ms, sync_lease_t **ret);
void sync_lease_close(sync_lease_t *l);
/* Read the row: SYNC_OK, or an error. */
int sync_lease_read(sync_lease_t *l, sync_lease_row_t *row, char *err, size_t errlen);
/* One attempt to take it. SYNC_OK: taken at *ret_generation, *before the
 * row as it was; SYNC_EBUSY: another node holds it (*before says who and
 * until when); else an error. */
int sync_lease_try(sync_lease_t *l, sync_lease_row_t *before, uint64_t *ret_generation, char *err,
                   size_t errlen);
/* Renew the lease taken at generation: SYNC_OK, SYNC_EFENCED, or an error. */
int sync_lease_renew(sync_lease_t *l, uint64_t generation, char *err, size_t errlen);
/* Switchover, asked from anywhere (arq-replay switchover): set handoff on
 * the row; the owner drains, releases and stands by. *row: the row as it
 * was. */
int sync_lease_request_handoff(const sync_url_t *u, sync_lease_row_t *row, char *err,
                               size_t errlen);

#endif
