/*
 * The Pool and Allocation types: pmalloc-style bump allocation from areas,
 * protection, destruction, and the buffer protocol with export counting.
 */
#include "prmem.h"

#include <string.h>

/* ---------------------------------------------------------------- helpers */

static prmem_module_state *state_from_type(PyTypeObject *type);

/* With pool->lock held: refuse pools that were never initialised or are
 * destroyed. */
PRMEM_INTERNAL int
prmem_check_usable(PoolObject *pool)
{
    if (!pool->ready) {
        prmem_module_state *st = state_from_type(Py_TYPE(pool));
        if (st != NULL)
            PyErr_SetString(st->PrmemError,
                            "prmem pool is not initialised (Pool.__init__ was not called)");
        return -1;
    }
    if (pool->destroyed) {
        PyErr_Format(pool->mstate->PoolDestroyedError,
                     "prmem pool %R has been destroyed", pool->name);
        return -1;
    }
    if (pool->fork_errno) {
        PyErr_Format(pool->mstate->PrmemError,
                     "prmem pool %R is unusable in this forked child: its memory could "
                     "not be copied privately (%s), so it was made inaccessible rather "
                     "than shared with the parent",
                     pool->name, strerror(pool->fork_errno));
        return -1;
    }
    return 0;
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
    if (!self->ready)
        return prmem_check_usable(self), NULL; /* mstate is not set yet */
    AllocationObject *obj = PyObject_New(AllocationObject, self->mstate->AllocationType);
    if (obj == NULL)
        return NULL;
    obj->pool = NULL;

    POOL_LOCK(self);
    if (prmem_check_usable(self) < 0)
        goto fail;
    if (self->closed) {
        PyErr_Format(self->mstate->ProtectionError,
                     "%U is closed: allocations are only possible before "
                     "prmem.mark_init_done()", self->name);
        goto fail;
    }
    size_t align = (size_t)1 << align_order;
    char *addr = NULL;
    if (self->cur_area >= 0) {
        prmem_area *a = &self->areas[self->cur_area];
        uintptr_t p = (uintptr_t)a->start + self->cur_off;
        uintptr_t q = (p + align - 1) & ~(uintptr_t)(align - 1);
        uintptr_t end = (uintptr_t)a->start + a->size;
        if (q <= end && size <= end - q)
            addr = (char *)q;
    }
    if (addr == NULL) {
        if (prmem_area_open(self, size) < 0)
            goto fail;
        addr = self->areas[self->cur_area].start;
    }
    prmem_area *area = &self->areas[self->cur_area];
    if (init != NULL && init_len > 0) {
        if (area->state == PRMEM_WRITABLE)
            memcpy(addr, init, init_len);
        else if (prmem_file_write(self, area, addr, init, init_len, 0) < 0)
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
    Py_DECREF(obj);
    return NULL;
}

/* ---------------------------------------------------------------- Pool */

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
    self->name = PyUnicode_FromString("?");
    if (self->name == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static prmem_module_state *
state_from_type(PyTypeObject *type)
{
    /* Walk the MRO to the C base type (Python subclasses have no module). */
    PyObject *mro = type->tp_mro;
    for (Py_ssize_t i = 0; mro && i < PyTuple_GET_SIZE(mro); i++) {
        PyTypeObject *t = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        if (!(t->tp_flags & Py_TPFLAGS_HEAPTYPE))
            continue;
        PyObject *mod = PyType_GetModule(t);
        if (mod == NULL) {
            PyErr_Clear();
            continue;
        }
        if (PyModule_GetDef(mod) == prmem_moduledef_ptr())
            return (prmem_module_state *)PyModule_GetState(mod);
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
                             "section", "secret", "dontdump", "lock",      NULL};
    int mode, align_order, seal = 0, section = 0, secret = 0, dontdump = 0, lock = 0;
    PyObject *name;
    Py_ssize_t refill;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iUni|ppppp:Pool", kwlist, &mode, &name,
                                     &refill, &align_order, &seal, &section, &secret,
                                     &dontdump, &lock))
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
    if (self->ready) {
        POOL_UNLOCK(self);
        Py_DECREF(exact_name);
        PyMem_RawFree(cname);
        PyErr_SetString(PyExc_RuntimeError, "prmem pool is already initialised");
        return -1;
    }
    static unsigned long long next_serial = 1;
    self->serial = __atomic_fetch_add(&next_serial, 1, __ATOMIC_RELAXED);
    self->mstate = st;
    self->mode = mode;
    self->align_order = align_order;
    self->seal = seal;
    self->section = section;
    self->secret = secret;
    /* memfd_secret memory is always locked and never dumped */
    self->dontdump = dontdump || secret;
    self->mlock_areas = lock && !secret;
    self->lock_requested = lock || secret;
    self->refill = ((size_t)refill + prmem_page_size - 1) & ~(prmem_page_size - 1);
    self->next_chunk_size = (size_t)16 << 20;
    PyObject *placeholder = self->name;
    self->name = exact_name;
    self->cname = cname;
    self->ready = 1;
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
    prmem_registry_remove(self);
    /* No allocation or buffer view can be alive: each holds a reference. */
    if (self->ready && !self->destroyed)
        prmem_pool_release(self);
    else {
        PyMem_Free(self->chunks);
        PyMem_Free(self->areas);
    }
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

/* With the lock held: protect every area per the mode. */
static int
protect_locked(PoolObject *self)
{
    if (prmem_check_usable(self) < 0)
        return -1;
    if (self->wexports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot protect pool %R: %zd writable buffer view(s) of its "
                     "memory are still alive; release them first",
                     self->name, self->wexports);
        return -1;
    }
    if (self->mode == PRMEM_MODE_RO || self->mode == PRMEM_MODE_AUTO_RO)
        return prmem_seal_all(self);
    return prmem_make_write_rare(self);
}

