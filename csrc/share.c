/*
 * Sealed memory across processes: descriptors out (export) and in (attach).
 *
 * Only sealed READ_ONLY memfd chunks leave a process: nobody, in any
 * process, can write them again, so mapping them elsewhere is as safe as
 * reading them here.  The receiving side trusts nothing it is sent: the
 * descriptor must be a memfd whose seals forbid writing, growing, shrinking
 * and adding seals, of exactly the size the sender claims; it is reopened
 * read-only and mapped PROT_READ, MAP_SHARED, so no mapping of it here has
 * the right to become writable.  Structures read from it are bounds-checked
 * by frozen.c as everything else.
 *
 * Python (prmem/sharing.py) moves the descriptors: multiprocessing's own
 * descriptor passing, or SCM_RIGHTS over an AF_UNIX socket.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "prmem.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* F_SEAL_WRITE, not just F_SEAL_FUTURE_WRITE: only the former proves that no
 * writable mapping of the file is left anywhere (the kernel refuses to add
 * it while one exists); a sender could keep one made before FUTURE_WRITE. */
#define REQUIRED_SEALS (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

static prmem_module_state *
module_state(PyObject *module)
{
    return (prmem_module_state *)PyModule_GetState(module);
}

/* With the pool lock held: can chunk ci leave this process? */
static int
check_exportable(PoolObject *pool, size_t ci, prmem_error *e)
{
    if (prmem_check_usable(pool, e) < 0)
        return -1;
    const prmem_chunk *ch = &pool->m->chunks[ci];
    if (pool->m->secret)
        return prmem_fail(e, pool->mstate->ProtectionError,
                          "prmem pool '%.200s' is a secret pool: its memory cannot be sealed "
                          "by the kernel, so it is never handed to another process",
                          pool->cname);
    if (!ch->sealed || ch->kind != PRMEM_BACKING_MEMFD || !prmem_enforce)
        return prmem_fail(e, pool->mstate->ProtectionError,
                          "prmem pool '%.200s': only sealed READ_ONLY memory can be shared "
                          "with other processes; this memory is %s (call protect() on an "
                          "RO pool, or make_ro() on a write-rare pool, first)",
                          pool->cname,
                          !prmem_enforce ? "unprotected (PRMEM_ENFORCE=0)"
                          : ch->kind != PRMEM_BACKING_MEMFD ? "not in a sealable memory file"
                          : "not sealed yet");
    if (ch->fd < 0)
        return prmem_fail(e, pool->mstate->ProtectionError,
                          "prmem pool '%.200s' keeps no descriptor of its sealed memory: "
                          "create it with Pool(..., share=True) to pass it to other "
                          "processes", pool->cname);
    return 0;
}

/* A new descriptor of chunk ci (the caller owns it) and the file's size. */
static int
dup_chunk(PoolObject *pool, size_t ci, int *fd, uint64_t *file_size, prmem_error *e)
{
    const prmem_chunk *ch = &pool->m->chunks[ci];
    struct stat st;
    /* never hand another process a file that is not the pool's */
    if (prmem_check_backing(pool, ch, e) < 0)
        return -1;
    if (fstat(ch->fd, &st) < 0)
        return prmem_fail_os(e, "fstat", errno);
    *fd = fcntl(ch->fd, F_DUPFD_CLOEXEC, 0);
    if (*fd < 0)
        return prmem_fail_os(e, "fcntl(F_DUPFD_CLOEXEC)", errno);
    *file_size = (uint64_t)st.st_size;
    return 0;
}

/* _core.export_pool(pool) -> [(fd, file_size, used), ...]: new descriptors of
 * every chunk (the caller closes them).  Every chunk must be sealed. */
