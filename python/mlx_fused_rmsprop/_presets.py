r"""The presets of RMSprop: the RMSprop of PyTorch, optax and Keras, each as
the options of :class:`mlx_fused_rmsprop.RMSprop` that reproduce its
documented algorithm (with the library's own argument names and defaults on
:meth:`RMSprop.from_torch`, :meth:`RMSprop.from_optax`,
:meth:`RMSprop.from_keras`). tests/test_variants.py checks each against a
float64 model of its library's algorithm, tests/test_frameworks.py against
the libraries themselves.
"""

from __future__ import annotations

from typing import Any, Optional

from . import _options


def torch(
    lr: Any,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> dict:
    r"""``torch.optim.RMSprop`` as options.

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
    return dict(
        learning_rate=lr,
        alpha=alpha,
        eps=eps,
        momentum=momentum,
        centered=centered,
        weight_decay=weight_decay,
        maximize=maximize,
    )


def optax(
    learning_rate: Any,
    decay: float,
    eps: float,
    initial_scale: float,
    eps_in_sqrt: bool,
    centered: bool,
    momentum: Optional[float],
    nesterov: bool,
    bias_correction: bool,
) -> dict:
    r"""``optax.rmsprop`` as options.

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
    _options.check_option_types({"momentum": mu, "nesterov": nesterov})  # before `nesterov and ...`
    return dict(
        learning_rate=learning_rate,
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


def keras(
    learning_rate: Any,
    rho: float,
    momentum: float,
    epsilon: float,
    centered: bool,
    weight_decay: Optional[float],
) -> dict:
    r"""``keras.optimizers.RMSprop`` as options.

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
    return dict(
        learning_rate=learning_rate,
        alpha=rho,
        eps=epsilon,
        momentum=momentum,
        centered=centered,
        weight_decay=0.0 if weight_decay is None else weight_decay,
        decoupled_weight_decay=True,
        eps_in_sqrt=True,
        lr_inside_momentum=True,
    )
