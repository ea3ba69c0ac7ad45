/* Optional accelerator for the flow collector: the connection table of conntable.py in C.
 *
 * Why by hand: a profile of the collector thread (bench/bench_collector.py's stream) put four
 * fifths of its time in the Python table: per record a key tuple, a dict look-up and the merge of
 * six counters; per connection an object, two address parses, two scope bisects and a NamedTuple.
 * The decoder (_nfdata) was a twentieth. Here a record costs a hash of objects it already has and
 * the counter sums; the Python objects the reference would make are made the same way.
 *
 * Contract: conntable.py's module doc. Counters stay Python ints (summed with PyNumber_Add, so they
 * are exact past 64 bits as the reference's are); times are doubles, as the decoders make them.
 * tests/sources/test_conntable.py holds this equal to conntable.ConnTable (items, tallies, ids) on
 * generated record streams; tests/fuzz/test_sanitizer.py runs that under ASan/UBSan.
 *
 * Table(kind, entry_type, next_id, max_connections, idle_tcp, idle_other, service_bitmap, hint_syn)
 *   .configure([(starts4, codes4, starts6, codes6), ...], inbound)  scopes (conntable.scope_codes)
 *   .feed(groups, items) -> tally     .sweep(now, items) -> tally     len(), .next_id
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_conntab_scope.h"

/* decode.Record's fields, in order */
enum { R_PROTO, R_SRC, R_SPORT, R_DST, R_DPORT, R_PACKETS, R_BYTES, R_FIRST, R_LAST, R_FLAGS, R_EXPORTER,
       R_SAMPLED, R_DIRECTION, R_IN_IF, R_OUT_IF, R_RPACKETS, R_RBYTES, R_RFLAGS, R_N };
enum { O_CONNECTION, O_MERGED, O_NOT_EGRESS, O_REFUSED, O_N };
enum { E_N = 26 }; /* NetflowEntry's fields */

static PyObject *s_outcome[O_N], *s_how[3], *s_flow, *s_destroy, *s_records, *k_new, *k_evicted, *zero;

typedef struct conn {
    struct conn *hnext, *prev, *next; /* hash chain; recency list (prev older) */
    uint64_t hash;
    PyObject *site, *exporter, *lo, *hi; /* the key: the lower endpoint first */
    long proto, lo_port, hi_port;
    PyObject *src; /* the opener's address (lo or hi: not a reference of its own) */
    long sport;
    PyObject *packets, *bytes, *rpackets, *rbytes, *flags, *rflags;
    double first, last, idle;
    PyObject *entry; /* NULL: not judged; else the 14 facts conntable._emit unpacks */
    unsigned char judged, fresh, dead;
} conn_t;

typedef struct {
    PyObject_HEAD
    conn_t **buckets;
    size_t nb, count;
    conn_t *oldest, *newest;
    PyObject *kind, *etype;
    long long next_id;
    Py_ssize_t max;
    double idle_tcp, idle_other;
    uint8_t service[8192];
    unsigned long long hint_syn;
    scope_t *scopes;
    Py_ssize_t nscopes;
    int inbound;
    /* one call's state */
    int busy; /* a call is under way: Python code run from inside one (a finalizer) may not enter */
    PyObject *items;
    long long n_new, n_evicted;
    conn_t **fresh;
    size_t nfresh, capfresh;
} Table;

/* ---- the table ---- */

static uint64_t mix(uint64_t h) {
    h ^= h >> 29; h *= 0xBF58476D1CE4E5B9ULL; h ^= h >> 32;
    return h;
}

/* What CPython's collector does to a tuple at its first look (_PyTuple_MaybeUntrack), done at once:
 * a tuple holding no tracked container can never be part of a cycle, so the collector need not
 * walk it. A round's items are a few tuples per connection; walked at every young collection they
 * cost a third of this module's time (measured with the daemon's gc thresholds). */
static PyObject *untracked(PyObject *t) {
    if (!t) return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(t); i++) {
        PyObject *x = PyTuple_GET_ITEM(t, i);
        if (x && PyObject_IS_GC(x) && PyObject_GC_IsTracked(x)) return t;
    }
    PyObject_GC_UnTrack(t);
    return t;
}

