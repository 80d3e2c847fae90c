/*
 * arq_wire.c - libarq on the wire: WebSocket framing (wslay), msgpack
 * helpers, the TCP connect and HTTP upgrade (the design is in arq.c).
 */
#include "arq_int.h"

#include <event2/bufferevent_ssl.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

/* ---- WebSocket (wslay) -------------------------------------------------- */

static ssize_t ws_recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                          void *user)
{
    arq_client_t *c = user;
    int n = evbuffer_remove(bufferevent_get_input(c->bev), buf, len);
    if (n <= 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    return n;
}

static ssize_t ws_send_cb(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                          void *user)
{
    arq_client_t *c = user;
    if (evbuffer_add(bufferevent_get_output(c->bev), data, len) != 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return (ssize_t)len;
}

static int ws_genmask_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, void *user)
{
    if (arq_fill_random(buf, len) != 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return 0;
}

/* Hand wslay's queued frames to the bufferevent. */
int arq_ws_flush(arq_client_t *c)
{
    if (!c->ws)
        return ARQ_ENOTCONN;
    if (wslay_event_send(c->ws) != 0) {
        arq_set_error(c, "websocket send failed");
        arq_request_teardown(c, ARQ_ECONNLOST);
        return ARQ_ECONNLOST;
    }
    return 0;
}

/* Send data as one binary message (wslay copies it). */
int arq_ws_send(arq_client_t *c, const void *data, size_t len)
{
    if (len > ARQ_MAX_FRAME)
        return ARQ_ETOOBIG;
    struct wslay_event_msg m = {WSLAY_BINARY_FRAME, data, len};
    int rc = wslay_event_queue_msg(c->ws, &m);
    if (rc == WSLAY_ERR_NOMEM)
        return ARQ_ENOMEM;
    if (rc == WSLAY_ERR_NO_MORE_MSG)
        return ARQ_ECONNLOST; /* closing: a reconnecting client keeps the request */
    if (rc != 0)
        return ARQ_ENOTCONN;
    return arq_ws_flush(c);
}

int arq_ws_send_out(arq_client_t *c)
{
    return arq_ws_send(c, c->out.data, c->out.size);
}

/* ---- msgpack helpers ---------------------------------------------------- */

void arq_pack_str(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

void arq_pack_kv_str(msgpack_packer *pk, const char *k, const char *v)
{
    arq_pack_str(pk, k);
    arq_pack_str(pk, v);
}

/*
 * Check that every declared length fits in the bytes that remain, so
 * msgpack_unpack never allocates for a size the input cannot back (a map
 * declaring 2^32 entries in a 10-byte message). Depth is bounded by
 * msgpack-c itself. Returns 0 if plausible.
 */
int arq_mp_precheck(const uint8_t *p, size_t len)
{
    size_t pos = 0, items = 1;
    while (items > 0) {
        if (pos >= len)
            return -1;
        uint8_t b = p[pos++];
        size_t rem = len - pos;
        uint64_t n = 0, skip = 0, kids = 0;
        int nb = 0;
        items--;
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3)
            continue;
        if (b >= 0x80 && b <= 0x8f) {
            kids = 2u * (b & 0x0f);
        } else if (b >= 0x90 && b <= 0x9f) {
            kids = b & 0x0f;
        } else if (b >= 0xa0 && b <= 0xbf) {
            skip = b & 0x1f;
        } else {
            switch (b) {
            case 0xcc:
            case 0xd0:
                skip = 1;
                break;
            case 0xcd:
            case 0xd1:
                skip = 2;
                break;
            case 0xca:
            case 0xce:
            case 0xd2:
                skip = 4;
                break;
            case 0xcb:
            case 0xcf:
            case 0xd3:
                skip = 8;
                break;
            case 0xd4:
                skip = 2;
                break;
            case 0xd5:
                skip = 3;
                break;
            case 0xd6:
                skip = 5;
                break;
            case 0xd7:
                skip = 9;
                break;
            case 0xd8:
                skip = 17;
                break;
            case 0xc4:
            case 0xd9:
                nb = 1;
                break;
            case 0xc5:
            case 0xda:
                nb = 2;
                break;
            case 0xc6:
            case 0xdb:
                nb = 4;
                break;
            case 0xc7:
                nb = 1;
                break; /* ext: +1 type byte */
            case 0xc8:
                nb = 2;
                break;
            case 0xc9:
                nb = 4;
                break;
            case 0xdc:
            case 0xde:
                nb = 2;
                break;
            case 0xdd:
            case 0xdf:
                nb = 4;
                break;
            default:
                return -1; /* 0xc1 */
            }
            if (nb) {
                if (rem < (size_t)nb)
                    return -1;
                for (int i = 0; i < nb; i++)
                    n = (n << 8) | p[pos + (size_t)i];
                pos += (size_t)nb;
                rem -= (size_t)nb;
                if (b == 0xdc || b == 0xdd)
                    kids = n;
                else if (b == 0xde || b == 0xdf)
                    kids = 2 * n;
                else if (b >= 0xc7 && b <= 0xc9)
                    skip = n + 1;
                else
                    skip = n;
            }
        }
        if (skip > rem || kids > rem)
            return -1;
        pos += skip;
        items += kids;
    }
    return pos == len ? 0 : -1;
}

const msgpack_object *arq_mp_get(const msgpack_object *map, const char *key)
{
    size_t klen = strlen(key);
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object_kv *kv = &map->via.map.ptr[i];
        if (kv->key.type == MSGPACK_OBJECT_STR && kv->key.via.str.size == klen &&
            memcmp(kv->key.via.str.ptr, key, klen) == 0)
            return kv->val.type == MSGPACK_OBJECT_NIL ? NULL : &kv->val;
    }
    return NULL;
}

int arq_mp_uint(const msgpack_object *map, const char *key, uint64_t *out)
{
    const msgpack_object *o = arq_mp_get(map, key);
    if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return -1;
    *out = o->via.u64;
    return 0;
}

/* A str field as a NUL-terminated copy in the zone. */
char *arq_mp_str(const msgpack_object *map, const char *key, msgpack_zone *z)
{
    const msgpack_object *o = arq_mp_get(map, key);
    if (!o || o->type != MSGPACK_OBJECT_STR)
        return NULL;
    char *s = msgpack_zone_malloc(z, o->via.str.size + 1);
    if (!s)
        return NULL;
    memcpy(s, o->via.str.ptr, o->via.str.size);
    s[o->via.str.size] = '\0';
    if (strlen(s) != o->via.str.size)
        return NULL; /* embedded NUL: not a name we could have sent */
    return s;
}

/* ---- HTTP upgrade ------------------------------------------------------ */

static int b64(const uint8_t *in, size_t n, char *out, size_t outlen)
{
    if (outlen < 4 * ((n + 2) / 3) + 1)
        return -1;
    EVP_EncodeBlock((unsigned char *)out, in, (int)n);
    return 0;
}

static int expected_accept(const char *key, char *out, size_t outlen)
{
    char buf[128];
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    int n = snprintf(buf, sizeof(buf), "%s%s", key, WS_GUID);
    if (n < 0 || (size_t)n >= sizeof(buf))
        return -1;
    if (EVP_Digest(buf, (size_t)n, md, &mdlen, EVP_sha1(), NULL) != 1)
        return -1;
    return b64(md, mdlen, out, outlen);
}

static int send_upgrade(arq_client_t *c)
{
    uint8_t raw[16];
    if (getrandom(raw, sizeof(raw), 0) != (ssize_t)sizeof(raw))
        return -1;
    if (b64(raw, sizeof(raw), c->ws_key, sizeof(c->ws_key)) != 0)
        return -1;
    return evbuffer_add_printf(bufferevent_get_output(c->bev),
                               "GET %s HTTP/1.1\r\n"
                               "Host: %s\r\n"
                               "Upgrade: websocket\r\n"
                               "Connection: Upgrade\r\n"
                               "Sec-WebSocket-Key: %s\r\n"
                               "Sec-WebSocket-Version: 13\r\n"
                               "Sec-WebSocket-Protocol: arq.v1\r\n"
                               "User-Agent: %s\r\n"
                               "\r\n",
                               c->path, c->host_header, c->ws_key, c->client_name) < 0
               ? -1
               : 0;
}

static int token_has(const char *v, const char *tok)
{
    size_t n = strlen(tok);
    while (*v) {
        while (*v == ' ' || *v == '\t' || *v == ',')
            v++;
        const char *e = v + strcspn(v, ",");
        const char *te = e;
        while (te > v && (te[-1] == ' ' || te[-1] == '\t'))
            te--;
        if ((size_t)(te - v) == n && strncasecmp(v, tok, n) == 0)
            return 1;
        v = e;
    }
    return 0;
}

/* Returns 1 when the head is complete and valid, 0 for more, <0 on error. */
static int read_upgrade(arq_client_t *c)
{
    struct evbuffer *in = bufferevent_get_input(c->bev);
    struct evbuffer_ptr end = evbuffer_search(in, "\r\n\r\n", 4, NULL);
    if (end.pos < 0) {
        if (evbuffer_get_length(in) > ARQ_MAX_HTTP_HEAD) {
            arq_set_error(c, "handshake failed: response head over %d bytes", ARQ_MAX_HTTP_HEAD);
            return ARQ_EHANDSHAKE;
        }
        return 0;
    }
    if (end.pos > ARQ_MAX_HTTP_HEAD) {
        arq_set_error(c, "handshake failed: response head over %d bytes", ARQ_MAX_HTTP_HEAD);
        return ARQ_EHANDSHAKE;
    }
    size_t hlen = (size_t)end.pos + 4;
    char *head = malloc(hlen + 1);
    if (!head)
        return ARQ_ENOMEM;
    (void)evbuffer_remove(in, head, hlen);
    head[hlen] = '\0';

    int rc = ARQ_EHANDSHAKE;
    int upgrade = 0, connection = 0, proto = 0, accept = 0;
    char want[64];
    char *save = NULL;
    char *line = strtok_r(head, "\r\n", &save);
    int status = 0;
    char reason[128] = "";
    if (!line || sscanf(line, "HTTP/1.%*1[01] %3d %127[^\r\n]", &status, reason) < 1) {
        arq_set_error(c, "handshake failed: not an HTTP response");
        goto out;
    }
    c->http_status = status;
    if (status != 101) {
        arq_set_error(c, "handshake failed: HTTP %d %s", status, reason);
        goto out;
    }
    if (expected_accept(c->ws_key, want, sizeof(want)) != 0) {
        arq_set_error(c, "handshake failed: cannot compute accept");
        goto out;
    }
    while ((line = strtok_r(NULL, "\r\n", &save))) {
        char *colon = strchr(line, ':');
        if (!colon)
            continue;
        *colon = '\0';
        char *v = colon + 1;
        while (*v == ' ' || *v == '\t')
            v++;
        size_t vl = strlen(v);
        while (vl > 0 && (v[vl - 1] == ' ' || v[vl - 1] == '\t'))
            v[--vl] = '\0';
        if (strcasecmp(line, "Upgrade") == 0)
            upgrade = strcasecmp(v, "websocket") == 0;
        else if (strcasecmp(line, "Connection") == 0)
            connection = token_has(v, "upgrade");
        else if (strcasecmp(line, "Sec-WebSocket-Protocol") == 0)
            proto = strcmp(v, "arq.v1") == 0;
        else if (strcasecmp(line, "Sec-WebSocket-Accept") == 0)
            accept = strcmp(v, want) == 0;
    }
    if (!upgrade || !connection)
        arq_set_error(c, "handshake failed: 101 without Upgrade: websocket");
    else if (!accept)
        arq_set_error(c, "handshake failed: wrong Sec-WebSocket-Accept");
    else if (!proto)
        arq_set_error(c, "handshake failed: server did not select subprotocol arq.v1");
    else
        rc = 1;
out:
    free(head);
    return rc;
}

static int start_ws(arq_client_t *c)
{
    struct wslay_event_callbacks cbs = {ws_recv_cb, ws_send_cb, ws_genmask_cb, NULL,
                                        NULL,       NULL,       arq_ws_msg_cb};
    if (wslay_event_context_client_init(&c->ws, &cbs, c) != 0)
        return ARQ_ENOMEM;
    wslay_event_config_set_max_recv_msg_length(c->ws, ARQ_MAX_FRAME);
    return 0;
}

/* Feed received bytes to wslay, then flush what it wants to send. */
static void ws_pump(arq_client_t *c)
{
    if (wslay_event_recv(c->ws) != 0) {
        if (!c->teardown_pending) {
            arq_set_error(c, "websocket protocol error from server");
            arq_request_teardown(c, c->conn == CN_CLOSING ? ARQ_ECLOSED : ARQ_EPROTO);
        }
        return;
    }
    if (c->teardown_pending)
        return;
    (void)arq_ws_flush(c);
    if (c->close_received) {
        /* wslay queued the close answer; close once it is written. */
        if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
            arq_request_teardown(c, c->conn == CN_CLOSING ? ARQ_ECLOSED : ARQ_ECONNLOST);
    }
}

static void bev_read_cb(struct bufferevent *bev, void *arg)
{
    arq_client_t *c = arg;
    arq_enter(c);
    if (c->hb_timeout_ms)
        c->last_rx_ms = arq_now_ms();
    if (c->conn == CN_UPGRADE) {
        int rc = read_upgrade(c);
        if (rc < 0) {
            arq_request_teardown(c, rc);
        } else if (rc == 1) {
            rc = start_ws(c);
            if (rc != 0) {
                arq_set_error(c, "out of memory");
                arq_request_teardown(c, rc);
            } else {
                c->conn = CN_WELCOME;
                arq_send_hello(c);
            }
        }
    }
    if ((c->conn == CN_WELCOME || c->conn == CN_READY || c->conn == CN_CLOSING) && c->ws &&
        !c->teardown_pending)
        ws_pump(c);
    arq_leave(c);
}

static void bev_write_cb(struct bufferevent *bev, void *arg)
{
    arq_client_t *c = arg;
    arq_enter(c);
    if (c->close_received && !c->teardown_pending)
        arq_request_teardown(c, c->conn == CN_CLOSING ? ARQ_ECLOSED : ARQ_ECONNLOST);
    arq_leave(c);
}

static void bev_event_cb(struct bufferevent *bev, short what, void *arg)
{
    arq_client_t *c = arg;
    arq_enter(c);
    if (what & BEV_EVENT_CONNECTED) {
        c->conn = CN_UPGRADE;
        if (send_upgrade(c) != 0) {
            arq_set_error(c, "cannot send the upgrade request");
            arq_request_teardown(c, ARQ_ENOMEM);
        }
    } else if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
        int err = EVUTIL_SOCKET_ERROR();
        unsigned long tls_err = c->tls ? bufferevent_get_openssl_error(bev) : 0;
        int dns_err = c->conn == CN_TCP ? bufferevent_socket_get_dns_error(bev) : 0;
        if (tls_err) {
            char buf[256];
            ERR_error_string_n(tls_err, buf, sizeof(buf));
            SSL *ssl = bufferevent_openssl_get_ssl(bev);
            long vr = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
            if (vr != X509_V_OK)
                arq_set_error(c, "TLS with %s:%u: certificate verify failed: %s", c->host, c->port,
                              X509_verify_cert_error_string(vr));
            else
                arq_set_error(c, "TLS with %s:%u: %s", c->host, c->port, buf);
            arq_request_teardown(c, ARQ_ETLS);
        } else if (dns_err) {
            arq_set_error(c, "cannot resolve %s: %s", c->host, evutil_gai_strerror(dns_err));
            arq_request_teardown(c, ARQ_ECONNECT);
        } else if (c->conn == CN_TCP) {
            arq_set_error(c, "connect to %s:%u: %s", c->host, c->port,
                          evutil_socket_error_to_string(err));
            arq_request_teardown(c, ARQ_ECONNECT);
        } else if (c->conn == CN_CLOSING) {
            arq_request_teardown(c, ARQ_ECLOSED);
        } else {
            if (!c->close_received)
                arq_set_error(c, "connection to %s:%u lost: %s", c->host, c->port,
                              (what & BEV_EVENT_EOF) ? "closed by peer"
                                                     : evutil_socket_error_to_string(err));
            arq_request_teardown(c, c->conn == CN_UPGRADE ? ARQ_EHANDSHAKE : ARQ_ECONNLOST);
        }
    }
    arq_leave(c);
}

