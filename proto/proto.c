/*
 * proto.c - the arq.v1 wire codec (docs/protocol.md).
 *
 * Decoding is two passes over the caller's bytes, and nothing is allocated
 * until the first one has accepted the whole input:
 *
 *   1. mp_validate: a bounded walk over the raw msgpack. Every declared
 *      str/bin/ext length must fit in the bytes that remain; every array or
 *      map count must too (each element takes at least one byte, a map entry
 *      two); containers nest at most max_depth deep (capped at
 *      PROTO_DEPTH_CAP); the input is exactly one object with no trailing
 *      bytes; 0xc1 (never used) is rejected. The walk is iterative, so deep
 *      nesting costs no C stack.
 *   2. decode_fields: a cursor walk over the now-trusted top-level map. Known
 *      keys are located, then interpreted for the message type "t". Strings
 *      and binaries are never copied: proto_bytes_t points into the input.
 *      The only allocation is the header array (at most max_headers entries).
 *
 * msgpack-c is used only to encode; its unpacker never sees client bytes, so
 * it can never be asked to allocate from a declared count (the scanner above
 * already gives every field's exact position, which headers_raw needs).
 *
 * Decoding rules beyond msgpack itself (docs/protocol.md repeats them):
 *   - the top level is a map whose keys are all str (else PROTO_ETYPE);
 *   - a known key may appear once (a repeat is PROTO_EMALFORMED, so two
 *     readers can never disagree on which value counts); unknown keys, and
 *     known keys that do not belong to the message type, are skipped;
 *   - a nil value counts as an absent field;
 *   - integers: positive fixint, uint 8..64 and int 8..64 holding a value
 *     >= 0; anything else (negative, float, ...) is PROTO_ETYPE;
 *   - headers: a map of str -> str, valid UTF-8 (consumers in strict
 *     languages must be able to decode what they receive), keys unique; an
 *     empty map counts as absent.
 */
#include "proto.h"

#include <msgpack.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Limits when proto_limits_t is NULL or a field is 0 (see proto.h). */
#define PROTO_DEFAULT_MAX_PAYLOAD      (1024u * 1024u)
#define PROTO_DEFAULT_MAX_HEADERS      32u
#define PROTO_DEFAULT_MAX_HEADER_BYTES (8u * 1024u)
#define PROTO_DEFAULT_MAX_DEPTH        8u
/* Hard ceiling on max_depth: the validation walk keeps one counter per open
 * container on its own stack. arq.v1 needs a depth of 2. */
#define PROTO_DEPTH_CAP 64u

const char *proto_strerror(int err)
{
    switch (err) {
    case PROTO_OK:
        return "ok";
    case PROTO_EMALFORMED:
        return "malformed msgpack";
    case PROTO_ETYPE:
        return "field has the wrong type";
    case PROTO_EMISSING:
        return "required field missing";
    case PROTO_EUNKNOWN:
        return "unknown message type";
    case PROTO_ELIMIT:
        return "size or count limit exceeded";
    case PROTO_ENOMEM:
        return "out of memory";
    default:
        return "unknown error";
    }
}

/* ---- msgpack scanner ---------------------------------------------------- */

enum mp_kind {
    MP_NIL,
    MP_BOOL,
    MP_UINT, /* any integer format holding a value >= 0 */
    MP_NINT, /* a negative integer */
    MP_FLOAT,
    MP_STR,
    MP_BIN,
    MP_EXT,
    MP_ARRAY,
    MP_MAP,
};

typedef struct mp_item {
    enum mp_kind kind;
    uint64_t u;  /* MP_UINT value; MP_BOOL 0/1; MP_ARRAY elements; MP_MAP entries */
    size_t body; /* MP_STR/BIN/EXT: offset of the data (ext: after the type byte) */
    size_t len;  /* its length */
} mp_item_t;

