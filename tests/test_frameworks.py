"""The presets against the libraries themselves: RMSprop.from_optax and
RMSprop.from_keras against optax and Keras (JAX backend, CPU), and
RMSprop.from_torch against torch.optim.RMSprop, all in float32 over many
steps, with a constant learning rate and with a schedule.

optax, Keras and JAX come with the test extra (pyproject.toml), so these
tests run in CI; torch is a several-GB wheel, so its tests run only where
torch is installed (pip install torch==2.13.0 on this machine).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_fused_rmsprop import RMSprop
from test_variants import PRESET_ARGS, assert_trajectories_close, mx_schedule, schedule, sequence, train

STEPS = 50
RTOL = 2e-5  # float32 against float32: different but equally exact op orders


def _cases(library):
    return [(args, scheduled) for args in PRESET_ARGS[library] for scheduled in (False, True)]


def _id(case):
    args, scheduled = case
    return f"{'-'.join(args) or 'defaults'}-{'schedule' if scheduled else 'constant'}"


@pytest.mark.parametrize("case", _cases("optax"), ids=_id)
def test_from_optax_matches_optax(case):
    optax = pytest.importorskip("optax", reason="optax is in the test extra")
    import jax.numpy as jnp

    args, scheduled = case
    w0, grads = sequence(11, steps=STEPS)
    tx = optax.rmsprop(learning_rate=schedule if scheduled else 0.01, **args)
    params = jnp.asarray(w0, jnp.float32)
    state = tx.init(params)
    theirs = []
    for g in grads:
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
        params = optax.apply_updates(params, updates)
        theirs.append(np.asarray(params, np.float64))
    opt = RMSprop.from_optax(mx_schedule if scheduled else 0.01, **args)
    assert_trajectories_close(train(opt, w0, grads), theirs, RTOL, f"optax {args}")


@pytest.mark.parametrize("case", _cases("keras"), ids=_id)
def test_from_keras_matches_keras(case):
    keras = pytest.importorskip("keras", reason="keras is in the test extra")
    if keras.backend.backend() != "jax":
        pytest.skip(f"Keras runs on {keras.backend.backend()} here, these tests use JAX")

    args, scheduled = case
    w0, grads = sequence(12, steps=STEPS)
    lr = (
        keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=1, decay_rate=0.9)
        if scheduled else 0.01
    )
    opt = keras.optimizers.RMSprop(learning_rate=lr, **args)
    var = keras.Variable(w0.astype(np.float32))
    opt.build([var])
    theirs = []
    for g in grads:
        opt.apply([keras.ops.convert_to_tensor(g.astype(np.float32))], [var])
        theirs.append(np.asarray(var.value, np.float64))
    ours = RMSprop.from_keras(mx_schedule if scheduled else 0.01, **args)
    assert_trajectories_close(train(ours, w0, grads), theirs, RTOL, f"keras {args}")


@pytest.mark.parametrize("case", _cases("torch"), ids=_id)
def test_from_torch_matches_torch(case):
    torch = pytest.importorskip(
        "torch", reason="torch is not installed (not in the test extra: a several-GB wheel)"
    )

    args, scheduled = case
    w0, grads = sequence(13, steps=STEPS)
    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float32))
    opt = torch.optim.RMSprop([p], lr=0.02 if scheduled else 0.01, **args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9**k) if scheduled else None
    theirs = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        if sched is not None:
            sched.step()
        theirs.append(p.detach().numpy().astype(np.float64))
    ours = RMSprop.from_torch(mx_schedule if scheduled else 0.01, **args)
    assert_trajectories_close(train(ours, w0, grads), theirs, RTOL, f"torch {args}")
