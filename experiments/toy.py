"""The two-objective toy problem of the CAGrad, Nash-MTL and FAMO papers.

    f1 = log(max(|0.5(-x1-7) - tanh(-x2)|, 5e-6)) + 6
    f2 = log(max(|0.5(-x1+3) + tanh(-x2) + 2|, 5e-6)) + 6
    g1 = ((-x1+7)^2 + 0.1(-x2-8)^2)/10 - 20,   g2 = ((-x1-7)^2 + 0.1(-x2-8)^2)/10 - 20
    c1 = max(tanh(x2/2), 0),                    c2 = max(tanh(-x2/2), 0)
    L1 = 0.1 (c1 f1 + c2 g1)   (task 1 scaled by 0.1),   L2 = c1 f2 + c2 g2

The "model" is the point x = (x1, x2): a `BalancedModel` whose only variable is x, held by a
layer, with one output per task whose value is that task's loss (the compiled loss of each
output is the identity). Every strategy therefore runs through `BalancedModel.train_step`
exactly as on a network, with x as the shared parameters. Each start is trained with Adam
(learning rate 1e-3) for 35k steps by default; `strategy.on_epoch_end` is called every
`STEPS_PER_EPOCH` steps, for epoch-level strategies (DWA).

Judging "reached the Pareto set": the papers give the set as x2 = -8.3552, x1 in [-7, 7],
which is only approximate (the valley's floor depends on x1). A run has reached it when its
final point is *Pareto stationary* -- the min-norm convex combination of the two task
gradients is small relative to the larger gradient -- in the lower valley (x2 < -8) with
x1 in [-7, 7] (up to `X1_SLACK`, since Adam jitters around the single-task optima x1 = +-7).
The measure is scale-free: the min-norm convex combination of the *normalised* gradients
(`pareto_stationarity`), at most `STATIONARITY_TOL`.

The gates' subgradient at x2 = 0: `tf.maximum(tanh(x2/2), 0)` sends the gradient to the
tanh when both arguments are equal, i.e. the gate's derivative is 1/2 at zero, the published
code's convention; so the start (0, 0) moves.
"""

from __future__ import annotations

import time
import warnings

import keras
import numpy as np
import tensorflow as tf

import lossbalance

STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
TASKS = ("task1", "task2")
TASK1_SCALE = 0.1
STEPS = 35_000
QUICK_STEPS = 1
LEARNING_RATE = 1e-3
STEPS_PER_EPOCH = 500
RECORD_EVERY = 50  # trajectory points kept in the run's JSON
# Converged runs end at 1e-5..1.5e-3; at x1 = 0, 0.005 is about 0.2 above the valley floor
# (x2 = -8.2 gives 0.003, x2 = -8.0 gives 0.007); a point still descending gives 0.05..1.
STATIONARITY_TOL = 0.005
ZERO_GRADIENT = 1e-4
X1_SLACK = 0.05


def toy_losses(x):
    """(L1, L2) at x (shape (..., 2)); L1 includes the 0.1 scale. Works on TF or numpy, in
    float32, or in float64 for float64 input."""
    x = tf.convert_to_tensor(x)
    x = tf.cast(x, tf.float64 if x.dtype == tf.float64 else tf.float32)
    x1, x2 = x[..., 0], x[..., 1]
    f1 = tf.math.log(tf.maximum(tf.abs(0.5 * (-x1 - 7.0) - tf.tanh(-x2)), 5e-6)) + 6.0
    f2 = tf.math.log(tf.maximum(tf.abs(0.5 * (-x1 + 3.0) + tf.tanh(-x2) + 2.0), 5e-6)) + 6.0
    g1 = ((-x1 + 7.0) ** 2 + 0.1 * (-x2 - 8.0) ** 2) / 10.0 - 20.0
    g2 = ((-x1 - 7.0) ** 2 + 0.1 * (-x2 - 8.0) ** 2) / 10.0 - 20.0
    c1 = tf.maximum(tf.tanh(x2 / 2.0), 0.0)
    c2 = tf.maximum(tf.tanh(-x2 / 2.0), 0.0)
    return TASK1_SCALE * (c1 * f1 + c2 * g1), c1 * f2 + c2 * g2


