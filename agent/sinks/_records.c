/* Optional accelerator for the audit report's bulk records: each record's JSON text, made in C.
 *
 * Why: a flow-heavy capture reports ~80,000 violations; their JSON, one f-string of ~35 parts per
 * record in Python (agent/sinks/records.py, RecordBlock.json), cost as much as the capture walk
 * (about 1 s of a 3 s audit, bench/bench_audit.py). Here the same parts are copied into one buffer.
 *
 * json(select, pairs, forms, cols, noun, as_bytes=False, joined=False, raw_dst=False) -> list of str (UTF-8 bytes with
 * as_bytes), one per selected record, equal character for character to RecordBlock.json's Python loop
 * (tests/test_report_records.py holds them equal); with joined, one bytes: the records joined by
 * commas, made in one buffer (a report's 20,000-record chunk without 20,000 objects and a join); with
 * raw_dst, cols' dst_j holds the addresses themselves (plain text: _quoted's common case), quoted here:
 *   select: list of record positions (into pairs), or None for every record in order;
 *   pairs:  list of (row, group, entry) tuples;
 *   forms:  dict id(entry) -> (head, mode, rest, mid, where, tail) as RecordBlock._prep makes it;
 *   cols:   tuple of per-row lists (src_j, sport, dst_j, dport, proto_j, pk, by, pkr, byr, ob_j, fs, ls,
 *           pr_j, host_j, hsrc_j, pre_j): JSON texts (str) or ints; fs and ls may instead be
 *           (whole, us) int64 buffers (see tcol_t);
 *   noun:   the peer noun's JSON body ("destination ").
 * Any value of another type raises TypeError; the caller then uses the Python loop.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "_isotime.h"

typedef struct { char *p; Py_ssize_t n, cap; } buf_t;

static int put(buf_t *b, const char *s, Py_ssize_t n) {
    if (b->n + n > b->cap) {
        Py_ssize_t cap = b->cap ? b->cap : 1024;
        while (cap < b->n + n) cap *= 2;
        char *q = PyMem_Realloc(b->p, cap);
        if (!q) { PyErr_NoMemory(); return -1; }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    return 0;
}

#define LIT(b, s) put(b, s, (Py_ssize_t)(sizeof(s) - 1))

/* A str's UTF-8, optionally without its first and last character (a JSON string's quotes). */
static int put_str(buf_t *b, PyObject *o, int strip) {
    if (!PyUnicode_Check(o)) { PyErr_SetString(PyExc_TypeError, "records: a text part is not a str"); return -1; }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(o, &n);
    if (!s) return -1;
    if (strip) {
        if (n < 2) { PyErr_SetString(PyExc_ValueError, "records: a quoted part is too short"); return -1; }
        return put(b, s + 1, n - 2);
    }
    return put(b, s, n);
}

static int put_int(buf_t *b, PyObject *o) {
    if (!PyLong_CheckExact(o)) { PyErr_SetString(PyExc_TypeError, "records: a count is not an int"); return -1; }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "records: a count beyond 64 bits");
        return -1;
    }
    char tmp[24], *e = tmp + sizeof tmp, *q = e;  /* by hand: snprintf was a third of the writer's time */
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do { *--q = (char)('0' + u % 10); u /= 10; } while (u);
    if (v < 0) *--q = '-';
    return put(b, q, e - q);
}

enum { C_SRC, C_SPORT, C_DST, C_DPORT, C_PROTO, C_PK, C_BY, C_PKR, C_BYR, C_OB, C_FS, C_LS, C_PR, C_HOST, C_HSRC,
       C_PRE, NCOLS };

/* A time column (first_seen, last_seen): a list of texts, or (whole, us) int64 buffers (`iso_parts`,
 * RecordBlock's IsoColumn), written here as iso_texts writes them: no text per row is ever made. */
typedef struct { PyObject *list; Py_buffer w, u; int parts; Py_ssize_t n; } tcol_t;

static int tcol_open(tcol_t *t, PyObject *o) {
    memset(t, 0, sizeof *t);
    if (PyList_Check(o)) { t->list = o; t->n = PyList_GET_SIZE(o); return 0; }
    if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != 2) {
        PyErr_SetString(PyExc_TypeError, "cols: a time column is a list or (whole, us)");
        return -1;
    }
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(o, 0), &t->w, PyBUF_SIMPLE) < 0) return -1;
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(o, 1), &t->u, PyBUF_SIMPLE) < 0) { PyBuffer_Release(&t->w); return -1; }
    t->parts = 1;
    if (t->w.len != t->u.len || t->w.len % 8) {
        PyErr_SetString(PyExc_TypeError, "cols: (whole, us) are int64 buffers of one length");
        return -1;  /* the caller releases */
    }
    t->n = t->w.len / 8;
    return 0;
}

static void tcol_close(tcol_t *t) {
    if (t->parts) { PyBuffer_Release(&t->w); PyBuffer_Release(&t->u); t->parts = 0; }
}