static PyObject *
export_pool(PyObject *module, PyObject *arg)
{
    prmem_module_state *st = module_state(module);
    if (!PyObject_TypeCheck(arg, st->PoolType)) {
        PyErr_SetString(PyExc_TypeError, "export_pool() takes a prmem.Pool");
        return NULL;
    }
    PoolObject *pool = (PoolObject *)arg;
    if (!prmem_pool_ready(pool))
        return prmem_raise_uninitialised(arg), NULL;
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    size_t n = 0;
    int *fds = NULL;
    uint64_t *sizes = NULL;
    uint64_t *used = NULL;
    prmem_error e;
    int rc = 0;
    POOL_LOCK(pool);
    n = pool->m->nchunks;
    fds = PyMem_RawCalloc(n + 1, sizeof(int));
    sizes = PyMem_RawCalloc(n + 1, sizeof(uint64_t));
    used = PyMem_RawCalloc(n + 1, sizeof(uint64_t));
    if (fds == NULL || sizes == NULL || used == NULL)
        rc = prmem_fail(&e, PyExc_MemoryError, "prmem: out of memory");
    for (size_t ci = 0; rc == 0 && ci < n; ci++) {
        rc = check_exportable(pool, ci, &e);
        if (rc == 0)
            rc = dup_chunk(pool, ci, &fds[ci], &sizes[ci], &e);
        if (rc < 0)
            for (size_t k = 0; k < ci; k++)
                close(fds[k]);
        else
            used[ci] = pool->m->chunks[ci].used;
    }
    if (rc == 0 && n == 0)
        rc = prmem_fail(&e, pool->mstate->ProtectionError,
                        "prmem pool '%.200s' has no memory to share", pool->cname);
    POOL_UNLOCK(pool);
    if (rc < 0) {
        Py_DECREF(list);
        list = prmem_raise(&e);
    }
    for (size_t ci = 0; list != NULL && ci < n; ci++) {
        PyObject *item = Py_BuildValue("(iKK)", fds[ci], (unsigned long long)sizes[ci],
                                       (unsigned long long)used[ci]);
        if (item == NULL || PyList_Append(list, item) < 0) {
            for (size_t k = 0; k < n; k++) /* the caller gets none of them */
                close(fds[k]);
            Py_CLEAR(list);
        }
        Py_XDECREF(item);
    }
    PyMem_RawFree(fds);
    PyMem_RawFree(sizes);
    PyMem_RawFree(used);
    return list;
}

/* _core.export_allocation(alloc) -> (fd, file_size, used, offset, size). */
static PyObject *
export_allocation(PyObject *module, PyObject *arg)
{
    prmem_module_state *st = module_state(module);
    if (!Py_IS_TYPE(arg, st->AllocationType)) {
        PyErr_SetString(PyExc_TypeError, "export_allocation() takes a prmem.Allocation");
        return NULL;
    }
    AllocationObject *a = (AllocationObject *)arg;
    PoolObject *pool = a->pool;
    prmem_error e;
    int fd = -1;
    uint64_t file_size = 0, used = 0, offset = 0;
    POOL_LOCK(pool);
    int rc = prmem_check_usable(pool, &e);
    if (rc == 0) {
        size_t ci = pool->m->areas[a->area].chunk;
        rc = check_exportable(pool, ci, &e);
        if (rc == 0)
            rc = dup_chunk(pool, ci, &fd, &file_size, &e);
        used = pool->m->chunks[ci].used;
        offset = (uint64_t)(a->addr - pool->m->chunks[ci].base);
    }
    POOL_UNLOCK(pool);
    if (rc < 0)
        return prmem_raise(&e);
    PyObject *r = Py_BuildValue("(iKKKK)", fd, (unsigned long long)file_size,
                                (unsigned long long)used, (unsigned long long)offset,
                                (unsigned long long)a->size);
    if (r == NULL)
        close(fd);
    return r;
}

/* ------------------------------------------------------------ attach */

typedef struct {
    int fd;             /* received; always closed by attach */
    uint64_t file_size; /* what the sender says the file's size is */
    uint64_t used;      /* bytes to map from offset 0 */
} incoming;

/* Check one received descriptor; on success *ro is a read-only reopen. */
static int
check_incoming(prmem_module_state *st, const incoming *in, int *ro, struct stat *out,
               prmem_error *e)
{
    struct stat sb;
    char path[64], target[64];
    if (fstat(in->fd, &sb) < 0)
        return prmem_fail(e, st->ProtectionError, "received descriptor is unusable (fstat: %s)",
                          strerror(errno));
    prmem_fd_path(path, in->fd);
    ssize_t n = readlink(path, target, sizeof(target) - 1);
    if (!S_ISREG(sb.st_mode) || n < 7 || memcmp(target, "/memfd:", 7) != 0)
        return prmem_fail(e, st->ProtectionError,
                          "received descriptor is not a memory file (memfd); refused");
    int seals = fcntl(in->fd, F_GET_SEALS);
    if (seals < 0 || (seals & REQUIRED_SEALS) != REQUIRED_SEALS)
        return prmem_fail(e, st->ProtectionError,
                          "received memory file is not sealed against writing, resizing and "
                          "new seals (F_GET_SEALS = %#x); refused: it could change under "
                          "readers", seals < 0 ? 0 : seals);
    if ((uint64_t)sb.st_size != in->file_size || in->used == 0 || in->used > in->file_size ||
        in->used % prmem_page_size != 0)
        return prmem_fail(e, st->ProtectionError,
                          "received memory file has %lld bytes, the sender claimed %llu "
                          "(%llu in use); refused",
                          (long long)sb.st_size, (unsigned long long)in->file_size,
                          (unsigned long long)in->used);
    *ro = open(path, O_RDONLY | O_CLOEXEC);
    if (*ro < 0)
        return prmem_fail(e, st->ProtectionError,
                          "cannot reopen the received memory file read-only (%s)",
                          strerror(errno));
    *out = sb;
    return 0;
}

