# Helpers of the analysis rules (analysis.smk): the study's conventions read
# from the config's `analysis:` section.

ANALYSIS = config.get("analysis") or {}


def _baseline_rate_arg():
    rate = ANALYSIS.get("models_baseline_rate", 0.9)
    return "none" if rate is None else str(rate)
