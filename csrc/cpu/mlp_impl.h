// The excitation MLP on the [N, C] / [N, S] vectors, in the accumulation type (fp32, or
// fp64 for fp64). Included by kernels_impl.h, so it is compiled once per CPU capability.
//
// Two products cover the forward and the backward:
//   dot_rows   y[n, r] = b[r] + sum_k x[n, k] w[r, k]        the FCs (both operands along k)
//   sum_rows   y[m, k] (+)= sum_r u(m, r) v[r, k]            the input gradients, and with u
//                                                            read transposed, the weights'
// Each works on register tiles (several weight rows or columns times several samples), so
// a loaded vector feeds several FMAs and enough independent sums are in flight to hide the
// FMA latency: at batch 1 the weights stream at cache bandwidth, at batch 32 the tiles run
// near the FMA throughput. Every output element is one thread's sum in one fixed order
// (vector lanes over k then a fixed lane reduction, or r ascending), whatever the tile it
// falls in: results do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <functional>

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

  // ---- dot_rows -------------------------------------------------------------------------

  // kRows weight rows x kSamples samples; x and w at their first row, y at [n0, r0].
  template <int kRows, int kSamples>
  static void dot_tile(const acc_t* x, const acc_t* w, int64_t K, const acc_t* bias, acc_t* y,
                       int64_t ldy) {
    Vec acc[kSamples][kRows];
    for (auto& row : acc)
      for (auto& v : row) v = Vec(acc_t(0));
    const int64_t kv = K - K % kLanes;
    for (int64_t k = 0; k < kv; k += kLanes) {
      Vec wv[kRows];
      for (int r = 0; r < kRows; ++r) wv[r] = Vec::loadu(w + r * K + k);
      for (int n = 0; n < kSamples; ++n) {
        const Vec xv = Vec::loadu(x + n * K + k);
        for (int r = 0; r < kRows; ++r) acc[n][r] = at::vec::fmadd(wv[r], xv, acc[n][r]);
      }
    }
    for (int n = 0; n < kSamples; ++n)
      for (int r = 0; r < kRows; ++r) {
        acc_t total = at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), acc[n][r]);
        for (int64_t k = kv; k < K; ++k) total += x[n * K + k] * w[r * K + k];
        y[n * ldy + r] = bias ? total + bias[r] : total;
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
  // u(m, r) = u[m * um + r * ur].
  template <int kRows, int kStrips>
  static void sum_tile(const acc_t* u, int64_t um, int64_t ur, int64_t R, const acc_t* v,
                       int64_t K, acc_t* y, bool accumulate) {
    Vec acc[kRows][kStrips];
    for (int m = 0; m < kRows; ++m)
      for (int j = 0; j < kStrips; ++j)
        acc[m][j] = accumulate ? Vec::loadu(y + m * K + j * kLanes) : Vec(acc_t(0));
    for (int64_t r = 0; r < R; ++r) {
      Vec vv[kStrips];
      for (int j = 0; j < kStrips; ++j) vv[j] = Vec::loadu(v + r * K + j * kLanes);
      for (int m = 0; m < kRows; ++m) {
        const Vec um_r(u[m * um + r * ur]);
        for (int j = 0; j < kStrips; ++j) acc[m][j] = at::vec::fmadd(um_r, vv[j], acc[m][j]);
      }
    }
    for (int m = 0; m < kRows; ++m)
      for (int j = 0; j < kStrips; ++j) acc[m][j].store(y + m * K + j * kLanes);
  }

  // The columns past the last full vector, for rows [m0, m1).
  static void sum_tail(const acc_t* u, int64_t um, int64_t ur, int64_t R, const acc_t* v,
                       int64_t K, int64_t k0, int64_t m0, int64_t m1, acc_t* y, bool accumulate) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t k = k0; k < K; ++k) {
        acc_t total = accumulate ? y[m * K + k] : acc_t(0);
        for (int64_t r = 0; r < R; ++r) total += u[m * um + r * ur] * v[r * K + k];
        y[m * K + k] = total;
      }
  }

  template <int kRows, int kStrips>
  static void sum_rows_tiled(const acc_t* u, int64_t um, int64_t ur, int64_t M, int64_t R,
                             const acc_t* v, int64_t K, acc_t* y, bool accumulate) {
    const int64_t strips = K / kLanes;
    const int64_t row_tiles = ceil_div(M, kRows), strip_tiles = ceil_div(strips, kStrips);
    const int64_t kv = strips * kLanes;
    // One extra item per row tile for the columns past the last full vector.
    const int64_t per_row_tile = strip_tiles + (kv < K ? 1 : 0);
    at::parallel_for(0, row_tiles * per_row_tile, grain(kRows * kStrips * kLanes * R),
                     [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t m0 = (item / per_row_tile) * kRows, t = item % per_row_tile;
        const int64_t rows = std::min<int64_t>(kRows, M - m0);
        if (t == strip_tiles) {
          sum_tail(u, um, ur, R, v, K, kv, m0, m0 + rows, y, accumulate);
          continue;
        }
        const int64_t s0 = t * kStrips, k0 = s0 * kLanes;
        const int strips_here = static_cast<int>(std::min<int64_t>(kStrips, strips - s0));
        const int64_t row_step = rows == kRows ? kRows : 1;
        for (int64_t m = m0; m < m0 + rows; m += row_step)
          with_count<kStrips>(strips_here, [&](auto count) {
            constexpr int kCount = decltype(count)::value;
            if (rows == kRows)
              sum_tile<kRows, kCount>(u + m * um, um, ur, R, v + k0, K, y + m * K + k0, accumulate);
            else
              sum_tile<1, kCount>(u + m * um, um, ur, R, v + k0, K, y + m * K + k0, accumulate);
          });
      }
    });
  }

  // y [M, K] (+)= u [M, R] v [R, K], with u(m, r) = u[m * um + r * ur] (um = R, ur = 1 for a
  // row-major u; um = 1, ur = M for the transpose of a row-major [R, M]).
  static void sum_rows(const acc_t* u, int64_t um, int64_t ur, int64_t M, int64_t R,
                       const acc_t* v, int64_t K, acc_t* y, bool accumulate) {
    if (M == 1) return sum_rows_tiled<1, 8>(u, um, ur, M, R, v, K, y, accumulate);
    if (M == 2) return sum_rows_tiled<2, 4>(u, um, ur, M, R, v, K, y, accumulate);
    sum_rows_tiled<3, 4>(u, um, ur, M, R, v, K, y, accumulate);
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
      if (kind == Gate::Sigmoid) {
        sv = sigmoid(gv);
        dgate = sv * (Vec(1) - sv);
      } else {  // hardsigmoid; its derivative is 1/6 on the open interval, as in torch
        sv = at::vec::clamp(gv / Vec(6) + Vec(0.5), Vec(0), Vec(1));
        dgate = Vec::blendv(Vec(0), Vec(acc_t(1) / 6), (gv > Vec(-3)) & (gv < Vec(3)));
      }
      sv.store(s + i, n);
      if (dg) (Vec::loadu(ds + i, n) * dgate).store(dg + i, n);
    });
  }

  // h = act(a), and optionally da = dh * act'(a), over count elements.
  static void activation(Activation kind, int64_t count, const acc_t* a, acc_t* h, const acc_t* dh,
                         acc_t* da) {
    map(count, [&](int64_t i, int64_t n) {
      const Vec av = Vec::loadu(a + i, n);
      if (kind == Activation::ReLU) {
        at::vec::clamp_min(av, Vec(0)).store(h + i, n);
        if (da) Vec::blendv(Vec(0), Vec::loadu(dh + i, n), av > Vec(0)).store(da + i, n);
      } else {
        const Vec sig = sigmoid(av);
        (av * sig).store(h + i, n);
        if (da) (Vec::loadu(dh + i, n) * sig * (Vec(1) + av * (Vec(1) - sig))).store(da + i, n);
      }
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
