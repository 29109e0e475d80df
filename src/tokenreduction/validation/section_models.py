"""The datasets and backbones sections."""
from __future__ import annotations

from typing import Optional

from .library import DEMO_KINDS, dataset_kinds
from .problems import _close
from .timm_models import ModelInfo, timm_model_info


class ModelChecks:
    """Mixed into the checker: uses self.config, self.fail, self.path, self.model."""

    def datasets(self) -> None:
        kinds = dataset_kinds()[0]
        for name, spec in self.config["datasets"].items():
            if kinds and spec["kind"] not in kinds:
                self.fail(f"datasets.{name}.kind", f"unknown dataset kind {spec['kind']!r}{_close(spec['kind'], kinds)};"
                          f" known kinds (tokenreduction.data.DATASET_KINDS): {', '.join(kinds)}")
                continue
            if spec["kind"] not in DEMO_KINDS and not self.path(spec["root"]).exists():
                self.fail(f"datasets.{name}.root", f"{spec['root']} does not exist (dataset {name!r}, kind {spec['kind']})")
            if spec.get("recipe") is not None:
                self.recipe_keys(f"datasets.{name}.recipe", spec["recipe"])

    def model(self, backbone: str) -> Optional[ModelInfo]:
        """The backbone's ModelInfo (None when unknown; the problem is recorded)."""
        if backbone not in self._models:
            spec = self.config["backbones"][backbone]
            try:
                self._models[backbone] = timm_model_info(spec["model"], spec.get("model_kwargs") or {})
            except LookupError:
                self._models[backbone] = None
            except ValueError as err:
                self._models[backbone] = None
                self.fail(f"backbones.{backbone}.model", str(err))
        return self._models[backbone]

    def backbones(self) -> None:
        for name, spec in self.config["backbones"].items():
            for key in ("depth", "patch_size", "img_size", "embed_dim", "num_heads"):
                value = (spec.get("model_kwargs") or {}).get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    if key in ("patch_size", "img_size") and isinstance(value, list):
                        continue
                    self.fail(f"backbones.{name}.model_kwargs.{key}", f"must be a positive integer, got {value!r}")
            self.model(name)
            init = spec["init"]
            if init == "pretrain":
                pre = (self.config.get("pretrain") or {}).get("dataset")
                if pre not in self.config["datasets"]:
                    self.fail("pretrain.dataset", f"backbone {name!r} is pretrained by the DAG but pretrain.dataset {pre!r} is not a dataset")
            elif init != "timm" and not self.path(init).is_file():
                self.fail(f"backbones.{name}.init", f"checkpoint {init} does not exist (use pretrain, timm or a file path)")
        pre = self.config.get("pretrain") or {}
        if pre.get("recipe") is not None:
            self.recipe_keys("pretrain.recipe", pre["recipe"])
