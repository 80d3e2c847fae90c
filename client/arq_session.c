/*
 * arq_session.c - libarq's protocol: requests and replies, recovery after a
 * reconnect, and the public request functions (the design is in arq.c).
 */
#include "arq_int.h"

/* ---- requests and recovery ------------------------------------------- */

static struct sub *sub_find(arq_client_t *c, const char *stream)
{
    struct sub *s;
    TAILQ_FOREACH(s, &c->subs, link)
    {
        if (strcmp(s->stream, stream) == 0)
            return s;
    }
    return NULL;
}

/* Not once the server's close frame arrived: wslay takes no more messages
 * then, and the request must wait for the next connection instead. */
static int can_send(const arq_client_t *c)
{
    return c->conn == CN_READY && !c->teardown_pending && !c->close_received;
}

/* With reconnect, requests made while not connected wait for the next welcome. */
static int may_queue(const arq_client_t *c)
{
    return c->reconnect && !c->user_closed && c->state != ARQ_STATE_IDLE && !arq_final_state(c);
}

static void proto_violation(arq_client_t *c, const char *what)
{
    arq_set_error(c, "protocol error: %s", what);
    if (c->ws && c->conn != CN_CLOSING) {
        (void)wslay_event_queue_close(c->ws, 1002, NULL, 0);
        (void)wslay_event_send(c->ws);
    }
    arq_request_teardown(c, ARQ_EPROTO);
}

void arq_send_hello(arq_client_t *c)
{
    int trc = arq_token_fetch(c);
    if (trc != 0) {
        arq_set_error(c, "token provider failed: %s", arq_strerror(trc));
        arq_request_teardown(c, trc);
        return;
    }
    int resume = c->session && c->resume_token;
    msgpack_packer pk;
    c->out.size = 0;
    msgpack_packer_init(&pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 2 + (c->token ? 1 : 0) + (resume ? 2 : 0));
    arq_pack_kv_str(&pk, "t", "hello");
    arq_pack_kv_str(&pk, "client", c->client_name);
    if (c->token)
        arq_pack_kv_str(&pk, "token", c->token);
    if (resume) {
        arq_pack_kv_str(&pk, "session", c->session);
        arq_pack_kv_str(&pk, "resume_token", c->resume_token);
    }
    int rc = arq_ws_send_out(c);
    if (rc != 0) {
        arq_set_error(c, "cannot send hello: %s", arq_strerror(rc));
        arq_request_teardown(c, rc);
    }
}

/* The provider's new token for the live connection (refreshok or a nack
 * answers it; until then the old token holds). */
void arq_send_refresh(arq_client_t *c)
{
    msgpack_packer pk;
    c->out.size = 0;
    msgpack_packer_init(&pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 3);
    arq_pack_kv_str(&pk, "t", "refresh");
    arq_pack_str(&pk, "id");
    c->refresh_id = c->next_id++;
    msgpack_pack_uint64(&pk, c->refresh_id);
    arq_pack_kv_str(&pk, "token", c->token);
    (void)arq_ws_send_out(c); /* a failure tears the connection down */
}

/* Send s's sub: from its position if it has one, else as the application asked. */
static int send_sub(arq_client_t *c, struct sub *s)
{
    uint64_t id = c->next_id++;
    uint64_t epoch = s->pos ? (s->epoch ? s->epoch : ARQ_EPOCH_ANY) : s->want_epoch;
    msgpack_packer pk;
    c->out.size = 0;
    msgpack_packer_init(&pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, epoch == ARQ_EPOCH_ANY ? 4 : 5);
    arq_pack_kv_str(&pk, "t", "sub");
    arq_pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, id);
    arq_pack_kv_str(&pk, "stream", s->stream);
    arq_pack_str(&pk, "from");
    if (s->pos)
        msgpack_pack_uint64(&pk, s->pos);
    else if (s->from == ARQ_FROM_OFFSET)
        msgpack_pack_uint64(&pk, s->from_offset);
    else
        arq_pack_str(&pk, s->from == ARQ_FROM_EARLIEST ? "earliest" : "latest");
    if (epoch != ARQ_EPOCH_ANY) {
        arq_pack_str(&pk, "epoch");
        msgpack_pack_uint64(&pk, epoch);
    }
    int rc = arq_ws_send_out(c);
    if (rc != 0)
        return rc;
    if (s->sent)
        c->st.resubscribes++;
    s->sent = 1;
    s->req_id = id;
    s->wire = SW_PENDING;
    s->sent_epoch = epoch != ARQ_EPOCH_ANY;
    return 0;
}

