/*
 * bench_util.h - pieces both benchmarks share: a monotonic clock, the
 * log-linear latency histogram buckets, number and JSON formatting.
 */
#ifndef ARQ_BENCH_UTIL_H
#define ARQ_BENCH_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Buckets of the latency histogram: exact below 32 ns, then 32 sub-buckets
 * per power of two (about 3% resolution); 1920 cover every uint64_t. */
#define BENCH_LAT_BUCKETS 1920u

uint64_t bench_now_ns(void); /* CLOCK_MONOTONIC */
unsigned bench_lat_bucket(uint64_t ns);
double bench_lat_bucket_mid_ns(unsigned bucket);
/* 1234567.8 -> "1,234,568" (into buf, returned) */
const char *bench_fmt_count(char *buf, size_t len, double v);
/* s as a JSON string literal. */
void bench_json_str(FILE *f, const char *s);

#endif
