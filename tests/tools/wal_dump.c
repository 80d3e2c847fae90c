/*
 * wal_dump DIR - print every record of a WAL (opened read-only, safe next to
 * a running arqd) as tab-separated lines: seq, stream, offset, checksum
 * (hex), payload length. Tests compare it with MySQL's arq_messages. Exit 1
 * on a read error (a corrupt record is reported with its seq).
 */
#include <inttypes.h>
#include <stdio.h>

#include "wal.h"

static int print_cb(const wal_record_t *rec, void *arg)
{
    (void)arg;
    printf("%" PRIu64 "\t%.*s\t%" PRIu64 "\t%016" PRIx64 "\t%zu\n", rec->seq, (int)rec->stream_len,
           rec->stream, rec->offset, rec->checksum, rec->payload_len);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: wal_dump DATA_DIR\n");
        return 2;
    }
    wal_options_t o = {.dir = argv[1], .read_only = 1};
    wal_t *wal;
    char err[256];
    int rc = wal_open(&o, NULL, &wal, err, sizeof(err));
    if (rc) {
        fprintf(stderr, "wal_dump: %s\n", err);
        return 1;
    }
    uint64_t from = 1;
    wal_read_result_t res;
    do {
        rc = wal_log_read(wal, from, 10000, UINT64_MAX, print_cb, NULL, &res);
        if (rc) {
            fprintf(stderr, "wal_dump: read at seq %" PRIu64 ": %s\n", res.bad_seq,
                    wal_strerror(rc));
            wal_close(wal);
            return 1;
        }
        from = res.next;
    } while (res.count);
    wal_close(wal);
    return 0;
}
