"""Evaluation protocols for pre-trained encoders (each a function returning a `Result` dict).

- `evaluate_knn`: weighted k-NN on frozen features (DINO: k = 20, T = 0.07).
- `linear_probe`: BatchNorm (no affine) + linear head on frozen features, LARS (MAE).
- `finetune`: end-to-end fine-tuning with layer-wise lr decay, drop path, label smoothing,
  RandAugment / RandomErasing / MixUp / CutMix (MAE/MFM recipe).
- `KNNMonitor`: a callback logging k-NN top-1 every N epochs of pre-training.
- `robustness`: top-1 under common corruptions (severities 1-5) and FGSM.

Each has an `*_on_data(encoder_or_classifier, "--data spec", ...)` form that loads the splits.
"""

from keras_mfm.evaluation.features import (
    EvaluationData,
    Features,
    Result,
    extract_features,
    extract_split_features,
    load_evaluation_data,
    predict_logits,
    top1,
)
from keras_mfm.evaluation.finetune import SoftTargetCrossEntropy, copy_encoder, finetune, finetune_on_data
from keras_mfm.evaluation.frozen import FROZEN_PROTOCOLS, evaluate_frozen_on_data
from keras_mfm.evaluation.knn import evaluate_knn, evaluate_knn_on_data, knn_accuracy, knn_predict
from keras_mfm.evaluation.monitor import KNNMonitor
from keras_mfm.evaluation.linear_probe import (
    linear_probe,
    linear_probe_on_data,
    linear_probe_on_features,
    train_linear_head,
)
from keras_mfm.evaluation.robustness import check_class_count, fgsm, robustness, robustness_on_data

__all__ = [
    "EvaluationData",
    "FROZEN_PROTOCOLS",
    "Features",
    "KNNMonitor",
    "Result",
    "SoftTargetCrossEntropy",
    "check_class_count",
    "copy_encoder",
    "evaluate_knn",
    "evaluate_frozen_on_data",
    "evaluate_knn_on_data",
    "extract_features",
    "extract_split_features",
    "fgsm",
    "finetune",
    "finetune_on_data",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "linear_probe_on_data",
    "linear_probe_on_features",
    "load_evaluation_data",
    "predict_logits",
    "robustness",
    "robustness_on_data",
    "top1",
    "train_linear_head",
]
