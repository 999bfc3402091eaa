/*
 * The Pool and Allocation types: pmalloc-style bump allocation from areas,
 * protection, destruction, and the buffer protocol with export counting.
 */
#include "prmem.h"

#include <string.h>

/* ---------------------------------------------------------------- helpers */

static prmem_module_state *state_from_type(PyTypeObject *type);

/* For methods called on a Pool whose __init__ never ran (no module state
 * yet): checked before the lock is taken. */
PRMEM_INTERNAL int
prmem_raise_uninitialised(PyObject *pool)
{
    prmem_module_state *st = state_from_type(Py_TYPE(pool));
    PoolObject *p = (PoolObject *)pool;
    if (st != NULL && !prmem_pool_meta_ok(p))
        PyErr_Format(st->ProtectionError,
                     "prmem pool '%.200s': its metadata pointer does not point at its own "
                     "record in prmem's protected metadata; prmem refuses to follow it",
                     p->cname != NULL ? p->cname : "?");
    else if (st != NULL)
        PyErr_SetString(st->PrmemError,
                        "prmem pool is not initialised (Pool.__init__ was not called)");
    return -1;
}


/* With pool->lock held: refuse pools that are destroyed or unusable. */
PRMEM_INTERNAL int
prmem_check_usable(PoolObject *pool, prmem_error *e)
{
    if (!prmem_pool_meta_ok(pool))
        return prmem_fail(e, pool->mstate->ProtectionError,
                          "prmem pool '%.200s': its metadata pointer does not point at its own "
                          "record in prmem's protected metadata; prmem refuses to follow it",
                          pool->cname != NULL ? pool->cname : "?");
    if (!pool->m->ready) /* only while another thread runs __init__ */
        return prmem_fail(e, PyExc_RuntimeError, "prmem pool is not initialised yet");
    if (pool->m->destroyed)
        return prmem_fail(e, pool->mstate->PoolDestroyedError,
                          "prmem pool '%.200s' has been destroyed", pool->cname);
    if (pool->m->broken_errno)
        return prmem_fail(e, pool->mstate->PrmemError,
                          "prmem pool '%.200s' is unusable: a failed re-mapping of its memory "
                          "could not be undone (%s)",
                          pool->cname, strerror(pool->m->broken_errno));
    return 0;
}

/* Refuse a change (of pool cname; NULL: creating a pool) because prmem's
 * metadata is frozen: 0 if it is not.  With check_file, first check that
 * the metadata descriptor is still prmem's file (prmem_meta_check_file, an
 * fstat()): every change that writes metadata does, before it starts;
 * rare writes and allocations within an area write none and skip it. */
PRMEM_INTERNAL int
prmem_refuse_if_frozen(prmem_module_state *st, const char *cname, int check_file,
                       prmem_error *e)
{
    int err = check_file ? prmem_meta_check_file() : prmem_meta_frozen();
    if (err == 0)
        return 0;
    const char *what = cname != NULL ? "prmem pool '" : "prmem: ";
    const char *whose = cname != NULL ? cname : "";
    const char *verb = cname != NULL ? "' cannot change" : "no new pool can be created";
    if (prmem_meta_frozen_why() == PRMEM_FROZEN_FILE_LOST)
        return prmem_fail(e, st->ProtectionError,
                          "%s%.200s%s: the descriptor of prmem's metadata file was closed or "
                          "replaced behind prmem's back (a stray close() or dup2() of a "
                          "descriptor prmem owns), so prmem froze its metadata rather than "
                          "write it into another file; reads work, changes through prmem do "
                          "not (leave prmem's descriptors open, e.g. skip them in closerange)",
                          what, whose, verb);
    if (prmem_meta_frozen_why() == PRMEM_FROZEN_INHERITED)
        return prmem_fail(e, st->ProtectionError,
                          "%s%.200s%s in this forked child: prmem's metadata was already "
                          "frozen in the parent (its metadata descriptor had been closed or "
                          "replaced), so it is frozen here too and pool memory is a private "
                          "read-only snapshot as of the fork; reads work, changes through "
                          "prmem do not", what, whose, verb);
    return prmem_fail(e, st->PrmemError,
                      "%s%.200s%s in this forked child: the child could not get a file for "
                      "prmem's metadata at fork() (%s), so the metadata is frozen here and "
                      "pool memory is a private read-only snapshot as of the fork; reads "
                      "work, changes through prmem do not",
                      what, whose, verb, strerror(err));
}

