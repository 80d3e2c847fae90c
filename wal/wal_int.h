/*
 * wal_int.h - what the files of the WAL module share (not a public header:
 * programs include wal.h). The module's design, on-disk layout and
 * durability rules are described at the top of wal.c; the files are
 *   wal.c          options, open (journal recovery), close, stats helpers, backup
 *   wal_append.c   building and submitting append requests, completions
 *   wal_writer.c   the writer thread: stream heads, batches, the journal's
 *                  group commits, folds into LMDB, retention
 *   wal_read.c     read transactions and every read of the WAL
 *   wal_restore.c  restores (arq-replay restore)
 *   wal_space.c    disk blocks ahead of the map, free space, the state
 */
#ifndef ARQ_WAL_INT_H
#define ARQ_WAL_INT_H

#include "wal.h"

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "wal_journal.h"
#include "wal_record.h"
#include "wal_testing.h"

#define DEF_MAP_SIZE     (64ull << 20)
#define DEF_MAP_MAX      (16ull << 30)
#define MIN_MAP_MAX      (1ull << 20)
#define DEF_BATCH_MSGS   8192u
#define DEF_BATCH_BYTES  (32ull << 20)
#define DEF_RETAIN_CHUNK 20000u
#define DEF_MAX_READERS  512u
#define DEF_MAX_RECORD   (64ull << 20)
#define DEF_JOURNAL_MAX  (64ull << 20)
#define DEF_APPLY_US     10000u
#define DEF_APPLY_IDLE   1000u
#define JOURNAL_CHUNK    (1ull << 20) /* the file grows by zero-filled chunks */

/* ---- requests ---------------------------------------------------------- */

struct pmsg {
    size_t stream, producer, msgid, headers, payload; /* offsets into buf */
    uint32_t stream_len, producer_len, msgid_len, headers_len;
    uint64_t payload_len;
    uint8_t direction;
    int64_t timestamp_us;
};

/* A small keyed write of a request: a cursor or session put/delete. */
enum pc_kind { PC_CURSOR_PUT = 0, PC_CURSOR_DEL, PC_SESSION_PUT, PC_SESSION_DEL };

struct pcursor {
    size_t session, stream; /* offsets into buf (PC_SESSION_PUT: stream = the encoded value) */
    uint32_t session_len, stream_len;
    uint64_t offset;
    uint8_t kind;
};

struct wal_append {
    wal_append_cb cb;
    void *arg;
    int status;
    bool direct;       /* complete on the writer thread even when a base is set */
    bool when_durable; /* complete once journaled, before LMDB readers see it */
    struct pmsg *msgs;
    size_t n_msgs, cap_msgs;
    wal_result_t *results;
    struct pcursor *cursors;
    size_t n_cursors, cap_cursors;
    uint8_t *buf;
    size_t buf_len, buf_cap;
    uint64_t max_payload;
    int64_t taken_us, done_us; /* CLOCK_MONOTONIC: batch taken, completed */
    struct wal_append *next;
    /* Inline room for the common request (one small message): no
     * allocation besides the request itself. */
    struct pmsg inline_msg;
    wal_result_t inline_res;
    uint8_t inline_buf[448];
};

/* ---- writer-private stream heads ---------------------------------------- */

struct head {
    char *name;
    uint32_t name_len;
    uint64_t hash;
    bool committed;            /* false: created by a batch that has not committed */
    uint32_t gen;              /* batch generation that last touched it */
    wal_stream_meta_t meta;    /* committed state */
    wal_stream_meta_t pending; /* state inside the current batch */
};

struct retain_job {
    uint64_t upto;
    uint64_t dropped;
    uint32_t chunk;
    int status;
    bool done;
};

struct wal {
    MDB_env *env;
    MDB_dbi dbi_meta, dbi_log, dbi_index, dbi_streams, dbi_ids, dbi_cursors, dbi_dedup,
        dbi_sessions, dbi_dedup2;
    wal_options_t opts;
    char *dir;
    bool read_only;
    bool no_sessions; /* read-only and the WAL has no sessions DB yet */
    bool no_dedup2;   /* read-only and the WAL has no dedup2 DB yet (format 2) */
    bool old_dedup;   /* format-2 dedup entries remain (not converted: see dedup_convert) */
    pthread_rwlock_t map_lock;

