"""jaxcnn bench: the harness runs every contender it can, interleaved, and reports medians and ratios."""

import json

import jax
import pytest

from jaxcnn import bench, cli


def test_bench_runs_contenders_and_reports_medians_and_ratios(tiny):
    pytest.importorskip("torch")
    contenders = ["jaxcnn-engine", "torch-eager"]  # flax: tests/test_speed_options.py
    result = bench.run([tiny], batch_size=4, rounds=3, steps=1, warmup=0, contenders=contenders, log=None)
    rows = {row["contender"]: row for row in result["results"]}
    assert set(rows) == set(contenders)
    for row in rows.values():
        assert len(row["rounds_images_per_second"]) == 3
        assert row["images_per_second"] == sorted(row["rounds_images_per_second"])[1]  # the median
        assert row["ratio_to"] == "torch-eager"
        assert row["ratio"] == pytest.approx(row["images_per_second"] / rows["torch-eager"]["images_per_second"])
    assert rows["torch-eager"]["ratio"] == 1.0
    assert result["machine"]["jax"] == jax.__version__ and result["machine"]["cpu_count"] >= 1
    table = bench.markdown(result)
    assert "| bench_tiny | jaxcnn-engine |" in table and "Versions: python" in table
    json.dumps(result)  # JSON-able


@pytest.mark.parametrize(
    "args,message",
    [
        (["--models", "vgg"], "unknown model 'vgg'"),
        (["--contenders", "jax"], "unknown contenders ['jax']"),
        (["--rounds", "0"], "rounds must be an int >= 1, got 0"),
    ],
)
def test_bench_command_bad_input(args, message, capsys, tmp_path):
    assert cli.main(["bench", *args, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bench_command_writes_json_and_markdown(tiny, tmp_path, capsys):
    args = ["--models", tiny, "--batch-size", "2", "--rounds", "1", "--steps", "1", "--warmup", "0"]
    assert cli.main(["bench", *args, "--contenders", "jaxcnn-manual", "--output", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| bench_tiny | jaxcnn-manual |" in out
    assert json.loads((tmp_path / "bench.json").read_text())["settings"]["batch_size"] == 2
    assert (tmp_path / "bench.md").read_text() in out


def test_bench_dp_command_times_ghost_against_the_non_private_step_and_skips_absent_packages(
    tiny, tmp_path, capsys, monkeypatch
):
    from jaxcnn.bench import dp

    monkeypatch.setattr(dp, "_version", lambda package: None)  # as if neither opacus nor jax_privacy were installed
    # batch 4: the non-private step compiles as in the first test (the persistent compilation cache shares it)
    args = ["--models", tiny, "--batch-size", "4", "--rounds", "3", "--steps", "1", "--warmup", "0", "--quiet"]
    contenders = "jaxcnn-engine,jaxcnn-dp-ghost,opacus-ghost,jax_privacy"
    assert cli.main(["bench", "--dp", *args, "--contenders", contenders, "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "bench-dp.json").read_text())
    rows = {row["contender"]: row for row in result["results"]}
    assert set(rows) == {"jaxcnn-engine", "jaxcnn-dp-ghost"}
    assert result["skipped"] == {
        f"{tiny}/opacus-ghost": "opacus is not installed",
        f"{tiny}/jax_privacy": "jax_privacy is not installed",
    }
    ghost, engine = rows["jaxcnn-dp-ghost"], rows["jaxcnn-engine"]
    assert ghost["ratio_to"] == "jaxcnn-engine" and engine["time_ratio"] == 1.0
    assert ghost["time_ratio"] == pytest.approx(engine["images_per_second"] / ghost["images_per_second"])
    assert ghost["images_per_second"] == sorted(ghost["rounds_images_per_second"])[1]  # the median
    rounds = zip(engine["rounds_images_per_second"], ghost["rounds_images_per_second"], strict=True)
    assert (
        ghost["round_time_ratios"] == pytest.approx([e / g for e, g in rounds]) and len(ghost["round_time_ratios"]) == 3
    )
    if engine["memory"] and engine["memory"]["temp_bytes"]:  # XLA's temp size, where the backend tells it
        assert ghost["temp_ratio"] == pytest.approx(ghost["memory"]["temp_bytes"] / engine["memory"]["temp_bytes"])
    assert result["settings"]["l2_norm_clip"] == 1.0 and result["machine"]["opacus"] is None
    assert f"| {tiny} | jaxcnn-dp-ghost | ghost norms" in out and "Skipped bench_tiny/opacus-ghost: opacus is" in out
    assert (tmp_path / "bench-dp.md").read_text() in out and not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--models", "resnet20_cifar"], "model 'resnet20_cifar' keeps running statistics (BatchNorm)"),
        (["--contenders", "flax"], "unknown DP contenders ['flax']"),
        (["--dtype", "bfloat16"], "bench --dp times float32 steps; got --dtype bfloat16"),
    ],
)
def test_bench_dp_command_bad_input(args, message, capsys, tmp_path):
    assert cli.main(["bench", "--dp", *args, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_resnet20_groupnorm_variant_has_resnet20_parameters_and_no_running_statistics():
    from jaxcnn import models
    from jaxcnn.bench.dp import _dp_model

    model, input_shape = _dp_model("resnet20_cifar_groupnorm")
    params, state = jax.eval_shape(lambda: model.init(jax.random.key(0), input_shape))
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == 269_722 and not jax.tree.leaves(state)
    text = repr(model)  # every BatchNorm of resnet20_cifar (19) replaced, groups min(32, C)
    assert text.count("GroupNorm(") == 19 and "BatchNorm" not in text and "GroupNorm(groups=16," in text
    with pytest.raises(ValueError, match="norm must be 'batch' or 'group', got 'layer'"):
        models.resnet20_cifar(norm="layer")


def test_bench_dp_runs_opacus_and_jax_privacy_when_installed(tiny):
    pytest.importorskip("opacus")
    pytest.importorskip("jax_privacy")
    contenders = ["jaxcnn-engine", "opacus-ghost", "jax_privacy"]
    result = bench.run_dp([tiny], batch_size=4, rounds=1, steps=1, warmup=0, contenders=contenders, log=None)
    rows = {row["contender"]: row for row in result["results"]}
    assert set(rows) == set(contenders) and not result["skipped"]
    assert rows["jax_privacy"]["memory"]["temp_bytes"] >= 0 and "clipped_grad" in rows["jax_privacy"]["what"]
    assert result["machine"]["opacus"] and result["machine"]["jax_privacy"]
