/* One KV-cached decoding step of a Chameleon-style transformer on the CPU, in one call.
 *
 * Why C: at batch 1-8 a decode step of a small model is ~17 matrix-vector products and ~100 tiny
 * elementwise ops. Through PyTorch each of them pays a dispatch and a kernel-launch cost of several
 * microseconds, which is more than the arithmetic (docs/generation.md, "Speed against transformers").
 * Here the whole step (embedding, norms, QKV, per-head QK-norm, RoPE, cache write, attention over the
 * cache, output projection, SwiGLU MLP, final norm, output layer) is one loop nest that streams every
 * weight once per step. It is the CPU counterpart of a fused decode kernel on a GPU.
 *
 * Numerics follow tessera/generate/decoder.py's eager path: the residual stream, norms, RoPE, cache and
 * attention in fp32; with bf16 weights the input of every weight matmul is rounded to bf16 and its
 * output is rounded to bf16 (what torch's bf16 linear returns), products accumulated in fp32.
 *
 * Layouts (all row-major, contiguous):
 *   linear weights [out, in] (torch's nn.Linear), bf16 (uint16) or fp32;
 *   qkv rows: megatron's grouped layout, per group [q heads of the group..., k, v] x head_dim;
 *   fc1 rows: [gate (ffn); up (ffn)];
 *   cache per layer: k and v [batch, groups, max_len, head_dim] fp32;
 *   rope tables cos / signed sin [max_len, rot] fp32 (rotate_half(t) * sin == swap_halves(t) * signed sin);
 *   qk-norm tables [groups, q_per_group + 1, head_dim] (q rows already scaled by the softmax scale).
 * Built by tessera/kernels/cpu_decode.py with the host compiler (-O3 -march=native).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { NORM_NONE = 0, NORM_RMS = 1, NORM_LAYER = 2 };

typedef struct {
    int32_t kind;
    float eps;
    const float *weight; /* [n] or NULL (no affine) */
    const float *bias;   /* [n] or NULL */
} Norm;

typedef struct {
    Norm ln_attn, post_attn, ln_mlp, post_mlp;
    const void *qkv, *proj, *fc1, *fc2;
    const float *qk_weight, *qk_bias; /* NULL: no QK-norm */
    float qk_eps;
    float *k_cache, *v_cache;
} Layer;

typedef struct {
    int32_t layers, hidden, heads, groups, head_dim, ffn, vocab, rot;
    int32_t batch, max_len, bf16;
    int32_t threads; /* OpenMP threads for the weight matmuls (torch.get_num_threads()) */
    float q_scale; /* softmax scale, 1 when it is folded into the QK-norm tables */
    const float *embedding; /* [embedding_rows, hidden] */
    int64_t embedding_rows;
    Norm final_norm;
    const void *output; /* [vocab, hidden] */
    const float *cos, *sin_signed;
    const Layer *layer;
} Model;

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, like torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

static void round_bf16_inplace(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = round_bf16(x[i]);
}

static float dot_bf16(const uint16_t *restrict w, const float *restrict x, int n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int k = 0; k < n; k++) acc += bf16_to_float(w[k]) * x[k];
    return acc;
}

static float dot_f32(const float *restrict w, const float *restrict x, int n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int k = 0; k < n; k++) acc += w[k] * x[k];
    return acc;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* y[m, o] = round?(W[o, :] . x[m, :]) for a block of 4 weight rows at once: the rows stay in L1 while
 * every input row m passes over them, and each x vector load feeds 4 rows. */
static void linear_block4_f32(const float *w, int64_t n_in, const float *x, int rows, float *y, int64_t n_out,
                              int o) {
    for (int m = 0; m < rows; m++) {
        const float *xm = x + (int64_t)m * n_in;
        int64_t k = 0;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#if defined(__AVX512F__)
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; k + 16 <= n_in; k += 16) {
            const __m512 xv = _mm512_loadu_ps(xm + k);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + n_in + k), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 2 * n_in + k), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 3 * n_in + k), xv, a3);
        }
        s0 = _mm512_reduce_add_ps(a0), s1 = _mm512_reduce_add_ps(a1);
        s2 = _mm512_reduce_add_ps(a2), s3 = _mm512_reduce_add_ps(a3);
#endif
        for (; k < n_in; k++) {
            s0 += w[k] * xm[k], s1 += w[n_in + k] * xm[k];
            s2 += w[2 * n_in + k] * xm[k], s3 += w[3 * n_in + k] * xm[k];
        }
        float *ym = y + (int64_t)m * n_out + o;
        ym[0] = s0, ym[1] = s1, ym[2] = s2, ym[3] = s3;
    }
}

/* The same for bf16 weights; xb is x already rounded to bf16 (exact), as uint16. With AVX512-BF16 each
 * vdpbf16ps does 32 multiply-adds in fp32 (what oneDNN's bf16 matmul uses on such CPUs). */
