"""A trained model in use (issue 13, defect 9): the preprocessing saved with the run, ``load_model``,
``jaxcnn predict`` on image and array files, ``jaxcnn eval --step`` and on other data."""

import csv
import json
import operator

import numpy as np
import pytest
from PIL import Image

import jaxcnn as jc
from data_files import write_cifar, write_mnist, write_npz
from jaxcnn import train
from jaxcnn.cli import main
from jaxcnn.train import Preprocess, predict

# ---------------------------------------------------------------------------------------- the preprocessing


def raw_and_loaded(name, tmp_path):
    """``(raw test images as a user would hold them, the loaded and standardized data set)`` per loader."""
    if name == "digits":
        loaded = jc.data.load("digits")
        return jc.data.load("digits", normalize=False).x_test * 16, loaded  # the digits' own 0..16 values
    if name == "mnist":
        arrays = write_mnist(tmp_path / "mnist")
        return arrays["test_x"], jc.data.load("mnist", data_dir=tmp_path / "mnist")
    if name == "cifar10":
        written = write_cifar(tmp_path / "cifar")
        return written["test"][0], jc.data.load("cifar10", data_dir=tmp_path / "cifar")
    if name == "npz-uint8":
        path = write_npz(tmp_path / "u.npz")
        return np.load(path)["x_test"], jc.data.load("npz", data_path=path)
    if name == "npz-float":
        rng = np.random.default_rng(1)
        x_test = rng.normal(size=(3, 4, 4, 2))
        path = write_npz(tmp_path / "f.npz", x_train=rng.normal(size=(6, 4, 4, 2)), x_test=x_test)
        return x_test, jc.data.load("npz", data_path=path)
    raw = jc.data.load("synthetic", shape=(5, 5, 3), sizes=(20, 7), normalize=False)
    return raw.x_test, jc.data.load("synthetic", shape=(5, 5, 3), sizes=(20, 7))


@pytest.mark.parametrize("name", ["digits", "mnist", "cifar10", "npz-uint8", "npz-float", "synthetic"])
def test_preprocess_of_a_dataset_gives_the_loaded_images_bit_for_bit(name, tmp_path):
    """Raw images as they come (uint8 pixels, the digits' 0..16, float npz values) through the recorded raw
    scale and per-channel statistics are exactly the images the model trained on; the record survives JSON."""
    raw, loaded = raw_and_loaded(name, tmp_path)
    preprocess = Preprocess.of_dataset(loaded)
    assert preprocess.raw_scale == {"digits": 16, "mnist": 255, "cifar10": 255, "npz-uint8": 255}.get(name, 1)
    assert len(preprocess.mean) == len(preprocess.std) == loaded.input_shape[-1]
    np.testing.assert_array_equal(preprocess(raw), loaded.x_test)
    assert Preprocess.from_dict(json.loads(json.dumps(preprocess.to_dict()))) == preprocess


def test_standardizing_twice_records_the_composition(tmp_path):
    raw, once = raw_and_loaded("npz-uint8", tmp_path)
    twice = jc.data.standardize(once)
    assert twice.mean != once.mean
    # float32: the composed statistics round otherwise than two standardizations, each stored as float32
    np.testing.assert_allclose(Preprocess.of_dataset(twice)(raw), twice.x_test, atol=1e-5)


# ---------------------------------------------------------------------------------------- a trained run

EPOCHS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small user model (models_for_tests:small_digits_cnn; what it predicts is read back, whatever the model)
    trained 2 epochs on the digits; the digits' test images raw (0..16) and as the model saw them."""
    workdir = tmp_path_factory.mktemp("predict") / "run"
    config = train.Config(epochs=EPOCHS, model="models_for_tests:small_digits_cnn")
    _, history = train.fit(config, workdir, log=None)
    digits = jc.data.load("digits")
    raw = jc.data.load("digits", normalize=False).x_test * 16
    model, params, state, preprocess = train.load_model(workdir)
    logits, _ = model.apply(params, state, digits.x_test, train=False)
    probabilities = np.asarray(jax_softmax(logits))
    return {"workdir": workdir, "history": history, "digits": digits, "raw": raw, "probabilities": probabilities}


