"""The scripts in benchmarks/ and experiments/ run by hand (they need a GPU, SmolLM2 or MovieLens-100k), so no other
test runs most of them: here every name they import from the package or from each other, at the top or inside a
function, must exist. A module moved or a name renamed in reaemb_trl/ fails here instead of in someone's run."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for folder in ("benchmarks", "experiments") for p in (REPO / folder).glob("*.py"))
OURS = ("reaemb_trl", "benchmarks", "experiments")


def imported_names(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) for every import of our packages in the file; name None for `import module`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in OURS:
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] in OURS]
    return found


def test_the_scripts_are_found():
    names = {p.stem for p in SCRIPTS}
    assert {"common", "gpu_check", "bench_lrcl", "pipeline", "crrl_ablation"} <= names, names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_imported_name_exists(path):
    missing, broken = [], set()
    for line, module_name, name in imported_names(path):
        if module_name in broken:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            missing.append(f"line {line}: {module_name} ({error})")
            broken.add(module_name)
            continue
        if name is not None and not hasattr(module, name) and importlib.util.find_spec(f"{module_name}.{name}") is None:
            missing.append(f"line {line}: {module_name}.{name}")
    assert not missing, f"{path.relative_to(REPO)} imports what does not exist: {missing}"