static PyObject *
Pool_protect(PoolObject *self, PyObject *unused)
{
    (void)unused;
    POOL_LOCK(self);
    int rc = protect_locked(self);
    POOL_UNLOCK(self);
    prmem_fault_sync();
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Sections only: protect per the mode and refuse allocations from now on.
 * Returns True the first time, False when already closed. */
static PyObject *
Pool_finish_init(PoolObject *self, PyObject *unused)
{
    (void)unused;
    POOL_LOCK(self);
    int rc = 0, done = self->closed;
    if (!self->section) {
        PyErr_SetString(PyExc_TypeError, "only after-init sections can finish init");
        rc = -1;
    }
    else if (!done) {
        rc = protect_locked(self);
        if (rc == 0)
            self->closed = 1;
    }
    POOL_UNLOCK(self);
    prmem_fault_sync();
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(!done);
}

static PyObject *
Pool_destroy(PoolObject *self, PyObject *unused)
{
    (void)unused;
    POOL_LOCK(self);
    if (self->ready && self->destroyed) {
        POOL_UNLOCK(self); /* destroying twice is a no-op */
        Py_RETURN_NONE;
    }
    if (prmem_check_usable(self) < 0)
        goto fail;
    if (self->section) {
        PyErr_Format(self->mstate->ProtectionError,
                     "%U cannot be destroyed: after-init sections live as long as the process",
                     self->name);
        goto fail;
    }
    if (self->exports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot destroy pool %R: %zd buffer view(s) of its memory "
                     "are still alive; release them first",
                     self->name, self->exports);
        goto fail;
    }
    prmem_pool_release(self);
    self->destroyed = 1;
    POOL_UNLOCK(self);
    Py_RETURN_NONE;
fail:
    POOL_UNLOCK(self);
    return NULL;
}

static int
dict_set_size(PyObject *d, const char *key, size_t v)
{
    PyObject *o = PyLong_FromSize_t(v);
    if (o == NULL)
        return -1;
    int rc = PyDict_SetItemString(d, key, o);
    Py_DECREF(o);
    return rc;
}

