# Analysis (Which Tokens to Use?): reduction patterns and CLS features compared
# across keep rates, capacities and methods; collated with the metric
# difference of each pair; rank-correlated. One job per (dataset, axis) loops
# over that axis's pairs, so a study's thousands of pairs make a handful of jobs.
# Conventions (config `analysis:`; the study's by default): pwcca study|paired,
# kl_base 2, models_baseline_rate 0.9 (the models axis pairs the unreduced
# baseline with the runs at this keep rate; null: not).
# No `group:` here: Snakemake checks a job group with a walk of the DAG per pair
# of its jobs, 30 % of config/clca.yaml's DAG build (benchmarks/dag_build.py);
# each analysis job is its own cluster job.


include: "analysis_common.smk"


rule analysis_compare:
    input:
        script=script_path("analysis.py"),
        summary=f"{RESULTS}/summary/metrics.csv",
        runs=dataset_eval_files,
    output:
        f"{RESULTS}/analysis/{{dataset}}/compare_{{axis}}.csv",
    log:
        f"{RESULTS}/logs/analysis/{{dataset}}/compare_{{axis}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/analysis_compare/{{dataset}}/compare_{{axis}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=lambda w, attempt: 8000 * attempt,
        runtime=lambda w, attempt: 60 * attempt,
    params:
        eval_dir=eval_root,
        pwcca=ANALYSIS.get("pwcca", "study"),
        baseline_rate=_baseline_rate_arg(),
        code=analysis_code,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} compare --summary {input.summary:q} --dataset {wildcards.dataset}'
        " --axis {wildcards.axis} --eval-dir {params.eval_dir:q} --pwcca {params.pwcca}"
        " --baseline-rate {params.baseline_rate} --out {output:q} > {log:q} 2>&1"


rule analysis_collate:
    input:
        script=script_path("analysis.py"),
        summary=f"{RESULTS}/summary/metrics.csv",
        compare=f"{RESULTS}/analysis/{{dataset}}/compare_{{axis}}.csv",
    output:
        report(
            f"{RESULTS}/analysis/{{dataset}}/collated_{{axis}}.csv",
            caption="../report/collated.rst",
            category="Analysis",
            subcategory="{dataset}",
        ),
    log:
        f"{RESULTS}/logs/analysis/{{dataset}}/collate_{{axis}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/analysis_collate/{{dataset}}/collate_{{axis}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=analysis_code,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} collate --summary {input.summary:q} --dataset {wildcards.dataset}'
        " --axis {wildcards.axis} --compare {input.compare:q} --out {output:q} > {log:q} 2>&1"


rule analysis_correlate:
    input:
        script=script_path("analysis.py"),
        collated=f"{RESULTS}/analysis/{{dataset}}/collated_{{axis}}.csv",
    output:
        table=report(
            f"{RESULTS}/analysis/{{dataset}}/correlations_{{axis}}.csv",
            caption="../report/correlations.rst",
            category="Analysis",
            subcategory="{dataset}",
        ),
        pooled=f"{RESULTS}/analysis/{{dataset}}/correlations_{{axis}}_pooled.csv",
        figure=report(
            f"{RESULTS}/analysis/{{dataset}}/correlations_{{axis}}.png",
            caption="../report/correlations.rst",
            category="Analysis",
            subcategory="{dataset}",
        ),
    log:
        f"{RESULTS}/logs/analysis/{{dataset}}/correlate_{{axis}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/analysis_correlate/{{dataset}}/correlate_{{axis}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=analysis_code,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} correlate --collated {input.collated:q} --axis {wildcards.axis}'
        " --out {output.table:q} --pooled {output.pooled:q} --figure {output.figure:q} > {log:q} 2>&1"


rule analysis_rho_heatmap:
    input:
        script=script_path("analysis.py"),
        pooled=expand(
            f"{RESULTS}/analysis/{{{{dataset}}}}/correlations_{{axis}}_pooled.csv",
            axis=ANALYSIS_AXES,
        ),
    output:
        report(
            f"{RESULTS}/analysis/{{dataset}}/rho_heatmap.png",
            caption="../report/rho_heatmap.rst",
            category="Analysis",
            subcategory="{dataset}",
        ),
    log:
        f"{RESULTS}/logs/analysis/{{dataset}}/rho_heatmap.log",
    benchmark:
        f"{RESULTS}/benchmarks/analysis_rho_heatmap/{{dataset}}/rho_heatmap.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        pooled=lambda w, input: " ".join(
            f"{axis}={path}" for axis, path in zip(ANALYSIS_AXES, input.pooled)
        ),
        code=analysis_code,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} rho-heatmap --pooled {params.pooled} --title {wildcards.dataset:q}'
        " --out {output:q} > {log:q} 2>&1"


rule token_statistics:
    input:
        script=script_path("analysis.py"),
        summary=f"{RESULTS}/summary/metrics.csv",
        runs=dataset_eval_files,
    output:
        stats=f"{RESULTS}/analysis/{{dataset}}/token_stats.json",
        figure=report(
            f"{RESULTS}/analysis/{{dataset}}/depth_heatmaps.png",
            caption="../report/depth_heatmaps.rst",
            category="Analysis",
            subcategory="{dataset}",
        ),
    log:
        f"{RESULTS}/logs/analysis/{{dataset}}/token_stats.log",
    benchmark:
        f"{RESULTS}/benchmarks/token_statistics/{{dataset}}/token_stats.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        eval_dir=eval_root,
        depths=backbone_depths(),
        code=analysis_code,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} token-stats --summary {input.summary:q} --dataset {wildcards.dataset}'
        " --eval-dir {params.eval_dir:q} --depths {params.depths:q} --out {output.stats:q}"
        " --figure {output.figure:q} > {log:q} 2>&1"


rule compare_heatmaps:
    input:
        script=script_path("analysis.py"),
        stats=expand(
            f"{RESULTS}/analysis/{{dataset}}/token_stats.json",
            dataset=analysis_datasets(),
        ),
    output:
        report(
            f"{RESULTS}/analysis/heatmap_comparison.csv",
            caption="../report/heatmap_comparison.rst",
            category="Analysis",
        ),
    log:
        f"{RESULTS}/logs/analysis/heatmaps.log",
    benchmark:
        f"{RESULTS}/benchmarks/compare_heatmaps/heatmaps.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        kl_base=ANALYSIS.get("kl_base", 2),
        code=analysis_code,
    # POT (the exact EMD) would import torch for its backends: ~0.5 GB of RSS this job never uses
    shell:
        'POT_BACKEND_DISABLE_PYTORCH=1 "$TOKENREDUCTION_PYTHON" {input.script:q} heatmaps --token-stats {input.stats:q}'
        " --kl-base {params.kl_base}"
        " --out {output:q} > {log:q} 2>&1"
