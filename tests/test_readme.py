"""The README's Quick start holds exactly two command lines, and its Python blocks run as written."""

import pathlib
import re

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


def test_python_blocks_run():
    namespace: dict = {}
    for code in blocks("python"):
        exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["report"].ok
    assert {"Swish_0", "Swish_1"} <= {c.layer for c in namespace["report"].checks}
