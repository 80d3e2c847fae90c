/*
 * wal_record.c - byte layouts of everything the WAL stores in LMDB.
 *
 * Keep docs/wal-format.md in step with this comment.
 *
 * All integers inside values are little-endian, fixed width. Keys are
 * big-endian so that LMDB's memcmp order is numeric order. Every value
 * starts with an XXH3-64 (seed 0) checksum of the bytes that follow it in
 * the same value; a decoder recomputes it before looking at any field, so a
 * torn or flipped value is never returned as data.
 *
 * Message record (DB "log", key = seq as u64 BE), version 1:
 *
 *   off size field
 *     0    8 checksum      XXH3-64 of bytes [8, total)
 *     8    1 version       1; a higher value means a newer format
 *     9    1 flags         bit 0: direction out (server API); others 0
 *    10    2 producer_len  <= 255
 *    12    2 msgid_len     <= 255
 *    14    2 headers_len   <= 65535
 *    16    4 stream_id     the stream's numeric id (DB "streams")
 *    20    4 payload_len
 *    24    8 seq           global sequence; equals the key
 *    32    8 offset        offset in the stream, >= 1
 *    40    8 timestamp_us  unix time, microseconds, signed
 *    48    . producer, msgid, headers, payload (in this order, no padding)
 *
 *   Valid iff total == 48 + producer_len + msgid_len + headers_len +
 *   payload_len, the checksum matches, version >= 1 and (for version 1) no
 *   unknown flag is set. A valid record of a higher version is reported as
 *   WAL_EVERSION rather than as corruption.
 *
 * Stream metadata (DB "streams", key = stream name), 48 bytes:
 *     0 8 checksum | 8 1 version (1) | 9 3 zero | 12 4 id | 16 8 epoch |
 *    24 8 first_offset | 32 8 next_offset | 40 8 created_us
 *
 * Cursor value (DB "cursors", key = u8 session_len, session, u32 BE stream
 * id), 24 bytes:
 *     0 8 checksum | 8 8 offset | 16 8 updated_us
 *
 * Session value (DB "sessions", key = session id, 1..255 bytes),
 * 32 + owner_len + secret_len bytes:
 *     0 8 checksum | 8 1 version (1) | 9 1 owner_len | 10 1 secret_len
 *     (<= 64) | 11 5 zero | 16 8 created_us | 24 8 seen_us | 32 owner,
 *     secret
 *
 * Dedup value (DB "dedup", key = u8 producer_len, producer, msgid), 32 bytes:
 *     0 8 checksum | 8 1 version (1) | 9 3 zero | 12 4 stream_id |
 *    16 8 offset | 24 8 time_us
 */
#include "wal_record.h"

#include <string.h>
#include <xxhash.h>

#include "wal.h"

static uint64_t checksum_of(const uint8_t *buf, size_t len)
{
    return (uint64_t)XXH3_64bits(buf + 8, len - 8);
}

size_t wal_rec_size(const wal_rec_t *rec)
{
    return WAL_RECORD_HEADER + (size_t)rec->producer_len + rec->msgid_len + rec->headers_len +
           (size_t)rec->payload_len;
}

int wal_rec_encode(wal_rec_t *rec, uint8_t *buf, size_t cap)
{
    size_t total = wal_rec_size(rec);
    if (cap < total)
        return WAL_EINVAL;
    buf[8] = WAL_RECORD_VERSION;
    buf[9] = rec->flags;
    wal_put_le16(buf + 10, rec->producer_len);
    wal_put_le16(buf + 12, rec->msgid_len);
    wal_put_le16(buf + 14, rec->headers_len);
    wal_put_le32(buf + 16, rec->stream_id);
    wal_put_le32(buf + 20, rec->payload_len);
    wal_put_le64(buf + 24, rec->seq);
    wal_put_le64(buf + 32, rec->offset);
    wal_put_le64(buf + 40, (uint64_t)rec->timestamp_us);
    uint8_t *p = buf + WAL_RECORD_HEADER;
    /* memcpy with a NULL source is undefined even for length 0. */
    if (rec->producer_len)
        memcpy(p, rec->producer, rec->producer_len);
    p += rec->producer_len;
    if (rec->msgid_len)
        memcpy(p, rec->msgid, rec->msgid_len);
    p += rec->msgid_len;
    if (rec->headers_len)
        memcpy(p, rec->headers, rec->headers_len);
    p += rec->headers_len;
    if (rec->payload_len)
        memcpy(p, rec->payload, rec->payload_len);
    rec->version = WAL_RECORD_VERSION;
    rec->checksum = checksum_of(buf, total);
    wal_put_le64(buf, rec->checksum);
    return 0;
}

