"""Configuration: the typed stage configs (:mod:`rlhf.config.schema`) and the one resolver that turns
params.yaml + profile + overrides + pipeline knobs into them (:mod:`rlhf.config.resolve`)."""

from rlhf.config.resolve import RunConfig, active_profile, build, load_stage, load_yaml
from rlhf.config.schema import (
    EvaluateConfig,
    FeedbackConfig,
    ModelConfig,
    PPOConfig,
    PrepareConfig,
    RegisterConfig,
    RewardConfig,
    SFTConfig,
    StageConfig,
    TrainConfig,
    ValidateConfig,
)

__all__ = ["StageConfig", "PrepareConfig", "ValidateConfig", "ModelConfig", "TrainConfig", "SFTConfig",
           "RewardConfig", "EvaluateConfig", "PPOConfig", "RegisterConfig", "FeedbackConfig", "RunConfig", "load_stage", "build",
           "load_yaml", "active_profile"]
