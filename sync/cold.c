/*
 * cold.c - the cold tier's read side: offsets the WAL no longer holds, read
 * from MySQL's arq_messages on a thread of its own (never on the event
 * loop), results handed back to the loop (see sync.h, sync_cold_*).
 */
#include <errno.h>
#include <event2/event.h>
#include <inttypes.h>
#include <mysql.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sync.h"
#include "sync_internal.h"
#include "sync_tools.h"

struct sync_cold_req {
    sync_cold_t *c;
    char *stream;
    size_t stream_len;
    uint64_t from, to;
    uint32_t max;
    sync_cold_cb cb;
    void *arg;
    bool cancelled;
    int status;
    sync_cold_row_t *rows;
    size_t n_rows;
    uint8_t *blob; /* the rows' headers and payloads */
    sync_cold_req_t *next;
};

struct sync_cold {
    sync_url_t url;
    struct event_base *base;
    struct event *done_ev;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool stop;
    sync_cold_req_t *q_head, *q_tail;       /* to the thread */
    sync_cold_req_t *done_head, *done_tail; /* back to the loop */
    sync_db_t *db;                          /* its own connection */
    uint64_t reads, rows, errors;
};

static void req_free(sync_cold_req_t *r)
{
    free(r->stream);
    free(r->rows);
    free(r->blob);
    free(r);
}

static void done_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    sync_cold_t *c = arg;
    pthread_mutex_lock(&c->mu);
    sync_cold_req_t *list = c->done_head;
    c->done_head = c->done_tail = NULL;
    pthread_mutex_unlock(&c->mu);
    while (list) {
        sync_cold_req_t *next = list->next;
        if (!list->cancelled)
            list->cb(list, list->status, list->rows, list->n_rows, list->arg);
        req_free(list);
        list = next;
    }
}

struct copy_ctx {
    sync_cold_req_t *r;
    size_t cap, blob_len, blob_cap;
    bool oom;
};

/* One row of sync_db_rows (valid during the call): keep a copy. Pointers
 * into the blob are set once it stops growing; offsets until then. */
static int copy_row(const sync_db_row_t *row, void *arg)
{
    struct copy_ctx *x = arg;
    sync_cold_req_t *r = x->r;
    if (r->n_rows == x->cap) {
        size_t cap = x->cap ? x->cap * 2 : 64;
        sync_cold_row_t *n = realloc(r->rows, cap * sizeof(*n));
        if (!n) {
            x->oom = true;
            return 1;
        }
        r->rows = n;
        x->cap = cap;
    }
    size_t need = x->blob_len + row->headers_len + row->payload_len;
    if (need > x->blob_cap) {
        size_t cap = x->blob_cap ? x->blob_cap : 1u << 16;
        while (cap < need)
            cap *= 2;
        uint8_t *n = realloc(r->blob, cap);
        if (!n) {
            x->oom = true;
            return 1;
        }
        r->blob = n;
        x->blob_cap = cap;
    }
    sync_cold_row_t *o = &r->rows[r->n_rows++];
    o->offset = row->offset;
    o->ts_us = row->ts_us;
    o->headers = (const uint8_t *)(uintptr_t)x->blob_len;
    o->headers_len = row->headers_len;
    memcpy(r->blob + x->blob_len, row->headers, row->headers_len);
    x->blob_len += row->headers_len;
    o->payload = (const uint8_t *)(uintptr_t)x->blob_len;
    o->payload_len = row->payload_len;
    memcpy(r->blob + x->blob_len, row->payload, row->payload_len);
    x->blob_len += row->payload_len;
    return 0;
}

static int cold_query(sync_cold_t *c, sync_cold_req_t *r)
{
    if (!c->db && sync_db_open(&c->url, &c->db, NULL, 0) != 0)
        return SYNC_ECONNECT;
    struct copy_ctx x = {.r = r};
    int rc = sync_db_rows(c->db, r->stream, r->stream_len, r->from, r->to, r->max, copy_row, &x,
                          NULL, NULL, 0);
    for (size_t i = 0; i < r->n_rows; i++) {
        r->rows[i].headers = r->blob + (uintptr_t)r->rows[i].headers;
        r->rows[i].payload = r->blob + (uintptr_t)r->rows[i].payload;
    }
    if (rc) {
        sync_db_close(c->db); /* reconnect on the next read */
        c->db = NULL;
        return rc;
    }
    return x.oom ? SYNC_ENOMEM : 0;
}

