/*
 * Fuzz the WAL journal's decoders (what recovery reads from disk): the
 * input is scanned as a journal (entries, checksums, ops), and also taken
 * as the body of one entry, sealed with a valid header, so the op parser
 * sees arbitrary bodies. Every op decoded must lie inside its body and
 * re-encode to the same bytes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "wal_journal.h"

static void walk_ops(const uint8_t *body, size_t len)
{
    size_t pos = 0, prev = 0;
    wal_jop_t op;
    int g;
    while ((g = wal_jop_next(body, len, &pos, &op)) == 1) {
        size_t n = wal_jop_size(op.key_len, op.val_len);
        if (pos - prev != n || pos > len || op.key < body || op.val + op.val_len > body + len)
            abort();
        uint8_t *re = malloc(n);
        if (!re)
            return;
        wal_jop_encode(re, op.kind, op.db, op.key, op.key_len, op.val, op.val_len);
        if (memcmp(re, body + prev, n) != 0)
            abort();
        free(re);
        prev = pos;
    }
    if (g != 0 && g != -1)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* as a journal file */
    uint64_t off = 0, expect = 0;
    int have = 0;
    while (off < size) {
        wal_jentry_t e;
        if (wal_jentry_decode_header(data + off, size - off, &e) != 0)
            break;
        if (have && e.jseq != expect)
            break;
        e.body = data + off + WAL_JOURNAL_HDR;
        if (e.body_len > size - off - WAL_JOURNAL_HDR)
            abort();
        if (wal_jentry_verify(data + off, &e) != 0)
            break;
        walk_ops(e.body, e.body_len);
        have = 1;
        expect = e.jseq + 1;
        off += e.size;
    }
    /* as one entry's body */
    if (size <= (1u << 20)) {
        uint8_t *entry = malloc(WAL_JOURNAL_HDR + size + 1);
        if (!entry)
            return 0;
        wal_jentry_header(entry, size, data, (uint32_t)size);
        memcpy(entry + WAL_JOURNAL_HDR, data, size);
        wal_jentry_t e;
        if (wal_jentry_decode_header(entry, WAL_JOURNAL_HDR + size, &e) != 0)
            abort();
        e.body = entry + WAL_JOURNAL_HDR;
        if (wal_jentry_verify(entry, &e) != 0)
            abort();
        walk_ops(e.body, e.body_len);
        free(entry);
    }
    return 0;
}
