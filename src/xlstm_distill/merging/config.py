"""The settings of the merge-weight sweep (``xlstm-distill merge --sweep``, a recipe's ``experts.sweep``): their
defaults live here only."""

from __future__ import annotations

from dataclasses import dataclass

from xlstm_distill.settings import setting

OBJECTIVES = ("mean", "worst")


@dataclass
class SweepConfig:
    """Choose the merge weights on each domain's sweep split (held-out documents the report never uses)."""

    objective: str = setting("mean", "Combine the domains' KL(teacher || merged): `mean` (each domain counts the "
                                      "same) or `worst` (the largest).")
    sequences: int = setting(8, "Sweep sequences per domain (packed, of the data's sequence length).")
    batch_size: int = setting(4, "Batch size of the sweep's forwards.")
    grid: int = setting(4, "Coarse simplex grid: every weight vector whose entries are multiples of 1/grid (4 "
                           "experts, grid 4: 35 points, uniform and each expert alone among them).")
    refine: int = setting(2, "Refinement rounds after the grid: weight moved between two experts in steps of "
                             "1/(2 grid), then halved each round (0: the grid only).")

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"sweep objective={self.objective!r}: choose one of {', '.join(OBJECTIVES)}.")
        for name in ("sequences", "batch_size", "grid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sweep {name} must be an integer >= 1, got {value!r}.")
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise ValueError(f"sweep refine must be an integer >= 0, got {self.refine!r}.")
