"""mlx_fused_rmsprop.RMSprop as a drop-in for mlx.optimizers.RMSprop."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_map

import mlx_fused_rmsprop
from mlx_fused_rmsprop import RMSprop
from oracle import bit_equal


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 3)]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


def make_model(seed=0):
    mx.random.seed(seed)
    model = MLP()
    mx.eval(model.parameters())
    return model


def clone(model):
    twin = MLP()
    twin.update(tree_map(lambda a: mx.array(a), model.parameters()))
    mx.eval(twin.parameters())
    return twin


def data(seed=1, n=64):
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    return mx.random.normal((n, 12), key=k1), mx.random.randint(0, 3, (n,), key=k2)


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def train(model, opt, steps, x, y):
    step_fn = nn.value_and_grad(model, loss_fn)
    losses = []
    for _ in range(steps):
        loss, grads = step_fn(model, x, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    return losses


def assert_trees_bit_equal(a, b):
    fa, fb = tree_flatten(a), tree_flatten(b)
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        assert bit_equal(x, y), k


def test_training_matches_reference_loss_for_loss(device):
    x, y = data()
    ours_model = make_model()
    ref_model = clone(ours_model)
    ours = train(ours_model, RMSprop(learning_rate=1e-2), 15, x, y)
    ref = train(ref_model, optim.RMSprop(learning_rate=1e-2), 15, x, y)
    assert ours[-1] < ours[0]  # it trains
    if device == mx.cpu:
        assert ours == ref
        assert_trees_bit_equal(ours_model.parameters(), ref_model.parameters())
    else:
        assert ours == pytest.approx(ref, rel=1e-4)


def test_state_layout_is_the_references():
    x, y = data()
    ours, ref = RMSprop(learning_rate=1e-2), optim.RMSprop(learning_rate=1e-2)
    train(make_model(), ours, 2, x, y)
    train(make_model(), ref, 2, x, y)
    assert [k for k, _ in tree_flatten(ours.state)] == [
        k for k, _ in tree_flatten(ref.state)
    ]
    assert_trees_bit_equal(ours.state, ref.state)
    assert ours.state["step"].item() == 2


def test_init_creates_state_before_first_update():
    model = make_model()
    opt = RMSprop(learning_rate=0.1)
    opt.init(model.trainable_parameters())
    assert set(opt.state.keys()) == {"step", "learning_rate", "layers"}
    v = opt.state["layers"][0]["weight"]["v"]
    assert v.shape == model.layers[0].weight.shape and not v.any().item()


SCHEDULES = {
    "exponential_decay": lambda: optim.exponential_decay(0.1, 0.9),
    "cosine_decay": lambda: optim.cosine_decay(0.1, 10, 1e-3),
    "step_decay": lambda: optim.step_decay(0.1, 0.5, 3),
    "warmup_then_cosine": lambda: optim.join_schedules(
        [optim.linear_schedule(0.0, 0.1, 3), optim.cosine_decay(0.1, 10)], [3]
    ),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_learning_rate_schedules(name):
    x, y = data()
    ours_model = make_model()
    ref_model = clone(ours_model)
    ours, ref = RMSprop(SCHEDULES[name]()), optim.RMSprop(SCHEDULES[name]())
    ours_losses = train(ours_model, ours, 8, x, y)
    ref_losses = train(ref_model, ref, 8, x, y)
    assert ours_losses == ref_losses
    assert bit_equal(ours.learning_rate, ref.learning_rate)
    assert_trees_bit_equal(ours_model.parameters(), ref_model.parameters())


def test_learning_rate_can_be_set_between_steps():
    x, y = data()
    ours_model, opt = make_model(), RMSprop(1e-2)
    ref_model, ref = clone(ours_model), optim.RMSprop(1e-2)
    for lr in (1e-2, 3e-3, 0.0):
        opt.learning_rate = lr
        ref.learning_rate = lr
        train(ours_model, opt, 2, x, y)
        train(ref_model, ref, 2, x, y)
    assert_trees_bit_equal(ours_model.parameters(), ref_model.parameters())


def test_compiled_step_matches_eager_and_does_not_retrace_on_schedule():
    x, y = data()
    eager_model = make_model()
    compiled_model = clone(eager_model)
    eager_opt = RMSprop(optim.exponential_decay(0.05, 0.8))
    compiled_opt = RMSprop(optim.exponential_decay(0.05, 0.8))
    traces = []
    # Initialized up front: a first update would otherwise grow the state
    # tree inside the compiled function and retrace once (as with mlx's own).
    compiled_opt.init(compiled_model.trainable_parameters())
    state = [compiled_model.state, compiled_opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y, grads):
        traces.append(1)
        compiled_opt.update(compiled_model, grads)

    grad_fn = nn.value_and_grad(eager_model, loss_fn)
    compiled_grad_fn = nn.value_and_grad(compiled_model, loss_fn)
    for _ in range(6):
        _, grads = grad_fn(eager_model, x, y)
        eager_opt.update(eager_model, grads)
        mx.eval(eager_model.parameters(), eager_opt.state)
        _, cgrads = compiled_grad_fn(compiled_model, x, y)
        step(x, y, cgrads)
        mx.eval(state)
    assert len(traces) == 1, "the learning-rate schedule made mx.compile retrace"
    assert_trees_bit_equal(compiled_model.parameters(), eager_model.parameters())
    assert bit_equal(compiled_opt.learning_rate, eager_opt.learning_rate)


def compiled_training(model, opt, steps, x, y):
    """``steps`` steps of a step compiled as mlx-lm's trainer compiles it:
    the model's and the optimizer's state dicts, captured once, as inputs
    and outputs."""
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        opt.update(model, grads)
        return loss

    return [step(x, y).item() for _ in range(steps)]


def test_compiled_full_training_step_trains_like_reference():
    x, y = data()
    models = {"ours": make_model(), "ref": None}
    models["ref"] = clone(models["ours"])
    opts = {"ours": RMSprop(1e-2), "ref": optim.RMSprop(1e-2)}
    losses = {name: compiled_training(models[name], opts[name], 10, x, y) for name in models}
    assert losses["ours"][-1] < losses["ours"][0]
    assert losses["ours"] == pytest.approx(losses["ref"], rel=1e-5)


@pytest.mark.parametrize("options", [{}, {"state_bits": 8, "min_8bit_size": 0}])
def test_a_compiled_run_resumed_from_an_assigned_state_continues_exactly(options):
    """docs/training.md's mlx-lm resume recipe without mlx-lm: a state assigned to
    a new optimizer and then stepped under mx.compile. The assigned state is
    converted and checked at the first step, inside the trace: the dict the
    compiled step captured must stay the optimizer's state (a replaced dict
    left the optimizer holding the trace's placeholders)."""
    x, y = data()
    once_model, once = make_model(), RMSprop(1e-2, **options)
    once_losses = compiled_training(once_model, once, 6, x, y)
    model, first = make_model(), RMSprop(1e-2, **options)
    losses = compiled_training(model, first, 3, x, y)
    resumed = RMSprop(1e-2, **options)
    resumed.state = tree_map(lambda a: mx.array(a), first.state)
    losses += compiled_training(model, resumed, 3, x, y)
    assert losses == once_losses
    assert resumed.state["step"].item() == 6
    assert_trees_bit_equal(resumed.state, once.state)
    assert_trees_bit_equal(model.parameters(), once_model.parameters())


