/*
 * wal.h - ARQ's write-ahead log: one LMDB environment in a data directory.
 *
 * The WAL stores every message before it is acknowledged or delivered. It
 * owns the record format (wal_record.h), the LMDB environment, the group
 * commit writer thread, reads, durable cursors, dedup entries and retention.
 * It never logs: every fallible function returns 0 or a negative WAL_E* code
 * and wal_strerror() names it; the caller logs once.
 *
 * Threads. wal_open() starts one writer thread that owns every LMDB write
 * transaction. Appends are submitted from any thread (normally the event
 * loop) and completed on the thread named in the options (see wal_open).
 * Read functions may be called from any thread, concurrently with the writer
 * and with other processes that opened the same directory read-only; each
 * read runs in one short read transaction.
 */
#ifndef ARQ_WAL_H
#define ARQ_WAL_H

#include <stddef.h>
#include <stdint.h>

struct event_base;

/* Error codes: all negative. 0 is success. */
enum {
    WAL_OK = 0,
    WAL_EINVAL = -1,      /* bad argument (length limit, empty name, ...) */
    WAL_ENOMEM = -2,      /* allocation failed */
    WAL_ENOTFOUND = -3,   /* no such stream / cursor / dedup entry */
    WAL_ECORRUPT = -4,    /* a stored record failed its checksum or layout */
    WAL_EVERSION = -5,    /* data written by a newer format version */
    WAL_EFULL = -6,       /* storage full: map at its maximum or disk full */
    WAL_EFATAL = -7,      /* an earlier fsync/write error stopped the WAL */
    WAL_EIO = -8,         /* I/O error (this call) */
    WAL_ECLOSED = -9,     /* the WAL is closing or was opened read-only */
    WAL_ETRUNCATED = -10, /* the requested offset was dropped by retention */
    WAL_ELMDB = -11,      /* another LMDB error (environment version, invalid file) */
    WAL_EBUSY = -12,      /* the environment is locked or out of readers */
};

const char *wal_strerror(int err);

/* Limits enforced on every message (WAL_EINVAL when exceeded). */
#define WAL_STREAM_NAME_MAX 255u
#define WAL_PRODUCER_MAX    255u
#define WAL_MSGID_MAX       255u
#define WAL_SESSION_MAX     255u
#define WAL_SECRET_MAX      64u /* a session's resume-token digest */
#define WAL_HEADERS_MAX     65535u

enum wal_sync_mode {
    WAL_SYNC_FULL = 0, /* default: every commit is fsynced before completion */
    WAL_SYNC_NONE = 1, /* UNSAFE, development only: no fsync at all */
};

enum wal_direction {
    WAL_DIR_IN = 0,  /* published by a client */
    WAL_DIR_OUT = 1, /* published by a backend through the server API */
};

typedef struct wal_options {
    const char *dir;           /* data directory; created if missing (0700) */
    int read_only;             /* open read-only: no writer thread, no appends */
    enum wal_sync_mode sync;   /* WAL_SYNC_FULL unless you accept data loss */
    uint64_t map_size;         /* initial LMDB map size in bytes (0: 64 MiB) */
    uint64_t map_size_max;     /* map grows up to this, then WAL_EFULL (0: 16 GiB) */
    uint32_t batch_max_msgs;   /* group commit: max messages per txn (0: 8192) */
    uint64_t batch_max_bytes;  /* group commit: max payload bytes per txn (0: 32 MiB) */
    uint32_t batch_wait_us;    /* extra wait for more appends before a commit (0: none) */
    uint32_t batch_wait_msgs;  /* ... only while fewer messages are queued (0: batch_max_msgs) */
    uint32_t retain_chunk;     /* retention: records dropped per txn (0: 20000) */
    uint32_t max_readers;      /* LMDB reader slots (0: 512) */
    uint64_t max_record_bytes; /* largest payload accepted (0: 64 MiB) */
    /* Journal (docs/wal-format.md): a batch is durable once its entry is
     * appended and fdatasynced to <dir>/journal; its LMDB writes join a
     * transaction committed (folded in) after apply_us, or once no work
     * came for apply_idle_us. Off with no_journal (and with WAL_SYNC_NONE):
     * every batch is then its own synced LMDB commit. */
    int no_journal;
    uint64_t journal_max;   /* journal file size limit (0: 64 MiB) */
    uint32_t apply_us;      /* fold the journal into LMDB at least this often (0: 10000) */
    uint32_t apply_idle_us; /* ... or after this long without work (0: 1000) */
} wal_options_t;

