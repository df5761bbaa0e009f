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

#include "grad_norm.h"

namespace mlx_fused_rmsprop {

namespace {

std::vector<nb::str> python_strings(const std::vector<std::string>& names) {
  std::vector<nb::str> out;
  for (const auto& name : names) {
    out.emplace_back(name.c_str());
  }
  return out;
}

// The Python keys of a leaf's state entries, for each kind of leaf.
class EntryKeys {
 public:
  explicit EntryKeys(const RMSpropOptions& options) : options_(options) {}

  const std::vector<nb::str>& keys(const LeafConfig& config) {
    auto& slot = cache_[(config.quantized ? 1 : 0) + (config.compensated() ? 2 : 0)];
    if (slot.empty()) {
      for (const auto& name : leaf_entry_names(options_, config)) {
        slot.emplace_back(name.c_str());
      }
    }
    return slot;
  }

 private:
  RMSpropOptions options_;
  std::vector<nb::str> cache_[4];
};

class TreeStep {
 public:
  TreeStep(
      const RMSpropOptions& options,
      std::optional<mx::Dtype> half_state_dtype,
      bool allow_missing_state,
      const std::optional<std::vector<LeafPlace>>& places)
      : options_(options),
        keys_(options),
        v_key_("v"),
        half_state_dtype_(half_state_dtype),
        allow_missing_state_(allow_missing_state),
        places_(places),
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

  // Raises (ValueError) unless `places` fits the tree: one per leaf.
  void check_places() const {
    if (places_ && places_->size() != leaves_.size()) {
      throw nb::value_error("RMSprop: one place per gradient leaf is needed.");
    }
  }

  // Builds every leaf's primitive, writes the new state into the state
  // dicts and returns the new parameters shaped like `grad`. Call after
  // walk(); nothing here can fail on a checked tree.
  nb::object build(nb::handle grad, const StepValues& values) {
    StepScalars scalars(values, options_, stream_);
    std::vector<mx::array> params;
    params.reserve(leaves_.size());
    for (size_t l = 0; l < leaves_.size(); ++l) {
      auto outputs = build_step(leaves_[l], scalars, options_, stream_);
      const auto& keys = keys_.keys(leaves_[l].config);
      for (size_t i = 0; i < keys.size(); ++i) {
        nb::object value = nb::cast(std::move(outputs[1 + i]));
        if (PyDict_SetItem(state_dicts_[l].ptr(), keys[i].ptr(), value.ptr()) != 0) {
          throw nb::python_error();
        }
      }
      params.push_back(std::move(outputs[0]));
    }
    size_t next = 0;
    return rebuild(grad, params, next);
  }

  bool any_stochastic() const {
    for (const auto& leaf : leaves_) {
      if (leaf.config.stochastic()) {
        return true;
      }
    }
    return false;
  }

 private:
  // The array a handle holds, or null (one type lookup).
  static const mx::array* array_in(nb::handle h) {
    mx::array* a = nullptr;
    return h.is_valid() && nb::try_cast<mx::array*>(h, a) ? a : nullptr;
  }

  // A state dict's entry, or null when it has none.
  static PyObject* entry(nb::handle dict, const nb::str& key) {
    PyObject* value = PyDict_GetItemWithError(dict.ptr(), key.ptr());
    if (value == nullptr && PyErr_Occurred()) {
      throw nb::python_error();
    }
    return value;
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
    LeafPlace place{static_cast<uint32_t>(leaves_.size()), 0};
    if (places_ && leaves_.size() < places_->size()) {
      place = (*places_)[leaves_.size()];
    }
    LeafArrays leaf{grad, *param_array, {}, {}};
    nb::handle state_dict; // none when the state is still to be created
    bool is_dict = state.is_valid() && PyDict_Check(state.ptr());
    bool fresh = !state.is_valid() || (is_dict && PyDict_Size(state.ptr()) == 0);
    if (fresh) {
      if (!allow_missing_state_) {
        throw nb::value_error(where("the optimizer state has no entry").c_str());
      }
      // init() will create the state: check arrays like the ones it makes.
      bool quantized = options_.quantizes(leaf.param.size(), leaf.param.dtype());
      leaf.config = leaf_config(
          options_, leaf.param.dtype(), quantized, place.leaf, place.element_offset);
      leaf.state = fresh_state(leaf);
    } else {
      // 8-bit state when v holds codes; the rest is checked against that.
      PyObject* v = is_dict ? entry(state, v_key_) : nullptr;
      const mx::array* v_array = v == nullptr ? nullptr : array_in(v);
      bool quantized = v_array != nullptr && v_array->dtype() == mx::uint8;
      leaf.config = leaf_config(
          options_, leaf.param.dtype(), quantized, place.leaf, place.element_offset);
      const auto& keys = keys_.keys(leaf.config);
      const auto names = leaf_entry_names(options_, leaf.config);
      leaf.state.reserve(keys.size());
      for (size_t i = 0; i < keys.size(); ++i) {
        PyObject* value = is_dict ? entry(state, keys[i]) : nullptr;
        if (value == nullptr) {
          throw nb::value_error(
              where("the optimizer state has no entry '" + names[i] + "'").c_str());
        }
        const mx::array* a = array_in(value);
        if (a == nullptr) {
          throw nb::type_error(where(
                                   "state '" + names[i] + "' is " + type_name(value) +
                                   ", expected mlx.core.array")
                                   .c_str());
        }
        leaf.state.push_back(*a);
      }
      state_dict = state;
    }
    try {
      check_leaf(leaf, options_, stream_);
    } catch (const std::invalid_argument& e) {
      throw nb::value_error(where(e.what()).c_str());
    }
    leaves_.push_back(std::move(leaf));
    state_dicts_.push_back(state_dict);
  }

