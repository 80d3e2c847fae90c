/*
 * Fuzz the WAL's small value decoders (stream metadata, cursor, dedup
 * entry, session). The first byte picks the decoder; the rest is the value. A value
 * that decodes must re-encode to the same bytes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "wal.h"
#include "wal_record.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t which = data[0] % 4;
    const uint8_t *v = data + 1;
    size_t n = size - 1;
    uint8_t out[WAL_SESSION_VAL_MIN + WAL_PRODUCER_MAX + WAL_SECRET_MAX];
    switch (which) {
    case 0: {
        wal_stream_meta_t m;
        if (wal_stream_meta_decode(v, n, &m) == 0) {
            wal_stream_meta_encode(&m, out);
            if (n != WAL_STREAM_META_SIZE || memcmp(out, v, n) != 0)
                abort();
        }
        break;
    }
    case 1: {
        wal_cursor_val_t c;
        if (wal_cursor_val_decode(v, n, &c) == 0) {
            wal_cursor_val_encode(&c, out);
            if (n != WAL_CURSOR_VAL_SIZE || memcmp(out, v, n) != 0)
                abort();
        }
        break;
    }
    case 3: {
        wal_session_t s;
        if (wal_session_val_decode(v, n, &s) == 0) {
            wal_session_val_encode(&s, out);
            if (n != wal_session_val_size(&s) || memcmp(out, v, n) != 0)
                abort();
        }
        break;
    }
    default: {
        wal_dedup_val_t d;
        if (wal_dedup_val_decode(v, n, &d) == 0) {
            wal_dedup_val_encode(&d, out);
            if (n != WAL_DEDUP_VAL_SIZE || memcmp(out, v, n) != 0)
                abort();
        }
        break;
    }
    }
    return 0;
}
