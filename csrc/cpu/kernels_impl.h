// The CPU passes, written once over ATen's Vectorized types. Included by exactly one
// source per CPU capability, which defines SE_CPU_CAPABILITY (the namespace of its table)
// and, for AVX2, the compiler flags that select ATen's 256-bit vector implementations.
//
// Every pass reads its inputs in their own layout (NCHW or channels-last), accumulates in
// fp32 (fp64 for fp64), and splits work so that results do not depend on the thread count.
// stream_impl.h builds the stream ops from the same passes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "kernels.h"
#include "mlp_impl.h"

#ifndef SE_CPU_CAPABILITY
#error "define SE_CPU_CAPABILITY before including kernels_impl.h"
#endif

namespace se_kernels::cpu::SE_CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Which lanes of a kWidth-element window (two vectors, lo and hi) a pass takes. A span of
// kWidth elements or more ends with a window that ends where the span does and overlaps
// the window before it, whose lanes are done: a 5x5 NCHW row then costs two windows, where
// a scalar loop over its last nine values cost as much as the rest of the row. The last
// window takes only the lanes from `first` on: a sum must not count the overlap twice, and
// a map stores only those lanes, so it stays right where its output is one of its inputs.
// (A reduction's own stores, the masked dy for dresidual, rewrite the overlap with the
// values it holds: they are recomputed from inputs the pass does not write.)
struct AllLanes {
  template <typename Vec>
  C10_ALWAYS_INLINE Vec operator()(int /*half*/, const Vec& v, const Vec& /*elsewhere*/) const {
    return v;
  }
};

template <typename acc_t>
struct LanesFrom {
  using Vec = Vectorized<acc_t>;
  Vec taken[2];  // all-ones in the lanes taken

  explicit LanesFrom(int64_t first) {
    const Vec from(static_cast<acc_t>(first));
    taken[0] = Vec::arange(acc_t(0), acc_t(1)) >= from;
    taken[1] = Vec::arange(static_cast<acc_t>(Vec::size()), acc_t(1)) >= from;
  }
  // v in the lanes taken, `elsewhere` in the others, of half h of the window.
  C10_ALWAYS_INLINE Vec operator()(int h, const Vec& v, const Vec& elsewhere) const {
    return Vec::blendv(elsewhere, v, taken[h]);
  }
};

// Loads and stores kWidth scalars as two vectors of the accumulation type, so fp16/bf16
// are widened once per load and each pass below is written once for every dtype.
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kWidth = 2 * Vec::size();
  static_assert(std::is_same_v<scalar_t, acc_t> || Vectorized<scalar_t>::size() == kWidth);

  static void load(const scalar_t* p, Vec& lo, Vec& hi) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      lo = Vec::loadu(p);
      hi = Vec::loadu(p + Vec::size());
    } else {
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    }
  }
  static void store(scalar_t* p, const Vec& lo, const Vec& hi) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      lo.store(p);
      hi.store(p + Vec::size());
    } else {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
    }
  }
  // Stores the lanes `keep` takes; the others keep what the memory holds.
  static void store(scalar_t* p, const Vec& lo, const Vec& hi, AllLanes) { store(p, lo, hi); }
  static void store(scalar_t* p, const Vec& lo, const Vec& hi, const LanesFrom<acc_t>& keep) {
    Vec old[2];
    load(p, old[0], old[1]);
    store(p, keep(0, lo, old[0]), keep(1, hi, old[1]));
  }
  // Vec::size() scalars as one vector (half a load above).
  static Vec load_one(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return Vec::loadu(p);
    } else {
      Vec v;
      at::vec::load_to_float<scalar_t>(p, v);
      return v;
    }
  }
};

// A per-channel [N, C] value as seen from a span of x: an NCHW row holds one channel (the
// value is broadcast); a channels-last row walks consecutive channels (the value is loaded).
template <typename acc_t, bool kPerLane>
struct ChannelValue {
  using Vec = Vectorized<acc_t>;
  const acc_t* p = nullptr;  // at the span's first channel; nullptr when a pass has no use for it

  explicit operator bool() const { return p != nullptr; }
  Vec lo(int64_t i) const { return kPerLane ? Vec::loadu(p + i) : Vec(p[0]); }
  Vec hi(int64_t i) const { return kPerLane ? Vec::loadu(p + i + Vec::size()) : Vec(p[0]); }
  acc_t at(int64_t i) const { return kPerLane ? p[i] : p[0]; }
};

template <typename acc_t>
acc_t nan_max(acc_t a, acc_t b) {  // torch.amax propagates NaN
  return (a > b || std::isnan(a)) ? a : b;
}
template <typename acc_t>
acc_t nan_min(acc_t a, acc_t b) {  // as torch.amin
  return (a < b || std::isnan(a)) ? a : b;
}

// Runs window(i, keep) over the kWidth-element windows of a span of `len` elements, the
// last one overlapping the one before where len is not a multiple of kWidth (keep says
// which lanes each takes), and scalar(i) over the elements of a span shorter than kWidth.
template <typename scalar_t, typename Window, typename Scalar>
C10_ALWAYS_INLINE void for_windows(int64_t len, Window&& window, Scalar&& scalar) {
  constexpr int64_t kWidth = Lanes<scalar_t>::kWidth;
  int64_t i = 0;
  for (; i + kWidth <= len; i += kWidth) window(i, AllLanes{});
  if (i == len) return;
  if (len >= kWidth) {
    window(len - kWidth, LanesFrom<at::opmath_type<scalar_t>>(i - (len - kWidth)));
    return;
  }
  for (; i < len; ++i) scalar(i);
}