static void linear_block4_bf16(const uint16_t *w, int64_t n_in, const uint16_t *xb, int rows, float *y,
                               int64_t n_out, int o) {
    for (int m = 0; m < rows; m++) {
        const uint16_t *xm = xb + (int64_t)m * n_in;
        int64_t k = 0;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#if defined(__AVX512BF16__)
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; k + 32 <= n_in; k += 32) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(xm + k);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + k), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + n_in + k), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + 2 * n_in + k), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + 3 * n_in + k), xv);
        }
        s0 = _mm512_reduce_add_ps(a0), s1 = _mm512_reduce_add_ps(a1);
        s2 = _mm512_reduce_add_ps(a2), s3 = _mm512_reduce_add_ps(a3);
#else
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t kk = 0; kk < n_in; kk++) {
            const float xv = bf16_to_float(xm[kk]);
            s0 += bf16_to_float(w[kk]) * xv, s1 += bf16_to_float(w[n_in + kk]) * xv;
            s2 += bf16_to_float(w[2 * n_in + kk]) * xv, s3 += bf16_to_float(w[3 * n_in + kk]) * xv;
        }
        k = n_in;
#endif
        for (; k < n_in; k++) {
            const float xv = bf16_to_float(xm[k]);
            s0 += bf16_to_float(w[k]) * xv, s1 += bf16_to_float(w[n_in + k]) * xv;
            s2 += bf16_to_float(w[2 * n_in + k]) * xv, s3 += bf16_to_float(w[3 * n_in + k]) * xv;
        }
        float *ym = y + (int64_t)m * n_out + o;
        ym[0] = round_bf16(s0), ym[1] = round_bf16(s1), ym[2] = round_bf16(s2), ym[3] = round_bf16(s3);
    }
}

/* Threads pay off only when a matmul is big enough to hide the fork/join (a few microseconds). */
static int parallel_worth(const Model *md, int rows, int n_out, int n_in) {
    return md->threads > 1 && (int64_t)rows * n_out * n_in >= ((int64_t)1 << 20);
}

/* y[m, :] = W x[m, :] for m < rows; W [n_out, n_in]; xb: scratch for x as bf16 (bf16 weights only).
 * Every weight is read once per call whatever the number of rows. */
static void linear(const Model *md, const void *w, const float *x, float *y, int rows, int n_out, int n_in,
                   uint16_t *xb) {
    int o = 0;
    if (md->bf16) {
        const uint16_t *wb = (const uint16_t *)w;
        for (int64_t i = 0; i < (int64_t)rows * n_in; i++) xb[i] = float_to_bf16(x[i]);
        const int blocks = n_out / 4;
#pragma omp parallel for num_threads(md->threads) if (parallel_worth(md, rows, n_out, n_in)) schedule(static)
        for (int blk = 0; blk < blocks; blk++)
            linear_block4_bf16(wb + (int64_t)blk * 4 * n_in, n_in, xb, rows, y, n_out, blk * 4);
        o = blocks * 4;
        for (; o < n_out; o++)
            for (int m = 0; m < rows; m++)
                y[(int64_t)m * n_out + o] = round_bf16(dot_bf16(wb + (int64_t)o * n_in, x + (int64_t)m * n_in, n_in));
    } else {
        const float *wf = (const float *)w;
        const int blocks = n_out / 4;
#pragma omp parallel for num_threads(md->threads) if (parallel_worth(md, rows, n_out, n_in)) schedule(static)
        for (int blk = 0; blk < blocks; blk++)
            linear_block4_f32(wf + (int64_t)blk * 4 * n_in, n_in, x, rows, y, n_out, blk * 4);
        o = blocks * 4;
        for (; o < n_out; o++)
            for (int m = 0; m < rows; m++)
                y[(int64_t)m * n_out + o] = dot_f32(wf + (int64_t)o * n_in, x + (int64_t)m * n_in, n_in);
    }
}

/* y = norm(x) over n; y may alias x. */
static void apply_norm(const Norm *nm, const float *x, float *y, int n) {
    if (nm->kind == NORM_RMS) {
        float ss = 0.0f;
        for (int i = 0; i < n; i++) ss += x[i] * x[i];
        const float r = 1.0f / sqrtf(ss / (float)n + nm->eps);
        for (int i = 0; i < n; i++) y[i] = x[i] * r * (nm->weight ? nm->weight[i] : 1.0f);
    } else if (nm->kind == NORM_LAYER) {
        float mean = 0.0f, var = 0.0f;
        for (int i = 0; i < n; i++) mean += x[i];
        mean /= (float)n;
        for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
        const float r = 1.0f / sqrtf(var / (float)n + nm->eps);
        for (int i = 0; i < n; i++) {
            float v = (x[i] - mean) * r;
            if (nm->weight) v *= nm->weight[i];
            if (nm->bias) v += nm->bias[i];
            y[i] = v;
        }
    } else if (y != x) {
        memcpy(y, x, sizeof(float) * (size_t)n);
    }
}

