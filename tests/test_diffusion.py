"""Token merging in a diffusers UNet, the generation protocol, and FID.

Tiny random-weight models and fabricated images only; nothing is downloaded.
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("cleanfid")

from tokenreduction.diffusion import (  # noqa: E402
    MissingWeightsError,
    apply_patch,
    atc_assignment,
    bipartite_grid_assignment,
    build_tiny_pipeline,
    class_names,
    compute_fid,
    generate_images,
    load_pipeline,
    make_reference_set,
    merge_closures,
    patch_state,
    remove_patch,
    save_tiny_pipeline,
)
from tokenreduction.diffusion.merge import grid_destinations  # noqa: E402
from tokenreduction.diffusion.patch import transformer_blocks  # noqa: E402

LATENT = 16  # 16 x 16 = 256 tokens at full resolution, 64 in the mid block
N_FULL = LATENT * LATENT
FULL_RES_BLOCKS = 3  # the tiny UNet: one down block and two up-block attentions at full resolution


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_tiny_pipeline(img_size=32).unet.eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, LATENT, LATENT, generator=g), torch.randn(2, 8, 32, generator=g)


@pytest.fixture(scope="module")
def reference(unet, inputs):
    with torch.no_grad():
        return unet(inputs[0], 10, inputs[1]).sample


def run(unet, inputs):
    with torch.no_grad():
        return unet(inputs[0], 10, inputs[1]).sample


def record_tokens(unet, sub, when):
    """Hooks (registered after the patch's, so they see its effect) recording
    the token count entering (`pre`) or leaving (`post`) each block's `sub`."""
    seen, handles = {}, []
    for name, block in transformer_blocks(unet):
        module = getattr(block, sub)
        if when == "pre":
            hook = (lambda n: lambda m, args: seen.setdefault(n, []).append(args[0].shape[1]))(name)
            handles.append(module.register_forward_pre_hook(hook))
        else:
            hook = (lambda n: lambda m, args, out: seen.setdefault(n, []).append(out.shape[1]))(name)
            handles.append(module.register_forward_hook(hook))
    return seen, handles


# ---------------------------------------------------------------- pure merge functions


def test_merge_closures_match_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    B, N, C, M = 2, 10, 3, 4
    assignment = torch.stack([torch.randperm(N, generator=g) % M for _ in range(B)])
    x = torch.randn(B, N, C, generator=g)
    merge, unmerge = merge_closures(assignment, M)
    merged = merge(x)
    expected = torch.zeros(B, M, C)
    for b in range(B):
        for m in range(M):
            expected[b, m] = x[b][assignment[b] == m].mean(0)
    torch.testing.assert_close(merged, expected)
    restored = unmerge(merged)
    assert restored.shape == x.shape
    for b in range(B):
        for n in range(N):
            torch.testing.assert_close(restored[b, n], expected[b, assignment[b, n]])
    with pytest.raises(ValueError, match="merge expects"):
        merge(x[:, :5])


@pytest.mark.parametrize("use_rand", [False, True])
def test_grid_destinations_one_per_cell(use_rand):
    h, w, sx, sy = 7, 6, 2, 3  # 2 x 3 full cells; the last row has no cell
    src, dst = grid_destinations(h, w, sx, sy, use_rand, torch.Generator().manual_seed(3))
    assert sorted(src.tolist() + dst.tolist()) == list(range(h * w))
    cells = [((i // w) // sy, (i % w) // sx) for i in dst.tolist()]
    assert sorted(cells) == [(a, b) for a in range(h // sy) for b in range(w // sx)]
    if not use_rand:  # top-left of each cell
        assert all((i // w) % sy == 0 and (i % w) % sx == 0 for i in dst.tolist())


def test_bipartite_grid_assignment_matches_a_slow_reference():
    g = torch.Generator().manual_seed(0)
    B, h, w, C, r = 2, 6, 4, 5, 9
    metric = torch.randn(B, h * w, C, generator=g)
    assignment, num_out = bipartite_grid_assignment(metric, h, w, r, 2, 2, use_rand=False)
    assert num_out == h * w - r
    src, dst = grid_destinations(h, w, 2, 2, False)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    for b in range(B):
        sims = {s: max((float(unit[b, s] @ unit[b, d]), d) for d in dst.tolist()) for s in src.tolist()}
        merged = sorted(sims, key=lambda s: -sims[s][0])[:r]
        # every destination keeps its own slot; merged sources join their best destination
        dst_slot = {d: int(assignment[b, d]) for d in dst.tolist()}
        assert len(set(dst_slot.values())) == len(dst)
        for s in src.tolist():
            if s in merged:
                assert int(assignment[b, s]) == dst_slot[sims[s][1]]
            else:
                assert int(assignment[b, s]) not in dst_slot.values()
        assert len(set(assignment[b].tolist())) == num_out


def test_atc_assignment_matches_scipy():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 20, 6, generator=g, dtype=torch.float64)
    for method in ("single", "average", "complete"):
        assignment, num_out = atc_assignment(metric, 8, method)
        assert num_out == 12
        for b in range(2):
            ref = fcluster(linkage(pdist(metric[b].numpy(), "cosine"), method), 12, criterion="maxclust")
            ours = assignment[b].numpy()
            # same partition: the pairs of tokens sharing a cluster agree
            assert np.array_equal(ours[:, None] == ours[None], ref[:, None] == ref[None])


@pytest.mark.parametrize("method", ["single", "complete", "average"])
def test_atc_inside_the_unet_at_a_32x32_latent_merges_scipys_clusters(unet, method):
    """At a 32 x 32 latent (1,024 tokens: the clustering kernel's sparse path)
    the first full-resolution block's self-attention receives the means of
    SciPy's clusters (cut at N/2, cosine distance of the block's input,
    clusters ordered by their smallest token) of its normalised input."""
    from scipy.cluster.hierarchy import linkage

    from tokenreduction.reduction import _native_clustering as native
    from tokenreduction.reduction.clustering import cosine_distance_from_unit, unit_rows

    g = torch.Generator().manual_seed(4)
    latent, text = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 8, 32, generator=g)
    name, block = transformer_blocks(unet)[0]
    seen = {}

    def keep(key):
        def hook(module, args, kwargs):
            seen.setdefault(key, args[0] if args else kwargs["hidden_states"])
        return hook

    apply_patch(unet, ratio=0.5, merge_fn="atc", linkage=method)
    # registered after the patch's hooks: attn1 sees the merged tokens
    handles = [block.register_forward_pre_hook(keep("x"), with_kwargs=True),
               block.attn1.register_forward_pre_hook(keep("merged"), with_kwargs=True)]
    native.sparse_stats()
    try:
        run(unet, (latent, text))
    finally:
        remove_patch(unet)
        for h in handles:
            h.remove()
    if native.library() is not None:
        assert native.sparse_stats()["finished"] > 0
    x = seen["x"][0]
    n = x.shape[0]
    assert n == 1024 and seen["merged"].shape[1] == 512
    d = cosine_distance_from_unit(unit_rows(x[None].float()))[0].double().numpy()
    z = linkage(d[np.triu_indices(n, 1)], method=method)
    parent = list(range(2 * n - 1))  # union-find over SciPy's first N/2 merges

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for k, (a, b) in enumerate(z[: n // 2, :2].astype(int)):
        parent[root(a)] = parent[root(b)] = n + k
    groups = {}
    for t in range(n):
        groups.setdefault(root(t), []).append(t)
    clusters = sorted(groups.values(), key=min)
    with torch.no_grad():
        normed = block.norm1(x[None])[0]
    expected = torch.stack([normed[c].mean(0) for c in clusters])
    torch.testing.assert_close(seen["merged"][0], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the UNet patch


@pytest.mark.parametrize("merge_fn", ["tome", "atc"])
def test_ratio_zero_is_the_unpatched_unet(unet, inputs, reference, merge_fn):
    apply_patch(unet, ratio=0.0, merge_fn=merge_fn, merge_crossattn=True, merge_mlp=True)
    try:
        assert torch.equal(run(unet, inputs), reference)
    finally:
        remove_patch(unet)


def test_self_attention_sees_the_reduced_token_count(unet, inputs):
    ratio = 0.3
    apply_patch(unet, ratio=ratio, merge_fn="tome")
    attn_in, h1 = record_tokens(unet, "attn1", "pre")
    cross_in, h2 = record_tokens(unet, "attn2", "pre")
    try:
        run(unet, inputs)
    finally:
        for h in h1 + h2:
            h.remove()
        remove_patch(unet)
    merged = N_FULL - int(N_FULL * ratio)
    full = [n for n, counts in attn_in.items() if counts == [merged]]
    assert len(full) == FULL_RES_BLOCKS
    mid = [counts for n, counts in attn_in.items() if n.startswith("mid_block")]
    assert mid == [[N_FULL // 4]]  # downsampled 2x: left alone at max_downsample 1
    assert all(counts[0] in (N_FULL, N_FULL // 4) for counts in cross_in.values())  # cross-attn not merged


def test_unmerge_restores_the_token_count(unet, inputs):
    apply_patch(unet, ratio=0.5, merge_fn="tome", merge_crossattn=True, merge_mlp=True)
    outs = {sub: record_tokens(unet, sub, "post") for sub in ("attn1", "attn2", "ff")}
    ins, h_in = record_tokens(unet, "ff", "pre")
    try:
        run(unet, inputs)
        state = patch_state(unet)
    finally:
        for seen, handles in outs.values():
            for h in handles:
                h.remove()
        for h in h_in:
            h.remove()
        remove_patch(unet)
    full = [n for n, (tokens, merged) in state.tokens.items() if tokens == N_FULL]
    assert len(full) == FULL_RES_BLOCKS
    for name in full:
        assert state.tokens[name] == (N_FULL, N_FULL // 2)
        assert ins[name] == [N_FULL // 2]  # the MLP ran on merged tokens
        for seen, _ in outs.values():
            assert seen[name] == [N_FULL]  # and every output came back full size


def test_max_downsample_reaches_the_mid_block(unet, inputs):
    apply_patch(unet, ratio=0.5, max_downsample=2)
    try:
        run(unet, inputs)
        tokens = dict(patch_state(unet).tokens)
    finally:
        remove_patch(unet)
    assert tokens["mid_block.attentions.0.transformer_blocks.0"] == (N_FULL // 4, N_FULL // 8)


@pytest.mark.parametrize(
    "merge_fn,linkage", [("tome", "average"), ("atc", "single"), ("atc", "average"), ("atc", "complete")]
)
def test_every_merge_function_runs_inside_the_unet(unet, inputs, reference, merge_fn, linkage):
    apply_patch(unet, ratio=0.5, merge_fn=merge_fn, linkage=linkage)
    try:
        out = run(unet, inputs)
        tokens = patch_state(unet).tokens
    finally:
        remove_patch(unet)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert not torch.equal(out, reference)
    assert sum(t == (N_FULL, N_FULL // 2) for t in tokens.values()) == FULL_RES_BLOCKS


@pytest.mark.parametrize("merge_fn", ["tome", "atc"])
def test_merging_runs_in_bfloat16(unet, inputs, merge_fn):
    half = copy.deepcopy(unet).to(torch.bfloat16)
    x, e = (t.to(torch.bfloat16) for t in inputs)
    apply_patch(half, ratio=0.5, merge_fn=merge_fn, merge_mlp=True)
    with torch.no_grad():
        out = half(x, 10, e).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert sum(t == (N_FULL, N_FULL // 2) for t in patch_state(half).tokens.values()) == FULL_RES_BLOCKS


def test_matches_tomesd_without_randomness(unet, inputs):
    tomesd = pytest.importorskip("tomesd")
    tomesd.apply_patch(unet, ratio=0.5, use_rand=False, max_downsample=1)
    try:
        theirs = run(unet, inputs)
    finally:
        tomesd.remove_patch(unet)
    apply_patch(unet, ratio=0.5, use_rand=False)
    try:
        ours = run(unet, inputs)
    finally:
        remove_patch(unet)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_remove_patch_restores(unet, inputs, reference):
    before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())
    apply_patch(unet, ratio=0.5, merge_fn="atc", merge_mlp=True)
    apply_patch(unet, ratio=0.5, merge_fn="tome")  # re-patching replaces the patch
    remove_patch(unet)
    after = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())
    assert after == before and patch_state(unet) is None
    assert torch.equal(run(unet, inputs), reference)


def test_bad_options_fail_clearly(unet):
    with pytest.raises(ValueError, match="ratio"):
        apply_patch(unet, ratio=1.0)
    with pytest.raises(ValueError, match="merge_fn"):
        apply_patch(unet, merge_fn="kmeans")
    with pytest.raises(ValueError, match="linkage"):
        apply_patch(unet, merge_fn="atc", linkage="ward")
    with pytest.raises(ValueError, match="BasicTransformerBlock"):
        apply_patch(torch.nn.Linear(2, 2))
    assert patch_state(unet) is None


# ---------------------------------------------------------------- pipeline, reference set, FID


def test_tiny_pipeline_round_trip_and_generation(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "tiny-sd", img_size=32)
    pipe = load_pipeline(folder, device="cpu")
    record = generate_images(
        pipe, ["cat", "dog"], tmp_path / "gen", images_per_class=1, steps=1, img_size=32, seed=5,
        merge={"merge_fn": "tome", "ratio": 0.5}, warmup=False,
    )
    files = sorted(p.name for p in (tmp_path / "gen").iterdir())
    assert files == ["0000_00.png", "0001_00.png"] == record["files"]
    assert Image.open(tmp_path / "gen" / files[0]).size == (32, 32)
    assert record["num_images"] == 2 and len(record["times"]) == 2
    assert math.isclose(record["time_mean"], float(np.mean(record["times"])))
    assert {tuple(v) for v in record["merged_tokens"].values()} == {(N_FULL, N_FULL // 2)}
    assert patch_state(pipe) is None  # generation leaves the pipeline unpatched
    with pytest.raises(ValueError, match="no model_index.json"):
        load_pipeline(tmp_path / "gen")


def _image_folder(path, n, bright, seed):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i in range(n):
        base = rng.uniform(0, 120, size=3) + bright
        noise = rng.normal(0, 20, size=(24, 24, 3))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(path / f"{i:02d}.png")
    return path


def test_fid_is_zero_for_the_same_folder_and_larger_for_another(tmp_path):
    a = _image_folder(tmp_path / "a", 12, 0, seed=0)
    b = _image_folder(tmp_path / "b", 12, 100, seed=1)
    same = compute_fid(a, a, extractor="pixels", pixel_dim=4, device="cpu")
    other = compute_fid(a, b, extractor="pixels", pixel_dim=4, device="cpu")
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert other["fid"] > 0.1
    assert "not Inception" in same["feature_extractor"]
    assert same["num_reference"] == same["num_generated"] == 12


def test_missing_inception_weights_name_the_file(tmp_path):
    a = _image_folder(tmp_path / "a", 3, 0, seed=0)
    missing = tmp_path / "weights" / "inception-2015-12-05.pt"
    with pytest.raises(MissingWeightsError, match="inception-2015-12-05.pt") as err:
        compute_fid(a, a, extractor="inception", inception_weights=missing, device="cpu")
    assert str(missing) in str(err.value) and "diffusion.fid.inception_weights" in str(err.value)


def test_reference_set_and_class_names(tmp_path):
    val = tmp_path / "val"
    for c in ("n02", "n01", "n03"):
        (val / c).mkdir(parents=True)
        for i in (3, 1, 2):
            Image.new("RGB", (4, 4)).save(val / c / f"img{i}.JPEG")
    record = make_reference_set(val, tmp_path / "ref", per_class=2, num_classes=2)
    assert record["files"] == ["n01_img1.JPEG", "n01_img2.JPEG", "n02_img1.JPEG", "n02_img2.JPEG"]
    assert sorted(p.name for p in (tmp_path / "ref").glob("*.JPEG")) == record["files"]
    assert class_names(val) == ["n01", "n02", "n03"]
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"n01": "tench", "n02": "goldfish", "n03": "shark"}))
    assert class_names(val, str(names), num_classes=2) == ["tench", "goldfish"]
    assert class_names(val, ["a", "b", "c"]) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="2 class names for 3"):
        class_names(val, ["a", "b"])
