"""The ATC study's Stable Diffusion protocol, pinned on the tiny random-weight
pipeline: deterministic ToMe destinations by default, the study's per-image
seeds on a device generator, the attention-processor switch, the class-names
file and its length check, and progress lines in generation and FID logs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("cleanfid")

from tokenreduction.diffusion import apply_patch, class_names, compute_fid, generate_images, patch_state  # noqa: E402
from tokenreduction.diffusion.patch import MergeOptions, remove_patch  # noqa: E402
from tokenreduction.diffusion.pipeline import (  # noqa: E402
    PROMPT,
    ProgressLog,
    build_tiny_pipeline,
    image_seed,
    set_attention,
)


@pytest.fixture(scope="module")
def pipe():
    p = build_tiny_pipeline(img_size=32)
    p.set_progress_bar_config(disable=True)
    return p


def test_image_seed_follows_the_study_formula():
    # the study: seed + int(str(cls_idx) + str(img_idx))
    assert image_seed(100, 12, 1, 2) == 100 + 121
    assert image_seed(0, 0, 1, 2) == 1 and image_seed(0, 3, 0, 2) == 30
    # its collision past 10 images per class, which the "unique" scheme avoids
    assert image_seed(0, 1, 11, 12) == image_seed(0, 11, 1, 12) == 111
    assert image_seed(0, 1, 11, 12, "unique") == 23 != image_seed(0, 11, 1, 12, "unique")
    with pytest.raises(ValueError, match="seed scheme"):
        image_seed(0, 1, 1, 2, "random")


def test_tome_destinations_are_deterministic_by_default(pipe):
    assert MergeOptions().use_rand is False
    apply_patch(pipe, ratio=0.5)
    try:
        assert patch_state(pipe).options.use_rand is False
    finally:
        remove_patch(pipe)


def test_generation_uses_the_study_seed_on_a_device_generator(pipe, tmp_path):
    lines = []
    record = generate_images(pipe, ["cat", "dog"], tmp_path / "gen", images_per_class=2, steps=1, img_size=32,
                             seed=7, warmup=False, progress_every=0.0, printer=lines.append)
    assert record["seeds"] == [7 + 0, 7 + 1, 7 + 10, 7 + 11] and record["seed_scheme"] == "study"
    # the image of class 1, image 1 is the pipeline's output for generator(device).manual_seed(7 + 11)
    generator = torch.Generator(device=pipe.device).manual_seed(18)
    expected = pipe(PROMPT.format("dog"), num_inference_steps=1, guidance_scale=7.5, height=32, width=32,
                    generator=generator, output_type="pil").images[0]
    got = Image.open(tmp_path / "gen" / "0001_01.png")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    # progress lines for the log: one per image here (every 0 s), the last one complete
    assert len(lines) == 4 and lines[-1].startswith("generate: 4/4 images") and "ETA" in lines[-1]
    unique = generate_images(pipe, ["cat", "dog"], tmp_path / "gen2", images_per_class=1, steps=1, img_size=32,
                             seed=7, warmup=False, seed_scheme="unique", printer=lambda line: None)
    assert unique["seeds"] == [7, 8]  # the study's would be [7, 17]


def test_attention_processor_switch(pipe):
    assert set_attention(pipe, "default") == "AttnProcessor"
    assert set_attention(pipe, "flash") == "AttnProcessor2_0"
    assert set_attention(pipe, "keep") == "AttnProcessor2_0"
    assert set_attention(pipe, "default") == "AttnProcessor"
    with pytest.raises(ValueError, match="attention processor"):
        set_attention(pipe, "xformers")


def test_class_names_file_content_and_length_check(tmp_path):
    val = tmp_path / "val"
    for i in range(1000):
        (val / f"n{i:08d}").mkdir(parents=True)
    names = [f"class {i}, synonym" for i in range(1000)]
    txt = tmp_path / "names.txt"
    txt.write_text("\n".join(names) + "\n")
    assert class_names(val, str(txt)) == names
    assert class_names(val, str(txt), num_classes=3) == names[:3]
    short = tmp_path / "short.txt"
    short.write_text("\n".join(names[:999]) + "\n")
    with pytest.raises(ValueError, match="999 class names for 1000 class folders.*tench, Tinca tinca"):
        class_names(val, str(short))
    # the study's SD_setup/class_names.py layout: a dict literal {index: name}, parsed and never run
    py = tmp_path / "class_names.py"
    py.write_text("IM_CLASS_DICT = {\n" + "".join(f" {i}: {n!r},\n" for i, n in enumerate(names)) + "}\n")
    assert class_names(val, str(py), num_classes=2) == names[:2]
    code = tmp_path / "code.py"
    code.write_text("import os\nNAMES = dict(a=1)\n")
    with pytest.raises(ValueError, match="no dict literal"):
        class_names(val, str(code))
    with pytest.raises(ValueError, match="does not exist"):
        class_names(val, str(tmp_path / "missing.txt"))


def test_progress_log_lines():
    lines = []
    log = ProgressLog(10, "job", "images", every_s=3600, printer=lines.append)
    for _ in range(9):
        log.update()
    assert lines == []  # not due yet
    log.update()
    assert len(lines) == 1 and lines[0].startswith("job: 10/10 images,") and "ETA 0 s" in lines[0]


def test_fid_prints_progress_lines(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    lines = []
    out = compute_fid(folder, folder, extractor="pixels", pixel_dim=2, device="cpu", batch_size=4,
                      progress_every=0.0, printer=lines.append)
    assert out["fid"] == pytest.approx(0.0, abs=1e-6)
    assert lines[-1].startswith("FID features (reference, then generated): 12/12 images")


def test_config_check_counts_imagenet_class_names(tmp_path):
    """At DAG build, an ImageNet class-names file must hold 1,000 names."""
    import importlib.util
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    name = "tokenreduction_config_validation"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, repo / "src" / "tokenreduction" / "config_validation.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    cv = sys.modules[name]
    schema = yaml.safe_load((repo / "workflow" / "schemas" / "config.schema.yaml").read_text())
    config = yaml.safe_load((repo / "config" / "atc.yaml").read_text())
    for spec in config["datasets"].values():
        spec["root"] = str(tmp_path)
    names = tmp_path / "names.txt"

    def problems(n):
        names.write_text("".join(f"class {i}, synonym\n" for i in range(n)))
        config["diffusion"]["class_names"] = str(names)
        return [(k, m) for k, m in cv.check_config(config, schema, repo=repo) if k == "diffusion.class_names"]

    assert problems(1000) == []
    (key, message), = problems(999)
    assert "999 class names" in message and "exactly 1000" in message