/* Drop a subscription the server restored but we do not want (as it is). */
static void send_unsub(arq_client_t *c, const char *stream)
{
    msgpack_packer pk;
    c->out.size = 0;
    msgpack_packer_init(&pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 3);
    arq_pack_kv_str(&pk, "t", "unsub");
    arq_pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, c->next_id++);
    arq_pack_kv_str(&pk, "stream", stream);
    (void)arq_ws_send_out(c); /* a failure tears the connection down */
}

static int send_ack(arq_client_t *c, const char *stream, uint64_t offset)
{
    msgpack_packer pk;
    c->out.size = 0;
    msgpack_packer_init(&pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 3);
    arq_pack_kv_str(&pk, "t", "ack");
    arq_pack_kv_str(&pk, "stream", stream);
    arq_pack_str(&pk, "offset");
    msgpack_pack_uint64(&pk, offset);
    return arq_ws_send_out(c);
}

/*
 * Send the application's ack as far as the server can take it (up to
 * wire_recv). While it cannot take all of it (redeliveries after a resume),
 * ack in steps of a quarter window so the server does not pause.
 */
static int sub_flush_ack(arq_client_t *c, struct sub *s)
{
    if (s->wire != SW_ACTIVE || !can_send(c))
        return 0;
    uint64_t want = s->acked > s->floor ? s->acked : s->floor;
    uint64_t target = want < s->wire_recv ? want : s->wire_recv;
    if (target <= s->wire_acked)
        return 0;
    uint64_t step = c->max_inflight / 4 ? c->max_inflight / 4 : 1;
    if (target != want && target - s->wire_acked < step)
        return 0;
    int rc = send_ack(c, s->stream, target);
    if (rc == 0)
        s->wire_acked = target;
    return rc;
}

static int pub_send(arq_client_t *c, struct pub *p)
{
    int rc = arq_ws_send(c, p->frame, p->frame_len);
    if (rc != 0)
        return rc;
    if (p->sent)
        c->st.publishes_resent++;
    p->sent = 1;
    p->on_wire = 1;
    p->waiting = 0;
    return 0;
}

static void schedule_retry(arq_client_t *c, uint32_t n)
{
    if (evtimer_pending(c->ev_retry, NULL))
        return;
    struct timeval tv = arq_ms_tv(arq_backoff_ms(c, n));
    (void)evtimer_add(c->ev_retry, &tv);
}

/* Re-send what a 503 put on hold. */
void arq_resend_waiting(arq_client_t *c)
{
    struct sub *s;
    TAILQ_FOREACH(s, &c->subs, link)
    {
        if (s->waiting && s->wire == SW_OFF) {
            s->waiting = 0;
            if (send_sub(c, s) != 0)
                return;
        }
    }
    struct pub *p;
    TAILQ_FOREACH(p, &c->pubs, link)
    {
        if (p->waiting && !p->on_wire && pub_send(c, p) != 0)
            return;
    }
}

static void recover_done(arq_client_t *c, struct sub *s)
{
    if (!s->recovering)
        return;
    s->recovering = 0;
    c->recover_pending--;
    if (c->recover_pending == 0 && c->state == ARQ_STATE_RECOVERING)
        arq_set_state(c, ARQ_STATE_CONNECTED, 0, NULL);
}

/*
 * After a welcome: subscribe again what the server did not restore, then
 * re-send the publishes without a puback, in their order. Stops at a send
 * failure (the connection is then being torn down) or a freed client.
 */
static void resend_all(arq_client_t *c)
{
    struct sub *s;
    TAILQ_FOREACH(s, &c->subs, link)
    {
        if (s->wire != SW_OFF)
            continue;
        s->waiting = 0;
        if (send_sub(c, s) != 0)
            return;
        s->recovering = 1;
        c->recover_pending++;
    }
    struct pub *p, *next;
    for (p = TAILQ_FIRST(&c->pubs); p; p = next) {
        next = TAILQ_NEXT(p, link);
        if (p->on_wire || !p->frame)
            continue;
        if (p->payload_len > c->max_payload) {
            /* queued before we knew the limit */
            arq_pub_complete(c, p, ARQ_ETOOBIG, 0, 0);
            if (c->free_requested || c->teardown_pending)
                return;
            continue;
        }
        if (pub_send(c, p) != 0)
            return;
    }
}