typedef struct wal wal_t;

/*
 * Open (creating if needed) the WAL in opts->dir. Clears stale reader slots
 * of dead processes (mdb_reader_check), checks the format version (a newer
 * one is refused with WAL_EVERSION), and rebuilds the in-memory stream heads.
 *
 * base: if non-NULL, append completions run as callbacks on the thread that
 * runs this event_base (the WAL activates an event on it; libevent must have
 * pthreads support enabled with evthread_use_pthreads() before the base was
 * created). If NULL, completions run on the WAL writer thread and must be
 * quick and must not call into the WAL except wal_append_* accessors and
 * wal_append_free.
 *
 * On failure *ret_wal is untouched; if errbuf is non-NULL, a one-line
 * human-readable explanation is written to it.
 */
int wal_open(const wal_options_t *opts, struct event_base *base, wal_t **ret_wal, char *errbuf,
             size_t errlen);

/*
 * Stop accepting appends, let the writer finish every submitted request
 * (their callbacks run; on the event-loop path they are delivered before
 * wal_close returns only if the loop still runs: pending loop-side
 * completions are run inline by wal_close), join the writer, close LMDB.
 */
void wal_close(wal_t *wal);

/* A fatal error stopped the WAL (fail-stop after an fsync/write error). */
int wal_is_failed(const wal_t *wal);

/*
 * The WAL's state, for /health, metrics and the log.
 *   WAL_STATE_OK      appends are taken.
 *   WAL_STATE_FULL    the last batch was refused for lack of space
 *                     (WAL_EFULL): the map is at map_size_max, or the
 *                     filesystem has no room for the map to grow (the WAL
 *                     keeps data.mdb's blocks allocated ahead of its map,
 *                     so a full disk is met before anything is written), or
 *                     acknowledged journal entries could not be folded into
 *                     LMDB (then every append is refused until the fold,
 *                     retried every second, succeeds). Reads go on. Back to
 *                     OK by itself: at the next batch that commits, or when a
 *                     growth or fold retried while idle succeeds.
 *   WAL_STATE_FAILED  fail-stop after a write or fsync error (final).
 */
enum wal_state { WAL_STATE_OK = 0, WAL_STATE_FULL = 1, WAL_STATE_FAILED = 2 };
#define WAL_STATE_REASON_MAX 240
typedef struct wal_state_info {
    enum wal_state state;
    int64_t since_us;          /* CLOCK_REALTIME: entered this state (0: since open) */
    uint64_t changes;          /* state changes since open */
    uint64_t reloads;          /* stream heads rebuilt after a deferred fold (see wal_reloads) */
    uint64_t disk_free_bytes;  /* the data directory's filesystem, for the unprivileged */
    uint64_t disk_total_bytes; /* (statvfs; 0 when unknown) */
    int preallocated;          /* data.mdb's blocks are allocated ahead of the map */
    char reason[WAL_STATE_REASON_MAX]; /* why ("" when OK), e.g. "fdatasync of the journal: ..." */
} wal_state_info_t;
void wal_state_get(wal_t *wal, wal_state_info_t *ret);
/* The state alone: one atomic read. */
enum wal_state wal_state_now(const wal_t *wal);
/* cb(arg) runs on the event loop (the base given to wal_open) after each
 * state change; read the new state with wal_state_get. Set it before
 * submitting appends; none without a base. */
void wal_on_state(wal_t *wal, void (*cb)(void *arg), void *arg);
/* Incremented when the writer rebuilt its stream heads from LMDB after a
 * fold that had been deferred for lack of space (open on a full disk, or a
 * fold that found no room): stream metadata read before it may be behind
 * (the folded entries add records). Cheap; for wal_on_visible callbacks. */
uint64_t wal_reloads(const wal_t *wal);

/* The sequence after the last acknowledged append of this (read-write)
 * handle, those still only in the journal included; a cheap atomic read.
 * wal_stats_t.acked_next_seq is the same, or LMDB's next_seq if higher. */
uint64_t wal_acked_next_seq(wal_t *wal);

/*
 * For read-only tools: if dir holds a journal with entries LMDB lacks (a
 * writer stopped without folding it, e.g. a crash) and no process writes
 * the WAL now, fold them into LMDB (a brief read-write open). Does nothing
 * when there is no journal or a writer holds it (that writer folds).
 * *ret_entries: entries folded. Returns 0 or a WAL_E* code.
 */