static uint64_t rd_be(const uint8_t *p, size_t n)
{
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

/*
 * Read the item at buf[*pos]. Scalars (including the data of str/bin/ext)
 * are consumed whole; for an array or map only its head is consumed. Every
 * declared length and count is checked against the bytes that remain, so a
 * caller may trust it. Returns 0 (and advances *pos) or PROTO_EMALFORMED.
 */
static int mp_next(const uint8_t *buf, size_t len, size_t *pos, mp_item_t *ret)
{
    size_t p = *pos;
    mp_item_t it = {.kind = MP_NIL};
    size_t width = 0; /* bytes of a length/count/value field after the tag */

    if (p >= len)
        return PROTO_EMALFORMED;
    uint8_t c = buf[p++];

    if (c <= 0x7f) {
        it.kind = MP_UINT;
        it.u = c;
    } else if (c >= 0xe0) {
        it.kind = MP_NINT;
    } else if (c <= 0x8f) {
        it.kind = MP_MAP;
        it.u = c & 0x0fu;
    } else if (c <= 0x9f) {
        it.kind = MP_ARRAY;
        it.u = c & 0x0fu;
    } else if (c <= 0xbf) {
        it.kind = MP_STR;
        it.len = c & 0x1fu;
    } else {
        switch (c) {
        case 0xc0:
            it.kind = MP_NIL;
            break;
        case 0xc2:
        case 0xc3:
            it.kind = MP_BOOL;
            it.u = c == 0xc3;
            break;
        case 0xc4:
        case 0xc5:
        case 0xc6:
            it.kind = MP_BIN;
            width = (size_t)1 << (c - 0xc4);
            break;
        case 0xc7:
        case 0xc8:
        case 0xc9:
            it.kind = MP_EXT;
            width = (size_t)1 << (c - 0xc7);
            break;
        case 0xca:
        case 0xcb:
            it.kind = MP_FLOAT;
            width = c == 0xca ? 4 : 8;
            break;
        case 0xcc:
        case 0xcd:
        case 0xce:
        case 0xcf:
            it.kind = MP_UINT;
            width = (size_t)1 << (c - 0xcc);
            break;
        case 0xd0:
        case 0xd1:
        case 0xd2:
        case 0xd3:
            it.kind = MP_UINT; /* MP_NINT below if the sign bit is set */
            width = (size_t)1 << (c - 0xd0);
            break;
        case 0xd4:
        case 0xd5:
        case 0xd6:
        case 0xd7:
        case 0xd8:
            it.kind = MP_EXT;
            it.len = (size_t)1 << (c - 0xd4);
            break;
        case 0xd9:
        case 0xda:
        case 0xdb:
            it.kind = MP_STR;
            width = (size_t)1 << (c - 0xd9);
            break;
        case 0xdc:
        case 0xdd:
            it.kind = MP_ARRAY;
            width = c == 0xdc ? 2 : 4;
            break;
        case 0xde:
        case 0xdf:
            it.kind = MP_MAP;
            width = c == 0xde ? 2 : 4;
            break;
        default: /* 0xc1: never used */
            return PROTO_EMALFORMED;
        }
    }

    if (width > len - p)
        return PROTO_EMALFORMED;
    uint64_t field = rd_be(buf + p, width);
    p += width;
    size_t avail = len - p;

    switch (it.kind) {
    case MP_UINT:
        if (width > 0) {
            it.u = field;
            if (c >= 0xd0 && (field >> (width * 8 - 1)) != 0)
                it.kind = MP_NINT;
        }
        break;
    case MP_FLOAT:
        break;
    case MP_STR:
    case MP_BIN:
        if (width > 0)
            it.len = (size_t)field; /* field < 2^32 fits in size_t */
        if (it.len > avail)
            return PROTO_EMALFORMED;
        it.body = p;
        p += it.len;
        break;
    case MP_EXT:
        if (width > 0)
            it.len = (size_t)field;
        /* the type byte, then the data */
        if (avail < 1 || it.len > avail - 1)
            return PROTO_EMALFORMED;
        it.body = p + 1;
        p += 1 + it.len;
        break;
    case MP_ARRAY:
        if (width > 0)
            it.u = field;
        if (it.u > avail)
            return PROTO_EMALFORMED;
        break;
    case MP_MAP:
        if (width > 0)
            it.u = field;
        if (it.u * 2 > avail) /* it.u < 2^32: no overflow */
            return PROTO_EMALFORMED;
        break;
    default:
        break;
    }
    *pos = p;
    *ret = it;
    return PROTO_OK;
}

/* Elements a container holds (a map entry is two). */
static uint64_t mp_children(const mp_item_t *it)
{
    if (it->kind == MP_ARRAY)
        return it->u;
    if (it->kind == MP_MAP)
        return it->u * 2;
    return 0;
}

/*
 * Accept buf[0..len) iff it is exactly one well-formed msgpack object whose
 * containers nest at most max_depth deep (the outermost container is depth
 * 1). Returns 0 or PROTO_EMALFORMED.
 */
static int mp_validate(const uint8_t *buf, size_t len, uint32_t max_depth)
{
    uint64_t left[PROTO_DEPTH_CAP]; /* elements still due in each open container */
    size_t depth = 0, pos = 0;

    if (max_depth > PROTO_DEPTH_CAP)
        max_depth = PROTO_DEPTH_CAP;
    do {
        mp_item_t it;
        int rc = mp_next(buf, len, &pos, &it);
        if (rc != PROTO_OK)
            return rc;
        if (depth > 0)
            left[depth - 1]--;
        if (it.kind == MP_ARRAY || it.kind == MP_MAP) {
            if (depth >= max_depth)
                return PROTO_EMALFORMED;
            left[depth++] = mp_children(&it);
        }
        while (depth > 0 && left[depth - 1] == 0)
            depth--;
    } while (depth > 0);
    return pos == len ? PROTO_OK : PROTO_EMALFORMED;
}

/* Skip one whole object at buf[*pos]. Only for validated input. */
static int mp_skip(const uint8_t *buf, size_t len, size_t *pos)
{
    uint64_t due = 1;
    while (due > 0) {
        mp_item_t it;
        int rc = mp_next(buf, len, pos, &it);
        if (rc != PROTO_OK)
            return rc;
        due = due - 1 + mp_children(&it);
    }
    return PROTO_OK;
}

/* Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, <= U+10FFFF. */
static bool utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t more;
        uint8_t lo = 0x80, hi = 0xbf; /* allowed range of the second byte */
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf) {
            more = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            more = 2;
            if (c == 0xe0)
                lo = 0xa0;
            else if (c == 0xed)
                hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            more = 3;
            if (c == 0xf0)
                lo = 0x90;
            else if (c == 0xf4)
                hi = 0x8f;
        } else {
            return false;
        }
        if (more > n - i - 1)
            return false;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return false;
        for (size_t k = 2; k <= more; k++)
            if ((s[i + k] & 0xc0) != 0x80)
                return false;
        i += more + 1;
    }
    return true;
}

