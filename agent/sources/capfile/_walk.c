/* Optional accelerator for reading pcap files: walk record boundaries and decode flow keys.
 *
 * Finding where each record starts cannot be vectorised (each header holds the distance to the
 * next), and Python does it at ~0.4 us a record. While the walk touches each record anyway, this
 * also reads the few header fields a flow needs, exactly as agent/wire/decode.py does (the
 * reference, itself proven equal to scapy). Grouping into flows stays in numpy. Without this
 * module, walk.py and columns.py do the same in Python + numpy; tests prove all paths give identical flows.
 *
 * Per chunk of records it returns the distinct flows (key words, packets, bytes, first, last, hints) and
 * counters; flows.py merges chunks. Key words: (version<<40 | proto<<32 | sport<<16 | dport,
 * src hi, src lo, dst hi, dst lo). Per-packet status: 0 ok, 1 not IP, 2 malformed, 3 link type.
 * stop: 0 max_records reached, 1 clean end, 2 ends inside a record header,
 *       3 ends inside a packet record, 4 corrupt captured length (> max_record)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../_addrtext.h"

static inline uint32_t rd32(const uint8_t *p, int swapped) {
    uint32_t v;
    memcpy(&v, p, 4);
    return swapped ? __builtin_bswap32(v) : v;
}
static inline uint32_t be16(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }
static inline uint64_t be64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}
static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* What a packet can hold beyond its flow key, for the passes that read payloads (capfile/names.py, the
 * tunnel pass): a host name (a DNS response from port 53 or 5353 or the query it answers, a UDP datagram of QUIC-Initial
 * size with the long-header bit), TCP payload (which starts a TLS handshake record, or is not
 * captured), or a GRE / GTP-U tunnel. */
#define CAND_NAME 1
#define CAND_TUNNEL 2
#define CAND_TLS_START 4
#define CAND_TCP_DATA 8
#define CAND_QUERY 16 /* a DNS query, handed over as its key (see query_key), not as a packet */
#define QKEY_MAX 262  /* id (2) + question (at most 255 name octets + 1 + 4) */
#define FIRST_SEGMENTS 6 /* TCP payload segments per direction per chunk offered to the TLS reader */

#include "_packet.h"

/* Decode one packet; mirrors decode.decode(). Returns status; *named gets the CAND_ bits, *hints
 * the opener hints; for a DNS query in a plain shape (IPv4 unfragmented, IPv6 without extension
 * headers), *q_off / *q_end give its UDP payload (the bytes names/packet.py transport() would give). */
