// The eager paths of tensor fusion's projection and (below) of product fusion with their
// autograd in C++. Tensor fusion: fusionops::_tf_projected_eager (see fusionops/ops/_eager.py for why eager calls avoid the
// custom ops' Python autograd). A torch::autograd::Function (the pytorch/extension-cpp pattern)
// saves the inputs and calls the kernels _tf_projected_fwd / _tf_projected_bwd through the
// dispatcher, below autograd, so the CPU and the CUDA kernels both serve it. Device-agnostic:
// compiled in every build, with the CPU kernels.
//
// Second order: with create_graph=True the engine runs backward with grad mode on, and the
// gradients must be differentiable; the kernels' backward is not, so backward then calls
// fusionops::_tf_projected_reference_grads, implemented in Python (fusionops/ops/tensor_fusion.py,
// CompositeImplicitAutograd): the reference's gradients recomputed on the saved inputs, as a graph.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fusionops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdFn = at::Tensor(at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, double, int64_t);
using BwdFn = std::tuple<std::vector<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>(
    const at::Tensor&, at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&, bool, bool, bool, double,
    int64_t);
using RefFn = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, const at::Tensor&,
                                      const std::optional<at::Tensor>&, at::IntArrayRef, double, int64_t);

// The ops' handles, looked up once (the lookup hashes the name).
c10::TypedOperatorHandle<FwdFn> fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusionops::_tf_projected_fwd", "").typed<FwdFn>();
  return op;
}

c10::TypedOperatorHandle<BwdFn> bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusionops::_tf_projected_bwd", "").typed<BwdFn>();
  return op;
}

// Registered from Python at `import fusionops`: looked up at the first double backward.
c10::TypedOperatorHandle<RefFn> reference_grads_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusionops::_tf_projected_reference_grads", "")
                             .typed<RefFn>();
  return op;
}

at::Tensor forward_kernel(at::TensorList xs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& mask, double dropout, int64_t seed) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // straight to the device's kernel
  return fwd_op().call(xs, weight, bias, mask, dropout, seed);
}

class ProjectedEager : public torch::autograd::Function<ProjectedEager> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList xs, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                            double dropout, int64_t seed) {
    // Inputs only (never Z); the bias is not read by backward. An undefined tensor stands for
    // no mask.
    std::vector<at::Tensor> saved(xs.begin(), xs.end());
    saved.push_back(weight);
    saved.push_back(mask.value_or(at::Tensor()));
    ctx->save_for_backward(std::move(saved));
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return forward_kernel(xs, weight, bias, mask, dropout, seed);
  }

  // One gradient per forward argument, list elements counted one by one:
  // (*dxs, dweight, dbias, dmask, ddropout, dseed).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const size_t M = saved.size() - 2;
    const at::TensorList xs(saved.data(), M);
    const at::Tensor& weight = saved[M];
    const std::optional<at::Tensor> mask =
        saved[M + 1].defined() ? std::optional<at::Tensor>(saved[M + 1]) : std::nullopt;
    const double dropout = ctx->saved_data["dropout"].toDouble();
    const int64_t seed = ctx->saved_data["seed"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts the defined tensor arguments only: xs, weight, then the bias.
    std::vector<int64_t> needs(M + 1);
    bool need_dx = false;
    for (size_t i = 0; i <= M; ++i) {
      needs[i] = ctx->needs_input_grad(i);
      if (i < M) need_dx = need_dx || needs[i];
    }
    const bool need_dw = needs[M] != 0;
    const bool need_db = has_bias && ctx->needs_input_grad(M + 1);
    const at::Tensor& grad = grads[0];

    variable_list out(M + 5);
    if (at::GradMode::is_enabled()) {  // create_graph=True: through the reference, as a graph
      if (need_db) out[M + 1] = grad.sum(0);  // dy/db = 1
      const std::vector<at::Tensor> ref = reference_grads_op().call(grad, xs, weight, mask, needs, dropout, seed);
      size_t j = 0;
      for (size_t i = 0; i <= M; ++i)
        if (needs[i]) out[i] = ref.at(j++);
      return out;
    }
    if (!need_dx && !need_dw && !need_db) return out;
    auto [dxs, dw, db] = [&] {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      return bwd_op().call(grad, xs, weight, mask, need_dx, need_dw, need_db, dropout, seed);
    }();
    for (size_t i = 0; i < M && need_dx; ++i)
      if (needs[i]) out[i] = dxs[i].contiguous();
    if (need_dw) out[M] = dw->contiguous();
    if (need_db) out[M + 1] = db->contiguous();
    return out;
  }
};

