/*
 * wal_journal.c - encode and decode journal entries and ops (layout in
 * wal_journal.h and docs/wal-format.md).
 */
#include "wal_journal.h"

#include <string.h>
#include <xxhash.h>

#include "wal_record.h"

uint64_t wal_jentry_size(uint64_t body_len)
{
    uint64_t n = WAL_JOURNAL_HDR + body_len;
    return (n + WAL_JOURNAL_ALIGN - 1) / WAL_JOURNAL_ALIGN * WAL_JOURNAL_ALIGN;
}

static uint64_t body_check(uint64_t jseq, const uint8_t *body, uint32_t body_len)
{
    return XXH3_64bits_withSeed(body, body_len, jseq ^ body_len);
}

void wal_jentry_header(uint8_t hdr[WAL_JOURNAL_HDR], uint64_t jseq, const uint8_t *body,
                       uint32_t body_len)
{
    wal_put_be32(hdr, WAL_JOURNAL_MAGIC);
    wal_put_le32(hdr + 4, body_len);
    wal_put_le64(hdr + 8, jseq);
    wal_put_le64(hdr + 16, body_check(jseq, body, body_len));
}

int wal_jentry_decode_header(const uint8_t *p, uint64_t avail, wal_jentry_t *e)
{
    if (avail < WAL_JOURNAL_HDR || wal_get_be32(p) != WAL_JOURNAL_MAGIC)
        return -1;
    uint32_t len = wal_get_le32(p + 4);
    if (len > WAL_JOURNAL_BODY_MAX || len > avail - WAL_JOURNAL_HDR)
        return -1;
    e->jseq = wal_get_le64(p + 8);
    e->body = NULL;
    e->body_len = len;
    e->size = wal_jentry_size(len);
    return 0;
}

int wal_jentry_verify(const uint8_t hdr[WAL_JOURNAL_HDR], const wal_jentry_t *e)
{
    if (!e->body && e->body_len)
        return -1;
    return body_check(e->jseq, e->body, e->body_len) == wal_get_le64(hdr + 16) ? 0 : -1;
}

size_t wal_jop_size(uint32_t key_len, uint32_t val_len)
{
    return WAL_JOP_HDR + (size_t)key_len + val_len;
}

void wal_jop_encode(uint8_t *dst, uint8_t kind, uint8_t db, const void *key, uint32_t key_len,
                    const void *val, uint32_t val_len)
{
    dst[0] = kind;
    dst[1] = db;
    dst[2] = dst[3] = 0;
    wal_put_le32(dst + 4, key_len);
    wal_put_le32(dst + 8, val_len);
    if (key_len)
        memcpy(dst + WAL_JOP_HDR, key, key_len);
    if (val_len)
        memcpy(dst + WAL_JOP_HDR + key_len, val, val_len);
}

int wal_jop_next(const uint8_t *body, size_t len, size_t *pos, wal_jop_t *op)
{
    if (*pos >= len)
        return 0;
    size_t left = len - *pos;
    const uint8_t *p = body + *pos;
    if (left < WAL_JOP_HDR)
        return -1;
    uint8_t kind = p[0], db = p[1];
    uint32_t klen = wal_get_le32(p + 4), vlen = wal_get_le32(p + 8);
    if (kind < WAL_JOP_PUT || kind > WAL_JOP_DEL_PREFIX || db < 1 || db > WAL_JDB_COUNT || p[2] ||
        p[3] || klen == 0 || klen > WAL_JOP_KEY_MAX || (kind != WAL_JOP_PUT && vlen))
        return -1;
    if ((uint64_t)klen + vlen > left - WAL_JOP_HDR)
        return -1;
    op->kind = kind;
    op->db = db;
    op->key = p + WAL_JOP_HDR;
    op->key_len = klen;
    op->val = op->key + klen;
    op->val_len = vlen;
    *pos += WAL_JOP_HDR + (size_t)klen + vlen;
    return 1;
}
