/*
 * The frozen-container encoder: Python data -> the layout frozen.c reads
 * (docs/frozen-layout.md).  Runs with no prmem lock held (it calls into
 * Python: user Mappings, str encoding); the result is a bytes object that
 * Pool.freeze() copies into one allocation in a single write, so a failure
 * leaves nothing allocated.
 *
 * Children are written before their parents (post-order), so every
 * container's children lie at lower offsets: the reader relies on it to
 * rule out cycles in hostile data.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "prmem.h"

#include <string.h>
#include <sys/random.h>

typedef struct {
    char *buf;
    size_t len, cap;
    uint64_t seed;
    PyObject *mapping_abc;
    /* containers being encoded, for cycle detection */
    PyObject **active;
    size_t nactive, active_cap;
    /* on a data error: the path from the failing value up, built on the
     * way out of the recursion (so success costs nothing) */
    PyObject *path;          /* list of keys / indexes, innermost last */
    const char *problem;     /* static text */
    PyObject *culprit_type;  /* borrowed type of the offending object */
    PyObject *error_type;    /* PyExc_TypeError / PyExc_ValueError */
    int in_key;              /* the offending object is a key */
} encoder;

/* Reserve n bytes (8-aligned) at the end of the buffer; returns the offset
 * or (size_t)-1 with MemoryError set. */
static size_t
reserve(encoder *enc, size_t n)
{
    size_t aligned = (n + 7) & ~(size_t)7;
    if (aligned < n || enc->len > SIZE_MAX - aligned) {
        PyErr_NoMemory();
        return (size_t)-1;
    }
    if (enc->len + aligned > enc->cap) {
        size_t cap = enc->cap ? enc->cap : 4096;
        while (cap < enc->len + aligned) {
            if (cap > SIZE_MAX / 2) {
                PyErr_NoMemory();
                return (size_t)-1;
            }
            cap *= 2;
        }
        char *p = PyMem_Realloc(enc->buf, cap);
        if (p == NULL) {
            PyErr_NoMemory();
            return (size_t)-1;
        }
        enc->buf = p;
        enc->cap = cap;
    }
    size_t off = enc->len;
    memset(enc->buf + off + n, 0, aligned - n); /* padding is zero */
    enc->len += aligned;
    return off;
}

static int
put_blob(encoder *enc, const void *data, size_t n, uint64_t *off)
{
    if (n > SIZE_MAX - 8) {
        PyErr_NoMemory();
        return -1;
    }
    size_t at = reserve(enc, 8 + n);
    if (at == (size_t)-1)
        return -1;
    uint64_t len = n;
    memcpy(enc->buf + at, &len, 8);
    if (n > 0)
        memcpy(enc->buf + at + 8, data, n);
    *off = at;
    return 0;
}

/* A str's UTF-8 (lone surrogates pass, as os.fsdecode() makes them); *keep
 * owns the bytes when they had to be made. */
static const char *
str_utf8(PyObject *s, size_t *n, PyObject **keep)
{
    Py_ssize_t len;
    const char *data = PyUnicode_AsUTF8AndSize(s, &len);
    if (data == NULL) {
        PyErr_Clear();
        *keep = PyUnicode_AsEncodedString(s, "utf-8", "surrogatepass");
        if (*keep == NULL)
            return NULL;
        data = PyBytes_AS_STRING(*keep);
        len = PyBytes_GET_SIZE(*keep);
    }
    *n = (size_t)len;
    return data;
}

/* A str or bytes value: inline in the slot when short, else a blob. */
static int
put_string(encoder *enc, uint32_t tag, const char *data, size_t n, prmem_fz_slot *slot)
{
    slot->tag = tag;
    if (n <= PRMEM_FZ_INLINE_MAX) {
        unsigned char *raw = (unsigned char *)slot;
        raw[4] = (unsigned char)(n + 1);
        if (n > 0)
            memcpy(raw + 5, data, n);
        return 0;
    }
    return put_blob(enc, data, n, &slot->payload);
}

/* Record a data error (unsupported type, cycle, ...) to be reported with
 * its path at the top. */
