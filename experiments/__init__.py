"""Comparison experiments for lossbalance strategies.

    python -m experiments compare                      # the small default comparison
    python -m experiments compare --benchmark multidigits --strategies fixed,pcgrad,mgda \\
        --seeds 5 --out runs/multidigits
    python -m experiments compare --benchmark toy --strategies all
    python -m experiments compare --quick --strategies all    # a smoke test

Modules: `benchmarks` (the benchmarks and `register_benchmark`), `toy` (the two-objective
toy problem), `runner` (runs, single-task baselines, the linear-scalarisation sweep,
resuming), `report` (delta-m%, confidence intervals, tables and plots).
"""
