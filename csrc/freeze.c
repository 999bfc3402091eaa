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

typedef struct encoder_frame encoder_frame;

typedef struct {
    char *buf;
    size_t len, cap;
    uint64_t seed;
    PyObject *mapping_abc;
    /* containers being encoded, outermost first: an explicit stack, so the
     * depth of the data is not limited by the C stack or recursion limit */
    encoder_frame *frames;
    size_t nframes, frames_cap;
    PyObject *active_ids;    /* id()s of those containers: cycle detection */
    /* on a data error: what went wrong; the path is read off the stack */
    const char *problem;     /* static text, or NULL: an unsupported type */
    PyObject *culprit_type;  /* borrowed type of the offending object */
    PyObject *error_type;    /* PyExc_TypeError / PyExc_ValueError */
    int in_key;              /* the offending object is a key */
    PyObject *dup_key;       /* a duplicate key found when a map is finished */
    PyObject *path;          /* built from the stack when the error is raised */
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

/* Record a data error (unsupported type, cycle, ...), reported with its
 * path when the encoder unwinds. */
static int
data_error(encoder *enc, PyObject *error_type, const char *problem, PyObject *culprit,
           int in_key)
{
    enc->error_type = error_type;
    enc->problem = problem;
    enc->culprit_type = culprit ? (PyObject *)Py_TYPE(culprit) : NULL;
    enc->in_key = in_key;
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
        if (encode_int(enc, key, slot, &data, &n, &keep) < 0) {
            Py_XDECREF(keep);
            return -1;
        }
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

struct encoder_frame {
    PyObject *obj;         /* the container (strong) */
    PyObject *seq;         /* its items: PySequence_Fast, or a list of pairs */
    PyObject *id;          /* its id(), in enc->active_ids */
    int is_map;
    Py_ssize_t n, next;    /* children, and the next to encode */
    prmem_fz_slot *slots;  /* a list's children */
    fz_entry *entries;     /* a map's entries */
    prmem_fz_slot *out;    /* where the parent wants this container's slot */
};

enum { KIND_SCALAR, KIND_LIST, KIND_MAP };

static int
is_mapping(encoder *enc, PyObject *obj)
{
    if (PyDict_Check(obj))
        return 1;
    return PyObject_IsInstance(obj, enc->mapping_abc);
}

/* What obj is: KIND_*, or -1 (an unsupported type is a data error). */
static int
classify(encoder *enc, PyObject *obj)
{
    if (obj == Py_None || PyBool_Check(obj) || PyLong_Check(obj) || PyFloat_Check(obj) ||
        PyUnicode_Check(obj) || PyBytes_Check(obj))
        return KIND_SCALAR;
    if (PyList_Check(obj) || PyTuple_Check(obj))
        return KIND_LIST;
    int mapping = is_mapping(enc, obj);
    if (mapping < 0)
        return -1;
    if (mapping)
        return KIND_MAP;
    return data_error(enc, PyExc_TypeError, NULL, obj, 0);
}

static int
encode_scalar(encoder *enc, PyObject *obj, prmem_fz_slot *out)
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
    return put_string(enc, PRMEM_FZ_BYTES, PyBytes_AS_STRING(obj),
                      (size_t)PyBytes_GET_SIZE(obj), out);
}

static void
drop_frame(encoder *enc, encoder_frame *f)
{
    if (f->id != NULL && PySet_Discard(enc->active_ids, f->id) < 0)
        PyErr_Clear();
    Py_XDECREF(f->id);
    Py_XDECREF(f->seq);
    Py_XDECREF(f->obj);
    PyMem_Free(f->slots);
    PyMem_Free(f->entries);
}

/* Start encoding container obj, whose slot goes to *out. */
static int
push_frame(encoder *enc, PyObject *obj, int kind, prmem_fz_slot *out)
{
    PyObject *id = PyLong_FromVoidPtr(obj);
    if (id == NULL)
        return -1;
    int seen = PySet_Contains(enc->active_ids, id);
    if (seen != 0) {
        Py_DECREF(id);
        return seen < 0 ? -1
                        : data_error(enc, PyExc_ValueError, "contains itself (a cycle)", NULL, 0);
    }
    if (enc->nframes == enc->frames_cap) {
        size_t cap = enc->frames_cap ? enc->frames_cap * 2 : 32;
        encoder_frame *p = PyMem_Realloc(enc->frames, cap * sizeof(encoder_frame));
        if (p == NULL) {
            Py_DECREF(id);
            PyErr_NoMemory();
            return -1;
        }
        enc->frames = p;
        enc->frames_cap = cap;
    }
    encoder_frame f;
    memset(&f, 0, sizeof(f));
    f.is_map = kind == KIND_MAP;
    f.out = out;
    Py_INCREF(obj);
    f.obj = obj;
    f.id = id;
    if (PySet_Add(enc->active_ids, id) < 0) {
        f.id = NULL;
        Py_DECREF(id);
        drop_frame(enc, &f);
        return -1;
    }
    if (f.is_map)
        f.seq = PyDict_CheckExact(obj) ? PyDict_Items(obj) : PyMapping_Items(obj);
    else
        f.seq = PySequence_Fast(obj, "freeze(): not a sequence");
    if (f.seq == NULL) {
        drop_frame(enc, &f);
        return -1;
    }
    f.n = f.is_map ? PyList_GET_SIZE(f.seq) : PySequence_Fast_GET_SIZE(f.seq);
    if (f.is_map && (uint64_t)f.n > PRMEM_FZ_MAX_INDEX) {
        drop_frame(enc, &f);
        return data_error(enc, PyExc_ValueError, "has too many entries", NULL, 0);
    }
    if (f.is_map)
        f.entries = PyMem_Calloc((size_t)f.n + 1, sizeof(fz_entry));
    else
        f.slots = PyMem_Calloc((size_t)f.n + 1, sizeof(prmem_fz_slot));
    if (f.entries == NULL && f.slots == NULL) {
        drop_frame(enc, &f);
        PyErr_NoMemory();
        return -1;
    }
    enc->frames[enc->nframes++] = f;
    return 0;
}

static int
finish_list(encoder *enc, encoder_frame *f)
{
    /* user code (a Mapping's items()) may have changed the list meanwhile */
    if (PySequence_Fast_GET_SIZE(f->seq) != f->n)
        return data_error(enc, PyExc_ValueError, "changed size while being frozen", NULL, 0);
    size_t at = reserve(enc, 8 + (size_t)f->n * PRMEM_FZ_SLOT);
    if (at == (size_t)-1)
        return -1;
    uint64_t count = (uint64_t)f->n;
    memcpy(enc->buf + at, &count, 8);
    if (f->n > 0)
        memcpy(enc->buf + at + 8, f->slots, (size_t)f->n * PRMEM_FZ_SLOT);
    memset(f->out, 0, sizeof(*f->out));
    f->out->tag = PRMEM_FZ_LIST;
    f->out->payload = at;
    return 0;
}

static int
finish_map(encoder *enc, encoder_frame *f)
{
    Py_ssize_t n = f->n;
    fz_entry *entries = f->entries;
    uint64_t nbuckets = 1;
    while (nbuckets < 2 * (uint64_t)n)
        nbuckets *= 2;
    uint32_t *index = PyMem_Calloc((size_t)nbuckets, sizeof(uint32_t));
    if (index == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int rc = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t b = entries[i].hash & (nbuckets - 1);
        while (index[b] != 0) {
            fz_entry *other = &entries[index[b] - 1];
            if (other->hash == entries[i].hash && keys_equal(enc, &other->key, &entries[i].key)) {
                data_error(enc, PyExc_ValueError, "is a duplicate key", NULL, 1);
                enc->dup_key = PyTuple_GET_ITEM(PyList_GET_ITEM(f->seq, i), 0);
                Py_INCREF(enc->dup_key);
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
    memset(f->out, 0, sizeof(*f->out));
    f->out->tag = PRMEM_FZ_MAP;
    f->out->payload = at;
    rc = 0;
done:
    PyMem_Free(index);
    return rc;
}

/* After a data error: the path from the top level to the offending value,
 * read off the stack (each frame's current child; a duplicate key for a
 * map that was being finished). */
static void
build_path(encoder *enc, int finishing)
{
    enc->path = PyList_New(0);
    for (size_t k = 0; enc->path != NULL && k < enc->nframes; k++) {
        encoder_frame *f = &enc->frames[k];
        PyObject *component;
        if (finishing && k == enc->nframes - 1) {
            if (enc->dup_key == NULL)
                break;
            component = enc->dup_key;
            Py_INCREF(component);
        }
        else if (f->next == 0)
            break;
        else if (f->is_map)
            component = PyTuple_GET_ITEM(PyList_GET_ITEM(f->seq, f->next - 1), 0),
            Py_INCREF(component);
        else
            component = PyLong_FromSsize_t(f->next - 1);
        if (component == NULL || PyList_Append(enc->path, component) < 0)
            Py_CLEAR(enc->path);
        Py_XDECREF(component);
    }
}

/* Encode container obj into *out, depth-first without recursion: children
 * are written before their parents. */
static int
encode_tree(encoder *enc, PyObject *obj, int kind, prmem_fz_slot *out)
{
    int finishing = 0;
    if (push_frame(enc, obj, kind, out) < 0)
        goto fail;
    while (enc->nframes > 0) {
        encoder_frame *f = &enc->frames[enc->nframes - 1];
        if (f->next >= f->n) {
            finishing = 1;
            if ((f->is_map ? finish_map(enc, f) : finish_list(enc, f)) < 0)
                goto fail;
            finishing = 0;
            drop_frame(enc, f);
            enc->nframes--;
            continue;
        }
        Py_ssize_t i = f->next++;
        PyObject *child;
        prmem_fz_slot *target;
        if (f->is_map) {
            PyObject *pair = PyList_GET_ITEM(f->seq, i);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
                PyErr_SetString(PyExc_TypeError, "freeze(): a Mapping's items() must give pairs");
                goto fail;
            }
            fz_entry *e = &f->entries[i];
            if (encode_key(enc, PyTuple_GET_ITEM(pair, 0), &e->key, &e->hash) < 0)
                goto fail;
            child = PyTuple_GET_ITEM(pair, 1);
            target = &e->value;
        }
        else {
            /* the sequence may change under user code: re-check the size */
            if (i >= PySequence_Fast_GET_SIZE(f->seq)) {
                data_error(enc, PyExc_ValueError, "changed size while being frozen", NULL, 0);
                goto fail;
            }
            child = PySequence_Fast_GET_ITEM(f->seq, i);
            target = &f->slots[i];
        }
        Py_INCREF(child);
        int child_kind = classify(enc, child);
        int rc = child_kind < 0                ? -1
                 : child_kind == KIND_SCALAR ? encode_scalar(enc, child, target)
                                             : push_frame(enc, child, child_kind, target);
        Py_DECREF(child);
        if (rc < 0)
            goto fail;
    }
    return 0;
fail:
    if (enc->error_type != NULL && !PyErr_Occurred())
        build_path(enc, finishing);
    while (enc->nframes > 0)
        drop_frame(enc, &enc->frames[--enc->nframes]);
    return -1;
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
    enc.active_ids = PySet_New(NULL);
    if (enc.active_ids == NULL)
        goto done;
    if (encode_tree(&enc, obj, top_mapping ? KIND_MAP : KIND_LIST, &root) < 0) {
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
    Py_XDECREF(enc.dup_key);
    Py_XDECREF(enc.active_ids);
    PyMem_Free(enc.buf);
    PyMem_Free(enc.frames);
    return result;
}
