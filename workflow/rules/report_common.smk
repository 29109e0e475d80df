# Functions and settings of report.smk (kept apart from the rules, as the
# linter asks).

import shlex

#: other stages whose tables the report shows when the config enables them:
#: the .csv/.tsv files among the stage's `<stage>_targets()` (what rule all
#: asks of it; empty when disabled), else, for a stage without that function,
#: its rules' wildcard-free .csv/.tsv outputs under results/<stage>/ when the
#: config has a `<stage>:` section without `enabled: false`
REPORT_STAGES = {
    "analysis": "Analysis",
    "ots": "Off-the-shelf backbones",
    "mae": "MAE fine-tuning",
    "detection": "Detection",
    "diffusion": "Diffusion",
}
#: section -> (category, subcategory) in the HTML report
SECTIONS = {
    "summary": ("Summary", None),
    "speed": ("Speed", "Model throughput"),
    "clustering": ("Speed", "Clustering back ends"),
    **{stage: (title, "Tables") for stage, title in REPORT_STAGES.items()},
}


wildcard_constraints:
    section="|".join(SECTIONS),


def stage_enabled(stage):
    section = config.get(stage)
    return isinstance(section, dict) and section.get("enabled", True) is not False


def stage_tables(stage):
    """The summary tables of a stage the config enables (none otherwise)."""
    targets_of = globals().get(f"{stage}_targets")
    if callable(targets_of):
        targets = [str(t) for t in targets_of()]
    elif stage_enabled(stage):
        prefix = f"{RESULTS}/{stage}/"
        targets = [
            str(path)
            for rule in workflow.rules
            for path in rule.output
            if str(path).startswith(prefix) and "{" not in str(path)
        ]
    else:
        targets = []
    return sorted({t for t in targets if t.endswith((".csv", ".tsv"))})


def report_sections():
    sections = ["summary"]
    if benchmark_enabled():
        sections += ["speed", "clustering"]
    return sections + [s for s in REPORT_STAGES if stage_tables(s)]


def section_tables(wildcards):
    section = wildcards.section
    if section == "summary":
        return [f"{RESULTS}/summary/metrics.csv"]
    if section == "speed":
        return [f"{RESULTS}/speed/speed.csv"]
    if section == "clustering":
        return [f"{RESULTS}/speed/clustering.csv"]
    return stage_tables(section)


def section_category(wildcards):
    return SECTIONS[wildcards.section][0]


def section_subcategory(wildcards):
    return SECTIONS[wildcards.section][1]


def section_title(wildcards):
    return REPORT_STAGES.get(wildcards.section, wildcards.section)


def report_targets(wildcards):
    """Everything the report shows (part of rule all)."""
    targets = [f"{RESULTS}/README.md", f"{RESULTS}/report/config.html"]
    targets += [f"{RESULTS}/report/{s}.html" for s in report_sections()]
    if benchmark_enabled():
        targets.append(f"{RESULTS}/report/accuracy_vs_throughput.png")
    return targets


def report_index_inputs(wildcards):
    inputs = {
        "script": script_path("report.py"),
        "summary": f"{RESULTS}/summary/metrics.csv",
    }
    if benchmark_enabled():
        inputs["speed"] = f"{RESULTS}/speed/speed.csv"
        inputs["clustering"] = f"{RESULTS}/speed/clustering.csv"
    for stage in REPORT_STAGES:
        if stage_tables(stage):
            inputs[f"stage_{stage}"] = stage_tables(stage)
    return inputs


def report_index_args(wildcards):
    """Command-line arguments naming the index's tables (computable from the
    config alone, so a change reruns the index)."""
    args = []
    if benchmark_enabled():
        args += ["--speed", f"{RESULTS}/speed/speed.csv"]
        args += ["--clustering", f"{RESULTS}/speed/clustering.csv"]
    for stage, title in REPORT_STAGES.items():
        tables = stage_tables(stage)
        if tables:
            args += ["--stage", title, *tables]
    return " ".join(shlex.quote(a) for a in args)


def report_code(wildcards):
    return code_hash((), extra=[ROOT / "src" / "tokenreduction" / "report.py"])
