"""Real training, reduced: examples/memory_lean.py's comparisons (issues 18
and 19) on tiny models and few steps, fast enough for every CI run. The full
runs, their loss curves and the commands are in docs/memory/evidence.md.

The losses compared are each run's final held-out loss (float32 evaluation
of the final weights), as the example reports them. The thresholds are the
issues' targets; each test says what it measured (this machine, seed 0)
and so the margin. The digits runs need scikit-learn (the ``examples``
extra; CI's example step installs it) and skip, saying so, without it.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "memory_lean.py"


def load_example():
    spec = importlib.util.spec_from_file_location("memory_lean", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


memory_lean = load_example()

needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None,
    reason="the digits data ship with scikit-learn, not installed (pip install '.[examples]')",
)


def run(name: str, task, lr: float, seed: int = 0, min_8bit_size: int = 512) -> dict[str, dict]:
    """Trains the task in every mode of the experiment ``name`` ('*-8bit' or
    '*-bf16'); the example's summary row of each mode, by mode."""
    bf16 = name.endswith("bf16")
    modes = (memory_lean.bf16_modes(min_8bit_size, seed) if bf16
             else memory_lean.state_modes(min_8bit_size))
    experiment = memory_lean.Experiment(name, task, modes, lr, bf16=bf16)
    runs = experiment.run(seed, eval_every=10**9)  # held-out loss at the start and end only
    rows = memory_lean.summary_rows(experiment, runs)
    for row, r in zip(rows, runs):
        row["initial_loss"] = r.eval_losses[0]
    return {row["mode"]: row for row in rows}


def tiny_lm(steps: int, seed: int = 0):
    # 2 blocks of width 32 (27k parameters; every matrix has >= 1024
    # elements, so min_8bit_size=1024 quantizes all of them).
    return memory_lean.lm_task(steps, batch_size=16, context=32, dims=32, layers=2,
                               seed=seed, held_out_windows=32)


def assert_trained(rows: dict[str, dict], reference: str, by_at_least: float) -> None:
    """The reference run learned something: the comparison is not of two
    untrained models."""
    row = rows[reference]
    assert row["final_loss"] < row["initial_loss"] - by_at_least, row


def test_lm_8bit_state_trains_as_float32_state():
    """Measured: 2.4488 (float32 state) vs 2.4484 (8-bit), -0.01%; seeds 1
    and 2: +0.06%, +0.01%. Target (issue 18): within 2%."""
    rows = run("lm-8bit", tiny_lm(80), lr=3e-3, min_8bit_size=1024)
    assert_trained(rows, "float32-state", by_at_least=2.0)
    # It was 8-bit: codes and scales take ~1 byte per weight, not 4.
    assert rows["float32-state"]["bytes_per_parameter"] == 8.0
    assert rows["8bit-state"]["bytes_per_parameter"] < 5.3
    assert abs(rows["8bit-state"]["relative_difference"]) <= 0.02


def test_lm_bfloat16_sr_and_kahan_train_as_float32_weights():
    """At lr 3e-4 a steady RMSprop step (~lr) is below half the spacing of
    most of these weights (|w| ~ 0.1: spacing 2^-10 ~ 1e-3), so rounding to
    nearest drops it. Measured (seed 0): float32 weights 3.0537; nearest
    +1.56%, SR -0.03%, Kahan +0.02%, SR + 8-bit state -0.15% (seed 1: +1.73%,
    -0.01%, -0.01%, -0.17%). Targets (issue 19): SR and Kahan within 1%, SR
    + 8-bit within 2%; nearest misses the 1% (the regime the options are for)."""
    rows = run("lm-bf16", tiny_lm(80), lr=3e-4, min_8bit_size=1024)
    assert_trained(rows, "float32", by_at_least=1.0)
    gap = {mode: abs(row["relative_difference"]) for mode, row in rows.items()}
    assert gap["bf16-nearest"] > 0.01
    assert gap["bf16-sr"] <= 0.01 and gap["bf16-kahan"] <= 0.01
    assert gap["bf16-sr-8bit"] <= 0.02
    # bf16 weights with 8-bit state: 2 bytes + ~1 byte per weight (+ the
    # float32 state of the small norm/bias leaves).
    assert rows["bf16-sr-8bit"]["bytes_per_parameter"] < 3.5


