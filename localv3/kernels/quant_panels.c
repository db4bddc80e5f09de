/* localv3's CPU products of block-quantised weights with many activation rows (prefill chunks,
 * routed experts that get many tokens each).
 *
 * There the product is compute-bound, and the row kernels of quant_products.c spend two
 * instructions per 64 multiply-adds (an 8-bit multiply to 16-bit pairs, then a scaled sum to
 * 32 bits). A panel spends one: PANEL_ROWS weight rows are repacked so that each 512-bit register
 * holds 4 consecutive values of 16 rows, and one VNNI instruction (vpdpbusd) multiplies them with
 * 4 values of one token broadcast to every lane and adds them to 16 int32 sums, one per row.
 * Block scales are applied in float32 per sub-block (32 values; Q6_K 16). A panel is packed one
 * super-block at a time (into L1) and each packed block serves every token, PANEL_TOKENS at a
 * time, from activations interleaved once per call; the two 16-row halves share each broadcast
 * (12 independent sums keep both VNNI ports busy).
 *
 * The numbers are the row kernels' exactly: the same 8-bit activations, the same integer sums
 * per sub-block; only the float32 summation order differs.
 *
 * Panels (Q4_K, Q6_K, Q8_0) need AVX-512 with VNNI; other builds take no panel types and keep
 * the row kernels.
 */
#include "quant_blocks.h"

#if LV3_AVX512 && defined(__AVX512VNNI__)
#define LV3_PANELS 1
#else
#define LV3_PANELS 0
#endif

#define PANEL_TOKENS 6 /* activation rows at once: with two halves, 12 int32 and 12 float32 accumulators */

#if LV3_PANELS
static __thread growing tokens_memory, sums_memory;

/* One super-block (256 values) of a K type (Q4_K, Q6_K) for PANEL_ROWS rows, as two halves of 16
 * (one register each): the unsigned values in the activations' slot order (slot s holds 32
 * values), a float32 scale per group of values (Q4_K: 8 groups of 32, Q6_K: 16 of 16), and the
 * integer multipliers of the token's group sums that are taken off at the end (Q4_K: its mins,
 * times dmin; Q6_K: its scales, times 32 * d, the offset of its values). */
typedef struct {
    uint8_t q[8][8][2][64];      /* [slot][group of 4 values][half][row * 4 + value] */
    float scale[16][2][16];      /* [scale group][half][row] */
    int16_t offset[8][2][16][2]; /* [pair of scale groups][half][row][group in the pair] */
    float offset_scale[2][16];   /* [half][row] */
} panel_k;                       /* 11392 bytes */

