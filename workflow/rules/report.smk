# The report: one HTML page per section of tables (marked for
# `snakemake --report results/report.html`), the configuration, the
# accuracy-vs-throughput figure, and results/README.md, a plain Markdown index
# with the same tables. Code in tokenreduction.report.


include: "report_common.smk"


rule report_section:
    input:
        script=script_path("report.py"),
        tables=section_tables,
    output:
        page=report(
            f"{RESULTS}/report/{{section}}.html",
            caption="../report/section.rst",
            category=section_category,
            subcategory=section_subcategory,
        ),
    log:
        f"{RESULTS}/logs/report/{{section}}.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        title=section_title,
        code=report_code,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} section --section {wildcards.section} --title {params.title:q}'
        " --tables {input.tables:q} --out {output.page:q} > {log:q} 2>&1"


rule report_config:
    input:
        script=script_path("report.py"),
    output:
        page=report(
            f"{RESULTS}/report/config.html",
            caption="../report/config.rst",
            category="Configuration",
        ),
    log:
        f"{RESULTS}/logs/report/config.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        config=json.dumps(config, sort_keys=True),
        code=report_code,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} config --config {params.config:q} --out {output.page:q} > {log:q} 2>&1'


rule report_tradeoff:
    input:
        script=script_path("report.py"),
        summary=f"{RESULTS}/summary/metrics.csv",
        speed=f"{RESULTS}/speed/speed.csv",
    output:
        plot=report(
            f"{RESULTS}/report/accuracy_vs_throughput.png",
            caption="../report/accuracy_vs_throughput.rst",
            category="Summary",
        ),
    log:
        f"{RESULTS}/logs/report/tradeoff.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_hash(("benchmark",)),
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} tradeoff --summary {input.summary:q} --speed {input.speed:q}'
        " --out {output.plot:q} > {log:q} 2>&1"


rule report_tables:
    input:
        unpack(report_index_inputs),
    output:
        index=f"{RESULTS}/README.md",
    log:
        f"{RESULTS}/logs/report/index.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        config=json.dumps(config, sort_keys=True),
        tables=report_index_args,
        code=report_code,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} index --config {params.config:q} --summary {input.summary:q}'
        " {params.tables} --out {output.index:q} > {log:q} 2>&1"
