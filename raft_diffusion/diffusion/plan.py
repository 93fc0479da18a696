"""Memory planner: what a config needs on the accelerator, phase by phase, before any weight is loaded.

RAFT's phases are separate, and each needs only some of the pipeline:

    encode prompts   the text encoders (once per run)
    sample           the denoiser (no gradients; classifier-free guidance doubles the batch where the pipeline runs
                     its two halves as one call)
    decode + score   the VAE, the reward model (and the eval CLIP when ranking uses its embeddings)
    train            the denoiser with LoRA (or all weights): fp32 trainable weights, gradients (and their flat copy,
                     ``core.gradsum``), AdamW moments
    evaluate         sample + decode + score of the held-out batches

How the estimate is made (no weights, no data):

1. The pipeline's components are built from their configs on the meta device (``model_index.json`` of a
   pipeline folder, or of a hub snapshot that is in the local HF cache); the reward's CLIP from its open_clip
   config. Parameter (and buffer) bytes are counted exactly for the weights dtype.
2. Each phase's work runs once on meta tensors through the family's own code (``encode_prompts``,
   ``training_loss`` forward for a sampling step, ``decode``, the reward CLIP's ``encode_image``, and a
   ``training_loss`` forward + backward with the LoRA), under a dispatch mode that follows every tensor the
   operators create and free (:class:`LiveBytes`): the activation estimate is the peak of the live bytes, as a
   caching allocator without fragmentation would hold them. Attention is counted as a fused SDPA kernel
   (``memory.fused_attention``), which CUDA and CPU both use.
3. Peak of a phase = the weights resident in it (``model.offload``) + optimizer state (train) + activations.

Not counted: the CUDA context (~0.3-0.5 GiB), allocator fragmentation, cuDNN/cuBLAS workspaces.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..core.errors import UserError
from .config import parse_size
from .families.memory import count_parameters, fused_attention

PHASES = ("encode prompts", "sample", "decode + score", "train", "evaluate")
OFFLOAD_MODES = ("none", "phases", "sequential")
_OPEN_CLIP_OF = {  # rewards whose model is a CLIP: the open_clip architecture it has
    "pickscore": "ViT-H-14",  # PickScore v1: a fine-tuned CLIP ViT-H/14
    "hpsv2": "ViT-H-14",  # HPSv2 / v2.1: the HPS-tuned ViT-H/14
}
SMALL_BYTES = 256 * 2**20  # pipelines up to this size are measured on zero-filled CPU weights (see MemoryPlanner)
_NO_MODEL = ("brightness", "saturation", "jpeg_compressibility", "jpeg_incompressibility")

log = logging.getLogger(__name__)


def gib(n: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{n / 2**30:.2f}"


def human(n: float) -> str:
    """Bytes as ``5.71 GiB`` or, under 1 GiB, ``37.2 MiB``."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# --- 1. live bytes on meta (or real) tensors ------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Follows every tensor storage that operators create while active: ``live`` bytes now, ``peak`` so far.

    A storage counts from the operator that creates it until it is freed (the last tensor and autograd's saved
    copy of it gone), views count once. Tensors that existed before (weights) are not counted, nor are views of them
    (``linear`` runs as ``t(weight)`` + ``addmm``: the transposed weight is the weight's storage, not new memory).
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, object] = {}

    def _track(self, t: torch.Tensor) -> None:
        import weakref

        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._refs:
            return
        n = storage.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)

        def freed(_, key=key, n=n):
            self.live -= n
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(storage, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # an output on an input's storage (a view such as ``aten.t`` of a Linear's weight, an in-place op) is no new
        # memory: it is either tracked already or existed before (a weight), and must not count
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self._track(t)
        return out


def peak_bytes(fn) -> int:
    """Peak live bytes of the tensors ``fn()`` creates (fused attention; weights not counted)."""
    with fused_attention(), LiveBytes() as m:
        out = fn()
        del out
    return m.peak


# --- 2. the pipeline and the reward on the meta device -----------------------------------------------------------


def pipeline_folder(pretrained: str, revision: str | None = None) -> Path:
    """The folder holding ``model_index.json`` and the component configs: a local folder, the tiny test
    pipelines, or a hub id's snapshot in the local HF cache (nothing is downloaded)."""
    from .pipeline import _looks_like_path
    from .task import resolve_pretrained

    name = resolve_pretrained(str(pretrained))
    if _looks_like_path(name):
        folder = Path(name).expanduser()
        if not (folder / "model_index.json").is_file():
            raise UserError(f"model folder {name!r} has no model_index.json: pass a diffusers pipeline folder (saved with save_pretrained)")
        return folder
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - not cached, or a bad id: the same advice
        raise UserError(
            f"the configs of {name!r} are not in the local HF cache ({type(err).__name__}): the planner reads no "
            "weights and never downloads; pass a local pipeline folder, or download the model once (hf download "
            f"{name} --include '*.json' '*.txt' '*.model') and rerun"
        ) from None
    if not (folder / "model_index.json").is_file():
        raise UserError(f"the cached snapshot of {name!r} has no model_index.json: download it (hf download {name})")
    return folder


@contextlib.contextmanager
def _quiet():
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d, t = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(d)
        tlog.set_verbosity(t)


def _empty(build, dtype):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        module = build()
    return module.to(dtype).requires_grad_(False).eval()


class ShapeTokenizer:
    """Stands in for a pipeline's tokenizer: all-zero ids of the padded length, without reading a vocabulary (the
    memory of the text encoders depends on the sequence length only)."""

    def __init__(self, model_max_length: int):
        self.model_max_length = int(model_max_length)

    def __call__(self, text, padding=None, max_length=None, return_tensors=None, **kwargs):
        from transformers import BatchEncoding

        n = 1 if isinstance(text, str) else len(text)
        ids = torch.zeros(n, int(max_length or self.model_max_length), dtype=torch.long)
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    added_tokens_encoder: dict = {}  # textual inversion looks here

    def tokenize(self, text, **kwargs):
        return []

    def batch_decode(self, ids, **kwargs):
        return [""] * len(ids)


def _shape_tokenizer(folder: Path, cls_name: str) -> ShapeTokenizer:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    default = 512 if "T5" in cls_name else 77
    length = config.get("model_max_length", default)
    return ShapeTokenizer(length if isinstance(length, int) and length < 100_000 else default)


def meta_pipeline(folder: Path, family, dtype: torch.dtype):
    """The family's pipeline with every model component built from its config on the meta device (the scheduler is
    the real one, tokenizers :class:`ShapeTokenizer` s; image processors and safety checkers are left out)."""
    from diffusers import ModelMixin
    from transformers import AutoConfig, PreTrainedModel

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    parts = {}
    with _quiet():
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
                continue
            lib, cls_name = spec
            if lib is None or cls_name is None or name in ("safety_checker", "feature_extractor", "image_encoder"):
                parts[name] = None
                continue
            cls = getattr(importlib.import_module(lib), cls_name)
            sub = folder / name
            if isinstance(cls, type) and issubclass(cls, ModelMixin):
                parts[name] = _empty(lambda cls=cls, sub=sub: cls.from_config(cls.load_config(sub)), dtype)
            elif isinstance(cls, type) and issubclass(cls, PreTrainedModel):
                config = AutoConfig.from_pretrained(sub)
                parts[name] = _empty(lambda cls=cls, config=config: cls._from_config(config), dtype)
            elif "Scheduler" in cls_name:
                parts[name] = cls.from_pretrained(folder, subfolder=name)
            elif "Tokenizer" in cls_name:  # a chat template (FLUX.2 [klein], Z-Image) needs the real one
                parts[name] = cls.from_pretrained(sub) if family.chat_template else _shape_tokenizer(sub, cls_name)
            else:
                parts[name] = None
        pipe_cls = family.pipeline_class()
        import inspect

        accepted = inspect.signature(pipe_cls.__init__).parameters
        if "requires_safety_checker" in accepted:
            parts["requires_safety_checker"] = False
        pipe = pipe_cls(**{k: v for k, v in parts.items() if k in accepted})
    return pipe


def _plain_tensors_to_cpu(module: torch.nn.Module) -> None:
    """Zero-filled CPU copies of the meta tensors that modules keep as plain attributes, neither parameters nor
    buffers (Qwen-Image's rotary tables): ``to_empty`` does not reach them."""
    for sub in module.modules():
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(sub, name, torch.zeros(value.shape, dtype=value.dtype))


def _text_encoder_on_meta(module) -> None:
    """A text encoder's forward on the meta device without its attention mask: transformers' causal-mask builders read
    the mask's values (``.item()``), which meta tensors do not have. The planner's stand-in tokenizer masks nothing,
    so the mask changes no shape; only the mask tensor itself (``[B, 1, L, L]`` booleans) goes uncounted. Without a
    mask, transformers' decoders (Qwen3, Mistral-3) look for packed sequences in the position ids' values: the forward
    runs with that check answering "none" (:func:`_no_packed_sequences`), as it would on real ids ``0..L-1``."""
    forward = module.forward

    def without_mask(*args, **kwargs):
        kwargs.pop("attention_mask", None)
        with _no_packed_sequences():
            return forward(*args, **kwargs)

    module.forward = without_mask


@contextlib.contextmanager
def _no_packed_sequences():
    """transformers' check for packed sequences, which reads the position ids' values, answering "none" while on."""
    import transformers.masking_utils as masking

    original = masking.find_packed_sequence_indices
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


@dataclass
class RewardModel:
    """A reward's model on the meta device: its modules' bytes and a forward on a batch of images."""

    label: str
    modules: list = field(default_factory=list)  # meta nn.Modules (fp32, as the task loads rewards)
    forward: object = None  # images [B, 3, H, W] (meta) -> anything; None = no model
    note: str = ""

    @property
    def nbytes(self) -> int:
        return sum(_module_bytes(m) for m in self.modules)


def _module_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _open_clip_meta(model_cfg: dict):
    import open_clip

    cfg = dict(model_cfg)
    cls = open_clip.CustomTextCLIP if "hf_model_name" in cfg.get("text_cfg", {}) else open_clip.CLIP
    return _empty(lambda: cls(**cfg), torch.float32)


def open_clip_model(clip_model, label: str) -> RewardModel:
    """An open_clip model (name, ``open_clip_config.json`` folder, or ``tiny``) on the meta device."""
    import open_clip

    spec = str(clip_model)
    if spec == "tiny":
        from .tiny import ensure_tiny_clip

        spec = str(ensure_tiny_clip())
    folder = Path(spec.removeprefix("local-dir:")).expanduser()
    if (folder / "open_clip_config.json").is_file():
        cfg = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))["model_cfg"]
    else:
        cfg = open_clip.get_model_config(spec.removeprefix("hf-hub:"))
        if cfg is None:
            return RewardModel(label, note=f"{label}: open_clip model {spec!r} unknown to the planner, not counted")
    model = _open_clip_meta(cfg)
    size = cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]

    def forward(images):
        x = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic")
        return model.encode_image(x)

    return RewardModel(label, [model], forward)


