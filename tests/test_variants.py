"""Every RMSprop variant, fused: each option and every combination of them
against a float64 model of the algorithm (tests/variant_models.py), that model
against the documented algorithms of torch, optax and Keras, and the presets
against the libraries themselves where they are installed."""

from __future__ import annotations

import itertools
import math

import mlx.core as mx
import numpy as np
import pytest

import variant_models as models
from mlx_fused_rmsprop import RMSprop, _ext, rmsprop_step

F32_TOL = 2.0**-20  # a few float32 roundings of one step, relative to its terms
F64_TOL = 2.0**-48


def option_grid():
    """Every combination of the options (momentum-only options only with
    momentum, decoupled only with a weight decay): 480 of them."""
    for momentum, nesterov, inside in [(0.0, False, False)] + [
        (0.9, n, i) for n in (False, True) for i in (False, True)
    ]:
        for centered, (wd, decoupled), eps_in_sqrt, scale, bias, maximize in itertools.product(
            (False, True), [(0.0, False), (0.05, False), (0.05, True)], (False, True),
            (0.0, 0.5), (False, True), (False, True),
        ):
            yield models.Options(
                alpha=0.9, eps=1e-6, momentum=momentum, nesterov=nesterov,
                centered=centered, weight_decay=wd, decoupled_weight_decay=decoupled,
                eps_in_sqrt=eps_in_sqrt, initial_scale=scale, bias_correction=bias,
                maximize=maximize, lr_inside_momentum=inside,
            )


def kwargs(o: models.Options) -> dict:
    """The keyword arguments of RMSprop for these options (alpha, eps too)."""
    return {k: getattr(o, k) for k in o.__dataclass_fields__}


def op_kwargs(o: models.Options) -> dict:
    out = kwargs(o)
    del out["initial_scale"]  # a property of the initial state only
    return out


def random_state(rng, shape, o: models.Options, t: int) -> dict:
    """A well-conditioned state at step t: v / bc >= 2 (mean / bc)^2 even
    after the step, so v - mean^2 does not cancel."""
    bc = 1.0 - o.alpha**t if o.bias_correction else 1.0
    v = np.abs(rng.standard_normal(shape)) + 0.5
    state = {"v": v}
    if o.centered:
        state["mean"] = np.sqrt(v * bc / 4) * rng.uniform(-1, 1, shape)
    if o.momentum > 0:
        state["momentum_buffer"] = 0.1 * rng.standard_normal(shape)
    return state


def ulp(x: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """The spacing of dtype's values around |x|."""
    mantissa_bits, min_exponent = {
        mx.float16: (10, -14), mx.bfloat16: (7, -126), mx.float32: (23, -126), mx.float64: (52, -1022)
    }[dtype]
    exponent = np.maximum(np.frexp(np.abs(x))[1] - 1, min_exponent)
    return np.ldexp(1.0, exponent - mantissa_bits)


def as_f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float64, stream=mx.cpu))