// Calls fn(per_lane_tag, offset, length, channel_offset) for every dense span of x, in
// parallel. channel_offset indexes [N, C] vectors at the span's first element.
template <typename F>
void for_each_span(const Geometry& geo, F&& fn) {
  constexpr int64_t kGrainElements = at::internal::GRAIN_SIZE;  // as ATen's element-wise ops
  if (!geo.channels_last) {
    at::parallel_for(0, geo.N * geo.C, std::max<int64_t>(1, kGrainElements / geo.P),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r)
                         fn(std::false_type{}, r * geo.P, geo.P, r);
                     });
  } else {
    at::parallel_for(0, geo.N * geo.P, std::max<int64_t>(1, kGrainElements / geo.C),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r)
                         fn(std::true_type{}, r * geo.C, geo.C, (r / geo.P) * geo.C);
                     });
  }
}

// Reduces Terms over the spatial positions of every (n, c), returning [Terms::kQ, N, C].
//
// Work items are (rows or channel blocks) x spatial pieces; pieces are combined in a fixed
// order afterwards. The number of pieces depends only on the shape, so the result is the
// same for any number of threads, and small batches still spread over every thread.
template <typename scalar_t, typename Terms>
at::Tensor reduce_spatial(const Geometry& geo, const Terms& terms, const at::TensorOptions& acc) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  constexpr int kQ = Terms::kQ;
  constexpr int64_t kWidth = L::kWidth;
  constexpr int64_t kMinItems = 64;         // enough to feed any CPU we expect
  constexpr int64_t kMinPieceElems = 2048;  // below this a piece costs more than it saves
  constexpr int64_t kBlockC = 128;          // channels per channels-last item (acc in L1)

  const int64_t N = geo.N, C = geo.C, P = geo.P;
  const int64_t blocks = geo.channels_last ? ceil_div(C, kBlockC) : C;
  const int64_t elems_per_pixel = geo.channels_last ? std::min(C, kBlockC) : 1;
  const int64_t pieces =
      std::clamp(ceil_div(kMinItems, std::max<int64_t>(1, N * blocks)), int64_t{1},
                 std::max<int64_t>(1, P * elems_per_pixel / kMinPieceElems));
  const int64_t piece_len = ceil_div(P, pieces);

  // partial[q][n][c][piece], indexed by q, the [N, C] index n * C + c, and the piece
  auto partial = at::empty({kQ, N, C, pieces}, acc);
  acc_t* part = partial.data_ptr<acc_t>();
  auto part_at = [&](int q, int64_t nc, int64_t k) -> acc_t& {
    return part[(q * N * C + nc) * pieces + k];
  };

  // Folds the window at `off` into acc, in the lanes `keep` takes.
  auto fold_window = [&](auto per_lane, Vec (&acc)[kQ][2], int64_t off, int64_t chan,
                         const auto& keep) {
    constexpr bool kPerLane = decltype(per_lane)::value;
    if constexpr (std::is_same_v<std::decay_t<decltype(keep)>, AllLanes>) {
      terms.template fold<kPerLane>(acc, off, chan);
    } else {
      Vec own[kQ][2];  // the window's own terms, then those of the lanes taken
      for (int q = 0; q < kQ; ++q) own[q][0] = own[q][1] = Vec(Terms::init(q));
      terms.template fold<kPerLane>(own, off, chan);
      for (int q = 0; q < kQ; ++q)
        for (int h = 0; h < 2; ++h)
          acc[q][h] = Terms::combine(q, acc[q][h], keep(h, own[q][h], Vec(Terms::init(q))));
    }
  };

  const int64_t items = N * blocks * pieces;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, piece_len * elems_per_pixel));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      // Small rows leave no room for integer divisions: one piece needs none, and an NCHW
      // row's [N, C] index is its block index.
      const int64_t k = pieces == 1 ? 0 : item % pieces;
      const int64_t nb = pieces == 1 ? item : item / pieces;
      const int64_t p0 = k * piece_len, p1 = std::min(P, p0 + piece_len);
      if (!geo.channels_last) {
        // One NCHW row: vector lanes accumulate, then fold into one value per quantity.
        // Two sets of accumulators alternate so consecutive adds do not wait on each other.
        const int64_t row = nb, base = row * P;
        Vec acc[2][kQ][2];
        for (auto& set : acc)
          for (int q = 0; q < kQ; ++q) set[q][0] = set[q][1] = Vec(Terms::init(q));
        int64_t p = p0;
        for (; p + 2 * kWidth <= p1; p += 2 * kWidth) {
          terms.template fold<false>(acc[0], base + p, row);
          terms.template fold<false>(acc[1], base + p + kWidth, row);
        }
        if (p + kWidth <= p1) {
          terms.template fold<false>(acc[0], base + p, row);
          p += kWidth;
        }
        if (p < p1 && p1 - p0 >= kWidth) {  // the last window, within this piece
          fold_window(std::false_type{}, acc[1], base + p1 - kWidth, row,
                      LanesFrom<acc_t>(p - (p1 - kWidth)));
          p = p1;
        }
        acc_t total[kQ];
        for (int q = 0; q < kQ; ++q)
          total[q] = Terms::reduce_lanes(q, Terms::combine(q, acc[0][q][0], acc[1][q][0]),
                                         Terms::combine(q, acc[0][q][1], acc[1][q][1]));
        for (; p < p1; ++p) terms.fold_scalar(total, base + p, row);
        for (int q = 0; q < kQ; ++q) part_at(q, row, k) = total[q];
      } else {
        // A channels-last block: per-channel accumulators, walked pixel by pixel.
        const int64_t n = nb / blocks, b = nb % blocks;
        const int64_t c0 = b * kBlockC, c1 = std::min(C, c0 + kBlockC), width = c1 - c0;
        acc_t total[kQ][kBlockC];
        for (int q = 0; q < kQ; ++q) std::fill_n(total[q], width, Terms::init(q));
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t base = (n * P + p) * C + c0;
          for_windows<scalar_t>(
              width,
              [&](int64_t i, const auto& keep) {
                Vec acc[kQ][2];
                for (int q = 0; q < kQ; ++q) {
                  acc[q][0] = Vec::loadu(total[q] + i);
                  acc[q][1] = Vec::loadu(total[q] + i + Vec::size());
                }
                fold_window(std::true_type{}, acc, base + i, n * C + c0 + i, keep);
                for (int q = 0; q < kQ; ++q) {
                  acc[q][0].store(total[q] + i);
                  acc[q][1].store(total[q] + i + Vec::size());
                }
              },
              [&](int64_t i) {
                acc_t one[kQ];
                for (int q = 0; q < kQ; ++q) one[q] = total[q][i];
                terms.fold_scalar(one, base + i, n * C + c0 + i);
                for (int q = 0; q < kQ; ++q) total[q][i] = one[q];
              });
        }
        for (int q = 0; q < kQ; ++q)
          for (int64_t i = 0; i < width; ++i) part_at(q, n * C + c0 + i, k) = total[q][i];
      }
    }
  });
  if (pieces == 1) return partial.view({kQ, N, C});

  auto result = at::empty({kQ, N, C}, acc);
  acc_t* res = result.data_ptr<acc_t>();
  at::parallel_for(0, N * C, std::max<int64_t>(1, at::internal::GRAIN_SIZE / pieces),
                   [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc)
      for (int q = 0; q < kQ; ++q) {
        acc_t v = Terms::init(q);
        for (int64_t k = 0; k < pieces; ++k) v = Terms::combine(q, v, part_at(q, nc, k));
        res[q * N * C + nc] = v;
      }
  });
  return result;
}

