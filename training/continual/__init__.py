"""The registry of continual-learning methods (`--cl_method`). Adding one is one file and one entry
here; `docs/continual.md` describes each and the benchmark that compares them."""
from __future__ import annotations

from training.continual.base import ContinualMethod
from training.continual.combined import SelfRegularizedReplay
from training.continual.distill import FeatureDistillation
from training.continual.ewc import ElasticWeightConsolidation
from training.continual.l2 import L2ToPrevious
from training.continual.plain import FullFinetune, LoraOnly, SelfRegularization
from training.continual.replay import ExperienceReplay
from training.continual.wise import WeightInterpolation

CL_METHODS: dict[str, type[ContinualMethod]] = {
    method.name: method for method in (SelfRegularization, LoraOnly, FullFinetune, L2ToPrevious,
                                       ElasticWeightConsolidation, FeatureDistillation, ExperienceReplay,
                                       SelfRegularizedReplay, WeightInterpolation)
}


def default_method(self_regularization: bool, lora_rank: int) -> str:
    """What a run without --cl_method does, as before the flag existed."""
    return "self_reg" if self_regularization else ("lora" if lora_rank else "full")


__all__ = ["CL_METHODS", "ContinualMethod", "default_method"]
