/* Optional accelerator for the flow collector: the records of one fixed-length NetFlow v9 / IPFIX
 * data set, decoded by a plan decode.py made from the set's template.
 *
 * Why by hand: a profile of bench/bench_collector.py put half of the collector thread's time in
 * decode.py's per-record work (one struct unpack, a dict per record, a lookup per field, two
 * inet_ntop calls and a NamedTuple). Here a record costs its two address texts and the Record.
 * Only the common shape comes here (a flow template, not options; fixed length; an address pair of
 * standard length; numeric fields of 1 to 8 octets; a start time); decode.py keeps everything else,
 * and tests/sources/test_netflow.py holds this equal to its struct and field-loop paths on
 * generated templates and bodies, tests/fuzz/test_sanitizer.py under ASan/UBSan.
 *
 * records(body, size, spec, Record, exporter, rate, mode, export_time, uptime32) -> list of Record
 *   spec: NSLOT (offset, length) pairs, flattened, offset -1 where the template lacks the field
 *         (slots below); start and end carry their unit in `units` (0 ms, 1 s, 2 NTP).
 *   rate: the sampling interval (an int, kept as Record.sampled) or None (scale 1).
 *   mode: 0 the start slot is an absolute time; 1 first_up/last_up are sysUptime milliseconds,
 *         made absolute with export_time at uptime32 (as decode._uptime_time).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <string.h>

#include "../_addrtext.h"

enum { S_SRC, S_DST, S_PROTO, S_SPORT, S_DPORT, S_PACKETS, S_BYTES, S_FLAGS, S_DIRECTION, S_IN_IF, S_OUT_IF,
       S_RPACKETS, S_RBYTES, S_RFLAGS, S_START, S_END, S_FIRST_UP, S_LAST_UP, NSLOT };
#define NTP_EPOCH 2208988800LL
#define NFIELDS 18 /* decode.Record's fields */

