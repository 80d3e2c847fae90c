/*
 * stall_probe.c - arq-stall-probe: does this machine pause, and when?
 *
 * No ARQ code runs here. For S seconds the program keeps a probe thread
 * sleeping 1 ms at a time (bench_util's stall probe) while, optionally,
 *   --busy N    N threads spin on the clock, each counting the jumps of more
 *               than 4 ms it sees (time during which it did not run), and
 *   --fsync DIR one thread appends 4 KiB with pwrite and fdatasyncs it, in a
 *               loop, into a zero-filled file in DIR (a journal's pattern),
 *               sleeping --fsync-gap microseconds between syncs.
 * It prints the stalls each saw. On the 2-vCPU Firecracker VMs this project
 * is measured on, --fsync alone or --busy 2 alone run unpaused, but
 * --fsync --busy 1 sees ~10 ms pauses every 100 ms in all three threads at
 * once: the host stops the whole VM (docs/benchmarks.md, "Machine stalls").
 *
 *   build/bench/arq-stall-probe --seconds 4 --busy 1 --fsync /var/tmp
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"

#define SP_MAX_BUSY  64
#define SP_FILE_SIZE (16u << 20)
#define SP_BLOCK     4096u

struct busy {
    pthread_t thread;
    uint64_t end_ns;
    uint64_t gaps;
    double gap_ms, max_ms;
};

struct syncer {
    pthread_t thread;
    int fd;
    uint64_t end_ns, gap_us;
    uint64_t syncs, slow; /* slow: > BENCH_STALL_NS */
    double sum_ms, max_ms;
    int err;
};

static void *busy_main(void *arg)
{
    struct busy *b = arg;
    uint64_t last = bench_now_ns();
    for (;;) {
        uint64_t t = bench_now_ns();
        if (t >= b->end_ns)
            break;
        if (t - last > BENCH_STALL_NS) {
            b->gaps++;
            b->gap_ms += (double)(t - last) / 1e6;
            if ((double)(t - last) / 1e6 > b->max_ms)
                b->max_ms = (double)(t - last) / 1e6;
        }
        last = t;
    }
    return NULL;
}

static void *sync_main(void *arg)
{
    struct syncer *s = arg;
    static char block[SP_BLOCK];
    memset(block, 0xa5, sizeof block);
    off_t off = 0;
    while (bench_now_ns() < s->end_ns) {
        uint64_t t0 = bench_now_ns();
        if (pwrite(s->fd, block, sizeof block, off) != (ssize_t)sizeof block ||
            fdatasync(s->fd) != 0) {
            s->err = errno ? errno : EIO;
            break;
        }
        double ms = (double)(bench_now_ns() - t0) / 1e6;
        s->syncs++;
        s->sum_ms += ms;
        if (ms > BENCH_STALL_NS / 1e6)
            s->slow++;
        if (ms > s->max_ms)
            s->max_ms = ms;
        off = (off + SP_BLOCK) % SP_FILE_SIZE;
        if (s->gap_us) {
            struct timespec d = {(time_t)(s->gap_us / 1000000), (long)(s->gap_us % 1000000) * 1000};
            nanosleep(&d, NULL);
        }
    }
    return NULL;
}

/* Written, not just allocated, like ARQ's journal: a sync then flushes the
 * data alone, with no extent conversion to log. */
static int zero_fill(int fd)
{
    static const char zero[1 << 16];
    for (off_t off = 0; off < SP_FILE_SIZE; off += (off_t)sizeof zero)
        if (pwrite(fd, zero, sizeof zero, off) != (ssize_t)sizeof zero)
            return -1;
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: arq-stall-probe [--seconds S] [--busy N] [--fsync DIR] [--fsync-gap US]\n"
               "                       [--json]\n\n"
               "Counts the moments this machine does not run a thread for more than 4 ms:\n"
               "a 1 ms sleeper's late wakes, spinning threads' clock jumps, slow fdatasyncs.\n\n"
               "  --seconds S     how long (default 4)\n"
               "  --busy N        N threads spinning meanwhile (default 0)\n"
               "  --fsync DIR     a thread doing pwrite(4 KiB) + fdatasync in a loop, on a\n"
               "                  16 MiB file created (and removed) in DIR\n"
               "  --fsync-gap US  sleep between two syncs (default 0)\n"
               "  --json          one JSON object on stdout\n");
}