/* A PROT_NONE page from a memory file named after where the chunk came
 * from: prmem-attached:<address>:<inode>:<sender pid>:<pool>.  /proc/PID/maps
 * shows it, so prmem inspect can tell attached memory and its origin. */
static void *
attach_mark(const void *base, unsigned long long ino, long sender, const char *name)
{
    char label[250];
    snprintf(label, sizeof(label), "prmem-attached:%llx:%llu:%ld:%s",
             (unsigned long long)(uintptr_t)base, ino, sender, name);
    int fd = (int)syscall(SYS_memfd_create, label, MFD_CLOEXEC);
    if (fd < 0)
        return NULL;
    void *p = MAP_FAILED;
    if (ftruncate(fd, (off_t)prmem_page_size) == 0)
        p = mmap(NULL, prmem_page_size, PROT_NONE, MAP_SHARED, fd, 0);
    close(fd);
    return p == MAP_FAILED ? NULL : p;
}

/*
 * _core.attach(pool, name, [(fd, file_size, used), ...], seal, sender_pid):
 * fill an uninitialised prmem.Pool object with the received chunks, each
 * one READ_ONLY area.  Takes ownership of the descriptors (closes them in
 * every case).  On any failed check: ProtectionError, nothing mapped.
 */
/* A refused attach: nothing of it stays mapped or open (but what mseal()
 * already sealed, which can never be unmapped), and its tables go. */
static void
undo_attach(prmem_chunk *chunks, prmem_area *areas, void **marks, Py_ssize_t done,
            char *cname, PyObject *exact)
{
    for (Py_ssize_t i = 0; i < done; i++) {
        if (!chunks[i].msealed)
            munmap(chunks[i].base, chunks[i].used);
        close(chunks[i].fd);
        if (marks[i] != NULL)
            munmap(marks[i], prmem_page_size);
    }
    Py_DECREF(exact);
    PyMem_RawFree(cname);
    PyMem_RawFree(chunks);
    PyMem_RawFree(areas);
    PyMem_RawFree(marks);
}

