"""DynamicViT: a learned predictor per stage decides which tokens to keep.

Predictor (one per stage): LayerNorm, Linear(C, C), GELU; the channels are
split into a local half (per token) and a global half, replaced by its mean
over the tokens weighted by the running keep policy, plus 1e-6 (the
reference's eps, added to the mean itself); the concatenation goes
through an MLP C -> C/2 -> C/4 -> 2 with GELUs and a log-softmax, giving the
(keep, drop) log-probabilities of each token.

Training (``self.training``): a hard Gumbel-softmax keep decision
(straight-through gradients) times the previous policy gives the new policy
(B, N). No token is removed: the host block masks attention with the policy
(``models.blocks._policy_softmax``), so shapes stay fixed and gradients reach
the predictor. The stage returns the policy and its target keep fraction in
``aux`` for :func:`dynamicvit_ratio_loss`: the fraction of the original
patches that inference keeps after the stage, under every budget (the
reference's ``keep_rate ** (stage + 1)`` under ``geometric``). The predictor's
Linear layers start as the reference's (trunc-normal std 0.02, zero bias).

Inference: keep the ``budget.target`` tokens with the highest keep
log-probability, in their original order.

Losses (pure functions plus :class:`DynamicViTLoss`):
``cls_weight * CE + ratio_weight * ratio + cls_distill_weight * KL(logits)
+ token_distill_weight * token MSE`` with the reference's defaults
(1, 2, 0.5, 0.5).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import BlockFeatures, MethodLoss, ReductionOutput, TokenReducer
from .ops import keep_by_score
from .options import METHODS
from .registry import register

POLICY_KEY = "dynamicvit_policy"
RATIO_KEY = "dynamicvit_ratio"


class KeepPredictor(nn.Module):
    """DynamicViT's local-global keep predictor.

    x (B, N, C), policy (B, N) in [0, 1] -> (B, N, 2) log-probabilities of
    (keep, drop)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 4:
            raise ValueError(f"DynamicViT's predictor needs at least 4 channels, got {dim}")
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's initialisation: Linear weights trunc-normal with
        std 0.02 (cut at +-2), biases zero; LayerNorm weight one, bias zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local_x, global_x = x[..., :half], x[..., half:]
        w = policy.to(x.dtype).unsqueeze(-1)
        # the reference adds eps = 1e-6 to the mean itself (not to the denominator);
        # the clamp only guards an all-zero policy, where the reference gives NaN
        global_x = (global_x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-12) + 1e-6
        x = torch.cat([local_x, global_x.expand(-1, x.shape[1], -1)], dim=-1)
        return self.out_conv(x)


def gumbel_keep_decision(log_probs: torch.Tensor, prev_policy: torch.Tensor) -> torch.Tensor:
    """log_probs (B, N, 2) of (keep, drop), prev_policy (B, N) -> new policy
    (B, N): a hard Gumbel-softmax sample of "keep" (values exactly 0 or 1,
    straight-through gradients) times the previous policy."""
    dt = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    hard = F.gumbel_softmax(log_probs.to(dt), hard=True, dim=-1)[..., 0]
    return hard.to(prev_policy.dtype) * prev_policy


def stage_keep_fraction(budget, num_tokens: int) -> float:
    """The ratio-loss target of a stage: ``budget.keep_fraction`` (the
    fraction of the original patches inference keeps after the stage, see
    :meth:`tokenreduction.models.budget.TokenBudget.keep_fraction`), or, for
    a budget made for this stage alone, target / num_tokens."""
    if budget.keep_fraction is not None:
        return float(budget.keep_fraction)
    return min(budget.target, num_tokens) / num_tokens


@register("dynamicvit")
class DynamicViT(TokenReducer):
    kind = "prune"
    position = "pre"
    uses_teacher = True
    option_spec = METHODS["dynamicvit"]

    def __init__(self, dim: int, **kwargs) -> None:
        super().__init__(dim, **kwargs)
        self.option_spec.check(dim=dim)
        self.predictor = KeepPredictor(dim)

    @classmethod
    def training_loss(cls, task_loss, **options) -> "DynamicViTLoss":
        """:class:`DynamicViTLoss` around the task loss; `options` are its weights."""
        return DynamicViTLoss(base_criterion=task_loss, **options)

    def forward(self, x: torch.Tensor, size: torch.Tensor, feats: BlockFeatures, budget) -> ReductionOutput:
        B, N, _ = x.shape
        prev = feats.keep_score
        if prev is None:
            prev = torch.ones(B, N, dtype=x.dtype, device=x.device)
        log_probs = self.predictor(x, prev)
        if not self.training:
            k = min(budget.target, N)
            out, _ = keep_by_score(x, size, log_probs[..., 0], k)
            return out
        policy = gumbel_keep_decision(log_probs, prev.to(x.dtype))
        kept = policy.detach() > 0.5
        arange = torch.arange(N, device=x.device).expand(B, N)
        assignment = torch.where(kept, arange, torch.full_like(arange, -1))
        # no token is removed in training: the policy aims at the fraction of
        # the original patches that inference keeps after this stage
        ratio = stage_keep_fraction(budget, N)
        return ReductionOutput(
            x=x,
            size=size,
            assignment=assignment,
            keep_score=policy,
            aux={POLICY_KEY: policy, RATIO_KEY: ratio},
        )


