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
    /*
     * Deployment (docs/operations.md, "Security model"). Every string and
     * list is borrowed: it must outlive the server or the next
     * api_server_reload().
     */
    const char *previous_secret_key; /* tokens signed with it verify too (key rotation) */
    int anonymous; /* 1: a hello without a token gets full access; 0: a token is required */
    int api_open;  /* 1: POST /api/publish needs no API key (when api_key is NULL) */
    char *const *trusted_proxies; /* CIDRs: X-Forwarded-For/X-Real-IP believed from these */
    size_t n_trusted_proxies;
    char *const *monitor_allow; /* CIDRs that may read /metrics and /health details */
    size_t n_monitor_allow;
    const char *monitor_token; /* NULL, or a bearer token that may read them from anywhere */
    uint32_t expiry_grace_s;   /* close a connection this long after its token's exp */
    int use_listen_fd;         /* 1: take listen_fd (bound and listening) instead of binding */
    int listen_fd;
} api_options_t;

typedef struct api_server api_server_t;

int api_server_start(struct event_base *base, brk_t *brk, wal_t *wal, const api_options_t *opts,
                     api_server_t **ret, char *errbuf, size_t errlen);
uint16_t api_server_port(const api_server_t *srv);
/*
 * Apply what can change while running (SIGHUP): the secret keys, anonymous,
 * the API key and api_open, the origin list, trusted proxies, monitoring
 * access, the expiry grace, max_connections, handshake_timeout_ms,
 * max_header_bytes, ping_interval_ms, pong_timeout_ms, max_message_bytes,
 * max_inflight (announced in welcome), max_frame_bytes (new connections) and
 * max_output_bytes. Other fields of opts are ignored. New connections and requests use the new
 * values; a connection keeps the token it authenticated with (and its permissions) until it
 * refreshes it. Returns 0, or -1 with errbuf set and nothing changed (e.g. a bad CIDR).
 */
int api_server_reload(api_server_t *srv, const api_options_t *opts, char *errbuf, size_t errlen);
/* Stop accepting; close every WebSocket with 1001 and every HTTP connection. */
void api_server_shutdown(api_server_t *srv);
/* Connections still open (waiting for their close to flush). */
size_t api_server_connections(const api_server_t *srv);
void api_server_free(api_server_t *srv);

#endif
