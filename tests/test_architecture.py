"""The layout a newcomer reads matches the code, and CI enforces the layers.

* An import that breaks a layer fails ``lint-imports`` (run by ``make lint``, which
  ``make test`` runs first): checked on a scratch copy of the packages with one
  offending import per contract.
* Every import-linter exception (``ignore_imports``) carries a comment saying why.
* Every ``fl_app/...`` or ``strategies/...`` path that docs/architecture.md names exists.
* No source file points a reader at a document outside the repository (the design
  notes the code was written from are not shipped; docs/architecture.md is).
* Sizes a reader can hold: no source module over 500 lines, no function over 60 lines
  of code without a ``# long:`` reason in it, beyond an allow-list that only shrinks.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------ sizes
# Sizes a reader can hold (issue 18): no source module over _MAX_MODULE_LINES lines, no
# function whose code (its docstring not counted) runs over _MAX_FUNCTION_LINES lines
# unless a comment inside it starting "# long:" says why it stays long (a linear
# protocol, a table). Known offenders are listed below by name; splitting one means
# deleting its entry (the test fails on an entry that no longer offends, so the lists
# only shrink), and a new offender fails the test with its size.
_MAX_MODULE_LINES = 500
_MAX_FUNCTION_LINES = 60
_LONG_REASON = re.compile(r"#\s*long:\s*\S")

_LONG_MODULES_ALLOWED: frozenset[str] = frozenset()

_LONG_FUNCTIONS_ALLOWED: frozenset[str] = frozenset()


def _sources() -> list[Path]:
    return sorted(p for top in ("fl_app", "strategies") for p in (ROOT / top).rglob("*.py"))


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from ``def`` to the function's last line, less its docstring."""
    assert node.end_lineno is not None
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        assert first.end_lineno is not None
        lines -= first.end_lineno - first.lineno + 1
    return lines


def _functions(tree: ast.AST) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method with its dotted qualified name, nested ones included."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, Any]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + child.name, child
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def _long_modules() -> dict[str, int]:
    out = {}
    for path in _sources():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > _MAX_MODULE_LINES:
            out[path.relative_to(ROOT).as_posix()] = lines
    return out


def _long_functions() -> dict[str, int]:
    """``{"path::qualname": code lines}`` of long functions with no ``# long:`` reason."""
    out = {}
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for name, node in _functions(ast.parse(text)):
            size = _code_lines(node)
            assert node.end_lineno is not None
            body = lines[node.lineno - 1 : node.end_lineno]
            if size > _MAX_FUNCTION_LINES and not any(_LONG_REASON.search(b) for b in body):
                out[f"{path.relative_to(ROOT).as_posix()}::{name}"] = size
    return out


def test_the_size_measures_count_what_they_say(tmp_path: Path) -> None:
    """A docstring does not count, a ``# long:`` comment excuses, nesting is named."""
    code = "\n".join(
        [
            "class A:",
            "    def m(self):",
            '        """Doc',
            "        string",
            '        """',
            "        x = 1",
            "        return x",
            "def f():",
            "    # long: a table",
            "    return 1",
            "def g():",
            "    def inner():",
            "        return 2",
            "    return inner",
        ]
    )
    tree = ast.parse(code)
    found = {name: _code_lines(node) for name, node in _functions(tree)}
    # m: 6 lines from def to return, 3 of them docstring; g: 4 lines, inner: 2.
    assert found == {"A.m": 3, "f": 3, "g": 4, "g.inner": 2}
    assert _LONG_REASON.search("    # long: a table")
    assert not _LONG_REASON.search("    # long:")
    assert not _LONG_REASON.search("    x = 1  # a long line")


def test_no_module_or_function_grows_past_a_readers_size() -> None:
    """New offenders fail with their size; listed ones that no longer offend must go."""
    modules = _long_modules()
    functions = _long_functions()
    new_modules = {m: n for m, n in modules.items() if m not in _LONG_MODULES_ALLOWED}
    new_functions = {f: n for f, n in functions.items() if f not in _LONG_FUNCTIONS_ALLOWED}
    assert not new_modules, (
        f"modules over {_MAX_MODULE_LINES} lines (split by concern): {new_modules}"
    )
    assert not new_functions, (
        f"functions over {_MAX_FUNCTION_LINES} lines of code with no '# long: <why>' "
        f"comment inside (split into named steps, or say why it stays long): {new_functions}"
    )
    stale = sorted(
        (_LONG_MODULES_ALLOWED - modules.keys()) | (_LONG_FUNCTIONS_ALLOWED - functions.keys())
    )
    assert not stale, f"no longer too long: delete from the allow-lists in {__file__}: {stale}"