static int decode(int lt, const uint8_t *d, Py_ssize_t n, Py_ssize_t wire, uint64_t *w, int64_t *iplen,
                  int *named, int64_t *hints, Py_ssize_t *q_off, Py_ssize_t *q_end) {
    Py_ssize_t off;
    int hint;
    uint32_t et;
    switch (lt) {
    case 1:
        if (n < 14) return 2;
        et = be16(d + 12);
        off = 14;
        while (et == 0x8100 || et == 0x88A8 || et == 0x9100) {
            if (n < off + 4) return 2;
            et = be16(d + off + 2);
            off += 4;
        }
        if (et == 0x0800) hint = 4; else if (et == 0x86DD) hint = 6; else return 1;
        break;
    case 113:
        if (n < 16) return 2;
        et = be16(d + 14);
        off = 16;
        if (et == 0x0800) hint = 4; else if (et == 0x86DD) hint = 6; else return 1;
        break;
    case 276:
        if (n < 20) return 2;
        et = be16(d);
        off = 20;
        if (et == 0x0800) hint = 4; else if (et == 0x86DD) hint = 6; else return 1;
        break;
    case 101: case 12: case 14: off = 0; hint = 0; break;
    case 228: off = 0; hint = 4; break;
    case 229: off = 0; hint = 6; break;
    case 0: case 108: {
        if (n < 4) return 2;
        uint32_t fam = lt == 108 ? be32(d) : (uint32_t)d[0] | ((uint32_t)d[1] << 8) | ((uint32_t)d[2] << 16) | ((uint32_t)d[3] << 24);
        if (lt == 0 && fam > 0xFFFF) fam = be32(d);
        off = 4;
        if (fam == 2) hint = 4;
        else if (fam == 10 || fam == 24 || fam == 28 || fam == 30) hint = 6;
        else return 1;
        break;
    }
    default: return 3;
    }
    Py_ssize_t wire_avail = wire - off;
    if (n <= off) return 2;
    int ver = d[off] >> 4;
    if (hint && ver != hint) return 2;
    uint32_t proto;
    Py_ssize_t l4;
    int first = 1;
    if (ver == 4) {
        if (n < off + 20) return 2;
        Py_ssize_t ihl = (d[off] & 0x0F) * 4;
        Py_ssize_t total = be16(d + off + 2);
        if (ihl < 20 || total < ihl || total > wire_avail) return 2;
        proto = d[off + 9];
        w[1] = 0; w[2] = be32(d + off + 12);
        w[3] = 0; w[4] = be32(d + off + 16);
        first = (be16(d + off + 6) & 0x1FFF) == 0;
        l4 = off + ihl;
        *iplen = total;
    } else if (ver == 6) {
        if (n < off + 40) return 2;
        Py_ssize_t total = 40 + be16(d + off + 4);
        if (total > wire_avail) return 2;
        proto = d[off + 6];
        w[1] = be64(d + off + 8); w[2] = be64(d + off + 16);
        w[3] = be64(d + off + 24); w[4] = be64(d + off + 32);
        l4 = off + 40;
        *iplen = total;
        for (;;) {
            Py_ssize_t size;
            if (proto == 44) {
                if (n < l4 + 8) return 2;
                first = (be16(d + l4 + 2) & 0xFFF8) == 0;
                size = 8;
            } else if (proto == 51) {
                if (n < l4 + 8) return 2;
                size = ((Py_ssize_t)d[l4 + 1] + 2) * 4;
            } else if (proto == 0 || proto == 43 || proto == 60 || proto == 135 || proto == 139 || proto == 140) {
                if (n < l4 + 8) return 2;
                size = ((Py_ssize_t)d[l4 + 1] + 1) * 8;
            } else break;
            proto = d[l4];
            l4 += size;
        }
    } else return 2;
    uint32_t sport = 0, dport = 0;
    if ((proto == 6 || proto == 17 || proto == 132) && first) {
        if (n < l4 + 4) return 2;
        sport = be16(d + l4);
        dport = be16(d + l4 + 2);
    }
    w[0] = ((uint64_t)ver << 40) | ((uint64_t)proto << 32) | ((uint64_t)sport << 16) | dport;
    *hints = hints_of(proto, d, n, l4, first);
    if ((*hints & HINT_ICMP_ERROR) && quoted_key(d, n, l4, ver, w)) *hints = HINT_ICMP_ERROR;
    *named = 0;
    if (proto == 47 || (proto == 17 && first && (sport == 2152 || dport == 2152))) *named |= CAND_TUNNEL;
    if (first && proto == 17) {
        Py_ssize_t payload = (Py_ssize_t)*iplen - (l4 - off) - 8;
        if (sport == 53 || sport == 5353) *named |= CAND_NAME; /* answers */
        else if (dport == 53 || dport == 5353) {
            /* a query: its key in C where the packet's shape is plain (as transport() reads it) */
            int plain = ver == 4 ? (be16(d + off + 6) & 0x3FFF) == 0 : l4 == off + 40;
            Py_ssize_t end = off + (Py_ssize_t)*iplen;
            if (end > n) end = n;
            if (plain && end >= l4 + 8) {
                *q_off = l4 + 8;
                *q_end = end;
                *named |= CAND_QUERY;
            } else *named |= CAND_NAME;
        } else if (payload >= 1200 && (n <= l4 + 8 || (d[l4 + 8] & 0x80))) *named |= CAND_NAME;
    } else if (first && proto == 6) {
        if (n > l4 + 12) {
            Py_ssize_t thl = (d[l4 + 12] >> 4) * 4;
            if (thl >= 20 && (Py_ssize_t)*iplen - (l4 - off) - thl > 0)
                *named |= (n <= l4 + thl || d[l4 + thl] == 0x16) ? CAND_TLS_START | CAND_TCP_DATA : CAND_TCP_DATA;
        }
    }
    return 0;
}