/* welcome.subs of a resumed session. Returns 0, or -1 after a protocol error. */
static int restore_subs(arq_client_t *c, const msgpack_object *arr, msgpack_zone *z)
{
    for (uint32_t i = 0; i < arr->via.array.size; i++) {
        const msgpack_object *e = &arr->via.array.ptr[i];
        uint64_t epoch = 0, acked = 0, next = 0;
        char *stream = e->type == MSGPACK_OBJECT_MAP ? arq_mp_str(e, "stream", z) : NULL;
        if (!stream || arq_mp_uint(e, "epoch", &epoch) || arq_mp_uint(e, "acked", &acked) ||
            arq_mp_uint(e, "next", &next)) {
            proto_violation(c, "malformed welcome.subs");
            return -1;
        }
    }
    for (uint32_t i = 0; i < arr->via.array.size; i++) {
        const msgpack_object *e = &arr->via.array.ptr[i];
        uint64_t epoch = 0, acked = 0, next = 0;
        char *stream = arq_mp_str(e, "stream", z);
        if (!stream)
            return -1; /* out of zone memory */
        (void)arq_mp_uint(e, "epoch", &epoch);
        (void)arq_mp_uint(e, "acked", &acked);
        (void)arq_mp_uint(e, "next", &next);
        struct sub *s = sub_find(c, stream);
        int new_epoch = s && s->epoch && epoch && s->epoch != epoch;
        if (!s || s->wire != SW_OFF || (!new_epoch && s->pos && s->pos <= acked)) {
            /* Not ours, or the server would skip offsets the application has
             * not seen (a gap we never got): drop it; resend_all subscribes
             * ours again and ignores this one's messages until its subok. */
            send_unsub(c, stream);
            continue;
        }
        s->wire = SW_ACTIVE;
        s->req_id = 0;
        s->wire_recv = s->wire_acked = acked;
        if (new_epoch) {
            uint64_t old = s->epoch;
            s->epoch = epoch;
            s->pos = acked + 1;
            s->acked = acked;
            s->floor = 0;
            if (c->epoch_cb)
                c->epoch_cb(c, s->stream, old, epoch, c->epoch_arg);
        } else {
            if (epoch)
                s->epoch = epoch;
            if (!s->pos && s->from == ARQ_FROM_OFFSET && s->from_offset > acked + 1) {
                s->pos = s->from_offset; /* as in on_subok */
                s->floor = s->from_offset - 1;
            }
            if (!s->pos)
                s->pos = acked + 1;
        }
        if (!s->confirmed && !c->free_requested) {
            s->confirmed = 1;
            if (s->subok_cb)
                s->subok_cb(c, 0, s->epoch, acked + 1, next, s->arg);
        }
        if (c->free_requested || c->teardown_pending)
            return -1;
        (void)sub_flush_ack(c, s);
    }
    return 0;
}

static void on_welcome(arq_client_t *c, const msgpack_object *m, msgpack_zone *z)
{
    char *session = arq_mp_str(m, "session", z);
    char *token = arq_mp_str(m, "resume_token", z);
    const msgpack_object *res = arq_mp_get(m, "resumed");
    int resumed = res && res->type == MSGPACK_OBJECT_BOOLEAN && res->via.boolean;
    const msgpack_object *subs = resumed ? arq_mp_get(m, "subs") : NULL;
    if (!session) {
        proto_violation(c, "welcome without session");
        return;
    }
    if (subs && subs->type != MSGPACK_OBJECT_ARRAY) {
        proto_violation(c, "welcome.subs is not an array");
        return;
    }
    char *ns = strdup(session);
    char *nt = token ? strdup(token) : NULL;
    if (!ns || (token && !nt)) {
        free(ns);
        free(nt);
        arq_set_error(c, "out of memory");
        arq_request_teardown(c, ARQ_ENOMEM);
        return;
    }
    free(c->session);
    c->session = ns;
    free(c->resume_token);
    c->resume_token = nt;
    uint64_t v = 0;
    c->max_payload = arq_mp_uint(m, "max_payload", &v) == 0 ? v : (1u << 20);
    c->max_inflight = arq_mp_uint(m, "max_inflight", &v) == 0 && v ? v : ARQ_DEFAULT_INFLIGHT;
    c->conn = CN_READY;
    evtimer_del(c->ev_timer);
    arq_token_schedule(c, arq_mp_uint(m, "token_expires", &v) == 0 ? v : 0);
    c->last_rx_ms = arq_now_ms();
    if (c->ev_hb) {
        struct timeval tv = arq_ms_tv(c->hb_interval_ms);
        (void)event_add(c->ev_hb, &tv);
    }
    c->retries = 0;
    c->welcomed_ms = arq_now_ms();
    int first = !c->ever_welcomed;
    c->ever_welcomed = 1;
    c->st.connects++;
    if (!first)
        c->st.reconnects++;
    if (resumed)
        c->st.resumed++;

    if (subs && restore_subs(c, subs, z) != 0)
        return;
    if (c->free_requested || c->teardown_pending)
        return;
    resend_all(c);
    if (c->free_requested || c->teardown_pending)
        return;
    if (first) {
        arq_set_state(c, ARQ_STATE_CONNECTED, 0, NULL);
        arq_connect_cb cb = c->connect_cb;
        c->connect_cb = NULL;
        if (cb && !c->free_requested)
            cb(c, 0, c->connect_arg);
        return;
    }
    arq_set_state(c, ARQ_STATE_RECOVERING, 0, resumed ? "session resumed" : "new session");
    if (!c->free_requested && c->state == ARQ_STATE_RECOVERING && c->recover_pending == 0)
        arq_set_state(c, ARQ_STATE_CONNECTED, 0, NULL);
}

