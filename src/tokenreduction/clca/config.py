"""CLCA's options (:class:`CLCAConfig`), without torch.

Kept apart from :mod:`.model` so that the workflow's config validation can
load it by path at DAG build and check ``methods.<name>.clca`` with the
dataclass itself (its fields, their types, its :meth:`~CLCAConfig.validate`).
Standard library only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class CLCAConfig:
    """Options of :func:`apply_clca` (names of the reference's flags).

    reduction_loc: CLCA layers of an *unreduced* model (default 3, 6, 9); a
    reduced model uses its reduction locations.
    """

    ifa_head: bool = False
    ifa_dws_conv_groups: int = 2
    clc: bool = False
    num_clr: int = 0
    clc_include_gap: bool = True
    clc_pool_cls: bool = False
    clc_pool_clr: bool = False
    clc_recover_at_last: bool = True
    reduction_loc: Optional[Sequence[int]] = None

    @property
    def enabled(self) -> bool:
        return bool(self.ifa_head or self.clc)

    def validate(self) -> None:
        if self.num_clr < 0:
            raise ValueError(f"num_clr must be >= 0, got {self.num_clr}")
        if self.num_clr and not self.clc:
            raise ValueError("num_clr carrier tokens need clc=True")
        if self.clc and not (self.num_clr or self.clc_include_gap):
            raise ValueError("clc needs num_clr > 0 or clc_include_gap (otherwise nothing is cached)")
        if self.ifa_dws_conv_groups < 0:
            raise ValueError(f"ifa_dws_conv_groups must be >= 0, got {self.ifa_dws_conv_groups}")
