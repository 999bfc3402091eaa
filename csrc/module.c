/*
 * Module init for prmem._core: multi-phase init, heap types, exceptions in
 * module state, feature probes.
 */
#include "prmem.h"

#include <errno.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static prmem_module_state *
get_state(PyObject *module)
{
    return (prmem_module_state *)PyModule_GetState(module);
}

static const struct {
    unsigned bit;
    const char *name;
} feature_names[] = {
    {PRMEM_FEAT_MEMFD, "memfd"},
    {PRMEM_FEAT_SEAL_FUTURE_WRITE, "memfd_seal_future_write"},
    {PRMEM_FEAT_MSEAL, "mseal"},
    {PRMEM_FEAT_MEMFD_SECRET, "memfd_secret"},
    {PRMEM_FEAT_PKEYS, "pkeys"},
};
#define N_FEATURES (sizeof(feature_names) / sizeof(feature_names[0]))

/*
 * PRMEM_DISABLE_FEATURES=name[,name...] makes prmem behave as on a kernel
 * without those features, so every degraded path can be tested on any
 * machine (e.g. "memfd" exercises the unsealable fallback backing).
 * Unknown names fail the import rather than being ignored.
 */
static int
apply_disabled_features(void)
{
    const char *env = getenv("PRMEM_DISABLE_FEATURES");
    if (env == NULL)
        return 0;
    char buf[256];
    if (strlen(env) >= sizeof(buf)) {
        PyErr_SetString(PyExc_ImportError,
                        "PRMEM_DISABLE_FEATURES is too long (at most 255 characters)");
        return -1;
    }
    snprintf(buf, sizeof(buf), "%s", env);
    char *save = NULL;
    for (char *tok = strtok_r(buf, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)) {
        size_t i;
        for (i = 0; i < N_FEATURES; i++) {
            if (strcmp(tok, feature_names[i].name) == 0) {
                prmem_features &= ~feature_names[i].bit;
                break;
            }
        }
        if (i == N_FEATURES) {
            PyErr_Format(PyExc_ImportError,
                         "PRMEM_DISABLE_FEATURES names an unknown feature %s (known: memfd, "
                         "memfd_seal_future_write, mseal, memfd_secret, pkeys)",
                         tok);
            return -1;
        }
    }
    /* the future-write seal is a memfd feature */
    if (!(prmem_features & PRMEM_FEAT_MEMFD))
        prmem_features &= ~PRMEM_FEAT_SEAL_FUTURE_WRITE;
    return 0;
}