def task_gradients(point):
    """The two task gradients (2, 2) at a point, as a numpy array."""
    x = tf.Variable(np.asarray(point, "float32"))
    with tf.GradientTape(persistent=True) as tape:
        l1, l2 = toy_losses(x)
    grads = np.stack([tape.gradient(l1, x).numpy(), tape.gradient(l2, x).numpy()])
    del tape
    return grads


def reference_path(weights_of, start, steps=STEPS, learning_rate=LEARNING_RATE,
                   epsilon=1e-7):
    """A gradient strategy's definition integrated in float64: x <- x - Adam(J(x)^T w),
    with w = `weights_of(J)` for the (2, 2) float64 Jacobian of the task losses (TF ops),
    and Keras' Adam (beta 0.9 / 0.999, `epsilon` 1e-7) as the toy runs use. Returns the
    (steps + 1, 2) path. The reference against which the toy's float32 runs are checked."""

    @tf.function(autograph=False)
    def run(x0):
        def step(t, x, m, v, path):
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(x)
                l1, l2 = toy_losses(x)
            jacobian = tf.stack([tape.gradient(l1, x), tape.gradient(l2, x)])
            g = tf.linalg.matvec(jacobian, weights_of(jacobian), transpose_a=True)
            t = t + 1.0
            m = m + (g - m) * 0.1
            v = v + (g * g - v) * 0.001
            alpha = learning_rate * tf.sqrt(1.0 - 0.999 ** t) / (1.0 - 0.9 ** t)
            x = x - alpha * m / (tf.sqrt(v) + epsilon)
            return t, x, m, v, path.write(tf.cast(t, tf.int32), x)

        zeros = tf.zeros([2], tf.float64)
        path = tf.TensorArray(tf.float64, size=steps + 1).write(0, x0)
        *_, path = tf.while_loop(lambda t, *_: t < steps, step,
                                 (tf.constant(0.0, tf.float64), x0, zeros, zeros, path))
        return path.stack()

    return run(tf.constant(start, tf.float64)).numpy()


def _imtl_g_two_tasks(jacobian):
    """IMTL-G's closed form for two tasks: equal projections <=> w_k ∝ 1 / |g_k|."""
    inverse = 1.0 / tf.norm(jacobian, axis=1)
    return inverse / tf.reduce_sum(inverse)


#: Float64 definitions of some strategies on the toy's two tasks, for `reference_path`.
REFERENCE_WEIGHTS = {
    "imtl_g": _imtl_g_two_tasks,
    "mean": lambda jacobian: tf.constant([0.5, 0.5], tf.float64),
}


def compare_with_reference(name, steps=STEPS, starts=STARTS):
    """For every start: the end point of `name` trained by the toy's float32 model, and of
    its float64 definition integrated with the same Adam (`reference_path`)."""
    trainer = _Trainer(name, seed=0, eager=False)
    rows = []
    for start in starts:
        run = trainer.train(start, steps)
        reference = reference_path(REFERENCE_WEIGHTS[name], start, steps)[-1]
        rows.append({"start": tuple(start), "model": np.array(run["final"]),
                     "reference": reference, "model_reached": run["reached"],
                     "reference_reached": reached_pareto_set(reference)})
    return rows


def min_norm_combination(g1, g2):
    """The min-norm point of the segment [g1, g2] and its weight on g1 (closed form)."""
    g1, g2 = np.asarray(g1, float), np.asarray(g2, float)
    diff = g1 - g2
    denom = float(diff @ diff)
    gamma = 1.0 if denom == 0.0 else float(np.clip((g2 - g1) @ g2 / denom, 0.0, 1.0))
    return gamma * g1 + (1.0 - gamma) * g2, gamma


