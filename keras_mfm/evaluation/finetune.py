"""End-to-end fine-tuning (SPEC.md section 1, "Recipe"): the MAE/MFM fine-tuning recipe.

    logits = Linear(LayerNorm(mean-pooled tokens))      (global average for ResNet-50)
    loss   = cross-entropy with label smoothing 0.1 on MixUp/CutMix soft labels

AdamW (0.9, 0.999), lr = 2e-3 x batch / 512, layer-wise lr decay 0.8 (block `i` of a depth-`L`
ViT trains at `0.8^(L - i)` of the lr, the patch embedding at `0.8^(L + 1)`), weight decay 0.05
(none on biases, norms, position embedding, [CLS]), drop path 0.1, per-step warm-up (5 epochs)
then cosine to 1e-6. The input augmentation (RandAugment, RandomErasing, MixUp/CutMix) is the
data pipeline's: `keras_mfm.data.finetune_dataset`.
"""

import time

import keras
import numpy as np
from keras import ops

from keras_mfm.backbones.wrapped import as_encoder
from keras_mfm.evaluation.features import Result, load_evaluation_data, predict_logits, top1
from keras_mfm.models.classifier import ImageClassifier
from keras_mfm.optimizers.layer_decay import LayerDecayAdamW, layer_decay_scales
from keras_mfm.optimizers.recipes import no_weight_decay_variables, warmup_cosine_schedule


@keras.saving.register_keras_serializable(package="keras_mfm")
class SoftTargetCrossEntropy(keras.losses.Loss):
    """Cross-entropy of logits against int labels `(B,)` or soft labels `(B, K)` (MixUp/CutMix),
    with label smoothing: `y' = (1 - s) y + s / K`, `loss = -sum_k y'_k log softmax(logits)_k`."""

    def __init__(self, label_smoothing=0.1, name="soft_target_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing}.")
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        num_classes = y_pred.shape[-1]
        if len(y_true.shape) < len(y_pred.shape):
            y_true = ops.one_hot(ops.cast(y_true, "int32"), num_classes)
        y_true = ops.cast(y_true, "float32")
        y_true = y_true * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
        return -ops.sum(y_true * ops.log_softmax(y_pred, axis=-1), axis=-1)

    def get_config(self):
        config = super().get_config()
        config["label_smoothing"] = self.label_smoothing
        return config


def copy_encoder(encoder, drop_path_rate=None):
    """A fresh copy of `encoder` with its weights (and, for a ViT, a new drop-path rate)."""
    encoder = as_encoder(encoder)
    encoder.ensure_built()
    config = encoder.get_config()
    if drop_path_rate is not None and "drop_path_rate" in config:
        config["drop_path_rate"] = float(drop_path_rate)
    copy = type(encoder).from_config(config)
    copy.build((None, *encoder.image_size, 3))
    copy.set_weights(encoder.get_weights())
    return copy


def _one_iterator(dataset):
    """An endless `tf.data.Dataset` as one Python generator, so that `fit` reads a single iterator.

    Keras' `fit` first takes a batch from an iterator of its own to build the loss and metrics,
    then starts another one for training. Augmentation layers draw from stateful generators, so the
    batches that first iterator produced (its read-ahead depends on timing) would shift every later
    draw. Any other input is returned as it is."""
    cardinality = getattr(dataset, "cardinality", None)
    if cardinality is None or int(cardinality()) != -1:  # tf.data.INFINITE_CARDINALITY
        return dataset
    return (batch for batch in dataset)


def _static_batch_size(dataset):
    spec = getattr(dataset, "element_spec", None)
    try:
        return int(spec[0].shape[0])
    except (TypeError, IndexError, AttributeError):
        return None


