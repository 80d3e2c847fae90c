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
#include <stdlib.h>
#include <string.h>

#include "sync.h"
#include "sync_internal.h"

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
    MYSQL *m;
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

static int cold_query(sync_cold_t *c, sync_cold_req_t *r)
{
    if (!c->m) {
        c->m = sync_mysql_connect(&c->url, NULL, 0);
        if (!c->m)
            return SYNC_ECONNECT;
    }
    char *sql = malloc(2 * r->stream_len + 256);
    if (!sql)
        return SYNC_ENOMEM;
    int n = snprintf(
        sql, 200, "SELECT `offset`, ts_us, headers, payload FROM arq_messages WHERE stream = X'");
    n += (int)mysql_hex_string(sql + n, r->stream, (unsigned long)r->stream_len);
    n += snprintf(sql + n, 200,
                  "' AND `offset` BETWEEN %" PRIu64 " AND %" PRIu64 " ORDER BY `offset` LIMIT %u",
                  r->from, r->to, r->max);
    int rc = mysql_real_query(c->m, sql, (unsigned long)n);
    free(sql);
    MYSQL_RES *res = rc == 0 ? mysql_store_result(c->m) : NULL;
    if (!res) {
        mysql_close(c->m);
        c->m = NULL;
        return SYNC_ESQL;
    }
    size_t nrows = mysql_num_rows(res), bytes = 0;
    MYSQL_ROW row;
    while ((row = mysql_fetch_row(res))) {
        unsigned long *len = mysql_fetch_lengths(res);
        bytes += len[2] + len[3];
    }
    r->rows = calloc(nrows ? nrows : 1, sizeof(*r->rows));
    r->blob = malloc(bytes ? bytes : 1);
    if (!r->rows || !r->blob) {
        mysql_free_result(res);
        return SYNC_ENOMEM;
    }
    mysql_data_seek(res, 0);
    size_t off = 0;
    while ((row = mysql_fetch_row(res))) {
        unsigned long *len = mysql_fetch_lengths(res);
        sync_cold_row_t *o = &r->rows[r->n_rows++];
        o->offset = strtoull(row[0], NULL, 10);
        o->ts_us = strtoll(row[1], NULL, 10);
        memcpy(r->blob + off, row[2], len[2]);
        o->headers = r->blob + off;
        o->headers_len = len[2];
        off += len[2];
        memcpy(r->blob + off, row[3], len[3]);
        o->payload = r->blob + off;
        o->payload_len = len[3];
        off += len[3];
    }
    mysql_free_result(res);
    return 0;
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
    if (c->m)
        mysql_close(c->m);
    mysql_thread_end();
    return NULL;
}

int sync_cold_open(const sync_url_t *u, struct event_base *base, sync_cold_t **ret)
{
    sync_cold_t *c = calloc(1, sizeof(*c));
    if (!c)
        return SYNC_ENOMEM;
    c->url = *u;
    c->url.user = u->user ? strdup(u->user) : NULL;
    c->url.password = u->password ? strdup(u->password) : NULL;
    c->url.host = u->host ? strdup(u->host) : NULL;
    c->url.db = u->db ? strdup(u->db) : NULL;
    c->url.socket = u->socket ? strdup(u->socket) : NULL;
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
