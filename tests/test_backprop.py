"""The three gradient paths -- explicit reverse pass (engine), custom_vjp bridge, autodiff -- agree, compose with
jit and vmap, and the hand rules run with JAX's differentiation transforms switched off."""

import ast
import operator
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
import jaxcnn.functional as F
from conftest import assert_trees_close, load_file, normal
from models_for_tests import MODELS, random_variables


def setup(name, dtype=jnp.float64, batch=3, seed=0):
    build, input_shape, classes = MODELS[name]
    model = build()
    params, state = model.init(jax.random.key(seed), input_shape, dtype=dtype)
    x = normal(seed + 1, (batch, *input_shape), dtype)
    y = jnp.asarray(np.random.default_rng(seed).integers(0, classes, batch))
    return model, params, state, x, y


def three_paths(model, params, state, x, y, loss_fn=F.softmax_cross_entropy):
    def loss(p, gradients):
        out, _ = model.apply(p, state, x, train=True, gradients=gradients)
        if gradients == "manual":
            return jc.backprop.manual_loss(loss_fn)(out, y)
        return loss_fn(out, y)

    autodiff = jax.jit(jax.value_and_grad(lambda p: loss(p, "autodiff")))(params)
    bridge = jax.jit(jax.value_and_grad(lambda p: loss(p, "manual")))(params)
    (engine_loss, _), engine_grads = jax.jit(jc.backprop.value_and_grad(model, loss_fn))(params, state, x, y)
    return autodiff, bridge, (engine_loss, engine_grads)


# every model in float64 and float32; two of them in the default suite (the others with the slow cases; the
# gradient checker's tests run the same three paths on other models)
FAST = {("nested", jnp.float64), ("unseen", jnp.float32)}


@pytest.mark.parametrize(
    "name,dtype",
    [
        pytest.param(name, dtype, marks=[] if (name, dtype) in FAST else [pytest.mark.slow])
        for dtype in (jnp.float64, jnp.float32)
        for name in sorted(MODELS)
    ],
    ids=[f"{name}-{dtype}" for dtype in ("float64", "float32") for name in sorted(MODELS)],
)
def test_engine_bridge_and_autodiff_agree(name, dtype):
    model, params, state, x, y = setup(name, dtype)
    (loss_a, grads_a), (loss_b, grads_b), (loss_e, grads_e) = three_paths(model, params, state, x, y)
    assert_trees_close((loss_e, grads_e), (loss_a, grads_a), dtype, f"{name} engine vs autodiff")
    assert_trees_close((loss_b, grads_b), (loss_a, grads_a), dtype, f"{name} bridge vs autodiff")
    assert float(jnp.linalg.norm(grads_a["Dense_0"]["kernel"])) > 0


def test_engine_with_mean_squared_error():
    model, params, state, x, _ = setup("unseen")
    target = normal(9, (x.shape[0], 3))
    (loss_a, grads_a), (loss_b, grads_b), (loss_e, grads_e) = three_paths(
        model, params, state, x, target, F.mean_squared_error
    )
    assert_trees_close((loss_e, grads_e), (loss_a, grads_a), jnp.float64, "mse engine")
    assert_trees_close((loss_b, grads_b), (loss_a, grads_a), jnp.float64, "mse bridge")


def test_unregistered_loss_needs_its_vjp():
    model, params, state, x, y = setup("unseen")
    huber = lambda p, t: jnp.mean(jnp.where(jnp.abs(p - t) < 1, 0.5 * (p - t) ** 2, jnp.abs(p - t) - 0.5))
    with pytest.raises(ValueError, match="no hand-derived VJP is registered for '<lambda>'"):
        jc.backprop.value_and_grad(model, huber)
    huber_vjp = lambda p, t, d: d * jnp.clip(p - t, -1, 1) / p.size
    target = normal(4, (x.shape[0], 3))
    # jitted: eagerly, every primitive of the forward and backward would compile on its own
    (_, _), grads = jax.jit(jc.backprop.value_and_grad(model, huber, loss_vjp=huber_vjp))(params, state, x, target)
    expected = jax.jit(jax.grad(lambda p: huber(model.apply(p, state, x)[0], target)))(params)
    assert_trees_close(grads, expected, jnp.float64, "huber")


