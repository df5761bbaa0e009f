"""The drop-in ``RMSprop`` optimizer."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import mlx.core as mx
from mlx.optimizers import Optimizer

from . import _ext
from . import _options
from . import _presets
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
        learning_rate (float or callable): :math:`\lambda`, or a schedule of
          the step count.
        alpha (float, optional): :math:`\alpha`. Default: ``0.99``
        eps (float, optional): :math:`\epsilon`. Default: ``1e-8``
        momentum (float, optional): :math:`\mu` (>= 0; > 0 keeps a
          ``momentum_buffer``). Default: ``0``
        nesterov (bool, optional): Nesterov momentum (needs momentum).
          Default: ``False``
        centered (bool, optional): Normalize by :math:`v - m^2` (keeps a
          ``mean``). Default: ``False``
        weight_decay (float, optional): :math:`\beta` (>= 0). Default: ``0``
        decoupled_weight_decay (bool, optional): :math:`w \leftarrow w -
          \lambda \beta w` instead of :math:`g + \beta w`. Default: ``False``
        eps_in_sqrt (bool, optional): :math:`\sqrt{\sigma^2 + \epsilon}`.
          Default: ``False``
        initial_scale (float, optional): :math:`v_0` (>= 0). Default: ``0``
        bias_correction (bool, optional): :math:`c_t = 1 - \alpha^t`.
          Default: ``False``
        maximize (bool, optional): Ascend. Default: ``False``
        lr_inside_momentum (bool, optional): The buffer accumulates
          :math:`\lambda g / d` (optax, Keras; differs from torch's under a
          schedule). Default: ``False``
        state_dtype (Dtype, optional): ``mx.float32`` keeps float16 /
          bfloat16 parameters' state in float32; ``None``, in their dtype.
          Default: ``None``
        state_bits (int, optional): ``8``: 8-bit state (below). Default: ``None``
        min_8bit_size (int, optional): The fewest elements for 8-bit state
          (smaller parameters keep float32 state). Default: ``4096``
        stochastic_rounding (bool, optional): Round 16-bit parameters
          stochastically (below). Default: ``False``
        seed (int, optional): Its seed, in ``[0, 2**32)`` (kept in the state;
          ``None`` draws one from ``mx.random``). Default: ``None``
        kahan_summation (bool, optional): Kahan-compensated 16-bit parameters
          (below; not with ``stochastic_rounding``). Default: ``False``
        max_grad_norm (float, optional): Clip the global gradient norm to it
          (>= 0; below). Default: ``None``
        skip_nonfinite (bool, optional): Skip steps with a NaN or infinite
          gradient (below). Default: ``False``
        shard_group (mlx.core.distributed.Group, optional): Shard the state
          over this group's ranks (below). Default: ``None``
        shard_bucket_bytes (int, optional): The most bytes per rank one
          all-gather of parameters moves. Default: ``2**25``

    Every option, against mlx, torch, optax and Keras: docs/options.md.

    **8-bit state** (``state_bits=8``): each state entry of a parameter of
    at least ``min_8bit_size`` elements (float64 excepted: it keeps float64
    state) is uint8 codes of its shape plus
    ``<name>_scale``, float32, one per 256 elements (the block's absolute
    maximum), dequantized, updated in float32 and requantized in the same
    fused pass; the parameter is updated from the fresh float32 state.
    :meth:`full_precision_state` gives the plain float32 state; a state of
    the other form assigned to :attr:`state` is converted at the next step.
    See docs/memory.md.

    **Rounding** of float16 / bfloat16 parameters: ``stochastic_rounding``
    rounds up with probability (distance to the value below) / spacing, the
    random bits a hash of (seed, step, the parameter's ``tree_flatten``
    position, the element's row-major index); ``kahan_summation`` keeps a
    ``compensation`` :math:`c` and, with :math:`u` the update of the stored
    :math:`w`, stores :math:`w' = \mathrm{round}(w + c - u)`,
    :math:`c' = \mathrm{round}(c - u - (w' - w))`. See docs/memory.md.

    **Guards** (``max_grad_norm``, ``skip_nonfinite``): the gradients'
    global norm, summed as :func:`mlx.optimizers.clip_grad_norm` sums it
    (kept as :attr:`grad_norm`); clipping scales every gradient by
    :math:`\min(m / (\|g\| + 10^{-6}), 1)` inside the fused update
    (float32 bit-identical to ``clip_grad_norm`` then the update); a step
    with a NaN or infinite gradient changes nothing but :attr:`grad_norm`
    and :attr:`skipped_steps`. In the graph: no host sync, and it works
    under :func:`mlx.core.compile`. See docs/training.md.

    **Sharded state** (``shard_group``, or :meth:`sharded`; every rank given
    the same, e.g. averaged, gradients): the gradient leaves in
    ``tree_flatten`` order form one flat vector of :math:`E` elements, rank
    :math:`r` keeps the state of :math:`[rS, \min((r+1)S, E))`,
    :math:`S = \lceil E/N \rceil` (an 8-bit leaf cut only at a multiple of
    256 of its elements), updates its pieces with the fused kernel and
    all-gathers the parameters: bit-identical to the unsharded optimizer,
    :math:`\approx 1/N` of its state per rank. A failure on any rank raises
    the same :class:`ShardedStepError` on every rank, nothing changed. The
    step runs eagerly. Checkpoints: :meth:`sharded_state_dict` ->
    :meth:`assemble_state` -> :meth:`load_full_state`. See
    docs/distributed.md.
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
        _options.check_ranges(alpha, eps, momentum, weight_decay, initial_scale, nesterov)
        _options.check_state_dtype(state_dtype)
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

    # ---- One-line ports from other libraries (their algorithms, as options:
    # python/mlx_fused_rmsprop/_presets.py).

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
        """``torch.optim.RMSprop`` with its argument names and defaults (the
        math: :func:`mlx_fused_rmsprop._presets.torch`); this package's own
        options pass through as keywords. ``lr`` may be a schedule; shard
        its state with :meth:`sharded`."""
        return cls(
            **_presets.torch(lr, alpha, eps, weight_decay, momentum, centered, maximize),
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
        """``optax.rmsprop`` with its argument names and defaults (the math:
        :func:`mlx_fused_rmsprop._presets.optax`); this package's own options
        pass through as keywords. ``learning_rate`` may be a schedule; shard
        its state with :meth:`sharded`."""
        return cls(
            **_presets.optax(
                learning_rate, decay, eps, initial_scale, eps_in_sqrt, centered,
                momentum, nesterov, bias_correction,
            ),
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
        """``keras.optimizers.RMSprop`` with its argument names and defaults
        (the math: :func:`mlx_fused_rmsprop._presets.keras`); this package's
        own options pass through as keywords. ``learning_rate`` may be a
        schedule; shard its state with :meth:`sharded`."""
        return cls(
            **_presets.keras(learning_rate, rho, momentum, epsilon, centered, weight_decay),
            **_options.package_options("from_keras", options),
        )

    # ---- The state.

    @property
    def _guarded(self) -> bool:
        return self.max_grad_norm is not None or bool(self.skip_nonfinite)

    def _make_options(self) -> "_ext.RMSpropOptions":
        return _options.options_of(self, guarded=self._guarded)

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
        ...``) beyond what the op checks (see _options.check_settings)."""
        _options.check_settings(self)
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
        Sharded, this rank's pieces for the leaves of ``parameters`` (the
        gradients' tree, e.g. ``model.trainable_parameters()``); no collective
        runs, so call it on every rank or on none."""
        self._check_settings()
        if self.shard_group is None:
            super().init(parameters)
            self._layout_key = self._layout_signature()
            return
        self._sharded_state().init(parameters)

    def state_nbytes(self) -> int:
        """The bytes of the per-parameter state this process holds (every
        entry but the scalar ones); sharded, about ``1/N`` of the unsharded
        optimizer's."""
        return _state.nbytes(self._state)

    def full_precision_state(self) -> dict:
        """The whole state in the plain float32 layout (8-bit entries
        dequantized, 16-bit ones widened; float64 and ``compensation`` as
        they are): what ``state_dtype=mx.float32`` would hold, which this
        class (with ``state_dtype=mx.float32`` beside 16-bit parameters) and
        :class:`mlx.optimizers.RMSprop` load. Sharded: :meth:`assemble_state`
        with ``full_precision=True``."""
        if self.shard_group is not None:
            raise ValueError(
                "RMSprop.full_precision_state: this rank holds pieces of the state; "
                "use RMSprop.assemble_state(per_rank_states, full_precision=True)"
            )
        return _state.full_precision_tree(self._state)

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
        """Apply the gradients and return the updated parameters (see
        :meth:`mlx.optimizers.Optimizer.apply_gradients`): one native call
        checks every leaf and builds every leaf's fused primitive. A bad leaf
        raises ``TypeError`` / ``ValueError`` naming its path before anything
        changes (parameters, state, learning rate, step count)."""
        if self.shard_group is not None:
            return self._sharded_state().step(gradients, parameters)
        options = self._prepare(gradients, parameters)
        if not self._initialized:
            self.init(gradients)
        scheduled, step = self._next_step()
        guards = self._compute_guards(gradients)
        lr = scheduled.get("learning_rate", self._state.get("learning_rate"))
        updated = _optimizer_step(
            gradients, parameters, self._state, lr, step, options,
            self._half_state_dtype(), True, **self._step_values(guards),
        )
        self._commit_step(scheduled, step, guards)
        return updated

    def _compute_guards(self, gradients: Any) -> Optional[_guards.Guards]:
        if not self._guarded:
            return None
        return _guards.compute(gradients, self.max_grad_norm, bool(self.skip_nonfinite))

    def _step_values(self, guards: Optional[_guards.Guards]) -> dict:
        """The step's clip factor, skip flag and stochastic rounding's seed."""
        seed = self._state.get("seed") if self.stochastic_rounding else None
        return _guards.step_values(guards, seed)

    def _next_step(self) -> tuple[dict, Any]:
        """The coming step's scheduled values (at the current step, as
        Optimizer.apply_gradients) and count; written by :meth:`_commit_step`."""
        scheduled = {name: fn(self.step) for name, fn in self._schedulers.items()}
        return scheduled, self.step + 1

    def _commit_step(
        self, scheduled: dict, step: Any, guards: Optional[_guards.Guards] = None
    ) -> None:
        """Record a step that ran (or was skipped): its scheduled values,
        its count, the guards' report."""
        _guards.commit(self._state, scheduled, step, guards)

    def check_gradients(self, gradients: dict, parameters: dict) -> None:
        """Raise, naming the leaf, unless one step over ``gradients`` can run
        (its parameters, the state's entries, dtypes and shapes); changes
        nothing. Sharded, this rank only (no collective runs)."""
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
                state = _state.converted(state, parameters, layout, self._add_scalar_entries)
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

    def _add_scalar_entries(self, state: dict) -> None:
        """The scalar entries the options need and ``state`` lacks (an option
        turned on since, or a state saved without it)."""
        _state.add_scalar_entries(state, self.stochastic_rounding, self._guarded)

    # ---- Sharded state (shard_group): python/mlx_fused_rmsprop/_sharding.py.

    def _sharded_state(self) -> "_sharding.ShardedState":
        if self._shards is None or self._shards.group is not self.shard_group:
            self._shards = _sharding.ShardedState(self)
        return self._shards

    def sharded(
        self, group: Optional[mx.distributed.Group], bucket_bytes: int = 2**25
    ) -> "RMSprop":
        """Shard this optimizer's state over ``group`` (``None`` unshards),
        before the state exists: the same as ``shard_group=group,
        shard_bucket_bytes=bucket_bytes`` at construction. Returns the
        optimizer, e.g. ``RMSprop.from_torch(lr=0.01).sharded(group)``.
        """
        _sharding.check_sharding(group, bucket_bytes)
        if self._initialized:
            raise ValueError(
                "RMSprop.sharded: the optimizer already has a state; shard it before "
                "the first step (or move a state over with assemble_state / load_full_state)"
            )
        # A full state loaded before (load_full_state, or state =) and not
        # sliced yet is kept: checked and sliced (or, unsharded, taken as the
        # state) at the next step or init.
        if self._shards is not None and self._shards.pending_full is not None:
            pending = self._shards.pending_full
        else:
            pending = self._state if self._state_needs_check else None
        self.shard_group = group
        self.shard_bucket_bytes = bucket_bytes
        self._shards = None
        if pending is not None and group is not None:
            self._sharded_state().pending_full = pending
            self._state_needs_check = False
        elif pending is not None:
            self.state = pending
        return self

    def load_full_state(self, state: dict) -> None:
        """Load a full (unsharded) state -- of this class, of
        :class:`mlx.optimizers.RMSprop`, or :meth:`assemble_state`'s; 8-bit
        or not -- into this optimizer. Unsharded, the same as assigning
        :attr:`state`; sharded (every rank loads the same state, on any
        number of ranks), sliced into this rank's pieces at the next step or
        :meth:`init`, which then continue bit-identically.
        """
        if self.shard_group is None:
            self.state = state
            return
        self._sharded_state().load_full_state(state)

    def sharded_state_dict(self) -> dict[str, mx.array]:
        """This rank's state as a flat dict of arrays, for
        ``mx.save_safetensors``: the scalar entries, ``"<path>.<name>"`` per
        entry of each piece, and records of the pieces (``"<path>.__shard__"``)
        and the rank (``"__shard__"``); see docs/distributed.md. Give every
        rank's dict to :meth:`assemble_state` for the full state.
        """
        if self.shard_group is None:
            raise ValueError("RMSprop.sharded_state_dict: the optimizer has no shard_group")
        return self._sharded_state().state_dict()

    @staticmethod
    def assemble_state(
        per_rank_states: "list[dict[str, mx.array]]", full_precision: bool = False
    ) -> dict:
        """The full state from every rank's :meth:`sharded_state_dict` (one
        dict per rank, in any order): each entry in its parameter's shape,
        8-bit entries as codes and scales or, with ``full_precision``,
        dequantized to float32 -- what :class:`RMSprop` (sharded or not) and
        :class:`mlx.optimizers.RMSprop` load. Raises ``ValueError`` unless the
        pieces cover every entry exactly and come from one model and step.
        """
        return _sharding.assemble(per_rank_states, full_precision)
