"""fl-app's benchmark suite: one command, one Markdown document.

``python -m benchmarks`` (or ``make bench``) runs every section in its own child
process within one time budget and writes one table per section (see
:mod:`benchmarks.runner`). A section is a module ``benchmarks/<name>.py`` exposing
``run(quick: bool) -> Section``:

``dpsgd``           DP-SGD step time and peak memory vs the non-private step.
``secagg``          fl-app's secure aggregation vs plain FedAvg vs Flower's legacy SecAgg+.
``distributed_dp``  distributed-DP overhead (placeholder until it is built).
``accounting``      time to compute ε and its agreement with dp-accounting's PLD.
``simulation``      seconds per round and memory at 10, 100 and 1,000 clients.
``gpu``             on CUDA only ("skipped: no GPU" elsewhere): DP-SGD vs plain step per
                    grad-sample mode (1M CNN, ResNet-18), peak device memory, the CPU
                    keystream noise's cost, clients per second in simulation.

The sections reuse ``scripts/bench_*.py`` (loaded by :mod:`benchmarks.reuse`) and
fl-app's own code; they add pairing, repeats and formatting, not measurements of
their own.
"""

__all__: list[str] = []
