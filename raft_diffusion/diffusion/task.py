"""Stable Diffusion as a RAFT task: the generator, fine-tuner and evaluator the core loop drives."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..core.common import load_with_kwargs_hint, resolve_device, reward_label, screen_metrics
from ..core.dist import Dist
from ..core.errors import UserError
from ..core.loop import as_rewards, external_requests, read_manifest
from ..core.lora_scale import lora_b_parameters, scaled_lora
from ..core.ranking import advantage_weights, diverse_pick, is_nan, kept_weights, negative_weights, uses_embeddings
from ..core.rundir import write_jsonl
from ..core.seeds import eval_seed, stage_seed
from ..core.types import Sample
from . import finetune as ft
from .families import detect_family
from .families.base import seed_generators
from .families.embeds import PromptEmbeds
from .families.settings import LossSettings
from .generate import decode_latents, denoise, encode_images, encode_prompts, generate_batch, start_latents
from .metrics import eval_metrics, load_eval_clip, prompt_ranks
from .pipeline import load_pipeline
from .placement import Placement
from .prompts import load_prompts


def resolve_pretrained(name: str) -> str:
    """'tiny' (SD) and 'tiny-sdxl' / 'tiny-sd3' / 'tiny-flux' mean the tiny test pipelines, built once into the
    cache (random fixed-seed weights: smoke tests only); anything else is passed through."""
    if name == "tiny":
        from .tiny import ensure_tiny_pipeline

        return str(ensure_tiny_pipeline())
    if name in ("tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2", "tiny-flux2-klein", "tiny-qwen-image", "tiny-z-image"):
        from .families.tiny import tiny_pipeline

        return str(tiny_pipeline(name.removeprefix("tiny-")))
    return name


def load_reward(cfg_reward: dict, device, dtype):
    """The configured reward (lazy import keeps the core importable without the reward package)."""
    from reward_models import load_reward_from_config

    return load_with_kwargs_hint(cfg_reward, lambda: load_reward_from_config(cfg_reward, device=device, dtype=dtype))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0,1] -> uint8 on the CPU (rounded, not truncated)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def to_pil(image: torch.Tensor) -> Image.Image:
    """An image [3,H,W] (float in [0,1], or uint8) -> PIL."""
    arr = image if image.dtype == torch.uint8 else to_uint8(image)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


def save_png(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    to_pil(image).save(tmp, format="PNG")
    tmp.replace(path)


def sample_name(prompt_index: int, sample_index: int) -> str:
    return f"p{prompt_index:04d}_s{sample_index:03d}"


class DiffusionTask:
    """Generator, fine-tuner and evaluator for a pipeline of any supported family (SD 1.x/2.x, SDXL, SD3, FLUX).

    SD 1.x/2.x keeps the code path it was built on (``generate``, ``finetune``), whose figures and multi-process
    equality are pinned by tests; the other families go through their :class:`~.families.Family` (encode,
    sample, decode, the family's loss, LoRA targets and saving).
    """

    skips_discarded = False  # every image is scored, prompt_match's discarded ones too (logged with their reward)

    console_metrics = (("eval_clip_score", "clip"), ("eval_diversity", "diversity"))

    def __init__(self, cfg, reward=None, dist: Dist | None = None, offload: str = "none"):
        self.cfg = cfg
        self.dist = dist or Dist()
        # the screens of the current stage by LoRA scale (rows, images, embeddings), reused by its full evaluation
        self._screened: dict[tuple[int, float], tuple] = {}
        self._scale = 1.0  # the LoRA's scale while lora_scaled is active
        s = cfg.sampling
        # 1. Prompts (training or an external pool's, and held-out) and the reward: cheap checks first.
        self.external = _read_manifest(s.external_pool) if s.external_pool else None
        if self.external is not None:
            self.train_prompts = list(dict.fromkeys(row["prompt"] for row in self.external))
        else:
            self.train_prompts = load_prompts(cfg.prompts.train)
        self.eval_prompts = load_prompts(cfg.prompts.eval) if cfg.prompts.eval is not None else list(self.train_prompts)
        if self.dist.enabled and cfg.model.device == "auto" and self.dist.device is not None:
            device = torch.device(self.dist.device)  # this process's GPU under accelerate / torchrun
        else:
            device = resolve_device(cfg.model.device)
        # model.offload phases / sequential: the reward and eval CLIP wait on the CPU and come to the device to score
        score_device = torch.device("cpu") if offload in ("phases", "sequential") else device
        self.reward = reward if reward is not None else load_reward(cfg.reward, score_device, torch.float32)
        self.reward_name = reward_label(cfg.reward)
        # the CLIP for eval prompt fidelity and diversity (None when eval.clip_model is null)
        # (also the embedding space of ranking.diversity_weight and the judge of ranking.prompt_match)
        self.eval_clip = (
            load_eval_clip(cfg.eval.clip_model, cfg.eval.clip_pretrained, score_device)
            if cfg.eval.every or uses_embeddings(cfg.ranking) or cfg.ranking.prompt_match
            else None
        )
        self._prompt_text = None
        self._probe_reward(score_device)
        # 2. The pipeline, frozen but for what fine-tuning trains.
        self.family = detect_family(cfg.model.pretrained, cfg.model.family)
        self.legacy = self.family.name == "sd"  # SD 1.x/2.x: the original generate/finetune path
        _check_family_settings(cfg, self.family)
        self.pipe = load_pipeline(
            cfg.model.pretrained,
            revision=cfg.model.revision,
            variant=cfg.model.variant,
            device=device,
            dtype=cfg.model.dtype,
            safety_checker=cfg.model.safety_checker,
            attention=cfg.model.attention,
            scheduler=s.scheduler,
            family=self.family,
        )
        stepwise = self.family.stepwise_schedulers
        if s.prune_step is not None and (
            type(self.pipe.scheduler).__name__ not in stepwise or self.pipe.scheduler.config.get("stochastic_sampling", False)
        ):
            raise UserError(
                f"sampling.prune_step splits the pool's batches between steps, which {type(self.pipe.scheduler).__name__} (it keeps "
                f"state from step to step, or draws noise) cannot: set sampling.scheduler to {' or '.join(stepwise)}, or sampling.prune_step=null"
            )
        self.denoiser = self.family.denoiser(self.pipe)
        self.device = self.denoiser.device
        self.height, self.width = self.family.image_size(self.pipe, s.height, s.width)
        # 3. Prompt embeddings, once per prompt (the text encoders are frozen).
        # the pool's guidance and the held-out samples' (eval.guidance_scale, default the same)
        self.eval_guidance = cfg.eval_guidance_scale
        # with caption dropout (train.empty_prompt_ratio) the empty prompt's conditioning: SD's embedding [1, L, D]; a
        # family's one row, encoded in the same call as the training prompts' (Qwen-Image and Z-Image pad every row to
        # the call's longest prompt, which the empty one is not)
        self.empty_embeds = None
        n = len(self.train_prompts)
        if cfg.train.empty_prompt_ratio > 0 and not self.legacy:
            both = self._encode([*self.train_prompts, self.family.empty_prompt], s.guidance_scale > 1.0)
            self.train_embeds, self.empty_embeds = both[:n], both[n:]
        else:
            self.train_embeds = self._encode(self.train_prompts, s.guidance_scale > 1.0)
            if cfg.train.empty_prompt_ratio > 0:
                self.empty_embeds = encode_prompts(self.pipe, [""], None, do_cfg=False)[0]
        self.eval_embeds = self._encode(self.eval_prompts, self.eval_guidance > 1.0)
        # model.offload (resolved by the planner): from here on the text encoders are not needed on the device
        self.placement = Placement(
            offload, self.device, self.pipe, self.family, scorers=(self.reward, self.eval_clip), vae_slicing=cfg.model.vae_slicing
        )
        self.placement.after_encoding()
        if self.device.type == "cuda" and cfg.model.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # 4. What fine-tuning trains.
        t = cfg.train
        init_seed = stage_seed(cfg.seed, 0, "lora-init")
        if t.method == "full":
            ft.set_full_finetune(self.denoiser)
        elif self.legacy:
            ft.add_lora(
                self.denoiser,
                rank=t.lora_rank,
                alpha=t.lora_alpha,
                dropout=t.lora_dropout,
                target_modules=tuple(t.target_modules or self.family.lora_targets),
                init_seed=init_seed,
            )
        else:
            targets = (
                self.family.default_lora_targets(self.denoiser) if t.target_modules in (None, list(self.family.lora_targets)) else t.target_modules
            )  # the family's defaults less those this model lacks
            self.family.add_lora(self.denoiser, rank=t.lora_rank, alpha=t.lora_alpha, dropout=t.lora_dropout, targets=targets, init_seed=init_seed)
        if self.dist.is_main:
            print(f"training: {_training_layout(t, self.dist.world_size)}", flush=True)

    def _probe_reward(self, device) -> None:
        """Score two plain grey images before the pipeline loads and anything is sampled, so that a reward that fails
        (an infinite score, the wrong number of scores, a wrong signature) says so in seconds, not after the base's
        evaluation. The images are on the device the reward scores on now. NaN or None (no score) is a valid answer here;
        the probe's scores are not used."""
        from reward_models.registry import LoadedReward

        s = self.cfg.sampling
        images = torch.full((2, 3, s.height or 512, s.width or 512), 0.5, device=device)
        prompts = [self.train_prompts[0], self.eval_prompts[0]]
        # a LoadedReward's own checks, except that no score for both grey images is an answer here
        score = self.reward.probe if isinstance(self.reward, LoadedReward) else self.reward
        as_rewards(self.reward_name, score(images, prompts), len(prompts))

    # -- generation ----------------------------------------------------------------------------
    def _encode(self, prompts: list[str], do_cfg: bool):
        if self.legacy:
            return encode_prompts(self.pipe, prompts, self.cfg.prompts.negative, do_cfg)
        return self.family.encode_prompts(
            self.pipe, prompts, self.cfg.prompts.negative, do_cfg, max_sequence_length=self.cfg.model.max_sequence_length
        )

    def _generate(self, embeds, prompt_indices, seeds, guidance_scale: float, steps: int | None = None):
        """``(latents, images)`` of one batch: sample i from prompt ``prompt_indices[i]`` and seed ``seeds[i]``
        (``steps`` denoising steps, default the pool's)."""
        s = self.cfg.sampling
        with ft.lora_merged(self.denoiser, s.merge_lora):  # sampling.merge_lora: the same model, less compute
            return self._sample_batch(embeds, prompt_indices, seeds, guidance_scale, steps or s.num_inference_steps)

    def _sample_batch(self, embeds, prompt_indices, seeds, guidance_scale: float, steps: int):
        s = self.cfg.sampling
        if not self.legacy:
            latents = self.family.sample(
                self.pipe,
                embeds,
                list(prompt_indices),
                list(seeds),
                steps=steps,
                guidance=guidance_scale,
                height=self.height,
                width=self.width,
            )
            return latents, self.family.decode(self.pipe, latents)
        cond, uncond = embeds
        idx = torch.tensor(prompt_indices, device=cond.device)
        return generate_batch(
            self.pipe,
            cond[idx],
            None if uncond is None else uncond[idx],
            list(seeds),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=self.height,
            width=self.width,
            eta=s.eta,
        )

    def plan(self, stage: int) -> list[Sample] | None:
        """Requests of an external pool (one per manifest row); None = the core's K-per-prompt plan."""
        if self.external is None:
            return None
        return external_requests(self.external, self.train_prompts, self.cfg.seed, stage, lambda row: {"source": row["image"]})

    def sample(self, stage: int, requests):
        bs = self.cfg.sampling.batch_size
        if self.cfg.sampling.prune_step is not None and self.external is None:
            yield from self._sample_pruned(stage, list(requests))
            return
        for i in range(0, len(requests), bs):
            batch = list(requests[i : i + bs])
            if self.external is not None:
                images = torch.stack([self._load_external(s.extras["source"]) for s in batch]).to(self.device)
                seeds = [s.seed for s in batch]
                latents = encode_images(self.pipe, images, seeds) if self.legacy else self.family.encode_images(self.pipe, images, seeds)
            else:
                latents, images = self._generate(
                    self.train_embeds, [s.prompt_index for s in batch], [s.seed for s in batch], self.cfg.sampling.guidance_scale
                )
            for j, s in enumerate(batch):  # clone: a dropped sample must free its memory, not pin the batch
                s.payload = {"latents": latents[j].clone(), "image": images[j].clone()}
            yield batch

    def _sample_pruned(self, stage: int, requests: list[Sample]):
        """``sampling.prune_step``: every request is denoised ``prune_step`` steps; the image the scheduler predicts
        there is judged as a finished one would be (``ranking.prompt_match``, the reward, the novelty and spread-out
        terms), and only each prompt's best ``prune_keep`` are finished. Over several processes the provisional scores are gathered,
        so every process prunes exactly what one process would. Yields the pruned samples (no payload, marked
        discarded), then the finished ones in batches."""
        s = self.cfg.sampling
        bs, k, n = s.batch_size, s.prune_step, s.num_inference_steps
        start, run, decode = self._stepwise_sampler()
        with ft.lora_merged(self.denoiser, s.merge_lora):
            head, tail = run(n, k)
            state = {}  # id(request) -> (latents after step k, its generator)
            # the loop's own bar counts finished and pruned samples; this one the first k steps of each
            bar = tqdm(total=len(requests), desc=f"stage {stage} first {k} steps", unit="img", disable=not self.cfg.progress, leave=False)
            for i in range(0, len(requests), bs):
                batch = requests[i : i + bs]
                latents, gens = start([r.seed for r in batch])
                latents, x0 = head(latents, gens, [r.prompt_index for r in batch])
                for r, z, g in zip(batch, latents, gens):
                    state[id(r)] = (z.clone(), g)
                self._provisional(batch, decode(x0))
                bar.update(len(batch))
            bar.close()
            survivors = self._survivors(requests)
            pruned = [r for r in requests if (r.prompt_index, r.sample_index) not in survivors]
            for r in pruned:
                r.payload = None
                r.extras.update(pruned_at_step=k, reward_queries=1)
                r.extras["discarded"] = f"pruned at step {k} of {n}: its predicted image is not among its prompt's best {s.prune_keep}"
                del state[id(r)]
            if pruned:
                yield pruned
            going = [r for r in requests if id(r) in state]
            for i in range(0, len(going), bs):
                batch = going[i : i + bs]
                latents = torch.stack([state[id(r)][0] for r in batch])
                gens = [state.pop(id(r))[1] for r in batch]
                latents, _ = tail(latents, gens, [r.prompt_index for r in batch])
                images = decode(latents)
                for j, r in enumerate(batch):
                    r.payload = {"latents": latents[j].clone(), "image": images[j].clone()}
                    r.extras["reward_queries"] = 2  # once on its predicted image, once finished
                yield batch

    def _stepwise_sampler(self):
        """``sampling.prune_step``'s sampler: ``start(seeds) -> (latents, generators)``; ``run(n, k) -> (head, tail)``,
        each ``(latents, generators, prompt indices) -> (latents, predicted final latents)`` over the first ``k`` and
        the other ``n - k`` of ``n`` steps; ``decode(latents) -> images``. SD 1.x/2.x: its DDIM/DDPM loop; another family
        with ``stepwise_schedulers`` (SD3): the family's own."""
        s, pipe, h, w = self.cfg.sampling, self.pipe, self.height, self.width
        if self.legacy:
            cond, uncond = self.train_embeds

            def part(timesteps):
                def go(latents, gens, prompts):
                    idx = torch.tensor(prompts, device=cond.device)
                    neg = None if uncond is None else uncond[idx]
                    return denoise(pipe, latents, cond[idx], neg, gens, timesteps, guidance_scale=s.guidance_scale, eta=s.eta)

                return go

            def run(n, k):
                pipe.scheduler.set_timesteps(n, device=self.device)
                return part(pipe.scheduler.timesteps[:k]), part(pipe.scheduler.timesteps[k:])

            return (lambda seeds: start_latents(pipe, seeds, h, w)), run, (lambda latents: decode_latents(pipe, latents))
        family, dtype = self.family, self.denoiser.dtype

        def start(seeds):
            gens = seed_generators(seeds)
            return family.initial_noise(pipe, seeds, h, w, generators=gens).to(pipe.device, dtype), gens

        def part(timesteps, sigmas):
            def go(latents, gens, prompts):
                embeds = self.train_embeds[list(prompts)].to(pipe.device, dtype)
                return family.denoise(pipe, latents, embeds, timesteps, sigmas, guidance=s.guidance_scale)

            return go

        def run(n, k):
            timesteps, sigmas = family.sampling_schedule(pipe, n, h, w)
            return part(timesteps[:k], sigmas[: k + 1]), part(timesteps[k:], sigmas[k:])

        return start, run, (lambda latents: family.decode(pipe, latents))

    def _provisional(self, batch: list[Sample], images: torch.Tensor) -> None:
        """A sample's provisional score (``sampling.prune_step``) from the image predicted for it: the reward
        (``provisional_reward``), whether ``ranking.prompt_match`` would keep it (``provisional_match``) and, for the
        novelty and spread-out terms, its eval CLIP embedding (on ``embedding`` until :meth:`_survivors` has used it)."""
        probes = [Sample(r.prompt_index, r.sample_index, r.seed, payload={"image": im}) for r, im in zip(batch, images)]
        self.discard(probes)
        with self.placement.scoring():
            rewards = as_rewards(self.reward_name, self.reward(images, [self.train_prompts[r.prompt_index] for r in batch]), len(batch))
            embeddings = self._image_embeddings(probes).cpu() if uses_embeddings(self.cfg.ranking) else [None] * len(batch)
        for r, p, v, e in zip(batch, probes, rewards, embeddings):
            r.extras["provisional_reward"] = v
            if self.cfg.ranking.prompt_match:
                r.extras["provisional_match"] = "discarded" not in p.extras
            r.embedding = e

    def _survivors(self, requests: list[Sample]) -> set[tuple[int, int]]:
        """``(prompt index, sample index)`` of the samples each prompt finishes (``sampling.prune_keep``), over every
        process: its prompt-matched predicted images picked by the ranking's own rule (reward, then with
        ``ranking.novelty_weight`` / ``diversity_weight`` the same novelty and spread-out terms, in the eval CLIP's
        space of the predicted images), then, if too few matched, the others by reward."""
        r = self.cfg.ranking
        mine = [
            (q.prompt_index, q.sample_index, q.extras.get("provisional_match", True), q.extras["provisional_reward"], q.embedding) for q in requests
        ]
        for q in requests:
            q.embedding = None
        by_prompt: dict[int, list] = {}
        for row in (row for part in self.dist.gather(mine) for row in part):
            by_prompt.setdefault(row[0], []).append(row)
        keep = self.cfg.sampling.prune_keep
        out = set()
        for rows in by_prompt.values():
            rows.sort(key=lambda x: (not x[2], float("inf") if is_nan(x[3]) else -x[3], x[1]))  # matched, best first
            matched = [x for x in rows if x[2] and not is_nan(x[3])]
            if uses_embeddings(r) and matched:
                picks = diverse_pick([x[3] for x in matched], [x[4] for x in matched], keep, r.diversity_weight, r.novelty_weight)
                chosen = [matched[j] for j in picks]
            else:
                chosen = matched[:keep]
            ids = {id(x) for x in chosen}
            chosen += [x for x in rows if id(x) not in ids][: keep - len(chosen)]
            out.update((x[0], x[1]) for x in chosen)
        return out

    def _load_external(self, path: str) -> torch.Tensor:
        try:
            img = Image.open(path).convert("RGB")
        except OSError as e:
            raise UserError(f"external pool image {path} cannot be read ({e}); fix the manifest's 'image' path") from None
        img = img.resize((self.width, self.height), Image.BICUBIC) if img.size != (self.width, self.height) else img
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0

    def discard(self, batch: list[Sample]) -> None:
        """``ranking.prompt_match``: an image whose own prompt the eval CLIP does not rank among the top N
        training prompts is discarded (still scored and logged, never kept)."""
        n = self.cfg.ranking.prompt_match
        if not n:
            return
        if self._prompt_text is None:  # every training prompt, embedded once
            with self.placement.scoring():
                self._prompt_text = self.eval_clip.text_embeddings(self.train_prompts)
        batch = [s for s in batch if s.payload is not None]  # sampling.prune_step's pruned samples have no image
        if not batch:
            return
        with self.placement.scoring():
            ranks = prompt_ranks(self._image_embeddings(batch), self._prompt_text, [s.prompt_index for s in batch])
        for s, k in zip(batch, ranks):
            s.extras["prompt_rank"] = k
            if k > n:
                s.extras["discarded"] = f"eval CLIP ranks its prompt {k} of {len(self.train_prompts)}"

    def score(self, batch: list[Sample]):
        if any(s.payload is None for s in batch):  # sampling.prune_step: a pruned sample has no image, no score
            finished = [s for s in batch if s.payload is not None]
            rewards = iter(as_rewards(self.reward_name, self.score(finished), len(finished)) if finished else [])
            return [next(rewards) if s.payload is not None else None for s in batch]
        if self.cfg.ranking.kl_beta > 0:
            self._log_ratios(batch)
        images = torch.stack([s.payload["image"] for s in batch])
        with self.placement.scoring():  # model.offload: the reward is on the device only now
            out = self.reward(images, [self.train_prompts[s.prompt_index] for s in batch])
            _attach_components(self.reward, batch)
            if uses_embeddings(self.cfg.ranking):  # the spread-out / novelty pick works in CLIP image space
                for s, e in zip(batch, self._image_embeddings(batch)):
                    s.embedding = e
        return out

    @torch.no_grad()
    def _log_ratios(self, batch: list[Sample]) -> None:
        """``ranking.kl_beta``: each finished, undiscarded sample's ``log_ratio``, log p_theta(x) - log p_base(x)
        estimated from the denoising loss (the difference of the two models' ELBOs with the loss's plain weights,
        as Diffusion-DPO's implicit reward): ``-(T / 2) * sum over latent elements of (err_theta^2 - err_base^2)``,
        averaged over ``ranking.kl_draws`` draws of (timestep, noise) that both models share. T is the scheduler's
        number of training timesteps; the base is the LoRA at scale 0. Each sample's draws come from its own seed,
        so the estimate does not depend on batching or the process count. While the LoRA is still all zeros
        (stage 1) the ratio is 0 without a pass."""
        live = [s for s in batch if not s.extras.get("discarded")]
        if not live:
            return
        if not any(bool(p.any()) for p in lora_b_parameters(self.denoiser)):
            for s in live:
                s.log_ratio = 0.0
            return
        x0 = torch.stack([s.payload["latents"] for s in live]).to(self.device, torch.float32)
        rows = [s.prompt_index for s in live]
        gens = [torch.Generator().manual_seed(stage_seed(s.seed, 0, "log_ratio")) for s in live]
        diff = torch.zeros(len(live), dtype=torch.float64)
        for _ in range(self.cfg.ranking.kl_draws):
            t = torch.cat([self.family.draw_timesteps(self.pipe, 1, LossSettings(), g)[0] for g in gens])
            noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
            mine = self._denoising_errors(x0, rows, noise, t)
            with scaled_lora(self.denoiser, 0.0):
                base = self._denoising_errors(x0, rows, noise, t)
            diff += (mine - base).double().cpu()
        scale = self.pipe.scheduler.config.num_train_timesteps / 2 * x0[0].numel() / self.cfg.ranking.kl_draws
        for s, d in zip(live, diff.tolist()):
            s.log_ratio = -scale * d

    def _denoising_errors(self, x0: torch.Tensor, rows: list[int], noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample mean squared error of the denoiser's prediction at ``(noise, t)``: the family's training loss,
        unweighted (SD 1.x/2.x's text embeddings wrapped as the family's ``PromptEmbeds``)."""
        embeds = PromptEmbeds({"prompt_embeds": self.train_embeds[0]}) if self.legacy else self.train_embeds
        return self.family.training_loss(self.pipe, self.denoiser, x0, embeds, rows, noise=noise, timesteps=t, settings=LossSettings())

    def _image_embeddings(self, batch: list[Sample]) -> torch.Tensor:
        """The eval CLIP's embeddings of a batch's images (computed once per batch, kept on the payload)."""
        if any("clip_embedding" not in s.payload for s in batch):
            emb = self.eval_clip.image_embeddings(torch.stack([s.payload["image"] for s in batch]))
            for s, e in zip(batch, emb):
                s.payload["clip_embedding"] = e
        return torch.stack([s.payload["clip_embedding"] for s in batch])

    # -- kept samples --------------------------------------------------------------------------
    def save_kept(self, stage_dir: Path, kept: list[Sample]) -> None:
        tensors = {}
        for s in kept:
            name = sample_name(s.prompt_index, s.sample_index)
            tensors[name] = s.payload["latents"].detach().float().cpu().contiguous()
            if self.cfg.save_kept_images:
                save_png(s.payload["image"], stage_dir / "kept" / f"{name}.png")
                s.extras["image"] = f"kept/{name}.png"
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / ".kept_latents.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(stage_dir / "kept_latents.safetensors")

    def load_kept(self, stage_dir: Path, kept: list[Sample]) -> list[Sample]:
        tensors = load_file(str(stage_dir / "kept_latents.safetensors"))
        for s in kept:
            s.payload = {"latents": tensors[sample_name(s.prompt_index, s.sample_index)].to(self.device)}
        return kept

    # -- fine-tuning and weights ---------------------------------------------------------------
    def finetune(self, stage: int, kept: list[Sample], negatives: list[Sample] | None = None) -> dict:
        """Train on the kept samples (and, with ``ranking.negative_k``, away from ``negatives``)."""
        self._screened = {}  # the weights change: a screen's images are no longer the model's
        latents = torch.stack([s.payload["latents"] for s in kept]).to(self.device, torch.float32)
        rows = [s.prompt_index for s in kept]
        family = {} if self.legacy else {"family": self.family, "loss_settings": loss_settings(self.cfg.train)}
        embeds = _train_rows(self, rows)
        temperature = self.cfg.train.reward_weight_temperature
        by_key = self.cfg.train.reward_weight_key == "selection"  # the novelty-raised key, where the pick made one
        if temperature is not None:  # train.reward_weight_temperature: a reward-weighted loss within each prompt
            values = [s.selection_key if by_key and s.selection_key is not None else s.reward for s in kept]
            family["sample_weights"] = torch.tensor(kept_weights(values, rows, temperature))
        if self.cfg.train.advantage_weights:  # each kept sample by how far above its prompt's pool mean it is
            family["sample_weights"] = torch.tensor(_advantages(kept, 1, by_selection=by_key))
        if negatives or self.cfg.train.nft_beta != 1.0:  # the negative-aware loss
            family["nft_beta"] = self.cfg.train.nft_beta
        if negatives:
            family["negative_latents"] = torch.stack([s.payload["latents"] for s in negatives]).to(self.device, torch.float32)
            family["negative_embeds"] = _train_rows(self, [s.prompt_index for s in negatives])
            family["negative_weight"] = self.cfg.train.negative_weight
            scale = self.cfg.train.negative_advantage_scale
            if self.cfg.train.advantage_weights:  # standard scores within each prompt's pool
                family["negative_sample_weights"] = torch.tensor(_advantages(negatives, -1))
            elif scale is not None:  # each negative weighted by how far below its prompt's pool mean it is
                family["negative_sample_weights"] = torch.tensor(
                    negative_weights([s.reward for s in negatives], [s.extras["pool_mean"] for s in negatives], scale)
                )
        return ft.train_unet(
            self.pipe,
            latents,
            embeds,
            **train_settings(self.cfg.train, stage),
            seed=stage_seed(self.cfg.seed, stage, "train"),
            empty_embeds=self.empty_embeds,
            progress=self.cfg.progress,
            desc=f"stage {stage} train",
            dist=self.dist,
            **family,
        )

    def weights_dir(self, stage_dir: Path) -> Path:
        """``lora/`` (a LoRA in the family pipeline's format), or the full denoiser's folder (``unet/``, ``transformer/``)."""
        return Path(stage_dir) / ("lora" if self.cfg.train.method == "lora" else self.family.denoiser_attr)

    def save(self, stage_dir: Path) -> None:
        if self.cfg.train.method != "lora":
            self.denoiser.save_pretrained(self.weights_dir(stage_dir))
        elif self.legacy:
            ft.save_lora(self.denoiser, self.weights_dir(stage_dir))
        else:
            self.family.save_lora(self.pipe, self.denoiser, self.weights_dir(stage_dir))

    def restore(self, stage_dir: Path) -> None:
        """The main process loads the saved weights and sends them to the others (no shared disk needed)."""
        self._screened = {}
        if self.dist.is_main:
            self._load_weights(stage_dir)
        self.dist.broadcast_params(ft.trainable_parameters(self.denoiser))

    def _load_weights(self, stage_dir: Path) -> None:
        if self.cfg.train.method != "lora":
            state = type(self.denoiser).from_pretrained(self.weights_dir(stage_dir)).state_dict()
            self.denoiser.load_state_dict(state)
        elif self.legacy:
            ft.load_lora_into_unet(self.denoiser, self.weights_dir(stage_dir))
        else:
            self.family.load_lora(self.denoiser, self.weights_dir(stage_dir))

    @contextlib.contextmanager
    def lora_scaled(self, scale: float):
        """``early_stop.lora_scales``: the LoRA at ``scale`` within the block (screens and evaluations there see
        base + scale x its change; their images are cached per scale)."""
        with scaled_lora(self.denoiser, scale):
            self._scale = float(scale)
            try:
                yield
            finally:
                self._scale = 1.0

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, stage: int, stage_dir: Path) -> dict:
        """Held-out prompts x fixed seeds (the same noise every stage); images into stage_dir/eval/.

        Over several processes the batches are dealt round-robin and the results gathered; the main
        process writes the images and ``eval.jsonl``.
        """
        n = self.cfg.eval.num_per_prompt
        todo = [(p, k, eval_seed(self.cfg.seed, p, k)) for p in range(len(self.eval_prompts)) for k in range(n)]
        rows, images_u8, embeddings = self._reusing_screen(stage, todo)
        if self.dist.is_main:
            if images_u8:
                for row, img in zip(rows, torch.cat(images_u8)):
                    save_png(img, stage_dir / row["image"])
            write_jsonl(stage_dir / "eval.jsonl", rows)
        comps = {c.removeprefix("reward/"): [row[c] for row in rows] for c in rows[0] if c.startswith("reward/")}
        image_emb = torch.cat(embeddings) if embeddings else None
        with self.placement.scoring():
            text_emb = self.eval_clip.text_embeddings([row["prompt"] for row in rows]) if embeddings else None
        metrics = eval_metrics([row["reward"] for row in rows], [row["prompt_index"] for row in rows], comps, image_emb, text_emb)
        return {**metrics, "eval_reward_queries": len(rows)}

    def screen(self, stage: int, stage_dir: Path, per_prompt: int) -> dict:
        """``eval.screen_per_prompt``: the held-out reward on the first ``per_prompt`` fixed seeds of each eval
        prompt (the seeds :meth:`evaluate` uses there), without saving images; rows into ``screen.jsonl``. A full
        evaluation of the same stage next reuses its images and makes only the rest."""
        todo = [(p, k, eval_seed(self.cfg.seed, p, k)) for p in range(len(self.eval_prompts)) for k in range(per_prompt)]
        rows, images_u8, embeddings = self._held_out(todo, f"stage {stage} screen")
        # a full evaluation of this stage at this scale makes only the rest
        self._screened = {key: v for key, v in self._screened.items() if key[0] == stage}
        self._screened[stage, self._scale] = (rows, images_u8, embeddings)
        if self.dist.is_main:
            write_jsonl(stage_dir / "screen.jsonl", [{k: v for k, v in row.items() if k != "image"} for row in rows])
        return screen_metrics([row["reward"] for row in rows])

    def _reusing_screen(self, stage: int, todo: list[tuple[int, int, int]]):
        """:meth:`_held_out` for a full evaluation, taking the images this stage's screen made (the same seeds, the
        same weights) from it and generating only the rest; in ``todo``'s order."""
        cached, self._screened = self._screened.get((stage, self._scale)), {}
        if cached is None:
            return self._held_out(todo, f"stage {stage} eval")
        rows, images_u8, embeddings = cached
        done = {(r["prompt_index"], r["sample_index"]) for r in rows}
        rest = [t for t in todo if (t[0], t[1]) not in done]
        if rest:
            more = self._held_out(rest, f"stage {stage} eval")
            rows, images_u8, embeddings = rows + more[0], images_u8 + more[1], embeddings + more[2]
        return _in_order(todo, rows, images_u8, embeddings)

    def _held_out(self, todo: list[tuple[int, int, int]], desc: str):
        """Generate and score held-out (prompt, sample index, seed) triples at the eval settings: their rows,
        uint8 image batches (``eval.save_images``) and eval-CLIP embeddings (with an ``eval.clip_model``), in
        ``todo``'s order on every process (batches dealt round-robin over processes, results gathered)."""
        with_images, with_embeddings = self.cfg.eval.save_images, self.eval_clip is not None
        bs = self.cfg.sampling.batch_size
        mine = self.dist.shard(todo, bs)
        rows, images_u8, embeddings = [], [], []
        for i in tqdm(range(0, len(mine), bs), desc=desc, disable=not self.cfg.progress, leave=False):
            chunk = mine[i : i + bs]
            _, images = self._generate(
                self.eval_embeds, [p for p, _, _ in chunk], [sd for _, _, sd in chunk], self.eval_guidance, self.cfg.eval_num_inference_steps
            )
            with self.placement.scoring():
                r = self.reward(images, [self.eval_prompts[p] for p, _, _ in chunk]).float().cpu()
                emb = self.eval_clip.image_embeddings(images).cpu() if with_embeddings else None
            comps = getattr(self.reward, "last_components", None) or {}
            for j, (p, k, sd) in enumerate(chunk):
                row = {"prompt_index": p, "sample_index": k, "seed": sd, "prompt": self.eval_prompts[p], "reward": float(r[j])}
                row.update({f"reward/{c}": float(v[j]) for c, v in comps.items()})
                if with_images:
                    row["image"] = f"eval/{sample_name(p, k)}.png"
                rows.append(row)
            if with_images:
                images_u8.append(to_uint8(images))
            if emb is not None:
                embeddings.append(emb)
        if self.dist.enabled:  # everyone gets everything, in the single-process order
            parts = self.dist.gather((rows, images_u8, embeddings))
            rows = [r for part in parts for r in part[0]]
            images_u8 = [x for part in parts for x in part[1]]
            embeddings = [x for part in parts for x in part[2]]
            return _in_order(todo, rows, images_u8, embeddings)
        return rows, images_u8, embeddings


def _advantages(samples: list[Sample], sign: int, by_selection: bool = False) -> list[float]:
    """``train.advantage_weights``: each sample's standard score in its prompt's pool (the pool stamps the stats);
    ``by_selection`` (``train.reward_weight_key: selection``): of its selection key among its pool's, where it has one."""
    values, means, sds = [], [], []
    for s in samples:
        sel = by_selection and s.selection_key is not None and "pool_selection_mean" in s.extras
        values.append(s.selection_key if sel else s.reward)
        means.append(s.extras["pool_selection_mean" if sel else "pool_mean"])
        sds.append(s.extras["pool_selection_sd" if sel else "pool_sd"])
    return advantage_weights(values, means, sds, sign)


def _train_rows(task, prompt_indices: list[int]):
    """One row of the task's training-prompt conditioning per sample: SD's text embeddings, or the family's
    ``PromptEmbeds``."""
    if task.legacy:
        return task.train_embeds[0][torch.tensor(prompt_indices, device=task.device)]
    return task.train_embeds[prompt_indices]


def _in_order(todo: list[tuple[int, int, int]], rows: list[dict], images_u8: list, embeddings: list):
    """Held-out rows, with their image and embedding batches (concatenated into one each), put in ``todo``'s
    (prompt index, sample index) order."""
    order = {(p, k): i for i, (p, k, _) in enumerate(todo)}
    perm = sorted(range(len(rows)), key=lambda i: order[(rows[i]["prompt_index"], rows[i]["sample_index"])])
    return (
        [rows[i] for i in perm],
        [torch.cat(images_u8)[perm]] if images_u8 else [],
        [torch.cat(embeddings)[perm]] if embeddings else [],
    )


def train_settings(t, stage: int | None = None) -> dict:
    """``train_unet``'s keyword arguments from a config's ``train`` section (all but the data, seed and process group)
    for ``stage`` (``train.timestep_ranges_from_stage``: before it ``timestep_range``, from it ``timestep_ranges``;
    ``train.stage_lr_decay``: the learning rate times decay^(stage - 1))."""
    ranges, single = t.timestep_ranges, t.timestep_range
    late = getattr(t, "timestep_ranges_from_stage", None)
    if late is not None and stage is not None:
        ranges, single = (ranges, None) if stage >= late else (None, single)
    return dict(
        steps=t.steps_per_stage,
        batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        chunk_rows=t.chunk_size,
        learning_rate=t.learning_rate * (t.stage_lr_decay ** (stage - 1) if t.stage_lr_decay and stage else 1.0),
        lr_scheduler=t.lr_scheduler,
        lr_warmup_steps=t.lr_warmup_steps,
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        mixed_precision=t.mixed_precision,
        optimizer_name=t.optimizer,
        gradient_checkpointing=t.gradient_checkpointing,
        snr_gamma=t.snr_gamma,
        empty_prompt_ratio=t.empty_prompt_ratio,
        random_flip=t.random_flip,
        timestep_range=single,
        timestep_ranges=ranges,
    )


def loss_settings(t):
    """The family loss settings of a ``train`` config section (timestep range and the flow-matching options)."""
    from .families import LossSettings

    return LossSettings(
        weighting_scheme=t.weighting_scheme,
        logit_mean=t.logit_mean,
        logit_std=t.logit_std,
        mode_scale=t.mode_scale,
        flux_guidance=t.flux_guidance,
        timestep_range=None if t.timestep_range is None else tuple(t.timestep_range),
    )


def _check_family_settings(cfg, family) -> None:
    """Settings that only some families support, refused in one line before the model loads."""
    ft.check_loss_options(family.name, snr_gamma=cfg.train.snr_gamma)
    if cfg.sampling.prune_step is not None and not family.stepwise_schedulers:
        raise UserError(f"sampling.prune_step is implemented for the samplers of SD 1.x/2.x and SD3, not for {family.name}'s: set it to null")
    if family.name != "sd" and cfg.sampling.eta:
        raise UserError(f"sampling.eta is a DDIM setting of SD 1.x/2.x; {family.name}'s sampler has none: set it to 0")
    if cfg.model.max_sequence_length is not None and getattr(family, "max_sequence_length", None) is None:
        raise UserError(f"model.max_sequence_length sets T5/Qwen tokens; {family.name} has no such encoder: set it to null")


def _training_layout(t, world_size: int) -> str:
    """One line on how a step's rows are computed: effective batch, chunks, processes (and idle ones)."""
    rows, chunk = t.batch_size * t.gradient_accumulation_steps, t.chunk_size or t.batch_size
    chunks = -(-rows // chunk)
    line = (
        f"effective batch {rows} ({t.batch_size} x {t.gradient_accumulation_steps} accumulation) in {chunks} "
        f"chunk{'s' * (chunks > 1)} of {chunk} row{'s' * (chunk > 1)}"
    )
    if world_size == 1:
        return line + " on 1 process"
    line += f" dealt over {world_size} processes"
    if chunks < world_size:
        line += f" (only {chunks} of them busy while training: lower train.chunk_size to spread a step wider)"
    return line


def _attach_components(reward, batch: list[Sample]) -> None:
    comps = getattr(reward, "last_components", None) or {}
    for c, v in comps.items():
        for j, s in enumerate(batch):
            s.extras[f"reward/{c}"] = float(v[j])


def _read_manifest(path: str) -> list[dict]:
    """An external image pool; image paths are relative to the manifest."""
    rows = read_manifest(path, "image")
    for row in rows:
        img = Path(row["image"]).expanduser()
        row["image"] = str(img if img.is_absolute() else (Path(path).parent / img))
    return rows
