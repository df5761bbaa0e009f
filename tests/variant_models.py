"""Float64 NumPy models of RMSprop: ours (every option of
mlx_fused_rmsprop.RMSprop) and the documented algorithms of torch.optim.RMSprop
(torch 2.13), optax.rmsprop (optax 0.2.8) and keras.optimizers.RMSprop (Keras
3.15), each replayed step by step in the library's order of operations.

A learning rate is a number or a schedule of the 0-based count of completed
steps (0 on the first step), as in mlx.optimizers, torch's LambdaLR, optax and
Keras.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np

LR = Union[float, Callable[[int], float]]


def lr_at(lr: LR, k: int) -> float:
    return float(lr(k)) if callable(lr) else float(lr)


@dataclass
class Options:
    """The options of mlx_fused_rmsprop.RMSprop, with its defaults."""

    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0
    nesterov: bool = False
    centered: bool = False
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    eps_in_sqrt: bool = False
    initial_scale: float = 0.0
    bias_correction: bool = False
    maximize: bool = False
    lr_inside_momentum: bool = False

    def state_names(self) -> list[str]:
        return ["v"] + (["mean"] if self.centered else []) + (
            ["momentum_buffer"] if self.momentum > 0 else []
        )


def initial_state(param: np.ndarray, o: Options) -> dict:
    state = {"v": np.full_like(param, o.initial_scale, dtype=np.float64)}
    for name in o.state_names()[1:]:
        state[name] = np.zeros_like(param, dtype=np.float64)
    return state


def fused_step(w, state: dict, g, lr: float, t: int, o: Options):
    """One step of our algorithm (kernels/rmsprop_math.h) in float64 from
    (w, state) with gradient g at step t (1-based) -> (w', state')."""
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    new = {}
    if o.maximize:
        g = -g
    if o.weight_decay > 0 and not o.decoupled_weight_decay:
        g = g + o.weight_decay * w
    if o.weight_decay > 0 and o.decoupled_weight_decay:
        w = w - (lr * o.weight_decay) * w
    bc = 1.0 - o.alpha**t if o.bias_correction else 1.0
    new["v"] = o.alpha * state["v"] + (1.0 - o.alpha) * (g * g)
    var = new["v"] / bc
    if o.centered:
        new["mean"] = o.alpha * state["mean"] + (1.0 - o.alpha) * g
        var = var - (new["mean"] / bc) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.sqrt(var + o.eps) if o.eps_in_sqrt else np.sqrt(var) + o.eps
        if o.momentum > 0:
            u = g / d * (lr if o.lr_inside_momentum else 1.0)
            new["momentum_buffer"] = o.momentum * state["momentum_buffer"] + u
            update = u + o.momentum * new["momentum_buffer"] if o.nesterov else new["momentum_buffer"]
            w = w - (update if o.lr_inside_momentum else lr * update)
        else:
            w = w - lr * g / d
    return w, new


def fused_run(param, grads: Sequence[np.ndarray], lr: LR, o: Options) -> list[np.ndarray]:
    """Parameters after each step of our algorithm from a fresh state."""
    w, state, out = np.asarray(param, np.float64), initial_state(param, o), []
    for k, g in enumerate(grads):
        w, state = fused_step(w, state, g, lr_at(lr, k), k + 1, o)
        out.append(w)
    return out


# ---- The libraries' documented algorithms (parameters after each step).


def torch_run(param, grads, lr: LR = 1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
              momentum=0.0, centered=False, maximize=False) -> list[np.ndarray]:
    """torch.optim.RMSprop: maximize, then coupled weight decay; eps outside
    the square root; the buffer accumulates g / d and lr multiplies it."""
    w = np.asarray(param, np.float64)
    v, ga, buf, out = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w), []
    for k, g in enumerate(grads):
        lr_k = lr_at(lr, k)
        g = -g if maximize else np.asarray(g, np.float64)
        if weight_decay != 0:
            g = g + weight_decay * w
        v = v * alpha + (1 - alpha) * g * g
        if centered:
            ga = alpha * ga + (1 - alpha) * g
            avg = np.sqrt(v - ga * ga) + eps
        else:
            avg = np.sqrt(v) + eps
        if momentum > 0:
            buf = buf * momentum + g / avg
            w = w - lr_k * buf
        else:
            w = w - lr_k * g / avg
        out.append(w)
    return out


def optax_run(param, grads, learning_rate: LR, decay=0.9, eps=1e-8, initial_scale=0.0,
              eps_in_sqrt=True, centered=False, momentum: Optional[float] = None,
              nesterov=False, bias_correction=False) -> list[np.ndarray]:
    """optax.rmsprop = chain(scale_by_rms | scale_by_stddev, scale by -lr,
    trace(momentum, nesterov)): eps inside the square root by default, bias
    correction by 1 - decay^t, the lr inside the trace; nesterov is ignored
    without momentum."""
    w = np.asarray(param, np.float64)
    nu, mu, tr, out = np.full_like(w, initial_scale), np.zeros_like(w), np.zeros_like(w), []
    for k, g in enumerate(grads):
        t, g = k + 1, np.asarray(g, np.float64)
        nu = (1 - decay) * g**2 + decay * nu
        mu = (1 - decay) * g + decay * mu
        bc = 1 - decay**t if bias_correction else 1.0
        var = nu / bc - (mu / bc) ** 2 if centered else nu / bc
        u = g / np.sqrt(var + eps) if eps_in_sqrt else g / (np.sqrt(var) + eps)
        u = -lr_at(learning_rate, k) * u
        if momentum is not None:
            tr = u + momentum * tr
            u = u + momentum * tr if nesterov else tr
        w = w + u
        out.append(w)
    return out


def keras_run(param, grads, learning_rate: LR = 1e-3, rho=0.9, momentum=0.0, epsilon=1e-7,
              centered=False, weight_decay: Optional[float] = None) -> list[np.ndarray]:
    """keras.optimizers.RMSprop: decoupled weight decay w -= w * wd * lr
    before the step; eps inside the square root; the lr inside the momentum
    buffer."""
    w = np.asarray(param, np.float64)
    v, mg, m, out = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w), []
    for k, g in enumerate(grads):
        lr_k, g = lr_at(learning_rate, k), np.asarray(g, np.float64)
        if weight_decay is not None:
            w = w - w * weight_decay * lr_k
        v = rho * v + (1 - rho) * g * g
        if centered:
            mg = rho * mg + (1 - rho) * g
            den = v - mg * mg + epsilon
        else:
            den = v + epsilon
        inc = lr_k * g / np.sqrt(den)
        if momentum > 0:
            m = momentum * m + inc
            w = w - m
        else:
            w = w - inc
        out.append(w)
    return out
