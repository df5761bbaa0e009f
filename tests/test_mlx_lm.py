"""The mlx-lm recipes of docs/training.md, run as written there. "Use with
mlx-lm"'s function on a tiny randomly initialised mlx-lm Llama (no
download): mlx-lm's own trainer (a compiled step) with the fused RMSprop
gives mlx.optimizers.RMSprop's float32 losses bit for bit, and a run resumed
from the saved weights and optimizer state continues exactly as an
uninterrupted one. And the memory-lean full fine-tune (issues 18 and 19;
its numbers are in docs/training.md and docs/memory/evidence.md): a full
fine-tune with 8-bit state trains as float32 state does; a bfloat16 one with
stochastic rounding moves the weights that round-to-nearest leaves in place.

mlx-lm is optional (it pulls in transformers): without it these tests are
skipped, saying so. Checked with mlx-lm 0.32.2."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten
import numpy as np
import pytest

pytest.importorskip(
    "mlx_lm", reason="mlx-lm is not installed (optional, not in the test extra: pip install mlx-lm)"
)

from mlx_lm.models import llama  # noqa: E402
from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train  # noqa: E402

from docs_pages import python_block, read  # noqa: E402

TRAINING = read("docs/training.md")

VOCAB = 64


def documented_function(text: str, heading: str, name: str):
    """The function ``name`` of the first Python block after ``heading`` in a
    markdown text, executed from that text."""
    scope: dict = {}
    exec(python_block(text, heading), scope)
    return scope[name]


def resume_function():
    """docs/training.md's train_with_fused_rmsprop."""
    return documented_function(TRAINING, "## Use with mlx-lm", "train_with_fused_rmsprop")


def tiny_llama() -> llama.Model:
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


# One batch of four random sequences: every iteration sees the same batch, so
# a resumed run sees what an uninterrupted one does.
DATA = [(np.random.default_rng(i).integers(0, VOCAB, size=24).tolist(), 0) for i in range(4)]


