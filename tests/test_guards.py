"""The step's guards (issue 20), on the CPU: global-norm clipping fused into
the update (bit-identical to mlx.optimizers.clip_grad_norm followed by the
update), the norm's own fused reduction, and skipping steps whose gradients
are not finite (eagerly, under mx.compile, with the other options, sharded).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from distributed_cases import gradients_at
from mlx_fused_rmsprop import RMSprop, _ext, rmsprop_update
from oracle import assert_trees_bit_equal_in_any_order, bit_equal, count_worse_than_reference
from test_distributed import assert_trees_equal, launch, rank_parameters
from test_optimizer import MLP

LR, ALPHA, EPS = 1e-2, 0.9, 1e-8
COUNTERS = ("grad_norm", "skipped_steps")


def _without_counters(state: dict) -> dict:
    """An optimizer state without the guards' report (what
    mlx.optimizers.RMSprop and an unguarded RMSprop keep)."""
    return {k: v for k, v in state.items() if k not in COUNTERS}


# ---- Real models: nn.Linear's weight gradients come transposed.


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.encoder = nn.TransformerEncoder(num_layers=1, dims=16, num_heads=2, mlp_dims=32)
        self.head = nn.Linear(16, 3)

    def __call__(self, x):
        return self.head(self.encoder(self.embed(x), None))


MODELS = {"mlp": MLP, "transformer": TinyTransformer}


def _loss(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    return mx.mean(mx.square(model(x).astype(mx.float32) - y))


def _batches(kind: str, steps: int, dtype: mx.Dtype = mx.float32) -> list:
    rng = np.random.default_rng(1)
    shape = (16, 12) if kind == "mlp" else (4, 6, 12)
    out_shape = shape[:-1] + (3,)
    return [(mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype),
             mx.array(rng.standard_normal(out_shape).astype(np.float32)))
            for _ in range(steps)]


def _model(kind: str, dtype: mx.Dtype = mx.float32) -> nn.Module:
    mx.random.seed(3)
    m = MODELS[kind]()
    m.set_dtype(dtype)
    mx.eval(m.parameters())
    return m


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("clipping", ["active", "inactive"])
def test_clipping_is_bit_identical_to_clip_grad_norm_then_the_update(kind, clipping):
    """12 steps of a real model, three ways: RMSprop(max_grad_norm=m);
    clip_grad_norm then our RMSprop; clip_grad_norm then
    mlx.optimizers.RMSprop. The parameters and state are bit-identical every
    step, and opt.grad_norm is clip_grad_norm's total bit for bit."""
    max_norm = 0.05 if clipping == "active" else 1e6
    models = [_model(kind) for _ in range(3)]
    fused = RMSprop(LR, ALPHA, EPS, max_grad_norm=max_norm)
    ours = RMSprop(LR, ALPHA, EPS)
    mlx_opt = optim.RMSprop(LR, ALPHA, EPS)
    transposed = 0
    for x, y in _batches(kind, 12):
        grads = [nn.value_and_grad(m, _loss)(m, x, y)[1] for m in models]
        params = dict(tree_flatten(models[0].parameters()))
        transposed += sum(_ext._cpu_walk(g, params[k], params[k]) == "transposed"
                          for k, g in tree_flatten(grads[0]))
        fused.update(models[0], grads[0])
        clipped, total = optim.clip_grad_norm(grads[1], max_norm)
        ours.update(models[1], clipped)
        clipped2, _ = optim.clip_grad_norm(grads[2], max_norm)
        mlx_opt.update(models[2], clipped2)
        mx.eval([m.parameters() for m in models], fused.state, ours.state, mlx_opt.state)
        assert bit_equal(fused.grad_norm, total)
        assert (total.item() > max_norm) == (clipping == "active")
        for m in models[1:]:
            assert_trees_bit_equal_in_any_order(m.parameters(), models[0].parameters())
        assert_trees_bit_equal_in_any_order(_without_counters(fused.state), ours.state)
        assert_trees_bit_equal_in_any_order(ours.state, mlx_opt.state)
    assert transposed > 0, "no gradient had a transposed layout"
    assert int(fused.skipped_steps) == 0  # clipping alone never skips


def _v_entries(state: dict) -> dict:
    return {k[: -len(".v")]: v for k, v in tree_flatten(state) if k.endswith(".v")}


