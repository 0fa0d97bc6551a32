"""Benchmarks for dotresize: ``python -m benchmarks <part>`` (see benchmarks/README.md).

OpenMP threads that spin while waiting make small LAPACK calls (QR, SVD) 10-100x slower on a machine with more
runnable threads than cores (measured here: a 576x456 float64 ``svdvals`` took 2-16 s with 2 spinning threads
and 0.04-0.12 s with passive waiting). The benchmarks therefore default to ``OMP_WAIT_POLICY=PASSIVE`` (it has
to be set before torch is imported; an explicit setting is kept) and record the value with every result.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
