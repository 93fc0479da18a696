"""kohya / A1111 / ComfyUI LoRA key conventions per model family (what ``raft-diffusion export --format kohya`` writes).

Every kohya-style loader computes a module's update as ``lora_up @ lora_down * alpha / rank``. The run's LoRA is a
set of peft modules (``A``, ``B``, and the scale peft applied: ``lora_alpha / r``); each is written under the name
kohya's own training scripts give that module:

- **SD 1.x/2.x** (``sd``): kohya's sd-scripts train these on a UNet with diffusers' module names, so the name is
  ``lora_unet_`` + the diffusers path with ``_`` for ``.`` (``lora_unet_down_blocks_1_attentions_0_..._to_q``).
- **SDXL** (``sdxl``): sd-scripts train SDXL on the original (SGM) UNet, ``sdxl_original_unet``, whose module
  paths are ``input_blocks.N.M`` / ``middle_block.M`` / ``output_blocks.N.M`` with the LDM names inside a resnet
  (``in_layers.2`` for ``conv1``, ``emb_layers.1`` for ``time_emb_proj``...). The file uses those
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``): what sd-scripts write, what ComfyUI maps for
  SDXL, and what diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` reads back.
- **FLUX.1** (``flux``): sd-scripts' ``networks/lora_flux.py`` names the modules of Black Forest Labs' original
  model: ``lora_unet_double_blocks_N_img_attn_qkv`` is ONE fused layer for diffusers' ``to_q``, ``to_k``,
  ``to_v``; ``single_blocks_N_linear1`` fuses q, k, v and the MLP input. A fused layer is written exactly: the
  members' down matrices stacked (rank = the sum of theirs) and a block-diagonal up matrix, so ``up @ down`` is
  the members' updates stacked; a member the LoRA does not cover gets zero blocks. diffusers'
  ``_convert_kohya_flux_lora_to_diffusers`` recognises this block structure and splits it back exactly.
- **FLUX.2** (``flux2-klein``): the same double-block names (``img_attn_qkv`` fuses ``to_q``/``to_k``/``to_v`` the
  same way; the MLPs are ``ff.linear_in``/``linear_out``); diffusers keeps a single block's input fused already
  (``attn.to_qkv_mlp_proj`` is ``single_blocks_N_linear1``, ``attn.to_out`` is ``linear2``); the embedders and the
  final layer have the names ``_convert_kohya_flux2_lora_to_diffusers`` maps (``img_in``, ``txt_in``, ``time_in_*``,
  ``final_layer_linear``). The modulation layers have no name that reader maps: refused.
- **Qwen-Image** (``qwen-image``): musubi-tuner (kohya's trainer for it) names the transformer's modules as diffusers
  does, so the name is ``lora_unet_`` + the diffusers path with ``_`` for ``.``
  (``lora_unet_transformer_blocks_0_attn_to_q``); diffusers' ``_convert_non_diffusers_qwen_lora_to_diffusers`` reads
  it back, and ComfyUI loads it.
- **SD3** is refused (:class:`KohyaUnsupported`): see :func:`kohya_names`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.errors import UserError

PREFIX = "lora_unet_"


class KohyaUnsupported(UserError):
    """This family's LoRA has no faithful kohya file here; the message says what to use instead."""


# --- SDXL: diffusers UNet paths -> the original (SGM) UNet's -----------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def sgm_unet_pairs(cfg) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs of a UNet2DConditionModel with one ``layers_per_block`` (SD 1.x, 2.x
    and SDXL: the original UNet numbers its blocks the same way for all of them)."""
    lpb = cfg["layers_per_block"]
    if not isinstance(lpb, int):
        raise UserError(f"the UNet has per-block layers_per_block {lpb}: the original-layout names need one value")
    n = len(cfg["down_block_types"])
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]  # fmt: skip
    for i in range(n):
        for j in range(lpb):  # down block i, layer j: input block 1 + i * (lpb + 1) + j
            k = 1 + i * (lpb + 1) + j
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.")]  # fmt: skip
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (lpb + 1)}.0.op."))
        for j in range(lpb + 1):  # up block i, layer j: output block i * (lpb + 1) + j
            k = i * (lpb + 1) + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.")]  # fmt: skip
        if i < n - 1:  # the upsampler follows the block's last resnet (and its attention, if any)
            slot = 2 if "CrossAttn" in cfg["up_block_types"][i] else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (lpb + 1) + lpb}.{slot}."))
    return pairs


def to_sgm(key: str, pairs: list[tuple[str, str]]) -> str | None:
    """A diffusers UNet parameter or module path under the original names (None: no counterpart)."""
    dotted = key + "."
    for old, new in pairs:
        if dotted.startswith(old):
            rest = dotted[len(old) :]
            if ".resnets." in old or old.startswith("mid_block.resnets"):
                for a, b in _RESNET.items():
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a) :]
                        break
            return (new + rest).rstrip(".")
    return None


# --- FLUX.1: diffusers FluxTransformer2DModel paths -> Black Forest Labs' names ---------------------------------

_FLUX_ATTN = {  # the double blocks' attention: the same diffusers names in FLUX.1 and FLUX.2; members in fused order
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
}
_FLUX_DOUBLE = {  # transformer_blocks.N.<member> -> double_blocks_N_<name>
    **_FLUX_ATTN,
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_FLUX_SINGLE = {  # single_transformer_blocks.N.<member> -> single_blocks_N_<name>
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}


_FLUX2_DOUBLE = {  # FLUX.2: the same names; its MLPs are SwiGLU ff.linear_in / linear_out
    **_FLUX_ATTN,
    "img_mlp_0": ("ff.linear_in",),
    "img_mlp_2": ("ff.linear_out",),
    "txt_mlp_0": ("ff_context.linear_in",),
    "txt_mlp_2": ("ff_context.linear_out",),
}
_FLUX2_SINGLE = {  # diffusers keeps FLUX.2's single-block input fused (to_qkv_mlp_proj): one layer each way
    "linear1": ("attn.to_qkv_mlp_proj",),
    "linear2": ("attn.to_out",),
}
_FLUX2_OUTSIDE = {  # layers outside the blocks that diffusers' kohya FLUX.2 reader maps
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "proj_out": "final_layer_linear",
}
_TABLES = {"flux": (_FLUX_DOUBLE, _FLUX_SINGLE, {}), "flux2-klein": (_FLUX2_DOUBLE, _FLUX2_SINGLE, _FLUX2_OUTSIDE)}


def flux_groups(modules: list[str], family: str = "flux") -> dict[str, tuple[str, ...]]:
    """kohya name -> the diffusers modules it fuses (in order), for every block a LoRA module belongs to (``family``
    ``flux`` or ``flux2-klein``). A module without a name diffusers' kohya reader maps back is a KohyaUnsupported error."""
    double, single, outside = _TABLES[family]
    groups: dict[str, tuple[str, ...]] = {}
    for module in modules:
        if module in outside:
            groups[PREFIX + outside[module]] = (module,)
            continue
        parts = module.split(".")
        table, kind = {"transformer_blocks": (double, "double"), "single_transformer_blocks": (single, "single")}.get(parts[0], (None, None))
        member = ".".join(parts[2:])
        hit = [name for name, members in (table or {}).items() if member in members]
        if not hit:
            raise KohyaUnsupported(
                f"the LoRA covers {module!r}, which has no kohya {'FLUX.2' if family == 'flux2-klein' else 'FLUX'} name diffusers "
                "reads with its alpha (kohya FLUX files name double_blocks / single_blocks layers): use --format diffusers, "
                "which ComfyUI and diffusers load"
            )
        block = parts[1]
        name = f"{PREFIX}{kind}_blocks_{block}_{hit[0]}"
        prefix = f"{parts[0]}.{block}."
        groups[name] = tuple(prefix + m for m in table[hit[0]])
    return groups


