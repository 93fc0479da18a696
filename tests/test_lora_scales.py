"""early_stop.lora_scales: a stage's LoRA tried at scales above 1 against the target (LoRA extrapolation), and
final/ delivered with the scale multiplied into its weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_eval_early_stop import ScriptedTask

from raft_diffusion.core.early_stop import EarlyStopper, read_stop
from raft_diffusion.core.errors import ConfigError
from raft_diffusion.core.loop import run_raft
from raft_diffusion.core.lora_scale import scale_lora_dir, scaled_lora
from raft_diffusion.core.rundir import RunDir
from raft_diffusion.diffusion.config import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def _lora_linear(seed: int = 0):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0"]), model)
    with torch.no_grad():
        model[0].lora_B["default"].weight.normal_()  # peft starts B at zero: give the LoRA a change to scale
    return model


def test_scaled_lora_is_the_base_plus_scale_times_the_change_and_restores_the_bytes():
    model = _lora_linear()
    layer = model[0]
    x = torch.randn(3, 6)
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    A, B = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    delta = (4 / 2) * B @ A  # alpha / r x B A
    before = model(x).detach()
    assert torch.allclose(before, x @ (W + delta).T + b, atol=1e-5)
    with scaled_lora(model, 1.6):
        assert torch.allclose(model(x), x @ (W + 1.6 * delta).T + b, atol=1e-5)
    assert torch.equal(layer.lora_B["default"].weight, B) and torch.equal(model(x), before)
    with scaled_lora(model, 1.0):  # scale 1: nothing changes
        assert torch.equal(model(x), before)
    with pytest.raises(RuntimeError), scaled_lora(model, 2.0):  # an error inside still gives the bytes back
        raise RuntimeError("inside")
    assert torch.equal(layer.lora_B["default"].weight, B)
    with pytest.raises(ValueError, match="the model has none"), scaled_lora(torch.nn.Linear(2, 2), 1.5):
        pass


def test_scale_lora_dir_multiplies_only_lora_b_and_keeps_the_metadata(tmp_path):
    src, dst = tmp_path / "lora", tmp_path / "final"
    src.mkdir()
    tensors = {"unet.x.lora_A.weight": torch.randn(2, 6), "unet.x.lora_B.weight": torch.randn(5, 2), "unet.x.alpha": torch.tensor(4.0)}
    save_file(tensors, str(src / "w.safetensors"), metadata={"rank": "2"})
    (src / "README.md").write_text("card")
    dst.mkdir()
    (dst / "stale.txt").write_text("old")  # replaced, not merged
    scale_lora_dir(src, dst, 1.3)
    out = load_file(str(dst / "w.safetensors"))
    assert torch.equal(out["unet.x.lora_B.weight"], tensors["unet.x.lora_B.weight"] * 1.3)
    assert torch.equal(out["unet.x.lora_A.weight"], tensors["unet.x.lora_A.weight"]) and torch.equal(out["unet.x.alpha"], tensors["unet.x.alpha"])
    with safe_open(str(dst / "w.safetensors"), framework="pt") as f:
        assert f.metadata() == {"rank": "2"}
    assert sorted(p.name for p in dst.iterdir()) == ["README.md", "w.safetensors"]
    assert torch.equal(load_file(str(src / "w.safetensors"))["unet.x.lora_B.weight"], tensors["unet.x.lora_B.weight"])  # source untouched


# --- the stopper ------------------------------------------------------------------------------


def _rows():
    base = {"stage": 0, "eval_reward_mean": 5.0, "eval_reward_std": 2.0, "eval_diversity": 1.0}
    return [base, {"stage": 1, "eval_reward_mean": 6.0, "eval_reward_std": 1.0, "eval_diversity": 0.9}]


def test_a_scaled_row_counts_for_the_target_above_the_floors_only_and_never_fires_a_floor():
    stopper = EarlyStopper(target_rise_sd=1.0, patience=1, floors=[("eval_diversity", "diversity", 0.7)])
    rows = _rows()
    # stage 2 at scale 1.6: reaches the target (7.2 >= 7) but under the diversity floor: no stop, no floor stop
    under = rows + [{"stage": 2, "eval_reward_mean": 7.2, "eval_reward_std": 1.0, "eval_diversity": 0.6, "eval_lora_scale": 1.6}]
    assert stopper(under) is None
    # the same figures at scale 1 fire the floor
    assert stopper(under[:2] + [{**under[2], "eval_lora_scale": 1.0}]).startswith("diversity eval_diversity 0.6 at stage 2 fell below 0.7")
    # patience reads the trained rows only: a scaled row neither sets the best nor is the latest
    assert stopper(rows + [{"stage": 2, "eval_reward_mean": 5.5, "eval_lora_scale": 1.3}]) is None
    assert stopper(rows + [{"stage": 2, "eval_reward_mean": 5.5}]).startswith("eval_reward_mean has not improved")
    # above the floors it stops the run, and final/ is that stage
    above = rows + [{"stage": 2, "eval_reward_mean": 7.2, "eval_reward_std": 1.0, "eval_diversity": 0.8, "eval_lora_scale": 1.6}]
    assert (
        stopper(above) == "target reached: eval_reward_mean 7.2 at stage 2 with its LoRA at scale 1.6 rose 1.1 base sd (early_stop.target_rise_sd 1)"
    )
    assert stopper.best_stage(above) == 2
    assert stopper.best_stage(under) == 1  # the scaled stage under the floor is not delivered


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["early_stop.lora_scales=[0.8]"], "early_stop.lora_scales must be a list of finite scales above 1 in ascending order"),
        (["early_stop.lora_scales=[1.6,1.3]"], "early_stop.lora_scales must be a list of finite scales above 1 in ascending order"),
        (["early_stop.lora_scales=[1.3,.inf]"], "early_stop.lora_scales must be a list of finite scales above 1"),
        (["early_stop.lora_scales=[]"], "early_stop.lora_scales must be a list of finite scales above 1"),
        (["early_stop.lora_scales=1.5"], "early_stop.lora_scales must be a list of finite scales above 1"),
        (["early_stop.lora_scales=[1.3]", "eval.screen_per_prompt=2"], "set early_stop.target_rise_sd (e.g. 1.0) and eval.screen_per_prompt"),
        (["early_stop.lora_scales=[1.3]", "early_stop.target_rise_sd=1"], "set early_stop.target_rise_sd (e.g. 1.0) and eval.screen_per_prompt"),
        (
            ["early_stop.lora_scales=[1.3]", "early_stop.target_rise_sd=1", "eval.screen_per_prompt=2", "train.method=full"],
            "early_stop.lora_scales scales a LoRA, and train.method is 'full'",
        ),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({"eval": {"every": 6}}, overrides)


# --- the loop -----------------------------------------------------------------------------------


class Scaled(ScriptedTask):
    """Scripted held-out means per (stage, LoRA scale); a saved 'LoRA' whose lora_B is the stage number."""

    def __init__(self, evals, screens):
        super().__init__([evals[0][1.0]])
        self.evals, self.screens = evals, screens
        self.scale = 1.0
        self.evaluated, self.screened = [], []

    def lora_scaled(self, scale):
        task = self

        class Scope:
            def __enter__(self):
                task.scale = scale

            def __exit__(self, *exc):
                task.scale = 1.0

        return Scope()

    def save(self, stage_dir):
        (stage_dir / "w").mkdir(parents=True, exist_ok=True)
        w = {"m.lora_A.weight": torch.ones(1, 2), "m.lora_B.weight": torch.full((2, 1), float(self.weights))}
        save_file(w, str(stage_dir / "w" / "lora.safetensors"))

    def restore(self, stage_dir):
        self.weights = int(load_file(str(stage_dir / "w" / "lora.safetensors"))["m.lora_B.weight"][0, 0])

    def evaluate(self, stage, stage_dir):
        self.evaluated.append((stage, self.scale))
        div = self.evals[stage].get(("div", self.scale), 0.9)
        return {
            "eval_reward_mean": self.evals[stage][self.scale],
            "eval_reward_std": 2.0 if stage == 0 else 1.0,
            "eval_diversity": div,
            "eval_reward_queries": 8,
        }

    def screen(self, stage, stage_dir, per_prompt):
        self.screened.append((stage, self.scale))
        return {"screen_reward_mean": self.screens[stage][self.scale], "screen_reward_std": 1.0, "screen_n": 4, "eval_reward_queries": 4}


def _scaled_run(root, evals, screens, *overrides):
    cfg = config_from_dict(
        {"num_stages": 6, "progress": False, "sampling": {"num_per_prompt": 2}},
        ["eval.every=6", "eval.screen_per_prompt=2", "early_stop.target_rise_sd=1.0", "early_stop.lora_scales=[1.3,1.6]", *overrides],
    )
    cfg.early_stop.min_diversity_ratio = 0.7  # the scripted task's eval_diversity (no CLIP needed)
    run = RunDir(root)
    run.start(cfg.to_dict())
    task = Scaled(evals, screens)
    rows = run_raft(cfg, task, run, should_stop=cfg.stopper())
    return run, task, rows


# target: 5 + 1 x 2 = 7; a screen of 4 with std 1 is near it from 6.0 (6 + 2 x 1/2 = 7)
BASE = {1.0: 5.0, ("div", 1.0): 1.0}


def test_the_least_scale_whose_screen_reaches_the_target_is_evaluated_and_delivered(tmp_path):
    evals = [BASE, {}, {1.0: 6.6, 1.3: 7.1, 1.6: 7.4}]
    screens = [None, {1.6: 5.5}, {1.6: 7.3, 1.0: 6.5, 1.3: 7.05}]
    run, task, rows = _scaled_run(tmp_path, evals, screens)
    # stage 1: only the largest scale screened, far short (5.5 + 1 < 7): training goes on. Stage 2: the largest
    # scale reaches the target, so 1 and 1.3 are screened, and 1.3 (the first to reach it) is evaluated in full
    assert task.screened == [(1, 1.6), (2, 1.6), (2, 1.0), (2, 1.3)]
    assert task.evaluated == [(0, 1.0), (2, 1.3)] and task.stages_run == [1, 2]
    saved = {r["stage"]: r for r in run.metrics()}
    assert saved[1]["screen_reward_mean"] == 5.5 and saved[1]["screen_lora_scale"] == 1.6 and "eval_reward_mean" not in saved[1]
    assert saved[2]["eval_reward_mean"] == 7.1 and saved[2]["eval_lora_scale"] == 1.3 and saved[2]["screen_lora_scale"] == 1.3
    assert saved[2]["lora_screen_estimates"] == [[1.6, 7.3], [1.0, 6.5], [1.3, 7.05]]
    assert saved[2]["eval_reward_queries"] == 8 + 4 + 3 * 4 + 8  # every screen is counted
    stop = read_stop(run.root)
    assert stop["final_stage"] == 2 and stop["final_lora_scale"] == 1.3 and "at scale 1.3" in stop["reason"]
    final = load_file(str(run.final_dir / "lora.safetensors"))
    assert torch.equal(final["m.lora_B.weight"], torch.full((2, 1), 2.0) * 1.3) and torch.equal(final["m.lora_A.weight"], torch.ones(1, 2))
    # the stage's own LoRA stays at scale 1 (training and resume read it)
    assert torch.equal(load_file(str(run.stage_dir(2) / "w" / "lora.safetensors"))["m.lora_B.weight"], torch.full((2, 1), 2.0))


def test_a_near_but_short_largest_scale_is_evaluated_in_full_without_more_screens(tmp_path):
    # stage 1: the screen at 1.6 is short of 7 but within two standard errors (6.4 + 1 >= 7): evaluated in full at
    # 1.6, short (6.8); stage 2: evaluated at 1.6 again and reaches 7.2 above the floor: delivered at 1.6
    evals = [BASE, {1.6: 6.8}, {1.6: 7.2}]
    screens = [None, {1.6: 6.4}, {1.6: 6.9}]
    run, task, rows = _scaled_run(tmp_path, evals, screens)
    assert task.screened == [(1, 1.6), (2, 1.6)] and task.evaluated == [(0, 1.0), (1, 1.6), (2, 1.6)]
    assert read_stop(run.root)["final_lora_scale"] == 1.6
    assert torch.equal(load_file(str(run.final_dir / "lora.safetensors"))["m.lora_B.weight"], torch.full((2, 1), 2.0) * 1.6)


def test_a_scaled_stage_under_a_floor_lets_training_go_on_and_scale_1_delivers_plainly(tmp_path):
    # stage 2 at 1.6 reaches the target under the diversity floor (0.6 < 0.7): no stop, no floor stop. Stage 3's
    # screen at 1 reaches the target: evaluated at scale 1 (7.3, diversity 0.8) and delivered as trained
    evals = [BASE, {}, {1.6: 7.4, ("div", 1.6): 0.6}, {1.0: 7.3, ("div", 1.0): 0.8}]
    screens = [None, {1.6: 5.0}, {1.6: 7.5, 1.0: 6.6, 1.3: 6.9}, {1.6: 8.0, 1.0: 7.2}]
    run, task, rows = _scaled_run(tmp_path, evals, screens)
    assert task.evaluated == [(0, 1.0), (2, 1.6), (3, 1.0)] and task.stages_run == [1, 2, 3]
    saved = {r["stage"]: r for r in run.metrics()}
    assert saved[2]["eval_lora_scale"] == 1.6 and "eval_lora_scale" not in saved[3] and "screen_lora_scale" not in saved[3]
    stop = read_stop(run.root)
    assert stop["final_stage"] == 3 and "final_lora_scale" not in stop
    assert torch.equal(load_file(str(run.final_dir / "lora.safetensors"))["m.lora_B.weight"], torch.full((2, 1), 3.0))


# --- the diffusion task ---------------------------------------------------------------------------


def test_the_diffusion_task_evaluates_the_scaled_lora_that_final_reloads_in_diffusers(tiny_pipeline_dir, tmp_path):
    """The tiny pipeline with a LoRA: the held-out rewards at scale 1.5 are those of the images diffusers draws with
    the folder scale_lora_dir wrote (loaded at weight 1); they differ from scale 1's; and a screen at one scale is
    never reused by a full evaluation at another."""
    from diffusers import StableDiffusionPipeline

    from raft_diffusion.core.lora_scale import lora_b_parameters
    from raft_diffusion.diffusion.generate import encode_prompts, generate_batch
    from raft_diffusion.diffusion.task import DiffusionTask

    cfg = load_config(
        ROOT / "configs" / "tiny.yaml", [f"model.pretrained={tiny_pipeline_dir}", "progress=false", "eval.clip_model=null", "eval.num_per_prompt=2"]
    )
    task = DiffusionTask(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora_b_parameters(task.denoiser):  # a LoRA that changes the images (peft starts B at zero)
            p.normal_(0.0, 0.05)
    task.save(tmp_path / "stage")
    dirs = {name: tmp_path / name for name in ("plain", "screened", "scaled")}
    for d in dirs.values():
        d.mkdir()
    task.evaluate(1, dirs["plain"])
    with task.lora_scaled(1.5):
        task.screen(1, dirs["screened"], 2)  # cached for scale 1.5 only
    task.evaluate(1, dirs["screened"])  # at scale 1: must not reuse the 1.5 screen's images
    with task.lora_scaled(1.5):
        task.evaluate(1, dirs["scaled"])
    plain, again, scaled = ([json.loads(line) for line in (dirs[n] / "eval.jsonl").read_text().splitlines()] for n in ("plain", "screened", "scaled"))
    assert [r["reward"] for r in again] == pytest.approx([r["reward"] for r in plain], abs=1e-5)
    assert max(abs(a["reward"] - b["reward"]) for a, b in zip(plain, scaled)) > 1e-3

    scale_lora_dir(task.weights_dir(tmp_path / "stage"), tmp_path / "final", 1.5)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir), safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "final"))
    reward = task.reward
    for row in scaled[:3]:
        emb, neg = encode_prompts(pipe, [row["prompt"]], None, True)
        img = generate_batch(pipe, emb, neg, [row["seed"]], num_inference_steps=4, guidance_scale=cfg.eval_guidance_scale, height=32, width=32)[1]
        assert float(reward(img, [row["prompt"]])[0]) == pytest.approx(row["reward"], abs=1e-4)


def test_align_delivers_a_stage_at_a_scale_with_the_scale_in_final(tiny_pipeline_dir, tmp_path):
    """`raft-diffusion align` on the tiny pipeline with a small target and scales [2, 3]: stage 1 is screened at 3
    first; the stage and scale that meet the target are evaluated, and final/ holds that stage's LoRA with lora_B
    multiplied by the scale (lora_A and every other byte of the stage's LoRA the same)."""
    from test_align_e2e import align

    from raft_diffusion.core.rundir import read_jsonl

    out = tmp_path / "run"
    overrides = ["eval.every=2", "eval.screen_per_prompt=2", "early_stop.target_rise_sd=0.02", "early_stop.lora_scales=[2,3]"]
    assert align(out, tiny_pipeline_dir, *overrides) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    first = rows[1]
    assert first["lora_screen_estimates"][0][0] == 3 and first["screen_lora_scale"] in (2, 3)
    stop = read_stop(out)
    assert stop is not None and stop["final_stage"] == 1 and stop["final_lora_scale"] == first["eval_lora_scale"] == first["screen_lora_scale"]
    scale = stop["final_lora_scale"]
    final = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    stage = load_file(str(out / "stages" / "001" / "lora" / "pytorch_lora_weights.safetensors"))
    assert final.keys() == stage.keys() and any(".lora_B." in k for k in final)
    for k, v in stage.items():
        assert torch.equal(final[k], v * scale if ".lora_B." in k else v), k


def test_after_a_floor_stop_a_stage_that_failed_a_floor_at_a_scale_is_evaluated_as_trained(tmp_path):
    # stage 2 at 1.6 fails the diversity floor; stage 3 is screened short; stage 6 (the last, evaluated at scale 1)
    # fails the floor and stops the run. eval.fallback evaluates the stages left out, newest first: 5, 4, 3 (each
    # under the floor), then 2, now at scale 1 (7.2 above the floor): final/ = stage 2 as trained
    evals = [BASE, {}, {1.6: 7.4, ("div", 1.6): 0.6, 1.0: 7.2, ("div", 1.0): 0.8}]
    evals += [{1.0: 7.0, ("div", 1.0): 0.6}] * 4
    screens = [None, {1.6: 5.0}, {1.6: 7.5, 1.0: 6.6, 1.3: 6.9}] + [{1.6: 5.0}] * 3 + [None]
    run, task, rows = _scaled_run(tmp_path, evals, screens)
    assert task.evaluated == [(0, 1.0), (2, 1.6), (6, 1.0), (5, 1.0), (4, 1.0), (3, 1.0), (2, 1.0)]
    saved = {r["stage"]: r for r in run.metrics()}
    assert saved[2]["eval_fallback"] and "eval_lora_scale" not in saved[2] and saved[2]["eval_reward_mean"] == 7.2
    stop = read_stop(run.root)
    assert stop["final_stage"] == 2 and "final_lora_scale" not in stop and stop["evaluated_after_stop"] == [2, 3, 4, 5]
    assert torch.equal(load_file(str(run.final_dir / "lora.safetensors"))["m.lora_B.weight"], torch.full((2, 1), 2.0))
