"""One rank of the launched tests in test_distributed.py (run under ``mlx.launch``).

    python distributed_worker.py SCENARIO OUT_DIR CONFIG_JSON

CONFIG_JSON is ``{"cases": [case, ...]}``: the scenario runs once per case.
Every rank writes ``OUT_DIR/rank<r>.json`` (per case, what it measured or the
error it saw) and, for the scenarios that produce arrays,
``OUT_DIR/<case>-rank<r>.safetensors``.
A rank that dies before writing its JSON makes the test fail with the launch's
output. The test compares what the ranks wrote with each other and with the
unsharded optimizer run in the test process.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import mlx_fused_rmsprop as fused
from mlx_fused_rmsprop._state import SCALAR_ENTRIES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distributed_cases import gradients_at, initial_parameters, same_bits  # noqa: E402


def equal_trees(a, b) -> bool:
    fa, fb = tree_flatten(a), tree_flatten(b)
    return [k for k, _ in fa] == [k for k, _ in fb] and all(
        x.dtype == y.dtype and x.shape == y.shape and same_bits(x, y)
        for (_, x), (_, y) in zip(fa, fb)
    )


def state_elements(opt: fused.RMSprop) -> dict[str, int]:
    """Elements of each state name this rank holds (v, mean, momentum_buffer)."""
    out: dict[str, int] = {}
    for key, value in tree_flatten(opt.state):
        if key in SCALAR_ENTRIES:
            continue
        name = key.rsplit(".", 1)[1]
        out[name] = out.get(name, 0) + value.size
    return out


def train(cfg: dict, group: mx.distributed.Group, out: str, rank: int, tag: str) -> dict:
    """Sharded and unsharded RMSprop side by side on the same averaged
    gradients; with ``save_state``, also writes this rank's
    sharded_state_dict and the unsharded optimizer's state."""
    kw = cfg.get("options", {})
    model = cfg.get("model", "default")
    params = initial_parameters(model)
    if cfg.get("lazy_parameters"):
        # Rank 0's weights broadcast (exactly: a gather, then its row), left
        # pending: the optimizer must run these collectives on every rank in
        # the same order although each rank's update touches other leaves.
        params = tree_map(
            lambda p: mx.distributed.all_gather(p[None], group=group)[0], params
        )
    sharded = fused.RMSprop(
        cfg.get("lr", 1e-2), shard_group=group,
        shard_bucket_bytes=cfg.get("bucket_bytes", 2**25), **kw,
    )
    plain = fused.RMSprop(cfg.get("lr", 1e-2), **kw)
    ps, pu = params, params
    frozen = cfg.get("frozen", [])  # top-level keys that get no gradient
    for step in range(cfg["steps"]):
        # Each rank's own gradients, averaged as data-parallel training does.
        grads = nn.average_gradients(gradients_at(step, rank, model), group=group)
        grads = {k: g for k, g in grads.items() if k not in frozen}
        # The update covers the gradients' leaves; the frozen ones stay (model.update).
        ps = {**ps, **sharded.apply_gradients(grads, ps)}
        pu = {**pu, **plain.apply_gradients(grads, pu)}
        mx.eval(ps, pu, sharded.state, plain.state)
    mx.save_safetensors(os.path.join(out, f"{tag}rank{rank}.safetensors"), dict(tree_flatten(ps)))
    if cfg.get("save_state"):
        mx.save_safetensors(os.path.join(out, f"{tag}state{rank}.safetensors"), sharded.sharded_state_dict())
        mx.save_safetensors(os.path.join(out, f"{tag}plain{rank}.safetensors"), dict(tree_flatten(plain.state)))
    return {
        "equal_unsharded": equal_trees(ps, pu),
        "step": int(sharded.step),
        "state_elements": state_elements(sharded),
        "unsharded_state_elements": state_elements(plain),
        "state_nbytes": sharded.state_nbytes(),
        "unsharded_state_nbytes": plain.state_nbytes(),
        "total_elements": sum(v.size for _, v in tree_flatten(params)),
    }


def save(cfg: dict, group: mx.distributed.Group, out: str, rank: int, tag: str) -> dict:
    """Train sharded on the (rank-independent) gradients of each step, then
    write this rank's sharded_state_dict and the parameters."""
    opt = fused.RMSprop(cfg.get("lr", 1e-2), shard_group=group, **cfg.get("options", {}))
    params = initial_parameters()
    for step in range(cfg["steps"]):
        params = opt.apply_gradients(gradients_at(step, 0), params)
        mx.eval(params, opt.state)
    mx.save_safetensors(os.path.join(out, f"{tag}state{rank}.safetensors"), opt.sharded_state_dict())
    mx.save_safetensors(os.path.join(out, f"{tag}rank{rank}.safetensors"), dict(tree_flatten(params)))
    return {"state_nbytes": opt.state_nbytes()}