/* ---- decoding ----------------------------------------------------------- */

enum field {
    F_T,
    F_ID,
    F_STREAM,
    F_TOKEN,
    F_SESSION,
    F_RESUME_TOKEN,
    F_CLIENT,
    F_FROM,
    F_EPOCH,
    F_OFFSET,
    F_PAYLOAD,
    F_MSGID,
    F_HEADERS,
    F_ACK,
    F_COUNT,
};

static const char *const field_names[F_COUNT] = {
    [F_T] = "t",
    [F_ID] = "id",
    [F_STREAM] = "stream",
    [F_TOKEN] = "token",
    [F_SESSION] = "session",
    [F_RESUME_TOKEN] = "resume_token",
    [F_CLIENT] = "client",
    [F_FROM] = "from",
    [F_EPOCH] = "epoch",
    [F_OFFSET] = "offset",
    [F_PAYLOAD] = "payload",
    [F_MSGID] = "msgid",
    [F_HEADERS] = "headers",
    [F_ACK] = "ack",
};

#define NO_VALUE SIZE_MAX

typedef struct decoder {
    const uint8_t *buf;
    size_t len;
    proto_limits_t lim;
    size_t at[F_COUNT]; /* offset of each known key's value; NO_VALUE if absent or nil */
    int bad;            /* the field that failed decoding; -1 if none */
} decoder_t;

/* Remember which field failed (for proto_msg_t.error). */
static int field_fail(decoder_t *d, enum field f, int rc)
{
    if (rc != PROTO_OK && d->bad < 0)
        d->bad = (int)f;
    return rc;
}

static bool bytes_eq(const uint8_t *p, size_t n, const char *s)
{
    return strlen(s) == n && memcmp(p, s, n) == 0;
}

/* Read a field's value head. Returns 1 if present, 0 if absent. */
static int field_get(const decoder_t *d, enum field f, mp_item_t *it)
{
    size_t pos = d->at[f];
    if (pos == NO_VALUE)
        return 0;
    /* cannot fail: the input was validated */
    return mp_next(d->buf, d->len, &pos, it) == PROTO_OK;
}

static int get_uint(decoder_t *d, enum field f, bool required, uint64_t *ret)
{
    mp_item_t it;
    if (!field_get(d, f, &it))
        return field_fail(d, f, required ? PROTO_EMISSING : PROTO_OK);
    if (it.kind != MP_UINT)
        return field_fail(d, f, PROTO_ETYPE);
    *ret = it.u;
    return PROTO_OK;
}

static int get_str(decoder_t *d, enum field f, bool required, proto_bytes_t *ret)
{
    mp_item_t it;
    if (!field_get(d, f, &it))
        return field_fail(d, f, required ? PROTO_EMISSING : PROTO_OK);
    if (it.kind != MP_STR)
        return field_fail(d, f, PROTO_ETYPE);
    ret->ptr = d->buf + it.body;
    ret->len = it.len;
    return PROTO_OK;
}

