"""What the models built around an encoder share: saving the encoder inside their config."""

import keras


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
