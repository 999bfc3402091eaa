/*
 * Frozen containers, the Python side: the FrozenMap and FrozenList types
 * (their C bases; prmem.frozen subclasses them), iteration, and opening a
 * structure.  Every read goes through frozen_read.c, which checks it.
 */
#include "prmem.h"

#include <string.h>

/* ----------------------------------------------------------- handles */


static void
Frozen_dealloc(prmem_frozen *self)
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
Frozen_get_address(prmem_frozen *self, void *closure)
{
    (void)closure;
    return PyLong_FromVoidPtr((void *)self->extent->base);
}

static PyObject *
Frozen_get_nbytes(prmem_frozen *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->extent->size);
}

static PyObject *
Frozen_get_allocation(prmem_frozen *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->extent->alloc);
    return (PyObject *)self->extent->alloc;
}

static PyObject *
Frozen_get_node(prmem_frozen *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->node);
}

static PyObject *
Frozen_get_pool(prmem_frozen *self, void *closure)
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
Map_length(prmem_frozen *self)
{
    uint64_t count, nb;
    if (prmem_fz_map_node(self->extent, self->node, &count, &nb) < 0)
        return -1;
    return (Py_ssize_t)count;
}

static PyObject *
Map_subscript(prmem_frozen *self, PyObject *key)
{
    prmem_fz_slot value;
    uint64_t at;
    int found = prmem_fz_map_find(self, key, &value, &at);
    if (found < 0)
        return NULL;
    if (found == 0) {
        set_key_error(key);
        return NULL;
    }
    return prmem_fz_materialize(self->extent, &value, self->node);
}

static int
Map_ass_subscript(prmem_frozen *self, PyObject *key, PyObject *value)
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
Map_contains(prmem_frozen *self, PyObject *key)
{
    prmem_fz_slot value;
    uint64_t at;
    return prmem_fz_map_find(self, key, &value, &at);
}

static PyObject *
Map_get(prmem_frozen *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get() takes 1 or 2 arguments");
        return NULL;
    }
    prmem_fz_slot value;
    uint64_t at;
    int found = prmem_fz_map_find(self, args[0], &value, &at);
    if (found < 0)
        return NULL;
    if (found == 0) {
        PyObject *dflt = nargs == 2 ? args[1] : Py_None;
        Py_INCREF(dflt);
        return dflt;
    }
    return prmem_fz_materialize(self->extent, &value, self->node);
}

/* _value_slot(key) -> (offset in the extent, tag) of key's value slot. */
static PyObject *
Map_value_slot(prmem_frozen *self, PyObject *key)
{
    prmem_fz_slot value;
    uint64_t at;
    int found = prmem_fz_map_find(self, key, &value, &at);
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
    prmem_frozen *src;
    uint64_t next;
    int kind;
} FrozenIterObject;

static PyObject *
iter_new(prmem_frozen *src, int kind)
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
    prmem_frozen *h = self->src;
    prmem_extent *x = h->extent;
    uint64_t count, nb;
    if (self->kind == ITER_LIST) {
        if (prmem_fz_list_node(x, h->node, &count) < 0 || self->next >= count)
            return NULL;
        prmem_fz_slot slot;
        prmem_fz_load_slot(x, h->node + 8 + self->next++ * PRMEM_FZ_SLOT, &slot);
        return prmem_fz_materialize(x, &slot, h->node);
    }
    if (prmem_fz_map_node(x, h->node, &count, &nb) < 0 || self->next >= count)
        return NULL;
    uint64_t e = h->node + 16 + self->next++ * PRMEM_FZ_ENTRY;
    prmem_fz_slot ks, vs;
    prmem_fz_load_slot(x, e, &ks);
    prmem_fz_load_slot(x, e + PRMEM_FZ_SLOT, &vs);
    if (self->kind == ITER_VALUES)
        return prmem_fz_materialize(x, &vs, h->node);
    if (!prmem_fz_key_tag(ks.tag))
        return prmem_fz_corrupt(x, "map key of an unsupported type", e);
    PyObject *key = prmem_fz_materialize(x, &ks, h->node);
    if (key == NULL || self->kind == ITER_KEYS)
        return key;
    PyObject *value = prmem_fz_materialize(x, &vs, h->node);
    if (value == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    PyObject *pair = PyTuple_Pack(2, key, value);
    Py_DECREF(key);
    Py_DECREF(value);
    return pair;
}

/* Each read of a no-access pool's structure holds access while it runs
 * (prmem_fz_enter/leave); these wrap the readers the types expose. */
