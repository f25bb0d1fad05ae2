/*
 * Causal (or full) self-attention forward and backward for CPU training, flash-attention style.
 *
 * Why: on the CPU a training step of a small model spent about a third of its time in
 * scaled_dot_product_attention (PyTorch's CPU flash kernel runs its small GEMMs at ~15% of the
 * machine's matmul peak). Here every block product is one register-blocked micro-kernel
 * (4 rows x 64 columns of fp32 accumulators held in registers), the softmax never leaves the cache,
 * and the inputs are read in whatever strides the caller has them (megatron's [s, b, heads, dim]),
 * so no layout copies are made on either side.
 *
 * Algorithm: FlashAttention-2. The forward keeps an online softmax per query block and saves the
 * row log-sum-exp; the backward recomputes P from it.
 * Numerics: fp32 inputs are computed in fp32 throughout. bf16 inputs use bf16 block products with fp32
 * accumulation where the CPU has AVX512-BF16 (see "bf16 block products" below), else they are
 * widened to fp32. Softmax statistics and accumulators are always fp32, and outputs are rounded to
 * nearest-even once, at the end.
 *
 * The fp32 path is written with GCC vector extensions, not intrinsics: the compiler lowers a 16-float
 * vector to AVX-512, AVX2 or SSE registers, so one source serves every x86-64 (and aarch64) build.
 * Built by tessera/kernels/cpu_attention.py with the host compiler (-O3 -march=native -fopenmp
 * -ffp-contract=fast).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

enum { BQ = 64, BK = 64, VL = 16 }; /* BQ == BK: the diagonal block is square */

/* One tensor as [batch, heads, seq, dim] with the dim stride 1 (element strides, not bytes). */
typedef struct {
    void *data;
    int64_t sb, sh, ss;
} View;

typedef struct {
    int32_t batch, heads, groups, seq, head_dim;
    int32_t causal, bf16, threads;
    float scale;
    int32_t bf16_products; /* bf16 inputs: block products in bf16 (AVX512-BF16) where the CPU has them */
} Shape;

