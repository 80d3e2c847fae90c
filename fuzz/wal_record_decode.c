/*
 * Fuzz the WAL message record decoder: arbitrary bytes must decode only if
 * they are a well-formed record, and a decoded record re-encodes to exactly
 * the same bytes (no field is read from outside the input).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "wal.h"
#include "wal_record.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    wal_rec_t r;
    int rc = wal_rec_decode(data, size, &r);
    if (rc != 0) {
        if (rc != WAL_ECORRUPT && rc != WAL_EVERSION)
            abort();
        return 0;
    }
    if (wal_rec_size(&r) != size)
        abort();
    uint8_t *buf = malloc(size);
    if (!buf)
        return 0;
    wal_rec_t again = r;
    if (wal_rec_encode(&again, buf, size) != 0 || memcmp(buf, data, size) != 0 ||
        again.checksum != r.checksum)
        abort();
    free(buf);
    return 0;
}
