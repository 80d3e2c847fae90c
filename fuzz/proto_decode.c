/*
 * Fuzz the arq.v1 client-message decoder (proto/proto.h) with the default
 * limits: arbitrary bytes either decode or return one of the codec's error
 * codes; a decoded message only points inside the input and within the
 * limits, and what the broker would send back from it (puback, subok, or a
 * msg carrying the published payload and headers_raw) encodes cleanly.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "proto.h"

static int inside(const uint8_t *data, size_t size, proto_bytes_t b)
{
    if (b.len == 0)
        return 1;
    return b.ptr >= data && b.len <= size && (size_t)(b.ptr - data) <= size - b.len;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    proto_msg_t m;
    int rc = proto_decode(data, size, NULL, &m);
    if (rc != PROTO_OK) {
        if (rc < PROTO_ELIMIT || rc > PROTO_OK) /* ENOMEM is not input-driven here */
            abort();
        /* the reason is a terminated, non-empty string; no headers to free */
        if (memchr(m.error, 0, sizeof(m.error)) == NULL || m.error[0] == 0 || m.headers)
            abort();
        return 0;
    }
    if (!inside(data, size, m.stream) || !inside(data, size, m.token) ||
        !inside(data, size, m.session) || !inside(data, size, m.resume_token) ||
        !inside(data, size, m.client) || !inside(data, size, m.payload) ||
        !inside(data, size, m.msgid) || !inside(data, size, m.headers_raw))
        abort();
    if (m.payload.len > 1024 * 1024 || m.n_headers > 32 ||
        (m.n_headers == 0) != (m.headers == NULL))
        abort();
    size_t header_bytes = 0;
    for (size_t i = 0; i < m.n_headers; i++) {
        if (!inside(data, size, m.headers[i].key) || !inside(data, size, m.headers[i].value))
            abort();
        header_bytes += m.headers[i].key.len + m.headers[i].value.len;
    }
    if (header_bytes > 8192)
        abort();

    proto_buf_t b = {0};
    switch (m.type) {
    case PROTO_PUB:
        rc = proto_enc_puback(&b, m.id, m.stream.ptr, m.stream.len, 1, 0);
        /* headers_raw is exactly what proto_enc_msg accepts */
        if (rc == PROTO_OK)
            rc = proto_enc_msg(&b, m.stream.ptr, m.stream.len, 1, 1, m.headers_raw.ptr,
                               m.headers_raw.len, m.payload.ptr, m.payload.len);
        break;
    case PROTO_SUB:
        rc = proto_enc_subok(&b, m.id, m.stream.ptr, m.stream.len, m.epoch, 1,
                             m.from == PROTO_FROM_OFFSET ? m.offset : 1);
        break;
    case PROTO_UNSUB:
        rc = proto_enc_unsubok(&b, m.id, m.stream.ptr, m.stream.len);
        break;
    case PROTO_ACK:
        rc = proto_enc_gap(&b, m.stream.ptr, m.stream.len, 1, m.offset);
        break;
    case PROTO_REFRESH:
        if (m.token.len == 0)
            abort(); /* required */
        rc = proto_enc_refreshok(&b, m.id, 1);
        break;
    case PROTO_HELLO: {
        proto_resumed_sub_t rs = {(const char *)m.session.ptr, m.session.len, 1, 2, 3};
        proto_welcome_t w = {.session = "s",
                             .resume_token = "r",
                             .server = "arqd",
                             .max_payload = 1024 * 1024,
                             .max_inflight = 1024,
                             .session_ttl_s = 86400,
                             .resumed = m.session.len > 0,
                             .subs = &rs,
                             .n_subs = 1};
        rc = proto_enc_welcome(&b, &w);
    } break;
    default:
        abort();
    }
    if (rc != PROTO_OK && rc != PROTO_ENOMEM)
        abort();
    proto_buf_free(&b);
    proto_msg_free(&m);
    return 0;
}
