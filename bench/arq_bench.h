/*
 * arq_bench.h - what the parts of arq-bench share: options, connections, the
 * run's state, and the functions one mode's file calls in another's.
 * arq_bench.c: connections, the load mode, options, main; ab_catchup.c:
 * --catchup; ab_storm.c: --storm.
 */
#ifndef ARQ_BENCH_H
#define ARQ_BENCH_H

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <msgpack.h>
#include <wslay/wslay.h>

#include "bench_util.h"
#include "log_scan.h"

#define AB_RING          65536u /* per-connection slots for send times of pending pubs */
#define AB_MAX_STREAMS   64u
#define AB_MAX_CONNS     10000u
#define AB_TICK_US       200u /* open-loop pacing timer (default of --tick-us) */
#define AB_MAX_BUCKETS   24u  /* arq_wal_batch_messages buckets kept */
#define AB_NACK_REPORTS  5u
#define AB_SETUP_TIMEOUT 10.0    /* seconds for all connections to be ready */
#define AB_STORM_MAX     100000u /* --storm connections and streams */
#define AB_SESSION_MAX   64u     /* session id and resume token, protocol.md 4a */
#define AB_STORM_RETRIES 50u     /* reconnect attempts per connection and phase */
#define AB_SCAN_BATCH    256u    /* records per read txn: the broker's CATCHUP_BATCH */

enum phase { PH_SETUP, PH_WARMUP, PH_MEASURE, PH_DONE };
enum mode { MODE_LOAD, MODE_CATCHUP, MODE_STORM };
enum role { ROLE_PUB, ROLE_SUB, ROLE_CU_SUB, ROLE_ST_SUB };
/* Connection state; the blocking conn_open() goes straight to CS_WS. */
enum cstate { CS_IDLE, CS_CONNECTING, CS_UPGRADE, CS_WS };
/* --storm phases */
enum sphase { SP_CONNECT, SP_BEFORE, SP_DOWN, SP_RECONNECT };

struct opts {
    char host[256];
    char port[16];
    char path[256];
    unsigned conns, depth, subs, streams;
    unsigned tick_us; /* open loop: pacing interval */
    double seconds, warmup, rate;
    unsigned size;
    int json;
    int metrics; /* scrape /metrics at the window's edges */
    long server_pid;
    enum mode mode;
    int conns_set, depth_set, streams_set;
    /* --catchup */
    uint64_t catchup_n;
    unsigned reps;
    char data_dir[4096];
    /* --storm */
    unsigned storm_conns;
    unsigned before, during; /* messages per stream before the drop / while down */
    int resume;              /* send session + resume_token on reconnect */
    double timeout;          /* seconds per phase */
    double settle;           /* seconds between the last ack and the drop */
};

/* A histogram of arqd's /metrics: bucket bounds and cumulative counts. */
struct mhist {
    double sum;
    unsigned n;
    double le[AB_MAX_BUCKETS];
    double cum[AB_MAX_BUCKETS];
};

/* arqd's publish-time histograms (api/server.c), in this order */
enum { MH_TOTAL, MH_WAIT, MH_DISPATCH, MH_N };

struct metrics {
    int ok;
    double commits, committed_msgs, commit_sec_sum, commit_sec_count;
    double catchup_reads;
    unsigned n_buckets;
    double le[AB_MAX_BUCKETS];
    double cum[AB_MAX_BUCKETS];
    struct mhist pub[MH_N];
};

struct bench;

struct conn {
    struct bench *b;
    unsigned idx;
    int is_sub;
    int fd;
    wslay_event_context_ptr ws;
    struct event *rev, *wev;
    uint8_t *pending; /* bytes read past the HTTP response head */
    size_t pending_len, pending_off;
    bench_out_t out;
    int ready;
    unsigned subs_ok;
    uint64_t next_id;
    uint64_t inflight;
    uint64_t k; /* publishes sent: picks the stream */
    uint64_t *sent_ns;
    uint64_t ack_off[AB_MAX_STREAMS];
    uint64_t acked_off[AB_MAX_STREAMS];
    /* --catchup and --storm */
    enum role role;
    enum cstate st;
    int ack_due; /* stop reading until an ack went out (ws_recv_cb) */
    int lost;    /* set inside wslay callbacks, handled after wslay_event_recv */
    uint64_t rx_bytes;
    char *head; /* non-blocking upgrade: the response head so far */
    size_t head_len;
    unsigned sidx; /* --storm: its stream */
    uint64_t epoch;
    uint64_t got;      /* highest offset processed, contiguous */
    uint64_t ack_sent; /* highest offset acknowledged */
    int connected, welcomed, resumed, fresh, subscribed, caught; /* in this phase */
    uint64_t conn_max; /* highest offset received on this connection: what may be acked */
    unsigned retries;
    uint64_t t_welcome, t_caught;
    char session[AB_SESSION_MAX + 1], token[AB_SESSION_MAX + 1];
};

/* One catch-up: the subscriber's `sub` to offset N received. */
struct cu_rep {
    double seconds, first_msg_s;
    uint64_t msgs, payload_bytes, wire_bytes, acks;
    double bench_cpu, srv_cpu; /* fraction of one core; srv_cpu < 0: unknown */
    uint64_t catchup_reads;    /* arq_catchup_reads_total delta, 0 if unknown */
};

