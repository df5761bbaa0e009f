"""The drop-in ``RMSprop`` optimizer."""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

import mlx.core as mx
from mlx.optimizers import Optimizer
from mlx.utils import tree_map

from . import _checks
from . import _ext
from . import _sharding
from ._sharding import SCALAR_ENTRIES as _SCALAR_ENTRIES  # the state entries that are not per leaf
from ._sharding import ShardedStepError


LearningRate = Union[float, Callable[[mx.array], mx.array]]

# The constructor's options by kind, for the check of their kinds (ranges are
# checked by the constructor and, every step, by the op).
_OPTION_KINDS = {
    "alpha": "number", "eps": "number", "momentum": "number",
    "weight_decay": "number", "initial_scale": "number",
    "nesterov": "flag", "centered": "flag", "decoupled_weight_decay": "flag",
    "eps_in_sqrt": "flag", "bias_correction": "flag", "maximize": "flag",
    "lr_inside_momentum": "flag",
}

_Preset = TypeVar("_Preset", bound=Callable[..., Any])


def _names_its_arguments(**names: str) -> Callable[[_Preset], _Preset]:
    """A preset's errors name the preset and its own arguments: the
    constructor's ``RMSprop alpha should be ...`` becomes ``RMSprop.from_keras
    rho should be ...`` (``names``: constructor's name -> the preset's)."""

    def decorate(preset: _Preset) -> _Preset:
        @functools.wraps(preset)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return preset(*args, **kwargs)
            except ValueError as e:
                head, _, rest = str(e).partition(" ")
                name, space, tail = rest.partition(" ")
                if head != "RMSprop" or not space:
                    raise
                raise ValueError(
                    f"RMSprop.{preset.__name__} {names.get(name, name)} {tail}"
                ) from None

        return wrapper  # type: ignore[return-value]

    return decorate


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
        shard_group (mlx.core.distributed.Group, optional): Shard the state
          over the ranks of this group (ZeRO stage 1, see *Sharded state*
          below); ``None`` keeps all of it on every process. Default: ``None``
        shard_bucket_bytes (int, optional): With ``shard_group``, the most
          bytes per rank one all-gather of updated parameters moves.
          Default: ``2**25`` (32 MiB)

    **Sharded state.** With ``shard_group`` (any ``mx.distributed.Group`` of
    :math:`N` ranks; or :meth:`sharded`, e.g. after a preset; feed every rank
    the same gradients, e.g. averaged with
    :func:`mlx.nn.average_gradients`), the gradient leaves in
    ``tree_flatten`` order are viewed as one flat vector of :math:`E`
    elements, and rank :math:`r` keeps state only for the elements
    :math:`[rS, \min((r+1)S, E))`, :math:`S = \lceil E/N \rceil`, whatever
    the leaf sizes (a leaf may be split between ranks). Each step a rank
    updates its own elements with the fused kernel (on 1-D slices of the
    leaves: the update is element-wise, so the bits are the unsharded
    optimizer's), then the updated parameters are all-gathered, a few
    buckets per step (one per parameter dtype unless a rank's share of it
    exceeds ``shard_bucket_bytes``). Parameters are bit-identical to the
    unsharded optimizer's on every rank; the per-parameter state per rank
    is :math:`\approx 1/N` of it.

    On a sharded rank :attr:`state` holds ``"step"``, ``"learning_rate"``
    and, at each parameter's path, the state of this rank's piece of it:
    ``{"v": (stop - start,), ...}`` (1-D, the piece's elements of the
    flattened state) or ``{}`` when the rank owns none of it. Checkpoints:
    :meth:`sharded_state_dict` (per rank) -> :meth:`assemble_state` (the
    full state, which this class unsharded and
    :class:`mlx.optimizers.RMSprop` load) -> :meth:`load_full_state` (into
    a sharded optimizer on any number of ranks; assigning :attr:`state`
    does the same).

    Every check that can differ between ranks (the gradient leaves, the
    state) runs before any collective, and the ranks then agree in one
    small all-gather: if any rank failed, every rank raises the same
    :class:`ShardedStepError` (a ``ValueError`` naming the rank and the
    leaf) and nothing changes anywhere, so no rank waits forever. The
    sharded step evaluates the gradients first (so that every rank runs the
    collectives in the same order) and synchronizes on that agreement: it
    runs eagerly, not inside :func:`mlx.core.compile`.
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
        shard_group: Optional[mx.distributed.Group] = None,
        shard_bucket_bytes: int = 2**25,
    ):
        super().__init__()

        # Kinds first: a str or None would fail the comparisons below with a
        # TypeError that names nothing.
        arguments = locals()
        _check_learning_rate(learning_rate, schedule=True)
        _check_option_types({name: arguments[name] for name in _OPTION_KINDS})
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
        _check_sharding(shard_group, shard_bucket_bytes)
        self.shard_group = shard_group
        self.shard_bucket_bytes = shard_bucket_bytes
        # Sharded: the plan the state was built for, and a loaded full state
        # waiting for the first step (or init) to be sliced.
        self._plan: Optional[_sharding.ShardPlan] = None
        self._pending_full_state: Optional[dict] = None
        self._options = self._make_options()
        # Set when a state is assigned (e.g. loaded from a checkpoint): the
        # next step first checks it against the parameters, entry by entry.
        self._state_needs_check = False

    # ---- One-line ports from other libraries.

    @classmethod
    @_names_its_arguments(learning_rate="lr", epsilon="eps")
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
        Shard its state with :meth:`sharded`.
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
    @_names_its_arguments(alpha="decay", epsilon="eps")
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
        Shard its state with :meth:`sharded`.
        """
        mu = 0.0 if momentum is None else momentum
        _check_option_types({"momentum": mu, "nesterov": nesterov})  # before `nesterov and ...`
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
    @_names_its_arguments(alpha="rho", eps="epsilon")
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
        step count. Shard its state with :meth:`sharded`.
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
    def learning_rate(self) -> mx.array:
        """The learning rate (as in :class:`mlx.optimizers.Optimizer`)."""
        return self.state["learning_rate"]

    @learning_rate.setter
    def learning_rate(self, learning_rate: Union[float, mx.array]) -> None:
        _check_learning_rate(learning_rate, schedule=False)
        self.state["learning_rate"] = mx.array(learning_rate)

    def _check_settings(self) -> None:
        """Check what may have been assigned since construction (``opt.alpha =
        ...``) beyond what the op checks: the options' kinds, and what a new
        state is made with (initial_scale, state_dtype) or sharded by."""
        _check_option_types({name: getattr(self, name) for name in _OPTION_KINDS})
        if not (math.isfinite(self.initial_scale) and self.initial_scale >= 0.0):
            raise ValueError(
                f"RMSprop initial_scale should be a finite number >= 0, "
                f"{self.initial_scale} was provided instead"
            )
        if self.state_dtype is not None and not (
            isinstance(self.state_dtype, mx.Dtype) and self.state_dtype == mx.float32
        ):
            raise ValueError(
                f"RMSprop state_dtype should be None (the parameter's dtype) or "
                f"mlx.core.float32, {self.state_dtype} was provided instead"
            )
        _check_sharding(self.shard_group, self.shard_bucket_bytes)

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
        if self.shard_group is not None:
            # A sharded rank holds pieces: an assigned state is a full one.
            self.load_full_state(state)
            return
        self._initialized = False
        self._state = state
        self._state_needs_check = True

    def init(self, parameters: dict) -> None:
        """Initialize the optimizer's state (see :meth:`mlx.optimizers.Optimizer.init`).

        With ``shard_group``, lays the state out over the ranks for the
        leaves of ``parameters`` (the tree the gradients will have, e.g.
        ``model.trainable_parameters()``), creating this rank's pieces, or
        slicing them from a state given to :meth:`load_full_state`. Local: no
        collective runs, so call it on every rank or on none.
        """
        self._check_settings()
        if self.shard_group is None:
            super().init(parameters)
            return
        options = self._make_options()
        _optimizer_step(
            parameters, parameters, {}, None, None, options, self.state_dtype,
            False, allow_missing_state=True,
        )
        plan, state, _ = self._shard_candidate(parameters, parameters, options)
        self._install_sharded(plan, state)

    def state_nbytes(self) -> int:
        """The bytes of the per-parameter state this process holds (``v``,
        ``mean``, ``momentum_buffer``; not the step or learning rate). With
        ``shard_group``, about ``1/N`` of the unsharded optimizer's."""
        total = 0
        for keys, value in _sharding.flatten(self._state):
            if keys and keys[0] in _SCALAR_ENTRIES and len(keys) == 1:
                continue
            if isinstance(value, mx.array):
                total += value.nbytes
        return total

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
        the step counter are left as they were. With ``shard_group``, see
        the class: a failure on any rank raises :class:`ShardedStepError` on
        every rank.
        """
        if self.shard_group is not None:
            return self._apply_sharded(gradients, parameters)
        options = self._prepare(gradients, parameters)
        if not self._initialized:
            self.init(gradients)
        scheduled, step = self._next_step()
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
        self._commit_step(scheduled, step)
        return updated

    def _next_step(self) -> tuple[dict, Any]:
        """The coming step's scheduled hyperparameters and step count. As
        Optimizer.apply_gradients: schedules at the current step, then the new
        step; nothing is written until :meth:`_commit_step`, once every leaf
        has passed."""
        scheduled = {name: fn(self.step) for name, fn in self._schedulers.items()}
        return scheduled, self.step + 1

    def _commit_step(self, scheduled: dict, step: Any) -> None:
        """Record a step that ran: its scheduled values and its count."""
        self._state.update(scheduled)
        self._state["step"] = step

    def check_gradients(self, gradients: dict, parameters: dict) -> None:
        """Raise, naming the leaf, unless one step over ``gradients`` can run.

        Changes nothing. Checks that each gradient has a parameter and (once
        the optimizer is initialized) the state entries of its options, of the
        parameter's shape and a dtype the fused kernel updates. With
        ``shard_group``, checks this rank only (no collective runs).
        """
        if self.shard_group is not None:
            self._check_sharded(gradients, parameters)
            return
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
        self._check_settings()
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

    # ---- Sharded state (shard_group).

    def sharded(
        self, group: Optional[mx.distributed.Group], bucket_bytes: int = 2**25
    ) -> "RMSprop":
        """Shard this optimizer's state over ``group`` (see the class); returns
        the optimizer, e.g. ``RMSprop.from_torch(lr=0.01).sharded(group)``.

        The same as ``shard_group=group, shard_bucket_bytes=bucket_bytes`` at
        construction; only before the state exists (the first step or
        :meth:`init`). ``None`` unshards.
        """
        _check_sharding(group, bucket_bytes)
        if self._initialized or self._pending_full_state is not None:
            raise ValueError(
                "RMSprop.sharded: the optimizer already has a state; shard it before "
                "the first step (or move a state over with assemble_state / load_full_state)"
            )
        self.shard_group = group
        self.shard_bucket_bytes = bucket_bytes
        if group is not None and self._state_needs_check:
            # A state assigned before (load_full_state, or state =) is a full
            # one: keep it, to be checked and sliced at the next step or init.
            self._pending_full_state = self._state
            self._state_needs_check = False
        return self

    def load_full_state(self, state: dict) -> None:
        """Load a full (unsharded) state into this optimizer.

        The state of :class:`RMSprop` without ``shard_group``, of
        :class:`mlx.optimizers.RMSprop`, or :meth:`assemble_state`'s: a tree
        ``{"step", "learning_rate", <parameter path>: {"v": ..., ...}}``.
        Unsharded, the same as assigning :attr:`state`. Sharded (on any number
        of ranks; every rank loads the same full state), ``"step"`` and
        ``"learning_rate"`` are taken now and the rest is checked against the
        gradients and sliced into this rank's pieces at the next step (or
        :meth:`init`); later steps are bit-identical to the unsharded
        optimizer continuing from this state.
        """
        if self.shard_group is None:
            self.state = state
            return
        if not isinstance(state, dict):
            raise ValueError(
                f"RMSprop: the optimizer state must be a dict, got {type(state).__name__}"
            )
        missing = [name for name in _SCALAR_ENTRIES if name not in state]
        if missing:
            raise ValueError(f"RMSprop: the optimizer state has no entry '{missing[0]}'")
        self._state = {name: state[name] for name in _SCALAR_ENTRIES}
        self._pending_full_state = state
        self._plan = None
        self._initialized = False

    def sharded_state_dict(self) -> dict[str, mx.array]:
        """This rank's state as a flat dict of arrays, for ``mx.save_safetensors``.

        Keys: ``"step"``, ``"learning_rate"``; ``"<path>.<name>"`` for each
        state entry of this rank's pieces (1-D); ``"<path>.__shard__"``,
        ``[leaf index, start, stop, ndim, *shape]`` (int64) of each piece; and
        ``"__shard__"``, ``[rank, ranks, elements of all leaves, d0, d1]``
        (``d``: a digest of every leaf's path, shape and dtype, the same on
        every rank of one model). Give every rank's dict to
        :meth:`assemble_state` for the full state.
        """
        if self.shard_group is None:
            raise ValueError("RMSprop.sharded_state_dict: the optimizer has no shard_group")
        if self._plan is None:
            raise ValueError(
                "RMSprop.sharded_state_dict: the sharded state does not exist yet "
                "(take a step or call init(model.trainable_parameters()) first)"
            )
        plan = self._plan
        out: dict[str, mx.array] = {}
        for name in _SCALAR_ENTRIES:
            if name in self._state:
                out[name] = mx.array(self._state[name])
        out[_sharding.SHARD_KEY] = mx.array(
            [plan.rank, plan.ranks, plan.total, *_sharding.leaves_digest(plan)], dtype=mx.int64
        )
        for piece in plan.own_pieces():
            leaf = plan.leaves[piece.leaf]
            node = _at(self._state, leaf.keys)
            for name in self.state_names:
                out[f"{leaf.path}.{name}"] = node[name]
            out[leaf.path + _sharding.PIECE_SUFFIX] = _sharding.piece_record(piece.leaf, leaf, piece)
        return out

    @staticmethod
    def assemble_state(per_rank_states: "list[dict[str, mx.array]]") -> dict:
        """The full state from every rank's :meth:`sharded_state_dict`.

        ``per_rank_states`` holds one dict per rank of the group, in any order
        (e.g. ``[mx.load(f) for f in files]``). Returns the unsharded tree
        ``{"step", "learning_rate", <parameter path>: {"v": ..., ...}}`` with
        each entry of its parameter's shape: what :class:`RMSprop` (sharded on
        any number of ranks or not) and :class:`mlx.optimizers.RMSprop` load.
        Raises ``ValueError`` unless the states come from one model (the same
        leaves) and step, and the pieces of every entry of every rank cover it
        exactly.
        """
        return _sharding.assemble(per_rank_states)

    def _apply_sharded(self, gradients: Any, parameters: Any) -> Any:
        """One sharded step: check locally, agree, update own pieces, gather."""
        group = self.shard_group
        error: Optional[BaseException] = None
        digest = b""
        # The collectives below must run in the same order on every rank, and
        # the gradients usually hang on a pending one (the all_sum of
        # nn.average_gradients), the parameters maybe too (a broadcast of the
        # initial weights): run those first, on every rank alike -- a rank's
        # gather depends only on its own pieces (or on none), so it would not.
        try:
            mx.eval(gradients)
            options, plan, state, pieces = self._check_sharded(gradients, parameters)
            mx.eval(_leaf_params(plan, parameters))
            scheduled, step = self._next_step()
            lr = scheduled.get("learning_rate", self._state.get("learning_rate"))
            digest = _sharding.fingerprint(
                plan.signature(), repr(options), str(self.state_dtype),
                self.shard_bucket_bytes, int(self.step), float(lr),
            )
        except Exception as e:  # every rank must hear of it: see agree()
            error = e
        _sharding.agree(group, error, digest)

        if state is not None:
            self._install_sharded(plan, state)
        grads, params, states, index = pieces
        updated = _ext.optimizer_step(
            grads, params, states, lr, step, options, self.state_dtype, True
        )
        leaves = _sharding.gather_parameters(
            plan, dict(zip(index, updated)), _leaf_params(plan, parameters), group
        )
        self._commit_step(scheduled, step)
        it = iter(leaves)
        return tree_map(lambda _: next(it), gradients)

    def _check_sharded(self, gradients: Any, parameters: Any) -> tuple:
        """Every check of a sharded step on this rank; changes nothing.

        Returns (options, plan, new state or None, (gradient pieces, parameter
        pieces, state pieces, piece indices)); the new state is set when the
        state is still to be created or sliced from a loaded full state.
        """
        self._check_settings()
        options = self._make_options()
        _optimizer_step(
            gradients, parameters, {}, None, None, options, self.state_dtype,
            False, allow_missing_state=True,
        )
        if self._initialized and self._plan is not None:
            plan = _sharding.make_plan(
                gradients, self.shard_group.size(), self.shard_group.rank(),
                self.shard_bucket_bytes,
            )
            if plan.signature() != self._plan.signature():
                raise ValueError(
                    "RMSprop: the gradients' leaves "
                    f"({_first_difference(plan, self._plan)}) differ from the ones "
                    "the sharded state was built for"
                )
            plan, state = self._plan, None
        else:
            plan, state, _ = self._shard_candidate(gradients, parameters, options)
        tree = self._state if state is None else state
        index, grads, params, states = [], [], [], []
        leaf_params = _leaf_params(plan, parameters)
        leaf_grads = [g for _, g in _sharding.flatten(gradients)]
        for i, piece in enumerate(plan.pieces):
            if piece.rank != plan.rank or piece.size == 0:
                continue
            leaf = plan.leaves[piece.leaf]
            node = _at(tree, leaf.keys)
            index.append(i)
            grads.append(leaf_grads[piece.leaf].reshape(-1)[piece.start : piece.stop])
            params.append(leaf_params[piece.leaf].reshape(-1)[piece.start : piece.stop])
            states.append(node)
        # Raises naming the piece's position; the state was made by this
        # class, so this fires only if it was altered by hand.
        _ext.optimizer_step(
            grads, params, states, None, None, options, self.state_dtype, False
        )
        return options, plan, state, (grads, params, states, index)

    def _shard_candidate(self, gradients: Any, parameters: Any, options: Any) -> tuple:
        """The plan for ``gradients`` and this rank's new state tree (fresh, or
        sliced from the loaded full state after checking it); changes nothing."""
        plan = _sharding.make_plan(
            gradients, self.shard_group.size(), self.shard_group.rank(),
            self.shard_bucket_bytes,
        )
        full = self._pending_full_state
        has_entries = False
        if full is not None:
            _check_assigned_state(full, gradients, parameters, self)
            has_entries = any(
                isinstance(v, mx.array)
                for k, v in _sharding.flatten(full)
                if k[0] not in _SCALAR_ENTRIES
            )
        own = {p.leaf: p for p in plan.own_pieces()}
        leaf_params = _leaf_params(plan, parameters)
        nodes = []
        for i, leaf in enumerate(plan.leaves):
            piece = own.get(i)
            node: dict = {}
            if piece is not None:
                if has_entries:
                    src = _at(full, leaf.keys)
                    for name in self.state_names:
                        node[name] = src[name].reshape(-1)[piece.start : piece.stop]
                else:
                    like = leaf_params[i].reshape(-1)[piece.start : piece.stop]
                    self.init_single(like, node)
            nodes.append(node)
        it = iter(nodes)
        tree = tree_map(lambda _: next(it), gradients)
        return plan, tree, has_entries

    def _install_sharded(self, plan: "_sharding.ShardPlan", tree: dict) -> None:
        scalars = {k: self._state[k] for k in _SCALAR_ENTRIES if k in self._state}
        self._state = {**scalars, **tree}
        self._plan = plan
        self._pending_full_state = None
        self._initialized = True


def _check_sharding(group: Any, bucket_bytes: Any) -> None:
    if group is not None and not isinstance(group, mx.distributed.Group):
        raise ValueError(
            f"RMSprop shard_group should be None or an mlx.core.distributed.Group, "
            f"{type(group).__name__} was provided instead"
        )
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes <= 0:
        raise ValueError(
            f"RMSprop shard_bucket_bytes should be an int > 0, "
            f"{bucket_bytes} was provided instead"
        )


def _check_option_types(values: dict[str, Any]) -> None:
    """Raise ValueError naming the option unless each value (by
    ``_OPTION_KINDS``) is a real number (not a bool) or True / False."""
    for name, value in values.items():
        if _OPTION_KINDS[name] == "flag":
            if not isinstance(value, bool):
                raise ValueError(
                    f"RMSprop {name} should be True or False, {value!r} was provided instead"
                )
        elif not _checks.is_real_number(value):
            raise ValueError(
                f"RMSprop {name} should be a real number, {value!r} "
                f"({type(value).__name__}) was provided instead"
            )


def _check_learning_rate(value: Any, schedule: bool) -> None:
    """A number (any value, as mlx.optimizers), an array (checked at the
    step) or, when ``schedule``, a callable of the step count."""
    if _checks.is_learning_rate(value) or (schedule and callable(value)):
        return
    kinds = "a number, an mlx.core.array or a schedule" if schedule else "a number or an mlx.core.array"
    raise ValueError(
        f"RMSprop learning_rate should be {kinds}, {value!r} "
        f"({type(value).__name__}) was provided instead"
    )


def _at(tree: Any, keys: tuple) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _leaf_params(plan: "_sharding.ShardPlan", parameters: Any) -> list:
    return [_at(parameters, leaf.keys) for leaf in plan.leaves]


def _first_difference(a: "_sharding.ShardPlan", b: "_sharding.ShardPlan") -> str:
    sa, sb = a.signature(), b.signature()
    for x, y in zip(sa, sb):
        if x != y:
            return f"'{x[0]}' {x[1]} {x[2]} where the state has '{y[0]}' {y[1]} {y[2]}"
    return f"{len(sa)} leaves where the state has {len(sb)}"



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
        problem = _scalar_entry_problem(name, value)
        if problem is not None:
            raise ValueError(f"RMSprop: the optimizer state entry '{name}' is {problem}")
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


def _scalar_entry_problem(name: str, value: Any) -> Optional[str]:
    """Why a loaded 'step' or 'learning_rate' (an array or a number) cannot be
    used, or None: one element of a real dtype, not bool; the step an
    integer, and as a number >= 0 (the count of steps taken). Only kinds and
    shapes are read: the step may run under mx.compile, where a value cannot."""
    step = name == "step"
    if isinstance(value, mx.array):
        kind_ok = mx.issubdtype(value.dtype, mx.integer) if step else _checks.is_real_number(value)
        if value.size == 1 and kind_ok:
            return None
        want = "one integer element" if step else "one real element"
        return f"an array of shape {value.shape} and dtype {value.dtype}, expected {want}"
    if step and not (isinstance(value, int) and value >= 0):
        return f"{value!r}, expected the count of steps taken (an int >= 0)"
    return None


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
