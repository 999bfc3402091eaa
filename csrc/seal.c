/*
 * READ_ONLY for good, and proof that it holds.  Same floor as areas.c.
 *
 * READ_ONLY must leave no writable path to the data anywhere in user space:
 * not prmem's own mapping, not a descriptor, not an alias that someone
 * mapped writable before protect().  For memfd backings the kernel proves
 * it: F_SEAL_WRITE is refused (EBUSY) while any writable shared mapping of
 * the file exists, so prmem first replaces its own mapping by one made
 * through a read-only descriptor (no VM_MAYWRITE: it can never become
 * writable), then adds the seals.  If the kernel refuses, the old mapping is
 * put back and protect() raises ProtectionError with the pool unchanged.
 * Backings that cannot be sealed (memfd_secret, the /dev/shm fallback) are
 * checked by scanning this process's mappings and descriptors instead.
 * Once sealed, prmem closes its descriptor: reading needs none.
 *
 * prmem_verify() checks, from /proc/self/maps, that every area is still
 * mapped by the pool's own file at the right offset, with protection no
 * weaker than its state (a MAP_FIXED or munmap+mmap substitution, or an
 * mprotect, shows up there).
 *
 * Callers hold pool->lock: pure C only, errors go to a prmem_error.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "prmem.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sysmacros.h>
#include <unistd.h>

/* ------------------------------------------------- /proc/self/maps */

typedef struct {
    uintptr_t start, end;
    unsigned long long offset;
    unsigned major, minor;
    unsigned long long inode;
    char perms[5];
} maps_entry;

/* Read a whole /proc file into a PyMem_Raw buffer (NUL-terminated). */
static char *
read_proc_file(const char *path, int *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        *err = errno;
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = PyMem_RawMalloc(cap);
    while (buf != NULL) {
        if (cap - len < 4096) {
            char *bigger = PyMem_RawRealloc(buf, cap * 2);
            if (bigger == NULL) {
                PyMem_RawFree(buf);
                buf = NULL;
                break;
            }
            buf = bigger;
            cap *= 2;
        }
        ssize_t r = read(fd, buf + len, cap - len - 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            *err = errno;
            PyMem_RawFree(buf);
            close(fd);
            return NULL;
        }
        if (r == 0)
            break;
        len += (size_t)r;
    }
    close(fd);
    if (buf == NULL) {
        *err = ENOMEM;
        return NULL;
    }
    buf[len] = '\0';
    return buf;
}

/* Parse one line of /proc/PID/maps; 0 on success. */
static int
parse_maps_line(const char *line, maps_entry *m)
{
    unsigned long start, end;
    if (sscanf(line, "%lx-%lx %4s %llx %x:%x %llu", &start, &end, m->perms, &m->offset,
               &m->major, &m->minor, &m->inode) != 7)
        return -1;
    m->start = start;
    m->end = end;
    return 0;
}

/* Call fn(ctx, entry) for each mapping of this process; stops when fn
 * returns nonzero and returns that.  -1 with *err if maps is unreadable. */
static int
for_each_mapping(int (*fn)(void *, const maps_entry *), void *ctx, int *err)
{
    char *text = read_proc_file("/proc/self/maps", err);
    if (text == NULL)
        return -1;
    int rc = 0;
    for (char *line = text; *line && rc == 0;) {
        char *nl = strchr(line, '\n');
        if (nl != NULL)
            *nl = '\0';
        maps_entry m;
        if (parse_maps_line(line, &m) == 0)
            rc = fn(ctx, &m);
        if (nl == NULL)
            break;
        line = nl + 1;
    }
    PyMem_RawFree(text);
    return rc;
}

static int
same_file(const prmem_chunk *ch, const maps_entry *m)
{
    return m->inode == (unsigned long long)ch->ino && m->major == major(ch->dev) &&
           m->minor == minor(ch->dev);
}

/* ------------------------------------------------------ alias checks */

typedef struct {
    const prmem_chunk *ch;
    uintptr_t found_start, found_end;
    char found_perms[5];
} alias_scan;

static int
mapping_is_alias(void *ctx, const maps_entry *m)
{
    alias_scan *s = ctx;
    uintptr_t base = (uintptr_t)s->ch->base;
    if (!same_file(s->ch, m) || (m->start >= base && m->end <= base + s->ch->size))
        return 0;
    s->found_start = m->start;
    s->found_end = m->end;
    memcpy(s->found_perms, m->perms, sizeof(s->found_perms));
    return 1;
}

