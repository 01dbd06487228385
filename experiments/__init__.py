"""Comparison experiments for lossbalance strategies.

    python -m experiments compare                      # the small default comparison
    python -m experiments compare --benchmark multidigits --strategies fixed,pcgrad,mgda \\
        --seeds 5 --out runs/multidigits
    python -m experiments compare --benchmark toy --strategies all
    python -m experiments compare --quick --strategies all    # a smoke test
    python -m experiments leaderboard                  # every strategy, every benchmark

Modules: `benchmarks` (the benchmarks and `register_benchmark`), `toy` (the two-objective
toy problem), `runner` (runs, single-task baselines, the linear-scalarisation sweep,
resuming), `report` (delta-m%, confidence intervals, the verdict against the tuned LS,
tables and plots), `leaderboard` (every strategy on every benchmark), `console` (the quiet
command line).
"""
