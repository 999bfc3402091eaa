/*
 * Fault reports: when native code writes to a protected prmem page, print
 * which pool it hit before the process dies.
 *
 * The SIGSEGV handler only reads the registry of chunk ranges below (no
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
#include <stdlib.h>
#include <ucontext.h>
#include <string.h>
#include <unistd.h>

#define NAME_LEN 64
#define LEAF_MAX 64 /* ranges per leaf of the index */

/*
 * The registry.  One fault_range per chunk, holding a copy of all the
 * report needs, so it outlives the pool: the ranges of mseal()ed chunks
 * stay for the life of the process (the memory can never be unmapped),
 * marked destroyed once their pool is.  Such a range costs
 * about 120 bytes here, against at least one page and one VMA of memory
 * the process can never get back; nothing limits how many there are.
 * Ranges of chunks that are unmapped are taken out and freed.
 *
 * The index is a two-level sorted array: leaves of up to LEAF_MAX range
 * pointers sorted by start, and a top array of the leaves in order.  Live
 * ranges never overlap (they are mappings that exist at the same time), so
 * a lookup is two binary searches.  The index is never changed once
 * published: a writer (holding ranges_lock) builds a new top array and the
 * one or two new leaves, and publishes them by switching the root block's
 * selector to the slot that holds the new top array (see "Where it lives"
 * below); the old top array and leaves, and a removed range, are retired.  A
 * change copies at most three leaves plus the top array (a leaf that
 * splits leaves two half-full ones, and a leaf that shrinks is merged with
 * a neighbour when together they fit in half a leaf), not every range.
 *
 * Ranges are changed in place only in ways a concurrent reader may see
 * either side of: `end` shrinks when a sealed chunk's tail is unmapped,
 * `sealed` and `destroyed` go 0 -> 1.  Each is one word or
 * byte, written with META_SET (torn values are covered below).
 *
 * Freeing what a handler may still read.  The handler does
 *     (I) fetch_add(&handlers_in_flight, 1)  (L) load(&root->which)
 *     ... reads the index and ranges ...      (D) fetch_sub(&handlers_in_flight, 1)
 * and a writer, after building and retiring, does
 *     (W) root->which = slot of new           (R) load(&handlers_in_flight)
 * (W is a one-byte pwrite() of the metadata file between two seq_cst
 * fences, which the argument below takes as a seq_cst store: a byte
 * cannot tear, and the fences order it with I, L and R)
 * and frees everything retired so far only if R reads 0; otherwise it
 * keeps it on the retired list for a later writer.  All five are
 * sequentially consistent, so they fall in one total order S that agrees
 * with each thread's program order and with the counter's modification
 * order.  Take a handler H and a block retired before W:
 *   - if R reads a counter value from before H's I, then R precedes I in
 *     S, so W < R < I < L: L sees the index published by W or a later
 *     one, none of which can reach the block.  H never sees it.
 *   - otherwise R reads the value of a modification M at or after I.  It
 *     reads 0, and each handler adds 1 at I and takes it back at D, so
 *     H's D is at or before M; the counter is only changed by RMWs, so M
 *     is in the release sequence headed by D and R synchronizes with D.
 *     H's reads come before its D: they happen before the free.
 * The leaves and ranges a handler reaches were written before the W that
 * published them, and L, a seq_cst load, acquires them.
 * A handler that never gets to D (the process dies, or a handler below us
 * longjmp()s out; D comes before handing the signal on, so only a crash
 * inside our own reporting) only keeps the count up: later retired blocks
 * are then leaked, never freed early.  The handler counts itself in before
 * it loads the index and out after its last read of it, and uses nothing
 * but atomic loads, lock-free RMWs and reads of immutable memory.
 */
