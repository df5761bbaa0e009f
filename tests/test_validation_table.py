"""Every validated public argument against the same bad values, from one table.

Each row of ROWS is one argument as a user sets it -- a constructor option, a
preset's argument, ``sharded()``'s, an op's (``rmsprop_update`` /
``rmsprop_step``), a value assigned between steps, a loaded checkpoint's
scalar entry -- with the values of VALUES it accepts and the message fragment
(a regular expression naming the argument) every other value must raise as a
``ValueError``. Accepted means the step (or the op) runs; a rejected step
must leave the parameters, the state and the step counter as they were.

A new option is one more row per place it can be set, e.g.
``ctor("state_bits", ZERO)`` (and its preset and assignment rows).
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_fused_rmsprop as fused
from mlx_fused_rmsprop import RMSprop, rmsprop_step, rmsprop_update
from mlx_fused_rmsprop.optimizer import PACKAGE_OPTIONS

# The values every argument is tried with (label -> value).
VALUES: dict[str, Any] = {
    "nan": math.nan,
    "+inf": math.inf,
    "-inf": -math.inf,
    "True": True,
    "False": False,
    "'0.5'": "0.5",  # a number read from a config file and never converted
    "None": None,
    "0": 0,
    "-1": -1,
}

# What a kind of argument accepts of VALUES.
NONE = frozenset()
ZERO = frozenset({"0"})
FLAG = frozenset({"True", "False"})
ONLY_NONE = frozenset({"None"})
ZERO_OR_NONE = ZERO | ONLY_NONE
# A learning rate is never range-checked, as in mlx.optimizers: NaN, inf and
# negative rates run (tests/test_numerics.py: test_unusual_learning_rates_...).
ANY_NUMBER = frozenset({"nan", "+inf", "-inf", "0", "-1"})

W = mx.array([0.5, -1.0, 2.0])
G = mx.array([0.1, 0.2, -0.3])
GROUP = mx.distributed.init()  # the singleton group: the sharded code path, one process


@dataclass(frozen=True)
class Row:
    argument: str  # as the user writes it
    attempt: Callable[[Any], None]  # sets the argument to a value and runs what checks it
    accepted: frozenset  # labels of VALUES that must be accepted
    error: str  # regex every rejection's message must contain
    errors: dict = field(default_factory=dict)  # label -> regex, where another rule fires first


# ---- Running one step and checking that a failed one changed nothing.


def _params() -> dict:
    return {"w": mx.array(W)}


def _one_step(opt: RMSprop, steps_before: int = 0) -> None:
    """One step of ``opt``; it must run and count."""
    out = opt.apply_gradients({"w": G}, _params())
    mx.eval(out, opt.state)
    assert out["w"].shape == W.shape and out["w"].dtype == W.dtype
    assert int(opt.step) == steps_before + 1


def _snapshot(opt: RMSprop, params: dict) -> list:
    flat = tree_flatten({"state": opt.state, "params": params})
    return [(k, mx.array(v) if isinstance(v, mx.array) else v) for k, v in flat]


def _same(a: list, b: list) -> bool:
    def equal(x, y):
        if isinstance(x, mx.array) and isinstance(y, mx.array):
            return x.dtype == y.dtype and x.shape == y.shape and mx.array_equal(x, y, equal_nan=True).item()
        # A bad scalar the state still holds (it is checked, not replaced).
        return x is y or x == y or (x != x and y != y)

    return [k for k, _ in a] == [k for k, _ in b] and all(equal(x, y) for (_, x), (_, y) in zip(a, b))


def _step_changes_nothing_if_it_fails(opt: RMSprop, params: dict, change: Callable[[], None]) -> None:
    """``change()`` then a step; if either raises, nothing that was there
    before the step (parameters, state, step counter) has changed."""
    before = None
    try:
        change()
        before = _snapshot(opt, params)
        out = opt.apply_gradients({"w": G}, params)
        mx.eval(out, opt.state)
    except ValueError:
        if before is not None:
            assert _same(_snapshot(opt, params), before), "a rejected step changed something"
        raise


# ---- How each kind of argument is set.


def ctor(name: str, accepted: frozenset, error: str = "", **base: Any) -> Row:
    def attempt(value: Any) -> None:
        _one_step(RMSprop(**{"learning_rate": 0.1, **base, name: value}))

    return Row(f"RMSprop({name}=)", attempt, accepted, error or rf"RMSprop {name} should be")


def preset(method: str, name: str, accepted: frozenset, **base: Any) -> Row:
    lr_name = "lr" if method == "from_torch" else "learning_rate"

    def attempt(value: Any) -> None:
        _one_step(getattr(RMSprop, method)(**{lr_name: 0.1, **base, name: value}))

    return Row(f"RMSprop.{method}({name}=)", attempt, accepted, rf"RMSprop\.{method} {name} should be")


def assigned(name: str, accepted: frozenset, error: str, first_step: bool = True,
             errors: Optional[dict] = None, **base: Any) -> Row:
    """``opt.<name> = value`` after one step (or, first_step=False, before
    the state exists), then a step."""

    def attempt(value: Any) -> None:
        opt = RMSprop(0.1, **base)
        params = _params()
        if first_step:
            params = opt.apply_gradients({"w": G}, params)
            mx.eval(params, opt.state)
        _step_changes_nothing_if_it_fails(opt, params, lambda: setattr(opt, name, value))
        assert int(opt.step) == 1 + first_step

    when = "between steps" if first_step else "before the first step"
    return Row(f"opt.{name} = ({when})", attempt, accepted, error, errors or {})


def loaded(entry: str, accepted: frozenset, error: str, sharded: bool = False) -> Row:
    """A checkpoint (of mlx.optimizers.RMSprop's layout) whose ``entry`` is
    ``value``, loaded into a fresh optimizer (sharded: over the singleton
    group), then a step."""

    def attempt(value: Any) -> None:
        saved = RMSprop(0.1)
        params = saved.apply_gradients({"w": G}, _params())
        mx.eval(params, saved.state)
        state = {**saved.state, "w": dict(saved.state["w"]), entry: value}
        opt = RMSprop(0.1, shard_group=GROUP) if sharded else RMSprop(0.1)
        _step_changes_nothing_if_it_fails(opt, params, lambda: setattr(opt, "state", state))
        assert int(opt.step) == (int(value) if entry == "step" else 1) + 1

    where = "sharded optimizer" if sharded else "optimizer"
    return Row(f"{where}.state = {{'{entry}': ...}}", attempt, accepted, error)


def update_op(name: str, accepted: frozenset) -> Row:
    def attempt(value: Any) -> None:
        args = {"lr": 0.1, "alpha": 0.9, "eps": 1e-8, name: value}
        lr = args.pop("lr")
        param, v = rmsprop_update(G, W, mx.zeros_like(W), lr, **args)
        mx.eval(param, v)
        assert param.shape == v.shape == W.shape

    return Row(f"rmsprop_update({name}=)", attempt, accepted, rf"\[rmsprop_update\] {name} must be")


def step_op(name: str, accepted: frozenset, errors: Optional[dict] = None) -> Row:
    """rmsprop_step with bias correction (so every option is read) and
    momentum (so the messages name rmsprop_step)."""

    def attempt(value: Any) -> None:
        args = {"lr": 0.1, "step": 1, "momentum": 0.5, "bias_correction": True, name: value}
        momentum, centered = args["momentum"], args.get("centered") is True
        names = ["v"] + ["mean"] * centered
        if isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and momentum > 0:
            names.append("momentum_buffer")
        lr = args.pop("lr")
        param, state = rmsprop_step(G, W, {n: mx.zeros_like(W) for n in names}, lr, **args)
        mx.eval(param, state)
        assert param.shape == W.shape and sorted(state) == sorted(names)

    return Row(f"rmsprop_step({name}=)", attempt, accepted, rf"\[rmsprop_step\] {name} must be", errors or {})


def sharded_method(name: str, accepted: frozenset, error: str) -> Row:
    def attempt(value: Any) -> None:
        args = {"group": GROUP, "bucket_bytes": 64, name: value}
        _one_step(RMSprop(0.1).sharded(args["group"], bucket_bytes=args["bucket_bytes"]))

    return Row(f"RMSprop(...).sharded({name}=)", attempt, accepted, error)


FLAGS = ["nesterov", "centered", "decoupled_weight_decay", "eps_in_sqrt", "bias_correction",
         "maximize", "lr_inside_momentum"]

# Each preset's arguments and what they accept of VALUES.
PRESETS = {
    "from_torch": {"lr": ANY_NUMBER, "alpha": ZERO, "eps": NONE, "weight_decay": ZERO,
                   "momentum": ZERO, "centered": FLAG, "maximize": FLAG},
    "from_optax": {"learning_rate": ANY_NUMBER, "decay": ZERO, "eps": NONE, "initial_scale": ZERO,
                   "eps_in_sqrt": FLAG, "centered": FLAG,
                   "momentum": ZERO | ONLY_NONE,  # optax's default None: no momentum
                   # Without momentum optax ignores nesterov, but not one that is no bool.
                   "nesterov": FLAG, "bias_correction": FLAG},
    "from_keras": {"learning_rate": ANY_NUMBER, "rho": ZERO, "momentum": ZERO, "epsilon": NONE,
                   "centered": FLAG,
                   "weight_decay": ZERO | ONLY_NONE},  # Keras' default None: no decay
}

# The package's own options (the constructor's and, passed through, every
# preset's) and what they accept of VALUES (8 and other positive values are
# tried by the features' own tests).
MEMORY_OPTIONS = {
    "state_bits": ONLY_NONE,
    "min_8bit_size": ZERO,
    "stochastic_rounding": FLAG,
    "seed": ZERO_OR_NONE,
    "kahan_summation": FLAG,
    "max_grad_norm": ZERO_OR_NONE,
    "skip_nonfinite": FLAG,
}


def preset_option(method: str, name: str, accepted: frozenset) -> Row:
    """One of the package's options through a preset: the constructor's rule
    and message, named by the preset."""
    lr_name = "lr" if method == "from_torch" else "learning_rate"

    def attempt(value: Any) -> None:
        _one_step(getattr(RMSprop, method)(**{lr_name: 0.1, name: value}))

    return Row(f"RMSprop.{method}({name}=)", attempt, accepted, rf"RMSprop\.{method} {name} should be")

ROWS: list[Row] = [
    # The constructor.
    ctor("learning_rate", ANY_NUMBER),
    ctor("alpha", ZERO),
    # mlx's range messages name eps "epsilon" ("RMSprop epsilon should be >0").
    ctor("eps", NONE, r"RMSprop (epsilon|eps) should be"),
    ctor("momentum", ZERO),
    ctor("weight_decay", ZERO),
    ctor("initial_scale", ZERO),
    *[ctor(f, FLAG, momentum=0.5) for f in FLAGS],
    ctor("state_dtype", ONLY_NONE),
    *[ctor(name, accepted) for name, accepted in MEMORY_OPTIONS.items()],
    ctor("shard_group", ONLY_NONE),
    ctor("shard_bucket_bytes", NONE, shard_group=GROUP),
    # The presets, each naming its own arguments.
    *[preset(method, name, accepted) for method, arguments in PRESETS.items()
      for name, accepted in arguments.items()],
    *[preset_option(method, name, accepted) for method in PRESETS
      for name, accepted in {**MEMORY_OPTIONS, "state_dtype": ONLY_NONE}.items()],
    # sharded().
    sharded_method("group", ONLY_NONE, r"RMSprop shard_group should be"),
    sharded_method("bucket_bytes", NONE, r"RMSprop shard_bucket_bytes should be an int > 0"),
    # The ops.
    update_op("lr", ANY_NUMBER),
    update_op("alpha", ZERO),
    update_op("eps", NONE),
    step_op("lr", ANY_NUMBER),
    step_op("step", NONE, {"None": r"\[rmsprop_step\] bias_correction needs the step count"}),
    step_op("alpha", ZERO),
    step_op("eps", NONE),
    step_op("momentum", ZERO),
    # weight_decay=inf would make every parameter NaN.
    step_op("weight_decay", ZERO),
    *[step_op(f, FLAG) for f in FLAGS],
    step_op("state_bits", ONLY_NONE),
    step_op("min_8bit_size", ZERO),
    step_op("stochastic_rounding", FLAG),
    step_op("seed", ZERO_OR_NONE),
    step_op("kahan_summation", FLAG),
    step_op("leaf", ZERO),
    # Values assigned between steps (as on mlx.optimizers.RMSprop).
    assigned("learning_rate", ANY_NUMBER, r"RMSprop learning_rate should be"),
    assigned("alpha", ZERO, r"alpha (must|should) be"),
    assigned("eps", NONE, r"eps (must|should) be"),
    assigned("momentum", ZERO, r"momentum (must|should) be"),
    assigned("weight_decay", ZERO, r"weight_decay (must|should) be"),
    assigned("initial_scale", ZERO, r"RMSprop initial_scale should be"),
    assigned("initial_scale", ZERO, r"RMSprop initial_scale should be", first_step=False),
    assigned("state_dtype", ONLY_NONE, r"RMSprop state_dtype should be"),
    assigned("state_dtype", ONLY_NONE, r"RMSprop state_dtype should be", first_step=False),
    # nesterov=True needs momentum; centered=True a 'mean' the state was not made with.
    assigned("nesterov", FLAG, r"RMSprop nesterov should be", momentum=0.5),
    assigned("centered", frozenset({"False"}), r"RMSprop centered should be",
             errors={"True": r"the optimizer state has no entry 'mean'"}),
    *[assigned(f, FLAG, rf"RMSprop {f} should be")
      for f in ["decoupled_weight_decay", "eps_in_sqrt", "bias_correction", "maximize", "lr_inside_momentum"]],
    assigned("shard_bucket_bytes", NONE, r"RMSprop shard_bucket_bytes should be", shard_group=GROUP),
    *[assigned(name, accepted, rf"RMSprop {name} should be")
      for name, accepted in MEMORY_OPTIONS.items() if name != "seed"],
    # A loaded checkpoint's scalar entries: mlx.optimizers keeps 'step' as a
    # uint64 array (0 before the first step), 'learning_rate' as float32.
    loaded("step", ZERO, r"the optimizer state entry 'step' is"),
    loaded("learning_rate", ANY_NUMBER, r"the optimizer state entry 'learning_rate' is"),
    loaded("step", ZERO, r"the optimizer state entry 'step' is", sharded=True),
    loaded("learning_rate", ANY_NUMBER, r"the optimizer state entry 'learning_rate' is", sharded=True),
    # The scalar entries of the package's options (a seed, the guards' report).
    loaded("seed", ZERO, r"the optimizer state entry 'seed' is"),
    loaded("grad_norm", ANY_NUMBER, r"the optimizer state entry 'grad_norm' is"),
    loaded("skipped_steps", ZERO, r"the optimizer state entry 'skipped_steps' is"),
    loaded("seed", ZERO, r"the optimizer state entry 'seed' is", sharded=True),
]

CELLS = [(row, label) for row in ROWS for label in VALUES]


def markdown_table() -> str:
    """The validation table docs/reliability.md shows (`python
    tests/test_validation_table.py` prints it): the arguments grouped by
    which of VALUES they accept."""
    groups: dict[tuple, list[str]] = {}
    for row in ROWS:
        accepted = tuple(label for label in VALUES if label in row.accepted)
        groups.setdefault(accepted, []).append(row.argument)
    lines = ["| accepts | arguments |", "|---|---|"]
    for accepted, arguments in groups.items():
        shown = ", ".join(f"`{label}`" for label in accepted) or "none of them"
        lines.append(f"| {shown} | {', '.join(f'`{a}`' for a in dict.fromkeys(arguments))} |")
    return "\n".join(lines)


def test_the_reliability_page_shows_the_table():
    page = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    assert markdown_table() in page, "regenerate it: python tests/test_validation_table.py"


@pytest.mark.parametrize("row,label", CELLS, ids=[f"{r.argument}-{label}" for r, label in CELLS])
def test_each_value_is_accepted_or_rejected_naming_the_argument(row: Row, label: str):
    value = VALUES[label]
    if label in row.accepted:
        row.attempt(value)
        return
    with pytest.raises(ValueError, match=row.errors.get(label, row.error)):
        row.attempt(value)


def test_the_table_names_every_constructor_option_and_preset_argument():
    """A new option or preset argument needs its row (the check that makes
    this table grow with the code)."""
    import inspect

    covered = {r.argument for r in ROWS}
    for name in list(inspect.signature(RMSprop.__init__).parameters)[1:]:
        assert f"RMSprop({name}=)" in covered, name
    for method in ("from_torch", "from_optax", "from_keras"):
        for name, p in inspect.signature(getattr(RMSprop, method)).parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                # The package's own options, passed through: each has its rows.
                for option in PACKAGE_OPTIONS:
                    assert f"RMSprop.{method}({option}=)" in covered, (method, option)
                continue
            assert f"RMSprop.{method}({name}=)" in covered, (method, name)
    for name in list(inspect.signature(rmsprop_step).parameters)[3:]:
        if name != "stream":
            assert f"rmsprop_step({name}=)" in covered, name
    assert {"rmsprop_update(lr=)", "rmsprop_update(alpha=)", "rmsprop_update(eps=)"} <= covered
    assert {f"RMSprop(...).sharded({n}=)" for n in ("group", "bucket_bytes")} <= covered


def test_a_rejected_sharded_value_fails_as_a_sharded_step_error():
    """On a sharded optimizer a bad value met at the step fails every rank
    alike: the error is a ShardedStepError (a ValueError) naming it."""
    opt = RMSprop(0.1, shard_group=GROUP)
    _one_step(opt)
    opt.shard_bucket_bytes = True
    with pytest.raises(fused.ShardedStepError, match=r"RMSprop shard_bucket_bytes should be an int > 0, True"):
        opt.apply_gradients({"w": G}, _params())
    assert int(opt.step) == 1


# Values of other kinds. Where an array may stand for a number (a checkpoint's
# scalar entries, the learning rate, the op's step), its kind and size are
# checked (never its value, which the step may not read: it can run under
# mx.compile). A state dtype is None or float32, set when or after constructed.
MORE_VALUES = [  # (row, value, regex of the rejection or None when accepted)
    (loaded("step", ZERO, ""), mx.array(3, mx.uint64), None),
    (loaded("step", ZERO, ""), mx.array([3], mx.int32), None),
    (loaded("step", ZERO, ""), mx.array(True), r"entry 'step' is an array of shape \(\) and dtype mlx.core.bool"),
    (loaded("step", ZERO, ""), mx.array(3.0), r"entry 'step' is an array .* mlx.core.float32, expected one integer element"),
    (loaded("step", ZERO, ""), mx.array([1, 2], mx.uint64), r"entry 'step' is an array of shape \(2,\)"),
    (loaded("step", ZERO, "", sharded=True), mx.array(True), r"entry 'step' is an array"),
    (loaded("learning_rate", ZERO, ""), mx.array(0.5, mx.float16), None),
    (loaded("learning_rate", ZERO, ""), mx.array(True), r"entry 'learning_rate' is an array .* mlx.core.bool, expected one real element"),
    (loaded("learning_rate", ZERO, ""), mx.array([0.1, 0.2]), r"entry 'learning_rate' is an array of shape \(2,\)"),
    (assigned("learning_rate", ZERO, ""), mx.array(0.5, mx.float16), None),
    (assigned("learning_rate", ZERO, ""), mx.array(True), r"learning rate must be a number, got bool"),
    (update_op("lr", ZERO), mx.array(True), r"\[rmsprop_update\] learning rate must be a number, got bool"),
    (step_op("lr", ZERO), mx.array(True), r"\[rmsprop_step\] learning rate must be a number, got bool"),
    (step_op("step", ZERO), mx.array(2, mx.int32), None),
    (step_op("step", ZERO), mx.array(True), r"\[rmsprop_step\] step must be a number, got bool"),
    (ctor("state_dtype", ZERO), mx.float32, None),
    (ctor("state_dtype", ZERO), mx.bfloat16, r"RMSprop state_dtype should be None .* mlx.core.bfloat16 was"),
    (assigned("state_dtype", ZERO, ""), mx.float32, None),
    (assigned("state_dtype", ZERO, ""), mx.float16, r"RMSprop state_dtype should be None .* mlx.core.float16 was"),
    (assigned("state_dtype", ZERO, "", first_step=False), mx.float16, r"RMSprop state_dtype should be None"),
    # 8 is the one width of quantized state; a seed is a uint32.
    (ctor("state_bits", ZERO), 8, None),
    (ctor("state_bits", ZERO), 4, r"RMSprop state_bits should be None \(full precision\) or 8, 4 was"),
    (ctor("state_bits", ZERO), 16, r"RMSprop state_bits should be None \(full precision\) or 8, 16 was"),
    (step_op("state_bits", ZERO), 4, r"\[rmsprop_step\] state_bits must be"),
    (ctor("seed", ZERO), 2**32 - 1, None),
    (ctor("seed", ZERO), 2**32, r"RMSprop seed should be None or an int in \[0, 2\*\*32\), 4294967296 was"),
    (ctor("seed", ZERO), mx.array(7, mx.uint32), None),
    (ctor("seed", ZERO), mx.array(1.5), r"RMSprop seed should be a single integer"),
    (ctor("seed", ZERO), mx.array([1, 2], mx.uint32), r"RMSprop seed should be a single integer"),
]


def _shown(value: Any) -> str:
    return f"{value.dtype}{value.shape}" if isinstance(value, mx.array) else str(value)


@pytest.mark.parametrize("row,value,error", MORE_VALUES, ids=[f"{r.argument}-{_shown(v)}" for r, v, _ in MORE_VALUES])
def test_arrays_and_dtypes_are_checked_for_kind_and_size(row: Row, value: Any, error: Optional[str]):
    if error is None:
        row.attempt(value)
        return
    with pytest.raises(ValueError, match=error):
        row.attempt(value)


if __name__ == "__main__":
    print(markdown_table())
