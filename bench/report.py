"""The benchmark's outputs: markdown table, target check, PNG plot."""

from __future__ import annotations

from typing import Any

from . import machine
from .cases import HEAVY, HEAVY_IMPLS, IMPLS

TARGET_N = 16 * 2**20


def fmt_elems(n: int) -> str:
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 2**10 and n % 2**10 == 0:
        return f"{n // 2**10}K"
    return str(n)


def fmt_time(s: float) -> str:
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}×"


def _find_leaf(results: dict, dtype: str, n: int) -> dict | None:
    for leaf in results.get("leaves", []):
        if leaf["dtype"] == dtype and leaf["elements"] == n:
            return leaf
    return None


def _find_many(results: dict, count: int, n: int) -> dict | None:
    for case in results.get("many", []):
        if case["leaves"] == count and case["elements"] == n:
            return case
    return None


def _find_model(results: dict, name: str) -> dict | None:
    """The full-size model (not the --quick one)."""
    full = {"transformer": "dims=256", "mlp": "1024 -> 2048"}[name]
    return next((m for m in results.get("models", [])
                 if m["model"] == name and full in m["description"]), None)


def python_us_per_leaf(case: dict) -> float:
    """This package's Python (and native call) per leaf per step: the
    median `apply_gradients` time over the case's leaves, in µs."""
    return case["phases"]["apply_gradients"] / case["leaves"] * 1e6


def targets(results: dict) -> list[dict[str, Any]]:
    """The performance targets (issues #4, #11 and the memory-lean options'
    #18-#20), checked against this run (a target whose case did not run is
    reported as not measured)."""
    out: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, goal: float, higher_is_better: bool = True,
            unit: str = "×") -> None:
        met = None if measured is None else (
            measured >= goal if higher_is_better else measured <= goal)
        out.append({"target": name, "goal": goal, "measured": measured,
                    "unit": unit, "met": met,
                    "comparison": ">=" if higher_is_better else "<="})

    leaves = {d: _find_leaf(results, d, TARGET_N) for d in ("float32", "float16", "bfloat16")}
    f32, bf16 = leaves["float32"], leaves["bfloat16"]
    add("16M float32 leaf: speed-up over mlx eager",
        f32["speedup"].get("mlx") if f32 else None, 6.0)
    add("16M float32 leaf: speed-up over mlx compiled",
        f32["speedup"].get("mlx_compiled") if f32 else None, 4.0)
    add("16M bfloat16 leaf: speed-up over mlx eager",
        bf16["speedup"].get("mlx") if bf16 else None, 8.0)
    for dtype, goal in (("float32", 0.90), ("float16", 0.70), ("bfloat16", 0.70)):
        leaf = leaves[dtype]
        add(f"16M {dtype} leaf: fraction of the step-pattern memory limit (same threads)",
            leaf["impls"]["fused"]["fraction_of_limit"] if leaf else None, goal, unit="")
    for (count, n), goal in (((500, 4096), 2.5), ((2000, 256), 2.2)):
        case = _find_many(results, count, n)
        add(f"{count} leaves × {fmt_elems(n)}: speed-up over mlx compiled",
            case["speedup"].get("mlx_compiled") if case else None, goal)
    tr = _find_model(results, "transformer")
    add("Transformer step: speed-up over mlx eager",
        tr["speedup"].get("mlx") if tr else None, 3.0)
    add("Transformer step: speed-up over mlx compiled",
        tr["speedup"].get("mlx_compiled") if tr else None, 2.8)
    many = _find_many(results, 2000, 256)
    add("Python time per leaf per step (apply_gradients, 2000 leaves × 256), µs",
        python_us_per_leaf(many) if many else None, 3.0, higher_is_better=False, unit=" µs")
    mem = [m["extra_peak_x_leaf"]["fused"] for m in results.get("memory", [])]
    add("extra peak memory of an optimizer step (worst dtype), × leaf bytes",
        max(mem) if mem else None, 0.10, higher_is_better=False, unit="× leaf")

    eight = _find_lean(results, "state_bits", "float32")
    add("16M float32 leaf, 8-bit state: time over the float32-state step",
        eight["time_vs_f32_state"] if eight else None, 1.1, higher_is_better=False)
    add("16M float32 leaf, 8-bit state: fraction of its own step-pattern limit",
        eight["impls"]["fused_8bit"]["fraction_of_limit"] if eight else None, 0.70, unit="")
    sm = results.get("state_memory") or {}
    add("8-bit state over float32 state, bytes (worst quantized leaf)",
        sm.get("quantized_state_vs_float32"), 0.26, higher_is_better=False)
    rounding = _find_lean(results, "rounding", "bfloat16")
    for impl, name, goal in (("fused_sr", "stochastic rounding", 1.2),
                             ("fused_kahan", "Kahan summation", 1.4)):
        add(f"16M bfloat16 leaf: {name} time over round-to-nearest",
            rounding["time_vs_nearest"].get(impl) if rounding else None, goal,
            higher_is_better=False)
    guards = next((g for g in results.get("guards", [])
                   if g["subject"] == "leaf" and g["elements"] == TARGET_N), None)
    add("16M float32 leaf: fused clip + update, speed-up over clip_grad_norm + our update",
        guards["speedup"].get("clip_fused") if guards else None, 1.2)
    add("16M float32 leaf: extra peak memory of a clipped step (max_grad_norm), × leaf bytes",
        guards["extra_peak_x_leaf"].get("fused_clip") if guards else None, 0.10,
        higher_is_better=False, unit="× leaf")
    return out


