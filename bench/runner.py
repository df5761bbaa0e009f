"""`python -m mlx_fused_rmsprop bench`: runs every case and writes the table
(stdout), a JSON file and a PNG plot."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any

import mlx.core as mx

from . import cases, machine, report
from .timing import Progress, interleaved, summarize

DEFAULT_SIZES = [4096 * 4**i for i in range(7)]  # 4K ... 16M
FULL_SIZES = DEFAULT_SIZES + [64 * 2**20]  # ... 64M
QUICK_SIZES = [4096, 16384]
HEAVY_SIZES = [2**20, 16 * 2**20]  # the heaviest variant, float32 and bfloat16
MANY_LEAVES = [(500, 4096), (2000, 256)]  # (leaves, elements per leaf), float32
QUICK_MANY_LEAVES = [(20, 256)]


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
            "torch.optim.RMSprop(foreach=True) when torch is installed. Prints "
            "markdown tables; writes JSON and a PNG plot (needs matplotlib: "
            "pip install 'mlx-fused-rmsprop[bench]'). The default run takes about "
            "3 minutes on 2 cores."
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
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory cases")
    p.add_argument("--no-variants", action="store_true",
                   help="skip the heaviest variant (centered + momentum + weight decay)")
    p.add_argument("--no-many", action="store_true",
                   help="skip the many-small-leaves cases (500 x 4K, 2000 x 256)")
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


def run_leaf(n: int, dtype_name: str, settings: dict, progress: Progress) -> dict:
    dtype = cases.DTYPES[dtype_name]
    itemsize = dtype.size
    nbytes = cases.rmsprop_bytes(n, itemsize)
    label = f"leaf {dtype_name} {report.fmt_elems(n)}"
    grads = {"w": mx.random.normal((n,), key=mx.random.key(7)).astype(dtype) * 1e-2}
    mx.eval(grads)
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
    grads = {"w": mx.random.normal((n,), key=mx.random.key(7)).astype(dtype) * 1e-2}
    mx.eval(grads)
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
    progress = Progress(total)
    started = time.time()
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine.describe(),
        "settings": {k: v for k, v in settings.items() if k != "quick"},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "leaves": [],
        "models": [],
        "memory": [],
        "heavy": [],
        "many": [],
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
    finally:
        progress.close()
    results["elapsed_s"] = time.perf_counter() - t0
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