/* With pool->lock held: refuse changes to a pool whose memory may not
 * change here (on top of prmem_check_usable). */
PRMEM_INTERNAL int
prmem_check_changeable(PoolObject *pool, prmem_error *e)
{
    if (prmem_check_usable(pool, e) < 0)
        return -1;
    if (prmem_meta_frozen() && prmem_refuse_if_frozen(pool->mstate, pool->cname, 0, e) < 0)
        return -1;
    if (pool->m->fork_errno)
        return prmem_fail(e, pool->mstate->PrmemError,
                          "prmem pool '%.200s' cannot change in this forked child: its memory "
                          "could not be given a private file of its own (%s), so the child "
                          "has a private read-only snapshot of it as of the fork; reads work, "
                          "changes through prmem do not",
                          pool->cname, strerror(pool->m->fork_errno));
    return 0;
}

/* With pool->lock held, after prmem_check_usable: the allocation's area
 * index and range (ordinary memory, in the Allocation object) lie inside
 * an area of this pool according to the protected area table. */
PRMEM_INTERNAL int
prmem_check_allocation(PoolObject *pool, const AllocationObject *a, prmem_error *e)
{
    if (a->area < pool->m->nareas) {
        const prmem_area *ar = &pool->m->areas[a->area];
        uintptr_t lo = (uintptr_t)ar->start, addr = (uintptr_t)a->addr;
        if (addr >= lo && a->size <= ar->size && addr - lo <= ar->size - a->size)
            return 0;
    }
    return prmem_fail(e, pool->mstate->ProtectionError,
                      "prmem pool '%.200s': an allocation's address or area does not lie "
                      "inside an area of this pool (prmem's protected area table); prmem "
                      "refuses to write or read through it",
                      pool->cname);
}

/*
 * With pool->lock held: bring the fault report's registry up to date with
 * the chunk table (new chunks, chunks sealed and trimmed) and note that
 * memory became protected, so prmem_fault_sync() installs the handler
 * after unlocking.  Pure C (fault.c takes only its own leaf lock).
 */
PRMEM_INTERNAL void
prmem_sync_fault_registry(PoolObject *pool)
{
    if (prmem_meta_frozen())
        return; /* nothing can be recorded: the registry stays as it is */
    for (size_t ci = 0; ci < pool->m->nchunks; ci++) {
        const prmem_chunk *ch = &pool->m->chunks[ci];
        if (!ch->registered && prmem_fault_register(pool, ch->base, ch->size) == 0)
            META_SET(ch->registered, 1);
        if (ch->registered && ch->sealed && !ch->reported_sealed) {
            prmem_fault_sealed(ch->base, ch->size);
            META_SET(ch->reported_sealed, 1);
            if (ch->size == 0)
                META_SET(ch->registered, 0); /* fault.c dropped the range: nothing is mapped */
        }
    }
    if (pool->protect_event) {
        pool->protect_event = 0;
        prmem_fault_protected();
    }
}

/* Tell the fault report the pool's ranges are going away (destroy). */
PRMEM_INTERNAL void
prmem_forget_fault_ranges(PoolObject *pool)
{
    for (size_t ci = 0; ci < pool->m->nchunks; ci++) {
        const prmem_chunk *ch = &pool->m->chunks[ci];
        if (!ch->registered)
            continue;
        if (ch->msealed)
            prmem_fault_orphan(ch->base); /* still mapped and protected */
        else
            prmem_fault_unregister(ch->base);
        if (!prmem_meta_frozen())
            META_SET(ch->registered, 0);
    }
}

/* Parse a size argument: an int > 0.  Sizes beyond Py_ssize_t are clipped
 * (and then fail as MemoryError when no address space can hold them). */
