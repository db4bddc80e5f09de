/* localv3's CPU products of block-quantised weights with a few activation rows (decoding).
 *
 * Weights stay in ggml's block layouts (Q4_K, Q6_K, Q8_0, Q4_0), read where they lie (a
 * checkpoint's memory or a memory-mapped GGUF). Activations are quantised to 8 bits once per call
 * (one scale per 256 values for the K types, per 32 for the others), and each weight row is dotted with
 * every activation row while it is in the L1 cache, so a matrix is read from memory once per
 * call whatever the token count.
 *
 * What makes it fast at batch 1 is the memory side: each row kernel prefetches the weight
 * bytes PREFETCH_AHEAD bytes in front of the ones it reads, so that the core keeps many cache
 * lines in flight while it computes. Without that a quantised matrix-vector product spends its
 * time waiting on one line after another (ggml's kernels read ~6 GB/s per core here, against
 * ~11 GB/s a plain read gets); with it the products run near the core's read bandwidth.
 *
 * Built by localv3/kernels/build.py with the host compiler's -march=native: the AVX-512BW
 * kernels where the CPU has them, else the AVX2 ones (FMA and F16C too); without either this
 * file does not compile and localv3 keeps ggml's kernels.
 *
 * Threads: OpenMP, one parallel region per call, rows split evenly between the threads.
 */
#define _GNU_SOURCE /* qsort_r */
#include "quant_blocks.h"

#define PREFETCH_AHEAD 4096 /* bytes; measured best at 2-8 KB on a V3 expert (2 threads) */
#define TILE_TOKENS 16      /* activation rows a row kernel takes at once (its accumulators) */

static float max_abs(const float *x, int n) {
    float amax = 0.f;
    for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    return amax;
}

/* x[n] -> q[n] int8 with q * d ~ x; returns d */
static float quantize_8bit(const float *x, int n, int8_t *q) {
    float d = max_abs(x, n) / 127.f, inverse = d > 0.f ? 1.f / d : 0.f;
    for (int i = 0; i < n; i++) q[i] = (int8_t)lrintf(x[i] * inverse);
    return d;
}

static void quantize_256(const float *x, int n, const int *order, act_256 *out) {
    for (int b = 0; b < n / 256; b++) {
        int8_t q[256];
        out[b].d = quantize_8bit(x + 256 * b, 256, q);
        for (int g = 0; g < 16; g++) {
            int sum = 0;
            for (int i = 0; i < 16; i++) sum += q[16 * g + i];
            out[b].bsum16[g] = (int16_t)sum;
        }
        for (int s = 0; s < 8; s++) {
            out[b].bsum[s] = (int16_t)(out[b].bsum16[2 * s] + out[b].bsum16[2 * s + 1]);
            memcpy(out[b].q + 32 * s, q + 32 * order[s], 32);
        }
    }
}

static void quantize_32(const float *x, int n, act_32 *out) {
    for (int b = 0; b < n / 32; b++) {
        out[b].d = quantize_8bit(x + 32 * b, 32, out[b].q);
        int sum = 0;
        for (int i = 0; i < 32; i++) sum += out[b].q[i];
        out[b].sum = sum;
    }
}

static inline void prefetch_lines(const uint8_t *p, int lines) {
    for (int i = 0; i < lines; i++) _mm_prefetch((const char *)(p + PREFETCH_AHEAD + 64 * i), _MM_HINT_T0);
}

static inline float sum_m128(__m128 v) {
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}

static inline float sum_m256(__m256 v) {
    return sum_m128(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

/* Row kernels: out[t * out_stride] = row . activation row t, for t < tokens <= TILE_TOKENS; nb
 * blocks a row. Each weight block is loaded and unpacked once and used for every token. */

/* ----- Q4_K ------------------------------------------------------------------------------- */
#if LV3_AVX512
/* acc + the int16 pairs of p times the int16 scales, summed in pairs into int32 lanes */
static inline __m512i add_scaled_pairs(__m512i acc, __m512i p, __m512i scale) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, p, scale);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p, scale));
#endif
}
#endif

#define ROW_KERNEL static inline void

