"""Conformance with the published implementations (issue 14).

The fixtures under tests/fixtures/golden/ are cases of the golden reference
vectors (outputs of the official code on fixed float64 inputs; see
tests/fixtures/golden/README.md). Every case is fed through the library's own
reducers as the model's block calls them: prefix tokens split off, block
features sliced to the patches, float64 throughout. Outputs are compared
without depending on output order: partitions through the assignment (which
also pairs the output tokens), kept tokens as index sets.

``TOKENREDUCTION_GOLDEN`` (a folder holding the full golden set, same
layout; default ``../shared/golden`` beside the checkout when it exists) runs
the same checks on every case there as well.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tokenreduction.models.budget import StageBudget
from tokenreduction.reduction import BlockFeatures, get_method
from tokenreduction.reduction.ats import ats_sample_steps
from tokenreduction.reduction.dpcknn import dpc_knn_cluster

FIXTURES = Path(__file__).parent / "fixtures" / "golden"
METHODS = ["tome", "tomecis", "topk", "evit", "atc", "dpcknn", "kmedoids", "ats", "dynamicvit", "sit",
           "patchmerger", "sinkhorn", "heuristic"]
RTOL, ATOL = 1e-7, 1e-9  # float64 library vs float64 reference


def load_cases(folder: Path, method: str) -> list:
    d = np.load(folder / f"{method}.npz")
    numbers = json.loads(str(d["meta"])).get("fixture_cases")  # golden case numbers of a fixture file
    cases = []
    for i in range(int(d["n_cases"])):
        pre = f"c{i}_"
        arrs = {k[len(pre):]: d[k] for k in d.files if k.startswith(pre)}
        shared = arrs.pop("shared_inputs", None)
        if shared is not None:  # EViT's inputs are Top-K's (same case numbers)
            other = np.load(folder / f"{str(shared)}.npz")
            for k in ("x", "attn_cls"):
                arrs[k] = other[pre + k]
        params = json.loads(str(arrs.pop("params")))
        cases.append((f"{method}-{numbers[i] if numbers else i}", params, arrs))
    return cases


def all_cases(folder: Path) -> list:
    out = []
    for m in METHODS:
        if (folder / f"{m}.npz").exists():
            out += [pytest.param(m, p, a, id=cid) for cid, p, a in load_cases(folder, m)]
    return out


def t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


# ------------------------------------------------------------- comparisons


def canon(labels: np.ndarray) -> np.ndarray:
    """Relabel each row by order of first appearance (equal iff same partition)."""
    out = np.empty_like(labels)
    for b, row in enumerate(labels):
        seen: dict = {}
        out[b] = [seen.setdefault(int(v), len(seen)) for v in row]
    return out


def check_partition(got_assign, got_x, got_size, exp_assign, exp_x, exp_size=None):
    """Same partition of the input tokens, and the output token of every group
    equal to the reference's (paired through the assignment)."""
    got_assign, exp_assign = np.asarray(got_assign), np.asarray(exp_assign)
    assert got_assign.shape == exp_assign.shape
    assert np.array_equal(canon(got_assign), canon(exp_assign)), "partition differs"
    got_x, exp_x = np.asarray(got_x), np.asarray(exp_x)
    assert got_x.shape == exp_x.shape, (got_x.shape, exp_x.shape)
    for b in range(exp_assign.shape[0]):
        pair = {}
        for g, e in zip(got_assign[b], exp_assign[b]):
            pair.setdefault(int(e), int(g))
        e_idx = np.array(sorted(pair)); g_idx = np.array([pair[e] for e in e_idx])
        assert len(set(g_idx.tolist())) == exp_x.shape[1] == len(e_idx)
        np.testing.assert_allclose(got_x[b, g_idx], exp_x[b, e_idx], rtol=RTOL, atol=ATOL)
        if exp_size is not None:
            np.testing.assert_allclose(np.asarray(got_size)[b, g_idx], exp_size[b, e_idx], rtol=0, atol=1e-9)


def check_selection(got_idx_rows, exp_idx_rows):
    for g, e in zip(got_idx_rows, exp_idx_rows):
        e = np.sort(np.asarray(e)[np.asarray(e) >= 0])
        assert np.array_equal(np.sort(np.asarray(g)), e), f"kept set differs: {len(g)} vs {len(e)} tokens"


def kept_rows(out, x_patch):
    """Per image: the patch indices an output of a pruning reducer kept, and a
    check that each output slot holds that input row."""
    rows = []
    for b in range(x_patch.shape[0]):
        a = out.assignment[b]
        idx = (a >= 0).nonzero().flatten()
        assert torch.equal(out.x[b, a[idx]], x_patch[b, idx]), "output rows are not the kept input rows"
        rows.append(idx.numpy())
    return rows


