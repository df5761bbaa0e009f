"""Stochastic rounding and Kahan-compensated updates of float16 / bfloat16
parameters (issue 19), on the CPU.

The kernel is held bit for bit to tests/rounding_model.py, a NumPy
reimplementation of kernels/rmsprop_math.h's hash, stochastic rounding and
Kahan store; the rest checks the properties the contract promises (a
neighbour, unbiased, deterministic, independent of threads, builds, layouts
and sharding) and that the options combine with the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import rounding_model as model
from distributed_cases import initial_parameters
from mlx_fused_rmsprop import RMSprop, _ext, rmsprop_step
from mlx_fused_rmsprop._sharding import make_plan
from oracle import assert_trees_bit_equal_in_any_order, bit_equal
from test_cpu_isa import _cpu_runs, _widest_isa
from test_distributed import assert_trees_equal, launch, rank_parameters
from test_optimizer import MLP
from test_variants import op_kwargs, option_grid

HALVES = {"float16": mx.float16, "bfloat16": mx.bfloat16}
F16_MAX = 65504.0
BF16_MAX = float(np.array(0x7F7F0000, np.uint32).view(np.float32))


def bits16(a: mx.array) -> np.ndarray:
    return np.array(mx.contiguous(a).view(mx.uint16)).reshape(-1)


def from_bits16(bits: np.ndarray, dtype: str) -> mx.array:
    return mx.array(np.asarray(bits, np.uint16)).view(HALVES[dtype])


def as_f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).reshape(-1)


def assert_same_bits(got: np.ndarray, want: np.ndarray, dtype: str, what: str) -> None:
    """16-bit patterns equal, except that any NaN equals any NaN (the
    contract keeps NaN a NaN; its payload is the conversion's)."""
    got_nan = np.isnan(model.bits_to_f32(got, dtype))
    want_nan = np.isnan(model.bits_to_f32(want, dtype))
    assert (got_nan == want_nan).all(), f"{what}: NaN at other elements"
    bad = ~got_nan & (got != want)
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} differ from the model, e.g. "
        f"{got[bad][:4]} != {want[bad][:4]}"
    )


def sr_step(w: mx.array, g: mx.array, lr: float, *, seed: int, step: int, leaf: int,
            eps: float = 1.0) -> mx.array:
    """One stochastically rounded step with alpha=0 and v=0, whose float32
    result is model.plain_update(w, g, 0, lr, 0, eps)."""
    out, _ = rmsprop_step(g, w, {"v": mx.zeros_like(w)}, lr, step=step, alpha=0.0, eps=eps,
                          stochastic_rounding=True, seed=seed, leaf=leaf)
    return out


# ---- The kernel against the model, over every 16-bit value.

LRS = {"float16": [3e-8, 1.7e-3, 0.37, 75.0], "bfloat16": [3e-8, 1.7e-3, 0.37, 75.0, 2.5e36]}


def _every_value_case(dtype: str, rng: np.random.Generator):
    """Every bit pattern as the parameter (twice, shuffled), gradients of both
    signs and magnitudes from 1e-6 to 1e3 (so g / (|g| + 1) takes any value
    in (-1, 1)), one in 64 of them zero, and zero where w is +-0 (x = +-0)."""
    w_bits = rng.permutation(np.tile(np.arange(65536, dtype=np.uint32), 2)).astype(np.uint16)
    g32 = rng.choice([-1.0, 1.0], w_bits.size) * 10.0 ** rng.uniform(-6, 3, w_bits.size)
    g32[(rng.random(w_bits.size) < 1 / 64) | ((w_bits & 0x7FFF) == 0)] = 0.0
    g_bits = model.f32_to_bits(g32.astype(np.float32), dtype)
    return w_bits, g_bits


@pytest.mark.parametrize("dtype", HALVES)
def test_stochastic_rounding_equals_the_model_bit_for_bit(dtype):
    """Each float32 result x of a step (alpha=0, eps=1, so x = w - lr*g/(|g|+1)
    in float32, the model's plain_update) is stored as model.stochastic(x,
    hash(seed, step, leaf, index)): negatives, zeros, float16 subnormals
    (below 2^-14 and below 2^-24), values past the largest finite one (to
    infinity with the carry's probability), infinities and NaN."""
    rng = np.random.default_rng(19)
    w_bits, g_bits = _every_value_case(dtype, rng)
    w, g = from_bits16(w_bits, dtype), from_bits16(g_bits, dtype)
    w32, g32 = model.bits_to_f32(w_bits, dtype), model.bits_to_f32(g_bits, dtype)
    seed, step, leaf = 2654435769, 7, 3
    random = model.element_bits(seed, step, leaf, w_bits.size)
    xs, results = [], []
    for lr in LRS[dtype]:
        got = bits16(sr_step(w, g, lr, seed=seed, step=step, leaf=leaf))
        x, _ = model.plain_update(w32, g32, 0.0, lr, 0.0, 1.0)
        assert_same_bits(got, model.stochastic(x, random, dtype), dtype, f"lr={lr}")
        xs.append(x)
        results.append(model.bits_to_f32(got, dtype))
    x, r = np.concatenate(xs), np.concatenate(results)
    largest = F16_MAX if dtype == "float16" else BF16_MAX
    with np.errstate(invalid="ignore"):
        beyond = np.isfinite(x) & (np.abs(x) > largest)
        covered = {
            "negative": (x < 0).any(),
            "zero": (x == 0).any(),
            "below 2^-24": ((0 < np.abs(x)) & (np.abs(x) < 2.0**-24)).any(),
            "below 2^-14": ((2.0**-24 < np.abs(x)) & (np.abs(x) < 2.0**-14)).any(),
            "past the largest, to inf": (beyond & np.isinf(r)).any(),
            "past the largest, kept finite": (beyond & np.isfinite(r)).any(),
            "inf": np.isinf(x).any(),
            "nan": np.isnan(x).any(),
            "rounded up": (np.abs(r) > np.abs(x)).any(),
            "rounded down": (np.abs(r) < np.abs(x)).any(),
        }
    assert all(covered.values()), covered


