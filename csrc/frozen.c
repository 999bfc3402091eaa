/*
 * Frozen containers: FrozenMap and FrozenList handles, read by C straight
 * from pool memory (layout: prmem.h and docs/frozen-layout.md).
 *
 * Trust nothing read from memory: the structure may have been scribbled
 * over while still WRITABLE, or come from somewhere hostile.  Every value
 * is loaded once into a local, then checked against the extent (the
 * allocation's bounds, which come from prmem's own tables) before use:
 * offsets, lengths, counts, bucket counts, indexes.  A container's children
 * must lie before it, so lookups and recursion always move towards the
 * start of the extent and terminate.  Probing is bounded by the bucket
 * count.  Anything off raises CorruptionError; nothing is read outside the
 * extent.
 *
 * Handles hold an Extent, which pins the allocation: the pool cannot be
 * destroyed (BufferError) while a handle is alive, so reads need no lock.
 * Nothing is cached in the handle but the node's offset: every answer is
 * read from the protected memory at the time of the call.
 */
#include "prmem.h"

#include <math.h>
#include <string.h>

/* ------------------------------------------------------------ hashing */

static inline uint64_t
fold_mul(uint64_t a, uint64_t b)
{
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

static inline uint64_t
load32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/*
 * The keys' hash: 64-bit multiply-fold mixing of 16-byte blocks, keyed by
 * the structure's seed (random per structure) and the key's tag, so equal
 * bytes of different key types (the str "a", the bytes b"a") differ and the
 * same key hashes the same in every process.  It reads exactly n bytes.
 * Only table placement depends on it: readers compare the stored hash and
 * then the key itself, so a weak hash costs speed, never correctness.
 */
PRMEM_INTERNAL uint64_t
prmem_fz_hash(uint64_t seed, uint32_t tag, const void *data, size_t n)
{
    static const uint64_t K0 = 0xa0761d6478bd642fULL, K1 = 0xe7037ed1a0b428dbULL,
                          K2 = 0x8ebc6af09c88c6e3ULL, K3 = 0x589965cc75374cc3ULL;
    const unsigned char *p = data;
    uint64_t h = fold_mul(seed ^ K0, ((uint64_t)tag << 32 | (uint64_t)(uint32_t)n) ^ K1);
    uint64_t a, b;
    size_t left = n;
    while (left > 16) {
        memcpy(&a, p, 8);
        memcpy(&b, p + 8, 8);
        h = fold_mul(a ^ K2 ^ h, b ^ K3 ^ seed);
        p += 16;
        left -= 16;
    }
    /* the last 1..16 bytes as two words; the reads overlap rather than
     * pass the end (the length is already mixed in) */
    if (left >= 8) {
        memcpy(&a, p, 8);
        memcpy(&b, p + left - 8, 8);
    }
    else if (left >= 4) {
        a = load32(p);
        b = load32(p + left - 4);
    }
    else if (left > 0) {
        a = (uint64_t)p[0] << 16 | (uint64_t)p[left >> 1] << 8 | p[left - 1];
        b = 0;
    }
    else
        a = b = 0;
    h = fold_mul(a ^ K1 ^ h, b ^ K2 ^ seed);
    return fold_mul(h ^ K3, h ^ K0 ^ (uint64_t)n);
}

/* ------------------------------------------------------------- extent */

typedef struct {
    PyObject_HEAD
    AllocationObject *alloc; /* strong: keeps the pool alive */
    const char *base;
    uint64_t size;
    prmem_module_state *mstate;
} ExtentObject;

typedef struct {
    PyObject_HEAD
    ExtentObject *extent;
    uint64_t node; /* offset of this container's node */
} FrozenObject;

static void
Extent_dealloc(ExtentObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->alloc != NULL) {
        PoolObject *pool = self->alloc->pool;
        POOL_LOCK(pool);
        pool->pins--;
        prmem_release_if_pending(pool);
        POOL_UNLOCK(pool);
        Py_DECREF(self->alloc);
    }
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyType_Slot Extent_slots[] = {
    {Py_tp_dealloc, Extent_dealloc},
    {Py_tp_doc, "Pins the allocation that holds a frozen structure."},
    {0, NULL},
};

static PyType_Spec Extent_spec = {
    .name = "prmem._core._Extent",
    .basicsize = sizeof(ExtentObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Extent_slots,
};

/* Pin alloc's memory: while the extent lives, destroy() refuses. */
static ExtentObject *
extent_new(prmem_module_state *st, AllocationObject *alloc)
{
    ExtentObject *x = PyObject_New(ExtentObject, st->ExtentType);
    if (x == NULL)
        return NULL;
    x->alloc = NULL;
    PoolObject *pool = alloc->pool;
    prmem_error e;
    POOL_LOCK(pool);
    if (prmem_check_usable(pool, &e) < 0) {
        POOL_UNLOCK(pool);
        Py_DECREF(x);
        return prmem_raise(&e);
    }
    pool->pins++;
    POOL_UNLOCK(pool);
    Py_INCREF(alloc);
    x->alloc = alloc;
    x->base = alloc->addr;
    x->size = alloc->size;
    x->mstate = pool->mstate;
    return x;
}

/* ------------------------------------------------------ checked reads */

static void *
corrupt(const ExtentObject *x, const char *what, uint64_t at)
{
    PyErr_Format(x->mstate->CorruptionError,
                 "frozen structure of prmem pool %R is corrupt: %s (at offset %llu of its "
                 "%llu bytes); rebuild it",
                 x->alloc->pool->name, what, (unsigned long long)at,
                 (unsigned long long)x->size);
    return NULL;
}

/* n bytes at off lie inside the extent */
static inline int
inside(const ExtentObject *x, uint64_t off, uint64_t n)
{
    return off <= x->size && n <= x->size - off;
}

static inline uint64_t
load64(const ExtentObject *x, uint64_t off)
{
    uint64_t v;
    memcpy(&v, x->base + off, 8); /* one load into a local: checked, then used */
    return v;
}

static inline void
load_slot(const ExtentObject *x, uint64_t off, prmem_fz_slot *slot)
{
    memcpy(slot, x->base + off, sizeof(*slot));
}

/* A map node at `node`: its count and bucket count, checked. */
static int
map_node(const ExtentObject *x, uint64_t node, uint64_t *count, uint64_t *nbuckets)
{
    if (node % 8 || !inside(x, node, 16))
        return corrupt(x, "map node outside the structure", node), -1;
    uint64_t n = load64(x, node), nb = load64(x, node + 8);
    uint64_t room = x->size - node - 16;
    if (n > room / PRMEM_FZ_ENTRY || n > PRMEM_FZ_MAX_INDEX)
        return corrupt(x, "map entry count too large", node), -1;
    room -= n * PRMEM_FZ_ENTRY;
    if (nb == 0 || (nb & (nb - 1)) != 0 || nb > room / 4 || nb < n)
        return corrupt(x, "bad map bucket count", node), -1;
    *count = n;
    *nbuckets = nb;
    return 0;
}

static int
list_node(const ExtentObject *x, uint64_t node, uint64_t *count)
{
    if (node % 8 || !inside(x, node, 8))
        return corrupt(x, "list node outside the structure", node), -1;
    uint64_t n = load64(x, node);
    if (n > (x->size - node - 8) / PRMEM_FZ_SLOT)
        return corrupt(x, "list length too large", node), -1;
    *count = n;
    return 0;
}

/* The bytes of a blob, checked; NULL with CorruptionError. */
static const char *
blob(const ExtentObject *x, uint64_t off, uint64_t *len)
{
    if (off % 8 || off < PRMEM_FZ_HEADER || !inside(x, off, 8))
        return corrupt(x, "string offset outside the structure", off);
    uint64_t n = load64(x, off);
    if (n > x->size - off - 8)
        return corrupt(x, "string longer than the structure", off);
    *len = n;
    return x->base + off + 8;
}

static PyObject *handle_new(ExtentObject *x, int tag, uint64_t node);

/* The bytes of a str/bytes/big int slot: inline in the slot (data then
 * points into *slot, a local copy) or in a blob, checked. */
static const char *
slot_bytes(const ExtentObject *x, const prmem_fz_slot *slot, uint64_t *len)
{
    const unsigned char *raw = (const unsigned char *)slot;
    if (raw[4] != 0) {
        if (raw[4] - 1 > PRMEM_FZ_INLINE_MAX)
            return corrupt(x, "inline string too long", 0);
        *len = (uint64_t)(raw[4] - 1);
        return (const char *)raw + 5;
    }
    return blob(x, slot->payload, len);
}

/* A Python object for a slot read from the node at `parent`. */
static PyObject *
materialize(ExtentObject *x, const prmem_fz_slot *slot, uint64_t parent)
{
    uint64_t p = slot->payload, len;
    const char *data;
    double d;
    switch (slot->tag) {
    case PRMEM_FZ_NONE:
        Py_RETURN_NONE;
    case PRMEM_FZ_FALSE:
        Py_RETURN_FALSE;
    case PRMEM_FZ_TRUE:
        Py_RETURN_TRUE;
    case PRMEM_FZ_INT:
        return PyLong_FromLongLong((long long)p);
    case PRMEM_FZ_FLOAT:
        memcpy(&d, &p, 8);
        return PyFloat_FromDouble(d);
    case PRMEM_FZ_STR:
        if ((data = slot_bytes(x, slot, &len)) == NULL)
            return NULL;
        {
            /* surrogatepass: Python strs may hold lone surrogates (os.fsdecode) */
            PyObject *s = PyUnicode_DecodeUTF8(data, (Py_ssize_t)len, "surrogatepass");
            if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                PyErr_Clear();
                return corrupt(x, "string is not valid UTF-8", p);
            }
            return s;
        }
    case PRMEM_FZ_BYTES:
        if ((data = slot_bytes(x, slot, &len)) == NULL)
            return NULL;
        return PyBytes_FromStringAndSize(data, (Py_ssize_t)len);
    case PRMEM_FZ_BIGINT: {
        if ((data = blob(x, p, &len)) == NULL)
            return NULL;
        PyObject *raw = PyBytes_FromStringAndSize(data, (Py_ssize_t)len);
        if (raw == NULL)
            return NULL;
        PyObject *from = PyObject_GetAttrString((PyObject *)&PyLong_Type, "from_bytes");
        PyObject *args = Py_BuildValue("(Os)", raw, "little");
        PyObject *kwargs = Py_BuildValue("{s:O}", "signed", Py_True);
        PyObject *v = (from && args && kwargs) ? PyObject_Call(from, args, kwargs) : NULL;
        Py_XDECREF(from);
        Py_XDECREF(args);
        Py_XDECREF(kwargs);
        Py_DECREF(raw);
        return v;
    }
    case PRMEM_FZ_LIST:
    case PRMEM_FZ_MAP:
        /* children lie before their parent: no cycles, whatever the data */
        if (p % 8 || p < PRMEM_FZ_HEADER || p >= parent)
            return corrupt(x, "nested container out of place", p);
        return handle_new(x, (int)slot->tag, p);
    default:
        return corrupt(x, "unknown value tag", parent);
    }
}

/* -------------------------------------------------------- lookup keys */

/* a key can only be str, bytes or an int */
static inline int
key_tag(uint32_t tag)
{
    return tag == PRMEM_FZ_STR || tag == PRMEM_FZ_BYTES || tag == PRMEM_FZ_INT ||
           tag == PRMEM_FZ_BIGINT;
}

typedef struct {
    uint32_t tag;
    const char *data;
    size_t n;
    uint64_t word;    /* FZ_INT value */
    PyObject *keep;   /* owns data for big ints */
} lookup_key;

/* 1: key prepared; 0: no key of a supported type can equal it (KeyError);
 * -1: error (unhashable key: TypeError, as dict raises). */
static int
prep_key(PyObject *key, lookup_key *k)
{
    k->keep = NULL;
    if (PyUnicode_Check(key)) {
        Py_ssize_t n;
        if (PyUnicode_IS_COMPACT_ASCII(key)) { /* its data is its UTF-8 */
            k->tag = PRMEM_FZ_STR;
            k->data = (const char *)PyUnicode_DATA(key);
            k->n = (size_t)PyUnicode_GET_LENGTH(key);
            return 1;
        }
        k->data = PyUnicode_AsUTF8AndSize(key, &n);
        if (k->data == NULL) {
            /* lone surrogates: frozen as freeze.c encodes them */
            PyErr_Clear();
            k->keep = PyUnicode_AsEncodedString(key, "utf-8", "surrogatepass");
            if (k->keep == NULL)
                return -1;
            k->data = PyBytes_AS_STRING(k->keep);
            n = PyBytes_GET_SIZE(k->keep);
        }
        k->tag = PRMEM_FZ_STR;
        k->n = (size_t)n;
        return 1;
    }
    if (PyBytes_Check(key)) {
        k->tag = PRMEM_FZ_BYTES;
        k->data = PyBytes_AS_STRING(key);
        k->n = (size_t)PyBytes_GET_SIZE(key);
        return 1;
    }
    PyObject *as_int = NULL;
    if (PyLong_Check(key)) {
        Py_INCREF(key);
        as_int = key;
    }
    else if (PyFloat_Check(key) || PyComplex_Check(key)) {
        /* dict semantics: 1.0 (and 1+0j) find the key 1 */
        double d = PyFloat_Check(key) ? PyFloat_AS_DOUBLE(key) : PyComplex_RealAsDouble(key);
        if (PyComplex_Check(key) && PyComplex_ImagAsDouble(key) != 0.0)
            return 0;
        if (!isfinite(d) || floor(d) != d)
            return 0;
        as_int = PyLong_FromDouble(d);
        if (as_int == NULL)
            return -1;
    }
    else {
        return PyObject_Hash(key) == -1 ? -1 : 0;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(as_int, &overflow);
    if (!overflow) {
        Py_DECREF(as_int);
        if (v == -1 && PyErr_Occurred())
            return -1;
        k->tag = PRMEM_FZ_INT;
        k->word = (uint64_t)v;
        k->data = (const char *)&k->word;
        k->n = 8;
        return 1;
    }
    PyObject *bits = PyObject_CallMethod((PyObject *)&PyLong_Type, "bit_length", "O", as_int);
    Py_ssize_t nbits = bits ? PyLong_AsSsize_t(bits) : -1;
    Py_XDECREF(bits);
    PyObject *meth = nbits >= 0 ? PyObject_GetAttrString((PyObject *)&PyLong_Type, "to_bytes")
                                : NULL;
    PyObject *args = meth ? Py_BuildValue("(Ons)", as_int, nbits / 8 + 1, "little") : NULL;
    PyObject *kwargs = args ? Py_BuildValue("{s:O}", "signed", Py_True) : NULL;
    PyObject *raw = kwargs ? PyObject_Call(meth, args, kwargs) : NULL;
    Py_XDECREF(meth);
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    Py_DECREF(as_int);
    if (raw == NULL)
        return -1;
    k->keep = raw;
    k->tag = PRMEM_FZ_BIGINT;
    k->data = PyBytes_AS_STRING(raw);
    k->n = (size_t)PyBytes_GET_SIZE(raw);
    return 1;
}

/* memcmp() == 0, without a library call for the short keys that dominate */
static inline int
same_bytes(const char *a, const char *b, size_t n)
{
    if (n > 16)
        return memcmp(a, b, n) == 0;
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

/*
 * Find `key` in the map node of `h`.  Returns 1 and the value slot (and
 * its offset) if present, 0 if absent, -1 on error.
 */
static int
map_find(FrozenObject *h, PyObject *key, prmem_fz_slot *value, uint64_t *value_off)
{
    ExtentObject *x = h->extent;
    lookup_key k;
    int prepared = prep_key(key, &k);
    if (prepared <= 0)
        return prepared;
    int rc = -1;
    uint64_t count, nb;
    if (map_node(x, h->node, &count, &nb) < 0)
        goto done;
    uint64_t seed = load64(x, 16);
    uint64_t hash = prmem_fz_hash(seed, k.tag, k.data, k.n);
    uint64_t entries = h->node + 16, index = entries + count * PRMEM_FZ_ENTRY;
    uint64_t b = hash & (nb - 1);
    rc = 0;
    for (uint64_t probes = 0; probes < nb; probes++, b = (b + 1) & (nb - 1)) {
        uint32_t cell;
        memcpy(&cell, x->base + index + b * 4, 4);
        if (cell == 0)
            break;
        if (cell > count) {
            corrupt(x, "map index points past the entries", index + b * 4);
            rc = -1;
            break;
        }
        uint64_t e = entries + (uint64_t)(cell - 1) * PRMEM_FZ_ENTRY;
        if (load64(x, e + 2 * PRMEM_FZ_SLOT) != hash)
            continue;
        prmem_fz_slot ks;
        load_slot(x, e, &ks);
        if (ks.tag != k.tag)
            continue;
        if (k.tag == PRMEM_FZ_INT) {
            if (ks.payload != k.word)
                continue;
        }
        else {
            uint64_t len;
            /* big ints are always blobs, as materialize() reads them */
            const char *data = k.tag == PRMEM_FZ_BIGINT ? blob(x, ks.payload, &len)
                                                         : slot_bytes(x, &ks, &len);
            if (data == NULL) {
                rc = -1;
                break;
            }
            if (len != k.n || !same_bytes(data, k.data, k.n))
                continue;
        }
        load_slot(x, e + PRMEM_FZ_SLOT, value);
        *value_off = e + PRMEM_FZ_SLOT;
        rc = 1;
        break;
    }
done:
    Py_XDECREF(k.keep);
    return rc;
}

/* ----------------------------------------------------------- handles */

static PyObject *
handle_new(ExtentObject *x, int tag, uint64_t node)
{
    prmem_module_state *st = x->mstate;
    PyTypeObject *tp = tag == PRMEM_FZ_MAP ? st->FrozenMapType : st->FrozenListType;
    FrozenObject *h = (FrozenObject *)tp->tp_alloc(tp, 0);
    if (h == NULL)
        return NULL;
    Py_INCREF(x);
    h->extent = x;
    h->node = node;
    return (PyObject *)h;
}

static void
Frozen_dealloc(FrozenObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (PyType_IS_GC(tp))
        PyObject_GC_UnTrack(self);
    Py_XDECREF(self->extent);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
Frozen_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)type;
    (void)args;
    (void)kwds;
    PyErr_SetString(PyExc_TypeError, "frozen containers are created by Pool.freeze()");
    return NULL;
}

static PyObject *
Frozen_get_address(FrozenObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromVoidPtr((void *)self->extent->base);
}

static PyObject *
Frozen_get_nbytes(FrozenObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->extent->size);
}

static PyObject *
Frozen_get_allocation(FrozenObject *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->extent->alloc);
    return (PyObject *)self->extent->alloc;
}

