"""The server side of a run: the ServerApp, the run directory and its checkpoints.

* :mod:`fl_app.server.app`: the Flower ServerApp (``flwr run`` and simulation) and
  :func:`~fl_app.server.app.run_experiment`, which puts a run together;
* :mod:`fl_app.server.rundir`: the run directory's writers (manifest, metrics,
  hash-chained audit trail, summary) and the run's outcome;
* :mod:`fl_app.server.checkpoint`: sealed per-round checkpoints, resume and rollback.

Nothing is imported here: :mod:`fl_app.release` and the CLI read a run directory
through :mod:`fl_app.server.rundir` without loading Flower or the strategies
(docs/architecture.md, "Server").
"""