/*
 * For backings the kernel cannot seal: prove that no other mapping and no
 * other descriptor of the chunk's file exists in this process (either could
 * write the data after prmem calls it READ_ONLY).  0 if none; -1 with *e
 * set if one exists or the proof cannot be made.
 */
static int
check_no_alias(PoolObject *pool, const prmem_chunk *ch, prmem_error *e)
{
    int err = 0;
    alias_scan scan = {ch, 0, 0, ""};
    int rc = for_each_mapping(mapping_is_alias, &scan, &err);
    if (rc < 0)
        return prmem_fail(e, pool->mstate->ProtectionError,
                          "cannot make pool '%.200s' READ_ONLY: its memory file cannot be "
                          "sealed, so prmem must check /proc/self/maps for other mappings of "
                          "it, and reading it failed (%s); the pool is unchanged",
                          pool->cname, strerror(err));
    if (rc > 0)
        return prmem_fail(e, pool->mstate->ProtectionError,
                          "cannot make pool '%.200s' READ_ONLY: its memory is also mapped at "
                          "%#lx-%#lx (%s), outside prmem, and that mapping could still write "
                          "it; unmap it first (the pool is unchanged)",
                          pool->cname, (unsigned long)scan.found_start,
                          (unsigned long)scan.found_end, scan.found_perms);
    DIR *dir = opendir("/proc/self/fd");
    if (dir == NULL)
        return prmem_fail(e, pool->mstate->ProtectionError,
                          "cannot make pool '%.200s' READ_ONLY: prmem must check "
                          "/proc/self/fd for other descriptors of its memory file, and "
                          "reading it failed (%s); the pool is unchanged",
                          pool->cname, strerror(errno));
    int found = -1;
    struct dirent *de;
    while ((de = readdir(dir)) != NULL) {
        if (de->d_name[0] < '0' || de->d_name[0] > '9')
            continue;
        int fd = atoi(de->d_name);
        struct stat st;
        if (fd == ch->fd || fd == dirfd(dir) || fstatat(dirfd(dir), de->d_name, &st, 0) < 0)
            continue;
        if (st.st_dev == ch->dev && st.st_ino == ch->ino) {
            found = fd;
            break;
        }
    }
    closedir(dir);
    if (found >= 0)
        return prmem_fail(e, pool->mstate->ProtectionError,
                          "cannot make pool '%.200s' READ_ONLY: descriptor %d, opened outside "
                          "prmem, refers to its memory file and could write it or map it "
                          "writable; close it first (the pool is unchanged)",
                          pool->cname, found);
    return 0;
}

/* ------------------------------------------------------------ sealing */

/* Put back the chunk's original mapping (through the read-write
 * descriptor) with every area's protection, after a failed seal.  -1 with
 * errno if even that fails. */
static int
restore_chunk(PoolObject *pool, size_t ci)
{
    const prmem_chunk *ch = &pool->m->chunks[ci];
    if (mmap(ch->base, ch->size, PROT_NONE, MAP_SHARED | MAP_FIXED | MAP_NORESERVE, ch->fd, 0) ==
        MAP_FAILED)
        return -1;
    for (size_t i = 0; i < pool->m->nareas; i++) {
        const prmem_area *a = &pool->m->areas[i];
        if (a->chunk != ci)
            continue;
        int prot = a->state == PRMEM_WRITABLE ? PROT_READ | PROT_WRITE
                                               : prmem_protected_prot(pool);
        if (mprotect(a->start, a->size, prot) < 0)
            return -1;
    }
    prmem_advise(pool, ch, ch->base, ch->size);
    if (pool->m->mlock_areas && ch->used > 0)
        prmem_lock_range(ch->base, ch->used);
    return 0;
}

/* A seal attempt failed with `err` after the mappings were touched: undo,
 * and say why in *e. */