ROW_KERNEL row_q4_k_tokens(const uint8_t *row, const uint8_t *act, size_t act_bytes, int tokens, int nb, float *out, size_t out_stride) {
    __m128 mins[TILE_TOKENS]; /* per token: 4 lanes of dmin * da * (mins . sub-block sums) */
    for (int t = 0; t < tokens; t++) mins[t] = _mm_setzero_ps();
#if LV3_AVX512
    /* int16 scales per 128-bit quarter: quarters 0-1 take one sub-block's scale, 2-3 another's */
    const __m512i pick[4] = {
        _mm512_set_epi64(0x0504050405040504, 0x0504050405040504, 0x0504050405040504, 0x0504050405040504,
                         0x0100010001000100, 0x0100010001000100, 0x0100010001000100, 0x0100010001000100),
        _mm512_set_epi64(0x0706070607060706, 0x0706070607060706, 0x0706070607060706, 0x0706070607060706,
                         0x0302030203020302, 0x0302030203020302, 0x0302030203020302, 0x0302030203020302),
        _mm512_set_epi64(0x0d0c0d0c0d0c0d0c, 0x0d0c0d0c0d0c0d0c, 0x0d0c0d0c0d0c0d0c, 0x0d0c0d0c0d0c0d0c,
                         0x0908090809080908, 0x0908090809080908, 0x0908090809080908, 0x0908090809080908),
        _mm512_set_epi64(0x0f0e0f0e0f0e0f0e, 0x0f0e0f0e0f0e0f0e, 0x0f0e0f0e0f0e0f0e, 0x0f0e0f0e0f0e0f0e,
                         0x0b0a0b0a0b0a0b0a, 0x0b0a0b0a0b0a0b0a, 0x0b0a0b0a0b0a0b0a, 0x0b0a0b0a0b0a0b0a),
    };
    __m512 sums[TILE_TOKENS];
    for (int t = 0; t < tokens; t++) sums[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const block_q4_k *w = (const block_q4_k *)row + b;
        prefetch_lines((const uint8_t *)w, 3);
        uint64_t sc, mn;
        q4_k_scales(w->scales, &sc, &mn);
        const __m512i sc16 = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc)));
        const __m128i mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mn));
        __m512i nib[4];
        q4_k_nibbles(w, nib);
        const __m512i scale[4] = {_mm512_shuffle_epi8(sc16, pick[0]), _mm512_shuffle_epi8(sc16, pick[1]),
                                  _mm512_shuffle_epi8(sc16, pick[2]), _mm512_shuffle_epi8(sc16, pick[3])};
        const float d = half_to_float(w->d), dmin = half_to_float(w->dmin);
        for (int t = 0; t < tokens; t++) {
            const act_256 *a = (const act_256 *)(act + t * act_bytes) + b;
            __m512i acc = _mm512_setzero_si512();
            for (int i = 0; i < 4; i++) acc = add_scaled_pairs(acc, _mm512_maddubs_epi16(nib[i], _mm512_loadu_si512(a->q + 64 * i)), scale[i]);
            sums[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(d * a->d), sums[t]);
            mins[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(mn16, _mm_loadu_si128((const __m128i *)a->bsum))), _mm_set1_ps(dmin * a->d), mins[t]);
        }
    }
    for (int t = 0; t < tokens; t++) out[t * out_stride] = _mm512_reduce_add_ps(sums[t]) - sum_m128(mins[t]);
#else
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    __m256 sums[TILE_TOKENS];
    for (int t = 0; t < tokens; t++) sums[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const block_q4_k *w = (const block_q4_k *)row + b;
        prefetch_lines((const uint8_t *)w, 3);
        uint64_t sc, mn;
        q4_k_scales(w->scales, &sc, &mn);
        const __m128i mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mn));
        __m256i nib[8], scale[8];
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * j));
            nib[2 * j] = _mm256_and_si256(q, low4);
            nib[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
        }
        for (int s = 0; s < 8; s++) scale[s] = _mm256_set1_epi16((short)((sc >> (8 * s)) & 0xff));
        const float d = half_to_float(w->d), dmin = half_to_float(w->dmin);
        for (int t = 0; t < tokens; t++) {
            const act_256 *a = (const act_256 *)(act + t * act_bytes) + b;
            __m256i acc = _mm256_setzero_si256();
            for (int s = 0; s < 8; s++)
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(nib[s], _mm256_loadu_si256((const __m256i *)(a->q + 32 * s))), scale[s]));
            sums[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(d * a->d), sums[t]);
            mins[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(mn16, _mm_loadu_si128((const __m128i *)a->bsum))), _mm_set1_ps(dmin * a->d), mins[t]);
        }
    }
    for (int t = 0; t < tokens; t++) out[t * out_stride] = sum_m256(sums[t]) - sum_m128(mins[t]);
