"""Every repository path cited in the code and the docs exists: a file moved or deleted takes its
citations with it (a docstring's ``tests/ops/test_kif.py``, a doc's ``cnl_ext/ops/__init__.py``)."""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[2]
# the repository's top-level folders: a citation starts with one of them
CITED_ROOTS = ("cnl_ext", "csrc", "tests", "bench", "scripts", "examples", "docs", ".ci")
SCANNED = [*CITED_ROOTS, "README.md", "setup.py", "MANIFEST.in", "pytest.ini"]
BINARY_SUFFIXES = {".png", ".so", ".pt", ".pyc", ".gguf", ".whl"}
# paths that only a build creates: the CPU sources setup.py copies into the package
BUILD_OUTPUTS = {"cnl_ext/_csrc"}
# a cited root not preceded by a path or word character (so not torch's .../tests/... nor a URL's),
# up to a character that cannot be in a path
CITATION = re.compile(r"(?<![\w./-])((?:%s)/[^\s`'\"()\[\]:;|,]*)" % "|".join(re.escape(r) for r in CITED_ROOTS))
TEMPLATE = re.compile(r"[<>{}*$]|\.\.\.")  # cnl_ext/ops/<name>_backend.py, tests/test_*.py, cnl_ext/_C...so


def cited_paths(text: str) -> list:
    """The repository-relative paths ``text`` cites, without templates and globs."""
    paths = [match.group(1).rstrip(".-/") for match in CITATION.finditer(text)]
    return [path for path in paths if not TEMPLATE.search(path)]


def exists(path: str) -> bool:
    """``path`` exists, or names an attribute of a module that exists (``tests/optim/reliability_helpers.snapshot``)."""
    while True:
        if (ROOT / path).exists() or path in BUILD_OUTPUTS:
            return True
        stem, dot, _ = path.rpartition(".")
        if not dot or "/" not in stem or not PurePosixPath(stem).name:
            return False
        if (ROOT / f"{stem}.py").exists():
            return True
        path = stem


def _scanned_files():
    for name in SCANNED:
        top = ROOT / name
        for path in (top.rglob("*") if top.is_dir() else [top]):
            if path.is_file() and path.suffix not in BINARY_SUFFIXES and "__pycache__" not in path.parts \
                    and path != Path(__file__).resolve():  # its examples cite missing paths on purpose
                yield path


def test_citations_are_found_and_resolved():
    text = ("see `tests/ops/test_kif.py::test_x`, docs/cnl-spec.md. and (cnl_ext/ops/<name>_backend.py) "
            "https://github.com/pytorch/pytorch/blob/main/torch/optim/adamw.py tests/optim/reliability_helpers.snapshot")
    assert cited_paths(text) == ["tests/ops/test_kif.py", "docs/cnl-spec.md", "tests/optim/reliability_helpers.snapshot"]
    assert exists("tests/optim/reliability_helpers.snapshot") and exists("docs/cnl-spec.md")
    assert not exists("tests/test_kernels.py") and not exists("docs/nowhere.md")


def test_every_cited_path_exists():
    missing = {}
    for path in _scanned_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for cited in cited_paths(text):
            if not exists(cited):
                missing.setdefault(cited, set()).add(str(path.relative_to(ROOT)))
    assert not missing, "\n".join(f"{cited}: cited by {sorted(where)}" for cited, where in sorted(missing.items()))
