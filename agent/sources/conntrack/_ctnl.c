/* Optional accelerator for the conntrack event socket: many datagrams per system call, decoded in C.
 *
 * Why: in Python each event costs a recv_into (a system call and its wrapper), a copy of the
 * datagram, a generator step through the netlink header loop and the attribute decoder: about
 * 13 us of the source thread per event, measured in bench_live, i.e. a quarter of the agent's CPU
 * per flow. Here one recvmmsg(2) reads up to SLOTS datagrams and each ctnetlink message is decoded
 * by the same rules as conntrack.decode_entry (the reference, itself proven equal to pyroute2 on
 * real kernel messages); tests prove this decoder equal to it on real messages and on fuzzed ones.
 *
 * drain(fd, max_datagrams, entry_type, table=None) -> (events, datagrams, status, skipped)
 *   events: list of ("new" | "destroy", entry, accountable) in arrival order, entry an instance of
 *           entry_type (conntrack.CtEntry, a tuple subclass) with its 11 fields; NEW without
 *           NLM_F_CREATE (an update), other message types, errors and undecodable messages are
 *           skipped, as in conntrack.Conntrack.events. accountable is None without a table.
 *   table: a scope_table() capsule. Then NEW events whose flow is not egress (destination public,
 *           source not, as Scoper.classify says) are left out and counted in `skipped`, and the
 *           others carry accountable True or False (Scoper.classify's second answer, for both ends).
 *           A table made with inbound 1 or 2 also keeps inbound flows (source public, destination
 *           not): with 2 they are accountable as egress ones are, with 1 never (the kernel's
 *           counter does not count them).
 *   datagrams: how many datagrams were read.
 *   status: 0 the socket is empty, 1 max_datagrams were read, 2 the kernel reported ENOBUFS
 *           (events were lost: resynchronise). Any other error raises OSError.
 * The socket must be non-blocking or the caller must know data is waiting: MSG_DONTWAIT is used.
 * scope_table(starts4, codes4, starts6, codes6, inbound=0): see scope_t below (conntrack.scope_table builds it).
 * decode(message) -> entry or None: one whole netlink message (header included), for tests;
 * classify(table, packed address) -> (public, accountable) and ntop(packed address), for tests.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#define SLOTS 64
#define SLOT_BYTES 16384 /* a ctnetlink event is a few hundred bytes; a larger one is reported */
#define NLMSG_ERROR 2
#define NLMSG_DONE 3
#define NLM_F_CREATE 0x400
#define MSG_CT_NEW 0
#define MSG_CT_DELETE 2

static uint8_t bufs[SLOTS][SLOT_BYTES]; /* only touched with the GIL held: no system call here blocks */
static PyObject *S_NEW, *S_DESTROY;

static inline uint16_t h16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t h32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint32_t be16(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }
static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t be64(const uint8_t *p) { return ((uint64_t)be32(p) << 32) | be32(p + 4); }

/* Attributes of p[off:end]: a header whose length is under 4 or runs past `end` ends the walk
 * (conntrack._attrs). Sets t (type without the nested flag), a/b (payload start/end). */
#define FOR_ATTRS(p, off, end, t, a, b)                                                              \
    for (Py_ssize_t _o = (off), _l = 0, t = 0, a = 0, b = 0;                                        \
         _o + 4 <= (end) && (_l = h16((p) + _o)) >= 4 && _o + _l <= (end) &&                          \
         ((t = h16((p) + _o + 2) & 0x7FFF), (a = _o + 4), (b = _o + _l), 1);                          \
         _o += (_l + 3) & ~3)

typedef struct { const uint8_t *src, *dst; Py_ssize_t src_n, dst_n; int proto, sport, dport; } tuple_t;

/* A CTA_TUPLE_* nest: the addresses (CTA_IP_V4/V6_SRC/DST), protocol and ports; the last of a
 * repeated attribute wins; a field shorter than its type is ignored (conntrack._tuple). */
