/*
 * replay.c - catch-up reads (see replay.h). Today: the WAL only.
 */
#include "replay.h"

#include <stdlib.h>
#include <string.h>

struct rpl {
    wal_t *wal;
    rpl_stats_t st;
};

int rpl_new(wal_t *wal, rpl_t **ret)
{
    rpl_t *r = calloc(1, sizeof(*r));
    if (!r)
        return -1;
    r->wal = wal;
    *ret = r;
    return 0;
}

void rpl_free(rpl_t *r)
{
    free(r);
}

struct count_ctx {
    wal_record_cb cb;
    void *arg;
    uint64_t bytes;
};

static int count_cb(const wal_record_t *rec, void *arg)
{
    struct count_ctx *cc = arg;
    cc->bytes += rec->payload_len;
    return cc->cb(rec, cc->arg);
}

enum rpl_status rpl_read(rpl_t *r, const char *stream, size_t stream_len, uint64_t from,
                         uint32_t max_msgs, uint64_t max_bytes, wal_record_cb cb, void *arg,
                         rpl_result_t *res)
{
    memset(res, 0, sizeof(*res));
    res->next = from;
    struct count_ctx cc = {cb, arg, 0};
    wal_read_result_t wr = {.next = from};
    r->st.reads++;
    int rc = wal_stream_read(r->wal, stream, stream_len, from, max_msgs, max_bytes, count_cb, &cc,
                             &wr);
    res->count = wr.count;
    r->st.records += wr.count;
    r->st.bytes += cc.bytes;
    switch (rc) {
    case 0:
        res->next = wr.next;
        return RPL_OK;
    case WAL_ETRUNCATED:
        /* Retention dropped [from, first): the cold tier (sync issue) will
         * be asked first; today the range is reported missing. */
        res->gap_from = from;
        res->gap_to = wr.next - 1;
        res->next = wr.next;
        r->st.gaps++;
        return RPL_GAP;
    case WAL_ENOTFOUND:
        return RPL_ENOSTREAM;
    default:
        res->wal_error = rc;
        res->bad_offset = wr.bad_offset;
        res->next = wr.count ? wr.next : from;
        r->st.errors++;
        return RPL_EREAD;
    }
}

void rpl_stats_get(const rpl_t *r, rpl_stats_t *ret)
{
    *ret = r->st;
}