class Losses(TrainingCallback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_loss_report(self, info):
        self.losses.append(info["train_loss"])


def training_args(tmp_path: Path, iters: int) -> TrainingArgs:
    return TrainingArgs(
        batch_size=4, iters=iters, steps_per_report=1, steps_per_eval=10**9,
        steps_per_save=10**9, max_seq_length=64,
        adapter_file=str(tmp_path / "adapters.safetensors"),
    )


def with_resume_function(tmp_path: Path, iters: int, model=None) -> tuple[list[float], object]:
    callback = Losses()
    np.random.seed(0)
    opt = resume_function()(
        model or tiny_llama(), DATA, None, training_args(tmp_path, iters),
        learning_rate=1e-2, state_file=str(tmp_path / "optimizer.safetensors"),
        training_callback=callback,
    )
    return callback.losses, opt


def test_losses_are_mlx_rmsprops(tmp_path):
    (tmp_path / "ours").mkdir()
    (tmp_path / "mlx").mkdir()
    ours, opt = with_resume_function(tmp_path / "ours", 4)
    callback = Losses()
    np.random.seed(0)
    train(tiny_llama(), optim.RMSprop(learning_rate=1e-2), DATA, None,
          args=training_args(tmp_path / "mlx", 4), training_callback=callback)
    assert len(ours) == 4 and ours == callback.losses
    assert opt.state["step"].item() == 4
    assert (tmp_path / "ours" / "optimizer.safetensors").exists()


def test_a_resumed_run_continues_exactly(tmp_path):
    """6 iterations in one run, against 3 + 3 with the recipe's save and
    restore in between: the same losses, bit for bit. Restarting with a
    fresh optimizer state instead (what mlx-lm alone does) changes them."""
    for name in ("once", "resumed", "fresh"):
        (tmp_path / name).mkdir()
    once, _ = with_resume_function(tmp_path / "once", 6)
    first, _ = with_resume_function(tmp_path / "resumed", 3)
    second, opt = with_resume_function(tmp_path / "resumed", 3)
    assert first + second == once
    assert opt.state["step"].item() == 6

    with_resume_function(tmp_path / "fresh", 3)  # the first half again
    (tmp_path / "fresh" / "optimizer.safetensors").unlink()
    model = tiny_llama()
    model.load_weights(str(tmp_path / "fresh" / "adapters.safetensors"), strict=False)
    restarted, _ = with_resume_function(tmp_path / "fresh", 3, model=model)
    assert restarted[0] == once[3]  # same weights, same first loss
    assert restarted[1:] != once[4:]


# ---- The memory-lean recipe of docs/training.md (issues 18 and 19):
# a full fine-tune of every weight with mlx-lm's trainer, on a tiny Llama
# large enough for 8-bit state at the default min_8bit_size (4096), trained
# on bytes of CPython's documentation topics (pydoc_data, in every CPython).

def recipe_function():
    """docs/training.md's full_finetune."""
    return documented_function(
        TRAINING, "## A full fine-tune with 8-bit state or bfloat16 weights", "full_finetune"
    )


def byte_windows(count: int, first: float, last: float, length: int = 65) -> list:
    """``count`` evenly spaced windows of ``length`` bytes of the text between
    the fractions ``first`` and ``last`` of it, as mlx-lm (tokens, offset) items."""
    from pydoc_data.topics import topics

    text = np.frombuffer("\n".join(topics[k] for k in sorted(topics)).encode(), np.uint8)
    starts = np.linspace(first * len(text), last * len(text) - length, count).astype(int)
    return [(text[s:s + length].tolist(), 0) for s in starts]


TRAIN_TEXT = byte_windows(128, 0.0, 0.9)
ITERS = 50  # of batches of 8 windows
HELD_OUT_TEXT = byte_windows(16, 0.9, 1.0)


def lean_llama() -> llama.Model:
    """A tiny Llama (139,584 parameters) whose embedding, q/o projections and
    MLP matrices have >= 4096 elements (8-bit state at the default size)."""
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def held_out_loss(model) -> float:
    """mlx-lm's loss of the model's weights on the held-out windows, in float32."""
    from mlx_lm.tuner.trainer import default_loss

    trained = model.parameters()
    model.set_dtype(mx.float32)  # exact for bfloat16 weights
    batch = mx.array([tokens for tokens, _ in HELD_OUT_TEXT])
    lengths = mx.array([[0, batch.shape[1]]] * batch.shape[0])
    loss = default_loss(model, batch, lengths)[0].item()
    model.update(trained)
    return loss


def run_recipe(tmp_path: Path, name: str, weights, learning_rate: float, iters: int,
               **options) -> dict:
    """Fine-tunes lean_llama() with the recipe; its held-out loss, the
    fraction of weight elements that changed, the state's bytes per weight."""
    model = lean_llama()
    start = [p.astype(weights) for _, p in tree_flatten(model.parameters())]
    (tmp_path / name).mkdir()
    args = TrainingArgs(
        batch_size=8, iters=iters, steps_per_report=iters, steps_per_eval=10**9,
        steps_per_save=10**9, max_seq_length=128,
        adapter_file=str(tmp_path / name / "weights.safetensors"),
    )
    np.random.seed(0)  # mlx-lm's batch order
    opt = recipe_function()(model, TRAIN_TEXT, None, args, learning_rate=learning_rate,
                            weights=weights, **options)
    end = [p for _, p in tree_flatten(model.parameters())]
    assert all(p.dtype == weights for p in end)
    size = sum(p.size for p in end)
    changed = sum(mx.sum(a != b).item() for a, b in zip(start, end))
    state = sum(v.nbytes for _, v in tree_flatten(opt.state) if v.ndim > 0)
    result = {"loss": held_out_loss(model), "changed": changed / size,
              "state_bytes_per_weight": state / size, "quantized": any(
                  v.dtype == mx.uint8 for _, v in tree_flatten(opt.state))}
    print(f"{name}: {result}")  # the numbers docs/training.md reports (pytest -s)
    return result


def test_recipe_8bit_state_trains_as_float32_state(tmp_path):
    """issue 18: float32 weights, 8-bit state against float32 state."""
    initial = held_out_loss(lean_llama())
    print(f"initial held-out loss {initial}")
    full = run_recipe(tmp_path, "float32-state", mx.float32, 1e-3, ITERS)
    lean = run_recipe(tmp_path, "8bit-state", mx.float32, 1e-3, ITERS, state_bits=8)
    assert not full["quantized"] and lean["quantized"]
    assert full["state_bytes_per_weight"] == 4.0 and lean["state_bytes_per_weight"] < 1.5
    assert full["loss"] < initial - 1.0  # it trained
    assert abs(lean["loss"] - full["loss"]) <= 0.02 * full["loss"]


def test_recipe_bfloat16_with_stochastic_rounding_moves_the_weights(tmp_path):
    """issue 19: a bfloat16 fine-tune at lr 1e-5, where an update is far below
    most weights' spacing: round-to-nearest leaves most weights where they
    were and falls behind float32 weights; stochastic rounding moves them."""
    initial = held_out_loss(lean_llama())
    print(f"initial held-out loss {initial}")
    full = run_recipe(tmp_path, "float32", mx.float32, 1e-5, ITERS)
    nearest = run_recipe(tmp_path, "bf16-nearest", mx.bfloat16, 1e-5, ITERS)
    sr = run_recipe(tmp_path, "bf16-sr", mx.bfloat16, 1e-5, ITERS,
                    stochastic_rounding=True, seed=0)
    assert sr["changed"] > 2 * nearest["changed"]
    progress = {name: initial - r["loss"] for name, r in
                (("float32", full), ("nearest", nearest), ("sr", sr))}
    assert progress["float32"] > 0
    assert abs(progress["sr"] - progress["float32"]) < 0.1 * progress["float32"]
    assert progress["nearest"] < 0.7 * progress["float32"]