// Terms folded by reduce_spatial. fold<kPerLane> takes kWidth elements at `off`, whose
// channel is `chan` (NCHW: one channel for all lanes) or starts at `chan` (channels-last).

// Statistics of x: [0] = the sum and, each when its flag is set, the sum of squares, the
// max and the min, in that order.
template <typename scalar_t, bool kSquares, bool kMax, bool kMin>
struct PoolTerms {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  static constexpr int kQ = 1 + kSquares + kMax + kMin;
  static constexpr int kSquaresQ = 1, kMaxQ = 1 + kSquares, kMinQ = kMaxQ + kMax;
  const scalar_t* x;

  enum class Kind { Sum, Max, Min };
  static constexpr Kind kind(int q) {
    return kMax && q == kMaxQ ? Kind::Max : kMin && q == kMinQ ? Kind::Min : Kind::Sum;
  }
  static acc_t init(int q) {
    switch (kind(q)) {
      case Kind::Sum: return acc_t(0);
      case Kind::Max: return -std::numeric_limits<acc_t>::infinity();
      case Kind::Min: return std::numeric_limits<acc_t>::infinity();
    }
    return acc_t(0);
  }
  static acc_t combine(int q, acc_t a, acc_t b) {
    switch (kind(q)) {
      case Kind::Sum: return a + b;
      case Kind::Max: return nan_max(a, b);
      case Kind::Min: return nan_min(a, b);
    }
    return a;
  }
  static Vec combine(int q, const Vec& a, const Vec& b) {
    switch (kind(q)) {
      case Kind::Sum: return a + b;
      case Kind::Max: return at::vec::maximum(a, b);  // NaN-propagating, as nan_max
      case Kind::Min: return at::vec::minimum(a, b);
    }
    return a;
  }
  static acc_t reduce_lanes(int q, const Vec& lo, const Vec& hi) {
    switch (kind(q)) {
      case Kind::Sum: return at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), lo + hi);
      case Kind::Max:
        return at::vec::vec_reduce_all<acc_t>(
            [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, at::vec::maximum(lo, hi));
      case Kind::Min:
        return at::vec::vec_reduce_all<acc_t>(
            [](const Vec& a, const Vec& b) { return at::vec::minimum(a, b); }, at::vec::minimum(lo, hi));
    }
    return acc_t(0);
  }

  template <bool kPerLane>
  void fold(Vec (&acc)[kQ][2], int64_t off, int64_t /*chan*/) const {
    Vec v[2];
    L::load(x + off, v[0], v[1]);
    for (int h = 0; h < 2; ++h) {
      acc[0][h] = acc[0][h] + v[h];
      if constexpr (kSquares) acc[kSquaresQ][h] = at::vec::fmadd(v[h], v[h], acc[kSquaresQ][h]);
      if constexpr (kMax) acc[kMaxQ][h] = at::vec::maximum(acc[kMaxQ][h], v[h]);
      if constexpr (kMin) acc[kMinQ][h] = at::vec::minimum(acc[kMinQ][h], v[h]);
    }
  }
  void fold_scalar(acc_t (&acc)[kQ], int64_t off, int64_t /*chan*/) const {
    const acc_t v = static_cast<acc_t>(x[off]);
    acc[0] += v;
    if constexpr (kSquares) acc[kSquaresQ] += v * v;
    if constexpr (kMax) acc[kMaxQ] = nan_max(acc[kMaxQ], v);
    if constexpr (kMin) acc[kMinQ] = nan_min(acc[kMinQ], v);
  }
};