static PyObject *
Iter_next_guarded(FrozenIterObject *self)
{
    const prmem_extent *x = self->src->extent;
    if (prmem_fz_enter(x) < 0)
        return NULL;
    PyObject *r = Iter_next(self);
    prmem_fz_leave(x);
    return r;
}

static PyType_Slot Iter_slots[] = {
    {Py_tp_dealloc, Iter_dealloc},
    {Py_tp_iter, PyObject_SelfIter},
    {Py_tp_iternext, Iter_next_guarded},
    {0, NULL},
};

static PyType_Spec Iter_spec = {
    .name = "prmem._core.FrozenIterator",
    .basicsize = sizeof(FrozenIterObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Iter_slots,
};

static PyObject *
Map_iter(prmem_frozen *self)
{
    return iter_new(self, ITER_KEYS);
}

static PyObject *
Map_iter_items(prmem_frozen *self, PyObject *unused)
{
    (void)unused;
    return iter_new(self, ITER_ITEMS);
}

static PyObject *
Map_iter_values(prmem_frozen *self, PyObject *unused)
{
    (void)unused;
    return iter_new(self, ITER_VALUES);
}

/* --------------------------------------------------------- FrozenList */

static Py_ssize_t
List_length(prmem_frozen *self)
{
    uint64_t count;
    if (prmem_fz_list_node(self->extent, self->node, &count) < 0)
        return -1;
    return (Py_ssize_t)count;
}

static PyObject *
list_item(prmem_frozen *self, uint64_t count, Py_ssize_t i)
{
    (void)count;
    prmem_fz_slot slot;
    prmem_fz_load_slot(self->extent, self->node + 8 + (uint64_t)i * PRMEM_FZ_SLOT, &slot);
    return prmem_fz_materialize(self->extent, &slot, self->node);
}

/* index -> a position in [0, count), or -1 with IndexError/TypeError */
static Py_ssize_t
list_index(prmem_frozen *self, PyObject *index, uint64_t *count)
{
    if (prmem_fz_list_node(self->extent, self->node, count) < 0)
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
List_subscript(prmem_frozen *self, PyObject *key)
{
    uint64_t count;
    if (PyIndex_Check(key)) {
        Py_ssize_t i = list_index(self, key, &count);
        return i < 0 ? NULL : list_item(self, count, i);
    }
    if (PySlice_Check(key)) {
        if (prmem_fz_list_node(self->extent, self->node, &count) < 0)
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
List_sq_item(prmem_frozen *self, Py_ssize_t i)
{
    uint64_t count;
    if (prmem_fz_list_node(self->extent, self->node, &count) < 0)
        return NULL;
    if (i < 0 || (uint64_t)i >= count) {
        PyErr_SetString(PyExc_IndexError, "FrozenList index out of range");
        return NULL;
    }
    return list_item(self, count, i);
}

static PyObject *
List_iter(prmem_frozen *self)
{
    return iter_new(self, ITER_LIST);
}

static PyObject *
List_thaw(prmem_frozen *self, PyObject *unused)
{
    (void)unused;
    return prmem_fz_thaw(self->extent, PRMEM_FZ_LIST, self->node);
}

static PyObject *
Map_thaw(prmem_frozen *self, PyObject *unused)
{
    (void)unused;
    return prmem_fz_thaw(self->extent, PRMEM_FZ_MAP, self->node);
}

static PyObject *
List_value_slot(prmem_frozen *self, PyObject *index)
{
    uint64_t count;
    Py_ssize_t i = list_index(self, index, &count);
    if (i < 0)
        return NULL;
    uint64_t at = self->node + 8 + (uint64_t)i * PRMEM_FZ_SLOT;
    prmem_fz_slot slot;
    prmem_fz_load_slot(self->extent, at, &slot);
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

#define GUARDED(ret, name, errval, params, args)                                   \
    static ret name##_guarded params                                              \
    {                                                                             \
        const prmem_extent *x = self->extent;                                     \
        if (prmem_fz_enter(x) < 0)                                                \
            return errval;                                                        \
        ret r = name args;                                                        \
        prmem_fz_leave(x);                                                        \
        return r;                                                                 \
    }
GUARDED(Py_ssize_t, Map_length, -1, (prmem_frozen *self), (self))
GUARDED(PyObject *, Map_subscript, NULL, (prmem_frozen *self, PyObject *key), (self, key))
GUARDED(int, Map_contains, -1, (prmem_frozen *self, PyObject *key), (self, key))
GUARDED(PyObject *, Map_get, NULL, (prmem_frozen *self, PyObject *const *args, Py_ssize_t n),
        (self, args, n))
GUARDED(PyObject *, Map_thaw, NULL, (prmem_frozen *self, PyObject *unused), (self, unused))
GUARDED(PyObject *, Map_value_slot, NULL, (prmem_frozen *self, PyObject *key), (self, key))
GUARDED(Py_ssize_t, List_length, -1, (prmem_frozen *self), (self))
GUARDED(PyObject *, List_subscript, NULL, (prmem_frozen *self, PyObject *key), (self, key))
GUARDED(PyObject *, List_sq_item, NULL, (prmem_frozen *self, Py_ssize_t i), (self, i))
GUARDED(PyObject *, List_thaw, NULL, (prmem_frozen *self, PyObject *unused), (self, unused))
GUARDED(PyObject *, List_value_slot, NULL, (prmem_frozen *self, PyObject *i), (self, i))
#undef GUARDED

static PyMethodDef Map_methods[] = {
    {"get", (PyCFunction)(void (*)(void))Map_get_guarded, METH_FASTCALL,
     "get(key, default=None): the value for key, or default."},
    {"thaw", (PyCFunction)Map_thaw_guarded, METH_NOARGS,
     "thaw() -> dict: a plain copy (nested FrozenMaps/FrozenLists become dicts/lists)."},
    {"_iter_items", (PyCFunction)Map_iter_items, METH_NOARGS, "Iterator of (key, value)."},
    {"_iter_values", (PyCFunction)Map_iter_values, METH_NOARGS, "Iterator of values."},
    {"_value_slot", (PyCFunction)Map_value_slot_guarded, METH_O, "(offset, tag) of key's value."},
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
    {Py_mp_length, Map_length_guarded},
    {Py_mp_subscript, Map_subscript_guarded},
    {Py_mp_ass_subscript, Map_ass_subscript},
    {Py_sq_contains, Map_contains_guarded},
    {0, NULL},
};

static PyType_Spec Map_spec = {
    .name = "prmem._core.FrozenMap",
    .basicsize = sizeof(prmem_frozen),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = Map_slots,
};

static PyMethodDef List_methods[] = {
    {"thaw", (PyCFunction)List_thaw_guarded, METH_NOARGS,
     "thaw() -> list: a plain copy (nested containers become dicts/lists)."},
    {"_value_slot", (PyCFunction)List_value_slot_guarded, METH_O, "(offset, tag) of an item."},
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
    {Py_mp_length, List_length_guarded},
    {Py_mp_subscript, List_subscript_guarded},
    {Py_sq_length, List_length_guarded},
    {Py_sq_item, List_sq_item_guarded},
    {0, NULL},
};

static PyType_Spec List_spec = {
    .name = "prmem._core.FrozenList",
    .basicsize = sizeof(prmem_frozen),
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
    prmem_extent *x = prmem_fz_extent_new(st, (AllocationObject *)arg);
    if (x == NULL)
        return NULL;
    if (prmem_fz_enter(x) < 0) {
        Py_DECREF(x);
        return NULL;
    }
    PyObject *root = NULL;
    prmem_fz_slot slot;
    if (x->size < PRMEM_FZ_HEADER || prmem_fz_load64(x, 0) != PRMEM_FZ_MAGIC)
        prmem_fz_corrupt(x, "not a frozen structure (bad magic)", 0);
    else if (prmem_fz_load64(x, 8) != x->size)
        prmem_fz_corrupt(x, "recorded size differs from the allocation", 8);
    else {
        prmem_fz_load_slot(x, 32, &slot);
        if (slot.tag != PRMEM_FZ_MAP && slot.tag != PRMEM_FZ_LIST)
            prmem_fz_corrupt(x, "root is not a container", 32);
        else if (slot.payload % 8 || slot.payload < PRMEM_FZ_HEADER ||
                 slot.payload >= x->size)
            prmem_fz_corrupt(x, "root container out of place", 32);
        else if (want_tag == 0)
            root = prmem_fz_handle_new(x, (int)slot.tag, slot.payload);
        else if ((want_tag != PRMEM_FZ_MAP && want_tag != PRMEM_FZ_LIST) || node % 8 ||
                 node < PRMEM_FZ_HEADER || node > slot.payload)
            prmem_fz_corrupt(x, "nested container out of place", node);
        else
            root = prmem_fz_handle_new(x, (int)want_tag, node);
    }
    prmem_fz_leave(x);
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
    if (add_type(module, &prmem_extent_spec, &st->ExtentType, NULL) < 0 ||
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