int wal_fold_journal(const char *dir, uint64_t *ret_entries, char *errbuf, size_t errlen);

/* ---- appends ----------------------------------------------------------- */

typedef struct wal_msg {
    const char *stream; /* 1..WAL_STREAM_NAME_MAX bytes, not NUL-terminated */
    size_t stream_len;
    const void *payload;
    size_t payload_len;
    const void *producer; /* optional; with msgid forms the dedup key */
    size_t producer_len;
    const void *msgid; /* optional; if both set, duplicates are not appended */
    size_t msgid_len;
    const void *headers; /* optional opaque bytes (the broker uses msgpack) */
    size_t headers_len;
    enum wal_direction direction;
    int64_t timestamp_us; /* 0: the writer stamps the append time */
} wal_msg_t;

typedef struct wal_result {
    uint64_t offset; /* offset in the stream (the original one if duplicate) */
    uint64_t seq;    /* global sequence (0 if duplicate) */
    uint64_t epoch;  /* the stream's epoch */
    int duplicate;   /* 1: (producer, msgid) was already in the WAL */
} wal_result_t;

typedef struct wal_append wal_append_t;
typedef void (*wal_append_cb)(wal_append_t *req, void *arg);

/*
 * A request: messages for any streams plus cursor updates, appended
 * atomically in one transaction (possibly together with other requests:
 * group commit). Build it, submit it, and the callback is called once after
 * the commit that holds it returned - or after it failed. wal_append_add_*
 * copy everything they are given.
 */
int wal_append_new(wal_append_cb cb, void *arg, wal_append_t **ret_req);
int wal_append_add_msg(wal_append_t *req, const wal_msg_t *msg);
/* Optional: make room for n_msgs more messages and `bytes` more copied
 * bytes (stream names, producers, ids, headers, payloads) at once, so the
 * adds that follow do not reallocate. WAL_ENOMEM on failure. */
int wal_append_reserve(wal_append_t *req, size_t n_msgs, size_t bytes);
/* Durable cursor: (session, stream) -> acked offset, latest write wins. The
 * stream must exist when the request is written: already committed, or
 * created by a message of the same request (or of a request committed in
 * the same batch). Otherwise the whole request fails with WAL_ENOTFOUND. */
int wal_append_add_cursor(wal_append_t *req, const void *session, size_t session_len,
                          const char *stream, size_t stream_len, uint64_t offset);

/* Remove the cursor (session, stream), if any. An unknown stream is not an
 * error here: there is nothing to remove. */
int wal_append_del_cursor(wal_append_t *req, const void *session, size_t session_len,
                          const char *stream, size_t stream_len);

/* A session: survives connections (and restarts) until the broker expires
 * it. owner: who may resume it (a token subject; empty for anonymous);
 * secret: a digest of its resume token (the WAL stores it, nothing more). */
typedef struct wal_session {
    int64_t created_us;
    int64_t seen_us; /* when it was last known to be connected */
    uint8_t owner_len, secret_len;
    uint8_t owner[WAL_PRODUCER_MAX];
    uint8_t secret[WAL_SECRET_MAX];
} wal_session_t;
/* Create or overwrite session `session` (latest write wins). */
int wal_append_put_session(wal_append_t *req, const void *session, size_t session_len,
                           const wal_session_t *s);
/* Remove the session and every cursor it has. */
int wal_append_del_session(wal_append_t *req, const void *session, size_t session_len);

/*
 * Hand the request to the writer. On success the WAL owns it until the
 * callback, after which the caller owns it again and frees it with
 * wal_append_free. On failure (WAL_ECLOSED, WAL_EFATAL, WAL_EINVAL; WAL_EBUSY
 * during a wal_restore_* call) the callback is never called and the caller
 * still owns the request.
 * WAL_EINVAL: an empty request (no message, no cursor) or a payload above
 * max_record_bytes.
 */
int wal_append_submit(wal_t *wal, wal_append_t *req);

/*
 * Complete this request as soon as it is durable (its journal entry is
 * fdatasynced) instead of once LMDB readers can see its records: a publish
 * may be acknowledged and its record handed to live subscribers from
 * memory before wal_stream_read returns it (opts.visible_cb says when it
 * does). Requests with cursor or session writes complete when readable.
 * Call before wal_append_submit.
 */
void wal_append_when_durable(wal_append_t *req);

