"""The DP-SGD privacy accountant (jaxcnn.train.privacy): epsilon against dp_accounting's events built here by hand,
monotonicity, the noise search, the default delta, the ledger's JSON round trip and the one-line errors."""

import json
import math

import pytest
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from jaxcnn.train import privacy

DIGITS_RATE = 32 / 1437  # the digits' training set, batch 32: 45 steps an epoch (44 full batches and one of 29)
DIGITS = dict(sampling_rate=DIGITS_RATE, steps=40 * 45, delta=1e-4)  # 40 epochs


def test_poisson_epsilon_is_dp_accountings_for_the_poisson_sampled_gaussian():
    # the reference setting, composed here directly from dp_accounting's events (add-or-remove-one neighbours)
    step = dp_event.PoissonSampledDpEvent(DIGITS_RATE, dp_event.GaussianDpEvent(1.0))
    expected = RdpAccountant().compose(dp_event.SelfComposedDpEvent(step, 1800)).get_epsilon(1e-4)
    assert privacy.epsilon(noise_multiplier=1.0, **DIGITS) == pytest.approx(expected, rel=1e-12)
    assert 5.7 < expected < 5.8  # the digits' figure quoted in the module's docstring
    # PLD on a shorter run (its cost grows with the steps)
    step = dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(1.5))
    expected = PLDAccountant().compose(dp_event.SelfComposedDpEvent(step, 20)).get_epsilon(1e-5)
    found = privacy.epsilon(noise_multiplier=1.5, sampling_rate=0.05, steps=20, delta=1e-5, accountant="pld")
    assert found == pytest.approx(expected, rel=1e-12)
    assert found < privacy.epsilon(noise_multiplier=1.5, sampling_rate=0.05, steps=20, delta=1e-5)  # tighter


def test_shuffle_epsilon_composes_one_gaussian_per_started_epoch():
    # 91 steps of 45 an epoch: 3 epochs started, each example in at most one batch of each (zero-out neighbours)
    gaussians = dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(1.0), 3)
    for accountant, make in (("rdp", RdpAccountant), ("pld", PLDAccountant)):
        expected = make(neighboring_relation=NeighboringRelation.REPLACE_SPECIAL).compose(gaussians).get_epsilon(1e-4)
        for steps in (91, 135):
            kwargs = dict(sampling_rate=DIGITS_RATE, steps=steps, delta=1e-4, accountant=accountant)
            assert privacy.epsilon(noise_multiplier=1.0, sampling="shuffle", **kwargs) == pytest.approx(
                expected, rel=1e-8
            )
    # no amplification is claimed: the bound is far above the Poisson figure
    assert privacy.epsilon(noise_multiplier=1.0, sampling="shuffle", **DIGITS) > 40


def test_epsilon_falls_with_noise_and_grows_with_steps():
    for sampling in privacy.SAMPLINGS:
        by_noise = [privacy.epsilon(noise_multiplier=s, sampling=sampling, **DIGITS) for s in (0.7, 1.0, 2.0, 4.0)]
        assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
        kwargs = dict(noise_multiplier=1.0, sampling_rate=DIGITS_RATE, delta=1e-4, sampling=sampling)
        by_steps = [privacy.epsilon(steps=t, **kwargs) for t in (0, 45, 450, 1800)]
        assert by_steps[0] == 0.0 and by_steps == sorted(by_steps) and len(set(by_steps)) == 4


@pytest.mark.parametrize(
    "accountant, sampling, targets",
    [("rdp", "poisson", (2.0,)), ("rdp", "shuffle", (1.0, 50.0)), ("pld", "shuffle", (1.0, 50.0))],
)
def test_noise_for_epsilon_is_the_smallest_noise_within_the_target(accountant, sampling, targets):
    kwargs = dict(sampling_rate=DIGITS_RATE, steps=1800, delta=1e-4, accountant=accountant, sampling=sampling)
    for target in targets:
        noise = privacy.noise_for_epsilon(target, **kwargs)
        assert privacy.epsilon(noise_multiplier=noise, **kwargs) <= target
        assert privacy.epsilon(noise_multiplier=noise / (1 + privacy.NOISE_RTOL), **kwargs) > target


