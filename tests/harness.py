"""Checks every keras_mfm layer and model passes, in one place (as keras-hub's `TestCase`): the
config round trip, Keras serialisation and `.keras` saving, on the backend the suite runs on.

    check_layer_serialization(layer)                    # get_config / from_config / serialize
    check_model_saving(model, inputs, tmp_path)         # .keras save + load: same class, config, outputs
"""

import json
import os

import keras
import numpy as np


def _plain(config):
    """A config as it reads back from JSON (tuples become lists), for comparing configs."""
    return json.loads(json.dumps(config, default=str))


def _numpy_tree(values):
    return keras.tree.map_structure(lambda x: np.asarray(keras.ops.convert_to_numpy(x)), values)


def check_layer_serialization(layer):
    """`from_config(get_config())` and `deserialize(serialize())` give a layer of the same class
    with the same config; returns the deserialised copy."""
    config = layer.get_config()
    rebuilt = type(layer).from_config(config)
    assert type(rebuilt) is type(layer) and rebuilt.get_config() == config
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(clone) is type(layer) and clone.get_config() == config
    return clone


def check_model_saving(model, inputs, tmp_path, outputs=None, atol=1e-6):
    """Saves `model` as `.keras`, loads it (safe mode) and checks the class, the config and that
    `outputs(model, inputs)` (default: `model(inputs, training=False)`) is the same for both;
    returns the loaded model."""
    outputs = outputs or (lambda m, x: m(x, training=False))
    expected = _numpy_tree(outputs(model, inputs))
    path = os.path.join(str(tmp_path), f"{model.name}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is type(model)
    assert _plain(loaded.get_config()) == _plain(model.get_config())
    got = _numpy_tree(outputs(loaded, inputs))
    for a, b in zip(keras.tree.flatten(expected), keras.tree.flatten(got)):
        np.testing.assert_allclose(b, a, atol=atol)
    return loaded
