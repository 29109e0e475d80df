# Helpers of diffusion.smk: settings, config checks, input functions (kept
# apart from the rules, as the linter asks).

import shlex

DIFF = config.get("diffusion") or {}
SD_DIR = f"{RESULTS}/diffusion"
# the pipeline kind: sd15 (SD 1.x/2.x), sdxl, pixart (docs/diffusion.md)
# (the schema and config_validation check it, the ToMe keep-rate floor and the folder's class)
SD_MODEL = DIFF.get("model", "sd15")
SD_TINY = f"{SD_DIR}/tiny-sd" if SD_MODEL == "sd15" else f"{SD_DIR}/tiny-{SD_MODEL}"
SD_GEN = f"{SD_DIR}/generated/{{sd_experiment}}"
SD_FID = DIFF.get("fid") or {}
SD_CODE = code_hash(
    ("diffusion",),
    extra=[provenance.REDUCTION / "ops.py", provenance.REDUCTION / "clustering.py"],
)


def diffusion_enabled():
    return bool(DIFF) and DIFF.get("enabled", True) is not False


def _check_diffusion():
    if not diffusion_enabled():
        return
    # diffusion.dataset and each experiment's keep_rate: checked by config_validation and the schema
    source = str(DIFF.get("pipeline", "tiny"))
    if source != "tiny" and not Path(source).exists():
        if (
            Path(source).is_absolute()
            or source.startswith((".", "~"))
            or source.count("/") != 1
        ):
            _fail(
                "diffusion.pipeline",
                f"{source} is neither an existing pipeline folder nor a hub name (owner/name)",
            )
    weights = SD_FID.get("inception_weights")
    if SD_FID.get("feature_extractor", "inception") == "inception" and weights:
        if not Path(weights).exists():
            _fail(
                "diffusion.fid.inception_weights",
                f"{weights} does not exist: download inception-2015-12-05.pt"
                " (see docs/diffusion.md, 'FID offline') and put it there",
            )


_check_diffusion()
SD_EXPERIMENTS = list(DIFF.get("experiments", {})) if diffusion_enabled() else []


wildcard_constraints:
    sd_experiment="|".join(SD_EXPERIMENTS) or "none",


def diffusion_targets():
    """The targets of this stage for the default run: the FID table (none when disabled)."""
    return [f"{SD_DIR}/fid.csv"] if SD_EXPERIMENTS else []


def sd_pipeline():
    """The pipeline generate loads: the DAG's tiny one, a folder or a hub name."""
    source = DIFF.get("pipeline", "tiny")
    return SD_TINY if source == "tiny" else source


def sd_pipeline_input(wildcards):
    """The pipeline folder as an input (tiny or local); none for a hub name."""
    source = sd_pipeline()
    return [source] if source == SD_TINY or Path(source).exists() else []


def sd_val_root():
    spec = config["datasets"][DIFF["dataset"]]
    return f"{spec['root']}/{spec.get('val_split', 'val')}"


def sd_class_names_arg():
    """--class-names with a JSON list or a file path; nothing for folder names."""
    names = DIFF.get("class_names")
    if names is None:
        return ""
    value = names if isinstance(names, str) else json.dumps(names)
    return f"--class-names {shlex.quote(value)}"


def sd_weights_arg():
    """--inception-weights when the config names a file; nothing for clean-fid's default."""
    weights = SD_FID.get("inception_weights")
    return f"--inception-weights {shlex.quote(str(weights))}" if weights else ""


def sd_merge_spec(wildcards):
    """apply_patch options of an experiment as JSON: the config's {method,
    linkage, keep_rate} as {merge_fn, linkage, ratio} (tomesd's fraction
    removed; tokenreduction.diffusion.variant); merge_fn none = no merging."""
    spec = DIFF["experiments"][wildcards.sd_experiment]
    options = config_validation.diffusion_variant_module().patch_options(spec)
    return json.dumps(options, sort_keys=True)


def sd_gen_runtime(wildcards, attempt):
    """Minutes per generation job: the experiment's runtime, else the section's
    (default 60); doubled on each retry."""
    spec = DIFF["experiments"][wildcards.sd_experiment]
    return int(spec.get("runtime", DIFF.get("runtime", 60)) * attempt)
