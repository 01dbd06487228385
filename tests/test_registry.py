"""The strategy registry, plugins, and errors raised before any training."""

import importlib.metadata
import sys

import keras
import pytest
from conftest import REQUIRED_ARGUMENTS, TWO_HEAD_LOSS, make_trunk_model, strategy_spec

import lossbalance
from lossbalance import strategies
from lossbalance.strategies import registry

CORE = {"fixed", "uncertainty", "gradnorm", "pcgrad"}


def test_available_lists_core_strategies():
    names = strategies.available()
    assert CORE <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", ["dwa", "rlw", "gls", "scale_invariant", "famo", "stch",
                                  "imtl_l", "pbi", "cosmos", "uw_so"])
def test_loss_level_methods_are_registered_as_loss_weightings(name):
    assert name in strategies.available()
    assert strategies.get(name).family == "loss"


@pytest.mark.parametrize("name, cls", [
    ("PCGrad", strategies.PCGrad),
    ("pc-grad", None),
    ("UW", strategies.UncertaintyWeighting),
    ("grad_norm", None),
    ("GradNorm", strategies.GradNorm),
    (" Fixed ", strategies.FixedWeights),
    ("si", strategies.ScaleInvariant),
    ("IMTL-L", strategies.IMTLL),
    ("Smooth-Tchebycheff", strategies.SmoothTchebycheff),
    ("PBI", strategies.PBI),
    ("penalty-boundary-intersection", strategies.PBI),
    ("COSMOS", strategies.COSMOS),
    ("UW-SO", strategies.SoftOptimalUncertaintyWeighting),
    ("uwso", strategies.SoftOptimalUncertaintyWeighting),
])
def test_names_are_case_and_dash_insensitive(name, cls):
    if cls is None:
        with pytest.raises(ValueError, match="Did you mean"):
            strategies.get(name)
    else:
        assert type(strategies.get(name)) is cls


def test_get_accepts_instances_classes_and_dicts():
    instance = strategies.PCGrad(seed=3)
    assert strategies.get(instance) is instance
    assert strategies.get(strategies.GradNorm, alpha=0.5).alpha == 0.5
    assert strategies.get({"name": "gradnorm", "alpha": 0.7}).alpha == 0.7
    assert strategies.get({"name": "gradnorm", "config": {"alpha": 0.2}}).alpha == 0.2
    serialized = keras.saving.serialize_keras_object(strategies.GradNorm(alpha=0.3))
    assert strategies.get(serialized).alpha == 0.3
    with pytest.raises(ValueError, match="instance"):
        strategies.get(instance, seed=1)
    with pytest.raises(ValueError, match="'name'"):
        strategies.get({"alpha": 1.0})
    with pytest.raises(TypeError, match="name"):
        strategies.get(3.5)


def test_unknown_name_lists_available_and_closest_match():
    with pytest.raises(ValueError) as info:
        strategies.get("pcgard")
    message = str(info.value)
    assert "Did you mean 'pcgrad'?" in message
    for name in CORE:
        assert name in message


def test_register_rejects_taken_names_and_non_strategies():
    with pytest.raises(ValueError, match="already taken"):
        @strategies.register("pcgrad")
        class Clash(strategies.GramianWeighting):
            pass

    with pytest.raises(TypeError, match="Strategy subclasses"):
        strategies.register("not_a_strategy")(object)


def test_entry_point_plugins_are_found(tmp_path, monkeypatch):
    """A third-party package's strategy appears without importing it by hand."""
    package = tmp_path / "lb_plugin_example.py"
    package.write_text(
        "import tensorflow as tf\n"
        "from lossbalance.strategies import LossWeighting\n"
        "class HalfWeights(LossWeighting):\n"
        "    def loss_weights(self, losses):\n"
        "        return 0.5 * tf.ones_like(losses)\n"
    )
    dist = tmp_path / "lb_plugin_example-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lb-plugin-example\n"
                                   "Version: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[lossbalance.strategies]\nhalf = lb_plugin_example:HalfWeights\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "_classes", dict(registry._classes))
    monkeypatch.setattr(registry, "_aliases", dict(registry._aliases))
    assert "half" in strategies.available()
    strategy = strategies.get("Half")
    assert type(strategy).__name__ == "HalfWeights"
    assert sys.modules["lb_plugin_example"].HalfWeights is type(strategy)


