"""tf.distribute: N replicas make the same updates as one device on the same global batch.

Each check runs in fresh processes: MirroredStrategy needs the CPU split into two logical
devices before TensorFlow starts (tests/distributed_check.py), and MultiWorkerMirroredStrategy
two worker processes with TF_CONFIG on 127.0.0.1 (experiments/distributed_example.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _environment():
    root = str(HERE.parent)
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1",
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


# Loss-level strategies with learned weights, state and a post-step update, and every
# gradient family at both levels: Gramian solvers (MGDA's XLA-compiled), random task orders
# and drop masks, K x P state and a non-linear transform (DB-MTL's log), learned scales
# (IMTL), GradNorm's own optimizer, the vectorised parameter level.
MIRRORED_RUNS = [
    {"strategy": "uncertainty"},
    {"strategy": "dwa", "epochs": 3},
    {"strategy": "famo"},
    {"strategy": "gradnorm"},
    {"strategy": "mean"},  # linear in the gradients
    {"strategy": "pcgrad"},
    {"strategy": "cagrad"},
    {"strategy": "nash_mtl"},
    {"strategy": "imtl"},
    {"strategy": "db_mtl"},
    {"strategy": "graddrop"},
    {"strategy": "modo"},  # two independent halves of each replica's rows
    {"strategy": "sdmgrad"},
    {"strategy": "mgda", "vectorize": True},
    {"strategy": "nash_mtl", "grouping": "variable"},  # a state copy per group
    {"strategy": "db_mtl", "grouping": "variable"},  # K x P_g state per group
    {"strategy": "modo", "grouping": "variable"},  # the halves' A_g per group
    {"strategy": "mean", "gradients": "representation"},
    {"strategy": "mgda", "gradients": "representation"},
    {"strategy": "nash_mtl", "gradients": "representation"},
    {"strategy": "graddrop", "gradients": "representation"},
    {"strategy": "output_balancer", "gradients": "representation"},  # norms of global z
    {"strategy": {"name": "output_balancer", "per_batch_item": True},  # of every row of z
     "gradients": "representation"},
    # a NaN target on one replica only (its local loss alone is NaN): all replicas skip
    {"strategy": "uncertainty", "nonfinite": "skip", "poison": True},
]


def test_mirrored_strategy_matches_one_device():
    """Two replicas reach the weights, strategy state and logs of one device (1e-5), and
    hold the same values on both. The runs are split over two processes run side by side
    (most of the time is tracing, one core each)."""
    halves = [MIRRORED_RUNS[0::2], MIRRORED_RUNS[1::2]]
    processes = [subprocess.Popen(
        [sys.executable, str(HERE / "distributed_check.py"), json.dumps(runs)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment())
        for runs in halves]
    try:
        outputs = [p.communicate(timeout=480) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for runs, p, (stdout, stderr) in zip(halves, processes, outputs):
        assert p.returncode == 0, stderr[-3000:]
        line = next(l for l in stdout.splitlines() if l.startswith("RESULT"))
        for run, gaps in zip(runs, json.loads(line[len("RESULT"):])):
            for what, gap in gaps.items():
                assert gap < 1e-5, (run, what, gap)


def test_multi_worker_example_matches_one_process(tmp_path):
    """experiments/distributed_example.py: two worker processes (MultiWorkerMirroredStrategy,
    one replica each, TF_CONFIG on 127.0.0.1) reach the weights of one process training on
    the same global batches, with Nash-MTL on the all-reduced per-task gradients."""
    from experiments import distributed_example as example

    out = tmp_path / "weights.npz"
    settings = dict(strategy="nash_mtl", samples=64, global_batch=16, epochs=2)
    example.main([f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
                 + [f"--save={out}"])
    model = example.make_model(settings["strategy"])
    x, y = example.make_data(settings["samples"])
    model.fit(x, y, batch_size=settings["global_batch"], epochs=settings["epochs"],
              verbose=0, shuffle=False)
    saved = np.load(out)
    for i, weight in enumerate(model.get_weights()):
        np.testing.assert_allclose(saved[f"arr_{i}"], weight, atol=1e-5, err_msg=f"weight {i}")