def _aesthetic_head():
    from reward_models.aesthetic import AestheticMLP

    return _empty(AestheticMLP, torch.float32)


def _same_clip(reward_cfg, clip_model, clip_pretrained) -> bool:
    """Whether a single reward's open_clip backbone is the eval CLIP (same model and pretrained tag)."""
    if not isinstance(reward_cfg, dict) or reward_cfg.get("name") not in ("aesthetic", "clip_score"):
        return False
    kwargs = dict(reward_cfg.get("kwargs") or {})
    if kwargs.get("backend", "open_clip") != "open_clip":
        return False
    return (kwargs.get("clip_model", "ViT-L-14-quickgelu"), kwargs.get("clip_pretrained", "openai")) == (clip_model, clip_pretrained)


def reward_model(reward_cfg) -> list[RewardModel]:
    """The models of a reward config (a mix: each component's)."""
    if isinstance(reward_cfg, str):
        reward_cfg = {"name": reward_cfg}
    if "mix" in reward_cfg:
        return [m for item in reward_cfg["mix"] for m in reward_model(item if isinstance(item, dict) else {"name": item})]
    name, kwargs = reward_cfg.get("name"), dict(reward_cfg.get("kwargs") or {})
    if name in _NO_MODEL:
        return [RewardModel(str(name))]
    if name in ("aesthetic", "clip_score"):
        clip = kwargs.get("clip_model", "ViT-L-14-quickgelu")
        if kwargs.get("backend") == "transformers" and clip == "ViT-L-14-quickgelu":
            clip = "ViT-L-14"
        model = open_clip_model(clip, str(name))
        if name == "aesthetic" and model.forward is not None:
            model.modules.append(_aesthetic_head())
        return [model]
    if name in _OPEN_CLIP_OF:
        model = open_clip_model(_OPEN_CLIP_OF[name], str(name))
        model.note = f"{name}: counted as open_clip {_OPEN_CLIP_OF[name]} (its architecture)"
        return [model]
    return [RewardModel(str(name), note=f"reward {name!r}: no architecture known to the planner, its model (if any) is not counted")]