/* Per-stage times of one storm phase, ns after its start (0: not reached). */
struct st_times {
    uint64_t start;   /* CLOCK_MONOTONIC of the phase's start */
    uint64_t started; /* every connect() issued */
    uint64_t connected, welcomed, resumed, subscribed, caught;
    unsigned n_connected, n_welcomed, n_resumed, n_fresh, n_nosub, n_subscribed, n_caught;
    uint64_t retries, dups, holes;
    double bench_cpu, srv_cpu;
    bench_hist_t welcome_lat, caught_lat;
    /* the kernel's counters over the phase (whole machine, /proc/net) */
    int64_t listen_overflows, listen_drops, retrans_segs;
};

struct bench {
    struct opts o;
    char cmdline[1024];
    char stream_prefix[64];
    struct event_base *base;
    struct conn *conns; /* publishers first, then subscribers */
    unsigned n_conns, n_ready;
    enum phase phase;
    int failed, interrupted;
    uint64_t t_start, t_meas, t_end;
    /* open loop */
    struct event *tick;
    uint64_t scheduled, not_sent;
    unsigned rr;
    /* counters over the window */
    uint64_t pubacks, nacks, deliveries, pubs_sent;
    uint64_t pubacks_total, deliveries_total;
    bench_hist_t puback_lat, deliv_lat;
    /* delivery latency split at the record's time stamp ("ts": arqd's
     * CLOCK_REALTIME when its loop decoded the publish) */
    bench_hist_t to_srv_lat, from_srv_lat;
    int64_t real_minus_mono_ns; /* CLOCK_REALTIME - CLOCK_MONOTONIC at start */
    struct rusage ru0, ru1;
    bench_stall_probe_t *stall_probe; /* runs during the window */
    bench_stalls_t stalls;
    double srv_cpu0, srv_cpu1;
    struct metrics m0, m1;
    double load_before[3], load_after[3];
    uint8_t *payload;
    uint32_t mask_state;
    int timed_out;
    struct sockaddr_storage addr; /* --storm: resolved once */
    socklen_t addr_len;
    /* --catchup */
    uint64_t cu_sent, cu_acked;
    uint64_t cu_fill_t0, cu_fill_t1;
    unsigned cu_max_inflight, cu_ack_every, cu_cur;
    uint64_t cu_t0, cu_t1, cu_tfirst, cu_next_after; /* cu_next_after: subok.next */
    double cu_cpu0, cu_srv0;
    struct cu_rep *cu_reps;
    /* --storm */
    enum sphase sphase;
    unsigned st_n;       /* subscriber connections (conns[1..st_n]) */
    uint64_t *st_target; /* per stream: the last offset published */
    uint64_t st_pub_total, st_pub_acked;
    int st_targets_final; /* every publish of the phase acknowledged */
    struct st_times st_init, st_re;
    struct st_times *st_cur;
    uint64_t st_t_drop, st_t_dropped, st_t_published;
    uint64_t st_errors, st_closes, st_bad_session;
    double st_cpu0, st_srv0;
};

extern struct bench g_b;

/* arq_bench.c */
void conn_close(struct conn *c, int rst);
void conn_flush(struct conn *c);
int conn_open(struct bench *b, struct conn *c);
int conn_ws_init(struct conn *c);
void cpu_model(char *buf, size_t len);
double cpu_now(void);
__attribute__((format(printf, 2, 3))) void fail(struct bench *b, const char *fmt, ...);
const msgpack_object *map_get(const msgpack_object *map, const char *key);
void metrics_get(const struct opts *o, struct metrics *m);
int never_done(const struct bench *b);
int obj_is(const msgpack_object *o, const char *s);
unsigned obj_stream_index(const struct bench *b, const msgpack_object *o);
uint64_t obj_u64(const msgpack_object *o);
void on_read(evutil_socket_t fd, short what, void *arg);
void on_write(evutil_socket_t fd, short what, void *arg);
void pack_ack(struct conn *c, const char *stream, uint64_t offset);
void pack_sub(struct conn *c, const char *stream, uint64_t from, uint64_t epoch);
void report_reason(const char *what, const msgpack_object *map);
int run_until(struct bench *b, int (*done)(const struct bench *), double timeout_s,
              const char *what);
void send_hello(struct conn *c);
int send_pub(struct conn *c);
void stream_name(const struct bench *b, unsigned i, char *buf, size_t len);
int upgrade_request(const struct opts *o, char *buf, size_t len);

/* ab_catchup.c */
void cu_handle(struct conn *c, const msgpack_object *map, const msgpack_object *t);
void cu_send_ack(struct conn *c);
int run_catchup(struct bench *b);

/* ab_storm.c */
int run_storm(struct bench *b);
void st_connected(struct conn *c);
void st_handle(struct conn *c, const msgpack_object *map, const msgpack_object *t);
void st_lost(struct conn *c);
void st_send_ack(struct conn *c);
void st_upgrade_read(struct conn *c);

#endif