# --- the state dict ----------------------------------------------------------------------------------------------


def _plain(name: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": a.contiguous(), f"{name}.lora_up.weight": b.contiguous(),
            f"{name}.alpha": torch.tensor(scale * a.shape[0], dtype=torch.float32)}  # fmt: skip


def _fused(name: str, members: tuple[str, ...], lora, shapes: Callable[[str], tuple[int, int]]) -> dict[str, torch.Tensor]:
    """One fused layer: down = the members' A stacked, up = their B on the block diagonal, one common scale (a
    member with another scale has it folded into its B), zero blocks of the same rank for members not covered."""
    present = [m for m in members if m in lora.down]
    ranks = {lora.down[m].shape[0] for m in present}
    if len(ranks) != 1:
        raise KohyaUnsupported(f"{name}: the fused members have ranks {sorted(ranks)}: a kohya fused layer needs one rank; use --format diffusers")
    r, scale = ranks.pop(), lora.scale[present[0]]
    downs, ups = [], []
    for m in members:
        out_dim, in_dim = shapes(m)
        if m in lora.down:
            downs.append(lora.down[m].float())
            ups.append(lora.up[m].float() * (lora.scale[m] / scale))
        else:
            downs.append(torch.zeros(r, in_dim))
            ups.append(torch.zeros(out_dim, r))
    dtype = lora.down[present[0]].dtype
    return _plain(name, torch.cat(downs).to(dtype), torch.block_diag(*ups).to(dtype), scale)


def kohya_names(family: str) -> None:
    """Refuse the families whose kohya file cannot be written and checked here (one line: why, and what to use)."""
    if family == "sd3":
        raise KohyaUnsupported(
            "no kohya export for SD3: kohya's SD3 LoRAs name the original MMDiT's fused joint_blocks qkv layers and "
            "diffusers has no reader for them to check a file against; ComfyUI and diffusers load SD3 LoRAs in "
            "diffusers format directly: use --format diffusers (or peft)"
        )
    if family not in ("sd", "sdxl", "flux", "flux2-klein", "qwen-image"):
        raise KohyaUnsupported(f"no kohya naming for model family {family!r}: use --format diffusers")


def kohya_state_dict(lora, family: str, *, unet_config=None, module_shape=None) -> dict[str, torch.Tensor]:
    """The kohya tensors of ``lora`` (an ``export.Lora``) for ``family``.

    ``unet_config`` (SDXL: the UNet's config) maps paths to the original names; ``module_shape(module) -> (out,
    in)`` (FLUX) sizes the zero blocks of fused members the LoRA does not cover.
    """
    kohya_names(family)
    out: dict[str, torch.Tensor] = {}
    if family in ("flux", "flux2-klein"):
        if module_shape is None:
            raise ValueError("FLUX kohya export needs module_shape for the fused layers")
        for name, members in sorted(flux_groups(lora.modules, family).items()):
            if len(members) == 1:
                m = members[0]
                out.update(_plain(name, lora.down[m], lora.up[m], lora.scale[m]))
            else:
                out.update(_fused(name, members, lora, module_shape))
        return out
    pairs = sgm_unet_pairs(unet_config) if family == "sdxl" else None
    for module in lora.modules:
        path = module
        if pairs is not None:
            path = to_sgm(module, pairs)
            if path is None:
                raise KohyaUnsupported(f"the LoRA covers {module!r}, which has no original-layout SDXL name: use --format diffusers")
        out.update(_plain(PREFIX + path.replace(".", "_"), lora.down[module], lora.up[module], lora.scale[module]))
    return out
