/* One-row weight products y = x W^T (+ b) for decode, streamed at the memory's speed (pgconv issue 16).
 *
 * Why this exists: at decode every weight byte is read once per token, so a step is as fast as the weights
 * stream. On the 2-vCPU EPYCs we run on, torch's one-row kernels (oneDNN, ATen's GEMV, MKL) reached 40-90 % of
 * the bandwidth that a plain read reaches, depending on the shape (benchmarks/RESULTS.md). This kernel only
 * streams: each thread walks a contiguous block of weight rows, against one copy of x that stays in L1/L2.
 *
 * Math (the same as every other candidate in model/cpu_kernels.py): bf16 x bf16 products are exact in fp32,
 * every product is accumulated in fp32, the bias is added in fp32, and the result is rounded once (round to
 * nearest even) to the output dtype; no fast-math. Only the summation order differs from torch's. With
 * AVX512-BF16 the products are `vdpbf16ps`, which treats denormals as zero, as oneDNN's bf16 kernels do (see
 * rows_bf16); elsewhere the weights are widened exactly and nothing is flushed.
 *
 * Built by model/cpu_gemv.py with the system C compiler (-O3 -march=native -fopenmp), cached per CPU; without
 * a compiler the candidate is simply absent.
 */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays a (quiet) NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ---- bf16 ------------------------------------------------------------------------------------------------- */

#ifndef PGCONV_LONG_ROW
#define PGCONV_LONG_ROW 4096 /* elements: from here on x outgrows L1, and four rows share each load of it */
#endif

#if defined(__AVX512BF16__)
/* With AVX512-BF16, `vdpbf16ps` multiplies 32 bf16 pairs exactly and adds them into 16 fp32 sums: one instruction
 * per 32 weights, which (measured on a Zen 4, one thread) streams at the speed of a plain read, where widening
 * the weights to fp32 first ran at half of it. Like oneDNN's bf16 kernels (torch's default for bf16 products on
 * such a CPU) it treats denormal inputs and results as zero; normal numbers are unaffected. */
static inline __m512bh ld_bh(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512((const void *)p); }
static inline __m512bh ld_bh_tail(const uint16_t *p, int64_t left) {
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << left) - 1), p);
}

static void rows_bf16(const uint16_t *w, const uint16_t *x, const uint16_t *b, uint16_t *y, int64_t r0, int64_t r1,
                      int64_t k) {
    int64_t r = r0, tail = k % 32, body = k - tail;
    /* Long rows (the down projection's 16384): x (32 KiB) fills L1, so four rows share each load of it; each row
     * is then a long stream of its own, which the prefetcher follows. Short rows go one at a time, so that the
     * weights stream through memory in order (four interleaved 4 KiB rows ran at ~70 % of that). */
    for (; k >= PGCONV_LONG_ROW && r + 4 <= r1; r += 4) {
        const uint16_t *w0 = w + r * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        for (int64_t i = 0; i < body; i += 32) {
            __m512bh xv = ld_bh(x + i);
            a0 = _mm512_dpbf16_ps(a0, ld_bh(w0 + i), xv);
            a1 = _mm512_dpbf16_ps(a1, ld_bh(w1 + i), xv);
            a2 = _mm512_dpbf16_ps(a2, ld_bh(w2 + i), xv);
            a3 = _mm512_dpbf16_ps(a3, ld_bh(w3 + i), xv);
        }
        if (tail) {
            __m512bh xv = ld_bh_tail(x + body, tail);
            a0 = _mm512_dpbf16_ps(a0, ld_bh_tail(w0 + body, tail), xv);
            a1 = _mm512_dpbf16_ps(a1, ld_bh_tail(w1 + body, tail), xv);
            a2 = _mm512_dpbf16_ps(a2, ld_bh_tail(w2 + body, tail), xv);
            a3 = _mm512_dpbf16_ps(a3, ld_bh_tail(w3 + body, tail), xv);
        }
        float s4[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                       _mm512_reduce_add_ps(a3)};
        for (int j = 0; j < 4; j++) y[r + j] = f32_to_bf16(s4[j] + (b ? bf16_to_f32(b[r + j]) : 0.0f));
    }
    for (; r < r1; r++) {
        const uint16_t *wr = w + r * k;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 64 <= body; i += 64) {
            a0 = _mm512_dpbf16_ps(a0, ld_bh(wr + i), ld_bh(x + i));
            a1 = _mm512_dpbf16_ps(a1, ld_bh(wr + i + 32), ld_bh(x + i + 32));
        }
        for (; i < body; i += 32) a0 = _mm512_dpbf16_ps(a0, ld_bh(wr + i), ld_bh(x + i));
        if (tail) a1 = _mm512_dpbf16_ps(a1, ld_bh_tail(wr + body, tail), ld_bh_tail(x + body, tail));
        y[r] = f32_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + (b ? bf16_to_f32(b[r]) : 0.0f));
    }
}
#define GEMV_BF16_WIDENS_X 0
#else
/* Without AVX512-BF16: the weights are widened to fp32 (exact: a shift; no flush of denormals) and multiplied by
 * FMAs against x widened once. */
