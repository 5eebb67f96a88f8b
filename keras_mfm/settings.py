"""Every setting of a pre-training run, written once: its default, its help and its flag group.

`PretrainConfig` is the record `training.pretrain` runs; `train.py` builds one command-line flag per
field from it (`keras_mfm.cli.train`), so a new option is one field here. A default that belongs to
a model or a layer (the frequency loss's exponent, the MAE decoder's width, the noise level of the
denoising baseline) is read from that class's signature, and a default that depends on the method
or on its authors' recipe is `None` ("the method's"), with the values listed in the help from the
registry (`keras_mfm.methods`) and the recipes (`keras_mfm.optimizers.recipes.RECIPES`).

A field's metadata (`setting`): `help`; `group` (a key of `GROUPS`); optionally `flag` (another
flag name, or a dict `{flag: value}` of switches that set the field), `nargs`, `choices`, `type`
(a parser for the flag's text), `zero_is_none` (the flag takes 0 for None).
"""

import dataclasses

from keras_mfm import methods
from keras_mfm.importance import (
    DEFAULT_IMPORTANCE_STORAGE,
    IMPORTANCE_LOCATIONS,
    IMPORTANCE_STORAGES,
    TRAINING_IMPORTANCE_LOCATION,
)
from keras_mfm.optimizers import recipes
from keras_mfm.layers.initializers import INIT_SCHEMES
from keras_mfm.layers.restoration import AdditiveNoise, Downsampling
from keras_mfm.models.mae import MAE
from keras_mfm.models.mfm import MFM

#: flag groups of `train.py --help`, in order
GROUPS = {
    "run": "run",
    "distribution": "distribution (keras_mfm.distribution; --batch-size is the global batch)",
    "model": "model",
    "mfm": "MFM (--method mfm)",
    "loss": "frequency loss (mfm, sr, deblur, denoise)",
    "restoration": "restoration baselines (--method sr|deblur|denoise)",
    "tokens": "token masking (--method mae|amt|famt|simmim|simmim_famt)",
    "optimisation": "optimisation (AdamW with PyTorch's update, per-step schedule; defaults: the method's authors' "
                    "recipe, listed below)",
}


def setting(default, help, group, **options):
    """A `PretrainConfig` field: `default`, and what its command-line flag needs (module docstring)."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **options})


default_of = methods.signature_default


def _per_method(position):
    """"0.75 mae, 0.45 amt/famt/simmim_famt, ..." from `methods.DEFAULT_RATIOS`."""
    values = {}
    for name, ratios in methods.DEFAULT_RATIOS.items():
        values.setdefault(f"{ratios[position]:g}", []).append(name)
    return ", ".join(f"{value} {'/'.join(names)}" for value, names in values.items())


def _per_recipe(read):
    """"mfm X, mae Y, simmim Z" of `read(recipe)` over the authors' recipes."""
    return ", ".join(f"{name} {read(recipe)}" for name, recipe in recipes.RECIPES.items())


