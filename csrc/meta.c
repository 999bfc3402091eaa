/*
 * prmem's own metadata, write-rare: the bottom floor (calls nothing of
 * prmem's; every other file may call it).
 *
 * One address range is reserved at module init (PRMEM_META_RESERVE bytes)
 * and mapped MAP_SHARED, PROT_READ, from one memfd named "prmem-metadata"
 * (an unnamed /dev/shm file without memfd_create).  The file is sparse: a
 * page costs memory only once something is stored in it.  Nothing ever maps
 * it writable; metadata changes only through prmem_meta_write(), a pwrite()
 * on the file at (dst - base) -- the mechanism of rare_write() -- so no other
 * thread can store to it in the meantime, and a stray native store into it
 * faults.  An address alone tells protected metadata apart: it lies in
 * [prmem_meta_base, prmem_meta_base + PRMEM_META_RESERVE).
 *
 * Layout of the range:
 *   page 0                the allocator's own state (struct meta_header)
 *   [RECORDS, HEAP)       fixed-size pool records (PRMEM_META_RECORD bytes):
 *                         a record boundary is one the address shows
 *   [HEAP, RESERVE)       arrays, power-of-two size classes with free lists
 * Free blocks link through their first word (written with pwrite too).
 * Pages are fallocate()d as the allocator hands them out, so a later
 * pwrite() into them cannot fail for lack of memory; if one ever does fail
 * anyway, metadata and the memory it describes would disagree, so prmem
 * aborts the process (fail closed) rather than go on.
 *
 * Locking: meta_lock is a leaf lock below every other prmem lock, held for
 * each write and allocation (pure C, no Python API).  fork.c holds it across
 * fork(): prmem_meta_fork_prepare() copies the used parts into a new file
 * while nothing can change them, the child maps that copy over the range
 * before anything else runs (prmem_meta_fork_child()), and parent and child
 * never see each other's metadata writes.  Copying in the parent, before
 * fork(), rather than in the child avoids a window in which the parent's
 * writes after fork() would still reach the child's view.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "prmem.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define RESERVE PRMEM_META_RESERVE
#define RECORDS PRMEM_META_RECORDS         /* after the header pages */
#define HEAP PRMEM_META_HEAP               /* records: 64 MiB - 64 KiB */
#define MIN_CLASS 5                        /* 32 bytes */
#define NCLASSES 26                        /* up to 1 GiB (never reached) */
#define COMMIT_STEP ((size_t)64 << 10)     /* fallocate granularity */

struct meta_header {
    size_t rec_top;              /* records handed out so far end here (offset);
                                  * first: prmem_meta_is_record() reads it */
    size_t rec_free;             /* offset of the first free record, 0: none */
    size_t heap_top;             /* offset */
    size_t heap_free[NCLASSES];  /* offsets of free blocks per class, 0: none */
    size_t committed_rec;        /* fallocate()d up to here (offsets) */
    size_t committed_heap;
    size_t fault_root;           /* fault.c's root block (offset), 0: none yet;
                                  * set once, read by the SIGSEGV handler */
    /* The descriptor of this file, through which every change is written,
     * and the file's identity, checked before each write; the spare file
     * kept for fork() (-1: none) and its identity.  Here rather than in
     * ordinary memory: they decide where metadata writes go. */
    int fd, spare_fd;
    dev_t dev, spare_dev;
    ino_t ino, spare_ino;
};

PRMEM_INTERNAL union prmem_root_page prmem_root_page
    __attribute__((aligned(PRMEM_ROOT_SIZE)));

static int root_state;

PRMEM_INTERNAL int
prmem_root_state(void)
{
    return root_state;
}