static void rows_bf16(const uint16_t *w, const float *x, const uint16_t *b, uint16_t *y, int64_t r0, int64_t r1,
                      int64_t k) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wr = w + r * k;
        float s = 0.0f;
        int64_t i = 0;
#if defined(__AVX512F__)
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (; i + 32 <= k; i += 32) {
            __m512 w0 = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(wr + i))), 16));
            __m512 w1 = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(wr + i + 16))), 16));
            a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), a0);
            a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i + 16), a1);
        }
        s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
        for (; i < k; i++) s += bf16_to_f32(wr[i]) * x[i];
        y[r] = f32_to_bf16(s + (b ? bf16_to_f32(b[r]) : 0.0f));
    }
}
#define GEMV_BF16_WIDENS_X 1
#endif

/* ---- fp32 ---------------------------------------------------------------------------------------------------- */

static void rows_f32(const float *w, const float *x, const float *b, float *y, int64_t r0, int64_t r1, int64_t k) {
    int64_t r = r0;
#if defined(__AVX512F__)
    for (; k >= PGCONV_LONG_ROW && k % 16 == 0 && r + 4 <= r1; r += 4) { /* as rows_bf16 */
        const float *w0 = w + r * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        for (int64_t i = 0; i < k; i += 16) {
            __m512 xv = _mm512_loadu_ps(x + i);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + i), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + i), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + i), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + i), xv, a3);
        }
        float s4[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                       _mm512_reduce_add_ps(a3)};
        for (int j = 0; j < 4; j++) y[r + j] = s4[j] + (b ? b[r + j] : 0.0f);
    }
#endif
    for (; r < r1; r++) {
        const float *wr = w + r * k;
        float s = 0.0f;
        int64_t i = 0;
#if defined(__AVX512F__)
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        for (; i + 64 <= k; i += 64) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + i), _mm512_loadu_ps(x + i), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + i + 16), _mm512_loadu_ps(x + i + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + i + 32), _mm512_loadu_ps(x + i + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + i + 48), _mm512_loadu_ps(x + i + 48), a3);
        }
        s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
        for (; i < k; i++) s += w[r * k + i] * x[i];
        y[r] = s + (b ? b[r] : 0.0f);
    }
}

/* ---- threads: torch's own OpenMP pool ---------------------------------------------------------------------- */
/* Built with -fopenmp, this library needs libgomp.so.1, which torch has already loaded (torch/lib/libgomp.so.1),
 * so the dynamic linker binds us to the same runtime: our parallel region runs on torch's worker threads, which
 * are still spinning from torch's previous op. A pool of our own (tried first) competed with those spinning
 * workers for the 2 cores and gave back a third of the gain. */

typedef struct {
    int is_bf16;
    const void *w, *b;
    const void *x; /* bf16: as given (vdpbf16ps) or widened to fp32 once */
    void *y;
    int64_t n, k, nthreads;
} job_t;

static void run_part(const job_t *j, int64_t part) {
    /* Row blocks of a multiple of 4 rows, as even as possible. */
    int64_t per = ((j->n + j->nthreads - 1) / j->nthreads + 3) / 4 * 4;
    int64_t r0 = part * per, r1 = r0 + per < j->n ? r0 + per : j->n;
    if (r0 >= r1) return;
    if (j->is_bf16)
        rows_bf16((const uint16_t *)j->w, j->x, (const uint16_t *)j->b, (uint16_t *)j->y, r0, r1, j->k);
    else
        rows_f32((const float *)j->w, (const float *)j->x, (const float *)j->b, (float *)j->y, r0, r1, j->k);
}

