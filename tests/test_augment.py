"""Augmentation on the device (rotate and scale, translate, flip, noise) and the train options that use it (with
--dropout)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import data, nn, train
from jaxcnn.data import DataError, augment
from jaxcnn.data.augment import warp

# jitted once per set of options and shapes: called eagerly, every primitive of the warp compiles on its own
jitted_augment = jax.jit(augment, static_argnames=("translate", "flip", "noise", "rotate", "scale"))
jitted_warp = jax.jit(warp)


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
    for original, shifted in zip(np.asarray(x), out, strict=True):
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
    out = np.asarray(jitted_augment(jax.random.key(2), x, flip=True))
    flipped = [np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, x, strict=True)]
    kept = [np.array_equal(o, np.asarray(i)) for o, i in zip(out, x, strict=True)]
    # 400 draws: the flipped fraction's standard deviation is 0.025
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 0.4 < np.mean(flipped) < 0.6
    noisy = np.asarray(jitted_augment(jax.random.key(3), jnp.zeros((200, 8, 8, 1)), noise=0.3))
    # 12,800 draws: the sample standard deviation is good to about 1/sqrt(2n) = 0.6%
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
        ({"rotate": 180}, "rotate must be a number of degrees in \\[0, 180\\), got 180"),
        ({"rotate": -1.0}, "rotate must be a number of degrees in \\[0, 180\\), got -1.0"),
        ({"rotate": float("inf")}, "rotate must be a number of degrees"),
        ({"rotate": True}, "rotate must be a number of degrees"),
        ({"scale": 1.0}, "scale must be a number in \\[0, 1\\), got 1.0"),
        ({"scale": -0.1}, "scale must be a number in \\[0, 1\\), got -0.1"),
        ({"scale": "0.1"}, "scale must be a number in \\[0, 1\\)"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(DataError, match=message):
        augment(jax.random.key(0), images(), **options)
    with pytest.raises(DataError, match="images \\(N, H, W, C\\)"):
        augment(jax.random.key(0), jnp.zeros((3, 4)), noise=0.1)


def test_fit_with_augmentation_and_dropout_trains_and_resumes_bit_for_bit(tmp_path):
    # a small user model: fit's handling of augmentation and dropout is under test, which is the same for any model
    # (mnist_cnn made this test about 14 s)
    augmented = dict(augment_translate=1, augment_noise=0.05, augment_rotate=10.0, augment_scale=0.1, dropout=0.3)
    config = train.Config(epochs=2, keep=1, model="models_for_tests:small_digits_cnn", **augmented)
    assert train.run.augmentation_of(config) == {"translate": 1, "noise": 0.05, "rotate": 10.0, "scale": 0.1}
    straight, history = train.fit(config, None, log=None)
    assert history[-1]["test_accuracy"] > 0.6  # it learns: chance is 0.1 (0.81 here after 2 epochs)
    train.fit(config.replace(epochs=1), tmp_path, log=None)
    resumed, _ = train.fit(config, tmp_path, log=None)
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
        assert np.array_equal(a, b)
    model = train.run.build_model(config, (8, 8, 1), 10)
    assert isinstance(model.layers[-2], nn.Dropout) and model.layers[-2].rate == 0.3
    assert train.evaluate_workdir(tmp_path)["accuracy"] == pytest.approx(history[-1]["test_accuracy"])


def test_augmentation_and_dropout_settings_are_checked():
    with pytest.raises(ValueError, match="dropout must be a number in \\[0, 1\\)"):
        train.Config(dropout=1.0)
    with pytest.raises(ValueError, match="augment_translate must be an int >= 0"):
        train.Config(augment_translate=-2)
    with pytest.raises(ValueError, match="augment_noise must be a finite number >= 0"):
        train.Config(augment_noise=-0.1)
    for value in (180, -0.5, float("nan"), "10"):
        with pytest.raises(
            train.config.ConfigError, match="augment_rotate must be a number of degrees in \\[0, 180\\)"
        ):
            train.Config(augment_rotate=value)
    for value in (1, -0.01, float("inf"), None):
        with pytest.raises(train.config.ConfigError, match="augment_scale must be a number in \\[0, 1\\)"):
            train.Config(augment_scale=value)
    config = train.Config(augment_rotate=np.float32(15), augment_scale=0.2)
    assert config.augment_rotate == 15.0 and train.Config.from_json(config.to_json()) == config
    assert data.augment is augment


# -- rotate and scale: one affine warp per image about its centre ---------------------------------------------


def test_rotate_and_scale_zero_are_the_identity_bit_for_bit_and_leave_the_other_draws_alone():
    x = images(n=8, size=7)
    assert augment(jax.random.key(0), x, rotate=0.0, scale=0.0) is x
    assert np.array_equal(warp(x[0], jnp.float32(0), jnp.float32(1)), x[0])
    key = jax.random.key(6)
    plain = jitted_augment(key, x, translate=1, noise=0.1)
    assert np.array_equal(jitted_augment(key, x, translate=1, noise=0.1, rotate=0.0, scale=0.0), plain)
    # the warp draws from its own key: the shifts and the noise of a warped run are those of the plain run
    warp_only = jitted_augment(key, x, rotate=20.0, scale=0.2)
    warped = np.asarray(jitted_augment(key, x, noise=0.1, rotate=20.0, scale=0.2) - warp_only)
    # float32: adding the noise to pixels of size up to about 4 and taking them off again rounds it by a few 1e-7
    assert np.allclose(warped, jitted_augment(key, x, noise=0.1) - x, atol=1e-5)


@pytest.mark.parametrize(("size", "channels"), [(5, 1), (6, 3), (8, 2)])
def test_quarter_turns_are_np_rot90(size, channels):
    x = np.asarray(images(n=1, size=size, channels=channels)[0])
    for quarters in (1, 2, -1):
        turned = np.asarray(jitted_warp(jnp.asarray(x), jnp.deg2rad(jnp.float32(90 * quarters)), jnp.float32(1)))
        # float32: cos and sin of the rounded quarter turn are off by about 1e-7, which moves each sample point
        np.testing.assert_allclose(turned, np.rot90(x, quarters), atol=2e-6, rtol=0)


def test_zoom_keeps_the_centre_pixel_and_scales_a_ramp_about_it():
    x = images(n=50, size=7, channels=2)
    out = np.asarray(jitted_augment(jax.random.key(7), x, rotate=40.0, scale=0.5))
    assert np.array_equal(out[:, 3, 3], np.asarray(x)[:, 3, 3])  # exactly: the centre samples itself
    assert not np.allclose(out, x)
    # bilinear interpolation of a linear ramp is exact: zoom 2 halves its slope about the centre
    rows = np.arange(9, dtype=np.float32)[:, None, None] * np.ones((9, 9, 1), np.float32)
    zoomed = np.asarray(jitted_warp(jnp.asarray(rows), jnp.float32(0), jnp.float32(2)))
    np.testing.assert_allclose(zoomed, 4 + (rows - 4) / 2, atol=1e-6)
    shrunk = np.asarray(jitted_warp(jnp.asarray(rows + 1), jnp.float32(0), jnp.float32(0.5)))
    assert np.all(shrunk[0] == 0) and np.all(shrunk[:, 0] == 0)  # zeros where the source lies outside
    # float32: values up to 13 (an ulp of 1e-6), and the source coordinates round before the bilinear weights
    np.testing.assert_allclose(shrunk[2:7, 2:7], 5 + 2 * (rows[2:7, 2:7] - 4), atol=1e-5)


def test_angles_and_zooms_are_uniform_within_the_bounds():
    """A marked pixel 8 above the centre of a 21x21 image: where its mass lands gives each image's angle and
    zoom; they fill [-r, r] and [1 - s, 1 + s] uniformly (mean 0 and 1, standard deviation bound / sqrt(3))."""
    n, r, s = 600, 15.0, 0.2
    marked = np.zeros((n, 21, 21, 1), np.float32)
    marked[:, 2, 10] = 1.0
    out = np.asarray(jitted_augment(jax.random.key(8), jnp.asarray(marked), rotate=r, scale=s))[..., 0]
    rows, cols = np.mgrid[:21, :21]
    mass = out.sum(axis=(1, 2))
    dy = (out * (rows - 10)).sum(axis=(1, 2)) / mass
    dx = (out * (cols - 10)).sum(axis=(1, 2)) / mass
    angles = np.degrees(np.arctan2(-dx, -dy))  # anticlockwise as displayed
    zooms = np.hypot(dx, dy) / 8
    assert np.all(np.abs(angles) < r + 2) and np.abs(angles).max() > r - 2  # the centroid of a bilinear mark
    # 600 draws: the sample means are good to about 0.35 degrees and 0.005, the standard deviations to about 2%;
    # the zoom's, read from the centroid of a bilinear mark, gets more room
    assert abs(angles.mean()) < 1.0 and angles.std() == pytest.approx(r / np.sqrt(3), rel=0.1)
    assert np.all((zooms > 1 - s - 0.03) & (zooms < 1 + s + 0.03))
    assert abs(zooms.mean() - 1) < 0.02 and zooms.std() == pytest.approx(s / np.sqrt(3), rel=0.15)


def test_warp_same_key_same_bits_other_key_other_bits():
    x = images(n=10, size=8, channels=1)
    a = jitted_augment(jax.random.key(9), x, translate=1, rotate=12.0, scale=0.1)
    b = jitted_augment(jax.random.key(9), x, translate=1, rotate=12.0, scale=0.1)
    c = jitted_augment(jax.random.key(10), x, translate=1, rotate=12.0, scale=0.1)
    assert np.array_equal(a, b) and not np.allclose(a, c)
    jitted = jax.jit(lambda k, v: augment(k, v, rotate=12.0, scale=0.1))(jax.random.key(9), x)
    # float32: jit fuses the warp's arithmetic, which rounds otherwise than the eager call
    np.testing.assert_allclose(jitted, augment(jax.random.key(9), x, rotate=12.0, scale=0.1), atol=1e-5)
