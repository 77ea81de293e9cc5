/* Row-selective float32 products for sparse decoding: read only the weight rows of the active
 * units, in place (no gather copy), with every selected row streamed from memory exactly once
 * per pass of up to MAX_TOKENS tokens.
 *
 *   actscope_dot_rows : out[t, j] = x[t, :] . w[index[j], :]          (x @ w[index].T)
 *   actscope_axpy_rows: out[t, :] = sum_j h[t, j] * w[index[j], :]     (h @ w[index])
 *
 * Decoding reads each weight byte once per token, so these are memory-bound: the design goal
 * is the machine's streaming bandwidth on the selected rows, and negligible fixed cost.
 *  - The token loop is innermost and unrolled for a compile-time token count (1..8), so one
 *    load of a weight vector feeds up to 8 FMAs and the accumulators stay in registers.
 *  - GCC/clang vector extensions (VEC floats) make the inner loops vector code on any x86/ARM
 *    target without relying on the auto-vectoriser's float-reassociation rules.
 *  - Four selected rows stream side by side (four independent memory streams), and the next
 *    four are prefetched meanwhile, because the hardware prefetcher stops at the (random) jump
 *    between rows. The prefetch's locality hint is PREFETCH_LOCALITY: 0 (non-temporal), the
 *    default, measured on AMD EPYC; on Intel, where a non-temporal prefetch fills only L1 and
 *    halved the kernels' rate, kernels.py builds with 3 (keep in every level).
 *  - Threads: a product is cut into chunks of selected rows that the caller and a persistent
 *    pool of workers claim from an atomic ticket; see "threading" below for why this, and not
 *    OpenMP's fork-join, on a machine shared with other processes. Small products run on the
 *    calling thread alone.
 *
 * Returns 0, or -3 when an index is out of range (nothing is read out of bounds).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 0
#endif
#define MAX_TOKENS 8
#define VEC 16                          /* floats per vector: one AVX-512 register, 4 SSE ones */

typedef float vf __attribute__((vector_size(VEC * sizeof(float))));

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v); /* an unaligned vector load */
    return v;
}

static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int l = 0; l < VEC; l++) s += v[l];
    return s;
}

/* ---- dot_rows -------------------------------------------------------------------------- */

/* Rows j..j+R of the selection for NT tokens (R, NT constants after inlining): R rows stream
 * side by side, so that R independent memory streams are in flight (one row alone leaves the
 * core waiting on memory: measured 16 vs 24 GB/s on one core); the R rows after them (up to
 * j1) are prefetched meanwhile. */
static inline __attribute__((always_inline)) void dot_group(
    const int NT, const int R, const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t d,
    const int64_t *index, int64_t j, int64_t j1, float *out, int64_t ldo) {
    const float *row[4], *next[4];
    for (int r = 0; r < R; r++) {
        row[r] = w + index[j + r] * ldw;
        next[r] = j + R + r < j1 ? w + index[j + R + r] * ldw : row[r];
    }
    vf acc[4][MAX_TOKENS];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < NT; t++) acc[r][t] = (vf){0};
    const int64_t dv = d - d % VEC;
    int64_t i = 0;
    for (; i < dv; i += VEC) {
        vf wv[4];
        for (int r = 0; r < R; r++) {
            __builtin_prefetch(next[r] + i, 0, PREFETCH_LOCALITY);
            wv[r] = load(row[r] + i);
        }
        for (int t = 0; t < NT; t++) {
            const vf xv = load(x + t * ldx + i);
            for (int r = 0; r < R; r++) acc[r][t] += wv[r] * xv;
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < NT; t++) {
            float s = hsum(acc[r][t]);
            for (int64_t q = i; q < d; q++) s += row[r][q] * x[t * ldx + q];
            out[t * ldo + j + r] = s;
        }
}

/* Rows j0..j1 for NT tokens starting at x: four rows at a time (two for 7-8 tokens, where
 * four would need more accumulators than there are vector registers). */
static inline __attribute__((always_inline)) void dot_block(
    const int NT, const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t d,
    const int64_t *index, int64_t j0, int64_t j1, float *out, int64_t ldo) {
    int64_t j = j0;
    if (NT <= 6)
        for (; j + 4 <= j1; j += 4) dot_group(NT, 4, x, ldx, w, ldw, d, index, j, j1, out, ldo);
    for (; j + 2 <= j1; j += 2) dot_group(NT, 2, x, ldx, w, ldw, d, index, j, j1, out, ldo);
    for (; j < j1; j++) dot_group(NT, 1, x, ldx, w, ldw, d, index, j, j1, out, ldo);
}

