#!/usr/bin/env python
"""FAMT (mask 0.45, throw 0.40) against MAE (mask 0.75): time per step, and total time on the
authors' refresh schedule.

    python benchmarks/famt_vs_mae.py --backend torch
    python benchmarks/famt_vs_mae.py --backend jax --batch-size 128 --steps 20

Part 1, step time: the same ViT and batch, `model.fit` on fixed random images, the importance
phase of FAMT (a filled table), after warm-up steps (compilation excluded).
Part 2, a short run on real CIFAR-10 images (a seeded subset of the training split): `--epochs`
epochs of each method with the real pipeline (crops, flips, index/box/flip for FAMT), FAMT
refreshing its importance table on the authors' schedule (`training.refresh_schedule`: first
after 10 % of the epochs, then every 10 %: epochs 1..9 of 10, 40..360 of 400); wall time in all,
refreshes included.
Part 3, the total-time ratio FAMT / MAE at other epoch counts, from part 2's measured times per
epoch and per refresh: `(E * famt_epoch + R(E) * refresh) / (E * mae_epoch)` with R(E) the
refreshes of that schedule. Every term grows with the number of images alike, so the ratio holds
for any training-set size. Prints markdown tables.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default=None, choices=("tensorflow", "jax", "torch"))
    parser.add_argument("--backbone", default="vit_tiny")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--decoder-dim", type=int, default=512, help="MAE decoder width (authors: 512)")
    parser.add_argument("--decoder-depth", type=int, default=8, help="decoder blocks (authors: 8)")
    parser.add_argument("--decoder-heads", type=int, default=16, help="decoder heads (authors: 16)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                       "cifar10-jpeg.tar.gz"))
    parser.add_argument("--run-images", type=int, default=2048, help="training images of the short run (0: skip)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the short run")
    parser.add_argument("--project", default="5,10,100,400", help="epoch counts of part 3 (comma-separated)")
    return parser.parse_args()


def build(method, args, num_images):
    from keras_mfm import backbones, methods

    encoder = backbones.get_backbone(args.backbone, args.image_size, patch_size=args.patch_size,
                                     position_embedding="sincos")
    options = {"seed": 0, "decoder_dim": args.decoder_dim, "decoder_depth": args.decoder_depth,
               "decoder_heads": args.decoder_heads}
    if method != "mae":
        options["num_images"] = num_images
    model = methods.build_method(method, encoder, **options)
    model.build()
    import keras

    model.compile(optimizer=keras.optimizers.AdamW(1e-4))
    return model


def step_time(method, args):
    import numpy as np

    from keras_mfm.models.token_masking import whole_image_inputs

    batch = args.batch_size
    model = build(method, args, num_images=batch)
    rng = np.random.default_rng(0)
    images = rng.random((batch, args.image_size, args.image_size, 3)).astype("float32")
    inputs = images
    if method != "mae":
        model.set_importance(rng.random((batch, model.encoder.num_patches)).astype("float32") + 0.01)
        inputs = whole_image_inputs(images)
    import tensorflow as tf

    def repeat(n):
        return tf.data.Dataset.from_tensors(inputs).repeat(n)

    model.fit(repeat(args.warmup_steps), verbose=0)
    start = time.perf_counter()
    model.fit(repeat(args.steps), verbose=0)
    return (time.perf_counter() - start) / args.steps, model.counts


def short_run(method, args):
    from keras_mfm import data
    from keras_mfm.importance import ImportanceRefresh

    split = data.load_split(data.resolve_data(args.data), "train", limit=args.run_images, seed=0)
    full = data.load_split(data.resolve_data(args.data), "train")
    model = build(method, args, num_images=full.num_examples)
    dataset = data.pretraining_dataset(split, args.image_size, args.batch_size, seed=0, with_geometry=method != "mae")
    callbacks, refreshes = [], []
    if method != "mae":
        warmup, interval = authors_schedule(args.epochs)
        refresh = ImportanceRefresh(lambda: data.indexed_dataset(split, args.image_size, 256), warmup_epochs=warmup,
                                    interval=interval)
        callbacks.append(refresh)
    start = time.perf_counter()
    history = model.fit(dataset, epochs=args.epochs, callbacks=callbacks, verbose=0)
    total = time.perf_counter() - start
    if method != "mae":
        refreshes = [seconds for _, seconds in refresh.history]
    return total, refreshes, history.history["loss"][-1]


def authors_schedule(epochs):
    """(warm-up epochs, interval) of the refreshes for a run of `epochs`, as train.py sets them."""
    from keras_mfm import training
    from keras_mfm.settings import PretrainConfig

    return training.refresh_schedule(PretrainConfig(method="famt", epochs=epochs))


def refresh_count(epochs):
    """How many refreshes `ImportanceRefresh` makes in `epochs` on the authors' schedule."""
    from keras_mfm.importance import ImportanceRefresh

    callback = ImportanceRefresh(lambda: (), *authors_schedule(epochs))
    return sum(callback.due(epoch) for epoch in range(epochs))


