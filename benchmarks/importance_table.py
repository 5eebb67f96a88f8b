#!/usr/bin/env python
"""The AMT/FAMT importance table: its size, what compact storage does to the masks, the refresh speed.

    OMP_NUM_THREADS=1 nice python benchmarks/importance_table.py            # every part, CPU-friendly sizes
    python benchmarks/importance_table.py --parts sizes,agreement           # some parts

Parts (each a markdown table; the measured ones run in their own processes):

- `sizes`: table bytes and checkpoint size (weights + AdamW's two moments + table) computed for
  CIFAR-10 (50,000 x 64 patches, ViT-Tiny/4 at 32) and ImageNet-1K (1,281,167 x 196, ViT-B/16 at
  224), with MAE's decoder (512-d, 8 blocks), per storage.
- `table`: measured, per storage and location (`--storages`, `--locations`), in a fresh process: an
  MAE whose table holds `--images` maps of 196 patches (a 1-block, 64-d encoder, so that the table
  dominates), as a model variable or on the host (`importance_location`), filled by `score_images`
  batch by batch from a synthetic scorer, encoded into the storage as it goes (`storage=`, as a
  refresh does), stored by `set_importance`, saved with `model.save`; seconds, the file's size and
  the peak resident memory (`resource.getrusage`).
- `agreement`: the same Gumbel noise drawn on float32 weights and on their float16 / uint8 storage:
  the share of images whose masked set (and visible set) is identical, the mean overlap of the masked
  sets and the Kendall tau of the two draw orders; for scale, the same numbers between two draws
  of the float32 weights with different noise. On smooth log-normal maps (14 x 14) and on FAMT maps
  of real CIFAR-10 images scored by a ViT-Tiny/4 (8 x 8).
- `scorer`: refresh images/s of `ImportanceScorer.predict_on_batch` (Keras, `--backend`) against the
  same ViT written here in plain PyTorch (`torch.nn`, the Keras weights copied, the FAMT formula in
  torch), with the largest difference between their maps.
- `devices`: JAX (or TensorFlow) with 1 and 2 virtual CPU devices, each single-threaded: seconds to
  score `--refresh-images` images with the shared refresh (`distribution.SharedInference`) and, on
  2 devices, with `predict_on_batch` (every device scoring the whole batch).
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
STORAGES = ("float32", "float16", "uint8")
DATA = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="sizes,table,agreement,scorer,devices")
    parser.add_argument("--backend", default="torch", choices=("torch", "jax", "tensorflow"),
                        help="backend of the `scorer` part")
    parser.add_argument("--images", type=int, default=1_281_167, help="rows of the measured table")
    parser.add_argument("--storages", default=",".join(STORAGES), help="storages of the table part")
    parser.add_argument("--locations", default="model,host", help="importance_location of the table part")
    parser.add_argument("--agreement-images", type=int, default=2000)
    parser.add_argument("--scorer-batches", type=int, default=4, help="timed batches of 256 (scorer part)")
    parser.add_argument("--refresh-images", type=int, default=1024, help="images scored in the devices part")
    parser.add_argument("--devices-backend", default="jax", choices=("jax", "tensorflow"))
    parser.add_argument("--depth", type=int, default=12, help="ViT-Tiny/4 blocks (scorer and devices parts)")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_worker(args, name, backend, extra=(), env=None):
    """`python this --worker NAME` in a fresh process; returns its last stdout line as JSON."""
    environment = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, *extra]
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"worker {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def megabytes(n):
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


# -- sizes (computed) -------------------------------------------------------------------------------
def worker_parameters(_args):
    """Weights and trainable parameters of MAE with the authors' decoder, without the table."""
    import numpy as np

    from keras_mfm import backbones
    from keras_mfm.models.mae import MAE

    out = {}
    for name, backbone, size, patch in (("cifar10", "vit_tiny", 32, 4), ("imagenet", "vit_base", 224, 16)):
        encoder = backbones.get_backbone(backbone, size, patch_size=patch, position_embedding="sincos")
        model = MAE(encoder)
        model.build()
        out[name] = {"weights": int(sum(np.prod(v.shape) for v in model.weights)),
                     "trainable": int(sum(np.prod(v.shape) for v in model.trainable_weights))}
    return out