/* y[n] = x[k] . w[n, k] (+ b[n]); x, w, b, y contiguous. `xf` is scratch for k floats (bf16). Returns 0. */
static int gemv(int is_bf16, const void *x, const void *w, const void *b, void *y, int64_t n, int64_t k,
                int64_t nthreads, float *xf) {
    if (nthreads < 1) nthreads = 1;
    if (n < 64 * nthreads) nthreads = 1; /* too small to be worth a wake-up */
    job_t j = {is_bf16, w, b, x, y, n, k, nthreads};
    if (is_bf16 && GEMV_BF16_WIDENS_X) {
        for (int64_t i = 0; i < k; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        j.x = xf;
    }
#if defined(_OPENMP)
    if (nthreads > 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
        for (int64_t part = 0; part < nthreads; part++) run_part(&j, part);
        return 0;
    }
#endif
    j.nthreads = 1;
    run_part(&j, 0);
    return 0;
}

int pgconv_gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y, int64_t n, int64_t k,
                     int64_t nthreads, float *scratch) {
    return gemv(1, x, w, b, y, n, k, nthreads, scratch);
}

int pgconv_gemv_f32(const float *x, const float *w, const float *b, float *y, int64_t n, int64_t k,
                    int64_t nthreads) {
    return gemv(0, x, w, b, y, n, k, nthreads, NULL);
}

/* What the build uses: 2 = AVX512-BF16 dot products, 1 = AVX-512 FMAs, 0 = the portable loops. */
int pgconv_gemv_isa(void) {
#if defined(__AVX512BF16__)
    return 2;
#elif defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* Evict [p, p + bytes) from every cache level (x86: clflush, line by line), so that a kernel probe times a weight
 * that fits in the caches as the model runs it: streamed from memory. Returns 0, or -1 where not supported. */
int pgconv_flush(const void *p, int64_t bytes) {
#if defined(__x86_64__) || defined(__i386__)
    if (bytes <= 0) return 0; /* (NULL, 0): "is flushing supported here?" */
    const char *c = (const char *)p;
    for (int64_t i = 0; i < bytes; i += 64) _mm_clflush(c + i);
    _mm_clflush(c + bytes - 1);
    _mm_mfence();
    return 0;
#else
    (void)p;
    (void)bytes;
    return -1;
#endif
}

/* ---- GELU (tanh) and the GeGLU product gelu(gate) * up, bf16 -------------------------------------------------- */
/* ATen evaluates the tanh GELU with a Sleef tanh on every element: compute-bound, 7.4 ms for one 262 x 16384
 * decoder layer of a bf16 prefill on the AMD EPYC Zen 4 (~7 % of the first token). A bf16 input has only 65536
 * values, so this takes torch's own result for each from a table; the product with `up` is fused into the same
 * pass. (A faster formula, x / (1 + exp(-2u)), was tried first: more accurate than ATen's for x << 0, it still
 * changed last bits often enough that `pgconv verify` failed its logits budget at 3B in bf16.) */

#define ACT_CHUNK 16384 /* elements per OpenMP task */

/* bf16 by table: y = table[g] (* u): `table` holds torch's own bf16 GELU of every one of the 65536 bf16 values
 * (computed by F.gelu at first use, in this process), so the result is torch's bit for bit, and the product is
 * rounded as torch's bf16 `mul` (fp32 product of two bf16 values, round to nearest even). */
static void table_part(const uint16_t *g, const uint16_t *u, uint16_t *y, const uint16_t *table, int64_t i0,
                       int64_t i1) {
    if (u) {
#pragma omp simd
        for (int64_t i = i0; i < i1; i++) y[i] = f32_to_bf16(bf16_to_f32(table[g[i]]) * bf16_to_f32(u[i]));
    } else {
        for (int64_t i = i0; i < i1; i++) y[i] = table[g[i]];
    }
}

int pgconv_gelu_table_bf16(const uint16_t *g, const uint16_t *u, uint16_t *y, int64_t n, int64_t nthreads,
                           const uint16_t *table) {
    int64_t parts = (n + ACT_CHUNK - 1) / ACT_CHUNK;
#if defined(_OPENMP)
    if (nthreads > 1 && parts > 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t p = 0; p < parts; p++)
            table_part(g, u, y, table, p * ACT_CHUNK, (p + 1) * ACT_CHUNK < n ? (p + 1) * ACT_CHUNK : n);
        return 0;
    }
#endif
    (void)nthreads;
    table_part(g, u, y, table, 0, n);
    return 0;
}
