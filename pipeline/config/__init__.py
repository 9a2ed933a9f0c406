"""The job's configuration: the schema (`job`, `sections`, `compute`), `--set` overrides (`overrides`), the
fingerprint (`fingerprint`), retry rungs (`retry`) and reading job files (`jobfile`).

Knows nothing of Ray or torch. `from pipeline.config import JobConfig, load_job` is the usual door.
"""

from pipeline.config.compute import ComputeConfig, VLLMConfig
from pipeline.config.job import DEFAULT_PROMPTS, JobConfig, load_job, parse_job, rung_job, with_overrides
from pipeline.config.overrides import apply_overrides
from pipeline.config.retry import DEFAULT_RETRY_ERRORS, RUNG_KEYS, RetryConfig, max_attempt, rung_overrides
from pipeline.config.sections import (Criterion, DecodeConfig, FilterRule, GenerationConfig, Question, ScaleConfig,
                                      TilingConfig, VideoConfig)

__all__ = [
    "ComputeConfig", "Criterion", "DEFAULT_PROMPTS", "DEFAULT_RETRY_ERRORS", "DecodeConfig", "FilterRule",
    "GenerationConfig", "JobConfig", "Question", "RUNG_KEYS", "RetryConfig", "ScaleConfig", "TilingConfig",
    "VLLMConfig", "VideoConfig", "apply_overrides", "load_job", "max_attempt", "parse_job", "rung_job",
    "rung_overrides", "with_overrides",
]
