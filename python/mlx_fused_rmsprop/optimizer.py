"""The drop-in ``RMSprop`` optimizer."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterator, Optional, Union

import mlx.core as mx
from mlx.optimizers import Optimizer

from . import _ext


LearningRate = Union[float, Callable[[mx.array], mx.array]]


class RMSprop(Optimizer):
    r"""The RMSprop optimizer [1], fused: one kernel per parameter.

    A drop-in replacement for :class:`mlx.optimizers.RMSprop` (same arguments,
    validation, state and results) that updates each parameter and its state
    in a single pass over memory; with the keyword options below, the RMSprop
    of PyTorch, optax or Keras (see :meth:`from_torch`, :meth:`from_optax`,
    :meth:`from_keras`), fused the same way.

    [1]: Tieleman, T. and Hinton, G. 2012. Lecture 6.5-rmsprop, coursera: Neural
    networks for machine learning

    With the defaults:

    .. math::

        v_{t+1} &= \alpha v_t + (1 - \alpha) g_t^2 \\
        w_{t+1} &= w_t - \lambda \frac{g_t}{\sqrt{v_{t+1}} + \epsilon}

    float32 results are then bit-identical to :class:`mlx.optimizers.RMSprop`
    on the CPU. float16 and bfloat16 parameters are computed in float32 and
    rounded once, which is at least as accurate as the reference.

    The options, each off by default, in the order they apply:

    .. math::

        g &\leftarrow -g \quad \text{(maximize)} \\
        g &\leftarrow g + \beta w \quad \text{(weight decay } \beta
             \text{, coupled: torch)} \\
        w &\leftarrow w - \lambda \beta w \quad \text{(weight decay,
             decoupled: Keras, AdamW)} \\
        v_{t+1} &= \alpha v_t + (1 - \alpha) g^2, \quad
        m_{t+1} = \alpha m_t + (1 - \alpha) g \quad \text{(centered)} \\
        \sigma^2 &= \frac{v_{t+1}}{c_t} - \left(\frac{m_{t+1}}{c_t}\right)^2,
             \quad c_t = 1 - \alpha^t \text{ (bias correction, else 1; the
             mean term only when centered)} \\
        d &= \sqrt{\sigma^2 + \epsilon} \text{ (eps\_in\_sqrt)} \quad
             \text{or} \quad \sqrt{\sigma^2} + \epsilon \\
        b_{t+1} &= \mu b_t + u, \quad u = \frac{g}{d}
             \text{ (torch) or } \lambda \frac{g}{d}
             \text{ (lr\_inside\_momentum: optax, Keras)} \\
        w_{t+1} &= w - (\text{nesterov} \;?\; u + \mu b_{t+1} : b_{t+1})
             \text{ (times } \lambda \text{ for torch), or without momentum }
             w - \lambda \frac{g}{d}

    Args:
        learning_rate (float or callable): The learning rate :math:`\lambda`,
          or a schedule of the step count.
        alpha (float, optional): The smoothing constant :math:`\alpha`.
          Default: ``0.99``
        eps (float, optional): The term :math:`\epsilon` added to the denominator
          to improve numerical stability. Default: ``1e-8``
        momentum (float, optional): The momentum :math:`\mu` (>= 0); > 0 keeps a
          ``momentum_buffer`` state. Default: ``0``
        nesterov (bool, optional): Nesterov momentum (needs ``momentum > 0``).
          Default: ``False``
        centered (bool, optional): Normalize by the variance estimate
          :math:`v - m^2`; keeps a ``mean`` state. Default: ``False``
        weight_decay (float, optional): The weight decay :math:`\beta` (>= 0).
          Default: ``0``
        decoupled_weight_decay (bool, optional): Decay the weights directly
          (:math:`w \leftarrow w - \lambda \beta w`) instead of adding
          :math:`\beta w` to the gradient. Default: ``False``
        eps_in_sqrt (bool, optional): :math:`\sqrt{\sigma^2 + \epsilon}` instead
          of :math:`\sqrt{\sigma^2} + \epsilon`. Default: ``False``
        initial_scale (float, optional): The value :math:`v` starts at (>= 0).
          Default: ``0``
        bias_correction (bool, optional): Divide :math:`v` (and :math:`m`) by
          :math:`1 - \alpha^t`. Default: ``False``
        maximize (bool, optional): Ascend the objective. Default: ``False``
        lr_inside_momentum (bool, optional): The momentum buffer accumulates
          :math:`\lambda g / d` (optax, Keras) rather than :math:`g / d`
          (torch); the same under a constant learning rate, not under a
          schedule. Default: ``False``
        state_dtype (Dtype, optional): ``None`` keeps the state in each
          parameter's dtype (as MLX); ``mx.float32`` keeps it in float32 for
          float16 / bfloat16 parameters, whose math then runs in float32 with
          the parameter rounded once per step. Default: ``None``
    """

    def __init__(
        self,
        learning_rate: LearningRate,
        alpha: float = 0.99,
        eps: float = 1e-8,
        *,
        momentum: float = 0.0,
        nesterov: bool = False,
        centered: bool = False,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        eps_in_sqrt: bool = False,
        initial_scale: float = 0.0,
        bias_correction: bool = False,
        maximize: bool = False,
        lr_inside_momentum: bool = False,
        state_dtype: Optional[mx.Dtype] = None,
    ):
        super().__init__()

        self._maybe_schedule("learning_rate", learning_rate)
        self.alpha = alpha
        self.eps = eps

        if self.alpha < 0.0:
            raise ValueError(
                f"RMSprop alpha should be >=0, {self.alpha} was provided instead"
            )
        if self.eps <= 0.0:
            raise ValueError(
                f"RMSprop epsilon should be >0, {self.eps} was provided instead"
            )
        # mlx.optimizers.RMSprop accepts inf and NaN here and fails (or
        # trains on NaN) later; the fused op rejects them, so say it now.
        for name, value in (("alpha", self.alpha), ("epsilon", self.eps)):
            if not math.isfinite(value):
                raise ValueError(
                    f"RMSprop {name} should be a finite number, {value} was provided instead"
                )
        for name, value in (
            ("momentum", momentum),
            ("weight_decay", weight_decay),
            ("initial_scale", initial_scale),
        ):
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(
                    f"RMSprop {name} should be a finite number >= 0, "
                    f"{value} was provided instead"
                )
        if nesterov and momentum <= 0.0:
            raise ValueError(
                f"RMSprop nesterov=True needs momentum > 0, {momentum} was provided instead"
            )
        if state_dtype is not None and not (
            isinstance(state_dtype, mx.Dtype) and state_dtype == mx.float32
        ):
            raise ValueError(
                f"RMSprop state_dtype should be None (the parameter's dtype) or "
                f"mlx.core.float32, {state_dtype} was provided instead"
            )
        self.momentum = momentum
        self.nesterov = nesterov
        self.centered = centered
        self.weight_decay = weight_decay
        self.decoupled_weight_decay = decoupled_weight_decay
        self.eps_in_sqrt = eps_in_sqrt
        self.initial_scale = initial_scale
        self.bias_correction = bias_correction
        self.maximize = maximize
        self.lr_inside_momentum = lr_inside_momentum
        self.state_dtype = state_dtype
        self._options = self._make_options()
        # Set when a state is assigned (e.g. loaded from a checkpoint): the
        # next step first checks it against the parameters, entry by entry.
        self._state_needs_check = False

    # ---- One-line ports from other libraries.

    @classmethod
    def from_torch(
        cls,
        lr: LearningRate = 0.01,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        maximize: bool = False,
    ) -> "RMSprop":
        r"""``torch.optim.RMSprop`` with its argument names and defaults.

        .. math::

            g &\leftarrow \pm g + \beta w, \quad
            v \leftarrow \alpha v + (1 - \alpha) g^2, \quad
            d = \sqrt{v \,[- m^2]} + \epsilon \\
            b &\leftarrow \mu b + g / d, \quad
            w \leftarrow w - \lambda b \quad
            (\text{or } w - \lambda g / d \text{ without momentum})

        Weight decay is coupled (added to the gradient), eps is outside the
        square root and the learning rate multiplies the momentum buffer
        from outside. ``lr`` may be a schedule of the step count.
        """
        return cls(
            lr,
            alpha=alpha,
            eps=eps,
            momentum=momentum,
            centered=centered,
            weight_decay=weight_decay,
            maximize=maximize,
        )

    @classmethod
    def from_optax(
        cls,
        learning_rate: LearningRate,
        decay: float = 0.9,
        eps: float = 1e-8,
        initial_scale: float = 0.0,
        eps_in_sqrt: bool = True,
        centered: bool = False,
        momentum: Optional[float] = None,
        nesterov: bool = False,
        bias_correction: bool = False,
    ) -> "RMSprop":
        r"""``optax.rmsprop`` with its argument names and defaults.

        .. math::

            \nu &\leftarrow d\,\nu + (1 - d) g^2 \ (\nu_0 = s), \quad
            \hat\nu = \nu / (1 - d^t) \text{ (bias correction)}, \quad
            u = \lambda g / \sqrt{\hat\nu \,[- \hat\mu^2] + \epsilon} \\
            b &\leftarrow \mu b + u, \quad
            w \leftarrow w - (\text{nesterov} \;?\; u + \mu b : b)

        eps is inside the square root by default and the learning rate enters
        the momentum trace. As in optax, ``nesterov`` without ``momentum`` is
        ignored. ``learning_rate`` may be a schedule of the step count.
        """
        mu = 0.0 if momentum is None else momentum
        return cls(
            learning_rate,
            alpha=decay,
            eps=eps,
            momentum=mu,
            nesterov=nesterov and mu > 0.0,
            centered=centered,
            eps_in_sqrt=eps_in_sqrt,
            initial_scale=initial_scale,
            bias_correction=bias_correction,
            lr_inside_momentum=True,
        )

    @classmethod
    def from_keras(
        cls,
        learning_rate: LearningRate = 0.001,
        rho: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-7,
        centered: bool = False,
        weight_decay: Optional[float] = None,
    ) -> "RMSprop":
        r"""``keras.optimizers.RMSprop`` with its argument names and defaults.

        .. math::

            w &\leftarrow w - \lambda \beta w, \quad
            v \leftarrow \rho v + (1 - \rho) g^2, \quad
            u = \lambda g / \sqrt{v \,[- m^2] + \epsilon} \\
            b &\leftarrow \mu b + u, \quad w \leftarrow w - b \quad
            (\text{or } w - u \text{ without momentum})

        Weight decay is decoupled (applied to the weights, scaled by the
        learning rate), eps is inside the square root and the learning rate
        enters the momentum buffer. ``learning_rate`` may be a schedule of the
        step count.
        """
        return cls(
            learning_rate,
            alpha=rho,
            eps=epsilon,
            momentum=momentum,
            centered=centered,
            weight_decay=0.0 if weight_decay is None else weight_decay,
            decoupled_weight_decay=True,
            eps_in_sqrt=True,
            lr_inside_momentum=True,
        )

    # ---- The state.

    def _make_options(self) -> "_ext.RMSpropOptions":
        return _ext.RMSpropOptions(
            alpha=self.alpha,
            eps=self.eps,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            centered=self.centered,
            nesterov=self.nesterov,
            decoupled_weight_decay=self.decoupled_weight_decay,
            eps_in_sqrt=self.eps_in_sqrt,
            bias_correction=self.bias_correction,
            maximize=self.maximize,
            lr_inside_momentum=self.lr_inside_momentum,
        )

    @property
    def state_names(self) -> tuple[str, ...]:
        """The state each parameter has: ``("v",)``, plus ``"mean"`` when
        centered and ``"momentum_buffer"`` with momentum."""
        return tuple(self._options.state_names())

    def state_dtype_of(self, parameter: mx.array) -> mx.Dtype:
        """The dtype of a parameter's state."""
        if self.state_dtype is not None and parameter.dtype in (mx.float16, mx.bfloat16):
            return self.state_dtype
        return parameter.dtype

    @property
    def state(self) -> dict:
        """The optimizer's state dictionary."""
        return self._state

    @state.setter
    def state(self, state: dict) -> None:
        self._initialized = False
        self._state = state
        self._state_needs_check = True

    def init_single(self, parameter: mx.array, state: dict) -> None:
        """Initialize optimizer state"""
        dtype = self.state_dtype_of(parameter)
        if self.initial_scale == 0.0 and dtype == parameter.dtype:
            state["v"] = mx.zeros_like(parameter)
        else:
            state["v"] = mx.full(parameter.shape, self.initial_scale, dtype)
        for name in self.state_names[1:]:
            state[name] = mx.zeros(parameter.shape, dtype)

    def apply_single(
        self, gradient: mx.array, parameter: mx.array, state: dict
    ) -> mx.array:
        """Performs the RMSprop parameter update with one fused primitive and
        stores the new state (:math:`v`, and the mean and momentum buffer when
        the options keep them) in the optimizer state.
        """
        names = self.state_names
        outputs = _ext.rmsprop_step(
            gradient,
            parameter,
            [state[name] for name in names],
            self.learning_rate,
            self.step if self.bias_correction else None,
            self._options,
        )
        for name, value in zip(names, outputs[1:]):
            state[name] = value
        return outputs[0]

    def apply_gradients(self, gradients: dict, parameters: dict) -> Any:
        """Apply the gradients to the parameters and return the updated
        parameters (see :meth:`mlx.optimizers.Optimizer.apply_gradients`).

        One native call walks the tree, checks every leaf and builds every
        leaf's fused primitive. A bad leaf raises ``TypeError`` /
        ``ValueError`` naming its path (e.g. ``layers.0.weight``) before
        anything changes: the parameters, the state, the learning rate and
        the step counter are left as they were.
        """
        options = self._prepare(gradients, parameters)
        if not self._initialized:
            self.init(gradients)
        # As Optimizer.apply_gradients, but nothing is written before every
        # leaf has passed: schedules at the current step, then the new step.
        scheduled = {name: fn(self.step) for name, fn in self._schedulers.items()}
        step = self.step + 1
        updated = _optimizer_step(
            gradients,
            parameters,
            self._state,
            scheduled.get("learning_rate", self._state.get("learning_rate")),
            step,
            options,
            self.state_dtype,
            True,
        )
        self._state.update(scheduled)
        self._state["step"] = step
        return updated

    def check_gradients(self, gradients: dict, parameters: dict) -> None:
        """Raise, naming the leaf, unless one step over ``gradients`` can run.

        Changes nothing. Checks that each gradient has a parameter and (once
        the optimizer is initialized) the state entries of its options, of the
        parameter's shape and a dtype the fused kernel updates.
        """
        options = self._prepare(gradients, parameters)
        if self._initialized:
            _optimizer_step(
                gradients, parameters, self._state, None, None, options,
                self.state_dtype, False,
            )

    def _prepare(self, gradients: Any, parameters: Any) -> "_ext.RMSpropOptions":
        """The options of this step (hyperparameters may have been set since
        the last one); checks an assigned state entry by entry and, before
        the state exists, every leaf as init() will set it up."""
        self._options = options = self._make_options()
        if self._state_needs_check:
            _check_assigned_state(self._state, gradients, parameters, self)
            self._state_needs_check = False
        if not self._initialized:
            _optimizer_step(
                gradients, parameters, self._state, None, None, options,
                self.state_dtype, False, allow_missing_state=True,
            )
        return options