def resume(cfg: dict, group: mx.distributed.Group, out: str, rank: int, tag: str) -> dict:
    """Load the full state and parameters the test wrote, continue sharded,
    write the parameters and this rank's sharded_state_dict."""
    full = tree_unflatten(list(mx.load(cfg["full_state"]).items()))
    params = tree_unflatten(list(mx.load(cfg["parameters"]).items()))
    opt = fused.RMSprop(cfg.get("lr", 1e-2), shard_group=group, **cfg.get("options", {}))
    opt.state = full  # a sharded optimizer takes an assigned state as a full one
    for step in range(cfg["first"], cfg["first"] + cfg["steps"]):
        params = opt.apply_gradients(gradients_at(step, 0, cfg.get("model", "default")), params)
        mx.eval(params, opt.state)
    mx.save_safetensors(os.path.join(out, f"{tag}state{rank}.safetensors"), opt.sharded_state_dict())
    mx.save_safetensors(os.path.join(out, f"{tag}rank{rank}.safetensors"), dict(tree_flatten(params)))
    return {"step": int(opt.step)}


def bad_leaf(cfg: dict, group: mx.distributed.Group, out: str, rank: int, tag: str) -> dict:
    """One good step; then a step where rank `bad_rank` has a bad gradient
    (`how`); then a good step again. Reports the error each rank saw and
    whether anything changed."""
    opt = fused.RMSprop(1e-2, shard_group=group, **cfg.get("options", {}))
    plain = fused.RMSprop(1e-2, **cfg.get("options", {}))
    params = initial_parameters()
    ps = opt.apply_gradients(gradients_at(0, 0), params)
    pu = plain.apply_gradients(gradients_at(0, 0), params)
    mx.eval(ps, pu, opt.state)
    before_state = tree_map(lambda x: x, opt.state)
    grads, target = gradients_at(1, 0), ps
    if rank == cfg["bad_rank"]:
        if cfg["how"] == "shape":
            grads["layers"][1]["weight"] = mx.zeros((3, 3))
        elif cfg["how"] == "dtype":
            grads["layers"][1]["weight"] = grads["layers"][1]["weight"].astype(mx.int32)
        elif cfg["how"] == "extra_leaf":  # a leaf the state was not built for
            grads["extra"] = mx.ones((4,))
            target = {**ps, "extra": mx.zeros((4,))}
        elif cfg["how"] == "learning_rate":  # passes every local check: ranks disagree
            opt.learning_rate = 2e-2
        else:
            raise AssertionError(cfg["how"])
    error = None
    try:
        mx.eval(opt.apply_gradients(grads, target))
    except fused.ShardedStepError as e:
        error = {"type": type(e).__name__, "message": str(e), "rank_errors": e.rank_errors}
    if cfg["how"] == "learning_rate":
        opt.learning_rate = 1e-2
    unchanged = equal_trees(opt.state, before_state) and int(opt.step) == 1
    # The group still works and the ranks are still in step.
    ps = opt.apply_gradients(gradients_at(1, 0), ps)
    pu = plain.apply_gradients(gradients_at(1, 0), pu)
    mx.eval(ps, pu)
    mx.save_safetensors(os.path.join(out, f"{tag}rank{rank}.safetensors"), dict(tree_flatten(ps)))
    return {
        "error": error,
        "unchanged": unchanged,
        "equal_unsharded_after": equal_trees(ps, pu),
        "step": int(opt.step),
    }


def disagree(cfg: dict, group: mx.distributed.Group, out: str, rank: int, tag: str) -> dict:
    """Rank `bad_rank` differs from the others in one value that must agree
    (`what`), each rank passing its own checks: the step must fail on every
    rank with the same ShardedStepError and change nothing; agreeing again,
    the ranks then step as the unsharded optimizer."""
    what, bad = cfg["what"], rank == cfg["bad_rank"]
    options = {"momentum": 0.5, "bias_correction": True}  # the bias correction reads the step
    opt = fused.RMSprop(1e-2, shard_group=group, **options)
    plain = fused.RMSprop(1e-2, **options)
    ps = pu = initial_parameters()
    if what in ("step", "learning_rate"):  # counters the ranks share once they stepped
        ps = opt.apply_gradients(gradients_at(0, 0), ps)
        pu = plain.apply_gradients(gradients_at(0, 0), pu)
        mx.eval(ps, pu, opt.state)
    grads, target = gradients_at(1, 0), ps
    if bad:
        if what == "leaves":  # a leaf of another shape, with its gradient: locally fine
            grads, target = {**grads, "scale": mx.ones((2,))}, {**ps, "scale": mx.zeros((2,))}
        elif what == "options":
            opt.alpha = 0.95
        elif what == "state_dtype":
            opt.state_dtype = mx.float32
        elif what == "bucket_bytes":
            opt.shard_bucket_bytes = 64
        elif what == "step":
            opt.state["step"] = opt.step + 1
        elif what == "learning_rate":
            opt.learning_rate = 2e-2
        else:
            raise AssertionError(what)
    before, step_before = tree_map(lambda x: x, opt.state), int(opt.step)
    error = None
    try:
        mx.eval(opt.apply_gradients(grads, target))
    except fused.ShardedStepError as e:
        error = {"type": type(e).__name__, "message": str(e), "rank_errors": e.rank_errors}
    unchanged = equal_trees(opt.state, before) and int(opt.step) == step_before
    # Agreeing again.
    if bad:
        opt.alpha, opt.state_dtype, opt.shard_bucket_bytes = 0.99, None, 2**25
        if what == "step":
            opt.state["step"] = opt.step - 1
        if what == "learning_rate":
            opt.learning_rate = 1e-2
    ps = opt.apply_gradients(gradients_at(1, 0), ps)
    pu = plain.apply_gradients(gradients_at(1, 0), pu)
    mx.eval(ps, pu)
    return {
        "error": error,
        "unchanged": unchanged,
        "equal_unsharded_after": equal_trees(ps, pu),
        "step": int(opt.step),
    }


