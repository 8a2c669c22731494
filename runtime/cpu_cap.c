/* LD_PRELOAD shim for the container: report at most $EMBCAP_CPU_CAP CPUs (default 4) to thread-pool sizing.
 *
 * The evaluator's sandbox counts threads against pids_limit=100. gRPC sizes its event-engine
 * pools from sysconf(_SC_NPROCESSORS_*) with no setting to cap them (32 threads in tritonserver
 * and 16 in the gateway on a 64-CPU host), so on a many-core GPU host the stack would need more
 * threads than the sandbox allows. Reporting fewer CPUs to those calls caps the pools; every
 * thread count this project sets itself (torch, ONNX Runtime, OpenMP) is explicit, and
 * sched_getaffinity is left alone. tests/test_threads.py measures the container's peak with it.
 * Build: gcc -shared -fPIC -O2 -o cpu_cap.so cpu_cap.c -ldl (the Dockerfile does).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/sysinfo.h>
#include <unistd.h>

static long cap(long real) {
    const char *value = getenv("EMBCAP_CPU_CAP");
    long limit = value ? atol(value) : 4;
    if (limit <= 0)
        return real;
    return real > 0 && real < limit ? real : limit;
}

long sysconf(int name) {
    static long (*real)(int) = NULL;
    if (!real)
        real = (long (*)(int))dlsym(RTLD_NEXT, "sysconf");
    long value = real(name);
    return name == _SC_NPROCESSORS_ONLN || name == _SC_NPROCESSORS_CONF ? cap(value) : value;
}

long __sysconf(int name) { return sysconf(name); }

int get_nprocs(void) {
    static int (*real)(void) = NULL;
    if (!real)
        real = (int (*)(void))dlsym(RTLD_NEXT, "get_nprocs");
    return (int)cap(real());
}

int get_nprocs_conf(void) {
    static int (*real)(void) = NULL;
    if (!real)
        real = (int (*)(void))dlsym(RTLD_NEXT, "get_nprocs_conf");
    return (int)cap(real());
}
