/*
 * wal_append.c - append requests and their completion (see wal.c for the design).
 */
#include "wal_int.h"

/* ---- append requests --------------------------------------------------- */

/* Freed requests kept for reuse (a publish allocates one, and its inline
 * room is what most publishes need): process-wide, so that requests freed
 * on another thread than the one that made them come back too. */
#define REQ_CACHE_MAX 256
static pthread_mutex_t req_cache_mu = PTHREAD_MUTEX_INITIALIZER;
static wal_append_t *req_cache;
static unsigned req_cached;

int wal_append_new(wal_append_cb cb, void *arg, wal_append_t **ret_req)
{
    pthread_mutex_lock(&req_cache_mu);
    wal_append_t *r = req_cache;
    if (r) {
        req_cache = r->next;
        req_cached--;
    }
    pthread_mutex_unlock(&req_cache_mu);
    if (r)
        memset(r, 0, offsetof(wal_append_t, inline_buf));
    else
        r = calloc(1, sizeof(*r));
    if (!r)
        return WAL_ENOMEM;
    r->cb = cb;
    r->arg = arg;
    *ret_req = r;
    return 0;
}

void wal_append_times(const wal_append_t *req, int64_t *ret_taken_us, int64_t *ret_done_us)
{
    *ret_taken_us = req->taken_us;
    *ret_done_us = req->done_us;
}

void wal_append_free(wal_append_t *req)
{
    if (!req)
        return;
    if (req->msgs != &req->inline_msg)
        free(req->msgs);
    if (req->results != &req->inline_res)
        free(req->results);
    free(req->cursors);
    if (req->buf != req->inline_buf)
        free(req->buf);
    pthread_mutex_lock(&req_cache_mu);
    if (req_cached < REQ_CACHE_MAX) {
        req->next = req_cache;
        req_cache = req;
        req_cached++;
        req = NULL;
    }
    pthread_mutex_unlock(&req_cache_mu);
    free(req);
}

/* Make room for `len` more bytes in the request's copy buffer. */
static int req_grow_buf(wal_append_t *r, size_t len)
{
    if (r->buf_cap - r->buf_len >= len)
        return 0;
    if (!r->buf && len <= sizeof(r->inline_buf)) {
        r->buf = r->inline_buf;
        r->buf_cap = sizeof(r->inline_buf);
        return 0;
    }
    size_t ncap = r->buf_cap ? r->buf_cap : 256;
    while (ncap - r->buf_len < len) {
        if (ncap > SIZE_MAX / 2)
            return WAL_ENOMEM;
        ncap *= 2;
    }
    uint8_t *nb;
    if (r->buf == r->inline_buf) {
        nb = malloc(ncap);
        if (nb)
            memcpy(nb, r->inline_buf, r->buf_len);
    } else {
        nb = realloc(r->buf, ncap);
    }
    if (!nb)
        return WAL_ENOMEM;
    r->buf = nb;
    r->buf_cap = ncap;
    return 0;
}

/* Make room for `n` more messages. */
static int req_grow_msgs(wal_append_t *r, size_t n)
{
    if (r->cap_msgs - r->n_msgs >= n)
        return 0;
    if (r->cap_msgs == 0 && n == 1) {
        r->msgs = &r->inline_msg;
        r->results = &r->inline_res;
        r->cap_msgs = 1;
        return 0;
    }
    size_t ncap = r->cap_msgs ? r->cap_msgs : 4;
    while (ncap - r->n_msgs < n) {
        if (ncap > SIZE_MAX / (2 * sizeof(struct pmsg)))
            return WAL_ENOMEM;
        ncap *= 2;
    }
    bool was_inline = r->msgs == &r->inline_msg;
    struct pmsg *nm =
        was_inline ? malloc(ncap * sizeof(*nm)) : realloc(r->msgs, ncap * sizeof(*nm));
    if (!nm)
        return WAL_ENOMEM;
    if (was_inline)
        memcpy(nm, r->msgs, r->n_msgs * sizeof(*nm));
    r->msgs = nm;
    wal_result_t *nr =
        was_inline ? malloc(ncap * sizeof(*nr)) : realloc(r->results, ncap * sizeof(*nr));
    if (!nr) {
        if (was_inline) { /* keep the request consistent: back to inline */
            free(nm);
            r->msgs = &r->inline_msg;
        }
        return WAL_ENOMEM;
    }
    if (was_inline)
        memcpy(nr, r->results, r->n_msgs * sizeof(*nr));
    r->results = nr;
    r->cap_msgs = ncap;
    return 0;
}

