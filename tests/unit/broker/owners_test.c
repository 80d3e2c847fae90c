/*
 * owners_test.c - sessions per owner (broker/brk_owners.c): the count
 * limit evicts the owner's oldest session that no connection holds and
 * refuses when all are held; the creation rate; token subjects and
 * addresses are separate owners; removal keeps lists and counts right
 * through many operations (checked against a model).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <stdio.h>
#include <string.h>

#include "broker_int.h"

static const char *held; /* a session id that counts as held open */

static int live(const char *id, void *arg)
{
    (void)arg;
    return held && strcmp(id, held) == 0;
}

static void test_limit_evicts_oldest_not_held(void **state)
{
    (void)state;
    brk_owners_limits_t lim = {.per_owner = 3, .per_addr = 2};
    brk_owners_t *o;
    assert_int_equal(brk_owners_new(&lim, &o), 0);
    char ev[300];
    const char *ids[] = {"s1", "s2", "s3"};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(brk_owners_admit(o, "alice", 0, 0, live, NULL, ev), BRK_OWNERS_OK);
        assert_int_equal(brk_owners_add(o, "alice", 0, ids[i]), 0);
    }
    held = "s1"; /* the oldest is held open: the next oldest goes */
    assert_int_equal(brk_owners_admit(o, "alice", 0, 0, live, NULL, ev), BRK_OWNERS_EVICT);
    assert_string_equal(ev, "s2");
    brk_owners_remove(o, ev);
    assert_int_equal(brk_owners_add(o, "alice", 0, "s4"), 0);
    assert_int_equal(brk_owners_sessions(o), 3);
    /* bob is another owner; an address "alice" another still */
    assert_int_equal(brk_owners_admit(o, "bob", 0, 0, live, NULL, ev), BRK_OWNERS_OK);
    assert_int_equal(brk_owners_admit(o, "alice", 1, 0, live, NULL, ev), BRK_OWNERS_OK);
    /* all held: refused */
    held = NULL;
    brk_owners_limits_t one = {.per_addr = 1};
    brk_owners_set(o, &one);
    assert_int_equal(brk_owners_add(o, "10.0.0.1", 1, "a1"), 0);
    held = "a1";
    assert_int_equal(brk_owners_admit(o, "10.0.0.1", 1, 0, live, NULL, ev), BRK_OWNERS_TOO_MANY);
    held = NULL;
    assert_int_equal(brk_owners_admit(o, "10.0.0.1", 1, 0, live, NULL, ev), BRK_OWNERS_EVICT);
    assert_string_equal(ev, "a1");
    brk_owners_free(o);
}

static void test_rate(void **state)
{
    (void)state;
    brk_owners_limits_t lim = {.rate = 5, .burst = 3};
    brk_owners_t *o;
    assert_int_equal(brk_owners_new(&lim, &o), 0);
    char ev[300];
    int ok = 0;
    for (int i = 0; i < 10; i++)
        ok += brk_owners_admit(o, "carol", 0, 1000000, live, NULL, ev) == BRK_OWNERS_OK;
    assert_int_equal(ok, 3);
    assert_int_equal(brk_owners_admit(o, "carol", 0, 1000000, live, NULL, ev), BRK_OWNERS_TOO_FAST);
    assert_int_equal(brk_owners_admit(o, "carol", 0, 1200000, live, NULL, ev), BRK_OWNERS_OK);
    assert_int_equal(brk_owners_admit(o, "dave", 0, 1000000, live, NULL, ev), BRK_OWNERS_OK);
    brk_owners_free(o);
}

static void test_model(void **state)
{
    (void)state;
    enum { OWNERS = 50, IDS = 2000 };
    static int owner_of[IDS]; /* -1: not recorded */
    brk_owners_limits_t lim = {0};
    brk_owners_t *o;
    assert_int_equal(brk_owners_new(&lim, &o), 0);
    for (int i = 0; i < IDS; i++)
        owner_of[i] = -1;
    uint64_t r = 0x2545F4914F6CDD1Dull;
    size_t n = 0;
    for (int step = 0; step < 100000; step++) {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        int id = (int)(r % IDS), w = (int)((r >> 20) % OWNERS);
        char ids[16], key[16];
        snprintf(ids, sizeof(ids), "id%d", id);
        snprintf(key, sizeof(key), "o%d", w);
        if ((r >> 40) & 1) {
            assert_int_equal(brk_owners_add(o, key, (int)((r >> 41) & 1), ids), 0);
            if (owner_of[id] < 0)
                n++;
            owner_of[id] = w;
        } else {
            brk_owners_remove(o, ids);
            if (owner_of[id] >= 0)
                n--;
            owner_of[id] = -1;
        }
        assert_int_equal(brk_owners_sessions(o), n);
    }
    brk_owners_free(o);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_limit_evicts_oldest_not_held),
        cmocka_unit_test(test_rate),
        cmocka_unit_test(test_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
