"""The contract every reduction method follows.

A method sees only the *patch* tokens of one stage: the prefix tokens (CLS,
distillation, registers) are split off by the block before the call and put
back after it, so no method can drop or merge them.

Shapes: B images, N patch tokens in, M tokens out, C channels, H heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Optional

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..models.budget import StageBudget


@dataclass
class BlockFeatures:
    """What the host block computed for this stage; a field is None unless asked.

    cls_attn:      (B, H, N) softmaxed attention of the first prefix token (CLS)
                   to each patch token (the row is normalised over all tokens,
                   prefix included, then sliced to the patches).
    metric:        (B, N, Dh) keys averaged over heads (ToMe's similarity metric).
    value:         (B, H, N, Dh) value vectors.
    attn_received: (B, N) attention each patch token received in the previous
                   block, summed over heads and queries (K-Medoids' weights).
    mask:          (B, N) bool, False where a token is padding (ATS) or masked
                   (DynamicViT training); None when every token is valid.
    keep_score:    (B, N) float in [0, 1], DynamicViT's running soft keep mask
                   during training (None otherwise).
    num_prefix:    how many non-patch tokens precede the patches in the block's
                   sequence (set by the model; 1 = one CLS token when a method
                   is called on its own). ToMe's bipartite split is by position
                   over the whole sequence, so its parity depends on it.
    """

    cls_attn: Optional[torch.Tensor] = None
    metric: Optional[torch.Tensor] = None
    value: Optional[torch.Tensor] = None
    attn_received: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    keep_score: Optional[torch.Tensor] = None
    num_prefix: int = 1


@dataclass
class ReductionOutput:
    """The result of one reduction stage over the patch tokens.

    x:          (B, M, C) reduced patch tokens.
    size:       (B, M) how many original patches each output token stands for.
    assignment: (B, N) long, for each input token the output token it went to,
                -1 where it was dropped. For soft methods, the argmax of weights.
    weights:    (B, N, M) soft assignment weights of soft methods, else None.
    mask:       (B, M) bool validity of the output tokens (ATS padding,
                DynamicViT training masks), None when all are valid.
    aux:        extra tensors a trainer needs (DynamicViT keep decisions).
    """

    x: torch.Tensor
    size: torch.Tensor
    assignment: torch.Tensor
    weights: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    keep_score: Optional[torch.Tensor] = None
    aux: dict = field(default_factory=dict)


class MethodLoss(nn.Module):
    """A learned method's training objective around the task loss.

    The trainer calls it after every training forward as
    ``loss(model, images, outputs, targets, teacher)``: `model` is the student
    (its ``reduction_state`` holds that forward's stages, ``aux`` and final
    tokens), `images` (B, 3, H, W) its input, `outputs` (B, K) its logits,
    `targets` what the task loss takes, `teacher` a frozen model or None.
    Returns a scalar; ``last_terms`` may hold the detached terms for logging.
    A method provides one through :meth:`TokenReducer.training_loss`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_terms: dict = {}

    def forward(
        self,
        model: nn.Module,
        images: torch.Tensor,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        teacher: Optional[nn.Module] = None,
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class TokenReducer(nn.Module):
    """Base class of the reduction modules.

    Class attributes say how the host block must call the method:
      kind:     "prune" (keeps a subset), "merge" (hard clusters) or "soft"
                (soft clusters); drives the pattern analysis.
      position: "mid" = after the attention residual, before the MLP, in the
                block at the reduction location (Top-K, EViT, ATS, ToMe, ATC,
                ToMeCIS); "pre" = before the block (K-Medoids, DPC-KNN, SiT,
                PatchMerger, Sinkhorn, DynamicViT, heuristic).
      needs:    which BlockFeatures fields it reads.
      needs_class_token: True when it reads the CLS attention row.
      fixed_output: True when the output count is set at build time (learned
                queries/centres), so the budget must be known then.
      uses_teacher: True when the method's training loss distils from a
                teacher (the trainer then builds one from ``teacher_checkpoint``).

    Training: a learned method that needs more than the task loss brings its
    own terms through :meth:`training_loss` (and ``uses_teacher``); the
    trainer asks the method class and never branches on method names.
    """

    kind: ClassVar[str] = "prune"
    position: ClassVar[str] = "mid"
    needs: ClassVar[frozenset] = frozenset()
    needs_class_token: ClassVar[bool] = False
    fixed_output: ClassVar[bool] = False
    #: merging methods use proportional attention when the model asks for it
    uses_sizes: ClassVar[bool] = False
    uses_teacher: ClassVar[bool] = False

    def __init__(self, dim: int, **kwargs) -> None:
        super().__init__()
        self.dim = dim
        if kwargs:
            raise ValueError(
                f"method {type(self).__name__} got unknown options: {sorted(kwargs)}"
            )

    @classmethod
    def training_loss(
        cls, task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], **options
    ) -> Optional[MethodLoss]:
        """The method's training objective around `task_loss` (called as
        ``task_loss(outputs, targets)``), or None when the method trains with
        the task loss alone (the default). `options` are the recipe's
        ``method_loss_kwargs``; a method without a loss of its own refuses them."""
        if options:
            name = getattr(cls, "method_name", cls.__name__)
            raise ValueError(
                f"method_loss_kwargs {sorted(options)} given but method {name!r} has no training loss of its own"
            )
        return None

    def output_count(self, num_tokens: int, budget: "StageBudget") -> int:
        """Patch tokens this method outputs from `num_tokens` under `budget`
        (at most; ATS may keep fewer). Used to validate and size the model."""
        return min(budget.target, num_tokens)

    def forward(
        self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget: "StageBudget"
    ) -> ReductionOutput:  # pragma: no cover - abstract
        raise NotImplementedError