int wal_append_reserve(wal_append_t *r, size_t n_msgs, size_t bytes)
{
    int rc = req_grow_msgs(r, n_msgs);
    return rc ? rc : req_grow_buf(r, bytes);
}

static int req_copy(wal_append_t *r, const void *p, size_t len, size_t *ret_off)
{
    int rc = req_grow_buf(r, len);
    if (rc)
        return rc;
    *ret_off = r->buf_len;
    if (len)
        memcpy(r->buf + r->buf_len, p, len);
    r->buf_len += len;
    return 0;
}

int wal_append_add_msg(wal_append_t *r, const wal_msg_t *m)
{
    if (!m->stream || m->stream_len == 0 || m->stream_len > WAL_STREAM_NAME_MAX ||
        m->producer_len > WAL_PRODUCER_MAX || m->msgid_len > WAL_MSGID_MAX ||
        m->headers_len > WAL_HEADERS_MAX || m->payload_len > UINT32_MAX ||
        (m->payload_len && !m->payload) || (m->producer_len && !m->producer) ||
        (m->msgid_len && !m->msgid) || (m->headers_len && !m->headers) ||
        (m->direction != WAL_DIR_IN && m->direction != WAL_DIR_OUT))
        return WAL_EINVAL;
    int grc = req_grow_msgs(r, 1);
    if (grc)
        return grc;
    struct pmsg pm = {0};
    size_t mark = r->buf_len;
    int rc = req_copy(r, m->stream, m->stream_len, &pm.stream);
    if (!rc)
        rc = req_copy(r, m->producer, m->producer_len, &pm.producer);
    if (!rc)
        rc = req_copy(r, m->msgid, m->msgid_len, &pm.msgid);
    if (!rc)
        rc = req_copy(r, m->headers, m->headers_len, &pm.headers);
    if (!rc)
        rc = req_copy(r, m->payload, m->payload_len, &pm.payload);
    if (rc) {
        r->buf_len = mark;
        return rc;
    }
    pm.stream_len = (uint32_t)m->stream_len;
    pm.producer_len = (uint32_t)m->producer_len;
    pm.msgid_len = (uint32_t)m->msgid_len;
    pm.headers_len = (uint32_t)m->headers_len;
    pm.payload_len = m->payload_len;
    pm.direction = (uint8_t)m->direction;
    pm.timestamp_us = m->timestamp_us;
    if (m->payload_len > r->max_payload)
        r->max_payload = m->payload_len;
    memset(&r->results[r->n_msgs], 0, sizeof(r->results[0]));
    r->msgs[r->n_msgs++] = pm;
    return 0;
}

static int req_add_keyed(wal_append_t *r, enum pc_kind kind, const void *session,
                         size_t session_len, const void *data, size_t data_len, uint64_t offset)
{
    if (r->n_cursors == r->cap_cursors) {
        size_t ncap = r->cap_cursors ? r->cap_cursors * 2 : 4;
        struct pcursor *nc = realloc(r->cursors, ncap * sizeof(*nc));
        if (!nc)
            return WAL_ENOMEM;
        r->cursors = nc;
        r->cap_cursors = ncap;
    }
    struct pcursor pc = {0};
    size_t mark = r->buf_len;
    int rc = req_copy(r, session, session_len, &pc.session);
    if (!rc)
        rc = req_copy(r, data, data_len, &pc.stream);
    if (rc) {
        r->buf_len = mark;
        return rc;
    }
    pc.session_len = (uint32_t)session_len;
    pc.stream_len = (uint32_t)data_len;
    pc.offset = offset;
    pc.kind = (uint8_t)kind;
    r->cursors[r->n_cursors++] = pc;
    return 0;
}

bool wal_session_ok(const void *session, size_t session_len)
{
    return session && session_len > 0 && session_len <= WAL_SESSION_MAX;
}

bool wal_stream_ok(const char *stream, size_t stream_len)
{
    return stream && stream_len > 0 && stream_len <= WAL_STREAM_NAME_MAX;
}

int wal_append_add_cursor(wal_append_t *r, const void *session, size_t session_len,
                          const char *stream, size_t stream_len, uint64_t offset)
{
    if (!wal_session_ok(session, session_len) || !wal_stream_ok(stream, stream_len))
        return WAL_EINVAL;
    return req_add_keyed(r, PC_CURSOR_PUT, session, session_len, stream, stream_len, offset);
}

int wal_append_del_cursor(wal_append_t *r, const void *session, size_t session_len,
                          const char *stream, size_t stream_len)
{
    if (!wal_session_ok(session, session_len) || !wal_stream_ok(stream, stream_len))
        return WAL_EINVAL;
    return req_add_keyed(r, PC_CURSOR_DEL, session, session_len, stream, stream_len, 0);
}

