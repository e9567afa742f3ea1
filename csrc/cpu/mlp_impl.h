// The excitation MLP on the [N, C] / [N, S] vectors, in the accumulation type (fp32, or
// fp64 for fp64): the fused op's, and the fc_layer ops' (se_kernels/_fc_ops.py) that the
// staged path's MLPs run on. Included by kernels_impl.h, so it is compiled once per CPU
// capability.
//
// Two products cover the forward and the backward:
//   dot_rows   y[n, r] = b[r] + sum_k x[n, k] w[r, k]        the FCs (both operands along k)
//   sum_rows   y[m, k] (+)= sum_r u(m, r) v[r, k]            the input gradients, and with u
//                                                            read transposed, the weights'
// Each works on register tiles (several weight rows or columns times several samples), so
// a loaded vector feeds several FMAs and enough independent sums are in flight to hide the
// FMA latency: at batch 1 the weights stream at cache bandwidth, at batch 32 the tiles run
// near the FMA throughput. Every output element is one thread's sum in one fixed order
// (vector lanes over k then a fixed pairwise lane reduction, or r ascending), whatever the
// tile it falls in: results do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "../se_common.h"

#ifndef SE_CPU_CAPABILITY
#error "define SE_CPU_CAPABILITY before including mlp_impl.h"
#endif

namespace se_kernels::cpu::SE_CPU_CAPABILITY {
namespace {

template <typename acc_t>
struct Mlp {
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kLanes = Vec::size();

  // Parallel chunks of at least 2^18 multiply-adds (10-20 us on one core): a parallel
  // region costs a few microseconds on an idle machine and a scheduler time slice on a
  // busy one, so the small MLPs of batch 1 stay on the calling thread.
  static int64_t grain(int64_t macs_per_item) {
    return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, macs_per_item));
  }

  // A v larger than this goes strip major through sum_rows: a quarter of a 1 MiB L2, so that
  // it would not stay cached between row tiles.
  static constexpr int64_t kStripMajorBytes = int64_t{1} << 18;

  // ---- dot_rows -------------------------------------------------------------------------

  // kRows weight rows x kSamples samples; x and w at their first row, y at [n0, r0]. The
  // last K % kLanes terms go through the same vector lanes (masked loads, zeros past them),
  // and the tile's lane sums are taken together: the MLPs' second FC has K = S, often 20-50,
  // where a horizontal sum and a scalar tail per output cost more than the products.
  template <int kRows, int kSamples>
  static void dot_tile(const acc_t* x, const acc_t* w, int64_t K, const acc_t* bias, acc_t* y,
                       int64_t ldy) {
    Vec acc[kSamples][kRows];
    for (auto& row : acc)
      for (auto& v : row) v = Vec(acc_t(0));
    auto step = [&](int64_t k, auto load) {
      Vec wv[kRows];
      for (int r = 0; r < kRows; ++r) wv[r] = load(w + r * K + k);
      for (int n = 0; n < kSamples; ++n) {
        const Vec xv = load(x + n * K + k);
        for (int r = 0; r < kRows; ++r) acc[n][r] = at::vec::fmadd(wv[r], xv, acc[n][r]);
      }
    };
    const int64_t kv = K - K % kLanes;
    for (int64_t k = 0; k < kv; k += kLanes) step(k, [](const acc_t* p) { return Vec::loadu(p); });
    if (kv < K) step(kv, [&](const acc_t* p) { return load_first(p, K - kv); });
    acc_t total[kSamples * kRows];
    sum_lanes(&acc[0][0], kSamples * kRows, total);
    for (int n = 0; n < kSamples; ++n)
      for (int r = 0; r < kRows; ++r)
        y[n * ldy + r] = bias ? total[n * kRows + r] + bias[r] : total[n * kRows + r];
  }

  // The count (< kLanes) elements at p, zeros in the lanes after them.
  static Vec load_first(const acc_t* p, int64_t count) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<acc_t, float>) {  // lanes past count are not read
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lane));
    }
#endif
    return Vec::loadu(p, count);
  }

  // out[i] = the sum of v[i]'s lanes, for i < count, every one in the same order: adjacent
  // pairs, then pairs of those (((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) for 8
  // lanes). An output's value does not depend on the tile it falls in.
  static void sum_lanes(const Vec* v, int count, acc_t* out) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<acc_t, float>) {
      // Eight vectors at a time: two rounds of pairwise adds (hadd) leave lanes 0-3's and
      // 4-7's sums of each vector in the two 128-bit halves; one add of the halves ends it.
      for (int i = 0; i < count; i += 8) {
        __m256 r[8];
        for (int j = 0; j < 8; ++j) r[j] = i + j < count ? __m256(v[i + j]) : _mm256_setzero_ps();
        const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));
        const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(r[4], r[5]), _mm256_hadd_ps(r[6], r[7]));
        const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20),
                                          _mm256_permute2f128_ps(a, b, 0x31));
        if (count - i >= 8) {
          _mm256_storeu_ps(out + i, sums);
        } else {
          alignas(32) float lanes[8];
          _mm256_store_ps(lanes, sums);
          std::copy_n(lanes, count - i, out + i);
        }
      }
      return;
    }
