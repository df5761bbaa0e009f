// One optimizer step over a whole tree, in one native call: walk the
// gradients with the parameters and the optimizer state beside them, check
// every leaf (naming its path only when one fails), then build every leaf's
// primitive and write the new state. Nothing changes unless every leaf
// passes, so a bad leaf leaves the parameters and the state as they were.
// RMSprop.apply_gradients (python/mlx_fused_rmsprop/optimizer.py) calls it
// once per step instead of walking the tree and calling the op per leaf.
#include "optimizer_step.h"

#include <stdexcept>
#include <string>
#include <vector>

#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/ops.h"

namespace mlx_fused_rmsprop {

namespace {

std::vector<nb::str> python_strings(const std::vector<std::string>& names) {
  std::vector<nb::str> out;
  for (const auto& name : names) {
    out.emplace_back(name.c_str());
  }
  return out;
}

class TreeStep {
 public:
  TreeStep(
      const RMSpropOptions& options,
      std::optional<mx::Dtype> half_state_dtype,
      bool allow_missing_state)
      : options_(options),
        names_(options.state_names()),
        keys_(python_strings(names_)),
        half_state_dtype_(half_state_dtype),
        allow_missing_state_(allow_missing_state),
        stream_(mx::to_stream({})) {}

  // Checks the whole tree; throws (ValueError / TypeError) naming the leaf.
  void walk(nb::handle grad, nb::handle param, nb::handle state) {
    if (const mx::array* g = array_in(grad)) {
      return leaf(*g, param, state);
    }
    if (nb::isinstance<nb::dict>(grad)) {
      for (auto [key, child] : nb::borrow<nb::dict>(grad)) {
        path_.push_back(nb::borrow(key));
        walk(child, dict_child(param, key), dict_child(state, key));
        path_.pop_back();
      }
      return;
    }
    if (nb::isinstance<nb::list>(grad) || nb::isinstance<nb::tuple>(grad)) {
      size_t i = 0;
      for (auto child : grad) {
        path_.push_back(nb::int_(i));
        walk(child, seq_child(param, i), seq_child(state, i));
        path_.pop_back();
        ++i;
      }
      return;
    }
    throw nb::type_error(
        where("the gradient is " + type_name(grad) + ", expected mlx.core.array")
            .c_str());
  }

  // Builds every leaf's primitive, writes the new state into the state
  // dicts and returns the new parameters shaped like `grad`. Call after
  // walk(); nothing here can fail on a checked tree.
  nb::object build(
      nb::handle grad,
      const mx::array& lr,
      const std::optional<mx::array>& step) {
    StepScalars scalars(lr, step, options_, stream_);
    std::vector<mx::array> params;
    params.reserve(leaves_.size());
    for (size_t l = 0; l < leaves_.size(); ++l) {
      auto outputs = build_step(leaves_[l], scalars, options_, stream_);
      for (size_t i = 0; i < keys_.size(); ++i) {
        nb::object value = nb::cast(std::move(outputs[1 + i]));
        if (PyDict_SetItem(state_dicts_[l].ptr(), keys_[i].ptr(), value.ptr()) != 0) {
          throw nb::python_error();
        }
      }
      params.push_back(std::move(outputs[0]));
    }
    size_t next = 0;
    return rebuild(grad, params, next);
  }

 private:
  // The array a handle holds, or null (one type lookup).
  static const mx::array* array_in(nb::handle h) {
    mx::array* a = nullptr;
    return h.is_valid() && nb::try_cast<mx::array*>(h, a) ? a : nullptr;
  }

