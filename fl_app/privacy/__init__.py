"""Differential privacy for fl-app clients and servers.

:mod:`fl_app.privacy.history` holds the record-level privacy ledger
(:class:`~fl_app.privacy.history.PrivacyHistory` of ``DpSgdEvent``),
:mod:`fl_app.privacy.accounting` the accountants that turn it into ε and
:mod:`fl_app.privacy.calibration` the noise for a budget.

The package itself imports nothing: importing one light module of it (the SecAgg
server's sampler imports :mod:`fl_app.privacy.round_event`) must not load Opacus and
torch, which the accountants import (a ClientApp process runs each key-exchange stage,
and torch costs seconds there: ``tests/test_secagg_app.py``). Import from the modules.
"""
