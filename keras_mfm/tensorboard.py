"""TensorBoard logs of a pre-training run, on the TensorFlow, JAX and PyTorch backends.

    callbacks = [training.EpochStats(...), *tensorboard_callbacks("runs/mfm/tensorboard", images, every_n_epochs=5)]
    tensorboard --logdir runs/mfm/tensorboard

- `keras.callbacks.TensorBoard`: every number of the epoch logs (the loss, and `lr`,
  `epoch_seconds`, `images_per_second` that `training.EpochStats` adds when it runs earlier in the
  list) as the scalar `epoch_<name>` in `log_dir/train`.
- `ReconstructionImages`: `visualize.reconstruction_figure` of the model on fixed images every N
  epochs (and after the last), as the image `reconstruction` in `log_dir/images`
  (`tf.summary.image`; this is the module of keras_mfm that uses TensorFlow for logging). The
  callback touches the model only through `visualize` (keras.ops, NumPy, matplotlib), so it works
  on every backend.
"""

import io
import os

import keras
import numpy as np

from keras_mfm import visualize


def _tf():
    import tensorflow as tf

    return tf


class ReconstructionImages(keras.callbacks.Callback):
    """Logs `visualize.reconstruction_figure(self.model, images)` as the image summary `tag`
    (in `log_dir/images`) at the end of every `every_n_epochs`-th epoch and of the last one.

    Args:
        log_dir: TensorBoard log directory of the run.
        images: a few fixed images `(B, H, W, 3)` in [0, 1] at the model's image size.
        every_n_epochs: epochs between figures (>= 1).
        seed: the figure's masks (the same every time, so the epochs compare; the model's own
            random state is left as it was).
        dpi: resolution of the figure.
        epochs: the run's number of epochs (its last epoch gets a figure); None: the `fit` call's.
    """

    def __init__(self, log_dir, images, every_n_epochs=1, seed=0, dpi=100, tag="reconstruction", epochs=None):
        super().__init__()
        images = np.asarray(keras.ops.convert_to_numpy(images), dtype="float32")
        if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
            raise ValueError(f"ReconstructionImages needs images of shape (B, H, W, 3), got {images.shape}.")
        if int(every_n_epochs) < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        self.log_dir = str(log_dir)
        self.images = images
        self.every_n_epochs = int(every_n_epochs)
        self.seed = seed
        self.dpi = dpi
        self.tag = tag
        self.epochs = epochs
        self.writer = None
        self.logged_epochs = []

    def due(self, epoch):
        """Figure after epoch `epoch` (0-based)? Every N-th epoch and the last of the `fit` call."""
        last = self.epochs or (self.params or {}).get("epochs")
        return (epoch + 1) % self.every_n_epochs == 0 or (last is not None and epoch + 1 == last)

    def on_train_begin(self, logs=None):
        visualize.check_pretraining_model(self.model)  # fail before the first epoch, not after it

    def on_epoch_end(self, epoch, logs=None):
        if not self.due(epoch):
            return
        # JAX: `fit` syncs the trained state back into the variables before `on_epoch_end`; this
        # is a no-op then, and makes a call from anywhere else safe.
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()
        buffer = io.BytesIO()
        visualize.reconstruction_figure(self.model, self.images, buffer, seed=self.seed, dpi=self.dpi)
        tf = _tf()
        if self.writer is None:
            self.writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "images"))
        with self.writer.as_default():
            picture = tf.image.decode_png(buffer.getvalue(), channels=3)[None]
            tf.summary.image(self.tag, picture, step=epoch,
                             description=f"{self.model.name} after epoch {epoch + 1} (visualize.reconstruction_figure)")
        self.writer.flush()
        self.logged_epochs.append(epoch)

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def tensorboard_callbacks(log_dir, images=None, every_n_epochs=1, seed=0, epochs=None):
    """`[keras.callbacks.TensorBoard(log_dir)]`, plus `ReconstructionImages(log_dir, images,
    every_n_epochs)` when `images` are given. Put them after `training.EpochStats` so `lr` and
    the timings are in the logs they read."""
    callbacks = [keras.callbacks.TensorBoard(str(log_dir), write_graph=False, update_freq="epoch")]
    if images is not None:
        callbacks.append(ReconstructionImages(log_dir, images, every_n_epochs, seed=seed, epochs=epochs))
    return callbacks
