"""Tiny random-weight stand-ins of the diffusion models the stage runs, small
enough for a CPU: each keeps its real model's layout (block types, levels
with and without attention, transformer layers per block, linear
projections, conditioning inputs, patch embedding) with narrow widths.

Backbones (:func:`tiny_backbone`): ``sd15`` (SD 1.x UNet), ``sd2`` (SD 2.x
UNet: linear projections, per-level heads), ``sdxl`` (SDXL UNet: no attention
at the first level, two transformer layers per block below it, text-time
added conditioning), ``pixart`` (PixArtTransformer2DModel, ada-norm-single,
caption projection), ``dit`` (DiTTransformer2DModel, class-conditional).
:func:`backbone_inputs` gives matching call arguments.

Pipelines (:func:`build_tiny_pipeline`): ``sd15``, ``sdxl``, ``pixart``: the
backbone with a 2-block VAE (latent = image / 2), small text encoders with
tokenizers made offline (byte-level CLIP; character T5), and a DDIM
scheduler, saved and reloaded by ``save_pretrained``/``from_pretrained``.
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

BACKBONES = ("sd15", "sd2", "sdxl", "pixart", "dit")
PIPELINE_MODELS = ("sd15", "sdxl", "pixart")
TEXT_WIDTH = 32  # each text encoder's width
SDXL_TIME_DIM = 8  # addition_time_embed_dim (SDXL: 256)


def tiny_backbone(kind: str, sample_size: int = 16) -> torch.nn.Module:
    """A random-weight backbone in the layout of `kind` (see the module
    docstring), latent `sample_size`, in eval mode."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel

    if kind == "sd15":  # SD 1.5: 4 levels, attention in the first 3, 8 heads, cross-attention 768
        model = UNet2DConditionModel(
            sample_size=sample_size, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
        )
    elif kind == "sd2":  # SD 2.x: as 1.5 with linear projections and heads of 64 channels (5/10/20/20)
        model = UNet2DConditionModel(
            sample_size=sample_size, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=TEXT_WIDTH, attention_head_dim=(2, 2, 4, 4), use_linear_projection=True,
        )
    elif kind == "sdxl":
        model = tiny_sdxl_unet(sample_size)
    elif kind == "pixart":  # PixArt-alpha: 28 blocks of 16 heads x 72, caption width 4096
        model = PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=16, sample_size=sample_size, patch_size=2, caption_channels=TEXT_WIDTH,
            use_additional_conditions=False,
        )
    elif kind == "dit":  # DiT-XL/2: 28 blocks of 16 heads x 72, 1000 classes
        model = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            sample_size=sample_size, patch_size=2,
        )
    else:
        raise ValueError(f"unknown backbone {kind!r}; use one of {', '.join(BACKBONES)}")
    return model.eval()


