"""The ots, mae and benchmark sections."""
from __future__ import annotations

from typing import Iterable

from .library import MULTILABEL_KINDS, budget_module, dataset_kinds, ots_presets
from .problems import _close
from .timm_models import ModelInfo, _replace, timm_model_info


class StudyChecks:
    """Mixed into the checker: uses self.config, self.fail, self.path, self.model."""

    def _refs(self, key: str, items: Iterable[str], table: str) -> list[str]:
        good = []
        for item in items:
            if item not in self.config[table]:
                self.fail(key, f"{item!r} is not defined under {table}: ({', '.join(self.config[table])})")
            else:
                good.append(item)
        return good

    def _single_label(self, key: str, dataset: str) -> bool:
        if dataset not in self.config["datasets"]:
            self.fail(key, f"{dataset!r} is not defined under datasets: ({', '.join(self.config['datasets'])})")
            return False
        if self.config["datasets"][dataset]["kind"] in (dataset_kinds()[1] or MULTILABEL_KINDS):
            self.fail(key, f"{dataset!r} is multi-label; this stage reports top-1/top-5")
            return False
        return True

    def ots(self) -> None:
        ots = self.config.get("ots")
        if not ots:
            return
        self._single_label("ots.dataset", ots["dataset"])
        methods = [m for m in self._refs("ots.methods", ots["methods"], "methods") if self.method_ok(m)]
        presets = ots_presets()
        for name, spec in ots["backbones"].items():
            key = f"ots.backbones.{name}"
            info = None
            if "pretrain" in spec:
                pre = spec["pretrain"]
                if self.config["backbones"].get(pre, {}).get("init") != "pretrain":
                    self.fail(f"{key}.pretrain", f"{pre!r} is not a backbone pretrained by the DAG (backbones.<name>.init: pretrain)")
                    continue
                info = self.model(pre)
                if info is not None and spec.get("img_size"):
                    info = _replace(info, img_size=int(spec["img_size"]))
            else:
                preset = presets.get(spec["preset"])
                if presets and preset is None:
                    self.fail(f"{key}.preset", f"unknown backbone preset {spec['preset']!r}{_close(spec['preset'], presets)};"
                              f" known presets (tokenreduction.ots.PRESETS): {', '.join(presets)}")
                    continue
                if spec.get("checkpoint") and not self.path(spec["checkpoint"]).is_file():
                    self.fail(f"{key}.checkpoint", f"{spec['checkpoint']} does not exist")
                if preset is not None and {"depth", "patch_size", "img_size"} <= set(preset):
                    info = ModelInfo(preset.get("model", spec["preset"]), int(preset["depth"]), int(preset["patch_size"]),
                                     int(spec.get("img_size") or preset["img_size"]), None, True, "VisionTransformer")
            r_values = spec.get("r", ots.get("r"))
            if r_values is None:
                self.fail(f"{key}.r", "no r sweep given (here or as ots.r)")
                continue
            if info is None:
                continue
            rkey = f"{key}.r" if "r" in spec else "ots.r"
            for m in methods:
                for sched in ots["schedules"]:
                    for r in r_values:
                        self.simulate(rkey, m, info, "r", None, r=int(r), schedule=sched, backbone=name)

    def mae(self) -> None:
        mae = self.config.get("mae")
        if not mae:
            return
        self._single_label("mae.dataset", mae["dataset"])
        backbones = self._refs("mae.backbones", mae["backbones"], "backbones")
        methods = [m for m in self._refs("mae.methods", mae["methods"], "methods") if self.method_ok(m)]
        for b in backbones:
            info = self.model(b)
            if info is None:
                continue
            kwargs = {**(self.config["backbones"][b].get("model_kwargs") or {}), **(mae.get("model_kwargs") or {})}
            if kwargs != (self.config["backbones"][b].get("model_kwargs") or {}):
                try:
                    info = timm_model_info(self.config["backbones"][b]["model"], kwargs)
                except (LookupError, ValueError):
                    pass
            for m in methods:
                for sched in mae["schedules"]:
                    for r in mae["r"]:
                        self.simulate("mae.r", m, info, "r", None, r=int(r), schedule=sched, backbone=b)

    def benchmark(self) -> None:
        bench = self.config.get("benchmark")
        if not bench or bench.get("enabled", True) is False:
            return
        names = bench.get("backbones")
        if names is None:
            names = [b for exp in self.config["experiments"] for b in exp["backbones"] if b in self.config["backbones"]]
        backbones = self._refs("benchmark.backbones", dict.fromkeys(names), "backbones")
        self._refs("benchmark.methods", bench.get("methods") or [], "methods")
        for name in (bench.get("clustering") or {}).get("methods") or []:
            self.merging_variant("benchmark.clustering.methods", name, ("atc",), "the clustering benchmark")
        schedules = budget_module().R_SCHEDULES
        for i, spec in enumerate(bench.get("r_models") or []):
            key = f"benchmark.r_models[{i}]"
            if not self._refs(f"{key}.method", [spec["method"]], "methods") or not self.method_ok(spec["method"]):
                continue
            sched = spec.get("schedule", "constant")
            if isinstance(sched, str) and sched not in schedules:
                self.fail(f"{key}.schedule", f"unknown r schedule {sched!r}; use one of {', '.join(schedules)} or a number in [-1, 1]")
                continue
            if not isinstance(sched, str) and not -1 <= float(sched) <= 1:
                self.fail(f"{key}.schedule", f"r schedule inflection must lie in [-1, 1], got {sched}")
                continue
            for b in backbones:
                info = self.model(b)
                if info is not None:
                    self.simulate(f"{key}.r", spec["method"], info, "r", None, r=int(spec["r"]), schedule=sched, backbone=b)
        headline = bench.get("headline_batch")
        exps = bench.get("batch_exponents")
        if headline is not None and exps and headline not in [2 ** e for e in exps]:
            self.fail("benchmark.headline_batch", f"{headline} is not one of the benchmarked batch sizes {[2 ** e for e in exps]}")
