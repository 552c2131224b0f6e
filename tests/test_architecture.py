"""The layout a newcomer reads matches the code, and CI enforces the layers.

* An import that breaks a layer fails ``lint-imports`` (run by ``make lint``, which
  ``make test`` runs first): checked on a scratch copy of the packages with one
  offending import per contract.
* Every import-linter exception (``ignore_imports``) carries a comment saying why.
* Every ``fl_app/...`` or ``strategies/...`` path that docs/architecture.md names exists.
* No source file points a reader at a document outside the repository (the design
  notes the code was written from are not shipped; docs/architecture.md is).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _reported(importer: str, imported: str) -> str:
    """How lint-imports lists one offending import of a forbidden/layers contract."""
    return rf"^-\s+{re.escape(f'{importer} -> {imported}')} \(l\.\d+\)$"


# (file, the line appended to it, what lint-imports must report). Each breaks a
# different contract in pyproject.toml [tool.importlinter].
_BREAKS = [
    # A pure core importing Flower.
    ("fl_app/privacy/noise.py", "import flwr.app", _reported("fl_app.privacy.noise", "flwr")),
    # SecAgg key-exchange code importing torch.
    ("fl_app/secagg/shamir.py", "import torch", _reported("fl_app.secagg.shamir", "torch")),
    # Client code reaching up into the server's strategies.
    (
        "fl_app/client/app.py",
        "import strategies.driver",
        _reported("fl_app.client.app", "strategies.driver"),
    ),
    # A low layer importing a high one (only the layers contract forbids this).
    (
        "fl_app/models.py",
        "import fl_app.server.app",
        _reported("fl_app.models", "fl_app.server.app"),
    ),
    # A cycle inside a package (fl_app.secagg.protocol imports crypto).
    (
        "fl_app/secagg/crypto.py",
        "import fl_app.secagg.protocol",
        r"^No cycles are allowed in fl_app\.secagg\.$",
    ),
]


def test_an_import_that_breaks_a_layer_fails_lint_imports(tmp_path: Path) -> None:
    for package in ("fl_app", "strategies"):
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for rel, line, _ in _BREAKS:
        with (tmp_path / rel).open("a", encoding="utf-8") as fh:
            fh.write(f"\n{line}  # scratch layer break\n")
    # lint-imports puts its working directory first on sys.path, so the scratch copy
    # (not the editable install) is what it analyses.
    proc = subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "400"},
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for rel, _, reported in _BREAKS:
        assert re.search(reported, proc.stdout, re.M), (
            f"lint-imports did not report the break in {rel}:\n{proc.stdout}"
        )


def test_make_test_runs_the_import_contracts() -> None:
    """CI runs `make test` (.ci/run); `make test` runs `make lint`, which runs lint-imports."""
    makefile = (ROOT / "Makefile").read_text()
    test_deps = re.search(r"^test:(.*)$", makefile, re.M)
    assert test_deps is not None and "lint" in test_deps.group(1).split()
    lint = re.search(r"^lint:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert lint is not None
    for tool in ("ruff check", "mypy", "lint-imports"):
        assert tool in lint.group(1), f"make lint does not run {tool}"
    assert re.search(r"^make test\b", (ROOT / ".ci" / "run").read_text(), re.M)


def test_every_module_docs_architecture_names_exists() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    named = set(re.findall(r"\b(?:fl_app|strategies)/[\w/]*\w(?:\.py|/)", text))
    assert len(named) >= 20, f"docs/architecture.md names too few modules: {sorted(named)}"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


# Documents the code was written from that are not in this repository.
_OUTSIDE = re.compile(
    r"ARCHITECTURE|STYLE habit|STYLE\.md|FLOWER_NOTES|shared/design|design card|/work/"
)


def test_no_source_points_to_documents_outside_the_repository() -> None:
    sources = [
        p
        for top in ("fl_app", "strategies", "scripts", "benchmarks", "tests", "docs")
        for p in (ROOT / top).rglob("*")
        if p.suffix in (".py", ".md") and p.resolve() != Path(__file__).resolve()
    ]
    sources += [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in sources
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1)
        if _OUTSIDE.search(line)
    ]
    assert not hits, "point these to docs/architecture.md instead:\n" + "\n".join(hits)


def test_every_import_linter_exception_says_why() -> None:
    """Each ignore_imports entry (or group of entries) sits under a comment giving the
    reason and what removes it, so an exception cannot slip in unexplained."""
    lines = (ROOT / "pyproject.toml").read_text(encoding="utf-8").splitlines()
    entry = re.compile(r'^\s+"[\w.*]+ -> [\w.*]+",$')
    inside, entries, unexplained = False, 0, []
    for n, line in enumerate(lines):
        if line.startswith("ignore_imports = ["):
            inside = True
        elif inside and line.startswith("]"):
            inside = False
        elif inside and entry.match(line):
            entries += 1
            above = n - 1
            while entry.match(lines[above]):
                above -= 1
            if not lines[above].strip().startswith("#"):
                unexplained.append(line.strip())
    assert entries >= 3, "no import-linter exceptions found: did the format change?"
    assert not unexplained, f"ignore_imports entries without a comment: {unexplained}"
