// Fused unpack-dequantize-matmul for QuantLinear on x86 CPUs (AVX2 + FMA + F16C; the matrix-vector rows
// also in an AVX-512F version chosen at run time).
//
// Reads our packed format as it is in memory (see hf_efficiency/quant/packing.py): each row is a
// little-endian bit stream of `bits`-bit codes padded to a multiple of 32 codes, so for 8, 4 and 2
// bits a block of 32 codes is `bits * 4` consecutive bytes and byte i holds codes
// i*8/bits ... in its low-to-high bits. Other widths are repacked to 4 or 8 bits by the caller.
//
//   symmetric:  y[m, r] = sum_g scale[r, g] * sum_{j in g} (u[r, j] - offset) * x[m, j]
//   asymmetric: y[m, r] = sum_g scale[r, g] * sum_{j in g} u[r, j] * x[m, j] + minimum[r, g] * sum_{j in g} x[m, j]
//
// Symmetric codes minus `offset` (2**(bits-1)) are formed as signed bytes; asymmetric codes are
// converted unsigned. quant_dequant computes the reference path's weight bit for bit.
//
// Groups are whole 32-code blocks (gs a multiple of 32), or gs == 16 (ggml's Q6_K, Q3_K and Q2_K): then a
// block holds two groups, its codes are scaled per half (plus the minimum) before the products
// (gemv_rows16*), and the last block of a row whose groups end at code 16 of it takes a zero scale there
// (its codes and x are padding). The gs % 32 == 0 rows are separate functions, untouched by this case.
//
// Activations stay float32 (no activation quantization): the result equals the reference path
// (dequantize, then F.linear) up to float rounding of a different summation order.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float v) { return v; }
inline float to_float(at::Half v) { return _cvtsh_ss(v.x); }
inline float to_float(at::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// 32 codes of one block as 32 signed bytes (code - offset) in two 16-byte halves.
template <int BITS>
inline void unpack_block(const uint8_t* q, __m128i offset, __m128i& c0, __m128i& c1);

template <>
inline void unpack_block<8>(const uint8_t* q, __m128i offset, __m128i& c0, __m128i& c1) {
  c0 = _mm_sub_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)), offset);
  c1 = _mm_sub_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)), offset);
}

template <>
inline void unpack_block<4>(const uint8_t* q, __m128i offset, __m128i& c0, __m128i& c1) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  __m128i lo = _mm_and_si128(b, mask);                     // codes 0, 2, 4, ...
  __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);  // codes 1, 3, 5, ...
  c0 = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), offset);
  c1 = _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), offset);
}

template <>
inline void unpack_block<2>(const uint8_t* q, __m128i offset, __m128i& c0, __m128i& c1) {
  const __m128i mask = _mm_set1_epi8(0x03);
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  __m128i p0 = _mm_and_si128(b, mask);
  __m128i p1 = _mm_and_si128(_mm_srli_epi16(b, 2), mask);
  __m128i p2 = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  __m128i p3 = _mm_and_si128(_mm_srli_epi16(b, 6), mask);
  __m128i t0 = _mm_unpacklo_epi8(p0, p1);
  __m128i t1 = _mm_unpacklo_epi8(p2, p3);
  c0 = _mm_sub_epi8(_mm_unpacklo_epi16(t0, t1), offset);
  c1 = _mm_sub_epi8(_mm_unpackhi_epi16(t0, t1), offset);
}

template <bool SYM>
inline __m256 low8(__m128i c) {
  return _mm256_cvtepi32_ps(SYM ? _mm256_cvtepi8_epi32(c) : _mm256_cvtepu8_epi32(c));
}
template <bool SYM>
inline __m256 high8(__m128i c) {
  const __m128i h = _mm_srli_si128(c, 8);
  return _mm256_cvtepi32_ps(SYM ? _mm256_cvtepi8_epi32(h) : _mm256_cvtepu8_epi32(h));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m, r] for rows [r0, r1) and M (<= 8) activation rows: per group, the codes times x accumulate in two
