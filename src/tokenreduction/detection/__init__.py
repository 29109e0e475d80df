"""Detection and instance segmentation with token reduction (ATC study).

- :mod:`.vit_adapter`: the ViT-Adapter backbone with ToMe/ATC merging,
  registered as ``ViTAdapter`` in mmdet's MODELS (needs mmcv, mmengine, mmdet).
- :mod:`.optim`: ``LayerDecayOptimWrapperConstructor`` (layer-wise lr decay).
- :mod:`.run`: train / evaluate / benchmark with mmengine's Runner.
- :mod:`.data`: the fabricated COCO-format shapes set of the demo.

These modules run in the detection environment (envs/install_mmdet.sh or
envs/mmdet.yaml), which has torch but neither timm nor torchvision: nothing
here imports them. Importing this package imports nothing heavy; the mmdet
configs load the registering modules through ``custom_imports``.
"""
from .data import CATEGORIES, make_shapes_coco

__all__ = ["CATEGORIES", "make_shapes_coco"]
