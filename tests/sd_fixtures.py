"""Tiny Stable-Diffusion-shaped pipelines built with diffusers' and transformers' own classes (a CLIP
tokenizer of single characters, random weights, no download), and diffusers' sampling loop beside unnoise's
for the parity table (issue 32): shared by tests/test_stable_diffusion.py
and benchmarks/sd_parity.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers


def byte_characters() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2, CLIP) writes the bytes 0..255 as."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    table = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    return [table[b] for b in range(256)]


def tiny_tokenizer():
    """A CLIP tokenizer whose vocabulary is every byte's character, alone and word-final, and no merges."""
    characters = byte_characters()
    tokens = [*characters, *(c + "</w>" for c in characters), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


TIME_SENSITIVITY = 30.0


def save_tiny_sd(folder, prediction_type: str = "epsilon", *, timestep_spacing: str | None = None):
    """An SD-1.x-shaped diffusers folder: UNet (2 levels, cross-attention), VAE (factor 2), CLIP text model
    (2 layers), scheduler config of SD 1.5's betas, random weights, safetensors."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
        )
    )  # fmt: skip
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=32,
    )  # fmt: skip
    with torch.no_grad():  # a trained UNet's output depends on t; a random one's barely, unless made to
        unet.time_embedding.linear_1.weight.mul_(TIME_SENSITIVITY)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=16,
    )  # fmt: skip
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(folder, safe_serialization=True)
    config_path = Path(folder) / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.pop("timestep_spacing", None)  # SD 1.5's own config has none: each class falls back to its own
    if timestep_spacing is not None:
        config["timestep_spacing"] = timestep_spacing
    config_path.write_text(json.dumps(config, indent=2))
    return folder


# --- diffusers' sampling loop, as StableDiffusionPipeline runs it -----------------------------------------

SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


@dataclass(frozen=True)
class Row:
    """One parity case: unnoise's sampler (with eta) on a schedule type, against diffusers' scheduler."""

    sampler: str
    schedule: str = "Automatic"  # or "Karras": diffusers' use_karras_sigmas
    eta: float = 0.0  # DDIM's


ROWS = (
    Row("euler"),
    Row("euler", "Karras"),
    Row("euler_ancestral"),
    Row("ddim"),
    Row("ddim", eta=1.0),
    Row("dpmpp_2m"),
    Row("dpmpp_2m", "Karras"),
)


def diffusers_sample(folder, row: Row, cond, uncond, *, steps: int, guidance: float, seed: int):
    """diffusers' latents and x0 estimates: latents drawn first from the seed's generator, which then gives
    every step's noise (as StableDiffusionPipeline with `generator=`); classifier-free guidance on the
    UNet's output, one batch of (uncond, cond)."""
    kind = getattr(diffusers, SCHEDULERS[row.sampler])
    options = {"use_karras_sigmas": True} if row.schedule == "Karras" else {}
    scheduler = kind.from_pretrained(folder, subfolder="scheduler", **options)
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = (
        torch.randn((1, unet.config.in_channels, size, size), generator=generator)
        * scheduler.init_noise_sigma
    )
    states = torch.cat([uncond, cond])  # (2, 77, D)
    step_options = {"generator": generator, **({"eta": row.eta} if row.sampler == "ddim" else {})}
    estimates = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            both = scheduler.scale_model_input(torch.cat([x, x]), t)
            unconditional, conditional = unet(both, t, encoder_hidden_states=states).sample.chunk(2)
            output = unconditional + guidance * (conditional - unconditional)
            step = scheduler.step(output, t, x, **step_options)
            x = step.prev_sample
            estimate = getattr(step, "pred_original_sample", None)
            estimates.append(scheduler.model_outputs[-1] if estimate is None else estimate)
    return x, estimates


def unnoise_sample(pipe, row: Row, prompt: str, *, steps: int, guidance: float, seed: int):
    """unnoise's latents and x0 estimates for the same seed, through `Pipeline.generate`."""
    estimates = []
    x = pipe.generate(
        prompt, sampler=row.sampler, steps=steps, guidance=guidance, seed=seed, schedule=row.schedule,
        sampler_options={"eta": row.eta} if row.sampler == "ddim" else None, output_type="latent",
        callback=lambda step: estimates.append(step.denoised),
    )  # fmt: skip
    return x, estimates


def parity(pipe, folder, row: Row, *, prompt: str = "a red cat", steps: int = 6, guidance: float = 5.0,
           seed: int = 3) -> tuple[float, float]:  # fmt: skip
    """(relative difference of the final latents, largest of the x0 estimates' over all steps)."""
    cond, uncond = pipe.encode([prompt]).tokens, pipe.encode([""]).tokens
    theirs, their_estimates = diffusers_sample(folder, row, cond, uncond, steps=steps, guidance=guidance,
                                               seed=seed)  # fmt: skip
    ours, our_estimates = unnoise_sample(pipe, row, prompt, steps=steps, guidance=guidance, seed=seed)
    final = relative_difference(ours, theirs)
    x0 = max(relative_difference(a, b) for a, b in zip(our_estimates, their_estimates, strict=True))
    return final, x0


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|: float32 round-off is about 1e-7 of the values' size."""
    return float((ours - theirs).abs().max() / theirs.abs().max())


# --- LoRA files in the layouts users have ----------------------------------------------------------------


def lora_layers(pipe, rank: int = 4, seed: int = 0):
    """(part, module name, down, up) for every attention projection and proj_in/out of the UNet and every
    attention projection of the text encoder: random, so the update is visible."""
    generator = torch.Generator().manual_seed(seed)
    parts = {"unet": pipe.denoiser.network.unet, "text": pipe.text.encoder.model}
    wanted = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "q_proj", "k_proj", "v_proj")
    layers = []
    for part, root in parts.items():
        for name, module in root.named_modules():
            if name.endswith(wanted) and isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                out_features, in_features = module.weight.shape[:2]
                tail = (1, 1) if isinstance(module, torch.nn.Conv2d) else ()
                down = torch.randn((rank, in_features, *tail), generator=generator) * 0.3
                up = torch.randn((out_features, rank, *tail), generator=generator) * 0.3
                layers.append((part, name, down, up))
    return layers