static void read_tuple(const uint8_t *p, Py_ssize_t off, Py_ssize_t end, tuple_t *t) {
    memset(t, 0, sizeof *t);
    FOR_ATTRS(p, off, end, at, a, b) {
        if (at == 1) {
            FOR_ATTRS(p, a, b, it, c, d) {
                if (it == 1 || it == 3) { t->src = p + c; t->src_n = d - c; }
                else if (it == 2 || it == 4) { t->dst = p + c; t->dst_n = d - c; }
            }
        } else if (at == 2) {
            FOR_ATTRS(p, a, b, it, c, d) {
                if (it == 1 && d - c >= 1) t->proto = p[c];
                else if (it == 2 && d - c >= 2) t->sport = be16(p + c);
                else if (it == 3 && d - c >= 2) t->dport = be16(p + c);
            }
        }
    }
}

static int addr_ok(Py_ssize_t n) { return n == 4 || n == 16; }

#include "../_addrtext.h"

/* The text of an address; the last source address is kept (a host's flows share a few). */
static PyObject *addr_text(const uint8_t *a, Py_ssize_t n) {
    char text[INET6_ADDRSTRLEN];
    int len = fmt_addr(a, n, text);
    if (len < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyUnicode_FromStringAndSize(text, len);
}

static uint8_t last_src[16];
static Py_ssize_t last_src_n;
static PyObject *last_src_text;

static PyObject *src_text(const uint8_t *a, Py_ssize_t n) {
    if (last_src_text && n == last_src_n && memcmp(a, last_src, n) == 0) return Py_NewRef(last_src_text);
    PyObject *t = addr_text(a, n);
    if (t) {
        Py_XSETREF(last_src_text, Py_NewRef(t));
        memcpy(last_src, a, n);
        last_src_n = n;
    }
    return t;
}

static int same(const uint8_t *a, Py_ssize_t an, const uint8_t *b, Py_ssize_t bn) {
    return an == bn && memcmp(a, b, an) == 0;
}

/* The scope table (Scoper's flattened intervals, as `scope_table` takes them): sorted starts per
 * IP version and a code per interval: 0 public, 1 any other scope, 2 Teredo, 3 local-use NAT64
 * (the last two are resolved through the IPv4 table with the address they embed, and are not
 * accountable, as Scoper.classify says). */
typedef struct { Py_ssize_t n4, n6; uint32_t *s4; uint64_t *s6; uint8_t *c4, *c6; int inbound; } scope_t;
#define SCOPE_CAPSULE "egress_agent.scope_table"

static uint8_t scope4(const scope_t *t, uint32_t v) {
    Py_ssize_t lo = 0, hi = t->n4; /* the last start <= v; starts[0] is 0 */
    while (hi - lo > 1) { Py_ssize_t mid = (lo + hi) / 2; if (t->s4[mid] <= v) lo = mid; else hi = mid; }
    return t->c4[lo];
}

/* Sets *pub (the address is public) and *acct (accountable); the address is 4 or 16 bytes. */
static void classify_addr(const scope_t *t, const uint8_t *a, Py_ssize_t n, int *pub, int *acct) {
    if (n == 4) { *pub = scope4(t, be32(a)) == 0; *acct = 1; return; }
    uint64_t h = be64(a), l = be64(a + 8);
    Py_ssize_t lo = 0, hi = t->n6;
    while (hi - lo > 1) {
        Py_ssize_t mid = (lo + hi) / 2;
        uint64_t sh = t->s6[2 * mid], sl = t->s6[2 * mid + 1];
        if (sh < h || (sh == h && sl <= l)) lo = mid; else hi = mid;
    }
    uint8_t c = t->c6[lo];
    if (c == 2) { *pub = scope4(t, (uint32_t)~l) == 0; *acct = 0; }
    else if (c == 3) { *pub = scope4(t, (uint32_t)l) == 0; *acct = 0; }
    else { *pub = c == 0; *acct = 1; }
}

static void scope_free(PyObject *cap) {
    scope_t *t = PyCapsule_GetPointer(cap, SCOPE_CAPSULE);
    if (t) { PyMem_Free(t->s4); PyMem_Free(t->s6); PyMem_Free(t->c4); PyMem_Free(t->c6); PyMem_Free(t); }
}

/* scope_table(starts4, codes4, starts6, codes6, inbound=0): starts as lists of ints, ascending from 0;
 * inbound as in the comment at the top. */
static PyObject *scope_table(PyObject *self, PyObject *args) {
    PyObject *st4, *st6;
    Py_buffer c4, c6;
    int inbound = 0;
    if (!PyArg_ParseTuple(args, "O!y*O!y*|i", &PyList_Type, &st4, &c4, &PyList_Type, &st6, &c6, &inbound)) return NULL;
    scope_t *t = PyMem_Calloc(1, sizeof *t);
    PyObject *ret = NULL;
    if (!t) { PyErr_NoMemory(); goto done; }
    if (inbound < 0 || inbound > 2) {
        PyErr_SetString(PyExc_ValueError, "scope_table: inbound is 0, 1 or 2");
        goto fail;
    }
    t->inbound = inbound;
    t->n4 = PyList_GET_SIZE(st4);
    t->n6 = PyList_GET_SIZE(st6);
    if (t->n4 < 1 || t->n6 < 1 || c4.len != t->n4 || c6.len != t->n6) {
        PyErr_SetString(PyExc_ValueError, "scope_table: one code per start, at least one interval each");
        goto fail;
    }
    t->s4 = PyMem_Malloc(t->n4 * sizeof *t->s4);
    t->s6 = PyMem_Malloc(2 * t->n6 * sizeof *t->s6);
    t->c4 = PyMem_Malloc(t->n4);
    t->c6 = PyMem_Malloc(t->n6);
    if (!t->s4 || !t->s6 || !t->c4 || !t->c6) { PyErr_NoMemory(); goto fail; }
    memcpy(t->c4, c4.buf, t->n4);
    memcpy(t->c6, c6.buf, t->n6);
    for (Py_ssize_t i = 0; i < t->n4; i++) {
        unsigned long v = PyLong_AsUnsignedLong(PyList_GET_ITEM(st4, i));
        if (PyErr_Occurred() || v > 0xFFFFFFFFUL) { PyErr_SetString(PyExc_ValueError, "scope_table: bad IPv4 start"); goto fail; }
        t->s4[i] = (uint32_t)v;
    }
    for (Py_ssize_t i = 0; i < t->n6; i++) {
        uint8_t b[16];
        PyObject *v = PyList_GET_ITEM(st6, i);
        if (!PyLong_Check(v)) { PyErr_SetString(PyExc_TypeError, "scope_table: IPv6 starts are ints"); goto fail; }
        if (_PyLong_AsByteArray((PyLongObject *)v, b, 16, 0, 0) < 0) goto fail;
        t->s6[2 * i] = be64(b);
        t->s6[2 * i + 1] = be64(b + 8);
    }
    if (t->s4[0] != 0 || t->s6[0] != 0 || t->s6[1] != 0) {
        PyErr_SetString(PyExc_ValueError, "scope_table: the tables must start at 0");
        goto fail;
    }
    for (Py_ssize_t i = 1; i < t->n4 || i < t->n6; i++) { /* the binary searches need ascending starts */
        int bad4 = i < t->n4 && t->s4[i] <= t->s4[i - 1];
        int bad6 = i < t->n6 && (t->s6[2 * i] < t->s6[2 * i - 2] ||
                                 (t->s6[2 * i] == t->s6[2 * i - 2] && t->s6[2 * i + 1] <= t->s6[2 * i - 1]));
        if (bad4 || bad6) { PyErr_SetString(PyExc_ValueError, "scope_table: starts must ascend"); goto fail; }
    }
    ret = PyCapsule_New(t, SCOPE_CAPSULE, scope_free);
    if (ret) goto done;
fail:
    if (t) { PyMem_Free(t->s4); PyMem_Free(t->s6); PyMem_Free(t->c4); PyMem_Free(t->c6); PyMem_Free(t); }
done:
    PyBuffer_Release(&c4);
    PyBuffer_Release(&c6);
    return ret;
}

/* The entry of one ctnetlink message payload p[off:end] (after the netlink header), or None when it
 * has no usable original tuple (conntrack.decode_entry). With a scope table, *egress and
 * *accountable say what Scoper.classify says of its original tuple (*egress: it is to be judged,
 * egress or, with the table's inbound mode, inbound). New reference, NULL on a
 * Python error. */
static PyObject *decode_payload(const uint8_t *p, Py_ssize_t off, Py_ssize_t end, PyTypeObject *cls,
                                const scope_t *scope, int *egress, int *accountable) {
    tuple_t orig, reply;
    int have_orig = 0, have_reply = 0;
    uint64_t ct_id = 0, pk = 0, by = 0, start = 0;
    FOR_ATTRS(p, off + 4, end, t, a, b) { /* after struct nfgenmsg */
        if (t == 1) { read_tuple(p, a, b, &orig); have_orig = 1; }
        else if (t == 2) { read_tuple(p, a, b, &reply); have_reply = 1; }
        else if (t == 9) {
            pk = by = 0;
            FOR_ATTRS(p, a, b, it, c, d) {
                if (it == 1 && d - c >= 8) pk = be64(p + c);
                else if (it == 2 && d - c >= 8) by = be64(p + c);
            }
        } else if (t == 12 && b - a >= 4) ct_id = be32(p + a);
        else if (t == 20) {
            FOR_ATTRS(p, a, b, it, c, d) {
                if (it == 1 && d - c >= 8) start = be64(p + c);
            }
        }
    }
    if (!have_orig || !addr_ok(orig.src_n) || !addr_ok(orig.dst_n)) Py_RETURN_NONE;
    int nat_dst = 0, nat_src = 0;
    if (have_reply && reply.src_n) {
        if (!addr_ok(reply.src_n) || (reply.dst_n && !addr_ok(reply.dst_n))) Py_RETURN_NONE;
        nat_dst = !same(reply.src, reply.src_n, orig.dst, orig.dst_n);
        nat_src = reply.dst_n && !same(reply.dst, reply.dst_n, orig.src, orig.src_n);
    }
    if (scope) {
        int spub, sacc, dpub, dacc;
        classify_addr(scope, orig.src, orig.src_n, &spub, &sacc);
        classify_addr(scope, orig.dst, orig.dst_n, &dpub, &dacc);
        *egress = dpub && !spub;
        *accountable = sacc && dacc;
        if (!*egress && scope->inbound && spub && !dpub) {  /* a public peer opened it to a local host */
            *egress = 1;
            *accountable = *accountable && scope->inbound == 2;
        }
    }
    PyObject *e = cls->tp_alloc(cls, 11);
    if (!e) return NULL;
    PyObject *v[11] = {
        PyLong_FromUnsignedLongLong(ct_id), PyLong_FromLong(orig.proto), src_text(orig.src, orig.src_n),
        PyLong_FromLong(orig.sport), addr_text(orig.dst, orig.dst_n), PyLong_FromLong(orig.dport),
        PyLong_FromUnsignedLongLong(pk), PyLong_FromUnsignedLongLong(by), PyLong_FromUnsignedLongLong(start),
        nat_src ? addr_text(reply.dst, reply.dst_n) : Py_NewRef(Py_None),
        nat_dst ? addr_text(reply.src, reply.src_n) : Py_NewRef(Py_None)};
    int failed = 0;
    for (int i = 0; i < 11; i++) {
        if (!v[i]) failed = 1;
        PyTuple_SET_ITEM(e, i, v[i] ? v[i] : Py_NewRef(Py_None));
    }
    if (failed) { Py_DECREF(e); return NULL; }
    PyObject_GC_UnTrack(e); /* numbers, texts and None only: never in a cycle, so young collections skip it */
    return e;
}

static int check_type(PyObject *cls) {
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "entry_type must be a tuple subclass (conntrack.CtEntry)");
        return -1;
    }
    return 0;
}

