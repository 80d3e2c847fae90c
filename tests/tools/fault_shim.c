/*
 * fault_shim.c - LD_PRELOAD fault injection for the integration tests: a
 * failing disk under arqd. While the file named by ARQ_FAULT_FILE exists,
 * fsync and fdatasync of the WAL's files (data.mdb, journal, journal.1)
 * fail with EIO without syncing, as a device that lost the writes reports
 * it. Everything else passes through. Tests only; never linked into
 * programs.
 */
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int (*real_fsync)(int);
static int (*real_fdatasync)(int);

static void load(void *fnptr_addr, const char *name)
{
    void *p = dlsym(RTLD_NEXT, name);
    memcpy(fnptr_addr, &p, sizeof(p)); /* function pointers from dlsym, as POSIX says */
}

static int is_wal_file(int fd)
{
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof(path) - 1);
    if (n <= 0)
        return 0;
    path[n] = 0;
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    return strcmp(base, "data.mdb") == 0 || strcmp(base, "journal") == 0 ||
           strcmp(base, "journal.1") == 0;
}

static int failing(int fd)
{
    const char *trigger = getenv("ARQ_FAULT_FILE");
    return trigger && *trigger && access(trigger, F_OK) == 0 && is_wal_file(fd);
}

int fsync(int fd)
{
    if (!real_fsync)
        load((void *)&real_fsync, "fsync");
    if (failing(fd)) {
        errno = EIO;
        return -1;
    }
    return real_fsync(fd);
}

int fdatasync(int fd)
{
    if (!real_fdatasync)
        load((void *)&real_fdatasync, "fdatasync");
    if (failing(fd)) {
        errno = EIO;
        return -1;
    }
    return real_fdatasync(fd);
}
