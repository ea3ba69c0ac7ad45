/* Optional accelerator for JSON-lines flow logs: the plain file straight into columns.
 *
 * Why: flowlog/table.py reads a flow log with one orjson.loads per line, then takes each column out
 * of the dicts: ~6 us a flow, twice the time spent judging it. A log written by `Flow.to_json`
 * (the tool's own output, and what other collectors are asked to write) is a narrow case of JSON;
 * this reads exactly that case and nothing else.
 *
 * columns(data, max_line) -> None, or a tuple (see the end of `columns`) of:
 *   n rows; proto (int64: 0..255 a number, 256 + i the i-th distinct proto string); per string
 *   column (proto, address, source, hostname, hostname_source) its distinct strings as a list and
 *   each row's index in it (int32, -1 null or absent); sport, dport, packets, bytes (int64, absent or
 *   null as 0, 0, 1, 0); first, last (float64 POSIX seconds, from RFC 3339 "...Z" text or a number
 *   without sign or exponent; absent or null: 0 and first); the
 *   addresses as key words (v4 uint8, hi, lo uint64; `ok` 0 where Python must spell it: inet_pton
 *   refused it, or an IPv6 address whose first five groups are zero).
 * None means "not this case": the caller reads the file as before (flowlog/table.py, then flowlog/jsonl.py), so what
 * is accepted, and every error message, keeps one definition. Returned for: any byte sequence that is
 * not a JSON object of known keys with plain values on one line (keys: proto, src, sport, dst, dport,
 * packets, bytes, first_seen, last_seen, source, hostname, hostname_source); a repeated key; a string
 * with a backslash, a control character or a non-ASCII byte; a number with a sign or exponent, a
 * fraction outside the times, or beyond its field's range; true/false, objects, arrays; a time
 * text not exactly "YYYY-MM-DDTHH:MM:SS[.ffffff]Z" of a real date from 1970 on with fewer than
 * 2^53 microseconds, or a numeric time longer than 40 characters;
 * proto, src or dst absent or null; an empty line or one longer than max_line.
 * tests/sources/test_jsonl_fast.py proves it equal to the Python reader on random and mutated logs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- distinct strings: open addressing on (offset, length) into the data ---- */
typedef struct {
    Py_ssize_t *off, *len;
    uint32_t *slots; /* index + 1, 0 empty */
    size_t n, cap, nslots;
} strtab_t;

static void st_free(strtab_t *t) { free(t->off); free(t->len); free(t->slots); }

static uint64_t st_hash(const char *p, Py_ssize_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (Py_ssize_t i = 0; i < n; i++) h = (h ^ (uint8_t)p[i]) * 1099511628211ULL;
    return h ^ (h >> 29);
}

static int st_rehash(strtab_t *t, const char *base, size_t nslots) {
    uint32_t *s = calloc(nslots, sizeof(uint32_t));
    if (!s) return -1;
    for (size_t k = 0; k < t->n; k++) {
        size_t i = st_hash(base + t->off[k], t->len[k]) & (nslots - 1);
        while (s[i]) i = (i + 1) & (nslots - 1);
        s[i] = (uint32_t)(k + 1);
    }
    free(t->slots);
    t->slots = s;
    t->nslots = nslots;
    return 0;
}

/* The index of data[off:off+len] among the distinct strings, added if new; -1 out of memory. */
static int32_t st_intern(strtab_t *t, const char *base, Py_ssize_t off, Py_ssize_t len) {
    if (t->nslots == 0 || (t->n + 1) * 2 > t->nslots) {
        if (st_rehash(t, base, t->nslots ? t->nslots * 2 : 64) < 0) return -1;
    }
    size_t i = st_hash(base + off, len) & (t->nslots - 1);
    while (t->slots[i]) {
        size_t k = t->slots[i] - 1;
        if (t->len[k] == len && memcmp(base + t->off[k], base + off, (size_t)len) == 0) return (int32_t)k;
        i = (i + 1) & (t->nslots - 1);
    }
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 64;
        Py_ssize_t *o = realloc(t->off, cap * sizeof(Py_ssize_t));
        if (!o) return -1;
        t->off = o;
        Py_ssize_t *l = realloc(t->len, cap * sizeof(Py_ssize_t));
        if (!l) return -1;
        t->len = l;
        t->cap = cap;
    }
    t->off[t->n] = off;
    t->len[t->n] = len;
    t->slots[i] = (uint32_t)(t->n + 1);
    return (int32_t)t->n++;
}

