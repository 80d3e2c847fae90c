/*
 * standby.h - arqd before it serves, with ha.role = active | standby
 * (docs/ha.md): wait for the lease, then make sure the data directory holds
 * a WAL that continues MySQL's history, rebuilding it from MySQL if not.
 */
#ifndef ARQ_STANDBY_H
#define ARQ_STANDBY_H

#include <stdint.h>

#include "config.h"
#include "sync.h"

typedef struct arq_standby_opts {
    const arq_config_t *cfg; /* data_dir, host, port, ha.* */
    const sync_url_t *url;
    const char *database_url; /* the URL's text, for arq-replay restore */
    const char *self_path;    /* argv[0]-independent path of arqd (/proc/self/exe) */
    int listen_fd;            /* a listening socket to answer on, or -1: bind host:port */
    uint32_t cooldown_ms;     /* wait this long before trying (after a handover) */
} arq_standby_opts_t;

/*
 * Blocks until this node holds the lease (its generation in *generation)
 * and data_dir holds the WAL to serve. Meanwhile the listener answers every
 * request with 503 (/health: {"status":"standby", "phase": ...}), so that
 * clients move on to the next URL of their list. *listen_fd gets the
 * listening socket, still open, for the API server. 0: done; 1: stopped by
 * SIGTERM/SIGINT; -1: failed (logged).
 */
int arq_standby_run(const arq_standby_opts_t *o, uint64_t *generation, int *listen_fd);

#endif
