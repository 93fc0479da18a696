#!/usr/bin/env python
"""RAFT against DDPO (trl 0.23's DDPOTrainer) on the toy world: gold against diversity, side by side.

Issue 24 asks RAFT to win everywhere on the reward-against-diversity frontier that reinforcement learning draws. This
bench draws both on one evaluator. Both sides get the same toy SD pipeline, the same proxy reward, the same 12
training prompts, the same LoRA (rank, alpha and target modules from the RAFT config), the same seed and one torch
thread. Each side runs in its own process; its cost is that process's CPU seconds (user + system).

- **RAFT**: ``raft-diffusion align`` on ``--config`` (default: the max preset) with every stage evaluated and the
  floors, patience and fallback off, ``--raft-stages`` stages (default: the config's own plus two), so its whole
  path is seen. Stages are the same as in a run evaluated less often. Its CPU seconds leave out the held-out
  evaluations (``eval_seconds`` in ``metrics.jsonl``); start-up is in them.
- **DDPO**: trl 0.23's ``DDPOTrainer`` (trl removed it in 0.24), run with ``--ddpo-python``: an interpreter that has
  trl 0.23, such as a venv of its own made with ``pip install -e ".[ddpo]"`` (it clashes with the ``grpo`` extra's
  trl >= 1). Two things are adapted, not changed: the LoRA is RAFT's unless ``--ddpo-lora trl`` asks for the one
  trl's pipeline adds by default (rank 4 on the attention projections), and at guidance 1 the negative-prompt
  embeddings are left off the batch (trl samples through diffusers' deprecated ``_encode_prompt``, which now stacks
  them on even without guidance). It samples with DDIM at eta 1 at the RAFT config's step count and
  ``--ddpo-guidance`` (default 1, as RAFT's pools), 32 images an epoch (2 batches of 16), advantages tracked per
  prompt, two optimizer steps an epoch over every timestep of each trajectory, PPO clipping, learning rate
  ``--ddpo-lr`` (default 1e-3, the setting that learned in the issue). Its LoRA is saved after every
  ``--ddpo-every`` images with the CPU seconds spent until then (from the end of model loading), and each save is
  evaluated afterwards, in this process, on the RAFT run's held-out images.

Every point is then measured as ``scripts/bench_toyworld.py`` measures a stage: proxy rise in base sd, paired gold
rise with a bootstrap interval, oracle fidelity, diversity as a share of the base's (the same 128 held-out images,
prompts and seeds for both sides). Then, for each RAFT stage, DDPO's gold at the same diversity, interpolated
linearly along DDPO's path (the first crossing), with the CPU seconds DDPO spent to get there, and DDPO's gold and
diversity at the same proxy rise.

    python scripts/bench_ddpo.py --ddpo-python /path/to/trl023-venv/bin/python
    python scripts/bench_ddpo.py --ddpo-python PY --raft-run-dir RUN --ddpo-dir DIR   # reuse finished sides
    python scripts/bench_ddpo.py --ddpo-python PY --ddpo-lora trl --ddpo-dir runs/ddpo_trl seed=1

``--plot`` draws gold against diversity and against the proxy rise; ``--json`` writes every row, with DDPO's gold,
proxy or diversity and CPU seconds where its path meets each RAFT stage's diversity (``ddpo_at_diversity``) and
proxy (``ddpo_at_proxy``; null where it never does).

The line before the last: ``gold_vs_ddpo_at_equal_proxy: <the same stage's gold rise minus DDPO's at that stage's
proxy rise>`` (issue 24's second goal compares there). Last line: ``gold_vs_ddpo_at_equal_diversity: <RAFT's gold
rise at --raft-stage (default: the config's last stage) minus DDPO's at that stage's diversity>``; positive means
RAFT is above DDPO's frontier there; ``nan`` where DDPO's path never gets there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from raft_diffusion.core.clock import process_cpu_seconds  # noqa: E402
from raft_diffusion.core.rundir import read_jsonl  # noqa: E402

EPOCH_IMAGES = 32  # DDPO: 2 sampling batches of 16 an epoch
FLOORS_OFF = ["eval.every=1", "early_stop.min_diversity_ratio=null", "early_stop.min_fidelity_ratio=null",
              "early_stop.patience=null", "eval.fallback=false"]  # fmt: skip


def save_unet_lora(unet, out_dir: Path) -> Path:
    """The UNet's LoRA as ``raft-diffusion`` saves a stage's (``unet.``-prefixed peft keys in
    ``pytorch_lora_weights.safetensors``), so the family's ``load_lora`` reads it into the RAFT task's adapter."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from raft_diffusion.diffusion.families.lora import LORA_WEIGHT_NAME

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    save_file(state, str(out_dir / LORA_WEIGHT_NAME))
    return out_dir


