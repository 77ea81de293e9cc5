/* One pass over a site's [n, u] float32 activations computing every per-unit and per-token
 * count that SiteStats keeps: moments, the threshold ladder, the per-token firing
 * distribution and the |a| histogram.
 *
 * The torch path makes ~20 passes over the batch (casts, comparisons, reductions); this makes
 * one, over blocks of columns whose accumulators stay in L1, with a branch-free inner loop the
 * compiler vectorises. Columns are split between threads. Sums are float64, shifted by
 * `shift` (a value of each column) so that the variance does not cancel catastrophically.
 *
 * Exactness: eps_f[c] is the largest float <= eps[c], so (a > eps_f) == (a > eps) for every
 * float a. The histogram slot of |a| is slot_of_key[bits >> key_shift] plus one when |a|
 * reaches the next slot's first float (next_slot_at), which is exact because a key (exponent
 * and top mantissa bits) spans less than one bin.
 * Slots: 0 zero, 1 underflow, 2.. bins, n_slots-2 overflow, n_slots-1 non-finite.
 * With AVX-512 the slots come from registers instead of two dependent gathers (window_slots):
 * the keys from lo's to hi's (a few dozen to a few hundred) index a table held in zmm
 * registers, each entry packing the key's first slot and where the next slot starts, and
 * keys outside that window are underflow/zero or overflow/non-finite, decided arithmetically.
 * Python leaves the window empty (n_window 0) when it does not fit; the tables are then used.
 * The slots are counted per pair of neighbouring values where the block is long enough
 * (counters_t): half the increments. benchmarks/stats_kernel.py measures both choices.
 *
 * Top-k examples (when topk > 0), updated in place: per unit, the k largest finite values seen
 * and their token ids (`top_val`/`top_tok`, [u][topk], sorted by value descending then token
 * ascending, -inf / -1 padding). A value enters when it beats the unit's smallest kept value,
 * so after the first batches almost every value is rejected by one vectorised comparison; it
 * replaces that smallest one (among equal ones the latest token), and each unit that changed
 * is re-sorted once at the end of its column block. Equal values thus keep the earliest
 * tokens, as rows arrive in token order.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && !defined(ACTSCOPE_TABLE_SLOTS)
#include <immintrin.h>
#define WINDOW_SLOTS 1
#endif

#define MAX_CRITERIA 16
#define BLOCK 256

typedef struct {
    const float *x;
    int64_t n, u, j0, j1;
    const float *eps_f;
    int32_t n_eps;
    const int32_t *slot_of_key;
    int32_t key_shift;
    const float *next_slot_at;
    int32_t n_slots;
    const uint32_t *window;  /* [n_window] (slot << key_shift) + 2**key_shift - (where it steps up) */
    int32_t key_lo, n_window;
    const double *shift;
    int64_t *count, *nonfinite;
    double *sum, *sumsq, *mn, *mx;
    int64_t *fired;          /* [1 + n_eps][u] */
    int32_t *token_fired;    /* [n][1 + n_eps], this worker's own */
    int64_t *slots;          /* [n_slots], this worker's own */
    int32_t topk;
    double *top_val;         /* [u][topk] */
    int64_t *top_tok;        /* [u][topk] */
    const int64_t *tok;      /* [n] token id of each row */
    int failed;
} work_t;

static inline uint32_t bits_of(float v) {
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    return b;
}

/* The smallest kept value of unit g (-inf while fewer than topk were seen). */
static float floor_of(const work_t *w, int64_t g) {
    const double *val = w->top_val + g * w->topk;
    double low = val[0];
    for (int32_t s = 1; s < w->topk; s++) low = val[s] < low ? val[s] : low;
    return (float)low;  /* exact: the kept values are floats */
}

/* Row i's value v beats unit g's smallest kept value: it takes that slot (among equal ones the
 * latest token's). Returns the new floor. */