def test_another_key_gives_other_bits():
    """The model's bits depend on seed, step, leaf and index: the comparison
    above would notice a kernel that ignored any of them."""
    base = model.element_bits(1, 1, 0, 4096)
    for other in (model.element_bits(2, 1, 0, 4096), model.element_bits(1, 2, 0, 4096),
                  model.element_bits(1, 1, 1, 4096), model.element_bits(1, 1, 0, 4096, offset=1)):
        assert (other != base).mean() > 0.99
    assert len(np.unique(base)) == base.size  # within a leaf and step, all distinct


# ---- Properties, independent of the model.


def _neighbours(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The 16-bit values next to x toward and away from zero (both x when
    x is one); for finite x."""
    if dtype == "float16":
        with np.errstate(over="ignore"):
            nearest = x.astype(np.float16)
        away = np.where(x < 0, np.float16(-np.inf), np.float16(np.inf))
        with np.errstate(over="ignore"):  # next to +-65504: +-inf
            step_away = np.nextafter(nearest, away)
        step_in = np.nextafter(nearest, np.float16(0))
        below = np.abs(nearest.astype(np.float32)) < np.abs(x)
        lo = np.where(below, nearest, step_in).astype(np.float32)
        hi = np.where(below, step_away, nearest).astype(np.float32)
    else:  # truncating bfloat16's bits rounds toward zero
        lo_bits = x.view(np.uint32) & np.uint32(0xFFFF0000)
        lo = lo_bits.view(np.float32)
        hi = (lo_bits + np.uint32(0x10000)).view(np.float32)
    exact = lo == x
    return np.where(exact, x, lo), np.where(exact, x, hi)


@pytest.mark.parametrize("dtype", HALVES)
def test_rounding_picks_a_neighbour_and_is_unbiased(dtype):
    """Every finite result is one of x's two 16-bit neighbours, and over the
    132k elements of each case the rounding is unbiased: the sum of (r - x)
    / spacing is within 5 standard deviations of 0 (fixed seed: the check is
    deterministic)."""
    rng = np.random.default_rng(5)
    w_bits, g_bits = _every_value_case(dtype, rng)
    w, g = from_bits16(w_bits, dtype), from_bits16(g_bits, dtype)
    for lr in LRS[dtype][:4]:
        r = as_f32(sr_step(w, g, lr, seed=99, step=1, leaf=0))
        x, _ = model.plain_update(model.bits_to_f32(w_bits, dtype),
                                  model.bits_to_f32(g_bits, dtype), 0.0, lr, 0.0, 1.0)
        finite = np.isfinite(x)
        x, r = x[finite], r[finite]
        lo, hi = _neighbours(x, dtype)
        assert ((r == lo) | (r == hi)).all(), f"lr={lr}: a result that is no neighbour"
        between = (lo != hi) & np.isfinite(hi)
        x, lo, hi, r = (a[between].astype(np.float64) for a in (x, lo, hi, r))
        p = (x - lo) / (hi - lo)  # P(hi)
        z = ((r - x) / (hi - lo)).sum() / np.sqrt((p * (1 - p)).sum())
        assert abs(z) < 5, f"lr={lr}: biased, z = {z:.1f} over {x.size} elements"


# (parameter, gradient, lr) with eps=1e-8: the float32 result is exactly
# w - lr * g (1 + 1e-8 is 1 in float32); p: the probability of the neighbour
# of larger magnitude.
TARGETS = {
    "bfloat16": [
        (1.0, 1.0, 0.3 * 2.0**-8, 1 - 0.3 * 2.0**-8, 1 - 2.0**-8, 1.0, 0.7),
        (-1.0, -1.0, 0.3 * 2.0**-8, -1 + 0.3 * 2.0**-8, -1 + 2.0**-8, -1.0, 0.7),
        (BF16_MAX, -1.0, 0.25 * 2.0**120, BF16_MAX + 0.25 * 2.0**120, BF16_MAX, np.inf, 0.25),
        (0.0, 1.0, 0.4 * 2.0**-133, -0.4 * 2.0**-133, 0.0, -(2.0**-133), 0.4),
    ],
    "float16": [
        (1.0, 1.0, 0.3 * 2.0**-11, 1 - 0.3 * 2.0**-11, 1 - 2.0**-11, 1.0, 0.7),
        (F16_MAX, -1.0, 16.0, 65520.0, F16_MAX, np.inf, 0.5),
        (-F16_MAX, 1.0, 6.0, -65510.0, -F16_MAX, -np.inf, 6 / 32),
        (2.0**-20, -1.0, 0.25 * 2.0**-24, 2.0**-20 + 0.25 * 2.0**-24, 2.0**-20,
         2.0**-20 + 2.0**-24, 0.25),
        (0.0, 1.0, 0.3 * 2.0**-24, -0.3 * 2.0**-24, 0.0, -(2.0**-24), 0.3),
    ],
}


@pytest.mark.parametrize("dtype", HALVES)
def test_one_value_rounds_up_with_its_probability(dtype):
    """65536 elements of the same result x: each becomes lo or hi, hi with
    probability (|x| - |lo|) / spacing (to within 5 sigma) -- in a binade,
    negative, past the largest finite value (hi: infinity), float16
    subnormals and below 2^-24 (lo: 0)."""
    n = 65536
    for w, g, lr, x, lo, hi, p in TARGETS[dtype]:
        ws = mx.full((n,), w, HALVES[dtype])
        gs = mx.full((n,), g, HALVES[dtype])
        got = as_f32(sr_step(ws, gs, lr, seed=4, step=2, leaf=1, eps=1e-8))
        assert np.float32(w) - np.float32(lr) * np.float32(g) == np.float32(x)
        assert np.isin(got, [lo, hi]).all(), (x, np.unique(got))
        share = (got == np.float32(hi)).mean()
        assert abs(share - p) < 5 * np.sqrt(p * (1 - p) / n), (x, share, p)


# ---- The evidence: a tiny update adds up.


@pytest.mark.parametrize("dtype", HALVES)
def test_a_tiny_update_adds_up_with_sr_and_kahan_and_not_to_nearest(dtype):
    """Weights of 1.0 receiving -1e-4 per step (alpha=0, unit gradient,
    lr=1e-4: lr*g/(sqrt(g^2)+eps) = 1e-4) for 100 steps, over 65536
    elements: 0.99 on average with SR (within 5e-4), within one ulp of 0.99
    with Kahan, exactly 1.0 rounded to nearest (the update is under half the
    spacing below 1)."""
    ulp = {"float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]
    ends = {}
    for name, options in (("sr", {"stochastic_rounding": True, "seed": 2024}),
                          ("kahan", {"kahan_summation": True}), ("nearest", {})):
        opt = RMSprop(1e-4, alpha=0.0, **options)
        params = {"w": mx.ones((65536,), HALVES[dtype])}
        grads = {"w": mx.ones((65536,), HALVES[dtype])}
        for _ in range(100):
            params = opt.apply_gradients(grads, params)
            mx.eval(params, opt.state)
        ends[name] = as_f32(params["w"]).astype(np.float64)
    assert abs(ends["sr"].mean() - 0.99) < 5e-4, ends["sr"].mean()
    assert len(np.unique(ends["sr"])) > 1  # it is the average that is right
    assert (np.abs(ends["kahan"] - 0.99) <= ulp).all(), np.unique(ends["kahan"])
    assert (ends["nearest"] == 1.0).all()


# ---- Determinism.


def _sr_run(opt: RMSprop, steps: int = 3) -> dict:
    params = {"a": mx.linspace(-2, 2, 3000).astype(mx.bfloat16).reshape(30, 100),
              "b": mx.linspace(-1, 1, 2000).astype(mx.float16)}
    for k in range(steps):
        grads = tree_map(lambda p: (mx.cos(p.astype(mx.float32) * (k + 3))).astype(p.dtype), params)
        params = opt.apply_gradients(grads, params)
        mx.eval(params, opt.state)
    return params


def _differing(a: dict, b: dict) -> float:
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    return float(np.mean(np.concatenate([bits16(fa[k]) != bits16(fb[k]) for k in fa])))


def test_the_seed_decides_the_bits():
    """The same seed gives the same bits; another seed other bits (in many
    elements); seed=None draws the seed from mx.random (mx.random.seed makes
    it reproducible) and keeps it in the state."""
    same = [_sr_run(RMSprop(1e-2, stochastic_rounding=True, seed=5)) for _ in range(2)]
    assert _differing(*same) == 0
    other = _sr_run(RMSprop(1e-2, stochastic_rounding=True, seed=6))
    assert _differing(same[0], other) > 0.1

    drawn = []
    for s in (11, 11, 12):
        mx.random.seed(s)
        opt = RMSprop(1e-2, stochastic_rounding=True)
        drawn.append((opt.state["seed"].item(), _sr_run(opt)))
    assert drawn[0][0] == drawn[1][0] != drawn[2][0]
    assert opt.state["seed"].dtype == mx.uint32
    assert _differing(drawn[0][1], drawn[1][1]) == 0
    assert _differing(drawn[0][1], drawn[2][1]) > 0.1
    # The drawn seed is the one the bits come from.
    assert _differing(drawn[0][1], _sr_run(RMSprop(1e-2, stochastic_rounding=True,
                                                   seed=drawn[0][0]))) == 0


def test_the_optimizer_hashes_the_leaf_number_and_step_count():
    """Through RMSprop: leaf = the parameter's position in tree_flatten
    order, step = the 1-based step count, seed = state['seed'] (the model
    predicts every element of a two-step run)."""
    seed = 77
    opt = RMSprop(1e-3, alpha=0.0, eps=1.0, stochastic_rounding=True, seed=seed)
    rng = np.random.default_rng(3)
    params = {"first": mx.array(rng.standard_normal(500).astype(np.float32)).astype(mx.float16),
              "second": {"x": mx.array(rng.standard_normal(700).astype(np.float32)).astype(mx.bfloat16)}}
    for step in (1, 2):
        grads = tree_map(lambda p: mx.array(rng.standard_normal(p.shape).astype(np.float32)).astype(p.dtype),
                         params)
        new = opt.apply_gradients(grads, params)
        for leaf, ((path, w), (_, g), (_, out)) in enumerate(
                zip(tree_flatten(params), tree_flatten(grads), tree_flatten(new))):
            dtype = "float16" if w.dtype == mx.float16 else "bfloat16"
            x, _ = model.plain_update(as_f32(w), as_f32(g), 0.0, 1e-3, 0.0, 1.0)
            want = model.stochastic(x, model.element_bits(seed, step, leaf, w.size), dtype)
            assert_same_bits(bits16(out), want, dtype, f"{path} at step {step}")
        params = new
        mx.eval(params, opt.state)


_BUILDS_SCRIPT = r"""
import hashlib, json
import numpy as np
import mlx.core as mx
from mlx_fused_rmsprop import RMSprop, _ext

mx.set_default_device(mx.cpu)
rng = np.random.default_rng(8)
out = {"isa": _ext._cpu_isa(), "parts": _ext._split_parts(60000, "compute")}

def digest(tree):
    h = hashlib.sha256()
    for a in tree:
        h.update(bytes(memoryview(mx.contiguous(a).view(mx.uint8))))
    return h.hexdigest()

def leaves(n, dtype, transposed):
    w = mx.array(rng.standard_normal(n).astype(np.float32)).astype(dtype).reshape(n // 240, 240)
    gs = [mx.array(rng.standard_normal(n).astype(np.float32)).astype(dtype) for _ in range(3)]
    if transposed:  # the gradient as nn.Linear gives it: a transposed view
        gs = [mx.transpose(g.reshape(240, n // 240)) for g in gs]
    else:
        gs = [g.reshape(n // 240, 240) for g in gs]
    return w, gs

CASES = {"sr": {"stochastic_rounding": True, "seed": 9}, "kahan": {"kahan_summation": True},
         "sr8": {"stochastic_rounding": True, "seed": 9, "state_bits": 8, "min_8bit_size": 256}}
for name, options in CASES.items():
    for dtype in (mx.float16, mx.bfloat16):
        for transposed in (False, True):
            w, gs = leaves(60000, dtype, transposed)
            opt = RMSprop(1e-2, momentum=0.5, **options)
            params = {"w": w}
            for g in gs:
                params = opt.apply_gradients({"w": g}, params)
                mx.eval(params, opt.state)
            entries = [v for _, v in sorted(opt.state["w"].items())]
            out[f"{name}/{dtype}/{transposed}"] = digest([params["w"], *entries])
print(json.dumps(out))
"""


def _run_build(isa: str | None, threads: int) -> dict:
    env = dict(os.environ)
    env.pop("MLX_FUSED_RMSPROP_ISA", None)
    if isa is not None:
        env["MLX_FUSED_RMSPROP_ISA"] = isa
    env["MLX_FUSED_RMSPROP_NUM_THREADS"] = str(threads)
    env["MLX_FUSED_RMSPROP_MIN_ELEMENTS_PER_THREAD"] = "1000"  # split a 60000-element leaf
    res = subprocess.run([sys.executable, "-c", _BUILDS_SCRIPT], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_threads_and_builds_give_the_same_bits():
    """SR, Kahan and SR + 8-bit state (with momentum), contiguous and
    transposed gradients, 3 steps of a 60000-element leaf: the baseline
    build on 1 thread, every other build the CPU runs on 3 and 4 threads
    (the leaf split across them) -- the same bits."""
    runs = [_run_build("baseline", 1)]
    assert runs[0]["parts"] == 1
    widest = _widest_isa()
    if _cpu_runs("avx2") and widest != "avx2":
        runs.append(_run_build("avx2", 3))
    runs.append(_run_build(None, 4))
    assert runs[-1]["isa"] == widest and runs[-1]["parts"] == 4
    base = {k: v for k, v in runs[0].items() if k not in ("isa", "parts")}
    for run in runs[1:]:
        got = {k: v for k, v in run.items() if k not in ("isa", "parts")}
        assert got == base, f"{run['isa']} on {run['parts']} threads differs"


# ---- Layouts and pieces of a leaf.


def _layout_twins(dtype: mx.Dtype, rng: np.random.Generator):
    w = mx.array(rng.standard_normal((40, 70)).astype(np.float32)).astype(dtype)
    g = mx.array(rng.standard_normal((70, 40)).astype(np.float32)).astype(dtype)
    return w, mx.transpose(g), mx.contiguous(mx.transpose(g))


@pytest.mark.parametrize("options", [
    {"stochastic_rounding": True, "seed": 3},
    {"kahan_summation": True},
    {"stochastic_rounding": True, "seed": 3, "state_bits": 8, "min_8bit_size": 256},
], ids=["sr", "kahan", "sr-8bit"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("momentum", [0.0, 0.5], ids=["plain", "momentum"])
def test_the_layout_walk_does_not_change_the_bits(dtype, options, momentum):
    """A transposed gradient (the transposed walk), the same values
    contiguous (the flat walk), a strided one (every other column), and a
    parameter and state that are themselves transposed views: one step
    each, the same bits -- for the plain update's rounded jobs and the
    variants' (momentum)."""
    rng = np.random.default_rng(11)
    w, g_t, g_c = _layout_twins(dtype, rng)
    v = mx.abs(mx.array(rng.standard_normal((40, 70)).astype(np.float32)))
    state_dtype = mx.float32 if options.get("state_bits") else dtype
    state = {"v": v.astype(state_dtype)}
    if momentum:
        state["momentum_buffer"] = (0.1 * v).astype(state_dtype)
    if options.get("kahan_summation"):
        state["compensation"] = (1e-3 * v).astype(dtype)
    wide = mx.concatenate([g_c[..., None], mx.zeros_like(g_c)[..., None]], -1).reshape(40, 140)
    g_s = wide[:, ::2]
    assert _ext._cpu_walk(g_t, w, state["v"]) == "transposed"
    assert _ext._cpu_walk(g_c, w, state["v"]) == "flat"
    assert _ext._cpu_walk(g_s, w, state["v"]) not in ("flat", "transposed")
    # Everything transposed: param, gradient and state are column-major views
    # (one dense layout: memory order is not row-major order, which the
    # rounding's element index must be).
    col = lambda a: mx.transpose(mx.contiguous(mx.transpose(a)))  # noqa: E731
    step = partial(rmsprop_step, step=4, momentum=momentum, **options)
    outs = [step(g, w, state, 1e-2) for g in (g_t, g_c, g_s)]
    outs.append(step(col(g_c), col(w), {k: col(s) for k, s in state.items()}, 1e-2))
    for out in outs[1:]:
        assert bit_equal(out[0], outs[0][0])
        assert_trees_bit_equal_in_any_order(out[1], outs[0][1])


@pytest.mark.parametrize("options", [
    {"rounding": _ext.ROUND_STOCHASTIC},
    {"rounding": _ext.ROUND_STOCHASTIC, "state_bits": 8, "min_8bit_size": 256},
], ids=["sr", "sr-8bit"])
def test_pieces_of_a_leaf_at_their_offsets_give_the_whole_leafs_bits(options):
    """What a sharded rank does: steps 1-D pieces of the flattened leaf,
    each with its element offset in the whole leaf (8-bit pieces start at
    multiples of 256); concatenated, they are the whole leaf's step bit for
    bit. (tests/test_distributed.py launches real ranks.)"""
    rng = np.random.default_rng(2)
    n, leaf = 5000, 6
    w = mx.array(rng.standard_normal(n).astype(np.float32)).astype(mx.bfloat16)
    g = mx.array(rng.standard_normal(n).astype(np.float32)).astype(mx.bfloat16)
    o = _ext.RMSpropOptions(alpha=0.9, eps=1e-8, **options)
    quantized = "state_bits" in options
    v = mx.full((n,), 0.25, mx.float32)

    def run(lo: int, hi: int, offset: int) -> list[mx.array]:
        if quantized:
            entries = list(_ext.quantize_state(v[lo:hi], True))
        else:
            entries = [v[lo:hi].astype(mx.bfloat16)]
        return _ext.rmsprop_step(g[lo:hi], w[lo:hi], entries, mx.array(1e-2), mx.array(5, mx.uint64),
                                 o, quantized=quantized, leaf=leaf, element_offset=offset,
                                 seed=mx.array(123, mx.uint32))

    whole = run(0, n, 0)
    cuts = [0, 256, 2048, 4864, n] if quantized else [0, 1, 1000, 2999, n]
    pieces = [run(a, b, a) for a, b in zip(cuts[:-1], cuts[1:])]
    for i, out in enumerate(whole):
        joined = mx.concatenate([p[i] for p in pieces])
        assert bit_equal(joined, out), f"output {i}"
    # A piece stepped as if it started the leaf gets other bits.
    assert not bit_equal(run(cuts[2], cuts[3], 0)[0], pieces[2][0])


@pytest.mark.parametrize("offset", [(1 << 32) - 5, (5 << 32) - 3], ids=["2^32-5", "5*2^32-3"])
@pytest.mark.parametrize("dtype", HALVES)
def test_a_piece_crossing_a_multiple_of_2_32_hashes_each_full_index(dtype, offset):
    """A piece of a huge leaf (what a sharded rank steps) whose element
    indices cross a multiple of 2^32 inside one SIMD block: every element's
    bits are the model's for its whole 64-bit index (the low word wraps, the
    high word carries), in the SIMD blocks and the scalar tail alike."""
    rng = np.random.default_rng(23)
    n, seed, step, leaf, lr = 45, 99, 3, 2, 1e-2
    w = mx.array(rng.standard_normal(n).astype(np.float32)).astype(HALVES[dtype])
    g = mx.array(rng.standard_normal(n).astype(np.float32)).astype(HALVES[dtype])
    o = _ext.RMSpropOptions(alpha=0.0, eps=1.0, rounding=_ext.ROUND_STOCHASTIC)
    out = _ext.rmsprop_step(g, w, [mx.zeros_like(w)], mx.array(lr), mx.array(step, mx.uint64), o,
                            leaf=leaf, element_offset=offset, seed=mx.array(seed, mx.uint32))
    x, _ = model.plain_update(as_f32(w), as_f32(g), 0.0, lr, 0.0, 1.0)
    want = model.stochastic(x, model.element_bits(seed, step, leaf, n, offset), dtype)
    assert_same_bits(bits16(out[0]), want, dtype, f"offset {offset}")


# ---- Kahan summation.


def test_the_compensation_exists_for_16_bit_leaves_only():
    params = {"f32": mx.ones((3,)), "f16": mx.ones((3,), mx.float16),
              "bf16": mx.ones((3,), mx.bfloat16), "f64": mx.ones((3,), mx.float64)}
    opt = RMSprop(1e-2, kahan_summation=True)
    opt.init(params)
    assert set(opt.state["f32"]) == set(opt.state["f64"]) == {"v"}
    for name in ("f16", "bf16"):
        entry = opt.state[name]["compensation"]
        assert entry.dtype == params[name].dtype and entry.shape == (3,)
        assert (entry == 0).all().item()


@pytest.mark.parametrize("dtype", HALVES)
def test_kahan_equals_the_model_bit_for_bit(dtype):
    """Five steps from every 16-bit value as the parameter (with a nonzero
    compensation, Inf and NaN included), then random ones: w' and c' as the
    model's c1 = c + (x - w); w' = round(w + c1); c' = round(c1 - (w' - w))
    from the float32 result x; v rounded to nearest."""
    rng = np.random.default_rng(31)
    n, lr, alpha, eps = 65536, 3e-3, 0.9, 1e-6
    w_bits = rng.permutation(np.arange(n, dtype=np.uint32)).astype(np.uint16)
    c_bits = model.f32_to_bits((1e-4 * rng.standard_normal(n)).astype(np.float32), dtype)
    v_bits = model.f32_to_bits(np.abs(rng.standard_normal(n)).astype(np.float32), dtype)
    state = {"v": from_bits16(v_bits, dtype), "compensation": from_bits16(c_bits, dtype)}
    w = from_bits16(w_bits, dtype)
    for step in range(5):
        g_bits = model.f32_to_bits(rng.standard_normal(n).astype(np.float32), dtype)
        x, v_new = model.plain_update(model.bits_to_f32(w_bits, dtype), model.bits_to_f32(g_bits, dtype),
                                      model.bits_to_f32(v_bits, dtype), lr, alpha, eps)
        w_bits, c_bits = model.kahan(w_bits, c_bits, x, dtype)
        v_bits = model.f32_to_bits(v_new, dtype)
        w, state = rmsprop_step(from_bits16(g_bits, dtype), w, state, lr, alpha=alpha, eps=eps,
                                kahan_summation=True)
        assert_same_bits(bits16(w), w_bits, dtype, f"param at step {step + 1}")
        assert_same_bits(bits16(state["compensation"]), c_bits, dtype, f"compensation at step {step + 1}")
        assert_same_bits(bits16(state["v"]), v_bits, dtype, f"v at step {step + 1}")
        if step == 0:  # from here on, finite values
            w_bits = model.f32_to_bits(rng.standard_normal(n).astype(np.float32), dtype)
            w = from_bits16(w_bits, dtype)


def test_float32_and_float64_leaves_ignore_both_options():
    """A float32 and a float64 leaf: bit-identical parameters and state with
    and without stochastic rounding or Kahan summation (the seed is the only
    extra entry)."""
    rng = np.random.default_rng(4)
    params = {"a": mx.array(rng.standard_normal((20, 30)).astype(np.float32)),
              "b": mx.array(rng.standard_normal(77)).astype(mx.float64)}
    runs = []
    for options in ({}, {"stochastic_rounding": True, "seed": 1}, {"kahan_summation": True}):
        opt, p = RMSprop(1e-2, momentum=0.5, centered=True, **options), params
        for k in range(3):
            p = opt.apply_gradients(tree_map(lambda x: mx.sin(x * (k + 2)), p), p)
            mx.eval(p, opt.state)
        runs.append((p, {k: v for k, v in opt.state.items() if k != "seed"}))
    for p, state in runs[1:]:
        assert_trees_bit_equal_in_any_order(p, runs[0][0])
        assert_trees_bit_equal_in_any_order(state, runs[0][1])


def test_kahan_over_a_tree_of_mixed_dtypes_is_each_leaf_alone():
    """One Kahan optimizer over a float32, a bfloat16, a float64 and a
    float16 leaf (in that order), from a fresh state: each leaf's parameter
    and state are bit for bit those of a Kahan optimizer given that leaf
    alone -- the 16-bit leaves read and write their compensation whatever
    leaf came before, the others keep none."""
    rng = np.random.default_rng(31)
    dtypes = {"a": mx.float32, "b": mx.bfloat16, "c": mx.float64, "d": mx.float16}
    params = {k: mx.array(rng.standard_normal(300).astype(np.float32)).astype(dt) for k, dt in dtypes.items()}
    grads = [{k: mx.array(rng.standard_normal(300).astype(np.float32)).astype(dt) for k, dt in dtypes.items()}
             for _ in range(3)]

    def run(keys):
        opt, p = RMSprop(1e-3, momentum=0.5, kahan_summation=True), {k: params[k] for k in keys}
        for g in grads:
            p = opt.apply_gradients({k: g[k] for k in keys}, p)
            mx.eval(p, opt.state)
        return p, {k: opt.state[k] for k in keys}

    together = run(list(dtypes))
    for k, dt in dtypes.items():
        alone = run([k])
        assert bit_equal(together[0][k], alone[0][k]), k
        assert_trees_bit_equal_in_any_order(together[1][k], alone[1][k])
        assert ("compensation" in together[1][k]) == (dt in (mx.float16, mx.bfloat16)), k


@pytest.mark.parametrize("dtype", HALVES)
def test_turning_kahan_on_and_off_between_steps_converts_the_state(dtype):
    """Set between steps like every option, kahan_summation=True starts a
    zero compensation at the next step, which is then Kahan's step from that
    state; set back to False, the compensation goes and the step rounds to
    nearest, as an optimizer that never had it."""
    rng = np.random.default_rng(11)
    dt = HALVES[dtype]
    w = mx.array(rng.standard_normal(64).astype(np.float32)).astype(dt)
    grads = [mx.array(rng.standard_normal(64).astype(np.float32)).astype(dt) for _ in range(3)]
    opt = RMSprop(1e-3)
    params = opt.apply_gradients({"w": grads[0]}, {"w": w})
    mx.eval(params, opt.state)

    kahan = RMSprop(1e-3, kahan_summation=True)
    kahan.state = {**opt.state, "w": {**opt.state["w"], "compensation": mx.zeros_like(w)}}
    opt.kahan_summation = True
    params, want = opt.apply_gradients({"w": grads[1]}, params), kahan.apply_gradients({"w": grads[1]}, params)
    mx.eval(params, want, opt.state, kahan.state)
    assert bit_equal(params["w"], want["w"])
    assert bit_equal(opt.state["w"]["compensation"], kahan.state["w"]["compensation"])
    assert (opt.state["w"]["compensation"] != 0).any().item()  # the step did carry something

    nearest = RMSprop(1e-3)
    nearest.state = {**opt.state, "w": {"v": opt.state["w"]["v"]}}
    opt.kahan_summation = False
    params, want = opt.apply_gradients({"w": grads[2]}, params), nearest.apply_gradients({"w": grads[2]}, params)
    mx.eval(params, want, opt.state)
    assert set(opt.state["w"]) == {"v"}
    assert bit_equal(params["w"], want["w"]) and int(opt.step) == 3


def test_full_precision_state_keeps_the_compensation_in_the_weights_dtype():
    """Beside 8-bit state, full_precision_state() widens the moments to
    float32 but leaves the compensation as it is (it belongs to the weight's
    dtype): a Kahan optimizer with float32 state loads it and steps as the
    8-bit one's dequantized twin."""
    rng = np.random.default_rng(19)
    w = mx.array(rng.standard_normal((20, 300)).astype(np.float32)).astype(mx.bfloat16)
    grads = [mx.array(rng.standard_normal((20, 300)).astype(np.float32)).astype(mx.bfloat16)
             for _ in range(3)]
    opt = RMSprop(1e-3, state_bits=8, kahan_summation=True)
    params = {"w": w}
    for g in grads[:2]:
        params = opt.apply_gradients({"w": g}, params)
    mx.eval(params, opt.state)
    full = opt.full_precision_state()
    assert full["w"]["v"].dtype == mx.float32 and full["w"]["compensation"].dtype == mx.bfloat16
    assert bit_equal(full["w"]["compensation"], opt.state["w"]["compensation"])
    wide = RMSprop(1e-3, kahan_summation=True, state_dtype=mx.float32)
    wide.state = full
    out = wide.apply_gradients({"w": grads[2]}, params)
    mx.eval(out, wide.state)
    assert out["w"].dtype == mx.bfloat16 and int(wide.step) == 3


def test_stochastic_rounding_and_kahan_exclude_each_other():
    with pytest.raises(ValueError, match="stochastic_rounding and kahan_summation exclude each other"):
        RMSprop(1e-2, stochastic_rounding=True, kahan_summation=True)
    with pytest.raises(ValueError, match="stochastic_rounding and kahan_summation exclude each other"):
        RMSprop.from_torch(stochastic_rounding=True, kahan_summation=True)
    with pytest.raises(ValueError, match="stochastic_rounding and kahan_summation exclude each other"):
        rmsprop_step(mx.ones((3,)), mx.ones((3,)), {"v": mx.zeros((3,))}, 0.1, step=1,
                     stochastic_rounding=True, kahan_summation=True, seed=1)
    opt = RMSprop(1e-2, stochastic_rounding=True, seed=1)
    params = opt.apply_gradients({"w": mx.ones((3,), mx.bfloat16)}, {"w": mx.ones((3,), mx.bfloat16)})
    mx.eval(params, opt.state)
    opt.kahan_summation = True
    with pytest.raises(ValueError, match="stochastic_rounding and kahan_summation exclude each other"):
        opt.apply_gradients({"w": mx.ones((3,), mx.bfloat16)}, params)
    assert int(opt.step) == 1


# ---- Combined with every variant, the state dtypes and 8-bit state: the
# 16-bit step is the float32 twin's result, rounded as the contract says.

SAMPLE = list(option_grid())[::40]  # 12 of the 480 combinations
STATE_FORMS = {"param dtype": {}, "float32": {}, "8-bit": {"state_bits": 8, "min_8bit_size": 256}}


def _state_for(names, shape, form: str, dtype: mx.Dtype, rng) -> dict:
    out = {}
    for name in names:
        x = rng.standard_normal(shape).astype(np.float32)
        x = np.abs(x) + 0.1 if name == "v" else 0.1 * x
        out[name] = mx.array(x).astype(dtype if form == "param dtype" else mx.float32)
    return out


@pytest.mark.parametrize("form", STATE_FORMS)
@pytest.mark.parametrize("rounding", ["sr", "kahan"])
def test_every_variant_rounds_its_float32_result(rounding, form):
    """For a sample of the variant options, both 16-bit dtypes and each state
    form (the parameter's dtype, float32, 8-bit): one step of a 16-bit leaf
    equals the same step of its float32 twin (the parameter and the state
    widened; float32 ignores the rounding options) with the twin's parameter
    rounded by the model -- stochastically with the element's bits, or by
    the Kahan store -- and the twin's state rounded to the state's dtype (8-bit:
    the same codes and scales)."""
    rng = np.random.default_rng(17)
    shape, step, seed, leaf = (3, 300), 3, 2**31 + 5, 9
    extra = STATE_FORMS[form]
    flag = {"stochastic_rounding": True, "seed": seed, "leaf": leaf} if rounding == "sr" else {
        "kahan_summation": True}
    for o in SAMPLE:
        kw = {**op_kwargs(o), **extra}
        for name, dtype in HALVES.items():
            w = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
            g = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
            state = _state_for(o.state_names(), shape, form, dtype, rng)
            wide = {k: v.astype(mx.float32) for k, v in state.items()}
            x, twin_state = rmsprop_step(g.astype(mx.float32), w.astype(mx.float32), wide, 1e-2,
                                         step=step, **kw)
            half_state = dict(state)
            c = None
            if rounding == "kahan":
                c = mx.array((1e-3 * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)
                half_state["compensation"] = c
            out, new_state = rmsprop_step(g, w, half_state, 1e-2, step=step, **kw, **flag)
            x32 = as_f32(x)
            if rounding == "sr":
                want = model.stochastic(x32, model.element_bits(seed, step, leaf, x.size), name)
            else:
                want, want_c = model.kahan(bits16(w), bits16(c), x32, name)
                assert_same_bits(bits16(new_state.pop("compensation")), want_c, name, f"{o} c")
            assert_same_bits(bits16(out), want, name, f"{o} param")
            for entry, value in twin_state.items():
                if form == "param dtype":
                    value = value.astype(dtype)
                assert bit_equal(new_state[entry], value), f"{o}: {entry}"


@pytest.mark.parametrize("rounding", [{"stochastic_rounding": True, "seed": 8}, {"kahan_summation": True}],
                         ids=["sr", "kahan"])
def test_presets_take_the_rounding_options(rounding):
    """Each preset with a rounding option equals the constructor with the
    same options (the options pass through) and differs from the preset
    without it."""
    presets = [
        (RMSprop.from_torch(lr=1e-3, momentum=0.9, centered=True, **rounding),
         RMSprop(1e-3, momentum=0.9, centered=True, **rounding),
         RMSprop.from_torch(lr=1e-3, momentum=0.9, centered=True)),
        (RMSprop.from_optax(1e-3, momentum=0.9, nesterov=True, bias_correction=True, **rounding),
         RMSprop(1e-3, alpha=0.9, momentum=0.9, nesterov=True, bias_correction=True,
                 eps_in_sqrt=True, lr_inside_momentum=True, **rounding),
         RMSprop.from_optax(1e-3, momentum=0.9, nesterov=True, bias_correction=True)),
        (RMSprop.from_keras(1e-3, weight_decay=0.01, state_bits=8, min_8bit_size=256, **rounding),
         RMSprop(1e-3, alpha=0.9, eps=1e-7, weight_decay=0.01, decoupled_weight_decay=True,
                 eps_in_sqrt=True, lr_inside_momentum=True, state_bits=8, min_8bit_size=256,
                 **rounding),
         RMSprop.from_keras(1e-3, weight_decay=0.01, state_bits=8, min_8bit_size=256)),
    ]
    for preset, direct, without in presets:
        runs = [_sr_run(o) for o in (preset, direct, without)]
        assert _differing(runs[0], runs[1]) == 0
        assert _differing(runs[0], runs[2]) > 0.01
        assert_trees_bit_equal_in_any_order(preset.state, direct.state)


# ---- Checkpoints and mx.compile.


@pytest.mark.parametrize("options", [
    {"stochastic_rounding": True},
    {"kahan_summation": True, "momentum": 0.5},
    {"stochastic_rounding": True, "state_bits": 8, "min_8bit_size": 256},
], ids=["sr", "kahan", "sr-8bit"])
def test_a_checkpoint_resumes_bit_exactly(tmp_path, options):
    """3 steps, save (safetensors), 3 more; a new optimizer (whose own seed
    is another: the loaded one wins) loaded from the file continues with the
    same bits. (The parameters are put back in the model's order, as
    model.load_weights does: the rounding's leaf number is the position in
    tree_flatten order, and mx.load returns the keys in another order.)"""
    mx.random.seed(1)
    opt = RMSprop(1e-2, **options)
    params = _sr_run(opt)
    mx.save_safetensors(str(tmp_path / "state.safetensors"), dict(tree_flatten(opt.state)))
    mx.save_safetensors(str(tmp_path / "params.safetensors"), dict(tree_flatten(params)))
    expected = _continue(opt, params)

    mx.random.seed(2)
    fresh = RMSprop(1e-2, **options)
    if "stochastic_rounding" in options:
        assert fresh.state["seed"].item() != opt.state["seed"].item()
    fresh.state = tree_unflatten(list(mx.load(str(tmp_path / "state.safetensors")).items()))
    saved = mx.load(str(tmp_path / "params.safetensors"))
    loaded = {k: saved[k] for k in params}
    assert_trees_bit_equal_in_any_order(_continue(fresh, loaded), expected)
    assert_trees_bit_equal_in_any_order(fresh.state, opt.state)


def _continue(opt: RMSprop, params: dict) -> dict:
    for k in range(3):
        grads = tree_map(lambda p: mx.sin(p.astype(mx.float32) * (k + 7)).astype(p.dtype), params)
        params = opt.apply_gradients(grads, params)
        mx.eval(params, opt.state)
    return params


@pytest.mark.parametrize("options", [
    {"stochastic_rounding": True, "seed": 5},
    {"kahan_summation": True},
    {"stochastic_rounding": True, "seed": 5, "state_bits": 8, "min_8bit_size": 256},
], ids=["sr", "kahan", "sr-8bit"])
def test_compiled_training_equals_eager_without_retracing(options):
    """A bfloat16 MLP trained 6 steps under mx.compile (state as inputs and
    outputs) ends bit-identical to the eager run, traced once: the step
    count and the seed are inputs, not constants."""
    rng = np.random.default_rng(0)
    batches = [(mx.array(rng.standard_normal((8, 12)).astype(np.float32)).astype(mx.bfloat16),
                mx.array(rng.standard_normal((8, 3)).astype(np.float32)).astype(mx.bfloat16))
               for _ in range(6)]

    def loss_fn(m, x, y):
        return mx.mean(mx.square(m(x) - y))

    def fresh():
        mx.random.seed(42)
        m = MLP()
        m.set_dtype(mx.bfloat16)
        o = RMSprop(1e-2, **options)
        o.init(m.trainable_parameters())
        return m, o

    m_eager, o_eager = fresh()
    for x, y in batches:
        _, grads = nn.value_and_grad(m_eager, loss_fn)(m_eager, x, y)
        o_eager.update(m_eager, grads)
        mx.eval(m_eager.parameters(), o_eager.state)

    m, o = fresh()
    traces = []
    state = [m.state, o.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        traces.append(1)
        loss, grads = nn.value_and_grad(m, loss_fn)(m, x, y)
        o.update(m, grads)
        return loss

    for x, y in batches:
        step(x, y)
        mx.eval(state)
    assert len(traces) == 1
    assert int(o.step) == 6
    assert_trees_bit_equal_in_any_order(m.parameters(), m_eager.parameters())
    assert_trees_bit_equal_in_any_order(o.state, o_eager.state)


# ---- Sharded over launched ranks.

LEAN_OPTIONS = [
    {"stochastic_rounding": True, "seed": 7},
    {"stochastic_rounding": True, "seed": 7, "state_bits": 8, "min_8bit_size": 256, "momentum": 0.9},
    {"kahan_summation": True, "centered": True},
]


def test_sharded_rounding_on_two_ranks_equals_unsharded(tmp_path):
    """2 launched ranks, 3 steps of averaged gradients over leaves whose
    bfloat16 one is split between the ranks (at its element 216, or 256
    with 8-bit state): with SR (the element's index is taken in the whole
    leaf), SR + 8-bit state and Kahan, every rank's parameters equal the
    unsharded optimizer's bit for bit."""
    params = initial_parameters("lean")
    for quantizes, cut in ((None, 216), (lambda size, dtype: size >= 256, 256)):
        plan = make_plan(params, 2, 0, 2**25, quantizes)
        w_pieces = [(p.rank, p.start, p.stop) for p in plan.pieces if plan.leaves[p.leaf].path == "w"]
        assert w_pieces == [(0, 0, cut), (1, cut, 407)]
    cases = [{"model": "lean", "steps": 3, "options": o} for o in LEAN_OPTIONS]
    for i, reports in enumerate(launch(2, "train", cases, tmp_path)):
        assert all(r["equal_unsharded"] and r["step"] == 3 for r in reports), (LEAN_OPTIONS[i], reports)
        ranks = rank_parameters(tmp_path, 2, i)
        assert_trees_equal(ranks[1], ranks[0])
