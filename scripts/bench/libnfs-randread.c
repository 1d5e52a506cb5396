/* libnfs-randread: the libnfs peer for 4 KiB random reads (QD1 per job).
 * Usage: libnfs-randread SERVER EXPORT PATH SECONDS JOBS
 * Each job is a thread with its own nfs_context (its own TCP connection)
 * doing synchronous 4 KiB nfs_pread at random aligned offsets. Prints IOPS. */
#include <sys/time.h>
#include <nfsc/libnfs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <fcntl.h>

static const char *server, *export_, *path;
static double seconds;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *job(void *arg) {
    long *ops = arg;
    struct nfs_context *nfs = nfs_init_context();
    struct nfsfh *fh;
    struct nfs_stat_64 st;
    char buf[4096];
    if (!nfs || nfs_mount(nfs, server, export_) || nfs_open(nfs, path, O_RDONLY, &fh) || nfs_fstat64(nfs, fh, &st)) {
        fprintf(stderr, "libnfs-randread: %s\n", nfs ? nfs_get_error(nfs) : "no context");
        exit(1);
    }
    uint64_t blocks = st.nfs_size / 4096;
    unsigned seed = (unsigned)(uintptr_t)ops ^ (unsigned)time(NULL);
    double end = now() + seconds;
    long n = 0;
    while (now() < end) {
        uint64_t b = (((uint64_t)rand_r(&seed) << 31) ^ rand_r(&seed)) % blocks;
        if (nfs_pread(nfs, fh, b * 4096, 4096, buf) != 4096) {
            fprintf(stderr, "libnfs-randread: short read: %s\n", nfs_get_error(nfs));
            exit(1);
        }
        n++;
    }
    *ops = n;
    nfs_close(nfs, fh);
    nfs_destroy_context(nfs);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s SERVER EXPORT PATH SECONDS JOBS\n", argv[0]);
        return 2;
    }
    server = argv[1];
    export_ = argv[2];
    path = argv[3];
    seconds = atof(argv[4]);
    int jobs = atoi(argv[5]);
    pthread_t t[64];
    long ops[64] = {0};
    if (jobs < 1 || jobs > 64) return 2;
    for (int i = 0; i < jobs; i++) pthread_create(&t[i], NULL, job, &ops[i]);
    long total = 0;
    for (int i = 0; i < jobs; i++) {
        pthread_join(t[i], NULL);
        total += ops[i];
    }
    printf("%.0f\n", total / seconds);
    return 0;
}