def tiny_sdxl_unet(sample_size: int = 16, widths: Tuple[int, ...] = (32, 64, 64),
                   layers: Tuple[int, ...] = (1, 2, 2), heads: Tuple[int, ...] = (2, 4, 4),
                   text_width: int = 2 * TEXT_WIDTH, pooled_width: int = TEXT_WIDTH,
                   time_dim: int = SDXL_TIME_DIM) -> torch.nn.Module:
    """A UNet in SDXL's layout: levels (plain, cross-attention, cross-attention)
    with `layers` transformer layers per block (SDXL: 1, 2, 10 with no
    attention at level 1), `heads` per level (SDXL: 5, 10, 20 of 64 channels),
    widths (SDXL: 320, 640, 1280), linear projections, text-time added
    conditioning (time ids x `time_dim` + the pooled text embedding of
    `pooled_width`), cross-attention `text_width` (SDXL: 2048)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, layers_per_block=2, block_out_channels=tuple(widths),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=tuple(layers), attention_head_dim=tuple(heads),
        cross_attention_dim=text_width, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + pooled_width,
    ).eval()


def backbone_inputs(kind: str, model: torch.nn.Module, batch: int = 2, latent: int = 16,
                    seed: int = 1) -> Tuple[tuple, Dict[str, Any]]:
    """(args, kwargs) of one denoising call of `model` (a :func:`tiny_backbone`
    of `kind`) on a random latent (batch, 4, latent, latent)."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, latent, latent, generator=g)
    step = torch.tensor([10] * batch)
    if kind in ("sd15", "sd2"):
        return (sample, step), {"encoder_hidden_states": torch.randn(batch, 8, TEXT_WIDTH, generator=g)}
    if kind == "sdxl":
        cfg = model.config
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pooled, generator=g),
                 "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * batch).float()}
        text = torch.randn(batch, 8, cfg.cross_attention_dim, generator=g)
        return (sample, step), {"encoder_hidden_states": text, "added_cond_kwargs": added}
    if kind == "pixart":
        return (sample,), {"encoder_hidden_states": torch.randn(batch, 8, model.config.caption_channels, generator=g),
                           "timestep": step, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    if kind == "dit":
        return (sample,), {"timestep": step, "class_labels": torch.tensor([1] * batch)}
    raise ValueError(f"unknown backbone {kind!r}; use one of {', '.join(BACKBONES)}")


# ------------------------------------------------------------------ pipelines


def _byte_level_tokenizer(folder: Path):
    """A CLIPTokenizer over single bytes (no merges), made offline: vocab =
    the 256 characters of the byte-level alphabet, each also with ``</w>``,
    plus the start and end tokens; merges.txt holds only its version line."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _clip_text_config(tokenizer, projection_dim=None):
    from transformers import CLIPTextConfig

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
    )


def _tiny_vae(img_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=img_size,
    )


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )


def _sd15_pipeline(img_size: int):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _byte_level_tokenizer(Path(tmp))
    unet = UNet2DConditionModel(  # cross-attention at full latent resolution, as SD 1.5's first level
        sample_size=img_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8, norm_num_groups=32,
    )
    return StableDiffusionPipeline(
        vae=_tiny_vae(img_size), text_encoder=CLIPTextModel(_clip_text_config(tokenizer)), tokenizer=tokenizer,
        unet=unet, scheduler=_ddim(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sdxl_pipeline(img_size: int):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _byte_level_tokenizer(Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_2 = _byte_level_tokenizer(Path(tmp))
    unet = tiny_sdxl_unet(img_size // 2, layers=(1, 2, 1))
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(img_size), text_encoder=CLIPTextModel(_clip_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, projection_dim=TEXT_WIDTH)),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=_ddim(), add_watermarker=False,
    )


def _t5_tokenizer():
    """A T5 (Unigram) tokenizer over single characters, made offline."""
    from transformers import T5Tokenizer

    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=120)


def _pixart_pipeline(img_size: int):
    from diffusers import PixArtAlphaPipeline
    from transformers import T5Config, T5EncoderModel

    tokenizer = _t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=TEXT_WIDTH, d_kv=8, d_ff=2 * TEXT_WIDTH, num_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_vae(img_size),
        transformer=tiny_backbone("pixart", img_size // 2), scheduler=_ddim(),
    )


def build_tiny_pipeline(img_size: int = 64, seed: int = 0, model: str = "sd15"):
    """A random-weight pipeline of `model` (sd15: StableDiffusionPipeline;
    sdxl: StableDiffusionXLPipeline; pixart: PixArtAlphaPipeline) small enough
    for a CPU, no safety checker or watermark. The sd15 UNet has cross-attention
    at full latent resolution (merging at max_downsample 1 has blocks to act
    on); the sdxl one none there, as SDXL."""
    if img_size < 16 or img_size % 8:
        raise ValueError(f"img_size must be a multiple of 8 and >= 16, got {img_size}")
    builders = {"sd15": _sd15_pipeline, "sdxl": _sdxl_pipeline, "pixart": _pixart_pipeline}
    if model not in builders:
        raise ValueError(f"unknown diffusion model {model!r}; use one of {', '.join(PIPELINE_MODELS)}")
    torch.manual_seed(seed)
    return builders[model](img_size)