static void dot_range(const float *x, int64_t n, int64_t ldx, const float *w, int64_t ldw, int64_t d,
                      const int64_t *index, int64_t k, int64_t j0, int64_t j1, float *out) {
    for (int64_t t0 = 0; t0 < n; t0 += MAX_TOKENS) {
        const int64_t nt = n - t0 < MAX_TOKENS ? n - t0 : MAX_TOKENS;
        const float *xt = x + t0 * ldx;
        float *ot = out + t0 * k;
        switch (nt) { /* one specialised copy per token count keeps accumulators in registers */
            case 1: dot_block(1, xt, ldx, w, ldw, d, index, j0, j1, ot, k); break;
            case 2: dot_block(2, xt, ldx, w, ldw, d, index, j0, j1, ot, k); break;
            case 3: dot_block(3, xt, ldx, w, ldw, d, index, j0, j1, ot, k); break;
            case 4: dot_block(4, xt, ldx, w, ldw, d, index, j0, j1, ot, k); break;
            case 5: dot_block(5, xt, ldx, w, ldw, d, index, j0, j1, ot, k); break;
            case 6: dot_block(6, xt, ldx, w, ldw, d, index, j0, j1, ot, k); break;
            case 7: dot_block(7, xt, ldx, w, ldw, d, index, j0, j1, ot, k); break;
            default: dot_block(8, xt, ldx, w, ldw, d, index, j0, j1, ot, k); break;
        }
    }
}

/* ---- axpy_rows ------------------------------------------------------------------------- */

/* out[t, :] += sum over rows j0..j1 of h[t, j] * w[index[j], :], four rows at a time so that
 * each output vector is loaded and stored once per four rows (it stays in L1: n * d_out floats). */
static inline __attribute__((always_inline)) void axpy_block(
    const int NT, const float *h, int64_t ldh, const float *w, int64_t ldw, int64_t d_out,
    const int64_t *index, int64_t j0, int64_t j1, float *out, int64_t ldo) {
    const int64_t cv = d_out - d_out % VEC;
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
        const float *r0 = w + index[j] * ldw, *r1 = w + index[j + 1] * ldw;
        const float *r2 = w + index[j + 2] * ldw, *r3 = w + index[j + 3] * ldw;
        /* the next four rows, prefetched while these stream (the last block re-touches itself) */
        const int64_t q = j + 8 <= j1 ? j + 4 : j;
        const float *p0 = w + index[q] * ldw, *p1 = w + index[q + 1] * ldw;
        const float *p2 = w + index[q + 2] * ldw, *p3 = w + index[q + 3] * ldw;
        float g0[MAX_TOKENS], g1[MAX_TOKENS], g2[MAX_TOKENS], g3[MAX_TOKENS];
        for (int t = 0; t < NT; t++) {
            g0[t] = h[t * ldh + j]; g1[t] = h[t * ldh + j + 1];
            g2[t] = h[t * ldh + j + 2]; g3[t] = h[t * ldh + j + 3];
        }
        int64_t c = 0;
        for (; c < cv; c += VEC) {
            __builtin_prefetch(p0 + c, 0, PREFETCH_LOCALITY); __builtin_prefetch(p1 + c, 0, PREFETCH_LOCALITY);
            __builtin_prefetch(p2 + c, 0, PREFETCH_LOCALITY); __builtin_prefetch(p3 + c, 0, PREFETCH_LOCALITY);
            const vf w0 = load(r0 + c), w1 = load(r1 + c), w2 = load(r2 + c), w3 = load(r3 + c);
            for (int t = 0; t < NT; t++) {
                float *o = out + t * ldo + c;
                store(o, load(o) + ((g0[t] * w0 + g1[t] * w1) + (g2[t] * w2 + g3[t] * w3)));
            }
        }
        for (; c < d_out; c++)
            for (int t = 0; t < NT; t++)
                out[t * ldo + c] += (g0[t] * r0[c] + g1[t] * r1[c]) + (g2[t] * r2[c] + g3[t] * r3[c]);
    }
    for (; j < j1; j++) {
        const float *r0 = w + index[j] * ldw;
        float g0[MAX_TOKENS];
        for (int t = 0; t < NT; t++) g0[t] = h[t * ldh + j];
        int64_t c = 0;
        for (; c < cv; c += VEC) {
            const vf w0 = load(r0 + c);
            for (int t = 0; t < NT; t++) {
                float *o = out + t * ldo + c;
                store(o, load(o) + g0[t] * w0);
            }
        }
        for (; c < d_out; c++)
            for (int t = 0; t < NT; t++) out[t * ldo + c] += g0[t] * r0[c];
    }
}