static inline uint64_t be_uint(const uint8_t *p, Py_ssize_t n) {
    uint64_t v = 0;
    for (Py_ssize_t i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* A slot's value (0 when absent: the caller checks presence where absence means something else). */
static inline uint64_t get(const uint8_t *rec, const long *off, const long *len, int slot) {
    return off[slot] < 0 ? 0 : be_uint(rec + off[slot], len[slot]);
}

static inline double abs_time(const uint8_t *rec, long off, long len, int unit) {
    if (unit == 2) { /* NTP: seconds since 1900, then a binary fraction */
        uint64_t hi = be_uint(rec + off, 4), lo = be_uint(rec + off + 4, 4);
        return (double)((int64_t)hi - NTP_EPOCH) + (double)lo / 4294967296.0;
    }
    double v = (double)be_uint(rec + off, len);
    return unit == 0 ? v * 1e-3 : v * 1.0;
}

static inline double up_time(double now, uint32_t uptime, uint64_t at) {
    uint32_t d = (uint32_t)at - uptime;
    int64_t delta = d >= 0x80000000u ? (int64_t)d - 0x100000000LL : (int64_t)d;
    return now + (double)delta / 1000.0;
}

/* v * scale as a Python int (exact past 64 bits, as Python's own product). */
static PyObject *scaled(uint64_t v, uint64_t scale) {
    uint64_t r;
    if (!__builtin_mul_overflow(v, scale, &r)) return PyLong_FromUnsignedLongLong(r);
    PyObject *a = PyLong_FromUnsignedLongLong(v), *b = PyLong_FromUnsignedLongLong(scale), *p = NULL;
    if (a && b) p = PyNumber_Multiply(a, b);
    Py_XDECREF(a);
    Py_XDECREF(b);
    return p;
}

static PyObject *opt_uint(const uint8_t *rec, const long *off, const long *len, int slot) {
    if (off[slot] < 0) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(be_uint(rec + off[slot], len[slot]));
}

static PyObject *addr(const uint8_t *p, long n) {
    char buf[INET6_ADDRSTRLEN + 8];
    int k = fmt_addr(p, n, buf);
    if (k < 0) {
        PyErr_SetString(PyExc_ValueError, "address");
        return NULL;
    }
    return PyUnicode_FromStringAndSize(buf, k);
}

static PyObject *records(PyObject *self, PyObject *args) {
    Py_buffer body;
    Py_ssize_t size;
    PyObject *spec, *units, *rtype, *exp, *rate;
    int mode;
    double now;
    unsigned long long up_arg;
    if (!PyArg_ParseTuple(args, "y*nO!O!O!UOidK", &body, &size, &PyTuple_Type, &spec, &PyTuple_Type, &units,
                          &PyType_Type, &rtype, &exp, &rate, &mode, &now, &up_arg))
        return NULL;
    PyObject *out = NULL;
    long off[NSLOT], len[NSLOT];
    int unit_start, unit_end;
    uint64_t scale = 1;
    PyTypeObject *T = (PyTypeObject *)rtype;
    if (PyTuple_GET_SIZE(spec) != 2 * NSLOT || PyTuple_GET_SIZE(units) != 2 || size <= 0 ||
        !PyType_IsSubtype(T, &PyTuple_Type)) {
        PyErr_SetString(PyExc_ValueError, "records: bad plan");
        goto done;
    }
    for (int i = 0; i < NSLOT; i++) {
        off[i] = PyLong_AsLong(PyTuple_GET_ITEM(spec, 2 * i));
        len[i] = PyLong_AsLong(PyTuple_GET_ITEM(spec, 2 * i + 1));
        if (PyErr_Occurred()) goto done;
        /* The plan's promises, checked: every field inside the record, numbers of 1 to 8 octets. */
        if (off[i] >= 0 && (len[i] < 1 || off[i] + len[i] > size || (i > S_DST && len[i] > 8))) {
            PyErr_SetString(PyExc_ValueError, "records: a field outside its record");
            goto done;
        }
    }
    unit_start = (int)PyLong_AsLong(PyTuple_GET_ITEM(units, 0));
    unit_end = (int)PyLong_AsLong(PyTuple_GET_ITEM(units, 1));
    if (PyErr_Occurred()) goto done;
    if (off[S_SRC] < 0 || off[S_DST] < 0 || len[S_SRC] != len[S_DST] || (len[S_SRC] != 4 && len[S_SRC] != 16) ||
        (mode == 0 && off[S_START] < 0) || (mode == 1 && off[S_FIRST_UP] < 0) || (mode != 0 && mode != 1) ||
        (unit_start == 2 && off[S_START] >= 0 && len[S_START] != 8) ||
        (unit_end == 2 && off[S_END] >= 0 && len[S_END] != 8)) {
        PyErr_SetString(PyExc_ValueError, "records: bad plan");
        goto done;
    }
    if (rate != Py_None) {
        scale = PyLong_AsUnsignedLongLong(rate);
        if (PyErr_Occurred()) goto done;
    }
    Py_ssize_t n = body.len / size;
    out = PyList_New(n);
    if (!out) goto done;
    const int biflow = off[S_RPACKETS] >= 0 || off[S_RBYTES] >= 0;
    const uint32_t up32 = (uint32_t)up_arg;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *rec = (const uint8_t *)body.buf + i * size;
        uint64_t proto = get(rec, off, len, S_PROTO), sport = get(rec, off, len, S_SPORT),
                 dport = get(rec, off, len, S_DPORT);
        if (proto == 1 || proto == 58) sport = dport = 0; /* ICMP keys carry no ports, as in captures */
        uint64_t packets = off[S_PACKETS] >= 0 ? get(rec, off, len, S_PACKETS) : 1;
        double first, last;
        if (mode == 0) {
            first = abs_time(rec, off[S_START], len[S_START], unit_start);
            last = off[S_END] >= 0 ? abs_time(rec, off[S_END], len[S_END], unit_end) : first;
        } else {
            first = up_time(now, up32, get(rec, off, len, S_FIRST_UP));
            last = off[S_LAST_UP] >= 0 ? up_time(now, up32, get(rec, off, len, S_LAST_UP)) : first;
        }
        PyObject *r = T->tp_alloc(T, NFIELDS);
        if (!r) goto fail;
        PyList_SET_ITEM(out, i, r);
        PyObject *v[NFIELDS];
        v[0] = PyLong_FromUnsignedLongLong(proto);
        v[1] = addr(rec + off[S_SRC], len[S_SRC]);
        v[2] = PyLong_FromUnsignedLongLong(sport);
        v[3] = addr(rec + off[S_DST], len[S_DST]);
        v[4] = PyLong_FromUnsignedLongLong(dport);
        v[5] = scaled(packets, scale);
        v[6] = scaled(get(rec, off, len, S_BYTES), scale);
        v[7] = PyFloat_FromDouble(first);
        v[8] = PyFloat_FromDouble(last);
        v[9] = PyLong_FromUnsignedLongLong(get(rec, off, len, S_FLAGS) & 0xFF);
        Py_INCREF(exp);
        v[10] = exp;
        Py_INCREF(rate);
        v[11] = rate;
        v[12] = opt_uint(rec, off, len, S_DIRECTION);
        v[13] = opt_uint(rec, off, len, S_IN_IF);
        v[14] = opt_uint(rec, off, len, S_OUT_IF);
        if (biflow) {
            v[15] = scaled(get(rec, off, len, S_RPACKETS), scale);
            v[16] = scaled(get(rec, off, len, S_RBYTES), scale);
        } else {
            Py_INCREF(Py_None);
            Py_INCREF(Py_None);
            v[15] = v[16] = Py_None;
        }
        v[17] = PyLong_FromUnsignedLongLong(get(rec, off, len, S_RFLAGS) & 0xFF);
        int bad = 0;
        for (int k = 0; k < NFIELDS; k++) {
            if (!v[k]) bad = 1;
            PyTuple_SET_ITEM(r, k, v[k]); /* a NULL item is safe to free */
        }
        if (bad) goto fail;
        PyObject_GC_UnTrack(r); /* numbers, texts and None only: never in a cycle (CPython would untrack
                                   it at the collector's first look; done now, young collections skip it) */
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    PyBuffer_Release(&body);
    return out;
}

static PyMethodDef methods[] = {
    {"records", records, METH_VARARGS, "The records of one fixed-length data set, by a plan (see the module doc)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_nfdata", NULL, -1, methods};

PyMODINIT_FUNC PyInit__nfdata(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "NSLOT", NSLOT) < 0) Py_CLEAR(m);
    return m;
}