static int
data_error(encoder *enc, PyObject *error_type, const char *problem, PyObject *culprit,
           int in_key)
{
    enc->error_type = error_type;
    enc->problem = problem;
    enc->culprit_type = culprit ? (PyObject *)Py_TYPE(culprit) : NULL;
    enc->in_key = in_key;
    enc->path = PyList_New(0);
    return -1;
}

/* On the way out of a failing child: prepend the child's key or index. */
static int
add_path(encoder *enc, PyObject *component)
{
    if (enc->path != NULL && PyList_Insert(enc->path, 0, component) < 0)
        Py_CLEAR(enc->path);
    return -1;
}

static int
add_index_path(encoder *enc, Py_ssize_t i)
{
    if (enc->path == NULL)
        return -1;
    PyObject *index = PyLong_FromSsize_t(i);
    if (index == NULL) {
        Py_CLEAR(enc->path);
        return -1;
    }
    add_path(enc, index);
    Py_DECREF(index);
    return -1;
}

/* An int as a slot: int64 inline, larger ones as a two's complement blob. */
static int
encode_int(encoder *enc, PyObject *obj, prmem_fz_slot *out, const char **bytes, size_t *n,
           PyObject **keep)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (!overflow) {
        out->tag = PRMEM_FZ_INT;
        out->payload = (uint64_t)v;
        return 0;
    }
    /* n = bit_length() // 8 + 1 bytes hold any sign */
    /* int's own methods: an int subclass may override them */
    PyObject *bits = PyObject_CallMethod((PyObject *)&PyLong_Type, "bit_length", "O", obj);
    if (bits == NULL)
        return -1;
    Py_ssize_t nbits = PyLong_AsSsize_t(bits);
    Py_DECREF(bits);
    if (nbits < 0)
        return -1;
    PyObject *args = Py_BuildValue("(Ons)", obj, nbits / 8 + 1, "little");
    PyObject *kwargs = Py_BuildValue("{s:O}", "signed", Py_True);
    PyObject *meth = PyObject_GetAttrString((PyObject *)&PyLong_Type, "to_bytes");
    PyObject *raw = (args && kwargs && meth) ? PyObject_Call(meth, args, kwargs) : NULL;
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    Py_XDECREF(meth);
    if (raw == NULL)
        return -1;
    *keep = raw;
    *bytes = PyBytes_AS_STRING(raw);
    *n = (size_t)PyBytes_GET_SIZE(raw);
    uint64_t off;
    if (put_blob(enc, *bytes, *n, &off) < 0)
        return -1;
    out->tag = PRMEM_FZ_BIGINT;
    out->payload = off;
    return 0;
}

/*
 * A key as a slot plus its hash.  dict semantics: bool keys are their int.
 */
static int
encode_key(encoder *enc, PyObject *key, prmem_fz_slot *slot, uint64_t *hash)
{
    memset(slot, 0, sizeof(*slot));
    const char *data = NULL;
    size_t n = 0;
    PyObject *keep = NULL;
    uint64_t word;
    if (PyUnicode_Check(key)) {
        data = str_utf8(key, &n, &keep);
        if (data == NULL || put_string(enc, PRMEM_FZ_STR, data, n, slot) < 0) {
            Py_XDECREF(keep);
            return -1;
        }
    }
    else if (PyBytes_Check(key)) {
        data = PyBytes_AS_STRING(key);
        n = (size_t)PyBytes_GET_SIZE(key);
        if (put_string(enc, PRMEM_FZ_BYTES, data, n, slot) < 0)
            return -1;
    }
    else if (PyLong_Check(key)) {
        if (encode_int(enc, key, slot, &data, &n, &keep) < 0)
            return -1;
        if (slot->tag == PRMEM_FZ_INT) {
            word = slot->payload;
            data = (const char *)&word;
            n = 8;
        }
    }
    else
        return data_error(enc, PyExc_TypeError, NULL, key, 1);
    *hash = prmem_fz_hash(enc->seed, slot->tag, data, n);
    Py_XDECREF(keep);
    return 0;
}