/* Each message of one datagram (conntrack.Decoder.entries + Conntrack.events): append the
 * (kind, entry, accountable) triples worth yielding to `out`. With a scope table, a NEW event whose
 * flow is not egress (destination public, source not) is left out and counted in *skipped, and
 * `accountable` is True or False; otherwise it is None. */
static int datagram(const uint8_t *p, Py_ssize_t n, PyTypeObject *cls, const scope_t *scope, PyObject *out,
                    Py_ssize_t *skipped) {
    Py_ssize_t off = 0;
    while (off + 16 <= n) {
        uint32_t len = h32(p + off);
        uint16_t mtype = h16(p + off + 4), flags = h16(p + off + 6);
        if (len < 16 || off + (Py_ssize_t)len > n) break;
        int kind = mtype & 0xFF;
        PyObject *name = NULL;
        if (mtype != NLMSG_DONE && mtype != NLMSG_ERROR) {
            if (kind == MSG_CT_NEW && (flags & NLM_F_CREATE)) name = S_NEW;
            else if (kind == MSG_CT_DELETE) name = S_DESTROY;
        }
        if (name) {
            int egress = 0, accountable = 0;
            PyObject *e = decode_payload(p, off + 16, off + len, cls, name == S_NEW ? scope : NULL, &egress,
                                         &accountable);
            if (!e) return -1;
            if (e != Py_None) {
                PyObject *acct = Py_None;
                int keep = 1;
                if (scope && name == S_NEW) {
                    if (!egress) { keep = 0; (*skipped)++; }
                    acct = accountable ? Py_True : Py_False;
                }
                if (keep) {
                    PyObject *t = PyTuple_Pack(3, name, e, acct);
                    if (t) PyObject_GC_UnTrack(t); /* a text, the untracked entry and a bool */
                    if (!t || PyList_Append(out, t) < 0) { Py_XDECREF(t); Py_DECREF(e); return -1; }
                    Py_DECREF(t);
                }
            }
            Py_DECREF(e);
        }
        off += (len + 3) & ~3u;
    }
    return 0;
}

