"""imagetransformer: the Image Transformer (Parmar et al., ICML 2018) in PyTorch."""

from .config import ImageTransformerConfig, TrainConfig
from .errors import UserError
from .model import ImageTransformer
from .pattern import AttentionPattern
from .presets import load_preset, load_train_preset

__all__ = [
    "AttentionPattern",
    "ImageTransformer",
    "ImageTransformerConfig",
    "TrainConfig",
    "UserError",
    "load_preset",
    "load_train_preset",
]
__version__ = "0.1.0"