  // Arrays shaped and typed like the state init() creates for `leaf`.
  std::vector<mx::array> fresh_state(const LeafArrays& leaf) const {
    const auto counts = entry_counts(options_, leaf.config);
    const auto& param = leaf.param;
    std::vector<mx::array> state;
    auto dtype = leaf.config.quantized ? mx::uint8 : state_dtype_for(param.dtype());
    auto like = dtype == param.dtype() ? param : mx::zeros(param.shape(), dtype, stream_);
    state.assign(counts.state, like);
    if (counts.compensation) {
      state.push_back(param);
    }
    if (counts.scales) {
      mx::Shape blocks{static_cast<int>(quantized_blocks(param.size()))};
      state.insert(state.end(), counts.scales, mx::zeros(blocks, mx::float32, stream_));
    }
    return state;
  }

  mx::Dtype state_dtype_for(mx::Dtype param) const {
    return is_half(param) && half_state_dtype_ ? *half_state_dtype_ : param;
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
  EntryKeys keys_;
  nb::str v_key_;
  std::optional<mx::Dtype> half_state_dtype_;
  bool allow_missing_state_;
  const std::optional<std::vector<LeafPlace>>& places_;
  mx::Stream stream_;
  std::vector<nb::object> path_;
  std::vector<LeafArrays> leaves_;
  std::vector<nb::handle> state_dicts_; // per leaf
};

// Every gradient leaf in tree_flatten order.
void collect_leaves(nb::handle tree, std::vector<mx::array>& out) {
  mx::array* a = nullptr;
  if (nb::try_cast<mx::array*>(tree, a)) {
    out.push_back(*a);
  } else if (nb::isinstance<nb::dict>(tree)) {
    for (auto [key, child] : nb::borrow<nb::dict>(tree)) {
      collect_leaves(child, out);
    }
  } else if (nb::isinstance<nb::list>(tree) || nb::isinstance<nb::tuple>(tree)) {
    for (auto child : tree) {
      collect_leaves(child, out);
    }
  } else {
    throw nb::type_error(
        ("RMSprop: a gradient is " +
         nb::cast<std::string>(nb::type_name(tree.type())) + ", expected mlx.core.array")
            .c_str());
  }
}

} // namespace

nb::object optimizer_step(
    nb::handle gradients,
    nb::handle parameters,
    nb::handle state,
    const std::optional<StepValues>& values,
    const RMSpropOptions& options,
    std::optional<mx::Dtype> half_state_dtype,
    bool build,
    bool allow_missing_state,
    const std::optional<std::vector<LeafPlace>>& places) {
  try {
    check_options(options);
  } catch (const std::invalid_argument& e) {
    throw nb::value_error((std::string("RMSprop: ") + e.what()).c_str());
  }
  TreeStep tree(options, half_state_dtype, allow_missing_state && !build, places);
  tree.walk(gradients, parameters, state);
  tree.check_places();
  if (build) {
    try {
      check_step_values(*values, options, tree.any_stochastic());
    } catch (const std::invalid_argument& e) {
      throw nb::value_error((std::string("RMSprop: ") + e.what()).c_str());
    }
    return tree.build(gradients, *values);
  }
  return nb::none();
}

mx::array tree_squared_norm(nb::handle gradients) {
  std::vector<mx::array> leaves;
  collect_leaves(gradients, leaves);
  auto stream = mx::to_stream({});
  // clip_grad_norm: tree_reduce(lambda acc, g: acc + squared_norm(g), grads,
  // 0.0); the Python 0.0 takes the first sum's dtype (0 + s is s exactly).
  std::optional<mx::array> total;
  for (const auto& g : leaves) {
    auto s = squared_norm(g, stream);
    total = total ? mx::add(*total, s, stream)
                  : mx::add(mx::array(0.0, s.dtype()), s, stream);
  }
  return total ? *total : mx::array(0.0f);
}

} // namespace mlx_fused_rmsprop
