"""Smoke tests of the benchmark suite (`python -m mlx_fused_rmsprop bench`):
it runs end to end at a tiny size and its outputs have the documented
structure. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_fused_rmsprop import _ext, bench
from mlx_fused_rmsprop.bench import report, runner

IMPLS = {"fused", "mlx", "mlx_compiled"}
MACHINE_KEYS = {"cpu", "logical_cores", "usable_cores", "mlx", "device",
                "mlx_fused_rmsprop", "kernel_threads", "kernel_isa", "os", "arch", "python"}
N_TARGETS = 12


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_fused_rmsprop", "bench", "--quick",
         "--out", str(out), "--name", "smoke"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with open(out / "smoke.json", encoding="utf-8") as f:
        data = json.load(f)
    return proc, data, out


def test_quick_run_writes_json_with_every_section(quick_run):
    _, data, _ = quick_run
    assert MACHINE_KEYS <= set(data["machine"])
    assert data["machine"]["mlx"]
    assert data["settings"]["mode"] == "quick"
    assert data["elapsed_s"] > 0

    leaves = data["leaves"]
    assert {(x["dtype"], x["elements"]) for x in leaves} == {
        (d, n) for d in ("float32", "float16", "bfloat16") for n in (4096, 16384)}
    for leaf in leaves:
        assert set(leaf["impls"]) == IMPLS
        for summ in leaf["impls"].values():
            assert summ["median_s"] > 0 and summ["gbps"] > 0
            assert len(summ["samples_s"]) == leaf["rounds"]
            assert summ["fraction_of_copy"] > 0 and summ["fraction_of_limit"] > 0
        assert leaf["copy"] and leaf["roofline_gbps"] > 0
        assert "limit_1t" in leaf["limit"] and leaf["limit_gbps"] > 0
        # The limit runs on the threads the kernel splits this leaf across.
        bound = "memory" if leaf["dtype"] == "float32" else "compute"
        assert leaf["bound"] == bound
        assert leaf["threads"] == _ext._split_parts(leaf["elements"], bound)
        assert leaf["bytes_per_step"] == 5 * leaf["leaf_bytes"]
        assert set(leaf["speedup"]) == IMPLS - {"fused"}

    many_impls = IMPLS | ({"torch_foreach"} if _has_torch() else set())
    assert [(c["leaves"], c["elements"]) for c in data["many"]] == [(20, 256)]
    for case in data["many"]:
        assert set(case["impls"]) == many_impls
        assert set(case["speedup"]) == many_impls - {"fused"}
        assert set(case["phases"]) == {"apply_gradients", "model_update", "eval"}
        assert all(t > 0 for t in case["phases"].values())
        assert case["ceiling_vs_compiled"] == pytest.approx(
            case["impls"]["mlx_compiled"]["median_s"]
            / (case["phases"]["model_update"] + case["phases"]["eval"]))

    assert [m["model"] for m in data["models"]] == ["transformer", "mlp"]
    for m in data["models"]:
        assert m["parameters"] > 0 and m["leaves"] > 0
        assert set(m["impls"]) == IMPLS | {"fused_compiled"}
        assert all(t > 0 for t in m["phases"].values())

    assert {m["dtype"] for m in data["memory"]} == {"float32", "float16", "bfloat16"}
    for m in data["memory"]:
        assert set(m["extra_peak_x_leaf"]) == IMPLS
        assert set(m["train_step_extra_peak_x_leaf"]) == IMPLS
        assert all(v >= 0 for v in m["extra_peak_x_leaf"].values())

    assert {(h["dtype"], h["elements"]) for h in data["heavy"]} == {
        ("float32", 4096), ("bfloat16", 4096)}
    for h in data["heavy"]:
        assert set(h["impls"]) == {"fused", "ops", "ops_compiled"}
        assert h["bytes_per_step"] == 9 * h["elements"] * (4 if h["dtype"] == "float32" else 2)
        assert set(h["speedup"]) == {"ops", "ops_compiled"}

    assert len(data["targets"]) == N_TARGETS
    for t in data["targets"]:
        assert {"target", "goal", "measured", "met"} <= set(t)


def test_quick_run_prints_markdown_tables_and_progress(quick_run):
    proc, data, out = quick_run
    md = proc.stdout
    assert "**Machine:**" in md and data["machine"]["cpu"] in md
    for heading in ("### Single leaf", "### Many small leaves", "### Where a fused step's time",
                    "### Whole models", "### The heaviest variant", "### Extra peak memory",
                    "### Targets"):
        assert heading in md
    table_rows = [line for line in md.splitlines()
                  if line.startswith("| float32 |") or line.startswith("| bfloat16 |")]
    assert len(table_rows) >= 4
    # Same header width in every row of the leaf table.
    header = next(line for line in md.splitlines() if line.startswith("| dtype | elements | fused"))
    assert all(r.count("|") == header.count("|") for r in table_rows[:4])
    assert (out / "smoke.md").read_text(encoding="utf-8").strip() == md.strip()
    assert "[bench]" in proc.stderr or "%" in proc.stderr  # progress reported


def test_quick_run_plot(quick_run):
    pytest.importorskip("matplotlib")
    _, data, out = quick_run
    png = out / "smoke.png"
    assert data["outputs"]["png"].endswith("smoke.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_is_exported_and_parses_its_own_arguments(capsys):
    assert callable(bench.main)
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    assert "--full" in capsys.readouterr().out


def test_settings_and_sizes():
    parser = runner.build_parser()
    s = runner._settings(parser.parse_args([]))
    assert s["sizes"][0] == 4096 and s["sizes"][-1] == 16 * 2**20
    full = runner._settings(parser.parse_args(["--full"]))
    assert full["sizes"][-1] == 64 * 2**20
    custom = runner._settings(parser.parse_args(["--sizes", "4K,1M", "--dtypes", "bfloat16",
                                                 "--no-compiled"]))
    assert custom["sizes"] == [4096, 2**20] and custom["dtypes"] == ["bfloat16"]
    assert "mlx_compiled" not in custom["leaf_impls"]
    assert runner.parse_size("16M") == 16 * 2**20
    assert report.fmt_elems(16 * 2**20) == "16M" and report.fmt_elems(4096) == "4K"


def test_targets_report_not_measured_without_the_cases():
    targets = report.targets({"leaves": [], "models": [], "memory": []})
    assert len(targets) == N_TARGETS
    assert all(t["measured"] is None and t["met"] is None for t in targets)


def test_the_heavy_cases_compare_the_same_algorithm():
    """The mlx-ops optimizer the bench times against computes what the fused
    heaviest variant computes (to float32 accuracy), so the speed-up compares
    like with like."""
    from mlx_fused_rmsprop.bench import cases

    grads = {"w": mx.random.normal((4099,), key=mx.random.key(3))}
    results = {}
    for impl in ("fused", "ops"):
        model = cases.Leaf(4099, mx.float32)
        opt = cases.make_heavy_optimizer(impl)
        for _ in range(5):
            opt.update(model, grads)
        mx.eval(model.parameters())
        results[impl] = np.array(model.w)
    assert set(cases.make_heavy_optimizer("fused").state_names) == {"v", "mean", "momentum_buffer"}
    np.testing.assert_allclose(results["fused"], results["ops"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_step_pattern_limit_reads_three_buffers_and_writes_two(threads):
    """Each pass reads grad, param and v and writes param ^= grad, v += grad
    over every word, whatever the split (pass k leaves param = 2 ^ (k odd ?
    g : 0), v = 3 + k * g, with g = 0x0101...01)."""
    words = 1000 * 8 + 5  # parts of whole cache lines and a ragged tail
    limit = _ext.StepPatternRoofline(words * 8)
    assert limit.bytes_moved == 5 * words * 8
    g = 0x0101010101010101
    mask = 2**64 - 1
    for k in range(1, 4):
        limit.run(threads)
        param, v = limit.sums()
        assert param == (words * (2 ^ (g if k % 2 else 0))) & mask
        assert v == (words * (3 + k * g)) & mask


def test_the_step_pattern_limit_rounds_a_ragged_size_up_to_whole_words():
    """Buffers of whole 64-bit words: a size that is not a multiple of 8
    bytes gets one more word (every byte asked for is moved), at least one."""
    assert _ext.StepPatternRoofline(8 * 1000 + 3).bytes_moved == 5 * 8 * 1001
    assert _ext.StepPatternRoofline(8 * 1000).bytes_moved == 5 * 8 * 1000
    assert _ext.StepPatternRoofline(1).bytes_moved == 5 * 8
    limit = _ext.StepPatternRoofline(8 * 10 + 1)
    limit.run(1)
    g = 0x0101010101010101
    assert limit.sums() == (11 * (2 ^ g), 11 * (3 + g))


def test_report_targets_read_the_cases_they_name():
    """A hand-made result: each issue-11 target reads its own case."""
    def leaf(dtype, fraction):
        return {"dtype": dtype, "elements": report.TARGET_N,
                "speedup": {"mlx": 10.0, "mlx_compiled": 5.0},
                "impls": {"fused": {"fraction_of_limit": fraction}}}

    results = {
        "leaves": [leaf("float32", 0.95), leaf("float16", 0.65), leaf("bfloat16", 0.75)],
        "many": [{"leaves": 500, "elements": 4096, "speedup": {"mlx_compiled": 2.6},
                  "phases": {"apply_gradients": 500 * 2e-6}},
                 {"leaves": 2000, "elements": 256, "speedup": {"mlx_compiled": 2.1},
                  "phases": {"apply_gradients": 2000 * 3.5e-6}}],
        "models": [{"model": "transformer", "description": "nn.Transformer(dims=256, ...)",
                    "speedup": {"mlx": 4.0, "mlx_compiled": 2.9}}],
        "memory": [],
    }
    got = {t["target"]: (t["measured"], t["met"]) for t in report.targets(results)}
    limit = "fraction of the step-pattern memory limit (same threads)"
    assert got[f"16M float32 leaf: {limit}"] == (0.95, True)
    assert got[f"16M float16 leaf: {limit}"] == (0.65, False)
    assert got[f"16M bfloat16 leaf: {limit}"] == (0.75, True)
    assert got["500 leaves × 4K: speed-up over mlx compiled"] == (2.6, True)
    assert got["2000 leaves × 256: speed-up over mlx compiled"] == (2.1, False)
    assert got["Transformer step: speed-up over mlx compiled"] == (2.9, True)
    us, met = got["Python time per leaf per step (apply_gradients, 2000 leaves × 256), µs"]
    assert us == pytest.approx(3.5) and met is False
