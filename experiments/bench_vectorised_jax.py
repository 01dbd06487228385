"""Per-task trunk gradients on a GPU: a loop of K backward passes against one vectorised pass.

    python experiments/bench_vectorised_jax.py [--trunks mlp conv] [--tasks 2 4 8 16 32]
        [--rounds 10] [--steps 20] [--warmup 3] [--out results.jsonl] [--quick]
        [--check-all | --no-check]

Issue #5 asks whether the exact per-task gradients of the shared parameters get cheaper on a
GPU when the K backward passes through the trunk are batched: the K cotangents dL_k/dz of
the shared representation z vectorised through one trunk VJP, instead of K separate VJPs.
On this project's CPU they do not (README, "Performance"). The GPU machine available for
the measurement has JAX with CUDA but no TensorFlow (its wheel and CUDA libraries do not fit
the transfer to that machine), so this script rebuilds the networks of
`experiments/bench_gradient_strategies.py` in plain JAX and times, each step compiled with
`jax.jit`:

* plain: one gradient of sum_k L_k and an SGD update (every ratio divides by its time);
* loop: the dL_k/dz through the heads, then K separate VJPs of the trunk (cotangent dL_k/dz),
  the Gramian G = J J^T of the K trunk gradients, weights w from a trivial rule (w_k
  proportional to 1 / G_kk, summing to K; no solver), and the update J^T w;
* vmap: as loop, with the K trunk VJPs as one `jax.vmap` over the cotangents;
* rep: the representation level: the Gramian of the dL_k/dz, the same rule, and one trunk
  VJP with cotangent sum_k w_k dL_k/dz.

Each head's parameters receive that head's own gradient in every method. Networks: "mlp",
64 inputs, three Dense(256, relu), batch 256; "conv", 32x32x3 inputs, Conv(16) ->
Conv(32, stride 2) -> Conv(32, stride 2) -> global average pooling -> Dense(128, relu),
batch 64; K heads Dense(32, relu) -> Dense(4) (4-class cross-entropy) or Dense(1) (MSE),
alternating (the heads of each kind are stacked and vmapped).

Timing: after `--warmup` calls (the first one compiles), `--rounds` rounds, each running
`--steps` consecutive steps of every method in a rotating order, the clock stopped after
`block_until_ready`; the table gives median step times as ratios to plain, with the
quartiles of the per-round ratios. Before timing the first K of each trunk, the script
checks (at "highest" matmul precision) that loop and vmap give the same update and that the
K trunk gradients sum to the trunk gradient of sum_k L_k, and prints both relative errors
(`--check-all`: at every K; `--no-check`: never; each check is one more compilation). With
`--out`, one JSON line per (trunk, K) is appended to that file as soon as it is measured.
The full grid should take 2-3 minutes on an H100/H200, most of it compilation (an estimate
from CPU compile times); `--quick` (mlp, K = 3, 3 rounds of 3 steps) is a smoke test that
runs on a CPU in well under a minute. Needs only `jax` and `numpy`; from the repository root:
`python experiments/bench_vectorised_jax.py --out bench_vectorised_jax.jsonl`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time

try:
    import jax
    import jax.numpy as jnp
except ImportError:  # this script is the one place in the project that uses JAX
    sys.exit("bench_vectorised_jax.py needs JAX: `pip install jax` (CPU) or "
             "`pip install 'jax[cuda12]'` (NVIDIA GPU). It needs neither TensorFlow nor "
             "lossbalance.")
import numpy as np

METHODS = ("plain", "loop", "vmap", "rep")
TRUNKS = {"mlp": {"batch": 256, "input": (64,), "z": 256},
          "conv": {"batch": 64, "input": (32, 32, 3), "z": 128}}
CLASSES, HIDDEN, LEARNING_RATE = 4, 32, 1e-3


# ----------------------------------------------------------------------------- networks

def _glorot(key, shape, fan_in, fan_out):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, jnp.float32, -limit, limit)


def _dense(key, n_in, n_out, stack=()):
    return {"w": _glorot(key, (*stack, n_in, n_out), n_in, n_out),
            "b": jnp.zeros((*stack, n_out), jnp.float32)}


def _conv(key, n_in, n_out, size=3):
    fan_in, fan_out = size * size * n_in, size * size * n_out
    return {"w": _glorot(key, (size, size, n_in, n_out), fan_in, fan_out),
            "b": jnp.zeros((n_out,), jnp.float32)}


def init_params(trunk, num_tasks, seed=0):
    """{"trunk": ..., "ce": stacked heads, "mse": stacked heads} (Keras' default init)."""
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    if trunk == "mlp":
        trunk_params = [_dense(next(keys), 64, 256), _dense(next(keys), 256, 256),
                        _dense(next(keys), 256, 256)]
    else:
        trunk_params = [_conv(next(keys), 3, 16), _conv(next(keys), 16, 32),
                        _conv(next(keys), 32, 32), _dense(next(keys), 32, 128)]
    dim_z = TRUNKS[trunk]["z"]
    heads = {}
    for kind, count, outputs in (("ce", (num_tasks + 1) // 2, CLASSES),
                                 ("mse", num_tasks // 2, 1)):
        heads[kind] = [_dense(next(keys), dim_z, HIDDEN, (count,)),
                       _dense(next(keys), HIDDEN, outputs, (count,))]
    return {"trunk": trunk_params, **heads}


def trunk_forward(name, params, x):
    """The shared representation z, (batch, dim z)."""
    if name == "mlp":
        for layer in params:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x
    for layer, stride in zip(params[:3], (1, 2, 2)):
        x = jax.lax.conv_general_dilated(x, layer["w"], (stride, stride), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(x + layer["b"])
    x = jnp.mean(x, axis=(1, 2))
    return jax.nn.relu(x @ params[3]["w"] + params[3]["b"])


def _head(layers, z):
    """One head on z: (batch, outputs)."""
    return jax.nn.relu(z @ layers[0]["w"] + layers[0]["b"]) @ layers[1]["w"] + layers[1]["b"]


def _cross_entropy(layers, z, labels):
    log_p = jax.nn.log_softmax(_head(layers, z))
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))


def _mse(layers, z, target):
    return jnp.mean((_head(layers, z)[:, 0] - target) ** 2)


LOSSES = {"ce": _cross_entropy, "mse": _mse}  # heads are stacked by kind, in this order


def task_losses(heads, z, targets):
    """(K,): the cross-entropy tasks, then the MSE tasks."""
    return jnp.concatenate([jax.vmap(LOSSES[kind], (0, None, 0))(heads[kind], z,
                                                                    targets[kind])
                            for kind in LOSSES])


def make_data(trunk, num_tasks, seed=0):
    """One batch: inputs and each task's targets from a random linear signal, as in the TF
    benchmark (quartile classes for cross-entropy tasks, the signal itself for MSE)."""
    rng = np.random.default_rng(seed)
    spec = TRUNKS[trunk]
    x = rng.normal(size=(spec["batch"], *spec["input"])).astype(np.float32)
    flat = x.reshape(len(x), -1)
    signals = flat @ (rng.normal(size=(flat.shape[1], num_tasks)) / np.sqrt(flat.shape[1]))
    count_ce = (num_tasks + 1) // 2
    ce = [np.digitize(s, np.quantile(s, [0.25, 0.5, 0.75])) for s in signals.T[:count_ce]]
    return jnp.asarray(x), {"ce": jnp.asarray(np.array(ce, np.int32)),
                            "mse": jnp.asarray(signals.T[count_ce:].astype(np.float32))}


# ---------------------------------------------------------------------------- the steps

def _weights(gramian):
    """The trivial rule: w_k proportional to 1 / G_kk, summing to K."""
    inverse = 1.0 / jnp.maximum(jnp.diag(gramian), 1e-20)
    return gramian.shape[0] * inverse / jnp.sum(inverse)


def _sgd(params, grads):
    return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)


def _per_task_heads(trunk, params, x, targets):
    """Forward pass; returns (the trunk's VJP, dL_k/dz (K, batch, dim z), the heads' own
    gradients). Each head's gradients (its parameters' and dL_k/dz) come from one pass
    through that head alone, vmapped over the heads of each kind."""
    z, trunk_vjp = jax.vjp(lambda p: trunk_forward(trunk, p, x), params["trunk"])
    head_grads, dz = {}, []
    for kind, loss in LOSSES.items():
        grad = jax.vmap(jax.grad(loss, argnums=(0, 1)), (0, None, 0))
        head_grads[kind], dz_kind = grad(params[kind], z, targets[kind])
        dz.append(dz_kind)
    return trunk_vjp, jnp.concatenate(dz), head_grads


def _gramian_and_update(jacobian_leaves):
    """Gramian of the K trunk gradients (leaves with a leading K axis), the rule's weights,
    and the update J^T w, leaf by leaf."""
    flat = [leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree.leaves(jacobian_leaves)]
    gramian = sum(f @ f.T for f in flat)
    w = _weights(gramian)
    return jax.tree.map(lambda leaf: jnp.tensordot(w, leaf, 1), jacobian_leaves)


def trunk_jacobian(trunk, params, x, targets, vectorised):
    """The K per-task trunk gradients (leaves with a leading K axis) and the heads'
    gradients."""
    trunk_vjp, dz, head_grads = _per_task_heads(trunk, params, x, targets)
    if vectorised:
        (jacobian,) = jax.vmap(trunk_vjp)(dz)
    else:
        rows = [trunk_vjp(dz[k])[0] for k in range(dz.shape[0])]
        jacobian = jax.tree.map(lambda *leaves: jnp.stack(leaves), *rows)
    return jacobian, head_grads


def make_steps(trunk):
    """{method: jitted step (params, x, targets) -> updated params}."""

    def plain(params, x, targets):
        def total(p):
            return jnp.sum(task_losses(p, trunk_forward(trunk, p["trunk"], x), targets))
        return _sgd(params, jax.grad(total)(params))

    def parameter_level(vectorised):
        def step(params, x, targets):
            jacobian, head_grads = trunk_jacobian(trunk, params, x, targets, vectorised)
            return _sgd(params, {"trunk": _gramian_and_update(jacobian), **head_grads})
        return step

    def rep(params, x, targets):
        trunk_vjp, dz, head_grads = _per_task_heads(trunk, params, x, targets)
        w = _weights(jnp.einsum("kbd,lbd->kl", dz, dz))
        (trunk_grads,) = trunk_vjp(jnp.tensordot(w, dz, 1))
        return _sgd(params, {"trunk": trunk_grads, **head_grads})

    steps = {"plain": plain, "loop": parameter_level(False), "vmap": parameter_level(True),
             "rep": rep}
    return {name: jax.jit(fn) for name, fn in steps.items()}


def check(trunk, params, x, targets):
    """Relative errors at "highest" matmul precision: vmap's update against loop's, and the
    sum of loop's K trunk gradients against the trunk gradient of sum_k L_k."""

    def updates(p):
        loop, _ = trunk_jacobian(trunk, p, x, targets, vectorised=False)
        vmap, _ = trunk_jacobian(trunk, p, x, targets, vectorised=True)
        total = jax.grad(lambda q: jnp.sum(task_losses(q, trunk_forward(trunk, q["trunk"], x),
                                                       targets)))(p)["trunk"]
        summed = jax.tree.map(lambda leaf: jnp.sum(leaf, 0), loop)
        return _gramian_and_update(loop), _gramian_and_update(vmap), summed, total

    def relative(a, b):
        a = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(a)])
        b = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(b)])
        return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))

    highest = getattr(jax, "default_matmul_precision", None)
    with highest("highest") if highest is not None else contextlib.nullcontext():
        loop, vmap, summed, total = jax.jit(updates)(params)
    return {"vmap_vs_loop": relative(vmap, loop), "sum_vs_plain": relative(summed, total)}