# --- 3. the estimate -------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One phase's figures (bytes): resident weights, optimizer state, activation estimate; ``peak`` is their sum."""

    name: str
    weights: int
    optimizer: int
    activations: int
    holds: str  # which components are resident

    @property
    def peak(self) -> int:
        return self.weights + self.optimizer + self.activations


@dataclass
class Settings:
    """The config values the estimate depends on (what the advice varies)."""

    offload: str = "none"
    sample_batch: int = 1
    train_rows: int = 1
    gradient_checkpointing: bool = False
    vae_slicing: bool = False
    optimizer: str = "adamw"

    def overrides(self, base: Settings) -> list[str]:
        """The config overrides that turn ``base`` into these settings."""
        out = []
        if self.offload != base.offload:
            out.append(f"model.offload={self.offload}")
        if self.vae_slicing != base.vae_slicing:
            out.append("model.vae_slicing=true")
        if self.gradient_checkpointing != base.gradient_checkpointing:
            out.append("train.gradient_checkpointing=true")
        if self.sample_batch != base.sample_batch:
            out.append(f"sampling.batch_size={self.sample_batch}")
        if self.train_rows != base.train_rows:
            out.append(f"train.chunk_size={self.train_rows}")
        if self.optimizer != base.optimizer:
            out.append(f"train.optimizer={self.optimizer}")
        return out