def rounded(x: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """x rounded to dtype, back in float64 (what the kernel reads)."""
    return as_f64(mx.array(x).astype(dtype))


def step_bounds(w, state, g, lr, t, o: models.Options) -> dict:
    """Per output, the sum of the magnitudes of the terms of one step: float32
    arithmetic errs by a few ulps of it at most."""
    g = np.abs(g) + (o.weight_decay * np.abs(w) if o.weight_decay and not o.decoupled_weight_decay else 0)
    bc = 1.0 - o.alpha**t if o.bias_correction else 1.0
    bounds = {"v": o.alpha * np.abs(state["v"]) + (1 - o.alpha) * g * g}
    var = bounds["v"] / bc
    if o.centered:
        bounds["mean"] = o.alpha * np.abs(state["mean"]) + (1 - o.alpha) * g
        var = var + (bounds["mean"] / bc) ** 2
    d = np.sqrt(var + o.eps) if o.eps_in_sqrt else np.sqrt(var) + o.eps
    w_scale = np.abs(w) * (1 + lr * o.weight_decay)
    if o.momentum > 0:
        u = g / np.abs(d) * (lr if o.lr_inside_momentum else 1.0)
        bounds["momentum_buffer"] = o.momentum * np.abs(state["momentum_buffer"]) + u
        update = u + o.momentum * bounds["momentum_buffer"] if o.nesterov else bounds["momentum_buffer"]
        bounds["param"] = w_scale + (update if o.lr_inside_momentum else lr * update)
    else:
        bounds["param"] = w_scale + lr * g / np.abs(d)
    return bounds


def check_close(name, got, want, bound, dtype, compute_tol):
    """|got - want| within the compute error plus, for a storage type
    narrower than the compute type, half an ulp of the stored result."""
    rounding = 0.0 if dtype in (mx.float32, mx.float64) else 0.5 * ulp(want, dtype)
    err = np.abs(got - want)
    allowed = compute_tol * bound + rounding * (1 + 2**-10)
    bad = ~(err <= allowed)
    assert not bad.any(), (
        f"{name}: {bad.sum()} of {bad.size} off; worst {err[bad].max():.3e} "
        f"allowed {allowed[bad][np.argmax(err[bad])]:.3e}"
    )


DTYPES = [  # (parameter dtype, state dtype)
    (mx.float32, mx.float32),
    (mx.float16, mx.float16),
    (mx.bfloat16, mx.bfloat16),
    (mx.bfloat16, mx.float32),
    (mx.float16, mx.float32),
    (mx.float64, mx.float64),
]


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("mlx.core.", ""))
def test_every_option_combination_one_step_against_the_float64_model(dtypes):
    """All 480 option combinations, one fused step from a random state at step
    t = 3, per output within a few roundings of the float64 model."""
    p_dtype, s_dtype = dtypes
    compute_tol = F64_TOL if p_dtype == mx.float64 else F32_TOL
    rng = np.random.default_rng(7)
    shape, lr, t = (3, 67), float(np.float32(0.01)), 3  # lr as a float32 array holds it
    for o in option_grid():
        w = rounded(rng.standard_normal(shape), p_dtype)
        g = rounded(rng.standard_normal(shape), p_dtype)
        state = {k: rounded(v, s_dtype) for k, v in random_state(rng, shape, o, t).items()}
        new_w, new_state = rmsprop_step(
            mx.array(g).astype(p_dtype), mx.array(w).astype(p_dtype),
            {k: mx.array(v).astype(s_dtype) for k, v in state.items()},
            mx.array(lr), step=t, **op_kwargs(o),
        )
        assert new_w.dtype == p_dtype and all(a.dtype == s_dtype for a in new_state.values())
        want_w, want_state = models.fused_step(w, state, g, lr, t, o)
        bounds = step_bounds(w, state, g, lr, t, o)
        check_close(f"{o} param", as_f64(new_w), want_w, bounds["param"], p_dtype, compute_tol)
        for name in o.state_names():
            check_close(
                f"{o} {name}", as_f64(new_state[name]), want_state[name], bounds[name],
                s_dtype, compute_tol,
            )


# ---- Many steps through the optimizer.


def train(opt: RMSprop, w0: np.ndarray, grads, dtype=mx.float32) -> list[np.ndarray]:
    """Parameters after each step of opt.apply_gradients on one leaf."""
    params, out = {"w": mx.array(w0).astype(dtype)}, []
    for g in grads:
        params = opt.apply_gradients({"w": mx.array(g).astype(dtype)}, params)
        mx.eval(params, opt.state)
        out.append(as_f64(params["w"]))
    return out


def options_of(opt: RMSprop) -> models.Options:
    """The model options an optimizer (a preset, say) was configured with."""
    return models.Options(**{f: getattr(opt, f) for f in models.Options.__dataclass_fields__})


def schedule(k):
    """A learning-rate schedule (0-based step count), as mlx's schedules."""
    return 0.02 * 0.9**k


def mx_schedule(k):
    return 0.02 * mx.power(0.9, k)


def assert_trajectories_close(got, want, rtol, what):
    for step, (a, b) in enumerate(zip(got, want)):
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err <= rtol, f"{what}: step {step + 1}: relative error {err:.2e} > {rtol:.0e}"


STEPS = 25


def sequence(seed, shape=(8, 33), steps=STEPS):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(shape)
    return w0, [rng.standard_normal(shape) for _ in range(steps)]