def part_sizes(args):
    from keras_mfm.importance import table_bytes

    parameters = run_worker(args, "parameters", "torch")
    rows = []
    for name, label, images, patches in (("cifar10", "CIFAR-10, ViT-Tiny/4 at 32", 50_000, 64),
                                          ("imagenet", "ImageNet-1K, ViT-B/16 at 224", 1_281_167, 196)):
        model_bytes = 4 * parameters[name]["weights"] + 8 * parameters[name]["trainable"]  # + AdamW m, v
        for storage in STORAGES:
            size = table_bytes(images, patches, storage)
            rows.append([label, f"{images:,} x {patches}", storage, megabytes(size), megabytes(size + model_bytes),
                         f"{table_bytes(images, patches, 'float32') / size:.2f}x"])
    return table(["data set", "table", "storage", "table", "checkpoint (model + AdamW + table)", "smaller by"], rows)


# -- table (measured) -------------------------------------------------------------------------------
def current_memory():
    """Resident memory of this process now, bytes (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker_table(args):
    import resource

    import keras
    import numpy as np

    from keras_mfm import backbones
    from keras_mfm.importance import score_images
    from keras_mfm.models.mae import MAE

    storage, location, images = os.environ["BENCH_STORAGE"], os.environ["BENCH_LOCATION"], args.images
    start = time.perf_counter()
    encoder = backbones.ViTBackbone(image_size=224, patch_size=16, hidden_dim=64, depth=1, num_heads=2,
                                    position_embedding="sincos")
    model = MAE(encoder, mask_ratio=0.45, throw_ratio=0.40, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                importance="famt", num_images=images, importance_storage=storage, importance_location=location,
                seed=0)
    model.build()
    built = time.perf_counter()
    resident = {"built": current_memory()}
    placeholder = np.zeros((1, 1, 1, 3), "float32")  # the synthetic scorer does not look at images

    def batches(size=8192):
        for first in range(0, images, size):
            yield placeholder, np.arange(first, min(first + size, images))

    def synthetic_scorer(_images, state={"batch": 0}):  # noqa: B006 - a counter across calls
        state["batch"] += 1
        rows = min(8192, images - (state["batch"] - 1) * 8192)
        rng = np.random.default_rng(state["batch"])
        return np.exp(rng.normal(0.0, 1.5, size=(rows, 196))).astype("float32")

    scored = score_images(encoder, batches(), images, shared=synthetic_scorer, scorer=object(), storage=storage)
    filled = time.perf_counter()
    resident["filled"] = current_memory()
    model.set_importance(scored)
    del scored
    stored = time.perf_counter()
    resident["stored"] = current_memory()  # the host's refresh table freed
    path = os.path.join(os.environ["BENCH_DIR"], f"table_{storage}_{location}.keras")
    model.save(path)
    saved = time.perf_counter()
    size = os.path.getsize(path)
    os.remove(path)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    table = model.host_table.values if location == "host" else keras.ops.convert_to_numpy(model.importance_table)
    return {"build": built - start, "fill": filled - built, "store": stored - filled, "save": saved - stored,
            "file": size, "peak": peak, "table_bytes": int(table.nbytes), "resident": resident}


def part_table(args):
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for storage, location in [(s, place) for s in args.storages.split(",") for place in args.locations.split(",")]:
            r = run_worker(args, "table", "torch", ["--images", str(args.images)],
                           env={"BENCH_STORAGE": storage, "BENCH_LOCATION": location, "BENCH_DIR": directory})
            memory = r["resident"]
            rows.append([storage, location, megabytes(r["table_bytes"]), megabytes(r["file"]),
                         megabytes(memory["built"]), megabytes(memory["filled"]), megabytes(memory["stored"]),
                         megabytes(r["peak"]),
                         f"{r['fill']:.1f}", f"{r['store']:.1f}", f"{r['save']:.1f}"])
    return table([f"storage ({args.images:,} x 196)", "location", "table", "checkpoint file", "memory: model built",
                  "+ refresh table (in the storage)", "stored, refresh table freed", "peak (getrusage)",
                  "fill s (score_images)", "store s (set_importance)", "save s (model.save)"], rows)


# -- agreement ----------------------------------------------------------------------------------------
def kendall_tau(order_a, order_b):
    """Kendall tau of two draw orders per row (ranks of every token), averaged over the rows."""
    import numpy as np

    rank_a, rank_b = np.argsort(order_a, axis=1), np.argsort(order_b, axis=1)
    n = rank_a.shape[1]
    upper = np.triu_indices(n, 1)
    taus = []
    for a, b in zip(rank_a, rank_b):
        da = np.sign(a[:, None] - a[None, :])[upper]
        db = np.sign(b[:, None] - b[None, :])[upper]
        taus.append(float(np.mean(da * db)))
    return float(np.mean(taus))


def agreement_rows(label, weights, seed=0):
    import keras
    import numpy as np

    from keras_mfm import masking
    from keras_mfm.importance import decode_rows, encode_table

    def draw(w, s):
        selection = masking.select_tokens(w, 0.45, 0.40, seed=s)
        return [keras.ops.convert_to_numpy(t) for t in (selection.masked, selection.visible, selection.order)]

    def compare(a, b):
        same_masked = np.mean([np.array_equal(x, y) for x, y in zip(a[0], b[0])])
        same_visible = np.mean([np.array_equal(x, y) for x, y in zip(a[1], b[1])])
        overlap = np.mean([len(np.intersect1d(x, y)) / len(x) for x, y in zip(a[0], b[0])])
        return [f"{same_masked:.1%}", f"{same_visible:.1%}", f"{overlap:.2%}", f"{kendall_tau(a[2], b[2]):.4f}"]

    reference = draw(weights, seed)
    rows = []
    for storage in ("float16", "uint8"):
        values, steps = encode_table(weights, storage)
        decoded = keras.ops.convert_to_numpy(decode_rows(values, steps))
        relative = weights / weights.max(axis=1, keepdims=True)
        key_error = float(np.max(np.abs(np.log(np.maximum(decoded, 1e-37)) - np.log(np.maximum(relative, 1e-37)))))
        rows.append([label, f"float32 vs {storage}", f"{key_error:.4f}", *compare(reference, draw(decoded, seed))])
    rows.append([label, "float32, another draw", "-", *compare(reference, draw(weights, seed + 1))])
    return rows


def smooth_lognormal_maps(count, grid=14, sigma=1.0, seed=0):
    """Spatially smooth positive maps: a Gaussian-blurred normal field (blur 1.5 cells), scaled to a
    log standard deviation `sigma`, exponentiated (blobs of high importance over a low background)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    field = rng.normal(size=(count, grid, grid))
    k = np.arange(grid)
    blur = np.exp(-((k[:, None] - k[None, :]) ** 2) / (2 * 1.5**2))
    field = np.einsum("ij,bjk,lk->bil", blur, field, blur)
    field = (field - field.mean(axis=(1, 2), keepdims=True)) / field.std(axis=(1, 2), keepdims=True)
    return np.exp(sigma * field).reshape(count, grid * grid).astype("float32")