static int put_time(buf_t *b, tcol_t *t, Py_ssize_t i) {
    if (!t->parts) return put_str(b, PyList_GET_ITEM(t->list, i), 0);
    int64_t w = ((const int64_t *)t->w.buf)[i], u = ((const int64_t *)t->u.buf)[i];
    if (w < 0 || w > (int64_t)MAX_TS || u < 0 || u >= 1000000) {
        PyErr_SetString(PyExc_ValueError, "records: a time outside 0..9999-12-31");
        return -1;
    }
    char text[32];
    return put(b, text, iso_parts_text(w, u, text));
}

static PyObject *records_json(PyObject *self, PyObject *args) {
    PyObject *select, *pairs, *forms, *cols, *noun;
    int as_bytes = 0, joined = 0, raw_dst = 0;
    if (!PyArg_ParseTuple(args, "OO!O!O!U|ppp", &select, &PyList_Type, &pairs, &PyDict_Type, &forms, &PyTuple_Type,
                          &cols, &noun, &as_bytes, &joined, &raw_dst))
        return NULL;
    if (select != Py_None && !PyList_Check(select)) { PyErr_SetString(PyExc_TypeError, "select: a list or None"); return NULL; }
    if (PyTuple_GET_SIZE(cols) != NCOLS) { PyErr_SetString(PyExc_TypeError, "cols: 16 lists"); return NULL; }
    PyObject *col[NCOLS];
    tcol_t fs, ls;
    for (int c = 0; c < NCOLS; c++) {
        col[c] = PyTuple_GET_ITEM(cols, c);
        if (c != C_FS && c != C_LS && !PyList_Check(col[c])) {
            PyErr_SetString(PyExc_TypeError, "cols: 16 lists");
            return NULL;
        }
    }
    if (tcol_open(&fs, col[C_FS]) < 0) { tcol_close(&fs); return NULL; }
    if (tcol_open(&ls, col[C_LS]) < 0) { tcol_close(&fs); tcol_close(&ls); return NULL; }
    Py_ssize_t npairs = PyList_GET_SIZE(pairs);
    Py_ssize_t count = select == Py_None ? npairs : PyList_GET_SIZE(select);
    PyObject *out = joined ? NULL : PyList_New(count);
    if (!out && !joined) { tcol_close(&fs); tcol_close(&ls); return NULL; }
    buf_t b = {NULL, 0, 0};
    PyObject *last_entry = NULL, *form = NULL;
    for (Py_ssize_t k = 0; k < count; k++) {
        Py_ssize_t pos = k;
        if (select != Py_None) {
            pos = PyLong_AsSsize_t(PyList_GET_ITEM(select, k));
            if (pos == -1 && PyErr_Occurred()) goto fail;
        }
        if (pos < 0 || pos >= npairs) { PyErr_SetString(PyExc_IndexError, "records: position out of range"); goto fail; }
        PyObject *pair = PyList_GET_ITEM(pairs, pos);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 3) { PyErr_SetString(PyExc_TypeError, "pairs: (row, group, entry)"); goto fail; }
        Py_ssize_t i = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 0));
        if (i == -1 && PyErr_Occurred()) goto fail;
        for (int c = 0; c < NCOLS; c++) {
            Py_ssize_t len = c == C_FS ? fs.n : c == C_LS ? ls.n : PyList_GET_SIZE(col[c]);
            if (i < 0 || i >= len) { PyErr_SetString(PyExc_IndexError, "records: row out of range"); goto fail; }
        }
        PyObject *entry = PyTuple_GET_ITEM(pair, 2);
        if (entry != last_entry) {  /* consecutive records mostly share their entry (group, verdict) */
            PyObject *key = PyLong_FromVoidPtr(entry);
            if (!key) goto fail;
            form = PyDict_GetItemWithError(forms, key);
            Py_DECREF(key);
            if (!form) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyError, "records: entry without a form"); goto fail; }
            if (!PyTuple_Check(form) || PyTuple_GET_SIZE(form) != 6) { PyErr_SetString(PyExc_TypeError, "forms: 6-tuples"); goto fail; }
            last_entry = entry;
        }