static inline v16 ld(const float *p) { v16 v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { __builtin_memcpy(p, &v, sizeof v); }
static inline v16 splat(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
/* C has no vector ?:, so lane-wise selects are bit masks (a comparison gives -1 / 0 per lane) */
static inline v16 vselect(vi16 mask, v16 a, v16 b) { return (v16)(((vi16)a & mask) | ((vi16)b & ~mask)); }
static inline v16 vmax(v16 a, v16 b) { return vselect(a > b, a, b); }
static inline v16 vmin(v16 a, v16 b) { return vselect(a < b, a, b); }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Row `row` of a View for (b, h) as fp32 into dst[0:dim] times `mul`; rows past seq are zeros. */
static void load_row(const Shape *s, const View *t, int b, int h, int row, float mul, float *dst) {
    const int d = s->head_dim;
    if (row >= s->seq) {
        memset(dst, 0, (size_t)d * sizeof(float));
        return;
    }
    int64_t off = b * t->sb + h * t->sh + row * t->ss;
    if (s->bf16) {
        const uint16_t *p = (const uint16_t *)t->data + off;
        for (int i = 0; i < d; i++) dst[i] = bf16_to_f32(p[i]) * mul;
    } else {
        const float *p = (const float *)t->data + off;
        for (int i = 0; i < d; i++) dst[i] = p[i] * mul;
    }
}

static void store_row(const Shape *s, const View *t, int b, int h, int row, const float *src, float mul) {
    const int d = s->head_dim;
    int64_t off = b * t->sb + h * t->sh + row * t->ss;
    if (s->bf16) {
        uint16_t *p = (uint16_t *)t->data + off;
        for (int i = 0; i < d; i++) p[i] = f32_to_bf16(src[i] * mul);
    } else {
        float *p = (float *)t->data + off;
        for (int i = 0; i < d; i++) p[i] = src[i] * mul;
    }
}

/* exp(x) for 16 lanes: 2^(x log2 e) split into 2^n * 2^f, |f| <= 1/2, 2^f by its degree-7 Taylor
 * series (relative error < 2e-8, below fp32 rounding); x < -87 (and -inf) gives exactly 0. */
static inline v16 vexp(v16 x) {
    const v16 magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v16 t = x * splat(1.4426950408889634f);
    t = vmin(vmax(t, splat(-126.0f)), splat(126.0f));
    v16 r = t + magic;
    vi16 n = (vi16)r - (vi16)magic;
    v16 f = (t - (r - magic)) * splat(0.6931471805599453f);
    v16 p = splat(1.0f / 5040.0f);
    p = p * f + splat(1.0f / 720.0f);
    p = p * f + splat(1.0f / 120.0f);
    p = p * f + splat(1.0f / 24.0f);
    p = p * f + splat(1.0f / 6.0f);
    p = p * f + splat(0.5f);
    p = p * f + splat(1.0f);
    p = p * f + splat(1.0f);
    v16 y = (v16)((vi16)p + (n << 23));
    return vselect(x < splat(-87.0f), splat(0.0f), y);
}

/* C[M x N] (= or +=) A[M x K] B[K x N]: A(i, k) = A[i*ars + k*acs], B and C row-major (ldb, ldc),
 * N a multiple of 16. The 4 x 64 block of C stays in 16 vector registers across the K loop. */
static void gemm(int M, int N, int K, const float *A, int64_t ars, int64_t acs,
                 const float *B, int64_t ldb, float *C, int64_t ldc, int accumulate) {
    for (int n0 = 0; n0 < N; n0 += 4 * VL) {
        if (N - n0 >= 4 * VL) {
            for (int i0 = 0; i0 < M; i0 += 4) {
                const int rows = M - i0 < 4 ? M - i0 : 4;
                const float *a[4];
                for (int r = 0; r < 4; r++) a[r] = A + (int64_t)(i0 + (r < rows ? r : rows - 1)) * ars;
                v16 c00 = splat(0), c01 = splat(0), c02 = splat(0), c03 = splat(0);
                v16 c10 = splat(0), c11 = splat(0), c12 = splat(0), c13 = splat(0);
                v16 c20 = splat(0), c21 = splat(0), c22 = splat(0), c23 = splat(0);
                v16 c30 = splat(0), c31 = splat(0), c32 = splat(0), c33 = splat(0);
                for (int k = 0; k < K; k++) {
                    const float *b = B + (int64_t)k * ldb + n0;
                    v16 b0 = ld(b), b1 = ld(b + VL), b2 = ld(b + 2 * VL), b3 = ld(b + 3 * VL);
                    v16 x = splat(a[0][k * acs]);
                    c00 += x * b0; c01 += x * b1; c02 += x * b2; c03 += x * b3;
                    x = splat(a[1][k * acs]);
                    c10 += x * b0; c11 += x * b1; c12 += x * b2; c13 += x * b3;
                    x = splat(a[2][k * acs]);
                    c20 += x * b0; c21 += x * b1; c22 += x * b2; c23 += x * b3;
                    x = splat(a[3][k * acs]);
                    c30 += x * b0; c31 += x * b1; c32 += x * b2; c33 += x * b3;
                }
                v16 acc[4][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
                for (int r = 0; r < rows; r++) {
                    float *c = C + (int64_t)(i0 + r) * ldc + n0;
                    for (int v = 0; v < 4; v++) st(c + v * VL, accumulate ? ld(c + v * VL) + acc[r][v] : acc[r][v]);
                }
            }
        } else { /* a 16-, 32- or 48-column remainder: one vector at a time */
            for (int nv = n0; nv < N; nv += VL)
                for (int i = 0; i < M; i++) {
                    v16 c = splat(0);
                    for (int k = 0; k < K; k++) c += splat(A[(int64_t)i * ars + k * acs]) * ld(B + (int64_t)k * ldb + nv);
                    float *cp = C + (int64_t)i * ldc + nv;
                    st(cp, accumulate ? ld(cp) + c : c);
                }
        }
    }
}

static inline float hmax(v16 v) { float m = v[0]; for (int i = 1; i < VL; i++) m = v[i] > m ? v[i] : m; return m; }
static inline float hsum(v16 v) { float s = 0; for (int i = 0; i < VL; i++) s += v[i]; return s; }

/* -inf where key j may not be seen by query i (causal: j > i; any: j >= seq): per row, the masked
 * columns are one tail of the block. */
static void mask_block(const Shape *s, float *S, int i0, int j0) {
    for (int i = 0; i < BQ; i++) {
        int visible = s->seq - j0; /* columns [0, visible) stay */
        if (s->causal && i0 + i - j0 + 1 < visible) visible = i0 + i - j0 + 1;
        for (int j = visible < 0 ? 0 : visible; j < BK; j++) S[i * BK + j] = -INFINITY;
    }
}

static int needs_mask(const Shape *s, int i0, int j0) {
    return j0 + BK > s->seq || (s->causal && j0 + BK - 1 > i0);
}

static int key_blocks_for(const Shape *s, int i0) { /* key blocks query block i0 attends to */
    int nk = (s->seq + BK - 1) / BK;
    if (s->causal) {
        int last = (i0 + BQ - 1) / BK + 1;
        nk = last < nk ? last : nk;
    }
    return nk;
}

static void *alloc_floats(size_t n) { return aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64); }

/* One key block of the online softmax: S [BQ][BK] holds the block's scores times 1 / `scale`; each row's
 * running max m (in scaled units) and sum l are updated, S is replaced by exp(scale S - m), and the
 * row's output accumulator O is rescaled to the new max. */
static void online_softmax(float *S, float *m, float *l, float *O, int d, float scale) {
    for (int i = 0; i < BQ; i++) {
        float *sr = S + i * BK;
        v16 mx = ld(sr);
        for (int j = VL; j < BK; j += VL) mx = vmax(ld(sr + j), mx);
        float mnew = hmax(mx) * scale;
        mnew = mnew > m[i] ? mnew : m[i];
        if (mnew == -INFINITY) { /* nothing visible yet (cannot happen for rows < seq) */
            memset(sr, 0, BK * sizeof(float));
            continue;
        }
        const float alpha = expf(m[i] - mnew);
        v16 sum = splat(0);
        for (int j = 0; j < BK; j += VL) {
            v16 p = vexp(ld(sr + j) * splat(scale) - splat(mnew));
            st(sr + j, p);
            sum += p;
        }
        l[i] = l[i] * alpha + hsum(sum);
        m[i] = mnew;
        if (alpha != 1.0f)
            for (int e = 0; e < d; e++) O[(size_t)i * d + e] *= alpha;
    }
}

/* The finished query block i0 of (b, h): out = O / l, and the rows' log-sum-exp for the backward. */
static void store_output(const Shape *s, const View *out, float *lse, int b, int h, int i0,
                         const float *O, const float *m, const float *l) {
    for (int i = 0; i < BQ && i0 + i < s->seq; i++) {
        store_row(s, out, b, h, i0 + i, O + (size_t)i * s->head_dim, 1.0f / l[i]);
        lse[((int64_t)b * s->heads + h) * s->seq + i0 + i] = m[i] + logf(l[i]);
    }
}

/* Row j of a [n][d] fp32 matrix into its transpose kept block by block: Kt[j / BK] is [d][BK], so the
 * strided writes stay inside one 16 KB block (a [d][n] transpose would touch a new cache line per
 * element) and a block product reads its B operand as one dense [d][BK] matrix. */
static inline void put_transposed(float *Kt, const float *row, int j, int d) {
    float *blk = Kt + (size_t)(j / BK) * d * BK + j % BK;
    for (int c = 0; c < d; c++) blk[(size_t)c * BK] = row[c];
}

static inline const float *block_of(const float *Kt, int j0, int d) { return Kt + (size_t)(j0 / BK) * d * BK; }

/* Packs keys [0, n) of head (b, kh): K transposed block by block (put_transposed) and V as [n][d], fp32. */
static void pack_keys(const Shape *s, const View *k, const View *v, int b, int kh, int n,
                      float *Kt, float *V, float *row) {
    const int d = s->head_dim;
    for (int j = 0; j < n; j++) {
        load_row(s, k, b, kh, j, 1.0f, row);
        put_transposed(Kt, row, j, d);
        load_row(s, v, b, kh, j, 1.0f, V + (size_t)j * d);
    }
}

/* How a forward splits into tasks: one per (batch, head) with all its query blocks, so K and V are
 * packed once per head; with too few heads to keep every thread busy, one per query block instead. */
typedef struct {
    int nq, sp, split, chunks;
    int64_t tasks;
} ForwardPlan;

typedef struct {
    int b, h, kh, qb_lo, qb_hi, nkeys; /* query blocks [qb_lo, qb_hi) of head h; keys [0, nkeys) packed */
} ForwardTask;

static ForwardPlan forward_plan(const Shape *s) {
    ForwardPlan p;
    p.nq = (s->seq + BQ - 1) / BQ;
    p.sp = p.nq * BQ; /* BQ == BK: the sequence padded to whole blocks */
    p.split = (int64_t)s->batch * s->heads < 2 * (int64_t)s->threads;
    p.chunks = p.split ? p.nq : 1;
    p.tasks = (int64_t)s->batch * s->heads * p.chunks;
    return p;
}

static ForwardTask forward_task(const Shape *s, const ForwardPlan *p, int64_t t) {
    ForwardTask k;
    const int c = (int)(t % p->chunks);
    k.h = (int)((t / p->chunks) % s->heads);
    k.b = (int)(t / ((int64_t)p->chunks * s->heads));
    k.kh = k.h / (s->heads / s->groups);
    /* split: later query blocks see more keys, so they are handed out first */
    k.qb_lo = p->split ? p->nq - 1 - c : 0;
    k.qb_hi = p->split ? p->nq - c : p->nq;
    k.nkeys = key_blocks_for(s, (k.qb_hi - 1) * BQ) * BK;
    return k;
}

/* out = softmax(scale q k^T [causal]) v, lse[b, h, i] = log-sum-exp of row i's scaled scores. */
static int forward_f32(const Shape *s, const View *q, const View *k, const View *v, const View *out, float *lse) {
    const int d = s->head_dim;
    const ForwardPlan plan = forward_plan(s);
    const int sp = plan.sp;
    int failed = 0;
#pragma omp parallel num_threads(s->threads)
    {
        /* Q, O: [BQ][d]; Kt: sp / BK blocks of [d][BK]; V: [sp][d]; S: [BQ][BK] */
        float *Q = alloc_floats((size_t)BQ * d), *O = alloc_floats((size_t)BQ * d), *Kt = alloc_floats((size_t)d * sp);
        float *V = alloc_floats((size_t)sp * d), *S = alloc_floats((size_t)BQ * BK), *row = alloc_floats((size_t)d);
        float m[BQ], l[BQ];
        if (!Q || !O || !Kt || !V || !S || !row) {
#pragma omp atomic write
            failed = 1;
        }
        /* every thread sees the same flag here, so all or none reach the worksharing loop below */
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < plan.tasks; t++) {
                const ForwardTask tk = forward_task(s, &plan, t);
                const int b = tk.b, h = tk.h;
                pack_keys(s, k, v, b, tk.kh, tk.nkeys, Kt, V, row);
                for (int qb = tk.qb_lo; qb < tk.qb_hi; qb++) {
                    const int i0 = qb * BQ;
                    for (int i = 0; i < BQ; i++) {
                        load_row(s, q, b, h, i0 + i, s->scale, Q + (size_t)i * d);
                        m[i] = -INFINITY;
                        l[i] = 0.0f;
                    }
                    memset(O, 0, (size_t)BQ * d * sizeof(float));
                    const int nk = key_blocks_for(s, i0);
                    for (int kb = 0; kb < nk; kb++) {
                        const int j0 = kb * BK;
                        gemm(BQ, BK, d, Q, d, 1, block_of(Kt, j0, d), BK, S, BK, 0);
                        if (needs_mask(s, i0, j0)) mask_block(s, S, i0, j0);
                        online_softmax(S, m, l, O, d, 1.0f); /* q was scaled when loaded */
                        gemm(BQ, d, BK, S, BK, 1, V + (size_t)j0 * d, d, O, d, 1);
                    }
                    store_output(s, out, lse, b, h, i0, O, m, l);
                }
            }
        }
        free(Q); free(O); free(Kt); free(V); free(S); free(row);
    }
    return failed ? 1 : 0;
}

