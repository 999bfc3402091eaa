/*
 * No-access pools: Pool(noaccess=True).  Once protected, their memory is
 * PROT_NONE (neither readable nor writable) except while something holds
 * access: a `with pool.access():` block, a buffer view taken inside one,
 * or a frozen-container read in progress.  pool->access_count counts the
 * holders, across threads; the pages become readable when it leaves 0 and
 * PROT_NONE again when it returns to 0.  WRITABLE areas (not protected yet)
 * are not affected, and rare writes need no access: they go through the
 * memory file (or, for secret pools, a second short-lived mapping).
 *
 * Every protection prmem sets elsewhere (areas.c, seal.c, unshare.c,
 * fork.c) comes from prmem_protected_prot(), so a state change or a copy
 * made while access is closed stays closed.  Same floor as the allocator.
 */
#include "prmem.h"

#include <errno.h>
#include <sys/mman.h>

/* Give every protected area of the pool protection prot, one mprotect per
 * run of adjacent protected areas of the same chunk. */
static int
set_protected_areas(PoolObject *pool, int prot)
{
    if (!prmem_enforce)
        return 0;
    size_t i = 0;
    while (i < pool->m->nareas) {
        const prmem_area *a = &pool->m->areas[i];
        if (a->state == PRMEM_WRITABLE) {
            i++;
            continue;
        }
        size_t j = prmem_area_run_end(pool, i, 0);
        const prmem_area *last = &pool->m->areas[j - 1];
        if (mprotect(a->start, (size_t)(last->start + last->size - a->start), prot) < 0)
            return -1;
        i = j;
    }
    return 0;
}

PRMEM_INTERNAL int
prmem_access_refuse_read(PoolObject *pool, const prmem_area *area, prmem_error *e)
{
    if (!pool->m->noaccess || area->state == PRMEM_WRITABLE || pool->access_count > 0)
        return 0;
    return prmem_fail(e, pool->mstate->ProtectionError,
                      "prmem pool '%.200s' is no-access: its %s memory can only be read "
                      "inside `with pool.access():`",
                      pool->cname, prmem_state_name(area->state));
}

PRMEM_INTERNAL int
prmem_access_hold(PoolObject *pool, int open_if_closed, prmem_error *e)
{
    if (!pool->m->noaccess)
        return 0;
    if (pool->access_count == 0) {
        if (!open_if_closed)
            return prmem_fail(e, pool->mstate->ProtectionError,
                              "prmem pool '%.200s' is no-access: its memory can only be read "
                              "inside `with pool.access():`",
                              pool->cname);
        if (set_protected_areas(pool, PROT_READ) < 0) {
            int err = errno;
            set_protected_areas(pool, PROT_NONE); /* all or nothing */
            return prmem_fail_os(e, "mprotect", err);
        }
    }
    pool->access_count++;
    return 0;
}

PRMEM_INTERNAL int
prmem_access_release(PoolObject *pool, prmem_error *e)
{
    if (!pool->m->noaccess || pool->access_count <= 0)
        return 0;
    if (--pool->access_count > 0)
        return 0;
    if (pool->m->destroyed || pool->m->areas == NULL)
        return 0;
    if (set_protected_areas(pool, PROT_NONE) < 0) {
        /* Cannot close (mprotect failed, e.g. out of memory for a VMA
         * split): the pool stays usable but not no-access; say so. */
        int err = errno;
        pool->access_count++; /* still open: keep the count true */
        return prmem_fail_os(e, "mprotect", err);
    }
    return 0;
}

PRMEM_INTERNAL PyObject *
prmem_pool_access_enter(PoolObject *self, PyObject *unused)
{
    (void)unused;
    prmem_error e;
    POOL_LOCK(self);
    if (prmem_check_usable(self, &e) < 0 || prmem_access_hold(self, 1, &e) < 0) {
        POOL_UNLOCK(self);
        return prmem_raise(&e);
    }
    POOL_UNLOCK(self);
    Py_RETURN_NONE;
}

PRMEM_INTERNAL PyObject *
prmem_pool_access_leave(PoolObject *self, PyObject *unused)
{
    (void)unused;
    prmem_error e;
    if (!prmem_pool_meta_ok(self))
        return prmem_raise_uninitialised((PyObject *)self), NULL;
    POOL_LOCK(self);
    if (self->m->noaccess && self->access_count <= 0) {
        POOL_UNLOCK(self);
        PyErr_SetString(PyExc_RuntimeError, "pool.access() left more often than entered");
        return NULL;
    }
    int rc = prmem_access_release(self, &e);
    prmem_release_if_pending(self);
    POOL_UNLOCK(self);
    if (rc < 0)
        return prmem_raise(&e);
    Py_RETURN_NONE;
}

/* ------------------------------------------------ `with pool.access():` */

/* What Pool.access() returns: a small context manager in C, so that a
 * round trip costs two method calls and the two mprotect()s, not Python
 * frames.  Re-entrant and re-usable: each __enter__ holds access once. */
typedef struct {
    PyObject_HEAD
    PoolObject *pool; /* strong reference */
} AccessObject;

static PyObject *
Access_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)type, (void)args, (void)kwds;
    PyErr_SetString(PyExc_TypeError, "use pool.access() to open a no-access pool");
    return NULL;
}

static void
Access_dealloc(AccessObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(self->pool);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
Access_enter(AccessObject *self, PyObject *unused)
{
    PyObject *r = prmem_pool_access_enter(self->pool, unused);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_INCREF(self->pool);
    return (PyObject *)self->pool;
}

static PyObject *
Access_exit(AccessObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)args, (void)nargs;
    return prmem_pool_access_leave(self->pool, NULL); /* None: exceptions propagate */
}

static PyMethodDef Access_methods[] = {
    {"__enter__", (PyCFunction)Access_enter, METH_NOARGS, "Hold access; returns the pool."},
    {"__exit__", (PyCFunction)(void (*)(void))Access_exit, METH_FASTCALL,
     "Let go of access (the pages close when nothing else holds it)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Access_slots[] = {
    {Py_tp_doc, "`with pool.access():` (see Pool.access)."},
    {Py_tp_new, Access_new},
    {Py_tp_dealloc, Access_dealloc},
    {Py_tp_methods, Access_methods},
    {0, NULL},
};

PRMEM_INTERNAL PyType_Spec prmem_access_spec = {
    .name = "prmem._core.Access",
    .basicsize = sizeof(AccessObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Access_slots,
};

PRMEM_INTERNAL PyObject *
prmem_pool_access(PoolObject *self, PyObject *unused)
{
    (void)unused;
    PyTypeObject *tp = self->mstate != NULL ? self->mstate->AccessType : NULL;
    if (tp == NULL)
        return prmem_raise_uninitialised((PyObject *)self), NULL;
    AccessObject *a = PyObject_New(AccessObject, tp);
    if (a == NULL)
        return NULL;
    Py_INCREF(self);
    a->pool = self;
    return (PyObject *)a;
}
