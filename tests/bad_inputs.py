"""Every bad input we tried, and the error a user gets.

`python tests/bad_inputs.py` prints docs/reliability.md's table from these
cases; tests/test_bad_inputs.py checks each case still raises exactly that
error and that the page shows it, so the table cannot drift from the code.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_fused_rmsprop import RMSprop, rmsprop_step, rmsprop_update


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(3, 4), nn.Linear(4, 2)]


def _trained(**options):
    model = TwoLayers()
    opt = RMSprop(0.01, **options)
    grads = {"layers": [{"weight": mx.ones((4, 3)), "bias": mx.ones((4,))},
                        {"weight": mx.ones((2, 4)), "bias": mx.ones((2,))}]}
    opt.update(model, grads)
    return model, opt, grads


def _step_with(edit_grads=None, edit_model=None):
    model, opt, grads = _trained()
    if edit_grads:
        edit_grads(grads)
    if edit_model:
        edit_model(model)
    opt.update(model, grads)


def _first_step_with_counter():
    """A model that keeps an integer step counter as an attribute: it is in
    trainable_parameters(), so value_and_grad gives it a gradient."""
    model = TwoLayers()
    model.counter = mx.array(0, dtype=mx.uint32)
    _, grads = nn.value_and_grad(model, lambda m, x: m.layers[1](m.layers[0](x)).sum())(
        model, mx.ones((1, 3)))
    RMSprop(0.01).update(model, grads)


def _edit_state_in_place(edit):
    model, opt, grads = _trained()
    edit(opt.state)
    opt.update(model, grads)


def _variant_op(dtype=mx.float32, state_dtypes=(mx.float32,), names=None, **options):
    param = mx.ones((3,), dtype=dtype)
    names = names or ["v", "mean", "momentum_buffer"][: len(state_dtypes)]
    state = {n: mx.zeros((3,), dtype=d) for n, d in zip(names, state_dtypes)}
    out = rmsprop_step(param, param, state, 0.1, **options)
    mx.eval(out)


def _load_checkpoint(edit, **options):
    model, opt, grads = _trained(**options)
    flat = dict(tree_flatten(opt.state))
    edit(flat)
    fresh = RMSprop(0.01, **options)
    fresh.state = tree_unflatten(list(flat.items()))
    fresh.update(model, grads)


def _op(grad=None, param=None, v=None, lr=0.1, alpha=0.9, eps=1e-8):
    one = mx.ones((3,))
    pick = lambda a: one if a is None else a
    out = rmsprop_update(pick(grad), pick(param), pick(v), lr, alpha=alpha, eps=eps)
    mx.eval(out)


# (what the user did, how to do it, exception type, the message they get)
CASES = [
    ("`RMSprop(lr, alpha=-0.1)`", lambda: RMSprop(0.1, alpha=-0.1), ValueError,
     "RMSprop alpha should be >=0, -0.1 was provided instead"),
    ("`RMSprop(lr, eps=0.0)`", lambda: RMSprop(0.1, eps=0.0), ValueError,
     "RMSprop epsilon should be >0, 0.0 was provided instead"),
    ("`RMSprop(lr, alpha=inf)`", lambda: RMSprop(0.1, alpha=float("inf")), ValueError,
     "RMSprop alpha should be a finite number, inf was provided instead"),
    ("`RMSprop(lr, eps=nan)`", lambda: RMSprop(0.1, eps=float("nan")), ValueError,
     "RMSprop epsilon should be a finite number, nan was provided instead"),
    ("`RMSprop(lr, momentum=-0.1)`", lambda: RMSprop(0.1, momentum=-0.1), ValueError,
     "RMSprop momentum should be a finite number >= 0, -0.1 was provided instead"),
    ("`RMSprop(lr, nesterov=True)` without momentum", lambda: RMSprop(0.1, nesterov=True), ValueError,
     "RMSprop nesterov=True needs momentum > 0, 0.0 was provided instead"),
    ("`RMSprop(lr, weight_decay=nan)`", lambda: RMSprop(0.1, weight_decay=float("nan")), ValueError,
     "RMSprop weight_decay should be a finite number >= 0, nan was provided instead"),
    ("`RMSprop(lr, initial_scale=-1)`", lambda: RMSprop(0.1, initial_scale=-1.0), ValueError,
     "RMSprop initial_scale should be a finite number >= 0, -1.0 was provided instead"),
    ("`RMSprop(lr, state_dtype=mx.float16)`", lambda: RMSprop(0.1, state_dtype=mx.float16), ValueError,
     "RMSprop state_dtype should be None (the parameter's dtype) or mlx.core.float32, mlx.core.float16 was provided instead"),
    ("`RMSprop(lr, state_bits=4)`", lambda: RMSprop(0.1, state_bits=4), ValueError,
     "RMSprop state_bits should be None (full precision) or 8, 4 was provided instead"),
    ("`RMSprop(lr, state_bits=8, min_8bit_size=-1)`",
     lambda: RMSprop(0.1, state_bits=8, min_8bit_size=-1), ValueError,
     "RMSprop min_8bit_size should be an int >= 0, -1 was provided instead"),
    ("`RMSprop(lr, max_grad_norm=-1)`", lambda: RMSprop(0.1, max_grad_norm=-1), ValueError,
     "RMSprop max_grad_norm should be None or a finite number >= 0, -1 was provided instead"),
    ("`RMSprop(lr, stochastic_rounding=True, kahan_summation=True)`",
     lambda: RMSprop(0.1, stochastic_rounding=True, kahan_summation=True), ValueError,
     "RMSprop stochastic_rounding and kahan_summation exclude each other: pick one"),
    ("`RMSprop(lr, stochastic_rounding=True, seed='x')`",
     lambda: RMSprop(0.1, stochastic_rounding=True, seed="x"), ValueError,
     "RMSprop seed should be None or an int in [0, 2**32), 'x' was provided instead"),
    ("an integer parameter with a gradient",
     lambda: _step_with(lambda g: g["layers"][1].update(bias=mx.ones((2,), dtype=mx.int32)),
                        lambda m: m.layers[1].update({"bias": mx.zeros((2,), dtype=mx.int32)})),
     ValueError,
     "RMSprop: leaf 'layers.1.bias': [rmsprop_update] parameter dtype int32 is not supported on Device(cpu, 0); RMSprop updates float32, float16 and bfloat16 parameters (and float64 on the CPU). This int32 array is not a trainable parameter (mlx's RMSprop would silently make it float32): freeze it before computing gradients, e.g. `model.layers[1].freeze(keys=['bias'], recurse=False)`, or keep it out of `model.trainable_parameters()` (a Python number, or an attribute whose name starts with '_')."),
    ("an integer step counter on the model, left trainable",
     lambda: _first_step_with_counter(),
     ValueError,
     "RMSprop: leaf 'counter': [rmsprop_update] parameter dtype uint32 is not supported on Device(cpu, 0); RMSprop updates float32, float16 and bfloat16 parameters (and float64 on the CPU). This uint32 array is not a trainable parameter (mlx's RMSprop would silently make it float32): freeze it before computing gradients, e.g. `model.freeze(keys=['counter'], recurse=False)`, or keep it out of `model.trainable_parameters()` (a Python number, or an attribute whose name starts with '_')."),
    ("a gradient of the wrong shape",
     lambda: _step_with(lambda g: g["layers"][0].update(weight=mx.ones((3, 4)))), ValueError,
     "RMSprop: leaf 'layers.0.weight': [rmsprop_update] gradient shape (3,4) does not match parameter shape (4,3)."),
    ("a gradient of another dtype",
     lambda: _step_with(lambda g: g["layers"][0].update(bias=mx.ones((4,), dtype=mx.float16))), ValueError,
     "RMSprop: leaf 'layers.0.bias': [rmsprop_update] gradient dtype float16 does not match parameter dtype float32."),
    ("a gradient with no parameter",
     lambda: _step_with(lambda g: g.update(head=mx.ones((2,)))), ValueError,
     "RMSprop: leaf 'head': no parameter for this gradient"),
    ("a gradient list longer than the model's",
     lambda: _step_with(lambda g: g["layers"].append({"weight": mx.ones((2, 2))})), ValueError,
     "RMSprop: leaf 'layers.2.weight': no parameter for this gradient"),
    ("a gradient that is not an array",
     lambda: _step_with(lambda g: g["layers"][1].update(bias=0.5)), TypeError,
     "RMSprop: leaf 'layers.1.bias': the gradient is float, expected mlx.core.array"),
    ("a state whose `v` was replaced by another dtype",
     lambda: _edit_state_in_place(
         lambda s: s["layers"][0]["bias"].update(v=mx.zeros((4,), dtype=mx.float16))),
     ValueError,
     "RMSprop: leaf 'layers.0.bias': [rmsprop_update] state 'v' dtype float16 does not match parameter dtype float32."),
    ("a state whose `v` is a list",
     lambda: _edit_state_in_place(lambda s: s["layers"][0]["bias"].update(v=[0.0] * 4)),
     TypeError,
     "RMSprop: leaf 'layers.0.bias': state 'v' is list, expected mlx.core.array"),
    ("a checkpoint missing a parameter's entry",
     lambda: _load_checkpoint(lambda s: s.pop("layers.1.weight.v")), ValueError,
     "RMSprop: the optimizer state has no entry 'layers.1.weight.v' (a state that holds entries must hold one for every trained parameter; was it saved from another model?)"),
    ("an Adam checkpoint (extra `m` entries)",
     lambda: _load_checkpoint(lambda s: s.update({"layers.0.bias.m": s["layers.0.bias.v"]})), ValueError,
     "RMSprop: the optimizer state has an unexpected entry 'layers.0.bias.m' (RMSprop keeps only 'v')"),
    ("a checkpoint of another model (entry with no parameter)",
     lambda: _load_checkpoint(lambda s: s.update({"decoder.weight.v": mx.zeros((2,))})), ValueError,
     "RMSprop: the optimizer state has an unexpected entry 'decoder' (no parameter there)"),
    ("a checkpoint with a mis-shaped `v`",
     lambda: _load_checkpoint(lambda s: s.update({"layers.1.bias.v": mx.zeros((3,))})), ValueError,
     "RMSprop: the optimizer state entry 'layers.1.bias.v' is (3,) mlx.core.float32, but the parameter is (2,) mlx.core.float32"),
    ("a checkpoint with a `v` of another dtype",
     lambda: _load_checkpoint(lambda s: s.update({"layers.1.bias.v": mx.zeros((2,), dtype=mx.float16)})),
     ValueError,
     "RMSprop: the optimizer state entry 'layers.1.bias.v' is (2,) mlx.core.float16, but the parameter is (2,) mlx.core.float32"),
    ("an 8-bit checkpoint with a mis-shaped `v_scale`",
     lambda: _load_checkpoint(lambda s: s.update({"layers.0.weight.v_scale": mx.zeros((2,))}),
                              state_bits=8, min_8bit_size=0), ValueError,
     "RMSprop: the optimizer state entry 'layers.0.weight.v_scale' is (2,) mlx.core.float32, but the parameter is (4, 3) mlx.core.float32 (this entry: (1,) mlx.core.float32)"),
    ("a checkpoint without `step`",
     lambda: _load_checkpoint(lambda s: s.pop("step")), ValueError,
     "RMSprop: the optimizer state has no entry 'step'"),
    ("a checkpoint whose `step` is text",
     lambda: _load_checkpoint(lambda s: s.update(step="12")), ValueError,
     "RMSprop: the optimizer state entry 'step' is str, expected an array or a number"),
    ("`rmsprop_update` with a non-scalar lr",
     lambda: _op(lr=mx.ones((2,))), ValueError,
     "[rmsprop_update] learning rate must be a scalar, got shape (2)."),
    ("`rmsprop_update` with a complex lr",
     lambda: _op(lr=mx.array(0.1 + 1j)), ValueError,
     "[rmsprop_update] learning rate must be real, got complex64."),
    ("`rmsprop_update` on bool arrays",
     lambda: _op(*(mx.ones((3,), dtype=mx.bool_),) * 3), ValueError,
     "[rmsprop_update] parameter dtype bool is not supported on Device(cpu, 0); RMSprop updates float32, float16 and bfloat16 parameters (and float64 on the CPU)."),
    ("`rmsprop_update` with a state of another shape",
     lambda: _op(v=mx.ones((4,))), ValueError,
     "[rmsprop_update] state 'v' shape (4) does not match parameter shape (3)."),
    ("`rmsprop_update` with a state of another dtype",
     lambda: _op(v=mx.ones((3,), dtype=mx.float16)), ValueError,
     "[rmsprop_update] state 'v' dtype float16 does not match parameter dtype float32."),
    ("`rmsprop_update` with `alpha=nan`",
     lambda: _op(alpha=float("nan")), ValueError,
     "[rmsprop_update] alpha must be a finite number >= 0, got nan."),
    ("`rmsprop_update` with `alpha=inf`",
     lambda: _op(alpha=float("inf")), ValueError,
     "[rmsprop_update] alpha must be a finite number >= 0, got inf."),
    ("`rmsprop_update` with `eps=0`",
     lambda: _op(eps=0.0), ValueError,
     "[rmsprop_update] eps must be a finite number > 0, got 0."),
    ("`rmsprop_update` with `eps=inf`",
     lambda: _op(eps=float("inf")), ValueError,
     "[rmsprop_update] eps must be a finite number > 0, got inf."),
    ("`rmsprop_step` without the state its options keep",
     lambda: _variant_op(centered=True), ValueError,
     "[rmsprop_step] state must hold exactly ['v', 'mean'] for these options, got ['v']."),
    ("`rmsprop_step` with bias correction but no step count",
     lambda: _variant_op(bias_correction=True), ValueError,
     "[rmsprop_step] bias_correction needs the step count (step=...)."),
    ("`rmsprop_step` with state of two dtypes",
     lambda: _variant_op(mx.bfloat16, (mx.float32, mx.bfloat16), centered=True), ValueError,
     "[rmsprop_step] state 'mean' dtype bfloat16 does not match parameter dtype bfloat16 (nor float32, the other state dtype for bfloat16 parameters) the way state 'v' (float32) does."),
    ("`rmsprop_step` with `momentum=-1`",
     lambda: _variant_op(momentum=-1.0), ValueError,
     "[rmsprop_step] momentum must be a finite number >= 0, got -1."),
    ("`rmsprop_step` with `momentum=inf`",
     lambda: _variant_op(state_dtypes=(mx.float32,) * 2, names=["v", "momentum_buffer"],
                         momentum=float("inf")), ValueError,
     "[rmsprop_step] momentum must be a finite number >= 0, got inf."),
    ("`rmsprop_step` with `weight_decay=nan`",
     lambda: _variant_op(weight_decay=float("nan")), ValueError,
     "[rmsprop_step] weight_decay must be a finite number >= 0, got nan."),
    ("`rmsprop_step` with `nesterov=True` and no momentum",
     lambda: _variant_op(nesterov=True), ValueError,
     "[rmsprop_step] nesterov needs momentum > 0, got momentum=0."),
    ("`rmsprop_step` with bias correction and a step count that is not a scalar",
     lambda: _variant_op(bias_correction=True, step=mx.array([1, 2])), ValueError,
     "[rmsprop_step] step must be a scalar, got shape (2)."),
    ("`rmsprop_step` with float32 state beside a float64 parameter",
     lambda: _variant_op(mx.float64, (mx.float32,), weight_decay=0.1), ValueError,
     "[rmsprop_step] state 'v' dtype float32 does not match parameter dtype float64."),
    ("`mx.grad` through the update",
     lambda: mx.grad(lambda p: rmsprop_update(p, p, p, 0.1, alpha=0.9, eps=1e-8)[0].sum())(mx.ones((3,))),
     ValueError,
     "[FusedRMSprop] an optimizer step has no vjp; differentiate the loss, not the update."),
    ("`mx.vmap` over the update",
     lambda: mx.vmap(lambda p: rmsprop_update(p, p, p, 0.1, alpha=0.9, eps=1e-8)[0])(mx.ones((2, 3))),
     ValueError,
     "[FusedRMSprop] vmap over an optimizer step is not supported; apply it to each leaf instead."),
]


def markdown_table() -> str:
    rows = ["| bad input | exception | message |", "|---|---|---|"]
    for what, _, exc, message in CASES:
        rows.append(f"| {what} | `{exc.__name__}` | `{message}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
