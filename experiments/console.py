"""A quiet console for the command line: the progress bar and the results, not TensorFlow's
start-up lines or its retracing warnings.

TensorFlow prints its start-up lines (the absl "All log messages before
absl::InitializeLog()" notice, oneDNN's notice, "Could not find cuda drivers") from C++ while
it is imported, before it reads `TF_CPP_MIN_LOG_LEVEL`; so `quiet()` imports it with the
process' standard error (file descriptor 2) sent to /dev/null. Later C++ messages (`cuInit`
errors when CUDA is probed, device creation) obey `TF_CPP_MIN_LOG_LEVEL`, set to 3 (fatal
only) unless the environment already sets it. Python-side messages (the "triggered
tf.function retracing" warnings, absl logging) are raised to ERROR.

The command line calls `quiet()` first unless `--verbose` is given; nothing here runs on
import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

QUIET_CPP_LOG_LEVEL = "3"  # TF_CPP_MIN_LOG_LEVEL: fatal errors only


@contextlib.contextmanager
def stderr_silenced():
    """Send file descriptor 2 (C/C++ writes and Python's sys.stderr alike) to /dev/null for
    the duration of the block; restored on exit, also when the block raises (so the
    exception's traceback is shown)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet() -> None:
    """Silence TensorFlow for this process: set `TF_CPP_MIN_LOG_LEVEL` (unless already set),
    import TensorFlow with standard error silenced, and raise the `tensorflow` and absl
    Python loggers to ERROR. Call it before anything imports TensorFlow; called later, it
    still quietens the loggers (the start-up lines have then been printed already)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_CPP_LOG_LEVEL)
    already = "tensorflow" in sys.modules
    with (contextlib.nullcontext() if already else stderr_silenced()):
        import tensorflow as tf
    tf.get_logger().setLevel(logging.ERROR)  # "triggered tf.function retracing" warnings
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # absl ships with TensorFlow; tolerate its absence
        pass
