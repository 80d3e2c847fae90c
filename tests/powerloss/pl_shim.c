/*
 * pl_shim.c - LD_PRELOAD power-loss simulator for the WAL's files (tests
 * only). Writes to a file named data.mdb (LMDB) or journal / journal.1 (the
 * WAL's journal, written with pwrite + fdatasync) that was opened without
 * O_DSYNC are pending until the process fsyncs that descriptor, as in a page
 * cache that a power cut empties; O_DSYNC writes (LMDB's meta page fd, unless
 * MDB_NOMETASYNC) are durable at once. At the N-th write/sync event
 * (ARQ_PL_CRASH_AT=N) the shim "loses power": the disk ends up holding what
 * was durable plus a random subset of the pending writes, some torn at a
 * 512-byte boundary, applied in random order; then _exit(86).
 *
 * A pending write goes to the file at once (so pread and the map see it, as
 * they see the page cache) and keeps the bytes it replaced; the cut puts
 * those back, newest first, before applying the chosen subset.
 */
/* Interpose the plain symbols LMDB links (open, pwrite...), not the *64 aliases. */
#undef _FILE_OFFSET_BITS
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FD 4096

struct pending {
    int fd; /* the buffered fd of data.mdb or of the journal */
    off_t off;
    size_t len;
    unsigned char *data; /* what was written */
    unsigned char *old;  /* what it replaced (zeroes past the old end of file) */
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned char tracked[MAX_FD]; /* 1: buffered fd, 2: O_DSYNC fd */
static ino_t inode[MAX_FD];
static struct pending *pend;
static size_t n_pend, cap_pend;
static unsigned long events, crash_at;
static uint64_t rng;
static int inited;

static int (*r_open)(const char *, int, ...);
static int (*r_open64)(const char *, int, ...);
static int (*r_close)(int);
static ssize_t (*r_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*r_pread)(int, void *, size_t, off_t);
static ssize_t (*r_write)(int, const void *, size_t);
static ssize_t (*r_writev)(int, const struct iovec *, int);
static int (*r_fsync)(int);
static int (*r_fdatasync)(int);

/* Function pointers from dlsym: copy the bytes, as POSIX describes. */
static void load(void *fnptr_addr, const char *name)
{
    void *p = dlsym(RTLD_NEXT, name);
    memcpy(fnptr_addr, &p, sizeof(p));
}

static void init(void)
{
    if (inited)
        return;
    load((void *)&r_open, "open");
    load((void *)&r_open64, "open64");
    load((void *)&r_close, "close");
    load((void *)&r_pwrite, "pwrite");
    load((void *)&r_pread, "pread");
    load((void *)&r_write, "write");
    load((void *)&r_writev, "writev");
    load((void *)&r_fsync, "fsync");
    load((void *)&r_fdatasync, "fdatasync");
    const char *c = getenv("ARQ_PL_CRASH_AT");
    crash_at = c ? strtoul(c, NULL, 10) : 0;
    const char *s = getenv("ARQ_PL_SEED");
    rng = s ? strtoull(s, NULL, 10) * 2654435761u + 1 : 88172645463325252ull;
    inited = 1;
}

static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static int is_data_file(const char *path)
{
    size_t n = strlen(path);
    return (n >= 8 && strcmp(path + n - 8, "data.mdb") == 0) ||
           (n >= 8 && strcmp(path + n - 8, "/journal") == 0) ||
           (n >= 10 && strcmp(path + n - 10, "/journal.1") == 0);
}

static void track(int fd, const char *path, int flags)
{
    struct stat st;
    if (fd >= 0 && fd < MAX_FD && is_data_file(path) && fstat(fd, &st) == 0) {
        tracked[fd] = (flags & (O_DSYNC | O_SYNC)) ? 2 : 1;
        inode[fd] = st.st_ino;
    }
}

static void put(int fd, const unsigned char *data, size_t len, off_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t w = r_pwrite(fd, data + done, len - done, off + (off_t)done);
        if (w <= 0)
            _exit(87);
        done += (size_t)w;
    }
}

/* Power cut: the disk keeps what was durable and some pending writes, in
 * any order, some torn. */
static void crash(int fd)
{
    for (size_t i = n_pend; i > 0; i--) /* back to the durable state */
        put(pend[i - 1].fd, pend[i - 1].old, pend[i - 1].len, pend[i - 1].off);
    for (size_t i = n_pend; i > 1; i--) {
        size_t j = next_rand() % i;
        struct pending t = pend[i - 1];
        pend[i - 1] = pend[j];
        pend[j] = t;
    }
    for (size_t i = 0; i < n_pend; i++) {
        uint64_t r = next_rand() % 4;
        if (r == 0 || r == 1)
            continue; /* lost */
        size_t len = pend[i].len;
        if (r == 2 && len > 512)
            len = 512 * (1 + next_rand() % (len / 512)); /* torn */
        put(pend[i].fd, pend[i].data, len, pend[i].off);
    }
    (void)fd;
    _exit(86);
}

/* One write or sync event on the data file; called with mu held. */
static void tick(int fd)
{
    events++;
    if (crash_at && events >= crash_at)
        crash(fd);
}