int wal_append_put_session(wal_append_t *r, const void *session, size_t session_len,
                           const wal_session_t *s)
{
    if (!wal_session_ok(session, session_len) || !s || s->secret_len > WAL_SECRET_MAX)
        return WAL_EINVAL;
    uint8_t val[WAL_SESSION_VAL_MIN + WAL_PRODUCER_MAX + WAL_SECRET_MAX];
    wal_session_val_encode(s, val);
    return req_add_keyed(r, PC_SESSION_PUT, session, session_len, val, wal_session_val_size(s), 0);
}

int wal_append_del_session(wal_append_t *r, const void *session, size_t session_len)
{
    if (!wal_session_ok(session, session_len))
        return WAL_EINVAL;
    return req_add_keyed(r, PC_SESSION_DEL, session, session_len, NULL, 0, 0);
}

void wal_on_visible(wal_t *wal, void (*cb)(void *arg), void *arg)
{
    wal->visible_cb = cb;
    wal->visible_arg = arg;
}

void wal_append_when_durable(wal_append_t *req)
{
    req->when_durable = true;
}

int wal_append_status(const wal_append_t *req)
{
    return req->status;
}

size_t wal_append_count(const wal_append_t *req)
{
    return req->n_msgs;
}

const wal_result_t *wal_append_result(const wal_append_t *req, size_t i)
{
    return i < req->n_msgs ? &req->results[i] : NULL;
}

int wal_append_msg_data(const wal_append_t *req, size_t i, const uint8_t **ret_headers,
                        size_t *ret_headers_len, const uint8_t **ret_payload,
                        size_t *ret_payload_len)
{
    if (i >= req->n_msgs)
        return WAL_EINVAL;
    const struct pmsg *pm = &req->msgs[i];
    *ret_headers = req->buf + pm->headers;
    *ret_headers_len = pm->headers_len;
    *ret_payload = req->buf + pm->payload;
    *ret_payload_len = pm->payload_len;
    return 0;
}

/* Under wal->mu: whether the WAL takes new work now (0), or the code that
 * refuses it: stopped after a fatal error, closing, or a restore running. */
int wal_accepting_locked(wal_t *wal)
{
    if (__atomic_load_n(&wal->failed, __ATOMIC_ACQUIRE))
        return WAL_EFATAL;
    if (wal->closing)
        return WAL_ECLOSED;
    if (wal->restoring)
        return WAL_EBUSY;
    return 0;
}

int wal_append_submit(wal_t *wal, wal_append_t *req)
{
    if (req->n_msgs == 0 && req->n_cursors == 0)
        return WAL_EINVAL;
    if (req->max_payload > wal->opts.max_record_bytes)
        return WAL_EINVAL;
    if (wal->read_only)
        return WAL_ECLOSED;
    pthread_mutex_lock(&wal->mu);
    int rc = wal_accepting_locked(wal);
    if (!rc) {
        req->status = 0;
        req->next = NULL;
        if (wal->q_tail)
            wal->q_tail->next = req;
        else
            wal->q_head = req;
        wal->q_tail = req;
        pthread_cond_signal(&wal->cond);
    }
    pthread_mutex_unlock(&wal->mu);
    return rc;
}

/* ---- completion -------------------------------------------------------- */

void wal_done_run(wal_t *wal)
{
    pthread_mutex_lock(&wal->done_mu);
    wal_append_t *list = wal->done_head;
    wal->done_head = wal->done_tail = NULL;
    pthread_mutex_unlock(&wal->done_mu);
    while (list) {
        wal_append_t *next = list->next;
        list->next = NULL;
        list->cb(list, list->arg);
        list = next;
    }
}

void wal_done_ev_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    wal_t *wal = arg;
    wal_done_run(wal);
    if (__atomic_exchange_n(&wal->state_pending, 0, __ATOMIC_ACQ_REL) && wal->state_cb)
        wal->state_cb(wal->state_arg);
    if (__atomic_exchange_n(&wal->visible_pending, 0, __ATOMIC_ACQ_REL) && wal->visible_cb)
        wal->visible_cb(wal->visible_arg);
}

/* An LMDB commit made records readable: tell the loop (opts.visible_cb). */
void wal_notify_visible(wal_t *wal)
{
    if (!wal->base || !wal->visible_cb)
        return;
    __atomic_store_n(&wal->visible_pending, 1, __ATOMIC_RELEASE);
    event_active(wal->done_ev, EV_READ, 0);
}

/* Complete a linked list of requests (status: set on each, or 0 to keep
 * theirs) with one lock and one wake-up of the loop. */