// The plain sums of reduce_spatial's quantities.
template <typename scalar_t>
struct SumQuantities {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static acc_t init(int) { return acc_t(0); }
  static acc_t combine(int, acc_t a, acc_t b) { return a + b; }
  static Vec combine(int, const Vec& a, const Vec& b) { return a + b; }
  static acc_t reduce_lanes(int, const Vec& lo, const Vec& hi) {
    return at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), lo + hi);
  }
};

// Backward reduction: [0] = sum of dy * x and, each when its flag is set, how many x equal
// the channel's peak, and the sum of dy, in that order. dy = grad_out, masked by out > 0
// when the output went through a ReLU; it is also stored to dresidual when one is given.
template <typename scalar_t, bool kCount, bool kSumDy = false>
struct GradTerms : SumQuantities<scalar_t> {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  static constexpr int kQ = 1 + kCount + kSumDy;
  static constexpr int kCountQ = 1, kSumDyQ = 1 + kCount;
  const scalar_t* grad_out;
  const scalar_t* out;  // nullptr: no output ReLU
  const scalar_t* x;
  const acc_t* peak;    // read with kCount
  scalar_t* dresidual = nullptr;

  template <bool kPerLane>
  void fold(Vec (&acc)[kQ][2], int64_t off, int64_t chan) const {
    Vec dy[2], xv[2];
    L::load(grad_out + off, dy[0], dy[1]);
    L::load(x + off, xv[0], xv[1]);
    if (out) {
      Vec o[2];
      L::load(out + off, o[0], o[1]);
      for (int h = 0; h < 2; ++h) dy[h] = Vec::blendv(Vec(0), dy[h], o[h] > Vec(0));
    }
    if (dresidual) L::store(dresidual + off, dy[0], dy[1]);
    for (int h = 0; h < 2; ++h) acc[0][h] = at::vec::fmadd(dy[h], xv[h], acc[0][h]);
    if constexpr (kCount) {
      const ChannelValue<acc_t, kPerLane> m{peak + chan};
      acc[kCountQ][0] = acc[kCountQ][0] + Vec::blendv(Vec(0), Vec(1), xv[0] == m.lo(0));
      acc[kCountQ][1] = acc[kCountQ][1] + Vec::blendv(Vec(0), Vec(1), xv[1] == m.hi(0));
    }
    if constexpr (kSumDy) {
      for (int h = 0; h < 2; ++h) acc[kSumDyQ][h] = acc[kSumDyQ][h] + dy[h];
    }
  }
  void fold_scalar(acc_t (&acc)[kQ], int64_t off, int64_t chan) const {
    acc_t dy = static_cast<acc_t>(grad_out[off]);
    if (out && !(static_cast<acc_t>(out[off]) > 0)) dy = 0;
    if (dresidual) dresidual[off] = static_cast<scalar_t>(dy);
    const acc_t xv = static_cast<acc_t>(x[off]);
    acc[0] += dy * xv;
    if constexpr (kCount) {
      if (xv == peak[chan]) acc[kCountQ] += 1;
    }
    if constexpr (kSumDy) acc[kSumDyQ] += dy;
  }
};

// out = out_act(scale * x + shift + residual) over one span. Inlined into the pass: a 7x7
// NCHW row is a few vectors, and a call per row cost as much as its arithmetic.
template <typename scalar_t, bool kPerLane>
C10_ALWAYS_INLINE void scale_span(const scalar_t* x, const scalar_t* residual, scalar_t* out,
                                  int64_t len, ChannelValue<at::opmath_type<scalar_t>, kPerLane> scale,
                                  ChannelValue<at::opmath_type<scalar_t>, kPerLane> shift,
                                  bool relu) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  for_windows<scalar_t>(
      len,
      [&](int64_t i, const auto& keep) {
        Vec y[2];
        L::load(x + i, y[0], y[1]);
        y[0] = y[0] * scale.lo(i);
        y[1] = y[1] * scale.hi(i);
        if (shift) {
          y[0] = y[0] + shift.lo(i);
          y[1] = y[1] + shift.hi(i);
        }
        if (residual) {
          Vec r[2];
          L::load(residual + i, r[0], r[1]);
          y[0] = y[0] + r[0];
          y[1] = y[1] + r[1];
        }
        if (relu) {  // maximum() keeps NaN, as torch.relu does
          y[0] = at::vec::maximum(y[0], Vec(0));
          y[1] = at::vec::maximum(y[1], Vec(0));
        }
        L::store(out + i, y[0], y[1], keep);
      },
      [&](int64_t i) {
        acc_t y = static_cast<acc_t>(x[i]) * scale.at(i);
        if (shift) y += shift.at(i);
        if (residual) y += static_cast<acc_t>(residual[i]);
        if (relu && y < 0) y = 0;
        out[i] = static_cast<scalar_t>(y);
      });
}

