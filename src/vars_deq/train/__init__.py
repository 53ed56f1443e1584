"""Training of timm classifiers with VARS layers: config, loop, checkpoints, DDP."""

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from .factory import LAYER_OPTIONS, apply_layer_options, create_model, parse_model_kwargs
from .trainer import TrainConfig, TrainingDiverged, resolve_config, train

__all__ = [
    "CheckpointError",
    "LAYER_OPTIONS",
    "TrainConfig",
    "TrainingDiverged",
    "apply_layer_options",
    "create_model",
    "load_checkpoint",
    "model_from_checkpoint",
    "parse_model_kwargs",
    "resolve_config",
    "save_checkpoint",
    "train",
]
