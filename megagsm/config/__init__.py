"""Typed run configuration: one dataclass per concern, loaded from YAML + overrides and validated."""
from .algorithm import AlgorithmConfig, GSPOConfig
from .data import DataConfig
from .errors import ConfigError
from .generation import GenerationConfig
from .layout import validate_model_layout
from .loader import load_config, save_config, to_yaml
from .model import ModelConfig
from .optim import OptimConfig
from .parallel import ParallelConfig
from .schema import RunConfig
from .train import LoraConfig, TrainConfig
from .validate import validate

__all__ = [
    "AlgorithmConfig", "ConfigError", "DataConfig", "GSPOConfig", "GenerationConfig", "LoraConfig",
    "ModelConfig", "OptimConfig", "ParallelConfig", "RunConfig", "TrainConfig", "load_config",
    "save_config", "to_yaml", "validate", "validate_model_layout",
]