static PyObject *
Frozen_get_node(FrozenObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->node);
}

static PyObject *
Frozen_get_pool(FrozenObject *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->extent->alloc->pool);
    return (PyObject *)self->extent->alloc->pool;
}

static PyObject *
Frozen_reduce(PyObject *self, PyObject *unused)
{
    (void)unused;
    PyErr_Format(PyExc_TypeError,
                 "cannot pickle %.100s to bytes: protected memory travels only between live "
                 "processes, as a descriptor. Pass it through multiprocessing (from a sealed "
                 "Pool(share=True)), use prmem.send()/prmem.recv(), or thaw() it for a "
                 "plain copy", Py_TYPE(self)->tp_name);
    return NULL;
}

/* ---------------------------------------------------------- FrozenMap */

/* KeyError(key), also for a tuple key (as dict raises it) */
static void
set_key_error(PyObject *key)
{
    PyObject *args = PyTuple_Pack(1, key);
    if (args != NULL) {
        PyErr_SetObject(PyExc_KeyError, args);
        Py_DECREF(args);
    }
}

static Py_ssize_t
Map_length(FrozenObject *self)
{
    uint64_t count, nb;
    if (map_node(self->extent, self->node, &count, &nb) < 0)
        return -1;
    return (Py_ssize_t)count;
}

