"""create_model's errors, the unreduced model against stock timm, checkpoint
loading, r schedules and token budgets against hand-worked numbers, FLOPs."""
from __future__ import annotations

import pytest
import timm
import torch

import tokenreduction as tr

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=5)
DEIT = "deit_tiny_patch16_224"


pytestmark = pytest.mark.usefixtures("one_thread")


def images(batch=2, size=32, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- one clear ValueError per bad argument, naming the offending value ----------------------


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError) as err:
        tr.create_model(DEIT, method="no-such-method", keep_rate=0.5, **TINY)
    msg = str(err.value)
    assert "no-such-method" in msg
    for known in tr.list_methods():
        assert known in msg


@pytest.mark.parametrize("rate", [0, 0.0, 1.5, -0.2])
def test_keep_rate_outside_unit_interval(rate):
    with pytest.raises(ValueError, match="keep_rate") as err:
        tr.create_model(DEIT, method="topk", keep_rate=rate, **TINY)
    assert str(rate) in str(err.value)


def test_keep_rate_list_of_wrong_length():
    with pytest.raises(ValueError, match="keep_rate has 2 values"):
        tr.create_model(DEIT, method="topk", keep_rate=[0.7, 0.5], reduction_loc=(3, 6, 9), **TINY)


def test_reduction_location_beyond_depth():
    with pytest.raises(ValueError, match="reduction location 12") as err:
        tr.create_model(DEIT, method="topk", keep_rate=0.5, reduction_loc=(3, 12), **TINY)
    assert "0..11" in str(err.value)


def test_r_too_large_names_block_and_count():
    # r=40 at every block: block 0 can remove only 32 of 64 (bipartite cap),
    # so block 1 has 32 tokens left and r=40 cannot be removed there
    with pytest.raises(ValueError) as err:
        tr.create_model(DEIT, method="tome", r=40, **TINY)
    msg = str(err.value)
    assert "r=40" in msg and "block 1" in msg and "32" in msg


def test_unknown_atc_linkage():
    with pytest.raises(ValueError) as err:
        tr.create_model(DEIT, method="atc", keep_rate=0.5, method_kwargs={"linkage": "wardish"}, **TINY)
    assert "wardish" in str(err.value)


def test_unknown_budget():
    with pytest.raises(ValueError, match="unknown token budget") as err:
        tr.create_model(DEIT, method="topk", keep_rate=0.5, budget="logarithmic", **TINY)
    assert "logarithmic" in str(err.value)


def test_unknown_r_schedule():
    with pytest.raises(ValueError, match="unknown r schedule") as err:
        tr.create_model(DEIT, method="tome", r=2, r_schedule="zigzag", **TINY)
    assert "zigzag" in str(err.value)


def test_unknown_method_option():
    with pytest.raises(ValueError, match="not_an_option"):
        tr.create_model(DEIT, method="topk", keep_rate=0.5, method_kwargs={"not_an_option": 1}, **TINY)


# ---- the unreduced model is stock timm -----------------------------------------------------


@pytest.mark.parametrize(
    "name,extra",
    [(DEIT, {}), ("deit_tiny_distilled_patch16_224", {}), ("vit_base_patch16_224", {"global_pool": "avg"}),
     ("vit_base_patch16_clip_quickgelu_224", {}), ("deit3_small_patch16_224", {})],
)
def test_unreduced_equals_stock_timm(name, extra):
    torch.manual_seed(0)
    stock = timm.create_model(name, **TINY, **extra).eval()
    patched = tr.create_model(name, method=None, **TINY, **extra).eval()
    patched.load_state_dict(stock.state_dict())
    assert type(patched) is not type(stock)
    x = images()
    with torch.no_grad():
        assert torch.equal(patched(x), stock(x))
    assert patched.tokens_kept == []


def test_tome_r0_equals_unreduced():
    """r = 0 merges nothing: the tokens keep their order and no size bias is
    added, so the logits are exactly the unreduced model's."""
    torch.manual_seed(0)
    base = tr.create_model(DEIT, method=None, **TINY).eval()
    tome = tr.create_model(DEIT, method="tome", r=0, **TINY).eval()
    tome.load_state_dict(base.state_dict())
    x = images()
    with torch.no_grad():
        ref = base(x)
        out = tome(x)
    assert tome.tokens_kept == [64] * 12
    assert torch.equal(out, ref)


# ---- local checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["plain", "model", "module"])
def test_load_checkpoint_layouts(layout, tmp_path):
    torch.manual_seed(0)
    source = tr.create_model(DEIT, method=None, **TINY).eval()
    sd = source.state_dict()
    if layout == "model":
        payload = {"model": sd, "epoch": 3}
    elif layout == "module":
        payload = {"module." + k: v for k, v in sd.items()}
    else:
        payload = sd
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    torch.manual_seed(1)
    target = tr.create_model(DEIT, method="topk", keep_rate=0.5, **TINY).eval()
    assert not torch.equal(target.cls_token, source.cls_token)
    tr.load_checkpoint(target, path)
    for k, v in sd.items():
        assert torch.equal(target.state_dict()[k], v), k
    # through create_model as well
    built = tr.create_model(DEIT, method="topk", keep_rate=0.5, checkpoint_path=path, **TINY).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(built(x), target(x))


