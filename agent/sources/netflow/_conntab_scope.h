/* The scope tables of the collector's C connection table (included by _conntab.c only): each
 * exporter's Scoper as conntable.scope_codes flattens it (sorted interval starts per family, a code
 * per interval), and address texts parsed as ip_parse parses them. Only "is it public" is asked. */
#ifndef EGRESS_AGENT_CONNTAB_SCOPE_H
#define EGRESS_AGENT_CONNTAB_SCOPE_H

#include <Python.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned __int128 u128;

static PyObject *four, *six; /* made by the module's init */

typedef struct {
    uint32_t *s4;
    uint8_t *c4;
    Py_ssize_t n4;
    u128 *s6;
    uint8_t *c6;
    Py_ssize_t n6;
} scope_t;

static void free_scopes(scope_t *sc, Py_ssize_t n) {
    for (Py_ssize_t i = 0; sc && i < n; i++) { free(sc[i].s4); free(sc[i].c4); free(sc[i].s6); free(sc[i].c6); }
    free(sc);
}

/* bisect_right(starts, n) - 1, as Python indexes it (-1: the last) */
static int code4(const scope_t *s, uint32_t n) {
    Py_ssize_t lo = 0, hi = s->n4;
    if (!hi) return 0;
    while (lo < hi) { Py_ssize_t mid = (lo + hi) / 2; if (n < s->s4[mid]) hi = mid; else lo = mid + 1; }
    return s->c4[lo ? lo - 1 : s->n4 - 1];
}

static int code6(const scope_t *s, u128 n) {
    Py_ssize_t lo = 0, hi = s->n6;
    if (!hi) return 0;
    while (lo < hi) { Py_ssize_t mid = (lo + hi) / 2; if (n < s->s6[mid]) hi = mid; else lo = mid + 1; }
    return s->c6[lo ? lo - 1 : s->n6 - 1];
}

/* Scoper.scope_int(...) == "public": codes 1 public, 2 Teredo (~low 32 bits), 3 NAT64-local (low 32) */
static int is_public(const scope_t *s, int v6, u128 n) {
    if (!v6) return code4(s, (uint32_t)n) == 1;
    int c = code6(s, n);
    if (c == 2) return code4(s, (uint32_t)(~n & 0xFFFFFFFFu)) == 1;
    if (c == 3) return code4(s, (uint32_t)(n & 0xFFFFFFFFu)) == 1;
    return c == 1;
}

/* ip_parse: (version, integer) of an address text, its integer in *out; NULL with ValueError */
static PyObject *parse(PyObject *ip, int *v6, u128 *out) {
    Py_ssize_t n;
    const char *txt = PyUnicode_Check(ip) ? PyUnicode_AsUTF8AndSize(ip, &n) : NULL;
    uint8_t b[16];
    if (!txt) {
        PyErr_Clear();
        goto bad;
    }
    *v6 = strchr(txt, ':') != NULL;
    if ((Py_ssize_t)strlen(txt) != n || inet_pton(*v6 ? AF_INET6 : AF_INET, txt, b) != 1) goto bad;
    u128 v = 0;
    for (int i = 0; i < (*v6 ? 16 : 4); i++) v = (v << 8) | b[i];
    *out = v;
    PyObject *num;
    if (!*v6) {
        num = PyLong_FromUnsignedLong((unsigned long)v);
    } else {
        PyObject *hi = PyLong_FromUnsignedLongLong((unsigned long long)(v >> 64)), *sh = NULL;
        PyObject *lo = PyLong_FromUnsignedLongLong((unsigned long long)v), *k = PyLong_FromLong(64);
        num = NULL;
        if (hi && lo && k && (sh = PyNumber_Lshift(hi, k))) num = PyNumber_Or(sh, lo);
        Py_XDECREF(hi); Py_XDECREF(lo); Py_XDECREF(k); Py_XDECREF(sh);
    }
    if (!num) return NULL;
    PyObject *t = PyTuple_Pack(2, *v6 ? six : four, num);
    Py_DECREF(num);
    if (t) PyObject_GC_UnTrack(t); /* two ints: never in a cycle (see _conntab.c's `untracked`) */
    return t;
bad:
    PyErr_Format(PyExc_ValueError, "%R does not appear to be an IPv4 or IPv6 address", ip);
    return NULL;
}

/* The scopes of configure's list of (starts4, codes4, starts6, codes6) bytes; NULL with an error */
static scope_t *scopes_from(PyObject *list, Py_ssize_t *count) {
    Py_ssize_t n = PyList_GET_SIZE(list);
    scope_t *sc = calloc(n ? n : 1, sizeof *sc);
    if (!sc) return (scope_t *)PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = PyList_GET_ITEM(list, i), *b[4];
        if (!PyTuple_Check(x) || PyTuple_GET_SIZE(x) != 4) goto bad;
        for (int j = 0; j < 4; j++)
            if (!PyBytes_Check(b[j] = PyTuple_GET_ITEM(x, j))) goto bad;
        Py_ssize_t n4 = PyBytes_GET_SIZE(b[1]), n6 = PyBytes_GET_SIZE(b[3]);
        if (PyBytes_GET_SIZE(b[0]) != 4 * n4 || PyBytes_GET_SIZE(b[2]) != 16 * n6) goto bad;
        sc[i].s4 = malloc((n4 + 1) * sizeof(uint32_t)); sc[i].c4 = malloc(n4 + 1);
        sc[i].s6 = malloc((n6 + 1) * sizeof(u128)); sc[i].c6 = malloc(n6 + 1);
        if (!sc[i].s4 || !sc[i].c4 || !sc[i].s6 || !sc[i].c6) {
            PyErr_NoMemory();
            goto fail;
        }
        const uint8_t *p4 = (const uint8_t *)PyBytes_AS_STRING(b[0]), *p6 = (const uint8_t *)PyBytes_AS_STRING(b[2]);
        for (Py_ssize_t j = 0; j < n4; j++)
            sc[i].s4[j] = (uint32_t)p4[4 * j] << 24 | (uint32_t)p4[4 * j + 1] << 16 | (uint32_t)p4[4 * j + 2] << 8 |
                          p4[4 * j + 3];
        for (Py_ssize_t j = 0; j < n6; j++) {
            u128 v = 0;
            for (int q = 0; q < 16; q++) v = v << 8 | p6[16 * j + q];
            sc[i].s6[j] = v;
        }
        memcpy(sc[i].c4, PyBytes_AS_STRING(b[1]), n4);
        memcpy(sc[i].c6, PyBytes_AS_STRING(b[3]), n6);
        sc[i].n4 = n4;
        sc[i].n6 = n6;
    }
    *count = n;
    return sc;
bad:
    PyErr_SetString(PyExc_TypeError, "configure: scopes are (starts4, codes4, starts6, codes6) bytes");
fail:
    free_scopes(sc, n);
    return NULL;
}

#endif