PRMEM_INTERNAL void
prmem_root_seal(void)
{
    prmem_root.ready = 1;
    if (prmem_page_size == 0 || prmem_page_size > PRMEM_ROOT_SIZE)
        return; /* the root does not fill whole pages: cannot protect it alone */
    if (mprotect(&prmem_root_page, sizeof(prmem_root_page), PROT_READ) < 0)
        return;
    root_state = 1;
    if ((prmem_features & PRMEM_FEAT_MSEAL) &&
        syscall(SYS_mseal, &prmem_root_page, sizeof(prmem_root_page), 0UL) == 0)
        root_state = 2;
}
static pthread_mutex_t meta_lock = PTHREAD_MUTEX_INITIALIZER;
/* Between prmem_meta_fork_prepare() and the fork hooks after it (meta_lock
 * held throughout in the parent): the copy made for the child, and the
 * parent's metadata and spare descriptors, which the child closes. */
static int fork_fd = -1;
static int fork_parent_fd = -1, fork_parent_spare = -1;
/* their identities as of prepare: another thread may close() or dup2()
 * a number between prepare and fork(), and the child checks before it maps
 * or closes anything */
static dev_t fork_dev, fork_parent_dev, fork_spare_dev;
static ino_t fork_ino, fork_parent_ino, fork_spare_ino;
static int new_file(void);
static int fd_is(int fd, dev_t want_dev, ino_t want_ino);

#define HDR ((const struct meta_header *)prmem_meta_base)
static void write_locked(void *dst, const void *src, size_t n);
#define HSETV(field, value)                                                    \
    do {                                                                       \
        __typeof__(HDR->field) v_ = (value);                                   \
        write_locked((void *)&HDR->field, &v_, sizeof(v_));                    \
    } while (0)

/* With meta_lock held (or at init): a new spare file, recorded in the
 * header, so that a fork() in a process out of descriptors still gives the
 * child metadata of its own. */
static void
new_spare(void)
{
    dev_t dev = 0;
    ino_t ino = 0;
    int fd = new_file();
    if (fd >= 0 && prmem_fd_identity(fd, &dev, &ino) < 0) {
        close(fd);
        fd = -1;
    }
    HSETV(spare_dev, dev);
    HSETV(spare_ino, ino);
    HSETV(spare_fd, fd);
}

/* With meta_lock held: the spare file, now no longer the spare; -1 if there
 * is none, or if its descriptor was closed or replaced behind prmem's back
 * (not ours: left alone). */
static int
take_spare(void)
{
    int fd = HDR->spare_fd;
    if (fd < 0)
        return -1;
    HSETV(spare_fd, -1);
    return fd_is(fd, HDR->spare_dev, HDR->spare_ino) ? fd : -1;
}

static int
new_file(void)
{
    int fd = -1;
#ifdef SYS_memfd_create
    if (prmem_features & PRMEM_FEAT_MEMFD)
        fd = (int)syscall(SYS_memfd_create, "prmem-metadata", MFD_CLOEXEC);
#endif
    if (fd < 0)
        fd = open("/dev/shm", O_TMPFILE | O_RDWR | O_CLOEXEC | O_EXCL, 0600);
    return fd;
}

/* Nonzero once metadata is frozen: read-only for good, never mapped
 * writable, every change refused before it starts (prmem_meta_frozen).  The
 * errno of the failure if this fork()ed child has no metadata file of its
 * own (PRMEM_FROZEN_AT_FORK), EBADF if the metadata descriptor was closed or
 * replaced behind prmem's back (PRMEM_FROZEN_FILE_LOST). */
static int frozen_errno;
static int frozen_why;

/* fd names the file (dev, ino).  Only a bad descriptor or another file
 * says no: a failure to ask (ENOMEM, say) is tried again, twice. */
static int
fd_is(int fd, dev_t want_dev, ino_t want_ino)
{
    for (int tries = 0; fd >= 0; tries++) {
        dev_t dev;
        ino_t ino;
        if (prmem_fd_identity(fd, &dev, &ino) == 0)
            return dev == want_dev && ino == want_ino;
        if (errno == EBADF || tries == 2)
            return 0;
    }
    return 0;
}

/* The metadata descriptor still names the file mapped at the range */
static int
file_is_ours(void)
{
    return fd_is(HDR->fd, HDR->dev, HDR->ino);
}

_Static_assert(sizeof(prmem_pool_meta) <= PRMEM_META_RECORD, "pool record too large");
_Static_assert(offsetof(struct meta_header, rec_top) == 0,
               "prmem_meta_is_record() reads rec_top as the first word");

