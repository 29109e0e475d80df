"""One description of a (reduced) network: :class:`ModelSpec`.

The fine-tuning config (:class:`tokenreduction.train.TrainConfig`, which has
a field of the same name for each of these), the ``spec`` a training result
stores (``final.pth``), the rebuild from it and the trainer's
``create_model`` call all take their field list from here, so a new model
option is added in one place (tests/test_train_phases.py checks that
TrainConfig has each field). Imports neither torch nor timm until
:meth:`ModelSpec.build`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass
class ModelSpec:
    """Everything that builds the network (not its weights).

    model, model_kwargs: the timm name and keyword arguments; num_classes:
    classifier outputs; method ... method_kwargs: the reduction (see
    :func:`tokenreduction.create_model`); clca: CLCA plug-in options (None =
    none); tuning, tuning_kwargs: which parameters train
    (:func:`tokenreduction.clca.apply_tuning`; ``full`` changes nothing)."""

    model: str
    num_classes: int
    model_kwargs: dict = field(default_factory=dict)
    method: Optional[str] = None
    keep_rate: Optional[Union[float, Sequence[float]]] = None
    reduction_loc: Optional[Sequence[int]] = None
    budget: Optional[str] = None
    r: Optional[Union[int, Sequence[int]]] = None
    r_schedule: Union[str, float] = "constant"
    prop_attn: Optional[bool] = None
    method_kwargs: dict = field(default_factory=dict)
    clca: Optional[dict] = None
    tuning: str = "full"
    tuning_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.num_classes = int(self.num_classes)
        self.model_kwargs = dict(self.model_kwargs or {})
        self.method_kwargs = dict(self.method_kwargs or {})
        self.tuning_kwargs = dict(self.tuning_kwargs or {})
        self.clca = dict(self.clca) if self.clca else None
        self.tuning = self.tuning or "full"
        if self.reduction_loc is not None:
            self.reduction_loc = [int(v) for v in self.reduction_loc]
        if self.keep_rate is not None and not isinstance(self.keep_rate, (int, float)):
            self.keep_rate = [float(v) for v in self.keep_rate]
        if self.r is not None and not isinstance(self.r, int):
            self.r = [int(v) for v in self.r]

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_config(cls, config: Any, num_classes: int) -> "ModelSpec":
        """The spec of a config object with a field of each name (a
        TrainConfig); its ``img_size`` becomes a model keyword unless
        ``model_kwargs`` has one."""
        values = {name: getattr(config, name) for name in cls.field_names() if name != "num_classes"}
        values["model_kwargs"] = dict(values["model_kwargs"] or {})
        if getattr(config, "img_size", None) is not None:
            values["model_kwargs"].setdefault("img_size", config.img_size)
        return cls(num_classes=num_classes, **values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelSpec":
        """From a stored spec; keys of no field (img_size, dataset, ...: what
        the evaluator reads) are ignored, absent optional fields take their
        defaults; a spec without model or num_classes is a ValueError."""
        missing = [k for k in ("model", "num_classes") if k not in values]
        if missing:
            raise ValueError(f"model spec lacks {missing}")
        given = {k: values[k] for k in cls.field_names() if values.get(k) is not None}
        return cls(**{**given, "model": values["model"], "num_classes": values["num_classes"]})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def build(self, **overrides: Any) -> "nn.Module":
        """``create_model`` with this spec (untrained unless `overrides` name
        ``pretrained`` or ``checkpoint_path``), then the tuning mode
        (``full``: the model as built). Other
        `overrides` go to timm (e.g. drop_path_rate) over ``model_kwargs``."""
        from ..models.vit import create_model

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
