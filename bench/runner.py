"""`python -m mlx_fused_rmsprop bench`: runs every case and writes the table
(stdout), a JSON file and a PNG plot."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from . import cases, machine, report
from .timing import Progress, interleaved, summarize

DEFAULT_SIZES = [4096 * 4**i for i in range(7)]  # 4K ... 16M
FULL_SIZES = DEFAULT_SIZES + [64 * 2**20]  # ... 64M
QUICK_SIZES = [4096, 16384]
HEAVY_SIZES = [2**20, 16 * 2**20]  # the heaviest variant, float32 and bfloat16
MANY_LEAVES = [(500, 4096), (2000, 256)]  # (leaves, elements per leaf), float32
QUICK_MANY_LEAVES = [(20, 256)]
LEAN_SIZE = 16 * 2**20  # the memory-lean options' leaf (their targets' size)
QUICK_LEAN_SIZE = 16384  # still 8-bit (>= min_8bit_size), 64 blocks


def parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = 1
    if t.endswith("K"):
        mult, t = 2**10, t[:-1]
    elif t.endswith("M"):
        mult, t = 2**20, t[:-1]
    value = int(float(t) * mult)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text}")
    return value


def build_parser(prog: str = "python -m mlx_fused_rmsprop bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Benchmark the fused RMSprop against mlx.optimizers.RMSprop (eager and "
            "mx.compile'd), the memory limit of the step's access pattern and a plain "
            "memory copy, on the default device; on many small leaves also against "
            "torch.optim.RMSprop(foreach=True) when torch is installed; the "
            "memory-lean options (8-bit state, stochastic rounding, Kahan summation, "
            "fused gradient clipping) against the steps they replace, and the "
            "state's bytes per parameter in every mode. Prints "
            "markdown tables; writes JSON and a PNG plot (needs matplotlib: "
            "pip install 'mlx-fused-rmsprop[bench]'). The default run takes about "
            "2-3 minutes on 2 cores."
        ),
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true",
                      help="leaves up to 64M elements and more repeats")
    mode.add_argument("--quick", action="store_true",
                      help="tiny sizes and models, 3 repeats: a smoke test (seconds)")
    p.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",")],
                   help="comma-separated leaf sizes in elements, e.g. 4K,1M,16M")
    p.add_argument("--dtypes", type=lambda s: s.split(","),
                   help="comma-separated subset of float32,float16,bfloat16")
    p.add_argument("--repeats", type=int,
                   help="interleaved rounds per measurement (median taken)")
    p.add_argument("--min-batch-ms", type=float, default=None,
                   help="shortest timed batch; fast steps are repeated to reach it")
    p.add_argument("--no-compiled", action="store_true",
                   help="skip the mx.compile'd variants")
    p.add_argument("--no-models", action="store_true", help="skip the whole-model cases")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory cases and the state-bytes table")
    p.add_argument("--no-variants", action="store_true",
                   help="skip the heaviest variant (centered + momentum + weight decay)")
    p.add_argument("--no-many", action="store_true",
                   help="skip the many-small-leaves cases (500 x 4K, 2000 x 256)")
    p.add_argument("--no-8bit", action="store_true",
                   help="skip the 8-bit state against float32 state (16M leaves)")
    p.add_argument("--no-rounding", action="store_true",
                   help="skip stochastic rounding and Kahan against nearest (16M 16-bit leaves)")
    p.add_argument("--no-guards", action="store_true",
                   help="skip the fused clipping against clip_grad_norm + update")
    p.add_argument("--out", default="bench-results",
                   help="directory for the JSON and PNG (default: ./bench-results)")
    p.add_argument("--name", default=None,
                   help="file name stem (default: bench-<quick|default|full>)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    mode = "quick" if args.quick else "full" if args.full else "default"
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES if args.full
                           else DEFAULT_SIZES)
    dtypes = args.dtypes or list(cases.DTYPES)
    for d in dtypes:
        if d not in cases.DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(cases.DTYPES)}")
    repeats = args.repeats or (3 if args.quick else 11 if args.full else 7)
    min_batch_s = (args.min_batch_ms if args.min_batch_ms is not None
                   else 1.0 if args.quick else 5.0) / 1e3
    impls = ["fused", "mlx"] + ([] if args.no_compiled else ["mlx_compiled"])
    lean_n = QUICK_LEAN_SIZE if args.quick else LEAN_SIZE
    model_impls = ["fused", "mlx"] + (
        [] if args.no_compiled else ["fused_compiled", "mlx_compiled"])
    return {
        "mode": mode,
        "sizes": sorted(set(sizes)),
        "dtypes": dtypes,
        "repeats": repeats,
        "min_batch_s": min_batch_s,
        "leaf_impls": impls,
        "model_impls": model_impls,
        "models": [] if args.no_models else ["transformer", "mlp"],
        "memory": not args.no_memory,
        "heavy": [] if args.no_variants else [
            (n, d) for d in ("float32", "bfloat16") if d in dtypes
            for n in (QUICK_SIZES[:1] if args.quick else HEAVY_SIZES)
        ],
        "heavy_impls": ["fused", "ops"] + ([] if args.no_compiled else ["ops_compiled"]),
        "many": [] if args.no_many else (QUICK_MANY_LEAVES if args.quick else MANY_LEAVES),
        "many_impls": impls + (["torch_foreach"] if cases.torch_available() else []),
        "state_bits": [] if args.no_8bit else [(lean_n, d) for d in dtypes],
        "state_bits_impls": ["fused_f32_state", "fused_8bit"],
        "rounding": [] if args.no_rounding else [
            (lean_n, d) for d in dtypes if d in ("bfloat16", "float16")],
        "rounding_impls": ["fused", "fused_sr", "fused_kahan"],
        "guards": [] if args.no_guards else [("leaf", lean_n)] + (
            [] if args.no_models else [("transformer", 0)]),
        "guards_impls": ["fused_clip", "clip_fused", "clip_mlx"]
        + ([] if args.no_compiled else ["clip_mlx_compiled"]) + ["fused"],
        "state_memory_n": None if args.no_memory else lean_n,
        "quick": bool(args.quick),
    }


def _rounds_for(n: int, settings: dict) -> int:
    """Fewer rounds for the largest leaves (each eager step there is long)."""
    r = settings["repeats"]
    if settings["mode"] == "default" and n >= 16 * 2**20:
        return max(5, r - 2)
    return r


def _free() -> None:
    gc.collect()
    mx.synchronize()
    mx.clear_cache()


def _leaf_grads(n: int, dtype: mx.Dtype) -> dict:
    """The gradient of a one-leaf model: N(0, 1e-4) elements, evaluated."""
    grads = {"w": mx.random.normal((n,), key=mx.random.key(7)).astype(dtype) * 1e-2}
    mx.eval(grads)
    return grads


def run_leaf(n: int, dtype_name: str, settings: dict, progress: Progress) -> dict:
    dtype = cases.DTYPES[dtype_name]
    itemsize = dtype.size
    nbytes = cases.rmsprop_bytes(n, itemsize)
    label = f"leaf {dtype_name} {report.fmt_elems(n)}"
    grads = _leaf_grads(n, dtype)
    steps, keep = {}, []
    for impl in settings["leaf_impls"]:
        model = cases.Leaf(n, dtype)
        step, opt = cases.optimizer_step(model, impl, grads)
        steps[impl] = step
        keep.append((model, opt))
    limit = cases.StepPatternLimit(keep[0][0].w, grads["w"])
    steps["limit_1t"] = limit.run_1t
    if limit.threads > 1:
        steps["limit_same_threads"] = limit.run_same_threads
    copier = cases.Copier(nbytes // 2, limit.threads)
    steps["copy_1t"] = copier.copy_1t
    if copier.threads > 1:
        steps[f"copy_{copier.threads}t"] = copier.copy_nt

    rounds = _rounds_for(n, settings)
    samples = _interleaved_with_progress(steps, rounds, settings, progress, label)
    result: dict[str, Any] = {
        "dtype": dtype_name,
        "elements": n,
        "leaf_bytes": n * itemsize,
        "bytes_per_step": nbytes,
        "rounds": rounds,
        "impls": {},
        "copy": {},
        "limit": {},
        "threads": limit.threads,
        "bound": limit.bound,
    }
    for name, s in samples.items():
        summ = summarize(s)
        summ["gbps"] = nbytes / summ["median_s"] / 1e9
        group = ("copy" if name.startswith("copy") else "limit" if name.startswith("limit")
                 else "impls")
        result[group][name] = summ
    best_copy = min(result["copy"].values(), key=lambda c: c["median_s"])
    result["roofline_gbps"] = best_copy["gbps"]
    result["copy_median_s"] = best_copy["median_s"]
    same = result["limit"].get("limit_same_threads", result["limit"]["limit_1t"])
    result["limit_gbps"] = same["gbps"]
    result["limit_median_s"] = same["median_s"]
    for impl, summ in result["impls"].items():
        summ["fraction_of_copy"] = summ["gbps"] / result["roofline_gbps"]
        summ["fraction_of_limit"] = summ["gbps"] / result["limit_gbps"]
    result["speedup"] = _speedups(result["impls"])
    del steps, keep, grads, copier, limit
    _free()
    return result


def _interleaved_with_progress(steps, rounds, settings, progress, label):
    """interleaved() timing of `steps`, advancing the progress bar per round."""
    progress.set_label(f"{label}: warm-up")
    return interleaved(
        steps,
        rounds,
        settings["min_batch_s"],
        on_round=lambda name, r: progress.advance(1, f"{label}: {name} round {r + 1}/{rounds}"),
    )


def run_model(name: str, settings: dict, progress: Progress) -> dict:
    quick = settings["quick"]
    label = f"model {name}"
    grads_model = cases.build_model(name, quick)
    grads = cases.real_grads(name, grads_model, quick)
    params, leaves = cases.count_params(grads_model)
    del grads_model
    steps, keep = {}, []
    for impl in settings["model_impls"]:
        model = cases.build_model(name, quick)
        step, opt = cases.optimizer_step(model, impl, grads)
        steps[impl] = step
        keep.append((model, opt))
    rounds = settings["repeats"]
    samples = _interleaved_with_progress(steps, rounds, settings, progress, label)
    result: dict[str, Any] = {
        "model": name,
        "description": cases.model_description(name, quick),
        "parameters": params,
        "leaves": leaves,
        "rounds": rounds,
        "impls": {impl: summarize(s) for impl, s in samples.items()},
    }
    result["speedup"] = _speedups(result["impls"])
    result["phases"] = cases.step_phases(cases.build_model(name, quick), grads, rounds)
    del steps, keep, grads
    _free()
    return result


def _speedups(impls: dict) -> dict:
    """Each other implementation's median time over the fused one's."""
    fused = impls["fused"]["median_s"]
    return {impl: summ["median_s"] / fused for impl, summ in impls.items() if impl != "fused"}


def run_many(count: int, n: int, settings: dict, progress: Progress) -> dict:
    """`count` float32 leaves of n elements: the per-leaf cost of a step."""
    label = f"{count} leaves × {report.fmt_elems(n)}"
    grads = cases.many_grads(count, n)
    steps, keep = {}, []
    for impl in settings["many_impls"]:
        if impl == "torch_foreach":
            steps[impl] = cases.torch_foreach_step(count, n)
            continue
        model = cases.ManyLeaves(count, n)
        step, opt = cases.optimizer_step(model, impl, grads)
        steps[impl] = step
        keep.append((model, opt))
    rounds = settings["repeats"]
    samples = _interleaved_with_progress(steps, rounds, settings, progress, label)
    result: dict[str, Any] = {
        "leaves": count,
        "elements": n,
        "rounds": rounds,
        "impls": {impl: summarize(s) for impl, s in samples.items()},
    }
    result["speedup"] = _speedups(result["impls"])
    result["phases"] = phases = cases.step_phases(cases.ManyLeaves(count, n), grads, rounds)
    # What the speed-up could be if this package's own per-leaf time
    # (apply_gradients) were zero: mlx's model.update and eval remain.
    if "mlx_compiled" in result["impls"]:
        result["ceiling_vs_compiled"] = result["impls"]["mlx_compiled"]["median_s"] / (
            phases["model_update"] + phases["eval"])
    del steps, keep, grads
    _free()
    return result


def run_heavy(n: int, dtype_name: str, settings: dict, progress: Progress) -> dict:
    """The heaviest variant on one leaf: fused against the same algorithm in
    mlx ops, eager and compiled."""
    dtype = cases.DTYPES[dtype_name]
    label = f"heavy variant {dtype_name} {report.fmt_elems(n)}"
    grads = _leaf_grads(n, dtype)
    steps, keep = {}, []
    for impl in settings["heavy_impls"]:
        model = cases.Leaf(n, dtype)
        step, opt = cases.heavy_step(model, impl, grads)
        steps[impl] = step
        keep.append((model, opt))
    rounds = _rounds_for(n, settings)
    samples = _interleaved_with_progress(steps, rounds, settings, progress, label)
    nbytes = cases.heavy_bytes(n, dtype.size)
    result: dict[str, Any] = {
        "dtype": dtype_name,
        "elements": n,
        "bytes_per_step": nbytes,
        "rounds": rounds,
        "impls": {impl: summarize(s) for impl, s in samples.items()},
    }
    for summ in result["impls"].values():
        summ["gbps"] = nbytes / summ["median_s"] / 1e9
    result["speedup"] = _speedups(result["impls"])
    del steps, keep, grads
    _free()
    return result


def run_memory(n: int, dtype_name: str, settings: dict, progress: Progress) -> dict:
    dtype = cases.DTYPES[dtype_name]
    out = {"dtype": dtype_name, "elements": n, "leaf_bytes": n * dtype.size,
           "extra_peak_x_leaf": {}, "train_step_extra_peak_x_leaf": {}}
    for impl in settings["leaf_impls"]:
        progress.set_label(f"peak memory {dtype_name} {report.fmt_elems(n)}: {impl}")
        out["extra_peak_x_leaf"][impl] = cases.step_extra_peak(n, dtype, impl)
        out["train_step_extra_peak_x_leaf"][impl] = cases.step_extra_peak(
            n, dtype, impl, one_eval=True)
        progress.advance(1)
        _free()
    return out


def run_state_bits(n: int, dtype_name: str, settings: dict, progress: Progress) -> dict:
    """8-bit state against the float32-state fused step on one leaf, each
    also against the memory limit of its own access pattern (8-bit: reads
    grad, param, codes and scales; writes param, codes and scales)."""
    dtype = cases.DTYPES[dtype_name]
    label = f"8-bit state {dtype_name} {report.fmt_elems(n)}"
    grads = _leaf_grads(n, dtype)
    steps, keep, limits = {}, [], {}
    for impl in settings["state_bits_impls"]:
        model = cases.Leaf(n, dtype)
        step, opt = cases.optimizer_step(model, impl, grads)
        steps[impl] = step
        keep.append((model, opt))
        state = opt.state["w"]
        limits[impl] = cases.StepPatternLimit(
            model.w, grads["w"], state["v"], block_scales="v_scale" in state)
        steps[f"limit_{impl}"] = limits[impl].run_same_threads
    rounds = _rounds_for(n, settings)
    samples = _interleaved_with_progress(steps, rounds, settings, progress, label)
    result: dict[str, Any] = {"dtype": dtype_name, "elements": n, "rounds": rounds, "impls": {}}
    for impl, limit in limits.items():
        summ = summarize(samples[impl])
        limit_s = summarize(samples[f"limit_{impl}"])["median_s"]
        summ.update({
            "bytes_per_step": limit.bytes_moved,
            "bytes_per_element": limit.bytes_moved / n,
            "gbps": limit.bytes_moved / summ["median_s"] / 1e9,
            "threads": limit.threads,
            "limit_median_s": limit_s,
            "limit_gbps": limit.bytes_moved / limit_s / 1e9,
            "fraction_of_limit": limit_s / summ["median_s"],
        })
        result["impls"][impl] = summ
    result["time_vs_f32_state"] = (result["impls"]["fused_8bit"]["median_s"]
                                   / result["impls"]["fused_f32_state"]["median_s"])
    del steps, keep, grads, limits
    _free()
    return result


def run_rounding(n: int, dtype_name: str, settings: dict, progress: Progress) -> dict:
    """Stochastic rounding and Kahan summation against round-to-nearest (the
    plain fused step) on one 16-bit leaf; state in the leaf's dtype."""
    dtype = cases.DTYPES[dtype_name]
    label = f"rounding {dtype_name} {report.fmt_elems(n)}"
    grads = _leaf_grads(n, dtype)
    steps, keep = {}, []
    for impl in settings["rounding_impls"]:
        model = cases.Leaf(n, dtype)
        steps[impl], opt = cases.optimizer_step(model, impl, grads)
        keep.append((model, opt))
    rounds = _rounds_for(n, settings)
    samples = _interleaved_with_progress(steps, rounds, settings, progress, label)
    result: dict[str, Any] = {"dtype": dtype_name, "elements": n, "rounds": rounds,
                              "impls": {impl: summarize(s) for impl, s in samples.items()}}
    for impl, summ in result["impls"].items():
        # Kahan also reads and writes the compensation (the leaf's dtype).
        summ["bytes_per_step"] = (7 if impl == "fused_kahan" else 5) * n * dtype.size
        summ["gbps"] = summ["bytes_per_step"] / summ["median_s"] / 1e9
    nearest = result["impls"]["fused"]["median_s"]
    result["time_vs_nearest"] = {impl: summ["median_s"] / nearest
                                 for impl, summ in result["impls"].items() if impl != "fused"}
    del steps, keep, grads
    _free()
    return result


