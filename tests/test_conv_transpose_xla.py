"""Convolutions on which XLA:CPU used to abort the process (issue 18, defect 1; see ``xla_swap_aborts`` in
jaxcnn/functional/conv.py): ``conv_transpose2d``, its hand VJP, ``conv2d_vjp``'s dx and ``jax.vjp`` of both
forwards, on geometries where the raw ``lax.conv_general_dilated(..., lhs_dilation=...)`` aborts.

The checks run in a child process (this file run as a script), so that a regression fails the test instead of
killing pytest. The forwards are checked against float64 loops (tests/conv_xla_sweep.py), the VJPs against
``jax.vjp`` of ``lax.conv_transpose`` where that compiles and against central finite differences (float64)
where it aborts too (``jax.vjp`` of ``lax.conv_general_dilated``), in float64 and float32. By default a sample of
the geometries; under ``-m slow`` all of them, one model holding both layers through ``gradcheck.check_model``
(all three gradient paths and finite differences), and the whole sweep.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from conv_xla_sweep import conv_out, ct_out, reference  # noqa: E402

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}

# (kind, x shape, w shape, options, gradient reference): each aborts XLA:CPU as a raw lhs-dilated convolution
CASES = [
    # the example: H kernel 2, stride 2, no padding; W kernel 5 longer than the input 1
    ("ct", (2, 5, 1, 3), (2, 5, 3, 2), dict(stride=2, padding=((0, 0), (2, 4))), "lax"),
    ("ct", (1, 1, 4, 2), (5, 2, 2, 3), dict(stride=(1, 2), padding=((1, 3), (0, 0))), "lax"),  # the axes swapped
    ("ct", (3, 3, 2, 1), (2, 3, 1, 2), dict(stride=2, padding=0), "lax"),  # int padding 0, a plain stride 2
    ("ct", (2, 1, 3, 2), (4, 2, 2, 2), dict(stride=2, padding=((2, 4), (0, 0)), dilation=(2, 1)), "lax"),
    ("conv", (2, 6, 6, 3), (2, 5, 3, 2), dict(stride=(2, 1), padding=((1, 1), (0, 0))), "fd"),
    ("conv", (1, 5, 4, 2), (4, 2, 2, 3), dict(stride=(1, 2), padding=((0, 0), (1, 2))), "fd"),
]


def _axes(x_shape, w_shape, options):
    """The sweep's per-axis geometry ``(n, k, stride, dilation, lo, hi)`` of explicit-padding options."""
    stride, dilation, padding = (options.get(k, 1) for k in ("stride", "dilation", "padding"))
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    stride, dilation = ((v, v) if isinstance(v, int) else v for v in (stride, dilation))
    return [(x_shape[1 + a], w_shape[a], stride[a], dilation[a], *padding[a]) for a in (0, 1)]


def _relative(actual, expected):
    import jax.numpy as jnp

    actual, expected = jnp.asarray(actual, jnp.float64), jnp.asarray(expected, jnp.float64)
    return jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected))