/*
 * Where it lives.  Every block of the registry -- ranges, leaves, index
 * arrays, and the root block the handler starts from -- is prmem metadata
 * (meta.c): allocated with prmem_meta_alloc(), mapped read-only, written
 * only with prmem_meta_write() (pwrite on the metadata file), freed with
 * prmem_meta_free().  A stray native store into the registry faults like
 * one into a pool record.  The root's offset is in the metadata header, so
 * the handler follows no pointer kept in ordinary memory.
 *
 * A pwrite() is not one atomic store: the kernel copies the bytes, and a
 * reader running at the same time may in principle see a multi-byte value
 * half written.  So:
 *   - the published index pointer is never rewritten while a handler may
 *     read it: the root holds two slots and a one-byte selector (a byte
 *     cannot tear).  A writer fills the slot not selected, then flips the
 *     selector; a slot is refilled only after a load of handlers_in_flight
 *     read 0 after the flip that deselected it (the argument below, with
 *     "block" read as "slot").  If a handler is still counted in (one
 *     stuck, or crashed inside our report), the writer goes on anyway and
 *     the next point covers it;
 *   - the handler checks every pointer before it reads through it: the
 *     block must lie inside the metadata range (always mapped, readable),
 *     start with a header naming itself and carry the right magic, and
 *     counts must fit the block.  A torn or stale value can only make the
 *     report wrong or missing, never make the handler fault;
 *   - the pool behind a range is named by its metadata record and serial,
 *     not a PoolObject pointer: the handler reads only metadata.
 * Fields changed in place (`end`, `sealed`, `destroyed`) are single words
 * or bytes written with META_SET; a torn `end` is checked like the rest.
 */
typedef struct blk {
    struct blk *next;            /* retired list link */
    const void *self;            /* the block's own address */
    uint64_t magic;
    size_t size;                 /* as allocated */
} blk;

#define RANGE_MAGIC 0x65676e61726d7270ULL /* "prmrange" */
#define LEAF_MAGIC 0x6661656c6d727270ULL
#define INDEX_MAGIC 0x78646e696d727270ULL
#define ROOT_MAGIC 0x746f6f726d727270ULL

typedef struct {
    blk h;
    uintptr_t start;             /* fixed */
    uintptr_t end;               /* only shrinks */
    const prmem_pool_meta *m;    /* the pool's record, valid while its serial */
    unsigned long long serial;   /* matches (the record may be reused) */
    int mode;                    /* fixed */
    uint8_t sealed;              /* 0 -> 1 */
    uint8_t destroyed;           /* 0 -> 1 */
    char name[NAME_LEN];         /* fixed, NUL-terminated */
} fault_range;

typedef struct {
    blk h;
    size_t n;                    /* 1..LEAF_MAX */
    const fault_range *r[LEAF_MAX]; /* sorted by start */
} range_leaf;

typedef struct range_index {
    blk h;
    size_t nleaves;
    const range_leaf *leaves[];  /* sorted; every leaf has n >= 1 */
} range_index;

typedef struct {
    blk h;
    const range_index *slot[2];  /* NULL: no ranges */
    uint8_t which;               /* the published slot */
    blk *retired;                /* retired blocks, to free (ranges_lock) */
} fault_root;

static int handlers_in_flight;   /* atomic */
static int slot_in_use[2];       /* ranges_lock: a handler may read the slot */
/* ranges marked empty in place because removing them failed for lack of
 * memory; they are purged before any range is added (ranges_lock) */
static int need_purge;
static pthread_mutex_t ranges_lock = PTHREAD_MUTEX_INITIALIZER;

/* The block at p, if it is one of the registry's with this magic and at
 * least n bytes; otherwise NULL.  Async-signal-safe: reads only the
 * metadata range, after checking that p lies in it. */
static const void *
checked(const void *p, size_t n, uint64_t magic)
{
    const blk *b = p;
    if (((uintptr_t)p & 7) != 0 || !prmem_meta_contains(p, sizeof(blk)))
        return NULL;
    size_t size = b->size;
    if (b->self != p || b->magic != magic || size < n || !prmem_meta_contains(p, size))
        return NULL;
    return p;
}