@pytest.mark.parametrize("direction", ["ours_to_mlx", "mlx_to_ours"])
def test_state_interchange(direction):
    x, y = data()
    first_cls, second_cls = (
        (RMSprop, optim.RMSprop) if direction == "ours_to_mlx" else (optim.RMSprop, RMSprop)
    )
    model = make_model()
    first = first_cls(learning_rate=1e-2, alpha=0.9)
    train(model, first, 3, x, y)
    # Continue from the same point with the same optimizer and with the other.
    same_model, other_model = clone(model), clone(model)
    same = first
    other = second_cls(learning_rate=1e-2, alpha=0.9)
    other.state = tree_map(lambda a: mx.array(a), first.state)
    snapshot = tree_map(lambda a: mx.array(a), first.state)
    same.state = snapshot
    same_losses = train(same_model, same, 3, x, y)
    other_losses = train(other_model, other, 3, x, y)
    assert same_losses == other_losses
    assert_trees_bit_equal(same_model.parameters(), other_model.parameters())
    assert_trees_bit_equal(same.state, other.state)


def test_apply_gradients_on_plain_trees():
    params = {"a": mx.ones((3,)), "b": [mx.zeros((2, 2)), {"c": mx.full((4,), 2.0)}]}
    grads = tree_map(lambda p: p * 0.5 + 1, params)
    ours = RMSprop(0.1).apply_gradients(grads, params)
    ref = optim.RMSprop(0.1).apply_gradients(grads, params)
    assert_trees_bit_equal(ours, ref)


