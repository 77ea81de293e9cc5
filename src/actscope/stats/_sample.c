/* The firing sample of sampling.FiringSample, updated in place: per unit, the `r` tokens with the
 * smallest keys among those it fired on (0 < a < inf), kept sorted by key (ascending; +inf / -1
 * / NaN padding). The same result as the torch path, in one pass that reads only what can enter.
 *
 * Rows are visited in ascending key order (`order`, `keys` already sorted): a unit takes only keys
 * below its limit (a full unit's largest kept key; +inf while it has fewer than r), so a column
 * block reads rows only up to the largest limit of its units, except for the few units with the
 * largest limits, which read their own columns (see block()). A row's values are compared with
 * the limits in a branch-free loop the compiler vectorises; an entry that passes is inserted by
 * shifting the larger keys up one slot. Units are split between threads by blocks of columns.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 256

static void insert(double *key, int64_t *tok, float *val, int32_t r, double k, int64_t t, float v) {
    int32_t s = r - 1;  /* the largest key goes; larger keys move up to make room */
    while (s > 0 && key[s - 1] > k) {
        key[s] = key[s - 1]; tok[s] = tok[s - 1]; val[s] = val[s - 1];
        s--;
    }
    key[s] = k; tok[s] = t; val[s] = v;
}

/* How many of the sorted keys are below k. */
static int64_t rows_below(const double *keys, int64_t n, double k) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (keys[mid] < k) lo = mid + 1; else hi = mid;
    }
    return lo;
}

static int by_limit_desc(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

static void take(const float *x, int64_t u, const int64_t *order, const double *keys, const int64_t *tok, int32_t r,
                 double *s_key, int64_t *s_tok, float *s_val, double *limit, int64_t i, int64_t g, float v) {
    insert(s_key + g * r, s_tok + g * r, s_val + g * r, r, keys[i], tok[order[i]], v);
    *limit = s_key[g * r + r - 1];
    (void)x; (void)u;
}

/* One block of columns. Its units with the `wide` largest limits (rare units whose samples are
 * still open or recent) read every row of their own column; the others read, row by row, only the
 * rows below the largest of their limits, with a vectorised test of the whole row segment. `wide`
 * is chosen from a few sizes to read the fewest entries. */
static void block(const float *x, int64_t n, int64_t u, const int64_t *order, const double *keys, const int64_t *tok,
                  int32_t r, double *s_key, int64_t *s_tok, float *s_val, int64_t j0, int64_t j1) {
    double limit[BLOCK], sorted[BLOCK];
    const int64_t width = j1 - j0;
    for (int64_t j = 0; j < width; j++) sorted[j] = limit[j] = s_key[(j0 + j) * r + r - 1];
    qsort(sorted, (size_t)width, sizeof(double), by_limit_desc);
    int64_t wide = 0, rows = rows_below(keys, n, sorted[0]);
    double best = (double)rows * (double)width;
    for (int64_t j = 1; j < width; j *= 2) {  /* j units read their column; the rest, rows below the (j+1)-th limit */
        const int64_t below = rows_below(keys, n, sorted[j]);
        const double cost = (double)n * (double)j + (double)below * (double)width;
        if (cost < best) { best = cost; wide = j; rows = below; }
    }
    const double cut = wide > 0 ? sorted[wide] : INFINITY;
    uint8_t own[BLOCK];  /* 1: the unit reads its column on its own */
    double narrow[BLOCK];
    int64_t left = wide;
    for (int64_t j = 0; j < width; j++) {
        own[j] = left > 0 && limit[j] > cut;  /* ties at the cut stay narrow: their rows are read anyway */
        left -= own[j];
        narrow[j] = own[j] ? -INFINITY : limit[j];
    }
    for (int64_t i = 0; i < rows; i++) {
        const double k = keys[i];
        const float *row = x + order[i] * u + j0;
        int32_t any = 0;
        for (int64_t j = 0; j < width; j++) any |= (row[j] > 0.0f) & (row[j] < INFINITY) & (k < narrow[j]);
        if (!any) continue;
        for (int64_t j = 0; j < width; j++)
            if (row[j] > 0.0f && row[j] < INFINITY && k < narrow[j]) take(x, u, order, keys, tok, r, s_key, s_tok, s_val, &narrow[j], i, j0 + j, row[j]);
    }
    for (int64_t j = 0; j < width; j++) {
        if (!own[j]) continue;
        for (int64_t i = 0; i < n && keys[i] < limit[j]; i++) {
            const float v = x[order[i] * u + j0 + j];
            if (v > 0.0f && v < INFINITY) take(x, u, order, keys, tok, r, s_key, s_tok, s_val, &limit[j], i, j0 + j, v);
        }
    }
}

int actscope_firing_sample(const float *x, int64_t n, int64_t u, const int64_t *order, const double *keys,
                           const int64_t *tok, int32_t r, double *s_key, int64_t *s_tok, float *s_val, int32_t threads) {
    if (r < 1 || threads < 1) return -1;
    const int64_t blocks = (u + BLOCK - 1) / BLOCK;
#ifdef _OPENMP
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
#endif
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t j0 = b * BLOCK, j1 = j0 + BLOCK < u ? j0 + BLOCK : u;
        block(x, n, u, order, keys, tok, r, s_key, s_tok, s_val, j0, j1);
    }
    (void)threads;
    return 0;
}