static int encode_value(encoder *enc, PyObject *obj, prmem_fz_slot *out);

static int
enter_container(encoder *enc, PyObject *obj)
{
    for (size_t i = 0; i < enc->nactive; i++) {
        if (enc->active[i] == obj)
            return data_error(enc, PyExc_ValueError, "contains itself (a cycle)", NULL, 0);
    }
    if (enc->nactive == enc->active_cap) {
        size_t cap = enc->active_cap ? enc->active_cap * 2 : 32;
        PyObject **p = PyMem_Realloc(enc->active, cap * sizeof(PyObject *));
        if (p == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        enc->active = p;
        enc->active_cap = cap;
    }
    enc->active[enc->nactive++] = obj;
    if (Py_EnterRecursiveCall(" while freezing nested data")) {
        enc->nactive--;
        return -1;
    }
    return 0;
}

static void
leave_container(encoder *enc)
{
    Py_LeaveRecursiveCall();
    enc->nactive--;
}

static int
encode_list(encoder *enc, PyObject *seq, prmem_fz_slot *out)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    prmem_fz_slot *slots = PyMem_Calloc((size_t)n + 1, sizeof(prmem_fz_slot));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int rc = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        /* the sequence may change under user code: re-check the size */
        if (i >= PySequence_Fast_GET_SIZE(seq)) {
            data_error(enc, PyExc_ValueError, "changed size while being frozen", NULL, 0);
            goto done;
        }
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        Py_INCREF(item);
        int r = encode_value(enc, item, &slots[i]);
        Py_DECREF(item);
        if (r < 0) {
            add_index_path(enc, i);
            goto done;
        }
    }
    size_t at = reserve(enc, 8 + (size_t)n * PRMEM_FZ_SLOT);
    if (at == (size_t)-1)
        goto done;
    uint64_t count = (uint64_t)n;
    memcpy(enc->buf + at, &count, 8);
    if (n > 0)
        memcpy(enc->buf + at + 8, slots, (size_t)n * PRMEM_FZ_SLOT);
    out->tag = PRMEM_FZ_LIST;
    out->payload = at;
    rc = 0;
done:
    PyMem_Free(slots);
    return rc;
}

typedef struct {
    prmem_fz_slot key, value;
    uint64_t hash;
} fz_entry;

static const char *
key_bytes(encoder *enc, const prmem_fz_slot *slot, uint64_t *len)
{
    const unsigned char *raw = (const unsigned char *)slot;
    if (raw[4] != 0) {
        *len = raw[4] - 1u;
        return (const char *)raw + 5;
    }
    memcpy(len, enc->buf + slot->payload, 8);
    return enc->buf + slot->payload + 8;
}

static int
keys_equal(encoder *enc, const prmem_fz_slot *a, const prmem_fz_slot *b)
{
    if (a->tag != b->tag)
        return 0;
    if (a->tag == PRMEM_FZ_INT)
        return a->payload == b->payload;
    uint64_t la, lb;
    const char *da = key_bytes(enc, a, &la), *db = key_bytes(enc, b, &lb);
    return la == lb && memcmp(da, db, la) == 0;
}