def _check_case(kind, x_shape, w_shape, options, gradient_reference):
    """Max relative errors, per dtype, of forward, hand VJP and jax.vjp of the forward (child process only).

    One jitted program per case: the float64 references, then the three computations in float64 and float32."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    import jaxcnn.functional as F

    rng = np.random.default_rng(len(x_shape) + sum(x_shape) + sum(w_shape))
    forward, hand = (F.conv_transpose2d, F.conv_transpose2d_vjp) if kind == "ct" else (F.conv2d, F.conv2d_vjp)
    forward = functools.partial(forward, **options)
    axes = _axes(x_shape, w_shape, options)
    out = [(ct_out if kind == "ct" else conv_out)(axis) for axis in axes]
    x, w, dy = (rng.standard_normal(shape) for shape in (x_shape, w_shape, (x_shape[0], *out, w_shape[3])))
    y_ref = reference(kind, axes, x, w, dy)[0]

    def lax_vjp(x, w, dy):  # jax.vjp of lax.conv_transpose (explicit padding): compiles on these geometries
        raw = lambda x, w: lax.conv_transpose(  # noqa: E731
            x, w, [a[2] for a in axes], [a[4:] for a in axes], rhs_dilation=[a[3] for a in axes],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
        return jax.vjp(raw, x, w)[1](dy)

    def finite_differences(x, w, dy, step=0.5):  # central, of the (linear) forward along every coordinate
        def along(arg, direction):
            plus, minus = [x, w], [x, w]
            plus[arg], minus[arg] = plus[arg] + step * direction, minus[arg] - step * direction
            return jnp.vdot(forward(*plus) - forward(*minus), dy) / (2 * step)

        return tuple(
            jax.vmap(functools.partial(along, arg))(jnp.eye(a.size, dtype=a.dtype).reshape(a.size, *a.shape)).reshape(
                a.shape
            )
            for arg, a in enumerate((x, w))
        )

    def program(x, w, dy, y_ref):
        grads = (lax_vjp if gradient_reference == "lax" else finite_differences)(x, w, dy)
        errors = []
        for dtype in (jnp.float64, jnp.float32):
            xd, wd, dyd = (a.astype(dtype) for a in (x, w, dy))
            dx, dw, _ = hand(xd, wd, None, dyd, **options)
            auto = jax.vjp(forward, xd, wd)[1](dyd)
            pairs = [(forward(xd, wd), y_ref), (dx, grads[0]), (dw, grads[1]), (auto[0], grads[0]), (auto[1], grads[1])]
            errors.append(jnp.max(jnp.stack([_relative(a, b) for a, b in pairs])))
        return jnp.stack(errors)

    errors = jax.jit(program)(x, w, dy, y_ref)
    return dict(zip(("float64", "float32"), map(float, errors), strict=True))


def _check_model():
    """gradcheck.check_model on a ConvTranspose2D and a Conv2D in formerly aborting geometries (child only)."""
    import jax
    import jax.numpy as jnp

    from jaxcnn import gradcheck, nn

    model = nn.Sequential([
        nn.ConvTranspose2D(3, (2, 3), stride=2, padding=0),  # (3, 2) -> (4, 1): H as the first CASES "ct" row
        nn.Conv2D(2, (2, 3), stride=(2, 1), padding=((1, 1), (1, 1))),  # dx: H kernel 2, stride 2; W kernel 3 > 1
        nn.Flatten(),
        nn.Dense(3),
    ])  # fmt: skip
    params, state = model.init(jax.random.key(0), (3, 2, 2))
    x = jax.random.normal(jax.random.key(1), (2, 3, 2, 2), jnp.float64)
    report = gradcheck.check_model(model, params, state, x, jnp.array([0, 2]))
    return report.ok, report.table() if not report.ok else ""


def _child(indices, model):
    import jax

    jax.config.update("jax_enable_x64", True)
    results = {index: _check_case(*CASES[index]) for index in indices}
    print(json.dumps(dict(cases=results, model=_check_model() if model else (True, ""))))


def _run_child(indices, model=False):
    """Run the checks of CASES[indices] (and check_model) in a child process; fail if it dies."""
    args = [sys.executable, __file__, ",".join(map(str, indices)), "model" if model else "-"]
    process = subprocess.run(args, capture_output=True, text=True, timeout=1200)
    assert process.returncode == 0, f"the child process died ({process.returncode}): {process.stderr[-3000:]}"
    results = json.loads(process.stdout.strip().splitlines()[-1])
    for index, errors in results["cases"].items():
        for dtype, error in errors.items():
            assert error < TOLERANCE[dtype], f"{CASES[int(index)]} {dtype}: relative error {error:.2e}"
    ok, table = results["model"]
    assert ok, table


def test_formerly_aborting_geometries_compile_and_match_references():
    """A sample (the issue's example, a plain int padding 0, a conv2d_vjp dx) in one child process."""
    _run_child([0, 2, 4])


@pytest.mark.slow
def test_all_formerly_aborting_geometries_and_check_model():
    _run_child(range(len(CASES)), model=True)


@pytest.mark.slow
def test_sweep_abort_condition_and_fixed_paths():
    """tests/conv_xla_sweep.py on 300 random geometries of each kind (about 10 minutes; its grid, 25 minutes, is
    run by hand): raw lax aborts exactly where xla_swap_aborts predicts; jaxcnn's convolutions never abort and
    match float64 loops."""
    process = subprocess.run(
        [sys.executable, os.path.join(HERE, "conv_xla_sweep.py"), "--random", "300", "--seed", "2", "--no-grid"],
        capture_output=True, text=True, timeout=7200,
    )  # fmt: skip
    assert process.returncode == 0, process.stdout[-5000:] + process.stderr[-3000:]


if __name__ == "__main__":
    _child([int(i) for i in sys.argv[1].split(",")], sys.argv[2] == "model")