def test_gradients_may_cover_a_subset_of_parameters():
    params = {"a": mx.ones((3,)), "frozen": mx.ones((5,))}
    grads = {"a": mx.full((3,), 0.25)}
    ours = RMSprop(0.1).apply_gradients(grads, params)
    ref = optim.RMSprop(0.1).apply_gradients(grads, params)
    assert set(ours) == {"a"}
    assert_trees_bit_equal(ours, ref)


@pytest.mark.parametrize(
    "kwargs",
    [dict(alpha=-0.1), dict(eps=0.0), dict(eps=-1e-3)],
    ids=["alpha<0", "eps=0", "eps<0"],
)
def test_hyperparameter_validation_matches_mlx(kwargs):
    with pytest.raises(ValueError) as ours:
        RMSprop(learning_rate=0.1, **kwargs)
    with pytest.raises(ValueError) as ref:
        optim.RMSprop(learning_rate=0.1, **kwargs)
    assert str(ours.value) == str(ref.value)


@pytest.mark.parametrize(
    "kwargs", [dict(alpha=0.0), dict(alpha=1.0), dict(alpha=1.5), dict(eps=1e-30)], ids=str
)
def test_edge_hyperparameters_mlx_accepts_are_accepted(kwargs):
    """The edges of mlx's validation (alpha = 0 or > 1, a tiny eps) train
    exactly like mlx.optimizers.RMSprop."""
    params = {"w": mx.linspace(-1, 1, 20)}
    grads = {"w": mx.sin(params["w"] * 3)}
    ours = RMSprop(0.1, **kwargs).apply_gradients(grads, params)
    ref = optim.RMSprop(0.1, **kwargs).apply_gradients(grads, params)
    assert_trees_bit_equal(ours, ref)


@pytest.mark.parametrize("name", ["momentum", "weight_decay", "initial_scale"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -0.5], ids=["inf", "nan", "negative"])
def test_non_finite_or_negative_variant_options_raise_at_construction(name, value):
    """momentum, weight_decay and initial_scale must be finite and >= 0: the
    constructor says so by name, before any step (the fused op would reject
    them only at the first step)."""
    with pytest.raises(ValueError, match=f"RMSprop {name} should be a finite number >= 0"):
        RMSprop(0.1, **{name: value})


def test_hyperparameters_set_between_steps_take_effect_like_mlx():
    """opt.alpha and opt.eps set after construction (as on
    mlx.optimizers.RMSprop, whose apply_single reads them every step) change
    the next fused step: the parameters and state stay bit-equal to mlx's."""
    params = {"w": mx.linspace(-1, 1, 40).reshape(5, 8)}
    ours, ref = RMSprop(0.05), optim.RMSprop(0.05)
    p_ours = p_ref = params
    for k, (alpha, eps) in enumerate([(0.99, 1e-8), (0.5, 1e-8), (0.5, 0.25), (0.9, 1e-3)]):
        for opt in (ours, ref):
            opt.alpha, opt.eps = alpha, eps
        grads = {"w": mx.sin(p_ref["w"] * (k + 2))}
        p_ours = ours.apply_gradients(grads, p_ours)
        p_ref = ref.apply_gradients(grads, p_ref)
        mx.eval(p_ours, p_ref, ours.state, ref.state)
        assert_trees_bit_equal(p_ours, p_ref)
        assert_trees_bit_equal(ours.state, ref.state)


