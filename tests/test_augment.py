"""Augmentation on the device (translate, flip, noise) and the train options that use it (with --dropout)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import data, nn, train
from jaxcnn.data import DataError, augment


def images(n=6, size=5, channels=2):
    return jnp.asarray(np.random.default_rng(0).standard_normal((n, size, size, channels)), jnp.float32)


def test_every_option_off_is_the_identity_and_shapes_and_dtypes_are_kept():
    x = images()
    assert augment(jax.random.key(0), x) is x
    out = augment(jax.random.key(0), x, translate=2, flip=True, noise=0.1)
    assert out.shape == x.shape and out.dtype == x.dtype


def test_translation_is_a_zero_filled_shift_within_the_bound():
    x = images(n=40, size=6, channels=1) + 10.0  # no zeros of its own
    out = np.asarray(augment(jax.random.key(1), x, translate=2))
    seen = set()
    for original, shifted in zip(np.asarray(x), out):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                padded = np.pad(original, ((2, 2), (2, 2), (0, 0)))
                window = padded[2 - dy : 2 - dy + 6, 2 - dx : 2 - dx + 6]
                if np.array_equal(window, shifted):
                    matches.append((dy, dx))
        assert len(matches) == 1  # exactly one shift within +-2 reproduces it
        seen.add(matches[0])
    assert len(seen) > 10  # the shifts vary from example to example


def test_flip_mirrors_about_half_and_noise_has_its_standard_deviation():
    x = images(n=400, size=4, channels=1)
    out = np.asarray(augment(jax.random.key(2), x, flip=True))
    flipped = [np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, x)]
    kept = [np.array_equal(o, np.asarray(i)) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 0.4 < np.mean(flipped) < 0.6
    noisy = np.asarray(augment(jax.random.key(3), jnp.zeros((200, 8, 8, 1)), noise=0.3))
    assert np.std(noisy) == pytest.approx(0.3, rel=0.05)


def test_same_key_same_batch_other_key_other_batch():
    x = images()
    a = augment(jax.random.key(4), x, translate=1, noise=0.1)
    b = augment(jax.random.key(4), x, translate=1, noise=0.1)
    c = augment(jax.random.key(5), x, translate=1, noise=0.1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"translate": -1}, "translate must be an int >= 0"),
        ({"flip": 1}, "flip must be true or false"),
        ({"noise": float("nan")}, "noise must be a finite number >= 0"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(DataError, match=message):
        augment(jax.random.key(0), images(), **options)
    with pytest.raises(DataError, match="images \\(N, H, W, C\\)"):
        augment(jax.random.key(0), jnp.zeros((3, 4)), noise=0.1)


def test_fit_with_augmentation_and_dropout_trains_and_resumes_bit_for_bit(tmp_path):
    config = train.Config(epochs=2, augment_translate=1, augment_noise=0.05, dropout=0.3, keep=1)
    straight, history = train.fit(config, None, log=None)
    assert history[-1]["test_accuracy"] > 0.8
    train.fit(config.replace(epochs=1), tmp_path, log=None)
    resumed, _ = train.fit(config, tmp_path, log=None)
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
        assert np.array_equal(a, b)
    model = train.loop.build_model(config, (8, 8, 1), 10)
    assert isinstance(model.layers[-2], nn.Dropout) and model.layers[-2].rate == 0.3
    assert train.evaluate_workdir(tmp_path)["accuracy"] == pytest.approx(history[-1]["test_accuracy"])


def test_augmentation_and_dropout_settings_are_checked():
    with pytest.raises(ValueError, match="dropout must be a number in \\[0, 1\\)"):
        train.Config(dropout=1.0)
    with pytest.raises(ValueError, match="augment_translate must be an int >= 0"):
        train.Config(augment_translate=-2)
    with pytest.raises(ValueError, match="augment_noise must be a finite number >= 0"):
        train.Config(augment_noise=-0.1)
    assert data.augment is augment