def jax_softmax(logits):
    import jax

    return jax.nn.softmax(logits, axis=-1)


def test_load_model_reproduces_the_runs_test_accuracy(run):
    model, params, state, preprocess = train.load_model(run["workdir"])
    x = preprocess(run["raw"])
    np.testing.assert_array_equal(x, run["digits"].x_test)
    result = train.evaluate(model, params, state, x, run["digits"].y_test)
    assert result["accuracy"] == run["history"][-1]["test_accuracy"]
    assert result["loss"] == pytest.approx(run["history"][-1]["test_loss"], rel=1e-6)
    assert train.evaluate_workdir(run["workdir"])["accuracy"] == result["accuracy"]


def test_the_checkpoint_holds_the_training_normalisation(run):
    config, _, _, meta = train.restore_run(run["workdir"])
    saved = Preprocess.from_dict(meta["preprocess"])
    assert saved == Preprocess.of_dataset(run["digits"]) and saved.raw_scale == 16.0
    assert meta["chosen"] is None and meta["epoch"] == EPOCHS


def test_load_model_picks_a_step_and_refuses_missing_ones(run):
    first = run["history"][0]
    model, params, state, preprocess = train.load_model(run["workdir"], step=first["step"])
    result = train.evaluate(model, params, state, preprocess(run["raw"]), run["digits"].y_test)
    assert result["accuracy"] == first["test_accuracy"]
    with pytest.raises(train.CheckpointError, match=r"no checkpoint of step 7 in .*kept steps: 45, 90"):
        train.load_model(run["workdir"], step=7)
    with pytest.raises(train.CheckpointError, match="only runs trained with early stopping keep their best"):
        train.load_model(run["workdir"], step="best")
    with pytest.raises(ValueError, match="step must be a step number, 'best' or 'latest'"):
        train.load_model(run["workdir"], step="first")


def write_inputs(directory, raw):
    """The first 6 test digits as a float .npy (0..16), a uint8 .npz (several, and one single image), and as
    8-bit PNG (gray and RGB) and JPEG files; returns the paths and the uint8 pixels."""
    pixels = np.round(raw[:6] / 16 * 255).astype(np.uint8)
    paths = {"npy": directory / "digits.npy", "npz": directory / "digits.npz"}
    np.save(paths["npy"], raw[:6])
    np.savez(paths["npz"], several=pixels[:4], one=pixels[4, :, :, 0])
    for i in range(2):
        paths[f"png{i}"] = directory / f"digit{i}.png"
        Image.fromarray(pixels[i, :, :, 0]).save(paths[f"png{i}"])
    paths["rgb"] = directory / "rgb.png"
    Image.fromarray(np.repeat(pixels[2], 3, axis=-1)).save(paths["rgb"])
    paths["jpeg"] = directory / "digit.jpg"
    Image.fromarray(pixels[3, :, :, 0]).save(paths["jpeg"], quality=100)
    return paths, pixels


def test_predict_files_agree_with_the_model_on_every_format(run, tmp_path):
    paths, pixels = write_inputs(tmp_path, run["raw"])
    order = ["npy", "npz", "png0", "png1", "rgb", "jpeg"]
    rows, checkpoint = predict.predict_files(run["workdir"], [paths[k] for k in order], top=3)
    assert checkpoint == f"checkpoint of epoch {EPOCHS}, step {run['history'][-1]['step']}"
    names = [predict.label(row) for row in rows]
    assert names[:6] == [f"{paths['npy']}[{i}]" for i in range(6)]
    assert names[6:] == [f"{paths['npz']}:several[{i}]" for i in range(4)] + [f"{paths['npz']}:one"] + [
        str(paths[k]) for k in order[2:]
    ]
    # the float array in the digits' own scale: exactly the model's probabilities on the test images
    expected = run["probabilities"][:6]
    np.testing.assert_allclose([r["probability"] for r in rows[:6]], expected.max(axis=1), rtol=1e-6)
    assert [r["class"] for r in rows[:6]] == list(expected.argmax(axis=1))
    # 8-bit pixels, from arrays and lossless image files: the model on the same pixels, preprocessed
    model, params, state, preprocess = train.load_model(run["workdir"])
    logits, _ = model.apply(params, state, preprocess(pixels), train=False)
    on_pixels = np.asarray(jax_softmax(logits))
    for row, i in zip(rows[6:10] + rows[11:14], [0, 1, 2, 3, 0, 1, 2], strict=True):
        assert row["class"] == on_pixels[i].argmax()
        # float32: predict_files runs the model jitted, in batches of its own, which rounds otherwise than this call
        assert row["probability"] == pytest.approx(on_pixels[i].max(), rel=1e-5)
        assert [t["class"] for t in row["top"]] == list(np.argsort(-on_pixels[i])[:3])
    assert rows[10]["class"] == on_pixels[4].argmax()
    assert rows[14]["class"] == on_pixels[3].argmax()  # the JPEG: lossy, but at quality 100 the same class