def guards(cfg: dict, group: mx.distributed.Group, out: str, rank: int, tag: str) -> dict:
    """Guarded sharded RMSprop over 4 steps of the rank-independent
    gradients, except at step 1, where `how` is "nan" / "inf" (rank
    `bad_rank`'s own gradient gets one non-finite element) or "different"
    (every rank takes its own, unaveraged gradients). Reports that step's
    error, whether it changed anything, and whether the run then equals the
    unsharded optimizer that never saw step 1's batch."""
    options = cfg["options"]
    opt = fused.RMSprop(1e-2, shard_group=group, **options)
    plain = fused.RMSprop(1e-2, **options)
    ps = pu = initial_parameters()
    error, unchanged = None, None
    for step in range(4):
        if step != 1:
            ps = opt.apply_gradients(gradients_at(step, 0), ps)
            pu = plain.apply_gradients(gradients_at(step, 0), pu)
            mx.eval(ps, pu, opt.state, plain.state)
            continue
        grads = gradients_at(step, rank if cfg["how"] == "different" else 0)
        if cfg["how"] in ("nan", "inf") and rank == cfg["bad_rank"]:
            w = grads["layers"][0]["weight"]
            grads["layers"][0]["weight"] = mx.where(
                mx.arange(w.size).reshape(w.shape) == 7, float(cfg["how"]), w)
        before = tree_map(lambda x: mx.array(x), {"p": ps, "s": opt.state})
        try:
            ps = opt.apply_gradients(grads, ps)
            mx.eval(ps, opt.state)
        except fused.ShardedStepError as e:
            error = {"type": type(e).__name__, "message": str(e), "rank_errors": e.rank_errors}
        counters = ("grad_norm", "skipped_steps")
        unchanged = equal_trees(
            {"p": before["p"], "s": {k: v for k, v in before["s"].items() if k not in counters}},
            {"p": ps, "s": {k: v for k, v in opt.state.items() if k not in counters}})
    mx.save_safetensors(os.path.join(out, f"{tag}rank{rank}.safetensors"), dict(tree_flatten(ps)))
    return {
        "error": error,
        "unchanged": unchanged,
        "equal_unsharded": equal_trees(ps, pu),
        "step": int(opt.step),
        "skipped_steps": int(opt.skipped_steps),
    }


SCENARIOS = {"train": train, "save": save, "resume": resume, "bad_leaf": bad_leaf, "disagree": disagree,
             "guards": guards}


def main() -> None:
    scenario, out, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    # A hung rank prints where it waits and exits (the test's own timeout
    # then reaps the launch); well before that timeout.
    faulthandler.dump_traceback_later(cfg.get("watchdog", 100), exit=True)
    # On the CPU, as the test process compares with (tests/conftest.py); the
    # ring backend moves CPU memory anyway.
    mx.set_default_device(mx.cpu)
    group = mx.distributed.init(backend="ring", strict=True)
    rank = group.rank()
    try:
        # Several cases per launch: starting ranks is the slow part.
        cases = [
            SCENARIOS[scenario](case, group, out, rank, f"{i}-")
            for i, case in enumerate(cfg["cases"])
        ]
        result = {"ok": True, "size": group.size(), "cases": cases}
    except Exception:
        result = {"ok": False, "traceback": traceback.format_exc()}
    with open(os.path.join(out, f"rank{rank}.json.tmp"), "w") as f:
        json.dump(result, f)
    os.replace(os.path.join(out, f"rank{rank}.json.tmp"), os.path.join(out, f"rank{rank}.json"))


if __name__ == "__main__":
    main()