def lora_settings(cfg, which: str) -> dict:
    """DDPO's LoRA: the RAFT config's (``raft``) or the one trl's pipeline adds by default (``trl``: rank 4, alpha 4,
    the attention projections)."""
    if which == "trl":
        return {"rank": 4, "alpha": 4.0, "targets": ["to_k", "to_q", "to_v", "to_out.0"]}
    return {"rank": cfg.train.lora_rank, "alpha": cfg.train.lora_alpha, "targets": list(cfg.train.target_modules)}


def along(path: list[dict], by: str, target: float, key: str) -> float | None:
    """``key`` of ``path`` (points in training order) where its ``by`` first reaches ``target`` (rising or falling),
    interpolated linearly between the two points around the crossing; None if ``by`` never gets there."""
    for a, b in zip(path, path[1:]):
        va, vb = a[by], b[by]
        if min(va, vb) <= target <= max(va, vb):
            w = 0.0 if va == vb else (target - va) / (vb - va)
            return a[key] + w * (b[key] - a[key])
    return None


# -- the DDPO side (runs under --ddpo-python) ------------------------------------------------------------------------
def ddpo_worker(spec: dict) -> None:
    import random

    import torch
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from raft_diffusion.diffusion.families.lora import add_lora
    from raft_diffusion.diffusion.prompts import load_prompts
    from reward_models import load_reward_from_config

    torch.set_num_threads(1)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    lora = spec["lora"]

    class Pipeline(DefaultDDPOStableDiffusionPipeline):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sd = self.sd_pipeline

            def encode(prompt, device, n, cfg, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                       lora_scale=None, **_):  # fmt: skip
                # trl samples through diffusers' deprecated _encode_prompt, which now stacks the negative embeddings
                # on the batch even when guidance is off (guidance 1): stack them only when guidance is on
                pos, neg = sd.encode_prompt(prompt, device, n, cfg, negative_prompt, prompt_embeds=prompt_embeds,
                                            negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale)  # fmt: skip
                return torch.cat([neg, pos]) if cfg else pos

            sd._encode_prompt = encode

        def get_trainable_layers(self):  # RAFT's LoRA (rank, alpha, targets, Gaussian A, zero B), not trl's rank 4
            add_lora(self.sd_pipeline.unet, rank=lora["rank"], alpha=lora["alpha"], dropout=0.0,
                     targets=lora["targets"], init_seed=spec["seed"])  # fmt: skip
            return self.sd_pipeline.unet

    PartialState()  # trl's pipeline logs through accelerate before the trainer would set it up
    pipe = Pipeline(spec["pretrained"], use_lora=True)
    reward = load_reward_from_config(spec["reward"], device="cpu")
    prompts = load_prompts(spec["prompts"])
    rng = random.Random(spec["seed"])

    def prompt_fn():
        return rng.choice(prompts), {}

    rewards = []  # every sample's, for the pool mean logged at each save

    def reward_fn(images, batch_prompts, _metadata):
        scores = torch.as_tensor(reward(images.float().clamp(0, 1), list(batch_prompts)), dtype=torch.float32)
        rewards.extend(scores.tolist())
        return scores, {}

    config = DDPOConfig(
        num_epochs=spec["epochs"], seed=spec["seed"], mixed_precision="no", log_with=None, save_freq=10**9,
        sample_num_steps=spec["steps"], sample_eta=1.0, sample_guidance_scale=spec["guidance"],
        sample_batch_size=16, sample_num_batches_per_epoch=EPOCH_IMAGES // 16,
        train_batch_size=8, train_gradient_accumulation_steps=2, train_learning_rate=spec["lr"],
        train_cfg=spec["guidance"] > 1, per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=32,
        per_prompt_stat_tracking_min_count=16, project_kwargs={"project_dir": str(out / "trl")},
    )  # fmt: skip
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipe)
    start = process_cpu_seconds()
    step = 0
    with (out / "checkpoints.jsonl").open("a") as log:
        for epoch in range(spec["epochs"]):
            step = trainer.step(epoch, step)
            images = (epoch + 1) * EPOCH_IMAGES
            if images % spec["every"] == 0 or epoch == spec["epochs"] - 1:
                cpu = process_cpu_seconds() - start
                ck = save_unet_lora(pipe.sd_pipeline.unet, out / f"ckpt_{images:05d}")
                recent = rewards[-spec["every"] :]
                row = {"images": images, "cpu_seconds": round(cpu, 1), "dir": ck.name,
                       "pool_reward_mean": round(sum(recent) / len(recent), 4)}  # fmt: skip
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"ddpo: {images} images, {cpu:.0f} CPU s, pool reward {row['pool_reward_mean']:.3f}", flush=True)