def with_prefix(out, p: int, x, size=None):
    """Model view of a reducer output: prefix tokens first, assignment over all tokens."""
    B = x.shape[0]
    full_x = torch.cat([x[:, :p], out.x], 1)
    pre = torch.arange(p).expand(B, p)
    assign = torch.cat([pre, out.assignment + p], 1)
    full_size = None if size is None else torch.cat([size[:, :p], out.size], 1)
    return full_x, full_size, assign


def features(**kw) -> BlockFeatures:
    return BlockFeatures(**kw)


# ------------------------------------------------------------- one adapter per method


def run_tome(method, p, a):
    x = t(a["x"]); B, N, _ = x.shape
    pre = int(p.get("class_token", True)) + int(p.get("distill_token", False))
    size = t(a["size"])[..., 0] if "size" in a else torch.ones(B, N, dtype=x.dtype)
    if method == "tome":
        m = get_method("tome")(dim=x.shape[-1])
        feats = features(metric=t(a["metric"])[:, pre:], num_prefix=pre)
    else:
        m = get_method("tomecis")(dim=x.shape[-1])
        keys, values, attn_cls = t(a["keys"]), t(a["values"]), t(a["attn_cls"])
        feats = features(metric=keys[:, :, pre:].mean(1), value=values[:, :, pre:], cls_attn=attn_cls[:, :, pre:],
                         num_prefix=pre)
    r = int(p["r"])
    out = m(x[:, pre:], size[:, pre:], feats, StageBudget(target=N - pre - r, r=r))
    assert out.x.dtype == torch.float64
    assert out.x.shape[1] == N - pre - int(p["r_effective"])
    fx, fs, fa = with_prefix(out, pre, x, size)
    check_partition(fa, fx, fs, a["assign"], a["out_x"], a["out_size"][..., 0])


def run_topk(method, p, a):
    x, attn_cls = t(a["x"]), t(a["attn_cls"])
    k = int(p["n_keep"])
    kw = {"fuse_token": True} if method == "evit" else {}
    m = get_method(method)(dim=x.shape[-1], **kw)
    out = m(x[:, 1:], torch.ones(x.shape[0], x.shape[1] - 1, dtype=x.dtype), features(cls_attn=attn_cls[:, :, 1:]),
            StageBudget(target=k, r=0))
    assert out.x.dtype == torch.float64
    fused = method == "evit" and bool(p.get("reduced", k < x.shape[1] - 1))
    assert out.x.shape[1] == k + int(fused)
    if fused:  # the fused token is the last output, the dropped tokens go to it
        np.testing.assert_allclose(out.x[:, -1:].numpy(), a["fused_token"], rtol=RTOL, atol=ATOL)
        kept = out.assignment < k
        out.assignment = torch.where(kept, out.assignment, torch.full_like(out.assignment, -1))
    check_selection(kept_rows(out, x[:, 1:]), a["kept_idx"])


def run_atc(method, p, a):
    x = t(a["x"]); B, N, _ = x.shape
    pre = int(p.get("class_token", True))
    size = t(a["size"])[..., 0] if "size" in a else torch.ones(B, N, dtype=x.dtype)
    m = get_method("atc")(dim=x.shape[-1], linkage=p["linkage"])
    k = int(p["num_clusters"])
    out = m(x[:, pre:], size[:, pre:], features(metric=t(a["metric"])[:, pre:], num_prefix=pre),
            StageBudget(target=k, r=N - pre - k))
    fx, fs, fa = with_prefix(out, pre, x, size)
    check_partition(fa, fx, fs, a["assign"], a["out_x"], a["out_size"][..., 0])


class StoredScore(nn.Module):
    """Stands in for DPC-KNN's learned score: returns the stored log weights."""

    def __init__(self, log_weight: torch.Tensor) -> None:
        super().__init__()
        self.log_weight = log_weight

    def forward(self, x):
        return self.log_weight


def run_dpcknn(method, p, a):
    x = t(a["x"]); B, N, C = x.shape
    weighted = bool(p.get("weighted", "token_weight" in a))
    m = get_method("dpcknn")(dim=C, k_neighbors=int(p["k_neighbors"]), equal_weight=not weighted)
    if weighted:
        m.score = StoredScore(t(a["token_weight"]).log())
    k = int(p["cluster_num"])
    out = m(x[:, 1:], torch.ones(B, N - 1, dtype=x.dtype), features(num_prefix=1), StageBudget(target=k, r=0))
    assert out.x.dtype == torch.float64
    fx, fs, fa = with_prefix(out, 1, x, torch.ones(B, N, dtype=x.dtype))
    check_partition(fa, fx, fs, a["assign"], a["out_x_exact_mean"], a["out_size"][..., 0] if "out_size" in a else None)
    centres, _ = dpc_knn_cluster(x[:, 1:], k, int(p["k_neighbors"]))  # the function the reducer clusters with
    check_selection(centres.numpy(), a["centers_idx"])


