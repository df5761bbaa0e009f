"""The README's "Use with mlx-lm" function, run as written on a tiny randomly
initialised mlx-lm Llama (no download): mlx-lm's own trainer (a compiled
step) with the fused RMSprop gives mlx.optimizers.RMSprop's float32 losses
bit for bit, and a run resumed from the saved weights and optimizer state
continues exactly as an uninterrupted one.

mlx-lm is optional (it pulls in transformers): without it these tests are
skipped, saying so. Checked with mlx-lm 0.32.2."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

pytest.importorskip(
    "mlx_lm", reason="mlx-lm is not installed (optional, not in the test extra: pip install mlx-lm)"
)

from mlx_lm.models import llama  # noqa: E402
from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train  # noqa: E402

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

VOCAB = 64


def readme_function():
    """The README's train_with_fused_rmsprop, executed from the README text."""
    start = README.index("## Use with mlx-lm")
    block = README.index("```python", start) + len("```python")
    scope: dict = {}
    exec(README[block:README.index("```", block)], scope)
    return scope["train_with_fused_rmsprop"]


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


def with_readme_function(tmp_path: Path, iters: int, model=None) -> tuple[list[float], object]:
    callback = Losses()
    np.random.seed(0)
    opt = readme_function()(
        model or tiny_llama(), DATA, None, training_args(tmp_path, iters),
        learning_rate=1e-2, state_file=str(tmp_path / "optimizer.safetensors"),
        training_callback=callback,
    )
    return callback.losses, opt


def test_losses_are_mlx_rmsprops(tmp_path):
    (tmp_path / "ours").mkdir()
    (tmp_path / "mlx").mkdir()
    ours, opt = with_readme_function(tmp_path / "ours", 4)
    callback = Losses()
    np.random.seed(0)
    train(tiny_llama(), optim.RMSprop(learning_rate=1e-2), DATA, None,
          args=training_args(tmp_path / "mlx", 4), training_callback=callback)
    assert len(ours) == 4 and ours == callback.losses
    assert opt.state["step"].item() == 4
    assert (tmp_path / "ours" / "optimizer.safetensors").exists()


def test_a_resumed_run_continues_exactly(tmp_path):
    """6 iterations in one run, against 3 + 3 with the README's save and
    restore in between: the same losses, bit for bit. Restarting with a
    fresh optimizer state instead (what mlx-lm alone does) changes them."""
    for name in ("once", "resumed", "fresh"):
        (tmp_path / name).mkdir()
    once, _ = with_readme_function(tmp_path / "once", 6)
    first, _ = with_readme_function(tmp_path / "resumed", 3)
    second, opt = with_readme_function(tmp_path / "resumed", 3)
    assert first + second == once
    assert opt.state["step"].item() == 6

    with_readme_function(tmp_path / "fresh", 3)  # the first half again
    (tmp_path / "fresh" / "optimizer.safetensors").unlink()
    model = tiny_llama()
    model.load_weights(str(tmp_path / "fresh" / "adapters.safetensors"), strict=False)
    restarted, _ = with_readme_function(tmp_path / "fresh", 3, model=model)
    assert restarted[0] == once[3]  # same weights, same first loss
    assert restarted[1:] != once[4:]