/*
 * cb(arg) runs on the event loop (the base given to wal_open) after an LMDB
 * commit made new records readable through wal_stream_read and friends:
 * for readers that wait for records acknowledged earlier through
 * wal_append_when_durable. Set it before submitting appends.
 */
void wal_on_visible(wal_t *wal, void (*cb)(void *arg), void *arg);

/* In the callback: 0, or the error that failed the whole request
 * (WAL_EFULL, WAL_EFATAL, WAL_EIO, WAL_ENOTFOUND for a cursor on an
 * unknown stream, WAL_ECLOSED). Nothing of a failed request was written. */
int wal_append_status(const wal_append_t *req);
size_t wal_append_count(const wal_append_t *req);
/* Result of the i-th message (i < wal_append_count); valid after success. */
const wal_result_t *wal_append_result(const wal_append_t *req, size_t i);
/* The headers and payload the request copied for message i (borrowed:
 * valid until wal_append_free). WAL_EINVAL if i is out of range. */
int wal_append_msg_data(const wal_append_t *req, size_t i, const uint8_t **ret_headers,
                        size_t *ret_headers_len, const uint8_t **ret_payload,
                        size_t *ret_payload_len);
/* In the callback: when the writer took the request into a batch and when
 * it completed it (CLOCK_MONOTONIC, microseconds; 0 if it never got that
 * far, e.g. failed at submit). For latency breakdowns (/metrics). */
void wal_append_times(const wal_append_t *req, int64_t *ret_taken_us, int64_t *ret_done_us);
void wal_append_free(wal_append_t *req);

/*
 * Convenience for threads that are not an event loop (tools, tests,
 * benchmarks): submit n messages as one request and block until it is
 * committed. results (n entries) may be NULL. Works whatever base was given
 * to wal_open; concurrent callers are group-committed together.
 */
int wal_append_sync(wal_t *wal, const wal_msg_t *msgs, size_t n, wal_result_t *results);
/* The same, returning at the durable point (wal_append_when_durable), as
 * arqd acknowledges publishes: the records may not be readable yet. */
int wal_append_sync_durable(wal_t *wal, const wal_msg_t *msgs, size_t n, wal_result_t *results);

/* ---- reads ------------------------------------------------------------- */

/* A record as read. Pointers point into the LMDB map and are valid only
 * during the callback that receives it. */
typedef struct wal_record {
    uint64_t seq;
    uint64_t offset;
    int64_t timestamp_us;
    uint32_t stream_id;
    enum wal_direction direction;
    const char *stream; /* stream name (not NUL-terminated) */
    size_t stream_len;
    const uint8_t *producer;
    size_t producer_len;
    const uint8_t *msgid;
    size_t msgid_len;
    const uint8_t *headers;
    size_t headers_len;
    const uint8_t *payload;
    size_t payload_len;
    uint64_t checksum; /* the stored (verified) XXH3-64 */
} wal_record_t;

/* Return 0 to continue, non-zero to stop the read early (not an error).
 * The callback runs inside a read transaction: it must not append (a map
 * resize waits for read transactions to end) and should be quick. */
typedef int (*wal_record_cb)(const wal_record_t *rec, void *arg);

/* Where a read stopped. On WAL_ECORRUPT, bad_* locate the bad record. */
typedef struct wal_read_result {
    uint64_t next;       /* next offset (stream reads) or seq (log reads) to read */
    uint32_t count;      /* records passed to the callback */
    uint64_t bad_seq;    /* on WAL_ECORRUPT: the sequence (0 if unknown) */
    uint64_t bad_offset; /* on WAL_ECORRUPT in a stream read: the offset */
} wal_read_result_t;

/*
 * Read a stream from offset `from` (>= 1) in one read transaction: at most
 * max_msgs records and about max_bytes of payload (always at least one
 * record). Returns 0 (also when nothing is there yet: count 0),
 * WAL_ENOTFOUND (no such stream), WAL_ETRUNCATED (from < the stream's first
 * offset; res->next is that first offset), WAL_ECORRUPT (checksum or layout;
 * nothing of the bad record reaches the callback).
 */
int wal_stream_read(wal_t *wal, const char *stream, size_t stream_len, uint64_t from,
                    uint32_t max_msgs, uint64_t max_bytes, wal_record_cb cb, void *arg,
                    wal_read_result_t *res);

