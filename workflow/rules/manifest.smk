# Manifests: the lists that grow with the number of runs (every run of the
# summary, every run a pattern grid draws, every detection run) reach their
# job in a JSON file, never on its command line: Snakemake runs a job as
# `bash -c "<command>"` and Linux refuses any argument over 128 KiB. The file
# is rendered by Snakemake's own template engine from a rule parameter, in the
# Snakemake process (no job, no command), and rewritten when the list changes
# (the params rerun trigger). Readers: tokenreduction.manifest.load_manifest.


include: "manifest_common.smk"


rule manifest:
    input:
        template=f"{ROOT}/workflow/templates/manifest.json.j2",
    output:
        f"{RESULTS}/manifests/{{manifest}}.json",
    log:
        f"{RESULTS}/logs/manifests/{{manifest}}.log",
    wildcard_constraints:
        manifest=r"[A-Za-z0-9_.-]+",
    params:
        content=_manifest_content,
    template_engine:
        "jinja2"