// The scale pass over all of x: out = out_act(scale * x + shift + residual), scale and
// shift [N, C] (shift and residual nullptr when absent).
template <typename scalar_t>
void scale_pass(const Geometry& geo, const scalar_t* x, const at::opmath_type<scalar_t>* scale,
                const at::opmath_type<scalar_t>* shift, const scalar_t* residual, scalar_t* out,
                bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_span(geo, [&](auto per_lane, int64_t off, int64_t len, int64_t chan) {
    constexpr bool kPerLane = decltype(per_lane)::value;
    using Chan = ChannelValue<acc_t, kPerLane>;
    scale_span<scalar_t, kPerLane>(x + off, residual ? residual + off : nullptr, out + off, len,
                                   Chan{scale + chan}, Chan{shift ? shift + chan : nullptr}, relu);
  });
}

// The per-channel coefficients of the gradient pass, each [N, C] or nullptr when absent
// (peak and peak_shift go together).
template <typename acc_t>
struct GradInputCoefficients {
  const acc_t* dy_scale;
  const acc_t* x_scale;
  const acc_t* shift;
  const acc_t* peak;
  const acc_t* peak_shift;
};

// dx = dy_scale * dy + x_scale * x + shift + [x == peak] * peak_shift, and dresidual = dy,
// over one span.
template <typename scalar_t, bool kPerLane>
struct GradInputSpan {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  using Chan = ChannelValue<acc_t, kPerLane>;
  const scalar_t* grad_out;
  const scalar_t* out;  // nullptr: no output ReLU
  const scalar_t* x;    // read only with x_scale or peak
  scalar_t* dx;
  scalar_t* dresidual;  // nullptr: not wanted
  Chan dy_scale, x_scale, shift, peak, peak_shift;

  void operator()(int64_t len) const {
    for_windows<scalar_t>(
        len,
        [&](int64_t i, const auto& keep) {
          Vec dy[2], res[2], xv[2];
          L::load(grad_out + i, dy[0], dy[1]);
          if (out) {
            Vec o[2];
            L::load(out + i, o[0], o[1]);
            for (int h = 0; h < 2; ++h) dy[h] = Vec::blendv(Vec(0), dy[h], o[h] > Vec(0));
          }
          res[0] = dy[0] * dy_scale.lo(i);
          res[1] = dy[1] * dy_scale.hi(i);
          if (x_scale || peak) L::load(x + i, xv[0], xv[1]);
          if (x_scale) {
            res[0] = res[0] + x_scale.lo(i) * xv[0];
            res[1] = res[1] + x_scale.hi(i) * xv[1];
          }
          if (shift) {
            res[0] = res[0] + shift.lo(i);
            res[1] = res[1] + shift.hi(i);
          }
          if (peak) {
            res[0] = res[0] + Vec::blendv(Vec(0), peak_shift.lo(i), xv[0] == peak.lo(i));
            res[1] = res[1] + Vec::blendv(Vec(0), peak_shift.hi(i), xv[1] == peak.hi(i));
          }
          L::store(dx + i, res[0], res[1], keep);
          if (dresidual) L::store(dresidual + i, dy[0], dy[1], keep);
        },
        [&](int64_t i) {
          acc_t dy = static_cast<acc_t>(grad_out[i]);
          if (out && !(static_cast<acc_t>(out[i]) > 0)) dy = 0;
          acc_t v = dy * dy_scale.at(i);
          if (x_scale) v += x_scale.at(i) * static_cast<acc_t>(x[i]);
          if (shift) v += shift.at(i);
          if (peak && static_cast<acc_t>(x[i]) == peak.at(i)) v += peak_shift.at(i);
          dx[i] = static_cast<scalar_t>(v);
          if (dresidual) dresidual[i] = static_cast<scalar_t>(dy);
        });
  }
};

// The gradient pass over all of x (out, dresidual nullptr when absent).
template <typename scalar_t>
void grad_input_pass(const Geometry& geo, const scalar_t* grad_out, const scalar_t* out,
                     const scalar_t* x, const GradInputCoefficients<at::opmath_type<scalar_t>>& k,
                     scalar_t* dx, scalar_t* dresidual) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_span(geo, [&](auto per_lane, int64_t off, int64_t len, int64_t chan) {
    constexpr bool kPerLane = decltype(per_lane)::value;
    using Chan = ChannelValue<acc_t, kPerLane>;
    auto at_chan = [&](const acc_t* v) { return Chan{v ? v + chan : nullptr}; };
    GradInputSpan<scalar_t, kPerLane>{grad_out + off, out ? out + off : nullptr, x + off, dx + off,
                                      dresidual ? dresidual + off : nullptr, at_chan(k.dy_scale),
                                      at_chan(k.x_scale), at_chan(k.shift), at_chan(k.peak),
                                      at_chan(k.peak_shift)}(len);
  });
}