def save_kohya_lora(path, layers, alpha: float = 2.0):
    """kohya-ss' layout: lora_unet_/lora_te_ + the module path with underscores, lora_down/lora_up, alpha."""
    from safetensors.torch import save_file

    tensors = {}
    for part, name, down, up in layers:
        prefix = "lora_unet_" if part == "unet" else "lora_te_text_model_"
        stem = prefix + name.replace(".", "_")
        tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                    f"{stem}.alpha": torch.tensor(alpha)}  # fmt: skip
    save_file(tensors, str(path))
    return path


def save_peft_lora(path, layers, alpha: float = 8.0):
    """diffusers' / PEFT's layout: unet.<path>.lora_A/lora_B, text_encoder.text_model.<path>, lora_alpha in
    the metadata."""
    from safetensors.torch import save_file

    tensors = {}
    for part, name, down, up in layers:
        stem = f"unet.{name}" if part == "unet" else f"text_encoder.text_model.{name}"
        tensors |= {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up}
    save_file(tensors, str(path), metadata={"lora_alpha": json.dumps(alpha)})
    return path


# --- a single-file checkpoint in CompVis' key layout, as AUTOMATIC1111 and ComfyUI load ---------------------

RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
    "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}  # fmt: skip
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_unet_key(key: str, layers: int, attended_up: set[int]) -> str:
    """diffusers' UNet2DConditionModel key -> CompVis' (the inverse of diffusers' converter's renaming)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    parts = key.split(".")

    def resnet(rest: list[str]) -> str:
        return ".".join([RESNET.get(rest[0], rest[0]), *rest[1:]])

    if parts[0] == "down_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * (layers + 1)}.0.op." + ".".join(rest[1:])
        block = 1 + i * (layers + 1) + j
        return (
            f"input_blocks.{block}.0." + resnet(rest)
            if kind == "resnets"
            else f"input_blocks.{block}.1." + ".".join(rest)
        )
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "attentions":
            return "middle_block.1." + ".".join(rest)
        return f"middle_block.{2 * j}." + resnet(rest)
    if parts[0] == "up_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            return (
                f"output_blocks.{i * (layers + 1) + layers}.{2 if i in attended_up else 1}.conv."
                + ".".join(rest[1:])
            )
        block = i * (layers + 1) + j
        return (
            f"output_blocks.{block}.0." + resnet(rest)
            if kind == "resnets"
            else f"output_blocks.{block}.1." + ".".join(rest)
        )
    raise KeyError(key)


def ldm_vae_key(key: str, blocks: int) -> str:
    """diffusers' AutoencoderKL key -> CompVis'."""
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    side, rest = parts[0], parts[1:]
    names = {"conv_norm_out": "norm_out"}
    if rest[0] in ("conv_in", "conv_out", "conv_norm_out"):
        return ".".join([side, names.get(rest[0], rest[0]), *rest[1:]])
    shortcut = {"conv_shortcut": "nin_shortcut"}
    if rest[0] == "mid_block":
        if rest[1] == "attentions":
            tail = ".".join(rest[3:])
            for old, new in VAE_ATTENTION.items():
                if tail.startswith(old + "."):
                    return f"{side}.mid.attn_1.{new}" + tail[len(old) :]
        return f"{side}.mid.block_{int(rest[2]) + 1}." + ".".join([shortcut.get(rest[3], rest[3]), *rest[4:]])
    i = int(rest[1]) if side == "encoder" else blocks - 1 - int(rest[1])
    level = "down" if side == "encoder" else "up"
    if rest[2] in ("downsamplers", "upsamplers"):
        return f"{side}.{level}.{i}.{'downsample' if side == 'encoder' else 'upsample'}.conv." + ".".join(
            rest[5:]
        )
    return f"{side}.{level}.{i}.block.{rest[3]}." + ".".join([shortcut.get(rest[4], rest[4]), *rest[5:]])


def save_single_file(folder, path):
    """The diffusers folder's three parts as one CompVis-layout safetensors checkpoint."""
    from safetensors.torch import save_file

    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text = transformers.CLIPTextModel.from_pretrained(Path(folder) / "text_encoder")
    layers = unet.config.layers_per_block
    attended_up = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    tensors = {
        "model.diffusion_model." + ldm_unet_key(k, layers, attended_up): v
        for k, v in unet.state_dict().items()
    }
    blocks = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        name = ldm_vae_key(key, blocks)
        if ".attn_1." in name and name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value[:, :, None, None]  # CompVis' VAE attention is 1x1 convolutions
        tensors["first_stage_model." + name] = value
    for key, value in text.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        tensors["cond_stage_model.transformer." + key] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
