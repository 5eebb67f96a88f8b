#!/usr/bin/env python
"""Score a pre-trained encoder, or look at a run: `python eval.py --help` (the same as `keras-mfm-eval`).

    python eval.py knn --encoder runs/mfm/encoder.keras --data ../shared/data/cifar10-jpeg.tar.gz
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

from keras_mfm.cli.evaluate import *  # noqa: E402,F401,F403
from keras_mfm.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
