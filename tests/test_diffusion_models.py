"""diffusion.model: the tiny stand-in pipeline of each kind saves, loads back
through from_pretrained as its own pipeline class, and generates with token
merging in the blocks the kind merges by default; a folder of another kind
is refused naming both."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from tokenreduction.diffusion import MODELS, generate_images, load_pipeline, save_tiny_pipeline  # noqa: E402
from tokenreduction.diffusion.pipeline import MODEL_PIPELINES  # noqa: E402

IMG = 32  # latent 16 x 16
#: (tokens, merged tokens) of the blocks each tiny kind merges by default at ratio 0.5
MERGED = {"sd15": (256, 128), "sdxl": (64, 32), "pixart": (64, 32)}


@pytest.mark.parametrize("model", [m for m in MODELS if m != "sd15"])  # sd15: tests/test_diffusion.py
def test_tiny_pipeline_of_each_model_loads_and_merges(tmp_path, model):
    folder = save_tiny_pipeline(tmp_path / f"tiny-{model}", img_size=IMG, model=model)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] in MODEL_PIPELINES[model]
    pipe = load_pipeline(folder, device="cpu", model=model)
    assert type(pipe).__name__ == MODEL_PIPELINES[model][0]
    record = generate_images(
        pipe, ["cat"], tmp_path / "images", images_per_class=1, steps=1, img_size=IMG, warmup=False,
        merge={"merge_fn": "tome", "ratio": 0.5}, attn_processor="keep", printer=lambda line: None,
    )
    assert record["attn_processor"] == "AttnProcessor2_0"
    assert record["num_images"] == 1 and (tmp_path / "images" / "0000_00.png").exists()
    counts = {tuple(v) for v in record["merged_tokens"].values()}
    assert counts == {MERGED[model]}
    expected_blocks = {"sdxl": 10, "pixart": 2}[model]  # SDXL: 2 layers x (2 down + 3 up) blocks at level 2
    assert len(record["merged_tokens"]) == expected_blocks


def test_a_folder_of_another_kind_is_refused(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "tiny-pixart", img_size=IMG, model="pixart")
    with pytest.raises(ValueError, match="holds a PixArtAlphaPipeline, but diffusion.model 'sdxl' loads"):
        load_pipeline(folder, device="cpu", model="sdxl")
    with pytest.raises(ValueError, match="unknown diffusion model 'flux'"):
        load_pipeline(folder, device="cpu", model="flux")


def _config_check():
    """The DAG build's config check, loaded by path as the workflow does."""
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
    demo = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    schema = yaml.safe_load((repo / "workflow" / "schemas" / "config.schema.yaml").read_text())
    return sys.modules[name], demo, schema, repo


def test_config_check_names_model_ratio_and_level_problems(tmp_path):
    cv, demo, schema, repo = _config_check()
    assert demo["diffusion"]["model"] == "sd15"
    assert cv.check_config(demo, schema, base=repo, repo=repo) == []

    def problems(**diffusion):
        config = json.loads(json.dumps(demo))
        config["diffusion"].update(diffusion)
        return dict(cv.check_config(config, schema, base=repo, repo=repo))

    assert "diffusion.model" in problems(model="flux")  # the schema's enum
    over = problems(experiments={"tome-0.8": {"method": "tome", "keep_rate": 0.2}})
    assert "1/(sx*sy) = 0.25" in over["diffusion.experiments.tome-0.8.keep_rate"]
    assert problems(experiments={"tome-0.8": {"method": "tome", "keep_rate": 0.2, "sx": 4, "sy": 4}}) == {}
    level = problems(model="pixart", experiments={"t": {"method": "tome", "keep_rate": 0.5, "max_downsample": 2}})
    assert "patch grid" in level["diffusion.experiments.t.max_downsample"]
    folder = tmp_path / "sdxl-folder"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert problems(model="sdxl", pipeline=str(folder)) == {}
    wrong = problems(model="sd15", pipeline=str(folder))
    assert "holds a StableDiffusionXLPipeline" in wrong["diffusion.model"]
