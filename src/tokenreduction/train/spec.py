"""One description of a (reduced) network: :class:`ModelSpec`.

The fine-tuning config holds one (``TrainConfig.model_spec``), the ``spec``
a training result stores (``final.pth``) is its fields plus what the
evaluator reads, the rebuild from it and the trainer's and teacher's
``create_model`` calls go through :meth:`ModelSpec.build`: a new model
option is added here, once. Imports neither torch nor timm until
:meth:`ModelSpec.build` (the config validator loads this file by path).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass
class ModelSpec:
    """Everything that builds the network (not its weights).

    model, model_kwargs: the timm name and keyword arguments; num_classes:
    classifier outputs (None in a training config: the dataset's count,
    which :meth:`for_dataset` fills in); method ... method_kwargs: the
    reduction (see :func:`tokenreduction.create_model`); clca: CLCA plug-in
    options (None = none); tuning, tuning_kwargs: which parameters train
    (:func:`tokenreduction.clca.apply_tuning`; ``full`` changes nothing)."""

    model: str = "deit_small_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    num_classes: Optional[int] = None
    # reduction (see tokenreduction.create_model)
    method: Optional[str] = None
    keep_rate: Optional[Union[float, Sequence[float]]] = None
    reduction_loc: Optional[Sequence[int]] = None
    budget: Optional[str] = None
    r: Optional[Union[int, Sequence[int]]] = None
    r_schedule: Union[str, float] = "constant"
    prop_attn: Optional[bool] = None
    method_kwargs: dict = field(default_factory=dict)
    #: CLCA plug-in options (tokenreduction.clca.apply_clca), e.g.
    #: {ifa_head: true, clc: true, num_clr: 1}; null or {} = no CLCA
    clca: Optional[dict] = None
    #: which parameters train: full | head (frozen backbone, trainable
    #: classifier) | h2t (Head2Toe) | vqt (visual query tuning); see
    #: tokenreduction.clca.apply_tuning, whose options are tuning_kwargs
    tuning: str = "full"
    tuning_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()
        if self.num_classes is not None:
            self.num_classes = int(self.num_classes)
        self.model_kwargs = dict(self.model_kwargs)
        self.method_kwargs = dict(self.method_kwargs)
        self.tuning_kwargs = dict(self.tuning_kwargs)
        self.clca = dict(self.clca) if self.clca else None
        if self.reduction_loc is not None:
            self.reduction_loc = [int(v) for v in self.reduction_loc]
        if isinstance(self.keep_rate, (list, tuple)):
            self.keep_rate = [float(v) for v in self.keep_rate]
        if isinstance(self.r, (list, tuple)):
            self.r = [int(v) for v in self.r]

    def validate(self) -> None:
        """Raise ValueError naming the first bad value (the method's own
        arguments are checked by create_model)."""
        if self.num_classes is not None and int(self.num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1 or null, got {self.num_classes}")
        if not isinstance(self.model_kwargs, dict) or not isinstance(self.method_kwargs, dict):
            raise ValueError("model_kwargs and method_kwargs must be mappings")
        if self.clca is not None and not isinstance(self.clca, dict):
            raise ValueError(f"clca must be a mapping of CLCA options or null, got {self.clca!r}")
        if not isinstance(self.tuning_kwargs, dict):
            raise ValueError("tuning_kwargs must be a mapping")
        if self.tuning != "full":
            from ..clca.baselines import TUNING_MODES  # the registry (imports torch: only when asked)

            if self.tuning not in TUNING_MODES:
                raise ValueError(f"tuning must be one of {', '.join(TUNING_MODES)}, got {self.tuning!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelSpec":
        """From a stored spec (final.pth's ``spec``, any version); keys of no
        field (img_size, dataset, ...: what the evaluator reads) are ignored,
        absent or null optional fields take their defaults; a spec without
        model or num_classes is a ValueError."""
        missing = [k for k in ("model", "num_classes") if values.get(k) is None]
        if missing:
            raise ValueError(f"model spec lacks {missing}")
        return cls(**{k: values[k] for k in cls.field_names() if values.get(k) is not None})

    def for_dataset(self, num_classes: int, img_size: Optional[int] = None) -> "ModelSpec":
        """This spec with `num_classes` where it has none, and `img_size` as a
        model keyword unless ``model_kwargs`` has one (what a training run builds)."""
        model_kwargs = dict(self.model_kwargs)
        if img_size is not None:
            model_kwargs.setdefault("img_size", img_size)
        return replace(self, num_classes=self.num_classes or num_classes, model_kwargs=model_kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def build(self, **overrides: Any) -> "nn.Module":
        """``create_model`` with this spec (untrained unless `overrides` name
        ``pretrained`` or ``checkpoint_path``), then the tuning mode
        (``full``: the model as built). Other `overrides` go to timm (e.g.
        drop_path_rate) over ``model_kwargs``. A spec without num_classes is
        a ValueError."""
        from ..models.vit import create_model

        if self.num_classes is None:
            raise ValueError(f"model spec of {self.model!r} has no num_classes: set it (for_dataset) before building")
        load = {k: overrides.pop(k) for k in ("pretrained", "checkpoint_path") if k in overrides}
        model = create_model(
            self.model,
            method=self.method,
            keep_rate=self.keep_rate,
            reduction_loc=self.reduction_loc,
            budget=self.budget,
            r=self.r,
            r_schedule=self.r_schedule,
            prop_attn=self.prop_attn,
            method_kwargs=self.method_kwargs or None,
            num_classes=self.num_classes,
            clca=self.clca or None,
            **load,
            **{**self.model_kwargs, **overrides},
        )
        from ..clca.baselines import apply_tuning

        return apply_tuning(model, self.tuning, **self.tuning_kwargs)


__all__ = ["ModelSpec"]
