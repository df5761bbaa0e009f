"""A step happens fully or not at all; checkpoints round-trip; concurrent use."""

import threading

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_fused_rmsprop import RMSprop
from oracle import bit_equal

N_LEAVES = 8


def snapshot(tree):
    """A deep copy of every array in a tree (mx arrays are immutable, but the
    tree's containers are not)."""
    return tree_map(lambda a: mx.array(a) if isinstance(a, mx.array) else a, tree)


def assert_same_tree(a, b):
    """Same entries (in any order: safetensors sorts keys) with the same bits."""
    fa, fb = sorted(tree_flatten(a), key=lambda kv: kv[0]), sorted(tree_flatten(b), key=lambda kv: kv[0])
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        assert bit_equal(x, y), k


def eight_leaves(seed=0):
    key = mx.random.key(seed)
    keys = mx.random.split(key, N_LEAVES)
    return {
        "layers": [
            {"weight": mx.random.normal((4 + i, 3), key=keys[i]), "bias": mx.zeros((4 + i,))}
            for i in range(N_LEAVES // 2)
        ]
    }


def grads_for(params, scale=0.1):
    return tree_map(lambda p: mx.ones_like(p) * scale, params)


FIFTH = ("layers", 2, "weight")  # the 5th leaf in flattening order


def set_leaf(tree, path, value):
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def bad_step_cases():
    yield "shape", lambda g, s: set_leaf(g, FIFTH, mx.ones((2, 2))), r"gradient shape"
    yield "dtype", lambda g, s: set_leaf(g, FIFTH, mx.ones((6, 3), dtype=mx.int32)), r"gradient dtype int32"
    yield "integer_grad_and_param", None, r"parameter dtype int32"
    yield "missing_state", lambda g, s: s["layers"][2]["weight"].pop("v"), r"no entry"
    yield "misshaped_state", lambda g, s: s["layers"][2]["weight"].update(v=mx.zeros((3, 6))), r"state 'v' shape"
    yield "state_not_an_array", lambda g, s: s["layers"][2]["weight"].update(v="not an array"), r"state 'v' is str"
    yield "nan_lr_is_fine_but_string_is_not", lambda g, s: set_leaf(g, FIFTH, "not an array"), r"gradient is str"


@pytest.mark.parametrize("case", list(bad_step_cases()), ids=lambda c: c[0])
def test_bad_fifth_leaf_changes_nothing_then_training_continues(case):
    name, corrupt, message = case
    params = eight_leaves()
    opt = RMSprop(optim.exponential_decay(0.1, 0.9))
    params = opt.apply_gradients(grads_for(params), params)
    mx.eval(params, opt.state)
    state_before, params_before = snapshot(opt.state), snapshot(params)

    grads = grads_for(params, 0.2)
    if name == "integer_grad_and_param":
        set_leaf(params, FIFTH, mx.ones((6, 3), dtype=mx.int32))
        set_leaf(grads, FIFTH, mx.ones((6, 3), dtype=mx.int32))
    else:
        corrupt(grads, opt.state)
    with pytest.raises((ValueError, TypeError), match=rf"leaf 'layers\.2\.weight'.*{message}|{message}.*layers\.2\.weight"):
        opt.apply_gradients(grads, params)

    if name == "integer_grad_and_param":
        set_leaf(params, FIFTH, params_before["layers"][2]["weight"])
    if name in ("missing_state", "misshaped_state", "state_not_an_array"):
        opt.state["layers"][2]["weight"] = {"v": state_before["layers"][2]["weight"]["v"]}
    assert_same_tree(opt.state, state_before)  # step counter, lr and every v
    assert_same_tree(params, params_before)

    # It continues with good input exactly like an optimizer that never saw the bad step.
    twin = RMSprop(optim.exponential_decay(0.1, 0.9))
    twin.state = snapshot(state_before)
    good = grads_for(params, 0.3)
    assert_same_tree(opt.apply_gradients(good, params), twin.apply_gradients(good, snapshot(params_before)))
    assert_same_tree(opt.state, twin.state)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(6, 16), nn.Linear(16, 2)]
        self.norm = nn.LayerNorm(16)

    def __call__(self, x):
        return self.layers[1](nn.gelu(self.norm(self.layers[0](x))))


