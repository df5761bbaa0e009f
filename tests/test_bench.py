"""Smoke tests of the benchmark suite (`python -m mlx_fused_rmsprop bench`):
it runs end to end at a tiny size and its outputs have the documented
structure. No timing assertions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_fused_rmsprop import _ext, bench
from mlx_fused_rmsprop.bench import cases, report, runner

IMPLS = {"fused", "mlx", "mlx_compiled"}
MACHINE_KEYS = {"cpu", "logical_cores", "usable_cores", "mlx", "device",
                "mlx_fused_rmsprop", "kernel_threads", "kernel_isa", "os", "arch", "python"}
N_TARGETS = 19
LEAN_SECTIONS = ("state_bits", "rounding", "guards", "state_memory")
ROOT = Path(__file__).resolve().parents[1]


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
    assert len(data["load_average"]["start"]) == len(data["load_average"]["end"]) == 3

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


def test_quick_run_times_the_memory_lean_options(quick_run):
    _, data, _ = quick_run
    n = runner.QUICK_LEAN_SIZE
    assert [(c["dtype"], c["elements"]) for c in data["state_bits"]] == [
        (d, n) for d in ("float32", "float16", "bfloat16")]
    for case in data["state_bits"]:
        itemsize = 4 if case["dtype"] == "float32" else 2
        f32, q8 = case["impls"]["fused_f32_state"], case["impls"]["fused_8bit"]
        # float32 state: grad, param, v read; param, v written. 8-bit: codes
        # instead of v, plus a float32 scale per 256 elements read and written.
        assert f32["bytes_per_step"] == n * (3 * itemsize + 2 * 4)
        assert q8["bytes_per_step"] == n * (3 * itemsize + 2) + 8 * (n // 256)
        for summ in (f32, q8):
            assert len(summ["samples_s"]) == case["rounds"]
            assert summ["fraction_of_limit"] == pytest.approx(
                summ["limit_median_s"] / summ["median_s"])
        assert q8["threads"] == _ext._split_parts(n, "compute")
        assert case["time_vs_f32_state"] == pytest.approx(q8["median_s"] / f32["median_s"])

    assert [(c["dtype"], c["elements"]) for c in data["rounding"]] == [
        ("float16", n), ("bfloat16", n)]
    for case in data["rounding"]:
        assert set(case["impls"]) == {"fused", "fused_sr", "fused_kahan"}
        assert case["impls"]["fused_kahan"]["bytes_per_step"] == 7 * 2 * n
        assert case["time_vs_nearest"]["fused_kahan"] == pytest.approx(
            case["impls"]["fused_kahan"]["median_s"] / case["impls"]["fused"]["median_s"])

    guards = {g["subject"]: g for g in data["guards"]}
    assert set(guards) == {"leaf", "transformer"}
    impls = {"fused_clip", "clip_fused", "clip_mlx", "clip_mlx_compiled", "fused"}
    for case in guards.values():
        assert set(case["impls"]) == impls
        assert set(case["speedup"]) == impls - {"fused_clip"}
        assert case["grad_norm"] > case["max_grad_norm"]  # clipping is active
    assert guards["leaf"]["elements"] == n
    assert set(guards["leaf"]["extra_peak_x_leaf"]) == impls
    # clip_grad_norm writes a scaled copy of the gradients (1x); ours does not.
    assert guards["leaf"]["extra_peak_x_leaf"]["clip_fused"] >= 1.0

    memory = data["state_memory"]
    assert [x["subject"] for x in memory["subjects"]] == ["leaf", "transformer", "llama2_7b"]
    assert memory["subjects"][2]["parameters"] == 6_738_415_616
    assert [row["mode"] for row in memory["modes"]] == list(cases.MEMORY_MODES)
    for row in memory["modes"]:
        # What the bench computes is what the optimizer holds.
        assert row["state_bytes"] == row["computed_state_bytes"], row["mode"]
    assert memory["quantized_leaves"] >= 2
    assert 0.25 < memory["quantized_state_vs_float32"] < 0.26


def test_quick_run_prints_markdown_tables_and_progress(quick_run):
    proc, data, out = quick_run
    md = proc.stdout
    assert "**Machine:**" in md and data["machine"]["cpu"] in md
    assert f"load average (1 min) {data['load_average']['start'][0]:.2f} at the start" in md
    for heading in ("### Single leaf", "### Many small leaves", "### Where a fused step's time",
                    "### Whole models", "### The heaviest variant", "### Extra peak memory",
                    "### 8-bit state", "### Stochastic rounding and Kahan",
                    "### Gradient clipping", "### Optimizer state: bytes per parameter",
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


def test_settings_of_the_memory_lean_cases():
    parser = runner.build_parser()
    s = runner._settings(parser.parse_args([]))
    assert s["state_bits"] == [(16 * 2**20, d) for d in ("float32", "float16", "bfloat16")]
    assert s["rounding"] == [(16 * 2**20, "float16"), (16 * 2**20, "bfloat16")]
    assert s["guards"] == [("leaf", 16 * 2**20), ("transformer", 0)]
    assert s["state_memory_n"] == 16 * 2**20
    off = runner._settings(parser.parse_args(
        ["--no-8bit", "--no-rounding", "--no-guards", "--no-memory", "--no-compiled"]))
    assert off["state_bits"] == off["rounding"] == off["guards"] == []
    assert off["state_memory_n"] is None
    assert "clip_mlx_compiled" not in off["guards_impls"]
    only_bf16 = runner._settings(parser.parse_args(["--dtypes", "bfloat16", "--no-models"]))
    assert only_bf16["rounding"] == [(16 * 2**20, "bfloat16")]
    assert only_bf16["guards"] == [("leaf", 16 * 2**20)]


def test_the_stated_duration_is_the_committed_default_runs():
    """`bench --help` states how long a default run takes (docs/benchmarks.md
    says the same: test_packaging.py); the committed default run took about that,
    and is a run of this bench (every section, every target)."""
    help_text = " ".join(runner.build_parser().format_help().split())
    ((low, high),) = re.findall(r"The default run takes about (\d+)-(\d+) minutes", help_text)
    with open(ROOT / "bench" / "results" / "bench-default.json", encoding="utf-8") as f:
        committed = json.load(f)
    assert committed["settings"]["mode"] == "default"
    # On 2 shared cores a run's length moves with the other tenants' load.
    assert int(low) - 0.5 <= committed["elapsed_s"] / 60 <= int(high) + 0.5
    assert all(committed[section] for section in LEAN_SECTIONS)
    assert len(committed["targets"]) == N_TARGETS


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


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("param_bytes, state_bytes, scales", [
    (4, 1, True), (2, 1, True), (2, 4, False), (4, 4, False)])
def test_the_step_pattern_limit_of_other_widths_moves_each_stream_once(
        threads, param_bytes, state_bytes, scales):
    """The pattern of a leaf with state of another width (float32 beside
    16-bit, 8-bit codes with a scale per 256 elements): each pass reads grad,
    param, state and scales and writes all but grad, over every word and
    scale whatever the split, with a partial last block."""
    elements = 256 * 70 + 8 * 5 + 3  # ragged: rounded up to 8 elements
    units = -(-elements // 8)
    blocks = -(-units // 32) if scales else 0
    limit = _ext.StepPatternRoofline(elements, param_bytes, state_bytes, scales)
    assert limit.bytes_per_array == units * 8 * param_bytes
    assert limit.bytes_moved == units * 8 * (3 * param_bytes + 2 * state_bytes) + 8 * blocks
    g = 0x0101010101010101
    mask = 2**64 - 1
    for k in range(1, 4):
        limit.run(threads)
        param, state = limit.sums()
        assert param == (units * param_bytes * (2 ^ (g if k % 2 else 0))) & mask
        assert state == (units * state_bytes * (3 + k * g)) & mask
        assert limit.scale_sum() == blocks * (5 + k)


def test_the_step_pattern_limit_rejects_impossible_widths():
    for args in ((-1, 4, 1, True), (16, 0, 1, False), (16, 4, 9, False)):
        with pytest.raises(ValueError, match="StepPatternRoofline"):
            _ext.StepPatternRoofline(*args)


def test_the_8bit_limit_runs_on_the_threads_of_the_8bit_kernel():
    """The 8-bit step is compute-bound (the kernel's own answer), so its
    limit splits like a compute-bound leaf even for float32."""
    model = cases.Leaf(300_000, mx.float32)
    grad = mx.zeros_like(model.w)
    opt = cases.make_optimizer("fused_8bit")
    opt.init(model.trainable_parameters())
    state = opt.state["w"]
    limit = cases.StepPatternLimit(model.w, grad, state["v"], block_scales=True)
    assert limit.bound == "compute"
    assert limit.threads == _ext._split_parts(300_000, "compute")
    assert cases.StepPatternLimit(model.w, grad).bound == "memory"


def test_each_lean_implementation_runs_the_option_it_names():
    """The bench times what its tables say: each implementation's optimizer
    keeps the state of its option."""
    model = cases.Leaf(8192, mx.bfloat16)
    entries = {}
    for impl in ("fused", "fused_f32_state", "fused_8bit", "fused_sr", "fused_kahan",
                 "fused_clip"):
        opt = cases.make_optimizer(impl)
        opt.init(model.trainable_parameters())
        entries[impl] = ({k: v.dtype for k, v in opt.state["w"].items()},
                         set(opt.state) - {"w"})
    assert entries["fused"] == ({"v": mx.bfloat16}, {"step", "learning_rate"})
    assert entries["fused_f32_state"][0] == {"v": mx.float32}
    assert entries["fused_8bit"][0] == {"v": mx.uint8, "v_scale": mx.float32}
    assert entries["fused_sr"][1] == {"step", "learning_rate", "seed"}
    assert entries["fused_kahan"][0] == {"v": mx.bfloat16, "compensation": mx.bfloat16}
    assert entries["fused_clip"][1] == {"step", "learning_rate", "grad_norm", "skipped_steps"}
    assert not isinstance(cases.make_optimizer("clip_mlx"), type(cases.make_optimizer("fused")))


def test_the_clipping_cases_compare_the_same_computation():
    """Fused clipping and clip_grad_norm followed by our update or mlx's give
    the same bits on float32 (the contract), so the speed-ups compare like
    with like; clipping is active (the gradient's norm is about 0.64)."""
    grads = {"w": mx.random.normal((4099,), key=mx.random.key(3)) * 1e-2}
    results = {}
    for impl in ("fused_clip", "clip_fused", "clip_mlx", "clip_mlx_compiled"):
        model = cases.Leaf(4099, mx.float32)
        step, _ = cases.optimizer_step(model, impl, grads)
        for _ in range(3):
            step()
        results[impl] = np.array(model.w)
    for impl in ("clip_fused", "clip_mlx", "clip_mlx_compiled"):
        np.testing.assert_array_equal(results[impl], results["fused_clip"], err_msg=impl)


def test_the_computed_state_bytes_follow_the_documented_layout():
    """Hand-counted: an 8-bit float32 leaf of 4396 elements holds 4396 codes
    and 18 float32 scales (the last block partial); one element under
    min_8bit_size keeps float32 (beside bfloat16 too); Kahan adds a bfloat16
    compensation."""
    eight = {"state_bits": 8}
    assert cases.computed_state_bytes([(4396,)], mx.float32, eight) == 4396 + 4 * 18
    assert cases.computed_state_bytes([(4095,)], mx.bfloat16, eight) == 4 * 4095
    assert cases.computed_state_bytes([(64, 64)], mx.bfloat16, eight) == 4096 + 4 * 16
    assert cases.computed_state_bytes([(100,)], mx.bfloat16, {}) == 200
    assert cases.computed_state_bytes(
        [(100,)], mx.bfloat16, {"kahan_summation": True, "state_dtype": mx.float32}) == 600
    assert cases.computed_state_bytes([(100,)], mx.float32, {"kahan_summation": True}) == 400
    assert sum(np.prod(s) for s in cases.llama2_7b_shapes()) == 6_738_415_616


@pytest.mark.parametrize("mode", list(cases.MEMORY_MODES))
def test_the_computed_state_bytes_are_what_the_optimizer_holds(mode):
    """Per leaf, for leaves on both sides of min_8bit_size and a partial last
    block: the layout the 7B row is computed from is the optimizer's."""
    _, weights, options = cases.MEMORY_MODES[mode]
    shapes = [(4095,), (4096,), (4396,), (3, 700), (7,)]

    class Leaves(cases.nn.Module):
        def __init__(self):
            super().__init__()
            self.ws = [mx.zeros(shape, cases.DTYPES[weights]) for shape in shapes]

    measured = cases.measured_state_bytes(Leaves(), options)
    assert [measured[f"ws.{i}"][0] for i in range(len(shapes))] == [
        cases.computed_state_bytes([shape], cases.DTYPES[weights], options) for shape in shapes]
    eight_bit = options.get("state_bits") == 8
    assert [measured[f"ws.{i}"][1] for i in range(len(shapes))] == [
        eight_bit and np.prod(shape) >= 4096 for shape in shapes]


def test_report_targets_of_the_memory_lean_options_read_their_cases():
    n = report.TARGET_N

    def lean(dtype, **values):
        return {"dtype": dtype, "elements": n, **values}

    results = {
        "leaves": [], "models": [], "memory": [],
        "state_bits": [
            lean("float16", time_vs_f32_state=0.5, impls={"fused_8bit": {"fraction_of_limit": 0.9}}),
            lean("float32", time_vs_f32_state=1.05,
                 impls={"fused_8bit": {"fraction_of_limit": 0.65}})],
        "rounding": [lean("float16", time_vs_nearest={"fused_sr": 1.0, "fused_kahan": 1.0}),
                     lean("bfloat16", time_vs_nearest={"fused_sr": 1.3, "fused_kahan": 1.35})],
        "guards": [{"subject": "transformer", "elements": n, "speedup": {"clip_fused": 9.0}},
                   {"subject": "leaf", "elements": n, "speedup": {"clip_fused": 1.25},
                    "extra_peak_x_leaf": {"fused_clip": 0.5, "clip_fused": 0.0}}],
        "state_memory": {"quantized_state_vs_float32": 0.2539},
    }
    got = {t["target"]: (t["measured"], t["met"]) for t in report.targets(results)}
    assert got["16M float32 leaf, 8-bit state: time over the float32-state step"] == (1.05, True)
    assert got["16M float32 leaf, 8-bit state: fraction of its own step-pattern limit"] == (
        0.65, False)
    assert got["8-bit state over float32 state, bytes (worst quantized leaf)"] == (0.2539, True)
    assert got["16M bfloat16 leaf: stochastic rounding time over round-to-nearest"] == (
        1.3, False)
    assert got["16M bfloat16 leaf: Kahan summation time over round-to-nearest"] == (1.35, True)
    assert got["16M float32 leaf: fused clip + update, speed-up over clip_grad_norm + our "
               "update"] == (1.25, True)
    assert got["16M float32 leaf: extra peak memory of a clipped step (max_grad_norm), "
               "× leaf bytes"] == (0.5, False)
