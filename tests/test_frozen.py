"""Training with frozen parameters, on every path.

Three models, each with parameters that get no gradient:
- ``frozen_layer``: an MLP whose middle layer is frozen (``layer.freeze()``);
- ``frozen_keys``: the same MLP with ``model.freeze(keys=["bias"])`` (every
  bias frozen, recursively);
- ``lora``: a 4-bit ``nn.QuantizedLinear`` base, frozen (uint32 weights,
  scales and biases), plus a small trainable low-rank adapter and a head.

Their gradients (``nn.value_and_grad``) hold the trainable leaves only, and
so must the optimizer's state, as mlx.optimizers.RMSprop's does. Each path:
eager against mlx.optimizers.RMSprop (state contents and bytes, bit-identical
parameters), checkpoints both ways (ours -> mlx and mlx -> ours, continuing
bit-identically), mx.compile, the variants (a frozen model trains exactly as
its trainable leaves alone), and the sharded optimizer (the singleton group,
rank r of N through init, and 3 launched ranks).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from fake_ranks import sharded_at
from mlx_fused_rmsprop import RMSprop
from oracle import assert_trees_bit_equal_in_any_order as assert_trees_bit_equal

GROUP = mx.distributed.init()  # the singleton group
VARIANTS = {
    "torch_heavy": {"centered": True, "momentum": 0.9, "weight_decay": 0.01},
    "optax_nesterov": {"momentum": 0.9, "nesterov": True, "bias_correction": True,
                       "eps_in_sqrt": True, "lr_inside_momentum": True},
}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = [nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


class LoRA(nn.Module):
    """A frozen quantized base with a trainable low-rank update, and a head."""

    def __init__(self, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.QuantizedLinear.from_linear(nn.Linear(64, 16), group_size=32, bits=4)
        self.base.freeze()
        self.lora_a = 0.1 * mx.random.normal((64, rank))
        self.lora_b = 0.1 * mx.random.normal((rank, 16))
        self.head = nn.Linear(16, 4)

    def __call__(self, x: mx.array) -> mx.array:
        return self.head(nn.relu(self.base(x) + (x @ self.lora_a) @ self.lora_b))


def _frozen_layer() -> nn.Module:
    model = MLP()
    model.layers[1].freeze()
    return model


def _frozen_keys() -> nn.Module:
    model = MLP()
    model.freeze(keys=["bias"])
    return model


MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {  # name: (make, input width)
    "frozen_layer": (_frozen_layer, 8),
    "frozen_keys": (_frozen_keys, 8),
    "lora": (LoRA, 64),
}


def make(kind: str) -> nn.Module:
    """The same model (weights included) at every call."""
    mx.random.seed(0)
    model = MODELS[kind][0]()
    mx.eval(model.parameters())
    return model


def batch(kind: str, k: int) -> tuple[mx.array, mx.array]:
    key = mx.random.key(100 + k)
    x = mx.random.normal((16, MODELS[kind][1]), key=key)
    return x, mx.sin(x[:, :4] * 3)


def loss_fn(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    return nn.losses.mse_loss(model(x), y)


def train(model: nn.Module, opt, steps: range, kind: str) -> None:
    grad_fn = nn.value_and_grad(model, loss_fn)
    for k in steps:
        _, grads = grad_fn(model, *batch(kind, k))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)


def frozen(model: nn.Module) -> list[tuple[str, mx.array]]:
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    return [(k, v) for k, v in tree_flatten(model.parameters()) if k not in trainable]


def state_bytes(opt) -> int:
    """The bytes of the per-parameter state entries, counted from the tree."""
    return sum(v.nbytes for k, v in tree_flatten(opt.state) if k not in ("step", "learning_rate"))


def per_leaf_paths(opt) -> set[str]:
    return {k.rsplit(".", 1)[0] for k, _ in tree_flatten(opt.state) if k not in ("step", "learning_rate")}


@pytest.fixture(params=list(MODELS))
def kind(request) -> str:
    return request.param


def test_every_model_has_frozen_and_trainable_leaves(kind):
    model = make(kind)
    assert frozen(model) and tree_flatten(model.trainable_parameters())
    if kind == "lora":
        assert {v.dtype for _, v in frozen(model)} == {mx.uint32, mx.float32}


# ---- Eager, against mlx.optimizers.RMSprop.


def test_state_and_parameters_are_mlx_s(kind):
    """State only for the trained leaves (entries, bits and bytes as mlx's),
    parameters bit-identical to mlx's, frozen ones untouched."""
    ours_model, ref_model = make(kind), make(kind)
    before = [(k, mx.array(v)) for k, v in frozen(ours_model)]
    ours, ref = RMSprop(0.01), optim.RMSprop(0.01)
    train(ours_model, ours, range(3), kind)
    train(ref_model, ref, range(3), kind)
    assert_trees_bit_equal(ours.state, ref.state)
    assert per_leaf_paths(ours) == {k for k, _ in tree_flatten(ours_model.trainable_parameters())}
    assert ours.state_nbytes() == state_bytes(ref) > 0
    assert_trees_bit_equal(ours_model.parameters(), ref_model.parameters())
    assert_trees_bit_equal(dict(frozen(ours_model)), dict(before))


def test_init_with_the_trainable_parameters_makes_mlx_s_state(kind):
    ours, ref = RMSprop(0.01), optim.RMSprop(0.01)
    for opt in (ours, ref):
        opt.init(make(kind).trainable_parameters())
    assert_trees_bit_equal(ours.state, ref.state)


@pytest.mark.parametrize("saver,loader", [(RMSprop, optim.RMSprop), (optim.RMSprop, RMSprop)],
                         ids=["ours_to_mlx", "mlx_to_ours"])
def test_checkpoints_both_ways_continue_bit_identically(tmp_path, kind, saver, loader):
    """A state saved (safetensors) after 2 steps by one optimizer, loaded into
    the other: 2 more steps give the parameters and state of the first
    optimizer continuing."""
    model, opt = make(kind), saver(0.01)
    train(model, opt, range(2), kind)
    path = str(tmp_path / "state.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(opt.state)))
    resumed_model = make(kind)
    resumed_model.update(tree_map(mx.array, model.parameters()))
    resumed = loader(0.01)
    resumed.state = tree_unflatten(list(mx.load(path).items()))
    train(model, opt, range(2, 4), kind)
    train(resumed_model, resumed, range(2, 4), kind)
    assert_trees_bit_equal(resumed_model.parameters(), model.parameters())
    assert_trees_bit_equal(resumed.state, opt.state)


# ---- mx.compile.


def test_compiled_training_step_equals_eager(kind):
    eager_model, compiled_model = make(kind), make(kind)
    eager, compiled = RMSprop(optim.exponential_decay(0.02, 0.9)), RMSprop(optim.exponential_decay(0.02, 0.9))
    compiled.init(compiled_model.trainable_parameters())
    state = [compiled_model.state, compiled.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x: mx.array, y: mx.array) -> mx.array:
        loss, grads = nn.value_and_grad(compiled_model, loss_fn)(compiled_model, x, y)
        compiled.update(compiled_model, grads)
        return loss

    for k in range(3):
        step(*batch(kind, k))
        mx.eval(state)
    train(eager_model, eager, range(3), kind)
    assert_trees_bit_equal(compiled_model.parameters(), eager_model.parameters())
    assert_trees_bit_equal(compiled.state, eager.state)
    assert per_leaf_paths(compiled) == {k for k, _ in tree_flatten(compiled_model.trainable_parameters())}


# ---- Variants.


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_a_frozen_model_trains_as_its_trainable_leaves_alone(kind, options):
    """With every option, the model's trainable leaves end bit for bit as
    the same optimizer training those leaves alone (a plain tree, no frozen
    leaf anywhere); the state holds exactly the trainable leaves, each with
    every state entry of the options."""
    model = make(kind)
    alone = tree_map(mx.array, model.trainable_parameters())
    opt, opt_alone = RMSprop(0.01, **options), RMSprop(0.01, **options)
    grad_fn = nn.value_and_grad(model, loss_fn)
    for k in range(3):
        _, grads = grad_fn(model, *batch(kind, k))
        opt.update(model, grads)
        alone = opt_alone.apply_gradients(grads, alone)
        mx.eval(model.parameters(), alone, opt.state, opt_alone.state)
    assert_trees_bit_equal(model.trainable_parameters(), alone)
    assert_trees_bit_equal(opt.state, opt_alone.state)
    names = set(opt.state_names)
    for path in per_leaf_paths(opt):
        assert {k.rsplit(".", 1)[1] for k, _ in tree_flatten(opt.state) if k.startswith(path + ".")} == names


# ---- Sharded.


@pytest.mark.parametrize("options", [{}, VARIANTS["torch_heavy"]], ids=["plain", "variant"])
def test_sharded_over_the_singleton_group_equals_unsharded(kind, options):
    sharded_model, plain_model = make(kind), make(kind)
    sharded, plain = RMSprop(0.01, shard_group=GROUP, shard_bucket_bytes=64, **options), RMSprop(0.01, **options)
    train(sharded_model, sharded, range(3), kind)
    train(plain_model, plain, range(3), kind)
    assert_trees_bit_equal(sharded_model.parameters(), plain_model.parameters())
    assert sharded.state_nbytes() == plain.state_nbytes()
    assert_trees_bit_equal(RMSprop.assemble_state([sharded.sharded_state_dict()]), plain.state)


@pytest.mark.parametrize("direction", ["sharded_to_mlx", "mlx_to_sharded"])
def test_sharded_checkpoints_both_ways_with_mlx(kind, direction):
    """A sharded checkpoint (sharded_state_dict -> assemble_state) continues
    in mlx.optimizers.RMSprop, and mlx's checkpoint in the sharded optimizer
    (load_full_state), bit-identically to the unsharded optimizer."""
    model, first = make(kind), (RMSprop(0.01, shard_group=GROUP) if direction == "sharded_to_mlx" else optim.RMSprop(0.01))
    train(model, first, range(2), kind)
    if direction == "sharded_to_mlx":
        full, second = RMSprop.assemble_state([first.sharded_state_dict()]), optim.RMSprop(0.01)
        second.state = full
    else:
        full, second = tree_map(mx.array, first.state), RMSprop(0.01, shard_group=GROUP)
        second.load_full_state(full)
    reference, reference_model = RMSprop(0.01), make(kind)
    reference.state = tree_map(mx.array, full)
    reference_model.update(tree_map(mx.array, model.parameters()))
    train(model, second, range(2, 4), kind)
    train(reference_model, reference, range(2, 4), kind)
    assert_trees_bit_equal(model.parameters(), reference_model.parameters())


@pytest.mark.parametrize("ranks", [2, 3])
def test_each_rank_keeps_state_for_its_share_of_the_trainable_elements_only(kind, ranks):
    """Rank r of N, initialized with the trainable parameters: the pieces
    cover the trainable elements exactly once between the ranks (nothing
    for a frozen leaf), and assemble to the unsharded optimizer's state."""
    model = make(kind)
    trainable = model.trainable_parameters()
    plain = RMSprop(0.1)  # sharded_at's learning rate
    plain.init(trainable)
    opts = [sharded_at(r, ranks, trainable) for r in range(ranks)]
    assert sum(o.state_nbytes() for o in opts) == plain.state_nbytes()
    frozen_paths = {k for k, _ in frozen(model)}
    for o in opts:
        assert not {k.rsplit(".", 1)[0] for k in o.sharded_state_dict()} & frozen_paths
    assert_trees_bit_equal(RMSprop.assemble_state([o.sharded_state_dict() for o in opts]), plain.state)


def test_launched_ranks_train_a_model_with_frozen_leaves(tmp_path):
    """3 ranks, gradients without the frozen leaves (as value_and_grad gives
    them): sharded == unsharded on every rank, the frozen leaves unchanged,
    and the state covers the trainable elements only."""
    from test_distributed import launch, rank_parameters, assert_trees_equal
    from distributed_cases import initial_parameters

    frozen_keys = ["embed", "scale"]
    (reports,) = launch(3, "train", [{"steps": 3, "frozen": frozen_keys, "options": VARIANTS["torch_heavy"]}], tmp_path)
    params = initial_parameters()
    trainable = sum(v.size for k, v in tree_flatten(params) if k.split(".")[0] not in frozen_keys)
    for rank, report in enumerate(reports):
        assert report["equal_unsharded"], rank
        assert report["total_elements"] == sum(v.size for _, v in tree_flatten(params))
    for name in ("v", "mean", "momentum_buffer"):
        assert sum(r["state_elements"][name] for r in reports) == trainable
    for ends in rank_parameters(tmp_path, 3):
        assert_trees_equal({k: ends[k] for k in frozen_keys}, {k: params[k] for k in frozen_keys})