  void leaf(const mx::array& grad, nb::handle param, nb::handle state) {
    if (!param.is_valid()) {
      throw nb::value_error(where("no parameter for this gradient").c_str());
    }
    const mx::array* param_array = array_in(param);
    if (param_array == nullptr) {
      throw nb::type_error(
          where("the parameter is " + type_name(param) + ", expected mlx.core.array")
              .c_str());
    }
    LeafArrays leaf{grad, *param_array, {}};
    nb::handle state_dict; // none when the state is still to be created
    bool is_dict = state.is_valid() && PyDict_Check(state.ptr());
    bool fresh = !state.is_valid() || (is_dict && PyDict_Size(state.ptr()) == 0);
    if (fresh) {
      if (!allow_missing_state_) {
        throw nb::value_error(where("the optimizer state has no entry").c_str());
      }
      // init() will create the state: check arrays like the ones it makes.
      auto dtype = state_dtype_for(leaf.param.dtype());
      auto like = dtype == leaf.param.dtype()
          ? leaf.param
          : mx::zeros(leaf.param.shape(), dtype, stream_);
      leaf.state.assign(names_.size(), like);
    } else {
      leaf.state.reserve(keys_.size());
      for (size_t i = 0; i < keys_.size(); ++i) {
        PyObject* value = is_dict ? PyDict_GetItemWithError(state.ptr(), keys_[i].ptr())
                                  : nullptr;
        if (value == nullptr) {
          if (PyErr_Occurred()) {
            throw nb::python_error();
          }
          throw nb::value_error(
              where("the optimizer state has no entry '" + names_[i] + "'").c_str());
        }
        const mx::array* a = array_in(value);
        if (a == nullptr) {
          throw nb::type_error(where(
                                   "state '" + names_[i] + "' is " + type_name(value) +
                                   ", expected mlx.core.array")
                                   .c_str());
        }
        leaf.state.push_back(*a);
      }
      state_dict = state;
    }
    try {
      check_leaf(leaf.grad, leaf.param, leaf.state, options_, stream_);
    } catch (const std::invalid_argument& e) {
      throw nb::value_error(where(e.what()).c_str());
    }
    leaves_.push_back(std::move(leaf));
    state_dicts_.push_back(state_dict);
  }

  mx::Dtype state_dtype_for(mx::Dtype param) const {
    bool half = param == mx::float16 || param == mx::bfloat16;
    return half && half_state_dtype_ ? *half_state_dtype_ : param;
  }

  nb::object rebuild(nb::handle grad, std::vector<mx::array>& params, size_t& next) {
    if (nb::isinstance<mx::array>(grad)) {
      return nb::cast(std::move(params[next++]));
    }
    if (nb::isinstance<nb::dict>(grad)) {
      nb::dict out;
      for (auto [key, child] : nb::borrow<nb::dict>(grad)) {
        out[key] = rebuild(child, params, next);
      }
      return out;
    }
    nb::list out;
    for (auto child : grad) {
      out.append(rebuild(child, params, next));
    }
    if (nb::isinstance<nb::tuple>(grad)) {
      return nb::tuple(out);
    }
    return out;
  }

  static nb::handle dict_child(nb::handle tree, nb::handle key) {
    if (!tree.is_valid() || !nb::isinstance<nb::dict>(tree)) {
      return {};
    }
    PyObject* item = PyDict_GetItemWithError(tree.ptr(), key.ptr());
    if (item == nullptr && PyErr_Occurred()) {
      throw nb::python_error();
    }
    return item;
  }

  static nb::handle seq_child(nb::handle tree, size_t i) {
    if (!tree.is_valid() ||
        !(nb::isinstance<nb::list>(tree) || nb::isinstance<nb::tuple>(tree)) ||
        i >= nb::len(tree)) {
      return {};
    }
    return tree[i];
  }

  static std::string type_name(nb::handle obj) {
    return nb::cast<std::string>(nb::type_name(obj.type()));
  }

  // "RMSprop: leaf 'a.0.weight': what" (the path built only on failure).
  std::string where(const std::string& what) const {
    std::string path;
    for (auto key : path_) {
      path += (path.empty() ? "" : ".") + nb::cast<std::string>(nb::str(key));
    }
    return "RMSprop: leaf '" + path + "': " + what;
  }

  RMSpropOptions options_;
  std::vector<std::string> names_;
  std::vector<nb::str> keys_; // names_ as Python strings
  std::optional<mx::Dtype> half_state_dtype_;
  bool allow_missing_state_;
  mx::Stream stream_;
  std::vector<nb::object> path_;
  std::vector<LeafArrays> leaves_;
  std::vector<nb::handle> state_dicts_; // per leaf
};

} // namespace

nb::object optimizer_step(
    nb::handle gradients,
    nb::handle parameters,
    nb::handle state,
    const std::optional<mx::array>& lr,
    const std::optional<mx::array>& step,
    const RMSpropOptions& options,
    std::optional<mx::Dtype> half_state_dtype,
    bool build,
    bool allow_missing_state) {
  try {
    check_options(options);
    if (build) {
      check_step_scalars(*lr, step, options);
    }
  } catch (const std::invalid_argument& e) {
    throw nb::value_error((std::string("RMSprop: ") + e.what()).c_str());
  }
  TreeStep tree(options, half_state_dtype, allow_missing_state && !build);
  tree.walk(gradients, parameters, state);
  if (!build) {
    return nb::none();
  }
  return tree.build(gradients, *lr, step);
}

} // namespace mlx_fused_rmsprop
