/* The capture walk's flow table (included by _walk.c only): open addressing on the five key words,
 * grown at half load; a flow quiet for longer than its idle timeout is set aside in `old` and its
 * slot starts the next connection of the same key. */
#ifndef EGRESS_AGENT_FLOWTABLE_H
#define EGRESS_AGENT_FLOWTABLE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint64_t k[5];
    int64_t packets, bytes, hints; /* hints: OR of the packets' opener hints */
    double first, last;
    int used, segs; /* segs: TCP payload segments seen in this chunk (FIRST_SEGMENTS are offered) */
    long epoch;     /* the chunk `segs` counts for (a table kept across chunks) */
} slot_t;

typedef struct {
    slot_t *slots;
    size_t cap, count;
    long epoch;
    slot_t *old;          /* flows cut off by an idle gap (their key's slot then starts a new flow) */
    size_t n_old, cap_old;
} table_t;

/* Idle timeouts, as agent/flowtable.py's IDLE_TCP and IDLE_OTHER (Zeek's inactivity timeouts): a
 * packet further than this from its slot's span starts a new connection on the same key, and the
 * slot's flow so far is kept in `old`. A slot so only ever holds packets with no gap longer than the
 * timeout between them; FlowAccumulator joins parts that out-of-order packets left apart. */
static inline double idle_of(const uint64_t *k) { return ((k[0] >> 32) & 0xFF) == 6 ? 300.0 : 60.0; }

static int retire(table_t *t, const slot_t *s) {
    if (t->n_old == t->cap_old) {
        size_t cap = t->cap_old ? t->cap_old * 2 : 256;
        slot_t *v = realloc(t->old, cap * sizeof(slot_t));
        if (!v) return -1;
        t->old = v; t->cap_old = cap;
    }
    t->old[t->n_old++] = *s;
    return 0;
}

static inline size_t hash5(const uint64_t *k) {
    uint64_t h = k[0] * 0x9E3779B97F4A7C15ULL ^ k[1] * 0xC2B2AE3D27D4EB4FULL ^ k[2] * 0x165667B19E3779F9ULL ^
                 k[3] * 0xD6E8FEB86659FD93ULL ^ k[4] * 0xFF51AFD7ED558CCDULL;
    h ^= h >> 29; h *= 0xBF58476D1CE4E5B9ULL; h ^= h >> 32;
    return (size_t)h;
}

static slot_t *find(table_t *t, const uint64_t *k) {
    size_t i = hash5(k) & (t->cap - 1);
    for (;;) {
        slot_t *s = &t->slots[i];
        if (!s->used || memcmp(s->k, k, 40) == 0) return s;
        i = (i + 1) & (t->cap - 1);
    }
}

static int grow(table_t *t) {
    table_t n = {calloc(t->cap * 2, sizeof(slot_t)), t->cap * 2, t->count, t->epoch, t->old, t->n_old, t->cap_old};
    if (!n.slots) return -1;
    for (size_t i = 0; i < t->cap; i++)
        if (t->slots[i].used) *find(&n, t->slots[i].k) = t->slots[i];
    free(t->slots);
    *t = n;
    return 0;
}

#endif
