/* Optional compiled hot loop of the receiving client: ClientCore._scan_relays in C.
 *
 * It does exactly what the pure-Python loop in protocol.py does, frame for frame, and stops
 * where that one stops (a frame of another kind, an unknown head, a partial frame), so the
 * parser path takes the rest as before. Values are still built by each trame's own
 * unpack_from (struct, bounds checks, the registered class): only the framing, the head
 * lookup and the Message tuple are done here. Set TRAME_ASYNC_PURE_PYTHON=1 to run without it.
 *
 * RELAY:       length u32 BE | kind u8 | sender u32 BE | code[3] fmt_len u8 fmt | value
 * GROUP_RELAY: length u32 BE | kind u8 | sender u32 BE | group u32 BE | code[3] fmt_len u8 fmt | value
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* The kind bytes of RELAY and GROUP_RELAY, from the Kind members given to setup(). */
static long relay_byte = -1;
static long group_relay_byte = -1;

static PyObject *message_type;     /* trame_async.codec.Message */
static PyObject *kind_relay;       /* Kind.RELAY */
static PyObject *kind_group_relay; /* Kind.GROUP_RELAY */
static PyObject *bad_value;        /* BadValueError */
static PyObject *str_unpack_from;
static PyObject *str_plan;
static PyObject *str_refuse;
static PyObject *str_size;

static inline uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Message(sender, trame, value, kind, group) as tuple.__new__ builds it (no Python __new__). */
static PyObject *
new_message(PyObject *sender, PyObject *trame, PyObject *value, PyObject *kind, PyObject *group,
            int plain)
{
    PyTypeObject *type = (PyTypeObject *)message_type;
    PyObject *msg = type->tp_alloc(type, 5);
    if (msg == NULL) {
        return NULL;
    }
    PyTuple_SET_ITEM(msg, 0, Py_NewRef(sender));
    PyTuple_SET_ITEM(msg, 1, Py_NewRef(trame));
    PyTuple_SET_ITEM(msg, 2, Py_NewRef(value));
    PyTuple_SET_ITEM(msg, 3, Py_NewRef(kind));
    PyTuple_SET_ITEM(msg, 4, Py_NewRef(group));
    if (plain || PyLong_CheckExact(value) || PyFloat_CheckExact(value) || PyBool_Check(value) ||
        PyBytes_CheckExact(value) || PyUnicode_CheckExact(value)) {
        /* Nothing in it can lead back to it: its value is plain data (never a container that
         * could take a reference later, as an untracked dict can), and a cycle through its trame
         * or kind would go through the registry, which keeps them alive anyway. Left out of the
         * collector's young generation, a flood of queued messages costs it nothing. */
        PyObject_GC_UnTrack(msg);
    }
    return msg;
}

/* The trame whose head is buf[start:stop] if its fixed size is stop_frame - stop; else NULL
 * with no error set (the caller stops there). Returns a borrowed reference. */
static PyObject *
lookup(PyObject *known, const char *buf, Py_ssize_t start, Py_ssize_t stop,
       Py_ssize_t value_size, int *failed)
{
    PyObject *head = PyBytes_FromStringAndSize(buf + start, stop - start);
    if (head == NULL) {
        *failed = 1;
        return NULL;
    }
    PyObject *trame = PyDict_GetItemWithError(known, head);
    Py_DECREF(head);
    if (trame == NULL) {
        if (PyErr_Occurred()) {
            *failed = 1;
        }
        return NULL;
    }
    PyObject *size = PyObject_GetAttr(trame, str_size);
    if (size == NULL) {
        *failed = 1;
        return NULL;
    }
    int same = PyLong_CheckExact(size) && PyLong_AsSsize_t(size) == value_size;
    Py_DECREF(size);
    if (PyErr_Occurred()) {
        *failed = 1;
        return NULL;
    }
    return same ? trame : NULL;
}

/* The value at buf[at:]: 0 with *value set (2: built from the struct's items alone, plain data),
 * 1 when the trame's class refused it (core._refuse() called, the frame dropped), -1 on any other
 * error. */