#include "_flowtable.h"

/* A flow table kept across walk_pcap calls (a capsule from table_new): every chunk's flows land in
 * one table, so Python has no per-chunk groups to merge; table_dump hands them over at the end. */
static void table_free(PyObject *cap) {
    table_t *t = (table_t *)PyCapsule_GetPointer(cap, "egress_agent.flow_table");
    if (t) { free(t->slots); free(t->old); free(t); }
}

static PyObject *table_new(PyObject *self, PyObject *args) {
    (void)self; (void)args;
    table_t *t = calloc(1, sizeof(table_t));
    if (!t) return PyErr_NoMemory();
    t->slots = calloc(4096, sizeof(slot_t));
    if (!t->slots) { free(t); return PyErr_NoMemory(); }
    t->cap = 4096;
    PyObject *cap = PyCapsule_New(t, "egress_agent.flow_table", table_free);
    if (!cap) { free(t->slots); free(t); }
    return cap;
}

/* The record at `off`, if whole: its captured length in *caplen and -1; else the stop code (see
 * the module comment). Shared by walk_pcap and pcap_offsets, so both stop at the same place. */
static inline int record_at(const uint8_t *p, Py_ssize_t off, Py_ssize_t end, Py_ssize_t n, Py_ssize_t max_records,
                            int swapped, Py_ssize_t max_record, uint32_t *caplen) {
    if (n >= max_records) return 0;
    if (off + 16 > end) return 2;
    *caplen = rd32(p + off + 8, swapped);
    if ((Py_ssize_t)*caplen > max_record) return 4;
    if (off + 16 + (Py_ssize_t)*caplen > end) return 3;
    return -1;
}

/* The flows of a table as (words u64[g*5], packets i64[g], bytes i64[g], first f64[g], last f64[g],
 * hints i64[g]): the slots' flows, then those cut off by an idle gap. */
static PyObject *groups_of(const table_t *t) {
    Py_ssize_t g = (Py_ssize_t)(t->count + t->n_old);
    PyObject *o_w = PyBytes_FromStringAndSize(NULL, g * 40), *o_p = PyBytes_FromStringAndSize(NULL, g * 8),
             *o_b = PyBytes_FromStringAndSize(NULL, g * 8), *o_f = PyBytes_FromStringAndSize(NULL, g * 8),
             *o_l = PyBytes_FromStringAndSize(NULL, g * 8), *o_h = PyBytes_FromStringAndSize(NULL, g * 8);
    if (!o_w || !o_p || !o_b || !o_f || !o_l || !o_h) {
        Py_XDECREF(o_w); Py_XDECREF(o_p); Py_XDECREF(o_b); Py_XDECREF(o_f); Py_XDECREF(o_l); Py_XDECREF(o_h);
        return NULL;
    }
    uint64_t *w = (uint64_t *)PyBytes_AS_STRING(o_w);
    int64_t *pk = (int64_t *)PyBytes_AS_STRING(o_p), *by = (int64_t *)PyBytes_AS_STRING(o_b);
    int64_t *hi = (int64_t *)PyBytes_AS_STRING(o_h);
    double *fi = (double *)PyBytes_AS_STRING(o_f), *la = (double *)PyBytes_AS_STRING(o_l);
    Py_ssize_t j = 0;
    for (size_t i = 0; i < t->cap + t->n_old; i++) {
        const slot_t *s = i < t->cap ? &t->slots[i] : &t->old[i - t->cap];
        if (i < t->cap && !s->used) continue;
        memcpy(w + j * 5, s->k, 40);
        pk[j] = s->packets; by[j] = s->bytes; fi[j] = s->first; la[j] = s->last; hi[j] = s->hints;
        j++;
    }
    return Py_BuildValue("NNNNNN", o_w, o_p, o_b, o_f, o_l, o_h);
}