// chains, then the group's scale multiplies the sum once (and minimum * sum of x over the group is added).
// Measured faster here than scaling every block (the cores are compute-bound, not latency-bound).
template <int BITS, bool SYM, int M, typename S>
void gemv_rows(const uint8_t* q, const S* scale, const S* minimum, int offset, const float* x, const float* xsum,
               const float* bias, float* y, int64_t N, int64_t K, int64_t gs, int64_t G, int64_t r0, int64_t r1) {
  const int64_t blocks = K / 32;
  const int64_t block_bytes = BITS * 4;
  const int64_t blocks_per_group = gs / 32;
  const __m128i off = _mm_set1_epi8(static_cast<char>(offset));
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* qr = q + r * blocks * block_bytes;
    __m256 tot[M];
    float extra[M];
    for (int m = 0; m < M; ++m) {
      tot[m] = _mm256_setzero_ps();
      extra[m] = 0.f;
    }
    int64_t blk = 0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t end = std::min(blocks, (g + 1) * blocks_per_group);
      __m256 acc0[M], acc1[M];
      for (int m = 0; m < M; ++m) {
        acc0[m] = _mm256_setzero_ps();
        acc1[m] = _mm256_setzero_ps();
      }
      for (; blk < end; ++blk) {
        __m128i c0, c1;
        unpack_block<BITS>(qr + blk * block_bytes, off, c0, c1);
        const __m256 f0 = low8<SYM>(c0), f1 = high8<SYM>(c0), f2 = low8<SYM>(c1), f3 = high8<SYM>(c1);
        for (int m = 0; m < M; ++m) {
          const float* xm = x + m * K + blk * 32;
          acc0[m] = _mm256_fmadd_ps(f0, _mm256_loadu_ps(xm), acc0[m]);
          acc1[m] = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xm + 8), acc1[m]);
          acc0[m] = _mm256_fmadd_ps(f2, _mm256_loadu_ps(xm + 16), acc0[m]);
          acc1[m] = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xm + 24), acc1[m]);
        }
      }
      const float sg = to_float(scale[r * G + g]);
      const __m256 s = _mm256_set1_ps(sg);
      for (int m = 0; m < M; ++m) tot[m] = _mm256_fmadd_ps(_mm256_add_ps(acc0[m], acc1[m]), s, tot[m]);
      if (!SYM) {
        const float mn = to_float(minimum[r * G + g]);
        for (int m = 0; m < M; ++m) extra[m] += mn * xsum[m * G + g];
      }
    }
    const float b = bias != nullptr ? bias[r] : 0.f;
    for (int m = 0; m < M; ++m) y[m * N + r] = (hsum(tot[m]) + extra[m]) + b;
  }
}

// The same rows with 512-bit vectors (AVX-512F), compiled for that target only and chosen at run time.
template <bool SYM>
__attribute__((target("avx512f"))) inline __m512 wide16(__m128i c) {
  return _mm512_cvtepi32_ps(SYM ? _mm512_cvtepi8_epi32(c) : _mm512_cvtepu8_epi32(c));
}

