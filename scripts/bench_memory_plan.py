"""The memory planner's estimate against memory measured on CPU, phase by phase; then the planner's figures for the
shipped GPU presets.

The quantity compared is the one the planner estimates: the peak of the bytes held by the tensors a phase creates
(weights that exist before it are not counted), as an allocator without fragmentation would hold them.

For each architecture and phase a fresh subprocess builds the pipeline from the same configs the planner reads
(zero-filled weights), makes the phase's inputs, and runs the phase once through the project's own code
(``family.encode_prompts``; ``family.sample`` for 2 steps; ``family.decode`` + the reward; ``train_unet`` for two
steps with LoRA and AdamW: the second holds the AdamW state the first made, as every later step of a stage does)
under torch's profiler with ``profile_memory=True``. Every allocation and free of torch's
CPU allocator is an event; the running sum of the bytes allocated minus freed during the call, at its highest, is
the measured peak. Blocks that a kernel allocates and frees before it returns (oneDNN's reordered weights and
inputs, im2col columns: the CPU's analogue of cuDNN workspaces, which the planner does not count on either device)
are shown apart (``+scratch``: the peak with them). ``--rss`` adds a second run that reads the growth of the resident
set (``VmHWM`` reset through ``/proc/self/clear_refs``): it also sees memory outside torch's allocator, but glibc
reuses freed heap blocks, so it reads low for phases made of many small tensors.

The planner's figure for the same settings, on the CPU: its activations (+ the AdamW state for train), without the
stage's pool of kept samples. Architectures: the tiny test pipeline, the toy world's SD, and the SD 1.5 / SDXL /
SD3.5-medium architectures (published configs, random weights; SD3.5 without its T5-XXL) at 64-128 px in bf16; each
process holding one of those runs under ``flock /work/notes/bigmem.lock`` when that file exists, and they are
skipped when their weights do not fit in the memory the machine has free.

    python scripts/bench_memory_plan.py [--models tiny toy sd15 sdxl:64 sd35m:64] [--size 128] [--rss]
                                        [--measurements measured.json] [--no-presets | --presets-only]

Phases under 1 MiB (encoding a few prompts with a tiny text encoder) are shown, not scored. Last line:
``plan_error_max: <max |planned / measured - 1| over the phases scored>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LOCK = Path("/work/notes/bigmem.lock")
PHASES = ("encode prompts", "sample", "decode + score", "train")
RESOLUTION = 2**20  # phases needing less than this are reported, not scored (a few small buffers dominate them)

# published component configs (hub: runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0,
# stabilityai/stable-diffusion-3.5-medium); the T5-XXL encoder of SD3.5 (19 GB in fp32) is left out
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)  # fmt: skip
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)  # fmt: skip
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)  # fmt: skip


def _sdxl_unet():
    from raft_diffusion.diffusion.families.fullsize import SDXL_UNET

    return dict(SDXL_UNET, down_block_types=list(SDXL_UNET["down_block_types"]), up_block_types=list(SDXL_UNET["up_block_types"]))


def _sd35_transformer():
    from raft_diffusion.diffusion.families.fullsize import SD35_MEDIUM

    return dict(SD35_MEDIUM)


def write_config_folder(kind: str, root: Path) -> Path:
    """A pipeline folder of configs only (model_index.json, component configs, tokenizer lengths), as the planner
    reads it; no weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler
    from transformers import CLIPTextConfig

    folder = root / kind
    folder.mkdir(parents=True, exist_ok=True)

    def model(name, cls, cfg):
        (folder / name).mkdir(exist_ok=True)
        cfg = {**cfg, "_class_name": cls}
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
        (folder / name / "config.json").write_text(json.dumps(cfg))
        return ["diffusers", cls]

    def text(name, cls, cfg):
        CLIPTextConfig(**cfg).save_pretrained(folder / name)
        return ["transformers", cls]

    def tok(name, length=77, cls="CLIPTokenizer"):
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "tokenizer_config.json").write_text(json.dumps({"model_max_length": length}))
        return ["transformers", cls]

    def t5(name):
        from transformers import T5Config

        T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                 feed_forward_proj="gated-gelu", is_encoder_decoder=False).save_pretrained(folder / name)  # fmt: skip
        return ["transformers", "T5EncoderModel"]

    def sched(s):
        s.save_config(folder / "scheduler")
        return ["diffusers", type(s).__name__]

    if kind == "sd15":
        index = {"_class_name": "StableDiffusionPipeline", "unet": model("unet", "UNet2DConditionModel", SD15_UNET),
                 "vae": model("vae", "AutoencoderKL", {**SD_VAE, "scaling_factor": 0.18215}),
                 "text_encoder": text("text_encoder", "CLIPTextModel", CLIP_L), "tokenizer": tok("tokenizer"),
                 "scheduler": sched(PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                  skip_prk_steps=True, steps_offset=1)),
                 "safety_checker": [None, None], "feature_extractor": [None, None]}  # fmt: skip
    elif kind == "sdxl":
        index = {"_class_name": "StableDiffusionXLPipeline", "unet": model("unet", "UNet2DConditionModel", _sdxl_unet()),
                 "vae": model("vae", "AutoencoderKL", {**SD_VAE, "scaling_factor": 0.13025, "sample_size": 1024}),
                 "text_encoder": text("text_encoder", "CLIPTextModel", CLIP_L),
                 "text_encoder_2": text("text_encoder_2", "CLIPTextModelWithProjection", CLIP_G),
                 "tokenizer": tok("tokenizer"), "tokenizer_2": tok("tokenizer_2"),
                 "scheduler": sched(EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                           steps_offset=1, timestep_spacing="leading"))}  # fmt: skip
    elif kind in ("sd35m", "sd35m-t5"):
        vae = {**SD_VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
               "use_post_quant_conv": False, "sample_size": 1024}  # fmt: skip
        index = {"_class_name": "StableDiffusion3Pipeline", "transformer": model("transformer", "SD3Transformer2DModel", _sd35_transformer()),
                 "vae": model("vae", "AutoencoderKL", vae),
                 "text_encoder": text("text_encoder", "CLIPTextModelWithProjection", CLIP_L),
                 "text_encoder_2": text("text_encoder_2", "CLIPTextModelWithProjection", CLIP_G),
                 "text_encoder_3": [None, None], "tokenizer": tok("tokenizer"), "tokenizer_2": tok("tokenizer_2"),
                 "tokenizer_3": [None, None], "scheduler": sched(FlowMatchEulerDiscreteScheduler(shift=3.0))}  # fmt: skip
        if kind == "sd35m-t5":  # planning only: the T5-XXL encoder (4.76 B)
            index["text_encoder_3"], index["tokenizer_3"] = t5("text_encoder_3"), tok("tokenizer_3", 256, "T5TokenizerFast")
    elif kind == "flux":
        from raft_diffusion.diffusion.families.fullsize import FLUX_DEV

        vae = {**SD_VAE, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
               "use_post_quant_conv": False, "sample_size": 1024}  # fmt: skip
        index = {"_class_name": "FluxPipeline", "transformer": model("transformer", "FluxTransformer2DModel", dict(FLUX_DEV)),
                 "vae": model("vae", "AutoencoderKL", vae), "text_encoder": text("text_encoder", "CLIPTextModel", CLIP_L),
                 "text_encoder_2": t5("text_encoder_2"), "tokenizer": tok("tokenizer"),
                 "tokenizer_2": tok("tokenizer_2", 512, "T5TokenizerFast"),
                 "scheduler": sched(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                                    base_image_seq_len=256, max_image_seq_len=4096))}  # fmt: skip
    elif kind == "qwen-image":  # Qwen/Qwen-Image: the 20B MMDiT, Qwen2.5-VL-7B (8.29B) and the video VAE (127M)
        from diffusers import AutoencoderKLQwenImage
        from transformers import Qwen2_5_VLConfig

        from raft_diffusion.diffusion.families.fullsize import QWEN_IMAGE

        Qwen2_5_VLConfig(
            text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                             num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                             rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                             rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                               fullatt_block_indexes=[7, 15, 23, 31], in_chans=3, tokens_per_second=2),
            vocab_size=152064, hidden_size=3584, tie_word_embeddings=False,
        ).save_pretrained(folder / "text_encoder")  # fmt: skip
        AutoencoderKLQwenImage().save_config(folder / "vae")  # its defaults are Qwen-Image's
        index = {"_class_name": "QwenImagePipeline", "transformer": model("transformer", "QwenImageTransformer2DModel", dict(QWEN_IMAGE)),
                 "vae": ["diffusers", "AutoencoderKLQwenImage"],
                 "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                 "tokenizer": tok("tokenizer", 131072, "Qwen2Tokenizer"),
                 "scheduler": sched(FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                                    max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
                                                                    shift_terminal=0.02, time_shift_type="exponential"))}  # fmt: skip
    elif kind == "flux2-klein":  # black-forest-labs/FLUX.2-klein-base-4B: the 3.9B MMDiT, Qwen3-4B and the FLUX.2 VAE (84M)
        from diffusers import AutoencoderKLFlux2
        from transformers import Qwen3Config

        from raft_diffusion.diffusion.families.fullsize import FLUX2_KLEIN_4B, QWEN3_4B
        from raft_diffusion.diffusion.families.tiny import build_qwen_tokenizer

        Qwen3Config(**QWEN3_4B).save_pretrained(folder / "text_encoder")
        AutoencoderKLFlux2().save_config(folder / "vae")  # its defaults are FLUX.2's
        # the pipeline applies the tokenizer's chat template, so the planner reads a real one: the Qwen2-style BPE
        # trained offline (its vocabulary is small, but every prompt is padded to max_sequence_length tokens anyway)
        build_qwen_tokenizer().save_pretrained(folder / "tokenizer")
        index = {"_class_name": "Flux2KleinPipeline", "transformer": model("transformer", "Flux2Transformer2DModel", dict(FLUX2_KLEIN_4B)),
                 "vae": ["diffusers", "AutoencoderKLFlux2"], "text_encoder": ["transformers", "Qwen3ForCausalLM"],
                 "tokenizer": ["transformers", "Qwen2TokenizerFast"], "is_distilled": False,
                 "scheduler": sched(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                                    base_image_seq_len=256, max_image_seq_len=4096))}  # fmt: skip
    elif kind == "flux2":  # black-forest-labs/FLUX.2-dev: the 32B MMDiT, Mistral-3-Small (24B) and the FLUX.2 VAE
        from diffusers import AutoencoderKLFlux2
        from transformers import Mistral3Config

        from raft_diffusion.diffusion.families.fullsize import FLUX2_DEV
        from raft_diffusion.diffusion.families.tiny import _PARTS_CHAT_TEMPLATE, build_qwen_tokenizer

        Mistral3Config(
            text_config={"model_type": "mistral", "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072,
                         "max_position_embeddings": 131072, "rope_theta": 1000000000.0, "rms_norm_eps": 1e-5},
            vision_config={"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                           "num_attention_heads": 16, "head_dim": 64, "image_size": 1540, "patch_size": 14},
            spatial_merge_size=2, multimodal_projector_bias=False,
        ).save_pretrained(folder / "text_encoder")  # fmt: skip
        AutoencoderKLFlux2().save_config(folder / "vae")
        tokenizer = build_qwen_tokenizer()
        tokenizer.chat_template = _PARTS_CHAT_TEMPLATE
        tokenizer.save_pretrained(folder / "tokenizer")
        index = {"_class_name": "Flux2Pipeline", "transformer": model("transformer", "Flux2Transformer2DModel", dict(FLUX2_DEV)),
                 "vae": ["diffusers", "AutoencoderKLFlux2"], "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"],
                 "tokenizer": ["transformers", "Qwen2TokenizerFast"],
                 "scheduler": sched(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                                    base_image_seq_len=256, max_image_seq_len=4096))}  # fmt: skip
    elif kind == "z-image":  # Tongyi-MAI/Z-Image: the 6.15B DiT, Qwen3-4B and the FLUX VAE (84M)
        from transformers import Qwen3Config

        from raft_diffusion.diffusion.families.fullsize import QWEN3_4B, Z_IMAGE
        from raft_diffusion.diffusion.families.tiny import build_qwen_tokenizer

        Qwen3Config(**QWEN3_4B).save_pretrained(folder / "text_encoder")
        build_qwen_tokenizer().save_pretrained(folder / "tokenizer")  # the chat template, as for FLUX.2 [klein]
        vae = {**SD_VAE, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
               "use_post_quant_conv": False, "sample_size": 1024}  # fmt: skip
        index = {"_class_name": "ZImagePipeline", "transformer": model("transformer", "ZImageTransformer2DModel", dict(Z_IMAGE)),
                 "vae": model("vae", "AutoencoderKL", vae), "text_encoder": ["transformers", "Qwen3ForCausalLM"],
                 "tokenizer": ["transformers", "Qwen2TokenizerFast"],
                 "scheduler": sched(FlowMatchEulerDiscreteScheduler(shift=6.0, use_dynamic_shifting=False))}  # fmt: skip
    else:
        raise SystemExit(f"unknown architecture {kind}")
    del AutoencoderKL
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def settings(kind: str, size: int, dtype: str = "float32") -> dict:
    """Config overrides per architecture: CPU, the size, batches small enough for a 2-core machine."""
    base = {"model.device": "cpu", "sampling.num_per_prompt": 2, "ranking.top_k": 1, "prompts.train": ["a cat", "a dog"],
            "eval.clip_model": None, "eval.every": 0, "reward": {"name": "brightness"}}  # fmt: skip
    if kind == "toy":
        assets = ROOT / "raft_diffusion/diffusion/toyworld/assets"
        reward = {"clip_model": str(assets / "clip"), "clip_pretrained": None, "weights": str(assets / "aesthetic_head.safetensors")}
        return {**base, "model.pretrained": str(assets / "sd"), "sampling.batch_size": 16, "sampling.height": 32, "sampling.width": 32,
                "train.batch_size": 8, "reward": {"name": "aesthetic", "kwargs": reward}}  # fmt: skip
    if kind == "tiny":
        return {**base, "model.pretrained": "tiny", "sampling.batch_size": 16, "train.batch_size": 4}
    return {**base, "model.dtype": dtype, "sampling.batch_size": 2, "sampling.height": size, "sampling.width": size,
            "train.batch_size": 1, "train.lora_rank": 16, "train.lora_alpha": 16}  # fmt: skip