def make_net(seed=0):
    mx.random.seed(seed)
    net = Net()
    mx.eval(net.parameters())
    return net


def train(net, opt, steps, seed=1):
    x = mx.random.normal((32, 6), key=mx.random.key(seed))
    y = mx.random.normal((32, 2), key=mx.random.key(seed + 1))
    grad_fn = nn.value_and_grad(net, lambda m: nn.losses.mse_loss(m(x), y))
    for _ in range(steps):
        _, grads = grad_fn(net)
        opt.update(net, grads)
        mx.eval(net.parameters(), opt.state)


OPTIMIZERS = {"ours": RMSprop, "mlx": optim.RMSprop}


@pytest.mark.parametrize("saver,loader", [("ours", "ours"), ("ours", "mlx"), ("mlx", "ours")])
def test_safetensors_checkpoint_continues_bit_identically(tmp_path, saver, loader):
    make_opt = lambda name: OPTIMIZERS[name](optim.cosine_decay(0.05, 20), alpha=0.95)
    # Uninterrupted: 3 steps with the saver's optimizer, 3 more with the loader's kind.
    net = make_net()
    opt = make_opt(saver)
    train(net, opt, 3)
    path = str(tmp_path / "opt.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(opt.state)))
    mx.save_safetensors(str(tmp_path / "net.safetensors"), dict(tree_flatten(net.parameters())))
    continued = make_opt(loader)
    continued.state = snapshot(opt.state)
    train(net, continued, 3, seed=7)

    # Restored from files into a fresh process-like setup.
    restored_net = make_net(seed=123)
    restored_net.load_weights(str(tmp_path / "net.safetensors"))
    restored = make_opt(loader)
    restored.state = tree_unflatten(list(mx.load(path).items()))
    train(restored_net, restored, 3, seed=7)

    assert_same_tree(restored_net.parameters(), net.parameters())
    assert_same_tree(restored.state, continued.state)


def saved_state():
    net, opt = make_net(), RMSprop(0.01)
    train(net, opt, 2)
    return net, dict(tree_flatten(opt.state))


def load_into_fresh(net, flat_state):
    opt = RMSprop(0.01)
    opt.state = tree_unflatten(list(flat_state.items()))
    return opt


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.pop("layers.1.weight.v"), r"no entry 'layers\.1\.weight\.v'"),
        (lambda s: s.update({"layers.0.weight.m": s["layers.0.weight.v"]}), r"unexpected entry 'layers\.0\.weight\.m'"),
        (lambda s: s.update({"head.weight.v": mx.zeros((2, 2))}), r"unexpected entry 'head'"),
        (lambda s: s.update({"layers.2.weight.v": mx.zeros((2, 2))}), r"unexpected entry 'layers\.2' \(no parameter there\)"),
        (lambda s: s.update({"layers.0.bias.v": mx.zeros((3,))}), r"entry 'layers\.0\.bias\.v' is \(3,\)"),
        (lambda s: s.update({"norm.weight.v": s["norm.weight.v"].astype(mx.float16)}), r"'norm\.weight\.v' is \(16,\) mlx.core.float16"),
        (lambda s: s.update({"layers.0.bias.v": 0.5}), r"entry 'layers\.0\.bias\.v' is float, but the parameter is \(\d+,\)"),
        (lambda s: s.pop("step"), r"no entry 'step'"),
        (lambda s: s.pop("learning_rate"), r"no entry 'learning_rate'"),
    ],
    ids=["missing", "extra_key", "extra_path", "extra_list_element", "misshaped", "wrong_dtype",
         "not_an_array", "no_step",
         "no_lr"],
)
def test_bad_checkpoints_name_the_entry(edit, message):
    net, flat = saved_state()
    edit(flat)
    opt = load_into_fresh(net, flat)
    before = snapshot(net.parameters())
    x = mx.random.normal((4, 6))
    _, grads = nn.value_and_grad(net, lambda m: m(x).sum())(net)
    with pytest.raises(ValueError, match=message):
        opt.update(net, grads)
    assert_same_tree(net.parameters(), before)