static int
parse_size(PyObject *obj, const char *what, size_t *out)
{
    Py_ssize_t v;
    if (PyLong_CheckExact(obj)) {
        v = PyLong_AsSsize_t(obj);
        if (v == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            v = PyNumber_AsSsize_t(obj, NULL);
        }
    }
    else if (PyIndex_Check(obj)) {
        v = PyNumber_AsSsize_t(obj, NULL);
        if (v == -1 && PyErr_Occurred())
            return -1;
    }
    else {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (v <= 0) {
        PyErr_Format(PyExc_ValueError, "%s must be positive, got %R", what, obj);
        return -1;
    }
    *out = (size_t)v;
    return 0;
}

static int
parse_align_order(PyObject *obj, int *out)
{
    if (obj == Py_None)
        return 0;
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "align_order must be an int or None, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        v = -1;
    }
    if (v < 0 || v > prmem_page_shift) {
        PyErr_Format(PyExc_ValueError,
                     "align_order must be between 0 and %d (log2 of the page size), got %R",
                     prmem_page_shift, obj);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* Parse keyword-only arguments of the allocation methods: only
 * align_order=... is accepted. */
static int
parse_alloc_kwargs(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                   int *align_order)
{
    if (kwnames == NULL)
        return 0;
    Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(key, "align_order") != 0) {
            PyErr_Format(PyExc_TypeError, "unexpected keyword argument %R", key);
            return -1;
        }
        if (parse_align_order(args[nargs + i], align_order) < 0)
            return -1;
    }
    return 0;
}

/*
 * Hand out `size` bytes aligned to 2**align_order, optionally initialised
 * from `init` (init_len <= size bytes; the rest stays zero).  Fresh memory
 * is always zero: areas are new file pages and are never reused.
 */
static PyObject *
pool_allocate(PoolObject *self, size_t size, int align_order, const void *init, size_t init_len)
{
    REFUSE_UNINITIALISED(self, NULL);
    /* created before locking: allocating a Python object can run the
     * collector, hence finalisers */
    AllocationObject *obj = PyObject_New(AllocationObject, self->mstate->AllocationType);
    if (obj == NULL)
        return NULL;
    obj->pool = NULL;

    prmem_error e;
    POOL_LOCK(self);
    if (prmem_check_changeable(self, &e) < 0)
        goto fail;
    if (self->m->attached) {
        prmem_fail(&e, self->mstate->ProtectionError,
                   "prmem pool '%.200s' was received from another process: it is READ_ONLY "
                   "here, and nothing can be allocated in it", self->cname);
        goto fail;
    }
    if (self->m->closed) {
        prmem_fail(&e, self->mstate->ProtectionError,
                   "%.200s is closed: allocations are only possible before "
                   "prmem.mark_init_done()", self->cname);
        goto fail;
    }
    size_t align = (size_t)1 << align_order;
    char *addr = NULL;
    if (self->cur_area >= 0) {
        const prmem_area *a = &self->m->areas[self->cur_area];
        uintptr_t p = (uintptr_t)a->start + self->cur_off;
        uintptr_t q = (p + align - 1) & ~(uintptr_t)(align - 1);
        uintptr_t end = (uintptr_t)a->start + a->size;
        if (q <= end && size <= end - q)
            addr = (char *)q;
    }
    if (addr == NULL) {
        /* a new area writes metadata */
        if (prmem_refuse_if_frozen(self->mstate, self->cname, 1, &e) < 0)
            goto fail;
        int rc = prmem_area_open(self, size, &e);
        prmem_sync_fault_registry(self); /* also after a failure: AUTO modes */
        if (rc < 0)
            goto fail;
        addr = self->m->areas[self->cur_area].start;
    }
    const prmem_area *area = &self->m->areas[self->cur_area];
    if (init != NULL && init_len > 0) {
        if (area->state == PRMEM_WRITABLE)
            memcpy(addr, init, init_len);
        else if (prmem_refuse_if_frozen(self->mstate, self->cname,
                                        prmem_chunk_is_shared(&self->m->chunks[area->chunk]),
                                        &e) < 0 ||
                 prmem_chunk_unshare(self, area->chunk, &e) < 0 ||
                 prmem_file_write(self, area, addr, init, init_len, 0, &e) < 0)
            goto fail;
    }
    self->cur_off = (size_t)(addr + size - area->start);
    self->nallocs++;
    self->bytes_requested += size;
    obj->addr = addr;
    obj->size = size;
    obj->area = (uint32_t)self->cur_area;
    POOL_UNLOCK(self);
    prmem_fault_sync();
    Py_INCREF(self);
    obj->pool = self;
    return (PyObject *)obj;

fail:
    POOL_UNLOCK(self);
    prmem_fault_sync();
    Py_DECREF(obj);
    return prmem_raise(&e);
}

