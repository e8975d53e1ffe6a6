"""The README's Python examples are code: they parse, pass ruff's lint and format checks
with the project's settings, and name no undefined variable."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_blocks_are_lint_and_format_clean(index, tmp_path):
    pytest.importorskip("ruff")
    code = BLOCKS[index]
    compile(code, f"README block {index}", "exec")
    path = tmp_path / f"readme_block_{index}.py"
    path.write_text(code)
    config = ["--config", str(ROOT / "pyproject.toml")]
    for check in (["check", *config, str(path)], ["format", *config, "--diff", str(path)]):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", *check], capture_output=True, text=True, cwd=tmp_path
        )
        assert done.returncode == 0, f"README python block {index}:\n{done.stdout}{done.stderr}"
