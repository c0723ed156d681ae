"""Run configuration: typed sections, YAML merged over the defaults, `a.b=value` overrides.

The shared sections and their checks are in `sections.py`; a method's own section lives in the
method's file and joins the tree through the registry (ssl_kd/run_config.py loads a run).
"""

from ssl_kd.config.merge import flatten, to_dict, to_yaml
from ssl_kd.config.sections import (
    Config,
    DataConfig,
    EvalConfig,
    MaskingConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from ssl_kd.errors import ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "MaskingConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "flatten",
    "to_dict",
    "to_yaml",
]