def projected_ratio(epochs, mae_epoch, famt_epoch, refresh):
    """FAMT / MAE total time for `epochs` epochs: `(E * famt_epoch + R(E) * refresh) / (E * mae_epoch)`."""
    return (epochs * famt_epoch + refresh_count(epochs) * refresh) / (epochs * mae_epoch)


def main():
    args = parse_args()
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(0)
    print(f"backend {keras.backend.backend()}, {args.backbone}/{args.patch_size} at {args.image_size}, "
          f"batch {args.batch_size}, decoder {args.decoder_dim}-d x {args.decoder_depth} blocks, "
          f"{os.cpu_count()} CPU cores\n")
    print("| method | masked / thrown / visible | s per step | images/s |")
    print("|---|---|---|---|")
    times = {}
    for method in ("mae", "famt"):
        seconds, counts = step_time(method, args)
        times[method] = seconds
        print(f"| {method} | {counts[0]} / {counts[1]} / {counts[2]} | {seconds:.3f} | "
              f"{args.batch_size / seconds:.0f} |", flush=True)
    print(f"\nFAMT step time / MAE step time: {times['famt'] / times['mae']:.2f}\n")
    if args.run_images:
        warmup, interval = authors_schedule(args.epochs)
        print(f"Short run: {args.epochs} epochs of {args.run_images} CIFAR-10 images "
              f"({args.run_images // args.batch_size} steps each); FAMT refreshes at epoch {warmup}, then every "
              f"{interval} ({refresh_count(args.epochs)} refreshes)\n")
        print("| method | wall time (s) | of which refreshes (s) | per epoch of training (s) | last epoch loss |")
        print("|---|---|---|---|---|")
        runs = {}
        for method in ("mae", "famt"):
            total, refreshes, loss = short_run(method, args)
            runs[method] = (total, refreshes)
            print(f"| {method} | {total:.1f} | {sum(refreshes):.1f} | {(total - sum(refreshes)) / args.epochs:.2f} | "
                  f"{loss:.4f} |", flush=True)
        (mae_total, _), (famt_total, refreshes) = runs["mae"], runs["famt"]
        print(f"\nFAMT / MAE total time, refreshes included: {famt_total / mae_total:.2f}\n")
        mae_epoch = mae_total / args.epochs
        famt_epoch = (famt_total - sum(refreshes)) / args.epochs
        refresh = sum(refreshes) / max(1, len(refreshes))
        print(f"Projected from these times (one refresh = {refresh / mae_epoch:.2f} MAE epochs):\n")
        print("| epochs | refreshes | FAMT / MAE total time |")
        print("|---|---|---|")
        for epochs in (int(e) for e in args.project.split(",")):
            ratio = projected_ratio(epochs, mae_epoch, famt_epoch, refresh)
            print(f"| {epochs} | {refresh_count(epochs)} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
