/*
 * prmem._core: internal header shared by the C files of the extension.
 *
 * Memory layout (see docs/design.md for the long version):
 *
 *   pool ──> chunks: each chunk is one memfd, ftruncate'd to the chunk size
 *            (sparse, costs nothing until touched) and mapped MAP_SHARED as
 *            one contiguous reservation with PROT_NONE.  File offset ==
 *            offset inside the reservation, so neighbouring areas with the
 *            same protection merge into one VMA.
 *        ──> areas: page-aligned, page-granular ranges carved from a chunk in
 *            order.  Opening an area is one mprotect() of the reserved range.
 *            Allocations are bump-allocated from the current area.
 *
 *   WRITABLE    mapping PROT_READ|PROT_WRITE
 *   WRITE_RARE  mapping PROT_READ; written only with pwrite() on the memfd,
 *               so the data is never mapped writable again
 *   READ_ONLY   the whole chunk is sealed (F_SEAL_FUTURE_WRITE, SHRINK, GROW),
 *               re-mapped read-only after the seal so the VMA loses
 *               VM_MAYWRITE (mprotect(PROT_WRITE) -> EACCES), and the unused
 *               tail of the reservation is unmapped.  Sealing covers a whole
 *               chunk, so it happens at protect()/make_ro(); an AUTO_RO area
 *               left behind by a new area is PROT_READ (READ_ONLY for the
 *               MMU) until then.  Invariant: sealed chunk => READ_ONLY areas.
 *
 * Locking (the lock rule): every field below that decides what may be
 * written (states, bounds, export counts, the chunk/area tables) is read and
 * written only with pool->lock held.  While any prmem lock is held:
 *   - no Python code runs: no object formatting (%R/%S), no allocation of
 *     Python objects (which can start the collector and run finalisers), no
 *     callbacks, no exception creation.  An error is recorded as plain C
 *     values in a prmem_error and raised with prmem_raise() after unlocking;
 *     names come from pool->cname, a C copy made at __init__;
 *   - the GIL is not released, so a holder never waits for the GIL; the
 *     one exception is a rare write of PRMEM_RARE_WRITE_NOGIL bytes or more,
 *     which releases the GIL around its pwrite() (pure C) and releases the
 *     pool lock *before* taking the GIL back, so it still never waits for
 *     the GIL while holding the lock.
 * A thread that must wait for a pool lock does not hold the GIL while it
 * waits (prmem_pool_lock() releases it and retries).  So the lock and the
 * GIL cannot deadlock, and no finaliser or signal handler can re-enter a
 * pool while its lock is held.  Lock order: fork registry lock -> pool lock
 * -> fault registry lock or unshare.c's sharers lock; those last two are
 * leaf locks around short pure-C sections.  A rare write that must first
 * copy memory shared with a fork()ed process (unshare.c) releases the GIL
 * for the copy and, like a large write, the pool lock before retaking it.
 */
#ifndef PRMEM_H
#define PRMEM_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <structmember.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <errno.h>
#include <string.h>

/* Kernel interfaces older C libraries may not name. */
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

#ifndef MADV_DONTDUMP
#define MADV_DONTDUMP 16
#endif
#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 0x01
#endif
#if !defined(SYS_mlock2) && defined(__x86_64__)
#define SYS_mlock2 325
#endif


#define PRMEM_INTERNAL __attribute__((visibility("hidden")))

/*
 * prmem's root: the values set once, at the first module init, that decide
 * where every other piece of state is (the metadata range) and whether
 * pages get protected at all.  Once set they are made read-only for the
 * life of the process (mprotect, then mseal where the kernel has it): the
 * counterpart of the kernel's __ro_after_init for prmem's own globals.
 * The struct fills its own page(s) of the extension's data, so its address
 * is a link-time constant (hidden visibility: PC-relative), not a pointer
 * kept in writable memory.  meta.c owns it (prmem_root_seal).
 */
#define PRMEM_ROOT_SIZE 65536 /* the largest page size prmem expects */
struct prmem_root {
    char *meta_base;     /* prmem's metadata range (meta.c) */
    size_t page_size;
    unsigned features;   /* PRMEM_FEAT_* the kernel has, minus disabled ones */
    int page_shift;
    int enforce;         /* 0 when PRMEM_ENFORCE=0: states and checks as
                          * usual, pages never protected */
    int ready;           /* set: later module inits leave the root alone */
};
union prmem_root_page {
    struct prmem_root r;
    char page[PRMEM_ROOT_SIZE];
};
extern PRMEM_INTERNAL union prmem_root_page prmem_root_page;
#define prmem_root (prmem_root_page.r)
#define prmem_meta_base (prmem_root.meta_base)
#define prmem_page_size (prmem_root.page_size)
#define prmem_page_shift (prmem_root.page_shift)
#define prmem_features (prmem_root.features)
#define prmem_enforce (prmem_root.enforce)

PRMEM_INTERNAL int prmem_sys_mseal(void *addr, size_t len);

/* Values shared with prmem.State / prmem.Mode (src/prmem/pool.py). */
enum prmem_state {
    PRMEM_WRITABLE = 0,
    PRMEM_WRITE_RARE = 1,
    PRMEM_READ_ONLY = 2,
    PRMEM_NSTATES = 3,
};