#endif
}

/* ----- Q8_0 and Q4_0: 32 signed 8-bit weights per block (Q4_0's nibbles minus 8) ---------- */
static inline __m256i q4_0_values(const block_q4_0 *w) {
    const __m128i q = _mm_loadu_si128((const __m128i *)w->qs), low4 = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    const __m128i lo = _mm_sub_epi8(_mm_and_si128(q, low4), eight), hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), low4), eight);
    return _mm256_set_m128i(hi, lo); /* elements 0-15 are the low nibbles, 16-31 the high ones */
}

static inline __m256i block_values(const uint8_t *row, int type, int b) {
    if (type == TYPE_Q8_0) return _mm256_loadu_si256((const __m256i *)((const block_q8_0 *)row + b)->qs);
    return q4_0_values((const block_q4_0 *)row + b);
}

static inline float block_scale(const uint8_t *row, int type, int b) {
    return half_to_float(type == TYPE_Q8_0 ? ((const block_q8_0 *)row + b)->d : ((const block_q4_0 *)row + b)->d);
}

/* sum of w * a over 32 signed bytes each, as 8 int32 lanes (|w| and a with w's sign: maddubs) */
static inline __m256i dot_32(__m256i w, __m256i a) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w)), _mm256_set1_epi16(1));
}

ROW_KERNEL row_32_tokens(int type, const uint8_t *row, const uint8_t *act, size_t act_bytes, int tokens, int nb, float *out, size_t out_stride) {
    const int block_bytes = type == TYPE_Q8_0 ? (int)sizeof(block_q8_0) : (int)sizeof(block_q4_0);
    int b = 0;
#if LV3_AVX512
    const int lines = (2 * block_bytes + 63) / 64;
    const __m512i ones = _mm512_set1_epi16(1);
    __m512 wide[TILE_TOKENS];
    for (int t = 0; t < tokens; t++) wide[t] = _mm512_setzero_ps();
    for (; b + 1 < nb; b += 2) {
        prefetch_lines(row + b * block_bytes, lines);
        const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(block_values(row, type, b)), block_values(row, type, b + 1), 1);
        const __m512i magnitude = _mm512_abs_epi8(w);
        const __mmask64 negative = _mm512_movepi8_mask(w);
        const __m512 scale = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(block_scale(row, type, b)), _mm512_set1_ps(block_scale(row, type, b + 1)));
        for (int t = 0; t < tokens; t++) {
            const act_32 *a = (const act_32 *)(act + t * act_bytes) + b;
            const __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a[0].q)), _mm256_loadu_si256((const __m256i *)a[1].q), 1);
            const __m512i signed_x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
            const __m512i dot = _mm512_madd_epi16(_mm512_maddubs_epi16(magnitude, signed_x), ones);
            const __m512 both = _mm512_mul_ps(scale, _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(a[0].d), _mm512_set1_ps(a[1].d)));
            wide[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), both, wide[t]);
        }
    }
#endif
    __m256 sums[TILE_TOKENS];
    for (int t = 0; t < tokens; t++) sums[t] = _mm256_setzero_ps();
    for (; b < nb; b++) {
        prefetch_lines(row + b * block_bytes, 1);
        const __m256i w = block_values(row, type, b);
        const float scale = block_scale(row, type, b);
        for (int t = 0; t < tokens; t++) {
            const act_32 *a = (const act_32 *)(act + t * act_bytes) + b;
            const __m256i dot = dot_32(w, _mm256_loadu_si256((const __m256i *)a->q));
            sums[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale * a->d), sums[t]);
        }
    }
    for (int t = 0; t < tokens; t++) {
        float total = sum_m256(sums[t]);
#if LV3_AVX512
        total += _mm512_reduce_add_ps(wide[t]);
#endif
        out[t * out_stride] = total;
    }
}

