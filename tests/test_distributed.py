"""Sharded optimizer state (``RMSprop(shard_group=...)``) over real ranks.

The launched tests start 2 or 3 processes with ``mlx.launch --backend ring``
on 127.0.0.1 (ports found free just before each launch), each running
``distributed_worker.py``; every launch runs in its own process group under a
timeout, and the whole group is killed afterwards whatever happened, so no
rank outlives its test. Each rank also has a watchdog that dumps its stack
and exits if it hangs. The single-process tests use the singleton group
(``mx.distributed.init()`` with no launcher: size 1).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import mlx_fused_rmsprop as fused

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distributed_cases import eight_bit_pieces, gradients_at, initial_parameters, same_bits  # noqa: E402

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "distributed_worker.py"
EXAMPLE = TESTS.parent / "examples" / "digits_mlp.py"
LAUNCH_TIMEOUT = 150  # seconds per launch (a healthy one: seconds); ranks time out at 100
VARIANT = {"centered": True, "momentum": 0.9, "weight_decay": 0.01}


# ---- Launching ranks.


def _free_port_block(n: int) -> int:
    """A first port p such that p .. p+n-1 are free on 127.0.0.1 right now
    (the ring backend listens on one port per rank, consecutive)."""
    for _ in range(100):
        base = random.randint(20000, 60000 - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports found")


def run_launch(n: int, argv: list[str], cwd: Path) -> str:
    """``mlx.launch -n N --backend ring`` on 127.0.0.1 with free ports; the output.

    The launcher and every rank (bash exec's python) share one process group
    in a session of their own, killed as a whole when the launch ends or
    times out, so no rank outlives its test.
    """
    cmd = [
        sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()",
        "-n", str(n), "--backend", "ring", "-p", str(_free_port_block(n)),
        "--python", sys.executable, *argv,
    ]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd, text=True,
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"mlx.launch -n {n} {argv[:2]} timed out after {LAUNCH_TIMEOUT}s:\n{output}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return output


def launch(n: int, scenario: str, cases: list[dict], out: Path) -> list[list[dict]]:
    """Run the worker's ``scenario`` over ``cases`` on ``n`` ring ranks; return
    ``reports[case][rank]``.

    Fails the test (with the launch's output) on a timeout, a rank that
    wrote no report, or a rank that raised.
    """
    out.mkdir(parents=True, exist_ok=True)
    output = run_launch(n, [str(WORKER), scenario, str(out), json.dumps({"cases": cases})], out)
    reports = []
    for rank in range(n):
        path = out / f"rank{rank}.json"
        if not path.exists():
            pytest.fail(f"rank {rank} of {n} ({scenario}) wrote no report:\n{output}")
        report = json.loads(path.read_text())
        if not report["ok"]:
            pytest.fail(f"rank {rank} of {n} ({scenario}) raised:\n{report['traceback']}")
        assert report["size"] == n and len(report["cases"]) == len(cases)
        reports.append(report["cases"])
    return [list(per_case) for per_case in zip(*reports)]


def rank_parameters(out: Path, n: int, case: int = 0, kind: str = "rank") -> list[dict]:
    return [
        tree_unflatten(list(mx.load(str(out / f"{case}-{kind}{r}.safetensors")).items()))
        for r in range(n)
    ]


def assert_trees_equal(a, b) -> None:
    # Sorted: a tree read back from a file has its keys in another order.
    fa, fb = sorted(tree_flatten(a), key=lambda t: t[0]), sorted(tree_flatten(b), key=lambda t: t[0])
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (key, x), (_, y) in zip(fa, fb):
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert same_bits(x, y), f"{key} differs"


def reference(steps: int, options: dict, opt=None, params=None, first: int = 0, model: str = "default"):
    """The unsharded optimizer over the rank-independent gradients of steps
    first .. first+steps-1 (what the save/resume workers feed)."""
    opt = opt or fused.RMSprop(1e-2, **options)
    params = initial_parameters(model) if params is None else params
    for step in range(first, first + steps):
        params = opt.apply_gradients(gradients_at(step, 0, model), params)
        mx.eval(params, opt.state)
    return opt, params


# ---- Launched: training.

TRAIN_CASES = {
    2: [
        {"options": {}, "bucket_bytes": 2**25},
        {"options": VARIANT, "bucket_bytes": 64, "lazy_parameters": True},
    ],
    3: [
        {"options": {}, "bucket_bytes": 64},
        {"options": {**VARIANT, "bias_correction": True, "eps_in_sqrt": True}, "bucket_bytes": 2**25},
    ],
}


@pytest.mark.parametrize("n", [2, 3])
def test_sharded_training_equals_unsharded(tmp_path, n):
    """Averaged gradients (nn.average_gradients) of each rank, 4 steps, plain
    and with variants, one bucket per dtype and several, parameters still
    pending on a collective at the first step: on every rank the
    sharded parameters equal the unsharded optimizer's bit for bit, the ranks
    hold the same parameters, and each rank keeps state for at most ceil(E/N)
    of the E elements (all of them between the ranks)."""
    cases = [{"steps": 4, **case} for case in TRAIN_CASES[n]]
    for i, (case, reports) in enumerate(zip(cases, launch(n, "train", cases, tmp_path))):
        options = case["options"]
        params = rank_parameters(tmp_path, n, i)
        for rank, report in enumerate(reports):
            assert report["equal_unsharded"], f"case {i}, rank {rank}: sharded != unsharded"
            assert report["step"] == 4
            assert_trees_equal(params[rank], params[0])
        total = reports[0]["total_elements"]
        names = {"v"} | ({"mean"} if options.get("centered") else set()) | (
            {"momentum_buffer"} if options.get("momentum") else set()
        )
        assert set(reports[0]["state_elements"]) == names
        for name in names:
            per_rank = [r["state_elements"].get(name, 0) for r in reports]
            assert sum(per_rank) == total == reports[0]["unsharded_state_elements"][name]
            assert max(per_rank) <= math.ceil(total / n), per_rank
            assert min(per_rank) >= total // n - 1, per_rank  # E=204: every rank has its share
        assert sum(r["state_nbytes"] for r in reports) == reports[0]["unsharded_state_nbytes"]


# ---- Launched: checkpoints across rank counts.

CHECKPOINT_OPTIONS = [{}, VARIANT]


def test_checkpoint_2_ranks_to_full_to_3_ranks(tmp_path):
    """Save on 2 ranks -> assemble -> equals the unsharded state; loads into
    the unsharded RMSprop (and, plain, mlx.optimizers.RMSprop) and continues
    bit-identically; loaded into 3 ranks, continues bit-identically too, and
    the 3 ranks' states assemble to the unsharded state again. Plain and
    with variants (centered + momentum + weight decay)."""
    save_dir, resume_dir = tmp_path / "save", tmp_path / "resume"
    launch(2, "save", [{"steps": 3, "options": o} for o in CHECKPOINT_OPTIONS], save_dir)
    resume_cases, expected = [], []
    for i, options in enumerate(CHECKPOINT_OPTIONS):
        per_rank = [mx.load(str(save_dir / f"{i}-state{r}.safetensors")) for r in (1, 0)]  # any order
        full = fused.RMSprop.assemble_state(per_rank)
        ref3, params3 = reference(3, options)
        assert_trees_equal(full, ref3.state)
        for p in rank_parameters(save_dir, 2, i):
            assert_trees_equal(p, params3)
        # (An optimizer steps its state dict in place: each load gets a fresh one.)
        mx.save_safetensors(str(tmp_path / f"{i}-full.safetensors"), dict(tree_flatten(full)))
        mx.save_safetensors(str(tmp_path / f"{i}-params.safetensors"), dict(tree_flatten(params3)))
        state3 = tree_map(lambda x: x, ref3.state)
        ref5, params5 = reference(2, options, opt=ref3, params=params3, first=3)
        expected.append((ref5, params5))

        # Into the unsharded fused optimizer.
        opt = fused.RMSprop(1e-2, **options)
        opt.state = full
        _, p = reference(2, options, opt=opt, params=params3, first=3)
        assert_trees_equal(p, params5)
        if not options:  # mlx's own RMSprop has no variants
            # It rounds float16 / bfloat16 after every op (the fused kernel
            # once): the assembled state must act as the unsharded one does in
            # it, and float32 leaves match the fused optimizer bit for bit.
            ends = []
            for state in (fused.RMSprop.assemble_state(per_rank), state3):
                opt = optim.RMSprop(1e-2)
                opt.state = state
                p = params3
                for step in (3, 4):
                    p = opt.apply_gradients(gradients_at(step, 0), p)
                    mx.eval(p)
                ends.append(p)
            assert_trees_equal(ends[0], ends[1])
            f32 = lambda t: {k: v for k, v in tree_flatten(t) if v.dtype == mx.float32}  # noqa: E731
            assert_trees_equal(f32(ends[0]), f32(params5))
        resume_cases.append({
            "first": 3, "steps": 2, "options": options,
            "full_state": str(tmp_path / f"{i}-full.safetensors"),
            "parameters": str(tmp_path / f"{i}-params.safetensors"),
        })

    # Into 3 ranks.
    reports = launch(3, "resume", resume_cases, resume_dir)
    for i, (ref5, params5) in enumerate(expected):
        assert [r["step"] for r in reports[i]] == [5, 5, 5]
        for p in rank_parameters(resume_dir, 3, i):
            assert_trees_equal(p, params5)
        again = fused.RMSprop.assemble_state(
            [mx.load(str(resume_dir / f"{i}-state{r}.safetensors")) for r in range(3)]
        )
        assert_trees_equal(again, ref5.state)


# ---- Launched: 8-bit state.

STATE8 = {"state_bits": 8, "min_8bit_size": 256}
STATE8_CASES = [
    {"options": {**STATE8, "momentum": 0.9, "nesterov": True, "bias_correction": True}, "bucket_bytes": 2**25},
    {"options": {**STATE8, **VARIANT, "eps_in_sqrt": True}, "bucket_bytes": 64},
]


def assert_pieces_at_blocks(per_rank: list[dict], sizes: dict[str, int]) -> int:
    """Every piece of an 8-bit leaf starts at a multiple of 256 of the leaf
    and ends at one or at the leaf's end; returns how many pieces start
    inside a leaf (the leaf is cut between ranks)."""
    inside = 0
    for flat in per_rank:
        for path, start, stop in eight_bit_pieces(flat):
            assert start % 256 == 0 and (stop % 256 == 0 or stop == sizes[path]), (path, start, stop)
            inside += start > 0
    return inside


def test_8bit_state_sharded_on_2_ranks_then_resumed_on_3(tmp_path):
    """8-bit state (the state8 model: leaves cut between ranks), plain and
    with variants. On 2 ranks, 3 steps of averaged gradients: sharded equals
    unsharded bit for bit on every rank, the ranks' state bytes add up to
    the unsharded optimizer's; pieces of 8-bit leaves are cut at
    block boundaries; assemble_state gives the unsharded state, and with
    full_precision=True its full_precision_state(). Both assembled states
    (8-bit and full precision) loaded into 3 ranks continue 2 steps
    bit-identically to the unsharded optimizer loaded with them, whose state
    the 3 ranks' pieces assemble to."""
    train_dir, resume_dir = tmp_path / "train", tmp_path / "resume"
    cases = [{"steps": 3, "model": "state8", "save_state": True, **case} for case in STATE8_CASES]
    sizes = {path: p.size for path, p in tree_flatten(initial_parameters("state8"))}
    resume_cases, expected = [], []
    for i, (case, reports) in enumerate(zip(cases, launch(2, "train", cases, train_dir))):
        options = case["options"]
        assert all(r["equal_unsharded"] and r["step"] == 3 for r in reports), f"case {i}"
        assert sum(r["state_nbytes"] for r in reports) == reports[0]["unsharded_state_nbytes"]
        params = rank_parameters(train_dir, 2, i)
        assert_trees_equal(params[1], params[0])
        assert all(mx.isfinite(p).all().item() for _, p in tree_flatten(params[0]))
        per_rank = [mx.load(str(train_dir / f"{i}-state{r}.safetensors")) for r in (1, 0)]
        assert assert_pieces_at_blocks(per_rank, sizes) >= 1
        plain = rank_parameters(train_dir, 2, i, kind="plain")[0]
        assert plain["layers"][0]["weight"]["v"].dtype == mx.uint8
        unsharded = fused.RMSprop(1e-2, **options)
        unsharded.state = plain
        for full_precision in (False, True):
            full = fused.RMSprop.assemble_state(per_rank, full_precision=full_precision)
            assert_trees_equal(full, unsharded.full_precision_state() if full_precision else plain)
            path = tmp_path / f"{i}-{full_precision}-full.safetensors"
            mx.save_safetensors(str(path), dict(tree_flatten(full)))
            mx.save_safetensors(str(tmp_path / f"{i}-params.safetensors"), dict(tree_flatten(params[0])))
            ref = fused.RMSprop(1e-2, **options)
            ref.state = tree_unflatten(list(mx.load(str(path)).items()))
            ref, p5 = reference(2, options, opt=ref, params=params[0], first=3, model="state8")
            expected.append((ref, p5))
            resume_cases.append({
                "first": 3, "steps": 2, "options": options, "model": "state8",
                "full_state": str(path), "parameters": str(tmp_path / f"{i}-params.safetensors"),
            })

    reports = launch(3, "resume", resume_cases, resume_dir)
    for i, (ref, p5) in enumerate(expected):
        assert [r["step"] for r in reports[i]] == [5, 5, 5]
        for p in rank_parameters(resume_dir, 3, i):
            assert_trees_equal(p, p5)
        per_rank = [mx.load(str(resume_dir / f"{i}-state{r}.safetensors")) for r in range(3)]
        assert assert_pieces_at_blocks(per_rank, sizes) >= 2
        assert_trees_equal(fused.RMSprop.assemble_state(per_rank), ref.state)


# ---- Launched: a bad rank.

BAD_CASES = {
    2: [
        ("shape", 1, "failed on rank 1: ValueError: RMSprop: leaf 'layers.1.weight'"),
        ("extra_leaf", 0, "failed on rank 0: ValueError: RMSprop: the gradients' leaves"),
        ("learning_rate", 1, "rank(s) [1] disagree with rank 0"),
    ],
    3: [("dtype", 2, "failed on rank 2: ValueError: RMSprop: leaf 'layers.1.weight': [rmsprop_step] gradient dtype int32")],
}


@pytest.mark.parametrize("n", [2, 3])
def test_a_bad_rank_fails_every_rank_cleanly(tmp_path, n):
    """One rank's bad gradient (wrong shape, wrong dtype, a leaf the state
    was not built for) or a rank out of step (another learning rate): every
    rank raises the same ShardedStepError naming the rank and the leaf,
    nothing changed, no rank hangs, and the next good step still equals the
    unsharded optimizer on every rank."""
    cases = [{"how": how, "bad_rank": bad, "options": VARIANT} for how, bad, _ in BAD_CASES[n]]
    for i, ((how, bad_rank, expect), reports) in enumerate(
        zip(BAD_CASES[n], launch(n, "bad_leaf", cases, tmp_path))
    ):
        messages = {r["error"]["message"] if r["error"] else None for r in reports}
        assert len(messages) == 1, messages  # the same error on every rank
        (message,) = messages
        assert message is not None, f"{how}: no rank raised"
        assert all(r["error"]["type"] == "ShardedStepError" for r in reports)
        assert expect in message, message
        assert set(reports[0]["error"]["rank_errors"]) == {str(bad_rank)}
        assert message.endswith("nothing changed on any rank")
        for report in reports:
            assert report["unchanged"]
            assert report["equal_unsharded_after"]
            assert report["step"] == 2
        params = rank_parameters(tmp_path, n, i)
        for p in params[1:]:
            assert_trees_equal(p, params[0])


# ---- Launched: the example.


@pytest.mark.parametrize("n", [2, 3])
def test_example_trains_data_parallel_with_sharded_state(tmp_path, n):
    """examples/digits_mlp.py under mlx.launch with --shard: ours and
    mlx.optimizers.RMSprop end bit-identical, the model learns, each rank
    holds ~1/N of the state, and the loss curve is written. (Needs
    scikit-learn, the `examples` extra; .ci/run installs it.)"""
    pytest.importorskip("sklearn", reason="the example needs scikit-learn (pip install '.[examples]')")
    out = tmp_path / "result.json"
    output = run_launch(
        n,
        [str(EXAMPLE), "--shard", "--epochs", "3", "--hidden", "32", "--lr", "3e-3",
         "--plot", str(tmp_path / "loss.png"), "--json", str(out)],
        tmp_path,
    )
    assert out.exists(), output
    result = json.loads(out.read_text())
    assert result["ranks"] == n and result["shard"] and result["bit_identical"], output
    fused_run, reference_run = result["results"]
    assert fused_run["accuracy"] == reference_run["accuracy"] > 0.85, output
    state = fused_run["state_bytes_per_rank"]
    assert sum(state) == reference_run["state_bytes_per_rank"][0] == fused_run["parameter_bytes"]
    assert max(state) <= math.ceil(sum(state) / 4 / n) * 4, state
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test accuracy" in output and "ms/step" in output


# ---- Single process: the singleton group (size 1).


@pytest.fixture
def group():
    return mx.distributed.init()


def test_singleton_group_equals_unsharded_and_mlx(group):
    """Size 1 runs the same code path (plan, agreement, gather): float32
    parameters equal mlx.optimizers.RMSprop's, all dtypes the unsharded
    optimizer's, with several buckets per dtype."""
    assert group.size() == 1
    sharded = fused.RMSprop(1e-2, shard_group=group, shard_bucket_bytes=40)
    plain = fused.RMSprop(1e-2)
    ps = pu = initial_parameters()
    for step in range(3):
        ps = sharded.apply_gradients(gradients_at(step, 0), ps)
        pu = plain.apply_gradients(gradients_at(step, 0), pu)
    assert_trees_equal(ps, pu)
    assert sharded.state_nbytes() == plain.state_nbytes()
    assert_trees_equal(fused.RMSprop.assemble_state([sharded.sharded_state_dict()]), plain.state)


def test_float32_state_beside_half_parameters(group):
    """state_dtype=float32: the pieces of float16 / bfloat16 leaves keep
    float32 state, and the assembled state is the unsharded one."""
    sharded = fused.RMSprop(1e-2, shard_group=group, state_dtype=mx.float32, centered=True)
    plain = fused.RMSprop(1e-2, state_dtype=mx.float32, centered=True)
    ps = pu = initial_parameters()
    for step in range(3):
        ps = sharded.apply_gradients(gradients_at(step, 0), ps)
        pu = plain.apply_gradients(gradients_at(step, 0), pu)
    assert_trees_equal(ps, pu)
    assert sharded.state["embed"]["v"].dtype == mx.float32
    assert_trees_equal(fused.RMSprop.assemble_state([sharded.sharded_state_dict()]), plain.state)


def test_schedule_and_step_count_as_unsharded(group):
    """A learning-rate schedule and the step counter advance as unsharded."""
    schedule = optim.cosine_decay(1e-2, 10)
    sharded = fused.RMSprop(schedule, shard_group=group, momentum=0.5, shard_bucket_bytes=48)
    plain = fused.RMSprop(schedule, momentum=0.5)
    ps = pu = initial_parameters()
    for step in range(4):
        ps = sharded.apply_gradients(gradients_at(step, 0), ps)
        pu = plain.apply_gradients(gradients_at(step, 0), pu)
        assert int(sharded.step) == int(plain.step) == step + 1
        assert sharded.learning_rate.item() == plain.learning_rate.item()
    assert_trees_equal(ps, pu)


def test_plan_balances_elements_and_splits_leaves():
    """The plan: rank r owns [rS, min((r+1)S, E)) of the flat vector; a leaf
    is split where a boundary falls in it; a leaf without elements gets an
    empty piece on rank 0; buckets of at most bucket_bytes per rank."""
    from mlx_fused_rmsprop._sharding import make_plan

    grads = {"a": mx.zeros((5,)), "e": mx.zeros((0, 2)), "b": mx.zeros((2, 2)), "c": mx.zeros((1,))}
    plan = make_plan(grads, 3, 1, bucket_bytes=8)  # E = 10, S = 4
    assert plan.share == 4
    got = [(plan.leaves[p.leaf].path, p.rank, p.start, p.stop, p.local) for p in plan.pieces]
    assert got == [
        ("a", 0, 0, 4, 0), ("a", 1, 4, 5, 0), ("e", 0, 0, 0, 4),
        ("b", 1, 0, 3, 1), ("b", 2, 3, 4, 0), ("c", 2, 0, 1, 1),
    ]
    assert [(b.lo, b.width) for b in plan.buckets] == [(0, 2), (2, 2)]  # 2 float32 per bucket
    assert [(p.leaf, p.start) for p in plan.own_pieces()] == [(0, 4), (2, 0)]
    # Fewer elements than ranks: the last ranks own nothing.
    plan = make_plan({"x": mx.zeros((2,))}, 3, 2, bucket_bytes=2**20)
    assert [(p.rank, p.start, p.stop) for p in plan.pieces] == [(0, 0, 1), (1, 1, 2)]


def test_bad_leaf_in_singleton_group_raises_sharded_error_and_changes_nothing(group):
    opt = fused.RMSprop(1e-2, shard_group=group, **VARIANT)
    params = initial_parameters()
    params = opt.apply_gradients(gradients_at(0, 0), params)
    before = dict(tree_flatten(opt.state))
    grads = gradients_at(1, 0)
    grads["layers"][0]["bias"] = mx.zeros((8,))
    with pytest.raises(fused.ShardedStepError, match=r"failed on rank 0: ValueError: .*'layers\.0\.bias'") as info:
        opt.apply_gradients(grads, params)
    assert isinstance(info.value, ValueError)
    assert set(info.value.rank_errors) == {0}
    assert_trees_equal(dict(tree_flatten(opt.state)), before)
    # check_gradients: the same check, local, raising the plain error.
    with pytest.raises(ValueError, match=r"'layers\.0\.bias'"):
        opt.check_gradients(grads, params)


def test_an_integer_leaf_names_the_fix_sharded_as_unsharded(group):
    """A trainable integer array (a counter on the model) gets the same
    advice sharded as unsharded: the freeze call that keeps it out."""
    params = {"w": mx.ones((4,)), "counter": mx.array([3], mx.int32)}
    grads = {"w": mx.ones((4,)), "counter": mx.array([1], mx.int32)}
    fix = r"model\.freeze\(keys=\['counter'\], recurse=False\)"
    with pytest.raises(fused.ShardedStepError, match=fix):
        fused.RMSprop(1e-2, shard_group=group).apply_gradients(grads, params)
    with pytest.raises(ValueError, match=fix):
        fused.RMSprop(1e-2).apply_gradients(grads, params)


def test_changed_leaves_after_init_are_rejected(group):
    opt = fused.RMSprop(1e-2, shard_group=group)
    params = initial_parameters()
    opt.apply_gradients(gradients_at(0, 0), params)
    grads = gradients_at(1, 0)
    del grads["scale"]
    with pytest.raises(fused.ShardedStepError, match="differ from the ones the sharded state was built for"):
        opt.apply_gradients(grads, params)
    assert int(opt.step) == 1


def test_load_full_state_into_singleton_continues_bit_identically(group):
    ref, p2 = reference(2, VARIANT)
    _, p4 = reference(2, VARIANT, opt=ref, params=p2, first=2)
    opt = fused.RMSprop(1e-2, shard_group=group, **VARIANT)
    saved, _ = reference(2, VARIANT)
    opt.load_full_state(dict(saved.state))
    assert int(opt.step) == 2  # the step is taken at once
    opt.init(initial_parameters())  # slices it now (else at the next step)
    assert_trees_equal(fused.RMSprop.assemble_state([opt.sharded_state_dict()]), saved.state)
    _, p = reference(2, VARIANT, opt=opt, params=p2, first=2)
    assert_trees_equal(p, p4)


def test_a_full_state_that_does_not_fit_fails_on_the_step(group):
    saved, params = reference(1, {})
    state = dict(saved.state)
    state["scale"] = {"v": mx.zeros((2,))}
    opt = fused.RMSprop(1e-2, shard_group=group)
    opt.state = state
    with pytest.raises(fused.ShardedStepError, match=r"'scale\.v' is \(2,\)"):
        opt.apply_gradients(gradients_at(1, 0), params)


def test_assemble_state_rejects_incomplete_sets():
    a = {"__shard__": mx.array([0, 2, 4], mx.int64), "step": mx.array(1), "x.v": mx.zeros((2,)),
         "x.__shard__": mx.array([0, 0, 2, 1, 4], mx.int64)}
    with pytest.raises(ValueError, match=r"ranks 0\.\.1 of one 2-rank group, got ranks \[0\]"):
        fused.RMSprop.assemble_state([a])
    b = {"__shard__": mx.array([1, 2, 4], mx.int64), "step": mx.array(1)}
    with pytest.raises(ValueError, match="do not cover"):
        fused.RMSprop.assemble_state([a, b])
    # A gap inside an entry: of three ranks, the middle one's piece is missing.
    ends = [{"__shard__": mx.array([r, 3, 6], mx.int64), "step": mx.array(1),
             "x.v": mx.zeros((2,)), "x.__shard__": mx.array([0, 2 * r, 2 * r + 2, 1, 6], mx.int64)}
            for r in (0, 2)]
    middle = {"__shard__": mx.array([1, 3, 6], mx.int64), "step": mx.array(1)}
    with pytest.raises(ValueError, match="do not cover"):
        fused.RMSprop.assemble_state([ends[0], middle, ends[1]])
    b_other_step = {**b, "x.v": mx.zeros((2,)), "x.__shard__": mx.array([0, 2, 4, 1, 4], mx.int64),
                    "step": mx.array(2)}
    with pytest.raises(ValueError, match="'step' differ"):
        fused.RMSprop.assemble_state([a, b_other_step])
    good = {**b_other_step, "step": mx.array(1)}
    assert fused.RMSprop.assemble_state([good, a])["x"]["v"].shape == (4,)
    with pytest.raises(ValueError, match="no '__shard__' entry"):
        fused.RMSprop.assemble_state([{"step": mx.array(1)}])


def test_options_are_checked(group):
    with pytest.raises(ValueError, match="shard_group should be None or an mlx.core.distributed.Group"):
        fused.RMSprop(1e-2, shard_group=2)
    with pytest.raises(ValueError, match="shard_bucket_bytes should be an int > 0"):
        fused.RMSprop(1e-2, shard_group=group, shard_bucket_bytes=0)
    with pytest.raises(ValueError, match="has no shard_group"):
        fused.RMSprop(1e-2).sharded_state_dict()
    with pytest.raises(ValueError, match="does not exist yet"):
        fused.RMSprop(1e-2, shard_group=group).sharded_state_dict()
    opt = fused.RMSprop.from_torch(momentum=0.5).sharded(group, bucket_bytes=64)
    assert opt.shard_group is group and opt.shard_bucket_bytes == 64
    with pytest.raises(ValueError, match="shard_bucket_bytes should be an int > 0"):
        opt.sharded(group, bucket_bytes=-1)
    opt.apply_gradients({"w": mx.ones((3,))}, {"w": mx.ones((3,))})
    with pytest.raises(ValueError, match="already has a state"):
        opt.sharded(None)
    assert opt.shard_group is group


def test_a_sharded_preset_equals_the_unsharded_preset(group):
    """sharded() composes with the presets (optax: bias correction, lr inside
    the momentum trace, nesterov)."""
    kw = dict(learning_rate=1e-2, momentum=0.9, nesterov=True, bias_correction=True, centered=True)
    sharded = fused.RMSprop.from_optax(**kw).sharded(group, bucket_bytes=32)
    plain = fused.RMSprop.from_optax(**kw)
    ps = pu = initial_parameters()
    for step in range(3):
        ps = sharded.apply_gradients(gradients_at(step, 0), ps)
        pu = plain.apply_gradients(gradients_at(step, 0), pu)
    assert_trees_equal(ps, pu)
    assert_trees_equal(fused.RMSprop.assemble_state([sharded.sharded_state_dict()]), plain.state)
