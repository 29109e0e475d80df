# Data: the demo datasets are made from scikit-learn's digits; real datasets
# are read where they lie, checked, and described in a manifest.


rule prepare_dataset:
    output:
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.json",
    params:
        kind=lambda w: config["datasets"][w.dataset]["kind"],
        root=lambda w: dataset_root(w.dataset),
        img_size=lambda w: config["datasets"][w.dataset]["img_size"],
        code=lambda w: provenance.code_hash(("data",), extra=[ROOT / "scripts" / "prepare_dataset.py"]),
    log:
        f"{RESULTS}/logs/prepare_dataset/{{dataset}}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python scripts/prepare_dataset.py --kind {params.kind} --root {params.root:q}"
        " --img-size {params.img_size} --manifest {output.manifest:q} > {log:q} 2>&1"