/* ---------------------------------------------------------------- Pool */

static prmem_module_state *state_from_type(PyTypeObject *type);

static PyObject *
Pool_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    PoolObject *self = (PoolObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    pthread_mutex_init(&self->lock, NULL);
    self->cur_area = -1;
    if (prmem_meta_check_file() != 0) {
        Py_DECREF(self);
        prmem_module_state *st = state_from_type(type);
        prmem_error e;
        if (st != NULL && prmem_refuse_if_frozen(st, NULL, 0, &e) < 0)
            prmem_raise(&e);
        return NULL;
    }
    prmem_pool_meta *m = prmem_meta_record_alloc();
    if (m == NULL) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_MemoryError, "prmem: no room for a pool record in prmem's metadata");
        return NULL;
    }
    META_SET(m->owner, self);
    self->m = m;
    self->name = PyUnicode_FromString("?");
    if (self->name == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void Pool_dealloc(PoolObject *self);

static prmem_module_state *
state_from_type(PyTypeObject *type)
{
    /* Walk the MRO to the C base type (Python subclasses have no module):
     * the one whose instances this file deallocates. */
    PyObject *mro = type->tp_mro;
    for (Py_ssize_t i = 0; mro && i < PyTuple_GET_SIZE(mro); i++) {
        PyTypeObject *t = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        if (!(t->tp_flags & Py_TPFLAGS_HEAPTYPE) ||
            PyType_GetSlot(t, Py_tp_dealloc) != (void *)Pool_dealloc)
            continue;
        PyObject *mod = PyType_GetModule(t);
        if (mod != NULL)
            return (prmem_module_state *)PyModule_GetState(mod);
        PyErr_Clear();
    }
    PyErr_SetString(PyExc_TypeError, "not a prmem pool type");
    return NULL;
}

/* Pool.__init__(mode, name, refill, align_order, seal=False): the public
 * prmem.Pool does the friendly argument handling, this keeps the
 * invariants. */
static int
Pool_init(PoolObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"mode",   "name",     "refill", "align_order", "seal",
                             "section", "secret", "dontdump", "lock",      "share",
                             "noaccess", NULL};
    int mode, align_order, seal = 0, section = 0, secret = 0, dontdump = 0, lock = 0,
        share = 0, noaccess = 0;
    PyObject *name;
    Py_ssize_t refill;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iUni|ppppppp:Pool", kwlist, &mode,
                                     &name, &refill, &align_order, &seal, &section, &secret,
                                     &dontdump, &lock, &share, &noaccess))
        return -1;
    prmem_module_state *st = state_from_type(Py_TYPE(self));
    if (st == NULL)
        return -1;
    if (mode < 0 || mode >= PRMEM_NMODES) {
        PyErr_Format(PyExc_ValueError, "unknown pool mode %d", mode);
        return -1;
    }
    if (refill <= 0) {
        PyErr_Format(PyExc_ValueError, "refill must be positive, got %zd", refill);
        return -1;
    }
    if (align_order < 0 || align_order > prmem_page_shift) {
        PyErr_Format(PyExc_ValueError,
                     "align_order must be between 0 and %d (log2 of the page size), got %d",
                     prmem_page_shift, align_order);
        return -1;
    }
    if ((size_t)refill > SIZE_MAX - prmem_page_size) {
        PyErr_SetString(PyExc_MemoryError, "refill is larger than the address space");
        return -1;
    }
    if (PyUnicode_AsUTF8(name) == NULL)
        return -1;
    if (PyUnicode_FindChar(name, 0, 0, PyUnicode_GET_LENGTH(name), 1) >= 0) {
        PyErr_SetString(PyExc_ValueError, "pool name must not contain NUL");
        return -1;
    }
    if (share && secret) {
        PyErr_SetString(PyExc_ValueError,
                        "a secret pool cannot be shared: memfd_secret memory cannot be sealed "
                        "by the kernel, so prmem never hands it to another process");
        return -1;
    }
    if (noaccess && (seal || share || section)) {
        PyErr_SetString(PyExc_ValueError,
                        seal ? "noaccess=True cannot be combined with seal=True: access() "
                               "opens the memory with mprotect(), which mseal() forbids"
                        : share ? "noaccess=True cannot be combined with share=True: other "
                                  "processes would map the memory readable for good"
                                : "sections cannot be no-access");
        return -1;
    }
    if (secret && !(prmem_features & PRMEM_FEAT_MEMFD_SECRET)) {
        PyErr_SetString(st->UnsupportedError,
                        "secret pools need memfd_secret(), which this kernel does not "
                        "provide (Linux >= 5.14, enabled by default since 6.5; "
                        "'memfd_secret' is missing from prmem.features)");
        return -1;
    }
    /* An exact str copy: formatting a user subclass could run Python code,
     * and the C copy lets messages be built while the pool lock is held. */
    PyObject *exact_name = PyUnicode_FromObject(name);
    if (exact_name == NULL)
        return -1;
    Py_ssize_t name_len;
    const char *utf8 = PyUnicode_AsUTF8AndSize(exact_name, &name_len);
    char *cname = utf8 ? PyMem_RawMalloc((size_t)name_len + 1) : NULL;
    if (cname == NULL) {
        Py_DECREF(exact_name);
        if (utf8 != NULL)
            PyErr_NoMemory();
        return -1;
    }
    memcpy(cname, utf8, (size_t)name_len + 1);
    POOL_LOCK(self);
    if (!prmem_pool_meta_ok(self)) {
        POOL_UNLOCK(self);
        Py_DECREF(exact_name);
        PyMem_RawFree(cname);
        return prmem_raise_uninitialised((PyObject *)self);
    }
    if (self->m->ready) {
        POOL_UNLOCK(self);
        Py_DECREF(exact_name);
        PyMem_RawFree(cname);
        PyErr_SetString(PyExc_RuntimeError, "prmem pool is already initialised");
        return -1;
    }
    prmem_error fe;
    if (prmem_refuse_if_frozen(st, NULL, 1, &fe) < 0) { /* what follows writes metadata */
        POOL_UNLOCK(self);
        Py_DECREF(exact_name);
        PyMem_RawFree(cname);
        prmem_raise(&fe);
        return -1;
    }
    static unsigned long long next_serial = 1;
    self->serial = __atomic_fetch_add(&next_serial, 1, __ATOMIC_RELAXED);
    META_SET(self->m->serial, self->serial);
    self->mstate = st;
    META_SET(self->m->mode, mode);
    self->align_order = align_order;
    META_SET(self->m->seal, seal);
    META_SET(self->m->share, share);
    META_SET(self->m->noaccess, noaccess);
    META_SET(self->m->section, section);
    META_SET(self->m->secret, secret);
    /* memfd_secret memory is always locked and never dumped */
    META_SET(self->m->dontdump, dontdump || secret);
    META_SET(self->m->mlock_areas, lock && !secret);
    META_SET(self->m->lock_requested, lock || secret);
    META_SET(self->m->refill, ((size_t)refill + prmem_page_size - 1) & ~(prmem_page_size - 1));
    META_SET(self->m->next_chunk_size, (size_t)16 << 20);
    PyObject *placeholder = self->name;
    self->name = exact_name;
    self->cname = cname;
    META_SET(self->m->ready, 1);
    POOL_UNLOCK(self);
    Py_XDECREF(placeholder);
    prmem_registry_add(self);
    return 0;
}