def test_assigning_a_fresh_state_to_a_stepped_optimizer_initializes_it_like_mlx():
    """opt.state = {step, learning_rate} after training: the next step
    creates the state again, as mlx.optimizers does."""
    params = {"w": mx.linspace(-1, 1, 20)}
    grads = {"w": mx.cos(params["w"])}
    ours, ref = RMSprop(0.1), optim.RMSprop(0.1)
    for opt in (ours, ref):
        opt.apply_gradients(grads, params)
        opt.state = {"step": mx.array(0, mx.uint64), "learning_rate": mx.array(0.1)}
    assert_trees_bit_equal(ours.apply_gradients(grads, params), ref.apply_gradients(grads, params))
    assert_trees_bit_equal(ours.state, ref.state)


def test_constructor_signature_and_defaults_match_mlx():
    import inspect

    ours = inspect.signature(RMSprop.__init__).parameters
    ref = inspect.signature(optim.RMSprop.__init__).parameters
    # mlx's parameters first, the same names, kinds and defaults; every
    # option after them is keyword-only, so no positional call changes.
    shared = list(ours.values())[: len(ref)]
    assert [(p.name, p.kind, p.default) for p in shared] == [
        (p.name, p.kind, p.default) for p in ref.values()
    ]
    extra = list(ours.values())[len(ref):]
    assert extra and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)
    assert isinstance(RMSprop(0.1), optim.Optimizer)


def test_integer_leaf_raises_naming_its_path():
    params = {"layers": [{"weight": mx.ones((2, 2)), "steps": mx.zeros((3,), dtype=mx.int32)}]}
    grads = tree_map(lambda p: mx.ones_like(p), params)
    opt = RMSprop(0.1)
    with pytest.raises(ValueError, match=r"leaf 'layers\.0\.steps'.*int32"):
        opt.apply_gradients(grads, params)


def test_shape_mismatch_raises_naming_its_path():
    params = {"layers": [{"weight": mx.ones((2, 3))}]}
    grads = {"layers": [{"weight": mx.ones((3, 2))}]}
    with pytest.raises(ValueError, match=r"leaf 'layers\.0\.weight'.*gradient shape \(3,2\).*\(2,3\)"):
        RMSprop(0.1).apply_gradients(grads, params)


def test_dtype_mismatch_raises_naming_its_path():
    params = {"w": mx.ones((4,), dtype=mx.float16)}
    grads = {"w": mx.ones((4,), dtype=mx.float32)}
    with pytest.raises(ValueError, match=r"leaf 'w'.*gradient dtype float32.*float16"):
        RMSprop(0.1).apply_gradients(grads, params)


def test_gradient_without_parameter_raises_naming_its_path():
    with pytest.raises(ValueError, match=r"leaf 'extra'.*no parameter"):
        RMSprop(0.1).apply_gradients({"extra": mx.ones((2,))}, {"w": mx.ones((2,))})


def test_failed_step_changes_nothing_and_training_continues():
    params = {"a": mx.ones((3,)), "b": mx.ones((2,))}
    grads = {"a": mx.ones((3,)), "b": mx.ones((2,))}
    opt = RMSprop(0.1)
    params = opt.apply_gradients(grads, params)
    before = tree_map(lambda a: mx.array(a), opt.state)
    bad = {"a": mx.ones((3,)), "b": mx.ones((5,))}
    with pytest.raises(ValueError, match="leaf 'b'"):
        opt.apply_gradients(bad, params)
    assert_trees_bit_equal(opt.state, before)  # step counter and every v unchanged
    ref = optim.RMSprop(0.1)
    ref_params = ref.apply_gradients(grads, {"a": mx.ones((3,)), "b": mx.ones((2,))})
    assert_trees_bit_equal(opt.apply_gradients(grads, params), ref.apply_gradients(grads, ref_params))