def _find_lean(results: dict, section: str, dtype: str) -> dict | None:
    """A memory-lean option's 16M case of this dtype."""
    return next((c for c in results.get(section, [])
                 if c["dtype"] == dtype and c["elements"] == TARGET_N), None)


def _load_text(results: dict) -> str:
    """', load average 1.52 at the start, 2.10 at the end' (1 minute), when known."""
    load = results.get("load_average") or {}
    if not load.get("start") or not load.get("end"):
        return ""
    return (f", load average (1 min) {load['start'][0]:.2f} at the start, "
            f"{load['end'][0]:.2f} at the end on {results['machine']['logical_cores']} cores")


def markdown(results: dict) -> str:
    m = results["machine"]
    s = results["settings"]
    lines = [
        "## mlx-fused-rmsprop benchmark",
        "",
        f"**Machine:** {machine.one_line(m)}",
        "",
        f"Run: `{s['mode']}` mode, {results.get('started', '')}, "
        f"{results.get('elapsed_s', 0):.0f} s{_load_text(results)}. Each time is the median of "
        f"interleaved rounds (every implementation once per round, order rotated); "
        f"fast steps are repeated within a round to last ≥ {s['min_batch_s'] * 1e3:.0f} ms. "
        "A step is `optimizer.update(model, grads)` + "
        "`mx.eval(model.parameters(), optimizer.state)`. Only ratios within one run "
        "are comparable.",
        "",
    ]
    if results["leaves"]:
        has_c = "mlx_compiled" in s["leaf_impls"]
        lines += [
            "### Single leaf: time per step",
            "",
            "Limit = the memory limit for the step's own access pattern: native code "
            "that reads three buffers of the leaf's bytes (grad, param, v) and writes two "
            "back in place with trivial math, on as many threads as the fused step splits "
            "the leaf across (the *threads* column). GB/s = the step's bytes "
            "(5 × itemsize per element) / time; *% limit* = fused GB/s over the limit's. "
            "memmove = a plain copy of the same bytes, for reference. Small leaves are "
            "dominated by the per-step overhead (Python, graph, eval), not by memory.",
            "",
            "| dtype | elements | fused (ours) | mlx eager |"
            + (" mlx compiled |" if has_c else "")
            + " vs eager |" + (" vs compiled |" if has_c else "")
            + " threads | limit | memmove | fused GB/s | limit GB/s | % limit |",
            "|---|---:|---:|---:|" + ("---:|" if has_c else "") + "---:|"
            + ("---:|" if has_c else "") + "---:|---:|---:|---:|---:|---:|",
        ]
        for leaf in results["leaves"]:
            im = leaf["impls"]
            row = [leaf["dtype"], fmt_elems(leaf["elements"]),
                   fmt_time(im["fused"]["median_s"]), fmt_time(im["mlx"]["median_s"])]
            if has_c:
                row.append(fmt_time(im["mlx_compiled"]["median_s"]))
            row.append(_x(leaf["speedup"].get("mlx")))
            if has_c:
                row.append(_x(leaf["speedup"].get("mlx_compiled")))
            row.append(str(leaf["threads"]))
            row.append(fmt_time(leaf["limit_median_s"]))
            row.append(fmt_time(leaf["copy_median_s"]))
            row.append(f"{im['fused']['gbps']:.1f}")
            row.append(f"{leaf['limit_gbps']:.1f}")
            row.append(f"{im['fused']['fraction_of_limit'] * 100:.0f}%")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if results.get("many"):
        impls = s["many_impls"]
        lines += [
            "### Many small leaves: time per step",
            "",
            "A model of N independent float32 parameters; per-leaf overhead (Python, "
            "graph building, mlx's per-array cost in eval) rather than memory. "
            + ("torch = `torch.optim.RMSprop(foreach=True)` on CPU (its multi-tensor "
               "path), same leaves, its default threads."
               if "torch_foreach" in impls else
               "(torch is not installed: no torch foreach column.)"),
            "",
            "*Ceiling* = mlx compiled's time over the fused step's `model.update` + "
            "`mx.eval` alone (next table): the speed-up if this package's own per-leaf "
            "time were zero, which mlx's per-array costs bound.",
            "",
            "| leaves × elements | " + " | ".join(IMPLS[i] for i in impls)
            + " | " + " | ".join(f"{IMPLS[i]} / fused" for i in impls if i != "fused")
            + " | ceiling vs compiled |",
            "|---|" + "---:|" * (2 * len(impls)),
        ]
        for case in results["many"]:
            row = [f"{case['leaves']} × {fmt_elems(case['elements'])}"]
            row += [fmt_time(case["impls"][i]["median_s"]) for i in impls]
            row += [_x(case["speedup"][i]) for i in impls if i != "fused"]
            row.append(_x(case.get("ceiling_vs_compiled")))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    phased = [(f"{c['leaves']} × {fmt_elems(c['elements'])}", c["leaves"], c["phases"])
              for c in results.get("many", [])]
    phased += [(m["model"], m["leaves"], m["phases"]) for m in results.get("models", [])
               if "phases" in m]
    if phased:
        lines += [
            "### Where a fused step's time goes, per leaf",
            "",
            "Medians of one step split in three: `opt.apply_gradients(grads, model)` (this "
            "package: one walk over the tree, every check and the graph, in one native "
            "call: the *Python time per leaf*), mlx's `model.update(...)`, and "
            "`mx.eval(model.parameters(), opt.state)` (mlx's per-array scheduling plus "
            "the kernels). Each divided by the number of leaves.",
            "",
            "| case | leaves | apply_gradients µs/leaf | model.update µs/leaf "
            "| mx.eval µs/leaf |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, count, ph in phased:
            lines.append(
                f"| {name} | {count} | {ph['apply_gradients'] / count * 1e6:.2f} | "
                f"{ph['model_update'] / count * 1e6:.2f} | {ph['eval'] / count * 1e6:.2f} |")
        lines.append("")
    if results["models"]:
        impls = s["model_impls"]
        lines += [
            "### Whole models: one optimizer step over every parameter",
            "",
            "| model | parameters | leaves | " + " | ".join(IMPLS[i] for i in impls)
            + " | " + " | ".join(f"{IMPLS[i]} / fused" for i in impls if i != "fused") + " |",
            "|---|---:|---:|" + "---:|" * (2 * len(impls) - 1),
        ]
        for mod in results["models"]:
            row = [mod["description"], f"{mod['parameters']:,}", str(mod["leaves"])]
            row += [fmt_time(mod["impls"][i]["median_s"]) for i in impls]
            row += [_x(mod["speedup"][i]) for i in impls if i != "fused"]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if results.get("heavy"):
        impls = s["heavy_impls"]
        options = ", ".join(f"{k}={v}" for k, v in HEAVY.items())
        lines += [
            "### The heaviest variant: time per step",
            "",
            f"`RMSprop(lr, {options})` (torch's algorithm) fused, against the same "
            "algorithm written with `mlx.core` ops (an `Optimizer` subclass), eager and "
            "under `mx.compile`. One leaf; a step moves 9 × itemsize bytes per element "
            "(reads grad, param, v, mean, buffer; writes param, v, mean, buffer).",
            "",
            "| dtype | elements | " + " | ".join(HEAVY_IMPLS[i] for i in impls)
            + " | " + " | ".join(f"{HEAVY_IMPLS[i]} / fused" for i in impls if i != "fused")
            + " | fused GB/s |",
            "|---|---:|" + "---:|" * (2 * len(impls)),
        ]
        for case in results["heavy"]:
            row = [case["dtype"], fmt_elems(case["elements"])]
            row += [fmt_time(case["impls"][i]["median_s"]) for i in impls]
            row += [_x(case["speedup"][i]) for i in impls if i != "fused"]
            row.append(f"{case['impls']['fused']['gbps']:.1f}")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if results["memory"]:
        impls = s["leaf_impls"]
        lines += [
            "### Extra peak memory of a step (× the leaf's bytes)",
            "",
            "A one-leaf model in a training loop; `mx.reset_peak_memory()` before the step, "
            "`mx.get_peak_memory()` after it, minus the memory live before it. "
            "*Optimizer step*: gradients evaluated first, then `update` + `mx.eval` "
            "(what the optimizer itself adds). *Whole step, one eval*: `loss, grads = "
            "value_and_grad(...)`, `update`, `mx.eval(model.parameters(), state)` — the "
            "gradient (1×) counts too, and the parameter's buffer can only be reused when "
            "nothing else in that eval still reads the old parameter (here the unevaluated "
            "`loss` does), so only the state is updated in place.",
            "",
            "| dtype | elements | " + " | ".join(f"optimizer step: {IMPLS[i]}" for i in impls)
            + " | " + " | ".join(f"whole step: {IMPLS[i]}" for i in impls) + " |",
            "|---|---:|" + "---:|" * (2 * len(impls)),
        ]
        for mem in results["memory"]:
            row = [mem["dtype"], fmt_elems(mem["elements"])]
            row += [f"{mem['extra_peak_x_leaf'][i]:.2f}" for i in impls]
            row += [f"{mem['train_step_extra_peak_x_leaf'][i]:.2f}" for i in impls]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += _lean_markdown(results)
    tg = results.get("targets") or []
    if any(t["measured"] is not None for t in tg):
        lines += ["### Targets", "", "| target | goal | measured | met |", "|---|---:|---:|:---:|"]
        for t in tg:
            if t["measured"] is None:
                meas, met = "not measured", "–"
            else:
                if t["unit"] == "":
                    meas = f"{t['measured'] * 100:.0f}%"
                elif t["unit"] == " µs":
                    meas = f"{t['measured']:.2f} µs"
                else:
                    meas = f"{t['measured']:.2f}{t['unit']}"
                met = "yes" if t["met"] else "**no**"
            goal = (f"{t['comparison']} {t['goal'] * 100:.0f}%" if t["unit"] == ""
                    else f"{t['comparison']} {t['goal']:g}{t['unit']}")
            lines.append(f"| {t['target']} | {goal} | {meas} | {met} |")
        lines.append("")
    return "\n".join(lines)


def _ratio(v: float) -> str:
    return f"{v:.2f}×"


def _count(subject: dict) -> str:
    leaves = subject["leaves"]
    return f"{subject['parameters']:,} parameters, {leaves} {'leaf' if leaves == 1 else 'leaves'}"


def _lean_markdown(results: dict) -> list[str]:
    """The memory-lean options' tables: 8-bit state, rounding, clipping, and
    the state's bytes per parameter."""
    s = results["settings"]
    lines: list[str] = []
    if results.get("state_bits"):
        lines += [
            "### 8-bit state: time per step",
            "",
            "`RMSprop(state_bits=8)` against the fused step with float32 state "
            "(`state_dtype=mx.float32`; for float32 leaves the default), one leaf. Each "
            "against the memory limit of its own access pattern, on the threads the "
            "kernel splits that leaf across: the float32-state step reads grad, param and "
            "v and writes param and v; the 8-bit step reads grad, param, the codes and "
            "the block scales (one float32 per 256 elements) and writes param, codes and "
            "scales. *B/elem* = the pattern's bytes per element.",
            "",
            "| dtype | elements | float32 state | 8-bit state | 8-bit / float32 state "
            "| threads | B/elem: float32 state | B/elem: 8-bit | limit: float32 state "
            "| limit: 8-bit | % limit: float32 state | % limit: 8-bit | 8-bit GB/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for case in results["state_bits"]:
            f32, q8 = case["impls"]["fused_f32_state"], case["impls"]["fused_8bit"]
            lines.append("| " + " | ".join([
                case["dtype"], fmt_elems(case["elements"]),
                fmt_time(f32["median_s"]), fmt_time(q8["median_s"]),
                _ratio(case["time_vs_f32_state"]),
                f"{f32['threads']} / {q8['threads']}",
                f"{f32['bytes_per_element']:.2f}", f"{q8['bytes_per_element']:.2f}",
                fmt_time(f32["limit_median_s"]), fmt_time(q8["limit_median_s"]),
                f"{f32['fraction_of_limit'] * 100:.0f}%",
                f"{q8['fraction_of_limit'] * 100:.0f}%",
                f"{q8['gbps']:.1f}",
            ]) + " |")
        lines.append("")
    if results.get("rounding"):
        impls = s["rounding_impls"]
        lines += [
            "### Stochastic rounding and Kahan summation: time per step",
            "",
            "`RMSprop(stochastic_rounding=True)` and `RMSprop(kahan_summation=True)` "
            "against round-to-nearest (the plain fused step), one 16-bit leaf, state in "
            "the leaf's dtype. Kahan also reads and writes the compensation: 7 × itemsize "
            "bytes per element against 5.",
            "",
            "| dtype | elements | round to nearest | stochastic rounding | Kahan "
            "| stochastic / nearest | Kahan / nearest |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for case in results["rounding"]:
            row = [case["dtype"], fmt_elems(case["elements"])]
            row += [fmt_time(case["impls"][i]["median_s"]) for i in impls]
            row += [_ratio(case["time_vs_nearest"][i]) for i in impls if i != "fused"]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if results.get("guards"):
        impls = s["guards_impls"]
        lines += [
            "### Gradient clipping: time per step",
            "",
            f"`RMSprop(max_grad_norm={results['guards'][0]['max_grad_norm']:g})` (the "
            "global norm, then the clip factor as a scalar input of every leaf's fused "
            "update) against `mlx.optimizers.clip_grad_norm` (the norm, then a pass that "
            "writes scaled gradients) followed by our update or mlx's, eager and under "
            "`mx.compile` (clip and update compiled together); the plain fused step "
            "without clipping for reference. Clipping is active (*norm* > max).",
            "",
            "| case | norm | " + " | ".join(IMPLS[i] for i in impls)
            + " | " + " | ".join(f"{IMPLS[i]} / fused clip" for i in impls if i != "fused_clip")
            + " |",
            "|---|---:|" + "---:|" * (2 * len(impls) - 1),
        ]
        for case in results["guards"]:
            row = [case["description"], f"{case['grad_norm']:.3g}"]
            row += [fmt_time(case["impls"][i]["median_s"]) for i in impls]
            row += [_ratio(case["speedup"][i]) for i in impls if i != "fused_clip"]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        peaks = [c for c in results["guards"] if "extra_peak_x_leaf" in c]
        if peaks:
            lines += [
                "Extra peak memory of the optimizer step (× the leaf's bytes; measured as "
                "in *Extra peak memory of a step*):",
                "",
                "| case | " + " | ".join(IMPLS[i] for i in impls) + " |",
                "|---|" + "---:|" * len(impls),
            ]
            for case in peaks:
                lines.append("| " + " | ".join(
                    [case["description"]]
                    + [f"{case['extra_peak_x_leaf'][i]:.2f}" for i in impls]) + " |")
            lines.append("")
    sm = results.get("state_memory")
    if sm:
        subjects = sm["subjects"]
        big = subjects[-1]
        lines += [
            "### Optimizer state: bytes per parameter",
            "",
            "The per-parameter state (`v`; 8-bit: uint8 codes plus a float32 scale per 256 "
            "elements, float32 for leaves under `min_8bit_size`; Kahan: a compensation in "
            "the weights' dtype; stochastic rounding keeps one scalar seed) divided by "
            "the parameter count. Measured from the optimizer's arrays after a step for "
            + " and ".join(f"*{x['subject']}*: {x['description']} ({_count(x)})"
                           for x in subjects if x["measured"])
            + "; computed (not run) from the documented layout for "
            + "; ".join(f"*{x['subject']}*: {x['description']} ({_count(x)})"
                        for x in subjects if not x["measured"])
            + ". *Weights + state* adds the parameters' own bytes.",
            "",
            "| mode | " + " | ".join(f"state B/param: {x['subject']}" for x in subjects)
            + f" | weights + state B/param: {big['subject']} "
            f"| weights + state: {big['subject']}, GB |",
            "|---|" + "---:|" * (len(subjects) + 2),
        ]
        for row in sm["modes"]:
            per = [row["state_bytes"][x["subject"]] / x["parameters"] for x in subjects]
            total = row["weights_bytes"] * big["parameters"] + row["state_bytes"][big["subject"]]
            lines.append("| " + " | ".join(
                [row["label"]] + [f"{b:.3f}" for b in per]
                + [f"{total / big['parameters']:.3f}", f"{total / 1e9:.1f}"]) + " |")
        lines += [
            "",
            f"Worst 8-bit state over the float32 state it replaces, over the "
            f"{sm['quantized_leaves']} quantized leaves' states measured above: "
            + (f"{sm['quantized_state_vs_float32']:.4f}×." if sm["quantized_state_vs_float32"]
               is not None else "–."),
            "",
        ]
    return lines


def plot(results: dict, path: str) -> bool:
    """Time vs size per implementation and GB/s against the step-pattern
    limit and memmove, one column per dtype. Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    leaves = results["leaves"]
    if not leaves:
        return False
    dtypes = list(dict.fromkeys(leaf["dtype"] for leaf in leaves))
    fig, axes = plt.subplots(2, len(dtypes), figsize=(5.2 * len(dtypes), 8.5),
                             squeeze=False)
    styles = {"fused": ("tab:red", "o"), "mlx": ("tab:blue", "s"),
              "mlx_compiled": ("tab:green", "^"), "fused_compiled": ("tab:orange", "v")}
    for col, dt in enumerate(dtypes):
        rows = sorted((lf for lf in leaves if lf["dtype"] == dt), key=lambda x: x["elements"])
        ns = [r["elements"] for r in rows]
        ax_t, ax_b = axes[0][col], axes[1][col]
        for impl in results["settings"]["leaf_impls"]:
            color, marker = styles.get(impl, ("black", "x"))
            ax_t.plot(ns, [r["impls"][impl]["median_s"] * 1e3 for r in rows],
                      marker=marker, color=color, label=IMPLS.get(impl, impl))
            ax_b.plot(ns, [r["impls"][impl]["gbps"] for r in rows],
                      marker=marker, color=color, label=IMPLS.get(impl, impl))
        ax_t.plot(ns, [r["limit_median_s"] * 1e3 for r in rows], linestyle="--",
                  color="black", label="step-pattern limit")
        ax_t.plot(ns, [r["copy_median_s"] * 1e3 for r in rows], linestyle=":",
                  color="gray", label="memmove of the same bytes")
        ax_b.plot(ns, [r["limit_gbps"] for r in rows], linestyle="--", color="black",
                  label="step-pattern limit")
        ax_b.plot(ns, [r["roofline_gbps"] for r in rows], linestyle=":", color="gray",
                  label="memmove")
        for ax in (ax_t, ax_b):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xlabel("leaf elements")
        ax_t.set_yscale("log")
        ax_t.set_ylabel("time per step (ms)")
        ax_t.set_title(dt)
        ax_b.set_ylabel("effective GB/s (5 × elements × itemsize / time)")
        ax_b.set_ylim(bottom=0)
        ax_t.legend(fontsize=8)
        ax_b.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(
        f"mlx-fused-rmsprop vs mlx.optimizers.RMSprop — {m['cpu']}, "
        f"{m['usable_cores']} cores, mlx {m['mlx']} ({m['device']})",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