static float keep_example(work_t *w, int64_t g, float v, int64_t i) {
    double *val = w->top_val + g * w->topk;
    int64_t *tok = w->top_tok + g * w->topk;
    int32_t m = 0;
    for (int32_t s = 1; s < w->topk; s++)
        if (val[s] < val[m] || (val[s] == val[m] && tok[s] > tok[m])) m = s;
    val[m] = v;
    tok[m] = w->tok[i];
    return floor_of(w, g);
}

static void examples(work_t *w, const float *row, int64_t i, int64_t j0, int64_t width, float *floor_, uint8_t *changed) {
    int32_t any = 0;
    for (int64_t j = 0; j < width; j++) any |= (row[j] > floor_[j]) & (row[j] < __builtin_inff());
    if (!any) return;
    for (int64_t j = 0; j < width; j++)
        if (row[j] > floor_[j] && row[j] < __builtin_inff()) {
            floor_[j] = keep_example(w, j0 + j, row[j], i);
            changed[j] = 1;
        }
}

/* Unit g's examples back in order: value descending, then token ascending (padding last). */
static void sort_examples(work_t *w, int64_t g) {
    double *val = w->top_val + g * w->topk;
    int64_t *tok = w->top_tok + g * w->topk;
    for (int32_t s = 1; s < w->topk; s++) {
        const double v = val[s];
        const int64_t t = tok[s];
        int32_t r = s - 1;
        while (r >= 0 && (val[r] < v || (val[r] == v && tok[r] > t))) {
            val[r + 1] = val[r]; tok[r + 1] = tok[r]; r--;
        }
        val[r + 1] = v; tok[r + 1] = t;
    }
}

/* The slot of each |row[j]| from the tables: the key's first slot, plus one past next_slot_at
 * (the compiler turns the two lookups into gathers). */
static void table_slots(const work_t *w, const float *row, int64_t width, int32_t *slot) {
    for (int64_t j = 0; j < width; j++) {
        const uint32_t b = bits_of(row[j]) & 0x7fffffffu;
        float a;
        memcpy(&a, &b, sizeof a);
        const int32_t s0 = w->slot_of_key[b >> w->key_shift];
        slot[j] = s0 + (a >= w->next_slot_at[s0]);
    }
}

#ifdef WINDOW_SLOTS
#define MAX_CHUNKS 12  /* the window holds at most 12 * 32 keys (fused.MAX_WINDOW) */

/* The window entries in chunks of two registers (32 keys each), zero past the end. */
static void load_window(const work_t *w, __m512i *table) {
    for (int32_t r = 0; r < 2 * MAX_CHUNKS; r++) {
        const int32_t start = 16 * r, left = w->n_window - start;
        const __mmask16 m = left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        table[r] = _mm512_maskz_loadu_epi32(m, left > 0 ? w->window + start : w->window);
    }
}

/* The same slots as table_slots, 16 values at a time, without memory lookups. An entry is
 * (slot << key_shift) + 2**key_shift - t, where t (1 .. 2**key_shift) is the offset in the key
 * of the next slot's first float: adding the value's offset carries into the slot exactly when
 * the value reaches it. */