static int get_from(decoder_t *d, proto_msg_t *m)
{
    mp_item_t it;
    if (!field_get(d, F_FROM, &it))
        return field_fail(d, F_FROM, PROTO_EMISSING);
    if (it.kind == MP_STR) {
        const uint8_t *s = d->buf + it.body;
        if (bytes_eq(s, it.len, "earliest"))
            m->from = PROTO_FROM_EARLIEST;
        else if (bytes_eq(s, it.len, "latest"))
            m->from = PROTO_FROM_LATEST;
        else
            return field_fail(d, F_FROM, PROTO_ETYPE);
        return PROTO_OK;
    }
    if (it.kind != MP_UINT || it.u == 0) /* offsets start at 1 */
        return field_fail(d, F_FROM, PROTO_ETYPE);
    m->from = PROTO_FROM_OFFSET;
    m->offset = it.u;
    return PROTO_OK;
}

static int get_ack(decoder_t *d, proto_msg_t *m)
{
    mp_item_t it;
    m->ack = PROTO_ACK_DEFAULT;
    if (!field_get(d, F_ACK, &it))
        return PROTO_OK;
    if (it.kind == MP_STR && bytes_eq(d->buf + it.body, it.len, "local"))
        m->ack = PROTO_ACK_LOCAL;
    else if (it.kind == MP_STR && bytes_eq(d->buf + it.body, it.len, "replicated"))
        m->ack = PROTO_ACK_REPLICATED;
    else
        return field_fail(d, F_ACK, PROTO_ETYPE);
    return PROTO_OK;
}

static int get_payload(decoder_t *d, proto_msg_t *m)
{
    mp_item_t it;
    if (!field_get(d, F_PAYLOAD, &it))
        return field_fail(d, F_PAYLOAD, PROTO_EMISSING);
    if (it.kind != MP_BIN && it.kind != MP_STR)
        return field_fail(d, F_PAYLOAD, PROTO_ETYPE);
    if (it.len > d->lim.max_payload)
        return field_fail(d, F_PAYLOAD, PROTO_ELIMIT);
    m->payload.ptr = d->buf + it.body;
    m->payload.len = it.len;
    return PROTO_OK;
}

/* Decode the optional header map into a fresh array (m->headers). */
static int get_headers(decoder_t *d, proto_msg_t *m)
{
    size_t start = d->at[F_HEADERS], pos = start;
    mp_item_t map;
    proto_header_t *h = NULL;
    size_t total = 0;
    int rc;

    if (pos == NO_VALUE)
        return PROTO_OK;
    rc = mp_next(d->buf, d->len, &pos, &map);
    if (rc != PROTO_OK)
        return rc;
    if (map.kind != MP_MAP)
        return field_fail(d, F_HEADERS, PROTO_ETYPE);
    if (map.u == 0)
        return PROTO_OK; /* {} is the same as no headers */
    if (map.u > d->lim.max_headers)
        return field_fail(d, F_HEADERS, PROTO_ELIMIT);
    h = calloc((size_t)map.u, sizeof(*h));
    if (h == NULL)
        return PROTO_ENOMEM;
    for (size_t i = 0; i < map.u; i++) {
        mp_item_t k, v;
        rc = mp_next(d->buf, d->len, &pos, &k);
        if (rc != PROTO_OK)
            goto fail;
        if (k.kind != MP_STR) {
            rc = PROTO_ETYPE;
            goto fail;
        }
        rc = mp_next(d->buf, d->len, &pos, &v);
        if (rc != PROTO_OK)
            goto fail;
        if (v.kind != MP_STR) {
            rc = PROTO_ETYPE;
            goto fail;
        }
        total += k.len + v.len; /* each <= d->len: cannot overflow */
        if (total > d->lim.max_header_bytes) {
            rc = PROTO_ELIMIT;
            goto fail;
        }
        h[i].key = (proto_bytes_t){d->buf + k.body, k.len};
        h[i].value = (proto_bytes_t){d->buf + v.body, v.len};
        if (!utf8_valid(h[i].key.ptr, h[i].key.len) ||
            !utf8_valid(h[i].value.ptr, h[i].value.len)) {
            rc = PROTO_ETYPE;
            goto fail;
        }
        for (size_t j = 0; j < i; j++) {
            if (h[j].key.len == h[i].key.len &&
                memcmp(h[j].key.ptr, h[i].key.ptr, h[i].key.len) == 0) {
                rc = PROTO_EMALFORMED;
                goto fail;
            }
        }
    }
    m->headers = h;
    m->n_headers = (size_t)map.u;
    m->headers_raw = (proto_bytes_t){d->buf + start, pos - start};
    return PROTO_OK;
fail:
    free(h);
    return field_fail(d, F_HEADERS, rc);
}

