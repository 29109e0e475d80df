# Pictures of the reduction patterns: per dataset, the same few validation
# images for every run (method x keep rate x backbone, first seed), one row per
# run and one column per image and reduction stage; pruned patches black,
# merged groups coloured with white borders (tokenreduction.visualization).
# Config (optional): visualize: {num_images: 3}.


include: "visualize_common.smk"


# manifest.smk (included by summary.smk): the grid's runs reach its job in a file


_register_pattern_manifests()


rule pattern_grid:
    input:
        script=script_path("visualize_patterns.py"),
        library=f"{ROOT}/src/tokenreduction/visualization.py",
        data=lambda w: dataset_manifest(w.dataset),
        manifest=lambda w: manifest_path(f"patterns_{w.dataset}"),
        patterns=_pattern_files("patterns.npz"),
        metrics=_pattern_files("metrics.json"),
    output:
        report(
            f"{RESULTS}/patterns/{{dataset}}/pattern_grid.png",
            caption="../report/pattern_grid.rst",
            category="Patterns",
            subcategory="{dataset}",
        ),
    log:
        f"{RESULTS}/logs/patterns/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pattern_grid/{{dataset}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=lambda w, attempt: pattern_grid_mem(w) * attempt,
        runtime=lambda w, attempt: 30 * attempt,  # 9 min at which-tokens width on a loaded 2-core machine
    params:
        kind=lambda w: config["datasets"][w.dataset]["kind"],
        root=lambda w: dataset_root(w.dataset),
        img_size=lambda w: config["datasets"][w.dataset]["img_size"],
        num_images=VISUALIZE.get("num_images", 3),
        title=lambda w: f"Reduction patterns on {w.dataset}: the same validation images for every run",
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --kind {params.kind} --root {params.root:q}'
        " --img-size {params.img_size} --manifest {input.manifest:q} --num-images {params.num_images} --title {params.title:q}"
        " --out {output:q} > {log:q} 2>&1"
