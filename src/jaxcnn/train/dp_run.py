"""DP-SGD in a training run (``jaxcnn train --dp-clip C --dp-noise SIGMA``): what a config may combine with it, the
run's privacy plan (noise, delta, sampling rate, padded batch), its ledger in every checkpoint, and its step.

How the loop samples and what the accountant assumes (see :mod:`jaxcnn.train.privacy` for the proofs):

* ``dp_sampling="shuffle"`` (the default): the loop's own batches, the training set shuffled each epoch and cut
  into ``ceil(N / B)`` fixed batches; the accountant's ``"shuffle"`` sampling, a proven bound for that loop under
  the zero-out neighbouring relation (each epoch one Gaussian mechanism per example, no amplification claimed),
  so its epsilon is larger. The Poisson figure for the same steps is *not* reported: it is no bound for a
  shuffled loop (Chua et al., ICML 2024), and a run that wants it runs ``dp_sampling="poisson"``.
* ``dp_sampling="poisson"``: step ``s`` takes every example independently with probability ``q = B / N``
  (:func:`jaxcnn.data.poisson.poisson_batch` from ``fold_in(data_key, s)``), padded to a fixed size that no
  draw of the run overflows but with probability 1e-9, the padding masked out, the noisy sum divided by the
  expected batch size ``q N = B``; ``ceil(N / B)`` steps make an epoch. The accountant's ``"poisson"`` figure is
  exact for it. The padding is paid in compute (digits, batch 32: padded to 80).

The noise multiplier is ``dp_noise``, or the one :func:`jaxcnn.train.privacy.noise_for_epsilon` finds for
``dp_target_epsilon`` over the planned ``epochs x steps_per_epoch`` steps (so such a run's epochs are fixed).
Everything here follows from the config and the data's size, so a resumed run recomputes the same plan; its
checkpoint's ledger must match it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from jaxcnn.train import privacy

DP_METHODS = ("ghost", "vmap")  # jaxcnn.train.dp's
DP_SAMPLINGS = ("shuffle", "poisson")
DP_ACCOUNTANTS = ("rdp", "pld")  # jaxcnn.train.privacy's
# the DP fields a resumed run must keep: its privacy ledger counts steps of one mechanism (the method may change,
# as the gradient mode may: both compute the same clipped, noised update)
DP_FIXED = ("dp_clip", "dp_noise", "dp_delta", "dp_target_epsilon", "dp_sampling", "dp_accountant")
EXCLUSIVE = ("dp_noise", "dp_target_epsilon")


def check_config(config: Any) -> None:
    """Raise :class:`jaxcnn.train.config.ConfigError` (one line, naming the fields) for DP fields that are bad
    alone or together, or a run DP-SGD cannot honour (an ensemble, mixed precision, remat, a streamed folder)."""
    from jaxcnn.train.config import STREAMED_DATASETS, ConfigError

    for name, known in (("dp_method", DP_METHODS), ("dp_sampling", DP_SAMPLINGS), ("dp_accountant", DP_ACCOUNTANTS)):
        if getattr(config, name) not in known:
            raise ConfigError(f"unknown {name} {getattr(config, name)!r}; known: {', '.join(known)}", name)
    for name in ("dp_clip", "dp_noise", "dp_target_epsilon", "dp_delta"):
        value = getattr(config, name)
        good = value is None or (not isinstance(value, bool) and isinstance(value, (int, float)))
        good = good and (value is None or (math.isfinite(value) and value > 0))
        if not good or (name == "dp_delta" and value is not None and value >= 1):
            what = "a number in (0, 1)" if name == "dp_delta" else "a finite number > 0"
            raise ConfigError(f"{name} must be {what}, got {value!r}"[:200], name)
    if config.dp_clip is None:
        given = [name for name in ("dp_noise", "dp_target_epsilon", "dp_delta") if getattr(config, name) is not None]
        if given:
            raise ConfigError(f"{given[0]} is for DP-SGD: give dp_clip (the clipping norm) too", given[0], "dp_clip")
        return
    if all(getattr(config, name) is not None for name in EXCLUSIVE):
        raise ConfigError("give dp_noise or dp_target_epsilon, not both (the target chooses the noise)", *EXCLUSIVE)
    if all(getattr(config, name) is None for name in EXCLUSIVE):
        raise ConfigError("dp_clip needs dp_noise (the noise multiplier) or dp_target_epsilon", "dp_clip", *EXCLUSIVE)
    refused = {
        "ensemble": (config.ensemble > 1, f"ensemble {config.ensemble}"),
        "dtype": (config.dtype != "float32", f"dtype {config.dtype!r} (DP-SGD computes in float32)"),
        "remat": (config.remat, "remat"),
        "dataset": (config.dataset in STREAMED_DATASETS, f"dataset {config.dataset!r} (a streamed image folder)"),
    }
    for name, (bad, what) in refused.items():
        if bad:
            raise ConfigError(f"DP-SGD (dp_clip) cannot train with {what}", "dp_clip", name)


def check_given(config: Any, given: dict[str, Any]) -> None:
    """ValueError for flags typed (``given``, field -> value) that ``config``'s run would not honour: a DP flag
    without DP-SGD (``--dp-sampling poisson`` alone must not look like a private run), or ``--gradients`` with a
    DP method that cannot use it (``"ghost"`` is the hand reverse pass itself, ``--gradients engine``)."""
    if config.dp_clip is None:
        typed = [name for name in ("dp_method", "dp_sampling", "dp_accountant") if name in given]
        if typed:
            flag = "--" + typed[0].replace("_", "-")
            raise ValueError(f"{flag} is for DP-SGD: give --dp-clip (the clipping norm) too")
    typed = given.get("gradients")
    if config.dp_clip is not None and config.dp_method == "ghost" and typed not in (None, "engine"):
        raise ValueError(
            f"--dp-method ghost runs the hand reverse pass (--gradients engine), not --gradients {typed}; "
            "use --dp-method vmap for another gradient mode"
        )


@dataclasses.dataclass(frozen=True)
class PrivatePlan:
    """What a DP run's steps and accountant need, resolved from its config and its data's size.

    Attributes:
      clip, noise: the clipping norm ``C`` and the noise multiplier ``sigma``.
      delta, sampling_rate, sampling, accountant: the ledger's (``sampling_rate = min(1, B / N)``).
      method, gradients: the DP step's (``gradients`` None for the ghost method).
      batch_size: ``min(B, N)``, the expected batch under Poisson sampling (its step's divisor).
      padded_batch: Poisson sampling's padded batch size; None for ``"shuffle"``.
      target_epsilon, planned_steps: the target the noise was chosen for (None when given) and the steps planned.
    """

    clip: float
    noise: float
    delta: float
    sampling_rate: float
    sampling: str
    accountant: str
    method: str
    gradients: str | None
    batch_size: int
    padded_batch: int | None
    target_epsilon: float | None
    planned_steps: int

    def ledger(self, steps: int = 0) -> privacy.PrivacyLedger:
        """The accountant's ledger after ``steps`` DP steps."""
        return privacy.PrivacyLedger(
            noise_multiplier=self.noise,
            sampling_rate=self.sampling_rate,
            delta=self.delta,
            accountant=self.accountant,
            sampling=self.sampling,
            steps=steps,
        )

    @property
    def step_key(self) -> tuple:
        """What the compiled step depends on (a run of more epochs or another delta reuses it)."""
        return (self.clip, self.noise, self.method, self.gradients, self.sampling, self.batch_size)

    def describe(self) -> str:
        """One line for the run's log: the mechanism, and which sampling the accountant assumes."""
        noise = f"noise {self.noise:.6g}"
        if self.target_epsilon is not None:
            noise += f" (chosen for epsilon {self.target_epsilon:g} over {self.planned_steps} steps)"
        if self.sampling == "poisson":
            how = (
                f"Poisson sampling, rate {self.sampling_rate:.4g} (batches padded to {self.padded_batch}, mean "
                f"{self.batch_size}): the accountant's epsilon is exact"
            )
        else:
            how = "shuffled fixed batches: epsilon a proven bound (zero-out neighbours, no amplification)"
        return f"DP-SGD: clip {self.clip:g}, {noise}, delta {self.delta:g}, {self.method} norms; {how}"

    def train_step(self, model: Any, options: Any) -> Callable:
        """The jitted DP step ``step(state, x, y, mask=None)`` with the run's loss, input scaling and augmentation
        (``options``, a :class:`jaxcnn.train.step.StepOptions`)."""
        from jaxcnn.train.dp import make_dp_train_step

        return make_dp_train_step(
            model,
            l2_norm_clip=self.clip,
            noise_multiplier=self.noise,
            method=self.method,
            gradients=self.gradients,
            loss_fn=options.loss_fn,
            batch_size=self.batch_size if self.sampling == "poisson" else None,
            input_scaling=options.input_scaling,
            augmentation=options.augmentation,
        )


def plan_of(config: Any, n: int, steps_per_epoch: int) -> PrivatePlan | None:
    """The :class:`PrivatePlan` of ``config``'s run on ``n`` training examples (None without ``dp_clip``)."""
    if config.dp_clip is None:
        return None
    rate = min(1.0, config.batch_size / n)
    if privacy.steps_per_epoch(rate) != steps_per_epoch:  # the accountant's epochs must be the loop's
        raise ValueError(
            f"the accountant's epoch ({privacy.steps_per_epoch(rate)} steps) is not the loop's ({steps_per_epoch})"
        )
    delta = config.dp_delta if config.dp_delta is not None else privacy.default_delta(n)
    planned = config.epochs * steps_per_epoch
    options = dict(sampling_rate=rate, delta=delta, accountant=config.dp_accountant, sampling=config.dp_sampling)
    noise = config.dp_noise
    if noise is None:
        noise = privacy.noise_for_epsilon(config.dp_target_epsilon, steps=planned, **options)
    padded = None
    if config.dp_sampling == "poisson":
        from jaxcnn.data.poisson import padded_batch_size

        padded = padded_batch_size(n, rate, planned)
    return PrivatePlan(
        clip=float(config.dp_clip),
        noise=float(noise),
        delta=float(delta),
        sampling_rate=rate,
        sampling=config.dp_sampling,
        accountant=config.dp_accountant,
        method=config.dp_method,
        gradients=None if config.dp_method == "ghost" else config.gradients,
        batch_size=min(config.batch_size, n),
        padded_batch=padded,
        target_epsilon=config.dp_target_epsilon,
        planned_steps=planned,
    )


def check_model(signature: list[str], label: str) -> None:
    """ValueError when the model keeps running statistics (its :func:`~jaxcnn.train.run.param_signature` lists
    state arrays): its examples are not independent, so clipping each bounds no one's influence."""
    if any(line.startswith("state/") for line in signature):
        raise ValueError(
            f"DP-SGD (--dp-clip) needs independent examples; model {label} keeps running statistics (BatchNorm): "
            "use GroupNorm or LayerNorm"
        )


def check_ledger(saved: dict[str, Any] | None, plan: PrivatePlan | None, step: int, where: str) -> None:
    """ValueError unless a checkpoint's privacy ledger (``saved``, its JSON; None for a run without DP) is the
    one ``plan`` gives after the checkpoint's ``step`` steps: a resumed DP run continues its own ledger."""
    if saved is None and plan is None:
        return
    expected = None if plan is None else plan.ledger(step)
    try:
        ledger = None if saved is None else privacy.PrivacyLedger.from_json(saved)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {where} has a malformed privacy ledger: {error}") from None
    if ledger != expected:
        raise ValueError(
            f"checkpoint {where} was trained with other DP settings (ledger {saved}; this run: "
            f"{None if expected is None else expected.to_json()}); resume with the run's DP flags, or use a new workdir"
        )