static int same(PyObject *a, PyObject *b) { return a == b ? 1 : PyObject_RichCompareBool(a, b, Py_EQ); }

static int grow(Table *t) {
    size_t nb = t->nb ? t->nb * 2 : 1024;
    conn_t **b = calloc(nb, sizeof(conn_t *));
    if (!b) { PyErr_NoMemory(); return -1; }
    for (conn_t *c = t->oldest; c; c = c->next) {
        size_t i = c->hash & (nb - 1);
        c->hnext = b[i];
        b[i] = c;
    }
    free(t->buckets);
    t->buckets = b;
    t->nb = nb;
    return 0;
}

static void unlink_conn(Table *t, conn_t *c) {
    conn_t **p = &t->buckets[c->hash & (t->nb - 1)];
    while (*p != c) p = &(*p)->hnext;
    *p = c->hnext;
    if (c->prev) c->prev->next = c->next; else t->oldest = c->next;
    if (c->next) c->next->prev = c->prev; else t->newest = c->prev;
    c->prev = c->next = NULL;
    t->count--;
}

static void append_conn(Table *t, conn_t *c) {
    c->prev = t->newest;
    c->next = NULL;
    if (t->newest) t->newest->next = c; else t->oldest = c;
    t->newest = c;
}

static void free_conn(conn_t *c) {
    Py_XDECREF(c->site); Py_XDECREF(c->exporter); Py_XDECREF(c->lo); Py_XDECREF(c->hi);
    Py_XDECREF(c->packets); Py_XDECREF(c->bytes); Py_XDECREF(c->rpackets); Py_XDECREF(c->rbytes);
    Py_XDECREF(c->flags); Py_XDECREF(c->rflags); Py_XDECREF(c->entry);
    free(c);
}

/* The item ("flow" | "destroy", NetflowEntry, counted) of a judged connection, appended. */
static int emit(Table *t, conn_t *c, int flow) {
    PyObject **f = &PyTuple_GET_ITEM(c->entry, 0);
    PyTypeObject *T = (PyTypeObject *)t->etype;
    PyObject *e = T->tp_alloc(T, E_N);
    if (!e) return -1;
    PyObject *v[E_N] = {f[0], f[1], f[2], f[3], f[4], f[5], c->packets, c->bytes, NULL, Py_None, Py_None, NULL,
                        t->kind, c->site, f[6], f[7], f[8], f[9], f[10], c->rpackets, c->rbytes, c->flags,
                        c->rflags, f[11], f[12], f[13]};
    int bad = 0;
    for (int k = 0; k < E_N; k++) {
        if (k == 8) v[k] = PyLong_FromDouble(c->first * 1e9);
        else if (k == 11) v[k] = PyFloat_FromDouble(c->last);
        else Py_INCREF(v[k]);
        if (!v[k]) bad = 1;
        PyTuple_SET_ITEM(e, k, v[k]); /* a NULL item is safe to free */
    }
    if (bad) { Py_DECREF(e); return -1; }
    untracked(e);
    PyObject *item = untracked(PyTuple_Pack(3, flow ? s_flow : s_destroy, e, flow ? Py_True : Py_False));
    Py_DECREF(e);
    if (!item) return -1;
    int r = PyList_Append(t->items, item);
    Py_DECREF(item);
    if (r < 0) return -1;
    if (flow) {
        c->judged = 1;
        t->n_new++;
    }
    return 0;
}

/* conntable._end: out of the table; its items if judged. Freed unless this round's `fresh` holds it. */
static int end_conn(Table *t, conn_t *c) {
    unlink_conn(t, c);
    int r = 0;
    if (c->entry) {
        if (!c->judged) r = emit(t, c, 1);
        if (r == 0) r = emit(t, c, 0);
    }
    if (c->fresh) c->dead = 1; else free_conn(c);
    return r;
}