def run_guards(subject: str, n: int, settings: dict, progress: Progress) -> dict:
    """Clipping the global gradient norm: the fused step with max_grad_norm
    against mlx.optimizers.clip_grad_norm followed by our update or mlx's
    (eager, compiled), and the plain fused step without clipping; on one
    float32 leaf of n elements (plus the extra peak memory of each step) or
    on the Transformer with real gradients."""
    quick = settings["quick"]
    if subject == "leaf":
        label = f"clipping float32 {report.fmt_elems(n)}"
        grads = _leaf_grads(n, mx.float32)

        def build() -> nn.Module:
            return cases.Leaf(n, mx.float32)

        description = f"float32 leaf, {report.fmt_elems(n)} elements"
    else:
        label = f"clipping {subject}"
        grads = cases.real_grads(subject, cases.build_model(subject, quick), quick)

        def build() -> nn.Module:
            return cases.build_model(subject, quick)

        description = cases.model_description(subject, quick)
    steps, keep = {}, []
    for impl in settings["guards_impls"]:
        model = build()
        steps[impl], opt = cases.optimizer_step(model, impl, grads)
        keep.append((model, opt))
    rounds = _rounds_for(n, settings)
    samples = _interleaved_with_progress(steps, rounds, settings, progress, label)
    _, norm = optim.clip_grad_norm(grads, cases.MAX_GRAD_NORM)
    result: dict[str, Any] = {
        "subject": subject,
        "description": description,
        "elements": n if subject == "leaf" else cases.count_params(keep[0][0])[0],
        "max_grad_norm": cases.MAX_GRAD_NORM,
        "grad_norm": norm.item(),
        "rounds": rounds,
        "impls": {impl: summarize(s) for impl, s in samples.items()},
    }
    fused = result["impls"]["fused_clip"]["median_s"]
    result["speedup"] = {impl: summ["median_s"] / fused
                         for impl, summ in result["impls"].items() if impl != "fused_clip"}
    del steps, keep, grads
    _free()
    if subject == "leaf":
        result["extra_peak_x_leaf"] = {}
        for impl in settings["guards_impls"]:
            progress.set_label(f"peak memory, clipping float32 {report.fmt_elems(n)}: {impl}")
            result["extra_peak_x_leaf"][impl] = cases.step_extra_peak(n, mx.float32, impl)
            progress.advance(1)
            _free()
    return result