@pytest.mark.parametrize("seed", range(12))
def test_many_steps_of_option_combinations_track_the_float64_model(seed):
    """Random option combinations, 25 float32 steps through RMSprop (with a
    schedule every other seed), against the float64 model from the same
    start: the trajectories stay within float32 accuracy."""
    grid = list(option_grid())
    o = grid[np.random.default_rng(seed).integers(len(grid))]
    lr, mx_lr = (schedule, mx_schedule) if seed % 2 else (0.01, 0.01)
    w0, grads = sequence(seed)
    ours = train(RMSprop(mx_lr, **kwargs(o)), w0, grads)
    want = models.fused_run(w0, grads, lr, o)
    assert_trajectories_close(ours, want, 1e-5, str(o))


PRESETS = {
    # name: (RMSprop preset, the library's documented algorithm, both taking
    # the library's own arguments)
    "torch": (RMSprop.from_torch, models.torch_run),
    "optax": (RMSprop.from_optax, models.optax_run),
    "keras": (RMSprop.from_keras, models.keras_run),
}
PRESET_ARGS = {
    "torch": [
        {}, {"momentum": 0.9}, {"centered": True, "momentum": 0.8},
        {"weight_decay": 0.1, "maximize": True}, {"alpha": 0.9, "eps": 1.0},
        {"centered": True, "momentum": 0.9, "weight_decay": 0.1, "maximize": True, "alpha": 0.9},
    ],
    "optax": [
        {}, {"eps_in_sqrt": False}, {"initial_scale": 1.0}, {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True}, {"nesterov": True},
        {"momentum": 0.0, "nesterov": True},  # optax accepts it: a trace of decay 0
        {"centered": True, "momentum": 0.8, "nesterov": True}, {"bias_correction": True},
        {"bias_correction": True, "initial_scale": 1.0, "centered": True, "momentum": 0.9},
        {"eps": 1e-3}, {"decay": 0.95, "eps": 0.1, "eps_in_sqrt": False},
    ],
    "keras": [
        {}, {"momentum": 0.9}, {"centered": True}, {"weight_decay": 0.1},
        {"centered": True, "momentum": 0.8, "weight_decay": 0.2, "rho": 0.95, "epsilon": 1e-4},
    ],
}
PRESET_CASES = [
    (library, args, scheduled)
    for library, all_args in PRESET_ARGS.items()
    for args in all_args
    for scheduled in (False, True)
]


def _lr_name(library):
    return "lr" if library == "torch" else "learning_rate"


@pytest.mark.parametrize(
    "library,args,scheduled", PRESET_CASES,
    ids=[f"{lib}-{'-'.join(a) or 'defaults'}-{'schedule' if s else 'constant'}" for lib, a, s in PRESET_CASES],
)
def test_presets_are_the_libraries_documented_algorithms(library, args, scheduled):
    """Our algorithm, configured by a preset, equals that library's documented
    algorithm in float64 (the mapping of every argument, the placement of
    eps, the weight decay and the lr in the momentum buffer), with a constant
    learning rate and with a schedule; and the fused optimizer follows it in
    float32."""
    preset, documented = PRESETS[library]
    lr = schedule if scheduled else 0.01
    w0, grads = sequence(len(args) + 3 * scheduled)
    want = documented(w0, grads, **{_lr_name(library): lr}, **args)
    opt = preset(**{_lr_name(library): mx_schedule if scheduled else 0.01}, **args)
    model = models.fused_run(w0, grads, lr, options_of(opt))
    assert_trajectories_close(model, want, 1e-12, f"model of {library} preset {args}")
    assert_trajectories_close(train(opt, w0, grads), want, 1e-5, f"{library} preset {args}")


def test_lr_placement_in_the_momentum_buffer_matters_only_under_a_schedule():
    """torch keeps lr outside the buffer, optax and Keras inside: the same
    trajectory under a constant lr, a different one under a schedule (so the
    presets must not be swapped)."""
    w0, grads = sequence(99)
    for lr in (0.01, schedule):
        outside = models.fused_run(w0, grads, lr, models.Options(momentum=0.9))
        inside = models.fused_run(w0, grads, lr, models.Options(momentum=0.9, lr_inside_momentum=True))
        diff = np.abs(outside[-1] - inside[-1]).max()
        assert (diff < 1e-12) == (lr == 0.01), diff