static void
Pool_dealloc(PoolObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    /* Releasing writes metadata: if its descriptor was lost, metadata is
     * frozen now, and what follows changes none (cannot raise here). */
    prmem_meta_check_file();
    prmem_registry_remove(self);
    /* No allocation or buffer view can be alive: each holds a reference.
     * A pool whose record does not check out is left mapped: its tables
     * cannot be trusted to say what to unmap. */
    int meta_ok = prmem_pool_meta_ok(self);
    if (meta_ok && self->m->ready && !self->m->destroyed) {
        prmem_forget_fault_ranges(self);
        prmem_pool_unshare_for_release(self);
        prmem_pool_release(self);
    }
    else if (meta_ok && !prmem_meta_frozen()) {
        prmem_meta_free((void *)self->m->chunks, self->m->chunks_cap * sizeof(prmem_chunk));
        prmem_meta_free((void *)self->m->areas, self->m->areas_cap * sizeof(prmem_area));
    }
    PyMem_RawFree(self->area_wexports);
    self->area_wexports = NULL;
    if (meta_ok && !prmem_meta_frozen()) /* frozen: nothing may change (meta.c) */
        prmem_meta_record_free(self->m);
    pthread_mutex_destroy(&self->lock);
    Py_XDECREF(self->name);
    PyMem_RawFree(self->cname);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
Pool_alloc(PoolObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    size_t size;
    int align_order = self->align_order;
    if (nargs != 1) {
        PyErr_Format(PyExc_TypeError, "alloc() takes exactly one positional argument (%zd given)",
                     nargs);
        return NULL;
    }
    if (parse_size(args[0], "size", &size) < 0 ||
        parse_alloc_kwargs(args, nargs, kwnames, &align_order) < 0)
        return NULL;
    return pool_allocate(self, size, align_order, NULL, 0);
}

static PyObject *
Pool_calloc(PoolObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    size_t n, size, total;
    int align_order = self->align_order;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "calloc() takes exactly two positional arguments (%zd given)",
                     nargs);
        return NULL;
    }
    if (parse_size(args[0], "n", &n) < 0 || parse_size(args[1], "size", &size) < 0 ||
        parse_alloc_kwargs(args, nargs, kwnames, &align_order) < 0)
        return NULL;
    if (__builtin_mul_overflow(n, size, &total) || total > (size_t)PY_SSIZE_T_MAX) {
        PyErr_Format(PyExc_OverflowError, "calloc(%zu, %zu): n * size overflows", n, size);
        return NULL;
    }
    return pool_allocate(self, total, align_order, NULL, 0);
}