static PyObject *
Pool_stats(PoolObject *self, PyObject *unused)
{
    (void)unused;
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    size_t by_state[PRMEM_NSTATES] = {0, 0, 0};
    size_t mapped = 0, reserved = 0, sealed_chunks = 0, free_bytes = 0;
    POOL_LOCK(self);
    if (prmem_check_usable(self) < 0) {
        POOL_UNLOCK(self);
        Py_DECREF(d);
        return NULL;
    }
    for (size_t i = 0; i < self->nareas; i++) {
        by_state[self->areas[i].state]++;
        mapped += self->areas[i].size;
    }
    for (size_t i = 0; i < self->nchunks; i++) {
        reserved += self->chunks[i].size;
        sealed_chunks += self->chunks[i].sealed != 0;
    }
    if (self->cur_area >= 0)
        free_bytes = self->areas[self->cur_area].size - self->cur_off;
    size_t vals[] = {
        self->nallocs, self->nareas, self->nchunks, sealed_chunks,
        self->bytes_requested, mapped, reserved, self->bytes_lost, free_bytes,
        by_state[PRMEM_WRITABLE], by_state[PRMEM_WRITE_RARE], by_state[PRMEM_READ_ONLY],
        (size_t)self->exports, (size_t)self->wexports, (size_t)self->mode,
        (size_t)self->secret, (size_t)self->dontdump, (size_t)self->lock_requested,
        (size_t)self->seal,
    };
    POOL_UNLOCK(self);
    static const char *keys[] = {
        "allocations", "areas", "chunks", "sealed_chunks",
        "bytes_requested", "bytes_mapped", "bytes_reserved", "bytes_lost_to_protection",
        "bytes_free", "areas_writable", "areas_write_rare", "areas_read_only",
        "buffer_views", "writable_buffer_views", "mode",
        "secret", "dontdump", "locked", "seal",
    };
    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
        if (dict_set_size(d, keys[i], vals[i]) < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}

static PyObject *
Pool_get_name(PoolObject *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->name);
    return self->name;
}

static PyObject *
Pool_get_mode(PoolObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(self->mode);
}

static PyObject *
Pool_get_destroyed(PoolObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->destroyed);
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
    return PyBool_FromLong(self->seal);
}

static PyObject *
Pool_get_init_done(PoolObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->closed);
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
    {"protect", (PyCFunction)Pool_protect, METH_NOARGS,
     "protect() -> None\n\n"
     "Write-protect every area per the pool's mode (pmalloc_protect_pool):\n"
     "RO/AUTO_RO areas become READ_ONLY (sealed), WR/AUTO_WR/START_WR areas\n"
     "WRITE_RARE.  The unused rest of the current area is lost.  Raises\n"
     "BufferError while writable buffer views of the pool are alive."},
    {"destroy", (PyCFunction)Pool_destroy, METH_NOARGS,
     "destroy() -> None\n\n"
     "Zero what can still be written and return every page to the system.\n"
     "Raises BufferError while buffer views are alive; a second call is a no-op."},
    {"_stats", (PyCFunction)Pool_stats, METH_NOARGS, "Raw counters for Pool.stats()."},
    {"_finish_init", (PyCFunction)Pool_finish_init, METH_NOARGS,
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

/* ---------------------------------------------------------- Allocation */

static void
Allocation_dealloc(AllocationObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(self->pool);
    PyObject_Free(self);
    Py_DECREF(tp);
}

static PyObject *
Allocation_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)type;
    (void)args;
    (void)kwds;
    PyErr_SetString(PyExc_TypeError,
                    "Allocation objects are created by Pool.alloc() and friends");
    return NULL;
}

/* Lock the allocation's pool and check it is alive; on success returns the
 * pool with its lock held. */
static PoolObject *
lock_live(AllocationObject *self)
{
    PoolObject *pool = self->pool;
    POOL_LOCK(pool);
    if (prmem_check_usable(pool) < 0) {
        POOL_UNLOCK(pool);
        return NULL;
    }
    return pool;
}

PRMEM_INTERNAL int
prmem_refuse_write(PoolObject *pool, int state)
{
    PyErr_Format(pool->mstate->ProtectionError,
                 "cannot write to %s memory of prmem pool %R%s", prmem_state_name(state),
                 pool->name,
                 state == PRMEM_WRITE_RARE ? " (use rare_write())" : "");
    return -1;
}

