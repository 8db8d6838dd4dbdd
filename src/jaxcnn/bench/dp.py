"""The DP-SGD step benchmark (``jaxcnn bench --dp``): jaxcnn's ghost and vmap DP steps against its own
non-private step, Opacus's ghost clipping and jax_privacy's clipped gradients, on the same model and batch.

Every contender takes one whole training step (SGD with momentum 0.9, float32, the same synthetic batch on the
device), and each DP one clips every example's gradient to ``l2_norm_clip``, adds Gaussian noise of standard
deviation ``noise_multiplier * l2_norm_clip`` to the sum and divides by the batch size. What each computes:

* ``jaxcnn-engine``: the non-private step, hand reverse pass (``make_train_step(gradients="engine")``): the
  reference of every ratio.
* ``jaxcnn-dp-ghost``: :func:`jaxcnn.train.make_dp_train_step` ``method="ghost"``: one forward and one hand
  reverse pass record each layer's input and output cotangent; per-example norms from them (ghost norms,
  per layer the cheaper of ghost and direct), the clipped sum by book-keeping; no second backward.
* ``jaxcnn-dp-vmap``: the same with ``method="vmap"``: per-example gradients by ``jax.vmap(grad)`` (autodiff),
  clipped and summed (N gradient copies held).
* ``opacus-ghost``: Opacus's ``PrivacyEngine.make_private(grad_sample_mode="ghost")`` on the PyTorch twin
  (:func:`jaxcnn.interop.torch_module`): the first backward's hooks give per-example norms, by the ghost norm
  for ``nn.Linear`` (Opacus registers norm samplers for Linear and Embedding only) and from each example's
  gradient formed per layer (unfold and einsum, then freed) for convolutions and GroupNorm; then a second
  backward of the loss weighted by the clip factors, noise in the optimizer step. Needs ``opacus``.
* ``jax_privacy``: ``jax_privacy.clipping.clipped_grad`` (jax_privacy 2.x) over the model's autodiff loss:
  per-example gradients by ``jax.vmap`` over batches of one, each clipped by its global norm and summed; noise by
  ``jax_privacy.noise_addition.gaussian_privatizer``; optax SGD. Needs ``jax_privacy``.

Memory: XLA's compiled temp size for the JAX contenders; PyTorch's CUDA peak on a GPU (PyTorch reports no peak
for its CPU allocator, so none on CPU). Models with running statistics (BatchNorm) are refused: DP-SGD needs
independent examples.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from jaxcnn import models, nn
from jaxcnn.bench.contenders import (
    LEARNING_RATE,
    MOMENTUM,
    Options,
    Runner,
    _jax_runner,
    _jaxcnn_runner,
    torch_device,
    torch_timed,
)
from jaxcnn.bench.harness import _batch, _ready, _rows, _time_rounds
from jaxcnn.bench.report import machine, peak_memory
from jaxcnn.interop.torch import torch_module

DP_CONTENDERS = ("jaxcnn-engine", "jaxcnn-dp-ghost", "jaxcnn-dp-vmap", "opacus-ghost", "jax_privacy")
REFERENCE = "jaxcnn-engine"
WHAT = {
    "jaxcnn-engine": "non-private step, hand reverse pass",
    "jaxcnn-dp-ghost": "ghost norms from the hand rules + book-keeping clipped sum, one backward",
    "jaxcnn-dp-vmap": "vmap(grad) per-example gradients, clipped, summed",
    "opacus-ghost": "ghost norms (Linear) / per-layer per-example grads (conv, norms), then a 2nd backward",
    "jax_privacy": "clipping.clipped_grad: vmap(grad) per-example gradients, clipped, summed",
}


def run_dp(
    model_names: Sequence[str] = ("mnist_cnn",),
    *,
    batch_size: int = 128,
    rounds: int = 7,
    steps: int = 10,
    warmup: int = 3,
    contenders: Sequence[str] = DP_CONTENDERS,
    l2_norm_clip: float = 1.0,
    noise_multiplier: float = 1.0,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Benchmark one DP-SGD training step of each model for each contender (see :mod:`jaxcnn.bench.dp`).

    Args:
      model_names: architectures from :mod:`jaxcnn.models` without running statistics, at their design input
        shape (inputs ``(batch_size, *input_shape)``, integer labels).
      batch_size: images per step.
      rounds: interleaved timing rounds (the median is reported); steps: train steps per round.
      warmup: untimed steps per contender after compiling.
      contenders: a subset of :data:`DP_CONTENDERS`; Opacus and jax_privacy are skipped, with the reason in the
        result's ``"skipped"``, when they are not importable.
      l2_norm_clip: the clipping norm ``C``; noise_multiplier: ``sigma`` (noise ``N(0, (sigma C)^2)``).
      log: called with progress lines (None for silence).

    Returns:
      ``{"machine", "settings", "results", "skipped", "memory"}`` as :func:`jaxcnn.bench.run` gives, every row's
      ratio taken to ``jaxcnn-engine`` (the non-private step), with ``"what"`` (what it computes),
      ``"time_ratio"`` (its median step time over the non-private one's), ``"round_time_ratios"`` (the same in
      each round, against that round's non-private step) and ``"temp_ratio"`` (its XLA temp size
      over the non-private step's; None for PyTorch); ``"skipped"`` maps ``model/contender`` to the reason it did
      not run.

    Raises:
      ValueError: in one line, for an unknown contender, a setting out of range or a model with BatchNorm.
    """
    from jaxcnn.bench.harness import _check_settings
    from jaxcnn.train.dp import check_dp

    unknown = sorted(set(contenders) - set(DP_CONTENDERS))
    if unknown:
        raise ValueError(f"unknown DP contenders {unknown}; known: {', '.join(DP_CONTENDERS)}")
    _check_settings((), batch_size, rounds, steps, warmup, "float32", 1, False)
    check_dp(l2_norm_clip, noise_multiplier)
    say = log or (lambda line: None)
    cases = {name: _dp_model(name) for name in model_names}  # every refusal before any compiling
    results, skipped = [], {}
    for name, (model, input_shape) in cases.items():
        x, y = _batch(input_shape, batch_size, model.output_shape(input_shape)[-1])
        build = _builders(model, input_shape, x, y, l2_norm_clip, noise_multiplier)
        reasons: dict[str, str] = {}
        ready = _ready(name, {c: build[c] for c in contenders}, 1, warmup, say, reasons)
        skipped |= {f"{name}/{contender}": reason for contender, reason in reasons.items()}
        timings = _time_rounds(name, {c: runner for c, (runner, _, _) in ready.items()}, rounds, steps, batch_size, say)
        results += _dp_rows(_rows(name, timings, ready, REFERENCE))
    settings = dict(
        models=list(model_names), batch_size=batch_size, rounds=rounds, steps=steps, warmup=warmup,
        optimizer=f"sgd(lr={LEARNING_RATE}, momentum={MOMENTUM})", dtype="float32", l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier, reference=REFERENCE, torch_device=_torch_device(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )  # fmt: skip
    info = machine() | {name: _version(name) for name in ("opacus", "jax_privacy")}
    return {"machine": info, "settings": settings, "results": results, "skipped": skipped, "memory": peak_memory()}


def _dp_rows(rows: list[dict]) -> list[dict]:
    """The rows with what each contender computes, and its step time and XLA temp size as ratios to the
    non-private step's (None where either is missing)."""
    reference = next((row for row in rows if row["contender"] == REFERENCE), None)
    temp = lambda row: (row.get("memory") or {}).get("temp_bytes")  # noqa: E731
    base = None if reference is None else temp(reference)

    def by_round(row: dict) -> list[float]:  # against the same round's non-private step: a slow phase cancels
        pairs = zip(row["rounds_images_per_second"], reference["rounds_images_per_second"], strict=True)
        return [ref / own for own, ref in pairs]

    return [
        row
        | {
            "what": WHAT[row["contender"]],
            "time_ratio": None if row["ratio"] is None else 1 / row["ratio"],
            "round_time_ratios": None if reference is None else by_round(row),
            "temp_ratio": temp(row) / base if temp(row) is not None and base else None,
        }
        for row in rows
    ]


def _dp_model(name: str) -> tuple[nn.Layer, tuple[int, ...]]:
    """The model and its input shape; ValueError in one line for a model with running statistics."""
    model, input_shape = models.get(name), models.input_shape(name)
    if input_shape is None:
        raise ValueError(f"model {name!r} was registered without an input shape; bench --dp needs one")
    _, state = jax.eval_shape(lambda: model.init(jax.random.key(0), input_shape))
    if jax.tree.leaves(state):
        raise ValueError(
            f"bench --dp: model {name!r} keeps running statistics (BatchNorm), so its examples are not "
            "independent and DP-SGD refuses it; use a GroupNorm variant (e.g. resnet20_cifar_groupnorm)"
        )
    return model, input_shape


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None
    except AttributeError:
        return "unknown"


def _torch_device() -> str | None:
    try:
        return torch_device()
    except ImportError:
        return None


def _builders(model, input_shape, x, y, clip: float, sigma: float) -> dict[str, Callable[[], Runner] | str]:
    """Every contender's runner, built when called; a string in place of one: why it cannot run here."""
    case = (model, input_shape, x, y)
    build: dict[str, Callable[[], Runner] | str] = {
        "jaxcnn-engine": lambda: _jaxcnn_runner(*case, "engine", Options()),
        "jaxcnn-dp-ghost": lambda: _dp_runner(*case, "ghost", clip, sigma),
        "jaxcnn-dp-vmap": lambda: _dp_runner(*case, "vmap", clip, sigma),
        "opacus-ghost": lambda: _opacus_runner(*case, clip, sigma),
        "jax_privacy": lambda: _jax_privacy_runner(*case, clip, sigma),
    }
    for contender, package in (("opacus-ghost", "opacus"), ("jax_privacy", "jax_privacy")):
        if _version(package) is None:
            build[contender] = f"{package} is not installed"
    return build


def _dp_runner(model, input_shape, x, y, method: str, clip: float, sigma: float) -> Runner:
    """jaxcnn's DP-SGD step (:func:`jaxcnn.train.make_dp_train_step`) by ``method``."""
    from jaxcnn import train
    from jaxcnn.train.dp import make_dp_train_step

    optimizer = optax.sgd(LEARNING_RATE, MOMENTUM)
    state = train.create_train_state(model, optimizer, jax.random.key(0), input_shape)
    step = make_dp_train_step(model, optimizer, l2_norm_clip=clip, noise_multiplier=sigma, method=method)
    return _jax_runner(step, state, x, y, 1)


def _jax_privacy_runner(model, input_shape, x, y, clip: float, sigma: float) -> Runner:
    """jax_privacy 2.x: ``clipping.clipped_grad`` of the model's autodiff loss, ``gaussian_privatizer`` noise,
    the mean, optax SGD; one jitted step."""
    from jax_privacy import clipping, noise_addition

    from jaxcnn.functional import softmax_cross_entropy

    params, model_state = model.init(jax.random.key(0), input_shape)

    def loss(params, images, labels):  # one example, kept as a batch of one (keep_batch_dim=True)
        logits, _ = model.apply(params, model_state, images, train=True, gradients="autodiff")
        return softmax_cross_entropy(logits, labels)

    clipped = clipping.clipped_grad(loss, l2_clip_norm=clip, batch_argnums=(1, 2), return_values=True)
    optimizer = optax.chain(
        noise_addition.gaussian_privatizer(stddev=sigma * clip, prng_key=jax.random.key(1)),
        optax.scale(1.0 / x.shape[0]),
        optax.sgd(LEARNING_RATE, MOMENTUM),
    )

    def step(carry, images, labels):
        params, opt_state = carry
        grads, aux = clipped(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), aux.values.mean()

    return _jax_runner(jax.jit(step, donate_argnums=0), (params, optimizer.init(params)), x, y, 1)


def _opacus_runner(model, input_shape, x, y, clip: float, sigma: float) -> Runner:
    """Opacus's ghost clipping on the PyTorch twin: ``PrivacyEngine.make_private(grad_sample_mode="ghost")``
    wraps module, optimizer and loss; ``loss.backward()`` runs both backward passes."""
    import torch
    from opacus import PrivacyEngine

    device = torch_device()
    quiet = functools.partial(warnings.catch_warnings, action="ignore", category=UserWarning)  # its notices per step
    module = torch_module(model, input_shape).to(device).train()
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    labels = torch.from_numpy(y.astype(np.int64)).to(device)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=len(labels))
    optimizer = torch.optim.SGD(module.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    with quiet():
        module, optimizer, criterion, _ = PrivacyEngine().make_private(
            module=module, optimizer=optimizer, data_loader=loader, criterion=torch.nn.CrossEntropyLoss(),
            noise_multiplier=sigma, max_grad_norm=clip, grad_sample_mode="ghost", poisson_sampling=False,
        )  # fmt: skip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with quiet():
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(module(images), labels)
            loss.backward()
            optimizer.step()
        return loss

    return torch_timed(step, device)
