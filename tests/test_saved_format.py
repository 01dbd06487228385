"""Models saved by lossbalance 0.1.0 before the architecture rework (commit b680319,
tests/data/make_saved_models.py) load with this code: the same predictions, the same
strategy state, the same compile configuration, and they train on."""

import sys
from pathlib import Path

import keras
import numpy as np
import pytest

DIRECTORY = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(DIRECTORY))
import make_saved_models  # noqa: E402

SAVED = DIRECTORY / "saved_0.1.0"


@pytest.mark.parametrize("name", sorted(make_saved_models.CONFIGS))
def test_a_model_saved_by_0_1_0_loads_predicts_and_trains(name):
    expected = np.load(SAVED / f"{name}.npz")
    model = keras.saving.load_model(SAVED / f"{name}.keras")
    x, y = make_saved_models.data()
    np.testing.assert_array_equal(expected["x"], x)
    for output, value in model.predict(x, verbose=0).items():
        np.testing.assert_allclose(value, expected[f"predict:{output}"], rtol=1e-6,
                                   atol=1e-6)
    saved = {key.split(":", 1)[1]: expected[key] for key in expected.files
             if key.startswith("state:")}
    state = {v.path: v.numpy() for v in model.strategy.variables}
    assert state.keys() == saved.keys()
    for path, value in saved.items():
        np.testing.assert_array_equal(state[path], value, err_msg=path)
    fresh = make_saved_models.model()
    fresh.compile(loss=make_saved_models.LOSSES, **make_saved_models.CONFIGS[name])
    assert type(model.strategy) is type(fresh.strategy)
    assert model.gradient_level == fresh.gradient_level
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert np.all(np.isfinite(logs["loss"]))
