/*
 * wal_space.c - disk space for the WAL, and the WAL's state (ok, storage
 * full, failed). See wal.c for the design of the module.
 *
 * Why data.mdb is preallocated. LMDB writes a commit's pages with pwrite /
 * writev, then fdatasyncs. On a full filesystem, a page past the blocks
 * the file holds gets a short write, which LMDB reports as EIO: the same
 * code as a failing disk, which must stop the WAL for good (a retried
 * fsync can report success for data the kernel dropped). To keep the two
 * apart, the writer keeps data.mdb's blocks allocated (fallocate with
 * FALLOC_FL_KEEP_SIZE: the file's size stays LMDB's business) up to the
 * map size, and never lets the map outgrow them. LMDB never writes outside
 * its map, so a commit never needs a new block; a full disk is met where
 * the map must grow, before anything is written, and fails only that
 * batch with "storage full". When space returns the next growth succeeds.
 *
 * lock.mdb, LMDB's reader table, is written through a shared mapping; a
 * hole in it met on a full disk would be a SIGBUS, so its blocks are
 * allocated before LMDB opens it.
 *
 * Growing the map for appends leaves free on the filesystem what the
 * journal's two files may still take (each grows to journal_max) and
 * retention's reserve (map_reserve in wal_writer.c), so that a full disk
 * never keeps the journal from growing or retention from trimming.
 *
 * Filesystems without fallocate (EOPNOTSUPP) get no such guarantee. There,
 * an EIO from an LMDB commit while the filesystem has less than
 * NOSPACE_EIO_FREE left is taken for "no space" (wal_space_nospace_eio).
 */
#include "wal_int.h"

#include <sys/statvfs.h>

#define GROW_MIN         (1ull << 20) /* a growth smaller than this is "no space" */
#define ALLOC_ALIGN      (1ull << 20) /* allocations end on a MiB boundary */
#define NOSPACE_EIO_FREE (8ull << 20) /* see above: only without fallocate */
#define LOCK_BYTES(n)    (((uint64_t)(n) + 8) * 64 + 8192) /* > LMDB's lock file for n readers */

/* ---- the filesystem ------------------------------------------------------- */

void wal_space_fs(const wal_t *wal, uint64_t *ret_free, uint64_t *ret_total)
{
    struct statvfs sv;
    if (statvfs(wal->dir, &sv) != 0) {
        *ret_free = *ret_total = 0;
        return;
    }
    *ret_free = (uint64_t)sv.f_bavail * sv.f_frsize;
    *ret_total = (uint64_t)sv.f_blocks * sv.f_frsize;
}

static uint64_t fs_free(const wal_t *wal)
{
    uint64_t f, t;
    wal_space_fs(wal, &f, &t);
    return f;
}

/* wal_space_fs, and a full disk while wal_testing_fail_alloc is on. */
static uint64_t fs_free_seen(wal_t *wal)
{
    pthread_mutex_lock(&wal->mu);
    bool full = wal->fault_alloc > 0;
    pthread_mutex_unlock(&wal->mu);
    return full ? 0 : fs_free(wal);
}

static bool nospace(int err)
{
    return err == ENOSPC || err == EDQUOT;
}

bool wal_space_nospace_eio(const wal_t *wal, int rc)
{
    return rc == EIO && !wal->prealloc && fs_free(wal) < NOSPACE_EIO_FREE;
}

/* ---- allocation ----------------------------------------------------------- */

/* fallocate [from, to) of fd, or the injected fault. */
static int alloc_range(wal_t *wal, int fd, uint64_t from, uint64_t to)
{
    pthread_mutex_lock(&wal->mu);
    bool fault = wal->fault_alloc > 0;
    if (fault && wal->fault_alloc != UINT32_MAX)
        wal->fault_alloc--;
    pthread_mutex_unlock(&wal->mu);
    if (fault)
        return ENOSPC;
    if (to <= from)
        return 0;
    int rc;
    do
        rc = fallocate(fd, FALLOC_FL_KEEP_SIZE, (off_t)from, (off_t)(to - from));
    while (rc != 0 && errno == EINTR);
    return rc == 0 ? 0 : errno;
}