at::Tensor autograd_kernel(at::TensorList xs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& mask, double dropout, int64_t seed) {
  return ProjectedEager::apply(xs, weight, bias, mask, dropout, seed);
}


// --- product fusion: fusionops::_product_eager ----------------------------------------------
//
// The eager op of product fusion's kernels with its autograd in C++ (fusionops::_product_eager;
// the pattern of csrc/cpu/eager_autograd.cpp). The Python autograd.Function it replaces cost
// about 50 µs a forward + backward, against 30 µs for the reference's whole graph at research
// sizes. Forward: fusionops::_product_fwd below autograd (the CPU or the CUDA kernel, by
// device); backward: fusionops::_product_bwd, one pass for every dx_m. With create_graph=True the
// gradients are built from at::mul instead, in the order the reference's graph computes them
// (the same values, and differentiable again). Device-agnostic: compiled in every build.
namespace product {


at::Tensor forward_kernel(at::TensorList xs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusionops::_product_fwd", "")
                             .typed<at::Tensor(at::TensorList)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(xs);
}

std::vector<at::Tensor> backward_kernel(const at::Tensor& grad, at::TensorList xs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusionops::_product_bwd", "")
                             .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grad, xs);
}

// The reference p = ((x_0 x_1) x_2) … differentiated by autograd: walking back from the last
// factor, dx_m = g_m · (x_0 ⋯ x_{m-1}) and g_{m-1} = g_m · x_m, with dx_0 = g_0.
std::vector<at::Tensor> graph_grads(const at::Tensor& grad, at::TensorList xs) {
  const size_t M = xs.size();
  std::vector<at::Tensor> prefix(M);  // prefix[m] = x_0 ⋯ x_{m-1}, for m >= 1
  for (size_t m = 1; m < M; ++m) prefix[m] = m == 1 ? xs[0] : at::mul(prefix[m - 1], xs[m - 1]);
  std::vector<at::Tensor> dx(M);
  at::Tensor g = grad;
  for (size_t m = M - 1; m >= 1; --m) {
    dx[m] = at::mul(g, prefix[m]);
    g = at::mul(g, xs[m]);
  }
  dx[0] = g;
  return dx;
}

class ProductEager : public torch::autograd::Function<ProductEager> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList xs) {
    ctx->save_for_backward(std::vector<at::Tensor>(xs.begin(), xs.end()));
    return forward_kernel(xs);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list xs = ctx->get_saved_variables();
    std::vector<at::Tensor> dx =
        at::GradMode::is_enabled() ? graph_grads(grads[0], xs) : backward_kernel(grads[0], xs);
    variable_list out(xs.size());
    for (size_t m = 0; m < xs.size(); ++m)
      if (ctx->needs_input_grad(m)) out[m] = dx[m].contiguous();
    return out;
  }
};

at::Tensor autograd_kernel(at::TensorList xs) { return ProductEager::apply(xs); }

}  // namespace product

}  // namespace
}  // namespace fusionops

TORCH_LIBRARY_IMPL(fusionops, Autograd, m) {
  m.impl("_tf_projected_eager", &fusionops::autograd_kernel);
  m.impl("_product_eager", &fusionops::product::autograd_kernel);
}

// Below autograd (inference mode, say): the forward alone, for CPU and CUDA tensors (the kernel
// it calls is picked by device; registering the CUDA key needs no CUDA headers).
TORCH_LIBRARY_IMPL(fusionops, CPU, m) {
  m.impl("_tf_projected_eager", &fusionops::forward_kernel);
  m.impl("_product_eager", &fusionops::product::forward_kernel);
}
TORCH_LIBRARY_IMPL(fusionops, CUDA, m) {
  m.impl("_tf_projected_eager", &fusionops::forward_kernel);
  m.impl("_product_eager", &fusionops::product::forward_kernel);
}
