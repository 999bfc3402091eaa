/*
 * Syscalls, chunks and areas: everything in prmem that talks to the kernel's
 * memory management.  See prmem.h for the layout and the locking rule.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "prmem.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif
#ifndef MFD_ALLOW_SEALING
#define MFD_ALLOW_SEALING 0x0002U
#endif
#ifndef F_ADD_SEALS
#define F_ADD_SEALS 1033
#define F_SEAL_SEAL 0x0001
#define F_SEAL_SHRINK 0x0002
#define F_SEAL_GROW 0x0004
#define F_SEAL_WRITE 0x0008
#endif
#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif
#ifndef MAP_NORESERVE
#define MAP_NORESERVE 0
#endif
/* Syscall numbers for calls glibc may not wrap yet (x86_64 / generic). */
#if !defined(SYS_memfd_create) && defined(__NR_memfd_create)
#define SYS_memfd_create __NR_memfd_create
#endif
#ifndef SYS_mseal
#if defined(__x86_64__) || defined(__aarch64__) || defined(__riscv)
#define SYS_mseal 462
#endif
#endif
#ifndef SYS_memfd_secret
#if defined(__x86_64__) || defined(__aarch64__) || defined(__riscv)
#define SYS_memfd_secret 447
#endif
#endif
#if !defined(SYS_pkey_alloc) && defined(__x86_64__)
#define SYS_pkey_alloc 330
#define SYS_pkey_free 331
#endif

PRMEM_INTERNAL size_t prmem_page_size;
PRMEM_INTERNAL int prmem_page_shift;
PRMEM_INTERNAL unsigned prmem_features;
PRMEM_INTERNAL int prmem_enforce = 1;

#ifndef MADV_DONTDUMP
#define MADV_DONTDUMP 16
#endif
#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 0x01
#endif
#if !defined(SYS_mlock2) && defined(__x86_64__)
#define SYS_mlock2 325
#endif

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
static int
protect_range(void *addr, size_t len, int prot)
{
    if (!prmem_enforce)
        return 0;
    return mprotect(addr, len, prot);
}

static int
set_memlock_error(PoolObject *pool, const char *what, size_t size, int err)
{
    struct rlimit lim;
    char limit[64] = "unknown";
    if (getrlimit(RLIMIT_MEMLOCK, &lim) == 0) {
        if (lim.rlim_cur == RLIM_INFINITY)
            snprintf(limit, sizeof(limit), "unlimited");
        else
            snprintf(limit, sizeof(limit), "%llu bytes", (unsigned long long)lim.rlim_cur);
    }
    PyErr_Format(PyExc_MemoryError,
                 "prmem pool %R: cannot lock %zu more bytes in memory for %s (%s): locked "
                 "memory is limited by RLIMIT_MEMLOCK (now %s); raise it with `ulimit -l`, "
                 "LimitMEMLOCK= in systemd or /etc/security/limits.conf, or make the pool "
                 "smaller",
                 pool->name, size, what, strerror(err), limit);
    return -1;
}

/* Largest reservation prmem makes for one chunk when it picks the size
 * itself; a single larger request still gets a chunk of its own size. */
#define PRMEM_MAX_CHUNK_SIZE ((size_t)1 << 30)

PRMEM_INTERNAL int
prmem_set_oserror(const char *syscall_name, int err)
{
    /* OSError(errno, "syscall: strerror") picks the matching subclass
     * (PermissionError for EACCES/EPERM, ...). */
    PyObject *msg = PyUnicode_FromFormat("%s: %s", syscall_name, strerror(err));
    if (msg == NULL)
        return -1;
    PyObject *args = Py_BuildValue("(iN)", err, msg);
    if (args == NULL)
        return -1;
    PyErr_SetObject(PyExc_OSError, args);
    Py_DECREF(args);
    return -1;
}

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

static int
sys_mseal(void *addr, size_t len)
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
        if (sys_mseal(page, 0) == 0)
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

static int
set_nomemory(PoolObject *pool, size_t size, const char *syscall_name, int err)
{
    PyErr_Format(PyExc_MemoryError,
                 "prmem pool %R: cannot reserve %zu bytes (%s: %s)",
                 pool->name, size, syscall_name, strerror(err));
    return -1;
}