template <int BITS, bool SYM, int M, typename S>
__attribute__((target("avx512f"))) void gemv_rows512(const uint8_t* q, const S* scale, const S* minimum, int offset,
                                                     const float* x, const float* xsum, const float* bias, float* y,
                                                     int64_t N, int64_t K, int64_t gs, int64_t G, int64_t r0,
                                                     int64_t r1) {
  const int64_t blocks = K / 32;
  const int64_t block_bytes = BITS * 4;
  const int64_t blocks_per_group = gs / 32;
  const __m128i off = _mm_set1_epi8(static_cast<char>(offset));
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* qr = q + r * blocks * block_bytes;
    __m512 tot[M];
    float extra[M];
    for (int m = 0; m < M; ++m) {
      tot[m] = _mm512_setzero_ps();
      extra[m] = 0.f;
    }
    int64_t blk = 0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t end = std::min(blocks, (g + 1) * blocks_per_group);
      __m512 acc0[M], acc1[M];
      for (int m = 0; m < M; ++m) {
        acc0[m] = _mm512_setzero_ps();
        acc1[m] = _mm512_setzero_ps();
      }
      for (; blk < end; ++blk) {
        __m128i c0, c1;
        unpack_block<BITS>(qr + blk * block_bytes, off, c0, c1);
        const __m512 f0 = wide16<SYM>(c0), f1 = wide16<SYM>(c1);
        for (int m = 0; m < M; ++m) {
          const float* xm = x + m * K + blk * 32;
          acc0[m] = _mm512_fmadd_ps(f0, _mm512_loadu_ps(xm), acc0[m]);
          acc1[m] = _mm512_fmadd_ps(f1, _mm512_loadu_ps(xm + 16), acc1[m]);
        }
      }
      const float sg = to_float(scale[r * G + g]);
      const __m512 s = _mm512_set1_ps(sg);
      for (int m = 0; m < M; ++m) tot[m] = _mm512_fmadd_ps(_mm512_add_ps(acc0[m], acc1[m]), s, tot[m]);
      if (!SYM) {
        const float mn = to_float(minimum[r * G + g]);
        for (int m = 0; m < M; ++m) extra[m] += mn * xsum[m * G + g];
      }
    }
    const float b = bias != nullptr ? bias[r] : 0.f;
    for (int m = 0; m < M; ++m) y[m * N + r] = (_mm512_reduce_add_ps(tot[m]) + extra[m]) + b;
  }
}

// Groups of 16 codes (gs == 16), AVX2: each block's codes become weights (u * scale + minimum, per 16-code half)
// once, shared by the M activation rows, then multiply x. M == 1 spreads the products over four chains (latency),
// more rows over two per row (registers). `G` is ceil(in_features / 16): when it is odd, the last block holds one
// group, and its second half (padding codes times zero activations) takes a zero scale and minimum.
template <bool SYM, typename S>
inline void half_scales(const S* sr, const S* mr, int64_t g, int64_t G, float& sa, float& sb, float& ma, float& mb) {
  const bool both = g + 1 < G;
  sa = to_float(sr[g]);
  sb = both ? to_float(sr[g + 1]) : 0.f;
  ma = SYM ? 0.f : to_float(mr[g]);
  mb = SYM || !both ? 0.f : to_float(mr[g + 1]);
}

template <int BITS, bool SYM, int M, int CH>
inline void block16(const uint8_t* qb, __m128i off, float sa, float sb, float ma, float mb, const float* x, int64_t K,
                    __m256 (&acc)[CH][M]) {
  __m128i c0, c1;
  unpack_block<BITS>(qb, off, c0, c1);
  const __m256 a = _mm256_set1_ps(sa), b = _mm256_set1_ps(sb);
  __m256 w[4];
  if (SYM) {
    w[0] = _mm256_mul_ps(low8<SYM>(c0), a);
    w[1] = _mm256_mul_ps(high8<SYM>(c0), a);
    w[2] = _mm256_mul_ps(low8<SYM>(c1), b);
    w[3] = _mm256_mul_ps(high8<SYM>(c1), b);
  } else {
    const __m256 am = _mm256_set1_ps(ma), bm = _mm256_set1_ps(mb);
    w[0] = _mm256_fmadd_ps(low8<SYM>(c0), a, am);
    w[1] = _mm256_fmadd_ps(high8<SYM>(c0), a, am);
    w[2] = _mm256_fmadd_ps(low8<SYM>(c1), b, bm);
    w[3] = _mm256_fmadd_ps(high8<SYM>(c1), b, bm);
  }
  for (int m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    for (int i = 0; i < 4; ++i) acc[i % CH][m] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xm + 8 * i), acc[i % CH][m]);
  }
}

