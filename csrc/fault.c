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
static volatile int install_wanted;
static struct sigaction previous_action;    /* the handler below ours */
/* Where faults outside prmem memory go: the previous handler, or, when
 * prmem enabled faulthandler beneath itself, what was there before that. */
static struct sigaction passthrough_action;
static int own_faulthandler;
static int tracebacks_prepared;

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

static int
is_handler(const struct sigaction *a)
{
    return (a->sa_flags & SA_SIGINFO) ? a->sa_sigaction != NULL
                                       : (a->sa_handler != SIG_DFL && a->sa_handler != SIG_IGN);
}

/* Pass the signal on as the kernel would have delivered it to `a`. */
static void
hand_over(const struct sigaction *a, int sig, siginfo_t *info, void *context)
{
    if (!is_handler(a)) {
        /* Default action: restore it and return; the faulting instruction
         * runs again and the kernel kills the process with SIGSEGV. */
        set_default(sig);
    }
    else if (a->sa_flags & SA_SIGINFO)
        a->sa_sigaction(sig, info, context);
    else
        a->sa_handler(sig);
}

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
    if (r != NULL) {
        report(r, (uintptr_t)info->si_addr, info->si_code, fault_was_write(context));
        /* Tracebacks: faulthandler below us prints every thread's; else
         * CPython's own dumper where it exports one. */
        if (!is_handler(&previous_action) && dump_threads != NULL) {
            const char *err = dump_threads(STDERR_FILENO, NULL, NULL);
            if (err != NULL) {
                put(err);
                put("\n");
            }
        }
        hand_over(&previous_action, sig, info, context);
    }
    else {
        hand_over(&passthrough_action, sig, info, context);
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
/*
 * Make sure a prmem fault can be followed by Python tracebacks.  CPython
 * 3.11 exports the async-signal-safe dumper faulthandler uses; other
 * versions keep it internal, so there prmem enables faulthandler beneath
 * its own handler (once, if the program has not) and chains to it.  Only
 * SIGSEGV is meant: the other signals faulthandler takes get their
 * previous handlers back, and SIGSEGVs outside prmem memory skip
 * faulthandler and go where they went before.  Called with the GIL held
 * and no prmem lock held, since it calls into Python.
 */
static void
prepare_tracebacks(void)
{
    if (tracebacks_prepared)
        return;
    tracebacks_prepared = 1;
    dump_threads = (dump_threads_fn)dlsym(RTLD_DEFAULT, "_Py_DumpTracebackThreads");
    if (dump_threads != NULL)
        return;
    static const int others[] = {SIGABRT, SIGBUS, SIGILL, SIGFPE};
    struct sigaction saved[4], before;
    if (sigaction(SIGSEGV, NULL, &before) < 0)
        return;
    for (int i = 0; i < 4; i++)
        sigaction(others[i], NULL, &saved[i]);
    PyObject *fh = PyImport_ImportModule("faulthandler");
    PyObject *on = fh ? PyObject_CallMethod(fh, "is_enabled", NULL) : NULL;
    if (on == Py_False) {
        PyObject *enable = PyObject_GetAttrString(fh, "enable");
        PyObject *args = PyTuple_New(0);
        PyObject *kwargs = Py_BuildValue("{s:O}", "all_threads", Py_True);
        PyObject *res = (enable && args && kwargs) ? PyObject_Call(enable, args, kwargs) : NULL;
        if (res != NULL) {
            own_faulthandler = 1;
            passthrough_action = before;
            for (int i = 0; i < 4; i++)
                sigaction(others[i], &saved[i], NULL);
        }
        Py_XDECREF(res);
        Py_XDECREF(kwargs);
        Py_XDECREF(args);
        Py_XDECREF(enable);
    }
    Py_XDECREF(on);
    Py_XDECREF(fh);
    PyErr_Clear(); /* best effort: without it the report just has no traceback */
}

static int
install_locked(void)
{
    if (!report_enabled || (handler_installed && handler_on_top()))
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = segv_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &previous_action) < 0)
        return -1;
    if (!own_faulthandler)
        passthrough_action = previous_action;
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

PRMEM_INTERNAL int
prmem_fault_register(PoolObject *pool, char *start, size_t size)
{
    int rc = -1;
    const char *name = pool->cname;
    pthread_mutex_lock(&ranges_lock);
    for (int i = 0; i < MAX_RANGES; i++) {
        if (ranges[i].end != 0)
            continue;
        fault_range *r = &ranges[i];
        r->start = (uintptr_t)start;
        r->pool = pool;
        r->mode = pool->mode;
        r->sealed = 0;
        strncpy(r->name, name, NAME_LEN - 1);
        r->name[NAME_LEN - 1] = '\0';
        __atomic_store_n(&r->end, (uintptr_t)start + size, __ATOMIC_RELEASE);
        rc = 0;
        break;
    }
    pthread_mutex_unlock(&ranges_lock);
    return rc;
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
    /* With PRMEM_ENFORCE=0 nothing is ever protected: nothing to report. */
    if (report_enabled && prmem_enforce)
        install_wanted = 1; /* done by prmem_fault_sync(), outside the pool lock */
}

/* Install the handler if a protection event asked for it.  Called by the
 * Pool methods after they release the pool lock, with the GIL held. */
PRMEM_INTERNAL void
prmem_fault_sync(void)
{
    if (!install_wanted)
        return;
    install_wanted = 0;
    if (!report_enabled)
        return;
    prepare_tracebacks();
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
        if (on)
            prepare_tracebacks();
        pthread_mutex_lock(&ranges_lock);
        report_enabled = on;
        int any = 0;
        for (int i = 0; i < MAX_RANGES && !any; i++)
            any = ranges[i].end != 0;
        int rc = 0;
        int drop_faulthandler = 0;
        if (!on) {
            uninstall_locked();
            drop_faulthandler = own_faulthandler;
            own_faulthandler = 0;
        }
        else if (any)
            rc = install_locked();
        pthread_mutex_unlock(&ranges_lock);
        if (drop_faulthandler) {
            /* undo what prepare_tracebacks() did for us (outside the lock:
             * this calls into Python) */
            tracebacks_prepared = 0;
            PyObject *fh = PyImport_ImportModule("faulthandler");
            PyObject *res = fh ? PyObject_CallMethod(fh, "disable", NULL) : NULL;
            Py_XDECREF(res);
            Py_XDECREF(fh);
            PyErr_Clear();
        }
        if (rc < 0)
            return prmem_set_oserror("sigaction", errno), NULL;
    }
    return PyBool_FromLong(previous);
}
