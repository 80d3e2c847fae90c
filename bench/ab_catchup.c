/*
 * ab_catchup.c - arq-bench --catchup: N messages published to one fresh
 * stream, then timed as one subscriber receives them all from offset 1, and
 * (with --data-dir) the same records read straight from arqd's LMDB. See
 * arq_bench.c and docs/benchmarks.md.
 */
#include "arq_bench.h"

/* ---- --catchup ------------------------------------------------------------- */

static int cu_all_ready(const struct bench *b)
{
    return b->n_ready >= b->o.conns;
}

static int cu_filled(const struct bench *b)
{
    return b->cu_acked >= b->o.catchup_n;
}

static int cu_done(const struct bench *b)
{
    return b->cu_t1 != 0;
}

static void cu_publish_more(struct conn *c)
{
    struct bench *b = c->b;
    while (c->inflight < b->o.depth && b->cu_sent < b->o.catchup_n && send_pub(c) == 0)
        b->cu_sent++;
}

void cu_send_ack(struct conn *c)
{
    if (c->got <= c->ack_sent)
        return;
    char name[128];
    stream_name(c->b, 0, name, sizeof name);
    pack_ack(c, name, c->got);
    c->ack_sent = c->got;
    c->b->cu_reps[c->b->cu_cur].acks++;
}

static void cu_on_welcome(struct conn *c, const msgpack_object *map)
{
    struct bench *b = c->b;
    uint64_t mi = obj_u64(map_get(map, "max_inflight"));
    b->cu_max_inflight = mi > 0 && mi < UINT_MAX ? (unsigned)mi : 1024;
    b->cu_ack_every = b->cu_max_inflight / 4 ? b->cu_max_inflight / 4 : 1;
    char name[128];
    stream_name(b, 0, name, sizeof name);
    pack_sub(c, name, 1, 0);
    b->cu_cpu0 = cpu_now();
    b->cu_srv0 = bench_proc_cpu_sec(b->o.server_pid);
    b->cu_t0 = bench_now_ns();
    c->rx_bytes = 0;
}

static void cu_on_msg(struct conn *c, const msgpack_object *map)
{
    struct bench *b = c->b;
    struct cu_rep *r = &b->cu_reps[b->cu_cur];
    uint64_t off = obj_u64(map_get(map, "offset"));
    const msgpack_object *pl = map_get(map, "payload");
    if (off != c->got + 1) {
        fail(b, "catch-up: offset %llu after %llu", (unsigned long long)off,
             (unsigned long long)c->got);
        return;
    }
    uint64_t now = bench_now_ns();
    if (b->cu_tfirst == 0)
        b->cu_tfirst = now;
    c->got = off;
    r->msgs++;
    if (pl != NULL && pl->type == MSGPACK_OBJECT_BIN)
        r->payload_bytes += pl->via.bin.size;
    if (c->got - c->ack_sent >= b->cu_ack_every)
        c->ack_due = 1;
    if (off >= b->o.catchup_n && b->cu_t1 == 0) {
        b->cu_t1 = now;
        r->bench_cpu = cpu_now() - b->cu_cpu0;
        double s1 = bench_proc_cpu_sec(b->o.server_pid);
        r->srv_cpu = b->cu_srv0 >= 0 && s1 >= 0 ? s1 - b->cu_srv0 : -1;
        r->wire_bytes = c->rx_bytes;
        c->ack_due = 1;
    }
}

static void cu_on_puback(struct conn *c, const msgpack_object *map, int nack)
{
    struct bench *b = c->b;
    if (c->inflight > 0)
        c->inflight--;
    if (nack) {
        report_reason("nack", map);
        fail(b, "a publish was refused");
        return;
    }
    b->cu_acked++;
    cu_publish_more(c);
}