template <int BITS, bool SYM, int M, typename S>
void gemv_rows16(const uint8_t* q, const S* scale, const S* minimum, int offset, const float* x, const float* bias,
                 float* y, int64_t N, int64_t K, int64_t G, int64_t r0, int64_t r1) {
  constexpr int CH = M == 1 ? 4 : 2;
  const int64_t blocks = K / 32;
  const int64_t full = G / 2;  // blocks holding two groups
  const int64_t block_bytes = BITS * 4;
  const __m128i off = _mm_set1_epi8(static_cast<char>(offset));
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* qr = q + r * blocks * block_bytes;
    const S* sr = scale + r * G;
    const S* mr = SYM ? nullptr : minimum + r * G;
    __m256 acc[CH][M];
    for (int c = 0; c < CH; ++c)
      for (int m = 0; m < M; ++m) acc[c][m] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < full; ++blk) {
      const int64_t g = 2 * blk;
      block16<BITS, SYM, M, CH>(qr + blk * block_bytes, off, to_float(sr[g]), to_float(sr[g + 1]),
                                SYM ? 0.f : to_float(mr[g]), SYM ? 0.f : to_float(mr[g + 1]), x + blk * 32, K, acc);
    }
    if (full < blocks) {
      float sa, sb, ma, mb;
      half_scales<SYM, S>(sr, mr, 2 * full, G, sa, sb, ma, mb);
      block16<BITS, SYM, M, CH>(qr + full * block_bytes, off, sa, sb, ma, mb, x + full * 32, K, acc);
    }
    const float bb = bias != nullptr ? bias[r] : 0.f;
    for (int m = 0; m < M; ++m) {
      __m256 t = acc[0][m];
      for (int c = 1; c < CH; ++c) t = _mm256_add_ps(t, acc[c][m]);
      y[m * N + r] = hsum(t) + bb;
    }
  }
}

// The same with 512-bit vectors: one 16-code half per vector, one chain per half.
template <int BITS, bool SYM, int M>
__attribute__((target("avx512f"))) inline void block16_512(const uint8_t* qb, __m128i off, float sa, float sb,
                                                           float ma, float mb, const float* x, int64_t K,
                                                           __m512 (&acc0)[M], __m512 (&acc1)[M]) {
  __m128i c0, c1;
  unpack_block<BITS>(qb, off, c0, c1);
  __m512 w0, w1;
  if (SYM) {
    w0 = _mm512_mul_ps(wide16<SYM>(c0), _mm512_set1_ps(sa));
    w1 = _mm512_mul_ps(wide16<SYM>(c1), _mm512_set1_ps(sb));
  } else {
    w0 = _mm512_fmadd_ps(wide16<SYM>(c0), _mm512_set1_ps(sa), _mm512_set1_ps(ma));
    w1 = _mm512_fmadd_ps(wide16<SYM>(c1), _mm512_set1_ps(sb), _mm512_set1_ps(mb));
  }
  for (int m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    acc0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc0[m]);
    acc1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc1[m]);
  }
}

template <int BITS, bool SYM, int M, typename S>
__attribute__((target("avx512f"))) void gemv_rows16_512(const uint8_t* q, const S* scale, const S* minimum,
                                                        int offset, const float* x, const float* bias, float* y,
                                                        int64_t N, int64_t K, int64_t G, int64_t r0, int64_t r1) {
  const int64_t blocks = K / 32;
  const int64_t full = G / 2;
  const int64_t block_bytes = BITS * 4;
  const __m128i off = _mm_set1_epi8(static_cast<char>(offset));
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* qr = q + r * blocks * block_bytes;
    const S* sr = scale + r * G;
    const S* mr = SYM ? nullptr : minimum + r * G;
    __m512 acc0[M], acc1[M];
    for (int m = 0; m < M; ++m) {
      acc0[m] = _mm512_setzero_ps();
      acc1[m] = _mm512_setzero_ps();
    }
    for (int64_t blk = 0; blk < full; ++blk) {
      const int64_t g = 2 * blk;
      block16_512<BITS, SYM, M>(qr + blk * block_bytes, off, to_float(sr[g]), to_float(sr[g + 1]),
                                SYM ? 0.f : to_float(mr[g]), SYM ? 0.f : to_float(mr[g + 1]), x + blk * 32, K, acc0,
                                acc1);
    }
    if (full < blocks) {
      float sa, sb, ma, mb;
      half_scales<SYM, S>(sr, mr, 2 * full, G, sa, sb, ma, mb);
      block16_512<BITS, SYM, M>(qr + full * block_bytes, off, sa, sb, ma, mb, x + full * 32, K, acc0, acc1);
    }
    const float bb = bias != nullptr ? bias[r] : 0.f;
    for (int m = 0; m < M; ++m) y[m * N + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) + bb;
  }
}