/* A buffered write: to the file now, and pending until its fd is synced. */
static void buffer(int fd, const void *buf, size_t n, off_t off)
{
    if (n_pend == cap_pend) {
        cap_pend = cap_pend ? cap_pend * 2 : 64;
        pend = realloc(pend, cap_pend * sizeof(*pend));
        if (!pend)
            _exit(88);
    }
    unsigned char *d = malloc(n ? n : 1), *old = calloc(1, n ? n : 1);
    if (!d || !old)
        _exit(88);
    memcpy(d, buf, n);
    for (size_t got = 0; got < n;) {
        ssize_t r = r_pread(fd, old + got, n - got, off + (off_t)got);
        if (r < 0)
            _exit(87);
        if (r == 0)
            break; /* past the end of the file: zeroes */
        got += (size_t)r;
    }
    put(fd, d, n, off);
    pend[n_pend++] = (struct pending){fd, off, n, d, old};
}

/* An O_DSYNC write is durable: pending writes of the same file under it
 * neither come back nor get lost at the cut. */
static void durable_over(int fd, const unsigned char *buf, size_t n, off_t off)
{
    for (size_t i = 0; i < n_pend; i++) {
        if (inode[pend[i].fd] != inode[fd])
            continue;
        off_t a = pend[i].off > off ? pend[i].off : off;
        off_t e1 = pend[i].off + (off_t)pend[i].len, e2 = off + (off_t)n;
        off_t b = e1 < e2 ? e1 : e2;
        if (a < b) {
            memcpy(pend[i].data + (a - pend[i].off), buf + (a - off), (size_t)(b - a));
            memcpy(pend[i].old + (a - pend[i].off), buf + (a - off), (size_t)(b - a));
        }
    }
}

static void flush_pending(int fd)
{
    size_t keep = 0;
    for (size_t i = 0; i < n_pend; i++) {
        if (pend[i].fd != fd) {
            pend[keep++] = pend[i];
            continue;
        }
        free(pend[i].data);
        free(pend[i].old);
    }
    n_pend = keep;
}

int open(const char *path, int flags, ...)
{
    init();
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    int fd = r_open(path, flags, mode);
    pthread_mutex_lock(&mu);
    track(fd, path, flags);
    pthread_mutex_unlock(&mu);
    return fd;
}

int open64(const char *path, int flags, ...)
{
    init();
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    int fd = r_open64(path, flags, mode);
    pthread_mutex_lock(&mu);
    track(fd, path, flags);
    pthread_mutex_unlock(&mu);
    return fd;
}

int close(int fd)
{
    init();
    if (fd >= 0 && fd < MAX_FD) {
        pthread_mutex_lock(&mu);
        tracked[fd] = 0;
        pthread_mutex_unlock(&mu);
    }
    return r_close(fd);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    init();
    if (fd < 0 || fd >= MAX_FD || !tracked[fd])
        return r_pwrite(fd, buf, n, off);
    pthread_mutex_lock(&mu);
    tick(fd);
    ssize_t rc = (ssize_t)n;
    if (tracked[fd] == 2) {
        rc = r_pwrite(fd, buf, n, off); /* O_DSYNC: durable on return */
        if (rc > 0)
            durable_over(fd, buf, (size_t)rc, off);
    } else {
        buffer(fd, buf, n, off);
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

ssize_t write(int fd, const void *buf, size_t n)
{
    init();
    if (fd < 0 || fd >= MAX_FD || !tracked[fd])
        return r_write(fd, buf, n);
    off_t pos = lseek(fd, 0, SEEK_CUR);
    ssize_t rc = pwrite(fd, buf, n, pos);
    if (rc > 0)
        lseek(fd, pos + rc, SEEK_SET);
    return rc;
}

ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
    init();
    if (fd < 0 || fd >= MAX_FD || !tracked[fd])
        return r_writev(fd, iov, cnt);
    size_t total = 0;
    for (int i = 0; i < cnt; i++)
        total += iov[i].iov_len;
    unsigned char *b = malloc(total ? total : 1);
    if (!b) {
        errno = ENOMEM;
        return -1;
    }
    size_t o = 0;
    for (int i = 0; i < cnt; i++) {
        memcpy(b + o, iov[i].iov_base, iov[i].iov_len);
        o += iov[i].iov_len;
    }
    ssize_t rc = write(fd, b, total);
    free(b);
    return rc;
}

ssize_t pread(int fd, void *buf, size_t n, off_t off)
{
    init();
    return r_pread(fd, buf, n, off);
}

/* The WAL's own code is built with _FILE_OFFSET_BITS=64 and calls these. */
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off)
{
    return pwrite(fd, buf, n, off);
}

ssize_t pread64(int fd, void *buf, size_t n, off_t off)
{
    return pread(fd, buf, n, off);
}

static int do_sync(int fd, int data_only)
{
    init();
    if (fd >= 0 && fd < MAX_FD && tracked[fd]) {
        pthread_mutex_lock(&mu);
        tick(fd);
        flush_pending(fd);
        pthread_mutex_unlock(&mu);
    }
    return data_only ? r_fdatasync(fd) : r_fsync(fd);
}

int fsync(int fd)
{
    return do_sync(fd, 0);
}

int fdatasync(int fd)
{
    return do_sync(fd, 1);
}
