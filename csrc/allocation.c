/*
 * The Allocation type: a range of pool memory with bounds, reads, checked
 * writes and the buffer protocol with export counting (as mmap does).
 * Every check that must be atomic with a write happens under the pool lock,
 * which follows the lock rule in prmem.h.
 */
#include "prmem.h"

#include <string.h>

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

/* Lock the allocation's pool and check it is alive (for a change: that it
 * may change); on success returns the pool with its lock held, otherwise
 * raises (after unlocking) and returns NULL. */
static PoolObject *
lock_live(AllocationObject *self, int change)
{
    PoolObject *pool = self->pool;
    prmem_error e;
    POOL_LOCK(pool);
    if ((change ? prmem_check_changeable(pool, &e) : prmem_check_usable(pool, &e)) < 0 ||
        prmem_check_allocation(pool, self, &e) < 0) {
        POOL_UNLOCK(pool);
        return prmem_raise(&e);
    }
    return pool;
}

PRMEM_INTERNAL int
prmem_refuse_write(PoolObject *pool, int state, prmem_error *e)
{
    return prmem_fail(e, pool->mstate->ProtectionError,
                      "cannot write to %s memory of prmem pool '%.200s'%s",
                      prmem_state_name(state), pool->cname,
                      state == PRMEM_WRITE_RARE ? " (use rare_write())" : "");
}

static int
Allocation_getbuffer(AllocationObject *self, Py_buffer *view, int flags)
{
    PoolObject *pool = self->pool;
    prmem_error e;
    POOL_LOCK(pool);
    int writable = 0;
    if (prmem_check_usable(pool, &e) < 0 || prmem_check_allocation(pool, self, &e) < 0)
        goto fail;
    const prmem_area *area = &pool->m->areas[self->area];
    /* a forked child's snapshot of a pool (fork_errno) is not changed
     * through new views: they are read-only */
    writable = area->state == PRMEM_WRITABLE && pool->m->fork_errno == 0;
    if ((flags & PyBUF_WRITABLE) && !writable) {
        if (area->state == PRMEM_WRITABLE)
            prmem_check_changeable(pool, &e);
        else
            prmem_refuse_write(pool, area->state, &e);
        goto fail;
    }
    /* A view of a no-access pool's protected memory can only be taken
     * inside access(), and holds access until it is released.  (A view of
     * WRITABLE memory is a writable export: protect() waits for it.) */
    int holds_access = pool->m->noaccess && area->state != PRMEM_WRITABLE;
    if (holds_access && prmem_access_hold(pool, 0, &e) < 0)
        goto fail;
    pool->exports++;
    if (writable) {
        pool->area_wexports[self->area]++;
        pool->wexports++;
    }
    POOL_UNLOCK(pool);
    /* cannot fail: a read-only view was not asked to be writable */
    PyBuffer_FillInfo(view, (PyObject *)self, self->addr, (Py_ssize_t)self->size, !writable,
                      flags);
    view->internal = (void *)(intptr_t)(writable | holds_access << 1);
    return 0;
fail:
    POOL_UNLOCK(pool);
    prmem_raise(&e);
    return -1;
}

/* With the pool lock held: a buffer view of area `area` went away.  `kind`
 * is what its getbuffer stored in view->internal: bit 0, it counted as a
 * writable export; bit 1, it held access to a no-access pool. */
static void
view_released(PoolObject *pool, uint32_t area, intptr_t kind)
{
    pool->exports--;
    if (kind & 1) {
        pool->area_wexports[area]--;
        pool->wexports--;
    }
    if (kind & 2) {
        /* Closing can only fail if mprotect() cannot split a mapping: the
         * memory then stays readable, which is what the view had. */
        prmem_error e;
        prmem_access_release(pool, &e);
    }
    prmem_release_if_pending(pool); /* last: it may free the area table */
}