#endif
    for (int i = 0; i < count; ++i) {
      alignas(64) acc_t lanes[kLanes];
      v[i].store(lanes);
      for (int64_t width = kLanes; width > 1; width /= 2)
        for (int64_t j = 0; j < width / 2; ++j) lanes[j] = lanes[2 * j] + lanes[2 * j + 1];
      out[i] = lanes[0];
    }
  }

  // Tiles of kRows rows x up to kSamples samples (fewer for the last samples); rows past
  // the last full tile go one at a time.
  template <int kRows, int kSamples>
  static void dot_rows_tiled(const acc_t* x, int64_t N, const acc_t* w, int64_t R, int64_t K,
                             const acc_t* bias, acc_t* y) {
    const int64_t row_tiles = ceil_div(R, kRows), sample_tiles = ceil_div(N, kSamples);
    // Row tile major: one thread's consecutive items reuse the tile's weights from L1.
    at::parallel_for(0, row_tiles * sample_tiles, grain(kRows * kSamples * K),
                     [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r0 = (item / sample_tiles) * kRows, n0 = (item % sample_tiles) * kSamples;
        const int64_t rows = std::min<int64_t>(kRows, R - r0);
        const int samples = static_cast<int>(std::min<int64_t>(kSamples, N - n0));
        const acc_t* xs = x + n0 * K;
        acc_t* ys = y + n0 * R;
        if (rows == kRows) {
          with_count<kSamples>(samples, [&](auto count) {
            dot_tile<kRows, decltype(count)::value>(xs, w + r0 * K, K, bias ? bias + r0 : nullptr,
                                                    ys + r0, R);
          });
        } else {
          for (int64_t r = r0; r < r0 + rows; ++r)
            with_count<kSamples>(samples, [&](auto count) {
              dot_tile<1, decltype(count)::value>(xs, w + r * K, K, bias ? bias + r : nullptr,
                                                  ys + r, R);
            });
        }
      }
    });
  }

  // y [N, R] = x [N, K] w[R, K]^T (+ bias [R]).
  static void dot_rows(const acc_t* x, int64_t N, const acc_t* w, int64_t R, int64_t K,
                       const acc_t* bias, acc_t* y) {
    // 8 (batch 1) or 12 accumulators, plus the loaded vectors: AVX2's 16 registers.
    if (N == 1) return dot_rows_tiled<8, 1>(x, N, w, R, K, bias, y);
    if (N == 2) return dot_rows_tiled<4, 2>(x, N, w, R, K, bias, y);
    dot_rows_tiled<4, 3>(x, N, w, R, K, bias, y);
  }

  // ---- sum_rows -------------------------------------------------------------------------

  // kRows output rows x kStrips vectors of columns; u at its row m0, v and y at column k0.
  // u(m, r) = u[m * um + r * ur]. The last strip is `last` columns wide (< kLanes: masked
  // loads, zeros past them, and stores of those columns only).
  template <int kRows, int kStrips>
  static void sum_tile(const acc_t* u, int64_t um, int64_t ur, int64_t R, const acc_t* v,
                       int64_t K, acc_t* y, bool accumulate, int64_t last) {
    const bool partial = last < kLanes;
    auto masked = [&](const acc_t* p, int j) {
      return j == kStrips - 1 ? load_first(p, last) : Vec::loadu(p);
    };
    auto load = [&](const acc_t* p, int j) { return partial ? masked(p, j) : Vec::loadu(p); };
    Vec acc[kRows][kStrips];
    for (int m = 0; m < kRows; ++m)
      for (int j = 0; j < kStrips; ++j)
        acc[m][j] = accumulate ? load(y + m * K + j * kLanes, j) : Vec(acc_t(0));
    auto terms = [&](auto load_strip) {
      for (int64_t r = 0; r < R; ++r) {
        Vec vv[kStrips];
        for (int j = 0; j < kStrips; ++j) vv[j] = load_strip(v + r * K + j * kLanes, j);
        for (int m = 0; m < kRows; ++m) {
          const Vec um_r(u[m * um + r * ur]);
          for (int j = 0; j < kStrips; ++j) acc[m][j] = at::vec::fmadd(um_r, vv[j], acc[m][j]);
        }
      }
    };
    if (partial)
      terms(masked);
    else
      terms([](const acc_t* p, int) { return Vec::loadu(p); });
    for (int m = 0; m < kRows; ++m)
      for (int j = 0; j < kStrips; ++j) {
        if (partial && j == kStrips - 1)
          acc[m][j].store(y + m * K + j * kLanes, last);
        else
          acc[m][j].store(y + m * K + j * kLanes);
      }
  }

  // Tiles of kRows rows x kStrips vector strips of columns (fewer at the edges), the last
  // strip masked where K is not a multiple of the vector width. Strip tile major
  // (`strip_major`): a tile's strip of v, R x kStrips vectors, comes from memory once and
  // from cache for the row tiles after it; row tile major: y is written in order.
  template <int kRows, int kStrips>
  static void sum_rows_tiled(const acc_t* u, int64_t um, int64_t ur, int64_t M, int64_t R,
                             const acc_t* v, int64_t K, acc_t* y, bool accumulate,
                             bool strip_major) {
    const int64_t strips = ceil_div(K, kLanes);
    const int64_t row_tiles = ceil_div(M, kRows), strip_tiles = ceil_div(strips, kStrips);
    at::parallel_for(0, row_tiles * strip_tiles, grain(kRows * kStrips * kLanes * R),
                     [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = strip_major ? item / row_tiles : item % strip_tiles;
        const int64_t m0 = (strip_major ? item % row_tiles : item / strip_tiles) * kRows;
        const int64_t k0 = t * kStrips * kLanes;
        const int rows = static_cast<int>(std::min<int64_t>(kRows, M - m0));
        const int strips_here = static_cast<int>(std::min<int64_t>(kStrips, strips - t * kStrips));
        const int64_t last = std::min<int64_t>(kLanes, K - k0 - (strips_here - 1) * kLanes);
        with_count<kRows>(rows, [&](auto row_count) {
          with_count<kStrips>(strips_here, [&](auto count) {
            sum_tile<decltype(row_count)::value, decltype(count)::value>(
                u + m0 * um, um, ur, R, v + k0, K, y + m0 * K + k0, accumulate, last);
          });
        });
      }
    });
  }

  // y [M, K] (+)= u [M, R] v [R, K], with u(m, r) = u[m * um + r * ur] (um = R, ur = 1 for a
  // row-major u; um = 1, ur = M for the transpose of a row-major [R, M]).
  static void sum_rows(const acc_t* u, int64_t um, int64_t ur, int64_t M, int64_t R,
                       const acc_t* v, int64_t K, acc_t* y, bool accumulate) {
    if (M == 1) return sum_rows_tiled<1, 8>(u, um, ur, M, R, v, K, y, accumulate, false);
    if (M == 2) return sum_rows_tiled<2, 4>(u, um, ur, M, R, v, K, y, accumulate, false);
    // A transposed u is a weight gradient: R is the batch, each output a few terms, and the
    // stores of the many outputs take the time; in row order they are sequential.
    if (um == 1 && ur != 1)
      return sum_rows_tiled<3, 4>(u, um, ur, M, R, v, K, y, accumulate, false);
    // An input gradient (M the batch): rows in fours (batch 8 is two full tiles), strip
    // major once v is too large to stay in L2 between row tiles.
    sum_rows_tiled<4, 3>(u, um, ur, M, R, v, K, y, accumulate,
                         R * K * static_cast<int64_t>(sizeof(acc_t)) > kStripMajorBytes);
  }

  // db[r] (+)= sum_n u[n, r] over u [N, R].
  static void column_sums(const acc_t* u, int64_t N, int64_t R, acc_t* db, bool accumulate) {
    for (int64_t r = 0; r < R; ++r) {
      acc_t total = accumulate ? db[r] : acc_t(0);
      for (int64_t n = 0; n < N; ++n) total += u[n * R + r];
      db[r] = total;
    }
  }

  // ---- element-wise ---------------------------------------------------------------------

  // f(i, n) for the vectors [i, i + n) of count elements (a partial last vector).
  template <typename F>
  static void map(int64_t count, F&& f) {
    for (int64_t i = 0; i < count; i += kLanes) f(i, std::min<int64_t>(kLanes, count - i));
  }

  static Vec sigmoid(const Vec& v) { return Vec(1) / (Vec(1) + v.neg().exp()); }

  // s = gate(g), and optionally dg = ds * gate'(g), over count elements.
  static void gate(Gate kind, int64_t count, const acc_t* g, acc_t* s, const acc_t* ds, acc_t* dg) {
    map(count, [&](int64_t i, int64_t n) {
      const Vec gv = Vec::loadu(g + i, n);
      Vec sv, dgate;
      switch (kind) {
        case Gate::Sigmoid:
          sv = sigmoid(gv);
          dgate = sv * (Vec(1) - sv);
          break;
        case Gate::HardSigmoid:  // its derivative is 1/6 on the open interval, as in torch
          sv = at::vec::clamp(gv / Vec(6) + Vec(0.5), Vec(0), Vec(1));
          dgate = Vec::blendv(Vec(0), Vec(acc_t(1) / 6), (gv > Vec(-3)) & (gv < Vec(3)));
          break;
        case Gate::Tanh:
          sv = gv.tanh();
          dgate = Vec(1) - sv * sv;
          break;
        case Gate::ReLU:
          sv = at::vec::clamp_min(gv, Vec(0));
          dgate = Vec::blendv(Vec(0), Vec(1), gv > Vec(0));
          break;
      }
      sv.store(s + i, n);
      if (dg) (Vec::loadu(ds + i, n) * dgate).store(dg + i, n);
    });
  }

  // act(a) at one vector, and act'(a) into *dact unless dact is nullptr: the one switch
  // over the activations (DESIGN.md §1.3), for the MLP and the act tail's stream passes.
  static Vec activation_at(Activation kind, const Vec& av, Vec* dact) {
    switch (kind) {
      case Activation::ReLU:
        if (dact) *dact = Vec::blendv(Vec(0), Vec(1), av > Vec(0));
        return at::vec::clamp_min(av, Vec(0));
      case Activation::SiLU: {
        const Vec sig = sigmoid(av);
        if (dact) *dact = sig * (Vec(1) + av * (Vec(1) - sig));
        return av * sig;
      }
      case Activation::GELU: {
        const Vec cdf = Vec(0.5) * (Vec(1) + (av * Vec(acc_t(kSqrtHalf))).erf());
        if (dact) *dact = cdf + av * Vec(acc_t(kInvSqrt2Pi)) * (Vec(-0.5) * av * av).exp();
        return av * cdf;
      }
      case Activation::GELUTanh: {
        const Vec a2 = av * av;
        const Vec t = (Vec(acc_t(kSqrt2OverPi)) * (av + Vec(acc_t(kGeluTanhCubic)) * a2 * av)).tanh();
        if (dact) {
          const Vec inner_grad = Vec(acc_t(kSqrt2OverPi)) * (Vec(1) + Vec(acc_t(3 * kGeluTanhCubic)) * a2);
          *dact = Vec(0.5) * (Vec(1) + t) + Vec(0.5) * av * (Vec(1) - t * t) * inner_grad;
        }
        return Vec(0.5) * av * (Vec(1) + t);
      }
      case Activation::HardSwish:  // torch's backward: 0 below -3, a/3 + 1/2 up to 3, then 1
        if (dact)
          *dact = Vec::blendv(Vec::blendv(Vec(1), av / Vec(3) + Vec(0.5), av <= Vec(3)), Vec(0),
                              av < Vec(-3));
        return av * at::vec::clamp(av + Vec(3), Vec(0), Vec(6)) / Vec(6);
      case Activation::LeakyReLU: {  // torch: a where a > 0, else slope * a (NaN stays NaN)
        const auto positive = av > Vec(0);
        if (dact) *dact = Vec::blendv(Vec(acc_t(kLeakyReluSlope)), Vec(1), positive);
        return Vec::blendv(av * Vec(acc_t(kLeakyReluSlope)), av, positive);
      }
    }
    return av;  // not reached: the switch covers every Activation
  }

  // act(a) and act'(a) at one scalar, through the vector code (the same values).
  static acc_t activation_scalar(Activation kind, acc_t a, acc_t* dact) {
    Vec d;
    const Vec h = activation_at(kind, Vec(a), dact ? &d : nullptr);
    if (dact) *dact = first_lane(d);
    return first_lane(h);
  }
  static acc_t first_lane(const Vec& v) {
    acc_t lane;
    v.store(&lane, 1);
    return lane;
  }

  // h = act(a), and optionally da = dh * act'(a), over count elements.
  static void activation(Activation kind, int64_t count, const acc_t* a, acc_t* h, const acc_t* dh,
                         acc_t* da) {
    map(count, [&](int64_t i, int64_t n) {
      const Vec av = Vec::loadu(a + i, n);
      Vec dact;
      activation_at(kind, av, da ? &dact : nullptr).store(h + i, n);
      if (!da) return;
      const Vec dhv = Vec::loadu(dh + i, n);
      // ReLU's da selects dh, as torch's threshold_backward: 0 even for NaN dh.
      (kind == Activation::ReLU ? Vec::blendv(Vec(0), dhv, av > Vec(0)) : dhv * dact)
          .store(da + i, n);
    });
  }

 private:
  static constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

  // fn(std::integral_constant<int, c>) for the runtime count c in [1, kMax].
  template <int kMax, typename F>
  static void with_count(int count, F&& fn) {
    if constexpr (kMax > 1) {
      if (count < kMax) return with_count<kMax - 1>(count, fn);
    }
    fn(std::integral_constant<int, kMax>{});
  }
};

}  // namespace
}  // namespace se_kernels::cpu::SE_CPU_CAPABILITY