static int
grow_array(void **array, size_t *cap, size_t count, size_t item_size)
{
    if (count < *cap)
        return 0;
    size_t new_cap = *cap ? *cap * 2 : 8;
    void *p = PyMem_Realloc(*array, new_cap * item_size);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *array = p;
    *cap = new_cap;
    return 0;
}

/* Reserve a new chunk of `size` bytes (page multiple) and append it. */
static int
chunk_new(PoolObject *pool, size_t size)
{
    if (grow_array((void **)&pool->chunks, &pool->chunks_cap, pool->nchunks,
                   sizeof(prmem_chunk)) < 0)
        return -1;
    if (size > (size_t)LLONG_MAX)
        return set_nomemory(pool, size, "ftruncate", EFBIG);

    /* memfd names show up in /proc/PID/maps as "/memfd:prmem:<pool>"; the
     * kernel limits them to 249 bytes. */
    char name[250];
    snprintf(name, sizeof(name), "prmem:%s", pool->cname);

    /* Without memfd_create() (Linux < 3.17, or filtered by seccomp) the
     * fallback is an unnamed tmpfs file: pwrite() and shared mappings work
     * the same, but it cannot be sealed, so READ_ONLY is enforced by the
     * MMU only (prmem.features lacks "memfd"; prmem info says so). */
    int kind = pool->secret ? PRMEM_BACKING_SECRET
               : (prmem_features & PRMEM_FEAT_MEMFD) ? PRMEM_BACKING_MEMFD
                                                     : PRMEM_BACKING_TMPFILE;
    static const char *const calls[] = {"memfd_create", "open(/dev/shm, O_TMPFILE)",
                                        "memfd_secret"};
    int fd;
    if (kind == PRMEM_BACKING_MEMFD)
        fd = sys_memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    else if (kind == PRMEM_BACKING_TMPFILE)
        fd = open("/dev/shm", O_TMPFILE | O_RDWR | O_CLOEXEC | O_EXCL, 0600);
    else {
#ifdef SYS_memfd_secret
        fd = (int)syscall(SYS_memfd_secret, (unsigned long)O_CLOEXEC);
#else
        fd = -1;
        errno = ENOSYS;
#endif
    }
    if (fd < 0) {
        int err = errno;
        if (err == EMFILE || err == ENFILE || err == ENOMEM)
            return set_nomemory(pool, size, calls[kind], err);
        if (kind == PRMEM_BACKING_TMPFILE) {
            PyErr_Format(pool->mstate->UnsupportedError,
                         "this kernel has no memfd_create() and no O_TMPFILE on /dev/shm "
                         "(%s); prmem has no way to back protected memory",
                         strerror(err));
            return -1;
        }
        if (kind == PRMEM_BACKING_SECRET && (err == ENOSYS || err == EINVAL)) {
            PyErr_Format(pool->mstate->UnsupportedError,
                         "memfd_secret() failed (%s): this kernel cannot back secret pools",
                         strerror(err));
            return -1;
        }
        return prmem_set_oserror(calls[kind], err);
    }
    if (ftruncate(fd, (off_t)size) < 0) {
        int err = errno;
        close(fd);
        if (err == EFBIG || err == EINVAL || err == ENOMEM || err == ENOSPC)
            return set_nomemory(pool, size, "ftruncate", err);
        return prmem_set_oserror("ftruncate", err);
    }
    /* PROT_NONE reservation; MAP_NORESERVE because nothing is committed
     * until an area is opened and touched.  memfd_secret() mappings are
     * locked as a whole, so secret chunks are exactly one area long. */
    void *base = mmap(NULL, size, PROT_NONE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (base == MAP_FAILED) {
        int err = errno;
        close(fd);
        if (kind == PRMEM_BACKING_SECRET && err == EAGAIN)
            return set_memlock_error(pool, "memfd_secret memory", size, err);
        if (err == ENOMEM || err == EOVERFLOW || err == EINVAL)
            return set_nomemory(pool, size, "mmap", err);
        return prmem_set_oserror("mmap", err);
    }
    if (prmem_fault_register(pool, base, size) < 0) {
        int err = errno;
        munmap(base, size);
        close(fd);
        return set_nomemory(pool, size, "fault report registry", err);
    }
    if (pool->dontdump)
        madvise(base, size, MADV_DONTDUMP);
    prmem_chunk *ch = &pool->chunks[pool->nchunks++];
    ch->base = base;
    ch->size = size;
    ch->used = 0;
    ch->fd = fd;
    ch->sealed = 0;
    ch->msealed = 0;
    ch->kind = kind;
    return 0;
}

/* Lock pages as they are touched (MLOCK_ONFAULT), so a large area does not
 * have to be populated up front; plain mlock() where mlock2 is missing. */
static int
lock_range(void *addr, size_t len)
{
#ifdef SYS_mlock2
    if (syscall(SYS_mlock2, addr, len, (unsigned long)MLOCK_ONFAULT) == 0)
        return 0;
    if (errno != ENOSYS && errno != EINVAL)
        return -1;
#endif
    return mlock(addr, len);
}

static size_t
round_up_pages(size_t n)
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
prmem_area_open(PoolObject *pool, size_t need)
{
    if (need > SIZE_MAX - prmem_page_size)
        return set_nomemory(pool, need, "mmap", ENOMEM);
    size_t area_size = round_up_pages(need);
    if (area_size < pool->refill)
        area_size = pool->refill;

    Py_ssize_t prev = pool->cur_area;
    int auto_mode = pool->mode == PRMEM_MODE_AUTO_RO || pool->mode == PRMEM_MODE_AUTO_WR;
    if (auto_mode && prev >= 0 && pool->areas[prev].wexports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "prmem pool %R: this allocation would auto-protect the "
                     "current area, but %zd writable buffer view(s) of it are "
                     "still alive; release them first",
                     pool->name, pool->areas[prev].wexports);
        return -1;
    }
    if (grow_array((void **)&pool->areas, &pool->areas_cap, pool->nareas,
                   sizeof(prmem_area)) < 0)
        return -1;
    if (pool->nareas >= UINT32_MAX) {
        PyErr_SetString(PyExc_MemoryError, "prmem pool has too many areas");
        return -1;
    }

    /* Carve from the last chunk while it has room and is not sealed (a
     * sealed memfd can never be mapped writable again). */
    prmem_chunk *ch = pool->nchunks ? &pool->chunks[pool->nchunks - 1] : NULL;
    if (ch == NULL || ch->sealed || ch->size - ch->used < area_size) {
        size_t chunk_size = area_size;
        if (chunk_size < pool->next_chunk_size && !pool->secret)
            chunk_size = pool->next_chunk_size;
        if (chunk_new(pool, chunk_size) < 0)
            return -1;
        if (pool->next_chunk_size < PRMEM_MAX_CHUNK_SIZE)
            pool->next_chunk_size *= 2;
        ch = &pool->chunks[pool->nchunks - 1];
    }

    char *start = ch->base + ch->used;
    int state = pool->mode == PRMEM_MODE_START_WR ? PRMEM_WRITE_RARE : PRMEM_WRITABLE;
    int prot = state == PRMEM_WRITABLE || !prmem_enforce ? PROT_READ | PROT_WRITE : PROT_READ;
    if (mprotect(start, area_size, prot) < 0) {
        int err = errno;
        if (err == ENOMEM)
            return set_nomemory(pool, area_size, "mprotect", err);
        return prmem_set_oserror("mprotect", err);
    }
    if (pool->mlock_areas && lock_range(start, area_size) < 0) {
        int err = errno;
        mprotect(start, area_size, PROT_NONE); /* leave the pool as it was */
        return set_memlock_error(pool, "lock=True", area_size, err);
    }
    ch->used += area_size;
    prmem_area *area = &pool->areas[pool->nareas];
    area->start = start;
    area->size = area_size;
    area->chunk = (uint32_t)(ch - pool->chunks);
    area->state = (uint8_t)state;
    area->wexports = 0;
    pool->nareas++;
    pool->cur_area = (Py_ssize_t)(pool->nareas - 1);
    pool->cur_off = 0;
    if (state != PRMEM_WRITABLE)
        prmem_fault_protected();

    /* AUTO modes: the area we leave is write-protected now.  An AUTO_RO
     * area is READ_ONLY for the MMU at once; the seal that makes it
     * permanent covers the whole chunk, so it comes with protect(). */
    if (auto_mode && prev >= 0) {
        prmem_area *old = &pool->areas[prev];
        if (old->state == PRMEM_WRITABLE) {
            if (protect_range(old->start, old->size, PROT_READ) < 0)
                return prmem_set_oserror("mprotect", errno);
            old->state = pool->mode == PRMEM_MODE_AUTO_RO ? PRMEM_READ_ONLY : PRMEM_WRITE_RARE;
            prmem_fault_protected();
        }
    }
    return 0;
}

