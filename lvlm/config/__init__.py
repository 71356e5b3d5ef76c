"""Typed configuration for every knob in lvlm.

Owns: the dataclass schema (``schema.py``), YAML + dotted CLI loading and validation
(``load.py``). Imports nothing heavy (no torch), so configs can be checked anywhere.
"""
from lvlm.config.load import ConfigError, dump_config, load_config, validate
from lvlm.config.schema import (
    Config,
    ConnectorConfig,
    DataConfig,
    HFVisionConfig,
    LinearConnectorConfig,
    LLaVAJsonSourceConfig,
    LLMConfig,
    MLPConnectorConfig,
    ModelConfig,
    OpenCLIPVisionConfig,
    OptimConfig,
    SourceConfig,
    StageConfig,
    TrainConfig,
    VisionConfig,
    WebDatasetSourceConfig,
)

__all__ = [
    "Config", "ConfigError", "ConnectorConfig", "DataConfig", "HFVisionConfig", "LLaVAJsonSourceConfig",
    "LLMConfig", "LinearConnectorConfig", "MLPConnectorConfig", "ModelConfig", "OpenCLIPVisionConfig",
    "OptimConfig", "SourceConfig", "StageConfig", "TrainConfig", "VisionConfig", "WebDatasetSourceConfig",
    "dump_config", "load_config", "validate",
]