int wal_rec_decode(const uint8_t *buf, size_t len, wal_rec_t *out)
{
    if (len < WAL_RECORD_HEADER)
        return WAL_ECORRUPT;
    uint64_t sum = wal_get_le64(buf);
    if (sum != checksum_of(buf, len))
        return WAL_ECORRUPT;
    uint8_t version = buf[8];
    if (version == 0)
        return WAL_ECORRUPT;
    if (version > WAL_RECORD_VERSION)
        return WAL_EVERSION;
    uint8_t flags = buf[9];
    if (flags & ~WAL_REC_FLAGS_KNOWN)
        return WAL_ECORRUPT;
    wal_rec_t r;
    r.checksum = sum;
    r.version = version;
    r.flags = flags;
    r.producer_len = wal_get_le16(buf + 10);
    r.msgid_len = wal_get_le16(buf + 12);
    r.headers_len = wal_get_le16(buf + 14);
    r.stream_id = wal_get_le32(buf + 16);
    r.payload_len = wal_get_le32(buf + 20);
    r.seq = wal_get_le64(buf + 24);
    r.offset = wal_get_le64(buf + 32);
    r.timestamp_us = (int64_t)wal_get_le64(buf + 40);
    if (r.producer_len > WAL_PRODUCER_MAX || r.msgid_len > WAL_MSGID_MAX)
        return WAL_ECORRUPT;
    if (wal_rec_size(&r) != len)
        return WAL_ECORRUPT;
    const uint8_t *p = buf + WAL_RECORD_HEADER;
    r.producer = p;
    p += r.producer_len;
    r.msgid = p;
    p += r.msgid_len;
    r.headers = p;
    p += r.headers_len;
    r.payload = p;
    *out = r;
    return 0;
}

void wal_stream_meta_encode(const wal_stream_meta_t *m, uint8_t buf[WAL_STREAM_META_SIZE])
{
    memset(buf, 0, WAL_STREAM_META_SIZE);
    buf[8] = 1;
    wal_put_le32(buf + 12, m->id);
    wal_put_le64(buf + 16, m->epoch);
    wal_put_le64(buf + 24, m->first_offset);
    wal_put_le64(buf + 32, m->next_offset);
    wal_put_le64(buf + 40, (uint64_t)m->created_us);
    wal_put_le64(buf, checksum_of(buf, WAL_STREAM_META_SIZE));
}

int wal_stream_meta_decode(const uint8_t *buf, size_t len, wal_stream_meta_t *out)
{
    if (len != WAL_STREAM_META_SIZE)
        return WAL_ECORRUPT;
    if (wal_get_le64(buf) != checksum_of(buf, len))
        return WAL_ECORRUPT;
    if (buf[8] != 1)
        return buf[8] > 1 ? WAL_EVERSION : WAL_ECORRUPT;
    if (buf[9] | buf[10] | buf[11])
        return WAL_ECORRUPT;
    wal_stream_meta_t m;
    m.id = wal_get_le32(buf + 12);
    m.epoch = wal_get_le64(buf + 16);
    m.first_offset = wal_get_le64(buf + 24);
    m.next_offset = wal_get_le64(buf + 32);
    m.created_us = (int64_t)wal_get_le64(buf + 40);
    if (m.first_offset == 0 || m.first_offset > m.next_offset)
        return WAL_ECORRUPT;
    *out = m;
    return 0;
}