# ---- float32 state for 16-bit parameters.


def test_float32_state_for_bfloat16_parameters():
    """state_dtype=mx.float32: every state entry stays float32, the parameters
    stay bfloat16 (rounded once per step from float32 math), and the
    trajectory is closer to the float64 model than with bfloat16 state."""
    w0, grads = sequence(5, steps=40)
    w0 = rounded(w0, mx.bfloat16)
    grads = [rounded(g, mx.bfloat16) for g in grads]
    o = models.Options(momentum=0.9, centered=True)
    wide = RMSprop(0.01, **kwargs(o), state_dtype=mx.float32)
    narrow = RMSprop(0.01, **kwargs(o))
    ours_wide = train(wide, w0, grads, mx.bfloat16)
    ours_narrow = train(narrow, w0, grads, mx.bfloat16)
    assert set(wide.state["w"]) == {"v", "mean", "momentum_buffer"}
    assert all(a.dtype == mx.float32 for a in wide.state["w"].values())
    assert all(a.dtype == mx.bfloat16 for a in narrow.state["w"].values())
    assert wide.state_dtype_of(mx.zeros((1,), mx.bfloat16)) == mx.float32
    assert wide.state_dtype_of(mx.zeros((1,))) == mx.float32
    # The model of exactly that: exact state, the parameter rounded to
    # bfloat16 after every step.
    w, state, want = w0, models.initial_state(w0, o), []
    for t, g in enumerate(grads, start=1):
        w, state = models.fused_step(w, state, g, float(np.float32(0.01)), t, o)
        w = rounded(w, mx.bfloat16)
        want.append(w)
    err_wide = max(np.abs(a - b).max() for a, b in zip(ours_wide, want))
    err_narrow = max(np.abs(a - b).max() for a, b in zip(ours_narrow, want))
    assert err_wide < err_narrow / 4, (err_wide, err_narrow)
    # Each step: float32 state, one rounding of the parameter to bfloat16.
    params, state = {"w": mx.array(w0).astype(mx.bfloat16)}, None
    opt = RMSprop(0.01, **kwargs(o), state_dtype=mx.float32)
    for t, g in enumerate(grads[:5], start=1):
        before = {k: as_f64(v) for k, v in opt.state["w"].items()} if t > 1 else models.initial_state(w0, o)
        w_before = as_f64(params["w"])
        params = opt.apply_gradients({"w": mx.array(g).astype(mx.bfloat16)}, params)
        mx.eval(params, opt.state)
        want_w, want_state = models.fused_step(w_before, before, g, float(np.float32(0.01)), t, o)
        bounds = step_bounds(w_before, before, g, 0.01, t, o)
        check_close("param", as_f64(params["w"]), want_w, bounds["param"], mx.bfloat16, F32_TOL)
        for name in o.state_names():
            check_close(name, as_f64(opt.state["w"][name]), want_state[name], bounds[name],
                        mx.float32, F32_TOL)


def test_float32_state_dtype_leaves_float32_and_float64_state_in_their_own_dtype():
    """state_dtype=mx.float32 concerns float16 / bfloat16 parameters only:
    float32 and float64 parameters keep state of their own dtype and train
    bit for bit like an optimizer without the option."""
    w0, grads = sequence(5, steps=4)
    o = models.Options(momentum=0.9, centered=True)
    for dtype in (mx.float32, mx.float64):
        zero = mx.zeros((1,), dtype)
        wide = RMSprop(0.01, **kwargs(o), state_dtype=mx.float32)
        plain = RMSprop(0.01, **kwargs(o))
        assert wide.state_dtype_of(zero) == dtype
        params_wide = params_plain = {"w": mx.array(w0).astype(dtype)}
        for g in grads:
            grad = {"w": mx.array(g).astype(dtype)}
            params_wide = wide.apply_gradients(grad, params_wide)
            params_plain = plain.apply_gradients(grad, params_plain)
            mx.eval(params_wide, params_plain, wide.state, plain.state)
        assert {a.dtype for a in wide.state["w"].values()} == {dtype}
        bits_equal_trees(params_wide, params_plain)
        bits_equal_trees(wide.state, plain.state)


