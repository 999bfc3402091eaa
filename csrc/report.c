/*
 * What a pool can tell about itself: its counters (Pool._stats) and the
 * check of its mappings against /proc/self/maps (Pool._verify).  Both copy
 * plain C values under the pool lock and build Python objects after.
 */
#include "prmem.h"

/* Pool._verify() -> (count, [(area, start, end, problem, perms), ...]): what
 * /proc/self/maps shows that does not match the pool's areas (the first
 * 16 findings); Pool.verify() in Python turns them into ProtectionError. */
PRMEM_INTERNAL PyObject *
prmem_pool_verify(PoolObject *self, PyObject *unused)
{
    (void)unused;
    if (!prmem_pool_ready(self))
        return prmem_raise_uninitialised((PyObject *)self), NULL;
    enum { MAX_FINDINGS = 16 };
    prmem_verify_finding found[MAX_FINDINGS];
    prmem_error e;
    POOL_LOCK(self);
    Py_ssize_t n = -1;
    if (prmem_check_usable(self, &e) == 0)
        n = prmem_verify(self, found, MAX_FINDINGS, &e);
    POOL_UNLOCK(self);
    if (n < 0)
        return prmem_raise(&e);
    PyObject *list = PyList_New(0);
    for (Py_ssize_t i = 0; list != NULL && i < n && i < MAX_FINDINGS; i++) {
        PyObject *item = Py_BuildValue("(nkkis)", (Py_ssize_t)found[i].area,
                                       (unsigned long)found[i].start,
                                       (unsigned long)found[i].end, found[i].problem,
                                       found[i].perms);
        if (item == NULL || PyList_Append(list, item) < 0)
            Py_CLEAR(list);
        Py_XDECREF(item);
    }
    if (list == NULL)
        return NULL;
    return Py_BuildValue("(nN)", n, list);
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

PRMEM_INTERNAL PyObject *
prmem_pool_stats(PoolObject *self, PyObject *unused)
{
    (void)unused;
    if (!prmem_pool_ready(self))
        return prmem_raise_uninitialised((PyObject *)self), NULL;
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    size_t by_state[PRMEM_NSTATES] = {0, 0, 0};
    size_t mapped = 0, reserved = 0, sealed_chunks = 0, free_bytes = 0, descriptors = 0;
    prmem_error e;
    POOL_LOCK(self);
    if (prmem_check_usable(self, &e) < 0) {
        POOL_UNLOCK(self);
        Py_DECREF(d);
        return prmem_raise(&e);
    }
    for (size_t i = 0; i < self->m->nareas; i++) {
        by_state[self->m->areas[i].state]++;
        mapped += self->m->areas[i].size;
    }
    for (size_t i = 0; i < self->m->nchunks; i++) {
        reserved += self->m->chunks[i].size;
        sealed_chunks += self->m->chunks[i].sealed != 0;
        descriptors += self->m->chunks[i].fd >= 0;
    }
    if (self->cur_area >= 0)
        free_bytes = self->m->areas[self->cur_area].size - self->cur_off;
    size_t vals[] = {
        self->nallocs, self->m->nareas, self->m->nchunks, sealed_chunks,
        self->bytes_requested, mapped, reserved, self->bytes_lost, free_bytes,
        by_state[PRMEM_WRITABLE], by_state[PRMEM_WRITE_RARE], by_state[PRMEM_READ_ONLY],
        (size_t)self->exports, (size_t)self->wexports, (size_t)self->m->mode,
        (size_t)self->m->secret, (size_t)self->m->dontdump, (size_t)self->m->lock_requested,
        (size_t)self->m->seal, descriptors, (size_t)self->m->noaccess,
        (size_t)(self->access_count > 0 ? self->access_count : 0),
    };
    POOL_UNLOCK(self);
    static const char *keys[] = {
        "allocations", "areas", "chunks", "sealed_chunks",
        "bytes_requested", "bytes_mapped", "bytes_reserved", "bytes_lost_to_protection",
        "bytes_free", "areas_writable", "areas_write_rare", "areas_read_only",
        "buffer_views", "writable_buffer_views", "mode",
        "secret", "dontdump", "locked", "seal", "descriptors", "noaccess",
        "access_holders",
    };
    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
        if (dict_set_size(d, keys[i], vals[i]) < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}


/* Pool._metadata_address(): where the pool's record in prmem's protected
 * metadata is.  Test-only: the tests write there natively to check that
 * the page is read-only; nothing else needs it. */
PRMEM_INTERNAL PyObject *
prmem_pool_metadata_address(PoolObject *self, PyObject *unused)
{
    (void)unused;
    if (!prmem_pool_meta_ok(self))
        return prmem_raise_uninitialised((PyObject *)self), NULL;
    return PyLong_FromVoidPtr(self->m);
}

/* Pool._metadata_tables(): (chunk table, area table) addresses, test-only
 * like _metadata_address(). */
PRMEM_INTERNAL PyObject *
prmem_pool_metadata_tables(PoolObject *self, PyObject *unused)
{
    (void)unused;
    if (!prmem_pool_meta_ok(self))
        return prmem_raise_uninitialised((PyObject *)self), NULL;
    POOL_LOCK(self);
    void *c = (void *)self->m->chunks, *a = (void *)self->m->areas;
    POOL_UNLOCK(self);
    return Py_BuildValue("(NN)", PyLong_FromVoidPtr(c), PyLong_FromVoidPtr(a));
}