PRMEM_INTERNAL void
prmem_close_current_area(PoolObject *pool)
{
    if (pool->cur_area >= 0) {
        pool->bytes_lost += pool->areas[pool->cur_area].size - pool->cur_off;
        pool->cur_area = -1;
        pool->cur_off = 0;
    }
}

static void
mark_chunk_read_only(PoolObject *pool, size_t ci)
{
    for (size_t i = 0; i < pool->nareas; i++) {
        if (pool->areas[i].chunk == ci)
            pool->areas[i].state = PRMEM_READ_ONLY;
    }
}

/*
 * Make every area of chunk `ci` READ_ONLY for good: seal the memfd against
 * writes, growth and shrinking, re-map the used part read-only (the new VMA
 * has no VM_MAYWRITE, so mprotect(PROT_WRITE) fails with EACCES), unmap the
 * unused tail (its pre-seal mapping could still be made writable), and
 * mseal() the range if the pool asked for it.  The fd stays open: it can no
 * longer write (pwrite fails with EPERM) and it lets destroy() release the
 * file deterministically.
 */
PRMEM_INTERNAL int
prmem_chunk_seal(PoolObject *pool, size_t ci)
{
    prmem_chunk *ch = &pool->chunks[ci];
    int lock_errno = 0;
    if (ch->sealed)
        return 0;
    if (pool->cur_area >= 0 && pool->areas[pool->cur_area].chunk == ci)
        prmem_close_current_area(pool);

    if (prmem_enforce && ch->kind == PRMEM_BACKING_MEMFD) {
        int seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
        if (prmem_features & PRMEM_FEAT_SEAL_FUTURE_WRITE)
            seals |= F_SEAL_FUTURE_WRITE;
        if (fcntl(ch->fd, F_ADD_SEALS, seals) < 0)
            return prmem_set_oserror("fcntl(F_ADD_SEALS)", errno); /* nothing changed */
        /* Only a mapping made after F_SEAL_FUTURE_WRITE lacks the right to
         * become writable again, so the used part is mapped anew, read-only.
         * (Files that cannot be sealed gain nothing from a re-map, and
         * memfd_secret would charge it twice against RLIMIT_MEMLOCK: they
         * are mprotect()ed below.) */
        if (ch->used > 0) {
            if (pool->mlock_areas)
                munlock(ch->base, ch->used); /* so re-locking stays within the limit */
            if (mmap(ch->base, ch->used, PROT_READ, MAP_SHARED | MAP_FIXED, ch->fd, 0) ==
                MAP_FAILED) {
                /* The file is sealed for good; whatever is left of the old
                 * mapping must not stay writable while prmem calls it
                 * READ_ONLY. */
                int err = errno;
                mprotect(ch->base, ch->used, PROT_READ);
                mark_chunk_read_only(pool, ci);
                ch->sealed = 1;
                return prmem_set_oserror("mmap", err);
            }
            /* the new mapping starts without the old one's advice and locks */
            if (pool->dontdump)
                madvise(ch->base, ch->used, MADV_DONTDUMP);
            if (pool->mlock_areas && lock_range(ch->base, ch->used) < 0)
                lock_errno = errno;
        }
    }
    else if (prmem_enforce && ch->used > 0 && mprotect(ch->base, ch->used, PROT_READ) < 0) {
        return prmem_set_oserror("mprotect", errno); /* nothing changed */
    }
    mark_chunk_read_only(pool, ci);
    ch->sealed = 1;
    if (prmem_enforce && ch->size > ch->used) {
        /* the unused tail's mapping predates the seal: it could be made
         * writable, so it goes */
        if (munmap(ch->base + ch->used, ch->size - ch->used) < 0)
            return prmem_set_oserror("munmap", errno);
        ch->size = ch->used;
    }
    prmem_fault_sealed(ch->base, ch->size);
    prmem_fault_protected();
    if (pool->seal && prmem_enforce && ch->used > 0 && (prmem_features & PRMEM_FEAT_MSEAL)) {
        if (sys_mseal(ch->base, ch->used) < 0)
            return prmem_set_oserror("mseal", errno);
        ch->msealed = 1;
    }
    if (lock_errno)
        return set_memlock_error(pool, "lock=True (sealed, but no longer locked)", ch->used,
                                 lock_errno);
    return 0;
}

