"""The drop-in ``RMSprop`` optimizer."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import mlx.core as mx
from mlx.optimizers import Optimizer

from . import _ext
from . import _options
from . import _guards
from . import _sharding
from . import _state
from ._options import PACKAGE_OPTIONS
from ._options import optimizer_step as _optimizer_step
from ._sharding import ShardedStepError


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
        state_bits (int, optional): ``8`` keeps the state of every parameter
          of at least ``min_8bit_size`` elements (float64 excepted) 8-bit:
          uint8 codes plus one float32 scale per 256 elements, dynamic
          quantization maps, updated in float32 and requantized in the same
          fused pass (see *8-bit state* below); smaller parameters keep
          float32 state. ``None`` keeps full precision. Default: ``None``
        min_8bit_size (int, optional): The fewest elements a parameter has
          for 8-bit state. Default: ``4096``
        stochastic_rounding (bool, optional): Round float16 / bfloat16
          parameters stochastically from the float32 result (unbiased, so
          updates below the parameter's spacing add up on average); other
          dtypes are unaffected. Default: ``False``
        seed (int, optional): The seed of stochastic rounding's random bits
          (``0 <= seed < 2**32``), kept in :attr:`state` as ``"seed"``;
          ``None`` draws one from ``mx.random``. Default: ``None``
        kahan_summation (bool, optional): Keep a ``compensation`` state entry
          (the parameter's dtype) for float16 / bfloat16 parameters that adds
          back what rounding dropped (see *Rounding* below); not with
          ``stochastic_rounding``. Default: ``False``
        max_grad_norm (float, optional): Clip the gradients' global L2 norm
          to this (>= 0), as :func:`mlx.optimizers.clip_grad_norm` does,
          inside the fused update (see *Guards* below). Default: ``None``
        skip_nonfinite (bool, optional): When any gradient element is NaN or
          infinite, change nothing (no parameter, no state entry, not the
          step count). Default: ``False``
        shard_group (mlx.core.distributed.Group, optional): Shard the state
          over the ranks of this group (ZeRO stage 1, see *Sharded state*
          below); ``None`` keeps all of it on every process. Default: ``None``
        shard_bucket_bytes (int, optional): With ``shard_group``, the most
          bytes per rank one all-gather of updated parameters moves.
          Default: ``2**25`` (32 MiB)

    **8-bit state.** Each state entry (``v``; ``mean`` and
    ``momentum_buffer`` when kept) of a quantized parameter is uint8 codes of
    the parameter's shape plus ``<name>_scale``, float32, one per block of
    256 consecutive elements in row-major order (the last may be partial),
    holding the block's absolute maximum. Per block and step, in the one
    fused pass: dequantize (:math:`m[c] \cdot s`, the unsigned dynamic map
    for ``v``, the signed one otherwise), update in float32, update the
    parameter from that fresh float32 state, and requantize to the nearest
    code of :math:`x / s'` (ties toward the smaller magnitude) with the new
    absolute maximum :math:`s'` (NaN when a value is not finite: the block
    then reads back as NaN). :meth:`full_precision_state` gives the state in
    the plain float32 layout; assigning a full-precision state (e.g. an
    :class:`mlx.optimizers.RMSprop` checkpoint) to an 8-bit optimizer's
    :attr:`state` quantizes it, and an 8-bit state given to a full-precision
    optimizer is dequantized, at the next step.

    **Rounding.** float16 / bfloat16 parameters are computed in float32 and
    rounded once; by default to nearest, which drops an update below half
    the parameter's spacing every step. With ``stochastic_rounding`` they
    round up with probability (distance to the value below) / spacing: the
    random bits are a hash of (seed, step, the parameter's position in
    ``tree_flatten`` order, the element's row-major index), the same on every
    thread count, build and backend, sharded or not. With
    ``kahan_summation``, with :math:`u` the float32 update of the stored
    parameter :math:`w`:

    .. math::

        c_1 = c - u, \quad w' = \mathrm{round}(w + c_1), \quad
        c' = \mathrm{round}(c_1 - (w' - w))

    **Guards.** With ``max_grad_norm`` or ``skip_nonfinite`` every step first
    computes the gradients' global norm :math:`\|g\|` exactly as
    :func:`mlx.optimizers.clip_grad_norm` does (one read of the gradients,
    no temporaries on the CPU), kept as ``opt.grad_norm``; clipping scales
    every gradient by :math:`\min(m / (\|g\| + 10^{-6}), 1)` inside the
    fused update (float32 results are bit-identical to ``clip_grad_norm``
    followed by the update; float16 / bfloat16 gradients are scaled in
    float32, not rounded to 16 bits first); a step whose squared norm is not
    finite is skipped when ``skip_nonfinite``, counted in
    ``opt.skipped_steps``. All of it is decided inside the graph: no host
    sync, and it works under :func:`mlx.core.compile`.

    **Sharded state.** With ``shard_group`` (any ``mx.distributed.Group`` of
    :math:`N` ranks; or :meth:`sharded`, e.g. after a preset; feed every rank
    the same gradients, e.g. averaged with
    :func:`mlx.nn.average_gradients`), the gradient leaves in
    ``tree_flatten`` order are viewed as one flat vector of :math:`E`
    elements, and rank :math:`r` keeps state only for the elements
    :math:`[rS, \min((r+1)S, E))`, :math:`S = \lceil E/N \rceil`, whatever
    the leaf sizes (a leaf may be split between ranks; an 8-bit leaf only at
    a multiple of 256 of its own elements, so no block spans ranks). Each
    step a rank updates its own elements with the fused kernel (on 1-D slices of the
    leaves: the update is element-wise, so the bits are the unsharded
    optimizer's), then the updated parameters are all-gathered, a few
    buckets per step (one per parameter dtype unless a rank's share of it
    exceeds ``shard_bucket_bytes``). Parameters are bit-identical to the
    unsharded optimizer's on every rank; the per-parameter state per rank
    is :math:`\approx 1/N` of it.

    On a sharded rank :attr:`state` holds the scalar entries (``"step"``,
    ``"learning_rate"``, ...) and, at each parameter's path, the state of
    this rank's piece of it: ``{"v": (stop - start,), ...}`` (1-D, the
    piece's elements of the flattened state; 8-bit: its codes and its
    blocks' scales) or ``{}`` when the rank owns none of it. Checkpoints:
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
        state_bits: Optional[int] = None,
        min_8bit_size: int = 4096,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        kahan_summation: bool = False,
        max_grad_norm: Optional[float] = None,
        skip_nonfinite: bool = False,
        shard_group: Optional[mx.distributed.Group] = None,
        shard_bucket_bytes: int = 2**25,
    ):
        super().__init__()

        # Kinds first: a str or None would fail the comparisons below with a
        # TypeError that names nothing.
        arguments = locals()
        _options.check_learning_rate(learning_rate, schedule=True)
        _options.check_option_types({name: arguments[name] for name in _options.OPTION_KINDS})
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
        _options.check_memory_options(
            state_bits, min_8bit_size, stochastic_rounding, seed, kahan_summation,
            max_grad_norm, skip_nonfinite,
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
        self.state_bits = state_bits
        self.min_8bit_size = min_8bit_size
        self.stochastic_rounding = stochastic_rounding
        self.kahan_summation = kahan_summation
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        if stochastic_rounding:
            # Drawn from mlx's generator (seeded by mx.random.seed) unless
            # given; a state entry, so checkpoints resume bit-exactly.
            self._state["seed"] = _options.draw_seed() if seed is None else mx.array(seed, mx.uint32)
        if self._guarded:
            self._state.update(_guards.initial_entries())
        _sharding.check_sharding(shard_group, shard_bucket_bytes)
        self.shard_group = shard_group
        self.shard_bucket_bytes = shard_bucket_bytes
        self._shards: Optional[_sharding.ShardedState] = None
        self._options = self._make_options()
        # The layout the state was last built or converted for, and whether
        # an assigned state waits to be converted and checked.
        self._layout_key = self._layout_signature()
        self._state_needs_check = False

    # ---- One-line ports from other libraries.

    @classmethod
    @_options.names_its_arguments(learning_rate="lr", epsilon="eps")
    def from_torch(
        cls,
        lr: LearningRate = 0.01,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        maximize: bool = False,
        **options: Any,
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
        from outside. ``lr`` may be a schedule of the step count. The
        package's own options (``state_bits``, ``stochastic_rounding``,
        ``max_grad_norm``, ...; see the class) pass through as keywords.
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
            **_options.package_options("from_torch", options),
        )

    @classmethod
    @_options.names_its_arguments(alpha="decay", epsilon="eps")
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
        **options: Any,
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
        ignored. ``learning_rate`` may be a schedule of the step count. The
        package's own options pass through as keywords. Shard its state with
        :meth:`sharded`.
        """
        mu = 0.0 if momentum is None else momentum
        _options.check_option_types({"momentum": mu, "nesterov": nesterov})  # before `nesterov and ...`
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
            **_options.package_options("from_optax", options),
        )

    @classmethod
    @_options.names_its_arguments(alpha="rho", eps="epsilon")
    def from_keras(
        cls,
        learning_rate: LearningRate = 0.001,
        rho: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-7,
        centered: bool = False,
        weight_decay: Optional[float] = None,
        **options: Any,
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
        step count. The package's own options pass through as keywords. Shard
        its state with :meth:`sharded`.
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
            **_options.package_options("from_keras", options),
        )

    # ---- The state.

    @property
    def _guarded(self) -> bool:
        return self.max_grad_norm is not None or bool(self.skip_nonfinite)

    def _make_options(self) -> "_ext.RMSpropOptions":
        if self.stochastic_rounding and self.kahan_summation:
            raise ValueError(
                "RMSprop: stochastic_rounding and kahan_summation exclude each other"
            )
        return _options.make_options(
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
            stochastic_rounding=self.stochastic_rounding,
            kahan_summation=self.kahan_summation,
            guarded=self._guarded,
            state_bits=self.state_bits,
            min_8bit_size=self.min_8bit_size,
        )

    @property
    def learning_rate(self) -> mx.array:
        """The learning rate (as in :class:`mlx.optimizers.Optimizer`)."""
        return self.state["learning_rate"]

    @learning_rate.setter
    def learning_rate(self, learning_rate: Union[float, mx.array]) -> None:
        _options.check_learning_rate(learning_rate, schedule=False)
        self.state["learning_rate"] = mx.array(learning_rate)

    def _check_settings(self) -> None:
        """Check what may have been assigned since construction (``opt.alpha =
        ...``) beyond what the op checks: the options' kinds, what a new state
        is made with (initial_scale, state_dtype, the memory options) or
        sharded by."""
        _options.check_option_types({name: getattr(self, name) for name in _options.OPTION_KINDS})
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
        # (The seed lives in the state: a loaded one is checked with it.)
        _options.check_memory_options(
            self.state_bits, self.min_8bit_size, self.stochastic_rounding, None,
            self.kahan_summation, self.max_grad_norm, self.skip_nonfinite,
        )
        _sharding.check_sharding(self.shard_group, self.shard_bucket_bytes)

    def _half_state_dtype(self) -> Optional[mx.Dtype]:
        """The full-precision state's dtype beside float16 / bfloat16
        parameters: float32 with 8-bit state (for the parameters too small
        to quantize), else state_dtype (None: the parameter's)."""
        return mx.float32 if self.state_bits == 8 else self.state_dtype

    def _layout(self, options: Optional["_ext.RMSpropOptions"] = None) -> _state.Layout:
        return _state.Layout(
            options or self._options, self._half_state_dtype(), self.initial_scale
        )

    def _layout_signature(self) -> tuple:
        """What decides the state's form: a change converts it at the next step."""
        return (self.state_bits, self.min_8bit_size, self.kahan_summation, str(self.state_dtype))

    @property
    def state_names(self) -> tuple[str, ...]:
        """The state each parameter has: ``("v",)``, plus ``"mean"`` when
        centered and ``"momentum_buffer"`` with momentum (8-bit ones with a
        ``<name>_scale`` beside, and ``"compensation"`` with Kahan summation
        of a 16-bit parameter)."""
        return tuple(self._options.state_names())

    def state_dtype_of(self, parameter: mx.array) -> mx.Dtype:
        """The dtype of a parameter's full-precision state (8-bit state is
        uint8 codes whatever this says)."""
        return self._layout().dtype_of(parameter.dtype)

    @property
    def scalar_entries(self) -> tuple[str, ...]:
        """The state's entries that are not per parameter: ``"step"``,
        ``"learning_rate"``, ``"seed"`` with stochastic rounding,
        ``"grad_norm"`` and ``"skipped_steps"`` with the guards."""
        return tuple(name for name in _state.SCALAR_ENTRIES if name in self._state)

    @property
    def grad_norm(self) -> Optional[mx.array]:
        """The last step's global gradient norm before clipping (0-d float32;
        0 before the first step), with ``max_grad_norm`` or
        ``skip_nonfinite``; else None."""
        return self._state.get(_guards.GRAD_NORM)

    @property
    def skipped_steps(self) -> Optional[mx.array]:
        """How many steps ``skip_nonfinite`` skipped (0-d uint64; 0 with
        ``max_grad_norm`` alone); None without either."""
        return self._state.get(_guards.SKIPPED_STEPS)

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
            self._layout_key = self._layout_signature()
            return
        self._sharded_state().init(parameters)

    def state_nbytes(self) -> int:
        """The bytes of the per-parameter state this process holds (``v``,
        ``mean``, ``momentum_buffer``, their 8-bit scales, ``compensation``;
        not the scalar entries). With ``shard_group``, about ``1/N`` of the
        unsharded optimizer's."""
        total = 0
        for keys, value in _sharding.flatten(self._state):
            if len(keys) == 1 and keys[0] in _state.SCALAR_ENTRIES:
                continue
            if isinstance(value, mx.array):
                total += value.nbytes
        return total

    def full_precision_state(self) -> dict:
        """The whole state in the plain layout, float32: 8-bit entries
        dequantized (their scales dropped), float16 / bfloat16 ones widened
        (float64 stays; ``compensation`` keeps the parameter's dtype), the
        scalar entries as they are -- what ``state_dtype=mx.float32`` would
        hold: what this class loads (with ``state_dtype=mx.float32`` beside
        float16 / bfloat16 parameters) and :class:`mlx.optimizers.RMSprop`
        too. For a sharded optimizer, assemble the ranks' states instead
        (:meth:`assemble_state` with ``full_precision=True``)."""
        if self.shard_group is not None:
            raise ValueError(
                "RMSprop.full_precision_state: this rank holds pieces of the state; "
                "use RMSprop.assemble_state(per_rank_states, full_precision=True)"
            )
        def convert(tree: Any) -> Any:
            if isinstance(tree, dict) and tree and all(isinstance(v, mx.array) for v in tree.values()):
                return _state.full_precision(tree)
            if isinstance(tree, dict):
                return {k: convert(v) for k, v in tree.items()}
            if isinstance(tree, (list, tuple)):
                return type(tree)(convert(v) for v in tree)
            return tree

        scalars = {k: v for k, v in self._state.items() if k in _state.SCALAR_ENTRIES}
        rest = {k: v for k, v in self._state.items() if k not in _state.SCALAR_ENTRIES}
        return {**scalars, **convert(rest)}

    def init_single(self, parameter: mx.array, state: dict) -> None:
        """Initialize optimizer state"""
        self._layout().init(parameter.shape, parameter.dtype, state)

    def apply_single(
        self, gradient: mx.array, parameter: mx.array, state: dict
    ) -> mx.array:
        """Performs the RMSprop parameter update with one fused primitive and
        stores the new state (every entry of the parameter's state) in the
        optimizer state. The guards need the whole tree: with
        ``max_grad_norm`` / ``skip_nonfinite`` use :meth:`apply_gradients`.
        """
        if self._guarded:
            raise ValueError(
                "RMSprop.apply_single: max_grad_norm and skip_nonfinite need every "
                "gradient at once; use apply_gradients (or update)"
            )
        quantized = _state.is_quantized(state)
        names = self._layout().entry_names(quantized, parameter.dtype)
        outputs = _ext.rmsprop_step(
            gradient,
            parameter,
            [state[name] for name in names],
            self.learning_rate,
            self.step if (self.bias_correction or self.stochastic_rounding) else None,
            self._options,
            quantized=quantized,
            seed=self._state.get("seed"),
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
            return self._sharded_state().step(gradients, parameters)
        options = self._prepare(gradients, parameters)
        if not self._initialized:
            self.init(gradients)
        scheduled, step = self._next_step()
        guards = self._compute_guards(gradients)
        updated = _optimizer_step(
            gradients,
            parameters,
            self._state,
            scheduled.get("learning_rate", self._state.get("learning_rate")),
            step,
            options,
            self._half_state_dtype(),
            True,
            **self._step_values(guards),
        )
        self._commit_step(scheduled, step, guards)
        return updated

    def _compute_guards(self, gradients: Any) -> Optional[_guards.Guards]:
        if not self._guarded:
            return None
        return _guards.compute(gradients, self.max_grad_norm, bool(self.skip_nonfinite))

    def _step_values(self, guards: Optional[_guards.Guards]) -> dict:
        """The step's values beside lr and the step count: the guards' clip
        factor and skip flag, stochastic rounding's seed."""
        return {
            "clip": guards.clip if guards else None,
            "skip": guards.skip if guards else None,
            "seed": self._state.get("seed") if self.stochastic_rounding else None,
        }

    def _next_step(self) -> tuple[dict, Any]:
        """The coming step's scheduled hyperparameters and step count. As
        Optimizer.apply_gradients: schedules at the current step, then the new
        step; nothing is written until :meth:`_commit_step`, once every leaf
        has passed."""
        scheduled = {name: fn(self.step) for name, fn in self._schedulers.items()}
        return scheduled, self.step + 1

    def _commit_step(
        self, scheduled: dict, step: Any, guards: Optional[_guards.Guards] = None
    ) -> None:
        """Record a step that ran (or was skipped): its scheduled values,
        its count, the guards' report."""
        _guards.commit(self._state, scheduled, step, guards)

    def check_gradients(self, gradients: dict, parameters: dict) -> None:
        """Raise, naming the leaf, unless one step over ``gradients`` can run.

        Changes nothing. Checks that each gradient has a parameter and (once
        the optimizer is initialized) the state entries of its options, of the
        parameter's shape and a dtype the fused kernel updates. With
        ``shard_group``, checks this rank only (no collective runs).
        """
        if self.shard_group is not None:
            self._sharded_state().check(gradients, parameters)
            return
        options = self._prepare(gradients, parameters, convert=False)
        if self._initialized and not self._state_needs_check:
            _optimizer_step(
                gradients, parameters, self._state, None, None, options,
                self._half_state_dtype(), False,
            )

    def _prepare(
        self, gradients: Any, parameters: Any, convert: bool = True
    ) -> "_ext.RMSpropOptions":
        """The options of this step (hyperparameters may have been set since
        the last one); converts and checks an assigned state (or one whose
        form the options changed) entry by entry and, before the state
        exists, checks every leaf as init() will set it up."""
        self._check_settings()
        self._options = options = self._make_options()
        self._add_scalar_entries(self._state)
        signature = self._layout_signature()
        if self._initialized and signature != self._layout_key:
            self._state_needs_check = True
        if self._state_needs_check:
            layout = self._layout(options)
            state = self._state
            if convert:
                state = self._converted(state, parameters, layout)
            _state.check_assigned(state, gradients, parameters, layout, _state.SCALAR_ENTRIES)
            if not convert:
                return options
            # In place, not a new dict: mx.compile (e.g. mlx-lm's trainer)
            # captured this dict as the step's inputs and outputs, and reads
            # the step's results back from it.
            if state is not self._state:
                self._state.clear()
                self._state.update(state)
            self._state_needs_check = False
            self._layout_key = signature
        if not self._initialized:
            _optimizer_step(
                gradients, parameters, self._state, None, None, options,
                self._half_state_dtype(), False, allow_missing_state=True,
            )
        return options

    def _converted(self, state: Any, parameters: Any, layout: _state.Layout) -> Any:
        """An assigned state in this optimizer's form, with the scalar entries
        its options need (a seed, the guards' report) added when missing."""
        if not isinstance(state, dict):
            return state
        leaves = {k: v for k, v in state.items() if k not in _state.SCALAR_ENTRIES}
        out = {k: v for k, v in state.items() if k in _state.SCALAR_ENTRIES}
        out.update(_state.map_leaves(leaves, parameters, layout.convert))
        self._add_scalar_entries(out)
        return out

    def _add_scalar_entries(self, state: dict) -> None:
        """The scalar entries the options need and ``state`` lacks (an option
        turned on since, or a state saved without it): stochastic rounding's
        seed, the guards' report."""
        if self.stochastic_rounding and "seed" not in state:
            state["seed"] = _options.draw_seed()
        if self._guarded:
            for name, value in _guards.initial_entries().items():
                state.setdefault(name, value)

    # ---- Sharded state (shard_group): python/mlx_fused_rmsprop/_sharding.py.

    def _sharded_state(self) -> "_sharding.ShardedState":
        if self._shards is None or self._shards.group is not self.shard_group:
            self._shards = _sharding.ShardedState(self)
        return self._shards

    def sharded(
        self, group: Optional[mx.distributed.Group], bucket_bytes: int = 2**25
    ) -> "RMSprop":
        """Shard this optimizer's state over ``group`` (see the class); returns
        the optimizer, e.g. ``RMSprop.from_torch(lr=0.01).sharded(group)``.

        The same as ``shard_group=group, shard_bucket_bytes=bucket_bytes`` at
        construction; only before the state exists (the first step or
        :meth:`init`). ``None`` unshards.
        """
        _sharding.check_sharding(group, bucket_bytes)
        if self._initialized:
            raise ValueError(
                "RMSprop.sharded: the optimizer already has a state; shard it before "
                "the first step (or move a state over with assemble_state / load_full_state)"
            )
        self.shard_group = group
        self.shard_bucket_bytes = bucket_bytes
        self._shards = None
        if group is not None and self._state_needs_check:
            # A state assigned before (load_full_state, or state =) is a full
            # one: keep it, to be checked and sliced at the next step or init.
            self._sharded_state().pending_full = self._state
            self._state_needs_check = False
        return self

    def load_full_state(self, state: dict) -> None:
        """Load a full (unsharded) state into this optimizer.

        The state of :class:`RMSprop` without ``shard_group``, of
        :class:`mlx.optimizers.RMSprop`, or :meth:`assemble_state`'s: a tree
        ``{"step", "learning_rate", <parameter path>: {"v": ..., ...}}``
        (8-bit or full precision: converted to this optimizer's form).
        Unsharded, the same as assigning :attr:`state`. Sharded (on any
        number of ranks; every rank loads the same full state), the scalar
        entries are taken now and the rest is checked against the gradients
        and sliced into this rank's pieces at the next step (or
        :meth:`init`); later steps are bit-identical to the unsharded
        optimizer continuing from this state.
        """
        if self.shard_group is None:
            self.state = state
            return
        self._sharded_state().load_full_state(state)

    def sharded_state_dict(self) -> dict[str, mx.array]:
        """This rank's state as a flat dict of arrays, for ``mx.save_safetensors``.

        Keys: the scalar entries (``"step"``, ``"learning_rate"``, ...);
        ``"<path>.<name>"`` for each state entry of this rank's pieces (1-D;
        8-bit: codes, and ``<name>_scale`` with the piece's blocks);
        ``"<path>.__shard__"``, ``[leaf index, start, stop, ndim, *shape]``
        (int64) of each piece; and ``"__shard__"``, ``[rank, ranks, elements
        of all leaves]``. Give every rank's dict to :meth:`assemble_state`
        for the full state.
        """
        if self.shard_group is None:
            raise ValueError("RMSprop.sharded_state_dict: the optimizer has no shard_group")
        return self._sharded_state().state_dict()

    @staticmethod
    def assemble_state(
        per_rank_states: "list[dict[str, mx.array]]", full_precision: bool = False
    ) -> dict:
        """The full state from every rank's :meth:`sharded_state_dict`.

        ``per_rank_states`` holds one dict per rank of the group, in any order
        (e.g. ``[mx.load(f) for f in files]``). Returns the unsharded tree
        ``{"step", "learning_rate", <parameter path>: {"v": ..., ...}}`` with
        each entry of its parameter's shape (8-bit entries as codes and
        scales, or dequantized to float32 with ``full_precision``): what
        :class:`RMSprop` (sharded on any number of ranks or not) and, full
        precision, :class:`mlx.optimizers.RMSprop` load. Raises
        ``ValueError`` unless the pieces of every entry of every rank cover
        it exactly and come from one model and one step.
        """
        return _sharding.assemble(per_rank_states, full_precision)
