"""The privacy accountant of DP-SGD: epsilon for a run's noise, sampling rate, steps and delta, through Google's
``dp_accounting``, the noise multiplier that reaches a target epsilon, and a JSON-able ledger a resumed run continues.

One DP-SGD step clips each example's gradient to norm ``C``, sums, and adds ``N(0, (sigma C)^2)`` noise: a Gaussian
mechanism of noise multiplier ``sigma`` (the noise's standard deviation over the sum's sensitivity ``C``) applied
to the batch. What epsilon the run spends depends on how the batches are drawn, and the two ``sampling`` values
model two different loops:

``sampling="poisson"``: every step takes each example independently with probability ``q = sampling_rate``
  (batches of random size, mean ``q N``). ``dp_accounting`` event: ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
  GaussianDpEvent(sigma)), steps)``, neighbouring datasets differ by adding or removing one example. This is exact
  for a loop that Poisson-samples (the accountant's figure is a proven bound for it). It is *not* a proven bound
  for the loop ``fit`` runs today, which shuffles the training set each epoch and cuts it into fixed batches of
  ``B`` (``q = B / N``): quoting the Poisson figure for a shuffled loop is common practice (Abadi et al. 2016 did)
  but an approximation, and Chua et al. ("How Private are DP-SGD Implementations?", ICML 2024) show shuffled
  batches can leak more than it says.

``sampling="shuffle"``: a proven upper bound for the shuffled loop. Each epoch puts every example in exactly one
  batch, so, however the batches are ordered, one epoch is at most one Gaussian mechanism of multiplier ``sigma``
  on that example, and ``E`` epochs compose ``E`` of them (no amplification from the shuffling is claimed, which
  is why the figure is much larger). The neighbouring relation is "zero-out" (one example replaced by one whose
  clipped gradient is zero; dp_accounting's ``REPLACE_SPECIAL``, Kairouz et al. 2021, definition 1.1), the relation
  under which fixed partitions into batches are analysed: adding an example would shift every later batch. A
  started epoch counts as a whole one: ``E = ceil(steps / steps_per_epoch)``, ``steps_per_epoch = ceil(1 / q)``
  (the loop runs the last partial batch too). ``E`` Gaussians of ``sigma`` are exactly one Gaussian of
  ``sigma / sqrt(E)`` (the Gaussian's privacy loss is itself Gaussian), the event composed here.

dp_accounting also has ``SampledWithoutReplacementDpEvent`` (a fresh uniformly random batch of exactly ``B``
drawn independently at every step, replace-one relation, RDP only). It models neither loop (the shuffled
loop's batches within an epoch are disjoint, not independent), so it is not offered.

Either figure holds only if the batch's size reveals nothing: a Poisson-sampling step must divide the noisy sum
by the expected batch size ``q N``, not by the size it drew (the drawn size depends on the data); a shuffled
step may divide by its batch's size (under zero-out the sizes are fixed by ``N`` and ``B``).

``accountant="rdp"`` uses dp_accounting's ``RdpAccountant`` with its default orders (fast, a looser upper
bound); ``"pld"`` its ``PLDAccountant`` (privacy loss distributions, default discretisation 1e-4: a tighter
bound, 10% lower on the digits' setting below, and slower: 0.7 s for 1800 Poisson steps). For ``"shuffle"``,
``"pld"`` takes the exact epsilon of the single Gaussian (``gaussian_mechanism.get_epsilon_gaussian``, Balle and
Wang 2018), which the PLD accountant reaches to 1e-9 in seconds rather than milliseconds.

Digits (N = 1437, batch 32, q = 32/1437, 45 steps an epoch), 40 epochs, sigma 1.0, delta 1e-4: "poisson" 5.76
(rdp), 5.17 (pld); "shuffle" 45.5 (rdp), 42.7 (pld).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dp_accounting
    from dp_accounting import dp_event

from jaxcnn._validate import is_int

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "shuffle")

# noise_for_epsilon's search range and tolerance: the answer is within NOISE_RTOL (relative) of the smallest
# multiplier reaching the target, never below it
NOISE_RANGE = (2.0**-10, 2.0**12)
NOISE_RTOL = 1e-4


def _check_positive(value: object, name: str, *, upper: float | None = None, closed: bool = False) -> float:
    """``value`` as a float if it is a finite number > 0 (and < ``upper``, or <= with ``closed``); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
    if upper is not None and (value > upper or (value == upper and not closed)):
        raise ValueError(f"`{name}` must be {'<=' if closed else '<'} {upper}, got {value!r}")
    return float(value)