/* One recvmmsg(MSG_DONTWAIT) of up to `want` (<= SLOTS) datagrams into `bufs`. */
static int recv_slots(int fd, struct mmsghdr *msgs, struct iovec *iov, int want) {
    for (int i = 0; i < want; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = SLOT_BYTES;
        memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    return recvmmsg(fd, msgs, (unsigned int)want, MSG_DONTWAIT, NULL);
}

static PyObject *drain(PyObject *self, PyObject *args) {
    int fd, max_dg;
    PyObject *cls, *table = Py_None;
    if (!PyArg_ParseTuple(args, "iiO|O", &fd, &max_dg, &cls, &table) || check_type(cls) < 0) return NULL;
    const scope_t *scope = NULL;
    if (table != Py_None && !(scope = PyCapsule_GetPointer(table, SCOPE_CAPSULE))) return NULL;
    Py_ssize_t skipped = 0;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    struct mmsghdr msgs[SLOTS];
    struct iovec iov[SLOTS];
    int got = 0, status = 1;
    while (got < max_dg) {
        int want = max_dg - got < SLOTS ? max_dg - got : SLOTS;
        int r = recv_slots(fd, msgs, iov, want);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) { status = 0; break; }
            if (errno == ENOBUFS) { status = 2; break; }
            Py_DECREF(out);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        for (int i = 0; i < r; i++) {
            if (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) {
                Py_DECREF(out);
                errno = EMSGSIZE;
                return PyErr_SetFromErrno(PyExc_OSError);
            }
            if (datagram(bufs[i], msgs[i].msg_len, (PyTypeObject *)cls, scope, out, &skipped) < 0) {
                Py_DECREF(out);
                return NULL;
            }
        }
        got += r;
        if (r < want) { status = 0; break; } /* the socket had no more */
    }
    return Py_BuildValue("(Niin)", out, got, status, skipped);
}

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer buf;
    PyObject *cls;
    if (!PyArg_ParseTuple(args, "y*O", &buf, &cls)) return NULL;
    if (check_type(cls) < 0) { PyBuffer_Release(&buf); return NULL; }
    PyObject *r;
    if (buf.len < 16) r = Py_NewRef(Py_None);
    else r = decode_payload(buf.buf, 16, buf.len, (PyTypeObject *)cls, NULL, NULL, NULL);
    PyBuffer_Release(&buf);
    return r;
}