/* *acc = *acc + x (add_to) or *acc | x (or_to), as Python ints; -1 on error */
static int set_to(PyObject **acc, PyObject *s) {
    if (!s) return -1;
    Py_SETREF(*acc, s);
    return 0;
}
#define add_to(acc, x) set_to((acc), PyNumber_Add(*(acc), (x)))
#define or_to(acc, x) set_to((acc), PyNumber_Or(*(acc), (x)))

/* conntable.opener: whether the record's sender opened the connection; *how its index in s_how */
static int opener_is_sender(Table *t, PyObject **r, long proto, long sport, long dport, int *how) {
    *how = 0;
    if (r[R_RPACKETS] != Py_None) return 1;
    if (proto == 6) {
        unsigned long long m = PyLong_AsUnsignedLongLongMask(r[R_FLAGS]) & (t->hint_syn | 0x12);
        if (m == (unsigned long long)-1 && PyErr_Occurred()) return -1;
        if (m == t->hint_syn || m == 0x02 || m == (t->hint_syn | 0x02)) { *how = 1; return 1; }
    }
    if (proto == 6 || proto == 17 || proto == 132) {
        int s = sport < 1024 || (sport <= 65535 && (t->service[sport >> 3] >> (sport & 7) & 1));
        int d = dport < 1024 || (dport <= 65535 && (t->service[dport >> 3] >> (dport & 7) & 1));
        if (s != d) { *how = 2; return d; }
    }
    return 1;
}

/* conntable._open: a new connection for record r, oriented and read in scope `sid`; NULL on error */
static conn_t *open_conn(Table *t, PyObject **r, PyObject *site, Py_ssize_t sid, uint64_t h, PyObject *lo,
                         long lo_port, PyObject *hi, long hi_port, long proto, long sport, long dport, double first,
                         double last) {
    if (sid >= t->nscopes) {
        PyErr_SetString(PyExc_IndexError, "scope index out of range");
        return NULL;
    }
    int how, sender = opener_is_sender(t, r, proto, sport, dport, &how);
    if (sender < 0) return NULL;
    PyObject *src = sender ? r[R_SRC] : r[R_DST], *dst = sender ? r[R_DST] : r[R_SRC];
    PyObject *src_port = sender ? r[R_SPORT] : r[R_DPORT], *dst_port = sender ? r[R_DPORT] : r[R_SPORT];
    int s6, d6;
    u128 sn, dn;
    PyObject *sv = parse(src, &s6, &sn), *dv = sv ? parse(dst, &d6, &dn) : NULL, *entry = NULL;
    if (!dv) {
        Py_XDECREF(sv);
        return NULL;
    }
    const scope_t *s = &t->scopes[sid];
    int dst_public = is_public(s, d6, dn), src_public = is_public(s, s6, sn);
    if (dst_public != src_public && (dst_public || t->inbound)) {
        PyObject *id = PyLong_FromLongLong(++t->next_id);
        if (id)
            entry = untracked(PyTuple_Pack(14, id, r[R_PROTO], src, src_port, dst, dst_port, r[R_EXPORTER],
                                           r[R_IN_IF], r[R_OUT_IF], r[R_SAMPLED], s_how[how],
                                           src_public ? Py_True : Py_False, dv, sv));
        Py_XDECREF(id);
        if (!entry) {
            Py_DECREF(sv);
            Py_DECREF(dv);
            return NULL;
        }
    }
    Py_DECREF(sv);
    Py_DECREF(dv);
    conn_t *c = calloc(1, sizeof *c);
    if (!c || (t->count + 1 > t->nb && grow(t) < 0)) {
        free(c);
        Py_XDECREF(entry);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return NULL;
    }
    if (t->nfresh == t->capfresh) {
        size_t cap = t->capfresh ? t->capfresh * 2 : 256;
        conn_t **f = realloc(t->fresh, cap * sizeof *f);
        if (!f) {
            free(c);
            Py_XDECREF(entry);
            PyErr_NoMemory();
            return NULL;
        }
        t->fresh = f;
        t->capfresh = cap;
    }
    c->hash = h;
    Py_INCREF(site); Py_INCREF(r[R_EXPORTER]); Py_INCREF(lo); Py_INCREF(hi);
    c->site = site; c->exporter = r[R_EXPORTER]; c->lo = lo; c->hi = hi;
    c->proto = proto; c->lo_port = lo_port; c->hi_port = hi_port;
    c->src = src; /* lo or hi: this record's own address objects */
    c->sport = sender ? sport : dport;
    PyObject **ctr[6] = {&c->packets, &c->bytes, &c->rpackets, &c->rbytes, &c->flags, &c->rflags};
    for (int i = 0; i < 6; i++) { Py_INCREF(zero); *ctr[i] = zero; }
    c->first = first; c->last = last;
    c->idle = proto == 6 ? t->idle_tcp : t->idle_other;
    c->entry = entry;
    size_t b = h & (t->nb - 1);
    c->hnext = t->buckets[b];
    t->buckets[b] = c;
    append_conn(t, c);
    t->count++;
    c->fresh = 1;
    t->fresh[t->nfresh++] = c;
    if ((Py_ssize_t)t->count > t->max) {
        t->n_evicted++;
        if (end_conn(t, t->oldest) < 0) return NULL;
    }
    return c;
}

