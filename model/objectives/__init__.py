"""Registry of objectives, chosen by `objective.name`; each module holds its collator, loss and metrics."""

from types import ModuleType

from model.objectives import clm

OBJECTIVES: dict[str, ModuleType] = {"clm": clm}


def get_objective(name: str) -> ModuleType:
    return OBJECTIVES[name]
