/*
 * proto.h - the arq.v1 wire codec: one msgpack map per WebSocket binary
 * message (docs/protocol.md), and the stream patterns tokens grant. Pure
 * functions: no I/O, no logging. A leaf module: the api (which decodes)
 * and the broker (which encodes its replies) both sit above it.
 *
 * Decoding validates the whole input before msgpack-c allocates anything:
 * every declared array/map/str/bin length must fit in the bytes that remain
 * and nesting is bounded, so hostile input (a 4 GiB declared length, deep
 * nesting) is rejected with an error, never a large allocation.
 */
#ifndef ARQ_PROTO_H
#define ARQ_PROTO_H

#include <stddef.h>
#include <stdint.h>

enum {
    PROTO_OK = 0,
    PROTO_EMALFORMED = -1, /* not msgpack, trailing bytes, bad nesting */
    PROTO_ETYPE = -2,      /* valid msgpack, but a field has the wrong type */
    PROTO_EMISSING = -3,   /* a required field is missing */
    PROTO_EUNKNOWN = -4,   /* unknown message type "t" */
    PROTO_ELIMIT = -5,     /* a size or count limit was exceeded */
    PROTO_ENOMEM = -6,
};
const char *proto_strerror(int err);

/* Limits applied while decoding (0 = default in brackets). */
typedef struct proto_limits {
    uint32_t max_payload;      /* [1 MiB] payload bytes */
    uint32_t max_headers;      /* [32] header entries */
    uint32_t max_header_bytes; /* [8 KiB] sum of header key+value bytes */
    uint32_t max_depth;        /* [8] nesting */
} proto_limits_t;

/* Client-to-server message types. */
enum proto_type {
    PROTO_HELLO = 1,
    PROTO_SUB,
    PROTO_UNSUB,
    PROTO_PUB,
    PROTO_ACK,
    PROTO_REFRESH, /* a new token for the connection (id, token) */
};

/* Where a subscription starts. */
enum proto_from { PROTO_FROM_EARLIEST = 1, PROTO_FROM_LATEST, PROTO_FROM_OFFSET };
/* pub's acknowledgement level: absent (the server's default), "local",
 * "replicated" (docs/protocol.md, docs/ha.md). */
enum proto_ack { PROTO_ACK_DEFAULT = 0, PROTO_ACK_LOCAL, PROTO_ACK_REPLICATED };

typedef struct proto_bytes {
    const uint8_t *ptr; /* borrowed from the decoded input buffer */
    size_t len;
} proto_bytes_t;

typedef struct proto_header {
    proto_bytes_t key, value;
} proto_header_t;

/*
 * A decoded client message. Every proto_bytes_t borrows the input buffer
 * given to proto_decode, which must outlive the message; headers point into
 * memory owned by the message (free with proto_msg_free).
 */
typedef struct proto_msg {
    enum proto_type type;
    uint64_t id; /* request id (sub, unsub, pub); 0 when absent */
    proto_bytes_t stream;
    /* hello */
    proto_bytes_t token, session, resume_token, client;
    /* sub */
    enum proto_from from;
    uint64_t offset; /* sub from offset; ack offset */
    uint64_t epoch;  /* sub: 0 when absent */
    /* pub */
    proto_bytes_t payload, msgid;
    enum proto_ack ack;
    proto_header_t *headers;
    size_t n_headers;
    proto_bytes_t headers_raw; /* the header map's msgpack bytes, as sent */
    /* After a failed decode: why, naming the field ("field 'from' must be
     * ..."); type and id are set when both were read, so that a request
     * can be refused with its id (type 0 otherwise). */
    char error[112];
} proto_msg_t;

/* Decode one client message. On error *out holds only type, id and error,
 * and nothing needs freeing. */
int proto_decode(const uint8_t *buf, size_t len, const proto_limits_t *limits, proto_msg_t *out);
void proto_msg_free(proto_msg_t *msg);

/* ---- server-to-client encoders ----------------------------------------- */

/* A growable output buffer (owned by the caller; free with proto_buf_free). */
typedef struct proto_buf {
    uint8_t *data;
    size_t len, cap;
} proto_buf_t;
void proto_buf_free(proto_buf_t *b);
void proto_buf_reset(proto_buf_t *b);

/* welcome: subs (only when resumed) are the restored subscriptions;
 * ephemeral adds "durable": false (the session was not stored). */
typedef struct proto_resumed_sub {
    const char *stream;
    size_t stream_len;
    uint64_t epoch, acked, next;
} proto_resumed_sub_t;
typedef struct proto_welcome {
    const char *session, *resume_token, *server;
    uint32_t max_payload, max_inflight;
    uint64_t session_ttl_s;
    int resumed;
    int ephemeral;
    const proto_resumed_sub_t *subs;
    size_t n_subs;
    uint64_t token_expires; /* the token's exp (unix seconds); 0: no token, key left out */
} proto_welcome_t;
int proto_enc_welcome(proto_buf_t *b, const proto_welcome_t *w);
int proto_enc_subok(proto_buf_t *b, uint64_t id, const uint8_t *stream, size_t stream_len,
                    uint64_t epoch, uint64_t first, uint64_t next);
int proto_enc_unsubok(proto_buf_t *b, uint64_t id, const uint8_t *stream, size_t stream_len);
int proto_enc_puback(proto_buf_t *b, uint64_t id, const uint8_t *stream, size_t stream_len,
                     uint64_t offset, int duplicate);
int proto_enc_nack(proto_buf_t *b, uint64_t id, int code, const char *reason);
/* refreshok: the connection now runs on the token of refresh id, which
 * expires at token_expires (unix seconds). */
int proto_enc_refreshok(proto_buf_t *b, uint64_t id, uint64_t token_expires);
/* headers_raw: a msgpack map as stored (may be empty: omitted). */
int proto_enc_msg(proto_buf_t *b, const uint8_t *stream, size_t stream_len, uint64_t offset,
                  int64_t timestamp_us, const uint8_t *headers_raw, size_t headers_len,
                  const uint8_t *payload, size_t payload_len);
int proto_enc_gap(proto_buf_t *b, const uint8_t *stream, size_t stream_len, uint64_t from,
                  uint64_t to);
/* id 0: not tied to a request. */
int proto_enc_error(proto_buf_t *b, uint64_t id, int code, const char *reason);

/* Error codes carried by nack and error (docs/protocol.md has the table). */
enum proto_code {
    PROTO_CODE_BAD_REQUEST = 400,
    PROTO_CODE_UNAUTHORIZED = 401,
    PROTO_CODE_FORBIDDEN = 403,
    PROTO_CODE_NOT_FOUND = 404,
    PROTO_CODE_CONFLICT = 409, /* epoch mismatch, ack beyond delivered */
    PROTO_CODE_TOO_LARGE = 413,
    PROTO_CODE_LIMIT = 429, /* too many subscriptions / in flight */
    PROTO_CODE_INTERNAL = 500,
    PROTO_CODE_UNAVAILABLE = 503, /* storage full, WAL stopped, shutting down */
};

/*
 * Stream patterns (a token's "pub" and "subscribe" claims): does any of
 * patterns[0..n) match stream name[0..len)? A pattern is a stream name, "*"
 * (any stream), or "prefix.*" ("prefix." followed by at least one byte).
 * NULL entries are skipped.
 */
int proto_pattern_match(char *const *patterns, size_t n, const char *name, size_t len);

#endif