int wal_space_lock_prepare(const char *dir, unsigned max_readers)
{
    size_t plen = strlen(dir) + sizeof("/lock.mdb");
    char *path = malloc(plen);
    if (!path)
        return ENOMEM;
    snprintf(path, plen, "%s/lock.mdb", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    free(path);
    if (fd < 0)
        return errno;
    int rc = fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, (off_t)LOCK_BYTES(max_readers)) == 0 ? 0 : errno;
    close(fd);
    return rc == EOPNOTSUPP ? 0 : rc;
}

/*
 * Make data.mdb hold blocks up to `upto` (rounded to ALLOC_ALIGN), leaving
 * `keep` bytes free on the filesystem. Allocates as much as fits when not
 * all of it does. Returns 0 when all of it is allocated, else ENOSPC (or
 * the error); wal->alloc_end says how far it got either way.
 */
static int space_alloc(wal_t *wal, uint64_t upto, uint64_t keep)
{
    upto = (upto + ALLOC_ALIGN - 1) / ALLOC_ALIGN * ALLOC_ALIGN;
    if (upto <= wal->alloc_end)
        return 0;
    uint64_t free_b = fs_free_seen(wal);
    uint64_t room = free_b > keep ? free_b - keep : 0;
    uint64_t target = upto;
    if (target - wal->alloc_end > room)
        target = (wal->alloc_end + room) / ALLOC_ALIGN * ALLOC_ALIGN;
    int rc = 0;
    /* The filesystem's count can be a little off (metadata blocks): step
     * down by halves until an allocation succeeds or less than a MiB is left. */
    while (target > wal->alloc_end) {
        rc = alloc_range(wal, wal->data_fd, wal->alloc_end, target);
        if (rc == 0) {
            wal->alloc_end = target;
            break;
        }
        if (!nospace(rc))
            return rc;
        uint64_t half = (target - wal->alloc_end) / 2 / ALLOC_ALIGN * ALLOC_ALIGN;
        if (half == 0)
            break;
        target = wal->alloc_end + half;
    }
    return wal->alloc_end >= upto ? 0 : rc ? rc : ENOSPC;
}

/* Bytes the journal's files may still grow by. */
static uint64_t journal_left(const wal_t *wal)
{
    if (wal->jfd[0] < 0)
        return 0;
    uint64_t max = 2 * wal->opts.journal_max, have = wal->jfile[0] + wal->jfile[1];
    return have < max ? max - have : 0;
}

/* What a growth of the map leaves free: the journal's remaining room and
 * retention's reserve, but never more than an eighth of the filesystem (a
 * small disk with a large map_size_max still gets a map; the journal then
 * may meet the full disk, and batches go to LMDB directly). */
uint64_t wal_space_keep(const wal_t *wal, bool for_retention)
{
    uint64_t keep = journal_left(wal) + (for_retention ? 0 : wal_map_reserve(wal));
    uint64_t free_b, total;
    wal_space_fs(wal, &free_b, &total);
    return total && keep > total / 8 ? total / 8 : keep;
}

static uint64_t used_bytes(const wal_t *wal)
{
    MDB_envinfo info;
    mdb_env_info(wal->env, &info);
    return ((uint64_t)info.me_last_pgno + 1) * wal->page_size;
}