PRMEM_INTERNAL int
prmem_meta_frozen(void)
{
    return __atomic_load_n(&frozen_errno, __ATOMIC_RELAXED);
}

PRMEM_INTERNAL int
prmem_meta_frozen_why(void)
{
    /* acquire: pairs with freeze()'s release store, so why is the one
     * stored before errno */
    return __atomic_load_n(&frozen_errno, __ATOMIC_ACQUIRE)
               ? __atomic_load_n(&frozen_why, __ATOMIC_RELAXED)
               : 0;
}

static int unrecorded_sharing;

PRMEM_INTERNAL void
prmem_meta_note_unrecorded_sharing(void)
{
    __atomic_store_n(&unrecorded_sharing, 1, __ATOMIC_RELAXED);
}

PRMEM_INTERNAL int
prmem_meta_unrecorded_sharing(void)
{
    return __atomic_load_n(&unrecorded_sharing, __ATOMIC_RELAXED);
}

static void
freeze(int why, int err)
{
    __atomic_store_n(&frozen_why, why, __ATOMIC_RELAXED);
    __atomic_store_n(&frozen_errno, err, __ATOMIC_RELEASE);
}

/* With meta_lock held: freeze if the metadata descriptor is lost */
static void
freeze_if_lost(void)
{
    if (!prmem_meta_frozen() && !file_is_ours())
        freeze(PRMEM_FROZEN_FILE_LOST, EBADF);
}

PRMEM_INTERNAL int
prmem_meta_check_file(void)
{
    int err = prmem_meta_frozen();
    if (err != 0 || prmem_meta_base == NULL)
        return err;
    pthread_mutex_lock(&meta_lock);
    freeze_if_lost();
    pthread_mutex_unlock(&meta_lock);
    return prmem_meta_frozen();
}

static void
fail_closed(const char *msg, size_t len)
{
    ssize_t ignored = write(STDERR_FILENO, msg, len);
    (void)ignored;
    abort();
}
#define FAIL_CLOSED(text) fail_closed(text, sizeof(text) - 1)