static PyObject *st_list(const strtab_t *t, const char *base) {
    PyObject *l = PyList_New((Py_ssize_t)t->n);
    if (!l) return NULL;
    for (size_t k = 0; k < t->n; k++) {
        PyObject *s = PyUnicode_DecodeASCII(base + t->off[k], t->len[k], NULL);
        if (!s) { Py_DECREF(l); return NULL; }
        PyList_SET_ITEM(l, (Py_ssize_t)k, s);
    }
    return l;
}

/* ---- growable columns ---- */
typedef struct { char *v; size_t n, cap, size; } col_t;

static int col_push(col_t *c, const void *x) {
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 4096;
        char *v = realloc(c->v, cap * c->size);
        if (!v) return -1;
        c->v = v;
        c->cap = cap;
    }
    memcpy(c->v + c->n * c->size, x, c->size);
    c->n++;
    return 0;
}

static PyObject *col_bytes(const col_t *c) {
    return PyBytes_FromStringAndSize(c->v ? c->v : "", (Py_ssize_t)(c->n * c->size));
}

/* ---- the plain line ---- */
enum { K_PROTO, K_SRC, K_SPORT, K_DST, K_DPORT, K_PACKETS, K_BYTES, K_FIRST, K_LAST, K_SOURCE, K_HOST, K_HSRC, NKEYS };
static const char *const KEYS[NKEYS] = {"proto", "src", "sport", "dst", "dport", "packets", "bytes",
                                        "first_seen", "last_seen", "source", "hostname", "hostname_source"};

static int key_id(const char *p, Py_ssize_t n) {
    for (int k = 0; k < NKEYS; k++)
        if ((Py_ssize_t)strlen(KEYS[k]) == n && memcmp(KEYS[k], p, (size_t)n) == 0) return k;
    return -1;
}

static inline const char *ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r')) p++;
    return p;
}

/* A string's body: [*s, *e) after the opening quote; NULL if not plain ASCII without escapes. */
static const char *plain_string(const char *p, const char *end, const char **s) {
    *s = p;
    while (p < end && *p != '"') {
        uint8_t c = (uint8_t)*p;
        if (c < 0x20 || c >= 0x80 || c == '\\') return NULL;
        p++;
    }
    return p < end ? p : NULL; /* at the closing quote */
}

/* A JSON unsigned integer without fraction or exponent, at most `max`; NULL otherwise. */
static const char *plain_int(const char *p, const char *end, uint64_t max, int64_t *out) {
    const char *s = p;
    uint64_t v = 0;
    while (p < end && *p >= '0' && *p <= '9') {
        if (p - s >= 19) return NULL;
        v = v * 10 + (uint64_t)(*p - '0');
        p++;
    }
    if (p == s || (*s == '0' && p - s > 1)) return NULL;
    if (p < end && (*p == '.' || *p == 'e' || *p == 'E')) return NULL;
    if (v > max) return NULL;
    *out = (int64_t)v;
    return p;
}

/* A JSON number that is a time: digits, an optional fraction, no sign or exponent (those take the
 * Python reader), at most 40 characters; strtod rounds correctly, as float() of the same text does
 * (orjson and the line reader); NULL otherwise. */