static PyObject *
Map_subscript(FrozenObject *self, PyObject *key)
{
    prmem_fz_slot value;
    uint64_t at;
    int found = map_find(self, key, &value, &at);
    if (found < 0)
        return NULL;
    if (found == 0) {
        set_key_error(key);
        return NULL;
    }
    return materialize(self->extent, &value, self->node);
}

static int
Map_ass_subscript(FrozenObject *self, PyObject *key, PyObject *value)
{
    (void)key;
    (void)value;
    PyErr_Format(PyExc_TypeError,
                 "'%.100s' object does not support item %s: it is frozen in protected "
                 "memory (rare_set() changes a number in place; build a new version with "
                 "prmem.replace_pool() for anything else)",
                 Py_TYPE(self)->tp_name, value ? "assignment" : "deletion");
    return -1;
}

static int
Map_contains(FrozenObject *self, PyObject *key)
{
    prmem_fz_slot value;
    uint64_t at;
    return map_find(self, key, &value, &at);
}

static PyObject *
Map_get(FrozenObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get() takes 1 or 2 arguments");
        return NULL;
    }
    prmem_fz_slot value;
    uint64_t at;
    int found = map_find(self, args[0], &value, &at);
    if (found < 0)
        return NULL;
    if (found == 0) {
        PyObject *dflt = nargs == 2 ? args[1] : Py_None;
        Py_INCREF(dflt);
        return dflt;
    }
    return materialize(self->extent, &value, self->node);
}

