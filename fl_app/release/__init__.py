"""Release a finished run's model by tier, with its model card; and a sweep's report.

``fl-app export <run dir> --tier public|restricted --out DIR`` (:mod:`fl_app.cli.export`):

``public``
    The DP-released weights (``model.safetensors``, re-saved with whitelisted metadata
    only), a model card (``model_card.json`` and ``model_card.md``: task, data,
    mechanism and threat model, z, C, sampling, rounds, ε, δ, accountant, seed, config
    hash, code version, and what the release does *not* protect), and ``MANIFEST.json``
    (each file's SHA-256, the tier, the source run's config hash, export time, code
    version). The config hash published (card, manifest, model metadata) is keyed by
    the run's secret salt (:func:`fl_app.server.rundir.published_config_hash`): an unsalted
    hash of a config whose other fields are on the card lets anyone search for its seed.
``restricted``
    Adds ``metrics.jsonl`` reduced to per-round aggregate scalars (no per-client entry,
    nothing keyed by or naming a node), ``privacy_ledger.json`` (client-level DP; local-DP
    clients re-keyed by anonymous index) and, for record-level DP-SGD,
    ``record_level_epsilon.json`` (each institution's ε, by anonymous index).

What is read: only a whitelist of run-directory files (:data:`RUN_FILES`), never the
client-state directory or anything else a run leaves. What is never written: client
updates, pre-noise aggregates, per-client metrics, node ids, the run key, key material.

An export is refused (:class:`ExportRefused`, naming the reason and the fix) when the
run did not end as ``completed`` or ``degraded`` (a ``failed`` run's model is not one its
clients trained), no round of ``metrics.jsonl`` updated the model, its summary is
missing or invalid, the model file is not the one the run released (file SHA-256 or
content digest differs from ``summary.json``), the config does not hash to the run's
config hash, the audit log is broken or truncated behind the summary's anchor, the run
claims DP but its evidence is missing or inconsistent (client-level: ledger missing,
unparsable, or its ε differs from the summary's; record-level: no ε reported), or the
output directory is not empty (without ``overwrite``). A run without any DP exports,
but its card says prominently that the model carries no differential-privacy guarantee.
A public export of a run marked "not for release" (DP noise or the sampling its ε
relies on drawn from generators seeded by the config, ``privacy.secure_mode=false``)
is refused; its restricted export says "not for release" and why on the card.

Where each part lives
---------------------
:mod:`fl_app.release.evidence`          reading and checking a run directory
:mod:`fl_app.release.privacy_evidence`  the run's DP claims against its ledger
:mod:`fl_app.release.card`              the model card (JSON and Markdown)
:mod:`fl_app.release.caveats`           threat model and "not protected", in words
:mod:`fl_app.release.redact`            the restricted tier's anonymised files, leak guards
:mod:`fl_app.release.export`            :func:`export_run`: checks, then writes
:mod:`fl_app.release.report`            ``fl-app report``: a sweep's table and plots

Trust assumptions: the run directory was written by fl-app and is checked for internal
consistency (hashes, ledger, audit chain), not against an attacker who can rewrite all
of it consistently; the audit log's external anchors (signed heads) are what protect
against that (``fl-app audit verify``). The card's ε is the accountant's figure for this
run alone.
"""

from fl_app.release.card import CARD_VERSION, Tier, render_card_markdown
from fl_app.release.evidence import RUN_FILES, ExportRefused
from fl_app.release.export import EXPORT_FILES, ExportResult, export_run

__all__ = [
    "CARD_VERSION",
    "EXPORT_FILES",
    "RUN_FILES",
    "ExportRefused",
    "ExportResult",
    "Tier",
    "export_run",
    "render_card_markdown",
]
