"""pgconv.model: PaliGemma 1 and 2 from scratch in PyTorch (no transformers imports here)."""

from .config import PRESETS, PaliGemmaConfig, TextConfig, VisionConfig, from_name
from .hf_config import from_hf_config, to_hf_config

__all__ = ["PRESETS", "PaliGemmaConfig", "TextConfig", "VisionConfig", "from_hf_config", "from_name", "to_hf_config"]