/* 16 registers of 16 int32 each, as a 16 x 16 matrix, transposed in place */
static inline void transpose_16x16(__m512i m[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(m[2 * i], m[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(m[2 * i], m[2 * i + 1]);
    }
    /* in each 128-bit lane L of m[4i + j] below: rows 4i..4i+3 of column 4L + j */
    for (int i = 0; i < 4; i++) {
        m[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        m[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        m[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        m[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        const __m512i v0 = _mm512_shuffle_i32x4(m[j], m[4 + j], 0x44), v1 = _mm512_shuffle_i32x4(m[j], m[4 + j], 0xee);
        const __m512i v2 = _mm512_shuffle_i32x4(m[8 + j], m[12 + j], 0x44), v3 = _mm512_shuffle_i32x4(m[8 + j], m[12 + j], 0xee);
        t[j] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        t[4 + j] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
        t[8 + j] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        t[12 + j] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
    }
    for (int i = 0; i < 16; i++) m[i] = t[i];
}

/* values [run of 64][row] of the 16 rows of half h, runs 0-3 holding slots 0-1, 2-3, 4-5, 6-7,
 * -> p->q: transposed, register g of run i is group g % 8 of slot 2i + g / 8 for the 16 rows */
static void store_half(__m512i values[4][16], panel_k *p, int h) {
    for (int i = 0; i < 4; i++) {
        transpose_16x16(values[i]);
        for (int g = 0; g < 16; g++) _mm512_store_si512(p->q[2 * i + g / 8][g % 8][h], values[i][g]);
    }
}

/* super-block b of the rows at w (row_bytes apart; rows <= PANEL_ROWS, the others zeros) */
static void pack_q4_k(const uint8_t *w, size_t row_bytes, int rows, int b, panel_k *p) {
    for (int h = 0; h < 2; h++) {
        __m512i values[4][16];
        for (int r = 0; r < 16; r++) {
            const int row = 16 * h + r;
            if (row >= rows) { /* a missing row: zero values and scales */
                for (int i = 0; i < 4; i++) values[i][r] = _mm512_setzero_si512();
                for (int s = 0; s < 8; s++) p->scale[s][h][r] = 0.f, p->offset[s / 2][h][r][s % 2] = 0;
                p->offset_scale[h][r] = 0.f;
                continue;
            }
            const block_q4_k *block = (const block_q4_k *)(w + row * row_bytes) + b;
            uint64_t sc, mn;
            q4_k_scales(block->scales, &sc, &mn);
            const float d = half_to_float(block->d);
            for (int s = 0; s < 8; s++) {
                p->scale[s][h][r] = d * (float)((sc >> (8 * q4_k_order[s])) & 0xff);
                p->offset[s / 2][h][r][s % 2] = (int16_t)((mn >> (8 * s)) & 0xff);
            }
            p->offset_scale[h][r] = half_to_float(block->dmin);
            __m512i runs[4];
            q4_k_nibbles(block, runs);
            for (int i = 0; i < 4; i++) values[i][r] = runs[i];
        }
        store_half(values, p, h);
    }
}

static inline int32_t load_int32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The activations of PANEL_TOKENS tokens for one super-block, interleaved for the panel kernel:
 * each 4-value group of every token next to the same group of the others (one 24-byte run),
 * so that the kernel reads every broadcast from one pointer. Missing tokens are zeros. */
typedef struct {
    int32_t q[8][8][PANEL_TOKENS]; /* [slot][group][token]: 4 int8 values */
    int32_t sum[8][PANEL_TOKENS];  /* [pair of scale groups][token]: their two int16 sums of values */
    float d[PANEL_TOKENS];         /* [token] */
} act_tile_k;                      /* 1752 bytes */

/* token t of a tile from its act_256 block (NULL: no such token, zeros), with `pairs` pairs of
 * group sums from `sums` */
static void pack_token_k(const int16_t *sums, int pairs, const uint8_t *block, int t, uint8_t *tile_bytes) {
    act_tile_k *tile = (act_tile_k *)tile_bytes;
    const act_256 *a = (const act_256 *)block;
    for (int s = 0; s < 8; s++)
        for (int g = 0; g < 8; g++) tile->q[s][g][t] = a ? load_int32(a->q + 32 * s + 4 * g) : 0;
    for (int i = 0; i < pairs; i++) {
        tile->sum[i][t] = 0;
        if (a) memcpy(&tile->sum[i][t], sums + 2 * i, 4);
    }
    tile->d[t] = a ? a->d : 0.f;
}

/* Q4_K: the pairs of 32-value sums (for the mins) */
static void pack_token_q4_k(const uint8_t *block, int t, uint8_t *tile_bytes) {
    pack_token_k(block ? ((const act_256 *)block)->bsum : NULL, 4, block, t, tile_bytes);
}

/* one super-block of the panel times one tile's tokens, added to sums [token][half][row]: `groups`
 * scale groups (8 or 16), `pairs` pairs of group sums to take off (4 or 8) */
static inline __attribute__((always_inline)) void panel_k_block(const panel_k *p, const act_tile_k *a, int groups, int pairs,
                                                               float sums[PANEL_TOKENS][2][16]) {
    const int size = 64 / groups; /* 4-value groups in a scale group */
    __m512 block[PANEL_TOKENS][2];
    for (int t = 0; t < PANEL_TOKENS; t++) block[t][0] = block[t][1] = _mm512_setzero_ps();
    for (int group = 0; group < groups; group++) {
        const int s = group * size / 8, first = group * size % 8;
        __m512i dot[PANEL_TOKENS][2];
        for (int t = 0; t < PANEL_TOKENS; t++) dot[t][0] = dot[t][1] = _mm512_setzero_si512();
        for (int g = first; g < first + size; g++) {
            const __m512i low = _mm512_load_si512(p->q[s][g][0]), high = _mm512_load_si512(p->q[s][g][1]);
            for (int t = 0; t < PANEL_TOKENS; t++) {
                const __m512i x = _mm512_set1_epi32(a->q[s][g][t]);
                dot[t][0] = _mm512_dpbusd_epi32(dot[t][0], low, x);
                dot[t][1] = _mm512_dpbusd_epi32(dot[t][1], high, x);
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m512 scale = _mm512_load_ps(p->scale[group][h]);
            for (int t = 0; t < PANEL_TOKENS; t++) block[t][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[t][h]), scale, block[t][h]);
        }
    }
    /* minus offset_scale * (offsets . the token's group sums), all times the token's scale */
    for (int h = 0; h < 2; h++) {
        const __m512 offset_scale = _mm512_load_ps(p->offset_scale[h]);
        for (int t = 0; t < PANEL_TOKENS; t++) {
            __m512i offset = _mm512_setzero_si512();
            for (int i = 0; i < pairs; i++) offset = _mm512_dpwssd_epi32(offset, _mm512_load_si512(p->offset[i][h]), _mm512_set1_epi32(a->sum[i][t]));
            const __m512 exact = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(offset), offset_scale, block[t][h]);
            _mm512_store_ps(sums[t][h], _mm512_fmadd_ps(exact, _mm512_set1_ps(a->d[t]), _mm512_load_ps(sums[t][h])));
        }
    }
}

/* each type's own copy, compiled for its constants */
static void panel_q4_k_block(const panel_k *p, const act_tile_k *a, float sums[PANEL_TOKENS][2][16]) { panel_k_block(p, a, 8, 4, sums); }
static void panel_q6_k_block(const panel_k *p, const act_tile_k *a, float sums[PANEL_TOKENS][2][16]) { panel_k_block(p, a, 16, 8, sums); }

/* ----- Q8_0 ---------------------------------------------------------------------------------- */
#define Q8_0_CHUNK 8 /* blocks of 32 values packed at once (as a Q4_K super-block: 256 values) */

/* One Q8_0 block (32 values) of PANEL_ROWS rows. vpdpbusd multiplies unsigned by signed bytes:
 * the weights are stored plus 128 (unsigned), and the products' excess 128 * (sum of the token's
 * values) is taken off per block. */
typedef struct {
    uint8_t q[8][2][64]; /* [group of 4 values][half][row * 4 + value]: the values + 128 */
    float scale[2][16];  /* [half][row]: d */
} panel_q8_0;            /* 1152 bytes */

typedef struct {
    int32_t q[8][PANEL_TOKENS]; /* [group][token]: 4 int8 values */
    int32_t excess[PANEL_TOKENS]; /* [token]: 128 * the sum of the block's values */
    float d[PANEL_TOKENS];       /* [token] */
} act_tile_q8_0;                 /* 240 bytes */

/* blocks first..first+count-1 (count <= Q8_0_CHUNK) of the rows at w -> panel[0..count-1] */
static void pack_q8_0(const uint8_t *w, size_t row_bytes, int rows, int first, int count, panel_q8_0 *panel) {
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    for (int h = 0; h < 2; h++)
        for (int pair = 0; pair < count; pair += 2) {
            __m512i values[16]; /* [row]: blocks first + pair and first + pair + 1 */
            for (int r = 0; r < 16; r++) {
                const int row = 16 * h + r;
                if (row >= rows) {
                    values[r] = _mm512_setzero_si512();
                    panel[pair].scale[h][r] = 0.f;
                    if (pair + 1 < count) panel[pair + 1].scale[h][r] = 0.f;
                    continue;
                }
                const block_q8_0 *block = (const block_q8_0 *)(w + row * row_bytes) + first + pair;
                const __m256i lo = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)block[0].qs), bias);
                const __m256i hi = pair + 1 < count ? _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)block[1].qs), bias) : _mm256_setzero_si256();
                values[r] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                panel[pair].scale[h][r] = half_to_float(block[0].d);
                if (pair + 1 < count) panel[pair + 1].scale[h][r] = half_to_float(block[1].d);
            }
            transpose_16x16(values); /* register g: group g % 8 of block pair + g / 8, the 16 rows */
            for (int g = 0; g < 16; g++)
                if (pair + g / 8 < count) _mm512_store_si512(panel[pair + g / 8].q[g % 8][h], values[g]);
        }
}

