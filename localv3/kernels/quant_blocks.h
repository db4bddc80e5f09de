/* What localv3's CPU kernels share (quant_products.c, quant_panels.c): the instruction set they
 * are built for, ggml's block layouts, the 8-bit activation blocks, and the panel products that
 * quant_products.c calls for prefill-sized products. */
#ifndef LV3_QUANT_BLOCKS_H
#define LV3_QUANT_BLOCKS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <immintrin.h>
#include <omp.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__FMA__) && defined(__F16C__)
#define LV3_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LV3_AVX512 0
#else
#error "localv3's CPU kernels need AVX2 with FMA and F16C, or AVX-512BW"
#endif

enum { TYPE_Q4_0 = 2, TYPE_Q8_0 = 8, TYPE_Q4_K = 12, TYPE_Q6_K = 14 }; /* enum ggml_type */

/* ----- block layouts ---------------------------------------------------------------------- */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4_k; /* 144 bytes */
typedef struct { uint16_t d; int8_t qs[32]; } __attribute__((packed)) block_q8_0;     /* 34 bytes */
typedef struct { uint16_t d; uint8_t qs[16]; } __attribute__((packed)) block_q4_0;    /* 18 bytes */
/* Q6_K: 256 weights of 6 bits (low 4 in ql, high 2 in qh) minus 32, in 16 groups of 16 with an
 * int8 scale each, under one fp16 scale d. Within each half of 128 weights, ql[l] holds weights
 * l (low nibble) and l + 64 (high nibble), ql[l + 32] weights l + 32 and l + 96, and qh[l] the
 * high bits of weights l, l + 32, l + 64, l + 96 (bits 0-1, 2-3, 4-5, 6-7), for l < 32. */
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } __attribute__((packed)) block_q6_k; /* 210 bytes */

/* Activations for Q4_K and Q6_K: 256 values, one scale, the sums of each 32-value and each
 * 16-value group. For Q4_K with AVX-512 the values are stored in the order of a 64-byte load of
 * Q4_K nibbles (sub-blocks 0,2 | 1,3 | 4,6 | 5,7: low nibbles of qs[0:64] are weights 0-31 and
 * 64-95, high nibbles 32-63 and 96-127); otherwise in their natural order. */
typedef struct { int8_t q[256]; float d; int16_t bsum[8]; int16_t bsum16[16]; uint8_t pad[12]; } act_256; /* 320 bytes */
/* Activations for Q8_0 and Q4_0: 32 values, one scale, their sum. */
typedef struct { int8_t q[32]; float d; int32_t sum; } act_32; /* 40 bytes */

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

static const int natural_order[8] = {0, 1, 2, 3, 4, 5, 6, 7};
#if LV3_AVX512
static const int q4_k_order[8] = {0, 2, 1, 3, 4, 6, 5, 7}; /* the sub-block stored in each 32-byte slot */
#else
#define q4_k_order natural_order
#endif

/* Q4_K's 6-bit scales and mins of the 8 sub-blocks, as 8 bytes each */
static inline void q4_k_scales(const uint8_t *s, uint64_t *scales, uint64_t *mins) {
    uint32_t w0, w1, w2;
    memcpy(&w0, s, 4);
    memcpy(&w1, s + 4, 4);
    memcpy(&w2, s + 8, 4);
    uint32_t scales_hi = (w2 & 0x0f0f0f0f) | (((w0 >> 6) & 0x03030303) << 4);
    uint32_t mins_hi = ((w2 >> 4) & 0x0f0f0f0f) | (((w1 >> 6) & 0x03030303) << 4);
    *scales = (uint64_t)(w0 & 0x3f3f3f3f) | ((uint64_t)scales_hi << 32);
    *mins = (uint64_t)(w1 & 0x3f3f3f3f) | ((uint64_t)mins_hi << 32);
}

#if LV3_AVX512
/* the 256 values of a Q4_K block (unsigned 4-bit) as 4 runs of 64: the low then high nibbles of
 * qs[0:64], then of qs[64:128], i.e. slots (q4_k_order) 0-1, 2-3, 4-5, 6-7 */
static inline void q4_k_nibbles(const block_q4_k *w, __m512i runs[4]) {
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const __m512i q0 = _mm512_loadu_si512(w->qs), q1 = _mm512_loadu_si512(w->qs + 64);
    runs[0] = _mm512_and_si512(q0, low4), runs[1] = _mm512_and_si512(_mm512_srli_epi16(q0, 4), low4);
    runs[2] = _mm512_and_si512(q1, low4), runs[3] = _mm512_and_si512(_mm512_srli_epi16(q1, 4), low4);
}
#endif

/* the 256 values of a Q6_K block, unsigned (0-63: the weight is d * scale * (q - 32)), as 8
 * runs of 32 in natural order */
static inline void q6_k_values(const block_q6_k *w, __m256i q[8]) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), low2 = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; h++) {
        const __m256i lo = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h)), hi = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h + 32));
        const __m256i top = _mm256_loadu_si256((const __m256i *)(w->qh + 32 * h));
        for (int j = 0; j < 4; j++) {
            const __m256i nibbles = j & 1 ? hi : lo;
            const __m256i low = _mm256_and_si256(j & 2 ? _mm256_srli_epi16(nibbles, 4) : nibbles, low4);
            const __m256i high = _mm256_and_si256(_mm256_srli_epi16(top, 2 * j), low2);
            q[4 * h + j] = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
        }
    }
}

/* a per-thread buffer that only grows: no allocation per call once warm */
typedef struct { uint8_t *memory; size_t size; } growing;

static inline uint8_t *grown(growing *buffer, size_t bytes) {
    if (bytes > buffer->size) {
        free(buffer->memory);
        buffer->size = 0;
        if (posix_memalign((void **)&buffer->memory, 64, bytes)) return buffer->memory = NULL;
        buffer->size = bytes;
    }
    return buffer->memory;
}

/* ----- panels (quant_panels.c): many activation rows ---------------------------------------- */
#define PANEL_ROWS 32 /* weight rows a panel holds: one per int32 lane of two 512-bit registers */

/* which activation rows a thread's panel copy of them holds: one per thread per call, zeroed at
 * first, so that the rows are repacked for panels once per call, not once per panel */
typedef struct { const uint8_t *act; int tokens, type; } panel_tokens;

/* whether this build has a panel kernel for the block type (AVX-512 VNNI builds: Q4_K, Q6_K, Q8_0) */
__attribute__((visibility("hidden"))) int panel_takes(int type);
/* out[t * out_stride + r] = row r . activation row t for r < rows <= PANEL_ROWS, t < tokens: the
 * rows at w (row_bytes apart, nb blocks each) repacked into a panel once and used for every
 * token; the activations (act_256 or act_32 rows, act_bytes apart) repacked unless `packed` says
 * they are. Returns 0, or -2 out of memory, or -1 for a type without a panel kernel. */
__attribute__((visibility("hidden"))) int panel_product(int type, const uint8_t *w, size_t row_bytes, int rows, int nb,
                                                        const uint8_t *act, size_t act_bytes, int tokens, float *out,
                                                        size_t out_stride, panel_tokens *packed);

#endif