/* Locate the known keys of the top-level map (d->at). */
static int index_fields(decoder_t *d)
{
    size_t pos = 0;
    mp_item_t map;
    bool seen[F_COUNT] = {false};
    int rc = mp_next(d->buf, d->len, &pos, &map);

    if (rc != PROTO_OK)
        return rc;
    if (map.kind != MP_MAP)
        return PROTO_ETYPE;
    for (size_t f = 0; f < F_COUNT; f++)
        d->at[f] = NO_VALUE;
    for (uint64_t i = 0; i < map.u; i++) {
        mp_item_t key, val;
        rc = mp_next(d->buf, d->len, &pos, &key);
        if (rc != PROTO_OK)
            return rc;
        if (key.kind != MP_STR)
            return PROTO_ETYPE;
        size_t f;
        for (f = 0; f < F_COUNT; f++)
            if (bytes_eq(d->buf + key.body, key.len, field_names[f]))
                break;
        size_t vpos = pos;
        if (f < F_COUNT) {
            if (seen[f])
                return PROTO_EMALFORMED;
            seen[f] = true;
            size_t probe = pos;
            rc = mp_next(d->buf, d->len, &probe, &val);
            if (rc != PROTO_OK)
                return rc;
            if (val.kind != MP_NIL)
                d->at[f] = vpos;
        }
        rc = mp_skip(d->buf, d->len, &pos);
        if (rc != PROTO_OK)
            return rc;
    }
    return PROTO_OK;
}

static int decode_type(decoder_t *d, enum proto_type *ret)
{
    static const struct {
        const char *name;
        enum proto_type type;
    } types[] = {
        {"hello", PROTO_HELLO}, {"sub", PROTO_SUB}, {"unsub", PROTO_UNSUB},
        {"pub", PROTO_PUB},     {"ack", PROTO_ACK}, {"refresh", PROTO_REFRESH},
    };
    proto_bytes_t t = {NULL, 0};
    int rc = get_str(d, F_T, true, &t);
    if (rc != PROTO_OK)
        return rc;
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (bytes_eq(t.ptr, t.len, types[i].name)) {
            *ret = types[i].type;
            return PROTO_OK;
        }
    }
    return PROTO_EUNKNOWN;
}

/* Fill *m from the indexed fields; on error m->headers is NULL. */
static int decode_fields(decoder_t *d, proto_msg_t *m)
{
    int rc = decode_type(d, &m->type);
    if (rc != PROTO_OK)
        return rc;
    switch (m->type) {
    case PROTO_HELLO:
        if ((rc = get_str(d, F_TOKEN, false, &m->token)) != PROTO_OK ||
            (rc = get_str(d, F_SESSION, false, &m->session)) != PROTO_OK ||
            (rc = get_str(d, F_RESUME_TOKEN, false, &m->resume_token)) != PROTO_OK ||
            (rc = get_str(d, F_CLIENT, false, &m->client)) != PROTO_OK)
            return rc;
        return PROTO_OK;
    case PROTO_SUB:
        if ((rc = get_uint(d, F_ID, true, &m->id)) != PROTO_OK ||
            (rc = get_str(d, F_STREAM, true, &m->stream)) != PROTO_OK ||
            (rc = get_from(d, m)) != PROTO_OK ||
            (rc = get_uint(d, F_EPOCH, false, &m->epoch)) != PROTO_OK)
            return rc;
        return PROTO_OK;
    case PROTO_UNSUB:
        if ((rc = get_uint(d, F_ID, true, &m->id)) != PROTO_OK ||
            (rc = get_str(d, F_STREAM, true, &m->stream)) != PROTO_OK)
            return rc;
        return PROTO_OK;
    case PROTO_PUB:
        if ((rc = get_uint(d, F_ID, true, &m->id)) != PROTO_OK ||
            (rc = get_str(d, F_STREAM, true, &m->stream)) != PROTO_OK ||
            (rc = get_payload(d, m)) != PROTO_OK ||
            (rc = get_str(d, F_MSGID, false, &m->msgid)) != PROTO_OK ||
            (rc = get_ack(d, m)) != PROTO_OK)
            return rc;
        return get_headers(d, m); /* last: the only step that allocates */
    case PROTO_ACK:
        if ((rc = get_str(d, F_STREAM, true, &m->stream)) != PROTO_OK ||
            (rc = get_uint(d, F_OFFSET, true, &m->offset)) != PROTO_OK)
            return rc;
        return PROTO_OK;
    case PROTO_REFRESH:
        if ((rc = get_uint(d, F_ID, true, &m->id)) != PROTO_OK ||
            (rc = get_str(d, F_TOKEN, true, &m->token)) != PROTO_OK)
            return rc;
        return PROTO_OK;
    }
    return PROTO_EUNKNOWN;
}

