/*
 * wal_journal.h - the byte layout of the WAL's journal (docs/wal-format.md,
 * "Journal"). Pure functions: no I/O, no allocation, safe on hostile input.
 *
 * The journal is a redo log in front of LMDB: each group commit appends one
 * entry holding the LMDB writes of its batch (puts and deletes, in order),
 * is made durable with one fdatasync, and is folded into LMDB later. An
 * entry starts at a multiple of WAL_JOURNAL_ALIGN:
 *
 *   0  u32 magic "ARQJ" (big-endian)
 *   4  u32 body length
 *   8  u64 entry sequence number (jseq), little-endian
 *  16  u64 XXH3-64 of the body, seeded with jseq ^ body length
 *  24  body: ops
 *
 * An op: u8 kind, u8 db, u16 zero, u32 key length, u32 value length, key,
 * value (little-endian lengths; kinds and dbs below).
 */
#ifndef ARQ_WAL_JOURNAL_H
#define ARQ_WAL_JOURNAL_H

#include <stddef.h>
#include <stdint.h>

#define WAL_JOURNAL_MAGIC    0x4152514Au /* "ARQJ" */
#define WAL_JOURNAL_HDR      24u
#define WAL_JOURNAL_ALIGN    4096u
#define WAL_JOP_HDR          12u
#define WAL_JOP_KEY_MAX      511u /* LMDB's default key limit */
#define WAL_JOURNAL_BODY_MAX (1u << 30)

enum wal_jop_kind {
    WAL_JOP_PUT = 1,
    WAL_JOP_DEL = 2,        /* delete the key if present */
    WAL_JOP_DEL_PREFIX = 3, /* delete every key that starts with the key */
};

/* The databases an op may name (docs/wal-format.md lists them). */
enum wal_jop_db {
    WAL_JDB_META = 1,
    WAL_JDB_LOG,
    WAL_JDB_INDEX,
    WAL_JDB_STREAMS,
    WAL_JDB_IDS,
    WAL_JDB_CURSORS,
    WAL_JDB_DEDUP, /* format version 2's dedup keys (converted at open) */
    WAL_JDB_SESSIONS,
    WAL_JDB_DEDUP2, /* dedup keys with the stream id (format version 3) */
    WAL_JDB_COUNT = WAL_JDB_DEDUP2,
};

typedef struct wal_jentry {
    uint64_t jseq;
    const uint8_t *body; /* borrowed from the decoded buffer */
    uint32_t body_len;
    uint64_t size; /* header + body rounded up to WAL_JOURNAL_ALIGN */
} wal_jentry_t;

typedef struct wal_jop {
    uint8_t kind, db;
    const uint8_t *key, *val; /* borrowed */
    uint32_t key_len, val_len;
} wal_jop_t;

/* Bytes an entry with a body of body_len occupies (aligned). */
uint64_t wal_jentry_size(uint64_t body_len);

/* Write the header of an entry whose body is body[0..body_len). */
void wal_jentry_header(uint8_t hdr[WAL_JOURNAL_HDR], uint64_t jseq, const uint8_t *body,
                       uint32_t body_len);

/*
 * Decode the header at p (avail bytes readable from p). Returns 0 and fills
 * *e->body_len, jseq and size when the header is well formed and the body
 * fits in avail (the checksum is not checked: see wal_jentry_verify), -1
 * otherwise (zeroes, garbage or a torn entry: the end of the journal).
 */
int wal_jentry_decode_header(const uint8_t *p, uint64_t avail, wal_jentry_t *e);

/* Verify e's body (e->body must point at body_len bytes). 0 or -1. */
int wal_jentry_verify(const uint8_t hdr[WAL_JOURNAL_HDR], const wal_jentry_t *e);

/* Bytes one op takes; and its encoding into dst (wal_jop_size bytes). */
size_t wal_jop_size(uint32_t key_len, uint32_t val_len);
void wal_jop_encode(uint8_t *dst, uint8_t kind, uint8_t db, const void *key, uint32_t key_len,
                    const void *val, uint32_t val_len);

/*
 * Next op of a body at *pos. Returns 1 and advances *pos, 0 at the end of
 * the body, -1 on a malformed op (unknown kind or db, a key longer than
 * WAL_JOP_KEY_MAX or empty, lengths beyond the body, a value on a delete).
 */
int wal_jop_next(const uint8_t *body, size_t len, size_t *pos, wal_jop_t *op);

#endif