def test_tuples_in_the_tree_come_back_as_tuples_like_mlx():
    """The native step rebuilds the returned tree in the gradients' shape:
    tuples stay tuples and lists lists, as mlx.optimizers returns them."""
    params = {"t": (mx.ones((3,)), mx.zeros((2,))), "l": [mx.ones((2,)), (mx.full((4,), 2.0),)]}
    grads = tree_map(lambda p: p * 0.5 + 1, params)
    ours = RMSprop(0.1).apply_gradients(grads, params)
    ref = optim.RMSprop(0.1).apply_gradients(grads, params)
    assert type(ours["t"]) is tuple and type(ours["l"]) is list and type(ours["l"][1]) is tuple
    assert [type(x) for x in ours["l"]] == [type(x) for x in ref["l"]]
    assert type(ref["t"]) is tuple
    assert_trees_bit_equal(ours, ref)


def test_check_gradients_names_the_leaf_and_changes_nothing():
    """check_gradients raises like apply_gradients would (naming the leaf)
    and changes nothing: before the first step it checks the leaves as
    init() will set them up, after it the state entries themselves."""
    params = {"a": mx.ones((3,)), "b": [mx.zeros((2, 2))]}
    grads = tree_map(lambda p: p * 0.5 + 1, params)
    opt = RMSprop(0.1)
    opt.check_gradients(grads, params)  # a fresh optimizer: no state yet, and none made
    assert set(opt.state) <= {"step", "learning_rate"}
    with pytest.raises(ValueError, match=r"leaf 'c'.*no parameter"):
        opt.check_gradients({**grads, "c": mx.ones((1,))}, params)
    params = opt.apply_gradients(grads, params)
    mx.eval(params, opt.state)
    opt.check_gradients(grads, params)
    v = opt.state["b"][0].pop("v")
    with pytest.raises(ValueError, match=r"leaf 'b\.0': the optimizer state has no entry"):
        opt.check_gradients(grads, params)
    opt.state["b"][0]["v"] = v.astype(mx.float16)
    with pytest.raises(ValueError, match=r"leaf 'b\.0'.*state 'v' dtype float16"):
        opt.check_gradients(grads, params)
    assert opt.step.item() == 1


@pytest.mark.parametrize(
    "name,value,message",
    [("alpha", -0.5, "alpha must be a finite number >= 0"),
     ("eps", 0.0, "eps must be a finite number > 0"),
     ("alpha", float("nan"), "alpha must be a finite number >= 0"),
     ("momentum", float("inf"), "momentum must be a finite number >= 0"),
     ("weight_decay", -1.0, "weight_decay must be a finite number >= 0")],
    ids=["alpha<0", "eps=0", "alpha=nan", "momentum=inf", "weight_decay<0"],
)
def test_options_set_after_construction_are_checked_before_the_step(name, value, message):
    """Hyperparameters assigned after construction are checked by the step
    (and by check_gradients) before anything changes."""
    params = {"w": mx.linspace(-1, 1, 12)}
    grads = {"w": mx.cos(params["w"])}
    opt = RMSprop(0.1)
    params = opt.apply_gradients(grads, params)
    mx.eval(params, opt.state)
    before = (opt.step.item(), mx.array(opt.state["w"]["v"]), mx.array(params["w"]))
    setattr(opt, name, value)
    with pytest.raises(ValueError, match=message):
        opt.check_gradients(grads, params)
    with pytest.raises(ValueError, match=message):
        opt.apply_gradients(grads, params)
    assert opt.step.item() == before[0]
    assert bit_equal(opt.state["w"]["v"], before[1]) and bit_equal(params["w"], before[2])


@pytest.mark.parametrize(
    "lr,message",
    [(mx.array([0.1, 0.2]), r"learning rate must be a scalar, got shape \(2\)"),
     (mx.array(0.1 + 0.0j), r"learning rate must be real, got complex64")],
    ids=["vector", "complex"],
)
def test_a_learning_rate_that_is_not_a_real_scalar_raises_before_the_step(lr, message):
    params = {"w": mx.linspace(-1, 1, 12)}
    grads = {"w": mx.cos(params["w"])}
    opt = RMSprop(0.1)
    params = opt.apply_gradients(grads, params)
    mx.eval(params, opt.state)
    v = mx.array(opt.state["w"]["v"])
    opt.learning_rate = lr
    with pytest.raises(ValueError, match=message):
        opt.apply_gradients(grads, params)
    assert opt.step.item() == 1 and bit_equal(opt.state["w"]["v"], v)