/* What field f must be (the reason of a refusal). */
static const char *field_wants(enum field f)
{
    switch (f) {
    case F_ID:
    case F_OFFSET:
        return "an unsigned integer";
    case F_EPOCH:
        return "an unsigned 64-bit integer (JavaScript: a BigInt, never a Number)";
    case F_FROM:
        return "\"earliest\", \"latest\" or an offset >= 1";
    case F_PAYLOAD:
        return "bin or str";
    case F_HEADERS:
        return "a map of UTF-8 str to UTF-8 str with unique keys";
    case F_ACK:
        return "\"local\" or \"replicated\"";
    default:
        return "a str";
    }
}

/* Fill out->error for a failed decode (and the type and id it reached). */
static void describe_error(const decoder_t *d, const proto_msg_t *m, int rc, proto_msg_t *out)
{
    memset(out, 0, sizeof(*out));
    if (d->bad < 0 || d->bad == F_T) {
        snprintf(out->error, sizeof(out->error), "%s", proto_strerror(rc));
        return;
    }
    if (d->bad != F_ID) { /* without its id a request cannot be answered */
        out->type = m->type;
        out->id = m->id;
    }
    const char *name = field_names[d->bad];
    if (rc == PROTO_EMISSING)
        snprintf(out->error, sizeof(out->error), "field '%s' is required", name);
    else if (rc == PROTO_ELIMIT)
        snprintf(out->error, sizeof(out->error), "field '%s' is over the limit", name);
    else
        snprintf(out->error, sizeof(out->error), "field '%s' must be %s", name,
                 field_wants((enum field)d->bad));
}

int proto_decode(const uint8_t *buf, size_t len, const proto_limits_t *limits, proto_msg_t *out)
{
    decoder_t d = {.buf = buf, .len = len, .bad = -1};
    proto_msg_t m = {0};
    int rc;

    if (limits != NULL)
        d.lim = *limits;
    if (d.lim.max_payload == 0)
        d.lim.max_payload = PROTO_DEFAULT_MAX_PAYLOAD;
    if (d.lim.max_headers == 0)
        d.lim.max_headers = PROTO_DEFAULT_MAX_HEADERS;
    if (d.lim.max_header_bytes == 0)
        d.lim.max_header_bytes = PROTO_DEFAULT_MAX_HEADER_BYTES;
    if (d.lim.max_depth == 0)
        d.lim.max_depth = PROTO_DEFAULT_MAX_DEPTH;
    if (buf == NULL || len == 0) {
        describe_error(&d, &m, PROTO_EMALFORMED, out);
        return PROTO_EMALFORMED;
    }

    rc = mp_validate(buf, len, d.lim.max_depth);
    if (rc == PROTO_OK)
        rc = index_fields(&d);
    if (rc == PROTO_OK)
        rc = decode_fields(&d, &m);
    if (rc != PROTO_OK) {
        describe_error(&d, &m, rc, out);
        return rc;
    }
    *out = m;
    return PROTO_OK;
}

void proto_msg_free(proto_msg_t *msg)
{
    if (msg == NULL)
        return;
    free(msg->headers);
    msg->headers = NULL;
    msg->n_headers = 0;
}

/* ---- encoding ----------------------------------------------------------- */

void proto_buf_free(proto_buf_t *b)
{
    if (b == NULL)
        return;
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

void proto_buf_reset(proto_buf_t *b)
{
    if (b != NULL)
        b->len = 0;
}

static int buf_reserve(proto_buf_t *b, size_t extra)
{
    if (extra <= b->cap - b->len)
        return PROTO_OK;
    if (extra > SIZE_MAX / 2 - b->len)
        return PROTO_ENOMEM;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < extra)
        cap *= 2;
    uint8_t *p = realloc(b->data, cap);
    if (p == NULL)
        return PROTO_ENOMEM;
    b->data = p;
    b->cap = cap;
    return PROTO_OK;
}

/*
 * One message being appended to a proto_buf_t. Errors are sticky: after the
 * first failure every later write is refused, and enc_finish rolls the
 * buffer back to where the message started, so a caller never sees half a
 * message.
 */
typedef struct encoder {
    proto_buf_t *b;
    size_t mark;
    int err;
    msgpack_packer pk;
} encoder_t;

static int enc_write(void *data, const char *p, size_t n)
{
    encoder_t *e = data;
    if (e->err != PROTO_OK)
        return -1;
    int rc = buf_reserve(e->b, n);
    if (rc != PROTO_OK) {
        e->err = rc;
        return -1;
    }
    memcpy(e->b->data + e->b->len, p, n);
    e->b->len += n;
    return 0;
}

static void enc_start(encoder_t *e, proto_buf_t *b, size_t entries, size_t size_hint)
{
    e->b = b;
    e->mark = b->len;
    e->err = buf_reserve(b, size_hint);
    msgpack_packer_init(&e->pk, e, enc_write);
    (void)msgpack_pack_map(&e->pk, entries); /* failures are recorded in e->err */
}

