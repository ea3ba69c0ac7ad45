/* Per-packet facts the capture walk reads beyond a flow's key, each with a Python twin the tests
 * hold it equal to: opener hints (agent/wire/decode.py hints()) and the key a DNS query is matched
 * to its answer by (agent/names/dns.py question_key()). Included by _walk.c only. */
#ifndef EGRESS_AGENT_PACKET_H
#define EGRESS_AGENT_PACKET_H

#include <stdint.h>

/* Opener hints, as agent/wire/decode.py's hints(): TCP flags, SYN / SYN-ACK, ICMP echo and errors. */
#define HINT_SYN 0x100
#define HINT_SYNACK 0x200
#define HINT_ECHO_REQUEST 0x400
#define HINT_ECHO_REPLY 0x800
#define HINT_ICMP_ERROR 0x1000

static inline int64_t hints_of(uint32_t proto, const uint8_t *d, Py_ssize_t n, Py_ssize_t l4, int first) {
    if (!first) return 0;
    if (proto == 6) {
        if (n < l4 + 14) return 0;
        int64_t f = d[l4 + 13];
        if ((f & 0x12) == 0x02) f |= HINT_SYN;
        else if ((f & 0x12) == 0x12) f |= HINT_SYNACK;
        return f;
    }
    if (proto == 1 || proto == 58) {
        if (n < l4 + 1) return 0;
        uint8_t k = d[l4];
        if (proto == 1) {
            if (k == 8) return HINT_ECHO_REQUEST;
            if (k == 0) return HINT_ECHO_REPLY;
            if (k == 3 || k == 4 || k == 5 || k == 11 || k == 12) return HINT_ICMP_ERROR;
        } else {
            if (k == 128) return HINT_ECHO_REQUEST;
            if (k == 129) return HINT_ECHO_REPLY;
            if (k >= 1 && k <= 4) return HINT_ICMP_ERROR;
        }
    }
    return 0;
}

/* An ICMP/ICMPv6 error belongs to the connection it quotes (agent/wire/decode.py quoted()): the
 * quoted packet's tuple, reversed (the error travels back to the packet's sender, as a reply would),
 * written into the key words w[0..4]; 0 when the quoted header cannot be read (the error keeps its
 * own key). `l4` is the ICMP header's offset, `ver` the outer IP version. */
static int quoted_key(const uint8_t *d, Py_ssize_t n, Py_ssize_t l4, int ver, uint64_t *w) {
    Py_ssize_t q = l4 + 8, ql4;
    uint32_t p, sp = 0, dp = 0;
    uint64_t s1, s2, t1, t2;
    int first = 1;
    if (ver == 4) {
        if (n < q + 20 || (d[q] >> 4) != 4) return 0;
        Py_ssize_t ihl = (d[q] & 0x0F) * 4;
        if (ihl < 20 || n < q + ihl) return 0;
        p = d[q + 9];
        first = (be16(d + q + 6) & 0x1FFF) == 0;
        s1 = 0; s2 = be32(d + q + 12); t1 = 0; t2 = be32(d + q + 16);
        ql4 = q + ihl;
    } else {
        if (n < q + 40 || (d[q] >> 4) != 6) return 0;
        p = d[q + 6];
        if (p == 0 || p == 43 || p == 44 || p == 51 || p == 60 || p == 135 || p == 139 || p == 140) return 0;
        s1 = be64(d + q + 8); s2 = be64(d + q + 16); t1 = be64(d + q + 24); t2 = be64(d + q + 32);
        ql4 = q + 40;
    }
    if ((p == 6 || p == 17 || p == 132) && first) {
        if (n < ql4 + 4) return 0;
        sp = be16(d + ql4);
        dp = be16(d + ql4 + 2);
    }
    w[0] = ((uint64_t)ver << 40) | ((uint64_t)p << 32) | ((uint64_t)dp << 16) | sp;
    w[1] = t1; w[2] = t2; w[3] = s1; w[4] = s2;
    return 1;
}

/* The key a DNS query is matched to its answer by, as agent/names/dns.py question_key(msg, True):
 * the id and the question section, ASCII-lowercased; -1 when `m` is not a one-question query with an
 * uncompressed name. */
static int query_key(const uint8_t *m, Py_ssize_t len, uint8_t *out) {
    if (len < 17 || (m[2] & 0x80) || m[4] != 0 || m[5] != 1) return -1;
    Py_ssize_t off = 12;
    for (;;) {
        if (off >= len) return -1;
        uint8_t b = m[off];
        if (b == 0) break;
        if (b & 0xC0) return -1;
        off += 1 + b;
        if (off - 12 > 255) return -1;
    }
    Py_ssize_t end = off + 5;
    if (end > len) return -1;
    int k = 0;
    out[k++] = m[0]; out[k++] = m[1];
    for (Py_ssize_t i = 12; i < end; i++) {
        uint8_t c = m[i];
        out[k++] = (c >= 'A' && c <= 'Z') ? (uint8_t)(c + 32) : c;
    }
    return k;
}

#endif