def test_a_checkpoint_of_float32_state_for_bfloat16_parameters_loads_and_continues(tmp_path):
    """An optimizer with state_dtype=mx.float32 saves float32 state beside
    bfloat16 parameters; a fresh one with the same option loads it (the
    state's dtype is the option's, not the parameter's) and continues bit
    for bit, while one without the option names the entry it rejects."""
    from mlx.utils import tree_unflatten

    def make(**extra):
        return RMSprop(0.01, momentum=0.9, centered=True, **extra)

    params = {k: (v.astype(mx.bfloat16) if isinstance(v, mx.array) else [v[0].astype(mx.bfloat16)])
              for k, v in two_leaves().items()}
    opt = make(state_dtype=mx.float32)
    for k in range(2):
        params = opt.apply_gradients(grads_of(params, k), params)
    mx.eval(params, opt.state)
    assert opt.state["a"]["v"].dtype == mx.float32
    path, params = resume_from_checkpoint(opt, make(state_dtype=mx.float32), params, range(2, 4), tmp_path)
    narrow = make()
    narrow.state = tree_unflatten(list(mx.load(path).items()))
    with pytest.raises(ValueError, match=r"entry '(a|b\.0)\.v' is \([0-9, ]+\) mlx.core.float32, "
                       r"but the parameter is \([0-9, ]+\) mlx.core.bfloat16; to keep float32 "
                       r"state beside it, use RMSprop\(\.\.\., state_dtype=mx.float32\)$"):
        narrow.apply_gradients(grads_of(params, 0), params)


# ---- mx.compile, checkpoints, all-or-nothing steps.


def heavy(lr=0.01, **extra) -> RMSprop:
    """The heaviest variant: centered, Nesterov momentum, weight decay, bias
    correction."""
    return RMSprop(lr, momentum=0.9, nesterov=True, centered=True, weight_decay=0.01,
                   bias_correction=True, **extra)


def two_leaves(seed=0):
    rng = np.random.default_rng(seed)
    return {"a": mx.array(rng.standard_normal((5, 9)).astype(np.float32)),
            "b": [mx.array(rng.standard_normal((7,)).astype(np.float32))]}


def grads_of(params, k):
    return {"a": mx.sin(params["a"] * (k + 1)), "b": [mx.cos(params["b"][0] * (k + 2))]}