static void window_slots(const work_t *w, const float *row, int64_t width, const __m512i *table, int32_t *slot) {
    const __m128i shift = _mm_cvtsi32_si128(w->key_shift);
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), key_lo = _mm512_set1_epi32(w->key_lo);
    const __m512i low_bits = _mm512_set1_epi32((int32_t)((1u << w->key_shift) - 1));
    const __m512i n_window = _mm512_set1_epi32(w->n_window), one = _mm512_set1_epi32(1);
    const __m512i overflow = _mm512_set1_epi32(w->n_slots - 2), infinity = _mm512_set1_epi32(0x7f800000);
    const int32_t chunks = (w->n_window + 31) / 32;
    for (int64_t j = 0; j < width; j += 16) {
        const __mmask16 live = width - j >= 16 ? 0xffff : (__mmask16)((1u << (width - j)) - 1);
        const __m512i b = _mm512_and_si512(_mm512_maskz_loadu_epi32(live, row + j), magnitude);
        const __m512i at = _mm512_sub_epi32(_mm512_srl_epi32(b, shift), key_lo);  /* key - key_lo */
        const __m512i chunk = _mm512_srli_epi32(at, 5);  /* permutex2var reads the low 5 bits */
        __m512i entry = _mm512_permutex2var_epi32(table[0], at, table[1]);
        for (int32_t c = 1; c < chunks; c++) {
            const __mmask16 here = _mm512_cmpeq_epi32_mask(chunk, _mm512_set1_epi32(c));
            entry = _mm512_mask_mov_epi32(entry, here, _mm512_permutex2var_epi32(table[2 * c], at, table[2 * c + 1]));
        }
        __m512i s = _mm512_srl_epi32(_mm512_add_epi32(entry, _mm512_and_si512(b, low_bits)), shift);
        /* Outside the window: below lo's key (at < 0), zero or underflow; above hi's key
         * (at >= n_window), overflow or non-finite. */
        const __mmask16 below = _mm512_cmplt_epi32_mask(at, _mm512_setzero_si512());
        const __mmask16 above = _mm512_cmpge_epi32_mask(at, n_window);
        const __m512i under = _mm512_min_epu32(b, one);  /* 0 for zero, 1 for underflow */
        const __m512i over = _mm512_mask_add_epi32(overflow, _mm512_cmpge_epu32_mask(b, infinity), overflow, one);
        s = _mm512_mask_mov_epi32(s, below, under);
        s = _mm512_mask_mov_epi32(s, above, over);
        _mm512_mask_storeu_epi32(slot + j, live, s);
    }
}
#endif

typedef uint32_t pair_count_t;
#define MAX_PAIR_SLOTS 181  /* a pair table under 128 KiB (measured: larger ones stop paying) */

/* The histogram counters of one block. Either each slot in four interleaved copies, so that
 * runs of values in one popular slot do not wait on each other's increments, or, where the
 * block is long enough to pay for the table, one counter per (slot of value 2p, slot of value
 * 2p + 1), which halves the increments; its counts stay below 2**31 (n < 2**24 rows). */
typedef struct {
    int64_t n_slots;
    int64_t *lanes;        /* [4][n_slots] */
    pair_count_t *pairs;   /* [n_slots][n_slots] or NULL */
} counters_t;

static int counters_open(counters_t *c, const work_t *w, int64_t width) {
    const int64_t ns = w->n_slots;
    c->n_slots = ns;
    c->lanes = calloc((size_t)(4 * ns), sizeof(int64_t));
    c->pairs = NULL;
#ifndef ACTSCOPE_SINGLE_COUNTS  /* benchmarks/stats_kernel.py: the counters without pairs */
    if (ns <= MAX_PAIR_SLOTS && w->n < (1 << 24) && w->n * width >= 4 * ns * ns)
        c->pairs = calloc((size_t)(ns * ns), sizeof(pair_count_t));
#else
    (void)width;
#endif
    if (c->lanes == NULL) free(c->pairs);
    return c->lanes != NULL;  /* without the pair table (no memory) the lanes do */
}

static void count_row(counters_t *c, const int32_t *slot, int64_t width) {
    const int64_t ns = c->n_slots;
    if (c->pairs) {
        for (int64_t p = 0; p < width / 2; p++) c->pairs[slot[2 * p] * ns + slot[2 * p + 1]]++;
        if (width & 1) c->lanes[slot[width - 1]]++;
    } else {
        for (int64_t j = 0; j < width; j++) c->lanes[(j & 3) * ns + slot[j]]++;
    }
}

static void counters_close(counters_t *c, int64_t *slots) {
    const int64_t ns = c->n_slots;
    for (int64_t s = 0; s < 4 * ns; s++) slots[s % ns] += c->lanes[s];
    if (c->pairs)
        for (int64_t first = 0; first < ns; first++) {
            const pair_count_t *row = c->pairs + first * ns;
            int64_t total = 0;
            for (int64_t second = 0; second < ns; second++) {
                total += row[second];
                slots[second] += row[second];
            }
            slots[first] += total;
        }
    free(c->lanes);
    free(c->pairs);
}