/* How a backward splits into tasks. A task is one (batch, KV head) and owns that head's dK and dV
 * (GQA: summed over the group's query heads), so no two threads add into one gradient. With fewer
 * (batch, KV head) pairs than 2 x threads, each pair is split further by key blocks: task c takes blocks
 * c, c + chunks, ... (interleaved, so the causal work is shared evenly). dK and dV are per key block,
 * so they stay owned; each task's dQ goes to its own slot, and the slots are summed after all tasks. */
typedef struct {
    int nb, sp, per_group, chunks;
    int64_t tasks;
} BackwardPlan;

typedef struct {
    int b, kh, c;
} BackwardTask;

static BackwardPlan backward_plan(const Shape *s) {
    BackwardPlan p;
    p.nb = (s->seq + BK - 1) / BK;
    p.sp = p.nb * BK; /* the sequence padded to whole blocks */
    p.per_group = s->heads / s->groups;
    const int64_t pairs = (int64_t)s->batch * s->groups, want = 2 * (int64_t)s->threads;
    p.chunks = pairs >= want ? 1 : (int)((want + pairs - 1) / pairs);
    if (p.chunks > p.nb) p.chunks = p.nb;
    p.tasks = pairs * p.chunks;
    return p;
}

static BackwardTask backward_task(const Shape *s, const BackwardPlan *p, int64_t t) {
    BackwardTask k;
    k.c = (int)(t % p->chunks);
    k.kh = (int)((t / p->chunks) % s->groups);
    k.b = (int)(t / ((int64_t)p->chunks * s->groups));
    return k;
}