enum prmem_mode {
    PRMEM_MODE_RO = 0,
    PRMEM_MODE_WR = 1,
    PRMEM_MODE_AUTO_RO = 2,
    PRMEM_MODE_AUTO_WR = 3,
    PRMEM_MODE_START_WR = 4,
    PRMEM_NMODES = 5,
};

/* Feature bits, filled once at module import by prmem_probe_features(). */
enum prmem_feature {
    PRMEM_FEAT_MEMFD = 1u << 0,
    PRMEM_FEAT_SEAL_FUTURE_WRITE = 1u << 1,
    PRMEM_FEAT_MSEAL = 1u << 2,
    PRMEM_FEAT_MEMFD_SECRET = 1u << 3,
    PRMEM_FEAT_PKEYS = 1u << 4,
};

/* What backs a chunk. */
enum prmem_backing {
    PRMEM_BACKING_MEMFD = 0,   /* memfd_create(): sealable */
    PRMEM_BACKING_TMPFILE = 1, /* O_TMPFILE on /dev/shm: no seals */
    PRMEM_BACKING_SECRET = 2,  /* memfd_secret(): no seals, no pwrite */
};

typedef struct {
    char *base;   /* start of the reservation */
    size_t size;  /* bytes reserved (trimmed to `used` once sealed) */
    size_t used;  /* bytes carved into areas, from base */
    int fd;       /* backing file (O_RDWR); -1 once sealed: reading needs no fd */
    int sealed;   /* every area in it is READ_ONLY, for good */
    int kind;     /* enum prmem_backing */
    int msealed;  /* mseal()ed too: can never be unmapped */
    int registered;      /* known to the fault report (fault.c) */
    int reported_sealed; /* the fault report knows it is sealed */
    dev_t dev;    /* identity of the backing file, recorded at creation: */
    ino_t ino;    /* verify() and the alias checks compare mappings to it */
    /* Copy on first change after fork() (unshare.c): the file is still
     * mapped by children forked since fork number shared_gen (0: none
     * known), or by the parent (shared_with_parent).  Such a chunk is
     * never changed in place: prmem_chunk_unshare() first. */
    unsigned long long shared_gen;
    int shared_with_parent;
    int keep_data; /* released while another process maps it: no zeroing */
} prmem_chunk;

static inline int
prmem_chunk_is_shared(const prmem_chunk *ch)
{
    return ch->shared_gen != 0 || ch->shared_with_parent;
}

/* The identity (st_dev, st_ino) of fd's file, for the check made before
 * every write through a descriptor: 0, or -1 with errno (EBADF: no such
 * descriptor).  statx() asks for the inode alone: fstat() also asks for the
 * change time, and where the kernel keeps multigrain timestamps (6.13+,
 * tmpfs and memfds among them) a queried change time makes the next write
 * take a fine-grained timestamp (the lifecycle floor table of
 * docs/performance.md has both C loops, and a bare pwrite()).  A NULL path with AT_EMPTY_PATH (6.11+) skips copying ""
 * from user space; older kernels refuse it (EFAULT) and get "" from then
 * on.  Any other failure of statx() (ENOSYS, a seccomp filter's EPERM,
 * ENOMEM, no inode in the answer) falls back to fstat(), so only fstat()'s
 * own answer can call a descriptor bad; where statx() is missing or
 * filtered for good, fstat() is used from then on.  The mode is one int per
 * translation unit, read and written with relaxed atomics: racing threads
 * at worst try a path that no longer works once more. */
static inline int
prmem_fd_identity(int fd, dev_t *dev, ino_t *ino)
{
#if defined(SYS_statx) && defined(STATX_INO)
    static int path_mode; /* 0: NULL path, 1: "" path, 2: fstat() only */
    int mode = __atomic_load_n(&path_mode, __ATOMIC_RELAXED);
    while (mode < 2) {
        struct statx sx;
        if (syscall(SYS_statx, fd, mode == 0 ? NULL : "", AT_EMPTY_PATH, STATX_INO, &sx) == 0) {
            if (!(sx.stx_mask & STATX_INO))
                break; /* no inode in the answer: fstat() this time */
            *dev = makedev(sx.stx_dev_major, sx.stx_dev_minor);
            *ino = (ino_t)sx.stx_ino;
            return 0;
        }
        if (errno == EBADF)
            return -1;
        if (mode == 0 && errno == EFAULT)
            mode = 1;
        else {
            if (errno == ENOSYS || errno == EPERM)
                mode = 2;
            __atomic_store_n(&path_mode, mode, __ATOMIC_RELAXED);
            break; /* fstat() this time */
        }
        __atomic_store_n(&path_mode, mode, __ATOMIC_RELAXED);
    }
#endif
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -1;
    *dev = st.st_dev;
    *ino = st.st_ino;
    return 0;
}

typedef struct {
    char *start;
    size_t size;
    uint32_t chunk;         /* index in pool->m->chunks */
    uint8_t state;          /* enum prmem_state */
} prmem_area;   /* in metadata; its writable-view count is
                 * PoolObject.area_wexports[i] (ordinary memory: a count) */

typedef struct prmem_module_state prmem_module_state;

/*
 * A pool's record in prmem's own metadata (meta.c): every field that decides
 * what state the pool is in or how its memory is mapped.  The page is
 * PROT_READ: fields are read with plain loads and changed only with
 * META_SET (a pwrite() on the metadata file), under the pool lock.
 */