def run_kmedoids(method, p, a):
    x = t(a["x"]); B, N, C = x.shape
    weighted = bool(p["weighted"])
    kw = {} if weighted else {"init_index": int(p["init_idx"])}
    m = get_method("kmedoids")(dim=C, cluster_iters=int(p["iterations"]), equal_weight=not weighted, **kw)
    feats = features(attn_received=t(a["token_weight"])[..., 0] if weighted else None, num_prefix=1)
    k = int(p["cluster_num"])
    out = m(x[:, 1:], torch.ones(B, N - 1, dtype=x.dtype), feats, StageBudget(target=k, r=0))
    fx, _, fa = with_prefix(out, 1, x)
    exp_x = np.stack([np.concatenate([a["x"][b, :1], a["x"][b, 1:][a["medoid_idx"][b]]]) for b in range(B)])
    check_partition(fa, fx, None, a["assign"], exp_x)
    # the output tokens are medoid tokens: which input rows are they?
    medoids = [torch.nonzero((x[b, 1:, None, :] == out.x[b][None]).all(-1).any(1)).flatten().numpy() for b in range(B)]
    check_selection(medoids, a["medoid_idx"])


def run_ats(method, p, a):
    x = t(a["x"]); B, N, C = x.shape
    K = int(p["sample_count"])
    steps = ats_sample_steps(K)
    assert np.array_equal(steps.numpy(), a["sample_steps"].astype(np.float32)), "quantile grid differs"
    mask = t(a["mask"])
    m = get_method("ats")(dim=C)
    feats = features(cls_attn=t(a["attn_cls"])[:, :, 1:], value=t(a["values"])[:, :, 1:], mask=mask[:, 1:])
    out = m(x[:, 1:], torch.ones(B, N - 1, dtype=x.dtype), feats, StageBudget(target=K - 1, r=0))
    assert out.x.shape[1] <= m.output_count(N - 1, StageBudget(target=K - 1, r=0))
    rows = kept_rows(out, x[:, 1:])
    for b in range(B):  # valid slots first, in ascending order, then padding
        n = len(rows[b])
        assert out.mask[b, :n].all() and not out.mask[b, n:].any()
    check_selection([r + 1 for r in rows], a["kept_idx_sorted"])


def load_state(module: nn.Module, a: dict, rename) -> None:
    state = {rename(k[2:].replace("__", ".")): t(v) for k, v in a.items() if k.startswith("w_")}
    own = module.state_dict()
    state = {k: v.reshape(own[k].shape) for k, v in state.items()}
    module.load_state_dict(state, strict=True)


def run_dynamicvit(method, p, a):
    x = t(a["x"]); B, N, C = x.shape
    m = get_method("dynamicvit")(dim=C).double()
    load_state(m.predictor, a, lambda k: k)
    xp = x[:, 1:]
    prev = t(a["prev_decision"]) if "prev_decision" in a else torch.ones(B, N - 1, dtype=x.dtype)
    np.testing.assert_allclose(m.predictor(xp, prev).detach().numpy(), a["pred_score"], rtol=RTOL, atol=ATOL)
    if not p["training"]:
        m.eval()
        with torch.no_grad():
            out = m(xp, torch.ones(B, N - 1, dtype=x.dtype), features(), StageBudget(target=int(p["n_keep"]), r=0))
        check_selection(kept_rows(out, xp), a["kept_idx"])
    else:
        m.train()
        torch.manual_seed(int(p["gumbel_seed"]))
        noise = -torch.empty(B, N - 1, 2, dtype=x.dtype).exponential_().log()
        np.testing.assert_allclose(noise.numpy(), a["gumbel"], rtol=0, atol=0)  # the RNG stream the reference used
        torch.manual_seed(int(p["gumbel_seed"]))
        kw = {"keep_score": t(a["prev_decision"])} if "prev_decision" in a else {}
        out = m(xp, torch.ones(B, N - 1, dtype=x.dtype), features(**kw), StageBudget(target=int(p.get("n_keep", N - 1)), r=0))
        np.testing.assert_allclose(out.keep_score.detach().numpy(), a["policy"], rtol=0, atol=1e-9)


