"""Token budgets: how many patch tokens each reduction stage should keep.

The studies count differently, and a reproduction depends on it, so the budget
is a named schedule chosen in the config:

``geometric`` (Which Tokens to Use?, ATC DeiT fine-tuning)
    stage s keeps ``int(keep_rate ** (s + 1) * P)`` patch tokens, P the number
    of patches of the input (196 at 224 px). A list of keep rates gives
    ``int(keep_rate[s] * P)`` per stage. Bipartite matching (ToMe, ToMeCIS)
    removes ``r = nominal[s-1] - nominal[s]`` tokens at stage s, capped at half
    the tokens present, as the reference code does: at keep rate 0.25 and
    blocks 3, 6, 9 ToMe keeps 98/61/52 where 49/12/3 were asked. The model
    records what each stage actually kept (``model.reduction_state``).
``current`` (EViT, CLCA, the ATC detection backbone)
    stage s keeps ``ceil(keep_rate * n)`` of the n patch tokens present
    (an EViT fused token from an earlier stage counts among them).
``r`` (ToMe off the shelf, MAE fine-tuning)
    block b removes ``r[b]`` tokens; ``r`` is an int with a schedule
    (``constant``, ``decrease``, ``increase``, see :func:`r_schedule`) or an
    explicit per-block list.
The diffusion patch uses a fraction of tokens *removed*
(:mod:`tokenreduction.diffusion`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

BUDGETS = ("geometric", "current", "r")
R_SCHEDULES = {"constant": 0.0, "decrease": -1.0, "increase": 1.0}


@dataclass(frozen=True)
class StageBudget:
    """What one stage is asked for: keep `target` patch tokens, or remove `r`.

    `keep_fraction`: the fraction of the input's original patches that
    inference keeps after this stage, every earlier stage having kept its own
    target (:meth:`TokenBudget.keep_fraction`); a training forward that removes
    no token (DynamicViT) aims its policy at it. None for a budget made for
    one stage alone, whose tokens present are then the original ones."""

    target: int
    r: int
    keep_fraction: Optional[float] = None


def r_schedule(
    r: Union[int, Sequence[int]], num_blocks: int, schedule: Union[str, float] = "constant"
) -> list[int]:
    """Per-block r with ToMe's linear schedule.

    With inflection f in [-1, 1], block i of L removes
    ``int(a + (b - a) * i / (L - 1))`` tokens, a = int(r * (1 - f)), b = 2r - a:
    ``constant`` (f = 0) is r everywhere, ``decrease`` (f = -1) runs from 2r
    down to 0, ``increase`` (f = +1) from 0 up to 2r. A list is taken as given.
    """
    if not isinstance(r, int):
        values = [int(v) for v in r]
        if len(values) != num_blocks:
            raise ValueError(f"an r list needs one value per block ({num_blocks}), got {len(values)}")
        return values
    if isinstance(schedule, str):
        if schedule not in R_SCHEDULES:
            raise ValueError(
                f"unknown r schedule {schedule!r}; use one of {', '.join(R_SCHEDULES)} or a number in [-1, 1]"
            )
        inflection = R_SCHEDULES[schedule]
    else:
        inflection = float(schedule)
        if not -1.0 <= inflection <= 1.0:
            raise ValueError(f"r schedule inflection must lie in [-1, 1], got {inflection}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    start = int(r * (1.0 - inflection))
    end = 2 * r - start
    if num_blocks == 1:
        return [start]
    step = (end - start) / (num_blocks - 1)
    return [int(start + step * i) for i in range(num_blocks)]


class TokenBudget:
    """A named schedule; ``stage(s, block, n)`` gives the StageBudget of stage s
    (at block `block`) when n patch tokens are present."""

    def __init__(
        self,
        kind: str,
        num_patches: int,
        num_stages: int,
        keep_rate: Optional[Union[float, Sequence[float]]] = None,
        r_per_block: Optional[Sequence[int]] = None,
        stage_blocks: Optional[Sequence[int]] = None,
    ) -> None:
        if kind not in BUDGETS:
            raise ValueError(f"unknown token budget {kind!r}; use one of {', '.join(BUDGETS)}")
        self.kind = kind
        self.num_patches = num_patches
        self.num_stages = num_stages
        self.r_per_block = list(r_per_block) if r_per_block is not None else None
        self.stage_blocks = [int(b) for b in stage_blocks] if stage_blocks is not None else None
        if self.stage_blocks is not None and len(self.stage_blocks) != num_stages:
            raise ValueError(f"stage_blocks has {len(self.stage_blocks)} blocks but there are {num_stages} stages")
        if kind == "r":
            if self.r_per_block is None:
                raise ValueError("the 'r' budget needs r")
            self.keep_rates = None
            return
        if keep_rate is None:
            raise ValueError(f"the {kind!r} budget needs keep_rate")
        rates = [keep_rate] * num_stages if isinstance(keep_rate, (int, float)) else list(keep_rate)
        if len(rates) != num_stages:
            raise ValueError(
                f"keep_rate has {len(rates)} values but there are {num_stages} reduction locations"
            )
        for rate in rates:
            if not (0.0 < float(rate) <= 1.0):
                raise ValueError(f"keep_rate must lie in (0, 1], got {rate}")
        self.keep_rates = [float(v) for v in rates]
        self.single_rate = isinstance(keep_rate, (int, float))

    def nominal(self, stage: int, num_patches: Optional[int] = None) -> int:
        """Geometric target of `stage` (stage -1 is all patches); `num_patches`
        is the patch count of the actual input (default: the build-time one;
        they differ under timm's ``dynamic_img_size``)."""
        total = self.num_patches if num_patches is None else int(num_patches)
        if stage < 0:
            return total
        if self.single_rate:
            value = int(self.keep_rates[0] ** (stage + 1) * total)
        else:
            value = int(self.keep_rates[stage] * total)
        return max(value, 1)

    def _kept_after(self, stage: int, block: int, num_tokens: int, num_patches: Optional[int]) -> int:
        """Patch tokens `stage` (at `block`) keeps of the `num_tokens` present."""
        if self.kind == "geometric":
            target = self.nominal(stage, num_patches)
        elif self.kind == "current":
            target = max(1, math.ceil(self.keep_rates[stage] * num_tokens))
        else:
            target = num_tokens - self.r_per_block[block]
        return max(0, min(target, num_tokens))

    def keep_fraction(self, stage: int, num_patches: Optional[int] = None) -> Optional[float]:
        """Fraction of the original patches that inference keeps after
        `stage`, each earlier stage having kept its target (`num_patches`:
        patches of the actual input, default the build-time count).

        ``geometric``: the nominal rate, ``keep_rate ** (stage + 1)`` (or
        ``keep_rate[stage]``), the reference's DynamicViT ratio; inference
        keeps its floor times the patches (at least one), so the two agree to
        within one patch. ``current``: the kept count of the chain of
        ``ceil(keep_rate * n)`` over the patches, exactly. ``r``: the chain of
        removals at the stages' blocks (None when the budget was made without
        ``stage_blocks``)."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} is out of range: the budget has {self.num_stages} stages")
        total = self.num_patches if num_patches is None else int(num_patches)
        if self.kind == "geometric":
            return self.keep_rates[0] ** (stage + 1) if self.single_rate else self.keep_rates[stage]
        if self.kind == "r" and self.stage_blocks is None:
            return None
        n = total
        for s in range(stage + 1):
            n = self._kept_after(s, self.stage_blocks[s] if self.stage_blocks is not None else -1, n, total)
        return n / total

    def stage(self, stage: int, block: int, num_tokens: int, num_patches: Optional[int] = None) -> StageBudget:
        """The StageBudget of `stage` at `block` with `num_tokens` patch tokens
        present; `num_patches`: patches of the actual input (geometric budget,
        keep fraction)."""
        target = self._kept_after(stage, block, num_tokens, num_patches)
        if self.kind == "geometric":
            r = self.nominal(stage - 1, num_patches) - self.nominal(stage, num_patches)
        else:
            r = num_tokens - target
        return StageBudget(target=target, r=max(0, min(r, num_tokens)),
                           keep_fraction=self.keep_fraction(stage, num_patches))