static PyObject *
attach(PyObject *module, PyObject *args)
{
    prmem_module_state *st = module_state(module);
    PyObject *pool_obj, *name, *items;
    int seal;
    long sender;
    if (!PyArg_ParseTuple(args, "OOOpl:attach", &pool_obj, &name, &items, &seal, &sender))
        return NULL;
    /* a tuple copy: parsing an item may run user code (__index__) */
    PyObject *list = PySequence_Tuple(items);
    if (list == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(list);
    incoming *in = PyMem_Calloc((size_t)n + 1, sizeof(incoming));
    if (in == NULL) {
        Py_DECREF(list);
        return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    /* take every descriptor first, so each is closed whatever fails next */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(list, i);
        in[i].fd = -1;
        if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 3 &&
            PyLong_CheckExact(PyTuple_GET_ITEM(item, 0)))
            in[i].fd = (int)PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
        if (in[i].fd == -1 && PyErr_Occurred())
            PyErr_Clear();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long fs, used;
        int fd;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(list, i), "iKK", &fd, &fs, &used))
            goto close_all;
        in[i].file_size = fs;
        in[i].used = used;
    }
    if (!PyUnicode_Check(name)) {
        PyErr_SetString(PyExc_TypeError, "attach(): the name must be a str");
        goto close_all;
    }
    if (!PyObject_TypeCheck(pool_obj, st->PoolType) || prmem_pool_ready((PoolObject *)pool_obj)) {
        PyErr_SetString(PyExc_TypeError, "attach() fills a new, uninitialised prmem.Pool");
        goto close_all;
    }
    if (n == 0) {
        PyErr_SetString(st->ProtectionError, "nothing was received to attach");
        goto close_all;
    }
    prmem_error fe;
    if (prmem_refuse_if_frozen(st, NULL, 1, &fe) < 0) { /* attaching writes metadata */
        prmem_raise(&fe);
        goto close_all;
    }
    PoolObject *pool = (PoolObject *)pool_obj;
    PyObject *exact = PyUnicode_FromObject(name);
    Py_ssize_t len;
    const char *utf8 = exact ? PyUnicode_AsUTF8AndSize(exact, &len) : NULL;
    char *cname = utf8 ? PyMem_RawMalloc((size_t)len + 1) : NULL;
    prmem_chunk *chunks = PyMem_RawCalloc((size_t)n, sizeof(prmem_chunk));
    prmem_area *areas = PyMem_RawCalloc((size_t)n, sizeof(prmem_area));
    void **marks = PyMem_RawCalloc((size_t)n, sizeof(void *));
    if (cname == NULL || chunks == NULL || areas == NULL || marks == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        Py_XDECREF(exact);
        PyMem_RawFree(cname);
        PyMem_RawFree(chunks);
        PyMem_RawFree(areas);
        PyMem_RawFree(marks);
        goto close_all;
    }
    memcpy(cname, utf8, (size_t)len + 1);
    prmem_error e;
    Py_ssize_t done = 0;
    int rc = 0;
    for (; done < n; done++) {
        int ro = -1;
        struct stat sb;
        memset(&sb, 0, sizeof(sb));
        rc = check_incoming(st, &in[done], &ro, &sb, &e);
        if (rc < 0)
            break;
        void *base = mmap(NULL, in[done].used, PROT_READ, MAP_SHARED, ro, 0);
        if (base == MAP_FAILED) {
            rc = prmem_fail_os(&e, "mmap", errno);
            close(ro);
            break;
        }
        prmem_chunk *ch = &chunks[done];
        ch->base = base;
        ch->size = ch->used = in[done].used;
        ch->fd = ro;
        ch->sealed = 1;
        ch->kind = PRMEM_BACKING_MEMFD;
        ch->dev = sb.st_dev;
        ch->ino = sb.st_ino;
        areas[done].start = base;
        areas[done].size = ch->used;
        areas[done].chunk = (uint32_t)done;
        areas[done].state = PRMEM_READ_ONLY;
        marks[done] = attach_mark(base, (unsigned long long)sb.st_ino, sender, cname);
    }
    /* mseal() only once every chunk passed: sealed mappings can never be
     * undone, so a refused chunk must not leave earlier ones behind */
    for (Py_ssize_t i = 0; rc == 0 && seal && (prmem_features & PRMEM_FEAT_MSEAL) && i < n;
         i++) {
        if (prmem_sys_mseal(chunks[i].base, chunks[i].used) < 0)
            rc = prmem_fail_os(&e, "mseal", errno); /* the ones before stay, sealed */
        else
            chunks[i].msealed = 1;
    }
    if (rc < 0) {
        undo_attach(chunks, areas, marks, done, cname, exact);
        prmem_raise(&e);
        goto close_all;
    }
    /* the tables go into prmem's protected metadata */
    void *mchunks = prmem_meta_alloc((size_t)n * sizeof(prmem_chunk));
    void *mareas = prmem_meta_alloc((size_t)n * sizeof(prmem_area));
    Py_ssize_t *wexp = PyMem_RawCalloc((size_t)n, sizeof(Py_ssize_t));
    if (mchunks == NULL || mareas == NULL || wexp == NULL) {
        prmem_meta_free(mchunks, (size_t)n * sizeof(prmem_chunk));
        prmem_meta_free(mareas, (size_t)n * sizeof(prmem_area));
        PyMem_RawFree(wexp);
        undo_attach(chunks, areas, marks, done, cname, exact);
        PyErr_SetString(PyExc_MemoryError, "prmem: out of metadata memory for pool tables");
        goto close_all;
    }
    prmem_meta_write(mchunks, chunks, (size_t)n * sizeof(prmem_chunk));
    prmem_meta_write(mareas, areas, (size_t)n * sizeof(prmem_area));
    PyMem_RawFree(chunks);
    PyMem_RawFree(areas);
    POOL_LOCK(pool);
    static unsigned long long next_attached = 1ULL << 62; /* apart from local serials */
    pool->serial = __atomic_fetch_add(&next_attached, 1, __ATOMIC_RELAXED);
    META_SET(pool->m->serial, pool->serial);
    pool->mstate = st;
    META_SET(pool->m->mode, PRMEM_MODE_RO);
    pool->align_order = 3;
    META_SET(pool->m->seal, seal);
    META_SET(pool->m->attached, 1);
    META_SET(pool->m->closed, 1);
    META_SET(pool->m->refill, prmem_page_size);
    META_SET(pool->m->next_chunk_size, (size_t)16 << 20);
    PyObject *placeholder = pool->name;
    pool->name = exact;
    pool->cname = cname;
    META_SET(pool->m->chunks, (const prmem_chunk *)mchunks);
    META_SET(pool->m->nchunks, (size_t)n);
    META_SET(pool->m->chunks_cap, (size_t)n);
    META_SET(pool->m->areas, (const prmem_area *)mareas);
    META_SET(pool->m->nareas, (size_t)n);
    META_SET(pool->m->areas_cap, (size_t)n);
    PyMem_RawFree(pool->area_wexports);
    pool->area_wexports = wexp;
    pool->area_wexports_cap = (size_t)n;
    pool->cur_area = -1;
    pool->attach_marks = marks;
    pool->nattach_marks = (size_t)n;
    pool->protect_event = 1;
    META_SET(pool->m->ready, 1);
    prmem_sync_fault_registry(pool);
    POOL_UNLOCK(pool);
    Py_XDECREF(placeholder);
    prmem_fault_sync();
    prmem_registry_add(pool);
    Py_INCREF(Py_None);
    result = Py_None;
