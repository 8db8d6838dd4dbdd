"""The README's Quick start holds exactly two command lines, and its Python blocks run as written."""

import pathlib
import re

import jax
import pytest

from conftest import relative_error

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quick_start_is_two_command_lines():
    section = README.split("## Quick start", 1)[1]
    first = re.search(r"```[a-z]*\n(.*?)```", section, flags=re.S).group(1)
    lines = [line for line in first.splitlines() if line.strip()]
    assert len(lines) == 2
    assert "jaxcnn" in lines[0] and "pip install" in lines[0]
    assert "[test]" in lines[1] and "pytest" in lines[1]


def test_ci_runs_the_readme_test_command():
    second = README.split("## Quick start", 1)[1].split("```")[1].splitlines()[2]
    test_command = second.split("&&", 1)[1].strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()


def run_blocks(codes: list[str]) -> dict:
    namespace: dict = {}
    for code in codes:
        exec(compile(code, "README.md", "exec"), namespace)
    return namespace


# The blocks in two runs that can go to two workers: the "Deeper networks" block (a gradient check of a small
# ResNet, the slowest) after the two it builds on, and every other block in order. No later block reads a name
# that only the Deeper networks block defines.
DEEPER = "tiny_resnet = "


# the README's deepest block (a check_model of a small ResNet with BatchNorm and dropout, about 35 s); the same layers
# are checked in test_deep.py
@pytest.mark.slow
def test_python_blocks_run_deeper_networks():
    codes = blocks("python")
    deeper = [i for i, code in enumerate(codes) if DEEPER in code]
    assert len(deeper) == 1
    namespace = run_blocks(codes[: deeper[0] + 1])
    assert namespace["report"].ok


# the blocks after "Training" (train steps, fit, per-example gradients) run in a second test, after the two
# blocks they build on, so that the two halves can go to two workers
TRAINING = ("create_train_state", "jc.train.fit(", "parallel.per_example_grads")


def split_blocks() -> tuple[list[str], list[str]]:
    codes = [code for code in blocks("python") if DEEPER not in code]
    training = [i for i, code in enumerate(codes) if any(marker in code for marker in TRAINING)]
    assert len(training) >= 3, training
    rest = [code for i, code in enumerate(codes) if i not in training]
    return rest, codes[:2] + [codes[i] for i in training]


def test_python_blocks_run():
    namespace = run_blocks(split_blocks()[0])
    assert namespace["report"].ok
    assert {"Swish_0", "Swish_1"} <= {c.layer for c in namespace["report"].checks}
    # the Hessian-vector product of "Three ways to the same gradient": manual mode's equals autodiff's
    for manual, autodiff in zip(
        jax.tree.leaves(namespace["hv_manual"]), jax.tree.leaves(namespace["hv_autodiff"]), strict=True
    ):
        assert relative_error(manual, autodiff) < 1e-5


def test_python_blocks_run_training():
    namespace = run_blocks(split_blocks()[1])
    assert "train_state" in namespace and "restored" in namespace and "per_example" in namespace
