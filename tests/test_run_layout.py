"""The run directory's layout is defined once (fl_app/server/layout.py).

Every module that writes or reads a run directory takes the file names from
:mod:`fl_app.server.layout`; a name spelled out anywhere else is a reader that a
rename would silently leave behind (issue 18: LEDGER_FILE was defined three times).
"""

from __future__ import annotations

import ast
from pathlib import Path

from fl_app.server.layout import CHECKPOINT_DIR_PATTERN, RunLayout

ROOT = Path(__file__).resolve().parents[1]

# The names as docs/architecture.md and the README give them (not read from the module).
RUN_DIR_NAMES = {
    "config.yaml",
    "run.json",
    "metrics.jsonl",
    "metrics.abandoned.jsonl",
    "model.safetensors",
    "summary.json",
    "privacy_ledger.json",
    "audit.jsonl",
    "audit_head.sig.json",
    "checkpoints",
    "client-state",
    "manifest.json",
    "strategy_state.safetensors",
    "server_state.json",
    "tracking.json",
}

# The same spelling with another meaning: the Hydra primary config of configs/.
_OTHER_MEANING = {("fl_app/config/compose.py", "config.yaml")}


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _spelled_out() -> set[tuple[str, str]]:
    """(module, name) for each run-directory name written as a string constant in code."""
    found = set()
    for top in ("fl_app", "strategies"):
        for path in sorted((ROOT / top).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            docs = _docstring_nodes(tree)
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and node.value in RUN_DIR_NAMES
                    and id(node) not in docs
                ):
                    found.add((rel, node.value))
    return found


def test_every_run_directory_name_is_spelled_out_only_in_the_layout() -> None:
    found = _spelled_out() - _OTHER_MEANING
    elsewhere = sorted(f for f in found if f[0] != "fl_app/server/layout.py")
    assert not elsewhere, (
        f"run-directory file names spelled out outside fl_app/server/layout.py: {elsewhere}; "
        "import the constant (or RunLayout) from fl_app.server.layout"
    )
    defined = {name for module, name in found if module == "fl_app/server/layout.py"}
    assert defined == RUN_DIR_NAMES


def test_run_layout_paths(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    assert layout.config == tmp_path / "config.yaml"
    assert layout.run_manifest == tmp_path / "run.json"
    assert layout.metrics == tmp_path / "metrics.jsonl"
    assert layout.metrics_abandoned == tmp_path / "metrics.abandoned.jsonl"
    assert layout.model == tmp_path / "model.safetensors"
    assert layout.summary == tmp_path / "summary.json"
    assert layout.ledger == tmp_path / "privacy_ledger.json"
    assert layout.audit == tmp_path / "audit.jsonl"
    assert layout.signed_head == tmp_path / "audit_head.sig.json"
    assert layout.client_state == tmp_path / "client-state"
    assert layout.tracking == tmp_path / "tracking.json"
    assert layout.checkpoint(3) == tmp_path / "checkpoints" / "round-0003"
    assert layout.checkpoint(12345) == tmp_path / "checkpoints" / "round-12345"


def test_checkpoint_directory_pattern_skips_rolled_back_ones() -> None:
    m = CHECKPOINT_DIR_PATTERN.fullmatch("round-0003")
    assert m is not None and m.group(1) == "0003"
    assert CHECKPOINT_DIR_PATTERN.fullmatch("round-12345") is not None
    # Renamed by a rollback: kept as evidence, never loaded.
    assert CHECKPOINT_DIR_PATTERN.fullmatch("round-0003.rolledback-1") is None
    assert CHECKPOINT_DIR_PATTERN.fullmatch("round-003") is None