typedef struct {
    double first;
    Py_ssize_t seq, sid;
    PyObject *r, *site;
} rec_t;

static int by_first(const void *a, const void *b) {
    const rec_t *x = a, *y = b;
    if (x->first < y->first) return -1;
    if (x->first > y->first) return 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* conntable._record: one record into its connection; its outcome (O_*), -1 on error */
static int record(Table *t, const rec_t *x) {
    if (x->sid < 0) return O_REFUSED;
    PyObject **r = &PyTuple_GET_ITEM(x->r, 0);
    long proto = PyLong_AsLong(r[R_PROTO]), sport = PyLong_AsLong(r[R_SPORT]), dport = PyLong_AsLong(r[R_DPORT]);
    double last = PyFloat_AsDouble(r[R_LAST]);
    if (PyErr_Occurred()) return -1;
    PyObject *src = r[R_SRC], *dst = r[R_DST];
    if (!PyUnicode_Check(src) || !PyUnicode_Check(dst)) {
        PyErr_SetString(PyExc_TypeError, "record addresses must be str");
        return -1;
    }
    int cmp = PyUnicode_Compare(src, dst);
    if (cmp == -1 && PyErr_Occurred()) return -1;
    int src_low = cmp < 0 || (cmp == 0 && sport <= dport);
    PyObject *lo = src_low ? src : dst, *hi = src_low ? dst : src;
    long lp = src_low ? sport : dport, hp = src_low ? dport : sport;
    Py_hash_t hs = PyObject_Hash(x->site), he = PyObject_Hash(r[R_EXPORTER]), hl = PyObject_Hash(lo),
              hh = PyObject_Hash(hi);
    if (hs == -1 || he == -1 || hl == -1 || hh == -1) return -1;
    uint64_t h = mix((uint64_t)hs * 0x9E3779B97F4A7C15ULL ^ (uint64_t)he * 0xC2B2AE3D27D4EB4FULL ^
                     (uint64_t)hl * 0x165667B19E3779F9ULL ^ (uint64_t)hh * 0xD6E8FEB86659FD93ULL ^
                     ((uint64_t)proto << 40 ^ (uint64_t)lp << 20 ^ (uint64_t)hp) * 0xFF51AFD7ED558CCDULL);
    conn_t *c = t->nb ? t->buckets[h & (t->nb - 1)] : NULL;
    for (; c; c = c->hnext) {
        if (c->hash != h || c->proto != proto || c->lo_port != lp || c->hi_port != hp) continue;
        int eq = same(c->lo, lo);
        if (eq > 0) eq = same(c->hi, hi);
        if (eq > 0) eq = same(c->exporter, r[R_EXPORTER]);
        if (eq > 0) eq = same(c->site, x->site);
        if (eq < 0) return -1;
        if (eq) break;
    }
    if (c && x->first > c->last + c->idle) { /* quiet for longer than its timeout: a new connection */
        if (end_conn(t, c) < 0) return -1;
        c = NULL;
    }
    int outcome;
    if (!c) {
        c = open_conn(t, r, x->site, x->sid, h, lo, lp, hi, hp, proto, sport, dport, x->first, last);
        if (!c) return -1;
        outcome = c->entry ? O_CONNECTION : O_NOT_EGRESS;
    } else {
        if (c != t->newest) { /* the most recently fed last */
            if (c->prev) c->prev->next = c->next; else t->oldest = c->next;
            c->next->prev = c->prev;
            append_conn(t, c);
        }
        outcome = c->entry ? O_MERGED : O_NOT_EGRESS;
    }
    int mine = same(src, c->src);
    if (mine < 0) return -1;
    mine = mine && sport == c->sport;
    PyObject *sent_flags = PyLong_FromUnsignedLongLong(PyLong_AsUnsignedLongLongMask(r[R_FLAGS]) & 0xFF);
    if (!sent_flags) return -1;
    if (PyErr_Occurred()) { Py_DECREF(sent_flags); return -1; }
    PyObject *bp = r[R_RPACKETS] == Py_None ? zero : r[R_RPACKETS], *bb = r[R_RBYTES] == Py_None ? zero : r[R_RBYTES];
    int bad = mine ? add_to(&c->packets, r[R_PACKETS]) < 0 || add_to(&c->bytes, r[R_BYTES]) < 0 ||
                         or_to(&c->flags, sent_flags) < 0 || add_to(&c->rpackets, bp) < 0 ||
                         add_to(&c->rbytes, bb) < 0 || or_to(&c->rflags, r[R_RFLAGS]) < 0
                   : add_to(&c->packets, bp) < 0 || add_to(&c->bytes, bb) < 0 || or_to(&c->flags, r[R_RFLAGS]) < 0 ||
                         add_to(&c->rpackets, r[R_PACKETS]) < 0 || add_to(&c->rbytes, r[R_BYTES]) < 0 ||
                         or_to(&c->rflags, sent_flags) < 0;
    Py_DECREF(sent_flags);
    if (bad) return -1;
    if (x->first < c->first) c->first = x->first;
    if (last > c->last) c->last = last;
    return outcome;
}

typedef struct {
    PyObject *site;
    long long n[O_N];
} tally_t;

/* The call's tally as conntable's: ("records", site, outcome), ("new",), ("evicted",) -> n, n > 0 */
static PyObject *tally_dict(Table *t, tally_t *sites, size_t nsites) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (size_t i = 0; i < nsites; i++)
        for (int o = 0; o < O_N; o++) {
            if (!sites[i].n[o]) continue;
            PyObject *k = PyTuple_Pack(3, s_records, sites[i].site, s_outcome[o]), *v = PyLong_FromLongLong(sites[i].n[o]);
            int bad = !k || !v || PyDict_SetItem(d, k, v) < 0;
            Py_XDECREF(k); Py_XDECREF(v);
            if (bad) { Py_DECREF(d); return NULL; }
        }
    PyObject *keys[2] = {k_new, k_evicted};
    long long ns[2] = {t->n_new, t->n_evicted};
    for (int i = 0; i < 2; i++) {
        if (!ns[i]) continue;
        PyObject *v = PyLong_FromLongLong(ns[i]);
        int bad = !v || PyDict_SetItem(d, keys[i], v) < 0;
        Py_XDECREF(v);
        if (bad) { Py_DECREF(d); return NULL; }
    }
    return d;
}