/* ----- Q6_K (256-bit code in both builds) --------------------------------------------------- */
ROW_KERNEL row_q6_k_tokens(const uint8_t *row, const uint8_t *act, size_t act_bytes, int tokens, int nb, float *out, size_t out_stride) {
    __m256 sums[TILE_TOKENS];
    for (int t = 0; t < tokens; t++) sums[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const block_q6_k *w = (const block_q6_k *)row + b;
        prefetch_lines((const uint8_t *)w, 4);
        __m256i q[8], scale[8]; /* the 8 runs of 32 weights (unsigned 6-bit), their two scales as int16 lanes */
        q6_k_values(w, q);
        for (int k = 0; k < 8; k++) scale[k] = _mm256_set_m128i(_mm_set1_epi16(w->scales[2 * k + 1]), _mm_set1_epi16(w->scales[2 * k]));
        const __m256i scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w->scales));
        const float d = half_to_float(w->d);
        for (int t = 0; t < tokens; t++) {
            const act_256 *a = (const act_256 *)(act + t * act_bytes) + b;
            /* sum of scale * (q - 32) * a = sum of scale * q * a - 32 * sum of scale * (group's sum of a) */
            __m256i acc = _mm256_slli_epi32(_mm256_madd_epi16(scales16, _mm256_loadu_si256((const __m256i *)a->bsum16)), 5);
            acc = _mm256_sub_epi32(_mm256_setzero_si256(), acc);
            for (int g = 0; g < 8; g++)
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(q[g], _mm256_loadu_si256((const __m256i *)(a->q + 32 * g))), scale[g]));
            sums[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(d * a->d), sums[t]);
        }
    }
    for (int t = 0; t < tokens; t++) out[t * out_stride] = sum_m256(sums[t]);
}

/* One activation row (decoding) gets its own copy of each kernel, compiled for that count: its
 * accumulators live in registers, which matters for short rows (MLA's per-head W_UK: 4 blocks). */
static void row_q4_k(const uint8_t *row, const uint8_t *act, size_t act_bytes, int tokens, int nb, float *out, size_t out_stride) {
    if (tokens == 1) row_q4_k_tokens(row, act, act_bytes, 1, nb, out, out_stride);
    else row_q4_k_tokens(row, act, act_bytes, tokens, nb, out, out_stride);
}

static void row_32(int type, const uint8_t *row, const uint8_t *act, size_t act_bytes, int tokens, int nb, float *out, size_t out_stride) {
    if (tokens == 1) row_32_tokens(type, row, act, act_bytes, 1, nb, out, out_stride);
    else row_32_tokens(type, row, act, act_bytes, tokens, nb, out, out_stride);
}

static void row_q6_k(const uint8_t *row, const uint8_t *act, size_t act_bytes, int tokens, int nb, float *out, size_t out_stride) {
    if (tokens == 1) row_q6_k_tokens(row, act, act_bytes, 1, nb, out, out_stride);
    else row_q6_k_tokens(row, act, act_bytes, tokens, nb, out, out_stride);
}

/* ----- types ------------------------------------------------------------------------------ */
typedef struct {
    int block;            /* weights per block */
    size_t block_bytes;   /* bytes per weight block */
    size_t act_bytes;     /* bytes per activation block */
} type_info;

static int type_info_of(int type, type_info *info) {
    switch (type) {
    case TYPE_Q4_K: *info = (type_info){256, sizeof(block_q4_k), sizeof(act_256)}; return 1;
    case TYPE_Q6_K: *info = (type_info){256, sizeof(block_q6_k), sizeof(act_256)}; return 1;
    case TYPE_Q8_0: *info = (type_info){32, sizeof(block_q8_0), sizeof(act_32)}; return 1;
    case TYPE_Q4_0: *info = (type_info){32, sizeof(block_q4_0), sizeof(act_32)}; return 1;
    default: return 0;
    }
}