typedef struct prmem_pool_meta {
    const struct PoolObject *owner; /* back-reference, checked before use */
    unsigned long long serial;      /* == owner->serial */
    int ready;
    int destroyed;
    int mode;               /* enum prmem_mode */
    int seal;               /* also mseal() READ_ONLY chunks */
    int secret;             /* areas backed by memfd_secret() */
    int dontdump;           /* MADV_DONTDUMP on every mapping */
    int mlock_areas;        /* mlock() every area (memfd_secret locks by itself) */
    int lock_requested;     /* lock=True or secret=True */
    int section;            /* ro_after_init / wr_after_init: never destroyed */
    int closed;             /* section after mark_init_done(): no allocations */
    int share;              /* sealed chunks keep a read-only descriptor to pass on */
    int destroy_pending;    /* destroy as soon as the last view and handle go */
    int attached;           /* memory received from another process (share.c) */
    int noaccess;           /* no-access pool (access.c) */
    int registered;         /* live: the fork() handlers see it (fork.c) */
    int fork_errno;         /* the child could not get a private copy */
    int broken_errno;       /* a failed re-map could not be undone: unusable */
    size_t refill;          /* minimum area size, page-rounded */
    size_t next_chunk_size; /* reservation size for the next chunk */
    /* The chunk and area tables: arrays in metadata (prmem_meta_alloc),
     * elements changed only with META_SET.  const: a plain store into
     * them does not compile (and would fault if it did). */
    const prmem_chunk *chunks;
    size_t nchunks, chunks_cap;
    const prmem_area *areas;
    size_t nareas, areas_cap;
} prmem_pool_meta;

/* meta.c: prmem's own metadata, write-rare; the bottom floor.  One reserved
 * range [prmem_meta_base, + PRMEM_META_RESERVE), PROT_READ, changed only by
 * pwrite() on its file.  Pure C, no Python API; meta.c's lock is a leaf
 * below every other prmem lock. */
#define PRMEM_META_RESERVE ((size_t)1 << 30)
#define PRMEM_META_RECORD 256
/* (prmem_meta_base, the start of the range, is part of prmem's root below) */
PRMEM_INTERNAL int prmem_meta_init(void);          /* 0, or -1 with errno */
/* Make prmem's root read-only for good (after the first module init has
 * set it). */
PRMEM_INTERNAL void prmem_root_seal(void);
/* How the root is protected: 2 read-only and mseal()ed, 1 read-only, 0 not
 * (kept outside the root: it is only reported) */
PRMEM_INTERNAL int prmem_root_state(void);
PRMEM_INTERNAL void prmem_meta_write(void *dst, const void *src, size_t n);
PRMEM_INTERNAL void *prmem_meta_record_alloc(void); /* zeroed; NULL: no memory */
PRMEM_INTERNAL void prmem_meta_record_free(void *rec);
PRMEM_INTERNAL void *prmem_meta_alloc(size_t n);    /* zeroed; NULL: no memory */
PRMEM_INTERNAL void prmem_meta_free(void *p, size_t n);
/* Records live in [PRMEM_META_RECORDS, PRMEM_META_HEAP) of the range; the
 * first word of the range (the metadata header's rec_top) is the offset
 * where the records handed out so far end. */
#define PRMEM_META_RECORDS ((size_t)1 << 16)
#define PRMEM_META_HEAP ((size_t)64 << 20)
/* p is the start of a pool record handed out so far (free ones included).
 * Inline: every Pool method checks its record pointer with it. */
static inline int
prmem_meta_is_record(const void *p)
{
    uintptr_t a = (uintptr_t)p, b = (uintptr_t)prmem_meta_base;
    if (prmem_meta_base == NULL || a < b + PRMEM_META_RECORDS || a >= b + PRMEM_META_HEAP)
        return 0;
    size_t off = a - b;
    return (off - PRMEM_META_RECORDS) % PRMEM_META_RECORD == 0 &&
           off < __atomic_load_n((const size_t *)prmem_meta_base, __ATOMIC_RELAXED);
}
/* Record slot i (0, 1, ...) of those handed out so far, or NULL past the
 * last; free slots included (zeroed but for their free-list link). */
PRMEM_INTERNAL const prmem_pool_meta *prmem_meta_record_at(size_t i);
/* The state of areas[from, to) of a table in metadata, one pwrite() per
 * 128 areas (protect() of a pool of thousands of areas would otherwise
 * make one per area). */
PRMEM_INTERNAL void prmem_meta_set_area_states(const prmem_area *areas, size_t from,
                                               size_t to, uint8_t state);
/* fault.c's root block (allocated with size bytes on first use; size 0:
 * only look it up), or NULL; async-signal-safe when size is 0 */
PRMEM_INTERNAL void *prmem_meta_fault_root(size_t size);
PRMEM_INTERNAL int prmem_meta_contains(const void *p, size_t n);
PRMEM_INTERNAL void prmem_meta_fork_prepare(void);
PRMEM_INTERNAL void prmem_meta_fork_parent(void);
PRMEM_INTERNAL void prmem_meta_fork_child(void);
/* Metadata changes are refused (this fork()ed child has no metadata file
 * of its own, or the metadata descriptor was closed or replaced): 0 if
 * writable, else the errno of the failure */
