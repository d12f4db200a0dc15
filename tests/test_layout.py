"""The layout's rules, checked on the source: the model imports neither Ray nor MLflow, evaluation imports nothing
from training, product code imports nothing from tests/, and `jobs.predict` (no Ray needed) loads no Ray Train."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def _imports(package: str) -> list[tuple[Path, str]]:
    """(file, imported module) for every absolute import in `package`'s sources."""
    found = []
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(path, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((path, node.module))
    return found


def _offending(package: str, forbidden: tuple[str, ...]) -> list[str]:
    """`file: module` for each import in `package` of a module in `forbidden` or below one."""
    hits = {
        f"{path.relative_to(REPO_ROOT)}: {name}"
        for path, name in _imports(package)
        if any(name == root or name.startswith(root + ".") for root in forbidden)
    }
    return sorted(hits)


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("mvit", ("ray", "mlflow", "pipeline", "jobs")),
        ("pipeline/evaluation", ("pipeline.training",)),
        ("pipeline", ("tests",)),
        ("jobs", ("tests",)),
        ("mvit", ("tests",)),
    ],
)
def test_a_package_imports_nothing_its_stage_may_not(package, forbidden):
    assert _offending(package, forbidden) == []


def test_the_rule_sees_an_import_it_forbids():
    assert any(name.startswith("pipeline.training") for _, name in _imports("jobs"))  # jobs.train does import it
    assert _offending("jobs", ("pipeline.training",))


def test_jobs_predict_loads_no_ray_train():
    probe = "import sys, jobs.predict; print(sorted(m for m in sys.modules if m.startswith('ray.train')))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout
