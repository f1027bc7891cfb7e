/* Fused CPU encode/decode of the compressors (localsgd_optim.rounds.chunked and .int8).
 *
 * One pass per stage over a bucket where eager PyTorch makes 10-20: each function does, element by
 * element, the same IEEE float32 operations in the same order as the eager path it replaces (a
 * division, a clamp, a floor, a product, a difference: each correctly rounded on any CPU), so the
 * two agree bit for bit. It must be compiled with -ffp-contract=off (no fused multiply-adds) and
 * without -ffast-math. One exception: a dense chunk's float64 sum of squares runs in an order of
 * this file's own (eight lanes, then the lanes in order), not torch.sum's, and in rare chunks (about
 * one in 10^8 of 4096 random values; crafted ones more often) the two sums round to float32 steps a
 * bit apart. Every rank decodes the same bytes, so ranks never disagree; only the two paths may.
 * (Top-k sums the kept values in payload order on both paths.) A NaN (check_finite=False) gets a
 * defined code: the lowest.
 *
 * A bucket is cut into chunks: chunk j is the `lengths[j]` elements from `starts[j]` (positions in
 * the bucket); codes are `bits` wide (2, 4 or 8), packed 8 / bits per byte, the first in the low bits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TINY 1.17549435e-38f /* torch.finfo(torch.float32).tiny */

static double sum_squares(const float *x, int64_t n) {
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) {
            double d = x[i + l];
            lane[l] += d * d; /* exact: a float32's square fits a float64 */
        }
    for (int l = 0; i < n; i++, l++) {
        double d = x[i];
        lane[l] += d * d;
    }
    double s = 0;
    for (int l = 0; l < 8; l++) s += lane[l];
    return s;
}

/* STEP_IN_RMS x the root mean square over `count` (float64, rounded to float32 before the product). */
static float step_of(double squares, int64_t count, float step_in_rms) {
    return (float)sqrt(squares / (double)(count > 0 ? count : 1)) * step_in_rms;
}

static void pack(const uint8_t *codes, int64_t n, int bits, uint8_t *out) {
    if (bits == 8) {
        memcpy(out, codes, (size_t)n);
        return;
    }
    int per = 8 / bits;
    int64_t whole = n / per, i = 0;
    if (bits == 4)
        for (; i < whole; i++) {
            uint16_t word;
            memcpy(&word, codes + 2 * i, 2);
            out[i] = (uint8_t)(word | word >> 4);
        }
    else
        for (; i < whole; i++) { /* one code per byte of a little-endian word, brought next to the first */
            uint32_t word;
            memcpy(&word, codes + 4 * i, 4);
            out[i] = (uint8_t)(word | word >> 6 | word >> 12 | word >> 18);
        }
    if (whole * per < n) { /* the last byte's unused codes are zeros */
        uint8_t b = 0;
        for (int64_t j = whole * per; j < n; j++) b |= (uint8_t)(codes[j] << ((j - whole * per) * bits));
        out[whole] = b;
    }
}

static void unpack(const uint8_t *packed, int64_t n, int bits, uint8_t *codes) {
    if (bits == 8) {
        memcpy(codes, packed, (size_t)n);
        return;
    }
    int per = 8 / bits;
    int64_t whole = n / per, i = 0;
    if (bits == 4)
        for (; i < whole; i++) {
            const uint16_t b = packed[i], word = (uint16_t)((b & 15) | (b >> 4) << 8); /* little-endian */
            memcpy(codes + 2 * i, &word, 2);
        }
    else
        for (; i < whole; i++) { /* the byte's four codes spread to one in each byte of a word */
            uint32_t word = packed[i];
            word = (word | word << 12) & 0x000F000Fu;
            word = (word | word << 6) & 0x03030303u;
            memcpy(codes + 4 * i, &word, 4);
        }
    for (int64_t j = whole * per; j < n; j++) codes[j] = (packed[whole] >> ((j - whole * per) * bits)) & ((1 << bits) - 1);
}

/* v = delta + v, times `weight` if it is not 0 (the eager path's add and multiply), when delta is not
 * NULL (else v is already built). */
static void build(float *x, const float *delta, int64_t n, float weight) {
    if (!delta) return;
    if (weight != 0.0f)
        for (int64_t i = 0; i < n; i++) x[i] = (delta[i] + x[i]) * weight;
    else
        for (int64_t i = 0; i < n; i++) x[i] = delta[i] + x[i];
}