/* token t of a tile from its act_32 block (NULL: no such token, zeros) */
static void pack_token_q8_0(const uint8_t *block, int t, uint8_t *tile_bytes) {
    act_tile_q8_0 *tile = (act_tile_q8_0 *)tile_bytes;
    const act_32 *a = (const act_32 *)block;
    for (int g = 0; g < 8; g++) tile->q[g][t] = a ? load_int32(a->q + 4 * g) : 0;
    tile->excess[t] = a ? 128 * a->sum : 0;
    tile->d[t] = a ? a->d : 0.f;
}

/* `count` blocks of the panel times one tile's tokens (its blocks `stride` tiles apart), added
 * to sums [token][half][row] */
static void panel_q8_0_chunk(const panel_q8_0 *p, int count, const act_tile_q8_0 *a, size_t stride, float sums[PANEL_TOKENS][2][16]) {
    __m512 chunk[PANEL_TOKENS][2];
    for (int t = 0; t < PANEL_TOKENS; t++) chunk[t][0] = chunk[t][1] = _mm512_setzero_ps();
    for (int b = 0; b < count; b++, a += stride) {
        __m512i dot[PANEL_TOKENS][2];
        for (int t = 0; t < PANEL_TOKENS; t++) dot[t][0] = dot[t][1] = _mm512_setzero_si512();
        for (int g = 0; g < 8; g++) {
            const __m512i low = _mm512_load_si512(p[b].q[g][0]), high = _mm512_load_si512(p[b].q[g][1]);
            for (int t = 0; t < PANEL_TOKENS; t++) {
                const __m512i x = _mm512_set1_epi32(a->q[g][t]);
                dot[t][0] = _mm512_dpbusd_epi32(dot[t][0], low, x);
                dot[t][1] = _mm512_dpbusd_epi32(dot[t][1], high, x);
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m512 scale = _mm512_load_ps(p[b].scale[h]);
            for (int t = 0; t < PANEL_TOKENS; t++) {
                const __m512 exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[t][h], _mm512_set1_epi32(a->excess[t])));
                chunk[t][h] = _mm512_fmadd_ps(exact, _mm512_mul_ps(scale, _mm512_set1_ps(a->d[t])), chunk[t][h]);
            }
        }
    }
    for (int t = 0; t < PANEL_TOKENS; t++)
        for (int h = 0; h < 2; h++) _mm512_store_ps(sums[t][h], _mm512_add_ps(chunk[t][h], _mm512_load_ps(sums[t][h])));
}

