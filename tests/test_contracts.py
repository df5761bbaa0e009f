"""Each public method's documented result, asserted directly on non-trivial
input (mixed dtypes, every state entry, pieces of leaves split between ranks),
and the sharded state's edge paths.

The oracles are the documents, not the code: the state names and dtypes as
the docstrings list them, the bytes they take, the sharded layout of
RMSprop's docstring (rank r owns the flat elements [rS, min((r+1)S, E)),
S = ceil(E/N), leaves in tree_flatten order) and sharded_state_dict's keys.
Ranks other than 0 of 1 come from tests/fake_ranks.py (init and checkpoints
are local); the launched tests cover steps over real ranks.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_map

from fake_ranks import rank_state_dicts, sharded_at
from mlx_fused_rmsprop import RMSprop
from oracle import assert_trees_bit_equal_in_any_order as assert_trees_bit_equal, bit_equal

GROUP = mx.distributed.init()  # the singleton group
EVERY_ENTRY = {"centered": True, "momentum": 0.9}
NAMES = ("v", "mean", "momentum_buffer")


def mixed_tree(seed: int = 0, scale: float = 1.0) -> dict:
    """Leaves of every dtype the CPU updates, one in a list: E = 25."""
    key = iter(mx.random.split(mx.random.key(seed), 4))
    normal = lambda shape, dtype: (scale * mx.random.normal(shape, key=next(key))).astype(dtype)  # noqa: E731
    return {
        "a": normal((3, 4), mx.float32),
        "h": [normal((5,), mx.float16), normal((2, 3), mx.bfloat16)],
        "d": normal((2,), mx.float64),
    }


def trained(options: dict, steps: int = 2, opt: RMSprop | None = None) -> tuple[RMSprop, dict]:
    opt = opt or RMSprop(0.01, **options)
    params = mixed_tree()
    for k in range(steps):
        params = opt.apply_gradients(mixed_tree(10 + k, 0.1), params)
        mx.eval(params, opt.state)
    return opt, params


def state_itemsize(param: mx.array, state_dtype) -> int:
    """The documented state dtype: the parameter's, or float32 beside a
    float16 / bfloat16 parameter when state_dtype=mx.float32."""
    half = param.dtype in (mx.float16, mx.bfloat16)
    return 4 if state_dtype is not None and half else param.dtype.size


def owned(sizes: list[int], rank: int, ranks: int) -> list[tuple[int, int, int]]:
    """(leaf, start, stop) of the elements rank ``rank`` owns (the docstring's layout)."""
    total = sum(sizes)
    share = -(-total // ranks)
    lo, hi = rank * share, min((rank + 1) * share, total)
    out, offset = [], 0
    for leaf, size in enumerate(sizes):
        a, b = max(lo, offset), min(hi, offset + size)
        if a < b:
            out.append((leaf, a - offset, b - offset))
        offset += size
    return out


# ---- state_names, state_dtype_of, init, init_single, apply_single.


@pytest.mark.parametrize(
    "options,names",
    [({}, ("v",)), ({"centered": True}, ("v", "mean")), ({"momentum": 0.9}, ("v", "momentum_buffer")),
     (EVERY_ENTRY, NAMES), ({**EVERY_ENTRY, "nesterov": True, "bias_correction": True}, NAMES)],
    ids=["plain", "centered", "momentum", "both", "all_options"],
)
def test_state_names_are_the_documented_entries_and_the_state_holds_exactly_them(options, names):
    opt = RMSprop(0.01, **options)
    assert opt.state_names == names
    opt.init(mixed_tree())
    for path, leaf_state in [("a", opt.state["a"]), ("h.0", opt.state["h"][0]), ("d", opt.state["d"])]:
        assert tuple(leaf_state) == names, path


@pytest.mark.parametrize("state_dtype", [None, mx.float32], ids=["param_dtype", "float32"])
def test_state_dtype_of_and_init_single_make_the_documented_state(state_dtype):
    """v starts at initial_scale, mean and momentum_buffer at 0, all in
    state_dtype_of(parameter): the parameter's dtype, or float32 for a
    float16 / bfloat16 parameter with state_dtype=float32 (not float64)."""
    opt = RMSprop(0.01, initial_scale=0.25, state_dtype=state_dtype, **EVERY_ENTRY)
    for dtype in (mx.float32, mx.float16, mx.bfloat16, mx.float64):
        param = mx.ones((2, 3), dtype)
        want = mx.float32 if state_dtype is not None and dtype in (mx.float16, mx.bfloat16) else dtype
        assert opt.state_dtype_of(param) == want
        state: dict = {}
        assert opt.init_single(param, state) is None
        assert tuple(state) == NAMES
        for name, start in (("v", 0.25), ("mean", 0.0), ("momentum_buffer", 0.0)):
            assert state[name].dtype == want and state[name].shape == (2, 3), (dtype, name)
            assert mx.all(state[name] == start).item(), (dtype, name)


def test_apply_single_is_mlx_s_update_of_one_leaf_and_stores_v():
    """The update of mlx.optimizers.RMSprop.apply_single, bit for bit, with
    the new v written into the state dict given."""
    grad, param = mx.random.normal((7, 5), key=mx.random.key(1)), mx.random.normal((7, 5), key=mx.random.key(2))
    v0 = mx.abs(mx.random.normal((7, 5), key=mx.random.key(3)))
    ours, ref = RMSprop(0.05, alpha=0.9), optim.RMSprop(0.05, alpha=0.9)
    ours_state, ref_state = {"v": v0}, {"v": v0}
    assert bit_equal(ours.apply_single(grad, param, ours_state), ref.apply_single(grad, param, ref_state))
    assert bit_equal(ours_state["v"], ref_state["v"]) and not bit_equal(ours_state["v"], v0)


# ---- state_nbytes.


@pytest.mark.parametrize("state_dtype", [None, mx.float32], ids=["param_dtype", "float32"])
@pytest.mark.parametrize("options", [{}, EVERY_ENTRY], ids=["plain", "every_entry"])
def test_state_nbytes_is_the_bytes_of_every_state_entry(options, state_dtype):
    """Bytes, not elements: float16 / bfloat16 state takes 2 bytes an
    element, float64 8, float32 state beside half parameters 4; times the
    number of state entries; step and learning_rate not counted."""
    opt = RMSprop(0.01, state_dtype=state_dtype, **options)
    assert opt.state_nbytes() == 0  # no state yet
    opt, _ = trained(options, opt=opt)
    params = mixed_tree()
    per_entry = sum(p.size * state_itemsize(p, state_dtype) for _, p in tree_flatten(params))
    assert opt.state_nbytes() == per_entry * len(opt.state_names)
    # By hand for the plain case: 12 * 4 + 5 * 2 + 6 * 2 + 2 * 8.
    if not options and state_dtype is None:
        assert opt.state_nbytes() == 86


def test_state_nbytes_equals_mlx_s_state_bytes():
    opt, ref = RMSprop(0.01), optim.RMSprop(0.01)
    params = mixed_tree()
    for o in (opt, ref):
        mx.eval(o.apply_gradients(mixed_tree(10, 0.1), params), o.state)
    ref_bytes = sum(v.nbytes for k, v in tree_flatten(ref.state) if k not in ("step", "learning_rate"))
    assert opt.state_nbytes() == ref_bytes


@pytest.mark.parametrize("ranks", [2, 3, 30])
def test_sharded_state_nbytes_is_this_rank_s_share_in_bytes(ranks):
    """Rank r holds the state of exactly the elements it owns, in their
    state dtypes; the ranks' bytes add up to the unsharded optimizer's (30
    ranks: more ranks than the 25 elements, the last ones hold nothing)."""
    params = mixed_tree()
    leaves = [p for _, p in tree_flatten(params)]
    unsharded, _ = trained(EVERY_ENTRY, steps=1)
    total = 0
    for r in range(ranks):
        opt = sharded_at(r, ranks, params, state_dtype=mx.float32, **EVERY_ENTRY)
        want = sum((b - a) * state_itemsize(leaves[i], mx.float32) for i, a, b in owned([p.size for p in leaves], r, ranks))
        assert opt.state_nbytes() == want * 3, r
        total += opt.state_nbytes()
    plain = RMSprop(0.01, state_dtype=mx.float32, **EVERY_ENTRY)
    plain.init(params)
    assert total == plain.state_nbytes()
    assert unsharded.state_nbytes() < total  # (float32 state beside the halves: more)


# ---- sharded_state_dict and assemble_state.


def test_sharded_state_dict_holds_the_documented_keys_and_pieces():
    """Rank 1 of 3 over E = 25 elements (S = 9): it owns a[9:12], h.0[0:5]
    and h.1[0:1]; its dict holds step, learning_rate, __shard__ = [rank,
    ranks, E, digest...], and per piece '<path>.<name>' (the piece's
    elements of the full state entry, 1-D) and '<path>.__shard__' =
    [leaf index, start, stop, ndim, *shape]."""
    full, params = trained(EVERY_ENTRY)
    flat = sharded_at(1, 3, params, full.state, **EVERY_ENTRY).sharded_state_dict()
    pieces = owned([p.size for _, p in tree_flatten(params)], 1, 3)
    assert pieces == [(0, 9, 12), (1, 0, 5), (2, 0, 1)]
    paths = [k for k, _ in tree_flatten(params)]
    assert set(flat) == {"step", "learning_rate", "__shard__"} | {
        f"{paths[i]}.{suffix}" for i, _, _ in pieces for suffix in (*NAMES, "__shard__")
    }
    assert flat["__shard__"].dtype == mx.int64 and flat["__shard__"].tolist()[:3] == [1, 3, 25]
    assert bit_equal(flat["step"], mx.array(full.state["step"]))
    full_flat = dict(tree_flatten(full.state))
    for leaf, start, stop in pieces:
        shape = tree_flatten(params)[leaf][1].shape
        record = flat[f"{paths[leaf]}.__shard__"]
        assert record.dtype == mx.int64 and record.tolist() == [leaf, start, stop, len(shape), *shape]
        for name in NAMES:
            piece = flat[f"{paths[leaf]}.{name}"]
            assert piece.shape == (stop - start,)
            assert bit_equal(piece, full_flat[f"{paths[leaf]}.{name}"].reshape(-1)[start:stop])


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_assemble_state_of_every_rank_in_any_order_is_the_full_state(ranks):
    full, params = trained(EVERY_ENTRY)
    per_rank = rank_state_dicts(full.state, params, ranks, **EVERY_ENTRY)
    assert_trees_bit_equal(RMSprop.assemble_state(per_rank[::-1]), full.state)


def test_assemble_state_rejects_the_ranks_of_two_models():
    """Rank 0 of a model {a, b} and rank 1 of a model {a, c} (each 8
    elements, so element counts and pieces fit together) are two models: the
    join is refused, not silently made into {a, c}."""
    def full_state(params):
        opt = RMSprop(0.1)
        mx.eval(opt.apply_gradients(params, params), opt.state)
        return opt.state

    ab = {"a": mx.ones((4,)), "b": mx.ones((4,))}
    ac = {"a": mx.ones((4,)), "c": mx.full((4,), 2.0)}
    rank0 = rank_state_dicts(full_state(ab), ab, 2)[0]
    rank1 = rank_state_dicts(full_state(ac), ac, 2)[1]
    with pytest.raises(ValueError, match="the states come from different models"):
        RMSprop.assemble_state([rank0, rank1])
    # Element counts that differ too.
    abc = {**ab, "c": mx.ones((2,))}
    with pytest.raises(ValueError, match="the states come from different models"):
        RMSprop.assemble_state([rank0, rank_state_dicts(full_state(abc), abc, 2)[1]])
    # The ranks of one model still assemble.
    assert sorted(RMSprop.assemble_state(rank_state_dicts(full_state(ab), ab, 2))) == ["a", "b", "learning_rate", "step"]


# ---- Sharded edge paths.


def test_a_sharded_optimizer_given_only_step_and_learning_rate_initializes_like_unsharded():
    """A state holding only the scalars (a fresh checkpoint) makes the
    sharded optimizer create its state at the next step, as the unsharded
    one (and mlx.optimizers) do, counting on from the loaded step."""
    scalars = {"step": mx.array(3, mx.uint64), "learning_rate": mx.array(0.02)}
    sharded, plain = RMSprop(0.01, shard_group=GROUP, **EVERY_ENTRY), RMSprop(0.01, **EVERY_ENTRY)
    sharded.state, plain.state = dict(scalars), dict(scalars)
    ps = pu = mixed_tree()
    for k in range(2):
        ps = sharded.apply_gradients(mixed_tree(10 + k, 0.1), ps)
        pu = plain.apply_gradients(mixed_tree(10 + k, 0.1), pu)
    assert int(sharded.step) == int(plain.step) == 5
    assert_trees_bit_equal(ps, pu)
    assert_trees_bit_equal(RMSprop.assemble_state([sharded.sharded_state_dict()]), plain.state)
    # Rank 1 of 2 (init, local) creates its pieces the same way.
    rank1 = sharded_at(1, 2, mixed_tree(), dict(scalars), **EVERY_ENTRY)
    assert int(rank1.step) == 3 and rank1.state_nbytes() > 0


@pytest.mark.parametrize("load", ["load_full_state", "state"])
def test_sharded_after_loading_a_full_state_keeps_it(load):
    """RMSprop(...).load_full_state(full) (or .state = full), then
    .sharded(group): the loaded state is sliced, not dropped -- the next
    steps continue bit-identically to the unsharded optimizer."""
    saved, params = trained(EVERY_ENTRY)
    reference, _ = trained(EVERY_ENTRY)
    opt = RMSprop(0.01, **EVERY_ENTRY)
    full = tree_map(lambda x: x, saved.state)
    if load == "state":
        opt.state = full
    else:
        opt.load_full_state(full)
    assert opt.sharded(GROUP) is opt and opt.shard_group is GROUP
    pr = ps = params
    for k in range(2, 4):
        pr = reference.apply_gradients(mixed_tree(10 + k, 0.1), pr)
        ps = opt.apply_gradients(mixed_tree(10 + k, 0.1), ps)
    assert int(opt.step) == 4
    assert_trees_bit_equal(ps, pr)
    assert_trees_bit_equal(RMSprop.assemble_state([opt.sharded_state_dict()]), reference.state)


@pytest.mark.parametrize("then", [None, "sharded(group)", "sharded(None)"])
def test_load_full_state_replaces_the_pieces_of_a_sharded_optimizer_that_stepped(then):
    """A sharded optimizer that already has its pieces, given another full
    state (a checkpoint of another run), continues from that state, not
    from its own pieces -- also when it is re-sharded (another bucket size)
    or unsharded before the next step: bit-identical to the unsharded
    optimizer given it."""
    saved, params = trained(EVERY_ENTRY, steps=3)
    opt, _ = trained(EVERY_ENTRY, steps=1, opt=RMSprop(0.01, shard_group=GROUP, **EVERY_ENTRY))
    reference = RMSprop(0.01, **EVERY_ENTRY)
    reference.state = tree_map(lambda x: x, saved.state)
    opt.load_full_state(tree_map(lambda x: x, saved.state))
    if then == "sharded(group)":
        assert opt.sharded(GROUP, bucket_bytes=64) is opt
    elif then == "sharded(None)":
        assert opt.sharded(None) is opt and opt.shard_group is None
    pr = ps = params
    for k in range(3, 5):
        pr = reference.apply_gradients(mixed_tree(10 + k, 0.1), pr)
        ps = opt.apply_gradients(mixed_tree(10 + k, 0.1), ps)
    assert int(opt.step) == int(reference.step) == 5
    assert_trees_bit_equal(ps, pr)
    state = opt.state if then == "sharded(None)" else RMSprop.assemble_state([opt.sharded_state_dict()])
    assert_trees_bit_equal(state, reference.state)


def test_sharded_after_load_still_checks_the_loaded_state():
    saved, params = trained({})
    state = dict(saved.state)
    state["a"] = {"v": mx.zeros((3,))}
    opt = RMSprop(0.01)
    opt.load_full_state(state)
    opt.sharded(GROUP)
    with pytest.raises(ValueError, match=r"'a\.v' is \(3,\)"):
        opt.apply_gradients(mixed_tree(10, 0.1), params)
    assert int(opt.step) == 2


def test_load_full_state_unsharded_is_assigning_the_state_and_continues_like_mlx():
    saved, params = trained({})
    f32 = {"w": params["a"]}
    ours, ref = RMSprop(0.01), optim.RMSprop(0.01)
    state = {"step": saved.state["step"], "learning_rate": saved.state["learning_rate"], "w": dict(saved.state["a"])}
    ours.load_full_state(tree_map(lambda x: x, state))
    ref.state = tree_map(lambda x: x, state)
    assert ours.state is not None and int(ours.step) == 2
    grads = {"w": mx.cos(params["a"])}
    assert bit_equal(ours.apply_gradients(grads, f32)["w"], ref.apply_gradients(grads, f32)["w"])
    assert bit_equal(ours.state["w"]["v"], ref.state["w"]["v"])
    assert bit_equal(ours.learning_rate, state["learning_rate"])
