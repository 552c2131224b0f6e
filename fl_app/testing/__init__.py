"""Test tools: adversarial servers and a SecAgg test client over the in-process grid.

The grid itself is production code (the ``runtime.backend=inprocess`` simulation
backend) and lives in :mod:`fl_app.runtime.inprocess`, with its fault injection (drop
rules, message hooks) in :mod:`fl_app.runtime.faults`; tests import it from there.
"""