def worker_agreement(args):
    import numpy as np

    rows = []
    for sigma in (0.5, 1.0, 2.0):
        rows += agreement_rows(f"smooth log-normal 14x14, log std {sigma}",
                               smooth_lognormal_maps(args.agreement_images, sigma=sigma, seed=int(sigma * 10)))
    if os.path.isfile(args.data):
        from keras_mfm import backbones, data
        from keras_mfm.importance import score_images

        split = data.load_split(data.resolve_data(args.data), "train", limit=args.agreement_images)
        encoder = backbones.get_backbone("vit_tiny", 32, patch_size=4, depth=args.depth, position_embedding="sincos",
                                         init="mae")
        scored = score_images(encoder, data.indexed_dataset(split, 32, 256), 60_000)  # rows: the images' indices
        maps = scored[np.any(scored != 1.0, axis=1)]
        spread = float(np.median(np.log(maps.max(axis=1) / np.maximum(maps.min(axis=1), 1e-37))))
        rows += agreement_rows(f"FAMT of CIFAR-10 (ViT-Tiny/4, MAE init), median log(max/min) {spread:.1f}", maps)
    return {"rows": rows}


def part_agreement(args):
    rows = run_worker(args, "agreement", "torch", ["--agreement-images", str(args.agreement_images),
                                                   "--depth", str(args.depth), "--data", args.data])["rows"]
    return table(["maps", "draws compared", "largest key error", "same masked set", "same visible set",
                  "masked overlap", "Kendall tau of the orders"], rows)


