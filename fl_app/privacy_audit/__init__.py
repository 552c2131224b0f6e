"""Empirical privacy audit of a run: attacks on what the release and the server expose.

``fl-app audit-privacy <run dir> [--out DIR] [--quick]`` (:mod:`fl_app.cli.audit_privacy`)
runs membership inference (loss threshold; LiRA with shadow models) on the released
model and gradient inversion on one client's update, and prints every number next to
the run's theoretical ε. See :mod:`fl_app.privacy_audit.run` for what is written and
which client data appears in it (only the inversion demo's true records, in a plot).

Modules: :mod:`~fl_app.privacy_audit.metrics` (pure scoring math),
:mod:`~fl_app.privacy_audit.membership`, :mod:`~fl_app.privacy_audit.inversion`,
:mod:`~fl_app.privacy_audit.run` (run-directory driver), :mod:`~fl_app.privacy_audit.report`
(plots and the printed summary).
"""

from fl_app.privacy_audit.run import AuditSettings, audit_run, audit_run_dir

__all__ = ["AuditSettings", "audit_run", "audit_run_dir"]
