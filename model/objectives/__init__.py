"""Registry of objectives, chosen by `objective.name`; each module holds its collator, loss and metrics."""

from model.objectives.base import Objective
from model.objectives.clm import CausalLM
from model.objectives.contrastive import Contrastive
from model.objectives.mlm import MaskedLM
from model.objectives.mlm_nsp import MaskedLMWithNSP
from model.objectives.span_corruption import SpanCorruption

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (CausalLM, MaskedLM, MaskedLMWithNSP, SpanCorruption, Contrastive)}


def get_objective(name: str) -> type[Objective]:
    return OBJECTIVES[name]