// One chunk of MC activation rows over W's rows [r0, r1): the row function for the group layout and ISA.
template <int BITS, bool SYM, int MC, bool G16, typename S>
inline void rows(const uint8_t* q, const S* scale, const S* minimum, int offset, const float* xm, const float* sm,
                 const float* bias, float* ym, int64_t N, int64_t K, int64_t gs, int64_t G, bool wide, int64_t r0,
                 int64_t r1) {
  if constexpr (G16) {
    if (wide) gemv_rows16_512<BITS, SYM, MC, S>(q, scale, minimum, offset, xm, bias, ym, N, K, G, r0, r1);
    else gemv_rows16<BITS, SYM, MC, S>(q, scale, minimum, offset, xm, bias, ym, N, K, G, r0, r1);
  } else {
    if (wide) gemv_rows512<BITS, SYM, MC, S>(q, scale, minimum, offset, xm, sm, bias, ym, N, K, gs, G, r0, r1);
    else gemv_rows<BITS, SYM, MC, S>(q, scale, minimum, offset, xm, sm, bias, ym, N, K, gs, G, r0, r1);
  }
}

template <int BITS, bool SYM, bool G16, typename S>
void gemm(const uint8_t* q, const S* scale, const S* minimum, int offset, const float* x, const float* xsum,
          const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t gs, int64_t G, bool wide) {
  // Rows of W in parallel; activation rows in chunks of up to 8 that share each unpacked block.
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, K / 32));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    int64_t m = 0;
    while (m < M) {
      const int64_t left = M - m;
      const float* xm = x + m * K;
      const float* sm = G16 ? nullptr : xsum + m * G;  // groups of 16 read no sums
      float* ym = y + m * N;
      if (left >= 8) {
        rows<BITS, SYM, 8, G16, S>(q, scale, minimum, offset, xm, sm, bias, ym, N, K, gs, G, wide, r0, r1);
        m += 8;
      } else if (left >= 4) {
        rows<BITS, SYM, 4, G16, S>(q, scale, minimum, offset, xm, sm, bias, ym, N, K, gs, G, wide, r0, r1);
        m += 4;
      } else if (left >= 2) {
        rows<BITS, SYM, 2, G16, S>(q, scale, minimum, offset, xm, sm, bias, ym, N, K, gs, G, wide, r0, r1);
        m += 2;
      } else {
        rows<BITS, SYM, 1, G16, S>(q, scale, minimum, offset, xm, sm, bias, ym, N, K, gs, G, wide, r0, r1);
        m += 1;
      }
    }
  });
}