def run_soft(method, p, a):
    x = t(a["x"]); B, N, C = x.shape
    K = int(p["K"])
    if method == "sit":
        m = get_method("sit")(dim=C, num_out=K).double()
        load_state(m, a, lambda k: "scale" if k == "scale" else "mlp." + k[len("weight."):])
    elif method == "patchmerger":
        m = get_method("patchmerger")(dim=C, num_out=K, scaled_attention=bool(p["scaled_attention"])).double()
        load_state(m, a, lambda k: k)
    else:
        m = get_method("sinkhorn")(dim=C, num_out=K, sinkhorn_eps=float(p["eps"]), cluster_iters=int(p["iters"])).double()
        load_state(m, a, lambda k: "centres" if k == "v" else k)
    with torch.no_grad():
        out = m(x[:, 1:], torch.ones(B, N - 1, dtype=x.dtype), features(), StageBudget(target=K, r=0))
    np.testing.assert_allclose(torch.cat([x[:, :1], out.x], 1).numpy(), a["out_x"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.weights.transpose(1, 2).numpy(), a["weights"], rtol=RTOL, atol=ATOL)
    assert np.array_equal(out.assignment.numpy(), a["assign"])


def run_heuristic(method, p, a):
    x = t(a["x"]); B, N, C = x.shape
    P = int(p["grid"])
    m = get_method("heuristic")(dim=C, pattern=p["pattern"], grid_size=(P, P))
    xp, index = x[:, 1:], torch.arange(N - 1).expand(B, N - 1)
    for stage in range(int(p["stage"]) + 1):  # the stages before run first, as in the model
        out = m(xp, torch.ones(B, xp.shape[1], dtype=x.dtype), features(),
                StageBudget(target=int(p["num_tokens_requested"][stage]), r=0))
        rows = kept_rows(out, xp)
        index = torch.stack([index[b, torch.as_tensor(rows[b])] for b in range(B)])
        xp = out.x
    assert xp.shape[1] == int(p["n_kept"])
    check_selection(index.numpy(), a["kept_idx"])
    assert torch.equal(xp, torch.stack([x[b, 1:][index[b]] for b in range(B)]))


RUNNERS = {"tome": run_tome, "tomecis": run_tome, "topk": run_topk, "evit": run_topk, "atc": run_atc,
           "dpcknn": run_dpcknn, "kmedoids": run_kmedoids, "ats": run_ats, "dynamicvit": run_dynamicvit,
           "sit": run_soft, "patchmerger": run_soft, "sinkhorn": run_soft, "heuristic": run_heuristic}


def test_fixtures_cover_every_method():
    assert sorted(f.stem for f in FIXTURES.glob("*.npz")) == sorted(METHODS)


@pytest.mark.parametrize("method,params,arrays", all_cases(FIXTURES))
def test_golden_case(method, params, arrays):
    RUNNERS[method](method, params, arrays)


_SIBLING = Path(__file__).resolve().parents[2] / "shared" / "golden"  # the full set next to a checkout, if any
_FULL = os.environ.get("TOKENREDUCTION_GOLDEN") or (str(_SIBLING) if (_SIBLING / "tome.npz").exists() else None)


@pytest.mark.skipif(not _FULL, reason="no full golden set (TOKENREDUCTION_GOLDEN)")
@pytest.mark.parametrize("method,params,arrays", all_cases(Path(_FULL)) if _FULL else [])
def test_full_golden_case(method, params, arrays):
    RUNNERS[method](method, params, arrays)


# ------------------------------------------------------------- the whole patched model


def published_tome_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int):
    """ToMe's merge with a class token, written per image from the published
    semantics: positions split into A (even, the CLS at 0, never merged) and B
    (odd); each A token's best B partner by cosine of the metric; the r A
    tokens with the best scores merge into their partners (size-weighted
    mean, sizes summed). Output: unmerged A tokens in position order, then the
    B tokens in position order. x (B, T, C), size (B, T), metric (B, T, D)."""
    xs, ss = [], []
    for b in range(x.shape[0]):
        m = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        a_pos, b_pos = list(range(0, x.shape[1], 2)), list(range(1, x.shape[1], 2))
        best = {}
        for i in a_pos[1:]:
            sims = m[b_pos] @ m[i]
            j = int(sims.argmax())
            best[i] = (float(sims[j]), b_pos[j])
        merged = sorted(best, key=lambda i: -best[i][0])[:r]
        groups = [[i] for i in a_pos if i not in merged] + [[j] + [i for i in merged if best[i][1] == j] for j in b_pos]
        w = size[b]
        xs.append(torch.stack([(w[g, None] * x[b, g]).sum(0) / w[g].sum() for g in groups]))
        ss.append(torch.stack([w[g].sum() for g in groups]))
    return torch.stack(xs), torch.stack(ss)


