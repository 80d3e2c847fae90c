/*
 * fuzz/main.c - replay driver for fuzz targets in builds without libFuzzer.
 *
 * Every fuzz target (fuzz/<name>.c) defines only LLVMFuzzerTestOneInput. In a
 * normal build (meson option fuzzing=false) each target is linked with this
 * file, so the committed corpus, including past crashers, runs as an
 * ordinary test under gcc, valgrind or the sanitizers (the idea of BIND 9's
 * fuzz/main.c).
 *
 * usage: <target> PATH...
 *   A PATH that is a directory contributes every regular file directly in it
 *   (not recursive), in sorted order; a PATH that is a file is used as is.
 *   Prints "N inputs replayed" and exits 0. Exits 1 with a message on stderr
 *   if a directory cannot be read or holds no regular file, or if an input
 *   cannot be read (a corpus that silently replays nothing tests nothing).
 *
 * Each input is copied into a heap buffer of exactly its size, so a target
 * that reads past the end is caught by AddressSanitizer as under libFuzzer.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* Optional hook, as in libFuzzer: a target may define it to set itself up. */
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

/* Upper bound on one input; libFuzzer's default -max_len is far smaller, so
 * anything bigger is a mistake in the corpus, not a test case. */
#define REPLAY_MAX_INPUT (64u * 1024u * 1024u)

/* Read the whole of path into a fresh malloc'd buffer of exactly its size.
 * Returns 0 and sets *ret_buf (caller frees; NULL for an empty file) and
 * *ret_len, or -1 after printing why. */
static int read_input(const char *path, uint8_t **ret_buf, size_t *ret_len)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0) {
        fprintf(stderr, "replay: cannot open '%s': %s\n", path, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) != 0) {
        fprintf(stderr, "replay: cannot stat '%s': %s\n", path, strerror(errno));
        goto fail;
    }
    if (st.st_size < 0 || (uintmax_t)st.st_size > REPLAY_MAX_INPUT) {
        fprintf(stderr, "replay: '%s' is larger than %u bytes\n", path, REPLAY_MAX_INPUT);
        goto fail;
    }
    len = (size_t)st.st_size;
    if (len > 0) {
        buf = malloc(len);
        if (buf == NULL) {
            fprintf(stderr, "replay: out of memory reading '%s'\n", path);
            goto fail;
        }
        for (size_t got = 0; got < len;) {
            ssize_t n = read(fd, buf + got, len - got);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                fprintf(stderr, "replay: cannot read '%s': %s\n", path,
                        n < 0 ? strerror(errno) : "file shrank while reading");
                goto fail;
            }
            got += (size_t)n;
        }
    }
    (void)close(fd);
    *ret_buf = buf;
    *ret_len = len;
    return 0;

fail:
    free(buf);
    (void)close(fd);
    return -1;
}

static int replay_file(const char *path, unsigned long *count)
{
    uint8_t *buf;
    size_t len;

    if (read_input(path, &buf, &len) != 0)
        return -1;
    /* libFuzzer never passes NULL, even for an empty input. */
    static const uint8_t empty[1];
    (void)LLVMFuzzerTestOneInput(buf != NULL ? buf : empty, len);
    free(buf);
    (*count)++;
    return 0;
}

static int not_dot_or_dotdot(const struct dirent *de)
{
    return strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0;
}

static int replay_dir(const char *dir, unsigned long *count)
{
    struct dirent **names = NULL;
    unsigned long files = 0;
    int rc = 0;
    int n = scandir(dir, &names, not_dot_or_dotdot, alphasort);

    if (n < 0) {
        fprintf(stderr, "replay: cannot read directory '%s': %s\n", dir, strerror(errno));
        return -1;
    }
    for (int i = 0; i < n; i++) {
        char path[PATH_MAX];
        struct stat st;
        int len = snprintf(path, sizeof(path), "%s/%s", dir, names[i]->d_name);

        if (rc == 0) {
            if (len < 0 || (size_t)len >= sizeof(path)) {
                fprintf(stderr, "replay: path too long in '%s'\n", dir);
                rc = -1;
            } else if (stat(path, &st) != 0) {
                fprintf(stderr, "replay: cannot stat '%s': %s\n", path, strerror(errno));
                rc = -1;
            } else if (S_ISREG(st.st_mode)) {
                if (replay_file(path, count) != 0)
                    rc = -1;
                else
                    files++;
            }
        }
        free(names[i]);
    }
    free(names);
    if (rc == 0 && files == 0) {
        fprintf(stderr, "replay: directory '%s' holds no input files\n", dir);
        rc = -1;
    }
    return rc;
}

int main(int argc, char **argv)
{
    unsigned long count = 0;

    if (argc < 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR_OR_FILE...\n", argv[0]);
        return 2;
    }
    if (LLVMFuzzerInitialize != NULL)
        (void)LLVMFuzzerInitialize(&argc, &argv);

    for (int i = 1; i < argc; i++) {
        struct stat st;
        int rc;

        if (stat(argv[i], &st) != 0) {
            fprintf(stderr, "replay: cannot access '%s': %s\n", argv[i], strerror(errno));
            return 1;
        }
        rc = S_ISDIR(st.st_mode) ? replay_dir(argv[i], &count) : replay_file(argv[i], &count);
        if (rc != 0)
            return 1;
    }
    printf("%lu inputs replayed\n", count);
    return 0;
}
