/*
 * sync_tools.h - MySQL for arq-replay: the reads behind streams, dump,
 * verify, republish and restore, and resync's idempotent writes.
 *
 * A sync_db_t is one connection used on the caller's thread; nothing runs
 * in the background and nothing is retried: a tool reports the error and
 * the operator runs it again. Fallible functions return 0 or a negative
 * SYNC_E* code (sync.h) and, if err is non-NULL, write a one-line reason
 * (never containing the password). Row and name pointers handed to a
 * callback are borrowed for that call only; a callback returns non-zero to
 * stop early (not an error).
 *
 * Nothing here changes the schema: the tables are those of
 * sync/migrations (arqd applies them; `arqd --migrate`).
 */
#ifndef ARQ_SYNC_TOOLS_H
#define ARQ_SYNC_TOOLS_H

#include <stddef.h>
#include <stdint.h>

#include "sync.h"
#include "wal.h"

typedef struct sync_db sync_db_t;

/* Connect (timeouts from the URL). SYNC_ECONNECT, SYNC_ENOMEM. */
int sync_db_open(const sync_url_t *u, sync_db_t **ret, char *err, size_t errlen);
void sync_db_close(sync_db_t *d);

/* arq_sync_state: the last WAL sequence the drain wrote, and when it moved
 * (unix microseconds; 0 if never). SYNC_ESCHEMA without the row. */
int sync_db_watermark(sync_db_t *d, uint64_t *ret_seq, int64_t *ret_updated_us, char *err,
                      size_t errlen);

/* A stream as MySQL knows it: its rows in arq_messages (rows == 0: none)
 * and its arq_streams row (has_meta == 0: none). */
typedef struct sync_db_stream {
    const char *name; /* not NUL-terminated */
    size_t name_len;
    uint64_t rows, min_offset, max_offset, max_seq;
    int has_meta;
    uint32_t id;
    uint64_t epoch;
    int64_t created_us;
} sync_db_stream_t;
typedef int (*sync_db_stream_cb)(const sync_db_stream_t *s, void *arg);

/* Every stream with rows or an arq_streams row, in name order. One pass
 * over arq_messages' primary key. */
int sync_db_streams(sync_db_t *d, sync_db_stream_cb cb, void *arg, char *err, size_t errlen);
/* One stream (name given); SYNC_OK with rows == 0 and has_meta == 0 when
 * MySQL has nothing of it. */
int sync_db_stream_get(sync_db_t *d, const char *name, size_t name_len, sync_db_stream_t *ret,
                       char *err, size_t errlen);

/* A row of arq_messages. */
typedef struct sync_db_row {
    uint64_t offset, seq, checksum;
    int64_t ts_us;
    enum wal_direction direction;
    const uint8_t *producer, *msgid, *headers, *payload;
    size_t producer_len, msgid_len, headers_len, payload_len;
} sync_db_row_t;
typedef int (*sync_db_row_cb)(const sync_db_row_t *row, void *arg);

/* Rows of stream with from <= offset <= to in offset order, at most max
 * (0: all), streamed (memory does not grow with the range). *ret_count
 * (nullable): rows passed to cb. */
int sync_db_rows(sync_db_t *d, const char *stream, size_t stream_len, uint64_t from, uint64_t to,
                 uint32_t max, sync_db_row_cb cb, void *arg, uint64_t *ret_count, char *err,
                 size_t errlen);

/* The offsets of [from, to] that have no row, as ascending ranges. Cheap
 * when there are none (one COUNT); otherwise one pass over the offsets. */
typedef int (*sync_db_range_cb)(uint64_t from, uint64_t to, void *arg);
int sync_db_holes(sync_db_t *d, const char *stream, size_t stream_len, uint64_t from, uint64_t to,
                  sync_db_range_cb cb, void *arg, char *err, size_t errlen);

/* Per stream, the highest acked offset any session has in arq_cursors. */
typedef int (*sync_db_cursor_cb)(const char *stream, size_t stream_len, uint64_t max_offset,
                                 void *arg);
int sync_db_cursor_max(sync_db_t *d, sync_db_cursor_cb cb, void *arg, char *err, size_t errlen);

/* A row of arq_sessions: a session as the drain last copied it from the
 * WAL (secret: the digest of its resume token, never the token). */
typedef struct sync_db_session {
    const char *session; /* not NUL-terminated */
    size_t session_len;
    const uint8_t *owner, *secret;
    size_t owner_len, secret_len;
    int64_t created_us, seen_us, updated_us;
} sync_db_session_t;
typedef int (*sync_db_session_cb)(const sync_db_session_t *s, void *arg);

/* Every row of arq_sessions in session order, read in pages of at most
 * 1,000 rows by key (memory does not grow with the table). A page is read
 * whole before its callbacks run, so a callback may use d (e.g.
 * sync_db_session_cursors). SYNC_ESCHEMA when the table is missing (the
 * database was last migrated by an arqd older than migration 0003). */
int sync_db_sessions(sync_db_t *d, sync_db_session_cb cb, void *arg, char *err, size_t errlen);

/* The cursors of one session in arq_cursors, in stream order, through
 * wal.h's wal_cursor_cb (the stream name borrowed for the call; non-zero
 * stops). Streamed: the callback must not use d. */
int sync_db_session_cursors(sync_db_t *d, const void *session, size_t session_len, wal_cursor_cb cb,
                            void *arg, char *err, size_t errlen);

/* Insert or update a stream's arq_streams row (after a restore gave it a
 * new epoch). */
int sync_db_stream_put(sync_db_t *d, const char *name, size_t name_len, uint32_t id, uint64_t epoch,
                       int64_t created_us, char *err, size_t errlen);

/* Which columns of a row differ from a WAL record (0: equal). */
enum {
    SYNC_DIFF_SEQ = 1 << 0,
    SYNC_DIFF_DIRECTION = 1 << 1,
    SYNC_DIFF_PRODUCER = 1 << 2,
    SYNC_DIFF_MSGID = 1 << 3,
    SYNC_DIFF_TS = 1 << 4,
    SYNC_DIFF_HEADERS = 1 << 5,
    SYNC_DIFF_PAYLOAD = 1 << 6,
    SYNC_DIFF_CHECKSUM = 1 << 7,
};
unsigned sync_db_row_diff(const sync_db_row_t *row, const wal_record_t *rec);
/* The column names of a diff mask, comma-separated, into buf. */
void sync_db_diff_names(unsigned mask, char *buf, size_t cap);

typedef struct sync_resync_stats {
    uint64_t inserted; /* rows that were missing */
    uint64_t replaced; /* rows that differed from the WAL */
    uint64_t same;     /* rows already equal: left alone */
    uint64_t pending;  /* records after the watermark: the drain's to write */
} sync_resync_stats_t;

/*
 * Write WAL records of one stream into arq_messages in one transaction:
 * missing rows are inserted, rows that differ in any column are replaced
 * (the WAL is the original), equal rows are left alone - so running it
 * again changes nothing. Only records at or below the sync watermark are
 * written: the watermark is read with SELECT ... FOR UPDATE in the same
 * transaction, so a running drain waits for us and never meets a row it did
 * not write (the rest count as pending). The stream's arq_streams row is
 * added if it is missing (stream_id, epoch, created_us). recs: one stream,
 * ascending offsets, borrowed for the call. dry_run: classify only, roll
 * back. Stats are added to *st (nullable).
 */
int sync_db_resync(sync_db_t *d, const wal_record_t *recs, size_t n, uint32_t stream_id,
                   uint64_t epoch, int64_t created_us, int dry_run, sync_resync_stats_t *st,
                   char *err, size_t errlen);

#endif