static void *cold_main(void *arg)
{
    sync_cold_t *c = arg;
    mysql_thread_init();
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->q_head && !c->stop)
            pthread_cond_wait(&c->cond, &c->mu);
        if (c->stop)
            break;
        sync_cold_req_t *r = c->q_head;
        c->q_head = r->next;
        if (!c->q_head)
            c->q_tail = NULL;
        r->next = NULL;
        bool cancelled = r->cancelled;
        pthread_mutex_unlock(&c->mu);
        r->status = cancelled ? 0 : cold_query(c, r);
        pthread_mutex_lock(&c->mu);
        c->reads++;
        c->rows += r->n_rows;
        if (r->status)
            c->errors++;
        if (c->done_tail)
            c->done_tail->next = r;
        else
            c->done_head = r;
        c->done_tail = r;
        event_active(c->done_ev, EV_READ, 0);
    }
    /* not run: queued requests are freed by sync_cold_close */
    pthread_mutex_unlock(&c->mu);
    sync_db_close(c->db);
    mysql_thread_end();
    return NULL;
}

int sync_cold_open(const sync_url_t *u, struct event_base *base, sync_cold_t **ret)
{
    sync_cold_t *c = calloc(1, sizeof(*c));
    if (!c)
        return SYNC_ENOMEM;
    if (sync_url_copy(&c->url, u) != 0) {
        free(c);
        return SYNC_ENOMEM;
    }
    c->base = base;
    c->done_ev = event_new(base, -1, 0, done_cb, c);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cond, NULL);
    if (!c->done_ev || pthread_create(&c->thread, NULL, cold_main, c) != 0) {
        if (c->done_ev)
            event_free(c->done_ev);
        sync_url_free(&c->url);
        free(c);
        return SYNC_ENOMEM;
    }
    *ret = c;
    return 0;
}

sync_cold_req_t *sync_cold_read(sync_cold_t *c, const char *stream, size_t stream_len,
                                uint64_t from, uint64_t to, uint32_t max, sync_cold_cb cb,
                                void *arg)
{
    sync_cold_req_t *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->stream = malloc(stream_len ? stream_len : 1);
    if (!r->stream) {
        free(r);
        return NULL;
    }
    memcpy(r->stream, stream, stream_len);
    r->stream_len = stream_len;
    r->c = c;
    r->from = from;
    r->to = to;
    r->max = max ? max : 1;
    r->cb = cb;
    r->arg = arg;
    pthread_mutex_lock(&c->mu);
    if (c->q_tail)
        c->q_tail->next = r;
    else
        c->q_head = r;
    c->q_tail = r;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->mu);
    return r;
}

void sync_cold_cancel(sync_cold_req_t *r)
{
    if (!r)
        return;
    pthread_mutex_lock(&r->c->mu);
    r->cancelled = true;
    pthread_mutex_unlock(&r->c->mu);
}

void sync_cold_stats(sync_cold_t *c, uint64_t *reads, uint64_t *rows, uint64_t *errors)
{
    pthread_mutex_lock(&c->mu);
    *reads = c->reads;
    *rows = c->rows;
    *errors = c->errors;
    pthread_mutex_unlock(&c->mu);
}

void sync_cold_close(sync_cold_t *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->mu);
    c->stop = true;
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->thread, NULL);
    sync_cold_req_t *lists[2] = {c->q_head, c->done_head};
    for (int i = 0; i < 2; i++) {
        while (lists[i]) {
            sync_cold_req_t *next = lists[i]->next;
            req_free(lists[i]);
            lists[i] = next;
        }
    }
    event_free(c->done_ev);
    sync_url_free(&c->url);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cond);
    free(c);
}
