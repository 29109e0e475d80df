"""The detection and diffusion sections."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


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
        if det.get("methods") and not det.get("ratios") and not det.get("baseline", True):
            self.fail("detection.ratios", "no ratios and no baseline: the detection section has no runs")

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
        for name, spec in diff["experiments"].items():
            merge = spec.get("merge_fn", "none")
            if merge != "atc" and "linkage" in spec:
                self.fail(f"diffusion.experiments.{name}.linkage", f"linkage applies to merge_fn atc only (this one is {merge})")
            cap = 1 - 1 / (spec.get("sx", 2) * spec.get("sy", 2))  # ToMe-SD keeps one destination per cell
            if merge == "tome" and spec.get("ratio", 0.5) > cap:
                self.fail(f"diffusion.experiments.{name}.ratio", f"ToMe-SD removes at most 1 - 1/(sx*sy) = {cap:.4g} "
                          "of the tokens (tomesd would cap it silently)")
            if diff.get("model", "sd15") == "pixart" and spec.get("max_downsample", 1) != 1:
                self.fail(f"diffusion.experiments.{name}.max_downsample",
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