def make_cfg(kind, folder, size, dtype="float32"):
    from raft_diffusion.diffusion.config import config_from_dict

    over = settings(kind, size, dtype)
    if folder is not None:
        over["model.pretrained"] = str(folder)
    data = {}
    for key, value in over.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(data)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(kind: str, folder: str | None, size: int, phase: str, with_rss: bool = True, dtype: str = "float32", need: int = 0) -> dict:
    """In this (fresh) process: build what ``phase`` needs with zero weights, run it once under the profiler's memory
    tracking (the peak of the bytes the phase's tensors hold: the quantity the planner estimates) and, with
    ``with_rss``, once more measuring the resident set's growth (a cross-check that also sees memory outside torch's
    allocator: oneDNN scratch buffers, glibc's own blocks)."""
    import torch

    from raft_diffusion.diffusion import finetune as ft
    from raft_diffusion.diffusion.plan import meta_pipeline, pipeline_folder, reward_model
    from raft_diffusion.diffusion.task import loss_settings

    torch.set_num_threads(1)
    if need and need + 3 * 2**30 > _mem_available():  # checked once this process holds the lock: the memory is ours
        raise SystemExit(f"its weights ({need / 2**30:.1f} GiB in {dtype}) and 3 GiB do not fit the free memory ({_mem_available() / 2**30:.1f} GiB)")
    cfg = make_cfg(kind, folder, size, dtype)
    from raft_diffusion.diffusion.families import detect_family
    from raft_diffusion.diffusion.pipeline import resolve_dtype

    root = pipeline_folder(cfg.model.pretrained)
    family = detect_family(str(root), cfg.model.family)
    dtype = resolve_dtype(cfg.model.dtype, "cpu")
    pipe = meta_pipeline(root, family, dtype)
    for m in pipe.components.values():  # every component (the pipeline's device is its modules')
        if isinstance(m, torch.nn.Module):
            m.to_empty(device="cpu")
            with torch.no_grad():
                for t in [*m.parameters(), *m.buffers()]:
                    t.zero_()
    den = family.denoiser(pipe)
    reward = None
    if phase == "decode + score" and reward_model(cfg.reward)[0].forward is not None:
        from raft_diffusion.diffusion.task import load_reward

        reward = load_reward(cfg.reward, "cpu", torch.float32)
    if phase in ("sample", "train"):  # a run adds the LoRA before its first sampling: every denoiser pass goes through it
        targets = cfg.train.target_modules or (list(family.lora_targets) if family.name == "sd" else family.default_lora_targets(den))
        family.add_lora(den, rank=cfg.train.lora_rank, alpha=cfg.train.lora_alpha, targets=targets)
        for p in den.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    s = cfg.sampling
    size_px = s.height or (den.config.sample_size * pipe.vae_scale_factor)
    c, h, w = family.latent_shape(pipe, size_px, size_px)
    prompts = ["a photo of a cat"] * len(cfg.load_prompt_sets()[0])
    cfg_on = s.guidance_scale > 1
    embeds = None
    if phase != "encode prompts":  # conditioning of the right shapes, made before the measurement
        with torch.no_grad():
            embeds = family.encode_prompts(pipe, prompts[:1], None, cfg_on)
    latents = torch.zeros(s.batch_size, c, h, w)

    def run():
        if phase == "encode prompts":
            with torch.no_grad():
                return family.encode_prompts(pipe, prompts, None, cfg_on)
        if phase == "sample":
            return family.sample(pipe, embeds, [0] * s.batch_size, list(range(s.batch_size)), steps=2, guidance=s.guidance_scale,
                                 height=size_px, width=size_px)  # fmt: skip
        if phase == "decode + score":
            images = family.decode(pipe, latents)
            return reward(images, ["a cat"] * len(images)) if reward is not None else images
        rows = cfg.train.batch_size
        family_kw = {} if family.name == "sd" else {"family": family, "loss_settings": loss_settings(cfg.train)}
        emb = embeds.per_prompt["prompt_embeds"][[0] * rows] if family.name == "sd" else embeds[[0] * rows]
        return ft.train_unet(pipe, latents[:rows].expand(rows, c, h, w).clone(), emb, steps=2, batch_size=rows, learning_rate=1e-4,
                             progress=False, **family_kw)  # fmt: skip

    import gc
    import resource

    gc.collect()
    allocated, total = allocator_peak(run, split=True)  # the first call: what the planner's single pass sees
    rss = None
    if with_rss:  # second call (the first was the warm-up): the resident set's growth
        gc.collect()
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        out = run()
        rss = _status("VmHWM") - before
        del out
    u = resource.getrusage(resource.RUSAGE_SELF)
    return {"measured": allocated, "with_scratch": total, "rss": rss, "cpu_s": u.ru_utime + u.ru_stime, "maxrss": u.ru_maxrss * 1024}