def resume_from_checkpoint(opt, fresh, params, steps, tmp_path):
    """Save ``opt``'s state with safetensors, load it into ``fresh`` and run
    both over ``steps`` from ``params``: parameters and state must end bit
    for bit alike. Returns the checkpoint's path and the final parameters."""
    from mlx.utils import tree_flatten, tree_unflatten

    path = str(tmp_path / "state.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(opt.state)))
    fresh.state = tree_unflatten(list(mx.load(path).items()))
    resumed = params
    for k in steps:
        params = opt.apply_gradients(grads_of(params, k), params)
        resumed = fresh.apply_gradients(grads_of(resumed, k), resumed)
    mx.eval(params, resumed, opt.state, fresh.state)
    bits_equal_trees(resumed, params)
    bits_equal_trees(fresh.state, opt.state)
    return path, params


def bits_equal_trees(x, y):
    from mlx.utils import tree_flatten

    # (in any order: safetensors sorts keys)
    fx, fy = sorted(tree_flatten(x), key=lambda kv: kv[0]), sorted(tree_flatten(y), key=lambda kv: kv[0])
    assert [k for k, _ in fx] == [k for k, _ in fy]
    for (k, a), (_, b) in zip(fx, fy):
        if isinstance(a, mx.array):
            assert a.dtype == b.dtype and mx.array_equal(a, b, equal_nan=True).item(), k
        else:
            assert a == b, k


@pytest.mark.parametrize("options", [{}, {"momentum": 0.9, "centered": True, "bias_correction": True}],
                         ids=["plain", "bias_corrected"])
def test_leaves_of_every_dtype_in_one_step_each_step_as_alone(options):
    """One step over float32, float64, float16 and bfloat16 leaves shares the
    step's scalars per compute type (float for float32 and the halves,
    double for float64): each leaf comes out bit for bit as when it is the
    only leaf of the tree."""
    rng = np.random.default_rng(3)
    dtypes = {"f32": mx.float32, "f64": mx.float64, "f16": mx.float16, "bf16": mx.bfloat16,
              "f64b": mx.float64, "f32b": mx.float32}
    params = {k: mx.array(rng.standard_normal((6, 5))).astype(d) for k, d in dtypes.items()}
    grads = [{k: mx.array(rng.standard_normal((6, 5))).astype(d) for k, d in dtypes.items()}
             for _ in range(3)]
    together = RMSprop(0.05, **options)
    alone = {k: RMSprop(0.05, **options) for k in dtypes}
    p_together, p_alone = params, {k: {k: v} for k, v in params.items()}
    for g in grads:
        p_together = together.apply_gradients(g, p_together)
        for k in dtypes:
            p_alone[k] = alone[k].apply_gradients({k: g[k]}, p_alone[k])
        mx.eval(p_together, p_alone, together.state, [o.state for o in alone.values()])
    for k in dtypes:
        bits_equal_trees({k: p_together[k]}, p_alone[k])
        bits_equal_trees(together.state[k], alone[k].state[k])


def test_apply_single_through_mlx_s_own_apply_gradients_steps_like_ours():
    """mlx.optimizers.Optimizer.apply_gradients (init, step + 1, then
    apply_single per leaf) run on our optimizer gives the bits of our native
    step, bias correction included: apply_single passes the step count."""
    import mlx.optimizers as optim

    ours, base = heavy(), heavy()
    p_ours = p_base = two_leaves()
    for k in range(3):
        p_ours = ours.apply_gradients(grads_of(p_ours, k), p_ours)
        p_base = optim.Optimizer.apply_gradients(base, grads_of(p_base, k), p_base)
        mx.eval(p_ours, p_base, ours.state, base.state)
    bits_equal_trees(p_base, p_ours)
    bits_equal_trees(base.state, ours.state)


def test_compile_with_a_schedule_and_bias_correction_does_not_retrace():
    """The learning rate and the step count are array inputs of the
    primitive: under mx.compile a schedule and the bias correction's 1 -
    alpha^t change every step without a retrace, and the results are the
    eager ones bit for bit."""
    import mlx.optimizers as optim
    from functools import partial

    eager_params, compiled_params = two_leaves(), two_leaves()
    eager, compiled = heavy(optim.exponential_decay(0.05, 0.8)), heavy(optim.exponential_decay(0.05, 0.8))
    compiled.init(compiled_params)
    holder = {"params": compiled_params}
    traces = []
    state = [holder, compiled.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(grads):
        traces.append(1)
        holder["params"] = compiled.apply_gradients(grads, holder["params"])

    for k in range(6):
        eager_params = eager.apply_gradients(grads_of(eager_params, k), eager_params)
        mx.eval(eager_params, eager.state)
        step(grads_of(holder["params"], k))
        mx.eval(state)
    assert len(traces) == 1, f"traced {len(traces)} times"
    bits_equal_trees(holder["params"], eager_params)
    bits_equal_trees(compiled.state, eager.state)


@pytest.mark.parametrize("make", [heavy, lambda: RMSprop.from_keras(0.01, momentum=0.5, weight_decay=0.1)],
                         ids=["heavy", "keras"])
def test_checkpoint_round_trip_with_every_state_entry(tmp_path, make):
    """A state with v, mean and momentum_buffer saved with safetensors and
    loaded into a fresh optimizer continues bit for bit."""
    params, opt = two_leaves(), make()
    for k in range(3):
        params = opt.apply_gradients(grads_of(params, k), params)
    mx.eval(params, opt.state)
    fresh = make()
    resume_from_checkpoint(opt, fresh, params, range(3, 6), tmp_path)
    assert set(fresh.state["a"]) == set(opt.state_names)


def test_a_checkpoint_without_the_variants_state_is_named():
    """Loading a plain RMSprop's state (v only) into a centered momentum
    optimizer names the first missing entry; one with an extra entry names
    it too."""
    params, plain = two_leaves(), RMSprop(0.01)
    params = plain.apply_gradients(grads_of(params, 0), params)
    variant = heavy()
    variant.state = plain.state
    with pytest.raises(ValueError, match=r"no entry 'a\.mean'"):
        variant.apply_gradients(grads_of(params, 1), params)
    heavy_state = heavy()
    heavy_state.apply_gradients(grads_of(params, 1), params)
    plain2 = RMSprop(0.01)
    plain2.state = heavy_state.state
    with pytest.raises(ValueError, match=r"unexpected entry 'a\.mean' \(RMSprop keeps only 'v'\)"):
        plain2.apply_gradients(grads_of(params, 1), params)


@pytest.mark.parametrize("bad", ["momentum_buffer_shape", "mean_dtype", "missing_mean"])
def test_a_bad_state_entry_changes_nothing(bad):
    """With every state entry in play, a bad one in the second leaf fails
    the whole step before anything changes; the step then runs as if the
    bad one never happened."""
    params, opt = two_leaves(), heavy()
    params = opt.apply_gradients(grads_of(params, 0), params)
    mx.eval(params, opt.state)
    leaf = opt.state["b"][0]
    saved = dict(leaf)
    if bad == "momentum_buffer_shape":
        leaf["momentum_buffer"] = mx.zeros((3,))
    elif bad == "mean_dtype":
        leaf["mean"] = leaf["mean"].astype(mx.float16)
    else:
        del leaf["mean"]
    before_a = {k: mx.array(v) for k, v in opt.state["a"].items()}
    before_step = opt.state["step"].item()
    with pytest.raises(ValueError, match=r"leaf 'b\.0'"):
        opt.apply_gradients(grads_of(params, 1), params)
    assert opt.state["step"].item() == before_step
    bits_equal_trees(opt.state["a"], before_a)
    opt.state["b"][0] = saved
    twin = heavy()
    twin.state = {"step": mx.array(before_step), "learning_rate": opt.state["learning_rate"],
                  "a": before_a, "b": [dict(saved)]}
    bits_equal_trees(opt.apply_gradients(grads_of(params, 1), params),
                     twin.apply_gradients(grads_of(params, 1), params))


def test_the_op_takes_exactly_the_state_arrays_its_options_keep():
    """The C++ op (below the Python dict API) rejects a state list longer or
    shorter than the options keep: an extra array would be read as the
    learning rate."""
    p = mx.ones((3,))
    plain = _ext.RMSpropOptions(alpha=0.9, eps=1e-8)
    centered = _ext.RMSpropOptions(alpha=0.9, eps=1e-8, centered=True)
    with pytest.raises(ValueError, match=r"expected 1 state array \(v\) for these options, got 2"):
        _ext.rmsprop_step(p, p, [p, p], mx.array(0.1), None, plain)
    with pytest.raises(ValueError, match=r"expected 2 state arrays \(v, mean\) for these options, got 3"):
        _ext.rmsprop_step(p, p, [p, p, p], mx.array(0.1), None, centered)
    with pytest.raises(ValueError, match=r"expected 2 state arrays \(v, mean\) for these options, got 1"):
        _ext.rmsprop_step(p, p, [p], mx.array(0.1), None, centered)


# ---- Layout and buffer reuse do not change a variant step's bits.

_UINT = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}
_LAYOUT_OPTIONS = [dict(centered=True, momentum=0.9), dict(momentum=0.9, nesterov=True),
                   dict(centered=True, weight_decay=0.1)]
_LAYOUT_DTYPES = [(mx.float32, mx.float32), (mx.bfloat16, mx.float32), (mx.bfloat16, mx.bfloat16)]


def _bits(a: mx.array) -> np.ndarray:
    return np.array(a.view(_UINT[a.dtype]))


def _own_copy(a: mx.array) -> mx.array:
    """An evaluated copy of `a` on a buffer of its own (same bits)."""
    out = mx.array(_bits(a)).view(a.dtype).reshape(a.shape)
    mx.eval(out)
    return out


def _address(a: mx.array) -> int:
    view = np.array(a.view(_UINT[a.dtype]), copy=False)
    address = view.ctypes.data
    del view
    return address


def _variant_leaf(shape, dtypes, opts, seed):
    param_dtype, state_dtype = dtypes
    rng = np.random.default_rng(seed)
    o = models.Options(**opts)
    state = {k: mx.array(v.astype(np.float32)).astype(state_dtype)
             for k, v in random_state(rng, shape, o, 3).items()}
    g = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(param_dtype)
    w = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(param_dtype)
    mx.eval(g, w, state)
    return g, w, state


@pytest.mark.parametrize("opts", _LAYOUT_OPTIONS, ids=lambda o: "-".join(sorted(o)))
@pytest.mark.parametrize("dtypes", _LAYOUT_DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("mlx.core.", ""))
@pytest.mark.parametrize("donated", ["param", "param+v", "state", "v", "all"])
def test_donating_some_inputs_of_a_variant_step_changes_no_bit(opts, dtypes, donated):
    """Which inputs nothing else references decides which buffers the
    outputs take: param' takes param's when param is donatable, the state's
    outputs take the state's only when every state array is (the loops run a
    leaf's state in place or not at all). An input still referenced keeps
    its values, and the results equal the step with nothing donated."""
    g, w, state = _variant_leaf((37, 65), dtypes, opts, seed=len(donated))
    ref_w, ref_state = rmsprop_step(g, w, state, 0.01, step=3, **opts)
    mx.eval(ref_w, ref_state)
    names = list(state)
    free = {"param": {"param"}, "param+v": {"param", "v"}, "state": set(names),
            "v": {"v"}, "all": {"param", *names}}[donated]
    inputs = {"param": _own_copy(w), **{k: _own_copy(a) for k, a in state.items()}}
    addresses = {k: _address(a) for k, a in inputs.items()}
    held = {k: a for k, a in inputs.items() if k not in free}  # still referenced
    out_w, out_state = rmsprop_step(g, inputs.pop("param"), {k: inputs.pop(k) for k in names},
                                    0.01, step=3, **opts)
    mx.eval(out_w, out_state)
    np.testing.assert_array_equal(_bits(out_w), _bits(ref_w))
    for k in names:
        np.testing.assert_array_equal(_bits(out_state[k]), _bits(ref_state[k]), err_msg=k)
    for k, a in held.items():
        original = w if k == "param" else state[k]
        np.testing.assert_array_equal(_bits(a), _bits(original), err_msg=f"{k} was overwritten")
    assert (_address(out_w) == addresses["param"]) == ("param" in free)
    state_in_place = set(names) <= free
    for k in names:
        assert (_address(out_state[k]) == addresses[k]) == state_in_place, k


@pytest.mark.parametrize("opts", _LAYOUT_OPTIONS, ids=lambda o: "-".join(sorted(o)))
@pytest.mark.parametrize("dtypes", _LAYOUT_DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("mlx.core.", ""))
def test_state_arrays_laid_out_unlike_each_other_give_the_same_bits(opts, dtypes):
    """v row-major, the mean column-major, the momentum buffer a strided
    slice: the strided walk reads each state array at its own offsets."""
    shape = (23, 41)
    g, w, state = _variant_leaf(shape, dtypes, opts, seed=7)
    ref_w, ref_state = rmsprop_step(g, w, state, 0.01, step=3, **opts)
    layouts = {
        "v": lambda a: a,
        "mean": lambda a: mx.transpose(mx.contiguous(mx.transpose(a))),
        "momentum_buffer": lambda a: mx.repeat(a, 2, axis=1)[:, ::2],
    }
    laid = {k: layouts[k](a) for k, a in state.items()}
    mx.eval(laid)
    assert _ext._cpu_walk(g, w, *laid.values()) != "flat"
    out_w, out_state = rmsprop_step(g, w, laid, 0.01, step=3, **opts)
    mx.eval(ref_w, ref_state, out_w, out_state)
    np.testing.assert_array_equal(_bits(out_w), _bits(ref_w))
    for k in state:
        np.testing.assert_array_equal(_bits(out_state[k]), _bits(ref_state[k]), err_msg=k)