/* out [n, d_out] = the rows j0..j1 part of h @ w[index]. */
static void axpy_range(const float *h, int64_t n, int64_t ldh, const float *w, int64_t ldw, int64_t d_out,
                       const int64_t *index, int64_t j0, int64_t j1, float *out) {
    memset(out, 0, (size_t)(n * d_out) * sizeof(float));
    for (int64_t t0 = 0; t0 < n; t0 += MAX_TOKENS) {
        const int64_t nt = n - t0 < MAX_TOKENS ? n - t0 : MAX_TOKENS;
        const float *ht = h + t0 * ldh;
        float *ot = out + t0 * d_out;
        switch (nt) {
            case 1: axpy_block(1, ht, ldh, w, ldw, d_out, index, j0, j1, ot, d_out); break;
            case 2: axpy_block(2, ht, ldh, w, ldw, d_out, index, j0, j1, ot, d_out); break;
            case 3: axpy_block(3, ht, ldh, w, ldw, d_out, index, j0, j1, ot, d_out); break;
            case 4: axpy_block(4, ht, ldh, w, ldw, d_out, index, j0, j1, ot, d_out); break;
            case 5: axpy_block(5, ht, ldh, w, ldw, d_out, index, j0, j1, ot, d_out); break;
            case 6: axpy_block(6, ht, ldh, w, ldw, d_out, index, j0, j1, ot, d_out); break;
            case 7: axpy_block(7, ht, ldh, w, ldw, d_out, index, j0, j1, ot, d_out); break;
            default: axpy_block(8, ht, ldh, w, ldw, d_out, index, j0, j1, ot, d_out); break;
        }
    }
}

/* ---- threading ------------------------------------------------------------------------- */

/* A product is cut into chunks of selected rows. The calling thread and a small persistent pool
 * of workers claim chunks from one atomic ticket (generation << 32 | chunks left), and the
 * caller waits only for chunks that were claimed. So a worker that the OS has not scheduled
 * (the machine is shared; every core is busy) costs nothing: the caller does its share. A
 * fork-join runtime (OpenMP) instead waits at its barrier for every thread, i.e. a whole
 * scheduler time slice (measured: 8 ms instead of 0.3 ms) whenever one is descheduled.
 *
 * axpy chunks write private partial sums (chunk 0 into out), added up in chunk order at the
 * end, so results do not depend on which thread ran what. A forked child inherits the pool's
 * state but not its threads: after_fork_child starts it afresh. */

typedef struct {
    int kind; /* 0 dot, 1 axpy */
    const float *a; int64_t n, lda;
    const float *w; int64_t ldw, width;
    const int64_t *index; int64_t k;
    float *out;
    float *scratch; /* axpy: (chunks - 1) partial outputs of n * width floats */
    int64_t chunks;
} job_t;

#define MAX_WORKERS 63
#define SPIN_ROUNDS 4000              /* ~10-20 us of polling before a thread sleeps */
#define DOT_CHUNK_FLOATS (1 << 14)    /* 64 KiB of weights per chunk */
#define AXPY_CHUNK_FLOATS (1 << 16)   /* larger: every axpy chunk adds an n * d_out partial */
#define MAX_DOT_CHUNKS 256
#define MAX_AXPY_CHUNKS 16

