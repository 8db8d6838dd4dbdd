"""jaxcnn bench's XLA flag sets (worker processes timed in the same rounds), jaxcnn's default XLA:CPU flags, the
JAXCNN_DW_METHOD switch, and bench --loop (fit end to end against the step)."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import unset_env
from jaxcnn import _xla_flags, bench, cli
from jaxcnn.bench import flagsets
from jaxcnn.functional import conv

YNN = "--xla_cpu_experimental_ynn_fusion_type"
_SETTINGS = dict(batch_size=1, rounds=1, steps=1, optimizer="sgd", dtype="float32")
NO_YNN = f"{YNN}="


@pytest.mark.parametrize(
    "spec,name,xla,environment",
    [
        ("plain=", "plain", "", {}),
        (f"off={NO_YNN}", "off", NO_YNN, {}),
        ("a.b+c=--xla_a=1   --xla_b", "a.b+c", "--xla_a=1 --xla_b", {}),
        (
            f"conv={NO_YNN} --jaxcnn_dw_method=conv --jaxcnn_cpu_flags=--xla_x=1",
            "conv",
            NO_YNN,
            {"JAXCNN_DW_METHOD": "conv", "JAXCNN_XLA_CPU_FLAGS": "--xla_x=1"},
        ),
    ],
)
def test_flag_sets_parse_into_xla_flags_and_jaxcnn_switches(spec, name, xla, environment):
    flag_set = flagsets.parse(spec)
    assert (flag_set.name, flag_set.xla_flags, flag_set.environment) == (name, xla, environment)
    assert flagsets.parse(flag_set.spec) == flag_set  # the spec round-trips


@pytest.mark.parametrize(
    "spec,message",
    [
        ("--xla_cpu_use_onednn=true", "an XLA flag set is NAME=FLAGS"),
        ("bad name=--x", "an XLA flag set is NAME=FLAGS"),
        ("x=xla_cpu_use_onednn", "'xla_cpu_use_onednn' is not a flag"),
        ("x=--jaxcnn_dw_method=gemm", "--jaxcnn_dw_method must be one of auto, taps, conv"),
    ],
)
def test_malformed_flag_sets_are_refused_in_one_line(spec, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        flagsets.parse(spec)


def test_flag_set_names_must_differ():
    with pytest.raises(ValueError, match="given twice: a"):
        flagsets.check_names([flagsets.parse("a="), flagsets.parse("b="), flagsets.parse("a=--x")])


def test_a_flag_set_runs_in_its_own_process_in_the_same_rounds(tiny, tmp_path, capsys):
    """The worker gets exactly its XLA_FLAGS (not the parent's), builds the user's registered model and takes
    its turns in every round; the table names the flag set and its flags."""
    args = ["--models", tiny, "--batch-size", "4", "--rounds", "2", "--steps", "1", "--warmup", "0", "--quiet"]
    sets = ["--xla-flags", f"noynn={NO_YNN} --jaxcnn_dw_method=conv"]
    assert cli.main(["bench", *args, "--contenders", "jaxcnn-engine", *sets, "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = {row["contender"]: row for row in result["results"]}
    assert set(rows) == {"jaxcnn-engine", "jaxcnn-engine@noynn"}
    assert all(len(row["rounds_images_per_second"]) == 2 for row in rows.values())
    assert result["settings"]["xla_flag_sets"] == {"noynn": f"{NO_YNN} --jaxcnn_dw_method=conv"}
    out = capsys.readouterr().out
    assert f"Flag set noynn: {NO_YNN} --jaxcnn_dw_method=conv" in out and "| bench_tiny | jaxcnn-engine@noynn |" in out


def test_a_flag_set_xla_refuses_is_one_line_naming_the_flag(tiny, tmp_path, capsys):
    args = ["--models", tiny, "--rounds", "1", "--steps", "1", "--contenders", "jaxcnn-engine", "--quiet"]
    code = cli.main(["bench", *args, "--xla-flags", "typo=--xla_no_such_flag=1", "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "XLA flag set 'typo'" in err and "--xla_no_such_flag" in err
    assert not (tmp_path / "bench.json").exists()


def test_a_flag_set_whose_worker_fails_to_build_is_skipped_with_the_reason():
    """A worker that cannot build (here: a model registered with a lambda, which exists only in the parent) takes
    no turns; the reason is kept and printed, and the parent's contenders run on."""
    from jaxcnn import models, nn
    from jaxcnn.bench import harness

    build = lambda num_classes=3: nn.Sequential([nn.Flatten(), nn.Dense(num_classes)])  # noqa: E731
    models.register("bench_lambda", build, input_shape=(4, 4, 1))
    try:
        request = flagsets.model_request("bench_lambda")
    finally:
        models.unregister("bench_lambda")
    assert request["builder"] is None and request["input_shape"] == [4, 4, 1]

    class Refusing:  # what Worker.build raises when the worker answers {"error": ...}
        flag_set = flagsets.parse("w=")

        def greet(self):
            return {"backend": "cpu"}

        def build(self, request):
            flagsets.import_builder(request["builder"], request["model"])

    skipped, lines = {}, []
    assert harness._worker_ready("bench_lambda", Refusing(), request, lines.append, skipped) == {}
    assert "registered with a lambda or local function" in skipped["*@w"] and "skipped" in lines[0]
    from jaxcnn.bench.report import machine, peak_memory

    result = {"machine": machine(), "settings": _SETTINGS, "results": [], "memory": peak_memory(), "skipped": skipped}
    table = bench.markdown(result)
    assert "Skipped *@w: model 'bench_lambda' was registered with a lambda" in table


def test_model_requests_name_an_importable_builder():
    from jaxcnn import models

    request = flagsets.model_request("mnist_cnn")
    assert request["model"] == "mnist_cnn" and request["input_shape"] == [28, 28, 1]
    assert flagsets.import_builder(request["builder"], "mnist_cnn") is models.spec("mnist_cnn").builder
    with pytest.raises(ValueError, match="cannot be imported in a worker process"):
        flagsets.import_builder("no_such_module_here:f", "x")


@pytest.mark.parametrize("args,message", [(["--dp"], "bench --dp does not take --xla-flags")])
def test_bench_flag_sets_bad_combinations(args, message, capsys, tmp_path):
    assert cli.main(["bench", *args, "--xla-flags", "a=", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_dw_method_environment_switch(monkeypatch):
    monkeypatch.setenv("JAXCNN_DW_METHOD", "conv")
    assert conv.dw_method_for("cpu") == "conv"
    monkeypatch.setenv("JAXCNN_DW_METHOD", "taps")
    assert conv.dw_method_for("gpu") == "taps"
    monkeypatch.setenv("JAXCNN_DW_METHOD", "im2col")
    with pytest.raises(ValueError, match="JAXCNN_DW_METHOD must be one of auto, taps, conv, got 'im2col'"):
        conv.dw_method_for("cpu")


# -- jaxcnn's default XLA:CPU flags -----------------------------------------------------------------------------


@pytest.fixture
def fresh_flags(monkeypatch):
    """_xla_flags as before any apply(), with no backend started and known recommended flags."""
    monkeypatch.setattr(_xla_flags, "_state", {"original": None, "added": ""})
    monkeypatch.setattr(_xla_flags, "_backend_started", lambda: False)
    monkeypatch.setattr(_xla_flags, "RECOMMENDED_CPU_FLAGS", "--xla_cpu_a=1 --xla_cpu_b=2")
    unset_env(monkeypatch, _xla_flags.ENV, "XLA_FLAGS")
    return monkeypatch


def test_no_flags_are_added_unless_asked(fresh_flags):
    assert _xla_flags.apply() == "" and "XLA_FLAGS" not in os.environ
    fresh_flags.setenv(_xla_flags.ENV, "")
    assert _xla_flags.apply() == "" and "XLA_FLAGS" not in os.environ


def test_the_recommended_flags_are_added_and_the_users_own_win(fresh_flags):
    fresh_flags.setenv(_xla_flags.ENV, "recommended")
    fresh_flags.setenv("XLA_FLAGS", "--xla_cpu_b=7 --xla_force_host_platform_device_count=2")
    assert _xla_flags.apply() == "--xla_cpu_a=1"
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_b=7 --xla_force_host_platform_device_count=2 --xla_cpu_a=1"
    assert _xla_flags.applied() == "--xla_cpu_a=1"
    assert _xla_flags.user_flags() == "--xla_cpu_b=7 --xla_force_host_platform_device_count=2"
    assert _xla_flags.revert() and os.environ["XLA_FLAGS"] == "--xla_cpu_b=7 --xla_force_host_platform_device_count=2"
    assert _xla_flags.applied() == ""


def test_other_flags_can_be_named(fresh_flags):
    fresh_flags.setenv(_xla_flags.ENV, "--xla_cpu_c=3")
    assert _xla_flags.apply() == "--xla_cpu_c=3" and os.environ["XLA_FLAGS"] == "--xla_cpu_c=3"


def test_nothing_changes_once_a_backend_has_started(fresh_flags):
    fresh_flags.setenv(_xla_flags.ENV, "recommended")
    fresh_flags.setattr(_xla_flags, "_backend_started", lambda: True)
    assert _xla_flags.apply() == "" and "XLA_FLAGS" not in os.environ


def test_importing_jaxcnn_sets_the_asked_flags_before_jax_starts():
    """In a fresh process: ``import jaxcnn`` (which imports no JAX) adds the asked flags to XLA_FLAGS, before any
    backend can start; without JAXCNN_XLA_CPU_FLAGS it leaves XLA_FLAGS alone."""
    code = "import os, sys, jaxcnn; print(os.environ.get('XLA_FLAGS', ''), 'jax' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", _xla_flags.ENV)}
    for extra, expected in (({}, ""), ({_xla_flags.ENV: "recommended"}, _xla_flags.RECOMMENDED_CPU_FLAGS)):
        result = subprocess.run([sys.executable, "-c", code], env=env | extra, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [*expected.split(), "False"]


# -- bench --loop -------------------------------------------------------------------------------------------------


def test_bench_loop_times_fit_against_the_step_epoch_by_epoch(tmp_path, capsys):
    """fit's epochs and the bench step's turns alternate; epoch 1 (compiles) is reported apart; every epoch's
    figures are consistent with its time, and the workdir's checkpoints were written (then dropped)."""
    model = "models_for_tests:small_digits_cnn"
    args = ["--loop", "--models", model, "--epochs", "3", "--batch-size", "256", "--output", str(tmp_path)]
    assert cli.main(["bench", *args, "--quiet"]) == 0
    result = json.loads((tmp_path / "bench-loop.json").read_text())
    settings, rows, summary = result["settings"], result["epochs"], result["summary"]
    assert settings["dataset"] == "digits" and settings["workdir"] and settings["gradients"] == "manual"
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert row["loop_images_per_second"] == pytest.approx(row["images"] / row["loop_seconds"])
        assert row["ratio"] == pytest.approx(row["loop_images_per_second"] / row["step_images_per_second"])
        assert 0 < row["steps_and_eval_seconds"] < row["loop_seconds"]
    assert summary["ratio"] == pytest.approx(statistics.median(row["ratio"] for row in rows[1:]))
    assert summary["first_epoch_seconds"] == rows[0]["loop_seconds"]
    assert summary["fit_seconds"] >= sum(row["loop_seconds"] for row in rows) - 1e-9
    out = capsys.readouterr().out
    assert "| 2 |" in out and "loop / step" in out and (tmp_path / "bench-loop.md").read_text() in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--epochs", "2"], "bench --loop needs epochs >= 3"),
        (["--models", "mnist_cnn,lenet5"], "bench --loop times one model"),
        (["--dp"], "bench --loop takes --models, --dataset"),
        (["--dataset", "nope"], "dataset"),
    ],
)
def test_bench_loop_bad_input(args, message, capsys, tmp_path):
    assert cli.main(["bench", "--loop", *args, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "flags,off",
    [
        ("", False),
        ("--xla_cpu_experimental_ynn_fusion_type=dot", True),
        ("--xla_cpu_experimental_ynn_fusion_type=", True),
        ("--xla_cpu_experimental_ynn_fusion_type=dot,individual_convolution", False),
        ("--xla_cpu_experimental_ynn_fusion_type=+dot", False),
        ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution", True),
        (f"{YNN}=dot {YNN}=reduce,individual_convolution", False),  # the last one counts
    ],
)
def test_dw_auto_on_cpu_follows_who_runs_convolutions(monkeypatch, flags, off):
    monkeypatch.delenv("JAXCNN_DW_METHOD", raising=False)
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert _xla_flags.ynn_convolutions_off() is off
    assert conv.dw_method_for("cpu") == ("conv" if off else "taps")
    assert conv.dw_method_for("gpu") == "conv"
