"""Every registered op's public VJP follows the one convention of jaxcnn.functional (``NAME_vjp(*primals, dy,
**keyword-only options)``, one cotangent per primal), the registry's generic adapter gives jax.vjp's cotangents
(float64), and a VJP whose signature does not fit its forward is refused in one line."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn.functional as F
from conftest import assert_trees_close, normal
from op_cases import CONV_CASES, POOL_CASES

_X = normal(0, (2, 5, 4, 4))
_C = normal(1, (4,))


def _conv(case, bias=True):
    batch, h, w, c, f, kernel, stride, padding, dilation, groups, _ = case
    args = (normal(2, (batch, h, w, c)), normal(3, (*kernel, c // groups, f)), normal(4, (f,)) if bias else None)
    return args, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _pool(case, positional):
    batch, h, w, c, window, stride, padding = case
    x = normal(5, (batch, h, w, c))
    if positional:
        return (x, window, stride, padding), {}
    return (x,), dict(window=window, stride=stride, padding=padding)


_RNN = (normal(6, (2, 3, 4)), normal(7, (2, 5)), normal(8, (4, 5)), 0.5 * normal(9, (5, 5)))

# (forward, args, options): every registered op at least once, optional arrays present and absent, options given
# by keyword and (where the forward allows) positionally
CASES = [
    (F.conv2d, *_conv(CONV_CASES[2])),
    (F.conv2d, *_conv(CONV_CASES[3], bias=False)),
    (F.conv_transpose2d, (_X, normal(10, (3, 2, 4, 3)), normal(11, (3,))), dict(stride=2, padding="SAME")),
    (F.conv_transpose2d, (_X, normal(10, (3, 2, 4, 3))), dict(stride=(1, 2), dilation=2)),
    (F.max_pool2d, *_pool(POOL_CASES[3], positional=True)),
    (F.avg_pool2d, *_pool(POOL_CASES[2], positional=False)),
    (F.global_avg_pool2d, (_X,), {}),
    (F.upsample_nearest2d, (_X,), dict(scale=(2, 3))),
    (F.dense, (normal(12, (3, 4)), normal(13, (4, 2)), normal(14, (2,))), {}),
    (F.dense, (normal(12, (2, 3, 4)), normal(13, (4, 2))), {}),
    (F.relu, (_X,), {}),
    (F.leaky_relu, (_X, 0.2), {}),
    (F.elu, (_X,), dict(alpha=0.5)),
    (F.gelu, (_X,), dict(approximate=False)),
    (F.sigmoid, (_X,), {}),
    (F.tanh, (_X,), {}),
    (F.softplus, (_X,), {}),
    (F.dropout, (_X, 0.3), dict(key=jax.random.key(3))),
    (F.softmax_cross_entropy, (normal(15, (5, 3)), jnp.array([0, 2, 1, 1, 0])), {}),
    (F.mean_squared_error, (normal(16, (4, 3)), normal(17, (4, 3))), {}),
    (F.batch_norm, (_X, _C, normal(18, (4,)), 0.1 * _C, 1 + _C**2), dict(momentum=0.8)),
    (F.batch_norm, (_X, None, normal(18, (4,)), 0.1 * _C, 1 + _C**2), dict(train=False, epsilon=1e-3)),
    (F.layer_norm, (_X, _C, normal(19, (4,))), {}),
    (F.layer_norm, (_X,), dict(epsilon=0.1)),
    (F.group_norm, (_X, None, normal(19, (4,))), dict(groups=2)),
    (F.elman_rnn, (*_RNN, normal(20, (5,))), {}),
    (F.elman_rnn, _RNN, {}),
]
IDS = [f"{forward.__name__}{i}" for i, (forward, _, _) in enumerate(CASES)]
# the library's own ops (a test module may have registered a user op of its own by now)
RULES = sorted((n, r) for n, r in F.registered_ops().items() if r.forward.__module__.startswith("jaxcnn.functional"))
_PARAMETER = inspect.Parameter


def _is_array(value) -> bool:
    return isinstance(value, jax.Array)


def test_the_table_covers_every_registered_op():
    assert {name for name, _ in RULES} == {forward.__name__ for forward, _, _ in CASES}


@pytest.mark.parametrize("name,rule", RULES, ids=[name for name, _ in RULES])
def test_public_vjp_signature_follows_the_convention(name, rule):
    """Primals (the forward's leading array arguments, same names), then `dy` positionally, then every other
    argument of the forward keyword-only with the same default; a PRNG key only as the keyword `key`."""
    vjp = getattr(F, f"{name}_vjp")
    assert rule.hand_vjp is vjp
    forward = inspect.signature(rule.forward).parameters
    params = list(inspect.signature(vjp).parameters.values())
    positional = [p.name for p in params if p.kind in (_PARAMETER.POSITIONAL_ONLY, _PARAMETER.POSITIONAL_OR_KEYWORD)]
    assert positional[-1] == "dy" and tuple(positional[:-1]) == rule.primals
    assert list(forward)[: len(rule.primals)] == list(rule.primals)
    keywords = {p.name: p.default for p in params if p.kind == _PARAMETER.KEYWORD_ONLY}
    assert [p.name for p in params] == [*positional, *keywords]  # no *args, no **kwargs
    for option, p in list(forward.items())[len(rule.primals) :]:
        assert option in keywords and keywords[option] == p.default, option
    assert set(keywords) - set(forward) <= {"conv2d": {"dw_method"}, "batch_norm": {"stats"}}.get(name, set())
    if "key" in forward:
        assert "key" in keywords
    for forward_fn, args, options in CASES:  # the table's arguments: arrays (or None) exactly in the primals
        if forward_fn is rule.forward:
            bound = inspect.signature(forward_fn).bind(*args, **options).arguments
            assert all(_is_array(bound[p]) or bound[p] is None for p in rule.primals if p in bound), name
            assert not any(_is_array(v) for k, v in bound.items() if k not in rule.primals and k != "key"), name


def _bound_primals(rule, args, options):
    bound = inspect.signature(rule.forward).bind(*args, **options).arguments
    primals = [bound.pop(p, None) for p in rule.primals]
    return primals, bound


def _first(result):
    return result[0] if isinstance(result, tuple) else result


@pytest.mark.parametrize("forward,args,options", CASES, ids=IDS)
def test_generic_adapter_matches_jax_vjp_and_public_vjps_return_one_cotangent_per_primal(forward, args, options):
    rule = F.hand_rule(forward)
    present = rule.present(args)
    arrays = [i for i, a in enumerate(args) if _is_array(a)]  # traced; the options stay Python values
    dy = normal(21, jax.eval_shape(lambda: _first(forward(*args, **options))).shape)

    @jax.jit
    def run(values, dy):
        full = list(args)
        for i, value in zip(arrays, values, strict=True):
            full[i] = value

        def call(*diff):
            at = list(full)
            for i, value in zip(present, diff, strict=True):
                at[i] = value
            return _first(forward(*at, **options))

        primals, keywords = _bound_primals(rule, full, options)
        autodiff = jax.vjp(call, *(full[i] for i in present))[1](dy)
        return rule.vjp(tuple(full), dy, **options), rule.hand_vjp(*primals, dy, **keywords), autodiff

    uniform, public, expected = run([args[i] for i in arrays], dy)
    assert_trees_close(uniform, expected, jnp.float64, forward.__name__)
    primals, _ = _bound_primals(rule, args, options)
    if len(primals) == 1:
        assert not isinstance(public, tuple)
        public = (public,)
    assert isinstance(public, tuple) and len(public) == len(primals)
    for i, (cotangent, primal) in enumerate(zip(public, primals, strict=True)):
        if i in present:
            assert (cotangent.shape, cotangent.dtype) == (primal.shape, primal.dtype), i
        else:  # an absent optional array, or one not differentiated (integer labels, running statistics)
            assert cotangent is None and (primal is None or i not in rule.differentiable), i


# -- registering an op whose VJP does not fit -------------------------------------------------------------------


def scaled(x, w, factor=2.0, *, shift=0.0):
    return factor * x * w + shift


def scaled_vjp(x, w, dy, *, factor=2.0, shift=0.0):
    return factor * dy * w, factor * dy * x


MISFITS = [  # (vjp, what the one-line error says after "register(scaled, <lambda>): ")
    (lambda x, w, *, dy, factor=2.0, shift=0.0: None, r"the VJP must be vjp\(\*primals, dy, \*, \*\*options\)"),
    (lambda x, w, g, *, factor=2.0, shift=0.0: None, r"with `dy` positional"),
    (lambda x, v, dy, *, factor=2.0, shift=0.0: None, r"arguments before `dy` \(x, v\) must be the forward's leading"),
    (lambda w, x, dy, *, factor=2.0, shift=0.0: None, r"arguments before `dy` \(w, x\) must be the forward's leading"),
    (lambda x, w, dy, factor=2.0, *, shift=0.0: None, r"arguments after `dy` must be keyword-only, got positional fac"),
    (lambda x, w, dy, *, shift=0.0: None, r"the forward's option `factor` must be a keyword-only argument of the VJP"),
    (
        lambda x, w, dy, *, factor=3.0, shift=0.0: None,
        r"option `factor` has default 2.0 in the forward but default 3.0",
    ),
    (lambda x, w, dy, *, factor, shift=0.0: None, r"option `factor` has default 2.0 in the forward but no default in"),
    (lambda x, w, dy, *, factor=2.0, shift=0.0, mode: None, r"the VJP's keyword `mode` is no option of the forward"),
    (lambda x, w, dy, *, factor=2, shift=0.0: None, r"option `factor` has default 2.0 in the forward but default 2 "),
]


@pytest.mark.parametrize("vjp,message", MISFITS, ids=[f"misfit{i}" for i in range(len(MISFITS))])
def test_a_misfitting_vjp_is_refused_in_one_line(vjp, message):
    with pytest.raises(ValueError, match=r"^register\(scaled, <lambda>\): .*" + message) as error:
        F.register(scaled, vjp)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="no hand-derived VJP is registered for 'scaled'"):
        F.hand_rule(scaled)


def test_other_refusals():
    with pytest.raises(ValueError, match=r"`differentiable` \(0, 2\) must index the primals \(x, w\)"):
        F.register(scaled, scaled_vjp, differentiable=(0, 2))
    with pytest.raises(ValueError, match=r"the forward's \*rest after its array arguments cannot be passed to a VJP"):
        F.register(lambda x, *rest: x, lambda x, dy: dy)
    with pytest.raises(ValueError, match=r"the forward takes \*\*options, so the VJP must take \*\*options too"):
        F.register(lambda x, **options: x, lambda x, dy: dy)
    with pytest.raises(ValueError, match=r"register\(max, <lambda>\): cannot read the signatures"):
        F.register(max, lambda x, dy: dy)


def test_a_fitting_user_op_is_registered_and_its_options_bound():
    """Options may come positionally or by keyword; the adapter hands them to the VJP by keyword, and keeps the
    cotangents of the arguments passed. A VJP returning the wrong number of cotangents is named at the call."""
    F.register(scaled, scaled_vjp)
    rule = F.hand_rule(scaled)
    assert (rule.primals, rule.differentiable, rule.hand_vjp) == (("x", "w"), (0, 1), scaled_vjp)
    x, w, dy = jnp.arange(3.0), jnp.full(3, 2.0), jnp.ones(3)
    for args, options in [((x, w, 3.0), {"shift": 1.0}), ((x, w), {"factor": 3.0})]:
        dx, dw = rule.vjp(args, dy, **options)
        np.testing.assert_array_equal(dx, 3 * w)
        np.testing.assert_array_equal(dw, 3 * x)
    F.register(scaled, lambda x, w, dy, **options: dy)  # **options takes the forward's options
    with pytest.raises(ValueError, match=r"<lambda> returned a single array; the convention wants one per primal"):
        F.hand_rule(scaled).vjp((x, w), dy)
    F.register(F.relu, lambda x, dy: (dy,))
    try:
        with pytest.raises(ValueError, match=r"<lambda> returned a tuple; with one primal it returns the bare array"):
            F.hand_rule(F.relu).vjp((x,), dy)
    finally:
        F.register(F.relu, F.relu_vjp)