static int
fail_seal(PoolObject *pool, size_t ci, prmem_error *e, const char *what, int err)
{
    const prmem_chunk *ch = &pool->m->chunks[ci];
    if (restore_chunk(pool, ci) < 0) {
        /* fail closed: nothing more goes through this pool */
        META_SET(pool->m->broken_errno, errno ? errno : EIO);
        return prmem_fail(e, pool->mstate->PrmemError,
                          "prmem pool '%.200s': sealing failed (%s: %s) and its memory could "
                          "not be mapped back (%s); the pool is unusable",
                          pool->cname, what, strerror(err), strerror(pool->m->broken_errno));
    }
    if (err == EBUSY)
        return prmem_fail(e, pool->mstate->ProtectionError,
                          "cannot make pool '%.200s' READ_ONLY: another writable mapping of its "
                          "memory exists (fcntl(F_SEAL_WRITE): %s), made outside prmem, e.g. "
                          "through /proc/PID/fd or /proc/PID/map_files, in this or another "
                          "process (or its pages are pinned for I/O); unmap it first. The pool "
                          "is unchanged",
                          pool->cname, strerror(err));
    if (err == EPERM) {
        int seals = fcntl(ch->fd, F_GET_SEALS);
        return prmem_fail(e, pool->mstate->ProtectionError,
                          "cannot make pool '%.200s' READ_ONLY: code outside prmem added seals "
                          "to its memory file (F_GET_SEALS = %#x, F_SEAL_SEAL forbids more), so "
                          "prmem cannot seal it; the pool is unchanged",
                          pool->cname, seals < 0 ? 0 : seals);
    }
    return prmem_fail_os(e, what, err);
}

/* memfd: re-map through a read-only descriptor, then let the kernel prove
 * that no writable mapping is left by adding F_SEAL_WRITE.  On success
 * *ro_fd is that read-only descriptor (the caller keeps or closes it). */
static int
seal_memfd(PoolObject *pool, size_t ci, prmem_error *e, int *ro_fd)
{
    const prmem_chunk *ch = &pool->m->chunks[ci];
    char path[64];
    prmem_fd_path(path, ch->fd);
    int ro = open(path, O_RDONLY | O_CLOEXEC);
    if (ro < 0)
        return prmem_fail(e, pool->mstate->ProtectionError,
                          "cannot make pool '%.200s' READ_ONLY: prmem re-maps its memory "
                          "through a read-only descriptor, and opening one failed (open %s: "
                          "%s); the pool is unchanged",
                          pool->cname, path, strerror(errno));
    if (pool->m->mlock_areas && ch->used > 0)
        prmem_unlock_range(ch->base, ch->used); /* re-locking stays within the limit */
    /* The used part readable (unless the pool is no-access and closed), the
     * unused tail inaccessible; neither mapping has the right to become
     * writable (no VM_MAYWRITE). */
    const char *what = "mmap";
    int prot = prmem_protected_prot(pool);
    int failed = ch->used > 0 &&
                 mmap(ch->base, ch->used, prot, MAP_SHARED | MAP_FIXED, ro, 0) == MAP_FAILED;
    if (!failed && ch->size > ch->used)
        failed = mmap(ch->base + ch->used, ch->size - ch->used, PROT_NONE,
                      MAP_SHARED | MAP_FIXED | MAP_NORESERVE, ro, (off_t)ch->used) == MAP_FAILED;
    if (!failed) {
        int seals = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
        if (prmem_features & PRMEM_FEAT_SEAL_FUTURE_WRITE)
            seals |= F_SEAL_FUTURE_WRITE;
        what = "fcntl(F_ADD_SEALS)";
        failed = fcntl(ch->fd, F_ADD_SEALS, seals) < 0;
    }
    int err = errno;
    if (failed) {
        close(ro);
        return fail_seal(pool, ci, e, what, err);
    }
    prmem_advise(pool, ch, ch->base, ch->used); /* the tail is unmapped next */
    /* The re-map dropped the page-table entries; they are not populated
     * again here.  Measured (64 MiB and 256 MiB, numpy sum() right after
     * protect()): MADV_POPULATE_READ or MAP_POPULATE fault the pages in one
     * by one and made protect() + first read about 12% slower in total
     * than letting the first read fault them in, 16 pages per fault
     * (fault-around). */
    *ro_fd = ro;
    return 0;
}

/* memfd_secret and the fallback file: no seals; prove there is no alias in
 * this process, then write-protect the mapping (mseal with seal=True). */
static int
seal_unsealable(PoolObject *pool, size_t ci, prmem_error *e)
{
    const prmem_chunk *ch = &pool->m->chunks[ci];
    if (check_no_alias(pool, ch, e) < 0)
        return -1;
    if (ch->used > 0 && mprotect(ch->base, ch->used, prmem_protected_prot(pool)) < 0) {
        int err = errno;
        for (size_t i = 0; i < pool->m->nareas; i++) {
            const prmem_area *a = &pool->m->areas[i];
            if (a->chunk == ci && a->state == PRMEM_WRITABLE)
                mprotect(a->start, a->size, PROT_READ | PROT_WRITE);
        }
        return prmem_fail_os(e, "mprotect", err);
    }
    return 0;
}