/* items: a list of (key, value) pairs */
static int
encode_map(encoder *enc, PyObject *items, prmem_fz_slot *out)
{
    Py_ssize_t n = PyList_GET_SIZE(items);
    if ((uint64_t)n > PRMEM_FZ_MAX_INDEX)
        return data_error(enc, PyExc_ValueError, "has too many entries", NULL, 0);
    fz_entry *entries = PyMem_Calloc((size_t)n + 1, sizeof(fz_entry));
    if (entries == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    uint32_t *index = NULL;
    int rc = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyList_GET_ITEM(items, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "freeze(): a Mapping's items() must give pairs");
            goto done;
        }
        PyObject *key = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        if (encode_value(enc, value, &entries[i].value) < 0 ||
            encode_key(enc, key, &entries[i].key, &entries[i].hash) < 0) {
            add_path(enc, key);
            goto done;
        }
    }
    uint64_t nbuckets = 1;
    while (nbuckets < 2 * (uint64_t)n)
        nbuckets *= 2;
    index = PyMem_Calloc((size_t)nbuckets, sizeof(uint32_t));
    if (index == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t b = entries[i].hash & (nbuckets - 1);
        while (index[b] != 0) {
            fz_entry *other = &entries[index[b] - 1];
            if (other->hash == entries[i].hash && keys_equal(enc, &other->key, &entries[i].key)) {
                data_error(enc, PyExc_ValueError, "is a duplicate key", NULL, 1);
                add_path(enc, PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0));
                goto done;
            }
            b = (b + 1) & (nbuckets - 1);
        }
        index[b] = (uint32_t)(i + 1);
    }
    size_t node_size = 16 + (size_t)n * PRMEM_FZ_ENTRY + (size_t)nbuckets * 4;
    size_t at = reserve(enc, node_size);
    if (at == (size_t)-1)
        goto done;
    uint64_t header[2] = {(uint64_t)n, nbuckets};
    memcpy(enc->buf + at, header, 16);
    for (Py_ssize_t i = 0; i < n; i++)
        memcpy(enc->buf + at + 16 + (size_t)i * PRMEM_FZ_ENTRY, &entries[i], PRMEM_FZ_ENTRY);
    memcpy(enc->buf + at + 16 + (size_t)n * PRMEM_FZ_ENTRY, index, (size_t)nbuckets * 4);
    out->tag = PRMEM_FZ_MAP;
    out->payload = at;
    rc = 0;
done:
    PyMem_Free(entries);
    PyMem_Free(index);
    return rc;
}

static int
is_mapping(encoder *enc, PyObject *obj)
{
    if (PyDict_Check(obj))
        return 1;
    return PyObject_IsInstance(obj, enc->mapping_abc);
}

static int
encode_value(encoder *enc, PyObject *obj, prmem_fz_slot *out)
{
    memset(out, 0, sizeof(*out));
    if (obj == Py_None) {
        out->tag = PRMEM_FZ_NONE;
        return 0;
    }
    if (PyBool_Check(obj)) {
        out->tag = obj == Py_True ? PRMEM_FZ_TRUE : PRMEM_FZ_FALSE;
        return 0;
    }
    if (PyLong_Check(obj)) {
        const char *bytes;
        size_t n;
        PyObject *keep = NULL;
        int rc = encode_int(enc, obj, out, &bytes, &n, &keep);
        Py_XDECREF(keep);
        return rc;
    }
    if (PyFloat_Check(obj)) {
        double d = PyFloat_AS_DOUBLE(obj);
        out->tag = PRMEM_FZ_FLOAT;
        memcpy(&out->payload, &d, 8);
        return 0;
    }
    if (PyUnicode_Check(obj)) {
        size_t len;
        PyObject *keep = NULL;
        const char *data = str_utf8(obj, &len, &keep);
        int rc = data ? put_string(enc, PRMEM_FZ_STR, data, len, out) : -1;
        Py_XDECREF(keep);
        return rc;
    }
    if (PyBytes_Check(obj)) {
        return put_string(enc, PRMEM_FZ_BYTES, PyBytes_AS_STRING(obj),
                          (size_t)PyBytes_GET_SIZE(obj), out);
    }
    if (PyList_Check(obj) || PyTuple_Check(obj)) {
        if (enter_container(enc, obj) < 0)
            return -1;
        PyObject *seq = PySequence_Fast(obj, "freeze(): not a sequence");
        int rc = seq ? encode_list(enc, seq, out) : -1;
        Py_XDECREF(seq);
        leave_container(enc);
        return rc;
    }
    int mapping = is_mapping(enc, obj);
    if (mapping < 0)
        return -1;
    if (mapping) {
        if (enter_container(enc, obj) < 0)
            return -1;
        PyObject *items = PyDict_CheckExact(obj) ? PyDict_Items(obj) : PyMapping_Items(obj);
        int rc = items ? encode_map(enc, items, out) : -1;
        Py_XDECREF(items);
        leave_container(enc);
        return rc;
    }
    return data_error(enc, PyExc_TypeError, NULL, obj, 0);
}