/* Read the whole log by global sequence from `from` (>= 1), for sync and
 * tools. Same contract as wal_stream_read; a sequence below the first one
 * still held starts at the first one. */
int wal_log_read(wal_t *wal, uint64_t from, uint32_t max_msgs, uint64_t max_bytes, wal_record_cb cb,
                 void *arg, wal_read_result_t *res);

typedef struct wal_stream_info {
    uint32_t id;
    uint64_t epoch;
    uint64_t first_offset; /* first offset still held (== next when empty) */
    uint64_t next_offset;  /* offset the next message will get */
    int64_t created_us;
    const char *name; /* valid during the callback only (stream_list) */
    size_t name_len;
} wal_stream_info_t;

/* Stream metadata as committed (name is set to NULL). */
int wal_stream_get(wal_t *wal, const char *stream, size_t stream_len, wal_stream_info_t *ret);
typedef int (*wal_stream_cb)(const wal_stream_info_t *info, void *arg);
int wal_stream_list(wal_t *wal, wal_stream_cb cb, void *arg);

/* Durable cursor and dedup lookups (WAL_ENOTFOUND when absent). */
int wal_cursor_get(wal_t *wal, const void *session, size_t session_len, const char *stream,
                   size_t stream_len, uint64_t *ret_offset);
/* Sessions: one (WAL_ENOTFOUND when absent), all of them (the callback
 * returns non-zero to stop; the id is borrowed for the call), and the
 * cursors of one (stream name borrowed for the call; cursors whose stream
 * is gone are skipped). */
int wal_session_get(wal_t *wal, const void *session, size_t session_len, wal_session_t *ret);
typedef int (*wal_session_cb)(const char *session, size_t session_len, const wal_session_t *s,
                              void *arg);
int wal_session_list(wal_t *wal, wal_session_cb cb, void *arg);
typedef int (*wal_cursor_cb)(const char *stream, size_t stream_len, uint64_t offset,
                             int64_t updated_us, void *arg);
int wal_session_cursors(wal_t *wal, const void *session, size_t session_len, wal_cursor_cb cb,
                        void *arg);
/* Every durable cursor (sync uses it): session and stream name borrowed for
 * the call; the callback returns non-zero to stop. */
typedef int (*wal_cursor_all_cb)(const char *session, size_t session_len, const char *stream,
                                 size_t stream_len, uint64_t offset, int64_t updated_us, void *arg);
int wal_cursor_list(wal_t *wal, wal_cursor_all_cb cb, void *arg);
/* The dedup entry of (producer, stream, msgid): a message id is unique per
 * producer and stream (the same id on another stream is another message). */
int wal_dedup_get(wal_t *wal, const void *producer, size_t producer_len, const char *stream,
                  size_t stream_len, const void *msgid, size_t msgid_len, uint32_t *ret_stream_id,
                  uint64_t *ret_offset);

#define WAL_HIST_BUCKETS 19
typedef struct wal_stats {
    uint64_t first_seq; /* first sequence held (== next_seq when empty) */
    uint64_t next_seq;
    uint64_t map_size;       /* current LMDB map size */
    uint64_t used_bytes;     /* pages in use * page size */
    uint64_t live_bytes;     /* pages of data (B-trees), free pages excluded: what
                                retention shrinks (used_bytes is a high-water mark) */
    uint64_t commits;        /* successful commits by this process's writer */
    uint64_t committed_msgs; /* messages of committed requests, duplicates included */
    uint64_t failed_commits; /* batches that failed (map-growth retries excluded) */
    uint64_t map_grows;
    /* Histograms of this process's successful commits (cumulative counts
     * per bucket; the last bucket is +Inf). */
    uint64_t commit_us_buckets[WAL_HIST_BUCKETS]; /* upper bounds: wal_commit_us_bounds */
    uint64_t commit_us_sum;
    uint64_t batch_buckets[WAL_HIST_BUCKETS]; /* messages per commit: wal_batch_bounds */
    /* "commits" above are durable points (journal entries, or direct LMDB
     * commits); applies are LMDB commits (folds of the journal included) */
    uint64_t applies;
    uint64_t apply_us_sum;
    uint64_t recovered_entries; /* journal entries folded in at open */
    /* next_seq counting every acknowledged append, also those still only in
     * the journal (next_seq is what LMDB, and so every reader, holds) */
    uint64_t acked_next_seq;
    int journal;        /* this handle writes a journal */
    int64_t created_us; /* when this WAL was created (meta "created_us"; 0: not recorded) */
} wal_stats_t;
/* Bucket upper bounds (WAL_HIST_BUCKETS - 1 finite ones; then +Inf). */
extern const uint64_t wal_commit_us_bounds[WAL_HIST_BUCKETS - 1];
extern const uint64_t wal_batch_bounds[WAL_HIST_BUCKETS - 1];
int wal_stats_get(wal_t *wal, wal_stats_t *ret);