def test_float16_norm_equals_clip_grad_norm_and_the_update_is_at_least_as_accurate():
    """float16 gradients: grad_norm is clip_grad_norm's total bit for bit
    (both sum float16 squares in float32). The update scales the gradient
    in float32 and does not round it to 16 bits: each step is its float32
    twin's (parameter, state and g * c in float32) rounded once to float16,
    so per element it is at least as close to the float64 truth of the step
    with the clipped gradient as clip_grad_norm (which rounds g * c to
    float16) then mlx.optimizers.RMSprop (which rounds after every
    operation)."""
    model = _model("mlp", mx.float16)
    opt = RMSprop(LR, ALPHA, EPS, max_grad_norm=0.05)
    opt.init(model.trainable_parameters())
    for x, y in _batches("mlp", 6, mx.float16):
        _, grads = nn.value_and_grad(model, _loss)(model, x, y)
        clipped, total = optim.clip_grad_norm(grads, 0.05)
        factor = mx.minimum(0.05 / (total + 1e-6), 1.0)
        params_before, v_before = dict(tree_flatten(model.parameters())), _v_entries(opt.state)
        reference = optim.RMSprop(LR, ALPHA, EPS)
        reference.state = tree_map(lambda a: a, _without_counters(opt.state))
        ref_params = dict(tree_flatten(reference.apply_gradients(clipped, model.parameters())))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, ref_params, reference.state)
        assert bit_equal(opt.grad_norm, total)
        assert total.item() > 0.05
        ours, ours_v, ref_v = dict(tree_flatten(model.parameters())), _v_entries(opt.state), _v_entries(reference.state)
        for key, g in tree_flatten(grads):
            scaled = g.astype(mx.float32) * factor  # exact: what the kernel multiplies
            twin_w, twin_v = rmsprop_update(scaled, params_before[key].astype(mx.float32),
                                            v_before[key].astype(mx.float32), LR, alpha=ALPHA, eps=EPS)
            assert bit_equal(ours[key], twin_w.astype(mx.float16)), key
            assert bit_equal(ours_v[key], twin_v.astype(mx.float16)), key
            counts = count_worse_than_reference(
                (ours[key], ours_v[key]), (ref_params[key], ref_v[key]), scaled,
                params_before[key], v_before[key], LR, ALPHA, EPS)
            assert counts == {"param": 0, "v": 0}, (key, counts)


def test_bfloat16_norm_sums_in_float32():
    """bfloat16 gradients: clip_grad_norm squares and sums them in bfloat16;
    ours widens them to float32 first. What is compared: grad_norm equals
    sqrt of the float32 sum of the float32 squares bit for bit, is within
    float32 rounding of the float64 norm, and is no further from it than
    clip_grad_norm's total."""
    model = _model("mlp", mx.bfloat16)
    opt = RMSprop(LR, max_grad_norm=0.05)
    x, y = _batches("mlp", 1, mx.bfloat16)[0]
    _, grads = nn.value_and_grad(model, _loss)(model, x, y)
    opt.update(model, grads)
    _, total = optim.clip_grad_norm(grads, 0.05)
    squares = [mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads)]
    widened = mx.sqrt(sum(squares[1:], squares[0]))
    mx.eval(opt.state, total, widened)
    assert bit_equal(opt.grad_norm, widened)
    truth = np.sqrt(sum((np.array(g.astype(mx.float64, stream=mx.cpu)) ** 2).sum()
                        for _, g in tree_flatten(grads)))
    ours = opt.grad_norm.item()
    assert abs(ours - truth) <= 1e-6 * truth
    assert abs(ours - truth) <= abs(total.item() - truth)


# ---- The fused norm itself.


def _layouts(dtype: mx.Dtype, rng: np.random.Generator) -> dict:
    def rand(*shape):
        return mx.array(rng.standard_normal(shape)).astype(dtype)

    base = rand(300, 170)
    return {
        "row-major": base,
        "transposed": mx.transpose(base),
        "sliced": base[3:-5:2, 1::3],
        "broadcast": mx.broadcast_to(rand(1, 170), (300, 170)),
        "broadcast columns": mx.broadcast_to(rand(300, 1), (300, 170)),
        "broadcast middle axis": mx.broadcast_to(rand(30, 1, 17), (30, 5, 17)),
        "broadcast transposed": mx.broadcast_to(mx.transpose(rand(5, 6, 7), (1, 2, 0))[:, None],
                                                (6, 4, 7, 5)),
        "filled": mx.full((300, 7), 0.37, dtype),
        "empty": rand(0, 4),
        "one": rand(1),
        "0-d": rand(),
        "large": rand((1 << 20) + 3),
    }


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16, mx.float64],
                         ids=["float32", "float16", "bfloat16", "float64"])