static const fault_root *
root_block(void)
{
    return checked(prmem_meta_fault_root(0), sizeof(fault_root), ROOT_MAGIC);
}

static const range_index *
current_index(void)
{
    const fault_root *root = root_block();
    if (root == NULL)
        return NULL;
    uint8_t w = __atomic_load_n(&root->which, __ATOMIC_SEQ_CST) & 1;
    const range_index *ix = __atomic_load_n(&root->slot[w], __ATOMIC_RELAXED);
    ix = checked(ix, sizeof(range_index), INDEX_MAGIC);
    if (ix != NULL && ix->nleaves > (ix->h.size - sizeof(range_index)) / sizeof(ix->leaves[0]))
        return NULL;
    return ix;
}

static const range_leaf *
leaf_at(const range_index *ix, size_t i)
{
    const range_leaf *leaf = checked(ix->leaves[i], sizeof(range_leaf), LEAF_MAGIC);
    return leaf != NULL && leaf->n >= 1 && leaf->n <= LEAF_MAX ? leaf : NULL;
}

static const fault_range *
range_at(const range_leaf *leaf, size_t i)
{
    return checked(leaf->r[i], sizeof(fault_range), RANGE_MAGIC);
}

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

/* Number of ranges of leaf whose start is <= addr (they are sorted);
 * *bad set if a block does not check out. */