static int enter(Table *t) {
    if (t->busy) {
        PyErr_SetString(PyExc_RuntimeError, "connection table: a call from inside another");
        return -1;
    }
    t->busy = 1;
    return 0;
}

static PyObject *feed(Table *t, PyObject *args) {
    PyObject *groups, *items, *out = NULL;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &groups, &PyList_Type, &items) || enter(t) < 0) return NULL;
    Py_ssize_t ng = PyList_GET_SIZE(groups), n = 0;
    for (Py_ssize_t g = 0; g < ng; g++) {
        PyObject *grp = PyList_GET_ITEM(groups, g);
        if (!PyTuple_Check(grp) || PyTuple_GET_SIZE(grp) != 3 || !PyList_Check(PyTuple_GET_ITEM(grp, 0))) {
            PyErr_SetString(PyExc_TypeError, "feed: groups are (list of records, site, scope index)");
            t->busy = 0;
            return NULL;
        }
        n += PyList_GET_SIZE(PyTuple_GET_ITEM(grp, 0));
    }
    rec_t *recs = PyMem_Malloc((n ? n : 1) * sizeof *recs);
    tally_t *sites = PyMem_Calloc(ng ? ng : 1, sizeof *sites);
    size_t nsites = 0;
    if (!recs || !sites) {
        PyMem_Free(recs); PyMem_Free(sites);
        t->busy = 0;
        return PyErr_NoMemory();
    }
    Py_ssize_t k = 0;
    for (Py_ssize_t g = 0; g < ng; g++) {
        PyObject *grp = PyList_GET_ITEM(groups, g), *list = PyTuple_GET_ITEM(grp, 0);
        Py_ssize_t sid = PyLong_AsSsize_t(PyTuple_GET_ITEM(grp, 2));
        if (sid == -1 && PyErr_Occurred()) goto done;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++, k++) {
            PyObject *r = PyList_GET_ITEM(list, i);
            if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) < R_N) {
                PyErr_SetString(PyExc_TypeError, "feed: a record is not a decode.Record");
                goto done;
            }
            recs[k] = (rec_t){PyFloat_AsDouble(PyTuple_GET_ITEM(r, R_FIRST)), k, sid, r, PyTuple_GET_ITEM(grp, 1)};
            if (recs[k].first == -1.0 && PyErr_Occurred()) goto done;
        }
    }
    qsort(recs, n, sizeof *recs, by_first); /* by (first, order given): Python's stable sort */
    t->items = items;
    t->n_new = t->n_evicted = 0;
    t->nfresh = 0;
    int ok = 1;
    for (Py_ssize_t i = 0; i < n && ok; i++) {
        int o = record(t, &recs[i]);
        if (o < 0) { ok = 0; break; }
        size_t s = 0;
        for (; s < nsites; s++) {
            int eq = same(sites[s].site, recs[i].site);
            if (eq < 0) { ok = 0; break; }
            if (eq) break;
        }
        if (!ok) break;
        if (s == nsites) sites[nsites++].site = recs[i].site; /* ng bounds the distinct sites */
        sites[s].n[o]++;
    }
    for (size_t i = 0; i < t->nfresh && ok; i++) { /* judged once the round's records are in */
        conn_t *c = t->fresh[i];
        if (!c->dead && c->entry && !c->judged && emit(t, c, 1) < 0) ok = 0;
    }
    for (size_t i = 0; i < t->nfresh; i++) {
        if (t->fresh[i]->dead) free_conn(t->fresh[i]); else t->fresh[i]->fresh = 0;
    }
    t->nfresh = 0;
    if (ok) out = tally_dict(t, sites, nsites);