template <int BITS, bool SYM, bool G16, typename S>
void dequant(const uint8_t* q, const S* scale, const S* minimum, int offset, float* out, int64_t N, int64_t K,
             int64_t gs, int64_t G, int64_t K_out) {
  const int64_t blocks = K / 32;
  const int64_t block_bytes = BITS * 4;
  const int64_t blocks_per_group = G16 ? 1 : gs / 32;
  const __m128i off = _mm_set1_epi8(static_cast<char>(offset));
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    alignas(32) float tail[32];
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* qr = q + r * blocks * block_bytes;
      float* o = out + r * K_out;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        // (u - offset) * s, plus the minimum for asymmetric schemes: the reference path's operations
        // in the same order (no fused multiply-add), so the weight is bit-identical
        __m256 s[2], mn[2];  // codes 0-15, 16-31 of the block
        if constexpr (G16) {
          float sa, sb, ma, mb;
          half_scales<SYM, S>(scale + r * G, SYM ? nullptr : minimum + r * G, 2 * blk, G, sa, sb, ma, mb);
          s[0] = _mm256_set1_ps(sa);
          s[1] = _mm256_set1_ps(sb);
          mn[0] = _mm256_set1_ps(ma);
          mn[1] = _mm256_set1_ps(mb);
        } else {
          const int64_t g = blk / blocks_per_group;
          s[0] = s[1] = _mm256_set1_ps(to_float(scale[r * G + g]));
          mn[0] = mn[1] = _mm256_set1_ps(SYM ? 0.f : to_float(minimum[r * G + g]));
        }
        __m128i c0, c1;
        unpack_block<BITS>(qr + blk * block_bytes, off, c0, c1);
        const int64_t base = blk * 32;
        float* dst = base + 32 <= K_out ? o + base : tail;
        const __m256 f[4] = {low8<SYM>(c0), high8<SYM>(c0), low8<SYM>(c1), high8<SYM>(c1)};
        for (int i = 0; i < 4; ++i) {
          const __m256 w = _mm256_mul_ps(f[i], s[i / 2]);
          _mm256_storeu_ps(dst + 8 * i, SYM ? w : _mm256_add_ps(w, mn[i / 2]));
        }
        if (dst == tail) std::memcpy(o + base, tail, sizeof(float) * (K_out - base));
      }
    }
  });
}

template <typename F>
void dispatch(int64_t bits, bool sym, bool g16, const torch::Tensor& scale, F&& f) {
  auto by_type = [&](auto bits_tag, auto sym_tag, auto g16_tag) {
    switch (scale.scalar_type()) {
      case at::kFloat: f(bits_tag, sym_tag, g16_tag, static_cast<float*>(nullptr)); break;
      case at::kHalf: f(bits_tag, sym_tag, g16_tag, static_cast<at::Half*>(nullptr)); break;
      case at::kBFloat16: f(bits_tag, sym_tag, g16_tag, static_cast<at::BFloat16*>(nullptr)); break;
      default: TORCH_CHECK(false, "scale dtype must be float32, float16 or bfloat16, got ", scale.scalar_type());
    }
  };
  auto by_group = [&](auto bits_tag, auto sym_tag) {
    if (g16) by_type(bits_tag, sym_tag, std::true_type{});
    else by_type(bits_tag, sym_tag, std::false_type{});
  };
  auto by_sym = [&](auto bits_tag) {
    if (sym) by_group(bits_tag, std::true_type{});
    else by_group(bits_tag, std::false_type{});
  };
  switch (bits) {
    case 8: by_sym(std::integral_constant<int, 8>{}); break;
    case 4: by_sym(std::integral_constant<int, 4>{}); break;
    case 2: by_sym(std::integral_constant<int, 2>{}); break;
    default: TORCH_CHECK(false, "bits must be 8, 4 or 2 (repack other widths), got ", bits);
  }
}

void check(const torch::Tensor& q, const torch::Tensor& scale, const c10::optional<torch::Tensor>& minimum,
           int64_t bits, int64_t K, int64_t gs) {
  TORCH_CHECK(q.device().is_cpu() && q.is_contiguous() && q.dim() == 2, "packed weight must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(K % 32 == 0 && gs > 0 && (gs % 32 == 0 || gs == 16),
              "K must be a multiple of 32 and the group size 16 or a multiple of 32");
  TORCH_CHECK(q.numel() * q.element_size() == q.size(0) * (K / 32) * bits * 4, "packed weight size does not match K");
  const int64_t G = (K + gs - 1) / gs;
  // groups of 16: ceil(in_features / 16) groups, one fewer than K / 16 when the last block's second half is padding
  TORCH_CHECK(scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == q.size(0) &&
                  (scale.size(1) == G || (gs == 16 && scale.size(1) == G - 1)),
              "scale must be [N, ceil(K/gs)]");
  if (minimum.has_value()) {
    TORCH_CHECK(minimum->is_contiguous() && minimum->sizes() == scale.sizes() &&
                minimum->scalar_type() == scale.scalar_type(), "minimum must match scale");
  }
}

}  // namespace

