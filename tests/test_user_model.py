"""Your own model, end to end: ``fit(config, workdir, model=...)``, ``jaxcnn train --model package.module:factory``
and ``jaxcnn.models.register``; each resumed bit for bit, and a model of another structure refused by name."""

import textwrap

import pytest

from conftest import same_bits
from jaxcnn import cli, models, nn, train

# a user's package, as a user would write it: a factory that takes num_classes, and one that does not
NETS = textwrap.dedent(
    """
    from jaxcnn import nn


    def small_cnn(num_classes=10):
        return nn.Sequential([
            nn.Conv2D(4, 3, padding="SAME"), nn.ReLU(), nn.AvgPool2D(2),
            nn.Flatten(), nn.Dense(num_classes),
        ])


    def fixed_cnn():
        return nn.Sequential([nn.Conv2D(4, 3, padding="VALID"), nn.ReLU(), nn.Flatten(), nn.Dense(10)])


    def not_a_model(num_classes=10):
        return [num_classes]


    NOT_CALLABLE = 3
    """
)


def small_cnn(num_classes: int = 10, width: int = 4) -> nn.Sequential:
    return nn.Sequential(
        [nn.Conv2D(width, 3, padding="SAME"), nn.ReLU(), nn.AvgPool2D(2), nn.Flatten(), nn.Dense(num_classes)]
    )


CONFIG = train.Config(epochs=2, batch_size=64)  # the digits, 23 steps an epoch


@pytest.fixture
def mypkg(tmp_path, monkeypatch):
    """``mypkg.nets`` importable from a fresh directory on sys.path."""
    package = tmp_path / "site" / "mypkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return "mypkg.nets"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Three epochs of small_cnn through fit(model=...) without a stop: the reference for resuming."""
    workdir = tmp_path_factory.mktemp("user") / "straight"
    state, _ = train.fit(CONFIG.replace(epochs=3), workdir, model=small_cnn(), log=None)
    return workdir, state


def test_fit_trains_a_model_object_and_resumes_it_bit_for_bit(straight, tmp_path):
    workdir = tmp_path / "run"
    train.fit(CONFIG, workdir, model=small_cnn(), log=None)
    resumed, history = train.fit(CONFIG.replace(epochs=3), workdir, model=small_cnn(), log=None)
    assert [record["epoch"] for record in history] == [1, 2, 3]
    assert same_bits(resumed, straight[1])
    assert same_bits(train.restore(workdir, model=small_cnn()), straight[1])
    model, params, _, preprocess = train.load_model(workdir, model=small_cnn())
    assert isinstance(model, nn.Sequential) and params["Conv_0"]["kernel"].shape == (3, 3, 1, 4)
    assert preprocess.input_shape == (8, 8, 1)


def test_a_model_of_another_structure_is_refused_by_name_and_nothing_is_written(straight, capsys):
    workdir, _ = straight
    before = sorted(path.name for path in (workdir / "checkpoints").iterdir())
    metrics = (workdir / "metrics.jsonl").read_bytes()
    wider = small_cnn(width=5)
    difference = r"params/Conv_0/bias \(4,\) float32; model: params/Conv_0/bias \(5,\)"
    with pytest.raises(ValueError, match=rf"the model does not match checkpoint .*{difference}"):
        train.fit(CONFIG.replace(epochs=4), workdir, model=wider, log=None)
    with pytest.raises(ValueError, match="the model does not match checkpoint"):
        train.restore(workdir, model=wider)
    assert sorted(path.name for path in (workdir / "checkpoints").iterdir()) == before
    assert (workdir / "metrics.jsonl").read_bytes() == metrics


def test_a_model_objects_run_is_restored_only_with_the_model(straight):
    workdir, _ = straight
    with pytest.raises(ValueError, match=r"trained with a model object \(Sequential \(user model\)\); pass it"):
        train.restore(workdir)


def test_fit_refuses_what_is_not_a_layer(tmp_path):
    with pytest.raises(ValueError, match="model must be a jaxcnn.nn.Layer, got list"):
        train.fit(CONFIG, tmp_path / "run", model=[nn.Dense(10)], log=None)
    assert not (tmp_path / "run").exists()