/* Dense: every element of v (numel, the bucket's layout) at `bits` bits, a step per chunk, v built
 * first from `delta` (see build).
 * code = floor(clamp(v / max(step, tiny), -h, h - 1)) + h; the level (code - h + 1/2) * step.
 * Writes the steps, the packed codes (`codes`: numel bytes of scratch), v -= level unless `joined`
 * (then v is not read: steps 0, every code h), and the levels into `levels` if not NULL. */
void lsgd_dense_encode(float *v, const float *delta, float weight, int64_t numel, int64_t nchunks,
                       const int64_t *starts, const int64_t *lengths, int bits, float step_in_rms, int joined,
                       float *steps, uint8_t *codes, uint8_t *packed, float *levels) {
    const int h = 1 << (bits - 1);
    const float lo = (float)-h, hi = (float)(h - 1);
    for (int64_t j = 0; j < nchunks; j++) {
        const int64_t s = starts[j], n = lengths[j];
        uint8_t *c = codes + s;
        if (joined) {
            steps[j] = 0.0f;
            memset(c, h, (size_t)n);
            continue;
        }
        float *x = v + s;
        build(x, delta ? delta + s : NULL, n, weight);
        const float step = step_of(sum_squares(x, n), n, step_in_rms);
        const float d = !(step <= TINY) ? step : TINY; /* (clamp_min: a NaN step stays NaN) */
        steps[j] = step;
        float *lv = levels ? levels + s : NULL;
        for (int64_t i = 0; i < n; i++) {
            float q = x[i] / d;
            q = q >= lo ? q : lo; /* clamp; a NaN (only with check_finite=False) becomes the lowest code */
            q = q <= hi ? q : hi;
            const float f = floorf(q);
            c[i] = (uint8_t)((int)f + h);
            const float level = (f + 0.5f) * step;
            x[i] = x[i] - level;
            if (lv) lv[i] = level;
        }
    }
    pack(codes, numel, bits, packed);
}

/* Dense: one rank's levels (code - (h - 1/2)) * step added into total (the chunks' elements only),
 * the sum then divided by `divisor` unless it is 0 (the last rank of a mean). */
void lsgd_dense_decode(const uint8_t *packed, const float *steps, int64_t numel, int64_t nchunks,
                       const int64_t *starts, const int64_t *lengths, int bits, uint8_t *codes, float *total,
                       float divisor) {
    const float off = (float)(1 << (bits - 1)) - 0.5f;
    unpack(packed, numel, bits, codes);
    for (int64_t j = 0; j < nchunks; j++) {
        const int64_t s = starts[j], n = lengths[j];
        const float step = steps[j];
        const uint8_t *c = codes + s;
        float *t = total + s;
        if (divisor != 0.0f)
            for (int64_t i = 0; i < n; i++) t[i] = (t[i] + ((float)c[i] - off) * step) / divisor;
        else
            for (int64_t i = 0; i < n; i++) t[i] = t[i] + ((float)c[i] - off) * step;
    }
}

/* top-k: an element's rank key, unique in its chunk: |x| as its IEEE bits (ordered like the magnitudes,
 * NaN above +inf) over the position reversed (of equal magnitudes, the earlier position ranks higher). */
static inline uint32_t magnitude(const float *x, int64_t i) {
    return ((const uint32_t *)x)[i] & 0x7fffffffu; /* (built with -fno-strict-aliasing) */
}

static inline uint64_t rank_key(uint32_t magnitude, int64_t i) {
    return (uint64_t)magnitude << 32 | (uint32_t)(0xffffffffu - (uint32_t)i);
}

/* The key that would sit at `want` (from 0) with keys[0:n] sorted descending (the keys are unique):
 * a quickselect with median-of-three pivots; `keys` is permuted. */
static uint64_t select_key(uint64_t *keys, int64_t n, int64_t want) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        const uint64_t a = keys[lo], b = keys[mid], c = keys[hi];
        const uint64_t pivot = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
        int64_t i = lo, j = hi;
        while (i <= j) { /* Hoare: the keys above the pivot to the left */
            while (keys[i] > pivot) i++;
            while (keys[j] < pivot) j--;
            if (i <= j) {
                const uint64_t t = keys[i];
                keys[i++] = keys[j];
                keys[j--] = t;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            break;
    }
    return keys[want];
}

#define BLOCK 8

/* A lower bound of the k-th largest of m[0:n] (k <= n): its top 17 bits, by two histograms of 8 bits
 * (m's top bit is clear: magnitudes). */