void cu_handle(struct conn *c, const msgpack_object *map, const msgpack_object *t)
{
    struct bench *b = c->b;
    if (obj_is(t, "msg")) {
        cu_on_msg(c, map);
    } else if (obj_is(t, "puback")) {
        cu_on_puback(c, map, 0);
    } else if (obj_is(t, "nack")) {
        cu_on_puback(c, map, 1);
    } else if (obj_is(t, "welcome")) {
        if (c->role == ROLE_PUB)
            b->n_ready++;
        else
            cu_on_welcome(c, map);
    } else if (obj_is(t, "subok")) {
        b->cu_next_after = obj_u64(map_get(map, "next"));
        if (obj_u64(map_get(map, "first")) != 1)
            fail(b, "catch-up: the stream no longer starts at offset 1 (retention?)");
    } else if (obj_is(t, "error")) {
        report_reason("error", map);
        fail(b, "server reported an error");
    } else if (obj_is(t, "gap")) {
        fail(b, "catch-up: unexpected gap");
    }
}

struct scan_stats {
    int ok;
    double rate, rate_min, rate_max; /* records/s: median, min, max */
    double mbps;                     /* value bytes/s / 1e6 at the median */
    struct log_scan_result r;        /* the median run */
};

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, unsigned n)
{
    qsort(v, n, sizeof *v, cmp_double);
    return n == 0 ? 0 : n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

#define SCAN_RUNS 3u
enum { SCAN_CURSOR, SCAN_LOOKUP, SCAN_CURSORS, SCAN_WAL, SCAN_KINDS };

static void scan_run(struct bench *b, int kind, struct scan_stats *st)
{
    char name[128], err[512];
    stream_name(b, 0, name, sizeof name);
    struct log_scan_result r[SCAN_RUNS];
    double rate[SCAN_RUNS];
    memset(st, 0, sizeof *st);
    for (unsigned i = 0; i < SCAN_RUNS; i++) {
        uint64_t n = b->o.catchup_n;
        const char *d = b->o.data_dir;
        int rc;
        if (kind == SCAN_CURSOR)
            rc = log_scan_cursor(d, name, 1, n, &r[i], err, sizeof err);
        else if (kind == SCAN_LOOKUP)
            rc = log_scan_lookup(d, name, 1, n, AB_SCAN_BATCH, &r[i], err, sizeof err);
        else if (kind == SCAN_CURSORS)
            rc = log_scan_cursors(d, name, 1, n, AB_SCAN_BATCH, &r[i], err, sizeof err);
        else
            rc = log_scan_wal(d, name, 1, n, AB_SCAN_BATCH, &r[i], err, sizeof err);
        if (rc != 0) {
            fprintf(stderr, "arq-bench: %s\n", err);
            return;
        }
        if (r[i].records != b->o.catchup_n) {
            fprintf(stderr, "arq-bench: scan found %llu records, not %llu\n",
                    (unsigned long long)r[i].records, (unsigned long long)b->o.catchup_n);
            return;
        }
        rate[i] = (double)r[i].records / (r[i].seconds > 0 ? r[i].seconds : 1e-9);
    }
    double sorted[SCAN_RUNS];
    memcpy(sorted, rate, sizeof sorted);
    st->rate = median(sorted, SCAN_RUNS);
    st->rate_min = sorted[0];
    st->rate_max = sorted[SCAN_RUNS - 1];
    for (unsigned i = 0; i < SCAN_RUNS; i++)
        if (rate[i] == st->rate)
            st->r = r[i];
    st->mbps = (double)st->r.value_bytes / (st->r.seconds > 0 ? st->r.seconds : 1e-9) / 1e6;
    st->ok = 1;
}

static void cu_print(FILE *f, const struct bench *b, const struct scan_stats *sc, double med_rate,
                     int json);

int run_catchup(struct bench *b)
{
    const struct opts *o = &b->o;
    b->cu_reps = calloc(o->reps, sizeof *b->cu_reps);
    if (b->cu_reps == NULL) {
        fprintf(stderr, "arq-bench: out of memory\n");
        return 1;
    }
    for (unsigned i = 0; i < o->conns; i++) {
        struct conn *c = &b->conns[i];
        c->b = b;
        c->idx = i;
        c->role = ROLE_PUB;
        if (conn_open(b, c) != 0) {
            fprintf(stderr, "arq-bench: could not open publisher %u of %u\n", i + 1, o->conns);
            return 1;
        }
    }
    if (run_until(b, cu_all_ready, AB_SETUP_TIMEOUT, "publishers' welcome") != 0)
        return b->interrupted ? 130 : 1;
    b->cu_fill_t0 = bench_now_ns();
    for (unsigned i = 0; i < o->conns; i++) {
        cu_publish_more(&b->conns[i]);
        conn_flush(&b->conns[i]);
    }
    if (run_until(b, cu_filled, o->timeout, "publishing") != 0)
        return b->interrupted ? 130 : 1;
    b->cu_fill_t1 = bench_now_ns();
    for (unsigned i = 0; i < o->conns; i++)
        conn_close(&b->conns[i], 0);

    /* One subscriber connection per repetition, each from offset 1, in the
     * slot conns[o->conns]. */
    for (unsigned rep = 0; rep < o->reps; rep++) {
        struct conn *c = &b->conns[o->conns];
        conn_close(c, 0);
        memset(c, 0, sizeof *c);
        c->b = b;
        c->idx = o->conns;
        c->role = ROLE_CU_SUB;
        c->is_sub = 1;
        b->cu_cur = rep;
        b->cu_t0 = b->cu_t1 = b->cu_tfirst = 0;
        struct metrics m0, m1;
        memset(&m0, 0, sizeof m0);
        memset(&m1, 0, sizeof m1);
        if (o->metrics)
            metrics_get(o, &m0);
        if (conn_open(b, c) != 0) {
            fprintf(stderr, "arq-bench: could not open the subscriber\n");
            return 1;
        }
        if (run_until(b, cu_done, o->timeout, "catch-up") != 0)
            return b->interrupted ? 130 : 1;
        struct cu_rep *r = &b->cu_reps[rep];
        r->seconds = (double)(b->cu_t1 - b->cu_t0) / 1e9;
        r->first_msg_s = (double)(b->cu_tfirst - b->cu_t0) / 1e9;
        conn_flush(c); /* the last ack */
        if (o->metrics) {
            metrics_get(o, &m1);
            if (m0.ok && m1.ok)
                r->catchup_reads = (uint64_t)(m1.catchup_reads - m0.catchup_reads);
        }
        conn_close(c, 0);
    }
    if (getloadavg(b->load_after, 3) != 3)
        b->load_after[0] = b->load_after[1] = b->load_after[2] = -1;

    struct scan_stats sc[SCAN_KINDS];
    memset(sc, 0, sizeof sc);
    if (o->data_dir[0] != '\0')
        for (int k = 0; k < SCAN_KINDS; k++)
            scan_run(b, k, &sc[k]);
    double rates[64];
    unsigned n = o->reps < 64 ? o->reps : 64;
    for (unsigned i = 0; i < n; i++)
        rates[i] = (double)b->cu_reps[i].msgs / b->cu_reps[i].seconds;
    double med = median(rates, n);
    cu_print(o->json ? stderr : stdout, b, sc, med, 0);
    if (o->json)
        cu_print(stdout, b, sc, med, 1);
    return o->data_dir[0] != '\0' && !sc[0].ok ? 1 : 0;
}

static void cu_print_text(FILE *f, const struct bench *b, const struct scan_stats *sc, double med)
{
    const struct opts *o = &b->o;
    char c1[32], c2[32], c3[32];
    double fill_s = (double)(b->cu_fill_t1 - b->cu_fill_t0) / 1e9;
    fprintf(f, "catch-up: %s messages of %u bytes in one stream (%s.0)\n",
            bench_fmt_count(c1, sizeof c1, (double)o->catchup_n), o->size, b->stream_prefix);
    fprintf(f, "publishing them: %u publishers x %u in flight, %.2f s, %s durable publishes/s\n",
            o->conns, o->depth, fill_s,
            bench_fmt_count(c2, sizeof c2, (double)o->catchup_n / fill_s));
    fprintf(f,
            "subscriber: one connection, sub from offset 1; server max_inflight %u (welcome), "
            "cumulative ack every %u messages\n",
            b->cu_max_inflight, b->cu_ack_every);
    for (unsigned i = 0; i < o->reps; i++) {
        const struct cu_rep *r = &b->cu_reps[i];
        fprintf(f,
                "catch-up %u: %s msgs in %.3f s = %s msgs/s; payload %.1f MB/s, wire %.1f MB/s "
                "(%.1f bytes/msg); first msg after %.2f ms; %s acks",
                i + 1, bench_fmt_count(c1, sizeof c1, (double)r->msgs), r->seconds,
                bench_fmt_count(c2, sizeof c2, (double)r->msgs / r->seconds),
                (double)r->payload_bytes / r->seconds / 1e6,
                (double)r->wire_bytes / r->seconds / 1e6,
                (double)r->wire_bytes / (double)(r->msgs ? r->msgs : 1), r->first_msg_s * 1e3,
                bench_fmt_count(c3, sizeof c3, (double)r->acks));
        if (r->catchup_reads)
            fprintf(f, ", %s WAL catch-up reads",
                    bench_fmt_count(c1, sizeof c1, (double)r->catchup_reads));
        fprintf(f, "\n    CPU: arq-bench %.0f%% of one core", r->bench_cpu / r->seconds * 100);
        if (r->srv_cpu >= 0)
            fprintf(f, ", arqd (pid %ld) %.0f%%", o->server_pid, r->srv_cpu / r->seconds * 100);
        fputc('\n', f);
    }
    fprintf(f, "catch-up (median of %u): %s msgs/s, %.1f MB/s of payload\n", o->reps,
            bench_fmt_count(c1, sizeof c1, med), med * o->size / 1e6);
    static const char *const names[SCAN_KINDS] = {
        "LMDB cursor over `log`          ",
        "LMDB index+log gets (256/txn)   ",
        "LMDB index+log cursors (256/txn)",
        "wal_stream_read (256/call)      ",
    };
    if (o->data_dir[0] != '\0') {
        fprintf(f, "the same records read from %s (%u runs each, median [min-max]):\n", o->data_dir,
                SCAN_RUNS);
        for (int k = 0; k < SCAN_KINDS; k++) {
            if (!sc[k].ok) {
                fprintf(f, "  %s  failed\n", names[k]);
                continue;
            }
            fprintf(f,
                    "  %s  %s records/s [%s-%s], %.0f MB/s of values, %.3f s; catch-up/this %.3f",
                    names[k], bench_fmt_count(c1, sizeof c1, sc[k].rate),
                    bench_fmt_count(c2, sizeof c2, sc[k].rate_min),
                    bench_fmt_count(c3, sizeof c3, sc[k].rate_max), sc[k].mbps, sc[k].r.seconds,
                    med / sc[k].rate);
            if (k == 0 && sc[k].r.other)
                fprintf(f, " (%llu records of other streams skipped)",
                        (unsigned long long)sc[k].r.other);
            fputc('\n', f);
        }
    }
    fprintf(f, "goal >= 500,000 msgs/s catch-up: %s\n", med >= 500000 ? "met" : "MISSED");
}

static void cu_print(FILE *f, const struct bench *b, const struct scan_stats *sc, double med,
                     int json)
{
    const struct opts *o = &b->o;
    char cpu[128];
    cpu_model(cpu, sizeof cpu);
    if (!json) {
        fprintf(f, "arq-bench: %s\n", b->cmdline);
        fprintf(f, "machine: %ld x %s\n", sysconf(_SC_NPROCESSORS_ONLN), cpu);
        fprintf(f, "load average: %.2f %.2f %.2f before, %.2f %.2f %.2f after\n", b->load_before[0],
                b->load_before[1], b->load_before[2], b->load_after[0], b->load_after[1],
                b->load_after[2]);
        cu_print_text(f, b, sc, med);
        return;
    }
    double fill_s = (double)(b->cu_fill_t1 - b->cu_fill_t0) / 1e9;
    fprintf(f, "{\"tool\":\"arq-bench\",\"mode\":\"catchup\",\"command\":");
    bench_json_str(f, b->cmdline);
    fprintf(f, ",\"machine\":{\"nproc\":%ld,\"cpu\":", sysconf(_SC_NPROCESSORS_ONLN));
    bench_json_str(f, cpu);
    fprintf(f, ",\"load_before\":[%.2f,%.2f,%.2f],\"load_after\":[%.2f,%.2f,%.2f]}",
            b->load_before[0], b->load_before[1], b->load_before[2], b->load_after[0],
            b->load_after[1], b->load_after[2]);
    fprintf(f,
            ",\"config\":{\"messages\":%llu,\"payload_bytes\":%u,\"publishers\":%u,\"depth\":%u,"
            "\"reps\":%u,\"max_inflight\":%u,\"ack_every\":%u}",
            (unsigned long long)o->catchup_n, o->size, o->conns, o->depth, o->reps,
            b->cu_max_inflight, b->cu_ack_every);
    fprintf(f, ",\"publish\":{\"seconds\":%.3f,\"per_s\":%.1f}", fill_s,
            (double)o->catchup_n / fill_s);
    fprintf(f, ",\"catchup\":[");
    for (unsigned i = 0; i < o->reps; i++) {
        const struct cu_rep *r = &b->cu_reps[i];
        fprintf(f,
                "%s{\"seconds\":%.4f,\"msgs\":%llu,\"msgs_per_s\":%.1f,\"payload_mb_per_s\":%.2f,"
                "\"wire_mb_per_s\":%.2f,\"wire_bytes\":%llu,\"first_msg_ms\":%.3f,\"acks\":%llu,"
                "\"catchup_reads\":%llu,\"bench_cpu\":%.3f,\"server_cpu\":",
                i ? "," : "", r->seconds, (unsigned long long)r->msgs, (double)r->msgs / r->seconds,
                (double)r->payload_bytes / r->seconds / 1e6,
                (double)r->wire_bytes / r->seconds / 1e6, (unsigned long long)r->wire_bytes,
                r->first_msg_s * 1e3, (unsigned long long)r->acks,
                (unsigned long long)r->catchup_reads, r->bench_cpu / r->seconds);
        if (r->srv_cpu >= 0)
            fprintf(f, "%.3f}", r->srv_cpu / r->seconds);
        else
            fprintf(f, "null}");
    }
    fprintf(f, "],\"catchup_msgs_per_s\":%.1f,\"catchup_payload_mb_per_s\":%.2f", med,
            med * o->size / 1e6);
    static const char *const keys[SCAN_KINDS] = {"lmdb_cursor", "lmdb_lookup", "lmdb_cursors",
                                                 "wal_stream_read"};
    fprintf(f, ",\"raw\":");
    if (o->data_dir[0] == '\0') {
        fprintf(f, "null");
    } else {
        fputc('{', f);
        for (int k = 0; k < SCAN_KINDS; k++) {
            fprintf(f, "%s\"%s\":", k ? "," : "", keys[k]);
            if (!sc[k].ok) {
                fprintf(f, "null");
                continue;
            }
            fprintf(f,
                    "{\"records_per_s\":%.1f,\"min\":%.1f,\"max\":%.1f,\"value_mb_per_s\":%.2f,"
                    "\"seconds\":%.4f,\"value_bytes\":%llu,\"other_records\":%llu,"
                    "\"catchup_ratio\":%.4f}",
                    sc[k].rate, sc[k].rate_min, sc[k].rate_max, sc[k].mbps, sc[k].r.seconds,
                    (unsigned long long)sc[k].r.value_bytes, (unsigned long long)sc[k].r.other,
                    med / sc[k].rate);
        }
        fputc('}', f);
    }
    fprintf(f, ",\"goal_500k\":%s}\n", med >= 500000 ? "true" : "false");
}
