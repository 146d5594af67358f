"""Registry of objectives, chosen by `objective.name`; each module holds its collator, loss and metrics."""

from model.objectives.base import Objective
from model.objectives.clm import CausalLM
from model.objectives.contrastive import Contrastive
from model.objectives.mlm import MaskedLM
from model.objectives.mlm_nsp import MaskedLMWithNSP
from model.objectives.span_corruption import SpanCorruption

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (CausalLM, MaskedLM, MaskedLMWithNSP, SpanCorruption, Contrastive)}


def objective_names() -> tuple[str, ...]:
    """Pretraining objectives, then fine-tuning tasks (model/tasks/)."""
    from model.tasks import TASKS

    return tuple(OBJECTIVES) + tuple(TASKS)


def get_objective(name: str) -> type[Objective]:
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    from model.tasks import get_task

    return get_task(name)