_SCALAR_ENTRIES = ("step", "learning_rate")


def _check_assigned_state(
    state: Any, gradients: Any, parameters: Any, opt: RMSprop
) -> None:
    """Raise ValueError naming the entry unless an assigned (loaded) state fits
    the parameters: 'step' and 'learning_rate' present; every other entry at a
    parameter's path, holding exactly the optimizer's state names (``v``, and
    ``mean`` / ``momentum_buffer`` as its options keep them), arrays of the
    parameter's shape and state dtype; and -- unless the state holds no
    per-parameter entry at all (a fresh state, initialized on the first step)
    -- an entry for every parameter that gets a gradient."""
    if not isinstance(state, dict):
        raise ValueError(
            f"RMSprop: the optimizer state must be a dict, got {type(state).__name__}"
        )
    for name in _SCALAR_ENTRIES:
        # An array, or a plain number as mlx.optimizers also steps with.
        if name not in state:
            raise ValueError(f"RMSprop: the optimizer state has no entry '{name}'")
        value = state[name]
        if not isinstance(value, (mx.array, int, float)) or isinstance(value, bool):
            raise ValueError(
                f"RMSprop: the optimizer state entry '{name}' is "
                f"{type(value).__name__}, expected an array or a number"
            )
    leaves = {k: v for k, v in state.items() if k not in _SCALAR_ENTRIES}
    if _check_state_entries(leaves, parameters, "", opt) == 0:
        return
    first = opt.state_names[0]
    for path, _, _, leaf_state in _walk_leaves(gradients, parameters, state):
        if leaf_state is _MISSING or leaf_state == {}:
            raise ValueError(
                f"RMSprop: the optimizer state has no entry '{path}.{first}' "
                "(a state that holds entries must hold one for every trained "
                "parameter; was it saved from another model?)"
            )