int wal_space_init(wal_t *wal)
{
    int fd = -1;
    if (mdb_env_get_fd(wal->env, &fd) != 0 || fd < 0)
        return 0; /* no preallocation */
    wal->data_fd = fd;
    struct stat st;
    if (fstat(fd, &st) != 0)
        return errno;
    uint64_t used = used_bytes(wal), have = (uint64_t)st.st_size;
    uint64_t end = have > used ? have : used;
    /* Blocks below the end of the file exist (LMDB writes every page it
     * uses); fill any hole anyway, and learn whether fallocate works here. */
    int rc = alloc_range(wal, fd, 0, end);
    if (rc == EOPNOTSUPP || rc == ENOSYS) {
        wal->prealloc = false;
        return 0;
    }
    if (rc && !nospace(rc))
        return rc;
    wal->prealloc = true;
    /* An earlier run may have allocated past the end of the file (blocks
     * ahead of its map): find how far, so that the map can use them on a
     * full disk. st_blocks also counts the extent tree: allocating up to
     * a candidate over what exists needs no new block, one a little past
     * it does, so step down until one needs none. */
    uint64_t blocks = (uint64_t)st.st_blocks * 512 / ALLOC_ALIGN * ALLOC_ALIGN;
    for (int i = 0; i < 8 && blocks > end; i++, blocks -= ALLOC_ALIGN) {
        if (alloc_range(wal, fd, end, blocks) == 0) {
            end = blocks;
            break;
        }
    }
    wal->alloc_end = end;
    uint64_t want = wal->map_size;
    if (end > want)
        want = end < wal->opts.map_size_max ? end : wal->opts.map_size_max;
    rc = space_alloc(wal, want, wal_space_keep(wal, false));
    if (rc && !nospace(rc))
        return rc;
    if (wal->alloc_end < used + ALLOC_ALIGN) {
        /* Room to work at all (a new WAL creates its databases), from the
         * reserve if need be; a disk without even that stays as it is. */
        rc = space_alloc(wal, used + ALLOC_ALIGN, 0);
        if (rc && !nospace(rc))
            return rc;
    }
    if (wal->alloc_end < wal->map_size) {
        /* A (nearly) full disk at open: the map may not outgrow the blocks
         * (LMDB keeps it at least as large as the data). */
        wal->disk_limited = true;
        return wal_map_set(wal, wal->alloc_end > used ? wal->alloc_end : used);
    }
    return want > wal->map_size ? wal_map_set(wal, want) : 0;
}

int wal_space_grow(wal_t *wal, uint64_t nsize, bool for_retention, uint64_t *ret_size)
{
    *ret_size = nsize;
    if (!wal->prealloc)
        return 0;
    int rc = space_alloc(wal, nsize, wal_space_keep(wal, for_retention));
    if (rc == 0) {
        if (!for_retention)
            wal->disk_limited = false;
        return 0;
    }
    if (!nospace(rc))
        return rc;
    if (!for_retention)
        wal->disk_limited = true;
    if (wal->alloc_end < wal->map_size + GROW_MIN)
        return ENOSPC;
    *ret_size = wal->alloc_end; /* part of it */
    return 0;
}

/* How large the map can become: map_size_max, or less when the disk has
 * no room for its blocks (what it holds plus what is free beyond the
 * reserve). The filesystem is asked at most every CAP_EVERY_US. */
#define CAP_EVERY_US 100000

uint64_t wal_space_cap(wal_t *wal)
{
    uint64_t max = wal->opts.map_size_max;
    if (!wal->prealloc)
        return wal->disk_limited ? wal->map_size : max;
    int64_t now = wal_mono_us();
    if (wal->cap_at_us && now - wal->cap_at_us < CAP_EVERY_US)
        return wal->cap_cached;
    uint64_t free_b = fs_free_seen(wal), keep = wal_space_keep(wal, false);
    uint64_t cap = wal->alloc_end + (free_b > keep ? free_b - keep : 0);
    if (cap < wal->map_size)
        cap = wal->map_size;
    if (cap > max)
        cap = max;
    wal->cap_cached = cap;
    wal->cap_at_us = now;
    return cap;
}

/* ---- state ---------------------------------------------------------------- */

static void state_notify(wal_t *wal)
{
    if (wal->base && wal->done_ev) {
        __atomic_store_n(&wal->state_pending, 1, __ATOMIC_RELEASE);
        event_active(wal->done_ev, EV_READ, 0);
    }
}

/* Enter `state` with the reason (formatted) unless already there; a
 * failed WAL stays failed. */
