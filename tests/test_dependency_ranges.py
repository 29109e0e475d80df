"""Declared dependency ranges: the timm check, pyproject's bounds, the
workflow's exact pins.

The library reads timm's ViT internals; a timm older than it supports must
fail at import with one error naming both versions, not at the first forward
(tokenreduction._compat). pyproject.toml declares ranges whose lower ends
.ci/lowest_deps.sh tests; exact pins live only in install.sh and envs/.
"""
from __future__ import annotations

import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from tokenreduction import _compat

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _lower_bound(requirements: list[str], name: str) -> str:
    found = [r for r in requirements if re.match(rf"{re.escape(name)}\s*>=", r)]
    assert len(found) == 1, f"{name}: expected one 'name>=X' requirement in {requirements}"
    return found[0].split(">=", 1)[1].split(",")[0].strip()


def test_release_numbers():
    assert _compat.release("1.0.15") == (1, 0, 15)
    assert _compat.release("1.0.16.dev0") == (1, 0, 16)
    assert _compat.release("2.14.1+cu130") == (2, 14, 1)
    assert _compat.release("1.0.15rc1") == (1, 0, 15)
    with pytest.raises(ValueError, match="not a version number"):
        _compat.release("dev")


@pytest.mark.parametrize("installed", ["0.9.16", "1.0.14", "0.4.12"])
def test_an_older_timm_gets_one_error_naming_both_versions(installed):
    with pytest.raises(ImportError) as err:
        _compat.require_timm(installed)
    message = str(err.value)
    assert f"timm {installed} is installed" in message and f"timm>={_compat.MIN_TIMM}" in message


@pytest.mark.parametrize("installed", ["1.0.15", "1.0.16.dev0", "1.0.31", "1.1.0", "2.0"])
def test_supported_timm_versions_pass(installed):
    _compat.require_timm(installed)


def test_the_check_reads_the_installed_timm(monkeypatch):
    seen = []

    def fake_version(name):
        seen.append(name)
        return "1.0.9"

    monkeypatch.setattr(_compat.metadata, "version", fake_version)
    with pytest.raises(ImportError, match=r"timm 1\.0\.9 is installed"):
        _compat.require_timm()
    assert seen == ["timm"]


def test_a_missing_timm_is_named(monkeypatch):
    def missing(name):
        raise _compat.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_compat.metadata, "version", missing)
    with pytest.raises(ImportError, match="timm is not installed"):
        _compat.require_timm()


# a fresh interpreter that sees an old timm in the metadata: `import
# tokenreduction` stays light and works; the first model builder raises the check's error
OLD_TIMM_SCRIPT = """
import importlib.metadata as metadata
real = metadata.version
metadata.version = lambda name: "1.0.14" if name == "timm" else real(name)
import sys
import tokenreduction as tr
assert "timm" not in sys.modules, "import tokenreduction imported timm"
try:
    tr.patch_model
except ImportError as err:
    print("ERROR:", err)
else:
    print("NO ERROR")
"""


def test_patch_model_with_an_older_timm_raises_the_version_error():
    proc = subprocess.run([sys.executable, "-c", OLD_TIMM_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip().splitlines()[-1]
    assert out == (f"ERROR: tokenreduction needs timm>={_compat.MIN_TIMM}, but timm 1.0.14 is installed "
                   f"(its ViT internals differ): pip install 'timm>={_compat.MIN_TIMM}'"), proc.stdout


def test_pyproject_declares_the_timm_the_check_requires():
    assert _lower_bound(PYPROJECT["dependencies"], "timm") == _compat.MIN_TIMM


def test_every_core_dependency_declares_a_lower_bound():
    # .ci/lowest_deps.sh installs exactly these bounds: a dependency without one is untested at its low end
    for requirement in PYPROJECT["dependencies"]:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+>=[0-9][0-9.]*", requirement), requirement


def test_library_extras_declare_ranges_not_pins():
    for extra, requirements in PYPROJECT["optional-dependencies"].items():
        for requirement in requirements:
            assert "==" not in requirement, f"extra {extra!r} pins {requirement}: pins go in install.sh and envs/"


def test_license_is_an_spdx_string():
    assert PYPROJECT["license"] == "MIT"


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"([A-Za-z][A-Za-z0-9_.\-]*)==([0-9][0-9A-Za-z.+]*)", text))


@pytest.mark.parametrize("source", ["install.sh", "envs/diffusion.yaml", "envs/torch.yaml"])
def test_workflow_pins_lie_in_the_declared_ranges(source):
    from packaging.requirements import Requirement

    declared = {}
    for requirement in PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["diffusion"]:
        parsed = Requirement(requirement)
        declared[parsed.name.lower()] = parsed.specifier
    pins = _pins((ROOT / source).read_text())
    assert pins, f"{source} pins nothing"
    for name, version in pins.items():
        specifier = declared.get(name.lower())
        if specifier is not None:
            assert specifier.contains(version, prereleases=True), f"{source}: {name}=={version} outside {specifier}"


def test_install_sh_and_the_diffusion_environment_pin_the_same_diffusion_stack():
    install, env = _pins((ROOT / "install.sh").read_text()), _pins((ROOT / "envs/diffusion.yaml").read_text())
    for name in ("torch", "torchvision", "diffusers", "transformers", "tokenizers", "clean-fid"):
        assert install[name] == env[name], name


# ---------------------------------------------------------------- timm's Mixup: multi_label from 1.0.31 on
MIXUP_CFG = SimpleNamespace(mixup=0.8, cutmix=1.0, batch_size=4, smoothing=0.1)


class MixupBefore1031:
    """timm's Mixup signature before 1.0.31 (no multi_label)."""

    def __init__(self, mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=1000):
        self.num_classes = num_classes


def test_multilabel_mixup_on_an_older_timm_names_the_version(monkeypatch):
    import timm
    import timm.data

    from tokenreduction.train.recipe import build_mixup

    monkeypatch.setattr(timm.data, "Mixup", MixupBefore1031)
    with pytest.raises(RuntimeError, match=rf"needs timm>=1\.0\.31 .*timm {re.escape(timm.__version__)} is installed"):
        build_mixup(MIXUP_CFG, 3, multilabel=True)
    single = build_mixup(MIXUP_CFG, 3, multilabel=False)  # single-label mixing needs no new keyword
    assert isinstance(single, MixupBefore1031) and single.num_classes == 3


def test_mixup_mixes_multilabel_targets_where_timm_can():
    from timm.data import Mixup

    from tokenreduction.train.recipe import build_mixup

    assert not getattr(build_mixup(MIXUP_CFG, 3, multilabel=False), "multi_label", False)
    if "multi_label" in inspect.signature(Mixup).parameters:
        assert build_mixup(MIXUP_CFG, 3, multilabel=True).multi_label