// ---- the act tail's passes (DESIGN.md §1.5) --------------------------------------------
// Each reads x through the prologue u = in_scale * x + in_shift, v = act(u), d = act'(u),
// in the accumulation type; in_scale and in_shift are [N, C] here, read like any
// per-channel value.

// [0] = sum of v.
template <typename scalar_t>
struct ActTerms : SumQuantities<scalar_t> {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  using M = Mlp<acc_t>;
  static constexpr int kQ = 1;
  const scalar_t* x;
  const acc_t* in_scale;
  const acc_t* in_shift;
  Activation kind;

  template <bool kPerLane>
  void fold(Vec (&acc)[kQ][2], int64_t off, int64_t chan) const {
    const ChannelValue<acc_t, kPerLane> a{in_scale + chan}, b{in_shift + chan};
    Vec xv[2];
    L::load(x + off, xv[0], xv[1]);
    acc[0][0] = acc[0][0] + M::activation_at(kind, at::vec::fmadd(xv[0], a.lo(0), b.lo(0)), nullptr);
    acc[0][1] = acc[0][1] + M::activation_at(kind, at::vec::fmadd(xv[1], a.hi(0), b.hi(0)), nullptr);
  }
  void fold_scalar(acc_t (&acc)[kQ], int64_t off, int64_t chan) const {
    const acc_t u = static_cast<acc_t>(x[off]) * in_scale[chan] + in_shift[chan];
    acc[0] += M::activation_scalar(kind, u, nullptr);
  }
};

// [0] = sum of dy * v and, with kStatistics, the sums of dy * d, dy * d * x, d and d * x.
template <typename scalar_t, bool kStatistics>
struct ActGradTerms : SumQuantities<scalar_t> {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  using M = Mlp<acc_t>;
  static constexpr int kQ = kStatistics ? 5 : 1;
  static constexpr int kDyD = 1, kDyDX = 2, kD = 3, kDX = 4;
  const scalar_t* grad_out;
  const scalar_t* x;
  const acc_t* in_scale;
  const acc_t* in_shift;
  Activation kind;

  template <bool kPerLane>
  void fold(Vec (&acc)[kQ][2], int64_t off, int64_t chan) const {
    const ChannelValue<acc_t, kPerLane> a{in_scale + chan}, b{in_shift + chan};
    Vec dy[2], xv[2];
    L::load(grad_out + off, dy[0], dy[1]);
    L::load(x + off, xv[0], xv[1]);
    for (int h = 0; h < 2; ++h) {
      const Vec u = at::vec::fmadd(xv[h], h ? a.hi(0) : a.lo(0), h ? b.hi(0) : b.lo(0));
      Vec d;
      const Vec v = M::activation_at(kind, u, kStatistics ? &d : nullptr);
      acc[0][h] = at::vec::fmadd(dy[h], v, acc[0][h]);
      if constexpr (kStatistics) {
        const Vec dyd = dy[h] * d;
        acc[kDyD][h] = acc[kDyD][h] + dyd;
        acc[kDyDX][h] = at::vec::fmadd(dyd, xv[h], acc[kDyDX][h]);
        acc[kD][h] = acc[kD][h] + d;
        acc[kDX][h] = at::vec::fmadd(d, xv[h], acc[kDX][h]);
      }
    }
  }
  void fold_scalar(acc_t (&acc)[kQ], int64_t off, int64_t chan) const {
    const acc_t dy = static_cast<acc_t>(grad_out[off]), xv = static_cast<acc_t>(x[off]);
    acc_t d;
    const acc_t v = M::activation_scalar(kind, xv * in_scale[chan] + in_shift[chan],
                                         kStatistics ? &d : nullptr);
    acc[0] += dy * v;
    if constexpr (kStatistics) {
      acc[kDyD] += dy * d;
      acc[kDyDX] += dy * d * xv;
      acc[kD] += d;
      acc[kDX] += d * xv;
    }
  }
};

// The per-channel [N, C] values of the act tail's map passes (nullptr where absent).
template <typename acc_t>
struct ActCoefficients {
  const acc_t* in_scale;
  const acc_t* in_shift;
  const acc_t* scale;      // forward: out = scale * v; backward: dy_scale
  const acc_t* act_shift;  // backward: dx = d * (dy_scale * dy + act_shift) + x_scale * x + shift
  const acc_t* x_scale;
  const acc_t* shift;
};

// Forward (grad_out nullptr): out = scale * v. Backward: the dx above. One span.
template <typename scalar_t, bool kPerLane>
struct ActMapSpan {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  using M = Mlp<acc_t>;
  using Chan = ChannelValue<acc_t, kPerLane>;
  const scalar_t* grad_out;
  const scalar_t* x;
  scalar_t* out;
  Activation kind;
  Chan a, b, scale, act_shift, x_scale, shift;

