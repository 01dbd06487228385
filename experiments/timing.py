"""Interleaved step timing of compiled Keras models, shared by the benchmark scripts.

Every model is built, traced and warmed up with `fit`; then its compiled `train_function`
is called directly on its own iterator, one step a call, and timed. Runs are interleaved:
each round times `steps` steps of every configuration, in a rotated order, so that drifts
and bursts of load on a shared machine hit all configurations alike. `summarise` gives each
configuration's median step time, its ratio to a baseline's median, the quartiles of the
per-round ratios as a measure of noise, and a bootstrap interval of the ratio that says how
precisely the run pins it down (more rounds narrow it; a target is judged met or missed only
when the whole interval falls on one side).
"""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import numpy as np
from scipy import stats

#: "wall": elapsed time; "cpu": CPU time of this process (all TensorFlow threads), which
#: does not count time spent waiting for cores taken by other processes on a busy machine.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_steps(model, iterator, steps, clock=time.perf_counter):
    """Seconds of each of `steps` calls of the compiled train function."""
    times = []
    for _ in range(steps):
        start = clock()
        logs = model.train_function(iterator)
        float(logs["loss"])  # waits for the step on asynchronous devices
        times.append(clock() - start)
    return times


def warm_up(models, dataset, steps):
    """Build, trace and compile every model's train function; return their iterators."""
    iterators = {}
    for name, model in models.items():
        model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
        iterators[name] = iter(dataset)
        time_steps(model, iterators[name], steps)
    return iterators


def interleaved(models, iterators, rounds, steps, clock="wall"):
    """({name: every step's time}, {name: each round's median}) over `rounds` rounds."""
    names = list(models)
    per_step = {name: [] for name in names}
    per_round = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times = time_steps(models[name], iterators[name], steps, CLOCKS[clock])
            per_step[name].extend(times)
            per_round[name].append(statistics.median(times))
    return per_step, per_round


def check_finite(models, dataset):
    for name, model in models.items():
        loss = model.evaluate(dataset, steps=2, verbose=0, return_dict=True)["loss"]
        if not np.isfinite(loss):
            raise RuntimeError(f"{name}: non-finite loss {loss} after training")


class Summary(NamedTuple):
    """One configuration's figures against the baseline."""

    ms: float  # median step time
    ratio: float  # median step time / the baseline's
    quartile_low: float  # quartiles of the per-round ratios: the noise of one round
    quartile_high: float
    ci_low: float  # 95% bootstrap interval of `ratio`: how precisely it is known
    ci_high: float

    def verdict(self, target):
        """"met" when the whole interval is within the target, "over" when the whole of it
        is above, "unresolved" when the noise does not tell."""
        if self.ci_high <= target:
            return "met"
        return "over" if self.ci_low > target else "unresolved"


def summarise(per_step, per_round, baseline="keras", resamples=2000, seed=0):
    """name -> Summary. The interval resamples whole rounds (with replacement, the same
    rounds for a configuration and the baseline, so that the load they shared stays
    paired) and recomputes the ratio of the medians."""
    base = statistics.median(per_step[baseline])
    rounds = len(per_round[baseline])
    picks = np.random.default_rng(seed).integers(0, rounds, size=(resamples, rounds))

    def resampled_medians(times):
        by_round = np.asarray(times).reshape(rounds, -1)
        return np.median(by_round[picks].reshape(resamples, -1), axis=1)

    base_medians = resampled_medians(per_step[baseline])
    rows = {}
    for name, times in per_step.items():
        median = statistics.median(times)
        ratios = [r / b for r, b in zip(per_round[name], per_round[baseline])]
        low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        ci_low, ci_high = np.percentile(resampled_medians(times) / base_medians, [2.5, 97.5])
        rows[name] = Summary(median * 1e3, median / base, low, high, float(ci_low),
                             float(ci_high))
    return rows


def median_rank(n, confidence=0.95):
    """(j, coverage): the order statistics x_(j) <= x_(n+1-j) of n values that bound a
    distribution-free confidence interval for the median of the distribution they were
    drawn from. j is the largest whose coverage, 1 - 2 P(Binomial(n, 1/2) < j), is at least
    `confidence`; when even the full range (j = 1, coverage 1 - 2^(1-n)) falls short, j = 1
    with its lower coverage (87.5% for 4 values). (`scipy.stats.quantile_test`'s interval
    is the same pair from six values on, but has no bounds below that and no coverage.)"""
    coverage = 1 - 2 * stats.binom.cdf(np.arange(n // 2), n, 0.5)  # of j = 1 .. n // 2
    j = max(1, int(np.count_nonzero(coverage >= confidence)))  # coverage falls as j grows
    return j, float(1 - 2 * stats.binom.cdf(j - 1, n, 0.5))


def median_interval(values, confidence=0.95):
    """(low, high, coverage): `median_rank`'s interval for the median of `values`."""
    ordered = sorted(values)
    j, coverage = median_rank(len(ordered), confidence)
    return ordered[j - 1], ordered[len(ordered) - j], coverage


def across_processes(summaries):
    """One Summary from the same configuration measured in several fresh processes: the
    medians of their step times, ratios and quartiles, and as the interval the 95%
    `median_interval` of their ratios (the range, at lower confidence, for fewer than six
    processes). Each process builds, lays out and traces its models afresh, which moves a
    ratio between processes by more than one process's bootstrap interval."""
    ratios = [s.ratio for s in summaries]
    low, high, _ = median_interval(ratios)
    return Summary(statistics.median(s.ms for s in summaries), statistics.median(ratios),
                   statistics.median(s.quartile_low for s in summaries),
                   statistics.median(s.quartile_high for s in summaries), low, high)


def executed_kernels(model, iterator, steps=10):
    """{op type: kernels run per step} of the compiled train function, from TensorFlow's
    profiler: the ops that really execute, after Grappler's rewrites (constant folding,
    pruning, common subexpressions), not the traced graph. None if the profiler's trace
    format cannot be read.

    Call it within a few steps of the first: after some dozens of steps TensorFlow's
    executor runs the kernels it has measured as cheap inline, without tracing them, and
    the count falls to the expensive ones (about 50 of 290 in the loss benchmark's step).
    """
    import collections
    import glob
    import tempfile

    import tensorflow as tf

    try:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            time_steps(model, iterator, steps)
        finally:
            tf.profiler.experimental.stop()
        paths = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        if not paths:
            return None
        space = xplane_pb2.XSpace()
        with open(paths[0], "rb") as handle:
            space.ParseFromString(handle.read())
    kernels = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                # A kernel's event is named "<node name>:<op type>"; tf.data's and the
                # runtime's own events have "::" in their names.
                name = plane.event_metadata[event.metadata_id].name
                node, _, op_type = name.rpartition(":")
                if (node and "::" not in name and op_type[:1].isupper()
                        and op_type.isidentifier()):
                    kernels[op_type] += 1
    return {op_type: count / steps for op_type, count in kernels.items()}


def add_timing_arguments(parser, rounds, steps, warmup=5):
    parser.add_argument("--rounds", type=int, default=rounds,
                        help="interleaved rounds; each times every configuration once")
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help="untimed steps per configuration before the first round")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time (default) or process CPU time (for busy machines)")
    parser.add_argument("--threads", type=int, default=0,
                        help="TensorFlow intra- and inter-op threads (0: TensorFlow's "
                             "default); 1 with --clock cpu gives the steadiest figures on a "
                             "busy machine")


def apply_threads(threads):
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