/* The dQ slot of query head h for task t (chunks > 1). */
static float *dq_slot(const BackwardPlan *p, float *slots, int64_t t, int h, int d) {
    return slots + ((size_t)t * p->per_group + h % p->per_group) * p->sp * d;
}

/* chunks > 1: dq of (b, h) = scale x the sum of its tasks' slots, one (b, h) per iteration. */
static void reduce_dq(const Shape *s, const BackwardPlan *p, float *slots, const View *dq, float *acc) {
    const int d = s->head_dim;
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < (int64_t)s->batch * s->heads; bh++) {
        const int b = (int)(bh / s->heads), h = (int)(bh % s->heads);
        const int64_t t0 = ((int64_t)b * s->groups + h / p->per_group) * p->chunks;
        memcpy(acc, dq_slot(p, slots, t0, h, d), (size_t)s->seq * d * sizeof(float));
        for (int c = 1; c < p->chunks; c++) {
            const float *part = dq_slot(p, slots, t0 + c, h, d);
            for (size_t e = 0; e < (size_t)s->seq * d; e++) acc[e] += part[e];
        }
        for (int i = 0; i < s->seq; i++) store_row(s, dq, b, h, i, acc + (size_t)i * d, s->scale);
    }
}

/* Stores rows [j0, j0 + BK) of dK (times dk_mul) and dV, clipped to seq. */
static void store_key_block(const Shape *s, const View *dk, const View *dv, int b, int kh, int j0,
                            const float *dK, const float *dV, float dk_mul) {
    for (int j = j0; j < j0 + BK && j < s->seq; j++) {
        store_row(s, dk, b, kh, j, dK + (size_t)j * s->head_dim, dk_mul);
        store_row(s, dv, b, kh, j, dV + (size_t)j * s->head_dim, 1.0f);
    }
}

