# Functions of the manifest rule (manifest.smk).


#: manifest name -> function giving its content (a JSON-able dict)
MANIFESTS = {}


def manifest_path(name):
    """The manifest file of ``name`` (an input of the job that reads it)."""
    return f"{RESULTS}/manifests/{name}.json"


def _manifest_content(wildcards):
    if wildcards.manifest not in MANIFESTS:
        raise ValueError(f"no manifest named {wildcards.manifest!r}")
    return MANIFESTS[wildcards.manifest]()