def run_state_memory(n: int, settings: dict, progress: Progress) -> dict:
    """The state's bytes in every mode of cases.MEMORY_MODES: measured on one
    leaf of n elements and on the Transformer (the optimizer's arrays after a
    step), computed from the documented layout for Llama-2-7B's shapes."""
    quick = settings["quick"]

    def transformer(dtype: mx.Dtype) -> nn.Module:
        model = cases.build_model("transformer", quick)
        model.set_dtype(dtype)
        return model

    measured = {"leaf": lambda dtype: cases.Leaf(n, dtype), "transformer": transformer}
    shapes = {"leaf": [(n,)], "transformer": cases.parameter_shapes(transformer(mx.float32)),
              "llama2_7b": cases.llama2_7b_shapes()}
    subjects = [
        {"subject": "leaf", "description": f"one {report.fmt_elems(n)} leaf", "measured": True},
        {"subject": "transformer", "description": cases.model_description("transformer", quick),
         "measured": True},
        {"subject": "llama2_7b", "description": "Llama-2-7B's shapes", "measured": False},
    ]
    for sub in subjects:
        sub["parameters"] = sum(math.prod(shape) for shape in shapes[sub["subject"]])
        sub["leaves"] = len(shapes[sub["subject"]])
    modes, per_leaf = [], {}
    for mode, (text, weights_name, options) in cases.MEMORY_MODES.items():
        weights = cases.DTYPES[weights_name]
        row: dict[str, Any] = {"mode": mode, "label": text, "weights": weights_name,
                               "weights_bytes": weights.size,
                               "state_bytes": {}, "computed_state_bytes": {}}
        for sub in subjects:
            name = sub["subject"]
            row["computed_state_bytes"][name] = cases.computed_state_bytes(
                shapes[name], weights, options)
            if sub["measured"]:
                progress.set_label(f"state bytes: {name}, {text}")
                per_leaf[mode, name] = cases.measured_state_bytes(measured[name](weights), options)
                row["state_bytes"][name] = sum(b for b, _ in per_leaf[mode, name].values())
                progress.advance(1)
                _free()
            else:
                row["state_bytes"][name] = row["computed_state_bytes"][name]
        modes.append(row)
    # Every quantized leaf's 8-bit state over the float32 state it replaces.
    ratios = [per_leaf[eight, name][leaf][0] / per_leaf[full, name][leaf][0]
              for eight, full in (("f32_8bit", "f32"), ("bf16_8bit", "bf16_f32_state"))
              for name in measured
              for leaf, (_, quantized) in per_leaf[eight, name].items() if quantized]
    return {"subjects": subjects, "modes": modes,
            "quantized_leaves": len(ratios),
            "quantized_state_vs_float32": max(ratios) if ratios else None}