static PyObject *ntop(PyObject *self, PyObject *args) {
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "y*", &buf)) return NULL;
    PyObject *r = NULL;
    if (buf.len != 4 && buf.len != 16) PyErr_SetString(PyExc_ValueError, "an address is 4 or 16 bytes");
    else r = addr_text(buf.buf, buf.len);
    PyBuffer_Release(&buf);
    return r;
}

static PyObject *classify(PyObject *self, PyObject *args) {
    PyObject *table;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "Oy*", &table, &buf)) return NULL;
    const scope_t *scope = PyCapsule_GetPointer(table, SCOPE_CAPSULE);
    PyObject *r = NULL;
    if (scope) {
        if (buf.len != 4 && buf.len != 16) PyErr_SetString(PyExc_ValueError, "an address is 4 or 16 bytes");
        else {
            int pub, acct;
            classify_addr(scope, buf.buf, buf.len, &pub, &acct);
            r = Py_BuildValue("(OO)", pub ? Py_True : Py_False, acct ? Py_True : Py_False);
        }
    }
    PyBuffer_Release(&buf);
    return r;
}

/* waiting(fd, n) -> list of bytes: up to n datagrams already queued on a socket, without waiting
 * (recvmmsg with MSG_DONTWAIT, 64 at a time); stops early when the socket is empty or reports
 * ENOBUFS. For the answers to a batch of sock_diag requests (diag_exact), which the kernel queues
 * during the send. Shares `bufs` with drain: both hold the GIL throughout and neither blocks, so
 * they never run at once. */