static void
Allocation_releasebuffer(AllocationObject *self, Py_buffer *view)
{
    PoolObject *pool = self->pool;
    POOL_LOCK(pool);
    view_released(pool, self->area, (intptr_t)view->internal);
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
    PoolObject *pool = lock_live(self, 0);
    if (pool == NULL) {
        Py_XDECREF(result);
        return NULL;
    }
    prmem_error e;
    if (prmem_access_refuse_read(pool, &pool->m->areas[self->area], &e) < 0) {
        POOL_UNLOCK(pool);
        Py_XDECREF(result);
        return prmem_raise(&e);
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
    PoolObject *pool = lock_live(self, 1);
    if (pool == NULL)
        return -1;
    int state = pool->m->areas[self->area].state;
    if (state != PRMEM_WRITABLE) {
        prmem_error e;
        prmem_refuse_write(pool, state, &e);
        POOL_UNLOCK(pool);
        prmem_raise(&e);
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
    else if (step != 1 && count > 0) {
        /* the source may be a view of this memory: a strided copy must read
         * it all before writing (a contiguous one uses memmove) */
        char *staged = PyMem_Malloc((size_t)count);
        if (staged == NULL)
            PyErr_NoMemory();
        else {
            memcpy(staged, buf.buf, (size_t)count);
            rc = checked_store(self, start, step, count, staged);
            PyMem_Free(staged);
        }
    }
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
    PoolObject *pool = lock_live(self, 0);
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
    PoolObject *pool = lock_live(self, 0);
    if (pool == NULL)
        return NULL;
    int state = pool->m->areas[self->area].state;
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
    prmem_error e;
    POOL_LOCK(pool);
    /* the record pointer and the allocation are ordinary memory: checked
     * before the protected tables are read through them */
    int bad = !prmem_pool_meta_ok(pool);
    int dead = !bad && pool->m->destroyed;
    bad = bad || (!dead && prmem_check_allocation(pool, self, &e) < 0);
    int state = bad || dead ? 0 : pool->m->areas[self->area].state;
    POOL_UNLOCK(pool);
    /* pool->name is an exact str: formatting it runs no user code (and the
     * lock is released) */
    if (bad)
        return PyUnicode_FromFormat("<prmem.Allocation pool=%R address=%p size=%zu: does not "
                                    "check out against prmem's protected metadata>",
                                    pool->name, self->addr, self->size);
    if (dead)
        return PyUnicode_FromFormat("<prmem.Allocation of destroyed pool %R, size=%zu>",
                                    pool->name, self->size);
    return PyUnicode_FromFormat("<prmem.Allocation pool=%R address=%p size=%zu state=%s>",
                                pool->name, self->addr, self->size, prmem_state_name(state));
}

static PyObject *
Allocation_reduce(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    PyErr_SetString(PyExc_TypeError,
                    "cannot pickle a prmem.Allocation to bytes: protected memory travels "
                    "only between live processes, as a descriptor. Pass it through "
                    "multiprocessing (from a sealed Pool(share=True)) or use "
                    "prmem.send()/prmem.recv(); bytes(a) is a plain copy");
    return NULL;
}

static PyMethodDef Allocation_methods[] = {
    {"__reduce__", (PyCFunction)Allocation_reduce, METH_NOARGS, NULL},
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

/* ------------------------------------------------- read-only exporter */

/*
 * _core.ReadOnlyBuffer(allocation): exports the allocation's memory as a
 * read-only buffer whatever its state (for Pool.array(): a numpy view that
 * is never writable, so it does not block protect()).  Each export counts
 * as a buffer view: destroy() refuses while one lives.
 */
typedef struct {
    PyObject_HEAD
    AllocationObject *alloc;
} ReadOnlyBufferObject;

static PyObject *
ReadOnlyBuffer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *alloc;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) > 0) {
        PyErr_SetString(PyExc_TypeError, "ReadOnlyBuffer() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O:ReadOnlyBuffer", &alloc))
        return NULL;
    PyObject *module = PyType_GetModule(type);
    if (module == NULL)
        return NULL;
    prmem_module_state *st = PyModule_GetState(module);
    if (!Py_IS_TYPE(alloc, st->AllocationType)) {
        PyErr_SetString(PyExc_TypeError, "ReadOnlyBuffer() takes a prmem.Allocation");
        return NULL;
    }
    ReadOnlyBufferObject *self = (ReadOnlyBufferObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(alloc);
    self->alloc = (AllocationObject *)alloc;
    return (PyObject *)self;
}

static void
ReadOnlyBuffer_dealloc(ReadOnlyBufferObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(self->alloc);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int
ReadOnlyBuffer_getbuffer(ReadOnlyBufferObject *self, Py_buffer *view, int flags)
{
    AllocationObject *a = self->alloc;
    if (flags & PyBUF_WRITABLE) {
        PyErr_SetString(PyExc_BufferError, "this view of prmem memory is read-only");
        return -1;
    }
    PoolObject *pool = lock_live(a, 0); /* checks the allocation too */
    if (pool == NULL)
        return -1;
    prmem_error e;
    /* In a no-access pool: on protected memory, the view holds access (see
     * Allocation_getbuffer); on WRITABLE memory it holds protect() back
     * like a writable view, or protect() would take the pages away under
     * it (other pools let protect() go on: their pages stay readable). */
    const prmem_area *area = &pool->m->areas[a->area];
    int holds_access = pool->m->noaccess && area->state != PRMEM_WRITABLE;
    int holds_protect = pool->m->noaccess && area->state == PRMEM_WRITABLE;
    if (holds_access && prmem_access_hold(pool, 0, &e) < 0) {
        POOL_UNLOCK(pool);
        prmem_raise(&e);
        return -1;
    }
    pool->exports++;
    if (holds_protect) {
        pool->area_wexports[a->area]++;
        pool->wexports++;
    }
    POOL_UNLOCK(pool);
    PyBuffer_FillInfo(view, (PyObject *)self, a->addr, (Py_ssize_t)a->size, 1, flags);
    view->internal = (void *)(intptr_t)(holds_protect | holds_access << 1);
    return 0;
}

static void
ReadOnlyBuffer_releasebuffer(ReadOnlyBufferObject *self, Py_buffer *view)
{
    PoolObject *pool = self->alloc->pool;
    POOL_LOCK(pool);
    view_released(pool, self->alloc->area, (intptr_t)view->internal);
    POOL_UNLOCK(pool);
}

static PyObject *
ReadOnlyBuffer_get_allocation(ReadOnlyBufferObject *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->alloc);
    return (PyObject *)self->alloc;
}

static PyGetSetDef ReadOnlyBuffer_getset[] = {
    {"allocation", (getter)ReadOnlyBuffer_get_allocation, NULL, "The allocation exported.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot ReadOnlyBuffer_slots[] = {
    {Py_tp_getset, ReadOnlyBuffer_getset},
    {Py_tp_doc, "ReadOnlyBuffer(allocation): a read-only buffer of the allocation."},
    {Py_tp_new, ReadOnlyBuffer_new},
    {Py_tp_dealloc, ReadOnlyBuffer_dealloc},
#if PY_VERSION_HEX >= 0x03090000
    {Py_bf_getbuffer, ReadOnlyBuffer_getbuffer},
    {Py_bf_releasebuffer, ReadOnlyBuffer_releasebuffer},
#endif
    {0, NULL},
};

PRMEM_INTERNAL PyType_Spec prmem_readonly_buffer_spec = {
    .name = "prmem._core.ReadOnlyBuffer",
    .basicsize = sizeof(ReadOnlyBufferObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = ReadOnlyBuffer_slots,
};