def test_op_level_errors_are_value_errors():
    f = mlx_fused_rmsprop.rmsprop_update
    one = mx.ones((3,))
    with pytest.raises(ValueError, match="state 'v' shape"):
        f(one, one, mx.ones((4,)), mx.array(0.1), alpha=0.9, eps=1e-8)
    with pytest.raises(ValueError, match="learning rate must be a scalar"):
        f(one, one, one, mx.ones((2,)), alpha=0.9, eps=1e-8)
    with pytest.raises(ValueError, match="alpha must be"):
        f(one, one, one, mx.array(0.1), alpha=-1.0, eps=1e-8)
    with pytest.raises(ValueError, match="eps must be"):
        f(one, one, one, mx.array(0.1), alpha=0.9, eps=0.0)
    with pytest.raises(ValueError, match="complex"):
        f(one, one, one, mx.array(0.1 + 1j), alpha=0.9, eps=1e-8)
    with pytest.raises(ValueError, match="bool"):
        b = mx.ones((3,), dtype=mx.bool_)
        f(b, b, b, mx.array(0.1), alpha=0.9, eps=1e-8)


def test_transforms_raise_clearly():
    f = mlx_fused_rmsprop.rmsprop_update

    def step(p):
        return f(mx.ones((3,)), p, mx.zeros((3,)), mx.array(0.1), alpha=0.9, eps=1e-8)[0].sum()

    with pytest.raises(ValueError, match="no vjp"):
        mx.grad(step)(mx.ones((3,)))
    with pytest.raises(ValueError, match="no jvp"):
        mx.jvp(lambda p: f(mx.ones((3,)), p, mx.zeros((3,)), mx.array(0.1), alpha=0.9, eps=1e-8)[0], [mx.ones((3,))], [mx.ones((3,))])
    with pytest.raises(ValueError, match="vmap"):
        mx.vmap(lambda p: f(p, p, p, mx.array(0.1), alpha=0.9, eps=1e-8)[0])(mx.ones((2, 3)))


def test_update_graph_is_one_fused_node(tmp_path):
    model = make_model()
    x, y = data()
    opt = RMSprop(1e-2)
    _, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
    mx.eval(grads)
    opt.init(model.trainable_parameters())
    mx.eval(opt.state)
    updated = opt.apply_gradients(grads, model.trainable_parameters())
    outputs = [a for _, a in tree_flatten(updated)] + [
        a for _, a in tree_flatten(opt.state)
    ]
    dot = tmp_path / "update.dot"
    mx.export_to_dot(str(dot), *outputs)
    text = dot.read_text()
    n_leaves = len(tree_flatten(grads))
    assert text.count("FusedRMSprop") == n_leaves
    for op in ("Sqrt", "Divide", "Square", "Multiply", "Subtract"):
        assert op not in text, f"the update graph has a {op} node"


def test_peak_memory_of_a_training_step_is_in_place():
    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = mx.random.normal((2048, 2048))  # 4M float32 elements

        def __call__(self, x):
            return (self.weight * x).sum()

    model, x = Big(), mx.random.normal((2048, 2048))
    mx.eval(model.parameters(), x)
    opt = RMSprop(1e-3)
    grad_fn = nn.value_and_grad(model, lambda m, x: m(x))
    extra = []
    for _ in range(3):
        loss, grads = grad_fn(model, x)
        mx.eval(loss, grads)
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        extra.append(max(mx.get_peak_memory() - before, 0) / model.weight.nbytes)
    # Step 1 allocates v; later steps reuse param's and v's buffers.
    assert extra[1] <= 0.10 and extra[2] <= 0.10, extra


