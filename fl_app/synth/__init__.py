"""DP synthetic surrogates of a site's data (``fl-app synth``, docs/synthetic-data.md).

A data custodian makes a differentially private synthetic copy of its site's rows
with smartnoise-synth's MST or AIM (:mod:`~fl_app.synth.mechanism`), on a table whose
domain comes from the config (:mod:`~fl_app.synth.table`); the release is recorded in
the site's budget ledger before the synthesizer runs (:mod:`~fl_app.synth.accounting`)
and described by a card that pins the file's hash (:mod:`~fl_app.synth.card`);
:mod:`~fl_app.synth.run` does them in that order. ``dataset=synthetic``
(:mod:`fl_app.data.synthetic`) runs an experiment on the surrogate, and
:mod:`~fl_app.synth.compare` measures how far its result carries to the real data.
"""
