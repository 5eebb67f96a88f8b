"""The method registry: every registered objective trains with `model.fit` on this backend."""

import keras
import numpy as np
import pytest

from keras_mfm import backbones, methods, training
from tests.conftest import smooth_images

#: Small settings per method (the registry's defaults otherwise); the decoders are tiny.
SMALL_OPTIONS = {
    "mae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "amt": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2, num_images=32),
    "famt": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2, num_images=32),
    "simmim_famt": dict(num_images=32),
    "sr": dict(sr_factor=4),
}


def tiny_encoder(method):
    embedding = methods.get_method(method).position_embedding or "learned"
    return backbones.ViTBackbone(image_size=16, patch_size=4, hidden_dim=32, depth=1, num_heads=2,
                                 position_embedding=embedding)


def test_registry_lists_every_objective_of_the_papers():
    assert set(methods.available_methods()) >= {
        "mfm", "sr", "deblur", "denoise", "mae", "amt", "famt", "simmim", "simmim_famt"}
    assert all(description for description in methods.available_methods().values())
    assert methods.get_method("famt").importance and methods.get_method("simmim_famt").importance
    assert methods.get_method("simmim").tokens and not methods.get_method("sr").tokens
    with pytest.raises(ValueError, match="Unknown method 'simclr'.*mfm"):
        methods.get_method("simclr")


def test_method_options_come_from_the_config_by_name():
    config = training.PretrainConfig(method="deblur", blur_sigma=0.5, radius=3.0, mask_ratio=0.3)
    assert methods.method_options("deblur", config)["blur_sigma"] == 0.5
    assert "radius" not in methods.method_options("deblur", config)  # an MFM option, not a deblur one
    assert methods.method_options("simmim", config)["mask_ratio"] == 0.3
    # every builder option is a PretrainConfig field (and so a train.py flag), except the table size
    fields = set(training.PretrainConfig.__dataclass_fields__)
    for name in methods.available_methods():
        assert set(methods.get_method(name).options()) - {"num_images"} <= fields, name


@pytest.mark.parametrize("method,storage", [("famt", "float16"), ("simmim_famt", "float32"), ("amt", "uint8")])
def test_the_importance_storage_setting_reaches_the_model(method, storage):
    config = training.PretrainConfig(method=method, image_size=16, patch_size=4, depth=1, importance_storage=storage,
                                     decoder_dim=32, decoder_depth=1, decoder_heads=2)
    model = training.build_model(config, num_images=8)
    assert model.importance_storage == storage and model.get_config()["importance_storage"] == storage
    plain = training.build_model(training.PretrainConfig(method="mae", image_size=16, patch_size=4, depth=1,
                                                         importance_storage="float16", decoder_dim=32,
                                                         decoder_depth=1, decoder_heads=2))
    assert plain.importance is None  # no table: the setting does not apply


@pytest.mark.parametrize("name", sorted(methods.available_methods()))
def test_every_method_trains_with_decreasing_loss(name):
    keras.utils.set_random_seed(0)
    options = dict(SMALL_OPTIONS.get(name, {}))
    if "seed" in methods.get_method(name).options():  # sr draws nothing
        options["seed"] = 0
    model = methods.build_method(name, tiny_encoder(name), **options)
    model.build((None, 16, 16, 3))
    if methods.get_method(name).importance:  # a filled table: train in the importance phase
        model.set_importance(np.random.default_rng(0).random((32, 16)).astype("float32") + 0.01)
        inputs = {"images": smooth_images(32, 16), "importance": np.ones((32, 16), "float32")}
    else:
        inputs = smooth_images(32, 16)
    model.compile(optimizer=keras.optimizers.AdamW(3e-3))
    history = model.fit(inputs, epochs=6, batch_size=16, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)), history
    assert history[-1] < history[0], history
