/*
 * server.h - the listener: HTTP (/health, /metrics, POST /api/publish) and
 * WebSocket (/ws, subprotocol arq.v1) on one port, on a libevent loop.
 */
#ifndef ARQ_API_SERVER_H
#define ARQ_API_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "broker.h"
#include "wal.h"

struct event_base;

struct evbuffer;

typedef struct api_options {
    const char *host;
    uint16_t port; /* 0: any free port (see api_server_port) */
    uint32_t max_connections;
    uint32_t max_conns_per_addr; /* per client address at once (0: no limit) */
    uint32_t conn_rate_per_s;    /* new connections per second per address (0: no limit) */
    uint32_t conn_burst;         /* ... of which this many at once */
    uint32_t hello_timeout_ms;   /* after the upgrade, hello must come within this (0: 10000) */
    uint32_t handshake_timeout_ms;
    uint32_t max_header_bytes;
    uint32_t ping_interval_ms;
    uint32_t pong_timeout_ms;
    uint32_t max_frame_bytes; /* a WebSocket message, assembled (close 1009 beyond) */
    uint32_t max_fragments;   /* frames one message may arrive in (close 1009 beyond) */
    uint32_t max_message_bytes;
    uint32_t max_inflight;  /* announced in welcome */
    uint32_t session_ttl_s; /* announced in welcome (the broker enforces it) */
    size_t max_output_bytes;
    const char *secret_key; /* NULL: anonymous clients (loopback only) */
    const char *api_key;    /* NULL: server API only in anonymous mode */
    char *const *origins;   /* pages (Origin) allowed; n_origins 0: the same origin only */
    size_t n_origins;
    char *const *hosts; /* Host header values served; n_hosts 0: any */
    size_t n_hosts;
    const char *version;
    /* Optional, from the composition root (api does not know sync): the
     * JSON object /health shows as "sync" (NULL: {"state":"disabled"}), and
     * extra Prometheus text appended to /metrics. */
    void (*health_sync)(void *arg, struct evbuffer *out);
    void (*metrics_extra)(void *arg, struct evbuffer *out);
    void *extra_arg;
} api_options_t;

typedef struct api_server api_server_t;

int api_server_start(struct event_base *base, brk_t *brk, wal_t *wal, const api_options_t *opts,
                     api_server_t **ret, char *errbuf, size_t errlen);
uint16_t api_server_port(const api_server_t *srv);
/* Stop accepting; close every WebSocket with 1001 and every HTTP connection. */
void api_server_shutdown(api_server_t *srv);
/* Connections still open (waiting for their close to flush). */
size_t api_server_connections(const api_server_t *srv);
void api_server_free(api_server_t *srv);

#endif
