# ViT-Adapter-T + Mask R-CNN, 0.5x schedule (6 epochs, lr step at epoch 4),
# fine-tuned from the ViT-Adapter-T 3x COCO checkpoint (the study's start).
_base_ = ["./_base_/vit_adapter_mask_rcnn.py"]

max_epochs = 6
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True, milestones=[4], gamma=0.1),
]
load_from = "pretrained/vit-adapter-t-3x.pth"