static void quantize_activation(int type, const float *x, int n, uint8_t *out) {
    if (type == TYPE_Q4_K) quantize_256(x, n, q4_k_order, (act_256 *)out);
    else if (type == TYPE_Q6_K) quantize_256(x, n, natural_order, (act_256 *)out);
    else quantize_32(x, n, (act_32 *)out);
}

/* any number of tokens, TILE_TOKENS at a time (the row stays in L1 between tiles) */
static void row_product(int type, const uint8_t *row, const uint8_t *act, size_t act_bytes, int tokens, int nb, float *out, size_t out_stride) {
    for (int first = 0; first < tokens; first += TILE_TOKENS) {
        const int tile = tokens - first < TILE_TOKENS ? tokens - first : TILE_TOKENS;
        const uint8_t *tile_act = act + first * act_bytes;
        float *tile_out = out + first * out_stride;
        if (type == TYPE_Q4_K) row_q4_k(row, tile_act, act_bytes, tile, nb, tile_out, out_stride);
        else if (type == TYPE_Q6_K) row_q6_k(row, tile_act, act_bytes, tile, nb, tile_out, out_stride);
        else row_32(type, row, tile_act, act_bytes, tile, nb, tile_out, out_stride);
    }
}

/* PANEL_ROWS rows (or fewer: the last of a matrix), row_bytes apart, times `tokens` activation rows:
 * a panel where this build has one for the type and there are tokens enough to repay packing it,
 * else row by row. */
#define PANEL_MIN_TOKENS 16
static void tile_product(int type, const uint8_t *w, size_t row_bytes, int rows, const uint8_t *act, size_t act_bytes,
                         int tokens, int nb, float *out, size_t out_stride, panel_tokens *packed) {
    if (tokens >= PANEL_MIN_TOKENS && panel_takes(type) &&
        panel_product(type, w, row_bytes, rows, nb, act, act_bytes, tokens, out, out_stride, packed) == 0)
        return; /* (out of memory for the panel: the row kernels need none) */
    for (int r = 0; r < rows; r++) row_product(type, w + r * row_bytes, act, act_bytes, tokens, nb, out + r, out_stride);
}

static int tile_rows(long rows, long first) { return rows - first < PANEL_ROWS ? (int)(rows - first) : PANEL_ROWS; }

/* A per-thread scratch buffer that only grows: no allocation per call once warm. */
static __thread growing scratch_memory;

static size_t align64(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

static uint8_t *scratch(size_t bytes) { return grown(&scratch_memory, bytes); }

/* ----- entry points ----------------------------------------------------------------------- */
static int by_expert(const void *a, const void *b, void *ids) {
    const int pa = *(const int *)a, pb = *(const int *)b, ea = ((const int32_t *)ids)[pa], eb = ((const int32_t *)ids)[pb];
    return ea != eb ? (ea > eb) - (ea < eb) : (pa > pb) - (pa < pb);
}

int lv3_supports(int type) {
    type_info info;
    return type_info_of(type, &info);
}

int lv3_avx512(void) { return LV3_AVX512; }

/* whether products of this type with PANEL_MIN_TOKENS or more activation rows run as panels */
int lv3_panel_takes(int type) { return panel_takes(type); }

/* For each of `groups` groups g: out_g [tokens, rows] = x_g [tokens, n] . W_g [rows, n]^T, where
 * W_g is at w + g * w_group_bytes, x_g at x + g * x_group_floats, out_g at out + g * out_group_floats.
 * Returns 0, or -1 for a type this file has no kernel for (or a bad shape), -2 out of memory. */
int lv3_matmul(int type, const uint8_t *w, size_t w_group_bytes, long rows, int n, const float *x, size_t x_group_floats,
               int tokens, float *out, size_t out_group_floats, int groups, int threads) {
    type_info info;
    if (!type_info_of(type, &info) || tokens < 1 || n % info.block) return -1;
    const int nb = n / info.block;
    const size_t act_row = nb * info.act_bytes, row_bytes = nb * info.block_bytes;
    uint8_t *act = scratch((size_t)groups * tokens * act_row);
    if (!act) return -2;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long i = 0; i < (long)groups * tokens; i++)
            quantize_activation(type, x + (i / tokens) * x_group_floats + (i % tokens) * n, n, act + i * act_row);
        const long tiles = (rows + PANEL_ROWS - 1) / PANEL_ROWS;
        panel_tokens packed = {0};
#pragma omp for schedule(static)
        for (long i = 0; i < groups * tiles; i++) {
            const long g = i / tiles, first = i % tiles * PANEL_ROWS;
            tile_product(type, w + g * w_group_bytes + first * row_bytes, row_bytes, tile_rows(rows, first), act + g * tokens * act_row,
                         act_row, tokens, nb, out + g * out_group_floats + first, rows, &packed);
        }
    }
    return 0;
}