  void operator()(int64_t len) const {
    for_windows<scalar_t>(
        len,
        [&](int64_t i, const auto& keep) {
          Vec xv[2], dy[2], res[2];
          L::load(x + i, xv[0], xv[1]);
          if (grad_out) L::load(grad_out + i, dy[0], dy[1]);
          for (int h = 0; h < 2; ++h) {
            const int64_t j = i + h * Vec::size();
            const Vec u = at::vec::fmadd(xv[h], a.lo(j), b.lo(j));
            if (!grad_out) {
              res[h] = M::activation_at(kind, u, nullptr) * scale.lo(j);
              continue;
            }
            Vec d;
            M::activation_at(kind, u, &d);
            res[h] = d * at::vec::fmadd(dy[h], scale.lo(j), act_shift.lo(j));
            if (x_scale) res[h] = at::vec::fmadd(x_scale.lo(j), xv[h], res[h]);
            if (shift) res[h] = res[h] + shift.lo(j);
          }
          L::store(out + i, res[0], res[1], keep);
        },
        [&](int64_t i) {
          const acc_t xv = static_cast<acc_t>(x[i]);
          const acc_t u = xv * a.at(i) + b.at(i);
          acc_t v;
          if (!grad_out) {
            v = M::activation_scalar(kind, u, nullptr) * scale.at(i);
          } else {
            acc_t d;
            M::activation_scalar(kind, u, &d);
            v = d * (static_cast<acc_t>(grad_out[i]) * scale.at(i) + act_shift.at(i));
            if (x_scale) v += x_scale.at(i) * xv;
            if (shift) v += shift.at(i);
          }
          out[i] = static_cast<scalar_t>(v);
        });
  }
};

// The act tail's map pass over all of x (grad_out nullptr: the forward's).
template <typename scalar_t>
void act_map_pass(const Geometry& geo, Activation kind, const scalar_t* grad_out, const scalar_t* x,
                  const ActCoefficients<at::opmath_type<scalar_t>>& k, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_span(geo, [&](auto per_lane, int64_t off, int64_t len, int64_t chan) {
    constexpr bool kPerLane = decltype(per_lane)::value;
    using Chan = ChannelValue<acc_t, kPerLane>;
    auto at_chan = [&](const acc_t* v) { return Chan{v ? v + chan : nullptr}; };
    ActMapSpan<scalar_t, kPerLane>{grad_out ? grad_out + off : nullptr, x + off, out + off, kind,
                                   at_chan(k.in_scale), at_chan(k.in_shift), at_chan(k.scale),
                                   at_chan(k.act_shift), at_chan(k.x_scale), at_chan(k.shift)}(len);
  });
}

// Squeeze: z = avg, max or their mean, from one pass over x; zmax = the max (max pools).
template <typename scalar_t>
void squeeze(const Geometry& geo, Pool pool, const scalar_t* x, at::opmath_type<scalar_t>* z,
             at::opmath_type<scalar_t>* zmax) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = geo.N, C = geo.C;
  const auto acc = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t inv_p = acc_t(1) / static_cast<acc_t>(geo.P);
  const PoolWeights w = pool_weights(pool);
  if (w.max != 0) {
    const at::Tensor sums = reduce_spatial<scalar_t>(geo, PoolTerms<scalar_t, false, true, false>{x}, acc);
    const acc_t* sum = sums.const_data_ptr<acc_t>();
    const acc_t* max = sum + N * C;
    const acc_t w_avg = static_cast<acc_t>(w.avg), w_max = static_cast<acc_t>(w.max);
    for (int64_t i = 0; i < N * C; ++i) {
      zmax[i] = max[i];
      z[i] = w_avg != 0 ? w_avg * (sum[i] * inv_p) + w_max * max[i] : max[i];
    }
  } else {
    const at::Tensor sums = reduce_spatial<scalar_t>(geo, PoolTerms<scalar_t, false, false, false>{x}, acc);
    const acc_t* sum = sums.const_data_ptr<acc_t>();
    for (int64_t i = 0; i < N * C; ++i) z[i] = sum[i] * inv_p;
  }
}

template <typename scalar_t>
void forward_group(const ForwardArgs& p) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = Mlp<acc_t>;
  const Geometry& geo = p.geo;
  const int64_t N = geo.N, C = geo.C, S = p.S;
  const auto* x = static_cast<const scalar_t*>(p.x);
  auto* z = static_cast<acc_t*>(p.z);
  auto* zmax = static_cast<acc_t*>(p.zmax);

  squeeze<scalar_t>(geo, p.opt.pool, x, z, zmax);

  // Excite: a = W1 z + b1, h = act(a), g = W2 h + b2, s = gate(g).
  auto* a = static_cast<acc_t*>(p.a);
  auto* g = static_cast<acc_t*>(p.g);
  std::vector<acc_t> h(N * S), s(N * C);
  const auto* w1 = static_cast<const acc_t*>(p.w1);
  const auto* w2 = static_cast<const acc_t*>(p.w2);
  M::dot_rows(z, N, w1, S, C, static_cast<const acc_t*>(p.b1), a);
  M::activation(p.opt.activation, N * S, a, h.data(), nullptr, nullptr);
  M::dot_rows(h.data(), N, w2, C, S, static_cast<const acc_t*>(p.b2), g);
  M::gate(p.opt.gate, N * C, g, s.data(), nullptr, nullptr);

  // Scale: out = out_act(s * x + residual).
  scale_pass<scalar_t>(geo, x, s.data(), nullptr, static_cast<const scalar_t*>(p.residual),
                       static_cast<scalar_t*>(p.out), p.opt.out_relu());
}

