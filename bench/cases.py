"""What the benchmark measures: optimizer steps on single leaves, on many
small leaves and on whole models; the memory limit of the step's access
pattern and a plain memory copy of the same bytes; where a step's time goes
(our Python, mlx's model update, eval); the extra peak memory of a step; the
memory-lean options (8-bit state, stochastic rounding and Kahan summation,
the fused gradient clipping) against the steps they replace; and the state's
bytes per parameter in every mode. Every optimizer step is the normal
training-loop step:

    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state)
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import threading
import time
from functools import partial
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

import mlx_fused_rmsprop
from mlx_fused_rmsprop import _ext

LR = 1e-3
ALPHA = 0.99
EPS = 1e-8

# Clipping's global norm: below the bench gradients' norms (N(0, 1e-4)
# elements: 41 for 16M of them, 1.3 for 16K; the Transformer's real
# gradients: about 0.13), so clipping is active.
MAX_GRAD_NORM = 0.1

# Implementations, in the order tables and plots show them.
IMPLS = {
    "fused": "fused (ours)",
    "fused_compiled": "fused, mx.compile",
    "mlx": "mlx eager",
    "mlx_compiled": "mlx, mx.compile",
    "torch_foreach": "torch foreach (CPU)",
    # The memory-lean options (issues 18-20).
    "fused_f32_state": "fused, float32 state",
    "fused_8bit": "fused, 8-bit state",
    "fused_sr": "fused, stochastic rounding",
    "fused_kahan": "fused, Kahan summation",
    "fused_clip": "fused clip + update (ours)",
    "clip_fused": "clip_grad_norm + fused",
    "clip_mlx": "clip_grad_norm + mlx eager",
    "clip_mlx_compiled": "clip_grad_norm + mlx, mx.compile",
}

# The fused optimizer's options per implementation (a *_compiled one takes
# its eager twin's).
FUSED_OPTIONS: dict[str, dict] = {
    "fused": {},
    "fused_f32_state": {"state_dtype": mx.float32},
    "fused_8bit": {"state_bits": 8},
    "fused_sr": {"stochastic_rounding": True, "seed": 0},
    "fused_kahan": {"kahan_summation": True},
    "fused_clip": {"max_grad_norm": MAX_GRAD_NORM},
}

# Implementations that clip with mlx.optimizers.clip_grad_norm before the
# update of the one named (what a training loop does without this package's
# max_grad_norm).
CLIP_FIRST = {"clip_fused": "fused", "clip_mlx": "mlx", "clip_mlx_compiled": "mlx_compiled"}

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def make_optimizer(impl: str) -> optim.Optimizer:
    impl = CLIP_FIRST.get(impl, impl)
    if impl.startswith("fused"):
        options = FUSED_OPTIONS[impl.removesuffix("_compiled")]
        return mlx_fused_rmsprop.RMSprop(learning_rate=LR, alpha=ALPHA, eps=EPS, **options)
    return optim.RMSprop(learning_rate=LR, alpha=ALPHA, eps=EPS)


class Leaf(nn.Module):
    """A model that is one parameter of n elements."""

    def __init__(self, n: int, dtype: mx.Dtype, seed: int = 0):
        super().__init__()
        self.w = mx.random.normal((n,), key=mx.random.key(seed)).astype(dtype)


def _update_fn(model: nn.Module, opt: optim.Optimizer, impl: str) -> Callable:
    """g -> opt.update(model, g), under mx.compile for the *_compiled impls;
    clip_grad_norm first for the CLIP_FIRST ones (compiled with the update)."""
    clip_first = impl in CLIP_FIRST

    def update(g):
        if clip_first:
            g, _ = optim.clip_grad_norm(g, MAX_GRAD_NORM)
        opt.update(model, g)

    if impl.endswith("compiled"):
        state = [model.state, opt.state]
        return partial(mx.compile, inputs=state, outputs=state)(update)
    return update


def optimizer_step(
    model: nn.Module, impl: str, grads: dict, make: Optional[Callable[[str], optim.Optimizer]] = None
) -> tuple[Callable[[], None], optim.Optimizer]:
    """A callable doing one full optimizer step on `model` with fixed grads,
    evaluated (mx.compile'd for the *_compiled implementations); the
    optimizer from ``make(impl)`` (default: make_optimizer)."""
    opt = (make or make_optimizer)(impl)
    opt.init(model.trainable_parameters())
    mx.eval(model.parameters(), opt.state)
    update = _update_fn(model, opt, impl)

    def step() -> None:
        update(grads)
        mx.eval(model.parameters(), opt.state)

    return step, opt


# ---- The heaviest variant: centered, momentum and weight decay.

# torch.optim.RMSprop(centered=True, momentum=0.9, weight_decay=0.01): every
# option that adds a state stream or an op to the step.
HEAVY = dict(centered=True, momentum=0.9, weight_decay=0.01)
HEAVY_IMPLS = {
    "fused": "fused (ours)",
    "ops": "mlx ops eager",
    "ops_compiled": "mlx ops, mx.compile",
}


class OpsRMSprop(optim.Optimizer):
    """The heaviest variant written with mlx.core ops, as a user would
    without this package (torch's algorithm: coupled weight decay, centered,
    momentum with the learning rate outside the buffer)."""

    def __init__(self, learning_rate, alpha, eps, centered, momentum, weight_decay):
        super().__init__()
        self._maybe_schedule("learning_rate", learning_rate)
        self.alpha, self.eps, self.momentum, self.weight_decay = alpha, eps, momentum, weight_decay
        assert centered

    def init_single(self, parameter: mx.array, state: dict) -> None:
        for name in ("v", "mean", "momentum_buffer"):
            state[name] = mx.zeros_like(parameter)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        lr = self.learning_rate.astype(gradient.dtype)
        g = gradient + self.weight_decay * parameter
        v = self.alpha * state["v"] + (1 - self.alpha) * mx.square(g)
        m = self.alpha * state["mean"] + (1 - self.alpha) * g
        b = self.momentum * state["momentum_buffer"] + g / (mx.sqrt(v - mx.square(m)) + self.eps)
        state["v"], state["mean"], state["momentum_buffer"] = v, m, b
        return parameter - lr * b


def make_heavy_optimizer(impl: str) -> optim.Optimizer:
    if impl == "fused":
        return mlx_fused_rmsprop.RMSprop(LR, ALPHA, EPS, **HEAVY)
    return OpsRMSprop(LR, ALPHA, EPS, **HEAVY)


def heavy_step(model: nn.Module, impl: str, grads: dict) -> tuple[Callable[[], None], optim.Optimizer]:
    """One evaluated step of the heaviest variant (mx.compile'd for
    ops_compiled)."""
    return optimizer_step(model, impl, grads, make_heavy_optimizer)


def heavy_bytes(n: int, itemsize: int) -> int:
    """Bytes one heaviest-variant step moves: reads grad, param, v, mean,
    buffer; writes param, v, mean, buffer."""
    return 9 * n * itemsize


# ---- The memory roofline: a plain copy of the same bytes.


class Copier:
    """memmove of `nbytes` between two pre-faulted buffers, on 1 or several
    threads (ctypes calls release the GIL); the best of these is the memory
    roofline an element-wise kernel can hope for."""

    def __init__(self, nbytes: int, threads: int):
        self.nbytes = max(64, int(nbytes))
        self.threads = max(1, threads)
        self._src = (ctypes.c_char * self.nbytes)()
        self._dst = (ctypes.c_char * self.nbytes)()
        self.src = ctypes.addressof(self._src)
        self.dst = ctypes.addressof(self._dst)
        ctypes.memset(self.src, 1, self.nbytes)  # fault every page in
        ctypes.memset(self.dst, 2, self.nbytes)
        part = -(-self.nbytes // self.threads)
        part = -(-part // 4096) * 4096
        self.parts = [
            (o, min(part, self.nbytes - o)) for o in range(0, self.nbytes, part)
        ]

    def copy_1t(self) -> None:
        ctypes.memmove(self.dst, self.src, self.nbytes)

    def copy_nt(self) -> None:
        if len(self.parts) == 1:
            return self.copy_1t()
        workers = [
            threading.Thread(
                target=ctypes.memmove, args=(self.dst + o, self.src + o, n)
            )
            for o, n in self.parts[1:]
        ]
        for w in workers:
            w.start()
        o, n = self.parts[0]
        ctypes.memmove(self.dst + o, self.src + o, n)
        for w in workers:
            w.join()


class StepPatternLimit:
    """The memory limit for the step's own access pattern (csrc/roofline.h):
    reads grad, param and the state and writes param and the state back in
    place, with trivial math, split like the fused step splits the same leaf.
    Native code, so no conversion or Python cost: what the memory system
    allows for exactly the step's traffic.

    Without `state`: the plain step (v of the leaf's dtype: three buffers of
    the leaf's bytes). With `state` (the optimizer's entry for the leaf):
    that entry's width; `block_scales` adds the 8-bit state's float32 scale
    per 256 elements, read and written, walked block by block."""

    def __init__(self, leaf: mx.array, grad: mx.array, state: mx.array | None = None,
                 block_scales: bool = False):
        if state is None:
            self._kernel = _ext.StepPatternRoofline(leaf.size * leaf.dtype.size)
            state = leaf
        else:
            self._kernel = _ext.StepPatternRoofline(
                leaf.size, leaf.dtype.size, state.dtype.size, block_scales)
        # The kernel's own answer: 8-bit leaves are compute-bound.
        bound = _ext._cpu_bound(grad, leaf, state, quantized=block_scales)
        self.threads = _ext._split_parts(leaf.size, bound)
        self.bound = bound
        self.bytes_moved = self._kernel.bytes_moved

    def run_1t(self) -> None:
        self._kernel.run(1)

    def run_same_threads(self) -> None:
        self._kernel.run(self.threads)


def rmsprop_bytes(n: int, itemsize: int) -> int:
    """Bytes one RMSprop step moves: reads grad, param, v; writes param, v."""
    return 5 * n * itemsize


# ---- The state's bytes per parameter, by mode (issues 18 and 19).

# Per mode: (label, the weights' dtype, the optimizer's options), in the
# order the table shows them. Stochastic rounding keeps no per-parameter
# state (its seed is one scalar), so its rows match the nearest ones.
MEMORY_MODES: dict[str, tuple[str, str, dict]] = {
    "f32": ("float32 weights, float32 state (= mlx)", "float32", {}),
    "f32_8bit": ("float32 weights, 8-bit state", "float32", {"state_bits": 8}),
    "bf16": ("bfloat16 weights, bfloat16 state (= mlx)", "bfloat16", {}),
    "bf16_f32_state": ("bfloat16 weights, float32 state", "bfloat16",
                       {"state_dtype": mx.float32}),
    "bf16_sr": ("bfloat16 weights, bfloat16 state, stochastic rounding", "bfloat16",
                {"stochastic_rounding": True, "seed": 0}),
    "bf16_kahan": ("bfloat16 weights, bfloat16 state, Kahan", "bfloat16",
                   {"kahan_summation": True}),
    "bf16_8bit": ("bfloat16 weights, 8-bit state", "bfloat16", {"state_bits": 8}),
    "bf16_8bit_sr": ("bfloat16 weights, 8-bit state, stochastic rounding", "bfloat16",
                     {"state_bits": 8, "stochastic_rounding": True, "seed": 0}),
    "bf16_8bit_kahan": ("bfloat16 weights, 8-bit state, Kahan", "bfloat16",
                        {"state_bits": 8, "kahan_summation": True}),
}

# The documented defaults the computed layout assumes (RMSprop's signature).
MIN_8BIT_SIZE = 4096
STATE_BLOCK = 256


def llama2_7b_shapes() -> list[tuple[int, ...]]:
    """Llama-2-7B's parameter shapes: 32 layers of dims 4096 (q, k, v, o),
    MLP 11008 (gate, up, down) and two RMSNorms, a 32000-token embedding, a
    final norm and an untied output layer: 6,738,415,616 parameters. The
    bench computes its state from these shapes; no such model runs."""
    d, hidden, vocab, layers = 4096, 11008, 32000, 32
    layer = [(d, d)] * 4 + [(hidden, d), (hidden, d), (d, hidden)] + [(d,)] * 2
    return [(vocab, d)] + layer * layers + [(d,), (vocab, d)]


def computed_state_bytes(shapes: list[tuple[int, ...]], weights: mx.Dtype, options: dict) -> int:
    """The per-parameter state's bytes (scalar entries aside) of
    RMSprop(**options) over parameters of these shapes, from the documented
    layout: one entry v (the bench's modes keep no mean or momentum); 8-bit
    (uint8 codes plus a float32 scale per 256 elements) for leaves of at least
    MIN_8BIT_SIZE elements with state_bits=8, float32 beside 16-bit weights
    with state_bits=8 (the small leaves) or state_dtype=float32, else the
    weights' dtype; Kahan adds a compensation in the weights' dtype for 16-bit
    weights."""
    half = weights in (mx.float16, mx.bfloat16)
    eight_bit = options.get("state_bits") == 8
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if eight_bit and n >= MIN_8BIT_SIZE:
            total += n + 4 * -(-n // STATE_BLOCK)
        elif half and (eight_bit or options.get("state_dtype") is not None):  # float32
            total += 4 * n
        else:
            total += weights.size * n
        if half and options.get("kahan_summation"):
            total += weights.size * n
    return total


def measured_state_bytes(model: nn.Module, options: dict) -> dict[str, tuple[int, bool]]:
    """Per parameter (its path): the bytes of every state entry the optimizer
    holds after one step on `model` (zero gradients), and whether that state
    is 8-bit. Scalar entries (step, learning rate, seed, ...) are not counted."""
    from mlx.utils import tree_flatten, tree_map

    opt = mlx_fused_rmsprop.RMSprop(LR, ALPHA, EPS, **options)
    opt.init(model.trainable_parameters())
    opt.update(model, tree_map(mx.zeros_like, model.trainable_parameters()))
    mx.eval(model.parameters(), opt.state)
    per_leaf: dict[str, tuple[int, bool]] = {}
    for path, value in tree_flatten(opt.state):
        if "." not in path:
            continue  # a scalar entry of the whole optimizer
        leaf, entry = path.rsplit(".", 1)
        nbytes, quantized = per_leaf.get(leaf, (0, False))
        per_leaf[leaf] = (nbytes + value.nbytes,
                          quantized or (entry == "v" and value.dtype == mx.uint8))
    del opt
    return per_leaf


def parameter_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    from mlx.utils import tree_flatten

    return [tuple(p.shape) for _, p in tree_flatten(model.trainable_parameters())]


# ---- Extra peak memory of a step in a training loop.


def _leaf_loss(model: Leaf, x: mx.array) -> mx.array:
    return mx.sum(model.w * x)


def step_extra_peak(
    n: int, dtype: mx.Dtype, impl: str, one_eval: bool = False, steps: int = 3
) -> float:
    """Extra peak memory of one training step, in units of the leaf's bytes:
    mx.get_peak_memory() after mx.reset_peak_memory(), minus the memory live
    before the step (parameter, state, input). A one-leaf model, loss
    sum(w * x); the last of `steps` steps counts (the state exists from the
    first).

    one_eval=False: the gradients are evaluated first, then the optimizer
    step `update(model, grads)` + `mx.eval(parameters, state)` is measured
    alone (the gradient is live before it). one_eval=True: the whole loop
    body of the issue, `loss, grads = value_and_grad(...)`, `update`,
    `mx.eval(parameters, state)`, so the gradient is part of the peak."""
    model = Leaf(n, dtype)
    x = mx.random.normal((n,), key=mx.random.key(1)).astype(dtype)
    mx.eval(model.parameters(), x)
    opt = make_optimizer(impl)
    value_and_grad = nn.value_and_grad(model, _leaf_loss)
    update = _update_fn(model, opt, impl)

    extra = 0.0
    for _ in range(steps):
        mx.synchronize()
        if one_eval:
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            loss, grads = value_and_grad(model, x)
        else:
            loss, grads = value_and_grad(model, x)
            mx.eval(loss, grads)
            mx.synchronize()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
        update(grads)
        mx.eval(model.parameters(), opt.state)
        mx.synchronize()
        extra = max(0, mx.get_peak_memory() - base) / (n * dtype.size)
        del loss, grads
    del model, opt, x
    gc.collect()
    mx.clear_cache()
    return extra


# ---- Many small leaves: per-leaf overhead rather than memory.


class ManyLeaves(nn.Module):
    """A model of `count` independent float32 parameters of n elements."""

    def __init__(self, count: int, n: int, seed: int = 0):
        super().__init__()
        self.ws = [mx.random.normal((n,), key=mx.random.key(seed * 100003 + i))
                   for i in range(count)]
        mx.eval(self.ws)


def many_grads(count: int, n: int) -> dict:
    grads = {"ws": [mx.random.normal((n,), key=mx.random.key(7 * 100003 + i)) * 1e-2
                    for i in range(count)]}
    mx.eval(grads)
    return grads


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_foreach_step(count: int, n: int) -> Callable[[], None]:
    """torch.optim.RMSprop(foreach=True) on CPU over the same leaves: the
    multi-tensor path, the peer on many small tensors."""
    import torch

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen, requires_grad=True) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(n, generator=gen) * 1e-2
    opt = torch.optim.RMSprop(params, lr=LR, alpha=ALPHA, eps=EPS, foreach=True)
    return opt.step


def step_phases(model: nn.Module, grads: dict, rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per phase of the fused step `opt.update(model, grads)`
    + `mx.eval(...)`: `apply_gradients` (this package's Python and native
    call: one walk, every check, the graph), mlx's `model.update(...)`, and
    `mx.eval` (mlx's per-array scheduling plus the kernels)."""
    opt = make_optimizer("fused")
    opt.init(model.trainable_parameters())
    mx.eval(model.parameters(), opt.state)
    phases: dict[str, list[float]] = {"apply_gradients": [], "model_update": [], "eval": []}
    for r in range(warmup + rounds):
        t0 = time.perf_counter()
        new_parameters = opt.apply_gradients(grads, model)
        t1 = time.perf_counter()
        model.update(new_parameters)
        t2 = time.perf_counter()
        mx.eval(model.parameters(), opt.state)
        t3 = time.perf_counter()
        del new_parameters
        if r >= warmup:
            phases["apply_gradients"].append(t1 - t0)
            phases["model_update"].append(t2 - t1)
            phases["eval"].append(t3 - t2)
    return {k: statistics.median(v) for k, v in phases.items()}


# ---- Whole models.


class MLP(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


def transformer_spec(quick: bool) -> dict:
    if quick:
        return dict(dims=32, num_heads=2, num_encoder_layers=1,
                    num_decoder_layers=1, mlp_dims=64)
    return dict(dims=256, num_heads=4, num_encoder_layers=4,
                num_decoder_layers=4, mlp_dims=1024)


def mlp_spec(quick: bool) -> list[int]:
    return [64, 128, 64] if quick else [1024, 2048, 2048, 1024]


def build_model(name: str, quick: bool, seed: int = 0) -> nn.Module:
    mx.random.seed(seed)
    if name == "transformer":
        model = nn.Transformer(**transformer_spec(quick))
    elif name == "mlp":
        model = MLP(mlp_spec(quick))
    else:
        raise ValueError(name)
    mx.eval(model.parameters())
    return model


def model_description(name: str, quick: bool) -> str:
    if name == "transformer":
        s = transformer_spec(quick)
        return (
            f"nn.Transformer(dims={s['dims']}, num_heads={s['num_heads']}, "
            f"num_encoder_layers={s['num_encoder_layers']}, "
            f"num_decoder_layers={s['num_decoder_layers']}, mlp_dims={s['mlp_dims']})"
        )
    return "MLP(" + " -> ".join(str(d) for d in mlp_spec(quick)) + ", ReLU)"


def real_grads(name: str, model: nn.Module, quick: bool, seed: int = 1) -> dict:
    """Gradients of a loss on random data, computed once with
    nn.value_and_grad and evaluated: the arrays, and their memory layouts
    (a Linear weight's gradient is the column-major transpose of a matmul),
    are the ones a training loop hands the optimizer."""
    mx.random.seed(seed)
    if name == "transformer":
        dims = transformer_spec(quick)["dims"]
        src = mx.random.normal((4, 32, dims))
        tgt = mx.random.normal((4, 32, dims))

        def loss_fn(m):
            return mx.mean(mx.square(m(src, tgt, None, None, None)))

    else:
        dims = mlp_spec(quick)
        x = mx.random.normal((64, dims[0]))
        y = mx.random.normal((64, dims[-1]))

        def loss_fn(m):
            return mx.mean(mx.square(m(x) - y))

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    mx.eval(loss, grads)
    return grads


def count_params(model: nn.Module) -> tuple[int, int]:
    from mlx.utils import tree_flatten

    leaves = tree_flatten(model.trainable_parameters())
    return sum(p.size for _, p in leaves), len(leaves)
