/*
 * Write-rare: changing WRITE_RARE memory without ever mapping it writable,
 * and the one-way move to sealed READ_ONLY (make_ro).
 *
 * The kernel design (seed 003) opens a per-CPU writable window; the closest
 * user-space equivalent that no other thread can use is to write through the
 * area's memfd with pwrite(): the page cache pages are the ones every
 * read-only mapping shows, so readers see the bytes at once, while the
 * mapping itself stays PROT_READ in every thread throughout.
 */
#include "prmem.h"

#include <string.h>

static int
mode_has_write_rare(int mode)
{
    return mode == PRMEM_MODE_WR || mode == PRMEM_MODE_AUTO_WR || mode == PRMEM_MODE_START_WR;
}

/*
 * Store n bytes (src, or fill_byte when src is NULL) at dst->addr + off.
 * The allocation and bounds were checked by the caller; the mode and state
 * are checked here under the pool lock, so a concurrent protect()/make_ro()
 * cannot slip between the check and the write.
 */
static int
rare_store(PoolObject *expect_pool, AllocationObject *dst, Py_ssize_t off, const void *src,
           size_t n, int fill_byte)
{
    PoolObject *pool = dst->pool;
    if (expect_pool != NULL && pool != expect_pool) {
        /* no lock held; the names are exact str copies */
        PyErr_Format(PyExc_ValueError, "destination belongs to pool %R, not to pool %R",
                     pool->name, expect_pool->name);
        return -1;
    }
    prmem_error e;
retry:
    POOL_LOCK(pool);
    if (prmem_check_changeable(pool, &e) < 0)
        goto fail;
    if (!mode_has_write_rare(pool->m->mode)) {
        prmem_fail(&e, pool->mstate->ProtectionError,
                   "prmem pool '%.200s' has a read-only mode: its memory has no write-rare "
                   "state (use a WR, AUTO_WR or START_WR pool)",
                   pool->cname);
        goto fail;
    }
    if (prmem_check_allocation(pool, dst, &e) < 0)
        goto fail;
    const prmem_area *area = &pool->m->areas[dst->area];
    char *to = dst->addr + off;
    if (area->state == PRMEM_READ_ONLY) {
        prmem_refuse_write(pool, area->state, &e);
        goto fail;
    }
    if (area->state != PRMEM_WRITABLE && prmem_chunk_is_shared(&pool->m->chunks[area->chunk])) {
        /* First change since fork(): maybe a private copy of the whole
         * chunk first (unshare.c), without the GIL, which is taken back
         * after the pool lock is released (see prmem.h); then start over.
         * The copy is recorded in metadata. */
        if (prmem_refuse_if_frozen(pool->mstate, pool->cname, 1, &e) < 0)
            goto fail;
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = prmem_chunk_unshare(pool, area->chunk, &e);
        POOL_UNLOCK(pool);
        Py_END_ALLOW_THREADS
        if (rc < 0) {
            prmem_raise(&e);
            return -1;
        }
        goto retry;
    }
    if (area->state == PRMEM_WRITABLE) {
        if (src != NULL)
            memmove(to, src, n);
        else
            memset(to, fill_byte, n);
    }
    else if (n >= PRMEM_RARE_WRITE_NOGIL) {
        /* A large write lets other Python threads run while the kernel
         * copies: the GIL is released around the write (pure C), and the
         * pool lock is released before the GIL is taken back, so this
         * thread never waits for the GIL while holding it (see prmem.h). */
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = prmem_file_write(pool, area, to, src, n, fill_byte, &e);
        POOL_UNLOCK(pool);
        Py_END_ALLOW_THREADS
        if (rc < 0) {
            prmem_raise(&e);
            return -1;
        }
        return 0;
    }
    else if (prmem_file_write(pool, area, to, src, n, fill_byte, &e) < 0)
        goto fail;
    POOL_UNLOCK(pool);
    return 0;
fail:
    POOL_UNLOCK(pool);
    prmem_raise(&e);
    return -1;
}