# -- scorer vs plain PyTorch ------------------------------------------------------------------------
def torch_vit_famt(encoder):
    """The Keras ViT `encoder` and FAMT's importance in plain PyTorch (torch.nn), weights copied."""
    import numpy as np
    import torch
    from torch import nn

    def weight(variable):
        return torch.tensor(np.asarray(__import__("keras").ops.convert_to_numpy(variable)))

    class Block(nn.Module):
        def __init__(self, block, heads):
            super().__init__()
            dim = block.hidden_dim
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.fc1, self.fc2 = nn.Linear(dim, int(dim * block.mlp_ratio)), nn.Linear(int(dim * block.mlp_ratio), dim)
            with torch.no_grad():
                for mine, theirs in ((self.norm1, block.norm1), (self.norm2, block.norm2)):
                    mine.weight.copy_(weight(theirs.gamma))
                    mine.bias.copy_(weight(theirs.beta))
                for mine, theirs in ((self.qkv, block.attention.qkv), (self.proj, block.attention.proj),
                                     (self.fc1, block.fc1), (self.fc2, block.fc2)):
                    mine.weight.copy_(weight(theirs.kernel).T)
                    mine.bias.copy_(weight(theirs.bias))

        def forward(self, x):
            b, t, d = x.shape
            qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attention = torch.softmax((q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
            x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, t, d))
            x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))
            return x, attention

    class ViTFAMT(nn.Module):
        def __init__(self):
            super().__init__()
            p, dim = encoder.patch_size, encoder.hidden_dim
            self.embed = nn.Conv2d(3, dim, p, stride=p)
            with torch.no_grad():
                self.embed.weight.copy_(weight(encoder.patch_embedding.kernel).permute(3, 2, 0, 1))
                self.embed.bias.copy_(weight(encoder.patch_embedding.bias))
            self.register_buffer("cls", weight(encoder.cls_token).reshape(1, 1, dim))
            self.register_buffer("position", weight(encoder.position_embedding).reshape(1, -1, dim))
            self.register_buffer("mean", torch.tensor(np.asarray(encoder.mean, "float32")).reshape(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(np.asarray(encoder.std, "float32")).reshape(1, 3, 1, 1))
            self.blocks = nn.ModuleList(Block(block, encoder.num_heads) for block in encoder.blocks)
            n = encoder.num_patches
            k = torch.arange(n, dtype=torch.float64)
            sigma = 0.15 * n / 2
            self.register_buffer("kernel", (1 - torch.exp(-((k - (n - 1) / 2) ** 2) / (2 * sigma**2))).float())

        def forward(self, images):  # (B, H, W, 3) in [0, 1]
            x = (images.permute(0, 3, 1, 2) - self.mean) / self.std
            x = self.embed(x).flatten(2).transpose(1, 2) + self.position[:, 1:]
            x = torch.cat([(self.cls + self.position[:, :1]).expand(len(x), -1, -1), x], dim=1)
            for block in self.blocks:
                x, attention = block(x)
            score = ((attention[:, :, 0, 1:] * attention[:, :, 1:, 0].mean(-1, keepdim=True)).mean(1)
                     + (attention[:, :, 1:, 1:].mean(2) * attention[:, :, 0:1, 0]).mean(1))
            tokens = x[:, 1:]
            low = torch.fft.ifft(torch.fft.fft(tokens.transpose(1, 2), norm="ortho") * self.kernel, norm="ortho")
            energy = low.abs().sum(1) / tokens.abs().sum(2).mean(1, keepdim=True).clamp_min(1e-30)
            return score * energy

    return ViTFAMT().eval()


def worker_scorer(args):
    import numpy as np
    import torch

    from keras_mfm import backbones
    from keras_mfm.importance import ImportanceScorer

    encoder = backbones.get_backbone("vit_tiny", 32, patch_size=4, depth=args.depth, position_embedding="sincos",
                                     init="mae")
    scorer = ImportanceScorer(encoder, "famt")
    images = np.random.default_rng(0).uniform(size=(256, 32, 32, 3)).astype("float32")
    keras_maps = np.asarray(scorer.predict_on_batch(images))  # builds the encoder
    reference = torch_vit_famt(encoder)

    def timed(fn):
        fn()  # warm-up (compilation)
        times = []
        for _ in range(args.scorer_batches):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    with torch.inference_mode():
        torch_maps = reference(torch.tensor(images)).numpy()
        reference_seconds = timed(lambda: reference(torch.tensor(images)))
    keras_seconds = timed(lambda: scorer.predict_on_batch(images))
    difference = float(np.max(np.abs(keras_maps - torch_maps) / np.abs(torch_maps).max(axis=1, keepdims=True)))
    return {"keras": 256 / keras_seconds, "reference": 256 / reference_seconds, "difference": difference}


def part_scorer(args):
    r = run_worker(args, "scorer", args.backend, ["--depth", str(args.depth), "--scorer-batches",
                                                   str(args.scorer_batches)])
    return table(["implementation", "refresh images/s", "vs plain PyTorch", "largest difference / row max"], [
        [f"Keras {args.backend} `ImportanceScorer.predict_on_batch`", f"{r['keras']:.0f}",
         f"{r['keras'] / r['reference']:.2f}x", f"{r['difference']:.1e}"],
        ["plain PyTorch (`torch.nn`, same weights), inference mode", f"{r['reference']:.0f}", "1.00x", "-"],
    ])


# -- 1 vs 2 devices ---------------------------------------------------------------------------------
def worker_devices(args):
    import keras
    import numpy as np

    from keras_mfm import backbones, distribution
    from keras_mfm.importance import ImportanceScorer

    count = int(os.environ["BENCH_DEVICES"])
    replication = distribution.setup(True, cpu_devices=count) if count > 1 else distribution.Replication()
    with replication.scope():
        keras.utils.set_random_seed(0)
        encoder = backbones.get_backbone("vit_tiny", 32, patch_size=4, depth=args.depth, position_embedding="sincos",
                                         init="mae")
        encoder(np.zeros((1, 32, 32, 3), "float32"))
        holder = keras.Sequential([encoder])  # a model built in the scope: its strategy (TensorFlow)
    scorer = ImportanceScorer(encoder, "famt")
    images = np.random.default_rng(0).uniform(size=(args.refresh_images, 32, 32, 3)).astype("float32")
    ways = {"shared": distribution.SharedInference(scorer, strategy_of=holder)}
    if count > 1:
        ways["whole batch per device"] = scorer.predict_on_batch
    out = {}
    for name, predict in ways.items():
        predict(images[:256])  # warm-up: compilation
        start = time.perf_counter()
        maps = np.concatenate([np.asarray(predict(images[i:i + 256])) for i in range(0, len(images), 256)])
        out[name] = {"seconds": time.perf_counter() - start, "checksum": float(np.sum(maps))}
    return out


def part_devices(args):
    backend = args.devices_backend
    threads = {"jax": {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"},
               "tensorflow": {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "2"}}[backend]
    results = {}
    for count in (1, 2):
        env = dict(threads, BENCH_DEVICES=str(count), OMP_NUM_THREADS="1")
        if backend == "jax":
            env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={count}"
        results[count] = run_worker(args, "devices", backend, ["--depth", str(args.depth), "--refresh-images",
                                                               str(args.refresh_images)], env=env)
    one = results[1]["shared"]["seconds"]
    rows = [["1", "one device (`predict_on_batch`)", f"{one:.2f}", f"{args.refresh_images / one:.0f}", "1.00x"]]
    for name, r in results[2].items():
        label = "shared refresh (`SharedInference`)" if name == "shared" else "every device scores the whole batch"
        rows.append(["2", label, f"{r['seconds']:.2f}", f"{args.refresh_images / r['seconds']:.0f}",
                     f"{one / r['seconds']:.2f}x"])
    one_sum, two_sum = results[1]["shared"]["checksum"], results[2]["shared"]["checksum"]
    header = [f"{backend} devices", f"refresh of {args.refresh_images} images, ViT-Tiny/4 depth {args.depth}",
              "seconds", "images/s", "speed-up"]
    return table(header, rows) + f"\n\n(sum of the maps, 2 devices vs 1: relative difference " \
        f"{abs(two_sum - one_sum) / abs(one_sum):.1e})"


PARTS = {"sizes": part_sizes, "table": part_table, "agreement": part_agreement, "scorer": part_scorer,
         "devices": part_devices}
WORKERS = {"parameters": worker_parameters, "table": worker_table, "agreement": worker_agreement,
           "scorer": worker_scorer, "devices": worker_devices}


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    start = time.perf_counter()
    for name in args.parts.split(","):
        part_start = time.perf_counter()
        print(f"\n### {name}\n\n{PARTS[name](args)}\n\n({time.perf_counter() - part_start:.0f} s)", flush=True)
    print(f"\nall parts: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