static struct pub *pub_on_wire(arq_client_t *c, uint64_t id)
{
    struct pub *p;
    TAILQ_FOREACH(p, &c->pubs, link)
    {
        if (p->on_wire && p->id == id)
            return p;
    }
    return NULL;
}

static struct sub *sub_by_req(arq_client_t *c, uint64_t id)
{
    struct sub *s;
    TAILQ_FOREACH(s, &c->subs, link)
    {
        if (s->wire == SW_PENDING && s->req_id == id)
            return s;
    }
    return NULL;
}

/* Take a publish off the list, free it, then tell its callback (which may
 * free the client). */
void arq_pub_complete(arq_client_t *c, struct pub *p, int status, uint64_t offset, int dup)
{
    TAILQ_REMOVE(&c->pubs, p, link);
    c->n_pubs--;
    arq_publish_cb cb = p->cb;
    void *arg = p->arg;
    arq_pub_free(p);
    if (cb)
        cb(c, status, offset, dup, arg);
}

/* The stream's history was reset (a new epoch): the subscription starts
 * over from the new epoch's earliest offset; old_epoch keeps the first
 * epoch we lost, for the subok that tells the application. */
static void sub_restart(struct sub *s)
{
    if (!s->old_epoch)
        s->old_epoch = s->epoch;
    s->epoch = 0;
    s->pos = 0;
    s->acked = 0;
    s->floor = 0;
    s->from = ARQ_FROM_EARLIEST;
    s->want_epoch = ARQ_EPOCH_ANY;
}

/* A sub refused for good: gone, the application is told. */
static void sub_refused(arq_client_t *c, struct sub *s, int status)
{
    TAILQ_REMOVE(&c->subs, s, link);
    if (s->recovering) {
        s->recovering = 0;
        c->recover_pending--;
    }
    arq_subok_cb cb = s->subok_cb;
    void *arg = s->arg;
    arq_sub_free(s);
    if (cb)
        cb(c, status, 0, 0, 0, arg);
    if (!c->free_requested && c->recover_pending == 0 && c->state == ARQ_STATE_RECOVERING)
        arq_set_state(c, ARQ_STATE_CONNECTED, 0, NULL);
}

/* A nack (or an error with an id) for request id. */
static void on_refusal(arq_client_t *c, uint64_t id, int code)
{
    struct pub *p = pub_on_wire(c, id);
    if (p) {
        p->on_wire = 0;
        if (code == 503 && p->frame && (c->max_retries == 0 || p->retries < c->max_retries)) {
            p->waiting = 1;
            schedule_retry(c, p->retries++);
            return;
        }
        arq_pub_complete(c, p, -code, 0, 0);
        return;
    }
    struct sub *s = sub_by_req(c, id);
    if (!s)
        return; /* not ours (an unsub): ignore */
    s->wire = SW_OFF;
    s->req_id = 0;
    if (code == 503 && c->reconnect && (c->max_retries == 0 || s->retries < c->max_retries)) {
        s->waiting = 1;
        schedule_retry(c, s->retries++);
        return;
    }
    if (code == 409 && s->confirmed && s->sent_epoch) {
        /* The stream's history was reset: start over in the new epoch,
         * from its earliest offset; the subok tells the application. */
        sub_restart(s);
        (void)send_sub(c, s);
        return;
    }
    sub_refused(c, s, -code);
}

