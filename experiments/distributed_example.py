"""Data-parallel training of a BalancedModel in two processes (MultiWorkerMirroredStrategy).

    python experiments/distributed_example.py
    python experiments/distributed_example.py --strategy mgda --gradients representation

The command starts the workers itself: this same script, once per worker, on 127.0.0.1
ports, each with its `TF_CONFIG`. On a real cluster, run `--worker` on every machine with
TF_CONFIG naming them all. Each worker feeds its share of every global batch, so together
they train on the same global batches as one process would, and (see the README's
"Distributed training") reach the same weights: the strategy combines the global per-task
losses, gradients or Gramians, reduced across workers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package


def make_data(samples, seed=0):
    """A classifier and a regressor on the same inputs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 8)).astype("float32")
    y = {"cls": (x[:, 0] + x[:, 1] > 0).astype("int32"),
         "reg": (x[:, 2:3] * 2.0 - x[:, 3:4]).astype("float32")}
    return x, y


def make_model(strategy="pcgrad", gradients="parameters", seed=0):
    """A small trunk with two heads, compiled with `strategy` (a lossbalance name)."""
    import keras
    import lossbalance

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8,))
    h = keras.layers.Dense(32, activation="relu", name="trunk")(inputs)
    outputs = {"cls": keras.layers.Dense(2, name="cls")(h),
               "reg": keras.layers.Dense(1, name="reg")(h)}
    model = lossbalance.BalancedModel(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), strategy=strategy,
                  gradients=gradients,
                  loss={"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        "reg": "mse"})
    return model


def worker_batches(distribution, x, y, global_batch):
    """Each worker's share of every global batch, in order (rows [w*b, (w+1)*b) of each
    global batch of size b*N for worker w of N)."""
    import tensorflow as tf

    def dataset(context):
        workers, index = context.num_input_pipelines, context.input_pipeline_id
        local = global_batch // workers
        rows = np.concatenate([np.arange(start + index * local, start + (index + 1) * local)
                               for start in range(0, len(x) - global_batch + 1,
                                                  global_batch)])
        return tf.data.Dataset.from_tensor_slices(
            (x[rows], {k: v[rows] for k, v in y.items()})).batch(local)

    return distribution.distribute_datasets_from_function(dataset)


def run_worker(args):
    import tensorflow as tf

    distribution = tf.distribute.MultiWorkerMirroredStrategy()
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    with distribution.scope():
        model = make_model(args.strategy, args.gradients)
    x, y = make_data(args.samples)
    history = model.fit(worker_batches(distribution, x, y, args.global_batch),
                        epochs=args.epochs, verbose=0).history
    if index == 0:
        print(f"{args.strategy} ({model.gradient_level or 'loss'} level), "
              f"{distribution.num_replicas_in_sync} workers: " + ", ".join(
                  f"{k} {v[-1]:.4f}" for k, v in history.items()))
        if args.save:
            np.savez(args.save, *model.get_weights())


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch(args, timeout=300):
    """Start `args.workers` local workers running this script; return their outputs."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(args.workers)]}
    command = [sys.executable, os.path.abspath(__file__), "--worker"] + [
        f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
        if key not in ("worker", "workers") and value is not None]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    workers = [subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**environment, "TF_CONFIG": json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}})})
        for index in range(args.workers)]
    try:
        outputs = [worker.communicate(timeout=timeout) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for index, (worker, (_, stderr)) in enumerate(zip(workers, outputs)):
        if worker.returncode != 0:
            raise RuntimeError(f"worker {index} failed:\n{stderr[-3000:]}")
    return [out for out, _ in outputs]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="pcgrad")
    parser.add_argument("--gradients", default="parameters",
                        choices=["parameters", "representation", "auto"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--save", help="worker 0 saves the final weights here (.npz)")
    parser.add_argument("--worker", action="store_true",
                        help="run as one worker (TF_CONFIG set); default: start the workers")
    args = parser.parse_args(argv)
    if args.global_batch % args.workers:
        parser.error("--global-batch must be a multiple of --workers")
    if args.worker:
        run_worker(args)
    else:
        print("".join(launch(args)), end="")


if __name__ == "__main__":
    main()
