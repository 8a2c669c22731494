/* LD_PRELOAD shim: pretend the machine has $EMBCAP_FAKE_CPUS CPUs (default 64).
 *
 * Thread pools (gRPC, OpenMP, ONNX Runtime, torch, asyncio, Rust's
 * available_parallelism) size themselves from one of these calls, so a process
 * tree started with this shim preloaded shows the thread count it would have on a
 * many-core host. Build: gcc -shared -fPIC -O2 -o fake_cpus.so fake_cpus.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sysinfo.h>
#include <unistd.h>

static int fake_cpus(void) {
    const char *value = getenv("EMBCAP_FAKE_CPUS");
    int n = value ? atoi(value) : 64;
    return n > 0 && n <= CPU_SETSIZE ? n : 64;
}

long sysconf(int name) {
    static long (*real)(int) = NULL;
    if (name == _SC_NPROCESSORS_ONLN || name == _SC_NPROCESSORS_CONF)
        return fake_cpus();
    if (!real)
        real = (long (*)(int))dlsym(RTLD_NEXT, "sysconf");
    return real(name);
}

long __sysconf(int name) { return sysconf(name); }

int get_nprocs(void) { return fake_cpus(); }

int get_nprocs_conf(void) { return fake_cpus(); }

static int fill_mask(size_t size, cpu_set_t *mask) {
    int n = fake_cpus();
    if (size * 8 < (size_t)n)
        n = (int)(size * 8);
    memset(mask, 0, size);
    for (int cpu = 0; cpu < n; cpu++)
        CPU_SET_S(cpu, size, mask);
    return 0;
}

int sched_getaffinity(pid_t pid, size_t size, cpu_set_t *mask) {
    (void)pid;
    return fill_mask(size, mask);
}

int pthread_getaffinity_np(pthread_t thread, size_t size, cpu_set_t *mask) {
    (void)thread;
    return fill_mask(size, mask);
}