# -- this process: run both sides, evaluate, compare -----------------------------------------------------------------
def run_ddpo(args, cfg, out: Path) -> list[dict]:
    """DDPO's checkpoints (from ``out/checkpoints.jsonl``), training them first unless the log is complete."""
    log = out / "checkpoints.jsonl"
    done = read_jsonl(log)
    if not done or done[-1]["images"] < args.ddpo_images:
        if done:
            raise SystemExit(f"error: {out} holds an unfinished DDPO run ({done[-1]['images']} images): remove it or "
                             "give another --ddpo-dir")  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        spec = {
            "out": str(out), "seed": cfg.seed, "pretrained": cfg.model.pretrained, "reward": cfg.reward,
            "prompts": cfg.prompts.train, "steps": cfg.sampling.num_inference_steps, "guidance": args.ddpo_guidance,
            "lr": args.ddpo_lr, "epochs": math.ceil(args.ddpo_images / EPOCH_IMAGES), "every": args.ddpo_every,
            "lora": lora_settings(cfg, args.ddpo_lora),
        }  # fmt: skip
        (out / "spec.json").write_text(json.dumps(spec, indent=1) + "\n")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        proc = subprocess.run([args.ddpo_python, __file__, "--_ddpo-worker", json.dumps(spec)], env=env, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"error: the DDPO side exited with {proc.returncode} (is trl 0.23 installed for "
                             f"{args.ddpo_python}? see this script's docstring)")  # fmt: skip
        done = read_jsonl(log)
    return [c for c in done if c["images"] <= args.ddpo_images]  # a longer run's first saves serve a shorter bench