done:
    t->items = NULL;
    t->busy = 0;
    PyMem_Free(recs);
    PyMem_Free(sites);
    return out;
}

static PyObject *sweep(Table *t, PyObject *args) {
    double now;
    PyObject *items;
    if (!PyArg_ParseTuple(args, "dO!", &now, &PyList_Type, &items) || enter(t) < 0) return NULL;
    t->items = items;
    t->n_new = t->n_evicted = 0;
    int ok = 1;
    for (conn_t *c = t->oldest, *next; c && ok; c = next) {
        next = c->next;
        if (now - c->last > c->idle && end_conn(t, c) < 0) ok = 0;
    }
    t->items = NULL;
    t->busy = 0;
    return ok ? tally_dict(t, NULL, 0) : NULL;
}

static PyObject *configure(Table *t, PyObject *args) {
    PyObject *list;
    int inbound;
    if (!PyArg_ParseTuple(args, "O!p", &PyList_Type, &list, &inbound) || enter(t) < 0) return NULL;
    Py_ssize_t n;
    scope_t *sc = scopes_from(list, &n);
    t->busy = 0;
    if (!sc) return NULL;
    free_scopes(t->scopes, t->nscopes);
    t->scopes = sc;
    t->nscopes = n;
    t->inbound = inbound;
    Py_RETURN_NONE;
}

