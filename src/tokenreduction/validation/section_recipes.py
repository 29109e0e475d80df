"""The recipes: finetune, pretrain and per-section recipe layers, by
TrainConfig's fields and its own validate()."""
from __future__ import annotations

from typing import Any, Optional

from .library import WORKFLOW_FIELDS, train_config_module, tuning_modes
from .problems import _close
from .timm_models import timm_optimizers, timm_schedulers
from .typecheck import field_types, type_problem


class RecipeChecks:
    """Mixed into the checker: uses self.config, self.fail, self.path, self.model."""

    def recipe_keys(self, key: str, recipe: Any) -> None:
        """Keys and value types of one recipe section (TrainConfig fields)."""
        if not isinstance(recipe, dict):
            self.fail(key, f"must be a mapping of training settings, got {recipe!r}")
            return
        tc = train_config_module().TrainConfig
        hints = field_types(tc)
        for name, value in recipe.items():
            if name not in hints:
                self.fail(f"{key}.{name}", f"unknown training setting{_close(name, hints)} (see tokenreduction.train.config.TrainConfig)")
            elif name in WORKFLOW_FIELDS:
                self.fail(f"{key}.{name}", f"is set by the workflow from {WORKFLOW_FIELDS[name]}; remove it here")
            else:
                why = type_problem(value, hints[name])
                if why:
                    self.fail(f"{key}.{name}", why)

    def recipe(self, key: str, *layers: Optional[dict], extra: Optional[dict] = None) -> None:
        """The merged recipe through TrainConfig's own validation."""
        if any(k.startswith(key) or (k.startswith("finetune") and key != "finetune") for k, _ in self.problems):
            return  # reported where it is (the shared finetune section, or this section's keys)
        merged: dict = {}
        for layer in layers:
            if isinstance(layer, dict):
                merged.update(layer)
        merged.update(extra or {})
        tc = train_config_module().TrainConfig
        known = set(field_types(tc))  # flat, as configs spell them
        merged = {k: v for k, v in merged.items() if k in known}
        tuning = merged.get("tuning", "full")
        modes = tuning_modes()
        if modes and tuning not in modes:
            self.fail(f"{key}.tuning", f"tuning must be one of {', '.join(modes)}, got {tuning!r}")
            return
        merged["tuning"] = "full"  # checked above; TrainConfig would import the (torch) registry
        opt = merged.get("opt")
        if isinstance(opt, str) and timm_optimizers() and opt.lower().split("_")[-1] not in timm_optimizers():
            self.fail(f"{key}.opt", f"timm has no optimizer {opt!r}{_close(opt, timm_optimizers())};"
                      f" known: {', '.join(timm_optimizers())}")
            return
        sched = merged.get("sched")
        if isinstance(sched, str) and timm_schedulers() and sched not in timm_schedulers():
            self.fail(f"{key}.sched", f"timm has no learning-rate schedule {sched!r}{_close(sched, timm_schedulers())};"
                      f" known: {', '.join(timm_schedulers())}")
            return
        try:
            tc.from_dict(merged)
        except ImportError:
            return  # a check that needs torch: the job makes it
        except (ValueError, TypeError) as err:
            first = str(err).split(" ", 1)[0]
            self.fail(f"{key}.{first}" if first in known else key, str(err))

    def recipes(self) -> None:
        cfg = self.config
        self.recipe_keys("finetune", cfg["finetune"])
        self.recipe("finetune", cfg["finetune"])
        for name, spec in cfg["datasets"].items():
            if spec.get("recipe"):
                self.recipe(f"datasets.{name}.recipe", cfg["finetune"], spec["recipe"], extra={"img_size": spec["img_size"]})
        pre = cfg.get("pretrain") or {}
        if pre.get("recipe"):
            self.recipe("pretrain.recipe", cfg["finetune"], pre["recipe"])
        mae = cfg.get("mae") or {}
        if mae.get("recipe") is not None:
            self.recipe_keys("mae.recipe", mae["recipe"])
            self.recipe("mae.recipe", cfg["finetune"], mae["recipe"])
