/*
 * Frozen containers, the reading floor: checked reads of the layout (prmem.h,
 * docs/frozen-layout.md), lookups, thaw; frozen.c builds the Python types
 * on it.
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

static void
Extent_dealloc(prmem_extent *self)
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

PRMEM_INTERNAL PyType_Spec prmem_extent_spec = {
    .name = "prmem._core._Extent",
    .basicsize = sizeof(prmem_extent),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Extent_slots,
};

/* Pin alloc's memory: while the extent lives, destroy() refuses. */
PRMEM_INTERNAL prmem_extent *
prmem_fz_extent_new(prmem_module_state *st, AllocationObject *alloc)
{
    prmem_extent *x = PyObject_New(prmem_extent, st->ExtentType);
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

/* No-access pools (access.c): a read of a frozen structure holds access to
 * the pool while it runs; the pages are PROT_NONE before and after.  Other
 * pools pay one test of a flag that never changes after __init__. */
PRMEM_INTERNAL int
prmem_fz_enter(const prmem_extent *x)
{
    PoolObject *pool = x->alloc->pool;
    /* a record pointer that does not check out is refused below */
    if (prmem_pool_meta_ok(pool) && !pool->m->noaccess)
        return 0;
    prmem_error e;
    POOL_LOCK(pool);
    int rc = prmem_check_usable(pool, &e) < 0 ? -1 : prmem_access_hold(pool, 0, &e);
    POOL_UNLOCK(pool);
    if (rc < 0)
        prmem_raise(&e);
    return rc;
}

PRMEM_INTERNAL void
prmem_fz_leave(const prmem_extent *x)
{
    PoolObject *pool = x->alloc->pool;
    if (!prmem_pool_meta_ok(pool) || !pool->m->noaccess)
        return;
    prmem_error e;
    POOL_LOCK(pool);
    prmem_access_release(pool, &e); /* if it cannot close, it stays readable */
    POOL_UNLOCK(pool);
}

/* ------------------------------------------------------ checked reads */

PRMEM_INTERNAL void *
prmem_fz_corrupt(const prmem_extent *x, const char *what, uint64_t at)
{
    PyErr_Format(x->mstate->CorruptionError,
                 "frozen structure of prmem pool %R is corrupt: %s (at offset %llu of its "
                 "%llu bytes); rebuild it",
                 x->alloc->pool->name, what, (unsigned long long)at,
                 (unsigned long long)x->size);
    return NULL;
}

/* A map node at `node`: its count and bucket count, checked. */
PRMEM_INTERNAL int
prmem_fz_map_node(const prmem_extent *x, uint64_t node, uint64_t *count, uint64_t *nbuckets)
{
    if (node % 8 || !prmem_fz_inside(x, node, 16))
        return prmem_fz_corrupt(x, "map node outside the structure", node), -1;
    uint64_t n = prmem_fz_load64(x, node), nb = prmem_fz_load64(x, node + 8);
    uint64_t room = x->size - node - 16;
    if (n > room / PRMEM_FZ_ENTRY || n > PRMEM_FZ_MAX_INDEX)
        return prmem_fz_corrupt(x, "map entry count too large", node), -1;
    room -= n * PRMEM_FZ_ENTRY;
    if (nb == 0 || (nb & (nb - 1)) != 0 || nb > room / 4 || nb < n)
        return prmem_fz_corrupt(x, "bad map bucket count", node), -1;
    *count = n;
    *nbuckets = nb;
    return 0;
}

PRMEM_INTERNAL int
prmem_fz_list_node(const prmem_extent *x, uint64_t node, uint64_t *count)
{
    if (node % 8 || !prmem_fz_inside(x, node, 8))
        return prmem_fz_corrupt(x, "list node outside the structure", node), -1;
    uint64_t n = prmem_fz_load64(x, node);
    if (n > (x->size - node - 8) / PRMEM_FZ_SLOT)
        return prmem_fz_corrupt(x, "list length too large", node), -1;
    *count = n;
    return 0;
}

/* The bytes of a blob, checked; NULL with CorruptionError. */
static const char *
blob(const prmem_extent *x, uint64_t off, uint64_t *len)
{
    if (off % 8 || off < PRMEM_FZ_HEADER || !prmem_fz_inside(x, off, 8))
        return prmem_fz_corrupt(x, "string offset outside the structure", off);
    uint64_t n = prmem_fz_load64(x, off);
    if (n > x->size - off - 8)
        return prmem_fz_corrupt(x, "string longer than the structure", off);
    *len = n;
    return x->base + off + 8;
}


/* The bytes of a str/bytes/big int slot: inline in the slot (data then
 * points into *slot, a local copy) or in a blob, checked. */
static const char *
slot_bytes(const prmem_extent *x, const prmem_fz_slot *slot, uint64_t *len)
{
    const unsigned char *raw = (const unsigned char *)slot;
    if (raw[4] != 0) {
        if (raw[4] - 1 > PRMEM_FZ_INLINE_MAX)
            return prmem_fz_corrupt(x, "inline string too long", 0);
        *len = (uint64_t)(raw[4] - 1);
        return (const char *)raw + 5;
    }
    return blob(x, slot->payload, len);
}

/* A Python object for a slot read from the node at `parent`. */
PRMEM_INTERNAL PyObject *
prmem_fz_materialize(prmem_extent *x, const prmem_fz_slot *slot, uint64_t parent)
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
                return prmem_fz_corrupt(x, "string is not valid UTF-8", p);
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
            return prmem_fz_corrupt(x, "nested container out of place", p);
        return prmem_fz_handle_new(x, (int)slot->tag, p);
    default:
        return prmem_fz_corrupt(x, "unknown value tag", parent);
    }
}