__attribute__((format(printf, 3, 4))) static void state_enter(wal_t *wal, int state,
                                                              const char *fmt, ...)
{
    pthread_mutex_lock(&wal->st_mu);
    bool change = wal->state != state && wal->state != WAL_STATE_FAILED;
    if (change || wal->state == state) {
        /* the same state may get a newer reason, without a change */
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(wal->state_reason, sizeof(wal->state_reason), fmt, ap);
        va_end(ap);
    }
    if (change) {
        __atomic_store_n(&wal->state, state, __ATOMIC_RELEASE);
        wal->state_since_us = wal_now_us();
        wal->state_changes++;
    }
    pthread_mutex_unlock(&wal->st_mu);
    if (change)
        state_notify(wal);
}

static void fmt_size(char *buf, size_t len, uint64_t v)
{
    if (v >= (1ull << 30) && v % (1ull << 30) == 0)
        snprintf(buf, len, "%llu GiB", (unsigned long long)(v >> 30));
    else if (v >= (1ull << 20))
        snprintf(buf, len, "%llu MiB", (unsigned long long)(v >> 20));
    else
        snprintf(buf, len, "%llu KiB", (unsigned long long)(v >> 10));
}

void wal_state_full(wal_t *wal)
{
    char a[32], b[32];
    if (wal->refold) {
        state_enter(wal, WAL_STATE_FULL,
                    "no space to fold acknowledged journal entries into LMDB; publishes are "
                    "refused until there is");
    } else if (wal->disk_limited || wal->nospace) {
        fmt_size(a, sizeof(a), fs_free(wal));
        fmt_size(b, sizeof(b), wal_space_keep(wal, false));
        state_enter(wal, WAL_STATE_FULL,
                    "no space left on the WAL's filesystem (%s free; the map grows only while "
                    "more than %s stays free for the journal and retention)",
                    a, b);
    } else {
        fmt_size(a, sizeof(a), wal->opts.map_size_max);
        state_enter(wal, WAL_STATE_FULL, "the WAL's map is at wal.map_size_max (%s)", a);
    }
}

void wal_state_ok(wal_t *wal)
{
    if (__atomic_load_n(&wal->state, __ATOMIC_ACQUIRE) == WAL_STATE_OK || wal->refold)
        return;
    wal->nospace = false;
    state_enter(wal, WAL_STATE_OK, "%s", "");
}

void wal_fail_stop(wal_t *wal, const char *what, int err)
{
    if (!__atomic_exchange_n(&wal->failed, 1, __ATOMIC_ACQ_REL)) {
        const char *why = err > 0 ? strerror(err) : err < 0 ? mdb_strerror(err) : "";
        if (err && err < 0 && err > -1000)
            why = wal_strerror(err); /* a WAL_E* code */
        state_enter(wal, WAL_STATE_FAILED, "%s: %s", what, why);
    }
}

void wal_state_get(wal_t *wal, wal_state_info_t *ret)
{
    memset(ret, 0, sizeof(*ret));
    pthread_mutex_lock(&wal->st_mu);
    ret->state = (enum wal_state)wal->state;
    ret->since_us = wal->state_since_us;
    ret->changes = wal->state_changes;
    memcpy(ret->reason, wal->state_reason, sizeof(ret->reason));
    pthread_mutex_unlock(&wal->st_mu);
    ret->reloads = __atomic_load_n(&wal->reloads, __ATOMIC_ACQUIRE);
    ret->preallocated = wal->prealloc;
    wal_space_fs(wal, &ret->disk_free_bytes, &ret->disk_total_bytes);
}

enum wal_state wal_state_now(const wal_t *wal)
{
    return (enum wal_state)__atomic_load_n(&wal->state, __ATOMIC_ACQUIRE);
}

uint64_t wal_reloads(const wal_t *wal)
{
    return __atomic_load_n(&wal->reloads, __ATOMIC_ACQUIRE);
}

void wal_on_state(wal_t *wal, void (*cb)(void *arg), void *arg)
{
    wal->state_cb = cb;
    wal->state_arg = arg;
}

void wal_testing_fail_alloc(wal_t *wal, unsigned count)
{
    pthread_mutex_lock(&wal->mu);
    wal->fault_alloc = count;
    pthread_mutex_unlock(&wal->mu);
}