static PyObject *
probe_features(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    PyObject *set = PySet_New(NULL);
    if (set == NULL)
        return NULL;
    for (size_t i = 0; i < N_FEATURES; i++) {
        if (!(prmem_features & feature_names[i].bit))
            continue;
        PyObject *s = PyUnicode_FromString(feature_names[i].name);
        if (s == NULL || PySet_Add(set, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(set);
            return NULL;
        }
        Py_DECREF(s);
    }
    return set;
}

static PyObject *
set_state_members(PyObject *module, PyObject *members)
{
    if (!PyTuple_Check(members) || PyTuple_GET_SIZE(members) != PRMEM_NSTATES) {
        PyErr_SetString(PyExc_TypeError, "expected a tuple of the 3 prmem.State members");
        return NULL;
    }
    prmem_module_state *st = get_state(module);
    Py_INCREF(members);
    Py_XSETREF(st->state_members, members);
    Py_RETURN_NONE;
}

/* _root() -> (address, state): prmem's root page and how it is protected
 * ("sealed": read-only and mseal()ed, "read-only", "writable"). */
static PyObject *
root_info(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    static const char *const states[] = {"writable", "read-only", "sealed"};
    int sealed = prmem_root_state();
    return Py_BuildValue("(Ks)", (unsigned long long)(uintptr_t)&prmem_root_page,
                         states[sealed >= 0 && sealed <= 2 ? sealed : 0]);
}

static PyMethodDef module_methods[] = {
    {"_root", root_info, METH_NOARGS,
     "_root() -> (address, state): prmem's root page (the metadata range's address, the "
     "page size, the kernel features, enforcement), read-only after import; state is "
     "'sealed' (read-only and mseal()ed), 'read-only' or 'writable'"},
    {"probe_features", probe_features, METH_NOARGS,
     "Names of the kernel features detected at import (a set of str)."},
    {"_set_state_members", set_state_members, METH_O,
     "Register the prmem.State members Allocation.state returns."},
    {"rare_write", (PyCFunction)(void (*)(void))prmem_module_rare_write,
     METH_FASTCALL | METH_KEYWORDS,
     "rare_write(dst, data, offset=0) -> None\n\n"
     "Write bytes-like data into allocation dst at offset.  Allowed on\n"
     "WRITE_RARE (and still WRITABLE) memory of WR, AUTO_WR and START_WR\n"
     "pools.  The bytes go through the pool's memfd: the memory is never\n"
     "mapped writable.  ProtectionError on READ_ONLY memory or RO/AUTO_RO\n"
     "pools, ValueError if the range is not inside dst, TypeError if dst is\n"
     "not a prmem.Allocation."},
    {"rare_memset", (PyCFunction)(void (*)(void))prmem_module_rare_memset,
     METH_FASTCALL | METH_KEYWORDS,
     "rare_memset(dst, byte, offset=0, length=None) -> None\n\n"
     "Fill length bytes of dst from offset (default: to its end) with byte,\n"
     "with the same rules as rare_write()."},
    {"_fault_registry_address", prmem_fault_registry_address, METH_NOARGS,
     "_fault_registry_address() -> int (tests only): the fault registry's root block"},
    {"fault_report", (PyCFunction)(void (*)(void))prmem_fault_report, METH_FASTCALL,
     "fault_report(enabled=None) -> bool\n\n"
     "Switch the report printed when native code writes to protected prmem\n"
     "memory on or off; returns the previous setting (None: just query)."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
new_exception(PyObject *module, const char *name, const char *doc, PyObject *bases)
{
    PyObject *exc = PyErr_NewExceptionWithDoc(name, doc, bases, NULL);
    Py_DECREF(bases);
    if (exc == NULL)
        return NULL;
    const char *short_name = strrchr(name, '.') + 1;
    Py_INCREF(exc);
    if (PyModule_AddObject(module, short_name, exc) < 0) {
        Py_DECREF(exc);
        Py_DECREF(exc);
        return NULL;
    }
    return exc;
}

static int
add_type(PyObject *module, PyType_Spec *spec, PyTypeObject **out, const char *attr)
{
    PyObject *t = PyType_FromModuleAndSpec(module, spec, NULL);
    if (t == NULL)
        return -1;
    *out = (PyTypeObject *)t;
    Py_INCREF(t);
    if (PyModule_AddObject(module, attr, t) < 0) {
        Py_DECREF(t);
        return -1;
    }
    return 0;
}

static int
module_exec(PyObject *module)
{
    prmem_module_state *st = get_state(module);
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0 || (page & (page - 1)) != 0) {
        PyErr_SetString(PyExc_ImportError, "prmem: cannot determine the page size");
        return -1;
    }
    /* prmem's root is set by the first init of the module in the process
     * and read-only from then on (prmem_root_seal); later inits (another
     * interpreter, a re-import) use it as it is. */
    if (!prmem_root.ready) {
        prmem_page_size = (size_t)page;
        prmem_page_shift = __builtin_ctzl((unsigned long)page);
        prmem_features = prmem_probe_features();
        if (apply_disabled_features() < 0)
            return -1;
        prmem_enforce = prmem_read_enforce();
        if (prmem_meta_init() < 0) {
            prmem_set_oserror("prmem: reserving prmem's metadata", errno);
            return -1;
        }
        if (prmem_fork_init() < 0)
            return -1;
        prmem_root_seal();
    }

    if (add_type(module, &prmem_pool_spec, &st->PoolType, "Pool") < 0 ||
        add_type(module, &prmem_allocation_spec, &st->AllocationType, "Allocation") < 0 ||
        add_type(module, &prmem_readonly_buffer_spec, &st->ReadOnlyBufferType,
                 "ReadOnlyBuffer") < 0 ||
        add_type(module, &prmem_access_spec, &st->AccessType, "Access") < 0)
        return -1;

    st->PrmemError = new_exception(module, "prmem.PrmemError",
                                   "Base class of every error prmem raises itself.",
                                   PyTuple_Pack(1, PyExc_Exception));
    if (st->PrmemError == NULL)
        return -1;
    st->ProtectionError = new_exception(
        module, "prmem.ProtectionError",
        "A write was refused because the memory is not writable that way "
        "(WRITE_RARE through a plain write, READ_ONLY through anything).",
        PyTuple_Pack(2, st->PrmemError, PyExc_PermissionError));
    st->PoolDestroyedError = new_exception(
        module, "prmem.PoolDestroyedError", "The pool was destroyed; its memory is gone.",
        PyTuple_Pack(2, st->PrmemError, PyExc_ValueError));
    st->UnsupportedError = new_exception(
        module, "prmem.UnsupportedError",
        "The running kernel lacks a feature this request needs.",
        PyTuple_Pack(2, st->PrmemError, PyExc_OSError));
    st->CorruptionError = new_exception(
        module, "prmem.CorruptionError",
        "A structure read from pool memory (a frozen container) is inconsistent: "
        "it was overwritten, or built by someone else. Nothing outside it was read.",
        PyTuple_Pack(2, st->PrmemError, PyExc_ValueError));
    if (st->ProtectionError == NULL || st->PoolDestroyedError == NULL ||
        st->UnsupportedError == NULL || st->CorruptionError == NULL)
        return -1;
    if (prmem_fz_add_types(module, st) < 0 || prmem_share_add_functions(module) < 0)
        return -1;

    PyObject *enforced = PyBool_FromLong(prmem_enforce);
    if (PyModule_AddObject(module, "enforced", enforced) < 0) {
        Py_DECREF(enforced);
        return -1;
    }
    if (PyModule_AddIntConstant(module, "page_size", page) < 0 ||
        PyModule_AddIntConstant(module, "page_shift", prmem_page_shift) < 0 ||
        PyModule_AddIntConstant(module, "MODE_RO", PRMEM_MODE_RO) < 0 ||
        PyModule_AddIntConstant(module, "MODE_WR", PRMEM_MODE_WR) < 0 ||
        PyModule_AddIntConstant(module, "MODE_AUTO_RO", PRMEM_MODE_AUTO_RO) < 0 ||
        PyModule_AddIntConstant(module, "MODE_AUTO_WR", PRMEM_MODE_AUTO_WR) < 0 ||
        PyModule_AddIntConstant(module, "MODE_START_WR", PRMEM_MODE_START_WR) < 0 ||
        PyModule_AddIntConstant(module, "STATE_WRITABLE", PRMEM_WRITABLE) < 0 ||
        PyModule_AddIntConstant(module, "STATE_WRITE_RARE", PRMEM_WRITE_RARE) < 0 ||
        PyModule_AddIntConstant(module, "STATE_READ_ONLY", PRMEM_READ_ONLY) < 0)
        return -1;
    return 0;
}

static int
module_traverse(PyObject *module, visitproc visit, void *arg)
{
    prmem_module_state *st = get_state(module);
    Py_VISIT(st->PoolType);
    Py_VISIT(st->AllocationType);
    Py_VISIT(st->ReadOnlyBufferType);
    Py_VISIT(st->AccessType);
    Py_VISIT(st->PrmemError);
    Py_VISIT(st->ProtectionError);
    Py_VISIT(st->PoolDestroyedError);
    Py_VISIT(st->UnsupportedError);
    Py_VISIT(st->state_members);
    Py_VISIT(st->CorruptionError);
    Py_VISIT(st->ExtentType);
    Py_VISIT(st->FrozenMapBase);
    Py_VISIT(st->FrozenListBase);
    Py_VISIT(st->FrozenIterType);
    Py_VISIT(st->FrozenMapType);
    Py_VISIT(st->FrozenListType);
    Py_VISIT(st->MappingABC);
    return 0;
}

static int
module_clear(PyObject *module)
{
    prmem_module_state *st = get_state(module);
    Py_CLEAR(st->PoolType);
    Py_CLEAR(st->AllocationType);
    Py_CLEAR(st->ReadOnlyBufferType);
    Py_CLEAR(st->AccessType);
    Py_CLEAR(st->PrmemError);
    Py_CLEAR(st->ProtectionError);
    Py_CLEAR(st->PoolDestroyedError);
    Py_CLEAR(st->UnsupportedError);
    Py_CLEAR(st->state_members);
    Py_CLEAR(st->CorruptionError);
    Py_CLEAR(st->ExtentType);
    Py_CLEAR(st->FrozenMapBase);
    Py_CLEAR(st->FrozenListBase);
    Py_CLEAR(st->FrozenIterType);
    Py_CLEAR(st->FrozenMapType);
    Py_CLEAR(st->FrozenListType);
    Py_CLEAR(st->MappingABC);
    return 0;
}

static void
module_free(void *module)
{
    module_clear((PyObject *)module);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static PyModuleDef prmem_moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "prmem._core",
    .m_doc = "C core of prmem: syscalls, areas, allocator and write-rare.",
    .m_size = sizeof(prmem_module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    return PyModuleDef_Init(&prmem_moduledef);
}