def _keeps(names: tuple[str, ...]) -> str:
    if len(names) == 1:
        return f"RMSprop keeps only '{names[0]}'"
    return "this RMSprop keeps " + ", ".join(f"'{n}'" for n in names)


def _check_state_entries(node: Any, params: Any, path: str, opt: RMSprop) -> int:
    """Check the state subtree `node` against `params`; return how many
    parameter entries (dicts of the state names) it holds."""
    if isinstance(params, mx.array):
        if isinstance(node, dict) and not node:
            return 0
        names = opt.state_names
        if not isinstance(node, dict):
            raise ValueError(f"RMSprop: the optimizer state has no entry '{path}.{names[0]}'")
        extra = sorted(str(k) for k in node if k not in names)
        if extra:
            raise ValueError(
                f"RMSprop: the optimizer state has an unexpected entry "
                f"'{path}.{extra[0]}' ({_keeps(names)})"
            )
        dtype = opt.state_dtype_of(params)
        for name in names:
            if name not in node:
                raise ValueError(f"RMSprop: the optimizer state has no entry '{path}.{name}'")
            value = node[name]
            if (
                not isinstance(value, mx.array)
                or value.shape != params.shape
                or value.dtype != dtype
            ):
                got = (
                    f"{value.shape} {value.dtype}"
                    if isinstance(value, mx.array)
                    else type(value).__name__
                )
                want = f"{params.shape} {params.dtype}"
                if dtype != params.dtype:
                    want += f" (its state: {dtype})"
                raise ValueError(
                    f"RMSprop: the optimizer state entry '{path}.{name}' is {got}, "
                    f"but the parameter is {want}"
                )
        return 1
    entries = _entries(node)
    if entries is None:
        raise ValueError(
            f"RMSprop: the optimizer state entry '{path}' is "
            f"{type(node).__name__}, expected a dict or list like the parameters"
        )
    count = 0
    for key, child in entries:
        param = _child(params, key)
        if param is _MISSING:
            raise ValueError(
                f"RMSprop: the optimizer state has an unexpected entry "
                f"'{_join(path, key)}' (no parameter there)"
            )
        count += _check_state_entries(child, param, _join(path, key), opt)
    return count