def _check_args(
    noise_multiplier: object, sampling_rate: object, steps: object, delta: object, accountant: object, sampling: object
) -> None:
    """Raise a one-line ValueError naming the first bad argument of :func:`epsilon`."""
    _check_positive(noise_multiplier, "noise_multiplier")
    _check_positive(sampling_rate, "sampling_rate", upper=1.0, closed=True)
    _check_positive(delta, "delta", upper=1.0)
    if not is_int(steps) or steps < 0:
        raise ValueError(f"`steps` must be an int >= 0, got {steps!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"`sampling` must be one of {SAMPLINGS}, got {sampling!r}")


def steps_per_epoch(sampling_rate: float) -> int:
    """The steps of one shuffled epoch of batches ``B`` out of ``N`` for ``sampling_rate = B / N``: ``ceil(N / B)``.

    ``1 / sampling_rate`` is ``N / B`` up to float rounding: an integer ``N / B`` comes back within 1e-9 of it
    (and is taken as it is), any other is at least ``1 / B`` from the nearest integer (and is rounded up).
    """
    ratio = 1.0 / sampling_rate
    nearest = round(ratio)
    return nearest if abs(ratio - nearest) <= 1e-9 * nearest else math.ceil(ratio)


# dp_accounting is imported where it is used: it loads scipy.signal and scipy.stats (about 1.1 s), which every
# `jaxcnn train` would otherwise pay at start-up, DP-SGD or not (this module comes with jaxcnn.train.config).


def make_event(*, noise_multiplier: float, sampling_rate: float, steps: int, sampling: str) -> dp_event.DpEvent:
    """The ``dp_accounting`` event of ``steps`` DP-SGD steps under ``sampling`` (see the module's docstring)."""
    from dp_accounting import dp_event

    if sampling == "poisson":
        step = dp_event.PoissonSampledDpEvent(sampling_rate, dp_event.GaussianDpEvent(noise_multiplier))
        return dp_event.SelfComposedDpEvent(step, steps)
    epochs = math.ceil(steps / steps_per_epoch(sampling_rate))
    return dp_event.GaussianDpEvent(noise_multiplier / math.sqrt(epochs))  # E Gaussians of sigma, composed


def make_accountant(accountant: str, sampling: str) -> dp_accounting.PrivacyAccountant:
    """A fresh dp_accounting accountant (``"rdp"`` or ``"pld"``) with the neighbouring relation ``sampling`` needs."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    relation = dp_accounting.NeighboringRelation
    neighbours = relation.ADD_OR_REMOVE_ONE if sampling == "poisson" else relation.REPLACE_SPECIAL
    if accountant == "rdp":
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=neighbours)
    return pld_privacy_accountant.PLDAccountant(neighboring_relation=neighbours)


def epsilon(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    sampling: str = "poisson",
) -> float:
    """The epsilon that ``steps`` DP-SGD steps spend at ``delta``.

    Which loop each ``sampling`` models, which figure is a proven bound and which an approximation: see the
    module's docstring (``"poisson"`` is exact for Poisson sampling and only an approximation for shuffled fixed
    batches; ``"shuffle"`` is a proven, larger bound for shuffled fixed batches).

    Args:
      noise_multiplier: sigma, the noise's standard deviation over the clipping norm (> 0).
      sampling_rate: q = batch size / training-set size, in (0, 1].
      steps: the steps taken so far (>= 0); 0 steps spend epsilon 0.
      delta: the delta of the (epsilon, delta) guarantee, in (0, 1); see :func:`default_delta`.
      accountant: ``"rdp"`` (Renyi DP, default orders) or ``"pld"`` (privacy loss distributions, tighter).
      sampling: ``"poisson"`` or ``"shuffle"``.

    Returns:
      epsilon, a float >= 0 (``inf`` where the accountant finds no finite bound).
    """
    _check_args(noise_multiplier, sampling_rate, steps, delta, accountant, sampling)
    if steps == 0:
        return 0.0
    event = make_event(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps, sampling=sampling)
    if sampling == "shuffle" and accountant == "pld":  # exact for one Gaussian; the PLD's figure tends to it
        from dp_accounting import gaussian_mechanism

        return float(gaussian_mechanism.get_epsilon_gaussian(event.noise_multiplier, delta))
    return float(make_accountant(accountant, sampling).compose(event).get_epsilon(delta))


def noise_for_epsilon(
    target_epsilon: float,
    *,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    sampling: str = "poisson",
) -> float:
    """The smallest noise multiplier whose ``steps`` steps spend at most ``target_epsilon`` at ``delta``.

    Epsilon falls as the noise grows, so a bisection finds it: the multiplier is bracketed by halving or doubling
    from 1 within ``NOISE_RANGE`` (2^-10 to 2^12), then the bracket is halved (in log scale) until its ends are
    within a factor ``1 + NOISE_RTOL`` (1e-4). The answer is the bracket's upper end ``s``: ``epsilon(s) <=
    target_epsilon`` always, and ``s`` is less than 0.01% above the smallest multiplier that reaches the target.
    About 15 evaluations of :func:`epsilon`: under a second with ``"rdp"``, about 10 s for 1800 Poisson steps
    with ``"pld"``.

    Args:
      target_epsilon: the epsilon to spend (> 0).
      sampling_rate, steps, delta, accountant, sampling: as for :func:`epsilon` (``steps`` >= 1).

    Returns:
      The noise multiplier sigma, a float.

    Raises:
      ValueError: a bad argument, or a target no multiplier in ``NOISE_RANGE`` reaches (or every one does).
    """
    _check_positive(target_epsilon, "target_epsilon")
    _check_args(1.0, sampling_rate, steps, delta, accountant, sampling)
    if steps == 0:
        raise ValueError("`steps` must be >= 1 to choose a noise multiplier (0 steps spend no epsilon), got 0")

    def spent(noise: float) -> float:
        return epsilon(
            noise_multiplier=noise,
            sampling_rate=sampling_rate,
            steps=steps,
            delta=delta,
            accountant=accountant,
            sampling=sampling,
        )

    low, high = None, 1.0  # bracket [low, high]: spent(low) > target >= spent(high)
    while spent(high) > target_epsilon:
        low, high = high, 2 * high
        if high > NOISE_RANGE[1]:
            raise ValueError(f"target epsilon {target_epsilon} needs a noise multiplier above {NOISE_RANGE[1]:g}")
    if low is None:
        low = high / 2
        while spent(low) <= target_epsilon:
            low, high = low / 2, low
            if low < NOISE_RANGE[0]:
                raise ValueError(
                    f"target epsilon {target_epsilon} is reached by any noise multiplier (down to "
                    f"{NOISE_RANGE[0]:g}): ask for a smaller epsilon"
                )
    while high / low > 1 + NOISE_RTOL:  # bisection in log scale: epsilon falls as the noise grows
        middle = math.sqrt(low * high)
        low, high = (middle, high) if spent(middle) > target_epsilon else (low, middle)
    return high


def default_delta(n: int) -> float:
    """The default delta for a training set of ``n`` examples: 1/n rounded down to a power of ten.

    ``10^-k`` for the smallest ``k`` with ``10^k >= n``, computed on integers (no float logarithm):
    ``default_delta(1437) == 1e-4``, ``default_delta(60000) == 1e-5``, ``default_delta(1000) == 1e-3``.
    Delta bounds the chance that the guarantee fails outright, so it must be well below 1/n (a mechanism that
    publishes one random example outright has delta 1/n); this is the usual choice at the edge of that.

    Args:
      n: the number of training examples, an int >= 2.

    Returns:
      delta, a float (an exact decimal power of ten as Python spells it: ``1e-4``).
    """
    if not is_int(n) or n < 2:
        raise ValueError(f"`n` (the number of training examples) must be an int >= 2, got {n!r}")
    return float(f"1e-{len(str(int(n) - 1))}")


@dataclasses.dataclass(frozen=True)
class PrivacyLedger:
    """The accountant's state of a DP-SGD run: what it needs to say the epsilon spent so far, and nothing else.

    Everything is a plain int, float or str, so :meth:`to_json` writes it into a checkpoint's JSON and
    :meth:`from_json` reads back an equal ledger (floats survive JSON exactly: Python writes the shortest
    string that reads back to the same double); a resumed run calls :meth:`advance` on it and gets the same
    epsilon, bit for bit, as the run that never stopped. Epsilon is recomputed from the ledger each time
    (a few hundredths of a second with ``"rdp"``), never accumulated.

    Attributes:
      noise_multiplier, sampling_rate, delta, accountant, sampling: as for :func:`epsilon`.
      steps: the DP steps taken so far.
    """

    noise_multiplier: float
    sampling_rate: float
    delta: float
    accountant: str = "rdp"
    sampling: str = "poisson"
    steps: int = 0

    def __post_init__(self) -> None:
        _check_args(self.noise_multiplier, self.sampling_rate, self.steps, self.delta, self.accountant, self.sampling)

    def advance(self, steps: int = 1) -> PrivacyLedger:
        """The ledger after ``steps`` (>= 0) more DP steps."""
        if not is_int(steps) or steps < 0:
            raise ValueError(f"`steps` to advance by must be an int >= 0, got {steps!r}")
        return dataclasses.replace(self, steps=self.steps + steps)

    def epsilon(self) -> float:
        """The epsilon spent by the steps so far, at the ledger's delta."""
        return epsilon(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def to_json(self) -> dict[str, Any]:
        """The ledger as a dict of JSON scalars (``json.dumps`` takes it as it is)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> PrivacyLedger:
        """The ledger :meth:`to_json` wrote; a one-line ValueError for a record with missing or unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(record, dict) or set(record) != names:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"a privacy ledger record needs exactly the keys {sorted(names)}, got {keys}")
        return cls(**record)
