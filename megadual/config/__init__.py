"""Typed config sections loaded strictly from YAML, with `--set` overrides.

    from megadual.config import load_config, dump_config
    cfg = load_config(["configs/debug/lm.yaml"], overrides=["optim.lr=1e-3"])
    dump_config(cfg, f"{cfg.run.out_dir}/config.yaml")   # reloads to an equal Config

Cheap to import: yaml and the standard library only.
"""

from .args import add_config_arguments, config_from_args
from .errors import ConfigError
from .loader import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    dump_config,
    load_config,
    parse_override,
    parse_yaml,
    section_from_dict,
)
from .schema import (
    BackboneConfig,
    Config,
    DiscriminatorConfig,
    ImageDataConfig,
    MLLMConfig,
    OptimConfig,
    ParallelConfig,
    PixelDecoderConfig,
    QuantizerConfig,
    RunConfig,
    SpecialTokensConfig,
    TextDataConfig,
    TokenizerConfig,
    TokenizerLossConfig,
    TokenizerTrainConfig,
    TrainConfig,
    VisionTowerConfig,
)

__all__ = [
    "BackboneConfig",
    "Config",
    "ConfigError",
    "DiscriminatorConfig",
    "ImageDataConfig",
    "MLLMConfig",
    "PixelDecoderConfig",
    "QuantizerConfig",
    "TokenizerConfig",
    "TokenizerLossConfig",
    "TokenizerTrainConfig",
    "VisionTowerConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "SpecialTokensConfig",
    "TextDataConfig",
    "TrainConfig",
    "add_config_arguments",
    "apply_overrides",
    "config_from_args",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "dump_config",
    "load_config",
    "parse_override",
    "parse_yaml",
    "section_from_dict",
]
