"""Benchmarks and research harnesses, run from the repository root; not part of the installed package.

- ``python -m benchmarks.bench``: performance ratios (``make bench``; docs/performance.md).
- ``python -m benchmarks.mrc_agreement compare|agree``: the linear MRC estimator against the exact protocol.
- ``python -m benchmarks.mrc_sensitivity``: how an MRC protocol change moves the ranking (docs/fidelity.md).
"""
