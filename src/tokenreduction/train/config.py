"""The fine-tuning recipe: the network to train (a :class:`~.spec.ModelSpec`)
and how to train it.

Defaults follow the recipe of "Which Tokens to Use?" (DeiT fine-tuning:
AdamW, weight decay 0.05, cosine schedule with warm-up, lr scaled by the
global batch over ``lr_batch_normalizer``, RandAugment, mixup 0.8, cutmix 1.0,
label smoothing 0.1, random erasing 0.25 in mode "pixel", colour jitter 0.3,
Cutout 0.5 and no random erasing on COCO / NUS-WIDE, drop path 0.1, model EMA
validated beside the plain model every epoch with the best of both kept),
scaled down where a full value would make no sense as a default (epochs).

Configs are flat mappings (YAML sections, the workflow's ``--spec`` JSON,
``config`` in the checkpoints): the model spec's keys beside the recipe's.
``TrainConfig.from_dict`` is the only way they come in: it sorts the keys
into ``model_spec`` and the recipe, rejects unknown keys by name and checks
values, so a typo fails at once; ``to_dict`` writes the same flat form.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from .spec import ModelSpec

#: keys whose change does not alter the trajectory of a run (a resumed run may differ in them)
RUNTIME_KEYS = frozenset(
    {"num_workers", "device", "log_every", "progress_seconds", "wandb_project", "checkpoint_every_steps"}
)
#: which weights become final.pth (see tokenreduction.train.selection)
SELECTIONS = ("best", "last", "last_ema")


@dataclass
class TrainConfig:
    #: the network: timm model and its keywords, classes (None: the
    #: dataset's), the reduction, CLCA and the tuning mode (flat keys in a config)
    model_spec: ModelSpec = field(default_factory=ModelSpec)
    pretrained: bool = False
    init_checkpoint: Optional[str] = None
    #: extra arguments of the method's training loss (DynamicViTLoss weights)
    method_loss_kwargs: dict = field(default_factory=dict)
    teacher_checkpoint: Optional[str] = None
    # data
    dataset: str = "imagefolder"
    data_root: str = "data"
    train_split: str = "train"
    val_split: str = "val"
    #: CLCA's --train_trainval: train on train_val, validate (and evaluate) on test
    train_trainval: bool = False
    img_size: int = 224
    # schedule
    epochs: int = 30
    warmup_epochs: int = 20
    #: epochs at min_lr after the schedule's `epochs` (timm's and the CLCA
    #: reference's cooldown); training runs epochs + cooldown_epochs
    cooldown_epochs: int = 0
    max_steps: Optional[int] = None
    batch_size: int = 256
    grad_accum_steps: int = 1
    #: with torchrun: batch_size * grad_accum_steps is the global batch; the
    #: accumulation is divided by the world size (which must divide it)
    keep_effective_batch: bool = False
    opt: str = "adamw"
    lr: float = 1e-3
    #: lr is multiplied by global batch / lr_batch_normalizer (None: lr as given)
    lr_batch_normalizer: Optional[float] = 1024
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    sched: str = "cosine"
    sched_in_steps: bool = True
    amp: bool = False
    clip_grad: Optional[float] = None
    backbone_lr_scale: float = 1.0
    #: MAE fine-tuning: layer-wise lr decay (block i of L trains at lr x
    #: layer_decay ** (L - i), the patch embedding at layer_decay ** (L + 1),
    #: the head at lr), through timm's param_groups_layer_decay. MAE's "blr"
    #: (base lr per 256 images) is lr with lr_batch_normalizer 256: the lr used
    #: is blr x batch_size x grad_accum_steps x world size / 256, as MAE computes it.
    layer_decay: Optional[float] = None
    # regularisation / augmentation
    drop_path: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    #: random erasing (single-label kinds only: the reference never erases
    #: multi-label images); mode "pixel" and one box, as the reference
    reprob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    #: timm's colour jitter (used when auto_augment is off, as on NABirds)
    color_jitter: float = 0.3
    #: Cutout on multi-label kinds (ASL's CutoutPIL: fraction of the side);
    #: null = the kind's reference default (0.5 on COCO and NUS-WIDE, none on
    #: the demo's mosaics); 0 = off
    cutout: Optional[float] = None
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    model_ema: bool = True
    model_ema_decay: float = 0.99996
    #: which weights become final.pth: best (of the plain and EMA model on
    #: validation, every epoch: the study's rule) | last (plain model at the
    #: end) | last_ema (EMA model at the end); the last two do not select on
    #: the validation set
    select_weights: str = "best"
    #: validate after every val_every_epochs-th epoch and always after the
    #: last one (1: every epoch; a number >= the epochs: only at the end, as
    #: the CLCA reference's eval_freq does); `best` selects among the
    #: validated epochs
    val_every_epochs: int = 1
    multilabel_loss: str = "asl"
    # runtime
    seed: int = 0
    num_workers: int = 4
    device: str = "auto"
    wandb_project: Optional[str] = None
    #: progress lines in the log: every log_every optimizer steps or every
    #: progress_seconds seconds, whichever comes first
    log_every: int = 50
    progress_seconds: float = 60.0
    checkpoint_every_steps: Optional[int] = None

    @property
    def total_epochs(self) -> int:
        """Epochs trained: the schedule's plus the cooldown at min_lr."""
        return self.epochs + self.cooldown_epochs

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        positive = ("epochs", "batch_size", "grad_accum_steps", "img_size", "log_every", "val_every_epochs")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(self.model_spec, ModelSpec):
            raise ValueError(f"model_spec must be a ModelSpec (from_dict reads the flat keys), got {self.model_spec!r}")
        self.model_spec.validate()
        for name in ("max_steps", "checkpoint_every_steps"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {value}")
        if self.warmup_epochs < 0 or self.num_workers < 0:
            raise ValueError("warmup_epochs and num_workers must be >= 0")
        if self.cooldown_epochs < 0:
            raise ValueError(f"cooldown_epochs must be >= 0, got {self.cooldown_epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_batch_normalizer is not None and self.lr_batch_normalizer <= 0:
            raise ValueError(f"lr_batch_normalizer must be > 0 or null, got {self.lr_batch_normalizer}")
        if self.backbone_lr_scale < 0:
            raise ValueError(f"backbone_lr_scale must be >= 0, got {self.backbone_lr_scale}")
        if self.layer_decay is not None:
            if not 0.0 < float(self.layer_decay) <= 1.0:
                raise ValueError(f"layer_decay must lie in (0, 1] or be null, got {self.layer_decay}")
            if self.backbone_lr_scale != 1.0:
                raise ValueError("layer_decay and backbone_lr_scale cannot be combined: set one of them")
        if self.multilabel_loss not in ("asl", "bce"):
            raise ValueError(f"multilabel_loss must be 'asl' or 'bce', got {self.multilabel_loss!r}")
        for name in ("mixup", "cutmix", "smoothing", "reprob", "drop_path"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.model_ema_decay <= 1.0:
            raise ValueError(f"model_ema_decay must lie in [0, 1], got {self.model_ema_decay}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.select_weights not in SELECTIONS:
            raise ValueError(f"select_weights must be one of {', '.join(SELECTIONS)}, got {self.select_weights!r}")
        if self.select_weights == "last_ema" and not self.model_ema:
            raise ValueError("select_weights 'last_ema' needs model_ema: true")
        if self.re_mode not in ("const", "rand", "pixel"):
            raise ValueError(f"re_mode must be const, rand or pixel, got {self.re_mode!r}")
        if int(self.re_count) < 1:
            raise ValueError(f"re_count must be >= 1, got {self.re_count}")
        if float(self.color_jitter) < 0:
            raise ValueError(f"color_jitter must be >= 0, got {self.color_jitter}")
        if self.cutout is not None and not 0.0 <= float(self.cutout) <= 1.0:
            raise ValueError(f"cutout must lie in [0, 1] or be null, got {self.cutout}")
        if float(self.progress_seconds) <= 0:
            raise ValueError(f"progress_seconds must be > 0, got {self.progress_seconds}")
        if not isinstance(self.method_loss_kwargs, dict):
            raise ValueError("method_loss_kwargs must be a mapping")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The flat config keys: the model spec's, then the recipe's."""
        return ModelSpec.field_names() + tuple(f.name for f in fields(cls) if f.name != "model_spec")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a flat mapping (the model spec's keys beside the
        recipe's); unknown keys are a ValueError naming them."""
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ValueError(f"unknown training config key(s): {', '.join(unknown)}")
        spec_keys = set(ModelSpec.field_names())
        spec = ModelSpec(**{k: v for k, v in values.items() if k in spec_keys})
        return cls(model_spec=spec, **{k: v for k, v in values.items() if k not in spec_keys})

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping from_dict reads."""
        recipe = asdict(self)
        return {**recipe.pop("model_spec"), **recipe}

    def data_splits(self) -> tuple[str, str]:
        """(train split, validation split): (train_val, test) with
        ``train_trainval``, else (train_split, val_split)."""
        return ("train_val", "test") if self.train_trainval else (self.train_split, self.val_split)