close_all:
    for (Py_ssize_t i = 0; i < n; i++)
        if (in[i].fd >= 0)
            close(in[i].fd);
    PyMem_Free(in);
    Py_DECREF(list);
    return result;
}

/* _core.attached_allocation(pool, chunk, offset, size) -> Allocation of an
 * attached pool, after checking it lies inside that chunk. */
static PyObject *
attached_allocation(PyObject *module, PyObject *args)
{
    prmem_module_state *st = module_state(module);
    PyObject *pool_obj;
    unsigned long long chunk, offset, size;
    if (!PyArg_ParseTuple(args, "OKKK:attached_allocation", &pool_obj, &chunk, &offset, &size))
        return NULL;
    if (!PyObject_TypeCheck(pool_obj, st->PoolType) || !((PoolObject *)pool_obj)->m->attached) {
        PyErr_SetString(PyExc_TypeError, "attached_allocation() takes an attached prmem.Pool");
        return NULL;
    }
    PoolObject *pool = (PoolObject *)pool_obj;
    AllocationObject *obj = PyObject_New(AllocationObject, st->AllocationType);
    if (obj == NULL)
        return NULL;
    obj->pool = NULL;
    prmem_error e;
    POOL_LOCK(pool);
    int rc = prmem_check_usable(pool, &e);
    if (rc == 0 && (chunk >= pool->m->nchunks || size == 0 || offset > pool->m->chunks[chunk].used ||
                    size > pool->m->chunks[chunk].used - offset))
        rc = prmem_fail(&e, st->ProtectionError,
                        "the structure the sender described lies outside the memory it sent "
                        "(chunk %llu, offset %llu, %llu bytes); refused",
                        chunk, offset, size);
    if (rc == 0) {
        obj->addr = pool->m->chunks[chunk].base + offset;
        obj->size = (size_t)size;
        obj->area = (uint32_t)chunk;
    }
    POOL_UNLOCK(pool);
    if (rc < 0) {
        Py_DECREF(obj);
        return prmem_raise(&e);
    }
    Py_INCREF(pool);
    obj->pool = pool;
    return (PyObject *)obj;
}

static PyObject *
is_attached(PyObject *module, PyObject *arg)
{
    prmem_module_state *st = module_state(module);
    if (!PyObject_TypeCheck(arg, st->PoolType)) {
        PyErr_SetString(PyExc_TypeError, "expected a prmem.Pool");
        return NULL;
    }
    PoolObject *pool = (PoolObject *)arg;
    if (!prmem_pool_meta_ok(pool))
        return prmem_raise_uninitialised(arg), NULL;
    return PyBool_FromLong(pool->m->attached);
}

static PyMethodDef share_functions[] = {
    {"export_pool", export_pool, METH_O, "Descriptors of a sealed pool's chunks."},
    {"export_allocation", export_allocation, METH_O,
     "Descriptor of the sealed chunk holding an allocation, and where it is."},
    {"attach", attach, METH_VARARGS, "Map received sealed memory into a new Pool object."},
    {"attached_allocation", attached_allocation, METH_VARARGS,
     "An Allocation inside an attached pool."},
    {"is_attached", is_attached, METH_O, "True if the pool was received from elsewhere."},
    {NULL, NULL, 0, NULL},
};

PRMEM_INTERNAL int
prmem_share_add_functions(PyObject *module)
{
    return PyModule_AddFunctions(module, share_functions);
}
