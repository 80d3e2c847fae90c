/*
 * admit_test.c - per-address connection limits (api/admit.h): the count per
 * address, the rate bucket and its refill, release and sweep, addresses
 * kept apart (IPv6 per /64), and a table that grows, shrinks and keeps
 * every entry findable through many inserts and removals (checked against
 * a trivial model).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <string.h>

#include "admit.h"

static void addr(uint32_t n, uint8_t out[16])
{
    api_admit_addr4(n, out);
}

static void test_count_per_address(void **state)
{
    (void)state;
    api_admit_options_t o = {.max_per_addr = 3};
    api_admit_t *a;
    assert_int_equal(api_admit_new(&o, &a), 0);
    uint8_t x[16], y[16];
    addr(1, x);
    addr(2, y);
    int counted;
    for (int i = 0; i < 3; i++) {
        assert_int_equal(api_admit_take(a, x, 0, &counted), API_ADMIT_OK);
        assert_int_equal(counted, 1);
    }
    assert_int_equal(api_admit_take(a, x, 0, &counted), API_ADMIT_TOO_MANY);
    assert_int_equal(counted, 0);
    assert_int_equal(api_admit_take(a, y, 0, &counted), API_ADMIT_OK); /* another address */
    assert_int_equal(api_admit_connected(a), 2);
    api_admit_release(a, x);
    assert_int_equal(api_admit_take(a, x, 0, &counted), API_ADMIT_OK);
    for (int i = 0; i < 3; i++)
        api_admit_release(a, x);
    api_admit_release(a, x); /* one too many: ignored */
    api_admit_release(a, y);
    assert_int_equal(api_admit_connected(a), 0);
    assert_int_equal(api_admit_addresses(a), 0); /* no bucket to remember */
    api_admit_free(a);
}

static void test_rate_bucket(void **state)
{
    (void)state;
    api_admit_options_t o = {.rate_per_s = 10, .burst = 5};
    api_admit_t *a;
    assert_int_equal(api_admit_new(&o, &a), 0);
    uint8_t x[16];
    addr(7, x);
    int counted, ok = 0;
    for (int i = 0; i < 20; i++) {
        if (api_admit_take(a, x, 1000000, &counted) == API_ADMIT_OK)
            ok++;
        api_admit_release(a, x); /* connections come and go: the rate still holds */
    }
    assert_int_equal(ok, 5); /* the burst */
    /* 0.3 s later: 3 more */
    ok = 0;
    for (int i = 0; i < 10; i++)
        if (api_admit_take(a, x, 1300000, &counted) == API_ADMIT_OK) {
            ok++;
            api_admit_release(a, x);
        }
    assert_int_equal(ok, 3);
    assert_int_equal(api_admit_take(a, x, 1300000, &counted), API_ADMIT_TOO_FAST);
    /* not forgotten while the bucket is not full */
    assert_int_equal(api_admit_sweep(a, 1400000), 0);
    assert_int_equal(api_admit_addresses(a), 1);
    /* full again after burst/rate = 0.5 s: forgotten */
    assert_int_equal(api_admit_sweep(a, 1900000), 1);
    assert_int_equal(api_admit_addresses(a), 0);
    /* a far future does not overflow the refill */
    assert_int_equal(api_admit_take(a, x, INT64_MAX / 2, &counted), API_ADMIT_OK);
    api_admit_free(a);
}

static void test_ipv6_per_64(void **state)
{
    (void)state;
    api_admit_options_t o = {.max_per_addr = 1};
    api_admit_t *a;
    assert_int_equal(api_admit_new(&o, &a), 0);
    uint8_t ip1[16] = {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1};
    uint8_t ip2[16] = {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1, 0xff, 0, 0, 0, 0, 0, 0, 2};
    uint8_t ip3[16] = {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1};
    uint8_t k1[16], k2[16], k3[16];
    api_admit_addr6(ip1, k1);
    api_admit_addr6(ip2, k2);
    api_admit_addr6(ip3, k3);
    int counted;
    assert_int_equal(api_admit_take(a, k1, 0, &counted), API_ADMIT_OK);
    assert_int_equal(api_admit_take(a, k2, 0, &counted), API_ADMIT_TOO_MANY); /* same /64 */
    assert_int_equal(api_admit_take(a, k3, 0, &counted), API_ADMIT_OK);
    api_admit_free(a);
}

/* Many addresses in and out: the table agrees with a plain array. */
static void test_table_against_model(void **state)
{
    (void)state;
    enum { N = 5000 };
    static uint32_t model[N];
    memset(model, 0, sizeof(model));
    api_admit_options_t o = {.max_per_addr = 4};
    api_admit_t *a;
    assert_int_equal(api_admit_new(&o, &a), 0);
    uint64_t r = 88172645463325252ull;
    for (int step = 0; step < 200000; step++) {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        uint32_t i = (uint32_t)(r % N);
        uint8_t x[16];
        addr(i * 2654435761u, x);
        int counted;
        if ((r >> 40) & 1) {
            enum api_admit_verdict v = api_admit_take(a, x, 0, &counted);
            if (model[i] < 4) {
                assert_int_equal(v, API_ADMIT_OK);
                model[i]++;
            } else {
                assert_int_equal(v, API_ADMIT_TOO_MANY);
            }
        } else if (model[i]) {
            api_admit_release(a, x);
            model[i]--;
        }
    }
    size_t connected = 0;
    for (int i = 0; i < N; i++)
        connected += model[i] > 0;
    assert_int_equal(api_admit_connected(a), connected);
    assert_int_equal(api_admit_addresses(a), connected);
    api_admit_free(a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_count_per_address),
        cmocka_unit_test(test_rate_bucket),
        cmocka_unit_test(test_ipv6_per_64),
        cmocka_unit_test(test_table_against_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
