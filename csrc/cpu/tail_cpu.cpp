// The block tail's per-channel algebra (se_kernels/_tail_ops.py) on CPU tensors: each op
// one loop over the channels (and the samples), where the PyTorch version is twenty-odd
// small operations whose dispatch costs more than their arithmetic. The formulas are the
// PyTorch version's and each sum over the samples is taken in sample order, as its sum(0);
// within an element the products may associate otherwise, so the two agree to roundings.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace se_kernels {

namespace {

void check_accumulate(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "se_kernels: ",
                   name, " must be float32 or float64 (the accumulation dtype), got ",
                   t.scalar_type());
}

// t (if given) has `like`'s dtype and device and the shape `shape`.
void check_vector(const char* name, const std::optional<at::Tensor>& t, at::IntArrayRef shape,
                  const at::Tensor& like, bool optional = false) {
  if (!t.has_value()) {
    TORCH_CHECK_VALUE(optional, "se_kernels: ", name, " is required");
    return;
  }
  TORCH_CHECK_TYPE(t->scalar_type() == like.scalar_type() && t->device() == like.device(),
                   "se_kernels: ", name, " must be ", like.scalar_type(), " on ", like.device(),
                   " like the other vectors, got ", t->scalar_type(), " on ", t->device());
  TORCH_CHECK_VALUE(t->sizes() == shape, "se_kernels: ", name, " must have shape ", shape,
                    ", got ", t->sizes());
}

void check_pairs(const char* name, const at::Tensor& t) {
  check_accumulate(name, t);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) % 2 == 0, "se_kernels: ", name,
                    " must have shape [2C], got ", t.sizes());
}

void check_rows(const char* name, const at::Tensor& t, int64_t c) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == c, "se_kernels: ", name,
                    " must have shape [N, ", c, "], got ", t.sizes());
}

void check_p(int64_t p) {
  TORCH_CHECK_VALUE(p >= 1, "se_kernels: p (positions per channel) must be at least 1, got ", p);
}

template <typename T>
const T* data_of(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

std::optional<at::Tensor> dense(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tail_norm_forward_cpu(
    const at::Tensor& moments_in, const std::optional<at::Tensor>& sums_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    double eps, int64_t p, bool batch_stats) {
  check_pairs("moments", moments_in);
  const int64_t C = moments_in.size(0) / 2;
  if (sums_in.has_value()) {
    check_rows("sums", *sums_in, C);
    check_vector("sums", sums_in, sums_in->sizes(), moments_in);
  }
  check_vector("weight", weight_in, {C}, moments_in, true);
  check_vector("bias", bias_in, {C}, moments_in, true);
  check_p(p);
  const at::Tensor moments = moments_in.contiguous();
  const auto sums = dense(sums_in), weight = dense(weight_in), bias = dense(bias_in);
  at::Tensor stats = at::empty({2, C}, moments.options());
  at::Tensor rstd = at::empty({C}, moments.options());
  at::Tensor a = at::empty({C}, moments.options());
  at::Tensor b = at::empty({C}, moments.options());
  at::Tensor z = sums.has_value() ? at::empty(sums->sizes(), moments.options())
                                  : at::empty({0}, moments.options());
  const int64_t N = sums.has_value() ? sums->size(0) : 0;
  AT_DISPATCH_FLOATING_TYPES(moments.scalar_type(), "tail_norm_forward", [&] {
    const scalar_t* m = moments.const_data_ptr<scalar_t>();
    const scalar_t* w = data_of<scalar_t>(weight);
    const scalar_t* bi = data_of<scalar_t>(bias);
    scalar_t* mean = stats.data_ptr<scalar_t>();
    scalar_t* var = mean + C;
    scalar_t* r = rstd.data_ptr<scalar_t>();
    scalar_t* ap = a.data_ptr<scalar_t>();
    scalar_t* bp = b.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t mu = m[c];
      // The biased batch variance E x² - (E x)², at zero where rounding takes it below.
      const scalar_t v = batch_stats ? std::max<scalar_t>(m[C + c] - mu * mu, 0) : m[C + c];
      mean[c] = mu;
      var[c] = v;
      r[c] = scalar_t(1) / std::sqrt(v + static_cast<scalar_t>(eps));
      ap[c] = w ? w[c] * r[c] : r[c];
      bp[c] = bi ? bi[c] - ap[c] * mu : -(ap[c] * mu);
    }
    if (N) {
      const scalar_t* __restrict__ s = sums->const_data_ptr<scalar_t>();
      scalar_t* __restrict__ zp = z.data_ptr<scalar_t>();
      const scalar_t* __restrict__ scale_a = ap;
      const scalar_t* __restrict__ scale_b = bp;
      const scalar_t inv_p = scalar_t(1) / static_cast<scalar_t>(p);
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* row = s + n * C;
        scalar_t* out = zp + n * C;
        for (int64_t c = 0; c < C; ++c) out[c] = scale_b[c] + inv_p * (scale_a[c] * row[c]);
      }
    }
  });
  return {stats, rstd, a, b, z};
}