static void on_subok(arq_client_t *c, struct sub *s, uint64_t epoch, uint64_t first, uint64_t next)
{
    if (s->pos && s->epoch && epoch != s->epoch) {
        /* A re-subscription with our epoch passes the server's check only
         * when the stream does not exist (epoch 0): its history was reset
         * and it starts over at 1. Our offsets are meaningless there. */
        sub_restart(s);
    }
    uint64_t start;
    if (s->pos)
        start = s->pos < next ? s->pos : next;
    else if (s->from == ARQ_FROM_EARLIEST)
        start = first;
    else if (s->from == ARQ_FROM_LATEST)
        start = next;
    else
        start = s->from_offset < next ? s->from_offset : next;
    if (start == 0)
        start = 1;
    s->wire = SW_ACTIVE;
    s->req_id = 0;
    s->retries = 0;
    s->wire_recv = s->wire_acked = start - 1;
    if (epoch)
        s->epoch = epoch;
    if (!s->pos && s->from == ARQ_FROM_OFFSET && s->from_offset > start) {
        /* The server starts at its tail, before the offset asked for: what
         * comes before it is dropped, and acked for the application. */
        s->pos = s->from_offset;
        s->floor = s->from_offset - 1;
    }
    if (!s->pos)
        s->pos = start;
    if (s->old_epoch) {
        uint64_t old = s->old_epoch;
        s->old_epoch = 0;
        if (c->epoch_cb)
            c->epoch_cb(c, s->stream, old, epoch, c->epoch_arg);
        if (c->free_requested || c->teardown_pending)
            return;
    }
    if (!s->confirmed) {
        s->confirmed = 1;
        if (s->subok_cb)
            s->subok_cb(c, 0, epoch, first, next, s->arg);
        if (c->free_requested || c->teardown_pending)
            return;
    }
    recover_done(c, s);
}

static void on_msg(arq_client_t *c, const msgpack_object *m, msgpack_zone *z)
{
    arq_message_t msg = {0};
    char *stream = arq_mp_str(m, "stream", z);
    const msgpack_object *pl = arq_mp_get(m, "payload");
    if (!stream || arq_mp_uint(m, "offset", &msg.offset) != 0 || !pl ||
        (pl->type != MSGPACK_OBJECT_BIN && pl->type != MSGPACK_OBJECT_STR)) {
        proto_violation(c, "malformed msg");
        return;
    }
    struct sub *s = sub_find(c, stream);
    if (!s || s->wire != SW_ACTIVE)
        return; /* not (yet) subscribed on this connection */
    if (msg.offset > s->wire_recv)
        s->wire_recv = msg.offset;
    if (msg.offset < s->pos) {
        c->st.redeliveries_dropped++;
        (void)sub_flush_ack(c, s);
        return;
    }
    (void)arq_mp_uint(m, "ts", &msg.ts_us);
    msg.stream = stream;
    msg.payload =
        (const uint8_t *)(pl->type == MSGPACK_OBJECT_BIN ? pl->via.bin.ptr : pl->via.str.ptr);
    msg.payload_len = pl->via.bin.size; /* same layout for str */
    const msgpack_object *h = arq_mp_get(m, "headers");
    if (h) {
        if (h->type != MSGPACK_OBJECT_MAP) {
            proto_violation(c, "msg headers not a map");
            return;
        }
        for (uint32_t i = 0; i < h->via.map.size; i++)
            if (h->via.map.ptr[i].key.type != MSGPACK_OBJECT_STR ||
                h->via.map.ptr[i].val.type != MSGPACK_OBJECT_STR) {
                proto_violation(c, "msg headers not str -> str");
                return;
            }
        msgpack_packer pk;
        c->headers.size = 0;
        msgpack_packer_init(&pk, &c->headers, msgpack_sbuffer_write);
        if (msgpack_pack_object(&pk, *h) != 0) {
            proto_violation(c, "cannot re-encode headers");
            return;
        }
        msg.headers = (const uint8_t *)c->headers.data;
        msg.headers_len = c->headers.size;
    }
    s->pos = msg.offset + 1;
    s->msg_cb(c, &msg, s->arg);
}

static void on_gap(arq_client_t *c, const msgpack_object *m, msgpack_zone *z)
{
    char *stream = arq_mp_str(m, "stream", z);
    uint64_t from = 0, to = 0;
    if (!stream || arq_mp_uint(m, "from", &from) || arq_mp_uint(m, "to", &to) || to < from) {
        proto_violation(c, "malformed gap");
        return;
    }
    struct sub *s = sub_find(c, stream);
    if (!s || s->wire != SW_ACTIVE)
        return;
    /* The server counts a gap as delivered and acked. */
    if (to > s->wire_recv)
        s->wire_recv = to;
    if (to > s->wire_acked)
        s->wire_acked = to;
    if (to < s->pos)
        return; /* reported before */
    if (from < s->pos)
        from = s->pos;
    s->pos = to + 1;
    if (c->gap_cb)
        c->gap_cb(c, stream, from, to, c->gap_arg);
}

