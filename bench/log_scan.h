/*
 * log_scan.h - read one stream's records straight out of arqd's data
 * directory, to put the catch-up rate arq-bench measures over the wire next
 * to what the storage alone delivers.
 *
 * Four ways: the cheapest, two access patterns, and the broker's own:
 *   - log_scan_cursor: liblmdb only, one read transaction, one cursor walking
 *     the `log` DB in key (sequence) order from the stream's first record to
 *     its last, summing value sizes (records of other streams in that range
 *     are skipped, and counted);
 *   - log_scan_lookup: liblmdb only, per offset an `index` get and a `log`
 *     get (the access pattern of wal_stream_read, without checksums), in
 *     read transactions of `batch` offsets;
 *   - log_scan_cursors: liblmdb only, the same walk with two cursors per
 *     read transaction of `batch` offsets: `index` from (stream, first) with
 *     MDB_NEXT, `log` with MDB_NEXT while the sequences are adjacent (one
 *     MDB_SET_KEY otherwise); what a cursor-based wal_stream_read could do;
 *   - log_scan_wal: wal_stream_read() on a read-only wal_open(), `batch`
 *     records per call: what the broker's catch-up does before it encodes
 *     and sends a message.
 *
 * Layouts: docs/wal-format.md. The environment is opened read-only
 * (MDB_RDONLY) and may be in use by a running arqd: LMDB readers do not block
 * the writer. Never call two of these at the same time in one process (LMDB:
 * one environment handle per file per process).
 *
 * All return 0, or -1 with a one-line reason in errbuf.
 */
#ifndef ARQ_BENCH_LOG_SCAN_H
#define ARQ_BENCH_LOG_SCAN_H

#include <stddef.h>
#include <stdint.h>

struct log_scan_result {
    uint64_t records;       /* records of the stream read */
    uint64_t other;         /* records of other streams skipped (cursor scan only) */
    uint64_t value_bytes;   /* sum of LMDB value sizes: 48-byte header + payload (+ ids) */
    uint64_t payload_bytes; /* sum of payload lengths */
    double seconds;         /* wall time of the reads alone (not opening) */
};

/* Offsets first..last (inclusive) of `stream`. */
int log_scan_cursor(const char *dir, const char *stream, uint64_t first, uint64_t last,
                    struct log_scan_result *ret, char *errbuf, size_t errlen);
int log_scan_lookup(const char *dir, const char *stream, uint64_t first, uint64_t last,
                    unsigned batch, struct log_scan_result *ret, char *errbuf, size_t errlen);
int log_scan_cursors(const char *dir, const char *stream, uint64_t first, uint64_t last,
                     unsigned batch, struct log_scan_result *ret, char *errbuf, size_t errlen);
int log_scan_wal(const char *dir, const char *stream, uint64_t first, uint64_t last, unsigned batch,
                 struct log_scan_result *ret, char *errbuf, size_t errlen);

#endif
