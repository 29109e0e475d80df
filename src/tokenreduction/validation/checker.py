"""The checker: one pass over a config, section by section (the sections are
mixins, one module each); a bug in a check stops the DAG build
(ValidatorError)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .problems import ValidatorError
from .section_detection_diffusion import DetectionDiffusionChecks
from .section_methods import MethodChecks
from .section_models import ModelChecks
from .section_recipes import RecipeChecks
from .section_studies import StudyChecks
from .timm_models import ModelInfo


class _Checker(ModelChecks, MethodChecks, RecipeChecks, StudyChecks, DetectionDiffusionChecks):
    """Collects (key path, message) for every problem of one config."""

    def __init__(self, config: dict, base: Path, repo: Path) -> None:
        self.config = config
        self.base = base
        self.repo = repo
        self.problems: list[tuple[str, str]] = []
        self._models: dict[str, Optional[ModelInfo]] = {}
        self._simulated: set = set()

    def fail(self, key: str, message: str) -> None:
        if (key, message) not in self.problems:
            self.problems.append((key, message))

    def path(self, value: str, repo_relative: bool = False) -> Path:
        p = Path(os.path.expanduser(str(value)))
        if p.is_absolute():
            return p
        return (self.repo if repo_relative else self.base) / p

    def run(self) -> list[tuple[str, str]]:
        sections = ("datasets", "backbones", "methods", "experiments", "recipes", "ots", "mae", "benchmark",
                    "detection", "diffusion")
        for section in sections:
            try:
                getattr(self, section)()
            except Exception as err:
                # A bug in a check must not switch that check off: stop, with the
                # traceback into the validator attached (``raise ... from``).
                raise ValidatorError(
                    f"internal error in tokenreduction's config check '{section}' "
                    f"({type(err).__name__}: {err}). This is a bug in the validator, not "
                    "necessarily in your config: please report it with the traceback above."
                ) from err
        return self.problems