static void handle_message(arq_client_t *c, const msgpack_object *m, msgpack_zone *z)
{
    char *t = arq_mp_str(m, "t", z);
    if (!t) {
        proto_violation(c, "message without a str \"t\"");
        return;
    }
    uint64_t id = 0, code = 0;

    if (c->conn == CN_WELCOME) {
        if (strcmp(t, "welcome") == 0) {
            on_welcome(c, m, z);
        } else if (strcmp(t, "error") == 0) {
            char *reason = arq_mp_str(m, "reason", z);
            arq_set_error(c, "%s", reason ? reason : "hello refused");
            int st = arq_mp_uint(m, "code", &code) == 0 && code >= 100 && code < 1000 ? -(int)code
                                                                                      : ARQ_EPROTO;
            arq_request_teardown(c, st);
        }
        return; /* anything else before welcome: ignore */
    }

    if (strcmp(t, "msg") == 0) {
        on_msg(c, m, z);
        return;
    }
    if (strcmp(t, "refreshok") == 0) {
        uint64_t exp = 0;
        if (arq_mp_uint(m, "id", &id) == 0 && id == c->refresh_id && c->refresh_id) {
            c->refresh_id = 0;
            c->st.token_refreshes++;
            arq_token_schedule(c, arq_mp_uint(m, "token_expires", &exp) == 0 ? exp : 0);
        }
        return;
    }
    if (strcmp(t, "puback") == 0 || strcmp(t, "nack") == 0 || strcmp(t, "subok") == 0) {
        if (arq_mp_uint(m, "id", &id) != 0) {
            proto_violation(c, "reply without id");
            return;
        }
        if (t[0] == 'n' && id == c->refresh_id && c->refresh_id) {
            /* refused: the old token holds until it expires; the server
             * then closes with 4002 and the reconnect asks for a new one */
            char *reason = arq_mp_str(m, "reason", z);
            c->refresh_id = 0;
            arq_set_error(c, "token refresh refused: %s", reason ? reason : "?");
            if (c->error_cb)
                c->error_cb(c, arq_mp_uint(m, "code", &code) == 0 ? -(int)code : ARQ_EPROTO,
                            c->last_error, c->error_arg);
            return;
        }
        if (t[0] == 'n') {
            char *reason = arq_mp_str(m, "reason", z);
            if (arq_mp_uint(m, "code", &code) != 0 || code < 100 || code > 999)
                code = 500;
            arq_set_error(c, "%s", reason ? reason : arq_strerror(-(int)code));
            on_refusal(c, id, (int)code);
            return;
        }
        if (t[0] == 'p') {
            struct pub *p = pub_on_wire(c, id);
            if (!p)
                return; /* not ours (or already failed): ignore */
            uint64_t off = 0;
            if (arq_mp_uint(m, "offset", &off) != 0) {
                proto_violation(c, "malformed puback");
                return;
            }
            const msgpack_object *dup = arq_mp_get(m, "dup");
            int d = dup && dup->type == MSGPACK_OBJECT_BOOLEAN && dup->via.boolean;
            arq_pub_complete(c, p, 0, off, d);
            return;
        }
        struct sub *s = sub_by_req(c, id);
        if (!s)
            return;
        uint64_t epoch = 0, first = 0, next = 0;
        if (arq_mp_uint(m, "epoch", &epoch) || arq_mp_uint(m, "first", &first) ||
            arq_mp_uint(m, "next", &next)) {
            proto_violation(c, "malformed subok");
            return;
        }
        on_subok(c, s, epoch, first, next);
        return;
    }
    if (strcmp(t, "gap") == 0) {
        on_gap(c, m, z);
        return;
    }
    if (strcmp(t, "error") == 0) {
        char *reason = arq_mp_str(m, "reason", z);
        if (arq_mp_uint(m, "code", &code) != 0 || code < 100 || code > 999)
            code = 500;
        arq_set_error(c, "%s", reason ? reason : arq_strerror(-(int)code));
        if (arq_mp_uint(m, "id", &id) == 0 && (pub_on_wire(c, id) || sub_by_req(c, id))) {
            on_refusal(c, id, (int)code);
            return;
        }
        if (c->error_cb)
            c->error_cb(c, -(int)code, c->last_error, c->error_arg);
        return;
    }
    /* unsubok and unknown types: ignored (forward compatibility). */
}

