/*
 * Syscalls, chunks and areas: the bottom floor of prmem's C core.  Opening
 * areas and releasing them; the errors of code running under the pool lock
 * (prmem_error).  Writes through the backing files are in filewrite.c.  See prmem.h for
 * the layout and the lock rule.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "prmem.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>


/* PRMEM_ENFORCE=0 (or false/no/off) turns MMU protection off for debugging
 * with tools that dislike protected pages; anything else enforces. */
PRMEM_INTERNAL int
prmem_read_enforce(void)
{
    const char *v = getenv("PRMEM_ENFORCE");
    if (v == NULL)
        return 1;
    return !(strcmp(v, "0") == 0 || strcasecmp(v, "false") == 0 || strcasecmp(v, "no") == 0 ||
             strcasecmp(v, "off") == 0);
}

/* mprotect() that becomes a no-op when enforcement is off; callers keep
 * their state changes either way, so the API behaves identically. */
PRMEM_INTERNAL int
prmem_protect_range(void *addr, size_t len, int prot)
{
    if (!prmem_enforce)
        return 0;
    return mprotect(addr, len, prot);
}

/* ------------------------------------------------------------ errors */

static int
vfail(prmem_error *e, PyObject *type, int err, const char *fmt, va_list ap)
{
    e->type = type;
    e->err = err;
    vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
    return -1;
}

PRMEM_INTERNAL int
prmem_fail(prmem_error *e, PyObject *type, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail(e, type, 0, fmt, ap);
    va_end(ap);
    return -1;
}

/* OSError(err, message): the builtin picks the subclass that matches err. */
PRMEM_INTERNAL int
prmem_fail_errno(prmem_error *e, int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail(e, PyExc_OSError, err, fmt, ap);
    va_end(ap);
    return -1;
}

PRMEM_INTERNAL int
prmem_fail_os(prmem_error *e, const char *syscall_name, int err)
{
    return prmem_fail_errno(e, err, "%s: %s", syscall_name, strerror(err));
}

PRMEM_INTERNAL int
prmem_set_oserror(const char *syscall_name, int err)
{
    prmem_error e;
    prmem_fail_os(&e, syscall_name, err);
    prmem_raise(&e);
    return -1;
}

/* The message as str: names are cut at 200 bytes, maybe inside a UTF-8
 * character, which becomes U+FFFD rather than a UnicodeDecodeError. */
static PyObject *
message(const prmem_error *e)
{
    return PyUnicode_DecodeUTF8(e->msg, (Py_ssize_t)strlen(e->msg), "replace");
}

/* Raise what was recorded under a lock; call only after unlocking. */
PRMEM_INTERNAL void *
prmem_raise(const prmem_error *e)
{
    if (e->type == NULL) {
        PyErr_SetString(PyExc_SystemError, "prmem: an error was reported but not recorded");
        return NULL;
    }
    if (e->err != 0 && PyType_IsSubtype((PyTypeObject *)e->type,
                                        (PyTypeObject *)PyExc_OSError)) {
        /* type(errno, msg): OSError picks PermissionError for EACCES ... */
        PyObject *args = Py_BuildValue("(iN)", e->err, message(e));
        if (args != NULL) {
            PyErr_SetObject(e->type, args);
            Py_DECREF(args);
        }
        return NULL;
    }
    PyObject *msg = message(e);
    if (msg != NULL) {
        PyErr_SetObject(e->type, msg);
        Py_DECREF(msg);
    }
    return NULL;
}

/* The soft limit of `resource` as text, for messages. */
static void
format_limit(int resource, const char *unit, char *buf, size_t n)
{
    struct rlimit lim;
    if (getrlimit(resource, &lim) < 0)
        snprintf(buf, n, "unknown");
    else if (lim.rlim_cur == RLIM_INFINITY)
        snprintf(buf, n, "unlimited");
    else
        snprintf(buf, n, "%llu%s", (unsigned long long)lim.rlim_cur, unit);
}

