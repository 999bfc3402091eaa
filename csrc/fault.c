/*
 * Fault reports: when native code writes to a protected prmem page, print
 * which pool it hit before the process dies.
 *
 * The SIGSEGV handler only reads a fixed-size registry of chunk ranges (no
 * allocation, no locks: async-signal-safe), formats with its own integer
 * printing and write(2), then hands the signal on unchanged: to the previous
 * handler if there was one (e.g. faulthandler, which prints every thread's
 * traceback), otherwise it prints the Python tracebacks itself and lets the
 * default action kill the process by re-executing the faulting instruction.
 * Faults outside prmem memory go straight to the previous handler.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "prmem.h"

#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <ucontext.h>
#include <string.h>
#include <unistd.h>

#define MAX_RANGES 4096
#define NAME_LEN 64

typedef struct {
    volatile uintptr_t start, end; /* end == 0: free slot */
    PoolObject *volatile pool;     /* for the area lookup, best effort */
    volatile int mode;
    volatile int sealed;
    char name[NAME_LEN];
} fault_range;

static fault_range ranges[MAX_RANGES];
static pthread_mutex_t ranges_lock = PTHREAD_MUTEX_INITIALIZER;

static int report_enabled = 1;
static int handler_installed;
static struct sigaction previous_action;

typedef const char *(*dump_threads_fn)(int, PyInterpreterState *, PyThreadState *);
static dump_threads_fn dump_threads;

static const char *mode_names[PRMEM_NMODES] = {"RO", "WR", "AUTO_RO", "AUTO_WR", "START_WR"};

/* ------------------------------------------------------- the handler */

static void
put(const char *s)
{
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, s, n);
        if (w <= 0) {
            if (w < 0 && errno == EINTR)
                continue;
            return;
        }
        s += w;
        n -= (size_t)w;
    }
}

static void
put_hex(uintptr_t v)
{
    char buf[2 + 2 * sizeof(v) + 1];
    char *p = buf + sizeof(buf) - 1;
    *p = '\0';
    do {
        *--p = "0123456789abcdef"[v & 0xf];
        v >>= 4;
    } while (v);
    *--p = 'x';
    *--p = '0';
    put(p);
}

static fault_range *
find_range(uintptr_t addr)
{
    for (int i = 0; i < MAX_RANGES; i++) {
        if (ranges[i].end != 0 && ranges[i].start <= addr && addr < ranges[i].end)
            return &ranges[i];
    }
    return NULL;
}

/* 1 if the faulting access was a write, 0 a read, -1 unknown. */
static int
fault_was_write(void *context)
{
#if defined(__x86_64__) && defined(REG_ERR)
    /* bit 1 of the page-fault error code: the access was a write */
    ucontext_t *uc = (ucontext_t *)context;
    return (uc->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#else
    (void)context;
    return -1;
#endif
}

static void
report(fault_range *r, uintptr_t addr, int si_code, int is_write)
{
    /* The area tables are read without the pool lock: the process is about
     * to die, and a torn read only makes the state/offset "unknown". */
    const char *state = r->sealed ? "READ_ONLY" : "unknown";
    uintptr_t pool_offset = addr - r->start;
    int have_offset = 0;
    PoolObject *pool = r->pool;
    if (pool != NULL && pool->areas != NULL) {
        size_t n = pool->nareas;
        uintptr_t before = 0;
        for (size_t i = 0; i < n; i++) {
            prmem_area *a = &pool->areas[i];
            if ((uintptr_t)a->start <= addr && addr < (uintptr_t)a->start + a->size) {
                state = prmem_state_name(a->state);
                pool_offset = before + (addr - (uintptr_t)a->start);
                have_offset = 1;
                break;
            }
            before += a->size;
        }
    }
    if (si_code == SEGV_MAPERR)
        put("\nprmem: fatal access to prmem memory that is not mapped (unmapped by "
            "native code, or a prmem bug)\n");
    else if (is_write == 0)
        put("\nprmem: fatal read of inaccessible prmem memory\n");
    else
        put("\nprmem: fatal write to protected memory\n");
    put("prmem:   pool: '");
    put(r->name);
    put("'  mode: ");
    put(r->mode >= 0 && r->mode < PRMEM_NMODES ? mode_names[r->mode] : "?");
    put("  area state: ");
    put(state);
    put("\nprmem:   address: ");
    put_hex(addr);
    put(have_offset ? "  offset in pool: " : "  offset in chunk: ");
    put_hex(pool_offset);
    if (si_code == SEGV_ACCERR && is_write != 0)
        put("\nprmem: the write was stopped by the MMU; the data is intact. "
            "Python traceback of the writer follows.\n\n");
    else
        put("\nprmem: Python traceback follows.\n\n");
}

static void
set_default(int sig)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
}

static volatile sig_atomic_t in_handler;

static void
segv_handler(int sig, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    if (in_handler) {
        /* Re-entered, e.g. by faulthandler's raise() after it dumped the
         * tracebacks: let the default action end the process. */
        set_default(sig);
        errno = saved_errno;
        return;
    }
    in_handler = 1;
    fault_range *r = info->si_code > 0 ? find_range((uintptr_t)info->si_addr) : NULL;
    int prev_is_handler = (previous_action.sa_flags & SA_SIGINFO)
                              ? previous_action.sa_sigaction != NULL
                              : (previous_action.sa_handler != SIG_DFL &&
                                 previous_action.sa_handler != SIG_IGN);
    if (r != NULL) {
        report(r, (uintptr_t)info->si_addr, info->si_code, fault_was_write(context));
        if (!prev_is_handler && dump_threads != NULL) {
            const char *err = dump_threads(STDERR_FILENO, NULL, NULL);
            if (err != NULL) {
                put(err);
                put("\n");
            }
        }
    }
    if (prev_is_handler) {
        /* Hand over exactly as the kernel would have. */
        if (previous_action.sa_flags & SA_SIGINFO)
            previous_action.sa_sigaction(sig, info, context);
        else
            previous_action.sa_handler(sig);
    }
    else {
        /* Default action: restore it and return; the faulting instruction
         * runs again and the kernel kills the process with SIGSEGV. */
        set_default(sig);
    }
    in_handler = 0;
    errno = saved_errno;
}