/* t[:rot] rotated in place at one position (megatron's non-interleaved RoPE). */
static void rope(float *t, const float *cos, const float *sin_signed, int rot) {
    const int half = rot / 2;
    float tmp[rot];
    for (int i = 0; i < half; i++) {
        tmp[i] = t[i] * cos[i] + t[i + half] * sin_signed[i];
        tmp[i + half] = t[i + half] * cos[i + half] + t[i] * sin_signed[i + half];
    }
    memcpy(t, tmp, sizeof(float) * (size_t)rot);
}

/* Where each buffer of the caller's scratch starts (offsets in floats), and its total size: one layout
 * for the size Python allocates and the pointers the step uses. */
typedef struct {
    int64_t x, normed, branch, wide, mid, out, scores, xb, total;
} ScratchLayout;

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

static ScratchLayout scratch_layout(const Model *md) {
    const int64_t b = md->batch, h = md->hidden, ffn = md->ffn;
    const int64_t qkv = (int64_t)md->groups * (md->heads / md->groups + 2) * md->head_dim;
    const int64_t ctx = (int64_t)md->heads * md->head_dim;
    ScratchLayout s;
    s.x = 0;                                    /* residual stream [b, h] */
    s.normed = s.x + b * h;                     /* normed branch input [b, h] */
    s.branch = s.normed + b * h;                /* branch output [b, h] */
    s.wide = s.branch + b * h;                  /* qkv or fc1 output [b, max(qkv, 2 ffn)] */
    s.mid = s.wide + b * max64(qkv, 2 * ffn);   /* attention context or SwiGLU output [b, max(ctx, ffn)] */
    s.out = s.mid + b * max64(ctx, ffn);        /* fp32 logits before the bf16 rounding [b, vocab] */
    s.scores = s.out + b * md->vocab;           /* one head's attention scores [max_len] */
    s.xb = s.scores + md->max_len;              /* a matmul input as bf16 [b, widest input] */
    s.total = s.xb + b * max64(h, max64(ctx, ffn));
    return s;
}

int64_t tessera_decode_scratch_floats(const Model *md) { return scratch_layout(md).total; }

static void attention(const Model *md, const Layer *ly, float *qkv, float *ctx, float *scores, const int64_t *pad,
                      uint8_t *key_valid, int64_t col) {
    const int ng = md->groups, hd = md->head_dim, qpg = md->heads / md->groups, L = md->max_len;
    const int64_t row_width = (int64_t)ng * (qpg + 2) * hd;
    for (int r = 0; r < md->batch; r++) {
        int64_t p = col - pad[r];
        if (p < 0) p = 0;
        const float *cos = md->cos + p * md->rot, *sin_signed = md->sin_signed + p * md->rot;
        const uint8_t *valid = key_valid + (int64_t)r * L;
        for (int g = 0; g < ng; g++) {
            float *slots = qkv + r * row_width + (int64_t)g * (qpg + 2) * hd; /* [q..., k, v] */
            for (int s = 0; s <= qpg; s++) { /* q heads and k: QK-norm, then RoPE */
                float *t = slots + (int64_t)s * hd;
                if (ly->qk_weight) {
                    const Norm nm = {NORM_LAYER, ly->qk_eps, ly->qk_weight + ((int64_t)g * (qpg + 1) + s) * hd,
                                     ly->qk_bias + ((int64_t)g * (qpg + 1) + s) * hd};
                    apply_norm(&nm, t, t, hd);
                }
                rope(t, cos, sin_signed, md->rot);
            }
            float *kc = ly->k_cache + (((int64_t)r * ng + g) * L) * hd;
            float *vc = ly->v_cache + (((int64_t)r * ng + g) * L) * hd;
            memcpy(kc + col * hd, slots + (int64_t)qpg * hd, sizeof(float) * (size_t)hd);
            memcpy(vc + col * hd, slots + (int64_t)(qpg + 1) * hd, sizeof(float) * (size_t)hd);
            for (int j = 0; j < qpg; j++) {
                const float *q = slots + (int64_t)j * hd;
                float best = -INFINITY;
                for (int64_t t = 0; t <= col; t++) {
                    float s = valid[t] ? dot_f32(kc + t * hd, q, hd) * md->q_scale : -INFINITY;
                    scores[t] = s;
                    if (s > best) best = s;
                }
                float total = 0.0f;
                for (int64_t t = 0; t <= col; t++) {
                    const float e = valid[t] ? expf(scores[t] - best) : 0.0f;
                    scores[t] = e;
                    total += e;
                }
                float *out = ctx + (int64_t)r * md->heads * hd + ((int64_t)g * qpg + j) * hd;
                memset(out, 0, sizeof(float) * (size_t)hd);
                for (int64_t t = 0; t <= col; t++) {
                    const float pr = scores[t] / total;
                    if (pr == 0.0f) continue;
                    const float *v = vc + t * hd;
#pragma omp simd
                    for (int i = 0; i < hd; i++) out[i] += pr * v[i];
                }
            }
        }
    }
}