/* -------------------------------------------------------- lookup keys */


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
PRMEM_INTERNAL int
prmem_fz_map_find(prmem_frozen *h, PyObject *key, prmem_fz_slot *value, uint64_t *value_off)
{
    prmem_extent *x = h->extent;
    lookup_key k;
    int prepared = prep_key(key, &k);
    if (prepared <= 0)
        return prepared;
    int rc = -1;
    uint64_t count, nb;
    if (prmem_fz_map_node(x, h->node, &count, &nb) < 0)
        goto done;
    uint64_t seed = prmem_fz_load64(x, 16);
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
            prmem_fz_corrupt(x, "map index points past the entries", index + b * 4);
            rc = -1;
            break;
        }
        uint64_t e = entries + (uint64_t)(cell - 1) * PRMEM_FZ_ENTRY;
        if (prmem_fz_load64(x, e + 2 * PRMEM_FZ_SLOT) != hash)
            continue;
        prmem_fz_slot ks;
        prmem_fz_load_slot(x, e, &ks);
        if (ks.tag != k.tag)
            continue;
        if (k.tag == PRMEM_FZ_INT) {
            if (ks.payload != k.word)
                continue;
        }
        else {
            uint64_t len;
            /* big ints are always blobs, as prmem_fz_materialize() reads them */
            const char *data = k.tag == PRMEM_FZ_BIGINT ? blob(x, ks.payload, &len)
                                                         : slot_bytes(x, &ks, &len);
            if (data == NULL) {
                rc = -1;
                break;
            }
            if (len != k.n || !same_bytes(data, k.data, k.n))
                continue;
        }
        prmem_fz_load_slot(x, e + PRMEM_FZ_SLOT, value);
        *value_off = e + PRMEM_FZ_SLOT;
        rc = 1;
        break;
    }
done:
    Py_XDECREF(k.keep);
    return rc;
}