static int
Allocation_getbuffer(AllocationObject *self, Py_buffer *view, int flags)
{
    PoolObject *pool = lock_live(self);
    if (pool == NULL)
        return -1;
    prmem_area *area = &pool->areas[self->area];
    int writable = area->state == PRMEM_WRITABLE;
    if ((flags & PyBUF_WRITABLE) && !writable) {
        prmem_refuse_write(pool, area->state);
        POOL_UNLOCK(pool);
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->addr, (Py_ssize_t)self->size,
                          !writable, flags) < 0) {
        POOL_UNLOCK(pool);
        return -1;
    }
    view->internal = (void *)(intptr_t)writable;
    pool->exports++;
    if (writable) {
        area->wexports++;
        pool->wexports++;
    }
    POOL_UNLOCK(pool);
    return 0;
}

static void
Allocation_releasebuffer(AllocationObject *self, Py_buffer *view)
{
    PoolObject *pool = self->pool;
    POOL_LOCK(pool);
    pool->exports--;
    if (view->internal != NULL) {
        pool->areas[self->area].wexports--;
        pool->wexports--;
    }
    POOL_UNLOCK(pool);
}

static Py_ssize_t
Allocation_length(AllocationObject *self)
{
    return (Py_ssize_t)self->size;
}

/* Resolve an index or slice against the allocation: start, step, count. */
static int
resolve_key(AllocationObject *self, PyObject *key, Py_ssize_t *start, Py_ssize_t *step,
            Py_ssize_t *count, int *is_index)
{
    Py_ssize_t n = (Py_ssize_t)self->size;
    if (PyIndex_Check(key)) {
        Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
        if (i == -1 && PyErr_Occurred())
            return -1;
        if (i < 0)
            i += n;
        if (i < 0 || i >= n) {
            PyErr_SetString(PyExc_IndexError, "allocation index out of range");
            return -1;
        }
        *start = i;
        *step = 1;
        *count = 1;
        *is_index = 1;
        return 0;
    }
    if (PySlice_Check(key)) {
        Py_ssize_t stop;
        if (PySlice_Unpack(key, start, &stop, step) < 0)
            return -1;
        *count = PySlice_AdjustIndices(n, start, &stop, *step);
        *is_index = 0;
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "allocation indices must be integers or slices, not %.100s",
                 Py_TYPE(key)->tp_name);
    return -1;
}

static PyObject *
Allocation_subscript(AllocationObject *self, PyObject *key)
{
    Py_ssize_t start, step, count;
    int is_index;
    if (resolve_key(self, key, &start, &step, &count, &is_index) < 0)
        return NULL;
    PyObject *result = is_index ? NULL : PyBytes_FromStringAndSize(NULL, count);
    if (!is_index && result == NULL)
        return NULL;
    PoolObject *pool = lock_live(self);
    if (pool == NULL) {
        Py_XDECREF(result);
        return NULL;
    }
    if (is_index) {
        unsigned char b = (unsigned char)self->addr[start];
        POOL_UNLOCK(pool);
        return PyLong_FromLong(b);
    }
    char *out = PyBytes_AS_STRING(result);
    if (step == 1)
        memcpy(out, self->addr + start, (size_t)count);
    else
        for (Py_ssize_t i = 0; i < count; i++)
            out[i] = self->addr[start + i * step];
    POOL_UNLOCK(pool);
    return result;
}

/* Copy src into [start, start+count*step) after checking, under the pool
 * lock, that the memory is WRITABLE.  Nothing changes on error. */
static int
checked_store(AllocationObject *self, Py_ssize_t start, Py_ssize_t step, Py_ssize_t count,
              const char *src)
{
    PoolObject *pool = lock_live(self);
    if (pool == NULL)
        return -1;
    int state = pool->areas[self->area].state;
    if (state != PRMEM_WRITABLE) {
        prmem_refuse_write(pool, state);
        POOL_UNLOCK(pool);
        return -1;
    }
    if (step == 1)
        memmove(self->addr + start, src, (size_t)count);
    else
        for (Py_ssize_t i = 0; i < count; i++)
            self->addr[start + i * step] = src[i];
    POOL_UNLOCK(pool);
    return 0;
}