static int
unpack_value(PyObject *trame, PyObject *data, Py_ssize_t at, PyObject *sender, PyObject *core,
             PyObject **value)
{
    PyObject *plan = PyObject_GetAttr(trame, str_plan);
    if (plan == NULL) {
        return -1;
    }
    if (PyTuple_CheckExact(plan) && PyTuple_GET_SIZE(plan) == 3) {
        /* The value is the struct's items as they are (Trame._compile_unpack says so): what its
         * unpack_from does, without its Python frame. None of these can refuse a value. */
        PyObject *offset = PyLong_FromSsize_t(at);
        if (offset == NULL) {
            Py_DECREF(plan);
            return -1;
        }
        PyObject *args[2] = {data, offset};
        PyObject *items = PyObject_Vectorcall(PyTuple_GET_ITEM(plan, 0), args, 2, NULL);
        Py_DECREF(offset);
        if (items == NULL || !PyTuple_CheckExact(items)) {
            Py_DECREF(plan);
            if (items != NULL) {
                Py_DECREF(items);
                PyErr_SetString(PyExc_TypeError, "a struct's unpack_from returned no tuple");
            }
            return -1;
        }
        PyObject *cls = PyTuple_GET_ITEM(plan, 1);
        Py_ssize_t n = PyTuple_GET_SIZE(items);
        if (cls != Py_None) {
            /* tuple.__new__(cls, items) */
            PyTypeObject *type = (PyTypeObject *)cls;
            PyObject *built = type->tp_alloc(type, n);
            if (built != NULL) {
                for (Py_ssize_t i = 0; i < n; i++) {
                    PyTuple_SET_ITEM(built, i, Py_NewRef(PyTuple_GET_ITEM(items, i)));
                }
                /* A struct's items are ints, floats, bytes and bools: no cycle can go through
                 * this tuple, as the collector itself concludes of an exact tuple of them. */
                PyObject_GC_UnTrack(built);
            }
            Py_DECREF(items);
            *value = built;
        }
        else if (PyLong_AsLong(PyTuple_GET_ITEM(plan, 2)) == 1 && n == 1) {
            *value = Py_NewRef(PyTuple_GET_ITEM(items, 0));
            Py_DECREF(items);
        }
        else {
            PyObject_GC_UnTrack(items); /* what the collector would do at its first pass */
            *value = items;
        }
        Py_DECREF(plan);
        return *value == NULL ? -1 : 2;
    }
    Py_DECREF(plan);
    PyObject *unpack = PyObject_GetAttr(trame, str_unpack_from);
    if (unpack == NULL) {
        return -1;
    }
    PyObject *offset = PyLong_FromSsize_t(at);
    if (offset == NULL) {
        Py_DECREF(unpack);
        return -1;
    }
    PyObject *args[2] = {data, offset};
    *value = PyObject_Vectorcall(unpack, args, 2, NULL);
    Py_DECREF(offset);
    Py_DECREF(unpack);
    if (*value != NULL) {
        return 0;
    }
    if (!PyErr_ExceptionMatches(bad_value)) {
        return -1;
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
#else
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (exc != NULL && tb != NULL) {
        PyException_SetTraceback(exc, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    if (exc == NULL) {
        return -1;
    }
#endif
    PyObject *result = PyObject_CallMethodObjArgs(core, str_refuse, sender, exc, NULL);
    Py_DECREF(exc);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 1;
}

/* scan_relays(data, pos, known, limit, out, group_names, core) -> pos */
static PyObject *
scan_relays(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "scan_relays() takes 7 arguments");
        return NULL;
    }
    PyObject *data = args[0];
    PyObject *known = args[2];
    PyObject *out = args[4];
    PyObject *group_names = args[5];
    PyObject *core = args[6]; /* the ClientCore: its _refuse() takes a refused value */
    if (message_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "scan_relays() before setup()");
        return NULL;
    }
    if (!PyBytes_CheckExact(data) || !PyDict_CheckExact(known) || !PyList_CheckExact(out) ||
        !PyDict_CheckExact(group_names)) {
        PyErr_SetString(PyExc_TypeError, "scan_relays(bytes, int, dict, int, list, dict, core)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[3]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t end = PyBytes_GET_SIZE(data);
    if (pos < 0) {
        pos = end;
    }
    int failed = 0;
    while (end - pos > 13) {
        Py_ssize_t length = (Py_ssize_t)be32(buf + pos);
        unsigned char kind = buf[pos + 4];
        Py_ssize_t stop = pos + 4 + length;
        if (stop > end || length > limit) {
            break;
        }
        PyObject *group = Py_None;
        PyObject *kind_obj = kind_relay;
        Py_ssize_t head_at = pos + 9;
        if (kind != relay_byte) {
            if (kind != group_relay_byte || length < 13) {
                break;
            }
            PyObject *group_id = PyLong_FromUnsignedLong(be32(buf + pos + 9));
            if (group_id == NULL) {
                return NULL;
            }
            group = PyDict_GetItemWithError(group_names, group_id);
            Py_DECREF(group_id);
            if (group == NULL) {
                if (PyErr_Occurred()) {
                    return NULL;
                }
                break; /* not (or no longer) ours: the parser path counts it */
            }
            kind_obj = kind_group_relay;
            head_at = pos + 13;
        }
        Py_ssize_t value_at = head_at + 4 + buf[head_at + 3];
        if (value_at > stop) {
            break;
        }
        PyObject *trame = lookup(known, (const char *)buf, head_at, value_at, stop - value_at,
                                 &failed);
        if (trame == NULL) {
            if (failed) {
                return NULL;
            }
            break;
        }
        Py_INCREF(trame);
        Py_INCREF(group); /* both may go if the value's class changes the registry or groups */
        PyObject *sender = PyLong_FromUnsignedLong(be32(buf + pos + 5));
        if (sender == NULL) {
            Py_DECREF(trame);
            Py_DECREF(group);
            return NULL;
        }
        PyObject *value = NULL;
        int status = unpack_value(trame, data, value_at, sender, core, &value);
        if (status == 0 || status == 2) {
            PyObject *msg = new_message(sender, trame, value, kind_obj, group, status == 2);
            Py_DECREF(value);
            if (msg == NULL || PyList_Append(out, msg) < 0) {
                status = -1;
            }
            Py_XDECREF(msg);
        }
        Py_DECREF(sender);
        Py_DECREF(trame);
        Py_DECREF(group);
        if (status < 0) {
            return NULL;
        }
        pos = stop;
    }
    return PyLong_FromSsize_t(pos);
}

/* setup(Message, Kind.RELAY, Kind.GROUP_RELAY, BadValueError): the objects the loop builds with. */
static PyObject *
setup(PyObject *module, PyObject *args)
{
    PyObject *msg, *relay, *group_relay, *bad;
    if (!PyArg_ParseTuple(args, "O!OOO:setup", &PyType_Type, &msg, &relay, &group_relay, &bad)) {
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)msg, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "Message must be a tuple subclass");
        return NULL;
    }
    long relay_value = PyLong_AsLong(relay);
    long group_relay_value = PyLong_AsLong(group_relay);
    if (PyErr_Occurred()) {
        return NULL;
    }
    relay_byte = relay_value;
    group_relay_byte = group_relay_value;
    Py_XSETREF(message_type, Py_NewRef(msg));
    Py_XSETREF(kind_relay, Py_NewRef(relay));
    Py_XSETREF(kind_group_relay, Py_NewRef(group_relay));
    Py_XSETREF(bad_value, Py_NewRef(bad));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"scan_relays", (PyCFunction)(void (*)(void))scan_relays, METH_FASTCALL,
     "Decode the RELAY and GROUP_RELAY frames of known fixed-size trames from data[pos:]."},
    {"setup", setup, METH_VARARGS, "Give the module the types it builds messages with."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "trame_async._speedups",
    "Optional compiled hot loop of the receiving client (see protocol.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    str_unpack_from = PyUnicode_InternFromString("unpack_from");
    str_size = PyUnicode_InternFromString("size");
    str_plan = PyUnicode_InternFromString("_plan");
    str_refuse = PyUnicode_InternFromString("_refuse");
    if (str_unpack_from == NULL || str_size == NULL || str_plan == NULL || str_refuse == NULL) {
        return NULL;
    }
    return PyModule_Create(&module_def);
}