static void block(work_t *w, int64_t j0, int64_t j1) {
    const int64_t width = j1 - j0, criteria = w->n_eps + 1;
    int32_t cnt[BLOCK], fired[MAX_CRITERIA][BLOCK];
    double sum[BLOCK], sq[BLOCK], shift[BLOCK];
    float lo[BLOCK], hi[BLOCK], kept_value[BLOCK], kept_mask[BLOCK];
    int32_t slot[BLOCK];
    float floor_[BLOCK];
    uint8_t changed[BLOCK];
    memset(cnt, 0, sizeof cnt);
    memset(changed, 0, sizeof changed);
    if (w->topk > 0)
        for (int64_t j = 0; j < width; j++) floor_[j] = floor_of(w, j0 + j);
    memset(fired, 0, sizeof fired);
    for (int64_t j = 0; j < width; j++) {
        sum[j] = 0.0; sq[j] = 0.0; shift[j] = w->shift[j0 + j];
        lo[j] = __builtin_inff(); hi[j] = -__builtin_inff();
    }
    counters_t counters;
    if (!counters_open(&counters, w, width)) { w->failed = 1; return; }
#ifdef WINDOW_SLOTS
    __m512i table[2 * MAX_CHUNKS];
    load_window(w, table);
#endif
    for (int64_t i = 0; i < w->n; i++) {
        const float *row = w->x + i * w->u + j0;
        int32_t tf[MAX_CRITERIA] = {0};
        int32_t pos = 0;
        /* Separate simple loops over the row (it stays in L1) so that each one vectorises. */
        for (int64_t j = 0; j < width; j++) {
            const float v = row[j];
            const int fin = (bits_of(v) & 0x7f800000u) != 0x7f800000u;
            const float low = fin ? v : __builtin_inff(), high = fin ? v : -__builtin_inff();
            cnt[j] += fin;
            kept_value[j] = fin ? v : 0.0f;
            kept_mask[j] = fin ? 1.0f : 0.0f;
            lo[j] = low < lo[j] ? low : lo[j];
            hi[j] = high > hi[j] ? high : hi[j];
            const int p = fin & (v > 0.0f);
            fired[0][j] += p;
            pos += p;
        }
        for (int64_t j = 0; j < width; j++) {
            const double kept = ((double)kept_value[j] - shift[j]) * (double)kept_mask[j];  /* 0 for non-finite */
            sum[j] += kept;
            sq[j] += kept * kept;
        }
        tf[0] = pos;
        for (int32_t c = 0; c < w->n_eps; c++) {
            const float t = w->eps_f[c];
            int32_t above_row = 0;
            for (int64_t j = 0; j < width; j++) {
                const float a = __builtin_fabsf(row[j]);
                const int fin = (bits_of(row[j]) & 0x7f800000u) != 0x7f800000u;
                const int above = fin & (a > t);
                fired[c + 1][j] += above;
                above_row += above;
            }
            tf[c + 1] = above_row;
        }
#ifndef ACTSCOPE_NO_HISTOGRAM  /* benchmarks/stats_kernel.py: the kernel's cost without it */
        /* Slots first (a vectorised loop), then the increments. */
#ifdef WINDOW_SLOTS
        if (w->n_window > 0 && w->n_window <= 32 * MAX_CHUNKS) window_slots(w, row, width, table, slot);
        else
#endif
            table_slots(w, row, width, slot);
        count_row(&counters, slot, width);
#endif
        if (w->topk > 0) examples(w, row, i, j0, width, floor_, changed);
        int32_t *out = w->token_fired + i * criteria;
        for (int64_t c = 0; c < criteria; c++) out[c] += tf[c];
    }
    counters_close(&counters, w->slots);
    for (int64_t j = 0; j < width; j++) {
        const int64_t g = j0 + j;
        w->count[g] += cnt[j];
        w->nonfinite[g] += w->n - cnt[j];
        w->sum[g] += sum[j];
        w->sumsq[g] += sq[j];
        w->mn[g] = lo[j];
        w->mx[g] = hi[j];
        for (int64_t c = 0; c < criteria; c++) w->fired[c * w->u + g] += fired[c][j];
        if (changed[j]) sort_examples(w, g);
    }
}