static int enc_finish(encoder_t *e)
{
    if (e->err != PROTO_OK)
        e->b->len = e->mark;
    return e->err;
}

static void enc_str(encoder_t *e, const void *p, size_t n)
{
    if (n > UINT32_MAX) {
        e->err = e->err ? e->err : PROTO_ELIMIT;
        return;
    }
    (void)msgpack_pack_str_with_body(&e->pk, n ? p : "", n);
}

static void enc_cstr(encoder_t *e, const char *s)
{
    s = s ? s : "";
    enc_str(e, s, strlen(s));
}

static void enc_bin(encoder_t *e, const void *p, size_t n)
{
    if (n > UINT32_MAX) {
        e->err = e->err ? e->err : PROTO_ELIMIT;
        return;
    }
    (void)msgpack_pack_bin_with_body(&e->pk, n ? p : "", n);
}

static void enc_uint(encoder_t *e, const char *key, uint64_t v)
{
    enc_cstr(e, key);
    (void)msgpack_pack_uint64(&e->pk, v);
}

static void enc_type(encoder_t *e, const char *type)
{
    enc_cstr(e, "t");
    enc_cstr(e, type);
}

static void enc_stream(encoder_t *e, const uint8_t *stream, size_t stream_len)
{
    enc_cstr(e, "stream");
    enc_str(e, stream, stream_len);
}

static void enc_code_reason(encoder_t *e, int code, const char *reason)
{
    enc_cstr(e, "code");
    (void)msgpack_pack_int(&e->pk, code); /* >= 0 packs as a uint format */
    enc_cstr(e, "reason");
    enc_cstr(e, reason);
}

int proto_enc_welcome(proto_buf_t *b, const proto_welcome_t *w)
{
    encoder_t e;
    size_t n_subs = w->resumed ? w->n_subs : 0;
    if (n_subs > UINT32_MAX)
        return PROTO_ELIMIT;
    enc_start(&e, b, (w->resumed ? 9 : 8) + (w->ephemeral ? 1 : 0) + (w->token_expires ? 1 : 0),
              176 + n_subs * 64);
    enc_type(&e, "welcome");
    enc_cstr(&e, "session");
    enc_cstr(&e, w->session);
    enc_cstr(&e, "resume_token");
    enc_cstr(&e, w->resume_token);
    enc_cstr(&e, "resumed");
    (void)(w->resumed ? msgpack_pack_true(&e.pk) : msgpack_pack_false(&e.pk));
    enc_uint(&e, "session_ttl", w->session_ttl_s);
    enc_cstr(&e, "server");
    enc_cstr(&e, w->server);
    enc_uint(&e, "max_payload", w->max_payload);
    enc_uint(&e, "max_inflight", w->max_inflight);
    if (w->ephemeral) {
        enc_cstr(&e, "durable");
        (void)msgpack_pack_false(&e.pk);
    }
    if (w->token_expires)
        enc_uint(&e, "token_expires", w->token_expires);
    if (w->resumed) {
        enc_cstr(&e, "subs");
        (void)msgpack_pack_array(&e.pk, n_subs);
        for (size_t i = 0; i < n_subs; i++) {
            const proto_resumed_sub_t *r = &w->subs[i];
            (void)msgpack_pack_map(&e.pk, 4);
            enc_stream(&e, (const uint8_t *)r->stream, r->stream_len);
            enc_uint(&e, "epoch", r->epoch);
            enc_uint(&e, "acked", r->acked);
            enc_uint(&e, "next", r->next);
        }
    }
    return enc_finish(&e);
}

int proto_enc_subok(proto_buf_t *b, uint64_t id, const uint8_t *stream, size_t stream_len,
                    uint64_t epoch, uint64_t first, uint64_t next)
{
    encoder_t e;
    enc_start(&e, b, 6, 64 + stream_len);
    enc_type(&e, "subok");
    enc_uint(&e, "id", id);
    enc_stream(&e, stream, stream_len);
    enc_uint(&e, "epoch", epoch);
    enc_uint(&e, "first", first);
    enc_uint(&e, "next", next);
    return enc_finish(&e);
}

int proto_enc_refreshok(proto_buf_t *b, uint64_t id, uint64_t token_expires)
{
    encoder_t e;
    enc_start(&e, b, 3, 48);
    enc_type(&e, "refreshok");
    enc_uint(&e, "id", id);
    enc_uint(&e, "token_expires", token_expires);
    return enc_finish(&e);
}

int proto_enc_unsubok(proto_buf_t *b, uint64_t id, const uint8_t *stream, size_t stream_len)
{
    encoder_t e;
    enc_start(&e, b, 3, 32 + stream_len);
    enc_type(&e, "unsubok");
    enc_uint(&e, "id", id);
    enc_stream(&e, stream, stream_len);
    return enc_finish(&e);
}