@dataclasses.dataclass
class PretrainConfig:
    """Settings of one pre-training run (defaults: a few minutes on a laptop CPU)."""

    # -- run
    method: str = setting("mfm", "pre-training method, one of the registered methods listed below "
                                 "(keras_mfm.methods)", "run")
    data: str = setting("tfds:cifar10", "image folder with train/ and test/ (one sub-folder per class), a .tar.gz "
                                        "of one, or tfds:NAME (tfds:cifar10 needs the network)", "run")
    output: str = setting("runs/mfm", "output folder", "run")
    skip_unreadable: bool = setting(False, "leave out image files that cannot be decoded (empty, not an image, "
                                           "truncated), with a count, instead of stopping at the first (every image "
                                           "is decoded once first)", "run")
    seed: int = setting(0, "random seed (weights, masks, data order)", "run")
    tensorboard: bool = setting(False, "TensorBoard logs in OUTPUT/tensorboard: loss, lr, images/s per epoch and the "
                                       "reconstruction figure of 4 training images (tensorboard --logdir "
                                       "OUTPUT/tensorboard)", "run")
    tensorboard_every: int = setting(None, "epochs between reconstruction figures (default: 10% of --epochs, >= 1; "
                                           "the last epoch always)", "run")
    checkpoint_steps: int = setting(None, "also write the checkpoint every N steps inside an epoch (default: at "
                                          "epoch ends only)", "run")
    eval: str = setting("knn,linear", "score the encoder after pre-training: knn (weighted k-NN, k=20, T=0.07), "
                                      "linear (MAE's linear probe, 90 epochs on cached features), knn,linear (both, "
                                      "one feature extraction) or none; on seeded subsets of the splits", "run")
    eval_train_images: int = setting(10_000, "k-NN bank / linear-probe training images, a seeded subset (0: the "
                                             "whole training split)", "run", zero_is_none=True)
    eval_test_images: int = setting(2_000, "test images, a seeded subset (0: the whole test split)", "run",
                                    zero_is_none=True)
    monitor_knn: int = setting(None, "every N epochs, k-NN top-1 of the encoder on the --eval-train-images bank and "
                                     "--eval-test-images held-out images, in history.csv and TensorBoard as "
                                     "knn_top1 (default: off)", "run", metavar="N")
    jit_compile: str = setting(
        "auto", "XLA (default, Keras' auto: XLA on JAX, and on TensorFlow when a GPU/TPU is present; PyTorch eager)",
        "run", flag={"--no-jit": False, "--jit": True},
        switch_help={"--no-jit": "run the train step without XLA (default, Keras' auto: XLA on JAX, and on "
                                 "TensorFlow when a GPU/TPU is present; PyTorch eager)",
                     "--jit": "compile the train step with XLA on TensorFlow even on a CPU-only machine, "
                              "torch.compile on PyTorch"})
    precision: str = setting("float32", "dtype policy; FFTs, losses and the FAMT importance stay float32, "
                                        "mixed_float16 adds dynamic loss scaling", "run",
                             choices=("float32", "mixed_bfloat16", "mixed_float16"))
    verbose: int = setting(1, "progress bars (--quiet: none)", "run", flag={"--quiet": 0},
                           switch_help={"--quiet": "no progress bars"})
    # -- distribution
    distribute: bool = setting(False, "data-parallel over every device: keras.distribution.DataParallel on JAX, "
                                      "tf.distribute.MirroredStrategy on TensorFlow (MultiWorkerMirroredStrategy with "
                                      "TF_CONFIG); not available on PyTorch", "distribution")
    devices: int = setting(None, "with --distribute: use only the first N devices (default: all)", "distribution")
    cpu_devices: int = setting(None, "with --distribute: split the CPU into N virtual devices (to try distribution "
                                     "without accelerators)", "distribution")
    coordinator_address: str = setting(None, "several JAX hosts: host:port of process 0 (with --num-processes and "
                                             "--process-id)", "distribution")
    num_processes: int = setting(None, "several JAX hosts: their number", "distribution")
    process_id: int = setting(None, "several JAX hosts: this host's rank", "distribution")
    # -- model
    backbone: str = setting("vit_tiny", "vit_tiny | vit_small | vit_base | resnet50 (timm's v1.5 with zero-init "
                                        "last BatchNorms, MFM's; = resnet50_v1_5) | resnet50_v1 (Keras' "
                                        "application)", "model")
    image_size: int = setting(32, "training image size (square)", "model")
    patch_size: int = setting(4, "ViT patch size (the image size must be a multiple)", "model")
    depth: int = setting(None, "override the ViT preset's number of blocks", "model")
    # -- MFM
    radius: float = setting(None, "mask radius r1 in frequency-index units (default: 16/224 * image size, 2.29 at "
                                  "32)", "mfm")
    outer_radius: float = setting(None, "band masks: outer radius r2 > r1; low-pass then keeps |k|<r1 and |k|>=r2, "
                                        "high-pass the ring r1<=|k|<r2 (default: no band, the authors' 999)", "mfm")
    radius_range: tuple = setting(None, "draw each image's radius uniformly in [MIN, MAX) instead of a fixed "
                                        "--radius", "mfm", nargs=2, type=float, metavar=("MIN", "MAX"))
    p_low: float = setting(None, "probability of a low-pass mask (default: 0.5 for ViT, 0.3 for ResNet-50)", "mfm")
    masked_loss: bool = setting(default_of(MFM, "masked_loss"), "the frequency loss on the masked frequencies "
                                "(--full-spectrum-loss: the whole spectrum)", "mfm",
                                flag={"--full-spectrum-loss": False},
                                switch_help={"--full-spectrum-loss": "average the frequency loss over the whole "
                                                                     "spectrum instead of the masked frequencies"})
    # -- frequency loss
    loss: str = setting(default_of(MFM, "loss"), "frequency loss, or pixel: mean squared error of the normalised "
                                                 "pixels", "loss", choices=("frequency", "pixel"))
    gamma: float = setting(default_of(MFM, "gamma"), "exponent of the frequency distance (> 0)", "loss")
    focal: bool = setting(default_of(MFM, "focal"), "weight each frequency by the focal spectrum weight matrix "
                                                    "|P-T|^alpha, normalised to [0, 1] (focal frequency loss; off in "
                                                    "the authors' configs)", "loss")
    focal_alpha: float = setting(default_of(MFM, "focal_alpha"), "exponent alpha of the focal weight matrix", "loss")
    focal_log: bool = setting(default_of(MFM, "focal_log"), "focal weights log(1 + |P-T|^alpha)", "loss")
    focal_batch: bool = setting(default_of(MFM, "focal_batch"), "normalise the focal weights by the batch maximum "
                                                                "instead of each image and channel's", "loss")
    # -- restoration baselines
    sr_factor: int = setting(default_of(Downsampling, "factor"), "sr: bicubic down-sampling factor (must divide the "
                                                                 "image size)", "restoration")
    blur_sigma: float = setting(None, "deblur: Gaussian sigma in pixels (default: 5 at 224, scaled: 0.71 at 32)",
                                "restoration")
    blur_kernel_sizes: tuple = setting(None, "deblur: odd kernel sizes drawn per image (default: 7..21 at 224, "
                                             "scaled: 3 at 32)", "restoration", nargs="+", type=int)
    noise_sigma: float = setting(default_of(AdditiveNoise, "sigma"), "denoise: standard deviation of the additive "
                                 "Gaussian noise (images in [0, 1])", "restoration")
    # -- token masking
    mask_ratio: float = setting(None, f"share of masked patches (default: {_per_method(0)})", "tokens")
    throw_ratio: float = setting(None, f"share of thrown patches (default: {_per_method(1)})", "tokens")
    mask_patch_size: int = setting(None, "simmim: side of a random-masking unit in pixels, a multiple of the patch "
                                         "size (default: 2 x patch size, as SimMIM's 32 for 16)", "tokens")
    refresh_warmup: int = setting(None, "amt/famt: epochs of plain MAE before the first importance refresh (default: "
                                        "10% of --epochs, >= 1)", "tokens")
    refresh_interval: int = setting(None, "amt/famt: epochs between importance refreshes (default: 10% of --epochs, "
                                          ">= 1)", "tokens")
    importance_storage: str = setting(DEFAULT_IMPORTANCE_STORAGE, "amt/famt/simmim_famt: how the importance "
                                      "table is kept (uint8: one logarithmic byte per patch, a quarter of float32)",
                                      "tokens", choices=IMPORTANCE_STORAGES)
    importance_location: str = setting(TRAINING_IMPORTANCE_LOCATION, "amt/famt/simmim_famt: where the importance "
                                       "table is kept: host (host memory, each batch's rows added by the input "
                                       "pipeline; nothing replicated on the devices) or model (a model variable)",
                                       "tokens", choices=IMPORTANCE_LOCATIONS)
    decoder_dim: int = setting(default_of(MAE, "decoder_dim"), "MAE decoder width", "tokens")
    decoder_depth: int = setting(default_of(MAE, "decoder_depth"), "MAE decoder blocks", "tokens")
    decoder_heads: int = setting(default_of(MAE, "decoder_heads"), "MAE decoder heads", "tokens")
    norm_pix_loss: bool = setting(default_of(MAE, "norm_pix_loss"), "MAE: per-patch normalised pixel targets",
                                  "tokens")
    # -- optimisation
    epochs: int = setting(1, "epochs", "optimisation")
    steps_per_epoch: int = setting(None, "steps per epoch (default: one pass over the training split)",
                                   "optimisation")
    batch_size: int = setting(128, "global batch size", "optimisation")
    recipe: str = setting(None, f"optimisation recipe: {', '.join(recipes.RECIPES)} (default: the method's "
                                "authors', e.g. mae for famt)", "optimisation")
    init: str = setting(None, f"ViT weight-init scheme: {', '.join(INIT_SCHEMES)} (default: the method's authors')",
                        "optimisation")
    base_lr: float = setting(None, "peak learning rate per reference batch of the recipe (lr = base * batch / "
                                   f"reference; default: the recipe's: "
                                   f"{_per_recipe(lambda r: f'{r.base_lr:g} / {r.reference_batch_size}')})",
                             "optimisation")
    lr: float = setting(None, "absolute peak learning rate (overrides --base-lr)", "optimisation")
    min_lr: float = setting(None, "absolute final learning rate (default: the recipe's, scaled with the batch: "
                                  f"{_per_recipe(lambda r: f'{r.min_lr:g} / {r.reference_batch_size}')})",
                            "optimisation")
    warmup_epochs: float = setting(None, "warm-up epochs (default: the recipe's share of --epochs: "
                                         f"{_per_recipe(lambda r: f'{r.warmup_fraction:.1%}')})", "optimisation")
    weight_decay: float = setting(None, "AdamW weight decay (default: the recipe's: "
                                        f"{_per_recipe(lambda r: f'{r.weight_decay:g}')}; which variables it skips is "
                                        "the recipe's)", "optimisation")
    clip_norm: float = setting(None, "global gradient-norm clipping, 0: off (default: the recipe's: "
                                     f"{_per_recipe(lambda r: f'{r.clip_norm:g}' if r.clip_norm else 'off')})",
                               "optimisation")

    def to_json(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
