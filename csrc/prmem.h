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
 * Locking: every field below that decides what may be written (states,
 * bounds, export counts, the chunk/area tables) is read and written only
 * with pool->lock held.  The lock is only ever held by a thread that also
 * holds the GIL (we never release the GIL while holding it), so it cannot
 * deadlock against the GIL; it makes the check-then-write sequences atomic
 * on free-threaded builds too.
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

#define PRMEM_INTERNAL __attribute__((visibility("hidden")))

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
    int fd;       /* backing memfd (O_RDWR; useless for writing once sealed) */
    int sealed;   /* every area in it is READ_ONLY, for good */
    int kind;     /* enum prmem_backing */
    int msealed;  /* mseal()ed too: can never be unmapped */
} prmem_chunk;

typedef struct {
    char *start;
    size_t size;
    uint32_t chunk;         /* index in pool->chunks */
    uint8_t state;          /* enum prmem_state */
    Py_ssize_t wexports;    /* writable buffer views alive on this area */
} prmem_area;

typedef struct prmem_module_state prmem_module_state;

typedef struct PoolObject {
    PyObject_HEAD
    pthread_mutex_t lock;
    prmem_module_state *mstate; /* valid while the type (hence module) lives */
    int ready;
    int destroyed;
    unsigned long long serial; /* unique for the life of the process, never reused */
    int mode;               /* enum prmem_mode */
    int align_order;        /* default alignment, log2 */
    int seal;               /* also mseal() READ_ONLY chunks */
    int secret;             /* areas backed by memfd_secret() */
    int dontdump;           /* MADV_DONTDUMP on every mapping */
    int mlock_areas;        /* mlock() every area (memfd_secret locks by itself) */
    int lock_requested;     /* lock=True or secret=True */
    int section;            /* ro_after_init / wr_after_init: never destroyed */
    int closed;             /* section after mark_init_done(): no allocations */
    size_t refill;          /* minimum area size, page-rounded */
    size_t next_chunk_size; /* reservation size for the next chunk */
    PyObject *name;         /* exact str (a copy, never a user subclass) */
    char *cname;            /* the name as UTF-8, for messages built under the lock */
    prmem_chunk *chunks;
    size_t nchunks, chunks_cap;
    prmem_area *areas;
    size_t nareas, areas_cap;
    Py_ssize_t cur_area;    /* area allocations come from; -1 if none */
    size_t cur_off;         /* first free byte in the current area */
    /* accounting, for stats() */
    size_t nallocs;
    size_t bytes_requested;
    size_t bytes_lost;      /* tails of areas closed by protect()/make_ro() */
    Py_ssize_t exports;     /* buffer views alive, any kind */
    Py_ssize_t wexports;    /* writable buffer views alive */
    PyObject *weakreflist;
    /* registry of live pools, for fork handling (fork.c) */
    struct PoolObject *reg_prev, *reg_next;
    int registered;
    int fork_errno;         /* the child could not get a private copy */
} PoolObject;

typedef struct {
    PyObject_HEAD
    PoolObject *pool;   /* strong reference */
    char *addr;
    size_t size;
    uint32_t area;      /* index in pool->areas */
} AllocationObject;

struct prmem_module_state {
    PyTypeObject *PoolType;
    PyTypeObject *AllocationType;
    PyObject *PrmemError;
    PyObject *ProtectionError;
    PyObject *PoolDestroyedError;
    PyObject *UnsupportedError;
    PyObject *state_members;    /* tuple of prmem.State members, or NULL */
};

/* Globals set once at module import. */
extern PRMEM_INTERNAL size_t prmem_page_size;
extern PRMEM_INTERNAL int prmem_page_shift;
extern PRMEM_INTERNAL unsigned prmem_features;
/* 0 when PRMEM_ENFORCE=0: states and checks as usual, pages never protected */
extern PRMEM_INTERNAL int prmem_enforce;

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

#define POOL_LOCK(p) pthread_mutex_lock(&(p)->lock)
#define POOL_UNLOCK(p) pthread_mutex_unlock(&(p)->lock)

/* areas.c: syscalls, chunks and areas.  Callers hold pool->lock; functions
 * return 0, or -1 with a Python exception set. */
PRMEM_INTERNAL unsigned prmem_probe_features(void);
PRMEM_INTERNAL int prmem_read_enforce(void);
PRMEM_INTERNAL int prmem_set_oserror(const char *syscall_name, int err);
PRMEM_INTERNAL int prmem_area_open(PoolObject *pool, size_t need);
PRMEM_INTERNAL int prmem_chunk_seal(PoolObject *pool, size_t ci);
PRMEM_INTERNAL int prmem_seal_all(PoolObject *pool);
PRMEM_INTERNAL int prmem_make_write_rare(PoolObject *pool);
PRMEM_INTERNAL int prmem_file_write(PoolObject *pool, const prmem_area *area,
                                    char *dst, const void *src, size_t n,
                                    int fill_byte);
PRMEM_INTERNAL void prmem_pool_release(PoolObject *pool);
PRMEM_INTERNAL int prmem_for_each_data_range(int fd, off_t end,
                                             int (*fn)(void *, off_t, off_t), void *ctx);
PRMEM_INTERNAL void prmem_close_current_area(PoolObject *pool);

/* allocator.c: the Pool and Allocation types. */
PRMEM_INTERNAL extern PyType_Spec prmem_pool_spec;
PRMEM_INTERNAL extern PyType_Spec prmem_allocation_spec;
PRMEM_INTERNAL int prmem_check_usable(PoolObject *pool);
PRMEM_INTERNAL int prmem_refuse_write(PoolObject *pool, int state);
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
PRMEM_INTERNAL PyObject *prmem_fault_report(PyObject *module, PyObject *const *args,
                                            Py_ssize_t nargs);

/* fork.c: private copies of changeable memory in fork()ed children. */
PRMEM_INTERNAL int prmem_fork_init(void);
PRMEM_INTERNAL void prmem_registry_add(PoolObject *pool);
PRMEM_INTERNAL void prmem_registry_remove(PoolObject *pool);

/* module.c */
PRMEM_INTERNAL PyModuleDef *prmem_moduledef_ptr(void);

#endif /* PRMEM_H */
