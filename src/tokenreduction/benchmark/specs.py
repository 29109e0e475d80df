"""Which models and settings the workflow config asks the benchmarks for.

Imports nothing beyond the standard library: the Snakefile loads this file at
DAG build (without torch) to compute the benchmark jobs' parameters.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

#: label of the unreduced model in every benchmark table
BASELINE = "baseline"


@dataclass(frozen=True)
class ModelSpec:
    """One configured model: a method at a keep rate (or ToMe-style r), or
    the unreduced baseline (``method=None``)."""

    label: str
    method: Optional[str] = None
    keep_rate: Optional[float] = None
    r: Optional[int] = None
    r_schedule: str = "constant"
    reduction_loc: Optional[Tuple[int, ...]] = None
    budget: Optional[str] = None
    method_kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: CLCA options (tokenreduction.clca.apply_clca) of a method variant, or None
    clca: Optional[Mapping[str, Any]] = None

    @property
    def is_baseline(self) -> bool:
        return self.method in (None, "none", "deit", "baseline")

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["reduction_loc"] = None if self.reduction_loc is None else list(self.reduction_loc)
        out["method_kwargs"] = dict(self.method_kwargs)
        out["clca"] = None if self.clca is None else dict(self.clca)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        data = dict(data)
        if data.get("reduction_loc") is not None:
            data["reduction_loc"] = tuple(int(v) for v in data["reduction_loc"])
        return cls(**data)


def specs_from_config(config: Mapping[str, Any], backbone: str) -> List[ModelSpec]:
    """The models the workflow config asks to benchmark on `backbone`: the
    baseline, then every (method, keep rate) of the experiments that use the
    backbone (narrowed by ``benchmark.methods`` / ``benchmark.keep_rates``
    when given), then ``benchmark.r_models`` (ToMe-style r per block). A
    method variant's own ``budget`` and ``clca`` options are honoured as in
    fine-tuning; its other keys are the method's keyword arguments."""
    bench = config.get("benchmark") or {}
    only_methods = bench.get("methods")
    only_rates = None if bench.get("keep_rates") is None else {float(v) for v in bench["keep_rates"]}
    specs = [ModelSpec(BASELINE)]
    seen = {BASELINE}
    for exp in config["experiments"]:
        if backbone not in exp["backbones"]:
            continue
        for name in exp["methods"]:
            if only_methods is not None and name not in only_methods:
                continue
            options = dict(config["methods"][name])
            method = options.pop("method")
            budget = options.pop("budget", None) or config["budget"]  # a variant may set its own
            clca = options.pop("clca", None) or None
            if method == "none":
                continue
            for rate in exp["keep_rates"]:
                label = f"{name} kr{float(rate):g}"
                if (only_rates is not None and float(rate) not in only_rates) or label in seen:
                    continue
                seen.add(label)
                specs.append(ModelSpec(label, method=method, keep_rate=float(rate),
                                       reduction_loc=tuple(config["reduction_loc"]), budget=budget,
                                       method_kwargs=options, clca=clca))
    for item in bench.get("r_models") or []:
        options = dict(config["methods"][item["method"]])
        method = options.pop("method")
        options.pop("budget", None)
        clca = options.pop("clca", None) or None
        schedule = item.get("schedule", "constant")
        label = f"{item['method']} r{int(item['r'])}" + ("" if schedule == "constant" else f" {schedule}")
        if label in seen:
            continue
        seen.add(label)
        specs.append(ModelSpec(label, method=method, r=int(item["r"]), r_schedule=schedule, budget="r",
                               method_kwargs=options, clca=clca))
    return specs


def image_size(backbone_spec: Mapping[str, Any]) -> int:
    """The input size of a configured backbone: ``model_kwargs.img_size``,
    else the resolution at the end of the timm name (``..._384``), else 224."""
    size = (backbone_spec.get("model_kwargs") or {}).get("img_size")
    if size is not None:
        return int(size if isinstance(size, int) else size[0])
    match = re.search(r"_(\d{2,4})(?:\.\w+)?$", backbone_spec["model"])
    return int(match.group(1)) if match else 224


def batch_sizes(exponents: List[int]) -> List[int]:
    """2^k for every k (the ATC study: k = 0..10)."""
    return [2 ** int(k) for k in exponents]