at::Tensor tail_du_sums_cpu(const at::Tensor& dz_in, const at::Tensor& k_in,
                            const at::Tensor& sdy_in, const std::optional<at::Tensor>& sd_in,
                            const at::Tensor& sdyx_in, const at::Tensor& sdx_in, int64_t p) {
  check_accumulate("dz", dz_in);
  TORCH_CHECK_VALUE(dz_in.dim() == 2, "se_kernels: dz must have shape [N, C], got ",
                    dz_in.sizes());
  const at::IntArrayRef shape = dz_in.sizes();
  check_vector("k", k_in, shape, dz_in);
  check_vector("sdy", sdy_in, shape, dz_in);
  check_vector("sdyx", sdyx_in, shape, dz_in);
  check_vector("sdx", sdx_in, shape, dz_in);
  check_vector("sd", sd_in, shape, dz_in, true);
  check_p(p);
  const int64_t N = shape[0], C = shape[1];
  const at::Tensor dz = dz_in.contiguous(), k = k_in.contiguous(), sdy = sdy_in.contiguous(),
                   sdyx = sdyx_in.contiguous(), sdx = sdx_in.contiguous();
  const auto sd = dense(sd_in);
  at::Tensor local = at::zeros({2 * C}, dz.options());
  AT_DISPATCH_FLOATING_TYPES(dz.scalar_type(), "tail_du_sums", [&] {
    const scalar_t* __restrict__ dzp = dz.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ kp = k.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ sdyp = sdy.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ sdp = data_of<scalar_t>(sd);
    const scalar_t* __restrict__ sdyxp = sdyx.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ sdxp = sdx.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ du = local.data_ptr<scalar_t>();
    scalar_t* __restrict__ dux = du + C;
    const scalar_t inv_p = scalar_t(1) / static_cast<scalar_t>(p);
    // Samples in order, each row added across the channels: the sum over n of each
    // channel is taken in sample order, as the PyTorch version's sum(0).
    for (int64_t row = 0; row < N * C; row += C) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = row + c;
        const scalar_t e = dzp[i] * inv_p;
        dux[c] += e * sdxp[i] + kp[i] * sdyxp[i];
      }
      if (sdp) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = row + c;
          du[c] += (dzp[i] * inv_p) * sdp[i] + kp[i] * sdyp[i];
        }
      } else {  // without an activation Σ_p e is dz itself
        for (int64_t c = 0; c < C; ++c) du[c] += dzp[row + c] + kp[row + c] * sdyp[row + c];
      }
    }
  });
  return local;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
