"""The α–β–γ cost model: what every all-reduce costs, fitted to measurements, at any scale.

Pure functions, no MPI (importing it starts nothing), read in this order:

    params.py       a cluster's shape (Topology) and its links' costs (Calibration)
    algorithms.py   each algorithm's predicted time, as parameter x coefficient Terms
    counts.py       what each algorithm really sends, per rank (checked against the code)
    fit.py          least squares from the benchmarks' JSON to a Calibration
    simulate.py     training steps at scale: compute + communication + waiting for the slowest
    cli.py          ringsync-model fit | check | predict | train

docs/scaling.md shows what it says, and how well it predicts.
"""