def dynamicvit_ratio_loss(aux_list: Sequence[dict]) -> torch.Tensor:
    """Mean over the DynamicViT stages of mean_b (mean_n policy_s - ratio_s)^2.

    aux_list: the per-stage aux dicts of a training forward
    (``model.reduction_state.aux``); entries without a DynamicViT policy are
    ignored. ratio_s is the stage's keep fraction of the original patches."""
    terms = []
    for aux in aux_list:
        if POLICY_KEY not in aux:
            continue
        policy = aux[POLICY_KEY].float()
        terms.append(((policy.mean(dim=1) - float(aux[RATIO_KEY])) ** 2).mean())
    if not terms:
        raise ValueError("no DynamicViT keep policy in the aux list: was the model run in training mode?")
    return torch.stack(terms).mean()


def dynamicvit_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """(B, K) logits -> KL(teacher || student) on log-softmaxes, batchmean."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), dim=-1),
        F.log_softmax(teacher_logits.float(), dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def dynamicvit_token_loss(
    student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, policy: torch.Tensor
) -> torch.Tensor:
    """Token distillation: student/teacher patch tokens (B, N, C), policy
    (B, N) -> sum_bn policy_bn * mean_c (s - t)^2 / sum_bn policy_bn, i.e. the
    MSE over the kept tokens for a hard policy (zero when none is kept)."""
    if student_tokens.shape != teacher_tokens.shape or student_tokens.shape[:2] != policy.shape:
        raise ValueError(
            f"token distillation needs equal shapes: student {tuple(student_tokens.shape)}, "
            f"teacher {tuple(teacher_tokens.shape)}, policy {tuple(policy.shape)}"
        )
    err = (student_tokens.float() - teacher_tokens.float()).pow(2).mean(dim=-1)
    w = policy.float()
    return (err * w).sum() / w.sum().clamp_min(1e-6)


def dynamicvit_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_tokens: torch.Tensor,
    teacher_tokens: torch.Tensor,
    policy: torch.Tensor,
    num_prefix: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL on the logits, token MSE over the kept patch tokens).

    student_logits/teacher_logits (B, K); student_tokens/teacher_tokens
    (B, T, C) final normed tokens with `num_prefix` prefix tokens first
    (default: T - N); policy (B, N) over the patch tokens (the last stage's)."""
    if num_prefix is None:
        num_prefix = student_tokens.shape[1] - policy.shape[1]
    kl = dynamicvit_kl_loss(student_logits, teacher_logits)
    tok = dynamicvit_token_loss(student_tokens[:, num_prefix:], teacher_tokens[:, num_prefix:], policy)
    return kl, tok


class DynamicViTLoss(MethodLoss):
    """DynamicViT's training loss around a base criterion.

    ``forward(student_model, images, outputs, targets, teacher_model=None)``:
    outputs are the student's logits of `images`, computed in training mode
    just before, so ``student_model.reduction_state`` holds that forward's
    policies (``aux``) and final tokens (``features``). The teacher (a plain
    model, method None) runs under no_grad; without one only the base and
    ratio terms are used. ``last_terms`` holds the detached terms."""

    def __init__(
        self,
        base_criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        ratio_weight: float = 2.0,
        cls_distill_weight: float = 0.5,
        token_distill_weight: float = 0.5,
        cls_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.base_criterion = base_criterion
        self.ratio_weight = ratio_weight
        self.cls_distill_weight = cls_distill_weight
        self.token_distill_weight = token_distill_weight
        self.cls_weight = cls_weight
        self.last_terms: dict = {}

    def forward(
        self,
        student_model: nn.Module,
        images: torch.Tensor,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        teacher_model: Optional[nn.Module] = None,
    ) -> torch.Tensor:
        state = getattr(student_model, "reduction_state", None)
        if state is None:
            raise ValueError("the student model has no reduction_state: run its forward first")
        base = self.base_criterion(outputs, targets)
        loss = self.cls_weight * base
        terms = {"base": base.detach()}
        policies = [a[POLICY_KEY] for a in state.aux if POLICY_KEY in a]
        if policies:
            ratio = dynamicvit_ratio_loss(state.aux)
            loss = loss + self.ratio_weight * ratio
            terms["ratio"] = ratio.detach()
        if teacher_model is not None and policies:
            with torch.no_grad():
                teacher_logits = teacher_model(images)
            teacher_state = getattr(teacher_model, "reduction_state", None)
            if teacher_state is None or getattr(teacher_state, "features", None) is None:
                raise ValueError("the teacher must be a model from create_model (method None)")
            features = state.features
            p0 = getattr(student_model, "num_prefix_tokens", None)
            if p0 is not None and state.num_prefix != p0:
                # extra non-patch tokens (CLCA) sit between the prefix and the patches
                features = torch.cat([features[:, :p0], features[:, state.num_prefix:]], dim=1)
            kl, tok = dynamicvit_distillation_loss(
                outputs,
                teacher_logits,
                features,
                teacher_state.features,
                policies[-1],
                num_prefix=getattr(student_model, "num_prefix_tokens", None),
            )
            loss = loss + self.cls_distill_weight * kl + self.token_distill_weight * tok
            terms["cls_kl"] = kl.detach()
            terms["token_mse"] = tok.detach()
        self.last_terms = terms
        return loss