    /* queue, shared with submitters */
    pthread_mutex_t mu;
    pthread_cond_t cond;      /* writer waits for work */
    pthread_cond_t done_cond; /* retention waiters */
    wal_append_t *q_head, *q_tail;
    struct retain_job *retain;
    bool closing;
    bool writer_busy; /* the writer is working on a batch or a retention chunk */
    bool restoring;   /* a wal_restore_* call holds the writer's place */
    int failed;       /* atomic: fail-stop */
    int fault_err;
    unsigned fault_count;
    unsigned fault_alloc; /* testing: allocations that fail with ENOSPC (UINT32_MAX: all) */
    int fault_fold_err;   /* testing: the next fault_fold folds fail with this errno */
    unsigned fault_fold;
    pthread_t writer;
    bool writer_started;

    /* completions for the event loop */
    struct event_base *base;
    struct event *done_ev;
    pthread_mutex_t done_mu;
    wal_append_t *done_head, *done_tail;

    /* writer-private state */
    struct head **slots; /* open addressing by name hash */
    size_t slots_cap, n_heads;
    struct head **by_id; /* index: stream id -> head */
    size_t by_id_cap;
    uint32_t next_stream_id;
    uint64_t next_seq;
    uint32_t gen;
    struct head **touched;
    size_t n_touched, cap_touched;
    uint64_t map_size;
    uint64_t page_size;

    /* journal (docs/wal-format.md, "Journal"): two files, `journal` and
     * `journal.1`; entries go to jfd[jcur], which changes at every fold.
     * Writer-private after open. */
    int jfd[2];        /* -1: no journal: every batch commits LMDB itself */
    uint64_t jfile[2]; /* bytes of each file that exist (zero-filled past the entries) */
    unsigned jcur;     /* the file entries are appended to */
    uint64_t joff;     /* where the next entry goes in it */
    bool meta_lazy;    /* MDB_NOMETASYNC: a fold's meta page is durable at the next sync */
    uint64_t jseq;     /* the next entry's sequence number */
    uint8_t *jbuf;     /* room for the header, then the ops of the batch */
    size_t jbuf_len, jbuf_cap;
    bool jrec;      /* record LMDB writes into jbuf */
    MDB_txn *outer; /* LMDB txn holding journaled batches, not yet committed */
    int64_t outer_t0;
    uint32_t outer_batches;
    wal_append_t *wait_head, *wait_tail; /* complete when outer commits */
    int visible_pending;                 /* atomic: an LMDB commit made records readable */
    void (*visible_cb)(void *arg);
    void *visible_arg;

    /* disk space (wal_space.c); writer-private after open */
    int data_fd;   /* LMDB's descriptor of data.mdb (-1: unknown) */
    bool prealloc; /* fallocate works: data.mdb has blocks up to alloc_end >= map_size */
    uint64_t alloc_end;
    bool disk_limited;     /* the map could not grow for lack of disk: its size is the cap */
    bool nospace;          /* a commit failed with ENOSPC/EDQUOT (no preallocation) */
    bool refold;           /* acknowledged journal entries wait for a fold that had no space */
    int64_t probe_us;      /* while full: when to try the growth / the fold again */
    int64_t jext_retry_us; /* the journal could not grow: batches commit directly until then */
    uint64_t cap_cached;   /* wal_space_cap, asked of the filesystem at cap_at_us */
    int64_t cap_at_us;

    /* state (wal_state_get): written under st_mu; `state` also read atomically */
    pthread_mutex_t st_mu;
    int state;
    int64_t state_since_us;
    uint64_t state_changes;
    char state_reason[WAL_STATE_REASON_MAX];
    uint64_t reloads;  /* atomic: heads rebuilt after a deferred fold */
    int state_pending; /* atomic: tell the loop (state_cb) */
    void (*state_cb)(void *arg);
    void *state_arg;

    /* statistics (atomics) */
    uint64_t st_applies, st_apply_us_sum, st_recovered;
    uint64_t st_acked_next; /* next_seq after the last durable batch (journal included) */
    uint64_t st_commits, st_msgs, st_failed, st_grows;
    uint64_t st_commit_us[WAL_HIST_BUCKETS], st_commit_us_sum, st_batch[WAL_HIST_BUCKETS];
};