/* SwiGLU experts: for token t and its j-th choice e = ids[t, j], with W at base + e * stride:
 * y = down_e (silu(gate_e x_t) * up_e x_t), and out[t] = sum_j weights[t, j] * y.
 * gate and up: [hidden, dim] of `gate_type`; down: [dim, hidden] of `down_type`. A dense SwiGLU
 * MLP is one expert chosen by every token with weight 1. Each matrix an expert's tokens need is
 * read once. Returns as lv3_matmul. */
int lv3_swiglu_experts(int gate_type, const uint8_t *gate, const uint8_t *up, size_t gate_up_stride, int down_type,
                       const uint8_t *down, size_t down_stride, int dim, int hidden, const float *x, int tokens,
                       const int32_t *ids, const float *weights, int k, float *out, int threads) {
    type_info gi, di;
    if (!type_info_of(gate_type, &gi) || !type_info_of(down_type, &di) || tokens < 1 || k < 1 || dim % gi.block || hidden % di.block)
        return -1;
    const int pairs = tokens * k, gate_nb = dim / gi.block, down_nb = hidden / di.block;
    const size_t x_act = gate_nb * gi.act_bytes, h_act = down_nb * di.act_bytes;
    const size_t gate_row = gate_nb * gi.block_bytes, down_row = down_nb * di.block_bytes;

    /* scratch: the routing (below), x's activations in `order` (pair p's token at slot p), gate
       then up of every pair, the hidden values' activations, each pair's output */
    const size_t index_bytes = align64(3 * (size_t)(pairs + 1) * sizeof(int)), x_bytes = align64(pairs * x_act);
    const size_t gu_bytes = align64(2 * (size_t)pairs * hidden * sizeof(float)), h_bytes = align64(pairs * h_act);
    const size_t y_bytes = (size_t)pairs * dim * sizeof(float);
    uint8_t *memory = scratch(index_bytes + x_bytes + gu_bytes + h_bytes + y_bytes);
    if (!memory) return -2;
    uint8_t *xa = memory + index_bytes, *ha = xa + x_bytes + gu_bytes;
    float *gu = (float *)(xa + x_bytes), *y = (float *)(ha + h_bytes);

    /* the pairs (t, j) sorted by expert (stable), each pair's place in that order, and the runs of
       one expert: groups */
    int *order = (int *)memory, *position = order + pairs, *group_start = position + pairs, groups = 0;
    for (int p = 0; p < pairs; p++) order[p] = p;
    qsort_r(order, pairs, sizeof(int), by_expert, (void *)ids);
    for (int p = 0; p < pairs; p++) position[order[p]] = p;
    for (int p = 0; p < pairs; p++)
        if (p == 0 || ids[order[p]] != ids[order[p - 1]]) group_start[groups++] = p;
    group_start[groups] = pairs;

#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int t = 0; t < tokens; t++) {  /* quantise the token once, copy it to its other slots */
            const int first = position[t * k];
            quantize_activation(gate_type, x + (size_t)t * dim, dim, xa + first * x_act);
            for (int j = 1; j < k; j++) memcpy(xa + position[t * k + j] * x_act, xa + first * x_act, x_act);
        }
        /* each chosen expert's gate and up rows, for all of its tokens at once */
        const int hidden_tiles = (hidden + PANEL_ROWS - 1) / PANEL_ROWS, dim_tiles = (dim + PANEL_ROWS - 1) / PANEL_ROWS;
        panel_tokens packed = {0};