def test_compile_keeps_steps_with_different_alpha_or_eps_apart():
    f = mlx_fused_rmsprop.rmsprop_update
    g, p, v = mx.full((3, 4), 0.5), mx.ones((3, 4)), mx.full((3, 4), 1.0)
    lr = mx.array(0.1)

    def three_steps(g, p, v, lr):
        # Same inputs, different alpha/eps: compile's common-subexpression
        # pass must not merge them (is_equivalent compares alpha and eps).
        # It never merges an array that is itself an output of the compiled
        # function, hence the `* 2` after each update.
        return (
            f(g, p, v, lr, alpha=0.9, eps=1e-8)[0] * 2,
            f(g, p, v, lr, alpha=0.8, eps=1e-8)[0] * 2,
            f(g, p, v, lr, alpha=0.9, eps=1e-2)[0] * 2,
            f(g, p, v, lr, alpha=0.9, eps=1e-8)[1] * 2,
            f(g, p, v, lr, alpha=0.8, eps=1e-8)[1] * 2,
        )

    eager = three_steps(g, p, v, lr)
    compiled = mx.compile(three_steps)(g, p, v, lr)
    for e, c in zip(eager, compiled):
        assert bit_equal(e, c)
    assert not bit_equal(eager[0], eager[1]) and not bit_equal(eager[0], eager[2])
    assert not bit_equal(eager[3], eager[4])
    assert all(out.shape == (3, 4) for out in compiled)


def test_compile_keeps_variant_steps_with_different_option_values_apart():
    """is_equivalent compares every option's value, not only alpha, eps and
    which options are on: momentum 0.9 vs 0.5, weight decay 0.1 vs 0.2."""
    step = mlx_fused_rmsprop.rmsprop_step
    g, p = mx.full((3, 4), 0.5), mx.ones((3, 4))
    state = {"v": mx.full((3, 4), 1.0), "momentum_buffer": mx.full((3, 4), 0.25)}

    def steps(g, p, v, buf):
        s = {"v": v, "momentum_buffer": buf}
        outs = [step(g, p, s, 0.1, momentum=m, weight_decay=wd)[0] * 2
                for m, wd in ((0.9, 0.1), (0.5, 0.1), (0.9, 0.2))]
        return tuple(outs)

    eager = steps(g, p, state["v"], state["momentum_buffer"])
    compiled = mx.compile(steps)(g, p, state["v"], state["momentum_buffer"])
    for e, c in zip(eager, compiled):
        assert bit_equal(e, c)
    assert not bit_equal(eager[0], eager[1]) and not bit_equal(eager[0], eager[2])


@pytest.mark.parametrize("where", ["top", "nested"])
def test_an_integer_leaf_error_names_a_fix_that_works(where):
    """A step counter left trainable on the model: the error's own suggestion
    (`....freeze(keys=[...], recurse=False)`), run as printed, lets training
    go on, and the counter is left as it was."""
    import re

    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    holder = model if where == "top" else model.layers[1]
    holder.counter = mx.array(7, dtype=mx.int32)

    def loss_fn(m, x):
        return m(x).sum()

    x = mx.ones((4, 3))
    opt = RMSprop(learning_rate=1e-2)
    _, grads = nn.value_and_grad(model, loss_fn)(model, x)
    with pytest.raises(ValueError, match="not a trainable parameter") as info:
        opt.update(model, grads)
    (fix,) = re.findall(r"e\.g\. `([^`]+)`", str(info.value))
    expected = "model" if where == "top" else "model.layers[1]"
    assert fix == f"{expected}.freeze(keys=['counter'], recurse=False)"
    exec(fix, {"model": model})
    _, grads = nn.value_and_grad(model, loss_fn)(model, x)
    opt.update(model, grads)
    mx.eval(model.parameters(), opt.state)
    assert holder.counter.dtype == mx.int32 and holder.counter.item() == 7
    assert opt.state["step"].item() == 1


def test_other_errors_get_no_integer_hint():
    """The hint is for integer and boolean leaves only: a float16 gradient of
    a float32 parameter keeps its own message."""
    model = nn.Linear(2, 2)
    grads = {"weight": mx.ones((2, 2), dtype=mx.float16), "bias": mx.ones((2,))}
    with pytest.raises(ValueError) as info:
        RMSprop(learning_rate=1e-2).update(model, grads)
    assert "does not match parameter dtype float32." in str(info.value)
    assert "trainable" not in str(info.value)
