# The embedded demo: a tiny random-weight ViT-Adapter Mask R-CNN (64-dim,
# 12 blocks, merging at blocks 3, 6, 9) on the fabricated 128 px shapes set
# (tokenreduction.detection.make_shapes_coco), a few iterations on the CPU.
# The data root is set by the rule (detection.run.build_config(data_root=...)).
_base_ = ["./_base_/vit_adapter_mask_rcnn.py"]

embed_dim = 64
model = dict(
    backbone=dict(
        pretrain_size=128,
        embed_dim=embed_dim,
        num_heads=2,
        deform_num_heads=4,
        conv_inplane=16,
        drop_path_rate=0.0,
        norm_cfg=dict(type="BN"),
    ),
    neck=dict(in_channels=[embed_dim] * 4, out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=3),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32, num_classes=3),
    ),
)

classes = ("rectangle", "ellipse", "triangle")
_scales = [(96, 160), (128, 160), (160, 160)]
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomFlip", prob=0.5),
    dict(
        type="RandomChoice",
        transforms=[
            [dict(type="RandomChoiceResize", scales=_scales, keep_ratio=True)],
            [
                dict(type="RandomCrop", crop_type="absolute_range", crop_size=(64, 96), allow_negative_crop=True),
                dict(type="RandomChoiceResize", scales=_scales, keep_ratio=True),
            ],
        ],
    ),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(128, 128), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
_data = dict(type="CocoDataset", data_root="data/shapes/", metainfo=dict(classes=classes))
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        **_data,
        ann_file="annotations/instances_train.json",
        data_prefix=dict(img="train/"),
        filter_cfg=dict(filter_empty_gt=True, min_size=0),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        **_data, ann_file="annotations/instances_val.json", data_prefix=dict(img="val/"), pipeline=test_pipeline
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="CocoMetric", ann_file="data/shapes/annotations/instances_val.json", metric=["bbox", "segm"])
test_evaluator = val_evaluator

max_iters = 3
# no validation while training (val_begin beyond the run): the evaluation rule evaluates
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters, val_begin=max_iters + 1)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
param_scheduler = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=max_iters)]
optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",  # fp32 on the CPU
    constructor="LayerDecayOptimWrapperConstructor",
    optimizer=dict(type="AdamW", lr=1e-4, weight_decay=0.05),
    paramwise_cfg=dict(num_layers=12, layer_decay_rate=0.9),
    accumulative_counts=1,
)
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1, save_last=True),
)
log_processor = dict(by_epoch=False)
load_from = None