def _optimizer_step(gradients: Any, parameters: Any, *args: Any, **kwargs: Any) -> Any:
    """``_ext.optimizer_step``, with the fix named when a leaf is an integer
    or boolean array (see :func:`_not_trainable_hint`)."""
    try:
        return _ext.optimizer_step(gradients, parameters, *args, **kwargs)
    except ValueError as e:
        hint = _not_trainable_hint(str(e))
        if hint is None:
            raise
        raise ValueError(f"{e} {hint}") from None


_NOT_FLOAT = re.compile(
    r"^RMSprop: leaf '(?P<path>.*)': \[rmsprop_update\] parameter dtype "
    r"(?P<dtype>bool|u?int\d+) is not supported"
)


def _not_trainable_hint(message: str) -> Optional[str]:
    """For an integer or boolean leaf (e.g. a step counter stored on the
    model), how to keep it out of training; None for any other error.

    mlx.optimizers.RMSprop silently turns such a leaf into float32; this
    optimizer refuses it, and says how to leave it out of the gradients."""
    match = _NOT_FLOAT.match(message)
    if match is None:
        return None
    *holder, key = match["path"].split(".")
    module = "model" + "".join(f"[{k}]" if k.isdigit() else f".{k}" for k in holder)
    key = int(key) if key.isdigit() else key
    return (
        f"This {match['dtype']} array is not a trainable parameter (mlx's RMSprop "
        f"would silently make it float32): freeze it before computing "
        f"gradients, e.g. `{module}.freeze(keys=[{key!r}], recurse=False)`, or "
        f"keep it out of `model.trainable_parameters()` (a Python number, or "
        f"an attribute whose name starts with '_')."
    )