/* Candidate packets for the payload passes, in capture order. */
typedef struct { int64_t off, caplen, wire; double ts; int64_t kind; uint64_t h; } cand_t;
typedef struct { cand_t *v; size_t n, cap; } cands_t;

static int push(cands_t *c, cand_t x) {
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 1024;
        cand_t *v = realloc(c->v, cap * sizeof(cand_t));
        if (!v) return -1;
        c->v = v; c->cap = cap;
    }
    c->v[c->n++] = x;
    return 0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int has_u64(const uint64_t *v, size_t n, uint64_t x) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (v[mid] < x) lo = mid + 1; else hi = mid;
    }
    return lo < n && v[lo] == x;
}

/* walk_pcap(buffer, offset, max_records, swapped, max_record, linktype, ts_unit, tls_before[, table])
 *   -> (words u64[g*5], packets i64[g], bytes i64[g], first f64[g], last f64[g], hints i64[g],
 *       (records, ip_packets, ip_bytes, non_ip, malformed, unsupported, named), next_offset, stop,
 *       candidates, tls_started, queries)
 * candidates: rows of (packet offset, caplen, wire length, ts as f64 bits, CAND_ bits) i64[c*5], in
 * capture order: UDP name carriers, tunnels, and the first FIRST_SEGMENTS TCP payload segments of
 * each flow direction that starts a TLS record in this chunk or whose key hash is in tls_before
 * (sorted u64: directions that started one in an earlier chunk). tls_started: sorted u64 key
 * hashes of the directions that started one in this chunk. With `table` (from table_new) the
 * flows go into it and the group arrays are empty. */
