/*
 * replay.h - where catch-up reads for subscriptions come from.
 *
 * The broker delivers a subscription that is behind the stream's in-memory
 * tail by asking replay for the records from its position on, in bounded
 * batches (the broker's flow control decides how many). Today the records
 * come from the WAL; the sync issue puts MySQL's cold tier behind the same
 * call for offsets the WAL no longer holds. When neither holds an offset,
 * replay reports the exact missing range so the subscriber gets a gap
 * report instead of a silent skip.
 *
 * Runs on the caller's thread (the broker's loop); a WAL read is one short
 * LMDB read transaction.
 */
#ifndef ARQ_REPLAY_H
#define ARQ_REPLAY_H

#include <stddef.h>
#include <stdint.h>

#include "wal.h"

typedef struct rpl rpl_t;

enum rpl_status {
    RPL_OK = 0,      /* res.count records passed to the callback (0: none yet) */
    RPL_GAP = 1,     /* offsets res.gap_from..res.gap_to exist nowhere; continue at res.next */
    RPL_ENOSTREAM = 2, /* the stream does not exist (yet) */
    RPL_EREAD = 3,   /* a read failed (corruption, I/O): res.wal_error says which */
};

typedef struct rpl_result {
    uint32_t count;           /* records passed to the callback */
    uint64_t next;            /* the offset to ask for next */
    uint64_t gap_from, gap_to; /* RPL_GAP: the missing range, inclusive */
    int wal_error;            /* RPL_EREAD: the WAL_E* code */
    uint64_t bad_offset;      /* RPL_EREAD on WAL_ECORRUPT: the bad record's offset */
} rpl_result_t;

int rpl_new(wal_t *wal, rpl_t **ret);
void rpl_free(rpl_t *r);

/* Records of stream from offset `from` on, at most max_msgs and about
 * max_bytes of payload, in offset order; cb's record is valid during the
 * call only and cb returns non-zero to stop early. */
enum rpl_status rpl_read(rpl_t *r, const char *stream, size_t stream_len, uint64_t from,
                         uint32_t max_msgs, uint64_t max_bytes, wal_record_cb cb, void *arg,
                         rpl_result_t *res);

typedef struct rpl_stats {
    uint64_t reads, records, bytes, gaps, errors;
} rpl_stats_t;
void rpl_stats_get(const rpl_t *r, rpl_stats_t *ret);

#endif