static int
Allocation_ass_subscript(AllocationObject *self, PyObject *key, PyObject *value)
{
    Py_ssize_t start, step, count;
    int is_index;
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "cannot delete bytes of a prmem allocation");
        return -1;
    }
    if (resolve_key(self, key, &start, &step, &count, &is_index) < 0)
        return -1;
    if (is_index) {
        long v = PyLong_Check(value) ? PyLong_AsLong(value) : -2;
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (v < 0 || v > 255) {
            PyErr_SetString(PyExc_ValueError, "byte must be an int in range(0, 256)");
            return -1;
        }
        char c = (char)v;
        return checked_store(self, start, 1, 1, &c);
    }
    Py_buffer buf;
    if (PyObject_GetBuffer(value, &buf, PyBUF_SIMPLE) < 0)
        return -1;
    int rc = -1;
    if (buf.len != count)
        PyErr_Format(PyExc_ValueError,
                     "cannot resize a prmem allocation: slice has %zd bytes, data has %zd",
                     count, buf.len);
    else
        rc = checked_store(self, start, step, count, buf.buf);
    PyBuffer_Release(&buf);
    return rc;
}

/* Parse (data, offset) style arguments shared by write() and rare_write():
 * returns 0 with buf filled and *offset in bounds. */
PRMEM_INTERNAL int
prmem_get_data_and_offset(AllocationObject *self, PyObject *data, PyObject *offset_obj,
                    Py_buffer *buf, Py_ssize_t *offset)
{
    Py_ssize_t off = 0;
    if (offset_obj != NULL) {
        if (!PyIndex_Check(offset_obj)) {
            PyErr_Format(PyExc_TypeError, "offset must be an int, not %.100s",
                         Py_TYPE(offset_obj)->tp_name);
            return -1;
        }
        off = PyNumber_AsSsize_t(offset_obj, NULL);
        if (off == -1 && PyErr_Occurred())
            return -1;
    }
    if (PyObject_GetBuffer(data, buf, PyBUF_SIMPLE) < 0)
        return -1;
    if (off < 0 || (size_t)off > self->size || (size_t)buf->len > self->size - (size_t)off) {
        PyErr_Format(PyExc_ValueError,
                     "write of %zd bytes at offset %R is outside the allocation (%zu bytes)",
                     buf->len, offset_obj ? offset_obj : Py_None, self->size);
        PyBuffer_Release(buf);
        return -1;
    }
    *offset = off;
    return 0;
}

/* Parse METH_FASTCALL|METH_KEYWORDS arguments by name into vals[] (borrowed
 * references, NULL where not given). */
PRMEM_INTERNAL int
prmem_parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                 const char *const *names, Py_ssize_t nrequired, Py_ssize_t nnames,
                 PyObject **vals)
{
    for (Py_ssize_t j = 0; j < nnames; j++)
        vals[j] = NULL;
    if (nargs > nnames) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd arguments (%zd given)", fname,
                     nnames, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        vals[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        Py_ssize_t slot = -1;
        for (Py_ssize_t j = 0; j < nnames; j++)
            if (PyUnicode_CompareWithASCIIString(key, names[j]) == 0)
                slot = j;
        if (slot < 0 || vals[slot] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected or repeated argument %R",
                         fname, key);
            return -1;
        }
        vals[slot] = args[nargs + i];
    }
    for (Py_ssize_t j = 0; j < nrequired; j++) {
        if (vals[j] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
                         names[j]);
            return -1;
        }
    }
    return 0;
}

