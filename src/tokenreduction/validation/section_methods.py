"""The methods section (options, CLCA) and the stage-by-stage simulation of
every experiment's token budget."""
from __future__ import annotations

import json
from typing import Any, Optional

from .library import BASELINE_NAMES, budget_module, clca_config_class, method_catalog
from .problems import _close
from .timm_models import ModelInfo
from .typecheck import field_types, type_problem


class MethodChecks:
    """Mixed into the checker: uses self.config, self.fail, self.path, self.model."""

    def methods(self) -> None:
        catalog = method_catalog()
        for name, spec in self.config["methods"].items():
            method = spec["method"]
            if method in BASELINE_NAMES:
                continue
            if method not in catalog:
                self.fail(f"methods.{name}.method",
                          f"unknown method {method!r}{_close(method, catalog)}; known methods: {', '.join(sorted(catalog))}")
                continue
            options = {k: v for k, v in spec.items() if k not in ("method", "budget", "clca", "tuning", "tuning_kwargs")}
            for key, message in catalog[method].problems(options):
                self.fail(f"methods.{name}.{key}" if key else f"methods.{name}", message)
            if spec.get("clca"):
                self.clca(f"methods.{name}.clca", spec["clca"])

    def clca(self, key: str, values: Any) -> None:
        """One method's CLCA options: CLCAConfig's fields, types and validate()."""
        if not isinstance(values, dict):
            self.fail(key, f"must be a mapping of CLCA options, got {values!r}")
            return
        cls = clca_config_class()
        fields = field_types(cls)
        bad = False
        for opt, value in values.items():
            if opt not in fields:
                self.fail(f"{key}.{opt}", f"unknown CLCA option{_close(opt, fields)}; known: {', '.join(fields)}")
                bad = True
            else:
                why = type_problem(value, fields[opt])
                if why:
                    self.fail(f"{key}.{opt}", why)
                    bad = True
        if not bad:
            try:
                cls(**values).validate()
            except ValueError as err:
                self.fail(key, str(err))

    def method_ok(self, name: str) -> bool:
        return name in self.config["methods"] and not any(
            k == f"methods.{name}" or k.startswith(f"methods.{name}.") for k, _ in self.problems)

    def locations(self, locs: list, key: str = "reduction_loc") -> bool:
        if sorted(set(locs)) != list(locs):
            self.fail(key, f"reduction locations must be increasing and distinct, got {list(locs)}")
            return False
        return True

    def simulate(self, key: str, method_name: str, info: ModelInfo, budget: str, locs: Optional[list],
                 keep_rate: Any = None, r: Any = None, schedule: Any = "constant", backbone: str = "") -> None:
        """Build the model's stages as patch_model does (budget, each stage's
        output count); record the first problem under `key`."""
        spec = self.config["methods"][method_name]
        method = spec["method"]
        if method in BASELINE_NAMES:
            return
        what = f"method {method_name!r} on backbone {backbone!r}"
        sig = (key, method_name, info, budget, json.dumps([locs, keep_rate, r, schedule]))
        if sig in self._simulated:
            return
        self._simulated.add(sig)
        mi = method_catalog()[method]
        values = {k: v for k, v in spec.items() if k not in ("method", "budget", "clca", "tuning", "tuning_kwargs")}
        if info.embed_dim is not None:
            problems = mi.problems(values, int(info.embed_dim))
            if problems:
                self.fail(f"methods.{method_name}", f"{problems[0][1]} ({what}, embed_dim {info.embed_dim})")
                return
        if mi.needs_class_token and not info.class_token:
            self.fail(key, f"{what}: method {method!r} reads the CLS attention but the model has no class token")
            return
        bmod = budget_module()
        depth = info.depth
        if locs is None:
            locs = list(range(depth)) if budget == "r" else [3, 6, 9]
        bad = [loc for loc in locs if not 0 <= int(loc) < depth]
        if bad:
            self.fail("reduction_loc" if key.startswith("experiments") else key,
                      f"location {bad[0]} is beyond the depth of backbone {backbone!r} ({depth} blocks: 0..{depth - 1})")
            return
        n = info.num_patches
        try:
            if budget == "r":
                tb = bmod.TokenBudget("r", n, len(locs), r_per_block=bmod.r_schedule(r, depth, schedule))
            else:
                tb = bmod.TokenBudget(budget, n, len(locs), keep_rate=keep_rate)
            for stage, loc in enumerate(locs):
                if budget == "r":
                    r_here = tb.r_per_block[loc]
                    if r_here >= n:
                        raise ValueError(
                            f"r={r} ({schedule}) removes {r_here} tokens at block {loc}, but only {n} patch"
                            f" tokens are left there ({info.num_patches} patches, {depth} blocks)"
                        )
                sb = tb.stage(stage, loc, n)
                n = mi.output_count(values, n, sb)
                if n < 1:
                    raise ValueError(f"no patch tokens are left after block {loc}")
        except ValueError as err:
            once = (key, backbone, budget, json.dumps([keep_rate, r, schedule]))
            if once not in self._simulated:  # one line per setting, not per method
                self._simulated.add(once)
                self.fail(key, f"{what}: {err}")

    def experiments(self) -> None:
        cfg = self.config
        locs = list(cfg["reduction_loc"])
        locs_ok = self.locations(locs)
        for i, exp in enumerate(cfg["experiments"]):
            for key, table in (("datasets", "datasets"), ("backbones", "backbones"), ("methods", "methods")):
                for item in exp[key]:
                    if item not in cfg[table]:
                        self.fail(f"experiments[{i}].{key}", f"{item!r} is not defined under {table}: ({', '.join(cfg[table])})")
            if not locs_ok:
                continue
            for b in exp["backbones"]:
                info = self.model(b) if b in cfg["backbones"] else None
                if info is None:
                    continue
                for m in exp["methods"]:
                    if not self.method_ok(m):
                        continue
                    budget = cfg["methods"][m].get("budget") or cfg["budget"]
                    for kr in exp["keep_rates"]:
                        self.simulate(f"experiments[{i}].keep_rates", m, info, budget, locs, keep_rate=kr, backbone=b)