PRMEM_INTERNAL int prmem_meta_frozen(void);
/* Why metadata is frozen (0: it is not) */
enum {
    PRMEM_FROZEN_AT_FORK = 1,   /* a fork()ed child got no metadata file */
    PRMEM_FROZEN_FILE_LOST = 2, /* the metadata descriptor was closed or replaced */
    PRMEM_FROZEN_INHERITED = 3  /* a fork()ed child of a FILE_LOST process */
};
PRMEM_INTERNAL int prmem_meta_frozen_why(void);
/* Before an operation that changes metadata: check that the metadata
 * descriptor is still prmem's file (an fstat()); if not, freeze metadata
 * (PRMEM_FROZEN_FILE_LOST).  Returns prmem_meta_frozen(). */
PRMEM_INTERNAL int prmem_meta_check_file(void);
/* A fork() let a child share chunks lazily but metadata froze before the
 * parent could record it: from then on no release zeroes unsealed data
 * (a child may still map it). */
PRMEM_INTERNAL void prmem_meta_note_unrecorded_sharing(void);
PRMEM_INTERNAL int prmem_meta_unrecorded_sharing(void);
/* Grow a metadata array so that it holds count + 1 items: 0, or -1 (no
 * memory); *array and *cap are fields of a metadata record */
PRMEM_INTERNAL int prmem_meta_grow(const void *const *array, const size_t *cap, size_t count,
                                   size_t item_size);

/* Set a field of a metadata record: the only way metadata changes. */
#define META_SET(lvalue, value)                                                \
    do {                                                                       \
        __typeof__(lvalue) meta_v_ = (value);                                  \
        prmem_meta_write((void *)&(lvalue), &meta_v_, sizeof(meta_v_));        \
    } while (0)

typedef struct PoolObject {
    PyObject_HEAD
    pthread_mutex_t lock;
    prmem_module_state *mstate; /* valid while the type (hence module) lives */
    prmem_pool_meta *m;     /* this pool's record in prmem's write-rare
                             * metadata (meta.c); ordinary memory itself, so
                             * checked by prmem_pool_meta_ok() before use */
    unsigned long long serial; /* unique for the life of the process, never
                                * reused; also in the record, compared */
    int align_order;        /* default alignment, log2 (alloc checks every
                             * address against the protected area bounds) */
    void *attach_marks;     /* share.c: the "attached from" markers, to unmap */
    size_t nattach_marks;
    PyObject *name;         /* exact str (a copy, never a user subclass) */
    char *cname;            /* the name as UTF-8, for messages built under the lock */
    /* writable buffer views alive per area (index as in m->areas): a pure
     * count, ordinary memory, grown with the area table */
    Py_ssize_t *area_wexports;
    size_t area_wexports_cap;
    Py_ssize_t cur_area;    /* area allocations come from; -1 if none */
    size_t cur_off;         /* first free byte in the current area */
    /* accounting, for stats() */
    size_t nallocs;
    size_t bytes_requested;
    size_t bytes_lost;      /* tails of areas closed by protect()/make_ro() */
    Py_ssize_t exports;     /* buffer views alive, any kind */
    Py_ssize_t wexports;    /* writable buffer views alive */
    Py_ssize_t pins;        /* frozen container extents alive (see frozen.c) */
    PyObject *weakreflist;
    int protect_event;      /* memory became protected: the allocator tells fault.c */
    /* no-access pools (access.c): protected areas are PROT_NONE except
     * while access_count > 0 (open access() blocks, views taken inside
     * one, frozen-container reads in progress) */
    Py_ssize_t access_count;
} PoolObject;

/* The pool's metadata pointer is ordinary memory: follow it only if it
 * points at a record in prmem's metadata range whose back-reference and
 * serial are this pool's. */
static inline int
prmem_pool_meta_ok(const PoolObject *pool)
{
    const prmem_pool_meta *m = pool->m;
    return m != NULL && prmem_meta_is_record(m) && m->owner == pool &&
           m->serial == pool->serial;
}

/* Initialised, with a record that checks out (otherwise
 * prmem_raise_uninitialised() says which). */
static inline int
prmem_pool_ready(const PoolObject *pool)
{
    return prmem_pool_meta_ok(pool) && pool->m->ready;
}

#ifndef MADV_HUGEPAGE
#define MADV_HUGEPAGE 14
#endif
/* Areas at least this large ask for transparent huge pages (MADV_HUGEPAGE):
 * shmem uses them where /sys/kernel/mm/transparent_hugepage/shmem_enabled
 * says advise (within_size and always need no hint), and only for 2 MiB
 * ranges a mapping covers whole, so smaller areas would gain nothing. */
#define PRMEM_HUGE_AREA ((size_t)2 << 20)

/* The madvise() hints of chunk ch, mapped (or about to be moved) at base,
 * len bytes of it: applied again after every re-map, since a new mapping
 * starts without them.
 * - MADV_DONTDUMP: a dontdump pool's whole chunk; a no-access pool's used
 *   part only, always (a core dump reads PROT_NONE memory too), so that its
 *   unused PROT_NONE tail differs from closed areas and access() never
 *   merges them into one mapping, to split it again on the next open;
 * - MADV_HUGEPAGE on areas of PRMEM_HUGE_AREA or more. */