@pytest.mark.parametrize("extra", ["head", "layers"], ids=["dict_key", "list_element"])
def test_a_loaded_state_with_a_gradient_that_has_no_parameter_names_the_gradient(extra):
    """After a checkpoint is loaded, a gradient with no parameter (a new dict
    key, or a gradient list longer than the model's) is reported as such,
    naming its path, not as a state entry the checkpoint lacks."""
    net, flat = saved_state()
    opt = load_into_fresh(net, flat)
    params = net.parameters()
    grads = tree_map(lambda p: mx.ones_like(p), params)
    if extra == "head":
        grads["head"] = mx.ones((3,))
        where = "head"
    else:
        grads["layers"] = grads["layers"] + [{"bias": mx.ones((2,))}]
        where = r"layers\.2\.bias"
    with pytest.raises(ValueError, match=rf"^RMSprop: leaf '{where}': no parameter for this gradient$"):
        opt.apply_gradients(grads, params)


def test_a_fresh_state_with_only_scalars_initializes_like_mlx():
    net = make_net()
    opt = RMSprop(0.01)
    opt.state = {"step": mx.array(5, mx.uint64), "learning_rate": mx.array(0.01)}
    ref_net, ref = make_net(), optim.RMSprop(0.01)
    ref.state = {"step": mx.array(5, mx.uint64), "learning_rate": mx.array(0.01)}
    train(net, opt, 2)
    train(ref_net, ref, 2)
    assert_same_tree(net.parameters(), ref_net.parameters())


def test_a_state_whose_step_is_a_plain_int_trains_like_mlx():
    """mlx.optimizers steps a Python int `step` as happily as an array (a
    state written by hand or by another tool); so does ours."""
    trained, ref_net = make_net(), make_net()
    opt, ref = RMSprop(0.01), optim.RMSprop(0.01)
    train(trained, opt, 1)
    train(ref_net, ref, 1)
    for o in (opt, ref):
        state = dict(o.state)
        state["step"] = 1
        o.state = state
    train(trained, opt, 3)
    train(ref_net, ref, 3)
    assert opt.state["step"] == ref.state["step"] == 4
    assert_same_tree(trained.parameters(), ref_net.parameters())
    without_step = lambda state: {k: v for k, v in state.items() if k != "step"}
    assert_same_tree(without_step(opt.state), without_step(ref.state))


def run_training(seed, stream=None):
    net, opt = make_net(seed), RMSprop(optim.exponential_decay(0.02, 0.97))
    if stream is None:
        train(net, opt, 12, seed=seed)
    else:
        with mx.stream(stream):
            train(net, opt, 12, seed=seed)
    return net.parameters(), opt.state


def test_two_optimizers_on_two_threads_and_streams_match_sequential_runs():
    expected = [run_training(seed) for seed in (10, 20)]
    results, errors = [None, None], []

    def worker(i, seed):
        try:
            # Streams belong to the thread that makes them (mlx >= 0.32).
            results[i] = run_training(seed, mx.new_stream(mx.cpu))
        except Exception as e:  # surfaced below, not swallowed
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i, s)) for i, s in enumerate((10, 20))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock: a training thread did not finish"
    assert not errors, errors
    for got, want in zip(results, expected):
        assert_same_tree(got[0], want[0])
        assert_same_tree(got[1], want[1])