int proto_enc_puback(proto_buf_t *b, uint64_t id, const uint8_t *stream, size_t stream_len,
                     uint64_t offset, int duplicate)
{
    encoder_t e;
    enc_start(&e, b, 5, 48 + stream_len);
    enc_type(&e, "puback");
    enc_uint(&e, "id", id);
    enc_stream(&e, stream, stream_len);
    enc_uint(&e, "offset", offset);
    enc_cstr(&e, "dup");
    (void)(duplicate ? msgpack_pack_true(&e.pk) : msgpack_pack_false(&e.pk));
    return enc_finish(&e);
}

int proto_enc_nack(proto_buf_t *b, uint64_t id, int code, const char *reason)
{
    encoder_t e;
    enc_start(&e, b, 4, 48 + (reason ? strlen(reason) : 0));
    enc_type(&e, "nack");
    enc_uint(&e, "id", id);
    enc_code_reason(&e, code, reason);
    return enc_finish(&e);
}

/* Is raw[0..len) exactly one map of str -> str? */
static bool headers_raw_ok(const uint8_t *raw, size_t len)
{
    size_t pos = 0;
    mp_item_t map;
    if (raw == NULL || mp_validate(raw, len, 1) != PROTO_OK ||
        mp_next(raw, len, &pos, &map) != PROTO_OK || map.kind != MP_MAP)
        return false;
    for (uint64_t i = 0; i < map.u * 2; i++) {
        mp_item_t it;
        if (mp_next(raw, len, &pos, &it) != PROTO_OK || it.kind != MP_STR)
            return false;
    }
    return true;
}

int proto_enc_msg(proto_buf_t *b, const uint8_t *stream, size_t stream_len, uint64_t offset,
                  int64_t timestamp_us, const uint8_t *headers_raw, size_t headers_len,
                  const uint8_t *payload, size_t payload_len)
{
    encoder_t e;

    /* headers_raw is spliced in as is, so check it is what proto_decode
     * accepts: a damaged record must not corrupt the client's stream. */
    if (headers_len > 0 && !headers_raw_ok(headers_raw, headers_len))
        return PROTO_EMALFORMED;
    size_t hint = 64 + stream_len;
    hint += headers_len < SIZE_MAX / 4 ? headers_len : 0;
    hint += payload_len < SIZE_MAX / 4 ? payload_len : 0;
    enc_start(&e, b, headers_len > 0 ? 6 : 5, hint);
    enc_type(&e, "msg");
    enc_stream(&e, stream, stream_len);
    enc_uint(&e, "offset", offset);
    /* the wire says uint: a clock before 1970 is reported as 0 */
    enc_uint(&e, "ts", timestamp_us > 0 ? (uint64_t)timestamp_us : 0);
    enc_cstr(&e, "payload");
    enc_bin(&e, payload, payload_len);
    if (headers_len > 0) {
        enc_cstr(&e, "headers");
        (void)enc_write(&e, (const char *)headers_raw, headers_len);
    }
    return enc_finish(&e);
}

int proto_enc_gap(proto_buf_t *b, const uint8_t *stream, size_t stream_len, uint64_t from,
                  uint64_t to)
{
    encoder_t e;
    enc_start(&e, b, 4, 48 + stream_len);
    enc_type(&e, "gap");
    enc_stream(&e, stream, stream_len);
    enc_uint(&e, "from", from);
    enc_uint(&e, "to", to);
    return enc_finish(&e);
}

int proto_enc_error(proto_buf_t *b, uint64_t id, int code, const char *reason)
{
    encoder_t e;
    enc_start(&e, b, id ? 4 : 3, 48 + (reason ? strlen(reason) : 0));
    enc_type(&e, "error");
    if (id)
        enc_uint(&e, "id", id);
    enc_code_reason(&e, code, reason);
    return enc_finish(&e);
}

/* ---- stream patterns ------------------------------------------------------ */

int proto_pattern_match(char *const *patterns, size_t n, const char *name, size_t len)
{
    for (size_t i = 0; i < n; i++) {
        const char *p = patterns[i];
        size_t plen;

        if (p == NULL)
            continue;
        plen = strlen(p);
        if (plen == 1 && p[0] == '*')
            return 1;
        if (plen >= 2 && p[plen - 2] == '.' && p[plen - 1] == '*') {
            /* "a.b.*": the prefix "a.b." and at least one more byte. */
            if (len > plen - 1 && memcmp(name, p, plen - 1) == 0)
                return 1;
            continue;
        }
        if (plen == len && memcmp(name, p, len) == 0)
            return 1;
    }
    return 0;
}