@pytest.mark.parametrize("factory, error, match", [
    (lambda: strategies.get("fixed", weights=[1.0, -1.0]), ValueError, ">= 0"),
    (lambda: strategies.get("fixed", weights=[1.0, float("nan")]), ValueError, "finite"),
    (lambda: strategies.get("fixed", weights={"cls": float("inf")}), ValueError, "finite"),
    (lambda: strategies.get("fixed", weights="equal"), TypeError, "list"),
    (lambda: strategies.get("fixed", weights=[1.0, "a"]), TypeError, "number"),
    (lambda: strategies.get("gradnorm", alpha=-0.5), ValueError, "alpha"),
    (lambda: strategies.get("gradnorm", alpha="big"), TypeError, "alpha"),
    (lambda: strategies.get("gradnorm", learning_rate=0), ValueError, "learning_rate"),
    (lambda: strategies.get("gradnorm", optimizer="nope"), ValueError, "optimizer"),
    (lambda: strategies.get("uncertainty", forms="poisson"), ValueError, "forms"),
    (lambda: strategies.get("pcgrad", seed=1.5), TypeError, "seed"),
    (lambda: strategies.get("pcgrad", gamma=1), TypeError, "gamma"),
])
def test_invalid_hyper_parameters_fail_at_construction(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


@pytest.mark.parametrize("strategy, match", [
    (strategies.FixedWeights(weights=[1.0, 2.0, 3.0]), "3 entries but the model has 2"),
    (strategies.FixedWeights(weights={"cls": 1.0, "depth": 2.0}), r"unknown task\(s\) \['depth'\]"),
    (strategies.UncertaintyWeighting(forms={"segm": "classification"}), "unknown task"),
    (strategies.GradNorm(layer="no_such_layer"), "no layer of that name"),
])
def test_strategy_that_does_not_fit_the_model_fails_at_compile(strategy, match):
    model = make_trunk_model()
    with pytest.raises(ValueError, match=match):
        model.compile(optimizer="sgd", loss=TWO_HEAD_LOSS, strategy=strategy)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss={"cls": "mse", "depth": "mse"}), r"does not have.*\['cls', 'reg'\]"),
    (dict(loss={"cls": "mse"}), r"no entry for output\(s\) \['reg'\]"),
    (dict(loss=["mse"]), "1 entries but the model has 2 outputs"),
    (dict(loss=None), "needs a `loss`"),
    (dict(loss="no_such_loss"), "Unknown loss"),
    (dict(loss="mse", loss_weights=[1.0]), "1 entries but the model has 2"),
    (dict(loss="mse", loss_weights={"depth": 1.0}), r"unknown output\(s\) \['depth'\]"),
    (dict(loss="mse", loss_weights=[1.0, -2.0]), ">= 0"),
])
def test_losses_that_do_not_match_the_outputs_fail_at_compile(kwargs, match):
    model = make_trunk_model()
    with pytest.raises(ValueError, match=match):
        model.compile(optimizer="sgd", **kwargs)


def test_hyper_parameters_without_a_default_are_declared_and_known_to_the_tests():
    """A strategy that its name alone cannot make says so (`required_arguments`), raises a
    TypeError naming the argument, and the registry-wide tests know a value for it
    (conftest.REQUIRED_ARGUMENTS)."""
    for name in strategies.available():
        required = registry.lookup(name).required_arguments
        assert set(required) == set(REQUIRED_ARGUMENTS.get(name, {})), name
        if required:
            with pytest.raises(TypeError, match=f"`{required[0]}`"):
                strategies.get(name)
            strategies.get(strategy_spec(name))
    assert registry.lookup("pcd").required_arguments == ("primary",)


@pytest.mark.parametrize("name", lossbalance.strategies.available())
def test_a_zero_loss_weight_is_refused_where_it_breaks_the_balance(name):
    """A task held at loss 0 gives MGDA a zero update, log-based strategies a log of 0 and
    ratio-based ones 0 / 0: compile refuses it, naming the task and the fix, except for
    strategies whose weights do not depend on the losses (fixed, RLW)."""
    spec = strategy_spec(name)  # with the hyper-parameters it has no default for
    if lossbalance.strategies.get(spec).min_tasks > 2:
        pytest.skip(f"{name} is defined for 3 or more tasks (refused for this model)")
    model = make_trunk_model()
    compile_ = lambda: model.compile(optimizer="sgd", loss=TWO_HEAD_LOSS, strategy=spec,
                                     loss_weights={"cls": 1.0, "reg": 0.0})
    if name in ("fixed", "rlw"):
        compile_()
        assert model.strategy.allows_zero_loss_weights
    else:
        with pytest.raises(ValueError, match=r"\['reg'\] the weight 0.*'reg': None"):
            compile_()


def test_targets_that_do_not_match_the_tasks_are_named(two_head_data):
    x, y = two_head_data
    model = make_trunk_model()
    model.compile(optimizer="sgd", loss=TWO_HEAD_LOSS)
    with pytest.raises(ValueError, match="no entry for task 'reg'"):
        model.fit(x, {"cls": y["cls"]}, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="single array but the model has 2 outputs"):
        model.fit(x, y["reg"], epochs=1, verbose=0)


def test_training_an_uncompiled_model_explains_itself(two_head_data):
    x, y = two_head_data
    with pytest.raises((RuntimeError, ValueError), match="compile"):
        make_trunk_model().fit(x, y, epochs=1, verbose=0)


def test_rebinding_a_strategy_to_other_tasks_is_refused():
    strategy = strategies.PCGrad()
    strategy.bind(["a", "b"])
    strategy.bind(["a", "b"])  # the same tasks: a no-op
    with pytest.raises(ValueError, match="already bound"):
        strategy.bind(["a", "b", "c"])
    assert lossbalance.strategies.get(strategy).num_tasks == 2
