"""The detection and diffusion sections."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .variants import diffusion_variant_module


class DetectionDiffusionChecks:
    """Mixed into the checker: uses self.config, self.fail, self.path, self.model."""

    def detection(self) -> None:
        det = self.config.get("detection")
        if not det or det.get("enabled", True) is False or not det.get("sizes"):
            return
        if det.get("data_root") and not self.path(det["data_root"]).exists():
            self.fail("detection.data_root", f"{det['data_root']} does not exist (a COCO-layout root)")
        for size, spec in det["sizes"].items():
            key = f"detection.sizes.{size}"
            if not self.path(spec["config"], repo_relative=True).is_file():
                self.fail(f"{key}.config", f"mmdet config {spec['config']} does not exist (paths are relative to the repository)")
            for field_name in ("load_from", "pretrained"):
                if spec.get(field_name) and not self.path(spec[field_name], repo_relative=True).is_file():
                    self.fail(f"{key}.{field_name}", f"checkpoint {spec[field_name]} does not exist (paths are relative to the repository)")
        for name in det.get("methods") or []:
            self.merging_variant("detection.methods", name, ("tome", "atc"), "the detection backbone")
        if det.get("methods") and not det.get("keep_rates") and not det.get("baseline", True):
            self.fail("detection.keep_rates", "no keep_rates and no baseline: the detection section has no runs")

    def merging_variant(self, key: str, name: str, methods: tuple, user: str) -> None:
        """`name` (listed under `key`) must be a methods: registry entry of
        one of `methods` whose only option is ATC's linkage."""
        registry = self.config.get("methods") or {}
        if name not in registry:
            self.fail(key, f"{name!r} is not defined under methods: ({', '.join(registry)})")
            return
        spec = registry[name]
        if spec.get("method") not in methods:
            self.fail(key, f"{name!r} is method {spec.get('method')!r}; {user} runs {' or '.join(methods)} only")
            return
        extra = sorted(k for k in spec if k not in ("method", "linkage"))
        if extra:
            self.fail(key, f"{name!r} sets {extra[0]!r}; {user} takes no option but ATC's linkage")

    def diffusion(self) -> None:
        diff = self.config.get("diffusion")
        if not diff or diff.get("enabled", True) is False:
            return
        if diff["dataset"] not in self.config["datasets"]:
            self.fail("diffusion.dataset", f"{diff['dataset']!r} is not defined under datasets: ({', '.join(self.config['datasets'])})")
        names = diff.get("class_names")
        if isinstance(names, str) and not self.path(names).is_file():
            self.fail("diffusion.class_names", f"{names} does not exist (a .txt with one name per line, a .json, "
                      "or the ATC study's class_names.py; see docs/diffusion.md)")
        elif diff["dataset"] in self.config["datasets"] and diff.get("num_classes") is None:
            kind = self.config["datasets"][diff["dataset"]].get("kind")
            count = _class_name_count(self.path(names)) if isinstance(names, str) else (
                len(names) if isinstance(names, list) else None)
            if kind == "imagenet" and count is not None and count != 1000:
                self.fail("diffusion.class_names", f"holds {count} class names; ImageNet needs exactly 1000 "
                          "(line i = class i in sorted-wnid order, e.g. 'tench, Tinca tinca')")
        variant = diffusion_variant_module()
        for name, spec in diff["experiments"].items():
            key = f"diffusion.experiments.{name}"
            try:
                options = variant.patch_options(spec)
            except ValueError as err:
                option, _, message = str(err).partition(": ")
                self.fail(f"{key}.{option}", message)
                continue
            cap = 1 - 1 / (options.get("sx", 2) * options.get("sy", 2))  # ToMe-SD keeps one destination per cell
            if options["merge_fn"] == "tome" and options["ratio"] > cap:
                self.fail(f"{key}.keep_rate", f"ToMe-SD keeps at least 1/(sx*sy) = {1 - cap:.4g} of the tokens "
                          "(tomesd would cap it silently)")
            if diff.get("model", "sd15") == "pixart" and spec.get("max_downsample", 1) != 1:
                self.fail(f"{key}.max_downsample",
                          "applies to UNets: every PixArt block runs on the patch grid (leave it unset)")
        self.diffusion_model(diff)

    def diffusion_model(self, diff: dict) -> None:
        """A local pipeline folder must hold a pipeline class of diffusion.model."""
        classes = {"sd15": ("StableDiffusionPipeline",), "sdxl": ("StableDiffusionXLPipeline",),
                   "pixart": ("PixArtAlphaPipeline", "PixArtSigmaPipeline")}[diff.get("model", "sd15")]
        source = str(diff.get("pipeline", "tiny"))
        index = self.path(source) / "model_index.json"
        if source != "tiny" and index.is_file():
            held = json.loads(index.read_text()).get("_class_name")
            if held not in classes:
                self.fail("diffusion.model", f"{diff.get('model', 'sd15')} loads {' or '.join(classes)}, "
                          f"but the pipeline folder {source} holds a {held}")


def _class_name_count(path: Path) -> Optional[int]:
    """Names in a diffusion class-names file (.txt: non-empty lines; .json: a
    list or a map); None for another format (checked when the job reads it)."""
    try:
        if path.suffix == ".txt":
            return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        if path.suffix == ".json":
            loaded = json.loads(path.read_text(encoding="utf-8"))
            return len(loaded) if isinstance(loaded, (list, dict)) else None
    except (OSError, ValueError):
        return None
    return None