static uint32_t kth_prefix(const uint32_t *m, int64_t n, int64_t k) {
    int64_t count[256], above = 0;
    memset(count, 0, sizeof(count));
    for (int64_t i = 0; i < n; i++) count[m[i] >> 23]++;
    int high = 255;
    while (above + count[high] < k) above += count[high--];
    memset(count, 0, sizeof(count));
    for (int64_t i = 0; i < n; i++)
        if ((int)(m[i] >> 23) == high) count[(m[i] >> 15) & 255]++;
    int low = 255;
    while (above + count[low] < k) above += count[low--];
    return (uint32_t)high << 23 | (uint32_t)low << 15;
}

/* The positions of the k largest rank keys of x[0:n] (1 <= k <= n), increasing, into `at`. The k-th
 * largest of the maxima of blocks of BLOCK elements bounds the k-th largest magnitude from below (k
 * blocks hold one at least as large), so only the elements that reach it are ranked. Scratch: `keys`
 * and `work`, n each. */
static void select_top(const float *x, int64_t n, int64_t k, uint64_t *keys, uint64_t *work, int32_t *at) {
    const int64_t whole = n / BLOCK, blocks = (n + BLOCK - 1) / BLOCK;
    uint32_t *maxima = (uint32_t *)at, bound = 0; /* (at: written only once the maxima are spent) */
    if (k < blocks) {
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t len = b < whole ? BLOCK : n - whole * BLOCK;
            const uint32_t *w = (const uint32_t *)x + b * BLOCK;
            uint32_t m = 0;
            if (len == BLOCK)
                for (int l = 0; l < BLOCK; l++) m = (w[l] & 0x7fffffffu) > m ? (w[l] & 0x7fffffffu) : m;
            else
                for (int64_t l = 0; l < len; l++) m = (w[l] & 0x7fffffffu) > m ? (w[l] & 0x7fffffffu) : m;
            maxima[b] = m;
        }
        bound = kth_prefix(maxima, blocks, k);
    }
    int64_t found = 0;
    for (int64_t b = 0; b < blocks; b++) {
        if (k < blocks && maxima[b] < bound) continue;
        const int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        for (int64_t i = b * BLOCK; i < end; i++) {
            const uint32_t m = magnitude(x, i);
            if (m >= bound) keys[found++] = rank_key(m, i);
        }
    }
    memcpy(work, keys, sizeof(uint64_t) * (size_t)found);
    const uint64_t least = select_key(work, found, k - 1);
    for (int64_t c = 0, t = 0; c < found; c++) /* the keys are unique: exactly k reach the k-th */
        if (keys[c] >= least) at[t++] = (int32_t)(0xffffffffu - (uint32_t)keys[c]);
}

static inline void put_position(void *positions, int width, int64_t i, int32_t at) {
    if (width == 1)
        ((uint8_t *)positions)[i] = (uint8_t)at;
    else
        ((int16_t *)positions)[i] = (int16_t)at;
}

/* top-k: per chunk, the kept[j] largest magnitudes of v (of equal ones, the earliest), in the order of
 * their positions: chunk-relative positions (`width` bytes each) and either their values (fp32,
 * `values`) or `bits`-bit codes with a step per chunk over the kept values (`steps`, `packed`); v -= what
 * is sent, at the kept positions, v built first from `delta` (see build). `joined`: v is not read;
 * every chunk sends zeros from position 0.
 * `codes`: scratch of the values sent; `longest`: the longest chunk. Returns 1 if its scratch (20 bytes
 * per element of `longest`) could not be allocated, else 0. */
int lsgd_topk_encode(float *v, const float *delta, float weight, int64_t nchunks, const int64_t *starts,
                      const int64_t *lengths, const int64_t *kept, int64_t longest, int bits, float step_in_rms, int joined, int width, void *positions,
                      float *values, float *steps, uint8_t *codes, uint8_t *packed) {
    const size_t most = (size_t)(longest > 0 ? longest : 1);
    uint64_t *keys = malloc(sizeof(uint64_t) * most), *work = malloc(sizeof(uint64_t) * most);
    int32_t *at = malloc(sizeof(int32_t) * most);
    if (!keys || !work || !at) {
        free(keys);
        free(work);
        free(at);
        return 1;
    }
    const int h = bits ? 1 << (bits - 1) : 0;
    const float top_code = (float)(2 * h - 1), off = (float)h - 0.5f;
    int64_t sent = 0;
    for (int64_t j = 0; j < nchunks; j++) {
        const int64_t k = kept[j];
        float *x = v + starts[j];
        if (!joined) build(x, delta ? delta + starts[j] : NULL, lengths[j], weight);
        if (joined)
            memset(at, 0, sizeof(int32_t) * (size_t)k);
        else if (k > 0)
            select_top(x, lengths[j], k, keys, work, at);
        double squares = 0;
        for (int64_t t = 0; t < k; t++) {
            put_position(positions, width, sent + t, at[t]);
            const float value = joined ? 0.0f : x[at[t]];
            if (bits) {
                squares += (double)value * (double)value;
            } else {
                values[sent + t] = value;
                if (!joined) x[at[t]] = value - value;
            }
        }
        if (bits) {
            const float step = step_of(squares, k, step_in_rms), d = !(step <= TINY) ? step : TINY;
            steps[j] = step;
            for (int64_t t = 0; t < k; t++) {
                const float value = joined ? 0.0f : x[at[t]];
                float code = floorf(value / d) + (float)h;
                code = code >= 0.0f ? code : 0.0f; /* clamp; NaN: code 0 */
                code = code <= top_code ? code : top_code;
                codes[sent + t] = (uint8_t)code;
                if (!joined) x[at[t]] = value - (code - off) * step;
            }
        }
        sent += k;
    }
    if (bits) pack(codes, sent, bits, packed);
    free(keys);
    free(work);
    free(at);
    return 0;
}