/* wal_space.c: preallocation, free space, state */
int wal_space_lock_prepare(const char *dir, unsigned max_readers);
int wal_space_init(wal_t *wal);
int wal_space_grow(wal_t *wal, uint64_t nsize, bool for_retention, uint64_t *ret_size);
uint64_t wal_space_keep(const wal_t *wal, bool for_retention);
uint64_t wal_space_cap(wal_t *wal);
void wal_space_fs(const wal_t *wal, uint64_t *ret_free, uint64_t *ret_total);
bool wal_space_nospace_eio(const wal_t *wal, int rc);
void wal_state_full(wal_t *wal);
void wal_state_ok(wal_t *wal);
void wal_refold_begin(wal_t *wal);

/* wal.c: utilities, open and journal recovery, close, backup */
void wal_hist_add(uint64_t *buckets, const uint64_t *bounds, uint64_t v);
int wal_map_mdb(int rc);
int64_t wal_mono_us(void);
int64_t wal_now_us(void);
int wal_journal_recover(wal_t *wal, char *errbuf, size_t errlen);
int wal_load_heads(wal_t *wal, MDB_txn *txn, char *errbuf, size_t errlen);

/* wal_append.c: append requests and their completion */
int wal_accepting_locked(wal_t *wal);
void wal_complete(wal_t *wal, wal_append_t *r, int status);
void wal_complete_batch(wal_t *wal, wal_append_t **reqs, size_t n, bool own_status, int status);
void wal_complete_list(wal_t *wal, wal_append_t *list, int status);
void wal_done_ev_cb(evutil_socket_t fd, short what, void *arg);
void wal_done_run(wal_t *wal);
void wal_notify_visible(wal_t *wal);
bool wal_session_ok(const void *session, size_t session_len);
bool wal_stream_ok(const char *stream, size_t stream_len);

/* The dedup key (format 3): u8 producer length, producer, stream id (u32
 * BE), message id. Returns its length (<= WAL_DEDUP_KEY_MAX). */
#define WAL_DEDUP_KEY_MAX (1 + WAL_PRODUCER_MAX + 4 + WAL_MSGID_MAX)
size_t wal_dedup_key(uint8_t *out, const void *producer, size_t producer_len, uint32_t stream_id,
                     const void *msgid, size_t msgid_len);

/* wal_writer.c: stream heads, batches, the journal, folds, retention */
void wal_batch_apply(wal_t *wal);
void wal_batch_rollback(wal_t *wal, uint64_t saved_seq, uint32_t saved_id);
void wal_batch_run(wal_t *wal, wal_append_t **reqs, size_t n);
int wal_del_prefix(MDB_txn *txn, MDB_dbi dbi, const uint8_t *prefix, size_t plen);
void wal_fail_stop(wal_t *wal, const char *what, int err);
struct head *wal_head_find(wal_t *wal, const char *name, size_t len, uint64_t h);
int wal_head_insert(wal_t *wal, const char *name, size_t len, uint64_t h, struct head **ret);
int wal_head_set_id(wal_t *wal, struct head *e);
int wal_head_touch(wal_t *wal, struct head *e);
void wal_heads_free(wal_t *wal);
void wal_heads_reset(wal_t *wal);
MDB_dbi wal_jdb_dbi(const wal_t *wal, uint8_t db);
int wal_map_grow(wal_t *wal, bool for_retention);
int wal_map_set(wal_t *wal, uint64_t size);
uint64_t wal_map_reserve(const wal_t *wal);
uint64_t wal_name_hash(const char *name, size_t len);
uint64_t wal_pages_in_use(wal_t *wal, MDB_txn *txn);
void wal_put_meta_u64(uint8_t *buf, uint64_t v);
int wal_put_record(wal_t *wal, MDB_txn *txn, wal_rec_t *rec, unsigned log_flags,
                   const uint8_t *dkey, size_t dkey_len, int64_t dedup_time_us);
int wal_txn_commit(wal_t *wal, MDB_txn *txn);
int wal_meta_sync(wal_t *wal);
int wal_write_heads(wal_t *wal, MDB_txn *txn);
int wal_write_next_seq(wal_t *wal, MDB_txn *txn);
void *wal_writer_main(void *arg);

#endif
