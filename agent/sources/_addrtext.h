/* Address text shared by the C modules (_ctnl, _walk): one formatter, tested against inet_ntop.
 * Needs <Python.h> (Py_ssize_t), <arpa/inet.h> and <string.h> before it. */
#ifndef EGRESS_AGENT_ADDRTEXT_H
#define EGRESS_AGENT_ADDRTEXT_H

/* inet_ntop's text, without its sprintf per group (a third of this module's time in perf):
 * IPv4 as four decimals; IPv6 as lowercase hex groups without leading zeros, the first longest run
 * of two or more zero groups written "::" (glibc's rules). Addresses whose first five groups are
 * zero (where glibc may write an embedded IPv4 address) go to inet_ntop itself. Tests compare
 * this with socket.inet_ntop. Returns the length, or -1 when inet_ntop fails. */
static inline int fmt_addr(const uint8_t *a, Py_ssize_t n, char *out) {
    static const char hex[] = "0123456789abcdef";
    char *o = out;
    if (n == 4) {
        for (int i = 0; i < 4; i++) {
            unsigned v = a[i];
            if (i) *o++ = '.';
            if (v >= 100) { *o++ = (char)('0' + v / 100); v %= 100; *o++ = (char)('0' + v / 10); v %= 10; }
            else if (v >= 10) { *o++ = (char)('0' + v / 10); v %= 10; }
            *o++ = (char)('0' + v);
        }
        return (int)(o - out);
    }
    unsigned w[8];
    for (int i = 0; i < 8; i++) w[i] = ((unsigned)a[2 * i] << 8) | a[2 * i + 1];
    if (!(w[0] | w[1] | w[2] | w[3] | w[4])) {
        if (!inet_ntop(AF_INET6, a, out, INET6_ADDRSTRLEN)) return -1;
        return (int)strlen(out);
    }
    int best = -1, best_len = 0;
    for (int i = 0; i < 8;) {
        if (w[i]) { i++; continue; }
        int j = i;
        while (j < 8 && !w[j]) j++;
        if (j - i > best_len) { best = i; best_len = j - i; }
        i = j;
    }
    if (best_len < 2) best = -1;
    for (int i = 0; i < 8; i++) {
        if (i == best) {
            *o++ = ':';
            if (best + best_len == 8) *o++ = ':';
            i += best_len - 1;
            continue;
        }
        if (i) *o++ = ':';
        unsigned v = w[i];
        int started = 0;
        for (int sh = 12; sh >= 0; sh -= 4) {
            unsigned d = (v >> sh) & 0xF;
            if (d || started || sh == 0) { *o++ = hex[d]; started = 1; }
        }
    }
    return (int)(o - out);
}

#endif