#pragma omp for schedule(static)
        for (long i = 0; i < (long)groups * hidden_tiles; i++) {
            const int g = (int)(i / hidden_tiles), r = (int)(i % hidden_tiles) * PANEL_ROWS, first = group_start[g], count = group_start[g + 1] - first;
            const size_t expert = (size_t)ids[order[first]], offset = expert * gate_up_stride + r * gate_row;
            float *slot = gu + (size_t)first * 2 * hidden + r;
            tile_product(gate_type, gate + offset, gate_row, tile_rows(hidden, r), xa + first * x_act, x_act, count, gate_nb, slot, 2 * hidden, &packed);
            tile_product(gate_type, up + offset, gate_row, tile_rows(hidden, r), xa + first * x_act, x_act, count, gate_nb, slot + hidden, 2 * hidden, &packed);
        }
#pragma omp for schedule(static)
        for (int p = 0; p < pairs; p++) {
            float *slot = gu + (size_t)p * 2 * hidden;
            for (int r = 0; r < hidden; r++) slot[r] = slot[r] / (1.f + expf(-slot[r])) * slot[hidden + r];
            quantize_activation(down_type, slot, hidden, ha + p * h_act);
        }
#pragma omp for schedule(static)
        for (long i = 0; i < (long)groups * dim_tiles; i++) {
            const int g = (int)(i / dim_tiles), r = (int)(i % dim_tiles) * PANEL_ROWS, first = group_start[g], count = group_start[g + 1] - first;
            const size_t expert = (size_t)ids[order[first]];
            tile_product(down_type, down + expert * down_stride + r * down_row, down_row, tile_rows(dim, r), ha + first * h_act, h_act, count,
                         down_nb, y + (size_t)first * dim + r, dim, &packed);
        }
        /* out[t] = sum over j of weights[t, j] * output of (t, j), in j's order whatever the ids */
#pragma omp for schedule(static)
        for (int t = 0; t < tokens; t++) {
            float *o = out + (size_t)t * dim;
            memset(o, 0, dim * sizeof(float));
            for (int j = 0; j < k; j++) {
                const float weight = weights[t * k + j], *yp = y + (size_t)position[t * k + j] * dim;
                for (int r = 0; r < dim; r++) o[r] += weight * yp[r];
            }
        }
    }
    return 0;
}

/* Per-head matrices W_h [rows, n] of 32-value blocks (Q8_0, Q4_0) -> float out [heads * n, rows]
 * with out[h * n + i][r] = W_h[r][i]: the heads' transposed maps stacked (MLA's W_UK as the
 * keys' up-projection of a prompt chunk). Rows are dequantised 16 at a time, so each 64-byte
 * line of the output is written whole. Returns 0, or -1 for another block type or shape. */
int lv3_dequantize_transposed(int type, const uint8_t *w, long heads, long rows, int n, float *out, int threads) {
    type_info info;
    if ((type != TYPE_Q8_0 && type != TYPE_Q4_0) || !type_info_of(type, &info) || n % 32 || n > 1024) return -1;
    const int nb = n / 32;
    const size_t row_bytes = nb * info.block_bytes;
    const long tiles = (rows + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long job = 0; job < heads * tiles; job++) {
        const long h = job / tiles, first = (job % tiles) * 16, count = rows - first < 16 ? rows - first : 16;
        float tile[16][1024];
        for (long r = 0; r < count; r++) {
            const uint8_t *row = w + (h * rows + first + r) * row_bytes;
            for (int b = 0; b < nb; b++) {
                const float d = block_scale(row, type, b);
                int8_t q[32];
                _mm256_storeu_si256((__m256i *)q, block_values(row, type, b));
                for (int i = 0; i < 32; i++) tile[r][32 * b + i] = (float)q[i] * d;
            }
        }
        for (int i = 0; i < n; i++) {
            float *line = out + (h * n + i) * rows + first;
            for (long r = 0; r < count; r++) line[r] = tile[r][i];
        }
    }
    return 0;
}