def test_predict_command_prints_and_writes_csv_and_json(run, tmp_path, capsys):
    paths, _ = write_inputs(tmp_path, run["raw"])
    workdir = str(run["workdir"])
    assert main(["predict", "--workdir", workdir, str(paths["npy"]), str(paths["png0"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{workdir}: checkpoint of epoch {EPOCHS}, step {run['history'][-1]['step']}"
    assert lines[1].split() == ["input", "class", "probability"] and len(lines) == 2 + 7
    first = lines[2].split()
    assert first[0] == f"{paths['npy']}[0]" and int(first[1]) == run["probabilities"][0].argmax()
    # the table prints 4 decimals
    assert float(first[2]) == pytest.approx(run["probabilities"][0].max(), abs=5e-5)

    out = tmp_path / "out.csv"
    assert main(["predict", "--workdir", workdir, str(paths["npy"]), "--top", "2", "--output", str(out)]) == 0
    assert f"wrote 6 predictions to {out}" in capsys.readouterr().out
    table = list(csv.reader(out.open()))
    assert table[0] == ["input", "index", "class", "probability", "class_2", "probability_2"]
    assert [int(r[2]) for r in table[1:]] == list(run["probabilities"][:6].argmax(axis=1))
    assert [r[1] for r in table[1:]] == [str(i) for i in range(6)]

    out = tmp_path / "out.json"
    assert main(["predict", "--workdir", workdir, f"{paths['npz']}:one", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["checkpoint"].startswith(f"checkpoint of epoch {EPOCHS}")
    (row,) = record["predictions"]
    assert row["input"] == f"{paths['npz']}:one" and row["index"] is None and len(row["top"]) == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_resize_and_max_value(run, tmp_path):
    """A 32x32 PNG scaled down with --resize; float images in [0, 1] read with max_value=1."""
    pixels = np.round(run["raw"][0, :, :, 0] / 16 * 255).astype(np.uint8)
    big = tmp_path / "big.png"
    Image.fromarray(np.kron(pixels, np.ones((4, 4), np.uint8))).save(big)  # each pixel a 4x4 block
    unit = tmp_path / "unit.npy"
    np.save(unit, run["raw"][:1] / 16)
    rows, _ = predict.predict_files(run["workdir"], [big, unit], resize=True, max_value=1.0)
    small, _ = predict.predict_files(run["workdir"], [tmp_path / "unit.npy"], max_value=1.0)
    assert rows[0]["class"] == rows[1]["class"] == run["probabilities"][0].argmax()
    assert rows[1]["probability"] == pytest.approx(run["probabilities"][0].max(), rel=1e-5)
    # the same row alone; probabilities to float32 rounding here and above (a batch of one, of two and of 360 are
    # other compiled programs, which may round otherwise: 1.1e-6 apart for the small model)
    assert small[0]["probability"] == pytest.approx(rows[1]["probability"], rel=1e-5)
    assert {k: v for k, v in small[0].items() if k not in ("probability", "top")} == {
        k: v for k, v in rows[1].items() if k not in ("probability", "top")
    }


def bad_inputs(tmp_path):
    """``name -> (file argument, extra flags, expected message fragment)``."""
    rgb = tmp_path / "rgb8.npy"
    np.save(rgb, np.zeros((8, 8, 3), np.uint8))
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((8, 28), np.uint8)).save(wide)
    corrupt_png = tmp_path / "corrupt.png"
    corrupt_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    corrupt_npy = tmp_path / "corrupt.npy"
    corrupt_npy.write_bytes(b"\x93NUMPY\x01\x00garbage")
    corrupt_npz = tmp_path / "corrupt.npz"
    corrupt_npz.write_bytes(b"PK\x03\x04 not a zip")
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((2, 8, 8), np.uint8), y=np.array([1, 2]))
    boolean = tmp_path / "bool.npy"
    np.save(boolean, np.zeros((8, 8), bool))
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((2, 8, 8, 1), np.nan))
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 8, 8, 1)))
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((8, 8)))
    return {
        "channels": (rgb, [], f"{rgb}: array of shape (8, 8, 3) does not fit the model: expected one image (8, 8, 1)"),
        "size": (wide, [], f"{wide}: the image is 28x8 (width x height), the model takes 8x8; resize it (--resize)"),
        "corrupt png": (corrupt_png, [], f"{corrupt_png}: not a readable image file"),
        "corrupt npy": (corrupt_npy, [], f"{corrupt_npy}: not a readable .npy file"),
        "corrupt npz": (corrupt_npz, [], f"{corrupt_npz}: not a readable .npz file"),
        "labels in npz": (labels, [], f"{labels}:y: array of shape (2,) does not fit the model"),
        "missing key": (f"{labels}:z", [], f"{labels}: has no array 'z' (it has: x, y)"),
        "missing file": (tmp_path / "none.png", [], f"{tmp_path / 'none.png'}: no such file"),
        "directory": (tmp_path, [], f"{tmp_path}: is a directory"),
        "bool": (boolean, [], f"{boolean}: array of dtype bool; images must be uint8 pixels or numbers"),
        "nan": (nan, [], f"{nan}: holds NaN or Inf values (first at index (0, 0, 0, 0))"),
        "empty": (empty, [], f"{empty}: holds no images"),
        "top": (good, ["--top", "11"], "--top must be in 1..10 (the model's classes), got 11"),
        "top zero": (good, ["--top", "0"], "--top must be >= 1, got 0"),
        "output": (good, ["--output", str(tmp_path / "out.txt")], "--output must name a .csv or a .json file"),
        "output dir": (good, ["--output", str(tmp_path / "no" / "o.csv")], "the directory"),
        "max value": (good, ["--max-value", "0"], "--max-value must be a positive number, got 0.0"),
        "step": (good, ["--step", "3"], "no checkpoint of step 3"),
        "step word": (good, ["--step", "first"], "--step must be a step number, best or latest, got 'first'"),
    }