/*
 * Make every area of chunk `ci` READ_ONLY for good.  On failure the chunk is
 * as it was (or, if even that cannot be restored, the pool is unusable).
 * After success: prmem's descriptor is closed, the unused tail of the
 * reservation unmapped, and with seal=True the range mseal()ed.
 */
PRMEM_INTERNAL int
prmem_chunk_seal(PoolObject *pool, size_t ci, prmem_error *e)
{
    const prmem_chunk *ch = &pool->m->chunks[ci];
    if (ch->sealed)
        return 0;
    int ro_fd = -1;
    /* the seal would bind a fork()ed process that still maps the file */
    if (prmem_chunk_unshare(pool, ci, e) < 0)
        return -1;
    /* the descriptor is still the file recorded at creation: sealing (and
     * the read-only copy kept for share=True) goes through it */
    if (ch->fd >= 0 && prmem_check_backing(pool, ch, e) < 0)
        return -1;
    if (prmem_enforce) {
        int rc = ch->kind == PRMEM_BACKING_MEMFD ? seal_memfd(pool, ci, e, &ro_fd)
                                                  : seal_unsealable(pool, ci, e);
        if (rc < 0)
            return -1;
    }
    int lock_errno = 0;
    if (prmem_enforce && ch->kind == PRMEM_BACKING_MEMFD && pool->m->mlock_areas && ch->used > 0 &&
        prmem_lock_range(ch->base, ch->used) < 0)
        lock_errno = errno;
    if (pool->cur_area >= 0 && pool->m->areas[pool->cur_area].chunk == ci)
        prmem_close_current_area(pool);
    for (size_t i = 0; i < pool->m->nareas;) {
        size_t j = i;
        while (j < pool->m->nareas && pool->m->areas[j].chunk == ci)
            j++;
        prmem_meta_set_area_states(pool->m->areas, i, j, PRMEM_READ_ONLY); /* a run */
        i = j > i ? j : i + 1;
    }
    META_SET(ch->sealed, 1);
    pool->protect_event = 1;
    /* Reading needs no descriptor.  A share=True pool keeps the read-only
     * one, to pass the sealed memory to other processes: it can neither
     * write nor map writable (O_RDONLY, F_SEAL_WRITE). */
    close(ch->fd);
    META_SET(ch->fd, ro_fd >= 0 && pool->m->share ? ro_fd : -1);
    if (ro_fd >= 0 && !pool->m->share)
        close(ro_fd);
    if (prmem_enforce && ch->size > ch->used) {
        if (munmap(ch->base + ch->used, ch->size - ch->used) < 0)
            return prmem_fail_os(e, "munmap", errno);
        META_SET(ch->size, ch->used);
    }
    if (pool->m->seal && prmem_enforce && ch->used > 0 && (prmem_features & PRMEM_FEAT_MSEAL)) {
        if (prmem_sys_mseal(ch->base, ch->used) < 0)
            return prmem_fail_os(e, "mseal", errno);
        META_SET(ch->msealed, 1);
    }
    if (lock_errno)
        return prmem_fail_memlock(pool, e, "lock=True (sealed, but no longer locked)", ch->used,
                                  lock_errno);
    return 0;
}

PRMEM_INTERNAL int
prmem_seal_all(PoolObject *pool, prmem_error *e)
{
    for (size_t ci = 0; ci < pool->m->nchunks; ci++) {
        if (prmem_chunk_seal(pool, ci, e) < 0)
            return -1;
    }
    prmem_close_current_area(pool);
    return 0;
}

/* ------------------------------------------------------------ verify */

typedef struct {
    PoolObject *pool;
    size_t *order;     /* area indices sorted by start */
    size_t *covered;   /* bytes of each area seen mapped (by anything) */
    prmem_verify_finding *out;
    size_t max_out, nfound;
} verify_scan;

static int
by_start(const void *a, const void *b, void *pool)
{
    const prmem_area *areas = ((PoolObject *)pool)->m->areas;
    const prmem_area *x = &areas[*(const size_t *)a], *y = &areas[*(const size_t *)b];
    return x->start < y->start ? -1 : x->start > y->start;
}