def published_tome_forward(model, imgs: torch.Tensor, r: int) -> torch.Tensor:
    """A timm ViT with ToMe's published timm patch: every block merges r tokens
    (capped at (T - 1) // 2) after its attention residual, on the head-mean
    keys, with proportional attention (log size added to the logits)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(imgs))))
    size = torch.ones(x.shape[:2], dtype=x.dtype)
    for blk in model.blocks:
        attn = blk.attn
        B, T, C = x.shape
        q, k, v = attn.qkv(blk.norm1(x)).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * attn.scale + size.log()[:, None, None, :]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + attn.proj(out)
        rr = min(r, (T - 1) // 2)
        if rr > 0:
            x, size = published_tome_merge(x, size, k.mean(dim=1), rr)
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x))


def test_tome_model_logits_match_published_patch():
    import copy

    import timm

    import tokenreduction as tr

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=48, patch_size=8, depth=4,
                              embed_dim=48, num_heads=3, num_classes=10).double().eval()
    imgs = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        expected = published_tome_forward(model, imgs, r=8)
        plain = model(imgs)
        ours = tr.patch_model(copy.deepcopy(model), method="tome", r=8, prop_attn=True)
        got = ours(imgs)
    assert ours.reduction_state.tokens_kept == [28, 20, 12, 6]  # 36 patches, r = 8 capped at half
    assert (expected - plain).abs().max() > 1e-3  # the merging changes the logits
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 3, 5])
def test_bipartite_split_follows_position_in_whole_sequence(num_prefix):
    """CLS, CLS + distillation, CLS + registers: the A/B split is by position
    over the whole sequence, every prefix token protected (one in A never
    merges, one in B receives nothing), as ToMe treats its CLS and
    distillation tokens."""
    from tokenreduction.reduction.bipartite import bipartite_assignment

    torch.manual_seed(num_prefix)
    B, N, D, r = 2, 15, 6, 5
    metric = torch.randn(B, num_prefix + N, D, dtype=torch.float64)
    assign, M = bipartite_assignment(metric[:, num_prefix:], r, num_prefix)
    assert M == N - r
    for b in range(B):
        m = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        T = num_prefix + N
        a_pos = [i for i in range(0, T, 2) if i >= num_prefix]
        b_pos = [j for j in range(1, T, 2) if j >= num_prefix]
        best = {i: max((float(m[i] @ m[j]), j) for j in b_pos) for i in a_pos}
        merged = sorted(a_pos, key=lambda i: -best[i][0])[:r]
        dest = {i: (best[i][1] if i in merged else i) for i in range(num_prefix, T)}
        expected = [dest[i] - num_prefix for i in range(num_prefix, T)]
        assert np.array_equal(canon(assign[b : b + 1].numpy()), canon(np.array([expected])))


@pytest.mark.parametrize("method", METHODS)
def test_float64_stays_float64(method):
    torch.manual_seed(0)
    B, N, C, H = 2, 16, 8, 2
    kw = {"num_out": 4} if method in ("sit", "patchmerger", "sinkhorn") else {}
    if method == "atc":
        kw = {"linkage": "average"}
    m = get_method(method)(dim=C, **kw).double().eval()
    x = torch.randn(B, N, C, dtype=torch.float64)
    feats = features(metric=torch.randn(B, N, 4, dtype=torch.float64),
                     cls_attn=torch.rand(B, H, N, dtype=torch.float64).softmax(-1),
                     value=torch.randn(B, H, N, 4, dtype=torch.float64),
                     attn_received=torch.rand(B, N, dtype=torch.float64))
    with torch.no_grad():
        out = m(x, torch.ones(B, N, dtype=torch.float64), feats, StageBudget(target=6, r=6))
    assert out.x.dtype == torch.float64
    if out.weights is not None:
        assert out.weights.dtype == torch.float64


def test_kmedoids_resolves_float64_near_ties():
    """Weights 1e-12 apart (equal in float32) still order the initial medoids."""
    x = torch.randn(1, 6, 3, dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0 + 1e-12, 0.5, 0.4, 0.3, 0.2]], dtype=torch.float64)
    m = get_method("kmedoids")(dim=3, cluster_iters=0)
    out = m(x, torch.ones(1, 6), features(attn_received=w), StageBudget(target=1, r=0))
    assert torch.equal(out.x[0, 0], x[0, 1])
