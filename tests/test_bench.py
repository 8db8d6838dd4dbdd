"""jaxcnn bench: the harness runs every contender it can, interleaved, and reports medians and ratios."""

import json

import jax
import pytest

from jaxcnn import bench, cli


def test_bench_runs_contenders_and_reports_medians_and_ratios(tiny):
    pytest.importorskip("torch")
    contenders = ["jaxcnn-engine", "flax", "torch-eager"]
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
    assert "| bench_tiny | flax |" in table and "Versions: python" in table
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
