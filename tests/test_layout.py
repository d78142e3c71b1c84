"""The code's layering: project/ and kernels/ never import the evaluation layer or the stage runner above them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABOVE = {"eval": "the evaluation layer", "stages": "the stage runner", "run": "the entry point"}
MAX_LINES = 400


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a file imports, at module level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def library_files() -> list[Path]:
    return sorted(p for package in ("project", "kernels") for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_layer_never_imports_the_layers_above_it(path):
    upward = imported_modules(path) & set(ABOVE)
    assert not upward, f"{path.relative_to(ROOT)} imports {', '.join(f'{m} ({ABOVE[m]})' for m in sorted(upward))}"


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from eval.stage import evaluate_checkpoint\n    import stages\n")
    assert imported_modules(probe) == {"os", "eval", "stages"}


def test_no_source_file_grows_past_the_size_where_it_mixes_ideas():
    sources = [p for package in ("project", "kernels", "eval") for p in (ROOT / package).rglob("*.py")]
    sources += [ROOT / "stages.py", ROOT / "run.py"]
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by idea (over {MAX_LINES} lines): {long}"