static AllocationObject *
as_allocation(PyObject *obj, prmem_module_state *st)
{
    if (!Py_IS_TYPE(obj, st->AllocationType)) {
        PyErr_Format(PyExc_TypeError,
                     "rare_write destination must be a prmem.Allocation, not %.100s "
                     "(raw addresses are refused: only prmem memory can be written)",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return (AllocationObject *)obj;
}

static PyObject *
do_rare_write(PoolObject *expect_pool, prmem_module_state *st, PyObject *const *args,
              Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"dst", "data", "offset"};
    PyObject *vals[3];
    if (prmem_parse_args("rare_write", args, nargs, kwnames, names, 2, 3, vals) < 0)
        return NULL;
    AllocationObject *dst = as_allocation(vals[0], st);
    if (dst == NULL)
        return NULL;
    Py_buffer buf;
    Py_ssize_t off;
    if (prmem_get_data_and_offset(dst, vals[1], vals[2], &buf, &off) < 0)
        return NULL;
    int rc = rare_store(expect_pool, dst, off, buf.buf, (size_t)buf.len, 0);
    PyBuffer_Release(&buf);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
do_rare_memset(PoolObject *expect_pool, prmem_module_state *st, PyObject *const *args,
               Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"dst", "byte", "offset", "length"};
    PyObject *vals[4];
    if (prmem_parse_args("rare_memset", args, nargs, kwnames, names, 2, 4, vals) < 0)
        return NULL;
    AllocationObject *dst = as_allocation(vals[0], st);
    if (dst == NULL)
        return NULL;
    if (!PyLong_Check(vals[1])) {
        PyErr_Format(PyExc_TypeError, "byte must be an int, not %.100s",
                     Py_TYPE(vals[1])->tp_name);
        return NULL;
    }
    long byte = PyLong_AsLong(vals[1]);
    if (byte == -1 && PyErr_Occurred())
        PyErr_Clear();
    if (byte < 0 || byte > 255) {
        PyErr_SetString(PyExc_ValueError, "byte must be an int in range(0, 256)");
        return NULL;
    }
    Py_ssize_t off = 0, len;
    if (vals[2] != NULL) {
        off = PyNumber_AsSsize_t(vals[2], NULL);
        if (off == -1 && PyErr_Occurred())
            return NULL;
    }
    if (off < 0 || (size_t)off > dst->size) {
        PyErr_Format(PyExc_ValueError, "offset %zd is outside the allocation (%zu bytes)", off,
                     dst->size);
        return NULL;
    }
    len = (Py_ssize_t)dst->size - off;
    if (vals[3] != NULL && vals[3] != Py_None) {
        len = PyNumber_AsSsize_t(vals[3], NULL);
        if (len == -1 && PyErr_Occurred())
            return NULL;
        if (len < 0 || (size_t)len > dst->size - (size_t)off) {
            PyErr_Format(PyExc_ValueError,
                         "memset of %zd bytes at offset %zd is outside the allocation "
                         "(%zu bytes)",
                         len, off, dst->size);
            return NULL;
        }
    }
    if (rare_store(expect_pool, dst, off, NULL, (size_t)len, (int)byte) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PRMEM_INTERNAL PyObject *
prmem_pool_rare_write(PoolObject *self, PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames)
{
    if (!prmem_pool_ready(self))
        return prmem_raise_uninitialised((PyObject *)self), NULL;
    return do_rare_write(self, self->mstate, args, nargs, kwnames);
}

PRMEM_INTERNAL PyObject *
prmem_pool_rare_memset(PoolObject *self, PyObject *const *args, Py_ssize_t nargs,
                       PyObject *kwnames)
{
    if (!prmem_pool_ready(self))
        return prmem_raise_uninitialised((PyObject *)self), NULL;
    return do_rare_memset(self, self->mstate, args, nargs, kwnames);
}

PRMEM_INTERNAL PyObject *
prmem_module_rare_write(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                        PyObject *kwnames)
{
    return do_rare_write(NULL, PyModule_GetState(module), args, nargs, kwnames);
}

PRMEM_INTERNAL PyObject *
prmem_module_rare_memset(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *kwnames)
{
    return do_rare_memset(NULL, PyModule_GetState(module), args, nargs, kwnames);
}

PRMEM_INTERNAL PyObject *
prmem_pool_make_ro(PoolObject *self, PyObject *unused)
{
    (void)unused;
    if (!prmem_pool_ready(self))
        return prmem_raise_uninitialised((PyObject *)self), NULL;
    prmem_error e;
    POOL_LOCK(self);
    if (prmem_check_changeable(self, &e) < 0 ||
        prmem_refuse_if_frozen(self->mstate, self->cname, 1, &e) < 0)
        goto fail;
    if (self->m->section && mode_has_write_rare(self->m->mode)) {
        prmem_fail(&e, self->mstate->ProtectionError,
                   "%.200s cannot become read-only at run time (as __wr_after_init in the "
                   "kernel); use a WR pool and make_ro() for data that settles",
                   self->cname);
        goto fail;
    }
    if (!mode_has_write_rare(self->m->mode)) {
        POOL_UNLOCK(self); /* nothing is write-rare: already as protected as it gets */
        Py_RETURN_NONE;
    }
    if (self->wexports > 0) {
        prmem_fail(&e, PyExc_BufferError,
                   "cannot make pool '%.200s' read-only: %zd writable buffer view(s) of its "
                   "memory are still alive; release them first",
                   self->cname, self->wexports);
        goto fail;
    }
    int rc = prmem_seal_all(self, &e);
    prmem_sync_fault_registry(self);
    if (rc < 0)
        goto fail;
    POOL_UNLOCK(self);
    prmem_fault_sync();
    Py_RETURN_NONE;
fail:
    POOL_UNLOCK(self);
    prmem_fault_sync();
    return prmem_raise(&e);
}