static inline void
prmem_advise(const PoolObject *pool, const prmem_chunk *ch, char *base, size_t len)
{
    if (pool->m->noaccess) {
        if (ch->used > 0)
            madvise(base, ch->used < len ? ch->used : len, MADV_DONTDUMP);
    }
    else if (pool->m->dontdump)
        madvise(base, len, MADV_DONTDUMP);
    size_t ci = (size_t)(ch - pool->m->chunks);
    for (size_t i = 0; i < pool->m->nareas; i++) {
        const prmem_area *a = &pool->m->areas[i];
        if (a->chunk == ci && a->size >= PRMEM_HUGE_AREA &&
            (size_t)(a->start - ch->base) + a->size <= len)
            madvise(base + (a->start - ch->base), a->size, MADV_HUGEPAGE);
    }
}

/* The page protection a non-WRITABLE area has now: PROT_READ, or PROT_NONE
 * in a no-access pool while nothing holds access (access.c). */
static inline int
prmem_protected_prot(const PoolObject *pool)
{
    return pool->m->noaccess && pool->access_count == 0 ? PROT_NONE : PROT_READ;
}

typedef struct {
    PyObject_HEAD
    PoolObject *pool;   /* strong reference */
    char *addr;
    size_t size;
    uint32_t area;      /* index in pool->m->areas */
} AllocationObject;

struct prmem_module_state {
    PyTypeObject *PoolType;
    PyTypeObject *AllocationType;
    PyTypeObject *ReadOnlyBufferType;
    PyTypeObject *AccessType;       /* what Pool.access() returns */
    PyObject *PrmemError;
    PyObject *ProtectionError;
    PyObject *PoolDestroyedError;
    PyObject *UnsupportedError;
    PyObject *CorruptionError;
    PyObject *state_members;    /* tuple of prmem.State members, or NULL */
    PyTypeObject *ExtentType;       /* pins an allocation holding a frozen structure */
    PyTypeObject *FrozenMapBase;    /* the C types ... */
    PyTypeObject *FrozenListBase;
    PyTypeObject *FrozenIterType;
    PyTypeObject *FrozenMapType;    /* ... and what handles are made of (the
                                     * prmem.FrozenMap/FrozenList subclasses) */
    PyTypeObject *FrozenListType;
    PyObject *MappingABC;           /* collections.abc.Mapping */
};


static inline const char *
prmem_state_name(int state)
{
    switch (state) {
    case PRMEM_WRITABLE: return "WRITABLE";
    case PRMEM_WRITE_RARE: return "WRITE_RARE";
    case PRMEM_READ_ONLY: return "READ_ONLY";
    default: return "?";
    }
}

/*
 * Take the pool lock.  Called with the GIL held; if the lock is taken, the
 * GIL is released while waiting, and the lock is not kept while the GIL is
 * re-acquired (a holder waiting for the GIL could otherwise deadlock with a
 * GIL holder waiting for the lock), so the loop tries again.
 */
static inline void
prmem_pool_lock(PoolObject *p)
{
    while (pthread_mutex_trylock(&p->lock) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&p->lock);
        pthread_mutex_unlock(&p->lock);
        Py_END_ALLOW_THREADS
    }
}

#define POOL_LOCK(p) prmem_pool_lock(p)

/* Rare writes at least this long release the GIL while the kernel copies. */
#define PRMEM_RARE_WRITE_NOGIL ((size_t)64 << 10)
#define POOL_UNLOCK(p) pthread_mutex_unlock(&(p)->lock)

/*
 * An error found while a prmem lock is held, kept as plain C values: the
 * exception type (borrowed from module state or a builtin), an errno for
 * OSError, and the message, formatted with snprintf.  prmem_raise() turns
 * it into a Python exception once the lock is released.
 */
typedef struct {
    PyObject *type; /* NULL: no error recorded */
    int err;        /* errno: the exception is type(err, msg) */
    char msg[600];
} prmem_error;

/* areas.c: syscalls, chunks and areas.  Callers hold pool->lock; functions
 * return 0, or -1 with the error recorded in *e (never a Python exception). */
