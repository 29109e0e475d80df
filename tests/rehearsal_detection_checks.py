"""Checks of the rehearsal's detection stand-ins that run INSIDE the detection
environment (pycocotools, mmcv, mmengine, mmdet; no pytest, no timm).
tests/test_rehearsal.py runs

    <mmdet python> tests/rehearsal_detection_checks.py <check>[,<check>...] <plan.json>

where plan.json holds the rehearsal plan items already written (the COCO 2017
stand-in, the stand-in configs, their checkpoints). Prints ``check NAME: ok``
or ``check NAME: FAIL`` and the traceback. Plain asserts with messages.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)


def _items(plan: list, what: str) -> list:
    return [item for item in plan if item["what"] == what]


def check_pycocotools(plan: list) -> None:
    """Both splits load with pycocotools: COCO's 80 category ids and names,
    polygon masks whose area is the annotation's, one crowd RLE, one image
    without annotations, every box inside its image."""
    from pycocotools.coco import COCO

    from tokenreduction.rehearsal.fabricate import COCO_CATEGORY_IDS, COCO_CLASSES

    root = Path(_items(plan, "coco_instances")[0]["path"])
    splits = _items(plan, "coco_instances")[0]["splits"]
    for split in ("train", "val"):
        coco = COCO(str(root / "annotations" / f"instances_{split}2017.json"))
        assert sorted(coco.getCatIds()) == COCO_CATEGORY_IDS, coco.getCatIds()
        assert [c["name"] for c in coco.loadCats(COCO_CATEGORY_IDS)] == list(COCO_CLASSES)
        assert len(coco.getImgIds()) == splits[split] + 1
        empty = [i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=[i])]
        assert len(empty) == 1, empty
        crowds = coco.loadAnns(coco.getAnnIds(iscrowd=True))
        assert len(crowds) == 1 and isinstance(crowds[0]["segmentation"]["counts"], list)
        for ann in coco.loadAnns(coco.getAnnIds()):
            img = coco.loadImgs(ann["image_id"])[0]
            assert (root / f"{split}2017" / img["file_name"]).is_file()
            mask = coco.annToMask(ann)
            assert mask.shape == (img["height"], img["width"])
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"], (ann, img)
            if ann["iscrowd"]:
                assert mask.sum() == ann["area"], (mask.sum(), ann["area"])
            else:  # a rasterised polygon: its area within the boundary pixels
                assert abs(int(mask.sum()) - ann["area"]) <= 0.5 * ann["area"] + 20, (mask.sum(), ann["area"])


def check_mmdet_dataset(plan: list) -> None:
    """mmdet's CocoDataset reads the stand-in through each stand-in config's
    pipelines: train leaves out the unannotated image; samples are at the
    stand-in's scale with boxes and masks; val keeps every image."""
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from tokenreduction.detection.run import build_config

    register_all_modules(init_default_scope=True)
    root = _items(plan, "coco_instances")[0]["path"]
    splits = _items(plan, "coco_instances")[0]["splits"]
    for item in _items(plan, "detection_config"):
        cfg = build_config(item["path"], "/tmp/unused", data_root=root)
        assert isinstance(cfg, Config)
        train = DATASETS.build(cfg.train_dataloader.dataset)
        assert len(train) == splits["train"], len(train)
        sample = train[0]
        shape = sample["inputs"].shape
        assert shape[0] == 3 and max(shape[1:]) <= 133, shape  # 1/10 of the study's scale
        assert len(sample["data_samples"].gt_instances) >= 1 and sample["data_samples"].gt_instances.masks is not None
        val = DATASETS.build(cfg.test_dataloader.dataset)
        assert len(val) == splits["val"] + 1, len(val)
        assert max(val[0]["inputs"].shape[1:]) <= 133
        assert cfg.train_dataloader.num_workers == 0 and cfg.optim_wrapper.type == "OptimWrapper"
        assert cfg.train_cfg.max_epochs == 1
        assert cfg.model.backbone.depth == 12 and cfg.model.backbone.patch_size == 16
        assert cfg.model.roi_head.bbox_head.num_classes == 80


def check_checkpoints(plan: list) -> None:
    """Each stand-in checkpoint is mmdet's release format with the release's
    key names: {meta, state_dict}; backbone.* exactly the ViT-Adapter 3x key
    list (SViT/ATC: no layer scale) at the stand-in's width, beside neck.*,
    rpn_head.*, roi_head.*; read through the detection jobs' load path
    (weights-only, backbone strict), and the whole detector loads it strictly."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from detection_env_checks import adapter_key_shapes
    from tokenreduction.detection.checkpoint import backbone_state, check_backbone_state, load_detection_checkpoint
    from tokenreduction.detection.run import build_config

    register_all_modules(init_default_scope=True)
    for item in _items(plan, "detection_checkpoint"):
        saved = load_detection_checkpoint(item["path"])
        assert set(saved) == {"meta", "state_dict"}, set(saved)
        assert len(saved["meta"]["CLASSES"]) == 80 and saved["meta"]["mmdet_version"].startswith("2.")
        state = saved["state_dict"]
        assert {k.split(".", 1)[0] for k in state} == {"backbone", "neck", "rpn_head", "roi_head"}
        backbone = backbone_state(saved)
        release = adapter_key_shapes("T", layer_scale=False)
        assert set(backbone) == set(release), sorted(set(backbone) ^ set(release))[:6]
        for key in ("neck.lateral_convs.0.conv.weight", "rpn_head.rpn_conv.weight", "roi_head.bbox_head.fc_cls.weight",
                    "roi_head.mask_head.conv_logits.weight"):
            assert key in state, key
        assert state["roi_head.bbox_head.fc_cls.weight"].shape[0] == 81  # COCO's 80 + background
        cfg = build_config(item["config"], "/tmp/unused")
        model = MODELS.build(cfg.model)
        dim = cfg.model.backbone.embed_dim
        assert dim in (16, 24, 32) and backbone["pos_embed"].shape == (1, 197, dim), backbone["pos_embed"].shape
        check_backbone_state(model.backbone, backbone, item["path"])
        model.load_state_dict(state, strict=True)
        assert torch.equal(model.backbone.blocks[11].mlp.fc2.weight, backbone["blocks.11.mlp.fc2.weight"])
        wrong = dict(backbone)
        del wrong["interactions.0.injector.gamma"]
        try:
            check_backbone_state(model.backbone, wrong, "wrong")
        except ValueError as err:
            assert "interactions.0.injector.gamma" in str(err)
        else:
            raise AssertionError("a missing backbone key passed the strict check")


CHECKS = {"pycocotools": check_pycocotools, "mmdet_dataset": check_mmdet_dataset, "checkpoints": check_checkpoints}


def main() -> None:
    names, plan_path = sys.argv[1].split(","), sys.argv[2]
    plan = json.loads(Path(plan_path).read_text())
    np.random.seed(0)
    for name in names:
        try:
            CHECKS[name](plan)
        except Exception:  # noqa: BLE001 - reported per check
            print(f"check {name}: FAIL")
            traceback.print_exc()
        else:
            print(f"check {name}: ok")


if __name__ == "__main__":
    main()