static void *run(void *arg) {
    work_t *w = (work_t *)arg;
    for (int64_t j = w->j0; j < w->j1; j += BLOCK) block(w, j, j + BLOCK < w->j1 ? j + BLOCK : w->j1);
    return NULL;
}

/* 1 when this build takes the AVX-512 window path (for tests and benchmarks), else 0. */
int actscope_window_slots(void) {
#ifdef WINDOW_SLOTS
    return 1;
#else
    return 0;
#endif
}

int actscope_site_partials(
    const float *x, int64_t n, int64_t u,
    const float *eps_f, int32_t n_eps,
    const int32_t *slot_of_key, int32_t key_shift, const float *next_slot_at, int32_t n_slots,
    const uint32_t *window, int32_t key_lo, int32_t n_window,  /* n_window 0: the tables only */
    const double *shift, int32_t threads,
    int32_t topk, double *top_val, int64_t *top_tok,  /* [u][topk] in place; topk 0: none */
    const int64_t *tok,                               /* [n] token ids of the rows */
    int64_t *count, int64_t *nonfinite, double *sum, double *sumsq, double *mn, double *mx,
    int64_t *fired,        /* [1 + n_eps][u] */
    int64_t *firing_hist,  /* [1 + n_eps][u + 1] */
    int64_t *slots         /* [n_slots] */
) {
    if (n_eps + 1 > MAX_CRITERIA || threads < 1) return -1;
    if (n == 0 || u == 0) return 0;
    const int64_t criteria = n_eps + 1;
    const int64_t blocks = (u + BLOCK - 1) / BLOCK;
    if (threads > blocks) threads = (int32_t)blocks;
    if (threads > 64) threads = 64;
    work_t work[64] = {0};
    pthread_t ids[64];
    int32_t *token_fired = calloc((size_t)(threads * n * criteria), sizeof(int32_t));
    int64_t *thread_slots = calloc((size_t)(threads * n_slots), sizeof(int64_t));
    if (!token_fired || !thread_slots) { free(token_fired); free(thread_slots); return -2; }
    for (int32_t t = 0; t < threads; t++) {
        const int64_t b0 = blocks * t / threads, b1 = blocks * (t + 1) / threads;
        work[t] = (work_t){x, n, u, b0 * BLOCK, b1 * BLOCK < u ? b1 * BLOCK : u, eps_f, n_eps,
                           slot_of_key, key_shift, next_slot_at, n_slots, window, key_lo, n_window,
                           shift, count, nonfinite, sum, sumsq,
                           mn, mx, fired, token_fired + t * n * criteria, thread_slots + t * n_slots,
                           topk, top_val, top_tok, tok, 0};
    }
#ifdef _OPENMP
    /* torch's own OpenMP team (the process loads one libgomp.so.1): its workers are still
     * spinning from the layer that just ran, so they take these blocks at once instead of
     * competing with threads of our own for the same cores. */
    (void)ids;
    #pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int32_t t = 0; t < threads; t++) run(&work[t]);
#else
    int started = 0;
    for (int32_t t = 1; t < threads; t++) {
        if (pthread_create(&ids[t], NULL, run, &work[t]) != 0) break;
        started = t;
    }
    for (int32_t t = started + 1; t < threads; t++) run(&work[t]);  /* threads that failed to start */
    run(&work[0]);
    for (int32_t t = 1; t <= started; t++) pthread_join(ids[t], NULL);
#endif
    int failed = 0;
    for (int32_t t = 0; t < threads; t++) failed |= work[t].failed;
    if (failed) { free(token_fired); free(thread_slots); return -2; }
    for (int32_t t = 0; t < threads; t++)
        for (int64_t s = 0; s < n_slots; s++) slots[s] += thread_slots[t * n_slots + s];
    for (int32_t t = 1; t < threads; t++)
        for (int64_t k = 0; k < n * criteria; k++) token_fired[k] += token_fired[t * n * criteria + k];
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < criteria; c++) firing_hist[c * (u + 1) + token_fired[i * criteria + c]]++;
    free(token_fired);
    free(thread_slots);
    return 0;
}