def test_squared_norm_equals_mlx_sum_of_squares(dtype):
    """_ext.squared_norm (the fused read-only pass on the CPU) is
    mx.sum(mx.square(g.astype(float32))) bit for bit (float64 gradients: in
    float64), for every layout and size; float32 / float16 are what
    clip_grad_norm sums. (A broadcast keeps its layout through MLX's square
    and is summed in the order of MLX's reduction plan, a partial sum per
    contiguous run: the fused pass follows it.)"""
    assert _ext._fused_squared_norm()
    rng = np.random.default_rng(6)
    for name, g in _layouts(dtype, rng).items():
        wide = g if dtype == mx.float64 else g.astype(mx.float32)
        want = mx.sum(mx.square(wide))
        got = _ext.squared_norm(g)
        assert got.shape == () and got.dtype == want.dtype, name
        assert bit_equal(got, want), f"{name}: {got.item()!r} != {want.item()!r}"


def test_squared_norm_allocates_no_leaf_sized_temporary():
    """The fused norm of a 4M-element float32 leaf raises the peak memory
    by less than 0.1x the leaf (MLX's square().sum() by a whole leaf:
    the measurement sees temporaries)."""
    g = mx.random.normal((1 << 22,))
    mx.eval(g)

    def extra_peak(fn) -> float:
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(fn(g))
        mx.synchronize()
        return (mx.get_peak_memory() - base) / g.nbytes

    assert extra_peak(_ext.squared_norm) < 0.1
    assert extra_peak(lambda a: mx.sum(mx.square(a))) >= 0.9


# ---- Skipping non-finite steps.

SKIP_OPTIONS = {
    "skip": {"skip_nonfinite": True, "momentum": 0.5, "centered": True, "bias_correction": True},
    "clip+skip": {"skip_nonfinite": True, "max_grad_norm": 0.5, "bias_correction": True},
    "8bit+sr+skip": {"skip_nonfinite": True, "state_bits": 8, "min_8bit_size": 256,
                     "stochastic_rounding": True, "seed": 4, "momentum": 0.9},
}


