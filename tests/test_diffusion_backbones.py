"""Token merging on every diffusers backbone built from BasicTransformerBlock:
tiny random-weight SD 1.5, SD 2.x, SDXL UNets and PixArt / DiT transformers in
their real layouts (narrow widths); refusals (SD3, Flux, selections that merge
nothing, ratios ToMe-SD cannot reach), the no-merge warning, the attention
processor kept (SDPA), and the merge compiling as one graph."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from tokenreduction.diffusion.merge import compute_merge  # noqa: E402
from tokenreduction.diffusion.patch import (  # noqa: E402
    NothingMergedWarning, apply_patch, find_backbone, level_grid, patch_state, remove_patch, transformer_blocks,
)
from tokenreduction.diffusion.tiny import BACKBONES, backbone_inputs, tiny_backbone  # noqa: E402

LATENT = 16
#: levels (downsampling) merged by default, and the number of blocks there
DEFAULT_LEVEL = {"sd15": 1, "sd2": 1, "sdxl": 2, "pixart": 1, "dit": 1}
DEFAULT_BLOCKS = {"sd15": 5, "sd2": 5, "sdxl": 10, "pixart": 2, "dit": 2}


@pytest.fixture(scope="module", params=BACKBONES)
def case(request):
    kind = request.param
    torch.manual_seed(0)
    model = tiny_backbone(kind, LATENT)
    args, kwargs = backbone_inputs(kind, model, latent=LATENT)
    with torch.no_grad():
        reference = model(*args, **kwargs)[0]
    return kind, model, args, kwargs, reference


def run(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)[0]


def block_grid(kind, model, name):
    """(h, w) token grid of a block of `model`, from the test's own reading of
    the layouts: a DiT's patch grid, else the latent halved per UNet level."""
    if kind in ("pixart", "dit"):
        p = model.config.patch_size
        return LATENT // p, LATENT // p
    return level_grid((LATENT, LATENT), find_level(model, name))


def find_level(model, name):
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return 2 ** int(parts[1])
    if parts[0] == "up_blocks":
        return 2 ** (len(model.up_blocks) - 1 - int(parts[1]))
    return 2 ** (len(model.down_blocks) - 1)


