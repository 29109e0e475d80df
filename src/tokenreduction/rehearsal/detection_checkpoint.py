"""The rehearsal's ViT-Adapter 3x checkpoint stand-in, written INSIDE the
detection environment (mmcv, mmengine, mmdet; no timm):

    python -m tokenreduction.rehearsal.detection_checkpoint CONFIG OUT [--seed 0]

builds the detector of mmdet config CONFIG (the rehearsal's stand-in config:
the study's ViT-Adapter Mask R-CNN, narrowed) with mmdet's own registry,
initialises it as mmdet does (random: no pretrained part; the box
classifier favours a few categories, so that it detects), and saves it in the
format of the released ViT-Adapter 3x checkpoints (mmdet 2.x):
``{"meta": {...}, "state_dict": {"backbone.*", "neck.*", "rpn_head.*",
"roi_head.*"}}``, atomically. It then reads the file back through the
detection jobs' own load path (:mod:`tokenreduction.detection.checkpoint`:
weights-only, the backbone strictly), so a stand-in that the jobs would refuse
is never left behind.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

#: what the released checkpoints' meta holds (mmdet 2.x), with plain values only
RELEASE_META = {"mmdet_version": "2.22.0", "epoch": 36, "iter": 263808}
#: the box classifier's bias favours the first categories by this logit, so
#: that the random detector's scores pass mmdet's test threshold (0.05): the
#: evaluation then scores real detections (an empty result skips COCOeval)
FAVOURED_CLASSES, FAVOURED_LOGIT = 10, 4.0


def write_detector_checkpoint(config: str, path: str, seed: int = 0) -> dict:
    """Write the stand-in checkpoint of `config` to `path`; returns its state dict."""
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from ..detection.checkpoint import backbone_state, check_backbone_state, load_detection_checkpoint

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(config)  # imports the ViT-Adapter through the config's custom_imports
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    with torch.no_grad():
        model.roi_head.bbox_head.fc_cls.bias[:FAVOURED_CLASSES] += FAVOURED_LOGIT
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    from mmdet.datasets import CocoDataset

    meta = {**RELEASE_META, "CLASSES": tuple(CocoDataset.METAINFO["classes"]), "config": Path(config).read_text(),
            "note": "tokenreduction rehearsal stand-in: random weights of the narrowed model"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"meta": meta, "state_dict": state}, tmp)
    check_backbone_state(model.backbone, backbone_state(load_detection_checkpoint(tmp)), str(path))
    os.replace(tmp, path)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    state = write_detector_checkpoint(args.config, args.out, args.seed)
    print(f"{args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values())} values")


if __name__ == "__main__":
    main()
