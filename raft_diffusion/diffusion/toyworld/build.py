"""Build the toy world's trained parts from scratch, seeded, into one folder.

Layout of a built world (the committed one is ``raft_diffusion/diffusion/toyworld/assets``)::

    clip/                      small CLIP, open_clip format (reward_models.save_open_clip)
    aesthetic_head.safetensors LAION-layout aesthetic head on clip/'s image embeddings
    sd/                        StableDiffusionPipeline folder (VAE, UNet, CLIP text encoder, CLIP tokenizer)
    sd3/                       StableDiffusion3Pipeline folder (MMDiT, the CLIP text tower twice, no T5; the VAE
                               weights and the tokenizer are links into sd/)
    build_info.json            settings, seeds, timings and measured quality of every part
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


@dataclass
class BuildSettings:
    seed: int = 0  # every part derives its seed from this
    clip_steps: int = 2500  # contrastive steps of the small CLIP
    clip_batch: int = 128  # scenes per contrastive batch
    head_train: int = 20000  # renders the aesthetic head is fitted on
    head_steps: int = 3000  # Adam steps of the head
    eval_scenes: int = 1000  # held-out renders for the quality figures
    sd_vae_steps: int = 1000  # autoencoder steps (batch sd_vae_batch); trains while the CLIP does
    sd_vae_batch: int = 16  # renders per autoencoder batch
    sd_unet_steps: int = 4500  # denoiser steps (the text encoder is the CLIP's, frozen)
    sd_batch: int = 32  # latents per denoiser batch
    sd_pool: int = 20000  # training renders encoded once for the denoiser
    sd_eval_prompts: int = 100  # held-out prompts sampled to measure the text-to-image model
    flow_steps: int = 5000  # flow-matching transformer steps (VAE shared with sd/, text tower the CLIP's, frozen)
    flow_batch: int = 32  # latents per flow-matching batch
    flow_pool: int = 10000  # training renders encoded once for the flow-matching model
    flow_lr: float = 6e-3  # AdamW peak learning rate of the flow-matching transformer (cosine schedule)
    flow_sigma_mean: float = 1.5  # logit-normal mean of its training noise levels (> 0: more training where shape is decided)

    @classmethod
    def miniature(cls) -> BuildSettings:
        """A few-minute build for tests: every part trained briefly, same code paths."""
        return cls(
            clip_steps=60,
            clip_batch=64,
            head_train=2000,
            head_steps=300,
            eval_scenes=200,
            sd_vae_steps=40,
            sd_vae_batch=16,
            sd_unet_steps=60,
            sd_batch=16,
            sd_pool=512,
            sd_eval_prompts=16,
            flow_steps=40,
            flow_batch=8,
            flow_pool=256,
        )


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def build_rewards(
    out: Path,
    s: BuildSettings,
    log: Callable[[str], None] = print,
    on_clip_saved: Callable[[], None] | None = None,
    clip_poll: Callable[[int], None] | None = None,
) -> dict:
    """Train and save the small CLIP and the aesthetic head; return their quality figures.

    ``on_clip_saved`` is called as soon as ``out/clip`` is written (the text-to-image model conditions on it);
    ``clip_poll(step)`` before every CLIP step.
    """
    from .clip import embed_images, save_clip, save_head, spearman, train_aesthetic_head, train_clip, zero_shot_accuracy
    from .world import gold_aesthetic, render_batch, sample_scenes, to_tensor

    t0 = time.time()
    model, cfg, tokenizer = train_clip(steps=s.clip_steps, batch_size=s.clip_batch, seed=s.seed, log=log, poll=clip_poll)
    save_clip(model, cfg, out / "clip")
    if on_clip_saved is not None:
        on_clip_saved()
    head = train_aesthetic_head(model, n_train=s.head_train, steps=s.head_steps, seed=s.seed, log=log)
    save_head(head, out / "aesthetic_head.safetensors")
    scenes = sample_scenes(s.eval_scenes, seed=s.seed * 1_000_003 + 424_242)
    emb = embed_images(model, to_tensor(render_batch(scenes)))
    acc = zero_shot_accuracy(model, tokenizer, scenes, image_embeddings=emb)
    with torch.no_grad():
        pred = head(emb).squeeze(-1).numpy()
    quality = {
        "zero_shot_shape": acc["shape"],
        "zero_shot_colour": acc["colour"],
        "head_spearman": spearman(pred, [gold_aesthetic(x) for x in scenes]),
        "seconds": time.time() - t0,
    }
    log(f"rewards: {quality}")
    return quality


def _prefixed_print(prefix: str, message: str) -> None:
    print(f"{prefix}{message}", flush=True)


def _sd_worker(out: Path, s: BuildSettings, events) -> dict:
    """The text-to-image part in a child process: one thread, a second one once the rewards part is done.

    ``events``: (CLIP saved, rewards part done, rewards part failed, this part waits for the CLIP).
    """
    from functools import partial

    from .sd import build_sd, load_text_encoder

    torch.set_num_threads(1)
    torch.manual_seed(s.seed)
    clip_saved, rewards_done, failed, sd_waiting = events
    parent = os.getppid()

    def check_parent() -> None:  # a killed build (Ctrl-C, kill) must not leave this process training
        if os.getppid() != parent:
            raise RuntimeError("the build process has gone; stopping the text-to-image part")

    def text_encoder():
        sd_waiting.set()  # the CLIP may take this process's core until it is saved
        while not clip_saved.wait(5.0):
            check_parent()
            if failed.is_set():
                raise RuntimeError("the rewards part failed before saving the toy CLIP")
        return load_text_encoder(out / "clip")

    def poll(step: int) -> None:
        check_parent()
        if failed.is_set():  # the build has failed already: do not train for minutes more
            raise RuntimeError("the rewards part failed; stopping the text-to-image part")
        if rewards_done.is_set() and torch.get_num_threads() < 2:
            torch.set_num_threads(2)

    return build_sd(out, s, partial(_prefixed_print, "[sd] "), text_encoder=text_encoder, poll=poll)


def build(
    out: Path | str = ASSETS_DIR,
    settings: BuildSettings | None = None,
    parts: tuple = ("rewards", "sd", "flow"),
    log: Callable[[str], None] = print,
    jobs: int = 1,
) -> dict:
    """Train the requested parts into ``out`` and write ``build_info.json``; return the info dict.

    The text-to-image model conditions on the text tower of the toy CLIP, so ``sd`` alone needs ``out/clip``;
    ``flow`` (the flow-matching miniature, :mod:`.flow`) needs ``out/clip`` and ``out/sd`` (it shares the VAE)
    and is trained after them, with all the threads.
    ``jobs=2`` trains the two parts at once in two single-threaded processes: the autoencoder while the CLIP
    trains (the CLIP takes the second thread once the autoencoder is done), then the UNet while the aesthetic
    head trains (the UNet takes the second thread when that is done).
    On 2 cores this beats one process with 2 threads: the models are small, so threads mostly wait on each
    other. Every part draws from its own seeds: the artifacts depend on ``jobs`` only through float rounding.
    """
    s = settings or BuildSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / "build_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info["settings"] = asdict(s)
    order = [p for p in ("rewards", "sd") if p in parts]
    parallel = jobs > 1 and len(order) > 1
    flow = "flow" in parts
    if order:  # how the CLIP, head and text-to-image parts were trained (a flow-only call keeps the record)
        info["jobs"] = 2 if parallel else 1
        info["torch_threads"] = 1 if parallel else torch.get_num_threads()
    t0 = time.time()
    if parallel:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            events = (manager.Event(), manager.Event(), manager.Event(), manager.Event())
            child = pool.submit(_sd_worker, out, s, events)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)

            def clip_poll(step: int) -> None:  # the autoencoder is done and the UNet waits: use both cores
                if step % 10 == 0 and torch.get_num_threads() < 2 and events[3].is_set():
                    torch.set_num_threads(2)

            def clip_saved() -> None:  # the UNet starts now: back to one core each
                torch.set_num_threads(1)
                events[0].set()

            try:
                torch.manual_seed(s.seed)
                info["rewards"] = build_rewards(out, s, log, on_clip_saved=clip_saved, clip_poll=clip_poll)
            except BaseException:
                events[2].set()
                raise
            finally:
                events[1].set()
                torch.set_num_threads(threads)
            _write_json(info_path, info)
            info["sd"] = child.result()
    else:
        for part in order:
            torch.manual_seed(s.seed)
            if part == "rewards":
                info[part] = build_rewards(out, s, log)
            else:
                from .sd import build_sd

                info[part] = build_sd(out, s, log)
            _write_json(info_path, info)
    if flow:
        from .flow import build_flow

        if parallel:
            _write_json(info_path, info)
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, jobs))
        try:
            info["flow"] = build_flow(out, s, log)
            info["flow"]["torch_threads"] = torch.get_num_threads()
        finally:
            torch.set_num_threads(threads)
    info["seconds_this_call"] = time.time() - t0
    info["seconds"] = sum(info[p]["seconds"] for p in ("rewards", "sd", "flow") if p in info)  # all parts, even if built apart
    if order == ["rewards", "sd"]:
        info["wall_seconds"] = info["seconds_this_call"]
    _write_json(info_path, info)
    return info