static int table_init(Table *t, PyObject *args, PyObject *kw) {
    PyObject *kind, *etype;
    const char *ports;
    Py_ssize_t nports;
    if (t->kind) {
        PyErr_SetString(PyExc_TypeError, "Table: already made");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "UO!Lnddy#K", &kind, &PyType_Type, &etype, &t->next_id, &t->max, &t->idle_tcp,
                          &t->idle_other, &ports, &nports, &t->hint_syn))
        return -1;
    if (nports != sizeof t->service || t->max < 1 || !PyType_IsSubtype((PyTypeObject *)etype, &PyTuple_Type)) {
        PyErr_SetString(PyExc_ValueError, "Table: an 8192-octet port bitmap, max_connections >= 1, a tuple type");
        return -1;
    }
    memcpy(t->service, ports, sizeof t->service);
    Py_INCREF(kind);
    Py_INCREF(etype);
    t->kind = kind;
    t->etype = etype;
    return 0;
}

static void table_dealloc(Table *t) {
    for (conn_t *c = t->oldest, *next; c; c = next) {
        next = c->next;
        free_conn(c);
    }
    free(t->buckets);
    free(t->fresh);
    free_scopes(t->scopes, t->nscopes);
    Py_XDECREF(t->kind);
    Py_XDECREF(t->etype);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static Py_ssize_t table_len(Table *t) { return (Py_ssize_t)t->count; }

static PyObject *get_next_id(Table *t, void *closure) { return PyLong_FromLongLong(t->next_id); }

static PyMethodDef table_methods[] = {
    {"feed", (PyCFunction)feed, METH_VARARGS, "feed(groups, items) -> tally: one read round's records."},
    {"sweep", (PyCFunction)sweep, METH_VARARGS, "sweep(now, items) -> tally: end the connections gone quiet."},
    {"configure", (PyCFunction)configure, METH_VARARGS, "configure(scopes, inbound): how new connections are read."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef table_getset[] = {{"next_id", (getter)get_next_id, NULL, "the last connection id given", NULL},
                                     {NULL, NULL, NULL, NULL, NULL}};

static PySequenceMethods table_seq = {.sq_length = (lenfunc)table_len};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "agent.sources.netflow._conntab.Table",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The collector's connection table (conntable.py's contract).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)table_init,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_methods = table_methods,
    .tp_getset = table_getset,
    .tp_as_sequence = &table_seq,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_conntab", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__conntab(void) {
    const char *outcomes[O_N] = {"connection", "merged", "not_egress", "refused"};
    const char *how[3] = {"first-packet", "syn", "port"};
    for (int i = 0; i < O_N; i++)
        if (!(s_outcome[i] = PyUnicode_InternFromString(outcomes[i]))) return NULL;
    for (int i = 0; i < 3; i++)
        if (!(s_how[i] = PyUnicode_InternFromString(how[i]))) return NULL;
    if (!(s_flow = PyUnicode_InternFromString("flow")) || !(s_destroy = PyUnicode_InternFromString("destroy")) ||
        !(s_records = PyUnicode_InternFromString("records")) || !(zero = PyLong_FromLong(0)) ||
        !(four = PyLong_FromLong(4)) || !(six = PyLong_FromLong(6)))
        return NULL;
    PyObject *s_new = PyUnicode_InternFromString("new"), *s_evicted = PyUnicode_InternFromString("evicted");
    if (!s_new || !s_evicted || !(k_new = PyTuple_Pack(1, s_new)) || !(k_evicted = PyTuple_Pack(1, s_evicted)))
        return NULL;
    if (PyType_Ready(&TableType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0) {
        Py_DECREF(&TableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