def pareto_stationarity(point) -> float:
    """How far x is from Pareto stationarity, scale-free: the norm of the min-norm convex
    combination of the *normalised* task gradients g_k / ||g_k|| (0 when they point in
    opposite directions, sqrt((1 + cos)/2) in general, 1 when they agree). Normalising makes
    the measure independent of the tasks' scales (task 1's 0.1), as Pareto stationarity
    is. A task whose gradient norm is at most `ZERO_GRADIENT` sits at its own stationary
    point, which is Pareto stationary: 0."""
    g = task_gradients(point).astype(float)
    norms = np.linalg.norm(g, axis=1)
    if norms.min() <= ZERO_GRADIENT:
        return 0.0
    d, _ = min_norm_combination(g[0] / norms[0], g[1] / norms[1])
    return float(np.linalg.norm(d))


def reached_pareto_set(point, tol=STATIONARITY_TOL) -> bool:
    """Pareto stationary (`pareto_stationarity <= tol`), in the lower valley (x2 < -8),
    with x1 in [-7, 7] (up to `X1_SLACK`)."""
    x1, x2 = float(point[0]), float(point[1])
    return bool(x2 < -8.0 and abs(x1) <= 7.0 + X1_SLACK
                and pareto_stationarity(point) <= tol)


class _Point(keras.layers.Layer):
    """Holds x; outputs each task's loss plus its offset (one value per batch row)."""

    def __init__(self, start=(0.0, 0.0), offsets=(0.0, 0.0), **kwargs):
        super().__init__(**kwargs)
        self.start = tuple(float(v) for v in start)
        self.offsets = tuple(float(v) for v in offsets)
        self.x = self.add_weight(shape=(2,), name="x",
                                 initializer=keras.initializers.Constant(self.start))

    def call(self, inputs):
        l1, l2 = toy_losses(self.x)
        ones = tf.ones_like(inputs[:, :1])
        return ones * (l1 + self.offsets[0]), ones * (l2 + self.offsets[1])


def _identity_loss(y_true, y_pred):
    return tf.reduce_mean(y_pred, axis=-1)


def build_model(start, offsets=(0.0, 0.0)):
    inputs = keras.Input((1,), name="unused")
    point = _Point(start, offsets, name="point")
    l1, l2 = point(inputs)
    return lossbalance.BalancedModel(inputs, {
        TASKS[0]: keras.layers.Identity(name=TASKS[0])(l1),
        TASKS[1]: keras.layers.Identity(name=TASKS[1])(l2),
    })


class _Trainer:
    """One model per strategy, reused for every start: between starts x, the optimizer's
    and the strategy's variables go back to their initial values (so each start is trained
    as by a fresh model, and the training step is traced once). If a step creates new
    variables (a lazily built state), the next start gets a fresh model instead."""

    def __init__(self, strategy, seed, eager, offsets=(0.0, 0.0)):
        self.strategy_spec, self.seed, self.eager = strategy, seed, eager
        self.offsets = offsets
        self._build()

    def _build(self):
        keras.utils.set_random_seed(self.seed)
        model = build_model(STARTS[0], self.offsets)
        model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
                      loss={task: _identity_loss for task in TASKS},
                      strategy=lossbalance.strategies.get(self.strategy_spec),
                      run_eagerly=self.eager)
        if model.strategy.needs_parameter_state:
            model.strategy.build_parameter_state(2)  # x is the only (shared) parameter
        model.optimizer.build(model.trainable_variables)
        self.model, self.x = model, model.get_layer("point").x
        self.state = self._variables()
        self.initial = [v.numpy() for v in self.state]
        zeros = tf.zeros((1, 1))
        data = (zeros, {task: zeros for task in TASKS})

        def one_step(_):
            model.train_step(data)
            return tf.identity(self.x.value)

        if self.eager:
            self.run_chunk = lambda n: tf.stack([one_step(i) for i in range(n)])
        else:
            @tf.function(autograph=False, reduce_retracing=True)
            def run_chunk(n):
                return tf.map_fn(one_step, tf.range(n), fn_output_signature=tf.float32,
                                 parallel_iterations=1)

            self.run_chunk = lambda n: run_chunk(tf.constant(n))
        self.fresh = True

    def _variables(self):
        seen, out = set(), []
        for v in [*self.model.variables, *self.model.optimizer.variables,
                  *self.model.strategy.variables]:
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
        return out

    def _reset(self, start):
        if not self.fresh:
            if len(self._variables()) != len(self.state):
                self._build()
            else:
                for v, value in zip(self.state, self.initial):
                    v.assign(value)
                self.model.reset_metrics()
        self.x.assign(np.asarray(start, "float32"))
        self.fresh = False

    def train(self, start, steps):
        self._reset(start)
        path = [np.asarray(start, "float32")[None]]
        times = []
        done, epoch = 0, 0
        while done < steps:
            n = min(STEPS_PER_EPOCH, steps - done)
            began = time.perf_counter()
            points = self.run_chunk(n).numpy()
            if epoch > 0 or self.eager:
                times.append((time.perf_counter() - began) / n)
            path.append(points)
            self.model.strategy.on_epoch_end(epoch)
            done, epoch = done + n, epoch + 1
        path = np.concatenate(path)
        final = path[-1]
        l1, l2 = (float(v) for v in toy_losses(final))
        return {
            "start": list(start),
            "final": [float(v) for v in final],
            "losses": [l1, l2],
            "stationarity": pareto_stationarity(final),
            "reached": reached_pareto_set(final),
            "finite": bool(np.all(np.isfinite(path))),
            "trajectory": path[::RECORD_EVERY].tolist() + [final.tolist()],
            "step_time_s": float(np.median(times)) if times else float("nan"),
        }


