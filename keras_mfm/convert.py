"""PyTorch checkpoint import, under its first name: the importers are `keras_mfm.interop` (one module
per source: `vit`, `resnet`; `reading` the files), the command line is `keras_mfm.cli.convert`. This
module re-exports both, and `python -m keras_mfm.convert CHECKPOINT --backbone ... --output ...` is
the command (`keras-mfm-convert`)."""

import sys

from keras_mfm.cli.convert import console_main, main
from keras_mfm.interop import *  # noqa: F403 - the public importers, under their first home
from keras_mfm.interop import __all__ as _importers

__all__ = [*_importers, "console_main", "main"]

if __name__ == "__main__":
    sys.exit(main())
