"""Loss floors: the least mean loss a strategy is defined for (`Strategy.loss_floors`,
`check_losses`). Which registered strategies reject a negative loss (those that take its
log, its inverse or its direction, or learn a scale for it) and which take any sign,
FAMO's floor at its `min_losses`, and `fit` stopping with an error that names the task
when a logged mean loss falls below its floor.
"""

import keras
import numpy as np
import pytest
from conftest import REQUIRED_ARGUMENTS, TWO_HEAD_LOSS, make_trunk_model
from loss_helpers import bound

from lossbalance import strategies


LOG_OR_LEARNED_SCALE = {"gls", "scale_invariant", "stch", "db_mtl", "uncertainty", "imtl_l",
                        "imtl", "famo", "pbi", "cosmos", "uw_so"}


@pytest.mark.parametrize("name", strategies.available())
def test_check_losses_holds_every_strategy_to_its_floor(name):
    """Methods that take log L_k, or whose learned scales diverge for L_k < 0, reject a
    negative mean loss with the task's name and a fix; the others accept any sign."""
    required = REQUIRED_ARGUMENTS.get(name, {})  # hyper-parameters without a default
    if strategies.get(name, **required).min_tasks > 2:
        pytest.skip(f"{name} is defined for 3 or more tasks (and has no loss floor)")
    strategy = bound(name, tasks="ab", **required)
    strategy.check_losses({"a": 0.0, "b": 2.0}, "in epoch 1")  # a loss of 0 is in range
    if name not in LOG_OR_LEARNED_SCALE:
        assert strategy.loss_floors() is None
        strategy.check_losses({"a": -3.0, "b": -1e9}, "in epoch 1")
        return
    with pytest.raises(ValueError, match=r"in epoch 2: 'b' averaged -0.25 < 0\. ") as error:
        strategy.check_losses({"a": 1.0, "b": -0.25}, "in epoch 2")
    assert ("min_losses" if name == "famo" else "'fixed', 'rlw'") in str(error.value)


def test_famo_floor_is_its_min_losses():
    strategy = bound("famo", tasks="ab", min_losses={"b": -2.0})
    strategy.check_losses({"a": 0.5, "b": -1.5}, "in epoch 1")
    with pytest.raises(ValueError, match=r"'a' averaged -0.5 < 0, 'b' averaged -2.5 < -2"):
        strategy.check_losses({"a": -0.5, "b": -2.5}, "in epoch 1")


@pytest.mark.parametrize("name", ["pbi", "cosmos", "uw_so"])
def test_negative_losses_are_below_the_floor(name):
    strategy = bound(name)
    assert strategy.loss_floors() == [0.0, 0.0, 0.0]
    strategy.check_losses({"a": 0.0, "b": 2.0, "c": 1e-9}, "in epoch 1")
    with pytest.raises(ValueError, match=r"'c' averaged -0.5 < 0\. "):
        strategy.check_losses({"a": 1.0, "b": 2.0, "c": -0.5}, "after the first batch")


def constant_loss(y_true, y_pred):
    """The batch mean of the targets: a loss whose sign the data sets (no gradient)."""
    return keras.ops.mean(y_true + 0.0 * y_pred, axis=-1)


@pytest.mark.parametrize("loss_weight, first_target, error", [
    (1.0, -1.0, "after the first batch"),  # negative from the first batch: one step taken
    (1.0, 1.0, "in epoch 1"),  # the first batch is positive, the epoch's mean is not
    (0.5, -1.0, "after the first batch"),  # the weighted loss is what the strategy sees
])
def test_fit_stops_on_a_loss_below_the_strategys_floor(loss_weight, first_target, error,
                                                       two_head_data):
    x, y = two_head_data
    y = {"cls": y["cls"], "reg": np.where(np.arange(64) < 16, first_target, -5.0)[:, None]}
    model = make_trunk_model()
    model.compile(optimizer="sgd", loss={"cls": TWO_HEAD_LOSS["cls"], "reg": constant_loss},
                  loss_weights={"cls": 1.0, "reg": loss_weight}, strategy="scale_invariant")
    mean = ((first_target - 15.0) / 4 if "epoch" in error else first_target) * loss_weight
    with pytest.raises(ValueError, match=f"{error}: 'reg' averaged {mean:g} < 0"):
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert int(model.optimizer.iterations) == (4 if "epoch" in error else 1)

    fixed = make_trunk_model()  # linear scalarisation takes losses of any sign
    fixed.compile(optimizer="sgd", loss={"cls": TWO_HEAD_LOSS["cls"], "reg": constant_loss},
                  strategy="fixed")
    logs = fixed.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False).history
    assert logs["reg_loss"][0] == pytest.approx((first_target - 15.0) / 4)
