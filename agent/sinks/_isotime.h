/* RFC 3339 UTC times as agent.flow.iso_time writes them, for the C accelerators of the sinks
 * (_evidence.c: one time; _records.c: a column). Fractions are microseconds, left out when zero. */
#ifndef EGRESS_AGENT_ISOTIME_H
#define EGRESS_AGENT_ISOTIME_H

#include <math.h>
#include <stdint.h>

#define MAX_TS 253402300798.0

static void civil_from_days(int64_t z, int *y, unsigned *m, unsigned *d) {
    z += 719468;
    const int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    const unsigned doe = (unsigned)(z - era * 146097);
    const unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    const unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    const unsigned mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (int)(yoe + era * 400 + (*m <= 2));
}

static inline char *digits(char *p, unsigned v, int n) { /* v as n decimal digits, zero-padded */
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (char)('0' + v % 10);
        v /= 10;
    }
    return p + n;
}

/* The text of whole seconds `sec` (0 <= sec <= MAX_TS) and `us` microseconds (0 <= us < 10^6) into
 * out (at least 28 bytes); its length. Digits by hand: snprintf costs several times more. */
static int iso_parts_text(int64_t sec, int64_t us, char *out) {
    int64_t days = sec / 86400, rem = sec % 86400;
    int y;
    unsigned mo, d;
    civil_from_days(days, &y, &mo, &d);
    char *p = digits(out, (unsigned)y, 4);
    *p++ = '-';
    p = digits(p, mo, 2);
    *p++ = '-';
    p = digits(p, d, 2);
    *p++ = 'T';
    p = digits(p, (unsigned)(rem / 3600), 2);
    *p++ = ':';
    p = digits(p, (unsigned)(rem / 60 % 60), 2);
    *p++ = ':';
    p = digits(p, (unsigned)(rem % 60), 2);
    if (us) {
        *p++ = '.';
        p = digits(p, (unsigned)us, 6);
    }
    *p++ = 'Z';
    return (int)(p - out);
}

/* The text of iso_time(ts) into out (at least 28 bytes); its length, or -1 outside the range. */
static int iso_text(double ts, char *out) {
    if (!(ts >= 0.0 && ts <= MAX_TS)) return -1;
    double whole;
    double frac = modf(ts, &whole);
    int64_t sec = (int64_t)whole, us = (int64_t)nearbyint(frac * 1e6); /* ties to even, as round() */
    if (us >= 1000000) {
        sec += 1;
        us -= 1000000;
    }
    return iso_parts_text(sec, us, out);
}

#endif