def evaluate_ddpo(raft_run: Path, ddpo: Path, checkpoints: list[dict]) -> Path:
    """``ddpo/run/``: a run folder ``bench_toyworld.measure`` reads, stage 0 the RAFT run's base evaluation and stage
    i DDPO's i-th checkpoint, evaluated by the RAFT task's own held-out evaluation."""
    import shutil

    import yaml

    from raft_diffusion.diffusion.config import config_from_dict
    from raft_diffusion.diffusion.task import DiffusionTask

    run = ddpo / "run"
    (run / "stages").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text((raft_run / "config.yaml").read_text())
    if not (run / "stages" / "000" / "eval.jsonl").is_file():
        shutil.copytree(raft_run / "stages" / "000", run / "stages" / "000", dirs_exist_ok=True)
    todo = [(i, c) for i, c in enumerate(checkpoints, 1) if not (run / "stages" / f"{i:03d}" / "eval.jsonl").is_file()]
    if todo:
        data = yaml.safe_load((raft_run / "config.yaml").read_text())
        lora = json.loads((ddpo / "spec.json").read_text())["lora"] if (ddpo / "spec.json").is_file() else None
        same = ["sampling.merge_lora=false", "progress=false"]
        if lora:  # the task's adapter as DDPO's (another rank or targets than the RAFT run's)
            same += [f"train.lora_rank={lora['rank']}", f"train.lora_alpha={lora['alpha']}",
                     f"train.target_modules=[{','.join(lora['targets'])}]"]  # fmt: skip
        task = DiffusionTask(config_from_dict(data, same))
        for i, c in todo:
            task.family.load_lora(task.denoiser, ddpo / c["dir"])
            stage_dir = run / "stages" / f"{i:03d}"
            stage_dir.mkdir(exist_ok=True)
            task.evaluate(i, stage_dir)
            print(f"ddpo: evaluated {c['images']} images", flush=True)
    return run


def raft_path(run: Path) -> list[dict]:
    """Per stage of a finished RAFT run: the images sampled so far and the CPU seconds so far without the held-out
    evaluations (``cpu_seconds`` less ``eval_seconds``, both cumulative in ``metrics.jsonl``)."""
    sampled, out = 0, []
    for r in read_jsonl(run / "metrics.jsonl"):
        sampled += r.get("num_generated", 0)
        if r["stage"] > 0:
            out.append({"stage": r["stage"], "sampled": sampled, "cpu": r["cpu_seconds"] - r.get("eval_seconds", 0.0)})
    return out