@needs_sklearn
def test_digits_8bit_state_trains_as_float32_state():
    """An MLP 64-64-64-10, 150 steps at lr 1e-3, five seeds. One run's final
    held-out loss (~0.25) moves by up to ~2% with any perturbation of the
    training (measured, seeds 0-4: -1.76%, -0.26%, +1.42%, +0.43%, +0.11%),
    so the target (within 2%) is asserted on the mean over the seeds
    (measured: 0.2572 vs 0.2572, +0.03%), with every seed within 3%."""
    means = {"float32-state": 0.0, "8bit-state": 0.0}
    for seed in range(5):
        rows = run("digits-8bit", memory_lean.digits_task(150, 64, 64, seed), lr=1e-3, seed=seed)
        assert_trained(rows, "float32-state", by_at_least=1.5)
        assert abs(rows["8bit-state"]["relative_difference"]) <= 0.03, (seed, rows)
        for mode in means:
            means[mode] += rows[mode]["final_loss"] / 5
    assert abs(means["8bit-state"] - means["float32-state"]) <= 0.02 * means["float32-state"]


@needs_sklearn
def test_digits_bfloat16_sr_and_kahan_train_as_float32_weights():
    """The issue's regime, reduced: MLP 64-128-128-10, 150 steps at lr 3e-5.
    Measured (seeds 0, 1, 2): nearest +3.36%, +2.84%, +2.69%; SR, Kahan and
    SR + 8-bit all within 0.04%. Targets: 1%, 1%, 2%; nearest misses."""
    rows = run("digits-bf16", memory_lean.digits_task(150, 64, 128, 0), lr=3e-5)
    assert_trained(rows, "float32", by_at_least=0.08)
    gap = {mode: abs(row["relative_difference"]) for mode, row in rows.items()}
    assert gap["bf16-nearest"] > 0.02
    assert gap["bf16-sr"] <= 0.01 and gap["bf16-kahan"] <= 0.01
    assert gap["bf16-sr-8bit"] <= 0.02


def run_example(tmp_path: Path, *only: str) -> dict:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--quick", "--out", str(out), "--only", *only],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    modes = {"8bit": ["float32-state", "8bit-state"],
             "bf16": ["float32", "bf16-nearest", "bf16-sr", "bf16-kahan", "bf16-sr-8bit"]}
    for name in only:
        expected = modes[name.split("-")[1]]
        assert [r["mode"] for r in summary if r["experiment"] == name] == expected
        for mode in expected:
            # Step 0 (the held-out loss at the start) and the 20 quick steps.
            steps = [int(r["step"]) for r in curves if (r["experiment"], r["mode"]) == (name, mode)]
            assert steps == list(range(21))
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 200_000
        assert f"**{name}**" in (out / "summary.md").read_text()
        assert f"**{name}**" in done.stdout
    return {(r["experiment"], r["mode"]): r for r in summary}


def test_the_example_runs_end_to_end(tmp_path):
    summary = run_example(tmp_path, "lm-8bit", "lm-bf16")
    assert float(summary["lm-bf16", "bf16-kahan"]["bytes_per_parameter"]) == 6.0
    # --replot redraws a plot from the CSV files alone.
    png = tmp_path / "out" / "lm-bf16.png"
    png.unlink()
    subprocess.run([sys.executable, str(EXAMPLE), "--replot", "--out", str(tmp_path / "out"),
                    "--only", "lm-bf16"], check=True, capture_output=True, timeout=120)
    assert png.read_bytes().startswith(b"\x89PNG")


@needs_sklearn
def test_the_example_runs_end_to_end_with_digits(tmp_path):
    run_example(tmp_path, "digits-8bit", "digits-bf16")