/* ----- Q6_K ---------------------------------------------------------------------------------- */
/* super-block b of the rows at w (rows <= PANEL_ROWS, the others zeros) */
static void pack_q6_k(const uint8_t *w, size_t row_bytes, int rows, int b, panel_k *p) {
    for (int h = 0; h < 2; h++) {
        __m512i values[4][16];
        for (int r = 0; r < 16; r++) {
            const int row = 16 * h + r;
            const block_q6_k *block = row < rows ? (const block_q6_k *)(w + row * row_bytes) + b : NULL;
            const float d = block ? half_to_float(block->d) : 0.f;
            if (block) {
                __m256i runs[8];
                q6_k_values(block, runs);
                for (int i = 0; i < 4; i++) values[i][r] = _mm512_inserti64x4(_mm512_castsi256_si512(runs[2 * i]), runs[2 * i + 1], 1);
            } else {
                for (int i = 0; i < 4; i++) values[i][r] = _mm512_setzero_si512();
            }
            for (int g = 0; g < 16; g++) {
                const int8_t scale = block ? block->scales[g] : 0;
                p->scale[g][h][r] = d * (float)scale;
                p->offset[g / 2][h][r][g % 2] = scale;
            }
            p->offset_scale[h][r] = 32.f * d;
        }
        store_half(values, p, h);
    }
}

/* Q6_K: the pairs of 16-value sums (for the offset of 32) */
static void pack_token_q6_k(const uint8_t *block, int t, uint8_t *tile_bytes) {
    pack_token_k(block ? ((const act_256 *)block)->bsum16 : NULL, 8, block, t, tile_bytes);
}

/* activation rows (act_bytes apart, nb blocks of block_bytes each) -> tiles of PANEL_TOKENS
 * tokens, [block][tile], tile_bytes each, one token at a time by `pack` */
