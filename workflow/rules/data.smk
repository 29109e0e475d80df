# Data: the demo datasets are made from scikit-learn's digits; real datasets
# are read where they lie, checked, and described in a manifest.


rule prepare_dataset:
    input:
        script=script_path("prepare_dataset.py"),
    output:
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.json",
    log:
        f"{RESULTS}/logs/prepare_dataset/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_dataset/{{dataset}}.tsv"
    # the critical path first (data 40, pretrain 30, finetune 20, evaluate 10);
    # the other stages fill the free cores
    priority: 40
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        kind=lambda w: config["datasets"][w.dataset]["kind"],
        root=lambda w: dataset_root(w.dataset),
        img_size=lambda w: config["datasets"][w.dataset]["img_size"],
        code=lambda w: code_hash(("data",)),
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --kind {params.kind} --root {params.root:q}'
        " --img-size {params.img_size} --manifest {output.manifest:q} > {log:q} 2>&1"