/* _alloc_init(data, align_order) -> Allocation holding a copy of the
 * bytes-like data, written without a writable mapping where the memory is
 * write-rare from the start (START_WR); for Pool.freeze() and Pool.array(). */
static PyObject *
Pool_alloc_init(PoolObject *self, PyObject *args)
{
    Py_buffer buf;
    int align_order;
    if (!PyArg_ParseTuple(args, "y*i:_alloc_init", &buf, &align_order))
        return NULL;
    PyObject *result = NULL;
    if (align_order < 0 || align_order > prmem_page_shift)
        PyErr_SetString(PyExc_ValueError, "_alloc_init(): bad align_order");
    else if (buf.len == 0)
        PyErr_SetString(PyExc_ValueError, "_alloc_init(): no data");
    else
        result = pool_allocate(self, (size_t)buf.len, align_order, buf.buf, (size_t)buf.len);
    PyBuffer_Release(&buf);
    return result;
}

static PyObject *
Pool_strdup(PoolObject *self, PyObject *data)
{
    Py_buffer buf;
    const char *src;
    Py_ssize_t len;
    if (PyUnicode_Check(data)) {
        src = PyUnicode_AsUTF8AndSize(data, &len);
        if (src == NULL)
            return NULL;
        buf.obj = NULL;
    }
    else {
        if (PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE) < 0) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Format(PyExc_TypeError,
                             "strdup() takes str or a bytes-like object, not %.100s",
                             Py_TYPE(data)->tp_name);
            }
            return NULL;
        }
        src = buf.buf;
        len = buf.len;
    }
    PyObject *result = NULL;
    if (memchr(src, 0, (size_t)len) != NULL)
        PyErr_SetString(PyExc_ValueError, "strdup(): embedded NUL byte");
    else
        result = pool_allocate(self, (size_t)len + 1, self->align_order, src, (size_t)len);
    if (buf.obj != NULL)
        PyBuffer_Release(&buf);
    return result;
}


static PyObject *
Pool_get_name(PoolObject *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->name);
    return self->name;
}