class Leaves(nn.Module):
    """float32, float16 and bfloat16 parameters, one of them 8-bit-sized."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(2)
        self.a = mx.array(rng.standard_normal((20, 30)).astype(np.float32))
        self.b = mx.array(rng.standard_normal(300).astype(np.float32)).astype(mx.float16)
        self.c = mx.array(rng.standard_normal((7,)).astype(np.float32)).astype(mx.bfloat16)


def _grads(k: int, bad: str | None = None) -> dict:
    rng = np.random.default_rng(100 + k)
    grads = {"a": mx.array(rng.standard_normal((20, 30)).astype(np.float32)),
             "b": mx.array(rng.standard_normal(300).astype(np.float32)).astype(mx.float16),
             "c": mx.array(rng.standard_normal((7,)).astype(np.float32)).astype(mx.bfloat16)}
    if bad is not None:  # one element of one leaf
        value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[bad]
        b = np.array(grads["b"].astype(mx.float32))
        b[123] = value
        grads["b"] = mx.array(b).astype(mx.float16)
    return grads


def _runner(options: dict, compiled: bool):
    """A model, its optimizer (a schedule for the learning rate) and a step
    function of the gradients (under mx.compile, counting its traces)."""
    model = Leaves()
    opt = RMSprop(optim.linear_schedule(1e-2, 1e-3, 10), **options)
    opt.init(model.trainable_parameters())
    traces = []

    def step(grads):
        traces.append(1)
        opt.update(model, grads)

    if compiled:
        state = [model.state, opt.state]
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    return model, opt, step, traces


def _snapshot(model: nn.Module, opt: RMSprop) -> dict:
    return tree_map(lambda a: mx.array(a), {"params": model.parameters(), "state": opt.state})


def _snapshot_without_counters(snapshot: dict) -> dict:
    return {"params": snapshot["params"], "state": _without_counters(snapshot["state"])}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("options", SKIP_OPTIONS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_a_nonfinite_step_changes_nothing_but_the_counters(bad, options, compiled):
    """Steps 1, 2, a batch with one NaN / +-Inf gradient element, 3, 4:
    the bad step leaves the parameters, every state entry (8-bit codes and
    scales too), the step count and the scheduled learning rate as they
    were, reports grad_norm (not finite) and skipped_steps = 1; and the run
    ends bit-identical to the run that never saw the bad batch (the bias
    correction's t and the rounding's step did not advance). Compiled: one
    trace for all five steps."""
    model, opt, step, traces = _runner(SKIP_OPTIONS[options], compiled)
    clean_model, clean_opt, clean_step, _ = _runner(SKIP_OPTIONS[options], compiled)
    for k in range(2):
        step(_grads(k))
        clean_step(_grads(k))
        mx.eval(model.state, opt.state, clean_model.state, clean_opt.state)
    before = _snapshot(model, opt)
    step(_grads(2, bad))
    mx.eval(model.state, opt.state)
    after = _snapshot(model, opt)
    assert_trees_bit_equal_in_any_order(_snapshot_without_counters(after), _snapshot_without_counters(before))
    assert int(opt.skipped_steps) == 1 and int(opt.step) == 2
    norm = opt.grad_norm.item()
    assert np.isnan(norm) if bad == "nan" else norm == np.inf
    for k in range(2, 4):
        step(_grads(k))
        clean_step(_grads(k))
        mx.eval(model.state, opt.state, clean_model.state, clean_opt.state)
    assert_trees_bit_equal_in_any_order(_snapshot_without_counters(_snapshot(model, opt)),
                                        _snapshot_without_counters(_snapshot(clean_model, clean_opt)))
    assert bit_equal(opt.grad_norm, clean_opt.grad_norm)
    assert int(opt.skipped_steps) == 1 and int(clean_opt.skipped_steps) == 0
    assert int(opt.step) == 4
    if compiled:
        assert len(traces) == 1


@pytest.mark.parametrize("state_bits", [None, 8], ids=["full", "8-bit"])
def test_a_skipped_step_of_views_gives_back_their_values(state_bits):
    """A skipped step whose inputs are still held elsewhere (not donated)
    copies each input into its output element by element, in both layouts:
    a strided parameter (its outputs row-major) and column-major state
    entries (8-bit: codes column-major, scales strided) come back with the
    same values at the same indices."""
    rng = np.random.default_rng(29)
    shape = (40, 300)
    opt = RMSprop(1e-2, momentum=0.9, skip_nonfinite=True, state_bits=state_bits, min_8bit_size=256)
    params = opt.apply_gradients({"w": mx.array(rng.standard_normal(shape).astype(np.float32))},
                                 {"w": mx.array(rng.standard_normal(shape).astype(np.float32))})
    mx.eval(params, opt.state)

    def strided(a: mx.array) -> mx.array:  # every other column of an array twice as wide
        wide = mx.stack([a, mx.zeros_like(a)], axis=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])
        mx.eval(wide)
        return wide[..., ::2]

    def column_major(a: mx.array) -> mx.array:
        return mx.contiguous(a.T).T

    views = {"w": strided(params["w"])}
    state = {name: strided(a) if name.endswith("_scale") else column_major(a)
             for name, a in opt.state["w"].items()}
    opt.state = {**opt.state, "w": state}
    bad = mx.array(rng.standard_normal(shape).astype(np.float32))
    bad[3, 7] = mx.nan
    assert _ext._cpu_walk(bad, views["w"], state["v"]) == "strided"
    out = opt.apply_gradients({"w": bad}, views)
    mx.eval(out, opt.state)
    assert int(opt.skipped_steps) == 1 and int(opt.step) == 1
    assert np.array_equal(np.array(out["w"]), np.array(views["w"]))
    for name, a in state.items():
        assert np.array_equal(np.array(opt.state["w"][name]), np.array(a)), name


def test_eager_and_compiled_skipping_agree():
    """The same five steps (one of them skipped) eagerly and under
    mx.compile: bit-identical, counters included."""
    runs = []
    for compiled in (False, True):
        model, opt, step, _ = _runner(SKIP_OPTIONS["clip+skip"], compiled)
        for k, bad in enumerate([None, None, "nan", None, "inf"]):
            step(_grads(k, bad))
            mx.eval(model.state, opt.state)
        runs.append(_snapshot(model, opt))
    assert_trees_bit_equal_in_any_order(runs[1], runs[0])
    assert int(runs[0]["state"]["skipped_steps"]) == 2


def test_the_counters_live_in_the_state_and_checkpoints_keep_them(tmp_path):
    """grad_norm (0-d float32, the norm before clipping) and skipped_steps
    (0-d uint64) are state entries: saved and loaded with it."""
    model, opt, step, _ = _runner(SKIP_OPTIONS["clip+skip"], False)
    step(_grads(0, "inf"))
    step(_grads(1))
    mx.eval(opt.state)
    assert opt.grad_norm.dtype == mx.float32 and opt.grad_norm.shape == ()
    assert opt.skipped_steps.dtype == mx.uint64 and int(opt.skipped_steps) == 1
    want = np.sqrt(sum((np.array(g.astype(mx.float64)) ** 2).sum() for g in _grads(1).values()))
    assert abs(opt.grad_norm.item() - want) <= 1e-6 * want
    mx.save_safetensors(str(tmp_path / "s.safetensors"), dict(tree_flatten(opt.state)))
    loaded = RMSprop(1e-2, **SKIP_OPTIONS["clip+skip"])
    loaded.state = tree_unflatten(list(mx.load(str(tmp_path / "s.safetensors")).items()))
    assert int(loaded.skipped_steps) == 1 and bit_equal(loaded.grad_norm, opt.grad_norm)
    mx.eval(loaded.apply_gradients(_grads(2, "nan"), model.parameters()))
    assert int(loaded.skipped_steps) == 2 and int(loaded.step) == 1


def test_guards_on_the_singleton_group_equal_unsharded():
    """The sharded step's code path (one process): clipping and skipping as
    unsharded, bit for bit, counters included. (Launched ranks:
    tests/test_distributed.py.)"""
    group = mx.distributed.init()
    options = {**SKIP_OPTIONS["clip+skip"], "stochastic_rounding": True, "seed": 3}
    sharded = RMSprop(1e-2, shard_group=group, **options)
    plain = RMSprop(1e-2, **options)
    ps = pu = {k: v for k, v in Leaves().parameters().items()}
    for k, bad in enumerate([None, "nan", None]):
        ps = sharded.apply_gradients(_grads(k, bad), ps)
        pu = plain.apply_gradients(_grads(k, bad), pu)
        mx.eval(ps, pu, sharded.state, plain.state)
    assert_trees_bit_equal_in_any_order(ps, pu)
    assert int(sharded.skipped_steps) == 1 and int(sharded.step) == 2
    assert bit_equal(sharded.grad_norm, plain.grad_norm)


# ---- Sharded over launched ranks.

GUARDED = {"max_grad_norm": 0.05, "skip_nonfinite": True}
LAUNCHED = [("nan", 1), ("inf", 0), ("different", None)]


def test_sharded_guards_on_two_ranks(tmp_path):
    """2 launched ranks, clipping active and skipping on, 4 steps: where
    one rank's gradient holds a NaN or an Inf, every rank skips the step
    (nothing changes, skipped_steps = 1 everywhere); where the ranks are
    given different gradients, every rank raises the same ShardedStepError
    and nothing changes. Either way the run then equals the unsharded
    optimizer that never saw that batch, on every rank."""
    norm = mx.sqrt(_ext.tree_squared_norm(gradients_at(0, 0))).item()
    assert norm > 10 * GUARDED["max_grad_norm"]  # clipping is active
    cases = [{"how": how, "bad_rank": bad, "options": GUARDED} for how, bad in LAUNCHED]
    for i, ((how, _), reports) in enumerate(zip(LAUNCHED, launch(2, "guards", cases, tmp_path))):
        for r in reports:
            assert r["unchanged"] and r["equal_unsharded"] and r["step"] == 3, (how, r)
            if how == "different":
                assert r["error"]["type"] == "ShardedStepError"
                assert "hold other gradients than rank 0" in r["error"]["message"]
                assert r["skipped_steps"] == 0
            else:
                assert r["error"] is None and r["skipped_steps"] == 1, (how, r)
        assert len({r["error"]["message"] if r["error"] else None for r in reports}) == 1
        ranks = rank_parameters(tmp_path, 2, i)
        assert_trees_equal(ranks[1], ranks[0])
