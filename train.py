#!/usr/bin/env python
"""Pre-train an encoder with keras_mfm: `python train.py --help` (the same as `keras-mfm-train`).

    python train.py --data ../shared/data/cifar10-jpeg.tar.gz --epochs 1 --steps-per-epoch 20
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from a clone without installing

if __name__ == "__main__":  # --backend takes effect only if set before keras_mfm imports Keras
    for _i, _arg in enumerate(sys.argv[1:-1]):
        if _arg == "--backend":
            os.environ["KERAS_BACKEND"] = sys.argv[_i + 2]
    if "--verbose" not in sys.argv:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_mfm.cli.train import main, parse_args  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