/* dq, dk, dv of the forward above, given its out and lse and the gradient dout (tasks: BackwardPlan). */
static int backward_f32(const Shape *s, const View *q, const View *k, const View *v, const View *out,
                        const View *dout, const float *lse, const View *dq, const View *dk, const View *dv) {
    const int d = s->head_dim;
    const BackwardPlan plan = backward_plan(s);
    const int nb = plan.nb, sp = plan.sp;
    float *slots = plan.chunks > 1 ? alloc_floats((size_t)plan.tasks * plan.per_group * sp * d) : NULL;
    int failed = plan.chunks > 1 && !slots;
#pragma omp parallel num_threads(s->threads)
    {
        const size_t hd = (size_t)sp * d;
        float *Q = alloc_floats(hd), *dO = alloc_floats(hd), *dQ = alloc_floats(hd);
        float *K = alloc_floats(hd), *Kt = alloc_floats(hd), *Vt = alloc_floats(hd);
        float *dK = alloc_floats(hd), *dV = alloc_floats(hd), *row = alloc_floats((size_t)d);
        float *P = alloc_floats((size_t)BQ * BK), *dS = alloc_floats((size_t)BQ * BK);
        float *L = alloc_floats((size_t)sp), *Dl = alloc_floats((size_t)sp);
        if (!Q || !dO || !dQ || !K || !Kt || !Vt || !dK || !dV || !row || !P || !dS || !L || !Dl) {
#pragma omp atomic write
            failed = 1;
        }
        /* every thread sees the same flag here, so all or none reach the worksharing loop below */
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < plan.tasks; t++) {
                const BackwardTask tk = backward_task(s, &plan, t);
                const int b = tk.b, kh = tk.kh;
                for (int kb = tk.c; kb < nb; kb += plan.chunks)
                    for (int j = kb * BK; j < kb * BK + BK; j++) {
                        load_row(s, k, b, kh, j, 1.0f, K + (size_t)j * d);
                        put_transposed(Kt, K + (size_t)j * d, j, d);
                        load_row(s, v, b, kh, j, 1.0f, row);
                        put_transposed(Vt, row, j, d);
                    }
                memset(dK, 0, hd * sizeof(float));
                memset(dV, 0, hd * sizeof(float));
                for (int h = kh * plan.per_group; h < (kh + 1) * plan.per_group; h++) {
                    float *dQh = plan.chunks > 1 ? dq_slot(&plan, slots, t, h, d) : dQ;
                    for (int i = 0; i < sp; i++) {
                        load_row(s, q, b, h, i, s->scale, Q + (size_t)i * d);
                        load_row(s, dout, b, h, i, 1.0f, dO + (size_t)i * d);
                        load_row(s, out, b, h, i, 1.0f, row);
                        float acc = 0.0f;
                        for (int c = 0; c < d; c++) acc += row[c] * dO[(size_t)i * d + c];
                        Dl[i] = acc; /* rowsum(dO * O) = rowsum(P * dP) */
                        L[i] = i < s->seq ? lse[((int64_t)b * s->heads + h) * s->seq + i] : INFINITY; /* padding: P = 0 */
                    }
                    memset(dQh, 0, hd * sizeof(float));
                    for (int kb = tk.c; kb < nb; kb += plan.chunks) {
                        const int j0 = kb * BK;
                        for (int qb = s->causal ? (j0 / BQ) : 0; qb * BQ < s->seq; qb++) {
                            const int i0 = qb * BQ;
                            const float *Qi = Q + (size_t)i0 * d, *dOi = dO + (size_t)i0 * d;
                            gemm(BQ, BK, d, Qi, d, 1, block_of(Kt, j0, d), BK, P, BK, 0); /* scaled scores */
                            if (needs_mask(s, i0, j0)) mask_block(s, P, i0, j0);
                            for (int i = 0; i < BQ; i++) {
                                v16 li = splat(L[i0 + i]);
                                for (int j = 0; j < BK; j += VL) st(P + i * BK + j, vexp(ld(P + i * BK + j) - li));
                            }
                            gemm(BK, d, BQ, P, 1, BK, dOi, d, dV + (size_t)j0 * d, d, 1); /* dV += P^T dO */
                            gemm(BQ, BK, d, dOi, d, 1, block_of(Vt, j0, d), BK, dS, BK, 0); /* dP = dO V^T */
                            for (int i = 0; i < BQ; i++) {
                                v16 di = splat(Dl[i0 + i]);
                                for (int j = 0; j < BK; j += VL) {
                                    float *x = dS + i * BK + j;
                                    st(x, ld(P + i * BK + j) * (ld(x) - di)); /* dS = P (dP - D) */
                                }
                            }
                            gemm(BK, d, BQ, dS, 1, BK, Qi, d, dK + (size_t)j0 * d, d, 1);  /* dK += dS^T (scale q) */
                            gemm(BQ, d, BK, dS, BK, 1, K + (size_t)j0 * d, d, dQh + (size_t)i0 * d, d, 1); /* dQ += dS K */
                        }
                    }
                    if (plan.chunks == 1)
                        for (int i = 0; i < s->seq; i++) store_row(s, dq, b, h, i, dQ + (size_t)i * d, s->scale);
                }
                for (int kb = tk.c; kb < nb; kb += plan.chunks) store_key_block(s, dk, dv, b, kh, kb * BK, dK, dV, 1.0f);
            }
            if (plan.chunks > 1) reduce_dq(s, &plan, slots, dq, dQ);
        }
        free(Q); free(dO); free(dQ); free(K); free(Kt); free(Vt); free(dK); free(dV); free(row);
        free(P); free(dS); free(L); free(Dl);
    }
    free(slots);
    return failed ? 1 : 0;
}

/* ---- bf16 block products ------------------------------------------------------------------------
 * With bf16 inputs on a CPU with AVX512-BF16, every block product is vdpbf16ps: 32 bf16 multiply-adds
 * per instruction into fp32, twice the fp32 FMA rate. The operands are what the fp32 path multiplies,
 * rounded once to bf16 where they are not bf16 already (P and dS), as PyTorch's flash kernel and
 * FlashAttention on GPUs do; softmax, the row statistics and all accumulation stay fp32.
 *
 * vdpbf16ps multiplies PAIRS along the contraction: for C += A B, A is row-major bf16 (a 32-bit word
 * is the pair A[i][2p], A[i][2p+1], broadcast to all lanes) and B is packed as words
 * Bw[p][n] = (B[2p][n], B[2p+1][n]): for B = K^T that is K's words transposed ("word-transposed"),
 * for B = V, dO, Q or K it is two rows interleaved ("row-paired"). */
#if defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_PRODUCTS 1

