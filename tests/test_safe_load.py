"""Checkpoint loading cannot run code (tokenreduction.safe_load)."""
import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenreduction.safe_load import CorruptCheckpointError, UnsafeCheckpointError, load_checkpoint_file


class _Payload:
    """Unpickling calls os.system(cmd): a classic malicious checkpoint."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Marker:
    """Unpickling calls Path.touch via a method: no os.system needed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).touch, ())


def _deit_style(tmp_path: Path) -> Path:
    """A checkpoint laid out as DeiT/MAE release it: model + args Namespace +
    optimizer state + epoch."""
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = tmp_path / "deit_tiny.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": 299,
            "args": argparse.Namespace(model="deit_tiny_patch16_224", lr=5e-4, output_dir="out", dist_url="env://"),
        },
        path,
    )
    return path


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Payload(f"touch {marker}")}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint_file(path)
    assert str(path) in str(err.value)
    assert "system" in str(err.value)  # names what it refused
    assert not marker.exists()


def test_malicious_method_reference_is_refused(tmp_path):
    marker = tmp_path / "touched"
    path = tmp_path / "evil2.pth"
    torch.save([_Marker(str(marker))], path)
    with pytest.raises(UnsafeCheckpointError, match="evil2.pth"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_every_project_loader_refuses_the_malicious_file(tmp_path):
    """The package's own load sites go through the safe loader."""
    from tokenreduction.models.vit import load_checkpoint
    from tokenreduction.ots.presets import _load
    from tokenreduction.train.checkpoint import load_trained_model

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "spec": _Payload(f"touch {marker}")}, path)
    for load in (lambda p: load_checkpoint(torch.nn.Linear(2, 2), p), _load, load_trained_model):
        with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
            load(path)
    assert not marker.exists()


def test_deit_style_checkpoint_with_namespace_loads(tmp_path):
    path = _deit_style(tmp_path)
    raw = load_checkpoint_file(path)
    assert isinstance(raw["args"], argparse.Namespace)
    assert raw["args"].model == "deit_tiny_patch16_224"
    assert raw["epoch"] == 299
    assert set(raw["model"]) == {"weight", "bias"}
    assert isinstance(raw["optimizer"]["state"][0]["exp_avg"], torch.Tensor)


def test_numpy_rng_state_and_scalars_load(tmp_path):
    """What the trainer's resumable checkpoints hold besides tensors."""
    rng = np.random.RandomState(3).get_state()
    path = tmp_path / "last.pth"
    torch.save({"rng": {"numpy": rng}, "metric": np.float64(0.25), "n": np.int64(7)}, path)
    raw = load_checkpoint_file(path)
    assert raw["rng"]["numpy"][0] == "MT19937"
    np.testing.assert_array_equal(raw["rng"]["numpy"][1], rng[1])
    assert raw["metric"] == 0.25 and raw["n"] == 7


def test_truncated_and_non_checkpoint_files_name_the_file(tmp_path):
    good = _deit_style(tmp_path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="cut.pth"):
        load_checkpoint_file(cut)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CorruptCheckpointError, match="notes.pth"):
        load_checkpoint_file(text)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_checkpoint_file(tmp_path / "absent.pth")


def test_deit_release_layout_loads_into_a_model(tmp_path):
    """A DeiT release file (model + Namespace args) loads through the model
    builder's loader."""
    import timm

    from tokenreduction.models.vit import load_checkpoint

    kwargs = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    src = timm.create_model("vit_tiny_patch16_224", **kwargs)
    path = tmp_path / "deit_release.pth"
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(epochs=300), "epoch": 299}, path)
    dst = timm.create_model("vit_tiny_patch16_224", **kwargs)
    load_checkpoint(dst, path)
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name


def test_numpy_1x_checkpoint_names_load(tmp_path):
    """A file pickled under numpy 1.x references numpy.core.multiarray.*."""
    path = tmp_path / "old.pth"
    torch.save({"rng": np.arange(3, dtype=np.uint32)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    if b"numpy._core.multiarray" not in data:
        pytest.skip("this numpy already pickles numpy.core names")
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    np.testing.assert_array_equal(load_checkpoint_file(path)["rng"], np.arange(3))


class _Stats:
    """Like mmengine's HistoryBuffer: its pickled state names one of its own methods,
    which pickle protocol 2 writes as getattr(_Stats, "mean")."""

    def __init__(self) -> None:
        self.values = np.array([1.0, 2.0])
        self.methods = {"mean": _Stats.mean}

    def mean(self) -> float:
        return float(self.values.mean())


def test_extra_globals_widen_the_allow_list_for_one_call_only(tmp_path):
    """The detection path's form: an extra type, and the pickle's builtins.getattr
    resolved to a restricted function that answers only what the format needs."""
    path = tmp_path / "stats.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hub": _Stats()}, path)
    with pytest.raises(UnsafeCheckpointError, match="_Stats"):
        load_checkpoint_file(path)
    asked = []

    def only_stats(obj, name):
        asked.append((obj, name))
        if obj is _Stats and name == "mean":
            return _Stats.mean
        raise TypeError(f"refused getattr({obj!r}, {name!r})")

    extra = [_Stats, (only_stats, "builtins.getattr")]
    loaded = load_checkpoint_file(path, extra_globals=extra)
    assert asked == [(_Stats, "mean")]
    assert loaded["hub"].mean() == 1.5 and torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    with pytest.raises(UnsafeCheckpointError):  # the widening does not outlive the call
        load_checkpoint_file(path)
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    torch.save({"hub": _Stats(), "x": _Payload(f"touch {marker}")}, evil)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_checkpoint_file(evil, extra_globals=extra)
    assert not marker.exists()