static PyObject *waiting(int fd, int n) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    struct mmsghdr msgs[SLOTS];
    struct iovec iov[SLOTS];
    int got = 0;
    while (got < n) {
        int want = n - got < SLOTS ? n - got : SLOTS;
        int r = recv_slots(fd, msgs, iov, want);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) break;
            Py_DECREF(out);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        for (int i = 0; i < r; i++) {
            if (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) continue; /* never for these small answers */
            PyObject *b = PyBytes_FromStringAndSize((const char *)bufs[i], msgs[i].msg_len);
            if (!b || PyList_Append(out, b) < 0) {
                Py_XDECREF(b);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(b);
        }
        got += r;
        if (r < want) break;
    }
    return out;
}

/* diag_exact(fd, flows, seq0) -> list, one item per flow: (uid, inode) of the local socket that owns
 * it, None when the kernel answered that none does, False when it was not asked (not TCP or UDP, an
 * address inet_pton refuses, mixed families) or no answer came. `flows`: objects with proto, src,
 * sport, dst, dport at tuple positions 1-5 (conntrack.CtEntry) or as attributes (flow.Flow). The
 * requests are enrich/process.py's exact inet_diag_req_v2, sequence numbers seq0, seq0 + 1, ...
 * (mod 2^32), sent 512 to a datagram; the kernel answers each during the send, and the answers are
 * read back with recvmmsg. Why in C: in Python each request's packing, parsing and dict work cost
 * about as much as judging the flow (bench_live). */
