"""The repository's layout: tests/ and bench/ import neither each other. What both need (the authors'
oracle, the Triton compile check) lives in cnl_ext.testing, so that neither owns it and no cycle forms."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def top_level_imports(source: str) -> set:
    """The top-level packages ``source`` imports anywhere, also in the Python it carries as string
    constants (the scripts a test runs with ``python -c``). Relative imports stay inside their package."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
            try:
                found |= top_level_imports(node.value)
            except (SyntaxError, ValueError):  # a string that is not Python
                pass
    return found


def _importers(folder: str, package: str) -> list:
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / folder).rglob("*.py")
                  if path != Path(__file__).resolve()  # its examples import both
                  and package in top_level_imports(path.read_text(encoding="utf-8")))


def test_imports_are_found_in_code_and_in_scripts_held_as_strings():
    source = 'import bench.cases\nfrom tests.optim import x\nfrom . import y\nSCRIPT = "from cnl_ext import z"\n'
    assert top_level_imports(source) == {"bench", "tests", "cnl_ext"}
    assert top_level_imports('NOTE = "import this, not code"') == set()


def test_tests_do_not_import_bench():
    assert _importers("tests", "bench") == []


def test_bench_does_not_import_tests():
    assert _importers("bench", "tests") == []
