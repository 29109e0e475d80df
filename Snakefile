# tokenreduction: the token-reduction studies as one DAG.
#   snakemake --cores all                      the embedded demo (CPU, minutes)
#   snakemake --configfile config/which-tokens.yaml --profile slurm
from snakemake.utils import min_version

min_version("9.0")


# the embedded demo unless a study's config is given with --configfile
if not config:

    configfile: f"{workflow.basedir}/config/config.yaml"


# snakemake --report results/report.html: the global description of the report
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/software.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/diffusion.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/visualize.smk"
include: "workflow/rules/ots.smk"
include: "workflow/rules/detection.smk"
include: "workflow/rules/benchmark.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/cluster.smk"


rule all:
    default_target: True
    input:
        f"{RESULTS}/summary/metrics.csv",
        analysis_targets(),
        pattern_targets(),
        diffusion_targets(),
        ots_targets(),
        mae_targets(),
        detection_targets(),
        report_targets,