/* The getters below read the pool's record: only once its pointer checks
 * out (ordinary memory: see prmem_pool_meta_ok). */
#define CHECKED_META(self)                                                     \
    do {                                                                       \
        if (!prmem_pool_meta_ok(self))                                         \
            return prmem_raise_uninitialised((PyObject *)(self)), NULL;       \
    } while (0)

static PyObject *
Pool_get_mode(PoolObject *self, void *closure)
{
    (void)closure;
    CHECKED_META(self);
    return PyLong_FromLong(self->m->mode);
}

static PyObject *
Pool_get_destroyed(PoolObject *self, void *closure)
{
    (void)closure;
    CHECKED_META(self);
    return PyBool_FromLong(self->m->destroyed);
}

static PyObject *
Pool_get_serial(PoolObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->serial);
}

static PyObject *
Pool_get_seal(PoolObject *self, void *closure)
{
    (void)closure;
    CHECKED_META(self);
    return PyBool_FromLong(self->m->seal);
}

static PyObject *
Pool_get_init_done(PoolObject *self, void *closure)
{
    (void)closure;
    CHECKED_META(self);
    return PyBool_FromLong(self->m->closed);
}

static PyMethodDef Pool_methods[] = {
    {"alloc", (PyCFunction)(void (*)(void))Pool_alloc, METH_FASTCALL | METH_KEYWORDS,
     "alloc(size, *, align_order=None) -> Allocation\n\n"
     "Hand out size bytes from the pool (pmalloc).  The memory is zero-filled\n"
     "and aligned to 2**align_order (default: the pool's align_order)."},
    {"zalloc", (PyCFunction)(void (*)(void))Pool_alloc, METH_FASTCALL | METH_KEYWORDS,
     "zalloc(size, *, align_order=None) -> Allocation\n\n"
     "Like alloc(), zero-filled (pzalloc).  prmem never reuses memory inside a\n"
     "pool, so every allocation starts zeroed; zalloc says so explicitly."},
    {"calloc", (PyCFunction)(void (*)(void))Pool_calloc, METH_FASTCALL | METH_KEYWORDS,
     "calloc(n, size, *, align_order=None) -> Allocation\n\n"
     "Zero-filled n * size bytes; OverflowError if the product overflows."},
    {"strdup", (PyCFunction)Pool_strdup, METH_O,
     "strdup(data) -> Allocation\n\n"
     "NUL-terminated copy of bytes-like data, or of a str encoded as UTF-8.\n"
     "Embedded NUL bytes raise ValueError.  In START_WR pools the copy is\n"
     "written without the memory ever being mapped writable."},
    {"protect", (PyCFunction)prmem_pool_protect, METH_NOARGS,
     "protect() -> None\n\n"
     "Write-protect every area per the pool's mode (pmalloc_protect_pool):\n"
     "RO/AUTO_RO areas become READ_ONLY (sealed), WR/AUTO_WR/START_WR areas\n"
     "WRITE_RARE.  The unused rest of the current area is lost.  Raises\n"
     "BufferError while writable buffer views of the pool are alive."},
    {"destroy", (PyCFunction)prmem_pool_destroy, METH_NOARGS,
     "destroy() -> None\n\n"
     "Zero what can still be written and return every page to the system.\n"
     "Raises BufferError while buffer views are alive; a second call is a no-op."},
    {"_stats", (PyCFunction)prmem_pool_stats, METH_NOARGS, "Raw counters for Pool.stats()."},
    {"_metadata_address", (PyCFunction)prmem_pool_metadata_address, METH_NOARGS,
     "_metadata_address() -> int\n--\n\nTest-only: the address of this pool's record in prmem's "
     "write-rare metadata (read-only pages; a native write there faults)."},
    {"access", (PyCFunction)prmem_pool_access, METH_NOARGS,
     "access($self)\n--\n\nOpen a no-access pool's protected memory for reading, as a context "
     "manager: `with pool.access(): ...`.  Inside the block reads work (bytes(a), a[i], "
     "memoryviews, FrozenMap/FrozenList lookups, native code); outside it they raise "
     "ProtectionError, and a native read dies with SIGSEGV and a fault report naming "
     "no-access memory.  Blocks nest and count across threads: the pages become PROT_NONE "
     "again when the last one is left.  A buffer view taken inside a block keeps the memory "
     "readable until it is released.  Rare writes need no access().  On a pool that is not "
     "no-access the block does nothing.  __enter__ returns the pool."},
    {"_metadata_tables", (PyCFunction)prmem_pool_metadata_tables, METH_NOARGS,
     "_metadata_tables() -> tuple[int, int]\n--\n\nTest-only: the addresses of this pool's "
     "chunk and area tables in prmem's write-rare metadata (0 if it has none)."},
    {"_access_enter", (PyCFunction)prmem_pool_access_enter, METH_NOARGS,
     "Hold access to a no-access pool's memory (Pool.access())."},
    {"_access_leave", (PyCFunction)prmem_pool_access_leave, METH_NOARGS,
     "Let go of access; the memory is PROT_NONE again when nothing holds it."},
    {"_destroy_when_released", (PyCFunction)prmem_pool_destroy_when_released, METH_NOARGS,
     "Destroy now, or as soon as the last buffer view and frozen handle go."},
    {"_alloc_init", (PyCFunction)Pool_alloc_init, METH_VARARGS,
     "_alloc_init(data, align_order) -> Allocation holding a copy of data."},
    {"_verify", (PyCFunction)prmem_pool_verify, METH_NOARGS,
     "Findings of the mapping check behind Pool.verify()."},
    {"_finish_init", (PyCFunction)prmem_pool_finish_init, METH_NOARGS,
     "Sections: protect and close to allocations (prmem.mark_init_done())."},
    {"rare_write", (PyCFunction)(void (*)(void))prmem_pool_rare_write,
     METH_FASTCALL | METH_KEYWORDS,
     "rare_write(dst, data, offset=0) -> None\n\n"
     "Write data into allocation dst of this pool at offset, through the\n"
     "pool's file: WRITE_RARE memory is never mapped writable.  Raises\n"
     "ProtectionError on READ_ONLY memory or in a pool whose mode has no\n"
     "write-rare, ValueError if the range is not inside dst."},
    {"rare_memset", (PyCFunction)(void (*)(void))prmem_pool_rare_memset,
     METH_FASTCALL | METH_KEYWORDS,
     "rare_memset(dst, byte, offset=0, length=None) -> None\n\n"
     "Fill length bytes of dst (default: to its end) with byte, like rare_write()."},
    {"make_ro", (PyCFunction)prmem_pool_make_ro, METH_NOARGS,
     "make_ro() -> None\n\n"
     "Turn every area of a write-rare pool READ_ONLY for good, sealed by the\n"
     "kernel (pmalloc_make_pool_ro).  A no-op for RO/AUTO_RO pools."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Pool_getset[] = {
    {"name", (getter)Pool_get_name, NULL, "The pool's name (shown in /proc/PID/maps).", NULL},
    {"_mode", (getter)Pool_get_mode, NULL, "The pool's mode as an int.", NULL},
    {"destroyed", (getter)Pool_get_destroyed, NULL, "True once destroy() ran.", NULL},
    {"serial", (getter)Pool_get_serial, NULL,
     "A number identifying this pool, unique for the life of the process.", NULL},
    {"seal", (getter)Pool_get_seal, NULL, "True if READ_ONLY areas are also mseal()ed.", NULL},
    {"init_done", (getter)Pool_get_init_done, NULL,
     "Sections: True once prmem.mark_init_done() protected it.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Pool_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(PoolObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot Pool_slots[] = {
    {Py_tp_doc, "Low-level protectable memory pool; use prmem.Pool."},
    {Py_tp_new, Pool_new},
    {Py_tp_init, Pool_init},
    {Py_tp_dealloc, Pool_dealloc},
    {Py_tp_methods, Pool_methods},
    {Py_tp_getset, Pool_getset},
    {Py_tp_members, Pool_members},
    {0, NULL},
};

PRMEM_INTERNAL PyType_Spec prmem_pool_spec = {
    .name = "prmem._core.Pool",
    .basicsize = sizeof(PoolObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = Pool_slots,
};