# ------------------------------------------------------------------------------- timing

def time_group(trunk, num_tasks, rounds, steps, warmup, checked=True):
    params = init_params(trunk, num_tasks)
    x, targets = make_data(trunk, num_tasks)
    errors = check(trunk, params, x, targets) if checked else {}
    functions = make_steps(trunk)
    state, compile_s = {}, {}
    for name, step in functions.items():
        began = time.perf_counter()
        state[name] = jax.block_until_ready(step(params, x, targets))
        compile_s[name] = time.perf_counter() - began
        for _ in range(warmup - 1):
            state[name] = jax.block_until_ready(step(state[name], x, targets))
    per_round = {name: [] for name in METHODS}
    for r in range(rounds):
        for i in range(len(METHODS)):
            name = METHODS[(i + r) % len(METHODS)]
            p = state[name]
            began = time.perf_counter()
            for _ in range(steps):
                p = functions[name](p, x, targets)
            jax.block_until_ready(p)
            per_round[name].append((time.perf_counter() - began) / steps * 1e3)
            state[name] = p
    for name, p in state.items():
        if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(p)):
            raise FloatingPointError(f"{trunk} K={num_tasks}: {name} produced non-finite "
                                     "parameters")
    median = {name: statistics.median(times) for name, times in per_round.items()}
    ratios = {}
    for name in METHODS[1:]:
        per = sorted(t / b for t, b in zip(per_round[name], per_round["plain"]))
        quartiles = np.quantile(per, [0.25, 0.75]) if len(per) > 1 else (per[0], per[0])
        ratios[name] = {"ratio": median[name] / median["plain"],
                        "q1": float(quartiles[0]), "q3": float(quartiles[1])}
    return {"trunk": trunk, "K": num_tasks, "batch": TRUNKS[trunk]["batch"],
            "median_ms": median, "ratios": ratios, "per_round_ms": per_round,
            "compile_s": compile_s, "check": errors, "rounds": rounds, "steps": steps}