static PyObject *
Allocation_write(AllocationObject *self, PyObject *const *args, Py_ssize_t nargs,
                 PyObject *kwnames)
{
    static const char *const names[] = {"data", "offset"};
    PyObject *vals[2];
    if (prmem_parse_args("write", args, nargs, kwnames, names, 1, 2, vals) < 0)
        return NULL;
    Py_buffer buf;
    Py_ssize_t off;
    if (prmem_get_data_and_offset(self, vals[0], vals[1], &buf, &off) < 0)
        return NULL;
    int rc = checked_store(self, off, 1, buf.len, buf.buf);
    PyBuffer_Release(&buf);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Allocation_get_address(AllocationObject *self, void *closure)
{
    (void)closure;
    PoolObject *pool = lock_live(self);
    if (pool == NULL)
        return NULL;
    POOL_UNLOCK(pool);
    return PyLong_FromVoidPtr(self->addr);
}

static PyObject *
Allocation_get_size(AllocationObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSize_t(self->size);
}

static PyObject *
Allocation_get_state(AllocationObject *self, void *closure)
{
    (void)closure;
    PoolObject *pool = lock_live(self);
    if (pool == NULL)
        return NULL;
    int state = pool->areas[self->area].state;
    POOL_UNLOCK(pool);
    PyObject *members = pool->mstate->state_members;
    if (members != NULL && PyTuple_GET_SIZE(members) == PRMEM_NSTATES) {
        PyObject *m = PyTuple_GET_ITEM(members, state);
        Py_INCREF(m);
        return m;
    }
    return PyLong_FromLong(state);
}

static PyObject *
Allocation_get_pool(AllocationObject *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->pool);
    return (PyObject *)self->pool;
}

static PyObject *
Allocation_repr(AllocationObject *self)
{
    PoolObject *pool = self->pool;
    POOL_LOCK(pool);
    int dead = pool->destroyed;
    int state = dead ? 0 : pool->areas[self->area].state;
    POOL_UNLOCK(pool);
    if (dead)
        return PyUnicode_FromFormat("<prmem.Allocation of destroyed pool %R, size=%zu>",
                                    pool->name, self->size);
    return PyUnicode_FromFormat("<prmem.Allocation pool=%R address=%p size=%zu state=%s>",
                                pool->name, self->addr, self->size, prmem_state_name(state));
}

static PyMethodDef Allocation_methods[] = {
    {"write", (PyCFunction)(void (*)(void))Allocation_write, METH_FASTCALL | METH_KEYWORDS,
     "write(data, offset=0) -> None\n\n"
     "Copy bytes-like data into the allocation at offset.  Only while the\n"
     "memory is WRITABLE: otherwise ProtectionError, and nothing changes.\n"
     "ValueError if the data does not fit inside the allocation."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Allocation_getset[] = {
    {"address", (getter)Allocation_get_address, NULL,
     "Start address as an int (usable with ctypes).", NULL},
    {"size", (getter)Allocation_get_size, NULL, "Size in bytes.", NULL},
    {"state", (getter)Allocation_get_state, NULL,
     "prmem.State of the memory: WRITABLE, WRITE_RARE or READ_ONLY.", NULL},
    {"pool", (getter)Allocation_get_pool, NULL, "The pool the memory belongs to.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Allocation_slots[] = {
    {Py_tp_doc,
     "A range of protectable memory handed out by a prmem pool.\n\n"
     "Supports len(), indexing and slicing (reads return ints/bytes), the\n"
     "buffer protocol (read-only unless the memory is WRITABLE), and\n"
     "write()/item assignment while WRITABLE."},
    {Py_tp_new, Allocation_new},
    {Py_tp_dealloc, Allocation_dealloc},
    {Py_tp_repr, Allocation_repr},
    {Py_tp_methods, Allocation_methods},
    {Py_tp_getset, Allocation_getset},
    {Py_mp_length, Allocation_length},
    {Py_mp_subscript, Allocation_subscript},
    {Py_mp_ass_subscript, Allocation_ass_subscript},
    {Py_sq_length, Allocation_length},
#if PY_VERSION_HEX >= 0x03090000
    {Py_bf_getbuffer, Allocation_getbuffer},
    {Py_bf_releasebuffer, Allocation_releasebuffer},
#endif
    {0, NULL},
};

PRMEM_INTERNAL PyType_Spec prmem_allocation_spec = {
    .name = "prmem.Allocation",
    .basicsize = sizeof(AllocationObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Allocation_slots,
};