PRMEM_INTERNAL unsigned prmem_probe_features(void);
PRMEM_INTERNAL int prmem_read_enforce(void);
PRMEM_INTERNAL int prmem_fail(prmem_error *e, PyObject *type, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
PRMEM_INTERNAL int prmem_fail_errno(prmem_error *e, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
PRMEM_INTERNAL int prmem_fail_os(prmem_error *e, const char *syscall_name, int err);
PRMEM_INTERNAL int prmem_fail_memlock(PoolObject *pool, prmem_error *e, const char *what,
                                      size_t size, int err);
PRMEM_INTERNAL void *prmem_raise(const prmem_error *e); /* without a lock; NULL */
PRMEM_INTERNAL int prmem_set_oserror(const char *syscall_name, int err);
PRMEM_INTERNAL size_t prmem_round_up_pages(size_t n);
PRMEM_INTERNAL int prmem_lock_range(void *addr, size_t len);
PRMEM_INTERNAL int prmem_unlock_range(void *addr, size_t len);
PRMEM_INTERNAL int prmem_protect_range(void *addr, size_t len, int prot);
PRMEM_INTERNAL int prmem_area_open(PoolObject *pool, size_t need, prmem_error *e);
PRMEM_INTERNAL int prmem_make_write_rare(PoolObject *pool, prmem_error *e);
PRMEM_INTERNAL int prmem_file_write(PoolObject *pool, const prmem_area *area,
                                    char *dst, const void *src, size_t n,
                                    int fill_byte, prmem_error *e);
PRMEM_INTERNAL void prmem_pool_release(PoolObject *pool);
/* A new empty backing file of `kind` for pool's chunks (-1 with errno);
 * async-signal-safe, as is prmem_fd_path ("/proc/self/fd/<fd>"). */
PRMEM_INTERNAL int prmem_new_backing(const PoolObject *pool, int kind);
PRMEM_INTERNAL void prmem_fd_path(char out[32], int fd);
/* The descriptor chunk ch names is still the file recorded at creation
 * (st_dev, st_ino), checked before every write through it */
/* The end of the run of areas from i on that are all WRITABLE (writable)
 * or all protected (!writable), in one chunk and adjacent: one mprotect()
 * covers areas [i, end).  areas[i] itself is of that kind. */
PRMEM_INTERNAL size_t prmem_area_run_end(const PoolObject *pool, size_t i, int writable);
PRMEM_INTERNAL int prmem_check_backing(PoolObject *pool, const prmem_chunk *ch, prmem_error *e);
/* Make an unsealed chunk's data unrecoverable before release (punch a hole,
 * or write zeros where the file cannot) */
PRMEM_INTERNAL void prmem_zero_chunk_data(const prmem_chunk *ch);
PRMEM_INTERNAL int prmem_for_each_data_range(int fd, off_t end,
                                             int (*fn)(void *, off_t, off_t), void *ctx);
PRMEM_INTERNAL void prmem_close_current_area(PoolObject *pool);
PRMEM_INTERNAL void prmem_sealed_leftovers(size_t *chunks, size_t *bytes);

/* unshare.c: copy on first change after fork().  Callers hold pool->lock;
 * no Python API (prmem_chunk_unshare may run without the GIL). */

PRMEM_INTERNAL int prmem_copy_chunk_contents(const prmem_chunk *ch, int fd);
PRMEM_INTERNAL void prmem_chunk_adopt_fd(const prmem_chunk *ch, int fd);
PRMEM_INTERNAL int prmem_chunk_unshare(PoolObject *pool, size_t ci, prmem_error *e);
PRMEM_INTERNAL void prmem_pool_unshare_for_release(PoolObject *pool);
PRMEM_INTERNAL int prmem_chunk_can_stay_shared(const PoolObject *pool, size_t ci);
PRMEM_INTERNAL int prmem_lazy_fork_prepare(int wanted);
PRMEM_INTERNAL unsigned long long prmem_lazy_fork_parent(int lazy);
PRMEM_INTERNAL void prmem_lazy_fork_child(int lazy, size_t nshared);

/* share.c: sealed memory handed to and received from other processes. */
PRMEM_INTERNAL int prmem_share_add_functions(PyObject *module);

/* seal.c: READ_ONLY for good, and checking that mappings are still prmem's.
 * Above areas.c and unshare.c; callers hold pool->lock. */
PRMEM_INTERNAL int prmem_chunk_seal(PoolObject *pool, size_t ci, prmem_error *e);
PRMEM_INTERNAL int prmem_seal_all(PoolObject *pool, prmem_error *e);
/* One finding of prmem_verify(): area `area` is not what its state says. */
typedef struct {
    size_t area;
    uintptr_t start, end; /* the offending part */
    int problem;          /* enum prmem_verify_problem */
    char perms[5];
} prmem_verify_finding;
enum prmem_verify_problem {
    PRMEM_VERIFY_NOT_MAPPED = 1,   /* nothing mapped there */
    PRMEM_VERIFY_REPLACED = 2,     /* mapped by something else than the pool's file */
    PRMEM_VERIFY_MOVED = 3,        /* the pool's file, but at the wrong offset */
    PRMEM_VERIFY_WEAKER = 4,       /* permissions weaker than the area's state */
    PRMEM_VERIFY_UNREADABLE = 5,   /* the pool's file, but no longer readable */
    PRMEM_VERIFY_OPENED = 6,       /* no-access memory readable outside access() */
};
PRMEM_INTERNAL Py_ssize_t prmem_verify(PoolObject *pool, prmem_verify_finding *out,
                                       size_t max_out, prmem_error *e);

/* allocator.c: the Pool and Allocation types. */
PRMEM_INTERNAL extern PyType_Spec prmem_pool_spec;
PRMEM_INTERNAL extern PyType_Spec prmem_allocation_spec;
PRMEM_INTERNAL extern PyType_Spec prmem_readonly_buffer_spec;
PRMEM_INTERNAL int prmem_check_usable(PoolObject *pool, prmem_error *e);
PRMEM_INTERNAL int prmem_check_changeable(PoolObject *pool, prmem_error *e);
PRMEM_INTERNAL int prmem_refuse_if_frozen(prmem_module_state *st, const char *cname,
                                          int check_file, prmem_error *e);
PRMEM_INTERNAL int prmem_check_allocation(PoolObject *pool, const AllocationObject *a,
                                          prmem_error *e);
PRMEM_INTERNAL int prmem_refuse_write(PoolObject *pool, int state, prmem_error *e);
PRMEM_INTERNAL void prmem_sync_fault_registry(PoolObject *pool);
PRMEM_INTERNAL void prmem_release_if_pending(PoolObject *pool);
PRMEM_INTERNAL void prmem_forget_fault_ranges(PoolObject *pool);
/* lifecycle.c: protect/destroy methods of the Pool type */
PRMEM_INTERNAL PyObject *prmem_pool_protect(PoolObject *self, PyObject *unused);
PRMEM_INTERNAL PyObject *prmem_pool_finish_init(PoolObject *self, PyObject *unused);
PRMEM_INTERNAL PyObject *prmem_pool_destroy_when_released(PoolObject *self, PyObject *unused);
PRMEM_INTERNAL PyObject *prmem_pool_destroy(PoolObject *self, PyObject *unused);
/* A method's entry check: the pool is initialised and its record checks out */
#define REFUSE_UNINITIALISED(pool, rv)                         \
    do {                                                       \
        if (!prmem_pool_ready(pool)) {                               \
            prmem_raise_uninitialised((PyObject *)(pool));     \
            return rv;                                         \
        }                                                      \
    } while (0)


/* access.c: no-access pools.  prmem_access_hold/release are called with
 * the pool lock held and no Python API; the methods take it themselves. */
PRMEM_INTERNAL int prmem_access_hold(PoolObject *pool, int open_if_closed, prmem_error *e);
PRMEM_INTERNAL int prmem_access_release(PoolObject *pool, prmem_error *e);
PRMEM_INTERNAL int prmem_access_refuse_read(PoolObject *pool, const prmem_area *area,
                                            prmem_error *e);
PRMEM_INTERNAL PyObject *prmem_pool_access_enter(PoolObject *self, PyObject *unused);
PRMEM_INTERNAL PyObject *prmem_pool_access_leave(PoolObject *self, PyObject *unused);
PRMEM_INTERNAL PyObject *prmem_pool_access(PoolObject *self, PyObject *unused);
PRMEM_INTERNAL extern PyType_Spec prmem_access_spec;

/* report.c: Pool._stats() and Pool._verify(). */
PRMEM_INTERNAL PyObject *prmem_pool_stats(PoolObject *self, PyObject *unused);
PRMEM_INTERNAL PyObject *prmem_pool_verify(PoolObject *self, PyObject *unused);
PRMEM_INTERNAL PyObject *prmem_pool_metadata_address(PoolObject *self, PyObject *unused);
PRMEM_INTERNAL PyObject *prmem_pool_metadata_tables(PoolObject *self, PyObject *unused);
PRMEM_INTERNAL int prmem_raise_uninitialised(PyObject *pool);
PRMEM_INTERNAL int prmem_parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                                    PyObject *kwnames, const char *const *names,
                                    Py_ssize_t nrequired, Py_ssize_t nnames, PyObject **vals);
PRMEM_INTERNAL int prmem_get_data_and_offset(AllocationObject *self, PyObject *data,
                                             PyObject *offset_obj, Py_buffer *buf,
                                             Py_ssize_t *offset);

/* rare.c: write-rare entry points (methods added to the Pool type). */
PRMEM_INTERNAL PyObject *prmem_pool_rare_write(PoolObject *self, PyObject *const *args,
                                               Py_ssize_t nargs, PyObject *kwnames);
PRMEM_INTERNAL PyObject *prmem_pool_rare_memset(PoolObject *self, PyObject *const *args,
                                                Py_ssize_t nargs, PyObject *kwnames);
PRMEM_INTERNAL PyObject *prmem_pool_make_ro(PoolObject *self, PyObject *unused);
PRMEM_INTERNAL PyObject *prmem_module_rare_write(PyObject *module, PyObject *const *args,
                                                 Py_ssize_t nargs, PyObject *kwnames);
PRMEM_INTERNAL PyObject *prmem_module_rare_memset(PyObject *module, PyObject *const *args,
                                                  Py_ssize_t nargs, PyObject *kwnames);

/* fault.c: the fault report's registry of chunk ranges and its handler.
 * Called with the pool lock held and no Python API: prmem_fault_register()
 * returns 0, or -1 with errno ENOMEM and no Python exception set. */
PRMEM_INTERNAL int prmem_fault_register(PoolObject *pool, char *start, size_t size);
PRMEM_INTERNAL void prmem_fault_sealed(char *start, size_t size);
PRMEM_INTERNAL void prmem_fault_orphan(char *start);
PRMEM_INTERNAL void prmem_fault_unregister(char *start);
PRMEM_INTERNAL void prmem_fault_protected(void);
PRMEM_INTERNAL void prmem_fault_sync(void);
PRMEM_INTERNAL PyObject *prmem_fault_registry_address(PyObject *module, PyObject *unused);
PRMEM_INTERNAL PyObject *prmem_fault_report(PyObject *module, PyObject *const *args,
                                            Py_ssize_t nargs);

/* fork.c: private copies of changeable memory in fork()ed children. */
PRMEM_INTERNAL int prmem_fork_init(void);
PRMEM_INTERNAL void prmem_registry_add(PoolObject *pool);
PRMEM_INTERNAL void prmem_registry_remove(PoolObject *pool);

/*
 * Frozen containers (frozen.c reads them, freeze.c writes them); the layout
 * is documented in docs/frozen-layout.md.  Everything is little-endian and
 * 8-byte aligned; offsets count from the first byte of the structure (its
 * "extent", one allocation); nothing in it is a pointer or depends on the
 * process.  Readers check every offset, length and count against the extent
 * before use, and a child container must lie before its parent, so no
 * structure, however corrupt, can make a reader loop or leave the extent.
 */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "prmem's frozen container layout is little-endian"
#endif
#define PRMEM_FZ_MAGIC 0x00315a52464d5250ULL /* the bytes "PRMFRZ1\0" */
#define PRMEM_FZ_HEADER 48                   /* magic, total, seed, reserved, root slot */
#define PRMEM_FZ_SLOT 16
#define PRMEM_FZ_ENTRY 40                    /* key slot, value slot, hash */
#define PRMEM_FZ_MAX_INDEX 0xfffffffeULL     /* index cells are u32 */

enum prmem_fz_tag {
    PRMEM_FZ_NONE = 0,
    PRMEM_FZ_FALSE = 1,
    PRMEM_FZ_TRUE = 2,
    PRMEM_FZ_INT = 3,    /* payload: int64 */
    PRMEM_FZ_FLOAT = 4,  /* payload: IEEE double bits */
    PRMEM_FZ_BIGINT = 5, /* payload: offset of a blob, two's complement */
    PRMEM_FZ_STR = 6,    /* payload: offset of a blob, UTF-8 */
    PRMEM_FZ_BYTES = 7,  /* payload: offset of a blob */
    PRMEM_FZ_LIST = 8,   /* payload: offset of a list node */
    PRMEM_FZ_MAP = 9,    /* payload: offset of a map node */
    PRMEM_FZ_NTAGS = 10,
};

/* A str, bytes of at most PRMEM_FZ_INLINE_MAX bytes is stored in its slot:
 * byte 4 holds its length + 1, bytes 5..15 the data (a key compares
 * without touching another cache line).  Otherwise byte 4 is 0 and the
 * payload is the offset of a blob: u64 length, then the bytes. */
#define PRMEM_FZ_INLINE_MAX 11
typedef struct {
    uint32_t tag;
    uint32_t aux; /* byte 4: inline length + 1, or 0; the rest inline data */
    uint64_t payload;
} prmem_fz_slot;

PRMEM_INTERNAL uint64_t prmem_fz_hash(uint64_t seed, uint32_t tag, const void *data, size_t n);
PRMEM_INTERNAL int prmem_fz_add_types(PyObject *module, prmem_module_state *st);
PRMEM_INTERNAL PyObject *prmem_fz_encode(PyObject *module, PyObject *obj);

/* frozen_read.c: the checked reader; frozen.c: the Python types on it. */
typedef struct {
    PyObject_HEAD
    AllocationObject *alloc; /* strong: keeps the pool alive */
    const char *base;
    uint64_t size;
    prmem_module_state *mstate;
} prmem_extent;   /* pins the allocation holding a structure */

typedef struct {
    PyObject_HEAD
    prmem_extent *extent;
    uint64_t node; /* offset of this container's node: all a handle keeps */
} prmem_frozen;   /* a FrozenMap or FrozenList handle */

/* n bytes at off lie inside the extent */
static inline int
prmem_fz_inside(const prmem_extent *x, uint64_t off, uint64_t n)
{
    return off <= x->size && n <= x->size - off;
}

/* one load into a local: checked, then used */
static inline uint64_t
prmem_fz_load64(const prmem_extent *x, uint64_t off)
{
    uint64_t v;
    memcpy(&v, x->base + off, 8);
    return v;
}

static inline void
prmem_fz_load_slot(const prmem_extent *x, uint64_t off, prmem_fz_slot *slot)
{
    memcpy(slot, x->base + off, sizeof(*slot));
}

/* a key can only be str, bytes or an int */
static inline int
prmem_fz_key_tag(uint32_t tag)
{
    return tag == PRMEM_FZ_STR || tag == PRMEM_FZ_BYTES || tag == PRMEM_FZ_INT ||
           tag == PRMEM_FZ_BIGINT;
}

PRMEM_INTERNAL extern PyType_Spec prmem_extent_spec;
PRMEM_INTERNAL prmem_extent *prmem_fz_extent_new(prmem_module_state *st, AllocationObject *alloc);
PRMEM_INTERNAL int prmem_fz_enter(const prmem_extent *x);   /* 0, or -1 with an exception */
PRMEM_INTERNAL void prmem_fz_leave(const prmem_extent *x);
PRMEM_INTERNAL void *prmem_fz_corrupt(const prmem_extent *x, const char *what, uint64_t at);
PRMEM_INTERNAL int prmem_fz_map_node(const prmem_extent *x, uint64_t node, uint64_t *count,
                                     uint64_t *nbuckets);
PRMEM_INTERNAL int prmem_fz_list_node(const prmem_extent *x, uint64_t node, uint64_t *count);
PRMEM_INTERNAL PyObject *prmem_fz_materialize(prmem_extent *x, const prmem_fz_slot *slot,
                                              uint64_t parent);
PRMEM_INTERNAL PyObject *prmem_fz_handle_new(prmem_extent *x, int tag, uint64_t node);
PRMEM_INTERNAL int prmem_fz_map_find(prmem_frozen *h, PyObject *key, prmem_fz_slot *value,
                                     uint64_t *value_off);
PRMEM_INTERNAL PyObject *prmem_fz_thaw(prmem_extent *x, int tag, uint64_t node);

#endif /* PRMEM_H */