tail_norm_backward_cpu(const at::Tensor& local_in, const at::Tensor& means_in,
                       const at::Tensor& stats_in, const at::Tensor& rstd_in,
                       const std::optional<at::Tensor>& weight_in,
                       const std::optional<at::Tensor>& bias_in, const at::Tensor& k_in,
                       const at::Tensor& dz_in, int64_t p, bool batch_stats) {
  check_pairs("local", local_in);
  const int64_t C = local_in.size(0) / 2;
  check_vector("means", means_in, {2 * C}, local_in);
  check_vector("stats", stats_in, {2, C}, local_in);
  check_vector("rstd", rstd_in, {C}, local_in);
  check_vector("weight", weight_in, {C}, local_in, true);
  check_vector("bias", bias_in, {C}, local_in, true);
  check_rows("k", k_in, C);
  check_vector("k", k_in, k_in.sizes(), local_in);
  check_vector("dz", dz_in, k_in.sizes(), local_in);
  check_p(p);
  const int64_t N = k_in.size(0);
  const at::Tensor local = local_in.contiguous(), means = means_in.contiguous(),
                   stats = stats_in.contiguous(), rstd = rstd_in.contiguous(),
                   k = k_in.contiguous(), dz = dz_in.contiguous();
  const auto weight = dense(weight_in);
  const auto opts = local.options();
  at::Tensor dweight = at::empty({weight.has_value() ? C : 0}, opts);
  at::Tensor dbias = at::empty({bias_in.has_value() ? C : 0}, opts);
  at::Tensor dy_scale = at::empty({N, C}, opts), e_scale = at::empty({N, C}, opts);
  at::Tensor x_scale = at::empty({batch_stats ? C : 0}, opts);
  at::Tensor shift = at::empty({batch_stats ? C : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES(local.scalar_type(), "tail_norm_backward", [&] {
    const scalar_t* sum_du = local.const_data_ptr<scalar_t>();
    const scalar_t* sum_dux = sum_du + C;
    const scalar_t* mean = stats.const_data_ptr<scalar_t>();
    const scalar_t* r = rstd.const_data_ptr<scalar_t>();
    const scalar_t* w = data_of<scalar_t>(weight);
    const scalar_t* __restrict__ kp = k.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ dzp = dz.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ dyp = dy_scale.data_ptr<scalar_t>();
    scalar_t* __restrict__ ep = e_scale.data_ptr<scalar_t>();
    const scalar_t inv_p = scalar_t(1) / static_cast<scalar_t>(p);
    if (w) {
      scalar_t* dw = dweight.data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) dw[c] = (sum_dux[c] - mean[c] * sum_du[c]) * r[c];
    }
    if (dbias.numel()) std::copy(sum_du, sum_du + C, dbias.data_ptr<scalar_t>());
    std::vector<scalar_t> gr_store(C);  // gr = weight·rstd, the norm's input scale
    scalar_t* __restrict__ gr = gr_store.data();
    for (int64_t c = 0; c < C; ++c) gr[c] = w ? w[c] * r[c] : r[c];
    for (int64_t row = 0; row < N * C; row += C) {
      for (int64_t c = 0; c < C; ++c) {
        dyp[row + c] = gr[c] * kp[row + c];
        ep[row + c] = gr[c] * (dzp[row + c] * inv_p);
      }
    }
    if (batch_stats) {
      const scalar_t* mean_du = means.const_data_ptr<scalar_t>();
      const scalar_t* mean_dux = mean_du + C;
      scalar_t* xs = x_scale.data_ptr<scalar_t>();
      scalar_t* sh = shift.data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t mean_duxhat = (mean_dux[c] - mean[c] * mean_du[c]) * r[c];
        xs[c] = -((gr[c] * r[c]) * mean_duxhat);
        // gr·(rstd·mean·mean(du·x̂) - mean(du)), the first term being -x_scale·mean
        sh[c] = -(gr[c] * mean_du[c] + xs[c] * mean[c]);
      }
    }
  });
  return {dweight, dbias, dy_scale, e_scale, x_scale, shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CPU, m) {
  m.impl("tail_norm_forward", &tail_norm_forward_cpu);
  m.impl("tail_du_sums", &tail_du_sums_cpu);
  m.impl("tail_norm_backward", &tail_norm_backward_cpu);
}

}  // namespace se_kernels