/* top-k: one rank's kept values (fp32 `values`, or codes with a step per chunk) added into total at
 * starts[j] + their positions, in payload order. `codes`: scratch of the values sent. */
void lsgd_topk_decode(int64_t nchunks, const int64_t *starts, const int64_t *kept, int bits, int width,
                      const void *positions, const float *values, const float *steps, const uint8_t *packed,
                      int64_t sent_total, uint8_t *codes, float *total) {
    const float off = bits ? (float)(1 << (bits - 1)) - 0.5f : 0.0f;
    if (bits) unpack(packed, sent_total, bits, codes);
    int64_t sent = 0;
    for (int64_t j = 0; j < nchunks; j++) {
        float *t = total + starts[j];
        for (int64_t i = sent; i < sent + kept[j]; i++) {
            const int64_t at = width == 1 ? ((const uint8_t *)positions)[i] : ((const int16_t *)positions)[i];
            const float value = bits ? ((float)codes[i] - off) * steps[j] : values[i];
            t[at] = t[at] + value;
        }
        sent += kept[j];
    }
}

/* int8 (a scale per tensor): tensor j is the `sizes[j]` elements from `offsets[j]`. v is built first
 * from `delta` (see build) unless `joined` (then v is not read and every code and scale is 0); the
 * scale is max|v| / 127 (at least tiny / 127), codes round(v / scale) (half to even) clamped to
 * [-127, 127], and v -= codes * scale unless joined. */
void lsgd_int8_encode(float *v, const float *delta, float weight, int64_t count, const int64_t *offsets,
                      const int64_t *sizes, int joined, int8_t *codes, float *scales) {
    for (int64_t j = 0; j < count; j++) {
        const int64_t s = offsets[j], n = sizes[j];
        float *x = v + s;
        int8_t *c = codes + s;
        if (joined) {
            memset(c, 0, (size_t)n);
            scales[j] = TINY / 127.0f;
            continue;
        }
        build(x, delta ? delta + s : NULL, n, weight);
        uint32_t top = 0; /* max |v| on the magnitudes' bits (ordered alike; a NaN wins, as in torch's max) */
        for (int64_t i = 0; i < n; i++) {
            const uint32_t a = magnitude(x, i);
            top = a > top ? a : top;
        }
        float most;
        memcpy(&most, &top, 4);
        const float scale = (most > TINY || most != most ? most : TINY) / 127.0f;
        scales[j] = scale;
        for (int64_t i = 0; i < n; i++) {
            float q = rintf(x[i] / scale);
            q = q >= -127.0f ? q : -127.0f; /* clamp; NaN: -127 */
            q = q <= 127.0f ? q : 127.0f;
            c[i] = (int8_t)q;
            x[i] = x[i] - q * scale;
        }
    }
}

/* int8: one rank's codes times their tensor's scale added into total, then divided by `divisor`
 * unless it is 0 (the last rank of a mean). */
void lsgd_int8_decode(const int8_t *codes, const float *scales, int64_t count, const int64_t *offsets,
                      const int64_t *sizes, float *total, float divisor) {
    for (int64_t j = 0; j < count; j++) {
        const int64_t s = offsets[j], n = sizes[j];
        const float scale = scales[j];
        const int8_t *c = codes + s;
        float *t = total + s;
        if (divisor != 0.0f)
            for (int64_t i = 0; i < n; i++) t[i] = (t[i] + (float)c[i] * scale) / divisor;
        else
            for (int64_t i = 0; i < n; i++) t[i] = t[i] + (float)c[i] * scale;
    }
}