/* Open a new transport. Failures after the socket exists go through teardown. */
int arq_start_attempt(arq_client_t *c)
{
    c->last_error[0] = '\0';
    c->close_received = 0;
    c->close_code = 0;
    c->http_status = 0;
    if (c->tls) {
        SSL *ssl = SSL_new(c->ssl_ctx);
        if (!ssl)
            return ARQ_ENOMEM;
        /* SNI for a name; the certificate must name the host (or its IP) */
        struct in6_addr a6;
        struct in_addr a4;
        int is_ip = inet_pton(AF_INET, c->host, &a4) == 1 || inet_pton(AF_INET6, c->host, &a6) == 1;
        if (!is_ip)
            (void)SSL_set_tlsext_host_name(ssl, c->host);
        X509_VERIFY_PARAM *vp = SSL_get0_param(ssl);
        if ((is_ip ? X509_VERIFY_PARAM_set1_ip_asc(vp, c->host)
                   : X509_VERIFY_PARAM_set1_host(vp, c->host, 0)) != 1) {
            SSL_free(ssl);
            return ARQ_ENOMEM;
        }
        c->bev = bufferevent_openssl_socket_new(c->base, -1, ssl, BUFFEREVENT_SSL_CONNECTING,
                                                BEV_OPT_CLOSE_ON_FREE);
        if (!c->bev) {
            SSL_free(ssl);
            return ARQ_ENOMEM;
        }
        bufferevent_openssl_set_allow_dirty_shutdown(c->bev, 1);
    } else {
        c->bev = bufferevent_socket_new(c->base, -1, BEV_OPT_CLOSE_ON_FREE);
    }
    if (!c->bev)
        return ARQ_ENOMEM;
    bufferevent_setcb(c->bev, bev_read_cb, bev_write_cb, bev_event_cb, c);
    if (bufferevent_enable(c->bev, EV_READ | EV_WRITE) != 0) {
        bufferevent_free(c->bev);
        c->bev = NULL;
        return ARQ_ENOMEM;
    }
    c->conn = CN_TCP;
    arq_arm_timer(c);
    /* A name is resolved here, blocking (no DNS base): a client connects
     * rarely, and an address literal resolves at once. */
    if (bufferevent_socket_connect_hostname(c->bev, NULL, AF_UNSPEC, c->host, c->port) != 0) {
        /* Immediate failure: reported through the callback, like a refusal. */
        arq_set_error(c, "connect to %s:%u: %s", c->host, c->port,
                      evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
        arq_request_teardown(c, ARQ_ECONNECT);
    }
    return 0;
}

int arq_client_connect(arq_client_t *c, arq_connect_cb cb, void *arg)
{
    if (c->state != ARQ_STATE_IDLE)
        return ARQ_EBUSY;
    c->depth++;
    int rc = arq_start_attempt(c);
    if (rc == 0) {
        c->connect_cb = cb;
        c->connect_arg = arg;
        arq_set_state(c, ARQ_STATE_CONNECTING, 0, NULL);
    }
    arq_api_leave(c);
    return rc;
}