/* _value_slot(key) -> (offset in the extent, tag) of key's value slot. */
static PyObject *
Map_value_slot(FrozenObject *self, PyObject *key)
{
    prmem_fz_slot value;
    uint64_t at;
    int found = map_find(self, key, &value, &at);
    if (found < 0)
        return NULL;
    if (found == 0) {
        set_key_error(key);
        return NULL;
    }
    return Py_BuildValue("(KI)", (unsigned long long)at, value.tag);
}

/* ------------------------------------------------------------ iterator */

enum { ITER_KEYS, ITER_VALUES, ITER_ITEMS, ITER_LIST };

typedef struct {
    PyObject_HEAD
    FrozenObject *src;
    uint64_t next;
    int kind;
} FrozenIterObject;

static PyObject *
iter_new(FrozenObject *src, int kind)
{
    FrozenIterObject *it = PyObject_New(FrozenIterObject, src->extent->mstate->FrozenIterType);
    if (it == NULL)
        return NULL;
    Py_INCREF(src);
    it->src = src;
    it->next = 0;
    it->kind = kind;
    return (PyObject *)it;
}

static void
Iter_dealloc(FrozenIterObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(self->src);
    PyObject_Free(self);
    Py_DECREF(tp);
}

static PyObject *
Iter_next(FrozenIterObject *self)
{
    FrozenObject *h = self->src;
    ExtentObject *x = h->extent;
    uint64_t count, nb;
    if (self->kind == ITER_LIST) {
        if (list_node(x, h->node, &count) < 0 || self->next >= count)
            return NULL;
        prmem_fz_slot slot;
        load_slot(x, h->node + 8 + self->next++ * PRMEM_FZ_SLOT, &slot);
        return materialize(x, &slot, h->node);
    }
    if (map_node(x, h->node, &count, &nb) < 0 || self->next >= count)
        return NULL;
    uint64_t e = h->node + 16 + self->next++ * PRMEM_FZ_ENTRY;
    prmem_fz_slot ks, vs;
    load_slot(x, e, &ks);
    load_slot(x, e + PRMEM_FZ_SLOT, &vs);
    if (self->kind == ITER_VALUES)
        return materialize(x, &vs, h->node);
    if (!key_tag(ks.tag))
        return corrupt(x, "map key of an unsupported type", e);
    PyObject *key = materialize(x, &ks, h->node);
    if (key == NULL || self->kind == ITER_KEYS)
        return key;
    PyObject *value = materialize(x, &vs, h->node);
    if (value == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    PyObject *pair = PyTuple_Pack(2, key, value);
    Py_DECREF(key);
    Py_DECREF(value);
    return pair;
}

static PyType_Slot Iter_slots[] = {
    {Py_tp_dealloc, Iter_dealloc},
    {Py_tp_iter, PyObject_SelfIter},
    {Py_tp_iternext, Iter_next},
    {0, NULL},
};

static PyType_Spec Iter_spec = {
    .name = "prmem._core.FrozenIterator",
    .basicsize = sizeof(FrozenIterObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Iter_slots,
};

static PyObject *
Map_iter(FrozenObject *self)
{
    return iter_new(self, ITER_KEYS);
}

static PyObject *
Map_iter_items(FrozenObject *self, PyObject *unused)
{
    (void)unused;
    return iter_new(self, ITER_ITEMS);
}

static PyObject *
Map_iter_values(FrozenObject *self, PyObject *unused)
{
    (void)unused;
    return iter_new(self, ITER_VALUES);
}

/* --------------------------------------------------------------- thaw */

/*
 * A valid structure is a tree: every slot is read once, and there are at
 * most size/16 of them.  Corrupt data can make several slots point at the
 * same child (children still lie before parents), and a chain of such
 * nodes would stand for 2^depth of them: the budget turns that into a
 * CorruptionError instead of a hang.
 */

static int
spend(ExtentObject *x, uint64_t *budget, uint64_t n, uint64_t node)
{
    if (n > *budget) {
        corrupt(x, "containers share children (a frozen structure is a tree)", node);
        return -1;
    }
    *budget -= n;
    return 0;
}

/* A container being thawed: an explicit stack, so any depth thaws without
 * recursion. */
typedef struct {
    int tag;
    uint64_t node, count, next;
    PyObject *result;      /* the list or dict being filled (strong) */
    PyObject *key;         /* a map's key for the child being thawed (strong) */
} thaw_frame;

/* Start thawing the container at `node`: check it, spend the budget,
 * make the empty list or dict. */
static int
thaw_open(ExtentObject *x, int tag, uint64_t node, uint64_t *budget, thaw_frame *f)
{
    uint64_t count, nb;
    memset(f, 0, sizeof(*f));
    if (tag == PRMEM_FZ_LIST) {
        if (list_node(x, node, &count) < 0 || spend(x, budget, count, node) < 0)
            return -1;
        f->result = PyList_New((Py_ssize_t)count);
    }
    else {
        if (map_node(x, node, &count, &nb) < 0 || spend(x, budget, 2 * count, node) < 0)
            return -1;
        f->result = PyDict_New();
    }
    if (f->result == NULL)
        return -1;
    f->tag = tag;
    f->node = node;
    f->count = count;
    return 0;
}

/* Put a finished child into its parent frame (steals value). */
static int
thaw_store(thaw_frame *parent, PyObject *value)
{
    if (parent->tag == PRMEM_FZ_LIST) {
        PyList_SET_ITEM(parent->result, (Py_ssize_t)(parent->next - 1), value);
        return 0;
    }
    int rc = PyDict_SetItem(parent->result, parent->key, value);
    Py_DECREF(value);
    Py_CLEAR(parent->key);
    return rc;
}

static PyObject *
thaw_node(ExtentObject *x, int tag, uint64_t node, uint64_t *budget)
{
    size_t depth = 0, cap = 16;
    thaw_frame *stack = PyMem_Malloc(cap * sizeof(thaw_frame));
    if (stack == NULL)
        return PyErr_NoMemory();
    PyObject *result = NULL;
    if (thaw_open(x, tag, node, budget, &stack[0]) < 0)
        goto fail;
    depth = 1;
    while (depth > 0) {
        thaw_frame *f = &stack[depth - 1];
        if (f->next >= f->count) {
            PyObject *done = f->result;
            f->result = NULL;
            depth--;
            if (depth == 0) {
                result = done;
                break;
            }
            if (thaw_store(&stack[depth - 1], done) < 0)
                goto fail;
            continue;
        }
        uint64_t i = f->next++;
        prmem_fz_slot slot;
        if (f->tag == PRMEM_FZ_LIST)
            load_slot(x, f->node + 8 + i * PRMEM_FZ_SLOT, &slot);
        else {
            uint64_t e = f->node + 16 + i * PRMEM_FZ_ENTRY;
            prmem_fz_slot ks;
            load_slot(x, e, &ks);
            load_slot(x, e + PRMEM_FZ_SLOT, &slot);
            if (!key_tag(ks.tag)) {
                corrupt(x, "map key of an unsupported type", e);
                goto fail;
            }
            if ((f->key = materialize(x, &ks, f->node)) == NULL)
                goto fail;
        }
        if (slot.tag == PRMEM_FZ_LIST || slot.tag == PRMEM_FZ_MAP) {
            uint64_t p = slot.payload;
            /* children lie before their parent: no cycles, whatever the data */
            if (p % 8 || p < PRMEM_FZ_HEADER || p >= f->node) {
                corrupt(x, "nested container out of place", p);
                goto fail;
            }
            if (depth == cap) {
                thaw_frame *bigger = PyMem_Realloc(stack, 2 * cap * sizeof(thaw_frame));
                if (bigger == NULL) {
                    PyErr_NoMemory();
                    goto fail;
                }
                stack = bigger;
                cap *= 2;
                f = &stack[depth - 1];
            }
            if (thaw_open(x, (int)slot.tag, p, budget, &stack[depth]) < 0)
                goto fail;
            depth++;
            continue;
        }
        PyObject *value = materialize(x, &slot, f->node);
        if (value == NULL || thaw_store(f, value) < 0)
            goto fail;
    }
    PyMem_Free(stack);
    return result;
fail:
    for (size_t k = 0; k < depth; k++) {
        Py_XDECREF(stack[k].result);
        Py_XDECREF(stack[k].key);
    }
    PyMem_Free(stack);
    return NULL;
}

static PyObject *
Map_thaw(FrozenObject *self, PyObject *unused)
{
    (void)unused;
    uint64_t budget = self->extent->size / PRMEM_FZ_SLOT;
    return thaw_node(self->extent, PRMEM_FZ_MAP, self->node, &budget);
}

/* --------------------------------------------------------- FrozenList */

static Py_ssize_t
List_length(FrozenObject *self)
{
    uint64_t count;
    if (list_node(self->extent, self->node, &count) < 0)
        return -1;
    return (Py_ssize_t)count;
}

static PyObject *
list_item(FrozenObject *self, uint64_t count, Py_ssize_t i)
{
    (void)count;
    prmem_fz_slot slot;
    load_slot(self->extent, self->node + 8 + (uint64_t)i * PRMEM_FZ_SLOT, &slot);
    return materialize(self->extent, &slot, self->node);
}

/* index -> a position in [0, count), or -1 with IndexError/TypeError */
static Py_ssize_t
list_index(FrozenObject *self, PyObject *index, uint64_t *count)
{
    if (list_node(self->extent, self->node, count) < 0)
        return -1;
    Py_ssize_t i = PyNumber_AsSsize_t(index, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred())
        return -1;
    if (i < 0)
        i += (Py_ssize_t)*count;
    if (i < 0 || (uint64_t)i >= *count) {
        PyErr_SetString(PyExc_IndexError, "FrozenList index out of range");
        return -1;
    }
    return i;
}

static PyObject *
List_subscript(FrozenObject *self, PyObject *key)
{
    uint64_t count;
    if (PyIndex_Check(key)) {
        Py_ssize_t i = list_index(self, key, &count);
        return i < 0 ? NULL : list_item(self, count, i);
    }
    if (PySlice_Check(key)) {
        if (list_node(self->extent, self->node, &count) < 0)
            return NULL;
        Py_ssize_t start, stop, step;
        if (PySlice_Unpack(key, &start, &stop, &step) < 0)
            return NULL;
        Py_ssize_t n = PySlice_AdjustIndices((Py_ssize_t)count, &start, &stop, step);
        PyObject *list = PyList_New(n);
        if (list == NULL)
            return NULL;
        for (Py_ssize_t k = 0; k < n; k++) {
            PyObject *v = list_item(self, count, start + k * step);
            if (v == NULL) {
                Py_DECREF(list);
                return NULL;
            }
            PyList_SET_ITEM(list, k, v);
        }
        return list;
    }
    PyErr_Format(PyExc_TypeError, "FrozenList indices must be integers or slices, not %.100s",
                 Py_TYPE(key)->tp_name);
    return NULL;
}

static PyObject *
List_sq_item(FrozenObject *self, Py_ssize_t i)
{
    uint64_t count;
    if (list_node(self->extent, self->node, &count) < 0)
        return NULL;
    if (i < 0 || (uint64_t)i >= count) {
        PyErr_SetString(PyExc_IndexError, "FrozenList index out of range");
        return NULL;
    }
    return list_item(self, count, i);
}

static PyObject *
List_iter(FrozenObject *self)
{
    return iter_new(self, ITER_LIST);
}

static PyObject *
List_thaw(FrozenObject *self, PyObject *unused)
{
    (void)unused;
    uint64_t budget = self->extent->size / PRMEM_FZ_SLOT;
    return thaw_node(self->extent, PRMEM_FZ_LIST, self->node, &budget);
}

static PyObject *
List_value_slot(FrozenObject *self, PyObject *index)
{
    uint64_t count;
    Py_ssize_t i = list_index(self, index, &count);
    if (i < 0)
        return NULL;
    uint64_t at = self->node + 8 + (uint64_t)i * PRMEM_FZ_SLOT;
    prmem_fz_slot slot;
    load_slot(self->extent, at, &slot);
    return Py_BuildValue("(KI)", (unsigned long long)at, slot.tag);
}

/* ----------------------------------------------------------- types */

static PyGetSetDef Frozen_getset[] = {
    {"address", (getter)Frozen_get_address, NULL,
     "Address of the first byte of the whole frozen structure.", NULL},
    {"nbytes", (getter)Frozen_get_nbytes, NULL, "Size of the whole frozen structure.", NULL},
    {"pool", (getter)Frozen_get_pool, NULL, "The pool holding the structure.", NULL},
    {"_node", (getter)Frozen_get_node, NULL, "Offset of this container's node.", NULL},
    {"_allocation", (getter)Frozen_get_allocation, NULL,
     "The allocation holding the structure (for rare_set).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Map_methods[] = {
    {"get", (PyCFunction)(void (*)(void))Map_get, METH_FASTCALL,
     "get(key, default=None): the value for key, or default."},
    {"thaw", (PyCFunction)Map_thaw, METH_NOARGS,
     "thaw() -> dict: a plain copy (nested FrozenMaps/FrozenLists become dicts/lists)."},
    {"_iter_items", (PyCFunction)Map_iter_items, METH_NOARGS, "Iterator of (key, value)."},
    {"_iter_values", (PyCFunction)Map_iter_values, METH_NOARGS, "Iterator of values."},
    {"_value_slot", (PyCFunction)Map_value_slot, METH_O, "(offset, tag) of key's value."},
    {"__reduce__", (PyCFunction)Frozen_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Map_slots[] = {
    {Py_tp_doc, "C base of prmem.FrozenMap."},
    {Py_tp_new, Frozen_new},
    {Py_tp_dealloc, Frozen_dealloc},
    {Py_tp_iter, Map_iter},
    {Py_tp_methods, Map_methods},
    {Py_tp_getset, Frozen_getset},
    {Py_mp_length, Map_length},
    {Py_mp_subscript, Map_subscript},
    {Py_mp_ass_subscript, Map_ass_subscript},
    {Py_sq_contains, Map_contains},
    {0, NULL},
};

static PyType_Spec Map_spec = {
    .name = "prmem._core.FrozenMap",
    .basicsize = sizeof(FrozenObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = Map_slots,
};

static PyMethodDef List_methods[] = {
    {"thaw", (PyCFunction)List_thaw, METH_NOARGS,
     "thaw() -> list: a plain copy (nested containers become dicts/lists)."},
    {"_value_slot", (PyCFunction)List_value_slot, METH_O, "(offset, tag) of an item."},
    {"__reduce__", (PyCFunction)Frozen_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot List_slots[] = {
    {Py_tp_doc, "C base of prmem.FrozenList."},
    {Py_tp_new, Frozen_new},
    {Py_tp_dealloc, Frozen_dealloc},
    {Py_tp_iter, List_iter},
    {Py_tp_methods, List_methods},
    {Py_tp_getset, Frozen_getset},
    {Py_mp_length, List_length},
    {Py_mp_subscript, List_subscript},
    {Py_sq_length, List_length},
    {Py_sq_item, List_sq_item},
    {0, NULL},
};

static PyType_Spec List_spec = {
    .name = "prmem._core.FrozenList",
    .basicsize = sizeof(FrozenObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = List_slots,
};

/* _core.open_frozen(allocation, node=0, tag=0) -> FrozenMap | FrozenList:
 * check the header and return a handle on the root, or on the container of
 * type `tag` at offset `node` (a nested one passed to another process). */
static PyObject *
open_frozen(PyObject *module, PyObject *args)
{
    prmem_module_state *st = PyModule_GetState(module);
    PyObject *arg;
    unsigned long long node = 0;
    unsigned int want_tag = 0;
    if (!PyArg_ParseTuple(args, "O|KI:open_frozen", &arg, &node, &want_tag))
        return NULL;
    if (!Py_IS_TYPE(arg, st->AllocationType)) {
        PyErr_SetString(PyExc_TypeError, "open_frozen() takes a prmem.Allocation");
        return NULL;
    }
    ExtentObject *x = extent_new(st, (AllocationObject *)arg);
    if (x == NULL)
        return NULL;
    PyObject *root = NULL;
    prmem_fz_slot slot;
    if (x->size < PRMEM_FZ_HEADER || load64(x, 0) != PRMEM_FZ_MAGIC)
        corrupt(x, "not a frozen structure (bad magic)", 0);
    else if (load64(x, 8) != x->size)
        corrupt(x, "recorded size differs from the allocation", 8);
    else {
        load_slot(x, 32, &slot);
        if (slot.tag != PRMEM_FZ_MAP && slot.tag != PRMEM_FZ_LIST)
            corrupt(x, "root is not a container", 32);
        else if (slot.payload % 8 || slot.payload < PRMEM_FZ_HEADER ||
                 slot.payload >= x->size)
            corrupt(x, "root container out of place", 32);
        else if (want_tag == 0)
            root = handle_new(x, (int)slot.tag, slot.payload);
        else if ((want_tag != PRMEM_FZ_MAP && want_tag != PRMEM_FZ_LIST) || node % 8 ||
                 node < PRMEM_FZ_HEADER || node > slot.payload)
            corrupt(x, "nested container out of place", node);
        else
            root = handle_new(x, (int)want_tag, node);
    }
    Py_DECREF(x);
    return root;
}

static PyObject *
set_frozen_types(PyObject *module, PyObject *args)
{
    prmem_module_state *st = PyModule_GetState(module);
    PyTypeObject *map_type, *list_type;
    if (!PyArg_ParseTuple(args, "O!O!", &PyType_Type, &map_type, &PyType_Type, &list_type))
        return NULL;
    if (!PyType_IsSubtype(map_type, st->FrozenMapBase) ||
        !PyType_IsSubtype(list_type, st->FrozenListBase)) {
        PyErr_SetString(PyExc_TypeError, "expected subclasses of the frozen base types");
        return NULL;
    }
    Py_INCREF(map_type);
    Py_INCREF(list_type);
    Py_XSETREF(st->FrozenMapType, map_type);
    Py_XSETREF(st->FrozenListType, list_type);
    Py_RETURN_NONE;
}

static PyObject *
freeze_encode(PyObject *module, PyObject *obj)
{
    return prmem_fz_encode(module, obj);
}

static PyMethodDef frozen_functions[] = {
    {"open_frozen", open_frozen, METH_VARARGS,
     "Handle on the frozen structure in an allocation (or on a nested container)."},
    {"freeze_encode", freeze_encode, METH_O, "The frozen layout of a Mapping or list, as bytes."},
    {"_set_frozen_types", set_frozen_types, METH_VARARGS,
     "Register prmem.FrozenMap/FrozenList as the types of new handles."},
    {NULL, NULL, 0, NULL},
};

static int
add_type(PyObject *module, PyType_Spec *spec, PyTypeObject **out, const char *attr)
{
    PyObject *t = PyType_FromModuleAndSpec(module, spec, NULL);
    if (t == NULL)
        return -1;
    *out = (PyTypeObject *)t;
    if (attr == NULL)
        return 0;
    Py_INCREF(t);
    if (PyModule_AddObject(module, attr, t) < 0) {
        Py_DECREF(t);
        return -1;
    }
    return 0;
}

/* Called from module init: the types, the functions, the Mapping ABC. */
PRMEM_INTERNAL int
prmem_fz_add_types(PyObject *module, prmem_module_state *st)
{
    if (add_type(module, &Extent_spec, &st->ExtentType, NULL) < 0 ||
        add_type(module, &Iter_spec, &st->FrozenIterType, NULL) < 0 ||
        add_type(module, &Map_spec, &st->FrozenMapBase, "FrozenMap") < 0 ||
        add_type(module, &List_spec, &st->FrozenListBase, "FrozenList") < 0)
        return -1;
    Py_INCREF(st->FrozenMapBase);
    st->FrozenMapType = st->FrozenMapBase;
    Py_INCREF(st->FrozenListBase);
    st->FrozenListType = st->FrozenListBase;
    PyObject *abc = PyImport_ImportModule("collections.abc");
    if (abc == NULL)
        return -1;
    st->MappingABC = PyObject_GetAttrString(abc, "Mapping");
    Py_DECREF(abc);
    if (st->MappingABC == NULL)
        return -1;
    return PyModule_AddFunctions(module, frozen_functions);
}
