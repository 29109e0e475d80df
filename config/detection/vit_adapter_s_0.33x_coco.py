# ViT-Adapter-S + Mask R-CNN, 0.33x schedule (4 epochs, lr step at epoch 3),
# fine-tuned from the ViT-Adapter-S 3x COCO checkpoint (the study's start).
_base_ = ["./_base_/vit_adapter_mask_rcnn.py"]

embed_dim = 384
model = dict(
    backbone=dict(embed_dim=embed_dim, num_heads=6, drop_path_rate=0.2),
    neck=dict(in_channels=[embed_dim] * 4),
)
max_epochs = 4
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True, milestones=[3], gamma=0.1),
]
load_from = "pretrained/vit-adapter-s-3x.pth"
