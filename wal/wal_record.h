/*
 * wal_record.h - the WAL's on-disk value codecs (byte layouts in wal_record.c
 * and docs/wal-format.md). Pure functions: no I/O, no allocation, no logging,
 * safe on hostile input; every decoder verifies the XXH3-64 checksum.
 */
#ifndef ARQ_WAL_RECORD_H
#define ARQ_WAL_RECORD_H

#include <stddef.h>
#include <stdint.h>

#define WAL_FORMAT_VERSION   3u /* 2: the journal; 3: dedup per stream (docs/wal-format.md) */
#define WAL_RECORD_VERSION   1u
#define WAL_RECORD_HEADER    48u /* fixed part of a message record */
#define WAL_STREAM_META_SIZE 48u
#define WAL_CURSOR_VAL_SIZE  24u
#define WAL_DEDUP_VAL_SIZE   32u

#define WAL_REC_FLAG_OUT    0x01u /* direction: outbound (server API) */
#define WAL_REC_FLAGS_KNOWN 0x01u

/* A message record. Decoding fills the pointers with addresses inside the
 * decoded buffer (borrowed: valid as long as that buffer is). */
typedef struct wal_rec {
    uint64_t checksum; /* set by encode, verified and set by decode */
    uint8_t version;
    uint8_t flags;
    uint32_t stream_id;
    uint64_t seq;
    uint64_t offset;
    int64_t timestamp_us;
    const uint8_t *producer;
    uint16_t producer_len;
    const uint8_t *msgid;
    uint16_t msgid_len;
    const uint8_t *headers;
    uint16_t headers_len;
    const uint8_t *payload;
    uint32_t payload_len;
} wal_rec_t;

/* Encoded size of a record with these lengths. */
size_t wal_rec_size(const wal_rec_t *rec);
/* Encode into buf (cap >= wal_rec_size). Computes and stores the checksum in
 * rec->checksum. Returns 0 or WAL_EINVAL (cap too small). */
int wal_rec_encode(wal_rec_t *rec, uint8_t *buf, size_t cap);
/* Decode and verify buf[0..len). Returns 0, WAL_ECORRUPT (bad checksum,
 * lengths that do not add up, unknown flags), or WAL_EVERSION (a valid
 * record of a newer version). *out is written only on success. */
int wal_rec_decode(const uint8_t *buf, size_t len, wal_rec_t *out);

/* Stream metadata value (key: stream name). */
typedef struct wal_stream_meta {
    uint32_t id;
    uint64_t epoch;
    uint64_t first_offset;
    uint64_t next_offset;
    int64_t created_us;
} wal_stream_meta_t;
void wal_stream_meta_encode(const wal_stream_meta_t *m, uint8_t buf[WAL_STREAM_META_SIZE]);
int wal_stream_meta_decode(const uint8_t *buf, size_t len, wal_stream_meta_t *out);

/* Cursor value (key: session, stream id). */
typedef struct wal_cursor_val {
    uint64_t offset;
    int64_t updated_us;
} wal_cursor_val_t;
void wal_cursor_val_encode(const wal_cursor_val_t *v, uint8_t buf[WAL_CURSOR_VAL_SIZE]);
int wal_cursor_val_decode(const uint8_t *buf, size_t len, wal_cursor_val_t *out);

/* Session value (key: session id): 32 bytes + owner + secret. */
#define WAL_SESSION_VAL_MIN 32u
struct wal_session;
size_t wal_session_val_size(const struct wal_session *v);
void wal_session_val_encode(const struct wal_session *v, uint8_t *buf); /* size bytes */
int wal_session_val_decode(const uint8_t *buf, size_t len, struct wal_session *out);

/* Dedup value (key: producer, msgid). */
typedef struct wal_dedup_val {
    uint32_t stream_id;
    uint64_t offset;
    int64_t time_us;
} wal_dedup_val_t;
void wal_dedup_val_encode(const wal_dedup_val_t *v, uint8_t buf[WAL_DEDUP_VAL_SIZE]);
int wal_dedup_val_decode(const uint8_t *buf, size_t len, wal_dedup_val_t *out);

/* Little-endian and big-endian fixed-width helpers (keys are big-endian so
 * that LMDB's byte order sorts them numerically). */
static inline void wal_put_le16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static inline void wal_put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static inline void wal_put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint16_t wal_get_le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}
static inline uint32_t wal_get_le32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}
static inline uint64_t wal_get_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}
static inline void wal_put_be32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * (3 - i)));
}
static inline void wal_put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * (7 - i)));
}
static inline uint32_t wal_get_be32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v = (v << 8) | p[i];
    return v;
}
static inline uint64_t wal_get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

#endif