def test_load_checkpoint_other_head_keeps_new_head(tmp_path):
    torch.manual_seed(0)
    source = tr.create_model(DEIT, method=None, **{**TINY, "num_classes": 7})
    torch.save(source.state_dict(), tmp_path / "c.pth")
    target = tr.create_model(DEIT, method="tome", keep_rate=0.5, **TINY)
    head = target.head.weight.detach().clone()
    tr.load_checkpoint(target, tmp_path / "c.pth")
    assert torch.equal(target.head.weight, head)
    assert torch.equal(target.pos_embed, source.pos_embed)


def test_load_checkpoint_missing_file(tmp_path):
    model = tr.create_model(DEIT, method=None, **TINY)
    missing = tmp_path / "nowhere" / "best.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tr.load_checkpoint(model, missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tr.create_model(DEIT, method="topk", keep_rate=0.5, checkpoint_path=missing, **TINY)


def test_load_checkpoint_incomplete_names_missing(tmp_path):
    sd = tr.create_model(DEIT, method=None, **TINY).state_dict()
    del sd["blocks.4.mlp.fc1.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"blocks\.4\.mlp\.fc1\.weight"):
        tr.load_checkpoint(tr.create_model(DEIT, method=None, **TINY), tmp_path / "partial.pth")


# ---- r schedules, by hand ------------------------------------------------------------------
# rule (models/budget.py): a = int(r * (1 - f)), b = 2r - a, block i of L removes
# int(a + (b - a) * i / (L - 1)); constant f = 0, decrease f = -1, increase f = +1.
# r = 8, L = 12: decrease a = 16, b = 0: int(16 - 16 i / 11) = int((176 - 16 i) / 11)
#   i = 0..11: 176/11=16, 160/11=14.5, 144/11=13.1, 128/11=11.6, 112/11=10.2, 96/11=8.7,
#              80/11=7.3, 64/11=5.8, 48/11=4.4, 32/11=2.9, 16/11=1.5, 0
#   increase a = 0, b = 16: int(16 i / 11) = 0, 1.5, 2.9, 4.4, 5.8, 7.3, 8.7, 10.2, 11.6, 13.1, 14.5, 16
# r = 5, L = 4: decrease a = 10, b = 0: int(10 - 10 i / 3) = 10, 6.7, 3.3, 0
#   increase: int(10 i / 3) = 0, 3.3, 6.7, 10
HAND = {
    (8, 12, "constant"): [8] * 12,
    (8, 12, "decrease"): [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0],
    (8, 12, "increase"): [0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16],
    (5, 4, "constant"): [5, 5, 5, 5],
    (5, 4, "decrease"): [10, 6, 3, 0],
    (5, 4, "increase"): [0, 3, 6, 10],
}


@pytest.mark.parametrize("key", list(HAND))
def test_r_schedule_hand_table(key):
    r, blocks, schedule = key
    assert tr.r_schedule(r, blocks, schedule) == HAND[key]


def test_r_schedule_reaches_the_model():
    model = tr.create_model(DEIT, method="tome", r=2, r_schedule="decrease", **TINY).eval()
    schedule = tr.r_schedule(2, 12, "decrease")
    assert model.reduction_config["r"] == schedule
    with torch.no_grad():
        model(images())
    left, hand = 64, []
    for r in schedule:
        left -= min(r, left // 2)
        hand.append(left)
    assert model.tokens_kept == hand


# ---- budgets on 196 patches (ToMe's cap, the geometric schedule) ---------------------------

FULL = dict(embed_dim=32, num_heads=2, num_classes=5)  # deit_tiny layout at 224 px: 196 patches


@pytest.mark.parametrize(
    "method,rate,counts",
    [("tome", 0.25, [98, 61, 52]), ("tome", 0.5, [98, 49, 25]), ("topk", 0.7, [137, 96, 67]),
     ("topk", 0.25, [49, 12, 3])],
)
def test_geometric_budget_196_patches(method, rate, counts):
    model = tr.create_model(DEIT, method=method, keep_rate=rate, reduction_loc=(3, 6, 9), **FULL).eval()
    assert model.patch_embed.num_patches == 196
    assert model.reduction_config["expected_tokens"] == counts
    with torch.no_grad():
        model(images(batch=1, size=224))
    assert model.tokens_kept == counts


def test_flops_decrease_with_keep_rate():
    flops = [tr.count_flops(tr.create_model(DEIT, method=None, **TINY))]
    for rate in (0.9, 0.7, 0.5, 0.3):
        flops.append(tr.count_flops(tr.create_model(DEIT, method="topk", keep_rate=rate, **TINY)))
    assert all(a > b for a, b in zip(flops, flops[1:])), flops
    assert flops[-1] > 0