static void *alloc_words(size_t n) { return alloc_floats(n); } /* 4-byte words, 64-byte aligned */

/* Row `row` of (b, h) as raw bf16 (zeros past seq). */
static void load_row_bf16(const Shape *s, const View *t, int b, int h, int row, uint16_t *dst) {
    if (row >= s->seq) {
        memset(dst, 0, (size_t)s->head_dim * sizeof(uint16_t));
        return;
    }
    memcpy(dst, (const uint16_t *)t->data + b * t->sb + h * t->sh + row * t->ss, (size_t)s->head_dim * sizeof(uint16_t));
}

/* Word-transposed, block by block: row j of a [n][d] bf16 matrix lands in block j / BK as [d/2][BK] words. */
static inline void put_word_transposed(uint32_t *W, const uint16_t *row, int j, int d) {
    uint32_t *blk = W + (size_t)(j / BK) * (d / 2) * BK + j % BK;
    const uint32_t *words = (const uint32_t *)row;
    for (int c = 0; c < d / 2; c++) blk[(size_t)c * BK] = words[c];
}

/* Row-paired: row j of a [n][d] bf16 matrix is the low (j even) or high (j odd) half of words [j/2][0:d]. */
static inline void put_row_paired(uint32_t *W, const uint16_t *row, int j, int d) {
    uint16_t *dst = (uint16_t *)(W + (size_t)(j / 2) * d) + (j & 1);
    for (int c = 0; c < d; c++) dst[2 * c] = row[c];
}

/* C[M x N] (= or +=) A[M x 2*K2] B[2*K2 x N]: A row-major bf16 words (lda words per row), B words
 * [K2][N] (ldb), C fp32 row-major; N a multiple of 16. 4 x 64 of C in registers, as gemm(). */
static void gemm_bf16(int M, int N, int K2, const uint32_t *A, int64_t lda, const uint32_t *B, int64_t ldb,
                      float *C, int64_t ldc, int accumulate) {
    for (int n0 = 0; n0 < N; n0 += 4 * VL) {
        const int nv = N - n0 >= 4 * VL ? 4 : (N - n0) / VL;
        for (int i0 = 0; i0 < M; i0 += 4) {
            const int rows = M - i0 < 4 ? M - i0 : 4;
            const uint32_t *a[4];
            for (int r = 0; r < 4; r++) a[r] = A + (int64_t)(i0 + (r < rows ? r : rows - 1)) * lda;
            __m512 c[4][4];
            for (int r = 0; r < 4; r++)
                for (int v = 0; v < 4; v++) c[r][v] = _mm512_setzero_ps();
            if (nv == 4) {
                for (int k = 0; k < K2; k++) {
                    const uint32_t *b = B + (int64_t)k * ldb + n0;
                    __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + VL);
                    __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + 2 * VL), b3 = (__m512bh)_mm512_loadu_si512(b + 3 * VL);
                    for (int r = 0; r < 4; r++) {
                        __m512bh x = (__m512bh)_mm512_set1_epi32((int)a[r][k]);
                        c[r][0] = _mm512_dpbf16_ps(c[r][0], x, b0);
                        c[r][1] = _mm512_dpbf16_ps(c[r][1], x, b1);
                        c[r][2] = _mm512_dpbf16_ps(c[r][2], x, b2);
                        c[r][3] = _mm512_dpbf16_ps(c[r][3], x, b3);
                    }
                }
            } else {
                for (int k = 0; k < K2; k++)
                    for (int v = 0; v < nv; v++) {
                        __m512bh bv = (__m512bh)_mm512_loadu_si512(B + (int64_t)k * ldb + n0 + v * VL);
                        for (int r = 0; r < 4; r++)
                            c[r][v] = _mm512_dpbf16_ps(c[r][v], (__m512bh)_mm512_set1_epi32((int)a[r][k]), bv);
                    }
            }
            for (int r = 0; r < rows; r++) {
                float *cr = C + (int64_t)(i0 + r) * ldc + n0;
                for (int v = 0; v < nv; v++)
                    _mm512_storeu_ps(cr + v * VL, accumulate ? _mm512_add_ps(_mm512_loadu_ps(cr + v * VL), c[r][v]) : c[r][v]);
            }
        }
    }
}

/* 64 fp32 -> 64 bf16 (round to nearest even: vcvtne2ps2bf16). */
static inline void row_to_bf16(const float *src, uint16_t *dst) {
    for (int j = 0; j < BK; j += 2 * VL) {
        __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + j + VL), _mm512_loadu_ps(src + j));
        _mm512_storeu_si512(dst + j, (__m512i)h);
    }
}

