# Diffusion with token merging (ATC study; diffusion.model sd15 / sdxl / pixart): generations per experiment
# (merge function, ratio, options), the FID reference set, FID per experiment
# (clean-fid) and one table. Runs when the config has a `diffusion:` section
# without `enabled: false`. The demo uses a tiny random-weight pipeline made
# by the DAG and a download-free FID feature extractor.


include: "diffusion_common.smk"


rule sd_make_tiny_pipeline:
    input:
        script=script_path("sd_make_tiny_pipeline.py"),
    output:
        directory(SD_TINY),
    log:
        f"{RESULTS}/logs/diffusion/make_tiny_pipeline.log",
    benchmark:
        f"{RESULTS}/benchmarks/diffusion/make_tiny_pipeline.tsv"
    conda:
        "../../envs/diffusion.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        img_size=DIFF.get("img_size", 64),
        seed=DIFF.get("seed", 0),
        model=SD_MODEL,
        code=SD_CODE,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --out {output:q} --img-size {params.img_size}'
        " --seed {params.seed} --model {params.model} > {log:q} 2>&1"


rule sd_reference_set:
    input:
        script=script_path("sd_reference_set.py"),
        data=lambda w: dataset_manifest(DIFF["dataset"]),
    output:
        directory(f"{SD_DIR}/reference"),
    log:
        f"{RESULTS}/logs/diffusion/reference_set.log",
    benchmark:
        f"{RESULTS}/benchmarks/diffusion/reference_set.tsv"
    conda:
        "../../envs/diffusion.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        val_root=lambda w: sd_val_root(),
        per_class=DIFF.get("reference_per_class", 5),
        num_classes=DIFF.get("num_classes") or 0,
        code=SD_CODE,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --val-root {params.val_root:q} --out {output:q}'
        " --per-class {params.per_class} --num-classes {params.num_classes} > {log:q} 2>&1"


rule sd_generate:
    input:
        script=script_path("sd_generate.py"),
        pipeline=sd_pipeline_input,
        data=lambda w: dataset_manifest(DIFF["dataset"]),
    output:
        images=directory(f"{SD_GEN}/images"),
        timing=f"{SD_GEN}/timing.json",
    log:
        f"{RESULTS}/logs/diffusion/generate/{{sd_experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/diffusion/generate/{{sd_experiment}}.tsv"
    conda:
        "../../envs/diffusion.yaml"
    threads: DIFF.get("threads", 2)
    resources:
        gpu=DIFF.get("gpus", 0),
        mem_mb=DIFF.get("mem_mb", 8000),
        runtime=array_uniform("sd_generate", sd_gen_runtime),
    params:
        pipeline=sd_pipeline(),
        model=SD_MODEL,
        val_root=lambda w: sd_val_root(),
        class_names=sd_class_names_arg(),
        num_classes=DIFF.get("num_classes") or 0,
        images_per_class=DIFF.get("images_per_class", 2),
        steps=DIFF.get("steps", 50),
        guidance=DIFF.get("guidance", 7.5),
        img_size=DIFF.get("img_size", 512),
        seed=DIFF.get("seed", 0),
        seed_scheme=DIFF.get("seed_scheme", "study"),
        attention=DIFF.get("attention", "default"),
        progress_every=DIFF.get("progress_every", 30),
        device=DIFF.get("device", "auto"),
        dtype=DIFF.get("dtype", "auto"),
        merge=sd_merge_spec,
        code=SD_CODE,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --pipeline {params.pipeline:q} --model {params.model}'
        " --val-root {params.val_root:q} {params.class_names} --num-classes {params.num_classes}"
        " --images-per-class {params.images_per_class} --steps {params.steps}"
        " --guidance {params.guidance} --img-size {params.img_size} --seed {params.seed}"
        " --seed-scheme {params.seed_scheme} --attention {params.attention}"
        " --progress-every {params.progress_every}"
        " --device {params.device} --dtype {params.dtype} --threads {threads}"
        " --merge {params.merge:q} --out-images {output.images:q}"
        " --out-timing {output.timing:q} > {log:q} 2>&1"


rule sd_fid:
    input:
        script=script_path("sd_fid.py"),
        reference=f"{SD_DIR}/reference",
        images=f"{SD_GEN}/images",
        timing=f"{SD_GEN}/timing.json",
    output:
        fid=f"{SD_DIR}/fid/{{sd_experiment}}.json",
    log:
        f"{RESULTS}/logs/diffusion/fid/{{sd_experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/diffusion/fid/{{sd_experiment}}.tsv"
    conda:
        "../../envs/diffusion.yaml"
    threads: 2
    resources:
        gpu=DIFF.get("gpus", 0),
        mem_mb=8000,
        runtime=60,
    params:
        extractor=SD_FID.get("feature_extractor", "inception"),
        mode=SD_FID.get("mode", "clean"),
        weights=sd_weights_arg(),
        pixel_dim=SD_FID.get("pixel_dim", 8),
        device=DIFF.get("device", "auto"),
        progress_every=DIFF.get("progress_every", 30),
        code=SD_CODE,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --reference {input.reference:q} --generated {input.images:q}'
        " --timing {input.timing:q} --experiment {wildcards.sd_experiment}"
        " --extractor {params.extractor} --mode {params.mode}"
        " {params.weights} --pixel-dim {params.pixel_dim} --progress-every {params.progress_every}"
        " --device {params.device} --out {output.fid:q} > {log:q} 2>&1"


rule sd_fid_table:
    input:
        script=script_path("sd_fid_table.py"),
        fid=expand(f"{SD_DIR}/fid/{{sd_experiment}}.json", sd_experiment=SD_EXPERIMENTS),
    output:
        table=f"{SD_DIR}/fid.csv",
    log:
        f"{RESULTS}/logs/diffusion/fid_table.log",
    localrule: True
    conda:
        "../../envs/diffusion.yaml"
    threads: 1
    # importing tokenreduction.diffusion (torch) alone peaks at ~1.0 GB RSS
    # (tests/test_full_width_aggregation.py measures it)
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=SD_CODE,
    shell:
        '"$TOKENREDUCTION_PYTHON" {input.script:q} --fid {input.fid:q} --out {output.table:q} > {log:q} 2>&1'
