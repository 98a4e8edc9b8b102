"""The whole run's configuration: one typed section per concern."""
from __future__ import annotations

from dataclasses import dataclass, field

from .algorithm import AlgorithmConfig
from .data import DataConfig
from .generation import GenerationConfig
from .model import ModelConfig
from .optim import OptimConfig
from .parallel import ParallelConfig
from .train import TrainConfig


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
