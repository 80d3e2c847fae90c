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
enum { SYNC_OK = 0, SYNC_ECONNECT = -1, SYNC_ESCHEMA = -2, SYNC_ESQL = -3, SYNC_ENOMEM = -4 };
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
} sync_options_t;

typedef struct sync sync_t;

/* Start the drain thread (it connects and migrates by itself, retrying). */
int sync_start(wal_t *wal, const sync_options_t *opts, sync_t **ret);
/* Stop it: the batch in flight finishes or rolls back; joins the thread. */
void sync_stop(sync_t *s);
/* Wake the drain thread if it is waiting for the WAL to grow (batch_wait_ms):
 * someone waits for the records just made readable. Thread-safe. */
void sync_kick(sync_t *s);

enum sync_state {
    SYNC_STATE_CONNECTING = 0, /* not yet connected (or migrating) */
    SYNC_STATE_OK = 1,         /* connected, draining */
    SYNC_STATE_DEGRADED = 2,   /* MySQL unreachable or failing: retrying with backoff */
    SYNC_STATE_FAILED = 3,     /* refused the schema: not retrying (see last_error) */
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

#endif
