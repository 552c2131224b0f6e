"""How a simulated federation runs (docs/architecture.md, "Simulation runtime").

* :mod:`fl_app.runtime.simulation`: runs a validated experiment with its configured
  backend (Flower's Ray simulation engine, or the in-process grid).
* :mod:`fl_app.runtime.inprocess`: :class:`~fl_app.runtime.inprocess.InProcessGrid`, a
  synchronous in-process SuperLink plus SuperNodes that runs the real ClientApp; also
  the tests' fault injection. Its parts: :mod:`~fl_app.runtime.nodes` (virtual nodes,
  task identity, running the ClientApp), :mod:`~fl_app.runtime.link` (the SuperLink's
  checks and reply queue), :mod:`~fl_app.runtime.faults` (lost replies) and
  :mod:`~fl_app.runtime.copies` (copies through Flower's serialization).

Nothing is imported here, so that importing the Ray path does not import the grid.
"""