def test_the_cli_trains_a_factory_from_a_package_and_resumes_it(mypkg, tmp_path, capsys):
    workdir = tmp_path / "run"
    flags = ["--model", f"{mypkg}:small_cnn", "--batch-size", "64", "--workdir", str(workdir), "--no-progress"]
    assert cli.main(["train", "--epochs", "2", *flags]) == 0
    assert train.read_config(workdir).model == "mypkg.nets:small_cnn"
    assert cli.main(["train", "--epochs", "3", "--workdir", str(workdir), "--no-progress"]) == 0  # the saved model
    out = capsys.readouterr().out
    assert "training mypkg.nets:small_cnn on digits" in out and "resuming" in out
    reference, _ = train.fit(CONFIG.replace(epochs=3, model=f"{mypkg}:small_cnn"), None, log=None)
    assert same_bits(train.restore(workdir), reference)  # restored without model=: the config names the factory


def test_a_factory_without_num_classes_is_called_plainly(mypkg):
    model = train.run.build_model(CONFIG.replace(model=f"{mypkg}:fixed_cnn"), (8, 8, 1), 10)
    assert [type(layer).__name__ for layer in model.layers] == ["Conv2D", "ReLU", "Flatten", "Dense"]
    with_classes = train.run.build_model(CONFIG.replace(model=f"{mypkg}:small_cnn"), (8, 8, 1), 3)
    assert with_classes.output_shape((8, 8, 1)) == (3,)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("nopkg_anywhere.nets:small_cnn", "model factory 'nopkg_anywhere.nets:small_cnn': cannot import module"),
        ("mypkg.nets:missing", "model factory 'mypkg.nets:missing': 'mypkg.nets' has no attribute 'missing'"),
        ("mypkg.nets:NOT_CALLABLE", "model factory 'mypkg.nets:NOT_CALLABLE' is not callable"),
        ("no_such_model", "unknown model 'no_such_model'; known: .*package.module:factory for your own"),
        ("conv_autoencoder", "reconstructs its input"),
    ],
)
def test_bad_models_are_one_line_errors_with_exit_code_2(mypkg, model, message, tmp_path, capsys):
    with pytest.raises(ValueError, match=message):
        train.Config(model=model)
    assert cli.main(["train", "--model", model, "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--model" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_factory_that_returns_no_layer_is_refused(mypkg, tmp_path, capsys):
    assert cli.main(["train", "--model", f"{mypkg}:not_a_model", "--workdir", str(tmp_path / "run")]) == 2
    assert "gave a list, not a jaxcnn.nn.Layer" in capsys.readouterr().err


def test_a_registered_model_trains_by_name_and_names_are_guarded():
    spec = models.register("tiny_user_cnn", small_cnn, input_shape=(8, 8, 1))
    try:
        assert spec == models.spec("tiny_user_cnn") and spec.task == "classification"
        assert "tiny_user_cnn" in models.names() and "tiny_user_cnn" in models.classifiers()
        assert models.input_shape("tiny_user_cnn") == (8, 8, 1)
        # fit builds its model here (the factory and object paths above train end to end)
        model = train.run.build_model(CONFIG.replace(model="tiny_user_cnn"), (8, 8, 1), 10)
        assert model.output_shape((8, 8, 1)) == (10,) and isinstance(model.layers[0], nn.Conv2D)
        with pytest.raises(ValueError, match="already registered"):
            models.register("tiny_user_cnn", small_cnn)
        models.register("tiny_user_cnn", small_cnn, task="reconstruction", replace=True)
        assert "tiny_user_cnn" not in models.classifiers()
    finally:
        models.unregister("tiny_user_cnn")
    assert "tiny_user_cnn" not in models.names()
    for bad, message in [
        (dict(name="has space"), "a model name is letters"),
        (dict(builder=3), "must be callable"),
        (dict(task="segmentation"), "task must be one of classification, reconstruction"),
        (dict(input_shape=(8, 0)), "input_shape of model"),
    ]:
        arguments = dict(name="ok_name", builder=small_cnn) | bad
        with pytest.raises(ValueError, match=message):
            models.register(arguments.pop("name"), arguments.pop("builder"), **arguments)
    assert "ok_name" not in models.names()


def test_gradcheck_names_a_registered_model_without_an_input_shape(capsys):
    models.register("shapeless_user_cnn", small_cnn)
    try:
        assert cli.main(["gradcheck", "--model", "shapeless_user_cnn"]) == 2
    finally:
        models.unregister("shapeless_user_cnn")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "jaxcnn gradcheck: error: model 'shapeless_user_cnn' was registered without an input shape; "
        "register it with input_shape=(H, W, C)"
    ]