int main(int argc, char **argv)
{
    double seconds = 4;
    unsigned n_busy = 0;
    const char *dir = NULL;
    unsigned long gap_us = 0;
    bool json = false;
    static const struct option longopts[] = {{"seconds", required_argument, NULL, 's'},
                                             {"busy", required_argument, NULL, 'b'},
                                             {"fsync", required_argument, NULL, 'f'},
                                             {"fsync-gap", required_argument, NULL, 'g'},
                                             {"json", no_argument, NULL, 'j'},
                                             {"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        char *end = NULL;
        switch (ch) {
        case 's':
            seconds = strtod(optarg, &end);
            if (*end || !(seconds > 0 && seconds <= 3600)) {
                fprintf(stderr, "arq-stall-probe: --seconds wants 0 < S <= 3600\n");
                return 2;
            }
            break;
        case 'b':
            n_busy = (unsigned)strtoul(optarg, &end, 10);
            if (*end || n_busy > SP_MAX_BUSY) {
                fprintf(stderr, "arq-stall-probe: --busy wants 0..%d\n", SP_MAX_BUSY);
                return 2;
            }
            break;
        case 'f':
            dir = optarg;
            break;
        case 'g':
            gap_us = strtoul(optarg, &end, 10);
            if (*end || gap_us > 1000000) {
                fprintf(stderr, "arq-stall-probe: --fsync-gap wants 0..1000000\n");
                return 2;
            }
            break;
        case 'j':
            json = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }

    char path[4096] = "";
    struct syncer sy = {.fd = -1, .gap_us = gap_us};
    if (dir) {
        snprintf(path, sizeof path, "%s/arq-stall-probe.XXXXXX", dir);
        sy.fd = mkstemp(path);
        if (sy.fd < 0 || zero_fill(sy.fd) != 0 || fsync(sy.fd) != 0) {
            fprintf(stderr, "arq-stall-probe: %s: %s\n", path, strerror(errno));
            if (sy.fd >= 0) {
                close(sy.fd);
                unlink(path);
            }
            return 1;
        }
    }

    uint64_t end = bench_now_ns() + (uint64_t)(seconds * 1e9);
    bench_stall_probe_t *probe = bench_stall_start();
    struct busy busy[SP_MAX_BUSY];
    memset(busy, 0, sizeof busy);
    unsigned started = 0;
    for (; started < n_busy; started++) {
        busy[started].end_ns = end;
        if (pthread_create(&busy[started].thread, NULL, busy_main, &busy[started]) != 0)
            break;
    }
    bool syncing = false;
    if (sy.fd >= 0) {
        sy.end_ns = end;
        syncing = pthread_create(&sy.thread, NULL, sync_main, &sy) == 0;
    }
    uint64_t now;
    while ((now = bench_now_ns()) < end) {
        struct timespec d = {(time_t)((end - now) / 1000000000u),
                             (long)((end - now) % 1000000000u)};
        nanosleep(&d, NULL);
    }
    for (unsigned i = 0; i < started; i++)
        pthread_join(busy[i].thread, NULL);
    if (syncing)
        pthread_join(sy.thread, NULL);
    bench_stalls_t st;
    bench_stall_stop(probe, &st);
    if (sy.fd >= 0) {
        close(sy.fd);
        unlink(path);
    }

    if (json) {
        printf("{\"tool\":\"arq-stall-probe\",\"seconds\":%g,\"busy\":%u,\"fsync_gap_us\":%lu,"
               "\"sleeper\":{\"wakes\":%llu,\"stalls\":%llu,\"ms\":%.1f,\"max_ms\":%.1f},"
               "\"busy_threads\":[",
               seconds, started, gap_us, (unsigned long long)st.wakes,
               (unsigned long long)st.stalls, st.stalled_ms, st.max_ms);
        for (unsigned i = 0; i < started; i++)
            printf("%s{\"gaps\":%llu,\"ms\":%.1f,\"max_ms\":%.1f}", i ? "," : "",
                   (unsigned long long)busy[i].gaps, busy[i].gap_ms, busy[i].max_ms);
        printf("]");
        if (syncing)
            printf(",\"fsync\":{\"syncs\":%llu,\"slow\":%llu,\"mean_ms\":%.3f,\"max_ms\":%.1f}",
                   (unsigned long long)sy.syncs, (unsigned long long)sy.slow,
                   sy.syncs ? sy.sum_ms / (double)sy.syncs : 0.0, sy.max_ms);
        printf("}\n");
    } else {
        printf("arq-stall-probe: %.1f s, %u busy thread(s)%s\n", seconds, started,
               syncing ? ", one pwrite+fdatasync thread" : "");
        printf(
            "  sleeper:  %llu wakes, %llu more than 4 ms late (%.0f ms in all), latest %.1f ms\n",
            (unsigned long long)st.wakes, (unsigned long long)st.stalls, st.stalled_ms, st.max_ms);
        for (unsigned i = 0; i < started; i++)
            printf("  busy %-3u  %llu clock jumps over 4 ms (%.0f ms in all), longest %.1f ms\n", i,
                   (unsigned long long)busy[i].gaps, busy[i].gap_ms, busy[i].max_ms);
        if (syncing)
            printf("  fsync:    %llu syncs (gap %lu us), mean %.3f ms, %llu over 4 ms, longest "
                   "%.1f ms\n",
                   (unsigned long long)sy.syncs, gap_us,
                   sy.syncs ? sy.sum_ms / (double)sy.syncs : 0.0, (unsigned long long)sy.slow,
                   sy.max_ms);
    }
    if (sy.err) {
        fprintf(stderr, "arq-stall-probe: write/fdatasync: %s\n", strerror(sy.err));
        return 1;
    }
    return 0;
}
