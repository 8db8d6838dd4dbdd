"""Sweep small convolution geometries for the XLA:CPU operand-swap abort (issue 18, defect 1), case by case.

XLA:CPU aborts the whole process (SIGABRT, "Window dimensions do not match RHS shape") on some convolutions with
``lhs_dilation``; ``jaxcnn.functional.conv.xla_swap_aborts`` states the condition (see the comment above it).
This script checks that statement against XLA itself and checks that jaxcnn's convolutions never abort and stay
right (against a float64 NumPy loop reference, independent of XLA) on every geometry of the sweep:

* ``ct``: transposed convolutions. ``lax``: the raw ``lax.conv_general_dilated(..., lhs_dilation=stride)``
  (must abort exactly where predicted and be right elsewhere); ``lax_vjp``: ``jax.vjp`` of it (reported, not
  judged); ``ours``: ``F.conv_transpose2d``, ``F.conv_transpose2d_vjp`` and ``jax.vjp`` of ``F.conv_transpose2d``
  in one program, which must never abort and must match the reference.
* ``conv``: convolutions. ``lax_dx``: the dx convolution ``conv2d_vjp`` built before the fix (lhs-dilated by the
  stride; judged as ``lax``); ``lax_vjp``: ``jax.vjp`` of ``lax.conv_general_dilated`` (reported); ``ours``:
  ``F.conv2d``, ``F.conv2d_vjp`` and ``jax.vjp`` of ``F.conv2d``.

Each case runs in a worker process that runs the cases in order; when one aborts, the worker dies, that case is
recorded as an abort, and a fresh worker resumes at the next case, so an abort never kills the sweep (and every
case compiles in a process on its own, after no earlier case failed in it).

    PYTHONPATH=src python tests/conv_xla_sweep.py            # the grid: 5,712 cases, 25 min on 2 busy cores
    PYTHONPATH=src python tests/conv_xla_sweep.py --random 400 --seed 1 --no-grid    # 400 random geometries
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile

import numpy as np

# -- geometry: one spatial axis is (n, k, stride, dilation, lo, hi) --------------------------------------------


def ct_out(axis):
    n, k, s, d, lo, hi = axis
    return (n - 1) * s + 1 + lo + hi - (k - 1) * d


def conv_out(axis):
    n, k, s, d, lo, hi = axis
    return (n + lo + hi - (k - 1) * d - 1) // s + 1


def pairs_of(kind, axes):
    """(out index, in index, tap) triples per axis: out[o] receives in[i] * w[j]."""
    n, k, s, d, lo, hi = axes
    if kind == "ct":  # o = i * s + lo - j * d
        out = ct_out(axes)
        return [(i * s + lo - j * d, i, j) for i in range(n) for j in range(k) if 0 <= i * s + lo - j * d < out]
    out = conv_out(axes)  # conv: o * s + j * d - lo = i
    return [(o, o * s + j * d - lo, j) for o in range(out) for j in range(k) if 0 <= o * s + j * d - lo < n]


def reference(kind, axes, x, w, dy):
    """y, dx, dw in float64 by explicit loops (the sums that define the ops)."""
    (ph, pw), y = [pairs_of(kind, a) for a in axes], np.zeros(dy.shape)
    dx, dw = np.zeros(x.shape), np.zeros(w.shape)
    for (oh, ih, jh), (ow, iw, jw) in itertools.product(ph, pw):
        y[:, oh, ow] += x[:, ih, iw] @ w[jh, jw]
        dx[:, ih, iw] += dy[:, oh, ow] @ w[jh, jw].T
        dw[jh, jw] += x[:, ih, iw].T @ dy[:, oh, ow]
    return y, dx, dw


def arrays(kind, axes, batch=2, channels=3, features=2, seed=0):
    rng = np.random.default_rng(seed)
    out = [(ct_out if kind == "ct" else conv_out)(a) for a in axes]
    x = rng.standard_normal((batch, axes[0][0], axes[1][0], channels))
    w = rng.standard_normal((axes[0][1], axes[1][1], channels, features))
    return x, w, rng.standard_normal((batch, *out, features))


# -- the worker: runs cases from a file, announcing each before it compiles it ---------------------------------


def run_case(case):
    import jax
    import jax.numpy as jnp
    from jax import lax

    import jaxcnn.functional as F

    kind, op, axes = case["kind"], case["op"], case["axes"]
    x, w, dy = arrays(kind, axes)
    stride = tuple(a[2] for a in axes)
    dilation = tuple(a[3] for a in axes)
    pads = tuple((a[4], a[5]) for a in axes)
    dims = ("NHWC", "HWIO", "NHWC")
    y_ref, dx_ref, dw_ref = reference(kind, axes, x, w, dy)
    x, w, dy = jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)
    if kind == "ct":
        raw = lambda x, w: lax.conv_general_dilated(  # noqa: E731
            x, w, (1, 1), pads, lhs_dilation=stride, rhs_dilation=dilation, dimension_numbers=dims
        )
        ours = lambda x, w: F.conv_transpose2d(x, w, stride=stride, padding=pads, dilation=dilation)  # noqa: E731
        hand = lambda x, w, dy: F.conv_transpose2d_vjp(x, w, None, dy, stride=stride, padding=pads, dilation=dilation)  # noqa: E731
    else:
        raw = lambda x, w: lax.conv_general_dilated(  # noqa: E731
            x, w, stride, pads, rhs_dilation=dilation, dimension_numbers=dims
        )
        ours = lambda x, w: F.conv2d(x, w, stride=stride, padding=pads, dilation=dilation)  # noqa: E731
        hand = lambda x, w, dy: F.conv2d_vjp(x, w, None, dy, stride=stride, padding=pads, dilation=dilation)  # noqa: E731
    if op == "lax":
        got, want = [jax.jit(raw)(x, w)], [y_ref]
    elif op == "lax_vjp":  # jax.vjp of the raw forward
        got, want = list(jax.jit(lambda x, w, dy: jax.vjp(raw, x, w)[1](dy))(x, w, dy)), [dx_ref, dw_ref]
    elif op == "lax_dx":  # the dx convolution conv2d_vjp built before the fix
        out = dy.shape[1:3]
        dx_pads = [((a[1] - 1) * a[3] - a[4], a[0] - 1 - (o - 1) * a[2] + a[4]) for a, o in zip(axes, out, strict=True)]
        conv = lambda dy, w: lax.conv_general_dilated(  # noqa: E731
            dy, w, (1, 1), dx_pads, lhs_dilation=stride, rhs_dilation=dilation, dimension_numbers=dims
        )
        got, want = [jax.jit(conv)(dy, w[::-1, ::-1].transpose(0, 1, 3, 2))], [dx_ref]
    elif op == "ours":  # jaxcnn's forward, hand VJP and jax.vjp of its forward, in one program

        def program(x, w, dy):
            y, pullback = jax.vjp(ours, x, w)
            return (y, *hand(x, w, dy)[:2], *pullback(dy))

        got, want = list(jax.jit(program)(x, w, dy)), [y_ref, dx_ref, dw_ref, dx_ref, dw_ref]
    else:
        raise ValueError(op)
    err = max(
        float(np.max(np.abs(np.asarray(g) - r), initial=0.0) / max(np.max(np.abs(r), initial=0.0), 1e-300))
        for g, r in zip(got, want, strict=True)
    )
    return err


def worker(path, start):
    import jax

    jax.config.update("jax_enable_x64", True)
    cases = json.load(open(path))
    for index in range(start, len(cases)):
        print(f"B {index}", flush=True)
        try:
            err = run_case(cases[index])
            print(f"R {index} {err!r}", flush=True)
        except Exception as error:  # noqa: BLE001 - a Python error is a result too
            print(f"E {index} {type(error).__name__}: {str(error)[:200]!r}", flush=True)


def run_all(cases):
    """{index: ("ok", rel err) | ("abort", rc) | ("error", message)} for every case."""
    results = {}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(cases, handle)
    start = 0
    while start < len(cases):
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", handle.name, str(start)], capture_output=True, text=True
        )
        last = None
        for line in proc.stdout.splitlines():
            tag, index, *rest = line.split(" ", 2)
            index = int(index)
            if tag == "B":
                last = index
            elif tag == "R":
                results[index] = ("ok", float(rest[0]))
            else:
                results[index] = ("error", rest[0])
        if proc.returncode == 0:
            break
        if last is None or last in results:
            sys.exit(f"worker failed outside a case ({proc.returncode}): {proc.stderr[-2000:]}")
        results[last] = ("abort", proc.returncode)
        start = last + 1
        print(f"  case {last} aborted (rc {proc.returncode}): {cases[last]}", flush=True)
    return results


# -- the case lists -----------------------------------------------------------------------------------------------


def axis_grid(kind, sizes, kernels, strides, dilations, pads):
    out = []
    for n, k, s, d, lo, hi in itertools.product(sizes, kernels, strides, dilations, pads, pads):
        axis = (n, k, s, d, lo, hi)
        if (ct_out if kind == "ct" else conv_out)(axis) >= 1 and (kind == "ct" or n + lo + hi >= (k - 1) * d + 1):
            out.append(axis)
    return out


# partner axes, paired with every axis of a grid (both orders for the first): ones that make XLA want to swap
# (a kernel longer than the input), one where an input of 1 padded K - 1 both sides does not, an unswapped one
CT_PARTNERS = [(1, 5, 1, 1, 2, 4), (1, 3, 1, 1, 2, 2), (2, 5, 2, 1, 0, 3), (3, 2, 1, 1, 0, 0)]
CONV_PARTNERS = [(6, 5, 1, 1, 0, 0), (5, 5, 1, 1, 0, 0)]


def cases_for(kind, grid, partners, ops):
    """Every grid axis with the first partner in both orders (all ops), and with the others (lax_vjp left out)."""
    cases = []
    for a in grid:
        for number, axes in enumerate(([a, partners[0]], [partners[0], a], *([a, b] for b in partners[1:]))):
            cases += [dict(kind=kind, op=op, axes=axes) for op in ops if number < 2 or op != "lax_vjp"]
    return cases


def predicted(case):
    from jaxcnn.functional.conv import xla_swap_aborts

    axes = case["axes"]
    if case["kind"] == "ct":
        lhs, rhs = [a[0] for a in axes], [a[1] for a in axes]
        pads = [(a[4], a[5]) for a in axes]
    else:  # the dx convolution: lhs is dy
        lhs, rhs = [conv_out(a) for a in axes], [a[1] for a in axes]
        pads = [((a[1] - 1) * a[3] - a[4], a[0] - 1 - (conv_out(a) - 1) * a[2] + a[4]) for a in axes]
    return bool(xla_swap_aborts(lhs, rhs, (1, 1), pads, [a[2] for a in axes], [a[3] for a in axes]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--random", type=int, default=0, help="also this many random geometries of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-grid", action="store_true", help="only the random geometries")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]))
    ct_grid = axis_grid("ct", (1, 2, 3), (1, 2, 3), (1, 2, 3), (1, 2), (0, 1))
    conv_grid = axis_grid("conv", (2, 4, 5), (1, 2, 3), (1, 2, 3), (1, 2), (0, 1, 2))
    ops = {"ct": ("lax", "lax_vjp", "ours"), "conv": ("lax_dx", "lax_vjp", "ours")}
    cases = [] if args.no_grid else cases_for("ct", ct_grid, CT_PARTNERS, ops["ct"])
    cases += [] if args.no_grid else cases_for("conv", conv_grid, CONV_PARTNERS, ops["conv"])
    rng = np.random.default_rng(args.seed)
    for kind in ("ct", "conv"):
        grid = axis_grid(kind, (1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 5), (1, 2, 3), (1, 2, 3), (0, 1, 2, 3, 4))
        # half of them with one axis of the pattern XLA mishandles (kernel 2, stride 2, dilation 1, and the
        # padding that leaves the lhs-dilated convolution unpadded), which a uniform draw seldom meets
        group = [a for a in grid if a[1:4] == (2, 2, 1) and a[4:] in ([(0, 0)] if kind == "ct" else [(1, 1), (1, 2)])]
        for number in range(args.random):
            axes = [list(grid[i]) for i in rng.integers(len(grid), size=2)]
            if number % 2:
                axes[number // 2 % 2] = list(group[rng.integers(len(group))])
            cases += [dict(kind=kind, op=op, axes=axes) for op in ops[kind]]
    print(f"{len(cases)} cases", flush=True)
    results = run_all(cases)
    failures, counts = [], {}
    for index, case in enumerate(cases):
        status, value = results.get(index, ("missing", None))
        raw = case["op"] in ("lax", "lax_dx")
        key = (case["kind"], case["op"], status)
        counts[key] = counts.get(key, 0) + 1
        if case["op"] == "lax_vjp":
            continue  # reported only
        if raw and (status == "abort") != predicted(case):
            failures.append(f"prediction wrong ({status}, predicted abort={predicted(case)}): {case}")
        elif status == "error" or (not raw and status != "ok") or (status == "ok" and value > 1e-10):
            failures.append(f"{status} {value}: {case}")
    for key in sorted(counts):
        print(*key, counts[key])
    print("\n".join(failures) if failures else "all as predicted; jaxcnn never aborted and matched the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