static void
add_finding(verify_scan *s, size_t area, uintptr_t start, uintptr_t end, int problem,
            const char *perms)
{
    if (s->nfound < s->max_out) {
        prmem_verify_finding *f = &s->out[s->nfound];
        f->area = area;
        f->start = start;
        f->end = end;
        f->problem = problem;
        snprintf(f->perms, sizeof(f->perms), "%s", perms);
    }
    s->nfound++;
}

static int
verify_mapping(void *ctx, const maps_entry *m)
{
    verify_scan *s = ctx;
    PoolObject *pool = s->pool;
    /* first area ending after m->start */
    size_t lo = 0, hi = pool->m->nareas;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        const prmem_area *a = &pool->m->areas[s->order[mid]];
        if ((uintptr_t)a->start + a->size <= m->start)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (size_t k = lo; k < pool->m->nareas; k++) {
        size_t ai = s->order[k];
        const prmem_area *a = &pool->m->areas[ai];
        uintptr_t a_start = (uintptr_t)a->start, a_end = a_start + a->size;
        if (a_start >= m->end)
            break;
        uintptr_t from = m->start > a_start ? m->start : a_start;
        uintptr_t to = m->end < a_end ? m->end : a_end;
        const prmem_chunk *ch = &pool->m->chunks[a->chunk];
        s->covered[ai] += to - from; /* mapped by something; what, is checked now */
        if (!same_file(ch, m) || m->perms[3] != 's') {
            add_finding(s, ai, from, to, PRMEM_VERIFY_REPLACED, m->perms);
            continue;
        }
        if (m->offset != (unsigned long long)(m->start - (uintptr_t)ch->base)) {
            add_finding(s, ai, from, to, PRMEM_VERIFY_MOVED, m->perms);
            continue;
        }
        /* no-access memory outside access(): nothing may be readable */
        int closed = a->state != PRMEM_WRITABLE && prmem_protected_prot(pool) == PROT_NONE;
        if (closed && (m->perms[0] == 'r' || m->perms[1] == 'w'))
            add_finding(s, ai, from, to, PRMEM_VERIFY_OPENED, m->perms);
        else if (!closed && m->perms[0] != 'r')
            add_finding(s, ai, from, to, PRMEM_VERIFY_UNREADABLE, m->perms);
        else if (m->perms[1] == 'w' && a->state != PRMEM_WRITABLE)
            add_finding(s, ai, from, to, PRMEM_VERIFY_WEAKER, m->perms);
    }
    return 0;
}

/*
 * Compare every area of the pool with /proc/self/maps.  Returns the number
 * of findings (the first max_out are stored in out), or -1 with *e set.
 */
PRMEM_INTERNAL Py_ssize_t
prmem_verify(PoolObject *pool, prmem_verify_finding *out, size_t max_out, prmem_error *e)
{
    if (pool->m->nareas == 0)
        return 0;
    verify_scan s = {pool, NULL, NULL, out, max_out, 0};
    s.order = PyMem_RawMalloc(pool->m->nareas * sizeof(size_t));
    s.covered = PyMem_RawCalloc(pool->m->nareas, sizeof(size_t));
    if (s.order == NULL || s.covered == NULL) {
        PyMem_RawFree(s.order);
        PyMem_RawFree(s.covered);
        return prmem_fail(e, PyExc_MemoryError, "prmem: out of memory for verify()");
    }
    for (size_t i = 0; i < pool->m->nareas; i++)
        s.order[i] = i;
    qsort_r(s.order, pool->m->nareas, sizeof(size_t), by_start, pool);
    int err = 0;
    Py_ssize_t rc = 0;
    if (for_each_mapping(verify_mapping, &s, &err) < 0)
        rc = prmem_fail_errno(e, err, "verify(): cannot read /proc/self/maps: %s",
                              strerror(err));
    else {
        for (size_t i = 0; i < pool->m->nareas; i++) {
            if (s.covered[i] < pool->m->areas[i].size)
                add_finding(&s, i, (uintptr_t)pool->m->areas[i].start,
                            (uintptr_t)pool->m->areas[i].start + pool->m->areas[i].size,
                            PRMEM_VERIFY_NOT_MAPPED, "");
        }
        rc = (Py_ssize_t)s.nfound;
    }
    PyMem_RawFree(s.order);
    PyMem_RawFree(s.covered);
    return rc;
}