/* n bytes at offset off of file fd; aborts if the write fails */
static void
write_file(int fd, size_t off, const void *src, size_t n)
{
    const char *s = src;
    while (n > 0) {
        ssize_t w = pwrite(fd, s, n, (off_t)off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            FAIL_CLOSED("prmem: a write to prmem's metadata failed; aborting rather than go "
                        "on with inconsistent metadata\n");
        s += w;
        n -= (size_t)w;
        off += (size_t)w;
    }
}

/* The metadata descriptor, checked to still be the file mapped at the
 * range; aborts otherwise (callers checked prmem_meta_frozen() and, before
 * the change began, prmem_meta_check_file(): reaching this is a prmem bug
 * or a descriptor replaced during the change). */
static int
checked_fd(void)
{
    if (prmem_meta_frozen() || HDR->fd < 0)
        FAIL_CLOSED("prmem: a change to frozen metadata (a fork()ed child without a metadata "
                    "file, or a lost metadata descriptor); aborting\n");
    if (!file_is_ours())
        FAIL_CLOSED("prmem: prmem's metadata descriptor was closed or replaced during a "
                    "metadata change; aborting rather than write metadata into another "
                    "file\n");
    return HDR->fd;
}

static void
write_locked(void *dst, const void *src, size_t n)
{
    char *d = dst;
    if (d < prmem_meta_base || d + n > prmem_meta_base + RESERVE || n > RESERVE)
        abort(); /* a prmem bug: never write outside the metadata file */
    write_file(checked_fd(), (size_t)(d - prmem_meta_base), src, n);
}

#define HSET(field, value)                                                     \
    do {                                                                       \
        size_t v_ = (value);                                                   \
        write_locked((void *)&HDR->field, &v_, sizeof(v_));                    \
    } while (0)

PRMEM_INTERNAL int
prmem_meta_init(void)
{
    if (prmem_meta_base != NULL)
        return 0;
    int fd = new_file();
    if (fd < 0)
        return -1;
    dev_t dev;
    ino_t ino;
    void *base = MAP_FAILED;
    if (ftruncate(fd, (off_t)RESERVE) < 0 ||
        fallocate(fd, 0, 0, (off_t)prmem_page_size) < 0 ||
        prmem_fd_identity(fd, &dev, &ino) < 0 ||
        (base = mmap(NULL, RESERVE, PROT_READ, MAP_SHARED | MAP_NORESERVE, fd, 0)) ==
            MAP_FAILED) {
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    madvise(base, RESERVE, MADV_DONTDUMP);
    struct meta_header h;
    memset(&h, 0, sizeof(h));
    h.rec_top = RECORDS;
    h.heap_top = HEAP;
    h.committed_rec = RECORDS;
    h.committed_heap = HEAP;
    h.fd = fd;
    h.dev = dev;
    h.ino = ino;
    h.spare_fd = -1;
    write_file(fd, 0, &h, sizeof(h));
    prmem_meta_base = base;
    pthread_mutex_lock(&meta_lock);
    new_spare();
    pthread_mutex_unlock(&meta_lock);
    return 0;
}

PRMEM_INTERNAL void
prmem_meta_write(void *dst, const void *src, size_t n)
{
    char *d = dst;
    /* pool records and heap blocks only: the header is the allocator's */
    if (d < prmem_meta_base + RECORDS || d + n > prmem_meta_base + RESERVE || d + n < d)
        abort();
    pthread_mutex_lock(&meta_lock);
    write_file(checked_fd(), (size_t)(d - prmem_meta_base), src, n);
    pthread_mutex_unlock(&meta_lock);
}

/* Make [from, to) backed by allocated pages; 0, or -1 (ENOMEM) */
static int
commit(size_t field_off, size_t current, size_t to)
{
    if (to <= current)
        return 0;
    size_t upto = (to + COMMIT_STEP - 1) & ~(COMMIT_STEP - 1);
    if (fallocate(checked_fd(), 0, (off_t)current, (off_t)(upto - current)) < 0) {
        if (errno != EOPNOTSUPP)
            return -1;
    }
    size_t v = upto;
    write_locked(prmem_meta_base + field_off, &v, sizeof(v));
    return 0;
}

PRMEM_INTERNAL void *
prmem_meta_record_alloc(void)
{
    if (prmem_meta_frozen())
        return NULL;
    void *rec = NULL;
    pthread_mutex_lock(&meta_lock);
    if (HDR->rec_free != 0) {
        size_t off = HDR->rec_free;
        size_t next;
        memcpy(&next, prmem_meta_base + off, sizeof(next));
        HSET(rec_free, next);
        rec = prmem_meta_base + off;
        static const char zeros[PRMEM_META_RECORD];
        write_file(checked_fd(), off, zeros, sizeof(zeros));
    }
    else if (HDR->rec_top + PRMEM_META_RECORD <= HEAP &&
             commit(offsetof(struct meta_header, committed_rec), HDR->committed_rec,
                    HDR->rec_top + PRMEM_META_RECORD) == 0) {
        rec = prmem_meta_base + HDR->rec_top;
        HSET(rec_top, HDR->rec_top + PRMEM_META_RECORD);
    }
    pthread_mutex_unlock(&meta_lock);
    return rec;
}

PRMEM_INTERNAL void
prmem_meta_record_free(void *rec)
{
    if (rec == NULL || !prmem_meta_is_record(rec))
        return;
    pthread_mutex_lock(&meta_lock);
    static const char zeros[PRMEM_META_RECORD];
    size_t off = (size_t)((char *)rec - prmem_meta_base);
    write_file(checked_fd(), off, zeros, sizeof(zeros)); /* the back-reference goes */
    size_t next = HDR->rec_free;
    write_file(checked_fd(), off, &next, sizeof(next));
    HSET(rec_free, off);
    pthread_mutex_unlock(&meta_lock);
}

static int
size_class(size_t n)
{
    int k = MIN_CLASS;
    while (k < MIN_CLASS + NCLASSES && ((size_t)1 << k) < n)
        k++;
    return k < MIN_CLASS + NCLASSES ? k - MIN_CLASS : -1;
}

/* n bytes of zeroed metadata for an array, or NULL (out of memory or
 * address space).  Free with prmem_meta_free(p, n), n as allocated. */
PRMEM_INTERNAL void *
prmem_meta_alloc(size_t n)
{
    int c = size_class(n ? n : 1);
    if (c < 0 || prmem_meta_frozen())
        return NULL;
    size_t sz = (size_t)1 << (c + MIN_CLASS);
    void *p = NULL;
    pthread_mutex_lock(&meta_lock);
    if (HDR->heap_free[c] != 0) {
        size_t off = HDR->heap_free[c];
        size_t next;
        memcpy(&next, prmem_meta_base + off, sizeof(next));
        HSET(heap_free[c], next);
        p = prmem_meta_base + off;
        write_file(checked_fd(), off, &(size_t){0}, sizeof(size_t));
        /* the rest was zeroed when it was freed */
    }
    else {
        size_t align = sz < prmem_page_size ? sz : prmem_page_size;
        size_t off = (HDR->heap_top + align - 1) & ~(align - 1);
        if (off <= RESERVE && sz <= RESERVE - off &&
            commit(offsetof(struct meta_header, committed_heap), HDR->committed_heap,
                   off + sz) == 0) {
            HSET(heap_top, off + sz);
            p = prmem_meta_base + off;
        }
    }
    pthread_mutex_unlock(&meta_lock);
    return p;
}

PRMEM_INTERNAL void
prmem_meta_free(void *p, size_t n)
{
    if (p == NULL)
        return;
    int c = size_class(n ? n : 1);
    char *d = p;
    if (c < 0 || d < prmem_meta_base + HEAP || d >= prmem_meta_base + RESERVE)
        abort();
    size_t sz = (size_t)1 << (c + MIN_CLASS);
    pthread_mutex_lock(&meta_lock);
    if (sz >= COMMIT_STEP) {
        /* zero and free the pages, then allocate them again */
        fallocate(checked_fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)(d - prmem_meta_base), (off_t)sz);
        fallocate(checked_fd(), 0, (off_t)(d - prmem_meta_base), (off_t)sz);
    }
    else {
        static const char zeros[4096];
        for (size_t done = 0; done < sz; done += sizeof(zeros)) {
            size_t k = sz - done < sizeof(zeros) ? sz - done : sizeof(zeros);
            write_file(checked_fd(), (size_t)(d - prmem_meta_base) + done, zeros, k);
        }
    }
    size_t off = (size_t)(d - prmem_meta_base);
    size_t next = HDR->heap_free[c];
    write_file(checked_fd(), off, &next, sizeof(next));
    HSET(heap_free[c], off);
    pthread_mutex_unlock(&meta_lock);
}

PRMEM_INTERNAL int
prmem_meta_grow(const void *const *array, const size_t *cap, size_t count, size_t item_size)
{
    if (count < *cap)
        return 0;
    size_t new_cap = *cap ? *cap * 2 : 8;
    if (new_cap > RESERVE / item_size)
        return -1;
    void *p = prmem_meta_alloc(new_cap * item_size);
    if (p == NULL)
        return -1;
    const void *old = *array;
    size_t old_cap = *cap;
    if (old != NULL && count > 0)
        prmem_meta_write(p, old, count * item_size);
    META_SET(*(const void **)array, p);
    META_SET(*(size_t *)cap, new_cap);
    if (old != NULL)
        prmem_meta_free((void *)old, old_cap * item_size);
    return 0;
}

/* fault.c's root block: where the SIGSEGV handler starts reading the fault
 * registry.  Its offset is kept in the header, so the handler follows no
 * pointer from ordinary memory (only prmem_meta_base itself).  Allocated
 * on first use (size bytes); NULL if none could be. */
PRMEM_INTERNAL void *
prmem_meta_fault_root(size_t size)
{
    if (prmem_meta_base == NULL)
        return NULL;
    size_t off = __atomic_load_n(&HDR->fault_root, __ATOMIC_RELAXED);
    if (off != 0 || size == 0)
        return off != 0 ? prmem_meta_base + off : NULL;
    char *p = prmem_meta_alloc(size);
    if (p == NULL)
        return NULL;
    pthread_mutex_lock(&meta_lock);
    HSET(fault_root, (size_t)(p - prmem_meta_base));
    pthread_mutex_unlock(&meta_lock);
    return p;
}

PRMEM_INTERNAL void
prmem_meta_set_area_states(const prmem_area *areas, size_t from, size_t to, uint8_t state)
{
    prmem_area buf[128];
    while (from < to) {
        size_t n = to - from < 128 ? to - from : 128;
        memcpy(buf, areas + from, n * sizeof(prmem_area));
        for (size_t k = 0; k < n; k++)
            buf[k].state = state;
        prmem_meta_write((void *)(areas + from), buf, n * sizeof(prmem_area));
        from += n;
    }
}

PRMEM_INTERNAL const prmem_pool_meta *
prmem_meta_record_at(size_t i)
{
    if (prmem_meta_base == NULL)
        return NULL;
    size_t top = __atomic_load_n(&HDR->rec_top, __ATOMIC_RELAXED);
    if (top < RECORDS || i >= (top - RECORDS) / PRMEM_META_RECORD)
        return NULL;
    return (const prmem_pool_meta *)(prmem_meta_base + RECORDS + i * PRMEM_META_RECORD);
}

PRMEM_INTERNAL int
prmem_meta_contains(const void *p, size_t n)
{
    uintptr_t a = (uintptr_t)p, b = (uintptr_t)prmem_meta_base;
    return prmem_meta_base != NULL && a >= b + RECORDS && a <= b + RESERVE &&
           n <= b + RESERVE - a;
}

/* ------------------------------------------------------------- fork() */

static void
copy_range(int to, size_t from_off, size_t end)
{
    if (end > from_off)
        write_file(to, from_off, prmem_meta_base + from_off, end - from_off);
}

/* Allocate the pages of [from, to) of file fd; 0, or -1 */
static int
reserve(int fd, size_t from, size_t to)
{
    if (to <= from || fallocate(fd, 0, (off_t)from, (off_t)(to - from)) == 0)
        return 0;
    return errno == EOPNOTSUPP ? 0 : -1;
}

/* With every pool lock held: take meta_lock and copy the used parts into a
 * new file for the child (fork_fd; -1 if that fails: the child makes a
 * private snapshot then).  The copy's header already names the copy's own
 * descriptor (the same number in the child) and no spare. */
PRMEM_INTERNAL void
prmem_meta_fork_prepare(void)
{
    if (prmem_meta_base == NULL)
        return;
    pthread_mutex_lock(&meta_lock);
    /* Lost since prepare()'s check (fork.c): frozen now, before anything
     * writes metadata; the child then inherits frozen metadata.  The child
     * closes its copies of these, unless a number no longer names prmem's
     * file (then it is someone else's). */
    int ours = file_is_ours();
    if (!ours && !prmem_meta_frozen())
        freeze(PRMEM_FROZEN_FILE_LOST, EBADF);
    fork_parent_fd = ours ? HDR->fd : -1;
    fork_parent_dev = HDR->dev;
    fork_parent_ino = HDR->ino;
    fork_parent_spare = fd_is(HDR->spare_fd, HDR->spare_dev, HDR->spare_ino) ? HDR->spare_fd : -1;
    fork_spare_dev = HDR->spare_dev;
    fork_spare_ino = HDR->spare_ino;
    /* a new file, or else the spare (out of descriptors, or the new file
     * could not be given its pages) */
    int fd = -1;
    dev_t dev;
    ino_t ino;
    for (int attempt = 0; attempt < 2 && fd < 0; attempt++) {
        if (attempt == 0)
            fd = new_file();
        else if (!prmem_meta_frozen()) {
            fd = take_spare();
            fork_parent_spare = -1; /* the child's file now, or not ours */
        }
        if (fd >= 0 && (ftruncate(fd, (off_t)RESERVE) < 0 ||
                        reserve(fd, 0, HDR->committed_rec) < 0 ||
                        reserve(fd, HEAP, HDR->committed_heap) < 0 ||
                        prmem_fd_identity(fd, &dev, &ino) < 0)) {
            close(fd);
            fd = -1;
        }
    }
    if (fd >= 0) {
        copy_range(fd, 0, HDR->rec_top);
        copy_range(fd, HEAP, HDR->heap_top);
        struct meta_header h;
        memcpy(&h, HDR, sizeof(h));
        h.fd = fd;
        h.dev = dev;
        h.ino = ino;
        h.spare_fd = -1;
        h.spare_dev = 0;
        h.spare_ino = 0;
        write_file(fd, 0, &h, sizeof(h));
        fork_dev = dev;
        fork_ino = ino;
    }
    fork_fd = fd;
}

PRMEM_INTERNAL void
prmem_meta_fork_parent(void)
{
    if (prmem_meta_base == NULL)
        return;
    if (fork_fd >= 0 && fd_is(fork_fd, fork_dev, fork_ino))
        close(fork_fd);
    fork_fd = fork_parent_fd = fork_parent_spare = -1;
    freeze_if_lost(); /* maybe lost while fork() ran */
    if (HDR->spare_fd < 0 && !prmem_meta_frozen())
        new_spare();
    pthread_mutex_unlock(&meta_lock);
}

/* In the child, before anything reads or writes metadata again. */
PRMEM_INTERNAL void
prmem_meta_fork_child(void)
{
    if (prmem_meta_base == NULL)
        return;
    /* each number is used only if it still names the file it named in
     * prepare (a parent thread may have closed or replaced it since) */
    int fd = fd_is(fork_fd, fork_dev, fork_ino) ? fork_fd : -1;
    int parent_fd = fd_is(fork_parent_fd, fork_parent_dev, fork_parent_ino) ? fork_parent_fd : -1;
    if (fd_is(fork_parent_spare, fork_spare_dev, fork_spare_ino))
        close(fork_parent_spare); /* the parent's */
    fork_fd = fork_parent_fd = fork_parent_spare = -1;
    if (prmem_meta_frozen()) /* already (descriptor lost): fork.c snapshots */
        freeze(PRMEM_FROZEN_INHERITED, prmem_meta_frozen());
    if (fd >= 0) {
        if (mmap(prmem_meta_base, RESERVE, PROT_READ, MAP_SHARED | MAP_NORESERVE | MAP_FIXED,
                 fd, 0) == MAP_FAILED)
            abort(); /* never go on writing the parent's metadata */
    }
    else {
        /* No file at all (the process was out of descriptors and memory
         * for one): a private read-only snapshot, copied before the parent
         * can change anything of what is in use (it waits in prmem's fork
         * hooks holding meta_lock until fork() returns there, and only the
         * used parts as of prepare matter).  It is never made writable:
         * metadata is frozen in this child, every change is refused
         * (prmem_meta_frozen) and no pool can be created. */
        size_t used_rec = HDR->rec_top, heap_top = HDR->heap_top;
        char *copy = mmap(NULL, RESERVE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (copy == MAP_FAILED)
            abort();
        memcpy(copy, prmem_meta_base, used_rec);
        memcpy(copy + HEAP, prmem_meta_base + HEAP, heap_top - HEAP);
        if (mprotect(copy, RESERVE, PROT_READ) < 0)
            abort();
        if (mremap(copy, RESERVE, RESERVE, MREMAP_MAYMOVE | MREMAP_FIXED, prmem_meta_base) ==
            MAP_FAILED)
            abort();
        freeze(PRMEM_FROZEN_AT_FORK, EMFILE);
    }
    madvise(prmem_meta_base, RESERVE, MADV_DONTDUMP);
    if (parent_fd >= 0)
        close(parent_fd);
    if (fd >= 0 && !prmem_meta_frozen())
        new_spare();
    pthread_mutex_unlock(&meta_lock);
}
