/*
 * arq_replay.h - what the files of arq-replay share (programs/arq_replay*.c):
 * options, output, the progress bar, owned copies of records, and a source
 * that reads a stream's range from the WAL and, below what the WAL still
 * holds, from MySQL.
 */
#ifndef ARQ_REPLAY_H
#define ARQ_REPLAY_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "replay_range.h"
#include "sync.h"
#include "sync_tools.h"
#include "wal.h"

/* Exit codes (docs/operations.md, "arq-replay"). */
enum { RP_OK = 0, RP_PROBLEMS = 1, RP_USAGE = 2 };

#define RP_BATCH_RECORDS 1000u
#define RP_BATCH_BYTES   (8u << 20)

/* Options every command understands. */
typedef struct rp_opts {
    const char *data_dir; /* --data-dir, else $ARQ_DATA_DIR */
    const char *db_url;   /* --database-url, else $DATABASE_URL */
    bool json;            /* --json: one JSON document (dump: one per line) on stdout */
    bool progress;        /* a progress bar on stderr (a terminal, not --no-progress) */
    const char *argv0;
} rp_opts_t;

/* Messages: "arq-replay: ..." on stderr. */
void rp_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Human text on stdout unless --json. */
void rp_say(const rp_opts_t *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Print a JSON value on stdout (compact, one line) and free it. */
int rp_json_print(json_t *v);
/* A u64 that JSON numbers (doubles in many parsers) cannot hold exactly:
 * epochs and checksums go out as strings. */
json_t *rp_json_u64s(uint64_t v);
/* Bytes as a JSON string if valid UTF-8, else NULL. */
json_t *rp_json_text(const uint8_t *p, size_t n);
/* Base64 (RFC 4648, padded); malloc'd. */
char *rp_base64(const uint8_t *p, size_t n);
/* Human size: "12.3 KiB". */
const char *rp_size(uint64_t bytes, char buf[32]);

/* ---- progress ------------------------------------------------------------ */

typedef struct rp_progress {
    bool on;
    const char *label;
    uint64_t total, done;
    int64_t start_us, last_us;
} rp_progress_t;
void rp_progress_start(rp_progress_t *p, const rp_opts_t *o, const char *label, uint64_t total);
void rp_progress_add(rp_progress_t *p, uint64_t n);
void rp_progress_end(rp_progress_t *p);

/* ---- opening things ------------------------------------------------------ */

int rp_open_wal(const rp_opts_t *o, wal_t **ret);
/* NULL *ret (and 0) when no URL is configured. */
int rp_open_db(const rp_opts_t *o, sync_db_t **ret);

/* ---- owned records --------------------------------------------------------- */

typedef struct rp_rec {
    wal_record_t r; /* pointers into blob */
    uint8_t *blob;
    bool from_mysql;
} rp_rec_t;

typedef struct rp_batch {
    rp_rec_t *v;
    size_t n, cap;
    uint64_t bytes;
    bool oom;
} rp_batch_t;

/* Copy rec (a WAL record or a MySQL row made into one) into b. */
int rp_batch_add(rp_batch_t *b, const wal_record_t *rec, bool from_mysql);
int rp_batch_add_row(rp_batch_t *b, const sync_db_row_t *row, const char *stream, size_t stream_len,
                     uint32_t stream_id);
void rp_batch_clear(rp_batch_t *b);
void rp_batch_free(rp_batch_t *b);
/* wal_stream_read callback: copies into the rp_batch_t arg. */
int rp_batch_cb(const wal_record_t *rec, void *arg);

/* Does a MySQL row hold exactly the record its checksum column names (the
 * record as the WAL encodes it, with the stream's id)? */
bool rp_row_checksum_ok(const sync_db_row_t *row, uint32_t stream_id);

/* ---- a stream's range, from the WAL or MySQL ------------------------------ */

enum rp_problem_kind {
    RP_GAP = 0,          /* offsets neither the WAL nor MySQL (if asked) holds */
    RP_CORRUPT = 1,      /* a WAL record failed its checksum/layout (no good copy) */
    RP_MYSQL_CORRUPT = 2 /* a MySQL row does not match its checksum */
};
typedef void (*rp_problem_cb)(enum rp_problem_kind kind, uint64_t from, uint64_t to, uint64_t seq,
                              void *arg);

typedef struct rp_source {
    wal_t *wal;
    sync_db_t *db; /* nullable */
    const char *stream;
    size_t stream_len;
    uint32_t stream_id; /* 0 when the WAL does not know the stream */
    uint64_t epoch;
    uint64_t next, to;
    rp_problem_cb problem;
    void *arg;
    uint64_t from_wal, from_mysql;
    char err[512];
} rp_source_t;

/*
 * Where a stream's history starts and ends across the WAL and MySQL (db may
 * be NULL): *first is MySQL's lowest offset when it holds rows below the
 * WAL's first, *last the WAL's last offset (or MySQL's when the WAL does not
 * know the stream). *in_wal: the WAL knows the stream (info valid). Returns
 * 0, or -1 when neither knows it (reason in err).
 */
int rp_stream_extent(wal_t *wal, sync_db_t *db, const char *stream, size_t len,
                     wal_stream_info_t *info, bool *in_wal, uint64_t *first, uint64_t *last,
                     char *err, size_t errlen);

void rp_source_init(rp_source_t *s, wal_t *wal, sync_db_t *db, const char *stream, size_t len,
                    uint64_t from, uint64_t to, rp_problem_cb problem, void *arg);
/* The next records in offset order into b (cleared first). Returns 1 with
 * records, 0 at the end, -1 on a read error (s->err). Offsets that cannot
 * be read are reported through the problem callback and skipped. */
int rp_source_next(rp_source_t *s, rp_batch_t *b);

/* ---- commands --------------------------------------------------------------- */

int rp_cmd_streams(rp_opts_t *o, int argc, char **argv);
int rp_cmd_dump(rp_opts_t *o, int argc, char **argv);
int rp_cmd_verify(rp_opts_t *o, int argc, char **argv);
int rp_cmd_resync(rp_opts_t *o, int argc, char **argv);
int rp_cmd_republish(rp_opts_t *o, int argc, char **argv);
int rp_cmd_restore(rp_opts_t *o, int argc, char **argv);
int rp_cmd_switchover(rp_opts_t *o, int argc, char **argv);
int rp_cmd_backup(rp_opts_t *o, int argc, char **argv);

/* Parse the common options out of argv (getopt_long with the command's own
 * extra options appended; cb gets those). Returns 0, RP_USAGE (reported),
 * RP_PROBLEMS, or -1 after --help printed cmd_usage (exit 0). */
struct option;
typedef int (*rp_opt_cb)(int c, const char *arg, void *ctx);
int rp_parse(rp_opts_t *o, int argc, char **argv, const char *usage, const struct option *extra,
             rp_opt_cb cb, void *ctx, int *ret_optind);

/* --from/--to/--range into a range; the usage error is reported. */
typedef struct rp_range_args {
    replay_range_t r;
    bool any;
} rp_range_args_t;
int rp_range_opt(rp_range_args_t *ra, int c, const char *arg);
/* Option codes of rp_range_opt (to put in a command's option table). */
enum { RP_OPT_FROM = 0x100, RP_OPT_TO, RP_OPT_RANGE, RP_OPT_FIRST_FREE };

#endif