def test_noise_for_epsilon_refuses_targets_out_of_reach():
    kwargs = dict(sampling_rate=DIGITS_RATE, steps=1800, delta=1e-4, sampling="shuffle")
    with pytest.raises(ValueError, match="needs a noise multiplier above 4096"):
        privacy.noise_for_epsilon(1e-4, **kwargs)
    with pytest.raises(ValueError, match="reached by any noise multiplier"):
        privacy.noise_for_epsilon(1e9, **kwargs)
    with pytest.raises(ValueError, match="`target_epsilon` must be a finite number > 0, got 0"):
        privacy.noise_for_epsilon(0, **kwargs)
    with pytest.raises(ValueError, match="`steps` must be >= 1"):
        privacy.noise_for_epsilon(1.0, **{**kwargs, "steps": 0})


def test_default_delta_is_one_over_n_rounded_down_to_a_power_of_ten():
    cases = {1437: 1e-4, 60000: 1e-5, 1000: 1e-3, 1001: 1e-4, 50000: 1e-5, 2: 1e-1, 10: 1e-1, 11: 1e-2}
    assert {n: privacy.default_delta(n) for n in cases} == cases
    for bad in (1, 0, -5, 1437.0, True):
        with pytest.raises(ValueError, match="`n` .* must be an int >= 2"):
            privacy.default_delta(bad)


def test_steps_per_epoch_counts_the_last_partial_batch():
    assert [privacy.steps_per_epoch(b / n) for b, n in ((32, 1437), (128, 60000), (100, 60000), (1, 3))] == [
        45,
        469,
        600,
        3,
    ]
    assert all(privacy.steps_per_epoch(b / n) == -(-n // b) for n in range(2, 400) for b in range(1, n + 1))


def test_ledger_round_trips_through_json_and_resumes_bit_for_bit():
    ledger = privacy.PrivacyLedger(noise_multiplier=1.1, sampling_rate=DIGITS_RATE, delta=1e-4).advance(450)
    back = privacy.PrivacyLedger.from_json(json.loads(json.dumps(ledger.to_json())))
    assert back == ledger and back.to_json() == ledger.to_json()
    resumed, straight = back.advance(45), ledger.advance(45)
    assert resumed.steps == 495 and resumed.epsilon() == straight.epsilon()  # the same bits
    assert straight.epsilon() == privacy.epsilon(noise_multiplier=1.1, sampling_rate=DIGITS_RATE, steps=495, delta=1e-4)
    with pytest.raises(ValueError, match="needs exactly the keys .* got \\['delta'\\]"):
        privacy.PrivacyLedger.from_json({"delta": 1e-4})
    with pytest.raises(ValueError, match="`sampling` must be one of"):
        privacy.PrivacyLedger.from_json({**ledger.to_json(), "sampling": "uniform"})
    with pytest.raises(ValueError, match="`steps` to advance by must be an int >= 0, got -1"):
        ledger.advance(-1)


GOOD = dict(noise_multiplier=1.0, sampling_rate=0.01, steps=10, delta=1e-5)
BAD_VALUES = [
    ({"noise_multiplier": 0}, "`noise_multiplier` must be a finite number > 0, got 0"),
    ({"noise_multiplier": math.inf}, "`noise_multiplier` must be a finite number > 0, got inf"),
    ({"sampling_rate": 1.5}, "`sampling_rate` must be <= 1.0, got 1.5"),
    ({"sampling_rate": -0.1}, "`sampling_rate` must be a finite number > 0, got -0.1"),
    ({"steps": -1}, "`steps` must be an int >= 0, got -1"),
    ({"steps": 2.0}, "`steps` must be an int >= 0, got 2.0"),
    ({"delta": 1.0}, "`delta` must be < 1.0, got 1.0"),
    ({"delta": "1e-5"}, "`delta` must be a finite number > 0, got '1e-5'"),
    ({"accountant": "moments"}, "`accountant` must be one of \\('rdp', 'pld'\\), got 'moments'"),
    ({"sampling": "uniform"}, "`sampling` must be one of \\('poisson', 'shuffle'\\), got 'uniform'"),
]


@pytest.mark.parametrize("change, message", BAD_VALUES)
def test_bad_values_get_one_line_errors(change, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        privacy.epsilon(**{**GOOD, **change})
