/*
 * wal_record_test.c - the WAL value codecs: round trips, and every single
 * byte corruption of an encoded value is detected (never decoded as data).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <xxhash.h>

#include "wal.h"
#include "wal_record.h"

static uint8_t *encode(wal_rec_t *r, size_t *len)
{
    *len = wal_rec_size(r);
    uint8_t *buf = malloc(*len);
    assert_non_null(buf);
    assert_int_equal(wal_rec_encode(r, buf, *len), 0);
    return buf;
}

static void fill(uint8_t *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(seed * 31u + i * 7u);
}

static void test_round_trip(void **state)
{
    (void)state;
    static const size_t sizes[][4] = {
        {0, 0, 0, 0},
        {5, 9, 0, 128},
        {255, 255, 300, 1},
        {1, 0, 65535, 70000},
    };
    for (size_t t = 0; t < sizeof(sizes) / sizeof(sizes[0]); t++) {
        uint8_t *prod = malloc(sizes[t][0] + 1), *id = malloc(sizes[t][1] + 1);
        uint8_t *hdr = malloc(sizes[t][2] + 1), *pay = malloc(sizes[t][3] + 1);
        fill(prod, sizes[t][0], 1);
        fill(id, sizes[t][1], 2);
        fill(hdr, sizes[t][2], 3);
        fill(pay, sizes[t][3], 4);
        wal_rec_t r = {
            .flags = (uint8_t)(t & 1 ? WAL_REC_FLAG_OUT : 0),
            .stream_id = 0x01020304u + (uint32_t)t,
            .seq = 0x1122334455667788ull + t,
            .offset = 42 + t,
            .timestamp_us = -5 + (int64_t)t * 1000000000000,
            .producer = prod,
            .producer_len = (uint16_t)sizes[t][0],
            .msgid = id,
            .msgid_len = (uint16_t)sizes[t][1],
            .headers = hdr,
            .headers_len = (uint16_t)sizes[t][2],
            .payload = pay,
            .payload_len = (uint32_t)sizes[t][3],
        };
        size_t len;
        uint8_t *buf = encode(&r, &len);
        assert_int_equal(len,
                         WAL_RECORD_HEADER + sizes[t][0] + sizes[t][1] + sizes[t][2] + sizes[t][3]);
        wal_rec_t d;
        assert_int_equal(wal_rec_decode(buf, len, &d), 0);
        assert_int_equal(d.checksum, r.checksum);
        assert_int_equal(d.version, WAL_RECORD_VERSION);
        assert_int_equal(d.flags, r.flags);
        assert_int_equal(d.stream_id, r.stream_id);
        assert_int_equal(d.seq, r.seq);
        assert_int_equal(d.offset, r.offset);
        assert_true(d.timestamp_us == r.timestamp_us);
        assert_int_equal(d.producer_len, r.producer_len);
        assert_int_equal(d.msgid_len, r.msgid_len);
        assert_int_equal(d.headers_len, r.headers_len);
        assert_int_equal(d.payload_len, r.payload_len);
        if (sizes[t][0])
            assert_memory_equal(d.producer, prod, sizes[t][0]);
        if (sizes[t][3])
            assert_memory_equal(d.payload, pay, sizes[t][3]);
        if (sizes[t][2])
            assert_memory_equal(d.headers, hdr, sizes[t][2]);
        if (sizes[t][1])
            assert_memory_equal(d.msgid, id, sizes[t][1]);
        /* Decoded pointers borrow the buffer. */
        assert_ptr_equal(d.producer, buf + WAL_RECORD_HEADER);
        free(buf);
        free(prod);
        free(id);
        free(hdr);
        free(pay);
    }
}

/* Flip every byte of an encoded record to several other values: each one
 * must be rejected. */