def _entries(tree: Any) -> Any:
    """(key, child) pairs of a dict or list/tuple node of a tree; else None."""
    if isinstance(tree, dict):
        return tree.items()
    if isinstance(tree, (list, tuple)):
        return enumerate(tree)
    return None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


_MISSING = object()


def _walk_leaves(
    gradients: Any, parameters: Any, state: Any, path: str = ""
) -> Iterator[tuple[str, mx.array, Any, Any]]:
    """Yield (path, gradient, parameter, state or _MISSING) for every gradient leaf.

    Walks the gradient tree (the update's shape, as in Optimizer.apply_gradients)
    alongside the parameters and the state; a missing entry comes as _MISSING.
    """
    if isinstance(gradients, mx.array):
        if parameters is _MISSING:
            raise ValueError(f"RMSprop: leaf '{path}': no parameter for this gradient")
        yield path, gradients, parameters, state
        return
    items = _entries(gradients)
    if items is None:
        raise TypeError(
            f"RMSprop: leaf '{path}': the gradient is {type(gradients).__name__}, "
            "expected mlx.core.array"
        )
    for key, grad in items:
        child = f"{path}.{key}" if path else str(key)
        yield from _walk_leaves(
            grad, _child(parameters, key), _child(state, key), child
        )


def _child(tree: Any, key: Any) -> Any:
    if isinstance(tree, dict):
        return tree.get(key, _MISSING)
    if isinstance(tree, (list, tuple)) and isinstance(key, int) and key < len(tree):
        return tree[key]
    return _MISSING
