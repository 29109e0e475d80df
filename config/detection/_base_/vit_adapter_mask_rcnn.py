# Mask R-CNN + FPN on a ViT-Adapter with token merging (tokenreduction.detection),
# on COCO 2017 with the DETR-style augmentation, as the ATC study fine-tunes it
# (its setup is SViT's, mmdet 2.x; this is the mmdet 3.x / mmengine form).
# Model, dataset and runtime defaults come from mmdet's own base configs.
_base_ = [
    "mmdet::_base_/models/mask-rcnn_r50_fpn.py",
    "mmdet::_base_/datasets/coco_instance.py",
    "mmdet::_base_/default_runtime.py",
]
custom_imports = dict(
    imports=["tokenreduction.detection.vit_adapter", "tokenreduction.detection.optim"],
    allow_failed_imports=False,
)

embed_dim = 192
model = dict(
    backbone=dict(
        _delete_=True,
        type="ViTAdapter",
        pretrain_size=224,
        patch_size=16,
        embed_dim=embed_dim,
        depth=12,
        num_heads=3,
        mlp_ratio=4,
        drop_path_rate=0.1,
        conv_inplane=64,
        n_points=4,
        deform_num_heads=6,
        cffn_ratio=0.25,
        deform_ratio=1.0,
        interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
        reduction_loc=[3, 6, 9],
        reduction_ratio=0.7,  # fraction of the current tokens kept; 0 = unreduced
        linkage="tome",  # tome | single | average | complete (ATC)
        proportional_attn=True,
        norm_cfg=dict(type="SyncBN"),  # mmengine reverts it to BN when not distributed
        pretrained=None,  # optional local DeiT checkpoint for the ViT part
    ),
    neck=dict(in_channels=[embed_dim] * 4),
)

# augmentation strategy of DETR / Sparse R-CNN, then a crop to at most 1024 px
_scales = [(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333),
           (672, 1333), (704, 1333), (736, 1333), (768, 1333), (800, 1333)]
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomFlip", prob=0.5),
    dict(
        type="RandomChoice",
        transforms=[
            [dict(type="RandomChoiceResize", scales=_scales, keep_ratio=True)],
            [
                dict(type="RandomChoiceResize", scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
                dict(type="RandomCrop", crop_type="absolute_range", crop_size=(384, 600), allow_negative_crop=True),
                dict(type="RandomChoiceResize", scales=_scales, keep_ratio=True),
            ],
        ],
    ),
    dict(type="RandomCrop", crop_type="absolute_range", crop_size=(1024, 1024), allow_negative_crop=True),
    dict(type="PackDetInputs"),
]
train_dataloader = dict(batch_size=4, num_workers=2, dataset=dict(pipeline=train_pipeline))

# AdamW lr 1e-5, wd 1e-6, no decay on embeddings, norms and biases; fp16 with
# loss scale 512. Layer-wise lr decay: lr * rate ** (13 - layer id); the
# published fine-tuning configs decay no layer (rate 1.0).
optim_wrapper = dict(
    _delete_=True,
    type="AmpOptimWrapper",
    loss_scale=dict(init_scale=512),
    constructor="LayerDecayOptimWrapperConstructor",
    optimizer=dict(type="AdamW", lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-6),
    paramwise_cfg=dict(num_layers=12, layer_decay_rate=1.0),
    accumulative_counts=1,  # gradient accumulation (the study's cumulative_iters)
)
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=3, save_last=True))
auto_scale_lr = dict(enable=False, base_batch_size=16)