PRMEM_INTERNAL PyObject *
prmem_fz_handle_new(prmem_extent *x, int tag, uint64_t node)
{
    prmem_module_state *st = x->mstate;
    PyTypeObject *tp = tag == PRMEM_FZ_MAP ? st->FrozenMapType : st->FrozenListType;
    prmem_frozen *h = (prmem_frozen *)tp->tp_alloc(tp, 0);
    if (h == NULL)
        return NULL;
    Py_INCREF(x);
    h->extent = x;
    h->node = node;
    return (PyObject *)h;
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
spend(prmem_extent *x, uint64_t *budget, uint64_t n, uint64_t node)
{
    if (n > *budget) {
        prmem_fz_corrupt(x, "containers share children (a frozen structure is a tree)", node);
        return -1;
    }
    *budget -= n;
    return 0;
}

/* Strings and bytes are copied out too: a blob counts len/16 (many slots
 * pointing at one large blob would otherwise copy it again and again). */
static int
spend_blob(prmem_extent *x, uint64_t *budget, const prmem_fz_slot *slot)
{
    const unsigned char *raw = (const unsigned char *)slot;
    uint64_t len;
    if ((slot->tag != PRMEM_FZ_STR && slot->tag != PRMEM_FZ_BYTES &&
         slot->tag != PRMEM_FZ_BIGINT) || (slot->tag != PRMEM_FZ_BIGINT && raw[4] != 0))
        return 0; /* no blob: the slot itself was counted */
    if (blob(x, slot->payload, &len) == NULL)
        return -1;
    return spend(x, budget, len / PRMEM_FZ_SLOT, slot->payload);
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
thaw_open(prmem_extent *x, int tag, uint64_t node, uint64_t *budget, thaw_frame *f)
{
    uint64_t count, nb;
    memset(f, 0, sizeof(*f));
    if (tag == PRMEM_FZ_LIST) {
        if (prmem_fz_list_node(x, node, &count) < 0 || spend(x, budget, count, node) < 0)
            return -1;
        f->result = PyList_New((Py_ssize_t)count);
    }
    else {
        if (prmem_fz_map_node(x, node, &count, &nb) < 0 || spend(x, budget, 2 * count, node) < 0)
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
thaw_tree(prmem_extent *x, int tag, uint64_t node, uint64_t *budget)
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
            prmem_fz_load_slot(x, f->node + 8 + i * PRMEM_FZ_SLOT, &slot);
        else {
            uint64_t e = f->node + 16 + i * PRMEM_FZ_ENTRY;
            prmem_fz_slot ks;
            prmem_fz_load_slot(x, e, &ks);
            prmem_fz_load_slot(x, e + PRMEM_FZ_SLOT, &slot);
            if (!prmem_fz_key_tag(ks.tag)) {
                prmem_fz_corrupt(x, "map key of an unsupported type", e);
                goto fail;
            }
            if (spend_blob(x, budget, &ks) < 0 ||
                (f->key = prmem_fz_materialize(x, &ks, f->node)) == NULL)
                goto fail;
        }
        if (slot.tag == PRMEM_FZ_LIST || slot.tag == PRMEM_FZ_MAP) {
            uint64_t p = slot.payload;
            /* children lie before their parent: no cycles, whatever the data */
            if (p % 8 || p < PRMEM_FZ_HEADER || p >= f->node) {
                prmem_fz_corrupt(x, "nested container out of place", p);
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
        PyObject *value = spend_blob(x, budget, &slot) < 0
                              ? NULL : prmem_fz_materialize(x, &slot, f->node);
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

/* A plain copy of the container at `node`: lists and dicts all the way
 * down, with a budget of one visit per slot the extent can hold. */
PRMEM_INTERNAL PyObject *
prmem_fz_thaw(prmem_extent *x, int tag, uint64_t node)
{
    /* a valid structure holds at most size/16 slots plus blobs of at most
     * size bytes in all: size/8 covers both */
    uint64_t budget = x->size / 8;
    return thaw_tree(x, tag, node, &budget);
}

