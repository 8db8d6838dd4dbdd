"""Image folders: the index and its errors, the Grain stream (worker-count independence, process slices, bad
files), and training from a folder (uint8 batches normalised on the device, exact mid-epoch resume, the stream
manifest, the CLI's errors)."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from image_folders import CLASSES, make_folder, undecodable_png
from jaxcnn import data, train
from jaxcnn.data.folder import BadFilesError, image_folder
from jaxcnn.data.stream import Batches, StreamSpec, epoch_permutation, train_steps

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images") / "root")


def copy_of(folder, tmp_path):
    return Path(shutil.copytree(folder, tmp_path / "root"))


# -- the index ------------------------------------------------------------------------------------------------


def test_the_index_maps_sorted_class_folders_and_holds_arrays(folder):
    images = image_folder(folder, image_size=8, normalize=False)
    assert images.classes == CLASSES and images.num_classes == 3 and images.input_shape == (8, 8, 3)
    assert len(images.train) == 18 and len(images.val) == 6
    assert np.bincount(images.train.labels).tolist() == [9, 5, 4]  # unbalanced classes
    index = images.train
    assert index.labels.dtype == np.int32 and index.offsets.dtype == np.int64 and index.blob.dtype == np.uint8
    assert index.relative(0) == os.path.join("cat", "000.jpg") and index.relative(17) == os.path.join("eel", "003.jpg")
    assert images.val.labels.tolist() == [0, 0, 1, 1, 2, 2]  # val reuses the training mapping
    assert images.mean is None and images.std is None


def test_the_digest_depends_on_the_files_not_on_where_the_folder_lives(folder, tmp_path):
    moved = copy_of(folder, tmp_path)
    assert image_folder(moved, image_size=8, normalize=False).digest() == image_folder(folder, image_size=8).digest()
    (moved / "train" / "cat" / "extra.png").write_bytes((moved / "train" / "cat" / "001.png").read_bytes())
    assert image_folder(moved, image_size=8, normalize=False).digest() != image_folder(folder, image_size=8).digest()


def test_channel_statistics_come_from_a_sample_of_training_images(folder):
    images = image_folder(folder, image_size=8)
    assert len(images.mean) == 3 and all(0 < m < 1 for m in images.mean) and all(s > 0 for s in images.std)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "does not exist"),
        ("no_train", "has no train folder"),
        ("no_val", "has no val folder"),
        ("no_classes", "has no class folders"),
        ("empty_class", "class folder"),
        ("val_only_class", "has class folder 'fox' that"),
        ("no_images", "holds no images"),
    ],
)
def test_a_broken_layout_is_one_clear_error(folder, tmp_path, layout, message):
    root = copy_of(folder, tmp_path)
    if layout == "missing":
        root = tmp_path / "nowhere"
    elif layout == "no_train":
        shutil.rmtree(root / "train")
    elif layout == "no_val":
        shutil.rmtree(root / "val")
    elif layout == "no_classes":
        shutil.rmtree(root / "train")
        (root / "train").mkdir()
    elif layout == "empty_class":
        (root / "train" / "fox").mkdir()
    elif layout == "val_only_class":
        (root / "val" / "fox").mkdir()
    elif layout == "no_images":
        for name in CLASSES:
            shutil.rmtree(root / "train" / name)
            (root / "train" / name).mkdir()
    with pytest.raises(data.DataError, match=message) as error:
        image_folder(root, image_size=8)
    assert "\n" not in str(error.value)


def plant_bad_files(root: Path) -> list[str]:
    bad = {
        "train/cat/notes.txt": b"not a picture\n",
        "train/dog/empty.jpg": b"",
        "train/eel/truncated.jpg": sorted((root / "train" / "eel").glob("*.jpg"))[0].read_bytes()[:200],
        "val/dog/broken.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 30,
    }
    for name, content in bad.items():
        (root / name).write_bytes(content)
    return sorted(bad)


def test_bad_files_are_refused_by_name_or_left_out(folder, tmp_path):
    root = copy_of(folder, tmp_path)
    planted = plant_bad_files(root)
    with pytest.raises(BadFilesError) as error:
        image_folder(root, image_size=8)
    assert str(error.value).startswith("4 bad image files (pass --skip-bad-files")
    assert "notes.txt: not an image" in str(error.value) and "empty.jpg: empty file" in str(error.value)
    assert "truncated.jpg: truncated" in str(error.value)
    lines = []
    images = image_folder(root, image_size=8, skip_bad_files=True, log=lines.append)
    assert sorted(os.path.relpath(path, root) for path, _ in images.bad_files) == planted
    assert len(images.train) == 18 and len(images.val) == 6 and lines[0].startswith("skipping 4 bad image files")


def test_the_error_names_the_first_five_and_counts_the_rest(folder, tmp_path):
    root = copy_of(folder, tmp_path)
    for i in range(7):
        (root / "train" / "cat" / f"junk{i}.jpg").write_bytes(b"junk")
    with pytest.raises(BadFilesError, match=r"^7 bad image files .*; and 2 more$"):
        image_folder(root, image_size=8)


# -- the stream -----------------------------------------------------------------------------------------------


def ignores_sigint(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGINT (the SigIgn mask of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        mask = next(line for line in status if line.startswith("SigIgn:")).split()[1]
    return bool(int(mask, 16) >> (signal.SIGINT - 1) & 1)


def take(stream, count):
    return [next(stream) for _ in range(count)]


def test_batches_are_uint8_and_follow_the_epoch_permutation(folder):
    images = image_folder(folder, image_size=8, normalize=False)
    spec = StreamSpec(image_size=8, batch_size=4, seed=3)
    batches = take(Batches(images.train, spec, train=True, epochs=2, workers=0), 2 * train_steps(18, 4))
    assert batches[0]["image"].dtype == np.uint8 and batches[0]["image"].shape == (4, 8, 8, 3)
    for epoch in (1, 2):
        order = epoch_permutation(3, epoch, 18)[:16]
        labels = np.concatenate([b["label"] for b in batches[(epoch - 1) * 4 : epoch * 4]])
        assert labels.tolist() == images.train.labels[order].tolist()
    assert not np.array_equal(epoch_permutation(3, 1, 18), epoch_permutation(3, 2, 18))


def test_the_stream_is_the_same_for_any_worker_count_and_resumes_from_its_state(folder):
    images = image_folder(folder, image_size=8, normalize=False)
    spec = StreamSpec(image_size=8, batch_size=4, seed=1)
    pool = Batches(images.train, spec, train=True, epochs=3, workers=2)
    try:
        pooled = take(pool, 10)  # across epoch boundaries
        # Ctrl-C reaches the workers too: they ignore it (they printed KeyboardInterrupt tracebacks)
        workers = [child for child in multiprocessing.active_children() if "grain" in child.name]
        assert workers and all(ignores_sigint(child.pid) for child in workers)
    finally:
        pool.close()
    inline = Batches(images.train, spec, train=True, epochs=3, workers=0)
    first = take(inline, 6)
    state = json.loads(json.dumps(inline.state()))  # as a checkpoint keeps it
    resumed = Batches(images.train, spec, train=True, epochs=3, workers=0, state=state)
    for a, b in zip(first + take(resumed, 4), pooled, strict=True):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])


def test_processes_read_slices_of_one_globally_shuffled_batch(folder):
    images = image_folder(folder, image_size=8, normalize=False)
    whole = take(Batches(images.train, StreamSpec(8, 6, seed=2), train=True, epochs=1, workers=0), 3)
    halves = [
        take(Batches(images.train, StreamSpec(8, 6, seed=2, process_index=p, process_count=2), train=True, epochs=1), 3)
        for p in (0, 1)
    ]
    for step in range(3):
        for key in ("image", "label"):
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            assert np.array_equal(joined, whole[step][key])
    with pytest.raises(data.DataError, match="does not divide among 4 processes"):
        StreamSpec(8, 6, seed=0, process_count=4)


def test_the_eval_stream_pads_with_masked_examples(folder):
    images = image_folder(folder, image_size=8, normalize=False)
    stream = Batches(images.val, StreamSpec(8, 4, seed=0), train=False, epochs=2, workers=0)
    assert stream.steps == 2
    labels = [next(stream)["label"].tolist() for _ in range(4)]
    assert labels[0] + labels[1] == [0, 0, 1, 1, 2, 2, -1, -1] and labels[2:] == labels[:2]  # and it repeats


def test_a_file_that_fails_to_decode_is_named_or_replaced(folder, tmp_path):
    root = copy_of(folder, tmp_path)
    for name in os.listdir(root / "train" / "dog"):
        (root / "train" / "dog" / name).write_bytes(undecodable_png())  # all five pass the header check
    images = image_folder(root, image_size=8, normalize=False)
    strict = Batches(images.train, StreamSpec(8, 18, seed=0), train=True, epochs=1)
    with pytest.raises(BadFilesError, match="dog/00.\\.(png|jpg): it passed the header check but does not decode"):
        strict.check(next(strict))
    lenient = Batches(images.train, StreamSpec(8, 18, seed=0, skip_bad_files=True), train=True, epochs=1)
    batch = next(lenient)
    found = lenient.check(batch)
    assert sorted(os.path.basename(path)[:3] for path, _ in found) == [f"{i:03d}" for i in range(5)]
    assert 0 < sum(times for _, times in found) and (batch["label"] != 1).all()  # replaced by other files
    assert (batch["label"] >= 0).all()


# -- training from a folder -----------------------------------------------------------------------------------


def config_for(root, **changes):
    values = dict(
        model="image_folders:tiny",
        dataset="folder",
        data_dir=str(root),
        image_size=8,
        batch_size=4,
        epochs=2,
        learning_rate=0.02,
        data_workers=0,
        checkpoint_every=3,
        keep=10,
    )
    return train.Config(**{**values, **changes})


def leaves(state):
    return [np.asarray(leaf) for leaf in jax.tree.leaves((state.params, state.opt_state, state.step))]


def assert_same_bits(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope="module")
def straight(folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "straight"
    state, history = train.fit(config_for(folder), workdir, log=None)
    return workdir, state, history


def test_the_device_normalises_the_uint8_batches(folder, straight):
    workdir, _, history = straight
    meta = train.Checkpointer(workdir / "checkpoints", read_only=True).read_meta(8)
    images = image_folder(folder, image_size=8)
    assert meta["preprocess"]["mean"] == list(images.mean) and meta["preprocess"]["raw_scale"] == 255
    scaling = train.InputScaling(255.0, images.mean, images.std)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    expected = data.standardize_with(pixels / np.float32(255), np.asarray(images.mean), np.asarray(images.std))
    np.testing.assert_allclose(np.asarray(jax.jit(scaling)(jnp.asarray(pixels))), expected, rtol=1e-6, atol=1e-6)
    assert [r["step"] for r in history] == [4, 8] and history[-1]["test_accuracy"] is not None


def test_a_mid_epoch_checkpoint_resumes_bit_for_bit(folder, straight, tmp_path):
    _, reference, history = straight
    workdir = tmp_path / "run"
    train.fit(config_for(folder), workdir, log=None)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert steps == [3, 4, 6, 8]  # every 3 steps within an epoch, and each epoch's end
    for step in steps[steps.index(6) + 1 :]:  # as if killed after the save of step 6 (epoch 2, batch 2 of 4)
        shutil.rmtree(workdir / "checkpoints" / str(step))
    lines = []
    state, resumed = train.fit(config_for(folder), workdir, log=lines.append)
    assert "resuming" in lines[1] and "from epoch 2, batch 2 of 4 (step 6)" in lines[1]
    assert_same_bits(state, reference)
    assert resumed == [dict(r, seconds=s["seconds"]) for r, s in zip(history, resumed, strict=True)]


def test_the_manifest_refuses_a_different_stream(folder, straight, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight[0], workdir)
    for step in (4, 8):
        shutil.rmtree(workdir / "checkpoints" / str(step))
    # the latest is now step 6: epoch 2, batch 2 of 4
    with pytest.raises(ValueError, match=r"data stream differs .*workers 0 -> 2"):
        train.fit(config_for(folder, data_workers=2), workdir, log=None)
    root = copy_of(folder, tmp_path)
    (root / "train" / "cat" / "000.jpg").unlink()
    with pytest.raises(ValueError, match="data differ from those checkpoint"):
        train.fit(config_for(root), workdir, log=None)


def run_cli(*args, timeout=300):
    env = dict(
        os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.Popen(
        [sys.executable, "-m", "jaxcnn", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def cli_flags(root, workdir):
    return [
        "--model", "image_folders:tiny", "--dataset", "folder", "--data-dir", str(root), "--image-size", "8",
        "--batch-size", "4", "--epochs", "2", "--learning-rate", "0.02", "--data-workers", "0",
        "--checkpoint-every", "1", "--workdir", str(workdir), "--no-progress",
    ]  # fmt: skip


# three training processes (about 20 s); the same resume in-process, from a mid-epoch checkpoint, runs by default
@pytest.mark.slow
def test_the_cli_resumes_exactly_after_sigkill_mid_epoch(folder, tmp_path):
    straight = run_cli(*cli_flags(folder, tmp_path / "straight"))
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-2000:]
    killed = tmp_path / "killed"
    process = run_cli(*cli_flags(folder, killed))
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "6").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = run_cli("--workdir", str(killed), "--no-progress")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "resuming" in out
    assert_same_bits(train.restore(killed), train.restore(tmp_path / "straight"))


def test_the_cli_names_bad_files_and_counts_skipped_ones(folder, tmp_path, capsys):
    from jaxcnn import cli

    root = copy_of(folder, tmp_path)
    plant_bad_files(root)
    assert cli.main(["train", *cli_flags(root, tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxcnn train: error: 4 bad image files (pass --skip-bad-files")
    assert not (tmp_path / "refused" / "checkpoints").exists()
    flags = [*cli_flags(root, tmp_path / "skipped"), "--skip-bad-files", "--epochs", "1", "--checkpoint-every", "9"]
    assert cli.main(["train", *flags]) == 0
    assert "skipping 4 bad image files" in capsys.readouterr().out
    record = json.loads((tmp_path / "skipped" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["bad_files_skipped"] == {"index": 4, "train": 0, "val": 0}


def test_eval_streams_the_val_files_of_a_folder_run(straight, capsys):
    from jaxcnn import cli

    workdir, _, history = straight
    result = train.evaluate_workdir(workdir)
    assert result["count"] == 6 and result["dataset"] == "folder"
    assert result["accuracy"] == history[-1]["test_accuracy"]
    assert result["loss"] == pytest.approx(history[-1]["test_loss"], rel=1e-6)
    assert train.evaluate_workdir(workdir, split="train", batch_size=5)["count"] == 18
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    assert f"test accuracy {history[-1]['test_accuracy']:.4f}" in capsys.readouterr().out


def test_data_bench_prints_one_json_object(folder, capsys):
    from jaxcnn import cli

    flags = ["--data-dir", str(folder), "--image-size", "8", "--data-workers", "0", "--batch-size", "4"]
    assert cli.main(["data-bench", *flags, "--batches", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 12 and result["images_per_second"] > 0 and result["cpu_ms_per_image"] > 0
    assert cli.main(["data-bench", *flags, "--batches", "2", "--model", "image_folders:tiny"]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "the step waits for data" in out
    assert cli.main(["data-bench", "--data-dir", str(folder / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


# three training processes, two of them joined through jax.distributed (about 40 s)
@pytest.mark.slow
def test_two_processes_read_their_slices_and_match_one_process(folder, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flags = cli_flags(folder, tmp_path / "two")
    processes = [
        run_cli(*flags, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(rank))
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    assert "data parallel over 2 devices in 2 processes" in outputs[0][0]
    single = run_cli(*cli_flags(folder, tmp_path / "one"))
    out, err = single.communicate(timeout=300)
    assert single.returncode == 0, err[-3000:]
    one, two = train.restore(tmp_path / "one"), train.restore(tmp_path / "two")
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    histories = [train.read_metrics(tmp_path / name) for name in ("one", "two")]
    assert histories[1][-1]["test_accuracy"] == histories[0][-1]["test_accuracy"]
    assert histories[1][-1]["test_loss"] == pytest.approx(histories[0][-1]["test_loss"], rel=1e-5)


def test_an_ensemble_of_a_folder_is_refused(folder):
    with pytest.raises(ValueError, match="an ensemble trains on a data set held in memory"):
        config_for(folder, ensemble=2, checkpoint_every=None)
    with pytest.raises(ValueError, match="an ensemble trains on a data set held in memory"):
        train.fit(train.Config(ensemble=2, model="image_folders:tiny"), None, data=image_folder(folder, image_size=8))


def test_the_stream_reads_only_a_few_batches_ahead(folder, monkeypatch):
    """Grain's defaults (16 threads, 500 elements ahead, here whole batches) once decoded a whole epoch at the
    first batch, and could hold gigabytes of batches."""
    from jaxcnn.data import images as images_module

    calls = []
    original = images_module.train_image
    monkeypatch.setattr(images_module, "train_image", lambda *a, **k: calls.append(1) or original(*a, **k))
    images = image_folder(folder, image_size=8, normalize=False)
    stream = Batches(images.train, StreamSpec(8, 2, seed=0), train=True, epochs=5, workers=0)
    next(stream)
    time.sleep(0.5)
    assert len(calls) <= 2 * 4  # the batch taken, the two prepared ahead, one in the making
    stream.close()


def test_predict_takes_files_of_any_size_through_the_evaluation_transform(folder, straight):
    workdir = straight[0]
    files = sorted((folder / "val" / "dog").iterdir())
    from jaxcnn.train.predict import predict_files

    rows, _ = predict_files(workdir, files, top=3)
    assert [row["input"] for row in rows] == [str(f) for f in files] and all(len(row["top"]) == 3 for row in rows)
    images = image_folder(folder, image_size=8)
    from jaxcnn.data import images as decode

    pixels = np.stack([decode.eval_image(f.read_bytes(), 8) for f in files])
    x = data.standardize_with(pixels / np.float32(255), np.asarray(images.mean), np.asarray(images.std))
    model, params, model_state, _ = train.load_model(workdir)
    logits, _ = model.apply(params, model_state, jnp.asarray(x), train=False)
    assert [row["class"] for row in rows] == np.argmax(np.asarray(logits), axis=-1).tolist()


def test_a_large_split_is_announced_before_its_header_check(folder, monkeypatch):
    from jaxcnn.data import folder as folder_module

    monkeypatch.setattr(folder_module, "ANNOUNCED", 10)
    lines = []
    image_folder(folder, image_size=8, normalize=False, log=lines.append)
    assert lines == [f"indexing {folder / 'train'}: checking the headers of 18 files"]