// The backward of SE around any excitation: ds = sum_p dy * x (and the max positions'
// count) from one pass over grad_out and x; excite(ds, s, dz) writes s and dz, the
// excitation's backward; dz reaches x through the pooling; one more pass writes dx and
// dresidual. The fused op and the linear forms' backward differ only in excite.
template <typename scalar_t, typename Excite>
void backward_through(const Geometry& geo, Pool pool, const scalar_t* grad_out,
                      const scalar_t* out, const scalar_t* x, const at::opmath_type<scalar_t>* zmax,
                      scalar_t* dx, scalar_t* dresidual, Excite&& excite) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t NC = geo.N * geo.C;
  const auto acc = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);

  const at::Tensor sums =
      zmax ? reduce_spatial<scalar_t>(geo, GradTerms<scalar_t, true>{{}, grad_out, out, x, zmax}, acc)
           : reduce_spatial<scalar_t>(geo, GradTerms<scalar_t, false>{{}, grad_out, out, x, zmax}, acc);
  const acc_t* ds = sums.const_data_ptr<acc_t>();
  const acc_t* count = zmax ? ds + NC : nullptr;

  std::vector<acc_t> s(NC), dz(NC);
  excite(ds, s.data(), dz.data());

  // dz reaches x through the pooling: dz / P everywhere (avg), dz / count at the max.
  std::vector<acc_t> dx_avg, dx_max;
  const acc_t avg_share = static_cast<acc_t>(pool_weights(pool).avg);
  const acc_t max_share = static_cast<acc_t>(pool_weights(pool).max);
  if (avg_share != 0) {
    dx_avg.resize(NC);
    const acc_t scale = avg_share / static_cast<acc_t>(geo.P);
    for (int64_t i = 0; i < NC; ++i) dx_avg[i] = dz[i] * scale;
  }
  if (max_share != 0) {
    dx_max.resize(NC);
    for (int64_t i = 0; i < NC; ++i) dx_max[i] = dz[i] * max_share / count[i];
  }

  // dx = dy * s + dx_avg + [x == zmax] * dx_max, and dresidual = dy, in one pass.
  const bool max_pool = !dx_max.empty();
  grad_input_pass<scalar_t>(geo, grad_out, out, x,
                            {s.data(), nullptr, dx_avg.empty() ? nullptr : dx_avg.data(),
                             max_pool ? zmax : nullptr, max_pool ? dx_max.data() : nullptr},
                            dx, dresidual);
}

template <typename scalar_t>
void backward_group(const BackwardArgs& p) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = Mlp<acc_t>;
  const int64_t N = p.geo.N, C = p.geo.C, S = p.S;
  // The MLP backward: dg = ds * gate'(g); dW2 += dg^T h; dh = dg W2; da = dh * act'(a);
  // dW1 += da^T z; dz = da W1.
  auto excite = [&](const acc_t* ds, acc_t* s, acc_t* dz) {
    const auto* a = static_cast<const acc_t*>(p.a);
    const auto* z = static_cast<const acc_t*>(p.z);
    std::vector<acc_t> dg(N * C), h(N * S), dh(N * S), da(N * S);
    M::gate(p.opt.gate, N * C, static_cast<const acc_t*>(p.g), s, ds, dg.data());
    M::activation(p.opt.activation, N * S, a, h.data(), nullptr, nullptr);
    const auto* w1 = static_cast<const acc_t*>(p.w1);
    const auto* w2 = static_cast<const acc_t*>(p.w2);
    auto* dw1 = static_cast<acc_t*>(p.dw1);
    auto* dw2 = static_cast<acc_t*>(p.dw2);
    M::sum_rows(dg.data(), 1, C, C, N, h.data(), S, dw2, p.accumulate);  // dW2 [C, S] = dg^T h
    M::column_sums(dg.data(), N, C, static_cast<acc_t*>(p.db2), p.accumulate);
    M::sum_rows(dg.data(), C, 1, N, C, w2, S, dh.data(), false);          // dh [N, S] = dg W2
    M::activation(p.opt.activation, N * S, a, h.data(), dh.data(), da.data());
    M::sum_rows(da.data(), 1, S, S, N, z, C, dw1, p.accumulate);         // dW1 [S, C] = da^T z
    M::column_sums(da.data(), N, S, static_cast<acc_t*>(p.db1), p.accumulate);
    M::sum_rows(da.data(), S, 1, N, S, w1, C, dz, false);                 // dz [N, C] = da W1
  };
  backward_through<scalar_t>(p.geo, p.opt.pool, static_cast<const scalar_t*>(p.grad_out),
                             static_cast<const scalar_t*>(p.out), static_cast<const scalar_t*>(p.x),
                             static_cast<const acc_t*>(p.zmax), static_cast<scalar_t*>(p.dx),
                             static_cast<scalar_t*>(p.dresidual), excite);
}

// fn(scalar_t{}) with scalar_t the kernels' type for x's dtype.
template <typename F>
void dispatch_dtype(c10::ScalarType dtype, F&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "se_kernels_cpu",
                                  [&] { fn(scalar_t{}); });
}

void forward(const ForwardArgs& p) {
  dispatch_dtype(p.dtype, [&](auto t) { forward_group<decltype(t)>(p); });
}

void backward(const BackwardArgs& p) {
  dispatch_dtype(p.dtype, [&](auto t) { backward_group<decltype(t)>(p); });
}

}  // namespace

}  // namespace se_kernels::cpu::SE_CPU_CAPABILITY