void wal_complete_list(wal_t *wal, wal_append_t *list, int status)
{
    wal_append_t *head = NULL, *tail = NULL;
    int64_t t = list ? wal_mono_us() : 0;
    while (list) {
        wal_append_t *r = list, *next = list->next;
        list = next;
        if (status)
            r->status = status;
        r->done_us = t;
        r->next = NULL;
        if (r->direct || !wal->base) {
            r->cb(r, r->arg);
            continue;
        }
        if (tail)
            tail->next = r;
        else
            head = r;
        tail = r;
    }
    if (!head)
        return;
    pthread_mutex_lock(&wal->done_mu);
    if (wal->done_tail)
        wal->done_tail->next = head;
    else
        wal->done_head = head;
    wal->done_tail = tail;
    pthread_mutex_unlock(&wal->done_mu);
    event_active(wal->done_ev, EV_READ, 0);
}

void wal_complete(wal_t *wal, wal_append_t *r, int status)
{
    r->status = status;
    r->next = NULL;
    wal_complete_list(wal, r, 0);
}

/*
 * Complete a whole batch with one lock and one wake-up of the loop: per
 * request, event_active() costs a futex wake and an eventfd write on the
 * writer thread, between commits. own_status: each keeps its r->status.
 */
void wal_complete_batch(wal_t *wal, wal_append_t **reqs, size_t n, bool own_status, int status)
{
    wal_append_t *head = NULL, **tail = &head;
    for (size_t q = 0; q < n; q++) {
        if (!own_status)
            reqs[q]->status = status;
        *tail = reqs[q];
        tail = &reqs[q]->next;
    }
    *tail = NULL;
    wal_complete_list(wal, head, 0);
}

/* ---- synchronous helpers ----------------------------------------------- */

struct sync_wait {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool done;
};

static void sync_cb(wal_append_t *req, void *arg)
{
    (void)req;
    struct sync_wait *w = arg;
    pthread_mutex_lock(&w->mu);
    w->done = true;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->mu);
}

static int append_sync(wal_t *wal, const wal_msg_t *msgs, size_t n, wal_result_t *results,
                       bool when_durable)
{
    struct sync_wait w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false};
    wal_append_t *req;
    int rc = wal_append_new(sync_cb, &w, &req);
    if (rc)
        return rc;
    req->direct = true;
    req->when_durable = when_durable;
    /* Size the request once: growing it by doubling costs more than the
     * append itself for large batches (realloc, and glibc trimming it). */
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++)
        bytes += msgs[i].stream_len + msgs[i].producer_len + msgs[i].msgid_len +
                 msgs[i].headers_len + msgs[i].payload_len;
    rc = wal_append_reserve(req, n, bytes);
    for (size_t i = 0; i < n && !rc; i++)
        rc = wal_append_add_msg(req, &msgs[i]);
    if (!rc)
        rc = wal_append_submit(wal, req);
    if (rc) {
        wal_append_free(req);
        return rc;
    }
    pthread_mutex_lock(&w.mu);
    while (!w.done)
        pthread_cond_wait(&w.cond, &w.mu);
    pthread_mutex_unlock(&w.mu);
    rc = req->status;
    if (!rc && results)
        memcpy(results, req->results, n * sizeof(*results));
    wal_append_free(req);
    pthread_cond_destroy(&w.cond);
    pthread_mutex_destroy(&w.mu);
    return rc;
}

int wal_append_sync(wal_t *wal, const wal_msg_t *msgs, size_t n, wal_result_t *results)
{
    return append_sync(wal, msgs, n, results, false);
}

int wal_append_sync_durable(wal_t *wal, const wal_msg_t *msgs, size_t n, wal_result_t *results)
{
    return append_sync(wal, msgs, n, results, true);
}

int wal_retain(wal_t *wal, uint64_t upto_seq, uint64_t *ret_dropped)
{
    if (wal->read_only)
        return WAL_ECLOSED;
    struct retain_job job = {.upto = upto_seq, .chunk = wal->opts.retain_chunk};
    pthread_mutex_lock(&wal->mu);
    /* One retention job at a time; later callers wait their turn. */
    while (wal->retain && !wal->closing)
        pthread_cond_wait(&wal->done_cond, &wal->mu);
    int rc = wal_accepting_locked(wal);
    if (!rc) {
        wal->retain = &job;
        pthread_cond_signal(&wal->cond);
        while (!job.done)
            pthread_cond_wait(&wal->done_cond, &wal->mu);
        rc = job.status;
    }
    pthread_mutex_unlock(&wal->mu);
    if (!rc && ret_dropped)
        *ret_dropped = job.dropped;
    return rc;
}