#define DIAG_CHUNK 512
#define REQ_BYTES 72 /* nlmsghdr 16 + inet_diag_req_v2 56 */

static PyObject *flow_field(PyObject *f, Py_ssize_t i, const char *name) {
    if (PyTuple_Check(f) && PyTuple_GET_SIZE(f) > i) return Py_NewRef(PyTuple_GET_ITEM(f, i));
    return PyObject_GetAttrString(f, name);
}

static int pack_addr(PyObject *text, uint8_t out[16], int *fam) {
    Py_ssize_t n;
    const char *s = PyUnicode_Check(text) ? PyUnicode_AsUTF8AndSize(text, &n) : NULL;
    if (!s) { PyErr_Clear(); return -1; }
    memset(out, 0, 16);
    if (memchr(s, ':', (size_t)n)) { *fam = AF_INET6; return inet_pton(AF_INET6, s, out) == 1 ? 0 : -1; }
    *fam = AF_INET;
    return inet_pton(AF_INET, s, out) == 1 ? 0 : -1;
}

static PyObject *diag_exact(PyObject *self, PyObject *args) {
    (void)self;
    int fd;
    PyObject *flows;
    unsigned int seq0;
    if (!PyArg_ParseTuple(args, "iOI", &fd, &flows, &seq0)) return NULL;
    PyObject *seq = PySequence_Fast(flows, "diag_exact: flows must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyList_New(n);
    if (!out) { Py_DECREF(seq); return NULL; }
    for (Py_ssize_t i = 0; i < n; i++) PyList_SET_ITEM(out, i, Py_NewRef(Py_False));
    static uint8_t req[DIAG_CHUNK * REQ_BYTES];
    for (Py_ssize_t start = 0; start < n; start += DIAG_CHUNK) {
        Py_ssize_t end = start + DIAG_CHUNK < n ? start + DIAG_CHUNK : n;
        size_t len = 0;
        int asked = 0;
        for (Py_ssize_t i = start; i < end; i++) {
            PyObject *f = PySequence_Fast_GET_ITEM(seq, i);
            PyObject *o_proto = flow_field(f, 1, "proto"), *o_src = flow_field(f, 2, "src");
            PyObject *o_sport = flow_field(f, 3, "sport"), *o_dst = flow_field(f, 4, "dst");
            PyObject *o_dport = flow_field(f, 5, "dport");
            long proto = -1, sport = -1, dport = -1;
            uint8_t a_src[16], a_dst[16];
            int fs = 0, fd2 = 0, ok = o_proto && o_src && o_sport && o_dst && o_dport;
            if (ok) {
                proto = PyLong_AsLong(o_proto);
                sport = PyLong_AsLong(o_sport);
                dport = PyLong_AsLong(o_dport);
                if (PyErr_Occurred()) { PyErr_Clear(); ok = 0; }
            } else {
                PyErr_Clear();
            }
            ok = ok && (proto == 6 || proto == 17) && sport >= 0 && sport <= 65535 && dport >= 0 && dport <= 65535 &&
                 pack_addr(o_src, a_src, &fs) == 0 && pack_addr(o_dst, a_dst, &fd2) == 0 && fs == fd2;
            Py_XDECREF(o_proto); Py_XDECREF(o_src); Py_XDECREF(o_sport); Py_XDECREF(o_dst); Py_XDECREF(o_dport);
            if (!ok) continue;
            /* UDP: the kernel looks the socket up as for an arriving datagram, remote end first */
            int udp = proto == 17;
            uint16_t p1 = htons((uint16_t)(udp ? dport : sport)), p2 = htons((uint16_t)(udp ? sport : dport));
            uint8_t *m = req + len;
            uint32_t u32;
            uint16_t u16;
            u32 = REQ_BYTES; memcpy(m, &u32, 4);
            u16 = 20; memcpy(m + 4, &u16, 2);       /* SOCK_DIAG_BY_FAMILY */
            u16 = 1; memcpy(m + 6, &u16, 2);        /* NLM_F_REQUEST */
            u32 = seq0 + (uint32_t)i; memcpy(m + 8, &u32, 4);
            u32 = 0; memcpy(m + 12, &u32, 4);
            m[16] = (uint8_t)fs; m[17] = (uint8_t)proto; m[18] = 0; m[19] = 0;
            u32 = 0xFFFFFFFF; memcpy(m + 20, &u32, 4); /* every state */
            memcpy(m + 24, &p1, 2); memcpy(m + 26, &p2, 2);
            memcpy(m + 28, udp ? a_dst : a_src, 16);
            memcpy(m + 44, udp ? a_src : a_dst, 16);
            u32 = 0; memcpy(m + 60, &u32, 4);
            u32 = 0xFFFFFFFF; memcpy(m + 64, &u32, 4); memcpy(m + 68, &u32, 4); /* no cookie */
            len += REQ_BYTES;
            asked++;
        }
        if (!asked) continue;
        if (send(fd, req, len, 0) < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) break; /* left unasked */
            Py_DECREF(out); Py_DECREF(seq);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        PyObject *answers = waiting(fd, asked); /* all queued during the send */
        if (!answers) { Py_DECREF(out); Py_DECREF(seq); return NULL; }
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(answers); k++) {
            PyObject *b = PyList_GET_ITEM(answers, k);
            const uint8_t *d = (const uint8_t *)PyBytes_AS_STRING(b);
            uint32_t dl = (uint32_t)PyBytes_GET_SIZE(b), mlen, mseq;
            uint16_t mtype;
            if (dl < 16) continue;
            memcpy(&mlen, d, 4); memcpy(&mtype, d + 4, 2); memcpy(&mseq, d + 8, 4);
            uint32_t idx = mseq - seq0;
            if (idx < (uint32_t)start || idx >= (uint32_t)end) continue; /* not one of these */
            PyObject *ans;
            if (mtype == 20 && mlen >= 16 + 72 && mlen <= dl) {
                uint32_t uid, inode;
                memcpy(&uid, d + 16 + 64, 4);
                memcpy(&inode, d + 16 + 68, 4);
                ans = inode ? Py_BuildValue("(kk)", (unsigned long)uid, (unsigned long)inode) : Py_NewRef(Py_None);
            } else {
                ans = Py_NewRef(Py_None); /* NLMSG_ERROR: no such socket */
            }
            if (!ans) { Py_DECREF(answers); Py_DECREF(out); Py_DECREF(seq); return NULL; }
            PyList_SetItem(out, (Py_ssize_t)idx, ans);
        }
        Py_DECREF(answers);
    }
    Py_DECREF(seq);
    return out;
}

static PyMethodDef methods[] = {
    {"diag_exact", diag_exact, METH_VARARGS, "Exact sock_diag lookups for many flows (see above)."},
    {"scope_table", scope_table, METH_VARARGS, "A scope table for drain (see the comment above scope_t)."},
    {"classify", classify, METH_VARARGS, "(public, accountable) of a packed address (for tests)."},
    {"ntop", ntop, METH_VARARGS, "An address's text, as inet_ntop writes it (for tests)."},
    {"drain", drain, METH_VARARGS, "Read and decode waiting conntrack events (see the module comment)."},
    {"decode", decode, METH_VARARGS, "Decode one ctnetlink message, netlink header included, or None."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ctnl", NULL, -1, methods};

PyMODINIT_FUNC PyInit__ctnl(void) {
    S_NEW = PyUnicode_InternFromString("new");
    S_DESTROY = PyUnicode_InternFromString("destroy");
    if (!S_NEW || !S_DESTROY) return NULL;
    return PyModule_Create(&module);
}