static void run_chunk(const job_t *job, int64_t c) {
    const int64_t j0 = job->k * c / job->chunks, j1 = job->k * (c + 1) / job->chunks;
    if (job->kind == 0) {
        dot_range(job->a, job->n, job->lda, job->w, job->ldw, job->width, job->index, job->k, j0, j1, job->out);
    } else {
        float *out = c == 0 ? job->out : job->scratch + (c - 1) * job->n * job->width;
        axpy_range(job->a, job->n, job->lda, job->w, job->ldw, job->width, job->index, j0, j1, out);
    }
}

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;  /* one product at a time */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static _Atomic uint64_t ticket;      /* generation << 32 | chunks not yet claimed */
static _Atomic int64_t finished;     /* chunks of the current generation done */
static _Atomic int32_t sleepers;
static _Atomic int32_t caller_waits;  /* the caller sleeps on `done` for claimed chunks */
static pthread_cond_t done = PTHREAD_COND_INITIALIZER;
static job_t current;                /* stable while any chunk of its generation is unfinished */
static int32_t workers;
static float *scratch;
static int64_t scratch_floats;

/* In a child after fork(): no worker exists there, and a lock may have been held by one. */
static void after_fork_child(void) {
    pthread_mutex_init(&call_lock, NULL);
    pthread_mutex_init(&wake_lock, NULL);
    pthread_cond_init(&wake, NULL);
    pthread_cond_init(&done, NULL);
    atomic_store(&sleepers, 0);
    atomic_store(&caller_waits, 0);
    workers = 0;
}

/* Claims one chunk of generation gen; -1 when none is left (or the generation moved on). */
static int64_t claim(uint32_t gen) {
    uint64_t t = atomic_load(&ticket);
    while ((uint32_t)(t >> 32) == gen && (t & 0xffffffffu) > 0)
        if (atomic_compare_exchange_weak(&ticket, &t, t - 1)) return current.chunks - (int64_t)(t & 0xffffffffu);
    return -1;
}

static void *worker(void *unused) {
    (void)unused;
    uint32_t seen = (uint32_t)(atomic_load(&ticket) >> 32);
    for (;;) {
        uint32_t gen = seen;
        for (int spin = 0; spin < SPIN_ROUNDS && gen == seen; spin++) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            gen = (uint32_t)(atomic_load(&ticket) >> 32);
        }
        if (gen == seen) {
            pthread_mutex_lock(&wake_lock);
            atomic_fetch_add(&sleepers, 1);
            while ((gen = (uint32_t)(atomic_load(&ticket) >> 32)) == seen) pthread_cond_wait(&wake, &wake_lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&wake_lock);
        }
        seen = gen;
        for (int64_t c; (c = claim(gen)) >= 0;) {
            const int64_t chunks = current.chunks; /* read before the caller may move on */
            run_chunk(&current, c);
            if (atomic_fetch_add(&finished, 1) + 1 == chunks && atomic_load(&caller_waits)) {
                pthread_mutex_lock(&wake_lock);
                pthread_cond_signal(&done);
                pthread_mutex_unlock(&wake_lock);
            }
        }
    }
    return NULL;
}

static int64_t chunk_count(const job_t *job, int32_t threads) {
    if (threads <= 1) return 1;
    const int64_t floats = job->k * job->width;
    const int64_t most = job->kind == 0 ? MAX_DOT_CHUNKS : MAX_AXPY_CHUNKS;
    int64_t chunks = floats / (job->kind == 0 ? DOT_CHUNK_FLOATS : AXPY_CHUNK_FLOATS);
    if (chunks > most) chunks = most;
    if (chunks > job->k) chunks = job->k;
    return chunks < 1 ? 1 : chunks;
}

