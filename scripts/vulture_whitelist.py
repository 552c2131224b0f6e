# ruff: noqa
"""Names vulture reports as unused that are used, by a framework or a protocol.

``make deadcode`` runs ``vulture fl_app strategies tests scripts benchmarks`` with this
file. Each entry says who calls the name; anything vulture finds that is not here is
dead code to remove (or, when a caller exists that vulture cannot see, to add here
with its reason).
"""

# Flower calls the function a ServerApp registers with @server.main()
# (fl_app/server/app.py: make_server_app).
_main

# Opacus' DPOptimizer.step() calls add_noise(); _KeystreamNoise overrides it so the
# noise comes from the client's CSPRNG keystream (fl_app/privacy/dpsgd_opacus.py).
_.add_noise
# Assigning __class__ swaps an existing Opacus optimizer for its keystream-noise
# subclass in place (fl_app/privacy/dpsgd_opacus.py: _use_keystream_noise).
_.__class__

# The context-manager protocol fixes __exit__'s signature (fl_app/runtime/inprocess.py).
exc_type
tb

# pytest runs autouse fixtures by name (tests/conftest.py, tests/test_data.py,
# tests/test_privacy_audit.py).
_absl_handler_off_the_capture
_fresh_cache
_one_torch_thread

# Flower's legacy NumPyClient.fit, called by Flower's SecAgg+ baseline
# (benchmarks/legacy_secaggplus.py).
_.fit

# Read reflectively: fl_app.server.checkpoint.strategy_state walks a strategy's attributes
# (tests/test_checkpoint_units.py feeds it these), and fl_app.release.report writes each
# column of its row by name (the `rounds_planned` column).
_.mixed
_.int_keys
rounds_planned