static PyObject *walk_pcap(PyObject *self, PyObject *args) {
    Py_buffer view, before;
    Py_ssize_t off, max_records, max_record;
    int swapped, lt;
    double unit;
    PyObject *keep = NULL;
    if (!PyArg_ParseTuple(args, "y*nnpnidy*|O", &view, &off, &max_records, &swapped, &max_record, &lt, &unit, &before,
                          &keep))
        return NULL;
    table_t *kept_t = NULL;
    if (keep && keep != Py_None) {
        kept_t = (table_t *)PyCapsule_GetPointer(keep, "egress_agent.flow_table");
        if (!kept_t) { PyBuffer_Release(&view); PyBuffer_Release(&before); return NULL; }
    }
    const uint8_t *p = (const uint8_t *)view.buf;
    const uint64_t *prior = (const uint64_t *)before.buf;
    size_t n_prior = (size_t)before.len / 8;
    Py_ssize_t end = view.len, n = 0;
    int stop = 1, oom = 0;
    long long counts[7] = {0, 0, 0, 0, 0, 0, 0};
    table_t t = {NULL, 0, 0, 0, NULL, 0, 0};
    if (kept_t) {
        t = *kept_t;
        t.epoch++;
    } else {
        t.slots = calloc(4096, sizeof(slot_t));
        t.cap = 4096;
    }
    cands_t c = {NULL, 0, 0};
    uint64_t *tls = NULL;
    size_t n_tls = 0, cap_tls = 0, kept = 0;
    uint8_t *qbuf = NULL; /* the chunk's DNS queries (see CAND_QUERY) */
    size_t n_q = 0, cap_q = 0;
    if (!t.slots) { PyBuffer_Release(&view); PyBuffer_Release(&before); return PyErr_NoMemory(); }
    Py_BEGIN_ALLOW_THREADS
    while (off < end) {
        uint32_t caplen;
        int why = record_at(p, off, end, n, max_records, swapped, max_record, &caplen);
        if (why >= 0) { stop = why; break; }
        double ts = (double)rd32(p + off, swapped) + (double)rd32(p + off + 4, swapped) * unit;
        uint32_t wire = rd32(p + off + 12, swapped);
        uint64_t k[5] = {0, 0, 0, 0, 0};
        int64_t len = 0, hints = 0;
        int named = 0;
        Py_ssize_t q_off = 0, q_end = 0;
        int st = decode(lt, p + off + 16, caplen, wire, k, &len, &named, &hints, &q_off, &q_end);
        Py_ssize_t at = off + 16;
        n++;
        off += 16 + caplen;
        if (st) { counts[2 + st]++; continue; }
        counts[1]++;
        counts[2] += len;
        slot_t *s = find(&t, k);
        if (!s->used) {
            memcpy(s->k, k, 40);
            s->used = 1; s->packets = 0; s->bytes = 0; s->hints = 0; s->first = ts; s->last = ts; s->segs = 0;
            s->epoch = t.epoch;
            if (++t.count * 2 > t.cap) {
                if (grow(&t) < 0) { oom = 1; break; }
                s = find(&t, k);
            }
        } else if (ts > s->last + idle_of(k) || ts < s->first - idle_of(k)) { /* quiet too long: a new connection */
            if (retire(&t, s) < 0) { oom = 1; break; }
            s->packets = 0; s->bytes = 0; s->hints = 0; s->first = ts; s->last = ts; s->segs = 0;
            s->epoch = t.epoch;
        }
        s->packets++;
        s->bytes += len;
        s->hints |= hints;
        if (ts < s->first) s->first = ts;
        if (ts > s->last) s->last = ts;
        if (named & CAND_TCP_DATA) {
            if (s->epoch != t.epoch) { s->epoch = t.epoch; s->segs = 0; } /* a new chunk: count again */
            if (s->segs >= FIRST_SEGMENTS) named &= ~(CAND_TCP_DATA | CAND_TLS_START);
            else s->segs++;
        }
        if (named & CAND_QUERY) { /* packet offset, ts, src, dst, sport, dport, key length, key */
            uint8_t rec[16 + 32 + 4 + 2 + QKEY_MAX];
            int klen = query_key(p + at + q_off, q_end - q_off, rec + 54);
            named &= ~CAND_QUERY;
            counts[6]++;
            if (klen >= 0) {
                int64_t pos = (int64_t)at;
                memcpy(rec, &pos, 8);
                memcpy(rec + 8, &ts, 8);
                for (int j = 0; j < 4; j++)
                    for (int b = 0; b < 8; b++) rec[16 + j * 8 + b] = (uint8_t)(k[1 + j] >> (56 - 8 * b));
                rec[48] = (uint8_t)(k[0] >> 24); rec[49] = (uint8_t)(k[0] >> 16); /* sport */
                rec[50] = (uint8_t)(k[0] >> 8); rec[51] = (uint8_t)k[0];         /* dport */
                rec[52] = (uint8_t)(klen >> 8); rec[53] = (uint8_t)klen;
                size_t need = 54 + (size_t)klen;
                if (n_q + need > cap_q) {
                    size_t cap = cap_q ? cap_q * 2 : 65536;
                    while (cap < n_q + need) cap *= 2;
                    uint8_t *v = realloc(qbuf, cap);
                    if (!v) { oom = 1; break; }
                    qbuf = v; cap_q = cap;
                }
                memcpy(qbuf + n_q, rec, need);
                n_q += need;
            }
        }
        if (named & (CAND_NAME | CAND_TUNNEL)) counts[6] += (named & CAND_NAME) != 0;
        if (named & CAND_TLS_START) {
            counts[6]++;
            if (n_tls == cap_tls) {
                size_t cap = cap_tls ? cap_tls * 2 : 256;
                uint64_t *v = realloc(tls, cap * 8);
                if (!v) { oom = 1; break; }
                tls = v; cap_tls = cap;
            }
            tls[n_tls++] = (uint64_t)hash5(k);
        }
        if (named) {
            cand_t x = {at, caplen, wire, ts, named, (uint64_t)hash5(k)};
            if (push(&c, x) < 0) { oom = 1; break; }
        }
    }
    if (!oom && n_tls) {
        qsort(tls, n_tls, 8, cmp_u64);
        size_t u = 0;
        for (size_t i = 0; i < n_tls; i++)
            if (u == 0 || tls[u - 1] != tls[i]) tls[u++] = tls[i];
        n_tls = u;
    }
    /* keep TCP payload segments only of directions that started a TLS record (here or before) */
    if (!oom) {
        for (size_t i = 0; i < c.n; i++) {
            cand_t x = c.v[i];
            if ((x.kind & CAND_TCP_DATA) && !has_u64(tls, n_tls, x.h) && !has_u64(prior, n_prior, x.h)) continue;
            c.v[kept++] = x;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    PyBuffer_Release(&before);
    if (kept_t) { /* the table lives on (grown or not); this call hands over no groups */
        *kept_t = t;
        t.slots = NULL;
        t.count = 0;
        t.cap = 0;
        t.old = NULL;
        t.n_old = 0;
    }
    if (oom) { free(t.slots); free(t.old); free(c.v); free(tls); free(qbuf); return PyErr_NoMemory(); }
    counts[0] = n;
    /* counts: records, ip_packets, ip_bytes, non_ip(st 1), malformed(st 2), unsupported(st 3),
     * packets that can carry a name */
    PyObject *groups = groups_of(&t),
             *o_c = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)kept * 40),
             *o_t = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n_tls * 8),
             *o_q = PyBytes_FromStringAndSize((const char *)qbuf, (Py_ssize_t)n_q);
    free(t.slots);
    free(t.old);
    free(qbuf);
    if (!groups || !o_c || !o_t || !o_q) {
        free(c.v); free(tls);
        Py_XDECREF(groups); Py_XDECREF(o_c); Py_XDECREF(o_t); Py_XDECREF(o_q);
        return NULL;
    }
    int64_t *co = (int64_t *)PyBytes_AS_STRING(o_c);
    for (size_t i = 0; i < kept; i++) {
        co[i * 5] = c.v[i].off; co[i * 5 + 1] = c.v[i].caplen; co[i * 5 + 2] = c.v[i].wire;
        memcpy(co + i * 5 + 3, &c.v[i].ts, 8);
        co[i * 5 + 4] = c.v[i].kind;
    }
    if (n_tls) memcpy(PyBytes_AS_STRING(o_t), tls, n_tls * 8);
    free(c.v); free(tls);
    PyObject *out = Py_BuildValue("OOOOOO(LLLLLLL)niNNN", PyTuple_GET_ITEM(groups, 0), PyTuple_GET_ITEM(groups, 1),
                                  PyTuple_GET_ITEM(groups, 2), PyTuple_GET_ITEM(groups, 3), PyTuple_GET_ITEM(groups, 4),
                                  PyTuple_GET_ITEM(groups, 5),
                                  counts[0], counts[1], counts[2], counts[3], counts[4], counts[5], counts[6], off, stop,
                                  o_c, o_t, o_q);
    Py_DECREF(groups);
    return out;
}