def _cell(r):
    return f"{r['ratio']:.2f} [{r['q1']:.2f}-{r['q3']:.2f}]"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trunks", nargs="+", choices=sorted(TRUNKS), default=["mlp", "conv"])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="steps per method per round")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed calls per method (the first compiles)")
    parser.add_argument("--out", help="append one JSON line per (trunk, K) to this file")
    checks = parser.add_mutually_exclusive_group()
    checks.add_argument("--check-all", action="store_true",
                        help="check loop against vmap at every K (default: the first K of "
                             "each trunk; each check is one more compilation)")
    checks.add_argument("--no-check", action="store_true", help="never check")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: mlp, K = 3, 3 rounds of 3 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.trunks, args.tasks, args.rounds, args.steps, args.warmup = ["mlp"], [3], 3, 3, 2
    if min(args.tasks) < 2 or args.rounds < 1 or args.steps < 1 or args.warmup < 1:
        parser.error("--tasks >= 2, --rounds, --steps and --warmup >= 1")

    device = jax.devices()[0]
    if device.platform == "cpu" and not args.quick:
        print("warning: JAX sees no GPU; timing the CPU", file=sys.stderr, flush=True)
    environment = {"jax": jax.__version__, "device": device.device_kind,
                   "platform": device.platform, "python": platform.python_version()}
    print(f"Median step time as a ratio to plain (one gradient of sum_k L_k); JAX "
          f"{jax.__version__} on {device.device_kind} ({device.platform}); {args.rounds} "
          f"rounds x {args.steps} steps; [quartiles] of per-round ratios; errors: vmap's "
          "update vs loop's, sum of the K trunk gradients vs plain's\n", flush=True)
    print("| trunk | K | plain ms | loop / plain | vmap / plain | rep / plain "
          "| vmap vs loop | sum vs plain |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    began = time.perf_counter()
    for trunk in args.trunks:
        for position, num_tasks in enumerate(args.tasks):
            print(f"{trunk} K={num_tasks} ... ({time.perf_counter() - began:.0f} s)",
                  file=sys.stderr, flush=True)
            try:
                checked = not args.no_check and (args.check_all or position == 0)
                row = time_group(trunk, num_tasks, args.rounds, args.steps, args.warmup,
                                 checked)
            except Exception as error:  # noqa: BLE001 (one failed group spoils no other)
                print(f"| {trunk} | {num_tasks} | failed: {type(error).__name__}: "
                      f"{str(error)[:300]} |", flush=True)
                continue
            errors = [f"{row['check'][key]:.1e}" if row["check"] else "-"
                      for key in ("vmap_vs_loop", "sum_vs_plain")]
            print(f"| {trunk} | {num_tasks} | {row['median_ms']['plain']:.3f} | "
                  + " | ".join(_cell(row["ratios"][m]) for m in METHODS[1:])
                  + f" | {errors[0]} | {errors[1]} |", flush=True)
            if args.out:
                with open(args.out, "a") as out:
                    out.write(json.dumps({**row, **environment}) + "\n")
    print(f"\n{time.perf_counter() - began:.0f} s in all", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