// x: float32 [M, K] (K a multiple of 32, zero-padded); returns float32 [M, N] (+ bias, float32 [N], if given). vector_bits: 512 runs the
// AVX-512F rows (the caller checks the CPU has it), 256 the AVX2 ones.
torch::Tensor quant_gemm(torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> minimum, int64_t bits,
                         int64_t offset, int64_t gs, torch::Tensor x, int64_t vector_bits,
                         c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(vector_bits == 256 || vector_bits == 512, "vector_bits must be 256 or 512");
  TORCH_CHECK(vector_bits == 256 || __builtin_cpu_supports("avx512f"), "this CPU has no AVX-512F");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  check(q, scale, minimum, bits, K, gs);
  const int64_t G = scale.size(1);
  const bool g16 = gs == 16;
  // per-group sums of x (asymmetric schemes), a plain loop: cheaper than three torch ops per call (groups of
  // 16 add the minima to the weights instead)
  std::vector<float> xsum(g16 ? 0 : M * G, 0.f);
  if (minimum.has_value() && !g16) {
    const float* xp = x.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xsum[m * G + k / gs] += xp[m * K + k];
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias must be a contiguous float32 [N]");
  }
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.data_ptr());
  dispatch(bits, !minimum.has_value(), g16, scale, [&](auto bits_tag, auto sym_tag, auto g16_tag, auto* type_tag) {
    constexpr int B = decltype(bits_tag)::value;
    constexpr bool SYM = decltype(sym_tag)::value;
    constexpr bool G16 = decltype(g16_tag)::value;
    using S = std::remove_pointer_t<decltype(type_tag)>;
    gemm<B, SYM, G16, S>(qp, scale.data_ptr<S>(), minimum.has_value() ? minimum->data_ptr<S>() : nullptr,
               static_cast<int>(offset), x.data_ptr<float>(), xsum.data(),
               bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), M, N, K, gs, G,
               vector_bits == 512);
  });
  return y;
}

// Float32 weight [N, K_out] (K_out <= K, the unpadded width).
torch::Tensor quant_dequant(torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> minimum, int64_t bits,
                            int64_t offset, int64_t gs, int64_t K, int64_t K_out) {
  check(q, scale, minimum, bits, K, gs);
  const int64_t N = q.size(0), G = scale.size(1);
  auto out = torch::empty({N, K_out}, scale.options().dtype(at::kFloat));
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.data_ptr());
  dispatch(bits, !minimum.has_value(), gs == 16, scale, [&](auto bits_tag, auto sym_tag, auto g16_tag, auto* type_tag) {
    constexpr int B = decltype(bits_tag)::value;
    constexpr bool SYM = decltype(sym_tag)::value;
    constexpr bool G16 = decltype(g16_tag)::value;
    using S = std::remove_pointer_t<decltype(type_tag)>;
    dequant<B, SYM, G16, S>(qp, scale.data_ptr<S>(), minimum.has_value() ? minimum->data_ptr<S>() : nullptr,
                  static_cast<int>(offset), out.data_ptr<float>(), N, K, gs, G, K_out);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_gemm", &quant_gemm, "y[M, N] = x[M, K] @ dequant(q)^T (float32)");
  m.def("quant_dequant", &quant_dequant, "float32 weight [N, K_out] from packed codes");
}

// The same product as a torch operator, torch.ops.hf_efficiency.quant_gemm (its fake, for tracing, is registered in
// Python): torch.compile's generated code calls it through the dispatcher, with no Python in between.
TORCH_LIBRARY(hf_efficiency, m) {
  m.def(
      "quant_gemm(Tensor q, Tensor scale, Tensor? minimum, int bits, int offset, int group, Tensor x, int vector_bits, "
      "Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_efficiency, CPU, m) { m.impl("quant_gemm", &quant_gemm); }