PRMEM_INTERNAL int
prmem_fail_memlock(PoolObject *pool, prmem_error *e, const char *what, size_t size, int err)
{
    char limit[64];
    format_limit(RLIMIT_MEMLOCK, " bytes", limit, sizeof(limit));
    return prmem_fail(e, PyExc_MemoryError,
                      "prmem pool '%.200s': cannot lock %zu more bytes in memory for %s (%s): "
                      "locked memory is limited by RLIMIT_MEMLOCK (now %s); raise it with "
                      "`ulimit -l`, LimitMEMLOCK= in systemd or /etc/security/limits.conf, or "
                      "lock less: each secret or lock=True pool locks at least refill= bytes "
                      "(%zu for this pool), so a smaller refill= or fewer such pools help",
                      pool->cname, size, what, strerror(err), limit, pool->m->refill);
}

static int
fail_nomemory(PoolObject *pool, prmem_error *e, size_t size, const char *syscall_name, int err)
{
    return prmem_fail(e, PyExc_MemoryError, "prmem pool '%.200s': cannot reserve %zu bytes (%s: %s)",
                      pool->cname, size, syscall_name, strerror(err));
}

/* Out of descriptors: say which limit, and which pools hold descriptors. */
static int
fail_nofile(PoolObject *pool, prmem_error *e, const char *syscall_name, int err)
{
    char limit[64];
    format_limit(RLIMIT_NOFILE, "", limit, sizeof(limit));
    if (err == ENFILE)
        return prmem_fail_errno(e, err,
                                "prmem pool '%.200s': cannot open a memory file (%s: %s): the "
                                "system-wide file table is full (fs.file-max)",
                                pool->cname, syscall_name, strerror(err));
    return prmem_fail_errno(e, err,
                            "prmem pool '%.200s': cannot open a memory file (%s: %s): this "
                            "process has used up RLIMIT_NOFILE (%s descriptors). Each chunk of "
                            "a pool that is not READ_ONLY holds one descriptor (sealed READ_ONLY "
                            "chunks hold none); raise the limit with `ulimit -n` or "
                            "resource.setrlimit(RLIMIT_NOFILE), or destroy or make_ro() pools",
                            pool->cname, syscall_name, strerror(err), limit);
}

/* ------------------------------------------------------------ syscalls */

static int
sys_memfd_create(const char *name, unsigned flags)
{
#ifdef SYS_memfd_create
    return (int)syscall(SYS_memfd_create, name, flags);
#else
    (void)name; (void)flags;
    errno = ENOSYS;
    return -1;
#endif
}

/* A new, empty file of kind `kind` for a chunk of pool `pool` (a new chunk,
 * or a copy of one).
 * Also called in a fork()ed child before it runs any other code: plain
 * syscalls and byte copies only.  A memfd is named "prmem:<pool>", cut
 * to the kernel's 249 bytes on a UTF-8 character boundary, so
 * /proc/PID/maps and `prmem inspect` say whose memory it is. */
PRMEM_INTERNAL int
prmem_new_backing(const PoolObject *pool, int kind)
{
    if (kind == PRMEM_BACKING_MEMFD) {
        char name[250] = "prmem:";
        const size_t prefix = 6, max = sizeof(name) - 1 - prefix;
        size_t k = 0;
        while (pool->cname[k] != '\0' && k < max)
            k++;
        if (pool->cname[k] != '\0') /* cut short: not inside a character */
            while (k > 0 && ((unsigned char)pool->cname[k] & 0xc0) == 0x80)
                k--;
        memcpy(name + prefix, pool->cname, k);
        name[prefix + k] = '\0';
        return sys_memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    }
    if (kind == PRMEM_BACKING_TMPFILE)
        return open("/dev/shm", O_TMPFILE | O_RDWR | O_CLOEXEC | O_EXCL, 0600);
#ifdef SYS_memfd_secret
    return (int)syscall(SYS_memfd_secret, (unsigned long)O_CLOEXEC);
#else
    errno = ENOSYS;
    return -1;
#endif
}