class ToyBenchmark:
    """The toy problem as a runner benchmark: one run = one strategy from every start.

    The losses are negative in most of the plane (L2 reaches -20), so strategies that take
    their logarithm (scale-invariant, STCH, ...) produce NaN from those starts: an honest
    result, shown as such. `offsets` adds constants to the losses the strategies see
    (`toy_shifted` uses (2.5, 21), making both positive); the gradients, the Pareto set and
    the reported losses do not change.
    """

    description = __doc__.strip().splitlines()[0]
    task_names = TASKS
    default_seeds = 1
    custom = True

    def __init__(self, starts=STARTS, steps=STEPS, offsets=(0.0, 0.0), name="toy"):
        self.starts = tuple(tuple(s) for s in starts)
        self.steps = steps
        self.offsets = tuple(offsets)
        self.name = name

    def run(self, strategy, seed, *, quick=False, steps=None, verbose=0, eager=None, **_):
        """Train from every start; `quick`: `QUICK_STEPS` steps, eagerly."""
        steps = steps or (QUICK_STEPS if quick else self.steps)
        eager = quick if eager is None else eager
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = _Trainer(strategy, seed, eager=eager, offsets=self.offsets)
            starts = [trainer.train(start, steps) for start in self.starts]
        reached = sum(s["reached"] for s in starts)
        return {
            "steps": steps,
            "quick": quick,
            "starts": starts,
            "test": {
                "reached": float(reached),
                "task1_final": float(np.mean([s["losses"][0] for s in starts])),
                "task2_final": float(np.mean([s["losses"][1] for s in starts])),
            },
            "step_time_s": float(np.nanmedian([s["step_time_s"] for s in starts])),
        }

    # -- report --------------------------------------------------------------------------

    def write_report(self, results, out):
        """`results.md`/`results.csv` (which starts reach the Pareto set) and
        `trajectories.png`; returns the written paths."""
        import csv

        by_strategy = {}
        for result in results:
            by_strategy.setdefault(result["strategy"], []).append(result)
        header = ["strategy", "seed"] + [f"({s[0]:g}, {s[1]:g})" for s in self.starts] + [
            "reached", "step (ms)"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        rows = []
        for strategy, runs in by_strategy.items():
            for run in runs:
                cells = [f"`{strategy}`", str(run["seed"])]
                for s in run["starts"]:
                    mark = "yes" if s["reached"] else ("no" if s["finite"] else "NaN")
                    cells.append(f"{mark} ({s['final'][0]:.2f}, {s['final'][1]:.2f})")
                count = sum(s["reached"] for s in run["starts"])
                cells += [f"{count}/{len(run['starts'])}", f"{1000 * run['step_time_s']:.3f}"]
                lines.append("| " + " | ".join(cells) + " |")
                rows.append({"strategy": strategy, "seed": run["seed"], "reached": count,
                             **{f"start{i}_reached": s["reached"]
                                for i, s in enumerate(run["starts"])},
                             **{f"start{i}_x": s["final"] for i, s in enumerate(run["starts"])},
                             "step_ms": 1000 * run["step_time_s"]})
        steps = results[0]["steps"]
        offsets = "" if not any(self.offsets) else (
            f" The strategies saw the losses plus {self.offsets}.")
        text = (f"Toy problem, Adam lr {LEARNING_RATE:g}, {steps} steps from each start: does the "
                "final point (x1, x2) reach the Pareto set (Pareto stationary, x2 < -8, "
                "x1 in [-7, 7])? NaN: the run diverged (e.g. the log of a negative loss)."
                + offsets + "\n\n" + "\n".join(lines) + "\n")
        (out / "results.md").write_text(text)
        with open(out / "results.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return [out / "results.md", out / "results.csv",
                self.plot_trajectories(by_strategy, out / "trajectories.png")]

    def plot_trajectories(self, by_strategy, path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid = np.linspace(-10, 10, 161, dtype="float32")
        xx, yy = np.meshgrid(grid, grid)
        l1, l2 = toy_losses(np.stack([xx, yy], axis=-1))
        landscape = (l1.numpy() + l2.numpy()) / 2
        names = list(by_strategy)
        cols = min(4, len(names))
        rows = -(-len(names) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
        colors = plt.cm.tab10(np.arange(len(self.starts)))
        for ax, name in zip(axes.flat, names):
            ax.imshow(landscape, extent=(-10, 10, -10, 10), origin="lower", cmap="Greys",
                      alpha=0.6, aspect="auto")
            ax.plot([-7, 7], [-8.3552, -8.3552], color="tab:red", lw=2, alpha=0.7)
            run = by_strategy[name][0]
            for color, s in zip(colors, run["starts"]):
                path_ = np.asarray(s["trajectory"])
                ax.plot(path_[:, 0], path_[:, 1], color=color, lw=1.5)
                ax.plot(*s["start"], "o", color=color, ms=4)
                ax.plot(*s["final"], "*" if s["reached"] else "x", color=color, ms=8)
            count = sum(s["reached"] for s in run["starts"])
            ax.set_title(f"{name}: {count}/{len(run['starts'])} reached", fontsize=9)
            ax.set_xlim(-10, 10)
            ax.set_ylim(-10, 10)
        for ax in axes.flat[len(names):]:
            ax.axis("off")
        height = fig.get_figheight()
        fig.suptitle("Toy problem: trajectories on the mean loss (red: Pareto set; "
                     "* reached, x not)", fontsize=10, y=1 - 0.12 / height)
        fig.subplots_adjust(left=0.05, right=0.98, bottom=0.45 / height, top=1 - 0.75 / height,
                            wspace=0.25, hspace=0.35)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def main(argv=None):
    """`python -m experiments.toy --reference imtl_g [--steps N]`: the model's end points
    against the float64 definition's, from every start."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m experiments.toy")
    parser.add_argument("--reference", choices=sorted(REFERENCE_WEIGHTS), default="imtl_g")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    print(f"{args.reference}, {args.steps} Adam steps: end points (reached the Pareto set?)")
    print("| start | float32 model | float64 definition | distance |")
    print("|---|---|---|---|")
    for row in compare_with_reference(args.reference, args.steps):
        model, reference = row["model"], row["reference"]
        print(f"| {row['start']} | ({model[0]:.3f}, {model[1]:.3f}) {row['model_reached']} "
              f"| ({reference[0]:.3f}, {reference[1]:.3f}) {row['reference_reached']} "
              f"| {np.abs(model - reference).max():.3f} |")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