static int forward_bf16(const Shape *s, const View *q, const View *k, const View *v, const View *out, float *lse) {
    const int d = s->head_dim, d2 = d / 2;
    const ForwardPlan plan = forward_plan(s);
    const int sp = plan.sp;
    const float scale = s->scale;
    int failed = 0;
#pragma omp parallel num_threads(s->threads)
    {
        /* Q: [BQ][d] bf16; Kw: word-transposed K; Vp: row-paired V; S: [BQ][BK] fp32; Pb: [BQ][BK] bf16 */
        uint16_t *Q = alloc_words((size_t)BQ * d2), *row = alloc_words((size_t)d2 + 1), *Pb = alloc_words((size_t)BQ * BK / 2);
        uint32_t *Kw = alloc_words((size_t)sp * d2), *Vp = alloc_words((size_t)sp * d2);
        float *O = alloc_floats((size_t)BQ * d), *S = alloc_floats((size_t)BQ * BK);
        float m[BQ], l[BQ];
        if (!Q || !row || !Pb || !Kw || !Vp || !O || !S) {
#pragma omp atomic write
            failed = 1;
        }
        /* every thread sees the same flag here, so all or none reach the worksharing loop below */
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < plan.tasks; t++) {
                const ForwardTask tk = forward_task(s, &plan, t);
                const int b = tk.b, h = tk.h;
                for (int j = 0; j < tk.nkeys; j++) {
                    load_row_bf16(s, k, b, tk.kh, j, row);
                    put_word_transposed(Kw, row, j, d);
                    load_row_bf16(s, v, b, tk.kh, j, row);
                    put_row_paired(Vp, row, j, d);
                }
                for (int qb = tk.qb_lo; qb < tk.qb_hi; qb++) {
                    const int i0 = qb * BQ;
                    for (int i = 0; i < BQ; i++) {
                        load_row_bf16(s, q, b, h, i0 + i, Q + (size_t)i * d);
                        m[i] = -INFINITY; /* in units of the scaled scores */
                        l[i] = 0.0f;
                    }
                    memset(O, 0, (size_t)BQ * d * sizeof(float));
                    const int nk = key_blocks_for(s, i0);
                    for (int kb = 0; kb < nk; kb++) {
                        const int j0 = kb * BK;
                        gemm_bf16(BQ, BK, d2, (const uint32_t *)Q, d2, Kw + (size_t)kb * d2 * BK, BK, S, BK, 0);
                        if (needs_mask(s, i0, j0)) mask_block(s, S, i0, j0);
                        online_softmax(S, m, l, O, d, scale); /* raw q k^T: scaled here, in fp32 */
                        for (int i = 0; i < BQ; i++) row_to_bf16(S + i * BK, Pb + (size_t)i * BK);
                        gemm_bf16(BQ, d, BK / 2, (const uint32_t *)Pb, BK / 2, Vp + (size_t)(j0 / 2) * d, d, O, d, 1);
                    }
                    store_output(s, out, lse, b, h, i0, O, m, l);
                }
            }
        }
        free(Q); free(row); free(Pb); free(Kw); free(Vp); free(O); free(S);
    }
    return failed ? 1 : 0;
}