@pytest.mark.slow  # per-example gradients of the manual modes run by default in test_parallel.py
def test_manual_gradients_compose_with_vmap():
    """Per-example gradients by vmap over jax.grad of the manual bridge equal a loop over single examples."""
    model, params, state, x, y = setup("unseen", batch=4)
    loss = jc.backprop.manual_loss(F.softmax_cross_entropy)

    def single(p, xi, yi):
        out, _ = model.apply(p, state, xi[None], gradients="manual")
        return loss(out, yi[None])

    per_example = jax.jit(jax.vmap(jax.grad(single), in_axes=(None, 0, 0)))(params, x, y)
    for i in range(x.shape[0]):
        xi, yi = x[i : i + 1], y[i : i + 1]
        one = jax.grad(lambda p, xi=xi, yi=yi: F.softmax_cross_entropy(model.apply(p, state, xi)[0], yi))(params)
        assert_trees_close(jax.tree.map(operator.itemgetter(i), per_example), one, jnp.float64, f"example {i}")
    mean = jax.tree.map(lambda g: g.mean(0), per_example)
    batch = jax.grad(lambda p: F.softmax_cross_entropy(model.apply(p, state, x)[0], y))(params)
    assert_trees_close(mean, batch, jnp.float64, "mean of per-example")


@pytest.mark.slow  # per-example gradients through the engine are in test_parallel (a smaller model)
def test_engine_vmaps_too():
    model, params, state, x, y = setup("every_layer", batch=2)
    engine = jc.backprop.value_and_grad(model, F.softmax_cross_entropy)
    per_example = jax.vmap(lambda xi, yi: engine(params, state, xi[None], yi[None])[1])(x, y)
    assert per_example["Dense_0"]["kernel"].shape == (2, *params["Dense_0"]["kernel"].shape)


def test_manual_mode_second_order_is_reverse_over_reverse_or_forward_over_reverse_only():
    """The README's claim: in "manual" mode jax.hessian, jvp(grad) and grad(grad) differentiate the hand rules and
    agree with autodiff's second derivatives; jvp, jacfwd and linearize of the loss itself raise (custom_vjp)."""
    # no bias before the BatchNorm: its gradient, and so its Hessian rows, are round-off on both sides
    layers = [jc.nn.Dense(4, use_bias=False), jc.nn.BatchNorm(), jc.nn.GELU(approximate=False), jc.nn.Tanh()]
    model = jc.nn.Sequential([*layers, jc.nn.Dense(3)])
    params, state = random_variables(model, (5,))  # numpy values: nothing compiled
    x, y = normal(1, (6, 5)), jnp.arange(6) % 3
    v = random_variables(model, (5,), seed=1)[0]

    def loss(p, gradients):
        out, _ = model.apply(p, state, x, train=True, gradients=gradients)
        loss_fn = jc.backprop.manual_loss(F.softmax_cross_entropy) if gradients == "manual" else F.softmax_cross_entropy
        return loss_fn(out, y)

    def second_order(p, v, mode):
        grad = jax.grad(lambda q: loss(q, mode))
        forward_over_reverse = jax.jvp(grad, (p,), (v,))[1]
        dot = lambda q: sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(grad(q)), jax.tree.leaves(v), strict=True))
        with_bias = lambda b: loss({**p, "Dense_1": {**p["Dense_1"], "bias": b}}, mode)
        return forward_over_reverse, jax.grad(dot)(p), jax.hessian(with_bias)(p["Dense_1"]["bias"])

    # one compile for both modes and the three second-order paths
    out = jax.jit(lambda p, v: {mode: second_order(p, v, mode) for mode in ("manual", "autodiff")})(params, v)
    assert_trees_close(out["manual"], out["autodiff"], jnp.float64, "manual vs autodiff second order")
    assert_trees_close(out["autodiff"][1], out["autodiff"][0], jnp.float64, "reverse vs forward over reverse")
    assert out["manual"][2].shape == (3, 3)
    manual = lambda p: loss(p, "manual")
    for forward_mode in (
        lambda p, v: jax.jvp(manual, (p,), (v,)),
        lambda p, v: jax.jacfwd(manual)(p),
        lambda p, v: jax.linearize(manual, p)[1](v),
    ):
        with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
            jax.jit(forward_mode)(params, v)  # traced only: it raises before anything compiles


DIFFERENTIATION = [
    "vjp",
    "grad",
    "value_and_grad",
    "jvp",
    "linearize",
    "linear_transpose",
    "jacrev",
    "jacfwd",
    "jacobian",
    "hessian",
]