PRMEM_INTERNAL void
prmem_fd_path(char out[32], int fd)
{
    static const char prefix[] = "/proc/self/fd/";
    char digits[12];
    int n = 0;
    for (unsigned v = (unsigned)fd; n == 0 || v > 0; v /= 10)
        digits[n++] = (char)('0' + v % 10);
    memcpy(out, prefix, sizeof(prefix) - 1);
    size_t len = sizeof(prefix) - 1;
    while (n > 0)
        out[len++] = digits[--n];
    out[len] = '\0';
}

PRMEM_INTERNAL int
prmem_sys_mseal(void *addr, size_t len)
{
#ifdef SYS_mseal
    return (int)syscall(SYS_mseal, addr, len, 0UL);
#else
    (void)addr; (void)len;
    errno = ENOSYS;
    return -1;
#endif
}

PRMEM_INTERNAL unsigned
prmem_probe_features(void)
{
    unsigned f = 0;
    int fd = sys_memfd_create("prmem:probe", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd >= 0) {
        f |= PRMEM_FEAT_MEMFD;
        if (fcntl(fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE) == 0)
            f |= PRMEM_FEAT_SEAL_FUTURE_WRITE;
        close(fd);
    }
    /* mseal(addr, 0, 0) on a page-aligned address is a no-op that returns 0
     * where the syscall exists, so probing seals nothing. */
    void *page = mmap(NULL, prmem_page_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page != MAP_FAILED) {
        if (prmem_sys_mseal(page, 0) == 0)
            f |= PRMEM_FEAT_MSEAL;
        munmap(page, prmem_page_size);
    }
#ifdef SYS_memfd_secret
    fd = (int)syscall(SYS_memfd_secret, 0UL);
    if (fd >= 0) {
        f |= PRMEM_FEAT_MEMFD_SECRET;
        close(fd);
    }
#endif
#ifdef SYS_pkey_alloc
    long key = syscall(SYS_pkey_alloc, 0UL, 0UL);
    if (key >= 0) {
        f |= PRMEM_FEAT_PKEYS;
        syscall(SYS_pkey_free, key);
    }
#endif
    return f;
}

/* Grow a PyMem_Raw array (no Python objects: safe under the lock). */
static int
grow_array(void **array, size_t *cap, size_t count, size_t item_size, prmem_error *e)
{
    if (count < *cap)
        return 0;
    size_t new_cap = *cap ? *cap * 2 : 8;
    void *p = PyMem_RawRealloc(*array, new_cap * item_size);
    if (p == NULL)
        return prmem_fail(e, PyExc_MemoryError, "prmem: out of memory for pool tables");
    *array = p;
    *cap = new_cap;
    return 0;
}

/* Largest reservation prmem makes for one chunk when it picks the size
 * itself; a single larger request still gets a chunk of its own size. */
#define PRMEM_MAX_CHUNK_SIZE ((size_t)1 << 30)

/* Reserve a new chunk of `size` bytes (page multiple) and append it.  The
 * allocator tells the fault report about it (prmem_sync_fault_registry). */
