"""Old spellings of method variants, refused with the new key named.

Every study section names a method variant one way (issue 27): a name from
the top-level ``methods:`` registry (``{method, the method's options}``),
swept over ``keep_rate`` (fraction of tokens kept) or ``r`` (tokens removed
per block, as ToMe); a diffusion experiment spells the variant inline,
``{method, linkage, keep_rate}``. The spellings before that are refused here,
before the schema (which would only call them unknown keys), one message
each.
"""
from __future__ import annotations

from typing import Any

from .variants import diffusion_variant_module


def _keep_rate_hint(ratio: Any) -> str:
    """' (here keep_rate: 0.9)' for a tomesd ratio 0.1, exact as printed."""
    try:
        return f" (here keep_rate: {diffusion_variant_module().keep_rate_of(ratio)})"
    except ValueError:
        return ""


def renamed_problems(config: dict) -> list[tuple[str, str]]:
    """(key path, message) for each old spelling in `config`; [] when none."""
    problems = []
    det = config.get("detection")
    if isinstance(det, dict):
        if "ratios" in det:
            problems.append(("detection.ratios", "detection.ratios was renamed: use detection.keep_rates "
                             "(fraction of the current tokens kept at each reduction location; same values)"))
        if isinstance(det.get("methods"), dict):
            problems.append(("detection.methods", "detection.methods is now a list of names from the top-level "
                             "methods: registry, e.g. [tome, atc-single] with methods.atc-single: {method: atc, "
                             "linkage: single}; the {run name: linkage} mapping is the old spelling"))
    diff = config.get("diffusion")
    experiments = diff.get("experiments") if isinstance(diff, dict) else None
    for name, spec in (experiments or {}).items() if isinstance(experiments, dict) else ():
        if not isinstance(spec, dict):
            continue
        key = f"diffusion.experiments.{name}"
        if "merge_fn" in spec:
            problems.append((f"{key}.merge_fn", f"{key}.merge_fn was renamed: use {key}.method "
                             "(none | tome | atc)"))
        if "ratio" in spec:
            problems.append((f"{key}.ratio", f"{key}.ratio (fraction removed) was renamed: use {key}.keep_rate, "
                             f"the fraction of tokens kept = 1 - ratio{_keep_rate_hint(spec['ratio'])}"))
    bench = config.get("benchmark")
    clustering = bench.get("clustering") if isinstance(bench, dict) else None
    if isinstance(clustering, dict) and "linkages" in clustering:
        problems.append(("benchmark.clustering.linkages", "benchmark.clustering.linkages was renamed: use "
                         "benchmark.clustering.methods, names from the methods: registry whose method is atc "
                         "(e.g. [atc-single, atc-complete, atc-average])"))
    return problems