void wal_cursor_val_encode(const wal_cursor_val_t *v, uint8_t buf[WAL_CURSOR_VAL_SIZE])
{
    wal_put_le64(buf + 8, v->offset);
    wal_put_le64(buf + 16, (uint64_t)v->updated_us);
    wal_put_le64(buf, checksum_of(buf, WAL_CURSOR_VAL_SIZE));
}

int wal_cursor_val_decode(const uint8_t *buf, size_t len, wal_cursor_val_t *out)
{
    if (len != WAL_CURSOR_VAL_SIZE || wal_get_le64(buf) != checksum_of(buf, len))
        return WAL_ECORRUPT;
    out->offset = wal_get_le64(buf + 8);
    out->updated_us = (int64_t)wal_get_le64(buf + 16);
    return 0;
}

size_t wal_session_val_size(const wal_session_t *v)
{
    return WAL_SESSION_VAL_MIN + v->owner_len + v->secret_len;
}

void wal_session_val_encode(const wal_session_t *v, uint8_t *buf)
{
    size_t n = wal_session_val_size(v);
    memset(buf, 0, WAL_SESSION_VAL_MIN);
    buf[8] = 1;
    buf[9] = v->owner_len;
    buf[10] = v->secret_len;
    wal_put_le64(buf + 16, (uint64_t)v->created_us);
    wal_put_le64(buf + 24, (uint64_t)v->seen_us);
    memcpy(buf + WAL_SESSION_VAL_MIN, v->owner, v->owner_len);
    memcpy(buf + WAL_SESSION_VAL_MIN + v->owner_len, v->secret, v->secret_len);
    wal_put_le64(buf, checksum_of(buf, n));
}

int wal_session_val_decode(const uint8_t *buf, size_t len, wal_session_t *out)
{
    if (len < WAL_SESSION_VAL_MIN || wal_get_le64(buf) != checksum_of(buf, len))
        return WAL_ECORRUPT;
    if (buf[8] != 1 || buf[10] > WAL_SECRET_MAX || buf[11] || buf[12] || buf[13] || buf[14] ||
        buf[15] || len != WAL_SESSION_VAL_MIN + (size_t)buf[9] + buf[10])
        return WAL_ECORRUPT;
    out->owner_len = buf[9];
    out->secret_len = buf[10];
    out->created_us = (int64_t)wal_get_le64(buf + 16);
    out->seen_us = (int64_t)wal_get_le64(buf + 24);
    memcpy(out->owner, buf + WAL_SESSION_VAL_MIN, out->owner_len);
    memcpy(out->secret, buf + WAL_SESSION_VAL_MIN + out->owner_len, out->secret_len);
    return 0;
}

void wal_dedup_val_encode(const wal_dedup_val_t *v, uint8_t buf[WAL_DEDUP_VAL_SIZE])
{
    memset(buf, 0, WAL_DEDUP_VAL_SIZE);
    buf[8] = 1;
    wal_put_le32(buf + 12, v->stream_id);
    wal_put_le64(buf + 16, v->offset);
    wal_put_le64(buf + 24, (uint64_t)v->time_us);
    wal_put_le64(buf, checksum_of(buf, WAL_DEDUP_VAL_SIZE));
}

int wal_dedup_val_decode(const uint8_t *buf, size_t len, wal_dedup_val_t *out)
{
    if (len != WAL_DEDUP_VAL_SIZE || wal_get_le64(buf) != checksum_of(buf, len))
        return WAL_ECORRUPT;
    if (buf[8] != 1)
        return buf[8] > 1 ? WAL_EVERSION : WAL_ECORRUPT;
    if (buf[9] | buf[10] | buf[11])
        return WAL_ECORRUPT;
    wal_dedup_val_t v;
    v.stream_id = wal_get_le32(buf + 12);
    v.offset = wal_get_le64(buf + 16);
    v.time_us = (int64_t)wal_get_le64(buf + 24);
    if (v.offset == 0)
        return WAL_ECORRUPT;
    *out = v;
    return 0;
}