static void pack_activations(const uint8_t *act, size_t act_bytes, size_t block_bytes, int tokens, int nb, uint8_t *tiles,
                             size_t tile_bytes, void (*pack)(const uint8_t *, int, uint8_t *)) {
    const size_t count = (size_t)(tokens + PANEL_TOKENS - 1) / PANEL_TOKENS;
    for (size_t i = 0; i < count; i++)
        for (size_t b = 0; b < (size_t)nb; b++)
            for (int t = 0; t < PANEL_TOKENS; t++) {
                const size_t token = i * PANEL_TOKENS + t;
                pack(token < (size_t)tokens ? act + token * act_bytes + b * block_bytes : NULL, t, tiles + (b * count + i) * tile_bytes);
            }
}
#endif

int panel_takes(int type) { return LV3_PANELS && (type == TYPE_Q4_K || type == TYPE_Q6_K || type == TYPE_Q8_0); }

int panel_product(int type, const uint8_t *w, size_t row_bytes, int rows, int nb, const uint8_t *act, size_t act_bytes,
                  int tokens, float *out, size_t out_stride, panel_tokens *packed) {
#if LV3_PANELS
    if (!panel_takes(type)) return -1;
    typedef float tile_sums[PANEL_TOKENS][2][16];
    const size_t tiles = (size_t)(tokens + PANEL_TOKENS - 1) / PANEL_TOKENS;
    const size_t tile_bytes = type == TYPE_Q8_0 ? sizeof(act_tile_q8_0) : sizeof(act_tile_k);
    uint8_t *act_tiles = grown(&tokens_memory, tiles * nb * tile_bytes);
    tile_sums *sums = (tile_sums *)grown(&sums_memory, tiles * sizeof(tile_sums));
    if (!act_tiles || !sums) return -2;
    if (packed->act != act || packed->tokens != tokens || packed->type != type) {
        if (type == TYPE_Q4_K) pack_activations(act, act_bytes, sizeof(act_256), tokens, nb, act_tiles, tile_bytes, pack_token_q4_k);
        else if (type == TYPE_Q6_K) pack_activations(act, act_bytes, sizeof(act_256), tokens, nb, act_tiles, tile_bytes, pack_token_q6_k);
        else pack_activations(act, act_bytes, sizeof(act_32), tokens, nb, act_tiles, tile_bytes, pack_token_q8_0);
        *packed = (panel_tokens){act, tokens, type};
    }
    memset(sums, 0, tiles * sizeof(tile_sums));
    /* a few blocks at a time: packed (into L1) and used for every token tile */
    if (type == TYPE_Q4_K || type == TYPE_Q6_K) {
        panel_k panel __attribute__((aligned(64)));
        const act_tile_k *k_tiles = (const act_tile_k *)act_tiles;
        for (int b = 0; b < nb; b++) {
            if (type == TYPE_Q4_K) pack_q4_k(w, row_bytes, rows, b, &panel);
            else pack_q6_k(w, row_bytes, rows, b, &panel);
            for (size_t i = 0; i < tiles; i++) {
                if (type == TYPE_Q4_K) panel_q4_k_block(&panel, k_tiles + b * tiles + i, sums[i]);
                else panel_q6_k_block(&panel, k_tiles + b * tiles + i, sums[i]);
            }
        }
    } else {
        panel_q8_0 panel[Q8_0_CHUNK] __attribute__((aligned(64)));
        for (int first = 0; first < nb; first += Q8_0_CHUNK) {
            const int count = nb - first < Q8_0_CHUNK ? nb - first : Q8_0_CHUNK;
            pack_q8_0(w, row_bytes, rows, first, count, panel);
            for (size_t i = 0; i < tiles; i++) panel_q8_0_chunk(panel, count, (const act_tile_q8_0 *)act_tiles + first * tiles + i, tiles, sums[i]);
        }
    }
    const uint32_t all = rows == 32 ? 0xffffffffu : (1u << rows) - 1;
    const __mmask16 kept[2] = {(__mmask16)all, (__mmask16)(all >> 16)};
    for (int t = 0; t < tokens; t++)
        for (int h = 0; h < 2; h++)
            _mm512_mask_storeu_ps(out + t * out_stride + 16 * h, kept[h], _mm512_load_ps(sums[t / PANEL_TOKENS][t % PANEL_TOKENS][h]));
    return 0;
#else
    (void)type, (void)w, (void)row_bytes, (void)rows, (void)nb, (void)act, (void)act_bytes, (void)tokens, (void)out, (void)out_stride, (void)packed;
    return -1;
#endif
}