static const char *plain_time(const char *p, const char *end, double *out) {
    const char *s = p;
    while (p < end && *p >= '0' && *p <= '9') p++;
    if (p == s || (*s == '0' && p - s > 1 && s[1] != '.')) return NULL;
    if (p < end && *p == '.') {
        const char *f = ++p;
        while (p < end && *p >= '0' && *p <= '9') p++;
        if (p == f) return NULL;
    }
    if (p < end && (*p == 'e' || *p == 'E')) return NULL;
    if (p - s > 40) return NULL;
    char buf[48];
    memcpy(buf, s, (size_t)(p - s));
    buf[p - s] = 0;
    *out = strtod(buf, NULL);
    return p;
}

static int64_t days_from_civil(int64_t y, unsigned m, unsigned d) {
    y -= m <= 2;
    const int64_t era = (y >= 0 ? y : y - 399) / 400;
    const unsigned yoe = (unsigned)(y - era * 400);
    const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

static int digits(const char *p, int n, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        v = v * 10 + (unsigned)(p[i] - '0');
    }
    *out = v;
    return 0;
}

/* "YYYY-MM-DDTHH:MM:SS[.ffffff]Z" -> POSIX seconds, as numpy's datetime64[us] / 1e6; -1 refused. */
static int parse_time(const char *s, Py_ssize_t n, double *out) {
    if (n != 20 && n != 27) return -1;
    unsigned y, mo, d, h, mi, se, us = 0;
    if (digits(s, 4, &y) || s[4] != '-' || digits(s + 5, 2, &mo) || s[7] != '-' || digits(s + 8, 2, &d) ||
        s[10] != 'T' || digits(s + 11, 2, &h) || s[13] != ':' || digits(s + 14, 2, &mi) || s[16] != ':' ||
        digits(s + 17, 2, &se))
        return -1;
    if (n == 20) {
        if (s[19] != 'Z') return -1;
    } else if (s[19] != '.' || digits(s + 20, 6, &us) || s[26] != 'Z') {
        return -1;
    }
    static const unsigned dim[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (y < 1970 || mo < 1 || mo > 12 || d < 1 || h > 23 || mi > 59 || se > 59) return -1;
    unsigned leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (d > dim[mo - 1] + (mo == 2 ? leap : 0)) return -1;
    int64_t t = ((days_from_civil(y, mo, d) * 24 + h) * 60 + mi) * 60 + se;
    int64_t total = t * 1000000 + us;
    if (total < 0 || total >= ((int64_t)1 << 53)) return -1;
    *out = (double)total / 1e6;
    return 0;
}

typedef struct {
    strtab_t tab[5]; /* proto, address, source, hostname, hostname_source */
    col_t proto, src, dst, sport, dport, packets, bytes, first, last, source, host, hsrc;
} cols_t;

/* One line [p, end) into the columns; 0 ok, 1 not plain, -1 out of memory. */
static int parse_line(cols_t *c, const char *base, const char *p, const char *end) {
    int64_t iv[NKEYS];
    int32_t sv[NKEYS];
    double tv[NKEYS];
    unsigned seen = 0, null = 0;
    p = ws(p, end);
    if (p >= end || *p++ != '{') return 1;
    p = ws(p, end);
    if (p < end && *p == '}') return 1;
    for (;;) {
        if (p >= end || *p++ != '"') return 1;
        const char *ks;
        const char *ke = plain_string(p, end, &ks);
        if (!ke) return 1;
        int k = key_id(ks, ke - ks);
        if (k < 0 || (seen & (1u << k))) return 1;
        seen |= 1u << k;
        p = ws(ke + 1, end);
        if (p >= end || *p++ != ':') return 1;
        p = ws(p, end);
        if (p >= end) return 1;
        if (*p == 'n') {
            if (end - p < 4 || memcmp(p, "null", 4) != 0) return 1;
            p += 4;
            null |= 1u << k;
        } else if (*p == '"') {
            const char *s;
            const char *e = plain_string(p + 1, end, &s);
            if (!e) return 1;
            Py_ssize_t off = s - base, len = e - s;
            switch (k) {
            case K_PROTO: sv[k] = st_intern(&c->tab[0], base, off, len); break;
            case K_SRC: case K_DST: sv[k] = st_intern(&c->tab[1], base, off, len); break;
            case K_SOURCE: sv[k] = st_intern(&c->tab[2], base, off, len); break;
            case K_HOST: sv[k] = st_intern(&c->tab[3], base, off, len); break;
            case K_HSRC: sv[k] = st_intern(&c->tab[4], base, off, len); break;
            case K_FIRST: case K_LAST:
                if (parse_time(s, len, &tv[k]) < 0) return 1;
                sv[k] = 0;
                break;
            default: return 1; /* a string where a number belongs */
            }
            if (sv[k] < 0) return -1;
            p = e + 1;
        } else if (*p >= '0' && *p <= '9' && (k == K_FIRST || k == K_LAST)) {
            p = plain_time(p, end, &tv[k]);  /* POSIX seconds (the range is checked with the columns) */
            if (!p) return 1;
            sv[k] = 0;
        } else if (*p >= '0' && *p <= '9') {
            uint64_t max;
            switch (k) {
            case K_PROTO: max = 255; break;
            case K_SPORT: case K_DPORT: max = 65535; break;
            case K_PACKETS: case K_BYTES: max = INT64_MAX; break;
            default: return 1; /* numeric times, addresses, names: the Python reader */
            }
            p = plain_int(p, end, max, &iv[k]);
            if (!p) return 1;
            sv[k] = -2; /* a number */
        } else {
            return 1;
        }
        p = ws(p, end);
        if (p >= end) return 1;
        if (*p == ',') {
            p = ws(p + 1, end);
            continue;
        }
        if (*p++ != '}') return 1;
        break;
    }
    if (ws(p, end) != end) return 1;
    unsigned need = (1u << K_PROTO) | (1u << K_SRC) | (1u << K_DST);
    if ((seen & need) != need || (null & need)) return 1;
#define GIVEN(k) ((seen & (1u << (k))) && !(null & (1u << (k))))
    int64_t proto = sv[K_PROTO] == -2 ? iv[K_PROTO] : 256 + (int64_t)sv[K_PROTO];
    int64_t sport = GIVEN(K_SPORT) ? iv[K_SPORT] : 0, dport = GIVEN(K_DPORT) ? iv[K_DPORT] : 0;
    int64_t packets = GIVEN(K_PACKETS) ? iv[K_PACKETS] : 1, bytes = GIVEN(K_BYTES) ? iv[K_BYTES] : 0;
    double first = GIVEN(K_FIRST) ? tv[K_FIRST] : 0.0;
    double last = GIVEN(K_LAST) ? tv[K_LAST] : first;
    int32_t source = GIVEN(K_SOURCE) ? sv[K_SOURCE] : -1, host = GIVEN(K_HOST) ? sv[K_HOST] : -1;
    int32_t hsrc = GIVEN(K_HSRC) ? sv[K_HSRC] : -1;
#undef GIVEN
    if (col_push(&c->proto, &proto) || col_push(&c->src, &sv[K_SRC]) || col_push(&c->dst, &sv[K_DST]) ||
        col_push(&c->sport, &sport) || col_push(&c->dport, &dport) || col_push(&c->packets, &packets) ||
        col_push(&c->bytes, &bytes) || col_push(&c->first, &first) || col_push(&c->last, &last) ||
        col_push(&c->source, &source) || col_push(&c->host, &host) || col_push(&c->hsrc, &hsrc))
        return -1;
    return 0;
}

static PyObject *columns(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf;
    Py_ssize_t max_line;
    if (!PyArg_ParseTuple(args, "y*n", &buf, &max_line)) return NULL;
    cols_t c;
    memset(&c, 0, sizeof c);
    c.proto.size = c.sport.size = c.dport.size = c.packets.size = c.bytes.size = 8;
    c.first.size = c.last.size = 8;
    c.src.size = c.dst.size = c.source.size = c.host.size = c.hsrc.size = 4;
    PyObject *out = NULL;
    const char *base = buf.buf, *p = base, *end = base + buf.len;
    int status = buf.len > 0 && end[-1] == '\n' ? 0 : 1;
    Py_BEGIN_ALLOW_THREADS /* only C memory from here to the end of the walk */
    while (status == 0 && p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (nl - p > max_line) { status = 1; break; }
        status = parse_line(&c, base, p, nl);
        p = nl + 1;
    }
    Py_END_ALLOW_THREADS
    if (status < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (status > 0) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    /* the addresses as key words */
    strtab_t *a = &c.tab[1];
    size_t na = a->n;
    uint8_t *v4 = calloc(na ? na : 1, 1), *ok = calloc(na ? na : 1, 1);
    uint64_t *hi = calloc(na ? na : 1, 8), *lo = calloc(na ? na : 1, 8);
    if (!v4 || !ok || !hi || !lo) {
        PyErr_NoMemory();
        goto addr_done;
    }
    for (size_t k = 0; k < na; k++) {
        char text[64];
        if (a->len[k] >= (Py_ssize_t)sizeof text) continue;
        memcpy(text, base + a->off[k], (size_t)a->len[k]);
        text[a->len[k]] = 0;
        uint8_t packed[16];
        if (memchr(text, ':', (size_t)a->len[k])) {
            if (inet_pton(AF_INET6, text, packed) != 1) continue;
            static const uint8_t zero10[10];
            if (memcmp(packed, zero10, 10) == 0) continue; /* spelled by ipaddress: Python */
            uint64_t h = 0, l = 0;
            for (int i = 0; i < 8; i++) {
                h = (h << 8) | packed[i];
                l = (l << 8) | packed[8 + i];
            }
            hi[k] = h;
            lo[k] = l;
        } else {
            if (inet_pton(AF_INET, text, packed) != 1) continue;
            v4[k] = 1;
            lo[k] = ((uint64_t)packed[0] << 24) | ((uint64_t)packed[1] << 16) | ((uint64_t)packed[2] << 8) | packed[3];
        }
        ok[k] = 1;
    }
    out = Py_BuildValue("(nNNNNNNNNNNNNNNNNNNNNN)", (Py_ssize_t)c.proto.n, col_bytes(&c.proto),
                        st_list(&c.tab[0], base), col_bytes(&c.src), col_bytes(&c.dst), st_list(a, base),
                        PyBytes_FromStringAndSize((char *)v4, (Py_ssize_t)na),
                        PyBytes_FromStringAndSize((char *)hi, (Py_ssize_t)(na * 8)),
                        PyBytes_FromStringAndSize((char *)lo, (Py_ssize_t)(na * 8)),
                        PyBytes_FromStringAndSize((char *)ok, (Py_ssize_t)na), col_bytes(&c.sport),
                        col_bytes(&c.dport), col_bytes(&c.packets), col_bytes(&c.bytes), col_bytes(&c.first),
                        col_bytes(&c.last), col_bytes(&c.source), st_list(&c.tab[2], base), col_bytes(&c.host),
                        st_list(&c.tab[3], base), col_bytes(&c.hsrc), st_list(&c.tab[4], base));
addr_done:
    free(v4); free(ok); free(hi); free(lo);
done:
    for (int i = 0; i < 5; i++) st_free(&c.tab[i]);
    col_t *all[] = {&c.proto, &c.src, &c.dst, &c.sport, &c.dport, &c.packets, &c.bytes, &c.first, &c.last,
                    &c.source, &c.host, &c.hsrc};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) free(all[i]->v);
    PyBuffer_Release(&buf);
    return out;
}

static PyMethodDef methods[] = {
    {"columns", columns, METH_VARARGS, "A plain JSON-lines flow log as columns (see the module comment)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flowlog", NULL, -1, methods};

PyMODINIT_FUNC PyInit__flowlog(void) { return PyModule_Create(&module); }