BAD = [
    "channels", "size", "corrupt png", "corrupt npy", "corrupt npz", "labels in npz", "missing key", "missing file",
    "directory", "bool", "nan", "empty", "top", "top zero", "output", "output dir", "max value", "step", "step word",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_predict_inputs_give_one_line_and_exit_2(run, tmp_path, capsys, case):
    path, flags, message = bad_inputs(tmp_path)[case]
    code = main(["predict", "--workdir", str(run["workdir"]), str(path), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("jaxcnn predict: error: ") and message in err, err


# ---------------------------------------------------------------------------------------- eval


def test_eval_step_reads_that_checkpoint_and_says_so(run, capsys):
    first = run["history"][0]
    assert main(["eval", "--workdir", str(run["workdir"]), "--step", str(first["step"])]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy {first['test_accuracy']:.4f}" in out
    assert f"(checkpoint of epoch 1, step {first['step']})" in out
    assert main(["eval", "--workdir", str(run["workdir"]), "--step", "latest"]) == 0
    assert f"(checkpoint of epoch {EPOCHS} (latest), step {run['history'][-1]['step']})" in capsys.readouterr().out


def test_eval_on_other_data_uses_the_saved_normalisation(run, tmp_path, capsys):
    """The digits written as an npz of [0, 1] floats (what the loader made of them): the run's normalisation
    applied to them gives exactly the run's accuracy; its first half as the test split gives that half's."""
    raw = jc.data.load("digits", normalize=False)
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=raw.x_test[:10], y_train=raw.y_test[:10], x_test=raw.x_test, y_test=raw.y_test)
    result = train.evaluate_workdir(run["workdir"], data_path=path)
    assert result["accuracy"] == run["history"][-1]["test_accuracy"] and result["dataset"] == "npz"
    assert main(["eval", "--workdir", str(run["workdir"]), "--data-path", str(path), "--split", "train"]) == 0
    hits = (run["probabilities"][:10].argmax(axis=1) == raw.y_test[:10]).mean()
    assert f"train accuracy {hits:.4f}" in capsys.readouterr().out


def other_data_errors(tmp_path):
    wide = write_npz(tmp_path / "wide.npz")  # 4x4 images
    many = tmp_path / "many.npz"
    x = np.zeros((3, 8, 8), np.float32)
    np.savez(many, x_train=x, y_train=np.array([0, 1, 12]), x_test=x, y_test=np.array([0, 1, 12]))
    return {
        "shape": (["--data-path", str(wide)], "images have shape (4, 4, 1), the checkpoint was trained on (8, 8, 1)"),
        "labels": (["--data-path", str(many)], "labels must lie in [0, 10) (the model's 10 outputs); found 12 at"),
        "path without npz": (["--dataset", "digits", "--data-path", str(wide)], "--data-path goes with --dataset npz"),
        "dir with digits": (["--data-dir", str(tmp_path)], "--data-dir goes with --dataset mnist"),
        "npz without path": (["--dataset", "npz"], "--dataset npz needs --data-path"),
        "mnist without dir": (["--dataset", "mnist"], "--dataset mnist needs --data-dir"),
        "unknown": (["--dataset", "imagenet"], "--dataset must be one of"),
        "step": (["--step", "-1"], "--step must be >= 0"),
    }  # fmt: skip


EVAL_BAD = [
    "shape", "labels", "path without npz", "dir with digits", "npz without path", "mnist without dir", "unknown",
    "step",
]  # fmt: skip


@pytest.mark.parametrize("case", EVAL_BAD)
def test_eval_on_unfit_data_gives_one_line_and_exit_2(run, tmp_path, capsys, case):
    flags, message = other_data_errors(tmp_path)[case]
    code = main(["eval", "--workdir", str(run["workdir"]), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_checkpoint_without_saved_preprocessing_gets_it_from_its_data(run, monkeypatch):
    """Checkpoints of jaxcnn 0.1 saved no preprocessing: it is recomputed from the run's data set."""
    read_meta = train.Checkpointer.read_meta

    def without(self, step):
        meta = read_meta(self, step)
        meta.pop("preprocess")
        return meta

    monkeypatch.setattr(train.Checkpointer, "read_meta", without)
    *_, preprocess = train.load_model(run["workdir"])
    assert preprocess == Preprocess.of_dataset(run["digits"])


def test_an_ensembles_prediction_is_its_members_mean():
    import jax

    from jaxcnn.train.ensemble import create_ensemble_state

    model = jc.nn.Sequential([jc.nn.Flatten(), jc.nn.Dense(3)])
    ensemble = create_ensemble_state(model, train.make_optimizer(train.Config(), 1)[0], [0, 1], (2, 2, 1))
    x = np.random.default_rng(0).normal(size=(5, 2, 2, 1)).astype(np.float32)
    members = [
        jax.nn.softmax(model.apply(jax.tree.map(operator.itemgetter(k), ensemble.params), {}, x, train=False)[0])
        for k in range(2)
    ]
    got = predict.predict(model, ensemble.params, ensemble.model_state, x, ensemble=True, batch_size=2)
    np.testing.assert_allclose(got, (members[0] + members[1]) / 2, rtol=1e-6)
    single = predict.predict(model, jax.tree.map(lambda a: a[0], ensemble.params), {}, x, batch_size=3)
    np.testing.assert_allclose(single, members[0], rtol=1e-6)