PRMEM_INTERNAL int
prmem_seal_all(PoolObject *pool)
{
    for (size_t ci = 0; ci < pool->nchunks; ci++) {
        if (prmem_chunk_seal(pool, ci) < 0)
            return -1;
    }
    prmem_close_current_area(pool);
    return 0;
}

/* Move every WRITABLE area to WRITE_RARE (mprotect PROT_READ), merging runs
 * of adjacent areas into one syscall. */
PRMEM_INTERNAL int
prmem_make_write_rare(PoolObject *pool)
{
    size_t i = 0;
    while (i < pool->nareas) {
        if (pool->areas[i].state != PRMEM_WRITABLE) {
            i++;
            continue;
        }
        size_t j = i + 1;
        char *end = pool->areas[i].start + pool->areas[i].size;
        while (j < pool->nareas && pool->areas[j].state == PRMEM_WRITABLE &&
               pool->areas[j].chunk == pool->areas[i].chunk && pool->areas[j].start == end) {
            end += pool->areas[j].size;
            j++;
        }
        if (protect_range(pool->areas[i].start, (size_t)(end - pool->areas[i].start),
                          PROT_READ) < 0)
            return prmem_set_oserror("mprotect", errno);
        for (size_t k = i; k < j; k++)
            pool->areas[k].state = PRMEM_WRITE_RARE;
        prmem_fault_protected();
        i = j;
    }
    prmem_close_current_area(pool);
    return 0;
}

