"""The core package stays the core: nothing in yoloq/ imports flows/, Prefect or MLflow (every stage runs and
tests on its own, also on the GPU machine without the orchestration stack)."""

from __future__ import annotations

import ast

from tests.conftest import PROJECT

FORBIDDEN = ("flows", "tasks", "prefect", "mlflow")


def test_the_core_imports_no_orchestration() -> None:
    offenders = []
    for path in sorted((PROJECT / "yoloq").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(PROJECT)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []
