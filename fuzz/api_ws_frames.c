/*
 * Fuzz the WebSocket receive path as arqd runs it: client frames, fed to a
 * wslay server context in chunks of 1..16 bytes (the first input byte picks
 * the size), every complete binary message decoded as arq.v1. Whatever the
 * bytes, framing errors must be reported, never crash or grow memory past
 * the message limit.
 */
#include <stdint.h>
#include <string.h>
#include <wslay/wslay.h>

#include "proto.h"

struct feed {
    const uint8_t *data;
    size_t len, pos, chunk;
};

static ssize_t recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags, void *user)
{
    (void)flags;
    struct feed *f = user;
    size_t n = f->len - f->pos;
    if (n > f->chunk)
        n = f->chunk;
    if (n > len)
        n = len;
    if (n == 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    memcpy(buf, f->data + f->pos, n);
    f->pos += n;
    return (ssize_t)n;
}

static ssize_t send_cb(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                       void *user)
{
    (void)ctx;
    (void)data;
    (void)flags;
    (void)user;
    return (ssize_t)len;
}

static void msg_cb(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                   void *user)
{
    (void)ctx;
    (void)user;
    if (arg->opcode != WSLAY_BINARY_FRAME)
        return;
    proto_limits_t lim = {0};
    proto_msg_t m;
    if (proto_decode(arg->msg, arg->msg_length, &lim, &m) == PROTO_OK)
        proto_msg_free(&m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    struct feed f = {data + 1, size - 1, 0, (size_t)(data[0] % 16) + 1};
    struct wslay_event_callbacks cbs = {recv_cb, send_cb, NULL, NULL, NULL, NULL, msg_cb};
    wslay_event_context_ptr ctx;
    if (wslay_event_context_server_init(&ctx, &cbs, &f) != 0)
        return 0;
    wslay_event_config_set_max_recv_msg_length(ctx, 1u << 20);
    while (f.pos < f.len) {
        size_t before = f.pos;
        if (wslay_event_recv(ctx) != 0)
            break;
        (void)wslay_event_send(ctx);
        if (!wslay_event_want_read(ctx) || f.pos == before)
            break;
    }
    wslay_event_context_free(ctx);
    return 0;
}