void arq_ws_msg_cb(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                   void *user)
{
    arq_client_t *c = user;
    if (c->teardown_pending || c->free_requested)
        return;
    if (arg->opcode == WSLAY_CONNECTION_CLOSE) {
        c->close_received = 1;
        c->close_code = arg->status_code;
        if (c->conn != CN_CLOSING)
            arq_set_error(c, "server closed the connection (%u%s%.*s)", arg->status_code,
                          arg->msg_length > 2 ? " " : "",
                          arg->msg_length > 2 ? (int)(arg->msg_length - 2) : 0,
                          arg->msg_length > 2 ? (const char *)arg->msg + 2 : "");
        return;
    }
    if (arg->opcode == WSLAY_PING || arg->opcode == WSLAY_PONG)
        return; /* wslay answers pings; any frame counts for the heartbeat */
    if (arg->opcode != WSLAY_BINARY_FRAME) {
        proto_violation(c, "non-binary message");
        return;
    }
    if (arq_mp_precheck(arg->msg, arg->msg_length) != 0) {
        proto_violation(c, "malformed msgpack");
        return;
    }
    msgpack_zone z;
    if (!msgpack_zone_init(&z, 2048)) {
        arq_set_error(c, "out of memory");
        arq_request_teardown(c, ARQ_ENOMEM);
        return;
    }
    msgpack_object obj;
    size_t off = 0;
    int rc = msgpack_unpack((const char *)arg->msg, arg->msg_length, &off, &z, &obj);
    if (rc != MSGPACK_UNPACK_SUCCESS || obj.type != MSGPACK_OBJECT_MAP)
        proto_violation(c, "message is not one msgpack map");
    else
        handle_message(c, &obj, &z);
    msgpack_zone_destroy(&z);
}

/* ---- public requests ------------------------------------------------- */

static int valid_stream(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    return n >= 1 && n <= 200;
}

/* One msgpack map of str -> str filling raw[0..len) exactly. */
static int headers_ok(const uint8_t *raw, size_t len)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    int ok = msgpack_unpack_next(&u, (const char *)raw, len, &off) == MSGPACK_UNPACK_SUCCESS &&
             off == len && u.data.type == MSGPACK_OBJECT_MAP;
    for (uint32_t i = 0; ok && i < u.data.via.map.size; i++)
        ok = u.data.via.map.ptr[i].key.type == MSGPACK_OBJECT_STR &&
             u.data.via.map.ptr[i].val.type == MSGPACK_OBJECT_STR;
    msgpack_unpacked_destroy(&u);
    return ok;
}

int arq_publish(arq_client_t *c, const char *stream, const void *payload, size_t len,
                const char *msgid, arq_publish_cb cb, void *arg)
{
    return arq_publish_headers(c, stream, payload, len, msgid, NULL, 0, cb, arg);
}

int arq_publish_headers(arq_client_t *c, const char *stream, const void *payload, size_t len,
                        const char *msgid, const uint8_t *headers, size_t headers_len,
                        arq_publish_cb cb, void *arg)
{
    if (!valid_stream(stream) || (len && !payload))
        return ARQ_EINVAL;
    if (!headers)
        headers_len = 0;
    if (headers_len && (headers_len > ARQ_MAX_FRAME || !headers_ok(headers, headers_len)))
        return ARQ_EINVAL;
    if (msgid && (msgid[0] == '\0' || strlen(msgid) > ARQ_MSGID_MAX))
        return ARQ_EINVAL;
    int live = can_send(c);
    if (!live && !may_queue(c))
        return ARQ_ENOTCONN;
    if (c->ever_welcomed && len > c->max_payload)
        return ARQ_ETOOBIG;
    if (c->n_pubs >= c->max_pending)
        return ARQ_EFULL;
    char gen[sizeof(c->msgid_prefix) + 24];
    if (!msgid) {
        snprintf(gen, sizeof(gen), "%s-%" PRIu64, c->msgid_prefix, ++c->msgid_seq);
        msgid = gen;
    }
    struct pub *p = calloc(1, sizeof(*p));
    if (!p)
        return ARQ_ENOMEM;
    p->id = c->next_id++;
    p->cb = cb;
    p->arg = arg;
    p->payload_len = len;

    msgpack_packer pk;
    c->out.size = 0;
    msgpack_packer_init(&pk, &c->out, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 5 + (headers_len ? 1 : 0) + (c->ack ? 1 : 0));
    arq_pack_kv_str(&pk, "t", "pub");
    if (c->ack)
        arq_pack_kv_str(&pk, "ack", c->ack == ARQ_ACK_REPLICATED ? "replicated" : "local");
    arq_pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, p->id);
    arq_pack_kv_str(&pk, "stream", stream);
    arq_pack_str(&pk, "payload");
    msgpack_pack_bin(&pk, len);
    msgpack_pack_bin_body(&pk, payload, len);
    arq_pack_kv_str(&pk, "msgid", msgid);
    if (headers_len) {
        arq_pack_str(&pk, "headers");
        /* one str -> str map (checked above), appended as it is */
        if (msgpack_sbuffer_write(&c->out, (const char *)headers, headers_len) != 0) {
            free(p);
            return ARQ_ENOMEM;
        }
    }
    if (c->out.size > ARQ_MAX_FRAME) {
        free(p);
        return ARQ_ETOOBIG;
    }
    if (c->reconnect) {
        p->frame = malloc(c->out.size);
        if (!p->frame) {
            free(p);
            return ARQ_ENOMEM;
        }
        memcpy(p->frame, c->out.data, c->out.size);
        p->frame_len = c->out.size;
    }
    if (live) {
        int rc = p->frame ? pub_send(c, p) : arq_ws_send_out(c);
        if (rc == 0) {
            p->sent = 1;
            p->on_wire = 1;
        } else if (!(rc == ARQ_ECONNLOST && c->reconnect)) {
            arq_pub_free(p);
            return rc;
        }
    }
    TAILQ_INSERT_TAIL(&c->pubs, p, link);
    c->n_pubs++;
    return 0;
}

