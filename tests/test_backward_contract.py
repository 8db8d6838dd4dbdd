"""Shape mistakes in a user's backward name the layer and what was expected, wherever the result is used: the
gradient checker, the explicit reverse pass (backprop.value_and_grad, training with gradients="engine") and the
custom_vjp bridge (jax.grad with gradients="manual", training with gradients="manual")."""

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxcnn as jc
import jaxcnn.functional as F
from conftest import load_file
from jaxcnn import nn

Swish = load_file("examples/custom_layer.py").Swish  # the README's Swish, right


class HalfDx(Swish):
    def backward(self, params, residuals, dy):
        dx, grads = super().backward(params, residuals, dy)
        return dx[:, : dx.shape[1] // 2], grads


class MisspelledKey(Swish):
    def backward(self, params, residuals, dy):
        dx, grads = super().backward(params, residuals, dy)
        return dx, {"betta": grads["beta"]}


class DxAlone(Swish):
    def backward(self, params, residuals, dy):
        return super().backward(params, residuals, dy)[0]


class WrongGradShape(Swish):
    def backward(self, params, residuals, dy):
        dx, grads = super().backward(params, residuals, dy)
        return dx, {"beta": jnp.sum(dy * residuals.x, axis=0)}


# layer class -> the error, for a Swish_0 in Dense(8) -> Swish -> Dense(3) with a batch of 2
MISTAKES = {
    HalfDx: r"^Swish_0\.backward returned dx of shape \(2, 4\) for an input of shape \(2, 8\)(\n|$)",
    MisspelledKey: r"^Swish_0\.backward returned parameter gradients with keys \['betta'\], expected the keys of "
    r"params \['beta'\] \(unknown \['betta'\], missing \['beta'\]\)(\n|$)",
    DxAlone: r"^Swish_0\.backward returned an array of shape \(2, 8\) \(dx alone\?\); it must return \(dx, dparams\)",
    WrongGradShape: r"^Swish_0\.backward returned a gradient of shape \(8,\) for parameter beta of shape \(\)(\n|$)",
}


def swish_model(layer):
    layer.prefix = lambda: "Swish"  # named like the README's layer, whatever the subclass
    return nn.Sequential([nn.Flatten(), nn.Dense(8), layer, nn.Dense(3)])


def setup(kind):
    model = swish_model(kind())
    params, state = model.init(jax.random.key(0), (2, 2, 1))
    x = jax.random.normal(jax.random.key(1), (2, 2, 2, 1))
    return model, params, state, x, jnp.array([0, 2])


@pytest.mark.parametrize("kind", list(MISTAKES), ids=lambda kind: kind.__name__)
def test_check_model_names_the_layer(kind):
    model, params, state, x, y = setup(kind)
    with pytest.raises(nn.BackwardError, match=MISTAKES[kind]):
        jc.gradcheck.check_model(model, params, state, x, y, perturbations=0, finite_differences=False)
    # without the layer rows, the engine (the first whole-model path) reports it
    with pytest.raises(nn.BackwardError, match=MISTAKES[kind]):
        jc.gradcheck.check_model(model, params, state, x, y, layers=False, finite_differences=False)


@pytest.mark.parametrize("kind", list(MISTAKES), ids=lambda kind: kind.__name__)
def test_engine_and_bridge_name_the_layer(kind):
    model, params, state, x, y = setup(kind)
    with pytest.raises(nn.BackwardError, match=MISTAKES[kind]):
        jc.backprop.value_and_grad(model, F.softmax_cross_entropy)(params, state, x, y)

    def loss(p):
        return F.softmax_cross_entropy(model.apply(p, state, x, gradients="manual")[0], y)

    with pytest.raises(nn.BackwardError, match=MISTAKES[kind]):
        jax.grad(loss)(params)


@pytest.mark.parametrize("gradients", ["manual", "engine"])
@pytest.mark.parametrize("kind", [HalfDx, MisspelledKey], ids=lambda kind: kind.__name__)
def test_training_names_the_layer(kind, gradients):
    model = swish_model(kind())
    optimizer = optax.sgd(0.1)
    train_state = jc.train.create_train_state(model, optimizer, jax.random.key(0), (2, 2, 1))
    step = jc.train.make_train_step(model, gradients=gradients)
    x = jax.random.normal(jax.random.key(1), (2, 2, 2, 1))
    with pytest.raises(nn.BackwardError, match=MISTAKES[kind]):
        step(train_state, x, jnp.array([0, 2]))


def test_nested_layers_are_named_by_their_path():
    block = nn.Sequential([nn.Dense(8), swish_model(HalfDx()).layers[2]])
    model = nn.Sequential([nn.Flatten(), nn.Residual(block, nn.Dense(8)), nn.Dense(3)])
    params, state = model.init(jax.random.key(0), (2, 2, 1))
    x, y = jax.random.normal(jax.random.key(1), (2, 2, 2, 1)), jnp.array([0, 2])
    message = r"^Residual_0/block/Swish_0\.backward returned dx of shape \(2, 4\) for an input of shape \(2, 8\)(\n|$)"
    with pytest.raises(nn.BackwardError, match=message):
        jc.backprop.value_and_grad(model, F.softmax_cross_entropy)(params, state, x, y)
    with pytest.raises(nn.BackwardError, match=message):
        jax.grad(lambda p: F.softmax_cross_entropy(model.apply(p, state, x, gradients="manual")[0], y))(params)
    with pytest.raises(nn.BackwardError, match=message):
        jc.gradcheck.check_model(model, params, state, x, y, perturbations=0, finite_differences=False)


def test_a_layer_without_parameters_must_return_no_gradients():
    class ExtraGrads(nn.ReLU):
        def backward(self, params, residuals, dy):
            return super().backward(params, residuals, dy)[0], {"w": jnp.zeros(())}

    model = nn.Sequential([nn.Flatten(), nn.Dense(4), ExtraGrads(), nn.Dense(3)])
    params, state = model.init(jax.random.key(0), (2, 2, 1))
    x, y = jax.random.normal(jax.random.key(1), (2, 2, 2, 1)), jnp.array([0, 2])
    with pytest.raises(nn.BackwardError, match=r"^ExtraGrads_0\.backward returned parameter gradients, but the layer"):
        jc.backprop.value_and_grad(model, F.softmax_cross_entropy)(params, state, x, y)


def test_check_op_names_a_wrong_cotangent_shape():
    swish = lambda x, beta: x * jax.nn.sigmoid(beta * x)
    wrong = lambda x, beta, dy: (dy[:1], jnp.sum(dy))
    with pytest.raises(ValueError, match=r"the hand VJP returned a cotangent of shape \(1, 3\) for argument 0 of "):
        jc.gradcheck.check_op(swish, jnp.ones((2, 3)), jnp.asarray(1.5), vjp=wrong)