#define COL(c) PyList_GET_ITEM(col[c], i)
        if (!joined)
            b.n = 0;
        else if (k && LIT(&b, ",") < 0)
            goto fail;
        long mode = PyLong_AsLong(PyTuple_GET_ITEM(form, 1));
        if (mode == -1 && PyErr_Occurred()) goto fail;
        PyObject *rest = PyTuple_GET_ITEM(form, 2);
        if (put_str(&b, PyTuple_GET_ITEM(form, 0), 0) < 0) goto fail;
        if (mode == 0) {
            if (put_str(&b, COL(C_PRE), 1) < 0 || put_str(&b, rest, 0) < 0) goto fail;
        } else if (mode == 1) {
            if (put_str(&b, noun, 0) < 0 || put_str(&b, COL(C_DST), !raw_dst) < 0 || LIT(&b, " ") < 0 ||
                put_str(&b, rest, 0) < 0) goto fail;
        } else if (put_str(&b, rest, 0) < 0) {
            goto fail;
        }
        if (put_str(&b, PyTuple_GET_ITEM(form, 3), 0) < 0 || put_str(&b, COL(C_SRC), 0) < 0 ||
            LIT(&b, ",\"sport\":") < 0 || put_int(&b, COL(C_SPORT)) < 0 ||
            LIT(&b, ",\"dst\":") < 0 || (raw_dst && LIT(&b, "\"") < 0) || put_str(&b, COL(C_DST), 0) < 0 ||
            (raw_dst && LIT(&b, "\"") < 0) ||
            LIT(&b, ",\"dst_port\":") < 0 || put_int(&b, COL(C_DPORT)) < 0 ||
            LIT(&b, ",\"dport\":") < 0 || put_int(&b, COL(C_DPORT)) < 0 ||
            LIT(&b, ",\"proto\":") < 0 || put_str(&b, COL(C_PROTO), 0) < 0 || LIT(&b, ",") < 0 ||
            put_str(&b, PyTuple_GET_ITEM(form, 4), 0) < 0 ||
            LIT(&b, "\"packets\":") < 0 || put_int(&b, COL(C_PK)) < 0 ||
            LIT(&b, ",\"bytes\":") < 0 || put_int(&b, COL(C_BY)) < 0 ||
            LIT(&b, ",\"packets_sent\":") < 0 || put_int(&b, COL(C_PK)) < 0 ||
            LIT(&b, ",\"bytes_sent\":") < 0 || put_int(&b, COL(C_BY)) < 0 ||
            LIT(&b, ",\"packets_received\":") < 0 || put_int(&b, COL(C_PKR)) < 0 ||
            LIT(&b, ",\"bytes_received\":") < 0 || put_int(&b, COL(C_BYR)) < 0 ||
            LIT(&b, ",\"opened_by\":") < 0 || put_str(&b, COL(C_OB), 0) < 0 ||
            LIT(&b, ",\"first_seen\":\"") < 0 || put_time(&b, &fs, i) < 0 ||
            LIT(&b, "\",\"last_seen\":\"") < 0 || put_time(&b, &ls, i) < 0 ||
            LIT(&b, "\",\"process\":") < 0 || put_str(&b, COL(C_PR), 0) < 0 ||
            LIT(&b, ",\"hostname\":") < 0 || put_str(&b, COL(C_HOST), 0) < 0 ||
            LIT(&b, ",\"hostname_source\":") < 0 || put_str(&b, COL(C_HSRC), 0) < 0 || LIT(&b, ",") < 0 ||
            put_str(&b, PyTuple_GET_ITEM(form, 5), 0) < 0)
            goto fail;
#undef COL
        if (joined) continue;
        PyObject *s = as_bytes ? PyBytes_FromStringAndSize(b.p, b.n) : PyUnicode_DecodeUTF8(b.p, b.n, "strict");
        if (!s) goto fail;
        PyList_SET_ITEM(out, k, s);
    }
    if (joined) out = PyBytes_FromStringAndSize(b.p ? b.p : "", b.n);
    PyMem_Free(b.p);
    tcol_close(&fs);
    tcol_close(&ls);
    return out;
fail:
    PyMem_Free(b.p);
    tcol_close(&fs);
    tcol_close(&ls);
    Py_XDECREF(out);
    return NULL;
}

/* iso_texts(whole, us) -> list of str: agent.flow.iso_times of a column given as its iso_parts (two
 * int64 buffers of equal length); ValueError for a time outside 0..MAX_TS (the caller uses numpy's). */
static PyObject *iso_texts(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer wb, ub;
    if (!PyArg_ParseTuple(args, "y*y*", &wb, &ub)) return NULL;
    PyObject *out = NULL;
    Py_ssize_t n = wb.len / 8;
    if (ub.len != wb.len || wb.len % 8) {
        PyErr_SetString(PyExc_ValueError, "iso_texts: two int64 buffers of one length");
        goto done;
    }
    const int64_t *w = (const int64_t *)wb.buf, *u = (const int64_t *)ub.buf;
    out = PyList_New(n);
    if (!out) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (w[i] < 0 || w[i] > (int64_t)MAX_TS || u[i] < 0 || u[i] >= 1000000) {
            Py_CLEAR(out);
            PyErr_SetString(PyExc_ValueError, "iso_texts: a time outside 0..9999-12-31");
            goto done;
        }
        char text[32];
        int len = iso_parts_text(w[i], u[i], text);
        PyObject *s = PyUnicode_FromStringAndSize(text, len);
        if (!s) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, s);
    }
done:
    PyBuffer_Release(&wb);
    PyBuffer_Release(&ub);
    return out;
}

static PyMethodDef methods[] = {
    {"json", records_json, METH_VARARGS, "The JSON text of bulk report records (see the comment at the top)."},
    {"iso_texts", iso_texts, METH_VARARGS, "agent.flow.iso_times of a column's iso_parts (see above)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_records", NULL, -1, methods};

PyMODINIT_FUNC PyInit__records(void) { return PyModule_Create(&module); }