/* ---- retention --------------------------------------------------------- */

/*
 * Drop every record with sequence <= upto_seq, with its stream index and
 * dedup entries, and advance the streams' first offsets. The caller proves
 * this is safe (e.g. synced to MySQL). Runs on the writer thread in chunks
 * of retain_chunk records per transaction, appends taking priority between
 * chunks. Blocks until done; returns the number dropped via ret_dropped.
 * WAL_EBUSY during a wal_restore_* call.
 */
int wal_retain(wal_t *wal, uint64_t upto_seq, uint64_t *ret_dropped);

/* ---- restore and backup (arq-replay) ------------------------------------- */

/*
 * Rebuild a WAL from another copy of its records (arq-replay restore: rows
 * of MySQL's arq_messages, readable records of a damaged or older WAL).
 * Records keep their sequence, offset, timestamp, producer, message id,
 * direction, headers and payload, and streams keep the id and epoch they are
 * given, so a restored record is byte for byte the original (same checksum).
 * The result is an ordinary WAL of the same format: a stream that starts
 * above offset 1 looks as if retention had dropped the offsets below it, and
 * sequences may have holes (records that were not restored).
 *
 * Only for a WAL opened for writing that nobody else uses meanwhile (the
 * tool's own new directory): each call takes the writer's place and fails
 * with WAL_EBUSY if an append or retention is queued or running; appends
 * submitted during a call fail with WAL_EBUSY. Each call is one durable
 * transaction (the map grows as for appends; WAL_EFULL at map_size_max).
 */
typedef struct wal_restore_stream {
    const char *stream; /* 1..WAL_STREAM_NAME_MAX bytes, not NUL-terminated */
    size_t stream_len;
    uint32_t id;           /* the stream's id (0: the next free one); must be free */
    uint64_t epoch;        /* non-zero */
    uint64_t first_offset; /* >= 1: the stream is empty and its next offset is this */
    int64_t created_us;
} wal_restore_stream_t;

/* Create a stream with a given id, epoch and first offset. WAL_EINVAL if it
 * exists already, its id is taken, or an argument is out of range. */
int wal_restore_stream(wal_t *wal, const wal_restore_stream_t *s);

typedef struct wal_restore_msg {
    wal_msg_t msg;   /* as for appends; timestamp_us is stored as given */
    uint64_t seq;    /* >= 1 and not yet in the WAL; any order */
    uint64_t offset; /* the stream's next offset (offsets stay contiguous) */
} wal_restore_msg_t;

/* Write n records in one transaction (all or nothing). Each one's stream
 * must have been created by wal_restore_stream (or exist), and its offset
 * be that stream's next one, counting the records before it in msgs. Dedup
 * entries are written for records with a message id (a later one with the
 * same key replaces an earlier one). The WAL's next sequence becomes larger
 * than every sequence written. WAL_EINVAL: a record breaks these rules (a
 * taken sequence, a wrong offset, an unknown stream, a limit). */
int wal_restore_append(wal_t *wal, const wal_restore_msg_t *msgs, size_t n);

/* Make the next appended record's sequence at least next_seq (e.g. the MySQL
 * sync watermark + 1, so the drain never meets a sequence twice). Never
 * lowers it. */
int wal_restore_seq(wal_t *wal, uint64_t next_seq);

/*
 * Hot backup: a consistent, compacted copy of the WAL as it was at one
 * moment (one LMDB read transaction, mdb_env_copy2 with MDB_CP_COMPACT),
 * written to dir/data.mdb (mode 0600) and fsynced with its directory. dir
 * must exist and hold no data.mdb. Works on a read-only handle, next to a
 * running writer (which cannot reuse the pages freed while the copy runs, so
 * the WAL may grow meanwhile; on a writable handle of the same process a map
 * resize waits for the copy to end). A failed copy removes its partial file.
 * The copy is an ordinary data directory: open it, or point arqd at it.
 */
int wal_backup(wal_t *wal, const char *dir, char *errbuf, size_t errlen);

#endif