static void test_every_byte_corruption_detected(void **state)
{
    (void)state;
    uint8_t prod[7], id[11], hdr[20], pay[128];
    fill(prod, sizeof(prod), 5);
    fill(id, sizeof(id), 6);
    fill(hdr, sizeof(hdr), 7);
    fill(pay, sizeof(pay), 8);
    wal_rec_t r = {.stream_id = 9,
                   .seq = 77,
                   .offset = 12,
                   .timestamp_us = 1700000000000000,
                   .producer = prod,
                   .producer_len = sizeof(prod),
                   .msgid = id,
                   .msgid_len = sizeof(id),
                   .headers = hdr,
                   .headers_len = sizeof(hdr),
                   .payload = pay,
                   .payload_len = sizeof(pay)};
    size_t len;
    uint8_t *buf = encode(&r, &len);
    static const uint8_t deltas[] = {0x01, 0x80, 0xff, 0x10, 0x55};
    size_t tried = 0;
    for (size_t i = 0; i < len; i++) {
        for (size_t k = 0; k < sizeof(deltas); k++) {
            uint8_t *c = malloc(len);
            memcpy(c, buf, len);
            c[i] ^= deltas[k];
            wal_rec_t d;
            int rc = wal_rec_decode(c, len, &d);
            if (rc == 0)
                fail_msg("corruption at byte %zu (xor 0x%02x) not detected", i, deltas[k]);
            assert_true(rc == WAL_ECORRUPT || rc == WAL_EVERSION);
            free(c);
            tried++;
        }
    }
    /* Truncations and extensions are layout errors. */
    for (size_t cut = 0; cut < len; cut++) {
        wal_rec_t d;
        assert_int_equal(wal_rec_decode(buf, cut, &d), WAL_ECORRUPT);
    }
    uint8_t *ext = calloc(1, len + 1);
    memcpy(ext, buf, len);
    wal_rec_t d;
    assert_int_equal(wal_rec_decode(ext, len + 1, &d), WAL_ECORRUPT);
    free(ext);
    assert_int_equal(tried, len * sizeof(deltas));
    free(buf);
}

/* A record of a newer version with a valid checksum is a version error. */
static void test_newer_version(void **state)
{
    (void)state;
    uint8_t pay[4] = {1, 2, 3, 4};
    wal_rec_t r = {.stream_id = 1, .seq = 1, .offset = 1, .payload = pay, .payload_len = 4};
    size_t len;
    uint8_t *buf = encode(&r, &len);
    buf[8] = WAL_RECORD_VERSION + 1;
    /* Recompute the checksum as a newer writer would. */
    wal_rec_t tmp;
    assert_int_equal(wal_rec_decode(buf, len, &tmp), WAL_ECORRUPT);
    wal_put_le64(buf, XXH3_64bits(buf + 8, len - 8));
    assert_int_equal(wal_rec_decode(buf, len, &tmp), WAL_EVERSION);
    /* Unknown flags in version 1 are corruption. */
    buf[8] = WAL_RECORD_VERSION;
    buf[9] = 0x02;
    wal_put_le64(buf, XXH3_64bits(buf + 8, len - 8));
    assert_int_equal(wal_rec_decode(buf, len, &tmp), WAL_ECORRUPT);
    free(buf);
}

static void test_encode_too_small(void **state)
{
    (void)state;
    uint8_t pay[10] = {0};
    wal_rec_t r = {.seq = 1, .offset = 1, .payload = pay, .payload_len = 10};
    uint8_t buf[WAL_RECORD_HEADER + 9];
    assert_int_equal(wal_rec_encode(&r, buf, sizeof(buf)), WAL_EINVAL);
}

