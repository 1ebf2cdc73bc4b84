"""The training side, kept apart from the model: configuration and presets, data, the loop,
checkpoints, metrics and multi-process strategies. The model modules never import from here."""

from .config import CLIError, TrainConfig, load_config
from .presets import PRESETS

__all__ = ["CLIError", "TrainConfig", "load_config", "PRESETS"]
