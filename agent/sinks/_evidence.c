/* Optional accelerator for the live worker's evidence records (agent/fastlane.py).
 *
 * Why: a reported flow gets a record per reported verdict when it starts and again when it ends; in
 * Python each costs ~2.5 us (two RFC 3339 times, the flow's JSON, the joins), a third of the fast
 * lane's time per flow. Here one call makes all of a flow's records.
 *
 * iso_time(ts) -> str or None: agent.flow.iso_time for 0 <= ts < 253402300799 (the fraction rounded
 *   half to even to the microsecond, left out when zero); None outside (the caller uses Python's).
 * records(out, parts, event, time, entry, packets, nbytes, first, last, proto_json, extra, process[, conn]) -> bool:
 *   appends to the list `out` one record (bytes) per element of `parts`, each
 *     {"time":TIME,"event":EVENT,HEAD MESSAGE TAIL,"flow":FLOW WHERE EXTRA
 *   as fastlane.FastLane._py_records writes it (tests hold the two equal, and both equal to
 *   eventlog.record_body). parts: tuple of (head, mode, rest, tail, where, message_json) with
 *   mode 0: message "destination DST (" + rest; 1: "destination DST " + rest; 2: message_json.
 *   entry: a conntrack.CtEntry (ct_id, proto, src, sport, dst, dport, ...); extra: bytes, or None for
 *   ,"conntrack_id":ID; process: the flow's "process" member's JSON (bytes) or None for none; conn: the
 *   flow's members after last_seen up to its source (a collector's connection: opened_by, the reply
 *   counters, flags, "source":"netflow:SITE"), bytes, or None for "source":"conntrack".
 *   False (nothing appended) when a time is outside iso_time's range.
 * lines(bodies, start, seq, room) -> (data, n): the lines eventlog.EventLog writes for
 *   bodies[start:] (each body, then ,"seq":N} and a newline, N from seq + 1), joined, as many as fit
 *   in `room` octets in all: the Python listing and join cost ~0.9 us a record (tests hold the two
 *   equal).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "_isotime.h"

static PyObject *iso_time(PyObject *self, PyObject *arg) {
    (void)self;
    double ts = PyFloat_AsDouble(arg);
    if (ts == -1.0 && PyErr_Occurred()) return NULL;
    char text[32];
    int n = iso_text(ts, text);
    if (n < 0) Py_RETURN_NONE;
    return PyUnicode_FromStringAndSize(text, n);
}

typedef struct { char *p; } cur_t;

static inline void put(cur_t *c, const char *s, Py_ssize_t n) {
    memcpy(c->p, s, (size_t)n);
    c->p += n;
}
#define PUTS(c, lit) put((c), (lit), (Py_ssize_t)sizeof(lit) - 1)

static int bytes_of(PyObject *o, const char **p, Py_ssize_t *n) {
    if (!PyBytes_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "records: expected bytes");
        return -1;
    }
    *p = PyBytes_AS_STRING(o);
    *n = PyBytes_GET_SIZE(o);
    return 0;
}

static PyObject *records(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 12 && nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "records takes 12 or 13 arguments");
        return NULL;
    }
    PyObject *out = args[0], *parts = args[1], *entry = args[4];
    if (!PyList_Check(out) || !PyTuple_Check(parts) || !PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) < 6) {
        PyErr_SetString(PyExc_TypeError, "records: out list, parts tuple, entry tuple");
        return NULL;
    }
    const char *ev, *tm, *pj, *ex = NULL;
    Py_ssize_t nev, ntm, npj, nex = 0;
    if (bytes_of(args[2], &ev, &nev) || bytes_of(args[3], &tm, &ntm) || bytes_of(args[9], &pj, &npj)) return NULL;
    if (args[10] != Py_None && bytes_of(args[10], &ex, &nex)) return NULL;
    const char *pr = "";
    Py_ssize_t npr = 0;
    if (args[11] != Py_None && bytes_of(args[11], &pr, &npr)) return NULL;
    const char *cn = "\"source\":\"conntrack\"";
    Py_ssize_t ncn = 20;
    if (nargs == 13 && args[12] != Py_None && bytes_of(args[12], &cn, &ncn)) return NULL;
    long long packets = PyLong_AsLongLong(args[5]), nbytes = PyLong_AsLongLong(args[6]);
    double first = PyFloat_AsDouble(args[7]), last = PyFloat_AsDouble(args[8]);
    if (PyErr_Occurred()) return NULL;
    char fs[32], ls[32];
    int nfs = iso_text(first, fs), nls = iso_text(last, ls);
    if (nfs < 0 || nls < 0) Py_RETURN_FALSE;
    PyObject *o_id = PyTuple_GET_ITEM(entry, 0), *o_src = PyTuple_GET_ITEM(entry, 2);
    PyObject *o_dst = PyTuple_GET_ITEM(entry, 4);
    long long ct_id = PyLong_AsLongLong(o_id), sport = PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 3));
    long long dport = PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 5));
    if (PyErr_Occurred()) return NULL;
    Py_ssize_t nsrc, ndst;
    const char *src = PyUnicode_AsUTF8AndSize(o_src, &nsrc), *dst = PyUnicode_AsUTF8AndSize(o_dst, &ndst);
    if (!src || !dst) return NULL;
    /* the flow's JSON, shared by its records */
    char flow[4096];
    int nflow = snprintf(flow, sizeof flow,
                         "{\"proto\":%.*s,\"src\":\"%.*s\",\"sport\":%lld,\"dst\":\"%.*s\",\"dport\":%lld,"
                         "\"packets\":%lld,\"bytes\":%lld,\"first_seen\":\"%.*s\",\"last_seen\":\"%.*s\","
                         "%.*s%s%.*s}",
                         (int)npj, pj, (int)nsrc, src, sport, (int)ndst, dst, dport, packets, nbytes, nfs, fs, nls, ls,
                         (int)ncn, cn, npr ? ",\"process\":" : "", (int)npr, pr);
    if (nflow < 0 || nflow >= (int)sizeof flow) Py_RETURN_FALSE; /* a very long process: Python's twin */
    char idtext[40];
    if (!ex) {
        nex = snprintf(idtext, sizeof idtext, ",\"conntrack_id\":%lld", ct_id);
        ex = idtext;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(parts); k++) {
        PyObject *part = PyTuple_GET_ITEM(parts, k);
        if (!PyTuple_Check(part) || PyTuple_GET_SIZE(part) != 6) {
            PyErr_SetString(PyExc_TypeError, "records: a part is (head, mode, rest, tail, where, message_json)");
            return NULL;
        }
        const char *head, *rest, *tail, *where, *mj;
        Py_ssize_t nhead, nrest, ntail, nwhere, nmj;
        long mode = PyLong_AsLong(PyTuple_GET_ITEM(part, 1));
        if ((mode == -1 && PyErr_Occurred()) || bytes_of(PyTuple_GET_ITEM(part, 0), &head, &nhead) ||
            bytes_of(PyTuple_GET_ITEM(part, 2), &rest, &nrest) || bytes_of(PyTuple_GET_ITEM(part, 3), &tail, &ntail) ||
            bytes_of(PyTuple_GET_ITEM(part, 4), &where, &nwhere) || bytes_of(PyTuple_GET_ITEM(part, 5), &mj, &nmj))
            return NULL;
        Py_ssize_t nmsg = mode == 2 ? nmj : 1 + 12 + ndst + (mode == 0 ? 2 : 1) + nrest + 1;
        Py_ssize_t total = 8 + ntm + nev + nhead + nmsg + ntail + 8 + nflow + nwhere + nex;
        PyObject *rec = PyBytes_FromStringAndSize(NULL, total);
        if (!rec) return NULL;
        cur_t c = {PyBytes_AS_STRING(rec)};
        PUTS(&c, "{\"time\":");
        put(&c, tm, ntm);
        put(&c, ev, nev);
        put(&c, head, nhead);
        if (mode == 2) {
            put(&c, mj, nmj);
        } else {
            PUTS(&c, "\"destination ");
            put(&c, dst, ndst);
            if (mode == 0) PUTS(&c, " (");
            else PUTS(&c, " ");
            put(&c, rest, nrest);
            PUTS(&c, "\"");
        }
        put(&c, tail, ntail);
        PUTS(&c, ",\"flow\":");
        put(&c, flow, nflow);
        put(&c, where, nwhere);
        put(&c, ex, nex);
        int err = PyList_Append(out, rec);
        Py_DECREF(rec);
        if (err) return NULL;
    }
    Py_RETURN_TRUE;
}