def test_hand_rules_run_without_jax_differentiation():
    # reference values first, with autodiff still on
    x, w, b = normal(0, (2, 7, 6, 4)), normal(1, (3, 2, 2, 6)), normal(2, (6,))
    opts = dict(stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2), groups=2)
    dy = normal(3, F.conv2d(x, w, b, **opts).shape)
    # every side jitted: eagerly, each primitive would compile on its own (tracing runs the same Python)
    conv_expected = jax.jit(lambda x, w, b, dy: jax.vjp(lambda x, w, b: F.conv2d(x, w, b, **opts), x, w, b)[1](dy))(
        x, w, b, dy
    )
    pool_dy = normal(4, F.max_pool2d(x, 3, 2, "SAME").shape)
    pool_expected = [jax.vjp(lambda x, f=f: f(x, 3, 2, "SAME"), x)[1](pool_dy)[0] for f in (F.max_pool2d, F.avg_pool2d)]
    activations = ("relu", "leaky_relu", "elu", "gelu", "sigmoid", "tanh", "softplus")
    act_expected = {n: jax.vjp(getattr(F, n), x)[1](x)[0] for n in activations}
    model, params, state, xb, yb = setup("unseen")
    engine_expected = jax.jit(
        jax.grad(lambda p: F.softmax_cross_entropy(model.apply(p, state, xb, train=True)[0], yb))
    )(params)

    def forbidden(*args, **kwargs):
        raise AssertionError("a JAX differentiation transform was called")

    # JAX's public transforms switched off (the source scan below catches a name imported from jax instead)
    with pytest.MonkeyPatch.context() as mp:
        for name in DIFFERENTIATION:
            if hasattr(jax, name):
                mp.setattr(jax, name, forbidden)
        with pytest.raises(AssertionError):
            jax.grad(lambda v: v)(1.0)
        conv = jax.jit(lambda x, w, b, dy: F.conv2d_vjp(x, w, b, dy, **opts))(x, w, b, dy)
        assert_trees_close(conv, conv_expected, jnp.float64, "conv2d")
        pool = dict(window=3, stride=2, padding="SAME")
        assert_trees_close(F.max_pool2d_vjp(x, pool_dy, **pool), pool_expected[0], jnp.float64, "max")
        assert_trees_close(F.avg_pool2d_vjp(x, pool_dy, **pool), pool_expected[1], jnp.float64, "avg")
        for name, expected in act_expected.items():
            assert_trees_close(getattr(F, f"{name}_vjp")(x, x), expected, jnp.float64, name)
        engine = jc.backprop.value_and_grad(model, F.softmax_cross_entropy)
        (_, _), grads = jax.jit(engine)(params, state, xb, yb)
        assert_trees_close(grads, engine_expected, jnp.float64, "engine")


HAND_RULE_SOURCES = ("functional", "nn", "backprop.py")


def test_hand_rule_sources_name_no_differentiation_transform():
    """The hand rules' modules neither call ``jax.vjp``-like transforms nor import them from jax (by any name)."""
    root = pathlib.Path(jc.__file__).resolve().parent
    files = [path for part in HAND_RULE_SOURCES for path in sorted((root / part).glob("**/*.py")) or [root / part]]
    assert len(files) > 10
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "jax":
                assert node.attr not in DIFFERENTIATION, f"{path.name}:{node.lineno} uses jax.{node.attr}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "jax":
                names = {alias.name for alias in node.names}
                assert not names & set(DIFFERENTIATION), f"{path.name}:{node.lineno} imports {names} from {node.module}"
                assert not (node.module or "").startswith("jax._src.interpreters"), f"{path.name}:{node.lineno}"


def test_mixed_dtypes_promote_and_gradients_keep_parameter_dtypes():
    model, params, state, x, y = setup("unseen", dtype=jnp.float32)
    x64 = x.astype(jnp.float64)
    (loss_a, grads_a), (loss_b, grads_b), (loss_e, grads_e) = three_paths(model, params, state, x64, y)
    for grads in (grads_a, grads_b, grads_e):
        assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert_trees_close(grads_e, grads_a, jnp.float32, "engine")
    assert_trees_close(grads_b, grads_a, jnp.float32, "bridge")


def test_manual_bridge_returns_cotangents_in_parameter_dtypes():
    """A rule that computes in a promoted dtype still hands JAX cotangents in each primal's dtype."""
    example = load_file("examples/custom_layer.py")
    model = jc.nn.Sequential([jc.nn.Flatten(), example.Swish(), jc.nn.Dense(2)])
    params, state = model.init(jax.random.key(0), (3, 3, 1))  # float32 parameters
    x = normal(0, (2, 3, 3, 1))  # float64 input: Swish computes in float64
    grads = jax.grad(lambda p: jnp.sum(model.apply(p, state, x, gradients="manual")[0]))(params)
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
