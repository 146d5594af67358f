"""Registry of objectives, chosen by `objective.name`; each module holds its collator, loss and metrics."""

from model.objectives.base import Objective
from model.objectives.clm import CausalLM

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (CausalLM,)}


def get_objective(name: str) -> type[Objective]:
    return OBJECTIVES[name]
