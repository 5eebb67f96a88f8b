#!/usr/bin/env python
"""Score a pre-trained encoder (an encoder.keras written by train.py).

    python eval.py knn --encoder runs/mfm/encoder.keras --data ../shared/data/cifar10-jpeg.tar.gz

Sub-commands: knn (weighted k-NN on L2-normalised features, k=20, T=0.07 as in DINO).
The linear probe, fine-tuning and robustness protocols are the evaluation issue's work.
"""

import argparse
import json
import os
import sys

BACKENDS = ("tensorflow", "jax", "torch")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    knn = commands.add_parser("knn", help="weighted k-NN top-1 (frozen encoder)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = knn.add_mutually_exclusive_group(required=True)
    source.add_argument("--encoder", help="encoder.keras from train.py")
    source.add_argument("--random-init", metavar="BACKBONE",
                        help="evaluate a freshly initialised encoder of this preset instead (the baseline)")
    knn.add_argument("--patch-size", type=int, default=4, help="patch size for --random-init ViTs")
    knn.add_argument("--data", required=True, help="image folder, .tar.gz of one, or tfds:NAME")
    knn.add_argument("--image-size", type=int, default=None, help="default: the encoder's")
    knn.add_argument("--batch-size", type=int, default=256)
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--pooling", choices=("cls", "mean"), default=None, help="ViT features (default: cls)")
    knn.add_argument("--train-images", type=int, default=0, help="seeded subset of the training split (0: all)")
    knn.add_argument("--test-images", type=int, default=0, help="seeded subset of the test split (0: all)")
    knn.add_argument("--output", default=None, help="write the metrics as JSON here")
    knn.add_argument("--backend", choices=BACKENDS, default=None, help="Keras backend")
    knn.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from keras_mfm import backbones, data, evaluation, training

    try:
        keras.utils.set_random_seed(args.seed)
        if args.encoder:
            encoder = training.load_model_file(args.encoder, "encoder")
        else:
            patch = args.patch_size if args.random_init.startswith("vit") else None
            encoder = backbones.get_backbone(args.random_init, args.image_size or 32, patch_size=patch)
        image_size = encoder.image_size
        if args.image_size and (args.image_size, args.image_size) != tuple(image_size):
            raise ValueError(f"The encoder was built for {image_size[0]}x{image_size[1]} images, not {args.image_size}.")
        metrics = evaluation.evaluate_knn_on_data(
            encoder, args.data, args.batch_size, args.train_images or None, args.test_images or None,
            seed=args.seed, k=args.k, temperature=args.temperature, pooling=args.pooling,
        )
    except (data.DataError, ValueError, training.TrainingError) as error:
        print(f"eval.py: error: {error}", file=sys.stderr)
        return 2
    metrics.update({"encoder": args.encoder or f"random-init {args.random_init}", "backend": keras.backend.backend()})
    print(f"knn: top-1 {metrics['knn_top1']:.2f}% ({metrics['train_images']} train / {metrics['test_images']} test "
          f"images, k={metrics['k']}, T={metrics['temperature']}, {metrics['seconds']:.0f} s)")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(metrics, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