static void test_small_values(void **state)
{
    (void)state;
    wal_stream_meta_t m = {.id = 7,
                           .epoch = 0xdeadbeefcafef00dull,
                           .first_offset = 3,
                           .next_offset = 10,
                           .created_us = 123456789};
    uint8_t mb[WAL_STREAM_META_SIZE];
    wal_stream_meta_encode(&m, mb);
    wal_stream_meta_t md;
    assert_int_equal(wal_stream_meta_decode(mb, sizeof(mb), &md), 0);
    assert_int_equal(md.id, m.id);
    assert_int_equal(md.epoch, m.epoch);
    assert_int_equal(md.first_offset, m.first_offset);
    assert_int_equal(md.next_offset, m.next_offset);
    assert_true(md.created_us == m.created_us);

    wal_cursor_val_t c = {.offset = 99, .updated_us = -1};
    uint8_t cb[WAL_CURSOR_VAL_SIZE];
    wal_cursor_val_encode(&c, cb);
    wal_cursor_val_t cd;
    assert_int_equal(wal_cursor_val_decode(cb, sizeof(cb), &cd), 0);
    assert_int_equal(cd.offset, 99);
    assert_true(cd.updated_us == -1);

    wal_dedup_val_t dv = {.stream_id = 3, .offset = 4, .time_us = 5};
    uint8_t db[WAL_DEDUP_VAL_SIZE];
    wal_dedup_val_encode(&dv, db);
    wal_dedup_val_t dd;
    assert_int_equal(wal_dedup_val_decode(db, sizeof(db), &dd), 0);
    assert_int_equal(dd.stream_id, 3);
    assert_int_equal(dd.offset, 4);

    /* Every byte flip in each small value is detected too. */
    struct {
        uint8_t *buf;
        size_t len;
        int which;
    } vals[] = {{mb, sizeof(mb), 0}, {cb, sizeof(cb), 1}, {db, sizeof(db), 2}};
    for (size_t v = 0; v < 3; v++) {
        for (size_t i = 0; i < vals[v].len; i++) {
            uint8_t c2[64];
            memcpy(c2, vals[v].buf, vals[v].len);
            c2[i] ^= 0x01;
            int rc;
            if (vals[v].which == 0)
                rc = wal_stream_meta_decode(c2, vals[v].len, &md);
            else if (vals[v].which == 1)
                rc = wal_cursor_val_decode(c2, vals[v].len, &cd);
            else
                rc = wal_dedup_val_decode(c2, vals[v].len, &dd);
            if (rc == 0)
                fail_msg("value %zu: flip at byte %zu not detected", v, i);
        }
        /* Wrong sizes are rejected. */
        assert_int_not_equal(wal_stream_meta_decode(mb, sizeof(mb) - 1, &md), 0);
        assert_int_not_equal(wal_cursor_val_decode(cb, sizeof(cb) - 1, &cd), 0);
        assert_int_not_equal(wal_dedup_val_decode(db, 31, &dd), 0);
    }
}

static void test_byte_order_is_defined(void **state)
{
    (void)state;
    uint8_t b[8];
    wal_put_le64(b, 0x0102030405060708ull);
    assert_int_equal(b[0], 0x08);
    assert_int_equal(b[7], 0x01);
    assert_int_equal(wal_get_le64(b), 0x0102030405060708ull);
    wal_put_be64(b, 0x0102030405060708ull);
    assert_int_equal(b[0], 0x01);
    assert_int_equal(wal_get_be64(b), 0x0102030405060708ull);
    wal_put_be32(b, 0xa1b2c3d4u);
    assert_int_equal(b[0], 0xa1);
    assert_int_equal(wal_get_be32(b), 0xa1b2c3d4u);
    wal_put_le32(b, 0xa1b2c3d4u);
    assert_int_equal(b[0], 0xd4);
    assert_int_equal(wal_get_le32(b), 0xa1b2c3d4u);
    wal_put_le16(b, 0xa1b2);
    assert_int_equal(b[0], 0xb2);
    assert_int_equal(wal_get_le16(b), 0xa1b2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),    cmocka_unit_test(test_every_byte_corruption_detected),
        cmocka_unit_test(test_newer_version), cmocka_unit_test(test_encode_too_small),
        cmocka_unit_test(test_small_values),  cmocka_unit_test(test_byte_order_is_defined),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
