"""What the models built around an encoder share: saving the encoder inside their config; for the
pre-training models, a `fit` that checks its inputs."""

import math

import keras

from keras_mfm import inputs


class EncoderModel(keras.Model):
    """A `keras.Model` holding an `encoder` (and the other layers named in `NESTED`) that it
    serialises in `get_config` and rebuilds in `from_config`, so the whole model saves as `.keras`."""

    NESTED = ("encoder",)

    def get_config(self):
        config = super().get_config()
        for name in self.NESTED:
            config[name] = keras.saving.serialize_keras_object(getattr(self, name))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in cls.NESTED:
            config[name] = keras.saving.deserialize_keras_object(config[name])
        return cls(**config)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops `fit` with `NonFiniteLossError` at the first batch whose loss is not finite, naming the
    epoch and batch (instead of training on with NaN weights)."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"The loss became {float(loss)} in epoch {self._epoch} (batch {batch}); training stopped. "
                "Lower the learning rate or check the data."
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    _epoch = 0


class PretrainingModel(EncoderModel):
    """A self-supervised pre-training model: `fit` checks the input contract (`keras_mfm.inputs`:
    float NHWC images in [0, 1] of the encoder's size, plus what the method needs, `check_batch`)
    on arrays before the first step and on `tf.data` pipelines batch by batch as they are made,
    and stops at a non-finite loss (`StopOnNonFiniteLoss`, unless the caller passes its own
    `keras.callbacks.TerminateOnNaN`)."""

    def check_batch(self, batch, where):
        """Raises `inputs.ImageInputError` when a batch as `fit` receives it breaks the contract."""
        inputs.check_images(inputs.images_of(batch), where, image_size=tuple(self.encoder.image_size))

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None, **kwargs):
        where = f"{type(self).__name__}.fit"
        batch = inputs.first_batch(x)
        if isinstance(batch, tuple) and not batch:
            raise inputs.ImageInputError(f"{where}: the data set is empty.")
        if batch is not None:
            self.check_batch(batch, where)
        if not self.built:  # the weights exist before the callbacks' on_train_begin (e.g. ImportanceRefresh)
            self.build((None, *self.encoder.image_size, 3))
        if inputs.is_tf_dataset(x):
            x = inputs.check_in_pipeline(x)
        callbacks = list(callbacks or [])
        if not any(isinstance(c, (keras.callbacks.TerminateOnNaN, StopOnNonFiniteLoss)) for c in callbacks):
            callbacks.append(StopOnNonFiniteLoss())
        try:
            return super().fit(x, y, batch_size=batch_size, epochs=epochs, verbose=verbose, callbacks=callbacks,
                               **kwargs)
        except Exception as error:  # noqa: BLE001 - a failed pipeline check arrives as the backend's error
            inputs.raise_input_error(error, where)
            raise