static size_t round_up_pages(size_t n);

/*
 * memfd_secret() files have no write(): a rare write maps the touched pages
 * writable at a second, fresh address for the duration of one copy, then
 * unmaps them.  The pool's own mapping stays read-only throughout; the
 * window is that other threads could write through the alias while it
 * exists, if they knew its address (documented in docs/threat-model.md).
 */
static int
secret_write(const prmem_chunk *ch, off_t off, const void *src, size_t n, int fill_byte)
{
    off_t first = off & ~(off_t)(prmem_page_size - 1);
    size_t len = round_up_pages((size_t)(off - first) + n);
    char *alias = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, ch->fd, first);
    if (alias == MAP_FAILED)
        return prmem_set_oserror("mmap (secret rare write)", errno);
    if (src != NULL)
        memcpy(alias + (off - first), src, n);
    else
        memset(alias + (off - first), fill_byte, n);
    munmap(alias, len);
    return 0;
}

/*
 * Write n bytes at dst through the area's memfd (pwrite), never through a
 * writable mapping: the data stays write-protected in every thread while the
 * write happens, and readers see the new bytes at once through their
 * read-only shared mapping.  With src == NULL, writes fill_byte n times.
 */
PRMEM_INTERNAL int
prmem_file_write(PoolObject *pool, const prmem_area *area, char *dst,
                 const void *src, size_t n, int fill_byte)
{
    const prmem_chunk *ch = &pool->chunks[area->chunk];
    if (ch->sealed) {
        PyErr_Format(pool->mstate->ProtectionError,
                     "prmem pool %R: memory is sealed read-only", pool->name);
        return -1;
    }
    /* A source that overlaps the destination (a view of the same memory)
     * must be staged first: the kernel copies into the page forwards, like
     * memcpy, and so would a copy through the secret alias. */
    if (src != NULL && (const char *)src < dst + n && dst < (const char *)src + n) {
        void *staged = PyMem_Malloc(n);
        if (staged == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(staged, src, n);
        int rc = prmem_file_write(pool, area, dst, staged, n, fill_byte);
        PyMem_Free(staged);
        return rc;
    }
    off_t off = (off_t)(dst - ch->base);
    if (ch->kind == PRMEM_BACKING_SECRET)
        return secret_write(ch, off, src, n, fill_byte);
    unsigned char fill[4096];
    if (src == NULL)
        memset(fill, fill_byte, sizeof(fill));
    while (n > 0) {
        size_t len = n;
        const void *from = src;
        if (src == NULL && len > sizeof(fill))
            len = sizeof(fill);
        if (src == NULL)
            from = fill;
        ssize_t w = pwrite(ch->fd, from, len, off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return prmem_set_oserror("pwrite", errno);
        }
        if (w == 0)
            return prmem_set_oserror("pwrite", EIO);
        n -= (size_t)w;
        off += w;
        if (src != NULL)
            src = (const char *)src + w;
    }
    return 0;
}

/* Call fn(ctx, from, to) for each range of [0, end) of the file that holds
 * data (SEEK_DATA/SEEK_HOLE skip never-touched ranges, so a huge sparse
 * area costs nothing).  Stops at the first fn() that returns -1. */
PRMEM_INTERNAL int
prmem_for_each_data_range(int fd, off_t end, int (*fn)(void *, off_t, off_t), void *ctx)
{
    off_t off = 0;
    while (off < end) {
        off_t data = lseek(fd, off, SEEK_DATA);
        if (data < 0 || data >= end)
            break;
        off_t hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0 || hole > end)
            hole = end;
        if (fn(ctx, data, hole) < 0)
            return -1;
        off = hole;
    }
    return 0;
}