def allocator_peak(fn, *, split: bool = False):
    """Peak bytes held by the tensors ``fn()`` allocates, from the allocation and free events that torch's CPU
    allocator reports to the profiler (``profile_memory=True``): at each event, the bytes allocated so far in the
    call minus those freed. Blocks that existed before (weights) are not counted, as in the planner; this sees every
    allocation, also the buffers that kernels make and free internally (which a dispatch mode cannot see).

    With ``split``: ``(tensors, total)``: ``total`` is that peak, ``tensors`` the peak without the blocks that are freed
    before the top-level operator that made them returns (a kernel's scratch: oneDNN's reordered inputs and weights,
    im2col columns), i.e. of the tensors that operators hand back, the quantity the planner follows."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = []  # (time, bytes, ptr, end of the top-level operator around it)
    stack = [(node, node) for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, top = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr, top.end_time_ns))
        stack.extend((child, top) for child in node.children)
    events.sort(key=lambda e: e[0])
    # pair each free with its allocation (by address: a freed address is soon reused, so a block is its allocation
    # event's index, not its address); a block freed before its top-level operator ended is scratch
    block_of, freed_inside, pairs = {}, set(), []
    for i, (t, n, ptr, _) in enumerate(events):
        if n > 0:
            block_of[ptr] = i
            pairs.append(i)
        elif ptr in block_of:
            j = block_of.pop(ptr)
            if t <= events[j][3]:
                freed_inside.add(j)
            pairs.append(j)
        else:
            pairs.append(None)  # a block from before the call
    live = peak = kept = kept_peak = 0
    for (_, n, _, _), j in zip(events, pairs):
        if j is None:
            continue
        live += n
        peak = max(peak, live)
        if j not in freed_inside:
            kept += n
            kept_peak = max(kept_peak, kept)
    return (kept_peak, peak) if split else peak


def planned(kind: str, folder, size: int, dtype: str = "float32") -> dict:
    import torch

    from raft_diffusion.diffusion.plan import MemoryPlanner

    cfg = make_cfg(kind, folder, size, dtype)
    planner = MemoryPlanner(cfg, torch.device("cpu"))
    st = planner.base_settings()
    pool = planner.pool_bytes()
    ph = {p.name: p for p in planner.phases(st)}
    return {
        "encode prompts": ph["encode prompts"].activations,
        "sample": ph["sample"].activations - pool,
        "decode + score": ph["decode + score"].activations - pool,
        "train": ph["train"].activations - pool + ph["train"].optimizer,
        "_weights": {n: b for n, b in planner.components.items()},
    }


def _run_measure(kind, folder, size, phase, big, rss=True, dtype="float32", need=0) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, phase, "--size", str(size), "--dtype", dtype, "--need", str(need)]
    cmd += ["--folder", str(folder)] if folder else []
    cmd += [] if rss else ["--no-rss"]
    if big and LOCK.exists():
        cmd = ["flock", str(LOCK), *cmd]
    # a fixed mmap threshold: glibc then serves every allocation of 64 KiB or more (any real tensor) by mmap and returns it
    # on free, so the resident set follows the live tensors (its default raises the threshold after each free and
    # keeps freed blocks in the heap, which hides a warmed-up phase's allocations)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def presets(tmp: Path) -> None:
    """The planner's figures for the shipped GPU presets, on CUDA, each model's published configs written as a
    config-only folder (the hub is not reachable here)."""
    from raft_diffusion.diffusion.config import load_config
    from raft_diffusion.diffusion.plan import plan_report

    print("\n== the shipped GPU presets (planned for CUDA) ==")
    for name, kind in (("sd15_aesthetic_512", "sd15"), ("sdxl_aesthetic_1024", "sdxl"), ("sd35m_pickscore_512", "sd35m-t5"),
                       ("flux1_dev_hpsv2_512", "flux"), ("qwen_image_aesthetic_1024", "qwen-image"),
                       ("flux2_klein_base4b_aesthetic_1024", "flux2-klein"), ("z_image_aesthetic_1024", "z-image"),
                       ("flux2_dev_aesthetic_1024", "flux2")):  # fmt: skip
        folder = write_config_folder(kind, tmp)
        cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"model.pretrained={folder}", "model.device=cuda"])
        print(f"\n-- configs/{name}.yaml\n" + plan_report(cfg, None), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "toy", "sd15", "sdxl:64", "sd35m:64"],
                    help="architectures, each optionally with its image size (sdxl:64); default size --size")  # fmt: skip
    ap.add_argument("--size", type=int, default=128, help="image size of the SD 1.5 / SDXL / SD3.5 architectures")
    ap.add_argument("--measure", nargs=2, metavar=("KIND", "PHASE"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--need", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--no-presets", action="store_true", help="skip the presets' figures")
    ap.add_argument("--presets-only", action="store_true", help="only the presets' figures")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="weights of the SD 1.5 / SDXL / SD3.5 architectures (bf16 convolutions are ~30x slower on CPUs without AVX-512)",
    )
    ap.add_argument("--rss", action="store_true", help="also measure the resident set's growth (a second run of each phase)")
    ap.add_argument("--no-rss", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--measurements", type=Path, help="a JSON file that keeps the measurements (reused when present: the "
                    "planner's side can then be rerun in seconds)")  # fmt: skip
    args = ap.parse_args()
    if args.measure:
        print(
            json.dumps(measure(args.measure[0], args.folder, args.size, args.measure[1], with_rss=not args.no_rss, dtype=args.dtype, need=args.need))
        )
        return
    import resource

    errors = []
    saved = json.loads(args.measurements.read_text()) if args.measurements is not None and args.measurements.is_file() else {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-plan-"))
    if args.presets_only:
        presets(tmp)
        return
    print("planned: the planner's activations (+ AdamW state for train) on the CPU; measured: peak of the tensors the phase")
    print("allocates (torch's CPU allocator); +scratch: with the blocks kernels free before returning; RSS: resident set growth")
    print(f"{'model':<10}{'phase':<16}{'planned MiB':>12}{'measured MiB':>14}{'ratio':>7}{'+scratch':>10}{'RSS MiB':>9}{'CPU s':>7}")
    for spec in args.models:
        kind, _, size = spec.partition(":")
        size = int(size or args.size)
        label = kind if kind in ("tiny", "toy") else f"{kind} {size}"
        big = kind in ("sd15", "sdxl", "sd35m")
        folder = write_config_folder(kind, tmp) if big else None
        plan = planned(kind, folder, size, args.dtype)
        weights = plan.pop("_weights")
        need = sum(weights.values())
        if big and need + 3 * 2**30 > _mem_available() and not LOCK.exists():  # under the lock the child checks
            print(
                f"{label:<10}skipped: its weights ({need / 2**30:.1f} GiB in {args.dtype}) and 3 GiB do not fit the free memory "
                f"({_mem_available() / 2**30:.1f} GiB)",
                flush=True,
            )
            continue
        for phase in PHASES:
            key = f"{kind}/{size}/{phase}" if (args.dtype == "float32" or not big) else f"{kind}/{size}/{args.dtype}/{phase}"
            m = saved.get(key)
            if m is None or (args.rss and m.get("rss") is None):
                m = _run_measure(kind, folder, size, phase, big, rss=args.rss, dtype=args.dtype, need=need if big else 0)
                if args.measurements is not None and "error" not in m:
                    saved[key] = m
                    args.measurements.write_text(json.dumps(saved, indent=1))
            if "error" in m:
                print(f"{label:<10}{phase:<16}{plan[phase] / 2**20:>12.1f}{'failed':>14}   {m['error'][:100]}", flush=True)
                continue
            ratio = plan[phase] / max(m["measured"], 1)
            rss = "-" if m["rss"] is None else f"{m['rss'] / 2**20:.1f}"
            note = ""
            if max(plan[phase], m["measured"]) < RESOLUTION:
                note = "   under 1 MiB: not scored"
            else:
                errors.append(abs(ratio - 1))
            print(
                f"{label:<10}{phase:<16}{plan[phase] / 2**20:>12.1f}{m['measured'] / 2**20:>14.1f}{ratio:>7.2f}"
                f"{m['with_scratch'] / 2**20:>10.1f}{rss:>9}{m['cpu_s']:>7.0f}{note}",
                flush=True,
            )
    if not args.no_presets:
        presets(tmp)
    usage = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    print(f"\nCPU seconds (this process and its children): {cpu:.0f}; peak RSS of a child: {usage[1].ru_maxrss / 2**20:.2f} GiB")
    print(f"plan_error_max: {max(errors, default=float('nan')):.3f}")


if __name__ == "__main__":
    main()