static int run_job(job_t *job, int64_t units, int32_t threads) {
    for (int64_t j = 0; j < job->k; j++) /* validate first: never read outside w */
        if (job->index[j] < 0 || job->index[j] >= units) return -3;
    if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
    job->chunks = chunk_count(job, threads);
    if (job->chunks == 1) { /* small product, one thread: no pool at all */
        run_chunk(job, 0);
        return 0;
    }
    pthread_mutex_lock(&call_lock);
    const int64_t need = job->kind == 1 ? (job->chunks - 1) * job->n * job->width : 0;
    if (need > scratch_floats) {
        float *grown = realloc(scratch, (size_t)need * sizeof(float));
        if (!grown) { pthread_mutex_unlock(&call_lock); return -2; }
        scratch = grown;
        scratch_floats = need;
    }
    job->scratch = scratch;
    static int fork_handler = 0;
    if (!fork_handler) fork_handler = pthread_atfork(NULL, NULL, after_fork_child) == 0;
    while (workers < threads - 1) { /* started once, on the first parallel product */
        pthread_t id;
        if (pthread_create(&id, NULL, worker, NULL) != 0) break;
        pthread_detach(id);
        workers++;
    }
    current = *job;
    atomic_store(&finished, 0);
    const uint32_t gen = (uint32_t)(atomic_load(&ticket) >> 32) + 1;
    atomic_store(&ticket, ((uint64_t)gen << 32) | (uint64_t)job->chunks); /* publishes current */
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&wake_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&wake_lock);
    }
    for (int64_t c; (c = claim(gen)) >= 0;) {
        run_chunk(job, c);
        atomic_fetch_add(&finished, 1);
    }
    /* Only chunks that a worker claimed remain. Poll briefly, then sleep: if that worker lost
     * its core to another process, our idle core is where the scheduler can move it. */
    for (int spin = 0; spin < SPIN_ROUNDS && atomic_load(&finished) < job->chunks; spin++) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
    if (atomic_load(&finished) < job->chunks) {
        pthread_mutex_lock(&wake_lock);
        atomic_store(&caller_waits, 1);
        while (atomic_load(&finished) < job->chunks) pthread_cond_wait(&done, &wake_lock);
        atomic_store(&caller_waits, 0);
        pthread_mutex_unlock(&wake_lock);
    }
    if (job->kind == 1) /* partial sums, in chunk order */
        for (int64_t c = 1; c < job->chunks; c++) {
            const float *part = job->scratch + (c - 1) * job->n * job->width;
            for (int64_t i = 0; i < job->n * job->width; i++) job->out[i] += part[i];
        }
    pthread_mutex_unlock(&call_lock);
    return 0;
}

/* x [n, ldx] (first d used), w [units, ldw] (first d used), index [k] -> out [n, k]. */
int actscope_dot_rows(const float *x, int64_t n, int64_t ldx, const float *w, int64_t units, int64_t ldw,
                      int64_t d, const int64_t *index, int64_t k, float *out, int32_t threads) {
    job_t job = {0, x, n, ldx, w, ldw, d, index, k, out, NULL, 1};
    return run_job(&job, units, threads);
}

/* h [n, ldh] (first k used), w [units, ldw] (first d_out used), index [k] -> out [n, d_out]. */
int actscope_axpy_rows(const float *h, int64_t n, int64_t ldh, const float *w, int64_t units, int64_t ldw,
                       int64_t d_out, const int64_t *index, int64_t k, float *out, int32_t threads) {
    job_t job = {1, h, n, ldh, w, ldw, d_out, index, k, out, NULL, 1};
    return run_job(&job, units, threads);
}

/* TEAL's input-sparse product with the thresholding fused: out[t, :] = sum over channels i with
 * |x[t, i]| > threshold of x[t, i] * w[i, :]. The channels some token keeps (their union) are
 * found here, in one pass over x, into index[0..k) with each token's own values (0 where that
 * token drops the channel) in h [n, d_in]; kept[t] counts token t's channels; *union_out = k.
 * Then it is axpy_rows over that union: one call instead of the half-dozen tensor operations
 * that building the index costs in the caller, per projection and decoded token. */
int actscope_threshold_axpy_rows(const float *x, int64_t n, int64_t ldx, const float *w, int64_t d_in, int64_t ldw,
                                 int64_t d_out, float threshold, int64_t *index, float *h, int64_t *kept,
                                 int64_t *union_out, float *out, int32_t threads) {
    int64_t k = 0;
    for (int64_t t = 0; t < n; t++) kept[t] = 0;
    for (int64_t i = 0; i < d_in; i++) {
        int any = 0;
        for (int64_t t = 0; t < n; t++) any |= __builtin_fabsf(x[t * ldx + i]) > threshold;
        if (!any) continue;
        for (int64_t t = 0; t < n; t++) {
            const float v = x[t * ldx + i];
            const int keep = __builtin_fabsf(v) > threshold;
            h[t * d_in + k] = keep ? v : 0.0f;
            kept[t] += keep;
        }
        index[k++] = i;
    }
    *union_out = k;
    if (k == 0) {
        memset(out, 0, (size_t)(n * d_out) * sizeof(float));
        return 0;
    }
    job_t job = {1, h, n, d_in, w, ldw, d_out, index, k, out, NULL, 1};
    return run_job(&job, d_in, threads);
}
