// The fused squared norm of a gradient leaf (grad_norm.h).
#include "grad_norm.h"

#include <algorithm>
#include <stdexcept>
#include <utility>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

#include "cpu/formats.h"
#include "cpu/strided.h"
#include "rmsprop.h"

namespace mlx_fused_rmsprop {

namespace {

bool is_floating(mx::Dtype dtype) {
  return dtype == mx::float32 || dtype == mx::float64 || is_half(dtype);
}

// The dtype of the sum: float64 for float64 gradients, else float32.
mx::Dtype sum_dtype(mx::Dtype dtype) {
  return dtype == mx::float64 ? mx::float64 : mx::float32;
}

// The order in which MLX sums a full reduction of an array whose data is
// one contiguous block smaller than the array (a broadcast: its square keeps
// the layout, mlx/backend/common/unary.h) -- get_reduction_plan
// (mlx/backend/common/reduce.cpp): the axes of more than one element by
// stride, zero strides first, then decreasing; neighbours merged where
// contiguous. A plan ending in stride 1 (GeneralContiguousReduce) sums each
// innermost run into a fresh partial sum and adds that to the total; one
// with only zero strides (a broadcast scalar) is one sequential sum.
CollapsedLayout mlx_broadcast_reduction_plan(const mx::array& g) {
  std::vector<std::pair<int64_t, int64_t>> axes; // (extent, stride)
  for (int a = 0; a < g.ndim(); ++a) {
    if (g.shape(a) > 1) {
      axes.emplace_back(g.shape(a), g.strides()[a]);
    }
  }
  std::sort(axes.begin(), axes.end(), [](const auto& a, const auto& b) {
    bool a_zero = a.second == 0;
    bool b_zero = b.second == 0;
    return a_zero != b_zero ? a.second < b.second : a.second > b.second;
  });
  for (size_t i = axes.size(); i-- > 1;) {
    if (axes[i - 1].second == axes[i].first * axes[i].second) {
      axes[i - 1] = {axes[i].first * axes[i - 1].first, axes[i].second};
      axes.erase(axes.begin() + static_cast<std::ptrdiff_t>(i));
    }
  }
  CollapsedLayout plan;
  plan.strides.resize(1);
  for (const auto& [extent, stride] : axes) {
    plan.shape.push_back(static_cast<int>(extent));
    plan.strides[0].push_back(stride);
  }
  if (plan.shape.empty()) { // one element
    plan.shape.push_back(1);
    plan.strides[0].push_back(0);
  }
  return plan;
}

template <class F, typename Acc>
Acc sum_squares(const mx::array& g) {
  using S = typename F::Storage;
  const S* data = reinterpret_cast<const S*>(g.data<void>());
  Acc sum = Acc(0);
  auto square = [](S x) {
    Acc v = static_cast<Acc>(F::load(x));
    return v * v;
  };
  auto add = [&](S x) { sum = sum + square(x); };
  // MLX's reduction on this build: one sequential sum (its SIMD width for
  // float is 1 off Apple platforms), in memory order over a dense buffer,
  // in row-major order over a layout that is not contiguous (whose squares
  // MLX first writes to a fresh row-contiguous array), in its reduction
  // plan's order over a broadcast of contiguous data (see above).
  if (g.flags().contiguous && g.data_size() < g.size()) {
    auto plan = mlx_broadcast_reduction_plan(g);
    bool runs = plan.strides[0].back() == 1;
    walk_rows<1>(plan, [&](const int64_t* at, const int64_t* step, int64_t n, int64_t) {
      if (!runs) {
        for (int64_t i = 0; i < n; ++i) {
          add(data[at[0] + i * step[0]]);
        }
        return;
      }
      Acc partial = Acc(0);
      for (int64_t i = 0; i < n; ++i) {
        partial = partial + square(data[at[0] + i]);
      }
      sum = sum + partial;
    });
  } else if (g.flags().contiguous && g.data_size() == g.size()) {
    const int64_t n = static_cast<int64_t>(g.data_size());
    for (int64_t i = 0; i < n; ++i) {
      add(data[i]);
    }
  } else {
    std::vector<mx::array> one{g, g};
    auto layout = collapse_layout(one);
    walk_rows<1>(layout, [&](const int64_t* at, const int64_t* step, int64_t n, int64_t) {
      for (int64_t i = 0; i < n; ++i) {
        add(data[at[0] + i * step[0]]);
      }
    });
  }
  return sum;
}

} // namespace

bool fused_squared_norm(const mx::Stream& s) {
#if defined(__APPLE__)
  (void)s;
  return false;
#else
  return s.device == mx::Device::cpu;
#endif
}

mx::array squared_norm(const mx::array& g, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (!is_floating(g.dtype())) {
    throw std::invalid_argument("[squared_norm] the gradient must be floating.");
  }
  if (fused_squared_norm(stream)) {
    return mx::array(
        {}, sum_dtype(g.dtype()), std::make_shared<SquaredSum>(stream), {g});
  }
  auto x = is_half(g.dtype()) ? mx::astype(g, mx::float32, stream) : g;
  return mx::sum(mx::square(x, stream), false, stream);
}

void SquaredSum::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& g = inputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(g);
  encoder.set_output_array(out);
  encoder.dispatch([g = mx::array::unsafe_weak_copy(g), out = mx::array::unsafe_weak_copy(out)]() mutable {
    switch (g.dtype()) {
      case mx::float64:
        *out.data<double>() = sum_squares<Float64Format, double>(g);
        break;
      case mx::float16:
        *out.data<float>() = sum_squares<Float16Format, float>(g);
        break;
      case mx::bfloat16:
        *out.data<float>() = sum_squares<BFloat16Format, float>(g);
        break;
      default:
        *out.data<float>() = sum_squares<Float32Format, float>(g);
        break;
    }
  });
}

void SquaredSum::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[SquaredSum] runs on the CPU only; squared_norm uses MLX's ops on the GPU.");
}

} // namespace mlx_fused_rmsprop