static size_t
count_at_or_below(const range_leaf *leaf, uintptr_t addr, int *bad)
{
    size_t lo = 0, hi = leaf->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const fault_range *r = range_at(leaf, mid);
        if (r == NULL) {
            *bad = 1;
            return 0;
        }
        if (r->start <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Number of leaves whose first range starts at or below addr. */
static size_t
leaves_at_or_below(const range_index *ix, uintptr_t addr, int *bad)
{
    size_t lo = 0, hi = ix->nleaves;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const range_leaf *leaf = leaf_at(ix, mid);
        const fault_range *r = leaf != NULL ? range_at(leaf, 0) : NULL;
        if (r == NULL) {
            *bad = 1;
            return 0;
        }
        if (r->start <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* The range containing addr, in O(log n); async-signal-safe. */
static const fault_range *
find_range(const range_index *ix, uintptr_t addr)
{
    int bad = 0;
    size_t li = ix != NULL ? leaves_at_or_below(ix, addr, &bad) : 0;
    if (li == 0 || bad)
        return NULL;
    const range_leaf *leaf = leaf_at(ix, li - 1);
    size_t k = leaf != NULL ? count_at_or_below(leaf, addr, &bad) : 0;
    const fault_range *r = k > 0 && !bad ? range_at(leaf, k - 1) : NULL;
    return r != NULL && addr < __atomic_load_n(&r->end, __ATOMIC_RELAXED) ? r : NULL;
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
report(const fault_range *r, uintptr_t addr, int si_code, int is_write)
{
    /* The area tables are read without the pool lock: the process is about
     * to die, and a torn read only makes the state/offset "unknown".  Only
     * metadata is read, each pointer checked to lie in it first. */
    const char *state = __atomic_load_n(&r->sealed, __ATOMIC_RELAXED) ? "READ_ONLY" : "unknown";
    uintptr_t pool_offset = addr - r->start;
    int have_offset = 0;
    const prmem_pool_meta *m = __atomic_load_n(&r->m, __ATOMIC_RELAXED);
    int alive = !__atomic_load_n(&r->destroyed, __ATOMIC_RELAXED) && prmem_meta_is_record(m) &&
                m->serial == r->serial && !m->destroyed;
    const prmem_pool_meta *pool = alive ? m : NULL;
    const prmem_area *areas = pool != NULL ? pool->areas : NULL;
    size_t n = pool != NULL ? pool->nareas : 0;
    if (areas != NULL && n <= PRMEM_META_RESERVE / sizeof(*areas) &&
        prmem_meta_contains(areas, n * sizeof(*areas))) {
        uintptr_t before = 0;
        for (size_t i = 0; i < n; i++) {
            const prmem_area *a = &areas[i];
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
    else if (is_write == 0 && pool != NULL && __atomic_load_n(&pool->noaccess, __ATOMIC_RELAXED))
        put("\nprmem: fatal read of no-access memory (outside `with pool.access():`)\n");
    else if (is_write == 0)
        put("\nprmem: fatal read of inaccessible prmem memory\n");
    else
        put("\nprmem: fatal write to protected memory\n");
    put("prmem:   pool: '");
    put(r->name);
    put(pool == NULL ? "' (destroyed)  mode: " : "'  mode: ");
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

/* Per thread (two threads may fault at once), initial-exec so that reading
 * it never allocates in the handler.  Cleared before the signal goes to a
 * handler that is not prmem's: one that recovers with siglongjmp() must
 * not leave it set, or every later SIGSEGV would kill the process. */
static __thread volatile sig_atomic_t in_handler __attribute__((tls_model("initial-exec")));

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
    /* I and L, then D once the registry is no longer read (see above) */
    __atomic_fetch_add(&handlers_in_flight, 1, __ATOMIC_SEQ_CST);
    const range_index *ix = current_index();
    const fault_range *r = info->si_code > 0 ? find_range(ix, (uintptr_t)info->si_addr) : NULL;
    if (r != NULL)
        report(r, (uintptr_t)info->si_addr, info->si_code, fault_was_write(context));
    __atomic_fetch_sub(&handlers_in_flight, 1, __ATOMIC_SEQ_CST);
    if (r != NULL) {
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
        in_handler = 0;
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

/* The static functions from here on run with ranges_lock held. */

/* A new registry block of size bytes holding tmpl (whose header is filled
 * in here), or NULL (out of metadata memory). */
static void *
new_block(const void *tmpl, size_t size, uint64_t magic)
{
    blk *b = prmem_meta_alloc(size);
    if (b == NULL)
        return NULL;
    blk h = {NULL, b, magic, size};
    prmem_meta_write(b, &h, sizeof(h));
    if (size > sizeof(h))
        prmem_meta_write((char *)b + sizeof(h), (const char *)tmpl + sizeof(h), size - sizeof(h));
    return b;
}

static void
free_block(const void *p)
{
    const blk *b = p;
    prmem_meta_free((void *)b, b->size);
}

static fault_root *
get_root(void)
{
    fault_root *root = prmem_meta_fault_root(sizeof(fault_root));
    if (root != NULL && root->h.magic != ROOT_MAGIC) {
        blk h = {NULL, root, ROOT_MAGIC, sizeof(fault_root)};
        prmem_meta_write(root, &h, sizeof(h));
    }
    return root;
}

static const range_index *
index_now(void)
{
    const fault_root *root = root_block();
    return root != NULL ? root->slot[root->which & 1] : NULL;
}

static void
retire(fault_root *root, const void *block)
{
    const blk *b = block; /* every registry block starts with its header */
    META_SET(((blk *)b)->next, root->retired);
    META_SET(root->retired, (blk *)b);
}

/* W and R of the comment at the top: publish ix, then free what was
 * retired if no handler can still be reading it. */
static void
publish(fault_root *root, const range_index *ix)
{
    uint8_t cur = root->which & 1, next = cur ^ 1;
    /* slot `next` was deselected by the last flip; slot_in_use says no
     * load of the counter has read 0 since (see "Where it lives") */
    if (slot_in_use[next] && __atomic_load_n(&handlers_in_flight, __ATOMIC_SEQ_CST) == 0)
        slot_in_use[next] = 0;
    META_SET(root->slot[next], ix);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    META_SET(root->which, next);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&handlers_in_flight, __ATOMIC_SEQ_CST) != 0) {
        slot_in_use[cur] = 1;
        return; /* a later writer frees them */
    }
    slot_in_use[cur] = 0;
    while (root->retired != NULL) {
        blk *b = root->retired;
        META_SET(root->retired, b->next);
        free_block(b);
    }
}

/* Publish an index in which leaves [li, li + nold) of the current one are
 * replaced by leaves holding seq[0..nseq) (sorted), split evenly into as
 * few leaves as fit.  -1 with errno ENOMEM, and nothing changed, if memory
 * runs out. */
static int
replace_leaves(fault_root *root, size_t li, size_t nold, const fault_range *const *seq,
               size_t nseq)
{
    const range_index *old = index_now();
    size_t nleaves = old ? old->nleaves : 0;
    size_t k = (nseq + LEAF_MAX - 1) / LEAF_MAX;
    size_t total = nleaves - nold + k;
    const range_index *ix = NULL;
    range_index *tmp = NULL;
    if (total > 0) {
        size_t size = sizeof(*tmp) + total * sizeof(tmp->leaves[0]);
        tmp = calloc(1, size);
        if (tmp == NULL)
            goto nomem;
        tmp->nleaves = total;
        for (size_t i = 0; i < k; i++) {
            range_leaf leaf;
            memset(&leaf, 0, sizeof(leaf));
            size_t from = i * nseq / k, to = (i + 1) * nseq / k;
            leaf.n = to - from;
            memcpy(leaf.r, seq + from, leaf.n * sizeof(seq[0]));
            tmp->leaves[li + i] = new_block(&leaf, sizeof(leaf), LEAF_MAGIC);
            if (tmp->leaves[li + i] == NULL)
                goto nomem;
        }
        if (li > 0)
            memcpy(tmp->leaves, old->leaves, li * sizeof(tmp->leaves[0]));
        if (nleaves > li + nold)
            memcpy(tmp->leaves + li + k, old->leaves + li + nold,
                   (nleaves - li - nold) * sizeof(tmp->leaves[0]));
        ix = new_block(tmp, size, INDEX_MAGIC);
        if (ix == NULL)
            goto nomem;
        free(tmp);
    }
    for (size_t i = 0; i < nold; i++)
        retire(root, old->leaves[li + i]);
    if (old != NULL)
        retire(root, old);
    publish(root, ix);
    return 0;
nomem:
    if (tmp != NULL) {
        for (size_t i = 0; i < k; i++) {
            if (tmp->leaves[li + i] != NULL)
                free_block(tmp->leaves[li + i]);
        }
        free(tmp);
    }
    errno = ENOMEM;
    return -1;
}

/* Where start is or would go: its leaf (the last whose first range starts
 * at or below it, or 0) and its position there. */
static void
locate(const range_index *ix, uintptr_t start, size_t *li, size_t *pos)
{
    int bad = 0;
    size_t lo = leaves_at_or_below(ix, start, &bad);
    *li = lo > 0 ? lo - 1 : 0;
    const range_leaf *leaf = ix->leaves[*li];
    size_t below = count_at_or_below(leaf, start, &bad);
    *pos = below > 0 && leaf->r[below - 1]->start == start ? below - 1 : below;
}

static const fault_range *
lookup_start(char *start, size_t *li, size_t *pos)
{
    const range_index *ix = index_now();
    if (ix == NULL)
        return NULL;
    locate(ix, (uintptr_t)start, li, pos);
    const range_leaf *leaf = ix->leaves[*li];
    return *pos < leaf->n && leaf->r[*pos]->start == (uintptr_t)start ? leaf->r[*pos] : NULL;
}

/* Rebuild the index without the ranges remove_range() emptied in place. */
static int
purge(fault_root *root)
{
    const range_index *ix = index_now();
    size_t n = 0;
    for (size_t i = 0; i < ix->nleaves; i++)
        n += ix->leaves[i]->n;
    const fault_range **seq = malloc(n * sizeof(*seq));
    const fault_range **empty = malloc(n * sizeof(*empty));
    if (seq == NULL || empty == NULL) {
        free(seq);
        free(empty);
        errno = ENOMEM;
        return -1;
    }
    size_t kept = 0, nempty = 0;
    for (size_t i = 0; i < ix->nleaves; i++) {
        for (size_t j = 0; j < ix->leaves[i]->n; j++) {
            const fault_range *r = ix->leaves[i]->r[j];
            if (r->end > r->start)
                seq[kept++] = r;
            else
                empty[nempty++] = r;
        }
    }
    int rc = replace_leaves(root, 0, ix->nleaves, seq, kept);
    free(seq);
    if (rc == 0) {
        for (size_t i = 0; i < nempty; i++)
            retire(root, empty[i]);
        need_purge = 0;
    }
    free(empty);
    return rc;
}

/* Take the range at start out of the registry (it covers nothing now). */
static void
remove_range(fault_root *root, char *start)
{
    size_t li, pos;
    const fault_range *r = lookup_start(start, &li, &pos);
    if (r == NULL)
        return;
    const range_index *ix = index_now();
    const range_leaf *leaf = ix->leaves[li];
    const fault_range *seq[LEAF_MAX];
    size_t n = 0;
    for (size_t j = 0; j < leaf->n; j++) {
        if (j != pos)
            seq[n++] = leaf->r[j];
    }
    /* merge a leaf that got small with a neighbour, so that deletions do
     * not leave the top array full of near-empty leaves */
    size_t first = li, nold = 1;
    if (li + 1 < ix->nleaves && n + ix->leaves[li + 1]->n <= LEAF_MAX / 2) {
        memcpy(seq + n, ix->leaves[li + 1]->r, ix->leaves[li + 1]->n * sizeof(seq[0]));
        n += ix->leaves[li + 1]->n;
        nold = 2;
    }
    else if (li > 0 && n + ix->leaves[li - 1]->n <= LEAF_MAX / 2) {
        size_t m = ix->leaves[li - 1]->n;
        memmove(seq + m, seq, n * sizeof(seq[0]));
        memcpy(seq, ix->leaves[li - 1]->r, m * sizeof(seq[0]));
        n += m;
        first = li - 1;
        nold = 2;
    }
    META_SET(((fault_range *)r)->destroyed, (uint8_t)1);
    if (replace_leaves(root, first, nold, seq, n) == 0) {
        retire(root, r);
        return;
    }
    /* Out of memory: leave it in place but covering nothing, so a lookup
     * cannot match it (its address may be mapped again by anyone), and
     * purge it before the next range comes in. */
    META_SET(((fault_range *)r)->end, r->start);
    need_purge = 1;
}

/* Register the chunk [start, start + size) of pool.  Called with the pool
 * lock held: no Python API here.  0, or -1 with errno ENOMEM. */
PRMEM_INTERNAL int
prmem_fault_register(PoolObject *pool, char *start, size_t size)
{
    fault_range tmpl;
    memset(&tmpl, 0, sizeof(tmpl));
    if (prmem_meta_frozen()) {
        errno = EROFS; /* nothing can be recorded (the range goes unreported) */
        return -1;
    }
    tmpl.start = (uintptr_t)start;
    tmpl.end = (uintptr_t)start + size;
    tmpl.m = pool->m;
    tmpl.serial = pool->serial;
    tmpl.mode = pool->m->mode;
    /* truncated on a UTF-8 character boundary */
    const char *name = pool->cname != NULL ? pool->cname : "?";
    size_t len = strlen(name);
    if (len > NAME_LEN - 1) {
        len = NAME_LEN - 1;
        while (len > 0 && ((unsigned char)name[len] & 0xc0) == 0x80)
            len--;
    }
    memcpy(tmpl.name, name, len);
    tmpl.name[len] = '\0';

    pthread_mutex_lock(&ranges_lock);
    fault_root *root = get_root();
    const fault_range *r = root != NULL ? new_block(&tmpl, sizeof(tmpl), RANGE_MAGIC) : NULL;
    int rc = r == NULL ? -1 : need_purge ? purge(root) : 0;
    if (rc == 0) {
        const range_index *ix = index_now();
        const fault_range *seq[LEAF_MAX + 1], *stale = NULL;
        size_t li = 0, pos = 0, n = 0;
        if (ix != NULL) {
            locate(ix, r->start, &li, &pos);
            const range_leaf *leaf = ix->leaves[li];
            n = leaf->n;
            /* A range with the same start was unmapped behind prmem's back
             * (the kernel just handed the address out again): replace it. */
            if (pos < n && leaf->r[pos]->start == r->start)
                stale = leaf->r[pos];
            size_t skip = stale != NULL;
            memcpy(seq, leaf->r, pos * sizeof(seq[0]));
            memcpy(seq + pos + 1, leaf->r + pos + skip, (n - pos - skip) * sizeof(seq[0]));
            n -= skip;
        }
        seq[pos] = r;
        rc = replace_leaves(root, li, ix != NULL, seq, n + 1);
        if (rc == 0 && stale != NULL) {
            META_SET(((fault_range *)stale)->destroyed, (uint8_t)1);
            retire(root, stale);
        }
    }
    if (rc < 0 && r != NULL)
        free_block(r);
    pthread_mutex_unlock(&ranges_lock);
    if (rc < 0)
        errno = ENOMEM;
    return rc;
}

/* The chunk at start is sealed and now only `size` bytes long (its tail was
 * unmapped and may be reused by other mappings).  In a fork()ed child whose
 * metadata is frozen (meta.c) the registry is frozen with it. */
PRMEM_INTERNAL void
prmem_fault_sealed(char *start, size_t size)
{
    size_t li, pos;
    if (prmem_meta_frozen())
        return;
    pthread_mutex_lock(&ranges_lock);
    fault_root *root = get_root();
    const fault_range *r = root != NULL ? lookup_start(start, &li, &pos) : NULL;
    if (r != NULL && size == 0) {
        remove_range(root, start); /* nothing of it is mapped any more */
    }
    else if (r != NULL) {
        META_SET(((fault_range *)r)->sealed, (uint8_t)1);
        META_SET(((fault_range *)r)->end, (uintptr_t)start + size);
    }
    pthread_mutex_unlock(&ranges_lock);
}

/* The pool of the chunk at start is being destroyed, but the chunk is
 * mseal()ed: it stays mapped for good, and so does its range, reported
 * with the pool's name as a destroyed pool. */
PRMEM_INTERNAL void
prmem_fault_orphan(char *start)
{
    size_t li, pos;
    if (prmem_meta_frozen())
        return;
    pthread_mutex_lock(&ranges_lock);
    const fault_range *r = lookup_start(start, &li, &pos);
    if (r != NULL)
        META_SET(((fault_range *)r)->destroyed, (uint8_t)1);
    pthread_mutex_unlock(&ranges_lock);
}

/* The chunk at start is about to be unmapped. */
PRMEM_INTERNAL void
prmem_fault_unregister(char *start)
{
    if (prmem_meta_frozen())
        return;
    pthread_mutex_lock(&ranges_lock);
    fault_root *root = get_root();
    if (root != NULL)
        remove_range(root, start);
    pthread_mutex_unlock(&ranges_lock);
}

/* prmem._core._fault_registry_address() (tests only): the root block. */
PRMEM_INTERNAL PyObject *
prmem_fault_registry_address(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    if (prmem_meta_check_file() != 0) {
        PyErr_SetString(PyExc_RuntimeError, "prmem's metadata is frozen");
        return NULL;
    }
    pthread_mutex_lock(&ranges_lock);
    fault_root *root = prmem_meta_frozen() ? NULL : get_root();
    pthread_mutex_unlock(&ranges_lock);
    if (root == NULL)
        return PyErr_NoMemory();
    return PyLong_FromVoidPtr(root);
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
        int any = index_now() != NULL;
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