/* The activation windows of windows.TopWindows, brought in line with a top-k table that just took
 * a batch: for each unit whose token ids changed, a slot keeps the window of its token when the
 * unit had that token before (`old_tok`, `values` rows, read before any is overwritten), and
 * otherwise reads it from the batch: rows `order` sorted by token id (`sorted_tok`), the window
 * being the rows at offsets -before..after that hold the same example's consecutive tokens.
 * `values` [u][k][width] float32 and `old_tok` [u][k] are updated in place; NaN where no token. */
static int64_t find_row(const int64_t *sorted_tok, int64_t n, int64_t t) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (sorted_tok[mid] < t) lo = mid + 1; else hi = mid;
    }
    return lo < n && sorted_tok[lo] == t ? lo : -1;
}

int actscope_follow_windows(const float *x, int64_t n, int64_t u, const int64_t *tok, const int64_t *order,
                            const int64_t *sorted_tok, const int64_t *top_tok, int64_t *old_tok, float *values,
                            int32_t k, int32_t before, int32_t after) {
    const int32_t width = before + 1 + after;
    if (k < 1 || k > 256 || width > 4096) return -1;
    float keep[256 * 64];  /* the old windows of one unit, when they fit */
    for (int64_t g = 0; g < u; g++) {
        const int64_t *now = top_tok + g * k;
        int64_t *was = old_tok + g * k;
        int changed = 0;
        for (int32_t s = 0; s < k; s++) changed |= now[s] != was[s];
        if (!changed) continue;
        float *win = values + g * k * width;
        if ((int64_t)k * width > (int64_t)(sizeof keep / sizeof keep[0])) return -2;
        for (int32_t i = 0; i < k * width; i++) keep[i] = win[i];
        int64_t before_tok[256];
        for (int32_t s = 0; s < k; s++) before_tok[s] = was[s];
        for (int32_t s = 0; s < k; s++) {
            const int64_t t = now[s];
            float *out = win + s * width;
            int32_t found = -1;
            for (int32_t o = 0; o < k && t >= 0; o++) if (before_tok[o] == t) { found = o; break; }
            if (found >= 0) {
                for (int32_t i = 0; i < width; i++) out[i] = keep[found * width + i];
            } else {
                const int64_t at = t >= 0 ? find_row(sorted_tok, n, t) : -1;
                const int64_t row = at >= 0 ? order[at] : -1;
                for (int32_t i = 0; i < width; i++) {
                    const int64_t r = row + i - before;
                    out[i] = (row >= 0 && r >= 0 && r < n && tok[r] == t + i - before) ? x[r * u + g] : NAN;
                }
            }
            was[s] = t;
        }
    }
    return 0;
}