/* pcap_offsets(buffer, offset, max_records, swapped, max_record) -> (offsets i64[n], next_offset, stop)
 * The record walk alone, for the passes that decode only some packets (names, tunnels): the same
 * boundaries and stop codes as walk_pcap, proven equal to walk._py_walk in the tests. */
static PyObject *pcap_offsets(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t off, max_records, max_record;
    int swapped;
    if (!PyArg_ParseTuple(args, "y*nnpn", &view, &off, &max_records, &swapped, &max_record)) return NULL;
    const uint8_t *p = (const uint8_t *)view.buf;
    Py_ssize_t end = view.len, n = 0;
    int stop = 1;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (max_records > 0 ? max_records : 1) * 8);
    if (!out) { PyBuffer_Release(&view); return NULL; }
    int64_t *o = (int64_t *)PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    while (off < end) {
        uint32_t caplen;
        int why = record_at(p, off, end, n, max_records, swapped, max_record, &caplen);
        if (why >= 0) { stop = why; break; }
        o[n++] = off;
        off += 16 + caplen;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (_PyBytes_Resize(&out, n * 8) < 0) return NULL;
    return Py_BuildValue("Nni", out, off, stop);
}

/* table_dump(table) -> (words u64[g*5], packets i64[g], bytes i64[g], first f64[g], last f64[g], hints i64[g],
 *                       parts): parts, how many of the g flows were cut off by an idle gap (0: no key repeats) */
