/*
 * Pool.protect(), _finish_init(), destroy() and _destroy_when_released():
 * the pool lifecycle after allocation (moved out of allocator.c, on the
 * same floor: methods of the Pool type, above areas.c/seal.c/unshare.c).
 */
#include "prmem.h"

#include <string.h>

/* With the lock held: protect every area per the mode. */
static int
protect_locked(PoolObject *self, prmem_error *e)
{
    if (prmem_check_changeable(self, e) < 0 ||
        prmem_refuse_if_frozen(self->mstate, self->cname, 1, e) < 0)
        return -1;
    if (self->wexports > 0)
        return prmem_fail(e, PyExc_BufferError,
                          "cannot protect pool '%.200s': %zd writable buffer view(s) of its "
                          "memory are still alive; release them first",
                          self->cname, self->wexports);
    int rc;
    if (self->m->mode == PRMEM_MODE_RO || self->m->mode == PRMEM_MODE_AUTO_RO)
        rc = prmem_seal_all(self, e);
    else
        rc = prmem_make_write_rare(self, e);
    prmem_sync_fault_registry(self);
    return rc;
}

PRMEM_INTERNAL PyObject *
prmem_pool_protect(PoolObject *self, PyObject *unused)
{
    (void)unused;
    REFUSE_UNINITIALISED(self, NULL);
    prmem_error e;
    POOL_LOCK(self);
    int rc = protect_locked(self, &e);
    POOL_UNLOCK(self);
    prmem_fault_sync();
    if (rc < 0)
        return prmem_raise(&e);
    Py_RETURN_NONE;
}

/* Sections only: protect per the mode and refuse allocations from now on.
 * Returns True the first time, False when already closed. */
PRMEM_INTERNAL PyObject *
prmem_pool_finish_init(PoolObject *self, PyObject *unused)
{
    (void)unused;
    REFUSE_UNINITIALISED(self, NULL);
    prmem_error e;
    POOL_LOCK(self);
    int rc = 0, done = self->m->closed;
    if (!self->m->section)
        rc = prmem_fail(&e, PyExc_TypeError, "only after-init sections can finish init");
    else if (!done) {
        rc = protect_locked(self, &e);
        if (rc == 0)
            META_SET(self->m->closed, 1);
    }
    POOL_UNLOCK(self);
    prmem_fault_sync();
    if (rc < 0)
        return prmem_raise(&e);
    return PyBool_FromLong(!done);
}

static void warn_sealed_leftovers(void);

/* With the lock held: give the memory back, for good. */
static void
release_locked(PoolObject *self)
{
    if (prmem_meta_check_file())
        return; /* frozen: cannot be recorded; the memory goes with the Pool object */
    prmem_forget_fault_ranges(self);
    prmem_pool_unshare_for_release(self);
    prmem_pool_release(self);
    META_SET(self->m->destroyed, 1);
    META_SET(self->m->destroy_pending, 0);
}

/* With the lock held, after a view or a handle went away: a pool whose
 * destruction was deferred (Pool._destroy_when_released) goes with its
 * last one. */
PRMEM_INTERNAL void
prmem_release_if_pending(PoolObject *pool)
{
    if (pool->m->destroy_pending && pool->exports == 0 && pool->pins == 0 && !pool->m->destroyed)
        release_locked(pool);
}

/* _destroy_when_released() -> bool: destroy now if nothing refers to the
 * memory (True), else as soon as the last view or handle goes (False).
 * With frozen metadata the deferral cannot be recorded: False, and the
 * memory goes with the Pool object (its callers, leaving `with Pool()` on
 * an exception and replace_pool(), must not raise over what is in flight). */
PRMEM_INTERNAL PyObject *
prmem_pool_destroy_when_released(PoolObject *self, PyObject *unused)
{
    (void)unused;
    REFUSE_UNINITIALISED(self, NULL);
    prmem_error e;
    POOL_LOCK(self);
    int now = 0, rc = 0;
    if (self->m->section)
        rc = prmem_fail(&e, self->mstate->ProtectionError,
                        "%.200s cannot be destroyed: after-init sections live as long as the "
                        "process", self->cname);
    else if (!self->m->destroyed && prmem_meta_check_file() != 0)
        now = 0;
    else if (!self->m->destroyed) {
        META_SET(self->m->destroy_pending, 1);
        prmem_release_if_pending(self);
        now = self->m->destroyed;
    }
    else
        now = 1;
    POOL_UNLOCK(self);
    if (rc < 0)
        return prmem_raise(&e);
    if (now)
        warn_sealed_leftovers();
    return PyBool_FromLong(now);
}

/* seal=True memory of destroyed pools stays mapped and resident until the
 * process exits (mseal()ed ranges cannot be unmapped).  Say so once the
 * process has left PRMEM_SEALED_LEFTOVER_WARN such chunks behind, and again
 * at each doubling: each keeps at least one mapping (vm.max_map_count) and
 * its memory. */
#define PRMEM_SEALED_LEFTOVER_WARN 1000
static size_t next_leftover_warning = PRMEM_SEALED_LEFTOVER_WARN;

static void
warn_sealed_leftovers(void)
{
    size_t chunks, bytes;
    prmem_sealed_leftovers(&chunks, &bytes);
    if (chunks < next_leftover_warning)
        return;
    next_leftover_warning = chunks * 2;
    if (PyErr_WarnFormat(PyExc_ResourceWarning, 1,
                         "prmem: %zu chunks (%zu bytes) of destroyed seal=True pools stay "
                         "mapped and in memory until the process exits: mseal()ed memory can "
                         "never be unmapped. Use seal=True for data that lives as long as the "
                         "process, and replace_pool() without seal for data that is rebuilt",
                         chunks, bytes) < 0)
        PyErr_WriteUnraisable(NULL);
}

PRMEM_INTERNAL PyObject *
prmem_pool_destroy(PoolObject *self, PyObject *unused)
{
    (void)unused;
    REFUSE_UNINITIALISED(self, NULL);
    prmem_error e;
    POOL_LOCK(self);
    if (self->m->destroyed) {
        POOL_UNLOCK(self); /* destroying twice is a no-op */
        Py_RETURN_NONE;
    }
    if (self->m->section) {
        prmem_fail(&e, self->mstate->ProtectionError,
                   "%.200s cannot be destroyed: after-init sections live as long as the "
                   "process", self->cname);
        goto fail;
    }
    if (prmem_refuse_if_frozen(self->mstate, self->cname, 1, &e) < 0)
        goto fail;
    if (self->exports > 0 || self->pins > 0) {
        prmem_fail(&e, PyExc_BufferError,
                   "cannot destroy pool '%.200s': %zd buffer view(s) or array(s) and %zd "
                   "frozen container(s) of its memory are still alive; release them "
                   "first (del them, or leave the `with memoryview(...)` block)",
                   self->cname, self->exports, self->pins);
        goto fail;
    }
    release_locked(self);
    POOL_UNLOCK(self);
    warn_sealed_leftovers();
    Py_RETURN_NONE;
fail:
    POOL_UNLOCK(self);
    return prmem_raise(&e);
}