class MemoryPlanner:
    """Builds the meta pipeline and reward once; :meth:`phases` evaluates any :class:`Settings` (activation
    measurements are cached by batch size)."""

    def __init__(self, cfg, device: str | torch.device = "cuda", *, small_on_cpu: bool = True):
        from .families import detect_family
        from .pipeline import resolve_dtype

        self.cfg = cfg
        self.device = torch.device(device)
        folder = pipeline_folder(cfg.model.pretrained, cfg.model.revision)
        self.family = detect_family(str(folder), cfg.model.family)
        dtype = cfg.model.dtype
        if dtype == "auto" and self.device.type == "cuda":
            dtype = self.family.cuda_dtype if self.family.name != "sd" else "fp16"
        self.dtype = resolve_dtype(dtype, "cuda" if self.device.type == "meta" else self.device)
        self.pipe = meta_pipeline(folder, self.family, self.dtype)
        if self.family.name == "qwen-image":
            # the stand-in tokenizer has no text to measure and returns the pipeline's whole template budget (1024
            # tokens): count every prompt at model.max_sequence_length tokens instead, the most a run keeps of one
            self.pipe.tokenizer_max_length = cfg.model.max_sequence_length or self.family.max_sequence_length
        self.denoiser = self.family.denoiser(self.pipe)
        s = cfg.sampling
        self.height, self.width = self.family.image_size(self.pipe, s.height, s.width)
        # component bytes (weights dtype); text encoders by name
        self.components = {name: _module_bytes(m) for name, m in self.pipe.components.items() if isinstance(m, torch.nn.Module)}
        self.text_encoders = [n for n in self.components if n.startswith("text_encoder")]
        self.rewards = reward_model(cfg.reward)
        uses_clip = bool(cfg.eval.clip_model) and (
            cfg.eval.every or cfg.ranking.diversity_weight or cfg.ranking.novelty_weight or cfg.ranking.prompt_match
        )
        self.eval_clip = open_clip_model(cfg.eval.clip_model, "eval.clip_model") if uses_clip else None
        if self.eval_clip is not None and _same_clip(cfg.reward, cfg.eval.clip_model, cfg.eval.clip_pretrained):
            # reward_models caches backbones: the reward's CLIP serves as the eval CLIP, its weights count once
            self.eval_clip.modules, self.eval_clip.note = [], "eval.clip_model is the reward's CLIP (loaded once, counted once)"
        # what trains
        t = cfg.train
        if t.method == "full":
            self.trainable = count_parameters(self.denoiser)
        else:
            targets = t.target_modules or (
                list(self.family.lora_targets) if self.family.name == "sd" else self.family.default_lora_targets(self.denoiser)
            )
            with _quiet():
                self.trainable = self.family.add_lora(self.denoiser, rank=t.lora_rank, alpha=t.lora_alpha, targets=targets)
        for p in self.denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp32 master weights, as train_unet upcasts them
        self.denoiser_bytes = _module_bytes(self.denoiser)
        self._cache: dict[tuple, int] = {}
        self._embeds = None
        # a small pipeline runs its measurements on zero-filled CPU weights: the same operators and tensors as on
        # the meta device (whose Python shape functions cost ~0.3 ms an operator), in a fraction of the time
        modules = [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]
        modules += [m for r in [*self.rewards, self.eval_clip] if r is not None for m in r.modules]
        self.work = torch.device("meta")
        if small_on_cpu and sum(_module_bytes(m) for m in modules) <= SMALL_BYTES:
            for m in modules:
                m.to_empty(device="cpu")
                with torch.no_grad():
                    for t in [*m.parameters(), *m.buffers()]:
                        t.zero_()
                _plain_tensors_to_cpu(m)
            self.work = torch.device("cpu")
        if self.work.type == "meta":
            for name in self.text_encoders:
                _text_encoder_on_meta(self.pipe.components[name])
            self.family.encode_on_meta(self.pipe)

    # -- measurements (cached) --------------------------------------------------------------------
    def _measure(self, key, fn) -> int:
        if key not in self._cache:
            self._cache[key] = peak_bytes(fn)
        return self._cache[key]

    def _prompts(self, n: int) -> list[str]:
        return ["a photo of a cat sitting on a wooden table"] * n

    def encode_activations(self) -> int:
        n = min(self.family.encode_batch_size, max(1, len(self._train_prompts())))
        cfg_on = self.cfg.sampling.guidance_scale > 1.0

        def run():
            with torch.no_grad():
                self._embeds = self.family.encode_prompts(self.pipe, self._prompts(n), None, cfg_on)

        return self._measure(("encode", n), run)

    def _train_prompts(self):
        try:
            return self.cfg.load_prompt_sets()[0] or [""]
        except UserError:
            return [""]

    def embeds(self):
        if self._embeds is None:
            with torch.no_grad():
                self._embeds = self.family.encode_prompts(self.pipe, self._prompts(1), None, self.cfg.sampling.guidance_scale > 1.0)
        return self._embeds

    def _latents(self, n: int) -> torch.Tensor:
        c, h, w = self.family.latent_shape(self.pipe, self.height, self.width)
        return torch.empty(n, c, h, w, device=self.work, dtype=torch.float32)

    def _rows(self, n: int):
        e = self.embeds()
        return e[[0] * n]

    def _guided(self) -> bool:
        """Whether sampling runs classifier-free guidance (a scale above 1 and negative conditioning to run it against)."""
        return self.cfg.sampling.guidance_scale > 1.0 and any(k.startswith("negative_") for k in self.embeds().shared)

    def _cfg_factor(self) -> int:
        """Rows per sample in one denoiser call: 2 where the family's pipeline batches guidance's two halves."""
        return 2 if self._guided() and self.family.cfg_in_one_batch else 1

    def _guidance_note(self) -> str:
        if not self._guided():
            return ""
        return " (x2 with guidance)" if self.family.cfg_in_one_batch else " (guidance: two calls)"

    def sample_activations(self, batch: int) -> int:
        rows = batch * self._cfg_factor()

        def run():
            with torch.no_grad():
                x0 = self._latents(rows)
                return self.family.training_loss(
                    self.pipe, self.denoiser, x0, self._rows(rows), [0] * rows,
                    noise=torch.zeros(x0.shape, device=self.work), generator=torch.Generator().manual_seed(0),
                )  # fmt: skip

        return self._measure(("sample", rows), run)

    def decode_activations(self, batch: int) -> int:
        def run():
            return self.family.decode(self.pipe, self._latents(batch))

        return self._measure(("decode", batch), run)

    def score_activations(self, batch: int) -> int:
        """The largest of the reward models' (and the eval CLIP's) peaks on a batch of decoded images."""
        key = ("score", batch)
        if key not in self._cache:
            models = [m for m in [*self.rewards, self.eval_clip] if m is not None and m.forward is not None]
            shape = (batch, 3, self.height, self.width)
            peaks = [peak_bytes(lambda m=m: m.forward(torch.zeros(shape, device=self.work))) for m in models]
            self._cache[key] = max(peaks, default=batch * 3 * self.height * self.width * 4)
        return self._cache[key]

    def train_activations(self, rows: int, checkpointing: bool) -> int:
        def run():
            d = self.denoiser
            if checkpointing:
                d.enable_gradient_checkpointing()
            d.train()
            try:
                x0 = self._latents(rows)
                loss = self.family.training_loss(
                    self.pipe, d, x0, self._rows(rows), [0] * rows,
                    noise=torch.zeros(x0.shape, device=self.work), generator=torch.Generator().manual_seed(0),
                ).sum()  # fmt: skip
                loss.backward()
            finally:
                d.eval()
                if checkpointing:
                    d.disable_gradient_checkpointing()
            grads = [p.grad for p in d.parameters() if p.grad is not None]
            for p in d.parameters():
                p.grad = None
            return grads  # the gradients count until the optimizer step

        return self._measure(("train", rows, checkpointing), run)

    def train_step_bytes(self, st: Settings) -> int:
        """A training step's peak besides the optimizer state: a pass's activations and gradients, or the moment
        ``core.gradsum`` flattens the gradients (``take_grads`` copies them into one vector while they are still
        set), whichever is larger; with several passes per step, their running sum (one more gradient-sized vector)
        stays for the whole step."""
        grads = 4 * self.trainable  # fp32 gradients of the trained weights
        passes = -(-max(1, self.cfg.train.batch_size) // max(1, st.train_rows))
        running = grads if passes > 1 else 0
        return max(self.train_activations(st.train_rows, st.gradient_checkpointing) + running, 2 * grads + running)

    # -- the phases -------------------------------------------------------------------------------
    def pool_bytes(self) -> int:
        """Kept samples' latents and images held during a stage (every sample when the pick needs the whole pool)."""
        cfg = self.cfg
        prompts = cfg.prompts.per_stage or len(self._train_prompts())
        per_prompt = cfg.sampling.num_per_prompt if (cfg.ranking.diversity_weight or cfg.ranking.novelty_weight) else cfg.ranking.top_k
        c, h, w = self.family.latent_shape(self.pipe, self.height, self.width)
        return prompts * per_prompt * 4 * (c * h * w + 3 * self.height * self.width)

    def phases(self, st: Settings) -> list[Phase]:
        te = sum(self.components[n] for n in self.text_encoders)
        vae = self.components.get("vae", 0)
        den = self.denoiser_bytes
        reward = sum(m.nbytes for m in self.rewards) + (self.eval_clip.nbytes if self.eval_clip else 0)
        optimizer = self.trainable * (2 if st.optimizer == "adamw8bit" else 8)  # AdamW's two moments per weight
        pool = self.pool_bytes()
        decode_batch = 1 if st.vae_slicing else st.sample_batch
        enc = self.encode_activations()
        samp = self.sample_activations(st.sample_batch)
        dec = self.decode_activations(decode_batch)
        score = self.score_activations(st.sample_batch)
        train = self.train_step_bytes(st)
        ds = max(dec, score)  # decode, then score: one after the other
        if st.offload == "none":
            w = te + vae + den + reward
            hold = "everything"
            return [
                Phase(PHASES[0], w, 0, enc, hold),
                Phase(PHASES[1], w, 0, samp + pool, hold),
                Phase(PHASES[2], w, 0, ds + pool, hold),
                Phase(PHASES[3], w, optimizer, train + pool, hold),
                Phase(PHASES[4], w, 0, max(samp, ds), hold),
            ]
        if st.offload == "phases":
            return [
                Phase(PHASES[0], te + vae + den, 0, enc, "text encoders, denoiser, VAE"),
                Phase(PHASES[1], vae + den, 0, samp + pool, "denoiser, VAE"),
                Phase(PHASES[2], vae + den + reward, 0, ds + pool, "denoiser, VAE, reward"),
                Phase(PHASES[3], vae + den, optimizer, train + pool, "denoiser, VAE"),
                Phase(PHASES[4], vae + den + reward, 0, max(samp, ds), "denoiser, VAE, reward"),
            ]
        # sequential: the denoiser leaves the device while the reward scores
        return [
            Phase(PHASES[0], te, 0, enc, "text encoders"),
            Phase(PHASES[1], den + vae, 0, samp + pool, "denoiser, VAE"),
            max(
                Phase(PHASES[2], den + vae, 0, dec + pool, "denoiser, VAE (decode)"),
                Phase(PHASES[2], vae + reward, 0, score + pool, "VAE, reward (score)"),
                key=lambda p: p.peak,
            ),
            Phase(PHASES[3], den + vae, optimizer, train + pool, "denoiser, VAE"),
            max(
                Phase(PHASES[4], den + vae, 0, max(samp, dec), "denoiser, VAE (sample, decode)"),
                Phase(PHASES[4], vae + reward, 0, score, "VAE, reward (score)"),
                key=lambda p: p.peak,
            ),
        ]

    def base_settings(self, offload: str | None = None) -> Settings:
        t, s = self.cfg.train, self.cfg.sampling
        mode = offload or self.cfg.model.offload
        return Settings(
            offload="none" if mode == "auto" else mode,
            sample_batch=s.batch_size,
            train_rows=min(t.chunk_size or t.batch_size, t.batch_size),
            gradient_checkpointing=t.gradient_checkpointing,
            vae_slicing=self.cfg.model.vae_slicing,
            optimizer=t.optimizer,
        )

    def peak(self, st: Settings) -> int:
        return max(p.peak for p in self.phases(st))

    def advice(self, budget: int, base: Settings) -> tuple[Settings | None, list[str]]:
        """The first settings (cheapest switches first) whose peak fits ``budget``, and the steps tried."""
        tried = []
        st = Settings(**vars(base))

        def fits():
            return self.peak(st) <= budget

        if fits():
            return st, tried
        steps = []
        if st.offload == "none":
            steps.append(("offload text encoders and the reward between phases", {"offload": "phases"}))
        if not st.vae_slicing:
            steps.append(("VAE slicing", {"vae_slicing": True}))
        if not st.gradient_checkpointing:
            steps.append(("gradient checkpointing", {"gradient_checkpointing": True}))
        for step_name, change in steps:
            for k, v in change.items():
                setattr(st, k, v)
            tried.append(step_name)
            if fits():
                return st, tried
        for attr, step_name in (("sample_batch", "smaller sampling batch"), ("train_rows", "smaller training chunks")):
            while getattr(st, attr) > 1:  # halve it until it fits or reaches 1
                setattr(st, attr, max(1, getattr(st, attr) // 2))
                if fits():
                    tried.append(step_name)
                    return st, tried
            if getattr(base, attr) > 1:
                tried.append(step_name)
        if st.offload != "sequential":
            st.offload = "sequential"
            tried.append("sequential offload")
            if fits():
                return st, tried
        if self.cfg.train.method == "full" and st.optimizer != "adamw8bit":
            st.optimizer = "adamw8bit"
            tried.append("8-bit AdamW")
            if fits():
                return st, tried
        return None, tried

    # -- output -----------------------------------------------------------------------------------
    def header(self, st: Settings) -> str:
        t = self.cfg.train
        comps = ", ".join(f"{n} {human(b)}" for n, b in self.components.items())
        rewards = ", ".join(f"{m.label} {human(m.nbytes)}" for m in self.rewards)
        if self.eval_clip:
            rewards += f", eval.clip_model {human(self.eval_clip.nbytes)}"
        lines = [
            f"model {self.cfg.model.pretrained} ({self.family.name}), weights {str(self.dtype).removeprefix('torch.')}, "
            f"{self.width}x{self.height} px, sampling batch {st.sample_batch}{self._guidance_note()}, "
            f"training rows per pass {st.train_rows}, {t.method} "
            + (f"rank {t.lora_rank} ({self.trainable:,} trainable weights)" if t.method == "lora" else f"({self.trainable:,} weights)")
            + f", gradient checkpointing {'on' if st.gradient_checkpointing else 'off'}, offload {st.offload}"
            + (", VAE slicing" if st.vae_slicing else "")
            + f", optimizer {st.optimizer}",
            f"weights: {comps}; reward: {rewards or 'none'}",
        ]
        notes = [m.note for m in self.rewards if m.note] + ([self.eval_clip.note] if self.eval_clip and self.eval_clip.note else [])
        return "\n".join(lines + [f"note: {n}" for n in notes])

    def table(self, st: Settings) -> str:
        phases = self.phases(st)
        big = max(p.peak for p in phases) >= 2**30
        unit, scale = ("GiB", 2**30) if big else ("MiB", 2**20)

        def f(n):
            return f"{n / scale:.2f}" if big else f"{n / scale:.1f}"

        rows = [f"{'phase':<16}{'weights':>10}{'optimizer':>11}{'activations':>13}{'peak ' + unit:>10}  resident"]
        for p in phases:
            rows.append(f"{p.name:<16}{f(p.weights):>10}{f(p.optimizer):>11}{f(p.activations):>13}{f(p.peak):>10}  {p.holds}")
        return "\n".join(rows)


def run_device(cfg, dist=None) -> torch.device:
    """The device a run's process uses (its GPU under accelerate / torchrun)."""
    from ..core.common import resolve_device

    if dist is not None and dist.enabled and cfg.model.device == "auto" and dist.device is not None:
        return torch.device(dist.device)
    return resolve_device(cfg.model.device)


def device_budget(cfg, device: torch.device) -> int | None:
    """``model.max_memory`` when set, else the CUDA device's total memory, else None (no limit known)."""
    if cfg.model.max_memory is not None:
        return parse_size(cfg.model.max_memory)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return None


def refusal(planner: MemoryPlanner, budget: int, base: Settings) -> str:
    """The one-line message when ``base`` does not fit ``budget``: the peak, the worst phase and the advice."""
    phases = planner.phases(base)
    worst = max(phases, key=lambda p: p.peak)
    fix, tried = planner.advice(budget, base)
    where = f"needs {human(worst.peak)} in phase '{worst.name}' (estimated) but the budget is {human(budget)}"
    if fix is not None:
        return f"{where}: set {' '.join(fix.overrides(base))} ({', '.join(tried)}: peak {human(planner.peak(fix))})"
    least = Settings(
        **{**vars(base), "offload": "sequential", "gradient_checkpointing": True, "sample_batch": 1, "train_rows": 1, "vae_slicing": True}
    )
    return (
        f"{where}, and no switch brings it under ({', '.join(tried)} tried; the least is {human(planner.peak(least))}): "
        "use a larger GPU, a lower resolution or a smaller model"
    )


_PLANNERS: dict[tuple, MemoryPlanner] = {}


def planner_for(cfg, device: torch.device) -> MemoryPlanner:
    """A :class:`MemoryPlanner` for ``cfg`` on ``device``, reused for the same settings within a process (the budget
    and the offload mode do not change what is measured)."""
    data = cfg.to_dict()
    data["model"] = {k: v for k, v in data["model"].items() if k not in ("max_memory", "offload")}
    key = (json.dumps(data, sort_keys=True, default=str), str(device))
    if key not in _PLANNERS:
        _PLANNERS.clear()  # one at a time: a planner holds meta modules only, but keep it simple
        _PLANNERS[key] = MemoryPlanner(cfg, device)
    return _PLANNERS[key]


def choose_offload(cfg, device: torch.device) -> str:
    """``align``'s check before any weight loads: the offload mode to use, or a UserError (one line, with the
    advice) when the config does not fit the budget (``model.max_memory``, else the CUDA device's memory).

    ``model.offload=auto``: none on CPU without a budget; otherwise the first of none / phases / sequential that
    fits. No budget known (CPU, no max_memory): no estimate is made.
    """
    mode = cfg.model.offload
    budget = device_budget(cfg, device)
    if budget is None:
        return "none" if mode == "auto" else mode
    planner = planner_for(cfg, device)
    if mode != "auto":
        base = planner.base_settings(mode)
        if planner.peak(base) > budget:
            raise UserError(f"this config does not fit: {refusal(planner, budget, base)}")
        return mode
    for candidate in OFFLOAD_MODES:
        if planner.peak(planner.base_settings(candidate)) <= budget:
            return candidate
    raise UserError(f"this config does not fit: {refusal(planner, budget, planner.base_settings('none'))}")


def plan_report(cfg, budget: int | None, device: str = "cuda") -> str:
    """What ``raft-diffusion plan`` prints."""
    planner = planner_for(cfg, torch.device(cfg.model.device if cfg.model.device != "auto" else device))
    base = planner.base_settings()
    out = [planner.header(base), "", planner.table(base), f"peak: {human(planner.peak(base))} (estimate; add ~0.4 GiB for the CUDA context)"]
    if budget is not None:
        if planner.peak(base) <= budget:
            out.append(f"fits the budget of {human(budget)}")
        else:
            fix, tried = planner.advice(budget, base)
            out.append(f"does not fit: {refusal(planner, budget, base)}")
            if fix is not None:
                out += ["", "with the advice:", planner.table(fix)]
    return "\n".join(out)