static PyObject *table_dump(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *keep;
    if (!PyArg_ParseTuple(args, "O", &keep)) return NULL;
    table_t *t = (table_t *)PyCapsule_GetPointer(keep, "egress_agent.flow_table");
    if (!t) return NULL;
    PyObject *g = groups_of(t);
    if (!g) return NULL;
    PyObject *out = Py_BuildValue("OOOOOOn", PyTuple_GET_ITEM(g, 0), PyTuple_GET_ITEM(g, 1), PyTuple_GET_ITEM(g, 2),
                                  PyTuple_GET_ITEM(g, 3), PyTuple_GET_ITEM(g, 4), PyTuple_GET_ITEM(g, 5),
                                  (Py_ssize_t)t->n_old);
    Py_DECREF(g);
    return out;
}

/* addr_texts(v4 bool[n], hi u64[n], lo u64[n]) -> list of n str or None: each address's text as
 * flowtable.addr_text spells it (IPv4 in lo). None where that spelling comes from ipaddress (IPv6
 * with hi 0 and lo >> 32 of 0 or 0xFFFF: the ::a.b.c.d forms), which the caller fills in. The
 * audit spells ~100,000 distinct destinations; in Python that is ~1.5 us each. */
static PyObject *addr_texts(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer v4, hi, lo;
    if (!PyArg_ParseTuple(args, "y*y*y*", &v4, &hi, &lo)) return NULL;
    PyObject *out = NULL;
    Py_ssize_t n = v4.len;
    if (hi.len != n * 8 || lo.len != n * 8) {
        PyErr_SetString(PyExc_ValueError, "addr_texts: v4 needs one byte and hi, lo eight per address");
        goto done;
    }
    out = PyList_New(n);
    if (!out) goto done;
    const uint8_t *f = v4.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t h, l;
        memcpy(&h, (const uint8_t *)hi.buf + 8 * i, 8);
        memcpy(&l, (const uint8_t *)lo.buf + 8 * i, 8);
        uint8_t a[16];
        char text[INET6_ADDRSTRLEN];
        int len;
        if (f[i]) {
            for (int k = 0; k < 4; k++) a[k] = (uint8_t)(l >> (24 - 8 * k));
            len = fmt_addr(a, 4, text);
        } else if (h == 0 && ((l >> 32) == 0 || (l >> 32) == 0xFFFF)) {
            Py_INCREF(Py_None);
            PyList_SET_ITEM(out, i, Py_None);
            continue;
        } else {
            for (int k = 0; k < 8; k++) {
                a[k] = (uint8_t)(h >> (56 - 8 * k));
                a[8 + k] = (uint8_t)(l >> (56 - 8 * k));
            }
            len = fmt_addr(a, 16, text);
        }
        PyObject *s = len < 0 ? PyErr_SetFromErrno(PyExc_OSError) : PyUnicode_FromStringAndSize(text, len);
        if (!s) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, s);
    }
done:
    PyBuffer_Release(&v4);
    PyBuffer_Release(&hi);
    PyBuffer_Release(&lo);
    return out;
}

static PyMethodDef methods[] = {
    {"walk_pcap", walk_pcap, METH_VARARGS, "Walk pcap records, decode and group flows (see module comment)."},
    {"table_new", table_new, METH_NOARGS, "A flow table kept across walk_pcap calls."},
    {"table_dump", table_dump, METH_VARARGS, "The flows of a kept table."},
    {"pcap_offsets", pcap_offsets, METH_VARARGS, "Record offsets of a pcap window (see pcap_offsets above)."},
    {"addr_texts", addr_texts, METH_VARARGS, "Address texts from key words (see addr_texts above)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_walk", NULL, -1, methods};

PyMODINIT_FUNC PyInit__walk(void) { return PyModule_Create(&module); }
