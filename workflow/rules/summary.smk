# Summary: one table of every run, and accuracy plots per dataset/backbone.
# The runs and their metrics files reach the job in a manifest (manifest.smk).


include: "manifest.smk"


MANIFESTS["summary"] = lambda: {
    "runs": RUNS,
    "metrics": run_paths(f"{RESULTS}/eval/{RUN_DIR}/metrics.json"),
}


rule summarise:
    input:
        script=script_path("summarise.py"),
        manifest=manifest_path("summary"),
        metrics=run_paths(f"{RESULTS}/eval/{RUN_DIR}/metrics.json"),
    output:
        table=f"{RESULTS}/summary/metrics.csv",
        keep_rate_plot=report(
            f"{RESULTS}/summary/accuracy_vs_keep_rate.png",
            caption="../report/accuracy_vs_keep_rate.rst",
            category="Summary",
        ),
        gflops_plot=report(
            f"{RESULTS}/summary/accuracy_vs_gflops.png",
            caption="../report/accuracy_vs_gflops.rst",
            category="Summary",
        ),
        drop_table=f"{RESULTS}/summary/accuracy_drop.csv",
        drop_plot=report(
            f"{RESULTS}/summary/accuracy_drop.png",
            caption="../report/accuracy_drop.rst",
            category="Summary",
        ),
    log:
        f"{RESULTS}/logs/summarise.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        baseline=baseline_method(),
        code=lambda w: code_hash(("evaluate",)),
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --manifest {input.manifest:q}'
        " --table {output.table:q} --keep-rate-plot {output.keep_rate_plot:q}"
        " --gflops-plot {output.gflops_plot:q} --baseline {params.baseline:q}"
        " --drop-table {output.drop_table:q} --drop-plot {output.drop_plot:q} > {log:q} 2>&1"