static int
write_zeros(void *ctx, off_t from, off_t to)
{
    static const char zeros[4096];
    int fd = *(int *)ctx;
    while (from < to) {
        size_t len = (size_t)(to - from) < sizeof(zeros) ? (size_t)(to - from) : sizeof(zeros);
        ssize_t w = pwrite(fd, zeros, len, from);
        if (w <= 0) {
            if (w < 0 && errno == EINTR)
                continue;
            return -1;
        }
        from += w;
    }
    return 0;
}

/* Overwrite with zeros the pages of an unsealed chunk that hold data, so
 * its contents do not survive in freed pages. */
static void
zero_chunk_data(prmem_chunk *ch)
{
    prmem_for_each_data_range(ch->fd, (off_t)ch->used, write_zeros, &ch->fd);
}

/* Give every page of the pool back to the kernel.  Unsealed memory is zeroed
 * first; sealed memory cannot be written by anyone, prmem included, so the
 * kernel gets it as is (it zeroes pages before reusing them).  mseal()ed
 * chunks cannot be unmapped at all and stay until the process exits. */
PRMEM_INTERNAL void
prmem_pool_release(PoolObject *pool)
{
    for (size_t ci = 0; ci < pool->nchunks; ci++) {
        prmem_chunk *ch = &pool->chunks[ci];
        if (ch->fd >= 0) {
            /* memfd_secret pages are zeroed by the kernel when freed */
            if (!ch->sealed && ch->kind != PRMEM_BACKING_SECRET)
                zero_chunk_data(ch);
            close(ch->fd);
            ch->fd = -1;
        }
        if (ch->msealed) {
            prmem_fault_orphan(ch->base);
        }
        else {
            prmem_fault_unregister(ch->base);
            if (ch->size > 0)
                munmap(ch->base, ch->size);
        }
    }
    PyMem_Free(pool->chunks);
    PyMem_Free(pool->areas);
    pool->chunks = NULL;
    pool->areas = NULL;
    pool->nchunks = pool->chunks_cap = 0;
    pool->nareas = pool->areas_cap = 0;
    pool->cur_area = -1;
}