def run(settings: dict) -> dict:
    leaf_cases = [(n, d) for d in settings["dtypes"] for n in settings["sizes"]]
    memory_n = max(settings["sizes"])
    memory_cases = [(memory_n, d) for d in settings["dtypes"]] if settings["memory"] else []
    n_leaf_steps = len(settings["leaf_impls"]) + 4
    total = sum(_rounds_for(n, settings) * n_leaf_steps for n, _ in leaf_cases)
    total += len(settings["models"]) * settings["repeats"] * len(settings["model_impls"])
    total += len(memory_cases) * len(settings["leaf_impls"])
    total += sum(_rounds_for(n, settings) * len(settings["heavy_impls"])
                 for n, _ in settings["heavy"])
    total += len(settings["many"]) * settings["repeats"] * len(settings["many_impls"])
    total += sum(_rounds_for(n, settings) * 2 * len(settings["state_bits_impls"])
                 for n, _ in settings["state_bits"])
    total += sum(_rounds_for(n, settings) * len(settings["rounding_impls"])
                 for n, _ in settings["rounding"])
    total += sum(_rounds_for(n, settings) * len(settings["guards_impls"])
                 + (len(settings["guards_impls"]) if subject == "leaf" else 0)
                 for subject, n in settings["guards"])
    if settings["state_memory_n"]:
        total += 2 * len(cases.MEMORY_MODES)
    progress = Progress(total)
    started = time.time()
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine.describe(),
        "settings": {k: v for k, v in settings.items() if k != "quick"},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "load_average": {"start": machine.load_average()},
        "leaves": [],
        "models": [],
        "memory": [],
        "heavy": [],
        "many": [],
        "state_bits": [],
        "rounding": [],
        "guards": [],
        "state_memory": None,
    }
    try:
        for n, d in leaf_cases:
            results["leaves"].append(run_leaf(n, d, settings, progress))
        for count, n in settings["many"]:
            results["many"].append(run_many(count, n, settings, progress))
        for name in settings["models"]:
            results["models"].append(run_model(name, settings, progress))
        for n, d in settings["heavy"]:
            results["heavy"].append(run_heavy(n, d, settings, progress))
        for n, d in memory_cases:
            results["memory"].append(run_memory(n, d, settings, progress))
        for n, d in settings["state_bits"]:
            results["state_bits"].append(run_state_bits(n, d, settings, progress))
        for n, d in settings["rounding"]:
            results["rounding"].append(run_rounding(n, d, settings, progress))
        for subject, n in settings["guards"]:
            results["guards"].append(run_guards(subject, n, settings, progress))
        if settings["state_memory_n"]:
            results["state_memory"] = run_state_memory(
                settings["state_memory_n"], settings, progress)
    finally:
        progress.close()
    results["elapsed_s"] = time.perf_counter() - t0
    results["load_average"]["end"] = machine.load_average()
    results["targets"] = report.targets(results)
    return results


def main(argv: list[str] | None = None, prog: str = "python -m mlx_fused_rmsprop bench") -> int:
    """Entry point of the `bench` command; returns the exit code. ``prog`` is
    how the command was invoked (for its usage line)."""
    args = build_parser(prog).parse_args(argv)
    settings = _settings(args)
    results = run(settings)

    os.makedirs(args.out, exist_ok=True)
    stem = args.name or f"bench-{settings['mode']}"
    json_path = os.path.join(args.out, stem + ".json")
    png_path = os.path.join(args.out, stem + ".png")
    md_path = os.path.join(args.out, stem + ".md")
    results["outputs"] = {"json": json_path, "markdown": md_path}
    if not args.no_plot:
        written = report.plot(results, png_path)
        if written:
            results["outputs"]["png"] = png_path
        else:
            print("[bench] matplotlib is not installed: no plot "
                  "(pip install 'mlx-fused-rmsprop[bench]')", file=sys.stderr)
    markdown = report.markdown(results)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown)
    print(markdown)
    print(f"[bench] wrote {', '.join(results['outputs'].values())} "
          f"in {results['elapsed_s']:.0f} s", file=sys.stderr)
    return 0
