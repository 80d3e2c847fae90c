/*
 * replay.h - where catch-up reads for subscriptions come from.
 *
 * The broker delivers a subscription that is behind the stream's in-memory
 * tail by asking replay for the records from its position on, in bounded
 * batches (the broker's flow control decides how many). They come from the
 * WAL; offsets the WAL no longer holds (retention dropped them after they
 * reached MySQL) come from MySQL's cold tier when one is set: that read runs
 * on the cold tier's own thread, rpl_read answers RPL_PENDING, and the
 * subscription's wake callback runs on the loop when it can continue. When
 * neither holds an offset, replay reports the exact missing range so the
 * subscriber gets a gap report instead of a silent skip.
 *
 * Runs on the caller's thread (the broker's loop); a WAL read is one short
 * LMDB read transaction.
 */
#ifndef ARQ_REPLAY_H
#define ARQ_REPLAY_H

#include <stddef.h>
#include <stdint.h>

#include "wal.h"

struct event_base;
struct sync_cold;

typedef struct rpl rpl_t;
typedef struct rpl_sub rpl_sub_t;

enum rpl_status {
    RPL_OK = 0,        /* res.count records passed to the callback (0: none yet) */
    RPL_GAP = 1,       /* offsets res.gap_from..res.gap_to exist nowhere; continue at res.next */
    RPL_ENOSTREAM = 2, /* the stream does not exist (yet) */
    RPL_EREAD = 3,     /* a read failed (corruption, I/O): res.wal_error says which */
    RPL_PENDING = 4,   /* a cold-tier read is under way: the subscription's wake follows */
};

typedef struct rpl_result {
    uint32_t count;            /* records passed to the callback */
    uint64_t next;             /* the offset to ask for next */
    uint64_t gap_from, gap_to; /* RPL_GAP: the missing range, inclusive */
    int wal_error;             /* RPL_EREAD: the WAL_E* code */
    uint64_t bad_offset;       /* RPL_EREAD on WAL_ECORRUPT: the bad record's offset */
} rpl_result_t;

int rpl_new(wal_t *wal, rpl_t **ret);
void rpl_free(rpl_t *r);
/* Serve offsets below the WAL's first from MySQL (sync/cold.c). base: the
 * loop that runs rpl_read (for retry timers). */
void rpl_set_cold(rpl_t *r, struct sync_cold *cold, struct event_base *base);

/* One per subscription that may need the cold tier: wake(arg) runs on the
 * loop when a read that answered RPL_PENDING can go on. Freeing cancels a
 * read under way (wake is then never called). */
rpl_sub_t *rpl_sub_new(rpl_t *r, void (*wake)(void *arg), void *arg);
void rpl_sub_free(rpl_sub_t *s);

/* Records of stream from offset `from` on, at most max_msgs and about
 * max_bytes of payload, in offset order; cb's record is valid during the
 * call only and cb returns non-zero to stop early. rs may be NULL (no cold
 * tier for this read: offsets below the WAL are a gap). Records served from
 * the cold tier have seq 0 and stream_id 0. */
enum rpl_status rpl_read(rpl_t *r, rpl_sub_t *rs, const char *stream, size_t stream_len,
                         uint64_t from, uint32_t max_msgs, uint64_t max_bytes, wal_record_cb cb,
                         void *arg, rpl_result_t *res);

typedef struct rpl_stats {
    uint64_t reads, records, bytes, gaps, errors;
    uint64_t cold_reads, cold_records, cold_errors;
} rpl_stats_t;
void rpl_stats_get(const rpl_t *r, rpl_stats_t *ret);

#endif
