"""The run config: `train.schema.sections` (the sections and their rules) on a small typed-config
engine (`train.schema.engine`: coercion, validation, did-you-mean)."""

from train.schema.engine import ConfigError
from train.schema.sections import CheckpointConfig
from train.schema.sections import DataConfig
from train.schema.sections import FinetuneConfig
from train.schema.sections import LoggingConfig
from train.schema.sections import MeshConfig
from train.schema.sections import ModelConfig
from train.schema.sections import OptimConfig
from train.schema.sections import RunConfig
from train.schema.sections import TrainConfig
from train.schema.sections import config_from_dict

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "FinetuneConfig", "LoggingConfig", "MeshConfig",
           "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig", "config_from_dict"]