int arq_subscribe(arq_client_t *c, const char *stream, enum arq_from from, uint64_t offset,
                  uint64_t epoch, arq_subok_cb subok_cb, arq_msg_cb msg_cb, void *arg)
{
    if (!valid_stream(stream) || !msg_cb ||
        (from != ARQ_FROM_EARLIEST && from != ARQ_FROM_LATEST && from != ARQ_FROM_OFFSET) ||
        (from == ARQ_FROM_OFFSET && offset == 0))
        return ARQ_EINVAL;
    int live = can_send(c);
    if (!live && !may_queue(c))
        return ARQ_ENOTCONN;
    if (sub_find(c, stream))
        return ARQ_EBUSY;
    struct sub *s = calloc(1, sizeof(*s));
    if (!s || !(s->stream = strdup(stream))) {
        free(s);
        return ARQ_ENOMEM;
    }
    s->subok_cb = subok_cb;
    s->msg_cb = msg_cb;
    s->arg = arg;
    s->from = from;
    s->from_offset = from == ARQ_FROM_OFFSET ? offset : 0;
    s->want_epoch = epoch;
    if (live) {
        int rc = send_sub(c, s);
        if (rc != 0 && !(rc == ARQ_ECONNLOST && c->reconnect)) {
            arq_sub_free(s);
            return rc;
        }
    }
    TAILQ_INSERT_TAIL(&c->subs, s, link);
    return 0;
}

int arq_ack(arq_client_t *c, const char *stream, uint64_t offset)
{
    if (!valid_stream(stream))
        return ARQ_EINVAL;
    struct sub *s = sub_find(c, stream);
    if (!s)
        return can_send(c) ? send_ack(c, stream, offset) : ARQ_ENOTCONN;
    if (!can_send(c) && !may_queue(c))
        return ARQ_ENOTCONN;
    if (offset >= s->pos)
        return ARQ_EINVAL; /* beyond what the application was given */
    if (offset > s->acked)
        s->acked = offset;
    int rc = sub_flush_ack(c, s);
    /* With reconnect a lost connection is not the caller's failure: the ack
     * is recorded and goes out again after the reconnect if still needed. */
    return rc == ARQ_ECONNLOST && c->reconnect ? 0 : rc;
}

int arq_subscription_epoch(const arq_client_t *c, const char *stream, uint64_t *ret_epoch)
{
    struct sub *s = valid_stream(stream) ? sub_find((arq_client_t *)c, stream) : NULL;
    if (!s)
        return ARQ_EINVAL;
    *ret_epoch = s->epoch;
    return 0;
}

int arq_client_close(arq_client_t *c, arq_close_cb cb, void *arg)
{
    if (c->state == ARQ_STATE_IDLE || arq_final_state(c) || c->user_closed || c->conn == CN_CLOSING)
        return ARQ_ENOTCONN;
    c->user_closed = 1;
    c->close_cb = cb;
    c->close_arg = arg;
    evtimer_del(c->ev_reconnect);
    evtimer_del(c->ev_retry);
    if (c->conn != CN_READY || !c->ws || c->teardown_pending) {
        arq_set_error(c, "closed while %s",
                      c->conn == CN_NONE ? "waiting to reconnect" : "connecting");
        arq_request_teardown(c, ARQ_ECLOSED);
        return 0;
    }
    c->conn = CN_CLOSING;
    if (c->ev_hb)
        event_del(c->ev_hb);
    if (wslay_event_queue_close(c->ws, 1000, NULL, 0) != 0) {
        arq_request_teardown(c, ARQ_ECLOSED);
        return 0;
    }
    arq_arm_timer(c);
    (void)arq_ws_flush(c);
    if (c->close_received && evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
        arq_request_teardown(c, ARQ_ECLOSED);
    return 0;
}