def plot(path: Path, base: dict, raft: list[dict], ddpo: list[dict], title: str) -> None:
    """Gold rise against diversity (left) and against the proxy rise (right) for both paths, each from the base;
    RAFT's points labelled with their stage, DDPO's with the images it had sampled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, 2, sharey=True)
    for ax, x in zip(panels, ("diversity_ratio", "proxy_rise_sd")):
        for name, pts, style in (("RAFT (label: stage)", raft, "o-"), ("DDPO (label: images sampled)", ddpo, "s--")):
            (line,) = ax.plot([base[x]] + [o[x] for o in pts], [base["gold_rise"]] + [o["gold_rise"] for o in pts],
                              style, label=name)  # fmt: skip
            for o in pts:
                text, at = (str(o["stage"]), (-9, 3)) if "stage" in o else (str(o["sampled"]), (4, -11))
                ax.annotate(text, (o[x], o["gold_rise"]), textcoords="offset points", xytext=at, fontsize=7,
                            color=line.get_color())  # fmt: skip
        ax.grid(alpha=0.3)
    left, right = panels
    left.plot([0.5], [2.1], "*", color="grey", markersize=10, label="issue 24's goal (gold +2.1 at 0.5)")
    lowest = min(0.5, *(o["diversity_ratio"] for o in [*raft, *ddpo]))  # the goal's star in view too
    left.set_xlim(1.02, lowest - 0.06)  # inverted: diversity falls to the right as training goes on
    left.set_xlabel("diversity (share of the base model's)")
    left.set_ylabel("gold rise over the base")
    left.legend(loc="lower right", fontsize=8)
    right.axvline(1.0, color="grey", lw=0.8, ls=":")  # the demo's proxy bar
    right.set_xlabel("proxy rise (base sd)")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def compare(path: list[dict], raft: list[dict], shown: int) -> dict[str, float | None]:
    """Adds to each RAFT stage (a row of ``raft``) DDPO's figures where ``path`` (the base, then DDPO's saves) meets
    its diversity (``ddpo_at_diversity``: gold, proxy, CPU s) and its proxy rise (``ddpo_at_proxy``: gold, diversity,
    CPU s), and returns stage ``shown``'s gold minus DDPO's at each (None where DDPO's path never gets there)."""
    for o in raft:
        o["ddpo_at_diversity"] = {k: along(path, "diversity_ratio", o["diversity_ratio"], k)
                                  for k in ("gold_rise", "proxy_rise_sd", "cpu")}  # fmt: skip
        o["ddpo_at_proxy"] = {k: along(path, "proxy_rise_sd", o["proxy_rise_sd"], k)
                              for k in ("gold_rise", "diversity_ratio", "cpu")}  # fmt: skip
    at = next((o for o in raft if o["stage"] == shown), None)
    return {
        name: None if at is None or at[by]["gold_rise"] is None else at["gold_rise"] - at[by]["gold_rise"]
        for name, by in (("gold_vs_ddpo_at_equal_diversity", "ddpo_at_diversity"), ("gold_vs_ddpo_at_equal_proxy", "ddpo_at_proxy"))  # fmt: skip
    }


def signed(x: float | None) -> str:
    return "nan" if x is None else f"{x:+.3f}"


def fmt(o: dict) -> str:
    (lo, hi), d = o["gold_rise_ci"], o["gold_rise"]
    return (f"{o['proxy_rise_sd']:6.2f} {f'{d:+.2f} [{lo:+.2f}, {hi:+.2f}]':>22s} {o['fidelity']:8.3f} "
            f"{o['diversity_ratio']:7.2f}")  # fmt: skip


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--_ddpo-worker":
        ddpo_worker(json.loads(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "toy_aesthetic_max.yaml"), help="RAFT's side")
    ap.add_argument("--raft-run-dir", default=None, help="default: runs/bench_ddpo/raft (reused when finished)")
    ap.add_argument("--raft-stages", type=int, default=None, help="default: the config's num_stages + 2")
    ap.add_argument("--raft-stage", type=int, default=None, help="the stage of the last line (default: the config's last)")
    ap.add_argument("--ddpo-python", default=sys.executable, help="an interpreter with trl 0.23 (default: this one)")
    ap.add_argument("--ddpo-dir", default=None, help="default: runs/bench_ddpo/ddpo (reused when complete)")
    ap.add_argument("--ddpo-images", type=int, default=5760, help="DDPO's budget in sampled images")
    ap.add_argument("--ddpo-every", type=int, default=960, help="save and evaluate DDPO after every N images")
    ap.add_argument("--ddpo-lr", type=float, default=1e-3)
    ap.add_argument("--ddpo-guidance", type=float, default=1.0)
    ap.add_argument("--ddpo-lora", choices=["raft", "trl"], default="raft",
                    help="DDPO's LoRA: the RAFT config's (default) or trl's own default (rank 4 on attention)")  # fmt: skip
    ap.add_argument("--plot", default=None, help="also draw gold against diversity and against proxy into this PNG")
    ap.add_argument("--json", default=None, help="also write every row and comparison to this JSON file")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the RAFT config (both sides read it)")
    args = ap.parse_args(argv)
    if args.ddpo_every % EPOCH_IMAGES or args.ddpo_images % args.ddpo_every:
        ap.error(f"--ddpo-every must be a multiple of {EPOCH_IMAGES} (a DDPO epoch) and divide --ddpo-images")

    # every module the measurement uses, loaded now (the task and the rewards too, which it imports later): the DDPO
    # side runs for up to an hour, and an edit to the package meanwhile would put two versions of it in this process
    import torch
    from bench_time_to_aligned import start_align, wait_align
    from bench_toyworld import measure

    import raft_diffusion.core.early_stop  # noqa: F401
    import raft_diffusion.diffusion.task  # noqa: F401
    import reward_models  # noqa: F401
    from raft_diffusion.diffusion.config import load_config

    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    stages = args.raft_stages or cfg.num_stages + 2
    shown = args.raft_stage or min(cfg.num_stages, stages)
    if not 1 <= shown <= stages:
        ap.error(f"--raft-stage {shown} is not one of the run's stages 1..{stages}")
    raft_run = Path(args.raft_run_dir or ROOT / "runs" / "bench_ddpo" / "raft")
    ddpo_dir = Path(args.ddpo_dir or ROOT / "runs" / "bench_ddpo" / "ddpo")

    measured = wait_align(start_align(args.config, raft_run, [*args.overrides, f"num_stages={stages}", *FLOORS_OFF]))
    if measured is not None and measured[0]:
        print(f"error: align exited with {measured[0]}", file=sys.stderr)
        return 1
    checkpoints = run_ddpo(args, cfg, ddpo_dir)
    ddpo_run = evaluate_ddpo(raft_run, ddpo_dir, checkpoints)

    raft_rows = {o["row"]: o for o in measure(raft_run)}
    ddpo_rows = measure(ddpo_run)
    raft = [{**raft_rows[f"stage {p['stage']}"], **p} for p in raft_path(raft_run) if f"stage {p['stage']}" in raft_rows]
    ddpo = [{**o, "sampled": c["images"], "cpu": c["cpu_seconds"]} for o, c in zip(ddpo_rows[1:], checkpoints)]
    base = {**ddpo_rows[0], "sampled": 0, "cpu": 0.0}

    print(f"RAFT ({raft_run}) against DDPO ({ddpo_dir}; lr {args.ddpo_lr:g}, guidance {args.ddpo_guidance:g}) on "
          f"{base['images']} held-out images; CPU s at one thread, evaluations left out")  # fmt: skip
    print(f"{'':14s} {'images':>6s} {'cpu s':>6s} {'d/sd':>6s} {'d gold [95% CI]':>22s} {'fidelity':>8s} {'divers.':>7s}")
    print(f"{'base':14s} {0:6d} {0:6.0f} {fmt(base)}")
    for o in raft:
        print(f"{'RAFT stage ' + str(o['stage']):14s} {o['sampled']:6d} {o['cpu']:6.0f} {fmt(o)}")
    for o in ddpo:
        print(f"{'DDPO':14s} {o['sampled']:6d} {o['cpu']:6.0f} {fmt(o)}")

    path = [base, *ddpo]
    print("DDPO where its path crosses each RAFT stage's diversity, and its proxy (interpolated between saves):")
    gaps = compare(path, raft, shown)
    for o in raft:
        div, dz = o["diversity_ratio"], o["proxy_rise_sd"]
        gold, cpu = o["ddpo_at_diversity"]["gold_rise"], o["ddpo_at_diversity"]["cpu"]
        if gold is None:
            line = f"DDPO never fell to diversity {div:.2f} in {ddpo[-1]['sampled']} images"
        else:
            line = f"DDPO gold {gold:+.2f} after {cpu:.0f} CPU s (RAFT {o['gold_rise'] - gold:+.2f} at {o['cpu']:.0f} CPU s)"
        gold_p, div_p = o["ddpo_at_proxy"]["gold_rise"], o["ddpo_at_proxy"]["diversity_ratio"]
        if gold_p is None:
            line += f"; DDPO never rose {dz:.2f} sd"
        else:
            line += f"; at +{dz:.2f} sd DDPO gold {gold_p:+.2f}, diversity {div_p:.2f} (RAFT {o['gold_rise'] - gold_p:+.2f})"
        print(f"  stage {o['stage']} (diversity {div:.2f}, gold {o['gold_rise']:+.2f}): {line}")
    if args.plot:
        title = f"{Path(args.config).name}, seed {cfg.seed}: RAFT against DDPO (lr {args.ddpo_lr:g}, {args.ddpo_lora} LoRA)"
        plot(Path(args.plot), base, raft, ddpo, title)
        print(f"plot: {args.plot}")
    if args.json:
        report = {"config": args.config, "seed": cfg.seed, "raft_run_dir": str(raft_run), "ddpo_dir": str(ddpo_dir),
                  "shown_stage": shown, "base": base, "raft": raft, "ddpo": ddpo, **gaps}  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"json: {args.json}")
    for name in ("gold_vs_ddpo_at_equal_proxy", "gold_vs_ddpo_at_equal_diversity"):  # the last line is the second
        print(f"{name}: {signed(gaps[name])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