/* "['alice']['nets'][2]" from the path list. */
static PyObject *
format_path(PyObject *path)
{
    PyObject *parts = PyList_New(0);
    if (parts == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(path); i++) {
        PyObject *part = PyUnicode_FromFormat("[%R]", PyList_GET_ITEM(path, i));
        if (part == NULL || PyList_Append(parts, part) < 0) {
            Py_XDECREF(part);
            Py_DECREF(parts);
            return NULL;
        }
        Py_DECREF(part);
    }
    PyObject *empty = PyUnicode_FromString("");
    PyObject *joined = empty ? PyUnicode_Join(empty, parts) : NULL;
    Py_XDECREF(empty);
    Py_DECREF(parts);
    return joined;
}

static void
raise_data_error(encoder *enc)
{
    PyObject *where = enc->path ? format_path(enc->path) : NULL;
    if (where == NULL) {
        PyErr_Clear();
        where = PyUnicode_FromString("?");
        if (where == NULL)
            return;
    }
    const char *what = enc->in_key ? "key" : "value";
    const char *supported = enc->in_key ? "keys must be str, bytes or int"
                                        : "supported: None, bool, int, float, str, bytes, "
                                          "list, tuple and Mappings of them";
    if (PyUnicode_GET_LENGTH(where) == 0 && !enc->in_key)
        Py_SETREF(where, PyUnicode_FromString("the top level"));
    if (where == NULL)
        return;
    if (enc->problem == NULL) { /* an unsupported type */
        const char *type_name = ((PyTypeObject *)enc->culprit_type)->tp_name;
        const char *article = strchr("aeiouAEIOU", type_name[0]) ? "an" : "a";
        PyErr_Format(enc->error_type, "freeze(): %s at %U is %s %s; %s", what, where, article,
                     type_name, supported);
    }
    else
        PyErr_Format(enc->error_type, "freeze(): %s at %U %s", what, where, enc->problem);
    Py_DECREF(where);
}

/* _core.freeze_encode(obj) -> bytes: the whole structure, header first. */
PRMEM_INTERNAL PyObject *
prmem_fz_encode(PyObject *module, PyObject *obj)
{
    prmem_module_state *st = PyModule_GetState(module);
    encoder enc;
    memset(&enc, 0, sizeof(enc));
    enc.mapping_abc = st->MappingABC;
    int top_mapping = is_mapping(&enc, obj);
    if (top_mapping < 0)
        return NULL;
    if (!top_mapping && !PyList_Check(obj) && !PyTuple_Check(obj)) {
        PyErr_Format(PyExc_TypeError,
                     "freeze() takes a Mapping (-> FrozenMap) or a list or tuple "
                     "(-> FrozenList), not %.100s", Py_TYPE(obj)->tp_name);
        return NULL;
    }
    if (getrandom(&enc.seed, sizeof(enc.seed), 0) != (ssize_t)sizeof(enc.seed))
        enc.seed = (uint64_t)(uintptr_t)&enc ^ 0x9e3779b97f4a7c15ULL; /* no entropy: any seed works */
    PyObject *result = NULL;
    if (reserve(&enc, PRMEM_FZ_HEADER) == (size_t)-1)
        goto done;
    prmem_fz_slot root;
    if (encode_value(&enc, obj, &root) < 0) {
        if (enc.error_type != NULL && !PyErr_Occurred())
            raise_data_error(&enc);
        goto done;
    }
    uint64_t header[4] = {PRMEM_FZ_MAGIC, enc.len, enc.seed, 0};
    memcpy(enc.buf, header, 32);
    memcpy(enc.buf + 32, &root, PRMEM_FZ_SLOT);
    result = PyBytes_FromStringAndSize(enc.buf, (Py_ssize_t)enc.len);
done:
    Py_XDECREF(enc.path);
    PyMem_Free(enc.buf);
    PyMem_Free(enc.active);
    return result;
}