static int
chunk_new(PoolObject *pool, size_t size, prmem_error *e)
{
    if (prmem_meta_grow((const void *const *)&pool->m->chunks, &pool->m->chunks_cap,
                        pool->m->nchunks, sizeof(prmem_chunk)) < 0)
        return prmem_fail(e, PyExc_MemoryError, "prmem: out of metadata memory for pool tables");
    if (size > (size_t)LLONG_MAX)
        return fail_nomemory(pool, e, size, "ftruncate", EFBIG);

    /* Without memfd_create() (Linux < 3.17, or filtered by seccomp) the
     * fallback is an unnamed tmpfs file: pwrite() and shared mappings work
     * the same, but it cannot be sealed, so READ_ONLY is enforced by the
     * MMU only (prmem.features lacks "memfd"; prmem info says so). */
    int kind = pool->m->secret ? PRMEM_BACKING_SECRET
               : (prmem_features & PRMEM_FEAT_MEMFD) ? PRMEM_BACKING_MEMFD
                                                     : PRMEM_BACKING_TMPFILE;
    static const char *const calls[] = {"memfd_create", "open(/dev/shm, O_TMPFILE)",
                                        "memfd_secret"};
    int fd = prmem_new_backing(pool, kind);
    if (fd < 0) {
        int err = errno;
        if (err == EMFILE || err == ENFILE)
            return fail_nofile(pool, e, calls[kind], err);
        if (err == ENOMEM)
            return fail_nomemory(pool, e, size, calls[kind], err);
        if (kind == PRMEM_BACKING_TMPFILE)
            return prmem_fail(e, pool->mstate->UnsupportedError,
                              "this kernel has no memfd_create() and no O_TMPFILE on /dev/shm "
                              "(%s); prmem has no way to back protected memory",
                              strerror(err));
        if (kind == PRMEM_BACKING_SECRET && (err == ENOSYS || err == EINVAL))
            return prmem_fail(e, pool->mstate->UnsupportedError,
                              "memfd_secret() failed (%s): this kernel cannot back secret pools",
                              strerror(err));
        return prmem_fail_os(e, calls[kind], err);
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || ftruncate(fd, (off_t)size) < 0) {
        int err = errno;
        close(fd);
        if (err == EFBIG || err == EINVAL || err == ENOMEM || err == ENOSPC)
            return fail_nomemory(pool, e, size, "ftruncate", err);
        return prmem_fail_os(e, "ftruncate", err);
    }
    /* PROT_NONE reservation; MAP_NORESERVE because nothing is committed
     * until an area is opened and touched.  memfd_secret() mappings are
     * locked as a whole, so secret chunks are exactly one area long. */
    void *base = mmap(NULL, size, PROT_NONE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (base == MAP_FAILED) {
        int err = errno;
        close(fd);
        if (kind == PRMEM_BACKING_SECRET && err == EAGAIN)
            return prmem_fail_memlock(pool, e, "memfd_secret memory", size, err);
        if (err == ENOMEM || err == EOVERFLOW || err == EINVAL)
            return fail_nomemory(pool, e, size, "mmap", err);
        return prmem_fail_os(e, "mmap", err);
    }
    if (pool->m->dontdump && !pool->m->noaccess)
        madvise(base, size, MADV_DONTDUMP); /* no-access pools: per area, below */
    prmem_chunk ch;
    memset(&ch, 0, sizeof(ch));
    ch.base = base;
    ch.size = size;
    ch.fd = fd;
    ch.kind = kind;
    ch.dev = st.st_dev;
    ch.ino = st.st_ino;
    META_SET(pool->m->chunks[pool->m->nchunks], ch);
    META_SET(pool->m->nchunks, pool->m->nchunks + 1);
    return 0;
}

/* Lock pages as they are touched (MLOCK_ONFAULT), so a large area does not
 * have to be populated up front; plain mlock() where mlock2 is missing. */
PRMEM_INTERNAL int
prmem_lock_range(void *addr, size_t len)
{
#ifdef SYS_mlock2
    if (syscall(SYS_mlock2, addr, len, (unsigned long)MLOCK_ONFAULT) == 0)
        return 0;
    if (errno != ENOSYS && errno != EINVAL)
        return -1;
#endif
    return mlock(addr, len);
}

/* munlock() as a raw syscall, like the mlock2() above (a sanitizer's
 * interposed munlock() may do nothing, leaving pages locked). */
PRMEM_INTERNAL int
prmem_unlock_range(void *addr, size_t len)
{
    return (int)syscall(SYS_munlock, addr, len);
}

PRMEM_INTERNAL size_t
prmem_round_up_pages(size_t n)
{
    /* caller guarantees n <= SIZE_MAX - page size */
    return (n + prmem_page_size - 1) & ~(prmem_page_size - 1);
}

/*
 * Open a new area able to hold `need` bytes at page alignment, make it the
 * current area and apply the mode's protection.  In AUTO modes the previous
 * current area is protected *after* the new one exists, so a failure to get
 * memory leaves the pool exactly as it was.
 */
PRMEM_INTERNAL int
prmem_area_open(PoolObject *pool, size_t need, prmem_error *e)
{
    if (need > SIZE_MAX - prmem_page_size)
        return fail_nomemory(pool, e, need, "mmap", ENOMEM);
    size_t area_size = prmem_round_up_pages(need);
    if (area_size < pool->m->refill)
        area_size = pool->m->refill;

    Py_ssize_t prev = pool->cur_area;
    int auto_mode = pool->m->mode == PRMEM_MODE_AUTO_RO || pool->m->mode == PRMEM_MODE_AUTO_WR;
    if (auto_mode && prev >= 0 && pool->area_wexports[prev] > 0)
        return prmem_fail(e, PyExc_BufferError,
                          "prmem pool '%.200s': this allocation would auto-protect the "
                          "current area, but %zd writable buffer view(s) of it are "
                          "still alive; release them first",
                          pool->cname, pool->area_wexports[prev]);
    if (prmem_meta_grow((const void *const *)&pool->m->areas, &pool->m->areas_cap,
                        pool->m->nareas, sizeof(prmem_area)) < 0)
        return prmem_fail(e, PyExc_MemoryError, "prmem: out of metadata memory for pool tables");
    if (grow_array((void **)&pool->area_wexports, &pool->area_wexports_cap, pool->m->nareas,
                   sizeof(Py_ssize_t), e) < 0)
        return -1;
    if (pool->m->nareas >= UINT32_MAX)
        return prmem_fail(e, PyExc_MemoryError, "prmem pool '%.200s' has too many areas",
                          pool->cname);

    /* Carve from the last chunk while it has room and is not sealed (a
     * sealed memfd can never be mapped writable again) nor shared with a
     * fork()ed process (a new area there would be seen by both). */
    const prmem_chunk *ch = pool->m->nchunks ? &pool->m->chunks[pool->m->nchunks - 1] : NULL;
    if (ch == NULL || ch->sealed || prmem_chunk_is_shared(ch) || ch->size - ch->used < area_size) {
        size_t chunk_size = area_size;
        if (chunk_size < pool->m->next_chunk_size && !pool->m->secret)
            chunk_size = pool->m->next_chunk_size;
        if (chunk_new(pool, chunk_size, e) < 0)
            return -1;
        if (pool->m->next_chunk_size < PRMEM_MAX_CHUNK_SIZE)
            META_SET(pool->m->next_chunk_size, pool->m->next_chunk_size * 2);
        ch = &pool->m->chunks[pool->m->nchunks - 1];
    }

    char *start = ch->base + ch->used;
    int state = pool->m->mode == PRMEM_MODE_START_WR ? PRMEM_WRITE_RARE : PRMEM_WRITABLE;
    int prot = state == PRMEM_WRITABLE || !prmem_enforce ? PROT_READ | PROT_WRITE
                                                          : prmem_protected_prot(pool);
    if (mprotect(start, area_size, prot) < 0) {
        int err = errno;
        if (err == ENOMEM)
            return fail_nomemory(pool, e, area_size, "mprotect", err);
        return prmem_fail_os(e, "mprotect", err);
    }
    if (pool->m->mlock_areas && prmem_lock_range(start, area_size) < 0) {
        int err = errno;
        mprotect(start, area_size, PROT_NONE); /* leave the pool as it was */
        return prmem_fail_memlock(pool, e, "lock=True", area_size, err);
    }
    if (pool->m->noaccess)
        madvise(start, area_size, MADV_DONTDUMP); /* see prmem_advise() */
    if (area_size >= PRMEM_HUGE_AREA)
        madvise(start, area_size, MADV_HUGEPAGE);
    META_SET(ch->used, ch->used + area_size);
    prmem_area area;
    memset(&area, 0, sizeof(area));
    area.start = start;
    area.size = area_size;
    area.chunk = (uint32_t)(ch - pool->m->chunks);
    area.state = (uint8_t)state;
    META_SET(pool->m->areas[pool->m->nareas], area);
    pool->area_wexports[pool->m->nareas] = 0;
    META_SET(pool->m->nareas, pool->m->nareas + 1);
    pool->cur_area = (Py_ssize_t)(pool->m->nareas - 1);
    pool->cur_off = 0;
    if (state != PRMEM_WRITABLE)
        pool->protect_event = 1;

    /* AUTO modes: the area we leave is write-protected now.  An AUTO_RO
     * area is READ_ONLY for the MMU at once; the seal that makes it
     * permanent covers the whole chunk, so it comes with protect(). */
    if (auto_mode && prev >= 0) {
        const prmem_area *old = &pool->m->areas[prev];
        if (old->state == PRMEM_WRITABLE) {
            if (prmem_protect_range(old->start, old->size, prmem_protected_prot(pool)) < 0)
                return prmem_fail_os(e, "mprotect", errno);
            META_SET(old->state, (uint8_t)(pool->m->mode == PRMEM_MODE_AUTO_RO ? PRMEM_READ_ONLY
                                                                                : PRMEM_WRITE_RARE));
            pool->protect_event = 1;
        }
    }
    return 0;
}

PRMEM_INTERNAL void
prmem_close_current_area(PoolObject *pool)
{
    if (pool->cur_area >= 0) {
        pool->bytes_lost += pool->m->areas[pool->cur_area].size - pool->cur_off;
        pool->cur_area = -1;
        pool->cur_off = 0;
    }
}

PRMEM_INTERNAL size_t
prmem_area_run_end(const PoolObject *pool, size_t i, int writable)
{
    const prmem_area *a = pool->m->areas;
    const char *end = a[i].start + a[i].size;
    size_t j = i + 1;
    while (j < pool->m->nareas && (a[j].state == PRMEM_WRITABLE) == writable &&
           a[j].chunk == a[i].chunk && a[j].start == end) {
        end += a[j].size;
        j++;
    }
    return j;
}

/* Move every WRITABLE area to WRITE_RARE (mprotect PROT_READ), merging runs
 * of adjacent areas into one syscall. */
PRMEM_INTERNAL int
prmem_make_write_rare(PoolObject *pool, prmem_error *e)
{
    /* rare writes will go through these descriptors: they must still be
     * the files recorded at creation (one fstat() per chunk) */
    for (size_t ci = 0; ci < pool->m->nchunks; ci++) {
        const prmem_chunk *ch = &pool->m->chunks[ci];
        if (!ch->sealed && ch->fd >= 0 && prmem_check_backing(pool, ch, e) < 0)
            return -1;
    }
    size_t i = 0;
    while (i < pool->m->nareas) {
        if (pool->m->areas[i].state != PRMEM_WRITABLE) {
            i++;
            continue;
        }
        size_t j = prmem_area_run_end(pool, i, 1);
        const prmem_area *first = &pool->m->areas[i], *last = &pool->m->areas[j - 1];
        if (prmem_protect_range(first->start, (size_t)(last->start + last->size - first->start),
                                prmem_protected_prot(pool)) < 0)
            return prmem_fail_os(e, "mprotect", errno);
        prmem_meta_set_area_states(pool->m->areas, i, j, PRMEM_WRITE_RARE);
        pool->protect_event = 1;
        i = j;
    }
    prmem_close_current_area(pool);
    return 0;
}

/* mseal()ed chunks of destroyed pools: they stay mapped, and their pages
 * stay in memory, until the process exits (see docs/usage.md). */
static size_t leftover_chunks, leftover_bytes;

PRMEM_INTERNAL void
prmem_sealed_leftovers(size_t *chunks, size_t *bytes)
{
    *chunks = __atomic_load_n(&leftover_chunks, __ATOMIC_RELAXED);
    *bytes = __atomic_load_n(&leftover_bytes, __ATOMIC_RELAXED);
}

/* Give every page of the pool back to the kernel.  Unsealed memory is zeroed
 * first; sealed memory cannot be written by anyone, prmem included, so the
 * kernel gets it as is (it zeroes pages before reusing them).  mseal()ed
 * chunks cannot be unmapped at all and stay until the process exits; their
 * memory lock, if any, is released.  The caller has told the fault report
 * (prmem_fault_unregister / prmem_fault_orphan) first. */
PRMEM_INTERNAL void
prmem_pool_release(PoolObject *pool)
{
    int frozen = prmem_meta_frozen() != 0;
    /* In a fork()ed child with frozen metadata, fork.c closed the
     * descriptor of every unsealed chunk and left private snapshots, so
     * those numbers are stale: nothing to zero or close (a sealed chunk's
     * read-only descriptor, kept for share=True, is still open).  Frozen because the
     * metadata descriptor was lost, the pool's own descriptors are live. */
    int why = prmem_meta_frozen_why();
    int stale_fds = why == PRMEM_FROZEN_AT_FORK || why == PRMEM_FROZEN_INHERITED;
    int keep_all = frozen && prmem_meta_unrecorded_sharing();
    for (size_t ci = 0; ci < pool->m->nchunks; ci++) {
        const prmem_chunk *ch = &pool->m->chunks[ci];
        /* Unmap first: the hole punched below then frees pages that no page
         * table maps any more, which is cheaper than tearing both down. */
        if (ch->msealed) {
            if (pool->m->mlock_areas && ch->used > 0)
                prmem_unlock_range(ch->base, ch->used);
            __atomic_add_fetch(&leftover_chunks, 1, __ATOMIC_RELAXED);
            __atomic_add_fetch(&leftover_bytes, ch->used, __ATOMIC_RELAXED);
        }
        else if (ch->size > 0)
            munmap(ch->base, ch->size);
        if (ch->fd >= 0 && !(stale_fds && !ch->sealed)) {
            /* A descriptor that is no longer the recorded file (closed or
             * replaced by a dup2()) is someone else's: neither zeroed nor
             * closed, only forgotten. */
            if (prmem_check_backing(pool, ch, NULL) == 0) {
                /* memfd_secret pages are zeroed by the kernel when freed; a
                 * file another process still maps (keep_data; with frozen
                 * metadata, any chunk still marked shared, as nothing could
                 * record whether it still is) is its memory too */
                if (!ch->sealed && ch->kind != PRMEM_BACKING_SECRET && !ch->keep_data &&
                    !(frozen && prmem_chunk_is_shared(ch)) && !keep_all)
                    prmem_zero_chunk_data(ch);
                close(ch->fd);
            }
            if (!frozen)
                META_SET(ch->fd, -1);
        }
    }
    /* the "attached from" markers of a pool received from elsewhere */
    void **marks = pool->attach_marks;
    for (size_t i = 0; i < pool->nattach_marks; i++)
        if (marks[i] != NULL)
            munmap(marks[i], prmem_page_size);
    PyMem_RawFree(marks);
    pool->attach_marks = NULL;
    pool->nattach_marks = 0;
    PyMem_RawFree(pool->area_wexports);
    pool->area_wexports = NULL;
    pool->area_wexports_cap = 0;
    pool->cur_area = -1;
    if (frozen)
        return; /* the tables stay (frozen): nothing may change them */
    prmem_meta_free((void *)pool->m->chunks, pool->m->chunks_cap * sizeof(prmem_chunk));
    prmem_meta_free((void *)pool->m->areas, pool->m->areas_cap * sizeof(prmem_area));
    META_SET(pool->m->chunks, NULL);
    META_SET(pool->m->areas, NULL);
    META_SET(pool->m->nchunks, 0);
    META_SET(pool->m->chunks_cap, 0);
    META_SET(pool->m->nareas, 0);
    META_SET(pool->m->areas_cap, 0);
}
