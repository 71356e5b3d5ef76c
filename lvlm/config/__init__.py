"""Typed configuration for every knob in lvlm.

Owns: the dataclass schema (``schema.py``), YAML + dotted CLI loading (``load.py``) and value checks
(``validate.py``). Imports nothing heavy (no torch), so configs can be checked anywhere.
"""
from lvlm.config.load import ConfigError, dump_config, load_config, validate
from lvlm.config.schema import (
    AvgPoolConnectorConfig,
    CAbstractorConnectorConfig,
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
    QFormerConnectorConfig,
    ResamplerConnectorConfig,
    SourceConfig,
    StageConfig,
    TokenMergeConnectorConfig,
    TrainConfig,
    VisionConfig,
    WebDatasetSourceConfig,
)

__all__ = [
    "AvgPoolConnectorConfig", "CAbstractorConnectorConfig", "QFormerConnectorConfig", "ResamplerConnectorConfig",
    "TokenMergeConnectorConfig",
    "Config", "ConfigError", "ConnectorConfig", "DataConfig", "HFVisionConfig", "LLaVAJsonSourceConfig",
    "LLMConfig", "LinearConnectorConfig", "MLPConnectorConfig", "ModelConfig", "OpenCLIPVisionConfig",
    "OptimConfig", "SourceConfig", "StageConfig", "TrainConfig", "VisionConfig", "WebDatasetSourceConfig",
    "dump_config", "load_config", "validate",
]