static PyObject *lines(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    Py_ssize_t start, room;
    long long seq;
    if (nargs != 4 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "lines(bodies: list, start, seq, room)");
        return NULL;
    }
    start = PyLong_AsSsize_t(args[1]);
    seq = PyLong_AsLongLong(args[2]);
    room = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred()) return NULL;
    PyObject *bodies = args[0];
    Py_ssize_t n = PyList_GET_SIZE(bodies), used = 0, fit = 0;
    char num[32];
    for (Py_ssize_t i = start < 0 ? n : start; i < n; i++) {
        PyObject *b = PyList_GET_ITEM(bodies, i);
        if (!PyBytes_Check(b)) {
            PyErr_SetString(PyExc_TypeError, "lines: a body is not bytes");
            return NULL;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(b) + snprintf(num, sizeof num, ",\"seq\":%lld}\n", seq + 1 + fit);
        if (used + len > room) break;
        used += len;
        fit++;
    }
    PyObject *data = PyBytes_FromStringAndSize(NULL, used);
    if (!data) return NULL;
    char *o = PyBytes_AS_STRING(data);
    for (Py_ssize_t k = 0; k < fit; k++) {
        PyObject *b = PyList_GET_ITEM(bodies, start + k);
        memcpy(o, PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
        o += PyBytes_GET_SIZE(b);
        int m = snprintf(num, sizeof num, ",\"seq\":%lld}\n", seq + 1 + k);
        memcpy(o, num, (size_t)m);
        o += m;
    }
    return Py_BuildValue("(Nn)", data, fit);
}

static PyMethodDef methods[] = {
    {"iso_time", iso_time, METH_O, "agent.flow.iso_time in C, or None outside its range (see the module comment)."},
    {"records", (PyCFunction)(void (*)(void))records, METH_FASTCALL, "A flow's evidence records (see above)."},
    {"lines", (PyCFunction)(void (*)(void))lines, METH_FASTCALL, "Evidence lines, numbered and joined (see above)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_evidence", NULL, -1, methods};

PyMODINIT_FUNC PyInit__evidence(void) { return PyModule_Create(&module); }