static int backward_bf16(const Shape *s, const View *q, const View *k, const View *v, const View *out,
                         const View *dout, const float *lse, const View *dq, const View *dk, const View *dv) {
    const int d = s->head_dim, d2 = d / 2;
    const BackwardPlan plan = backward_plan(s);
    const int nb = plan.nb, sp = plan.sp;
    const float scale = s->scale;
    float *slots = plan.chunks > 1 ? alloc_floats((size_t)plan.tasks * plan.per_group * sp * d) : NULL;
    int failed = plan.chunks > 1 && !slots;
#pragma omp parallel num_threads(s->threads)
    {
        const size_t hw = (size_t)sp * d2; /* words in one head's [sp][d] bf16 */
        uint16_t *Q = alloc_words(hw), *dO = alloc_words(hw), *row = alloc_words((size_t)d2 + 1);
        uint32_t *Qp = alloc_words(hw), *dOp = alloc_words(hw), *Kw = alloc_words(hw), *Kp = alloc_words(hw), *Vw = alloc_words(hw);
        uint16_t *Pt = alloc_words((size_t)BQ * BK / 2), *dSb = alloc_words((size_t)BQ * BK / 2), *dSt = alloc_words((size_t)BQ * BK / 2);
        float *dQ = alloc_floats((size_t)sp * d), *dK = alloc_floats((size_t)sp * d), *dV = alloc_floats((size_t)sp * d);
        float *P = alloc_floats((size_t)BQ * BK), *dS = alloc_floats((size_t)BQ * BK), *orow = alloc_floats((size_t)d);
        float *L = alloc_floats((size_t)sp), *Dl = alloc_floats((size_t)sp);
        if (!Q || !dO || !row || !Qp || !dOp || !Kw || !Kp || !Vw || !Pt || !dSb || !dSt || !dQ || !dK || !dV || !P || !dS
            || !orow || !L || !Dl) {
#pragma omp atomic write
            failed = 1;
        }
        /* every thread sees the same flag here, so all or none reach the worksharing loop below */
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < plan.tasks; t++) {
                const BackwardTask tk = backward_task(s, &plan, t);
                const int b = tk.b, kh = tk.kh;
                for (int kb = tk.c; kb < nb; kb += plan.chunks)
                    for (int j = kb * BK; j < kb * BK + BK; j++) {
                        load_row_bf16(s, k, b, kh, j, row);
                        put_word_transposed(Kw, row, j, d);
                        put_row_paired(Kp, row, j, d);
                        load_row_bf16(s, v, b, kh, j, row);
                        put_word_transposed(Vw, row, j, d);
                    }
                memset(dK, 0, (size_t)sp * d * sizeof(float));
                memset(dV, 0, (size_t)sp * d * sizeof(float));
                for (int h = kh * plan.per_group; h < (kh + 1) * plan.per_group; h++) {
                    float *dQh = plan.chunks > 1 ? dq_slot(&plan, slots, t, h, d) : dQ;
                    for (int i = 0; i < sp; i++) {
                        load_row_bf16(s, q, b, h, i, Q + (size_t)i * d);
                        put_row_paired(Qp, Q + (size_t)i * d, i, d);
                        load_row_bf16(s, dout, b, h, i, dO + (size_t)i * d);
                        put_row_paired(dOp, dO + (size_t)i * d, i, d);
                        load_row(s, out, b, h, i, 1.0f, orow);
                        float acc = 0.0f;
                        for (int c = 0; c < d; c++) acc += orow[c] * bf16_to_f32(dO[(size_t)i * d + c]);
                        Dl[i] = acc; /* rowsum(dO * O) = rowsum(P * dP) */
                        L[i] = i < s->seq ? lse[((int64_t)b * s->heads + h) * s->seq + i] : INFINITY; /* padding: P = 0 */
                    }
                    memset(dQh, 0, (size_t)sp * d * sizeof(float));
                    for (int kb = tk.c; kb < nb; kb += plan.chunks) {
                        const int j0 = kb * BK;
                        for (int qb = s->causal ? (j0 / BQ) : 0; qb * BQ < s->seq; qb++) {
                            const int i0 = qb * BQ;
                            const uint32_t *Qi = (const uint32_t *)(Q + (size_t)i0 * d), *dOi = (const uint32_t *)(dO + (size_t)i0 * d);
                            gemm_bf16(BQ, BK, d2, Qi, d2, Kw + (size_t)kb * d2 * BK, BK, P, BK, 0);
                            if (needs_mask(s, i0, j0)) mask_block(s, P, i0, j0);
                            for (int i = 0; i < BQ; i++) {
                                v16 li = splat(L[i0 + i]);
                                for (int j = 0; j < BK; j += VL) st(P + i * BK + j, vexp(ld(P + i * BK + j) * splat(scale) - li));
                                for (int j = 0; j < BK; j++) Pt[j * BQ + i] = f32_to_bf16(P[i * BK + j]);
                            }
                            gemm_bf16(BK, d, BQ / 2, (const uint32_t *)Pt, BQ / 2, dOp + (size_t)(i0 / 2) * d, d,
                                      dV + (size_t)j0 * d, d, 1);                                         /* dV += P^T dO */
                            gemm_bf16(BQ, BK, d2, dOi, d2, Vw + (size_t)kb * d2 * BK, BK, dS, BK, 0); /* dP = dO V^T */
                            for (int i = 0; i < BQ; i++) {
                                v16 di = splat(Dl[i0 + i]);
                                for (int j = 0; j < BK; j += VL) {
                                    float *x = dS + i * BK + j;
                                    st(x, ld(P + i * BK + j) * (ld(x) - di));
                                }
                                row_to_bf16(dS + i * BK, dSb + (size_t)i * BK);
                                for (int j = 0; j < BK; j++) dSt[j * BQ + i] = dSb[(size_t)i * BK + j];
                            }
                            gemm_bf16(BK, d, BQ / 2, (const uint32_t *)dSt, BQ / 2, Qp + (size_t)(i0 / 2) * d, d,
                                      dK + (size_t)j0 * d, d, 1);                                         /* dK += dS^T q */
                            gemm_bf16(BQ, d, BK / 2, (const uint32_t *)dSb, BK / 2, Kp + (size_t)(j0 / 2) * d, d,
                                      dQh + (size_t)i0 * d, d, 1);                                        /* dQ += dS K */
                        }
                    }
                    if (plan.chunks == 1)
                        for (int i = 0; i < s->seq; i++) store_row(s, dq, b, h, i, dQ + (size_t)i * d, scale);
                }
                for (int kb = tk.c; kb < nb; kb += plan.chunks) store_key_block(s, dk, dv, b, kh, kb * BK, dK, dV, scale);
            }
            if (plan.chunks > 1) reduce_dq(s, &plan, slots, dq, dQ);
        }
        free(Q); free(dO); free(row); free(Qp); free(dOp); free(Kw); free(Kp); free(Vw); free(Pt); free(dSb); free(dSt);
        free(dQ); free(dK); free(dV); free(P); free(dS); free(orow); free(L); free(Dl);
    }
    free(slots);
    return failed ? 1 : 0;
}
#else
#define HAVE_BF16_PRODUCTS 0
#define forward_bf16 forward_f32
#define backward_bf16 backward_f32
#endif

static int use_bf16_products(const Shape *s) { return HAVE_BF16_PRODUCTS && s->bf16 && s->bf16_products; }

/* 1 when this build multiplies bf16 inputs in bf16 (AVX512-BF16), 0 when every product is fp32. */
int tessera_attn_bf16_products(void) { return HAVE_BF16_PRODUCTS; }

int tessera_attn_forward(const Shape *s, const View *q, const View *k, const View *v, const View *out, float *lse) {
    return use_bf16_products(s) ? forward_bf16(s, q, k, v, out, lse) : forward_f32(s, q, k, v, out, lse);
}

int tessera_attn_backward(const Shape *s, const View *q, const View *k, const View *v, const View *out,
                          const View *dout, const float *lse, const View *dq, const View *dk, const View *dv) {
    return use_bf16_products(s) ? backward_bf16(s, q, k, v, out, dout, lse, dq, dk, dv)
                                : backward_f32(s, q, k, v, out, dout, lse, dq, dk, dv);
}