def finetune(encoder, train_dataset, test_dataset, num_classes, epochs=100, steps_per_epoch=None,
             batch_size=None, class_names=None, pooling=None, base_lr=2e-3, layer_decay=0.8,
             weight_decay=0.05, drop_path=0.1, label_smoothing=0.1, warmup_epochs=5, min_lr=1e-6,
             clip_norm=None, seed=0, jit_compile="auto", verbose=0):
    """Fine-tunes a copy of `encoder` with a classifier and scores it on `test_dataset`.

    Args:
        train_dataset: `(images in [0, 1], labels)` batches, labels int `(B,)` or soft `(B, K)`;
            augmented already (`keras_mfm.data.finetune_dataset`); repeated if `steps_per_epoch`.
        test_dataset: `(images, int labels)` batches (`keras_mfm.data.evaluation_dataset`).
        num_classes: classes of the new head.
        steps_per_epoch: default `len(train_dataset)`.
        batch_size: for the lr scaling rule; default: the dataset's static batch size.
        pooling: ViT features, "mean" (the recipe's default) or "cls".
        base_lr, layer_decay, weight_decay, drop_path, label_smoothing, warmup_epochs, min_lr,
            clip_norm: the recipe (module docstring); `lr = base_lr * batch_size / 512`.
        seed: seeds Keras (head initialisation, drop path).

    Returns:
        `Result` with `finetune_top1` (%) and the per-epoch training loss; `.classifier` is the
        fine-tuned `ImageClassifier`. The `encoder` passed in is not modified.
    """
    start = time.perf_counter()
    if seed is not None:
        keras.utils.set_random_seed(seed)
    batch_size = batch_size or _static_batch_size(train_dataset)
    if not batch_size:
        raise ValueError("Pass `batch_size` (the training batch size, for the learning-rate scaling rule).")
    if steps_per_epoch is None:
        try:
            steps_per_epoch = len(train_dataset)
        except TypeError as error:
            raise ValueError("Pass `steps_per_epoch`: the training data set has no known length.") from error
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"`epochs` and `steps_per_epoch` must be >= 1, got {epochs} and {steps_per_epoch}.")
    if not 0 < layer_decay <= 1:
        raise ValueError(f"`layer_decay` must be in (0, 1], got {layer_decay}.")

    classifier = ImageClassifier(copy_encoder(encoder, drop_path), num_classes, pooling=pooling, head="finetune",
                                 class_names=class_names, name="finetuned_classifier")
    classifier.build()
    total_steps = epochs * steps_per_epoch
    lr = base_lr * batch_size / 512
    schedule = warmup_cosine_schedule(lr, total_steps, min(int(round(warmup_epochs * steps_per_epoch)), total_steps),
                                      min_lr)
    optimizer = LayerDecayAdamW(
        schedule, lr_scales=layer_decay_scales(classifier.encoder, layer_decay), weight_decay=weight_decay,
        beta_1=0.9, beta_2=0.999, global_clipnorm=clip_norm or None,
    )
    optimizer.exclude_from_weight_decay(var_list=no_weight_decay_variables(classifier))
    classifier.compile(optimizer=optimizer, loss=SoftTargetCrossEntropy(label_smoothing), jit_compile=jit_compile)
    history = classifier.fit(
        _one_iterator(train_dataset), epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=verbose,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    losses = [float(v) for v in history.history.get("loss", [])]
    if not losses or not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"Fine-tuning diverged (training loss {losses}); lower the learning rate.")
    logits, labels = predict_logits(classifier, test_dataset)
    if labels.max() >= num_classes:
        raise ValueError(f"Test labels go up to {int(labels.max())} but the classifier has {num_classes} classes.")
    return Result(
        {
            "protocol": "finetune",
            "finetune_top1": top1(logits, labels),
            "train_loss": losses,
            "epochs": epochs,
            "steps_per_epoch": steps_per_epoch,
            "batch_size": batch_size,
            "lr": lr,
            "layer_decay": layer_decay,
            "drop_path": drop_path,
            "label_smoothing": label_smoothing,
            "pooling": classifier.pooling,
            "num_classes": num_classes,
            "test_images": int(len(labels)),
            "seconds": time.perf_counter() - start,
        },
        classifier=classifier,
    )


def finetune_on_data(encoder, source, batch_size=128, train_images=None, test_images=None, seed=0,
                     rand_augment=9.0, random_erasing=0.25, mixup=0.8, cutmix=1.0, deterministic=True, verbose=0,
                     **options):
    """`finetune` on a data source (spec or `DataSource`): the training split through
    `data.finetune_dataset` (the augmentation flags; `deterministic` runs its augmentation in a
    sequential map, the same stream for the same `seed`), the test split resized; `options` go to
    `finetune` (epochs, base_lr, layer_decay, ...)."""
    from keras_mfm import data

    encoder = as_encoder(encoder)
    if seed is not None:  # the input's shuffle and crops also depend on TensorFlow's global seed
        keras.utils.set_random_seed(seed)
    splits = load_evaluation_data(source, train_images, test_images, seed)
    steps_per_epoch = splits.train.num_examples // batch_size
    if steps_per_epoch < 1:
        raise data.DataError(
            f"{splits.train.num_examples} training images are fewer than one batch of {batch_size}."
        )
    train = data.finetune_dataset(
        splits.train, encoder.image_size, batch_size, splits.num_classes, seed=seed, rand_augment=rand_augment,
        random_erasing=random_erasing, mixup=mixup, cutmix=cutmix, repeat=True,
        deterministic=deterministic,
    )
    test = data.evaluation_dataset(splits.test, encoder.image_size, batch_size, cache=False)
    result = finetune(encoder, train, test, splits.num_classes, steps_per_epoch=steps_per_epoch,
                      batch_size=batch_size, class_names=splits.class_names, seed=seed, verbose=verbose, **options)
    result.update({"rand_augment": rand_augment, "random_erasing": random_erasing, "mixup": mixup,
                   "cutmix": cutmix, "deterministic": deterministic, "train_images": splits.train.num_examples})
    return result
