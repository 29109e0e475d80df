"""Validation of the workflow config at DAG build, before any job is queued.

On a cluster a config mistake that surfaces only when a job starts costs a
queue wait per attempt. :func:`check_config` therefore checks, at DAG build,
everything the jobs would check, and names the key path of each problem
(``methods.evit.fuse_tokn``, ``finetune.epochs``, ``ots.backbones.x.r``).

One source of truth: nothing here repeats the library's option lists.

* Reduction methods: each method's declaration in
  :mod:`tokenreduction.reduction.options` (option names, types, defaults,
  allowed values and ranges, builder-set options, class flags), the same one
  its constructor checks values with, so both refuse a value with one message.
* Token budgets: :mod:`tokenreduction.models.budget` itself, and each method's
  declared output count, simulate every stage of every model of the study (r
  too large at some block, keep-rate lists of the wrong length).
* Recipes: :class:`tokenreduction.train.config.TrainConfig` itself (allowed
  keys, field types from its annotations, ranges from its ``validate``).
* CLCA options: the fields, types and ``validate`` of ``clca.config.CLCAConfig``.
* timm models: the architecture, its depth, patch size, image size and
  pretrained tags are read from timm's own model definitions
  (``@register_model`` functions and ``default_cfgs``), not guessed from names.

The DAG build must stay fast, so this package imports neither torch nor timm:
only torch-free library modules are loaded, by path (``reduction/options.py``,
``models/budget.py``, ``train/config.py``, ``clca/config.py``); timm's sources
and a few library tables (OTS presets, dataset kinds, tuning modes) are read
with :mod:`ast` (parsed once, cached). The library expressions evaluated here
are the package's own code; config values only ever enter them as data.

Modules: ``checker`` (one pass over a config; a bug in a check stops the
build), ``section_models``, ``section_methods``, ``section_recipes``,
``section_studies``, ``section_detection_diffusion`` (one per config section),
``variants`` (a methods: registry name's method and options; diffusion
experiments as apply_patch keywords), ``renamed`` (old spellings of method
variants, refused naming the new key),
``library`` (the library's tables), ``typecheck`` (values against field
types), ``timm_models``, ``source`` (ast reading), ``problems`` (messages).
The workflow loads it through ``tokenreduction/config_validation.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from .checker import _Checker
from .library import (
    BASELINE_NAMES,
    DEMO_KINDS,
    MULTILABEL_KINDS,
    PACKAGE,
    WORKFLOW_FIELDS,
    budget_module,
    clca_config_class,
    dataset_kinds,
    method_catalog,
    options_module,
    ots_presets,
    train_config_module,
    tuning_modes,
)
from .renamed import renamed_problems
from .variants import diffusion_variant_module, variant_options
from .problems import ConfigError, ValidatorError, format_problems, schema_problems
from .timm_models import ModelInfo, VIT_CLASSES, timm_architectures, timm_model_info, timm_optimizers, timm_schedulers
from .typecheck import _fits, field_types, type_problem

__all__ = [
    'BASELINE_NAMES',
    'ConfigError',
    'DEMO_KINDS',
    'MULTILABEL_KINDS',
    'ModelInfo',
    'PACKAGE',
    'VIT_CLASSES',
    'ValidatorError',
    'WORKFLOW_FIELDS',
    '_Checker',
    '_fits',
    'budget_module',
    'check_config',
    'clca_config_class',
    'dataset_kinds',
    'diffusion_variant_module',
    'field_types',
    'format_problems',
    'load_schema',
    'main',
    'method_catalog',
    'options_module',
    'ots_presets',
    'renamed_problems',
    'schema_problems',
    'timm_architectures',
    'timm_model_info',
    'timm_optimizers',
    'timm_schedulers',
    'train_config_module',
    'tuning_modes',
    'type_problem',
    'validate_config',
    'variant_options',
]


def check_config(config: dict, schema: Optional[dict] = None, base: Optional[Path] = None,
                 repo: Optional[Path] = None) -> list[tuple[str, str]]:
    """Every problem of `config` as (key path, message); [] when it is valid.

    Old spellings of method variants (:mod:`.renamed`) are reported first,
    alone; then `schema` (the workflow's JSON schema) is checked; the library checks
    run on a config that passes it. Relative paths resolve against `base`
    (Snakemake's working directory; default the current one); detection
    configs against `repo` (the repository root).
    """
    problems = renamed_problems(config)  # before the schema, which would call them unknown keys
    if problems:
        return problems
    if schema is not None:
        problems = schema_problems(config, schema)
        if problems:
            return problems
    base = Path.cwd() if base is None else Path(base)
    repo = PACKAGE.parents[1] if repo is None else Path(repo)
    return _Checker(config, base, repo).run()


def validate_config(config: dict, schema: Optional[dict] = None, base: Optional[Path] = None,
                    repo: Optional[Path] = None) -> None:
    """:func:`check_config`, raising :class:`ConfigError` listing every problem."""
    problems = check_config(config, schema, base, repo)
    if problems:
        raise ConfigError(problems)


def load_schema(path: Path) -> dict:
    import yaml

    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m tokenreduction.config_validation CONFIG.yaml``: check a
    config file outside Snakemake (exit 1 with the problems)."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--schema", type=Path, default=PACKAGE.parents[1] / "workflow" / "schemas" / "config.schema.yaml")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    problems = check_config(config, load_schema(args.schema) if args.schema.is_file() else None)
    if problems:
        print(format_problems(problems), file=sys.stderr)
        return 1
    print(f"{args.config}: valid")
    return 0