def attn_inputs(model, after: bool):
    """Pre-hooks on every block's attn1 recording the hidden states it gets;
    registered after the patch they see the merged tokens."""
    seen, handles = {}, []
    for name, block in transformer_blocks(model):
        hook = (lambda n: lambda m, args, kwargs: seen.setdefault(n, []).append(
            (args[0] if args else kwargs["hidden_states"]).clone()))(name)
        handles.append(block.attn1.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def block_inputs(model):
    seen, handles = {}, []
    for name, block in transformer_blocks(model):
        hook = (lambda n: lambda m, args, kwargs: seen.setdefault(n, []).append(
            (args[0] if args else kwargs["hidden_states"]).clone()))(name)
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def slow_tome_sd(metric, tokens, h, w, r):
    """ToMe-SD's rule on one image, written out: destinations at the top-left
    of each 2x2 cell; each source picks its most cosine-similar destination;
    the r sources with the highest similarity merge (mean) into theirs.
    Returns the merged tokens: unmerged sources in index order, then the
    destinations in index order."""
    dst = sorted((2 * i) * w + 2 * j for i in range(h // 2) for j in range(w // 2))
    src = [n for n in range(h * w) if n not in set(dst)]
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    proposals = []
    for s in src:
        sims = [float(unit[s] @ unit[d]) for d in dst]
        best = max(range(len(dst)), key=sims.__getitem__)
        proposals.append((sims[best], s, best))
    proposals.sort(key=lambda p: -p[0])
    merged = {s: k for _, s, k in proposals[:r]}
    groups = [[d] for d in dst]
    for s, k in merged.items():
        groups[k].append(s)
    kept = [tokens[s] for s in src if s not in merged]
    return torch.stack(kept + [tokens[g].mean(0) for g in groups])


# ---------------------------------------------------------------- every backbone


def test_default_levels_and_blocks(case):
    kind, model, *_ = case
    backbone = find_backbone(model)
    assert backbone.kind == ("dit" if kind in ("pixart", "dit") else "unet")
    apply_patch(model, ratio=0.5)
    try:
        chosen = patch_state(model).backbone.blocks
    finally:
        remove_patch(model)
    assert len(chosen) == DEFAULT_BLOCKS[kind]
    assert {b.level for b in chosen} == {DEFAULT_LEVEL[kind]}
    for block in chosen:  # the patch's levels agree with the test's reading of the layout
        if kind not in ("pixart", "dit"):
            assert block.level == find_level(model, block.name)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_token_counts_entering_each_attention(case, ratio):
    kind, model, args, kwargs, _ = case
    apply_patch(model, ratio=ratio)
    seen, handles = attn_inputs(model, after=True)
    try:
        run(model, args, kwargs)
        patched = {b.name for b in patch_state(model).backbone.blocks}
    finally:
        for h in handles:
            h.remove()
        remove_patch(model)
    assert len(seen) == len(transformer_blocks(model))
    for name, inputs in seen.items():
        h, w = block_grid(kind, model, name)
        n = h * w
        expected = n - int(n * ratio) if name in patched else n
        assert [x.shape[1] for x in inputs] == [expected], name


@pytest.mark.parametrize("merge_fn", ["tome", "atc"])
def test_ratio_zero_is_the_unpatched_output(case, merge_fn):
    kind, model, args, kwargs, reference = case
    apply_patch(model, ratio=0.0, merge_fn=merge_fn, merge_crossattn=True, merge_mlp=True)
    try:
        out = run(model, args, kwargs)
    finally:
        remove_patch(model)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("merge_fn", ["tome", "atc"])
def test_positive_ratio_changes_the_output(case, merge_fn):
    kind, model, args, kwargs, reference = case
    apply_patch(model, ratio=0.5, merge_fn=merge_fn, merge_mlp=True)
    try:
        out = run(model, args, kwargs)
        tokens = dict(patch_state(model).tokens)
    finally:
        remove_patch(model)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert not torch.equal(out, reference)
    assert len(tokens) == DEFAULT_BLOCKS[kind]
    assert all(m == n - n // 2 for n, m in tokens.values())


def test_merges_as_the_sd15_rule(case):
    """The first patched block's self-attention gets exactly the tokens the
    ToMe-SD rule (slow reference above) makes from its input."""
    kind, model, args, kwargs, _ = case
    ratio = 0.4
    x_in, h1 = block_inputs(model)
    full, h2 = attn_inputs(model, after=False)
    apply_patch(model, ratio=ratio)
    merged, h3 = attn_inputs(model, after=True)
    try:
        run(model, args, kwargs)
        first = patch_state(model).backbone.blocks[0].name
    finally:
        for h in h1 + h2 + h3:
            h.remove()
        remove_patch(model)
    h, w = block_grid(kind, model, first)
    n = h * w
    for b in range(args[0].shape[0]):
        expected = slow_tome_sd(x_in[first][0][b], full[first][0][b], h, w, int(n * ratio))
        torch.testing.assert_close(merged[first][0][b], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,max_downsample", [("sd15", 1), ("sd2", 1), ("sdxl", 2)])
def test_matches_tomesd_on_the_unets(kind, max_downsample):
    tomesd = pytest.importorskip("tomesd")
    torch.manual_seed(0)
    model = tiny_backbone(kind, LATENT)
    args, kwargs = backbone_inputs(kind, model, latent=LATENT)
    theirs_model = copy.deepcopy(model)
    tomesd.apply_patch(theirs_model, ratio=0.5, use_rand=False, max_downsample=max_downsample)
    apply_patch(model, ratio=0.5)  # default levels: SDXL's first attention level without asking
    torch.testing.assert_close(run(model, args, kwargs), run(theirs_model, args, kwargs), atol=1e-4, rtol=1e-4)


def processors(model):
    """{module name: attention processor} of every diffusers Attention in `model`."""
    from diffusers.models.attention_processor import Attention

    return {name: m.processor for name, m in model.named_modules() if isinstance(m, Attention)}


def test_attention_processor_is_kept_and_sdpa_sees_merged_tokens(case, monkeypatch):
    kind, model, args, kwargs, _ = case
    from diffusers.models.attention_processor import AttnProcessor2_0

    before = processors(model)
    assert {type(p) for p in before.values()} == {AttnProcessor2_0}  # diffusers' default: SDPA
    lengths = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *a, **kw):
        lengths.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, *a, **kw)

    apply_patch(model, ratio=0.5)
    try:
        after = processors(model)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
        run(model, args, kwargs)
        tokens = dict(patch_state(model).tokens)
    finally:
        monkeypatch.undo()
        remove_patch(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    merged_counts = {m for _, m in tokens.values()}
    assert any(q == k and q in merged_counts for q, k in lengths)  # self-attention ran through SDPA, merged


# ---------------------------------------------------------------- refusals and warnings


def test_sdxl_with_max_downsample_1_is_refused():
    model = tiny_backbone("sdxl", LATENT)
    with pytest.raises(ValueError, match=r"max_downsample=1 selects no transformer block.*downsampling 2, 4"):
        apply_patch(model, ratio=0.5, max_downsample=1)
    assert patch_state(model) is None
    apply_patch(model, ratio=0.5, max_downsample=4)
    try:
        assert {b.level for b in patch_state(model).backbone.blocks} == {2, 4}
    finally:
        remove_patch(model)


def test_dit_refuses_unet_levels():
    with pytest.raises(ValueError, match="max_downsample=2 applies to UNets"):
        apply_patch(tiny_backbone("pixart", LATENT), ratio=0.5, max_downsample=2)


def test_sd3_and_flux_are_refused_by_block_type():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    sd3 = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
    )
    with pytest.raises(ValueError, match="JointTransformerBlock"):
        apply_patch(sd3, ratio=0.5)
    flux = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    )
    with pytest.raises(ValueError, match="FluxSingleTransformerBlock.*FluxTransformerBlock"):
        apply_patch(flux, ratio=0.5)


def test_ratio_above_the_tome_cap_is_refused_and_a_larger_cell_honours_it():
    model = tiny_backbone("dit", LATENT)
    args, kwargs = backbone_inputs("dit", model, latent=LATENT)
    with pytest.raises(ValueError, match=r"1 - 1/\(sx\*sy\) = 0.75"):
        apply_patch(model, ratio=0.8)
    apply_patch(model, ratio=0.8, sx=4, sy=4)  # cap 15/16
    try:
        run(model, args, kwargs)
        tokens = set(patch_state(model).tokens.values())
    finally:
        remove_patch(model)
    assert tokens == {(64, 64 - int(64 * 0.8))}


def test_a_call_that_merges_nothing_warns_once():
    model = tiny_backbone("pixart", LATENT)
    args, kwargs = backbone_inputs("pixart", model, latent=LATENT)
    apply_patch(model, ratio=0.01)  # int(64 x 0.01) = 0 tokens removed
    try:
        with pytest.warns(NothingMergedWarning, match="merged no token"):
            run(model, args, kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(model, args, kwargs)  # once only
    finally:
        remove_patch(model)
    apply_patch(model, ratio=0.5)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(model, args, kwargs)  # merging: no warning
    finally:
        remove_patch(model)


def test_latent_that_does_not_fit_the_grid_fails_clearly():
    model = tiny_backbone("dit", LATENT)
    args, kwargs = backbone_inputs("dit", model, latent=LATENT)
    apply_patch(model, ratio=0.5)
    hook = model.pos_embed.register_forward_hook(lambda m, a, out: out[:, :-1])  # one token lost
    try:
        with pytest.raises(RuntimeError, match="got 63 tokens, but the 16x16 latent's patch grid"):
            run(model, args, kwargs)
    finally:
        hook.remove()
        remove_patch(model)


# ---------------------------------------------------------------- no host synchronisation


def test_tome_sd_merge_compiles_as_one_graph():
    def merged_mean(x):
        merge, unmerge, _ = compute_merge(x, 16, 16, 0.5, "tome", use_rand=False)
        return unmerge(merge(x) * 2.0)

    x = torch.randn(2, 256, 16)
    compiled = torch.compile(merged_mean, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), merged_mean(x))


def test_patched_block_compiles_as_one_graph():
    """A whole patched BasicTransformerBlock (hooks, merge, attention, MLP)
    traces without a graph break: nothing in the merge path reads back."""
    from diffusers.models.attention import BasicTransformerBlock

    class OneBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = BasicTransformerBlock(32, 2, 16, cross_attention_dim=32)

        def forward(self, sample, hidden_states, text):
            return self.block(hidden_states, encoder_hidden_states=text)

    torch.manual_seed(0)
    model = OneBlock().eval()
    sample, hidden, text = torch.randn(2, 4, 16, 16), torch.randn(2, 256, 32), torch.randn(2, 8, 32)
    apply_patch(model, ratio=0.5, merge_mlp=True)
    with torch.no_grad():
        eager = model(sample, hidden, text)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(sample, hidden, text)
    assert patch_state(model).tokens["block"] == (256, 128)
    torch.testing.assert_close(compiled, eager)