/* Append tokens[b] at cache column `col` and write the next-token logits [b, vocab] (bf16 when the
 * weights are bf16, else fp32). key_valid [b, max_len] gets column `col` set. Returns 0, or -1 (column
 * outside the cache), -2 (rotary dims not even and within 1..head_dim), -3 (a token id outside the embedding). */
int tessera_decode_step(const Model *md, const int64_t *tokens, const int64_t *pad, uint8_t *key_valid, int64_t col,
                        float *scratch, void *logits) {
    if (col < 0 || col >= md->max_len) return -1;
    if (md->rot <= 0 || md->rot > md->head_dim || md->rot % 2) return -2;
    const int b = md->batch, h = md->hidden, ffn = md->ffn, hd = md->head_dim;
    const int qkv_width = md->groups * (md->heads / md->groups + 2) * hd, ctx_width = md->heads * hd;
    const ScratchLayout sl = scratch_layout(md);
    float *x = scratch + sl.x, *a = scratch + sl.normed, *y = scratch + sl.branch, *big = scratch + sl.wide;
    float *mid = scratch + sl.mid, *out = scratch + sl.out, *scores = scratch + sl.scores;
    uint16_t *xb = (uint16_t *)(scratch + sl.xb);

    for (int r = 0; r < b; r++)
        if (tokens[r] < 0 || tokens[r] >= md->embedding_rows) return -3;
    for (int r = 0; r < b; r++) {
        memcpy(x + (int64_t)r * h, md->embedding + tokens[r] * h, sizeof(float) * (size_t)h);
        key_valid[(int64_t)r * md->max_len + col] = 1;
    }
    for (int li = 0; li < md->layers; li++) {
        const Layer *ly = md->layer + li;
        /* attention branch: x += post(attn(pre(x))) */
        for (int r = 0; r < b; r++) apply_norm(&ly->ln_attn, x + (int64_t)r * h, a + (int64_t)r * h, h);
        if (md->bf16) round_bf16_inplace(a, (int64_t)b * h);
        linear(md, ly->qkv, a, big, b, qkv_width, h, xb);
        attention(md, ly, big, mid, scores, pad, key_valid, col);
        if (md->bf16) round_bf16_inplace(mid, (int64_t)b * ctx_width);
        linear(md, ly->proj, mid, y, b, h, ctx_width, xb);
        for (int r = 0; r < b; r++) {
            apply_norm(&ly->post_attn, y + (int64_t)r * h, y + (int64_t)r * h, h);
            for (int i = 0; i < h; i++) x[(int64_t)r * h + i] += y[(int64_t)r * h + i];
        }
        /* MLP branch: x += post(fc2(silu(gate) * up)) */
        for (int r = 0; r < b; r++) apply_norm(&ly->ln_mlp, x + (int64_t)r * h, a + (int64_t)r * h, h);
        if (md->bf16) round_bf16_inplace(a, (int64_t)b * h);
        linear(md, ly->fc1, a, big, b, 2 * ffn, h, xb);
        for (int r = 0; r < b; r++) {
            const float *gate = big + (int64_t)r * 2 * ffn, *up = gate + ffn;
            float *act = mid + (int64_t)r * ffn;
            for (int i = 0; i < ffn; i++) {
                float s = gate[i] / (1.0f + expf(-gate[i]));
                if (md->bf16) s = round_bf16(round_bf16(s) * up[i]);
                else s *= up[i];
                act[i] = s;
            }
        }
        linear(md, ly->fc2, mid, y, b, h, ffn, xb);
        for (int r = 0; r < b; r++) {
            apply_norm(&ly->post_mlp, y + (int64_t)r * h, y + (int64_t)r * h, h);
            for (int i = 0; i < h; i++) x[(int64_t)r * h + i] += y[(int64_t)r * h + i];
        }
    }
    for (int r = 0; r < b; r++) apply_norm(&md->final_norm, x + (int64_t)r * h, a + (int64_t)r * h, h);
    if (md->bf16) {
        round_bf16_inplace(a, (int64_t)b * h);
        linear(md, md->output, a, out, b, md->vocab, h, xb);
        uint16_t *dst = (uint16_t *)logits;
        for (int64_t i = 0; i < (int64_t)b * md->vocab; i++) dst[i] = float_to_bf16(out[i]);
    } else {
        linear(md, md->output, a, (float *)logits, b, md->vocab, h, xb);
    }
    return 0;
}