/* ------------------------------------------------ install / registry */

static int
handler_on_top(void)
{
    struct sigaction current;
    return sigaction(SIGSEGV, NULL, &current) == 0 && (current.sa_flags & SA_SIGINFO) &&
           current.sa_sigaction == segv_handler;
}

/* Install the handler, or put it back on top if another handler (say
 * faulthandler, enabled later) was installed over it: the report needs the
 * fault's siginfo, which only the first handler sees. */
static int
install_locked(void)
{
    if (!report_enabled || (handler_installed && handler_on_top()))
        return 0;
    if (dump_threads == NULL)
        dump_threads = (dump_threads_fn)dlsym(RTLD_DEFAULT, "_Py_DumpTracebackThreads");
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = segv_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &previous_action) < 0)
        return -1;
    handler_installed = 1;
    return 0;
}

static void
uninstall_locked(void)
{
    if (!handler_installed)
        return;
    /* Only restore if nobody installed a handler on top of ours since. */
    if (handler_on_top())
        sigaction(SIGSEGV, &previous_action, NULL);
    handler_installed = 0;
}

PRMEM_INTERNAL void
prmem_fault_register(PoolObject *pool, char *start, size_t size)
{
    const char *name = PyUnicode_AsUTF8(pool->name);
    pthread_mutex_lock(&ranges_lock);
    for (int i = 0; i < MAX_RANGES; i++) {
        if (ranges[i].end != 0)
            continue;
        fault_range *r = &ranges[i];
        r->start = (uintptr_t)start;
        r->pool = pool;
        r->mode = pool->mode;
        r->sealed = 0;
        if (name == NULL) {
            PyErr_Clear();
            name = "?";
        }
        strncpy(r->name, name, NAME_LEN - 1);
        r->name[NAME_LEN - 1] = '\0';
        __atomic_store_n(&r->end, (uintptr_t)start + size, __ATOMIC_RELEASE);
        break;
    }
    pthread_mutex_unlock(&ranges_lock);
}

static void
for_range(char *start, void (*fn)(fault_range *))
{
    pthread_mutex_lock(&ranges_lock);
    for (int i = 0; i < MAX_RANGES; i++) {
        if (ranges[i].end != 0 && ranges[i].start == (uintptr_t)start)
            fn(&ranges[i]);
    }
    pthread_mutex_unlock(&ranges_lock);
}

static void
mark_sealed(fault_range *r)
{
    r->sealed = 1;
}

static void
orphan(fault_range *r)
{
    r->pool = NULL; /* the range stays: mseal()ed memory outlives its pool */
}

static void
release_range(fault_range *r)
{
    __atomic_store_n(&r->end, (uintptr_t)0, __ATOMIC_RELEASE);
    r->pool = NULL;
}

/* The chunk at start is sealed and now only `size` bytes long (its tail was
 * unmapped and may be reused by other mappings). */
PRMEM_INTERNAL void
prmem_fault_sealed(char *start, size_t size)
{
    pthread_mutex_lock(&ranges_lock);
    for (int i = 0; i < MAX_RANGES; i++) {
        if (ranges[i].end != 0 && ranges[i].start == (uintptr_t)start) {
            mark_sealed(&ranges[i]);
            __atomic_store_n(&ranges[i].end, (uintptr_t)start + size, __ATOMIC_RELEASE);
        }
    }
    pthread_mutex_unlock(&ranges_lock);
}

PRMEM_INTERNAL void
prmem_fault_orphan(char *start)
{
    for_range(start, orphan);
}

PRMEM_INTERNAL void
prmem_fault_unregister(char *start)
{
    for_range(start, release_range);
}

/* Called whenever memory becomes protected: the report is on by default
 * from the first protected area on. */
PRMEM_INTERNAL void
prmem_fault_protected(void)
{
    if (!report_enabled)
        return;
    pthread_mutex_lock(&ranges_lock);
    install_locked();
    pthread_mutex_unlock(&ranges_lock);
}

/* prmem._core.fault_report(enabled=None) -> bool: query or switch. */
PRMEM_INTERNAL PyObject *
prmem_fault_report(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "fault_report() takes at most 1 argument");
        return NULL;
    }
    int previous = report_enabled;
    if (nargs == 1 && args[0] != Py_None) {
        int on = PyObject_IsTrue(args[0]);
        if (on < 0)
            return NULL;
        pthread_mutex_lock(&ranges_lock);
        report_enabled = on;
        int any = 0;
        for (int i = 0; i < MAX_RANGES && !any; i++)
            any = ranges[i].end != 0;
        int rc = 0;
        if (!on)
            uninstall_locked();
        else if (any)
            rc = install_locked();
        pthread_mutex_unlock(&ranges_lock);
        if (rc < 0)
            return prmem_set_oserror("sigaction", errno), NULL;
    }
    return PyBool_FromLong(previous);
}
