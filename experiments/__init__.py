"""Comparison experiments for lossbalance strategies.

    python -m experiments compare                      # the small default comparison
    python -m experiments compare --benchmark clfreg --strategies fixed,pcgrad \\
        --seeds 5 --out runs/clfreg

See `experiments.benchmarks` for the benchmarks and how to register your own.
"""
