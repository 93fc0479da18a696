"""The RAFT stage loop, model-agnostic.

    for stage in 1..N:
        sample K outputs per prompt (seeded per sample) -> score -> stream into the pool
        keep the best -> fine-tune on them -> evaluate on held-out prompts -> checkpoint

A task (the diffusion or LLM adapter) supplies the model-specific steps; see :class:`~.task.RaftTask`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import faults
from .clock import process_cpu_seconds, process_seconds
from .common import paired_screen, summary
from .dist import Dist
from .early_stop import STOP_FILE, EarlyStopper, extrapolated
from .errors import ScoreError, UserError
from .lora_scale import scale_lora_dir
from .pool import StreamingPool
from .ranking import replay_pick
from .rundir import RunDir, copy_dir_atomic, read_jsonl, write_json, write_jsonl
from .seeds import sample_seed, stage_seed
from .task import RaftTask
from .types import Sample

log = logging.getLogger("raft")


def as_rewards(name: str, out, n: int) -> list[float]:
    """Validate a reward's output for a batch of ``n`` and turn it into floats (NaN = no score)."""
    if isinstance(out, torch.Tensor):
        if out.ndim != 1 or out.shape[0] != n:
            raise ScoreError(
                f"reward '{name}' returned a tensor of shape {tuple(out.shape)} for a batch of {n}; it must return shape ({n},): one score per image"
            )
        values = [float(x) for x in out.detach().float().cpu().tolist()]
    elif isinstance(out, (list, tuple)):
        if len(out) != n:
            raise ScoreError(f"reward '{name}' returned {len(out)} scores for a batch of {n}; return one per sample")
        try:
            values = [float("nan") if x is None else float(x) for x in out]
        except (TypeError, ValueError):
            raise ScoreError(f"reward '{name}' returned non-numeric scores; return floats (None = no score)") from None
    else:
        raise ScoreError(f"reward '{name}' returned {type(out).__name__}; it must return a 1-D torch.Tensor with one score per sample")
    infinite = [x for x in values if math.isinf(x)]
    if infinite:
        raise ScoreError(
            f"reward '{name}' returned {infinite[0]} for {len(infinite)} of {n} samples; scores must be finite (return NaN or None for 'no score')"
        )
    return values


def stage_prompts(cfg, stage: int, n_prompts: int) -> list[int]:
    """Indices of the training prompts used in a stage (all, or a seeded draw of ``prompts.per_stage``)."""
    per = cfg.prompts.per_stage
    if per is None or per >= n_prompts:
        return list(range(n_prompts))
    rng = random.Random(stage_seed(cfg.seed, stage, "prompts"))
    return sorted(rng.sample(range(n_prompts), per))


def read_manifest(path: str, field: str, check=None) -> list[dict]:
    """An external pool: a JSONL file of {"prompt": ..., field: ...[, "seed": int]} written by any generator.

    Every error names the file and line and says what a line must look like; ``check(row)`` may return
    a task-specific complaint about a row (reported the same way).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f'external pool manifest not found: {p} (a JSONL file with one {{"prompt", "{field}"}} object per line)')
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f'{p}:{n} is not valid JSON; each line must be an object like {{"prompt": ..., "{field}": ...}}') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get(field), str):
            raise UserError(f"{p}:{n} needs string values for 'prompt' and '{field}'")
        problem = check(row) if check else None
        if problem:
            raise UserError(f"{p}:{n} {problem}")
        rows.append(row)
    if not rows:
        raise UserError(f"external pool manifest {p} has no entries")
    return rows


def external_requests(rows: list[dict], prompts: list[str], run_seed: int, stage: int, extras) -> list[Sample]:
    """Requests for an external pool: one per manifest row, numbered per prompt in manifest order.

    A row's ``seed`` is used when it has one, else the seed the sample would have had; ``extras(row)``
    gives what the task needs to fetch the sample (an image path, a completion).
    """
    counts: dict[int, int] = {}
    out = []
    for row in rows:
        p = prompts.index(row["prompt"])
        k = counts[p] = counts.get(p, -1) + 1
        seed = int(row.get("seed", sample_seed(run_seed, stage, p, k)))
        out.append(Sample(prompt_index=p, sample_index=k, seed=seed, extras=extras(row)))
    return out


class Tally:
    """The cumulative cost columns of ``metrics.jsonl``, carried on from the last row when a run resumes.

    ``seconds`` and ``cpu_seconds`` count from this process's start (start-up included) on top of what
    earlier processes of the run had recorded; ``cpu_seconds`` is summed over all processes of the run.
    ``reward_queries`` counts training samples the reward scored, ``eval_reward_queries`` held-out ones.
    """

    def __init__(self, last: dict, dist: Dist):
        self.dist = dist
        self.prior_seconds = last.get("seconds", 0.0)
        self.prior_cpu = last.get("cpu_seconds", 0.0)
        self.stats = {k: last.get(k, 0) for k in ("reward_queries", "eval_reward_queries", "eval_seconds")}

    def evaluate(self, task: RaftTask, stage: int, stage_dir: Path) -> dict:
        """``task.evaluate``'s metrics, timed (``time_eval``) and counted; the task reports how many held-out
        samples its reward scored as ``eval_reward_queries``."""
        return self._timed(lambda: task.evaluate(stage, stage_dir), "time_eval")

    def screen(self, task: RaftTask, stage: int, stage_dir: Path, per_prompt: int) -> dict:
        """``task.screen``'s metrics (``screen_*``), timed (``time_screen``) and counted as evaluation."""
        return self._timed(lambda: task.screen(stage, stage_dir, per_prompt), "time_screen")

    def _timed(self, held_out, key: str) -> dict:
        t = time.perf_counter()
        metrics = dict(held_out())
        took = time.perf_counter() - t
        self.stats["eval_reward_queries"] += int(metrics.pop("eval_reward_queries", 0))
        self.stats["eval_seconds"] += took
        return {**metrics, key: took}

    def row(self) -> dict:
        """The cumulative columns now (a collective: every process calls it at the same point)."""
        return {
            "reward_queries": self.stats["reward_queries"],
            "eval_reward_queries": self.stats["eval_reward_queries"],
            "eval_seconds": self.stats["eval_seconds"],
            "seconds": self.prior_seconds + process_seconds(),
            "cpu_seconds": self.prior_cpu + self.dist.sum(process_cpu_seconds()),
        }


def collect_pool(cfg, task: RaftTask, stage: int, stats: dict, dist: Dist | None = None) -> StreamingPool:
    """Steps 1-3 of a stage: sample, score, stream into the selection pool.

    Over several processes each samples whole batches dealt round-robin (so every sample's batch, and
    hence its image, is the one a single process would make), keeps its local candidates, and the
    candidates are gathered: every process then selects exactly what one process would.
    """
    dist = dist or Dist()
    K = cfg.sampling.num_per_prompt
    requests = task.plan(stage)
    if requests is None:
        requests = [
            Sample(prompt_index=p, sample_index=k, seed=sample_seed(cfg.seed, stage, p, k))
            for p in stage_prompts(cfg, stage, len(task.train_prompts))
            for k in range(K)
        ]
    pool = StreamingPool(cfg.ranking, expected_total=len(requests))
    mine = dist.shard(requests, cfg.sampling.batch_size)
    bar = tqdm(total=len(mine), desc=f"stage {stage} sample", unit="img", disable=not cfg.progress, leave=False)
    score_time, scored = 0.0, 0
    skips = task.skips_discarded  # the task does not ask the reward about discarded samples
    for batch in task.sample(stage, mine):
        t = time.perf_counter()
        task.discard(batch)  # the one place discard rules run: marked samples are logged, never kept
        rewards = as_rewards(task.reward_name, task.score(batch), len(batch))
        score_time += time.perf_counter() - t
        # a sample the task already scored once before finishing it (diffusion's sampling.prune_step) says how often
        scored += sum(s.extras.get("reward_queries", 0 if skips and s.extras.get("discarded") else 1) for s in batch)
        for s, r in zip(batch, rewards):
            s.reward = r
        pool.add(batch)
        bar.update(len(batch))
        faults.fault_point("score", stage)
    bar.close()
    stats["time_score"] = score_time
    if dist.enabled:
        pool = _merge_pools(cfg, pool, len(requests), dist)
        scored = int(dist.sum(scored))
    stats["reward_queries"] += scored
    if pool.records and all(s.extras.get("discarded") for s in pool.records):
        raise UserError(
            f"the discard rules discarded all {len(pool.records)} {cfg.sample_noun} of stage {stage} (e.g. "
            f"{pool.records[0].extras['discarded']!r}); loosen them (filters.*, ranking.prompt_match) or check the model's outputs"
        )
    if pool.records and all(math.isnan(s.reward) for s in pool.records):
        raise ScoreError(f"reward '{task.reward_name}' returned NaN (no score) for all {len(pool.records)} samples of stage {stage}")
    return pool


def _merge_pools(cfg, local: StreamingPool, total: int, dist: Dist) -> StreamingPool:
    """Gather every process's records (payloads only on its local candidates) and select again.

    A sample that is not among its own process's candidates has enough better samples there to be
    excluded from the global selection too, so the merged selection equals one process's. A spread-out or novelty
    pick (``ranking.diversity_weight``, ``novelty_weight``) has no such local cut: every local sample stays a candidate.
    With ``ranking.skip_top`` each process's heap already holds its best ``top_k + skip_top`` per prompt, which the merged
    pool leaves out of and picks from; the skip itself waits for the merged counts.
    """
    if not (local.spread or local.deferred or local.skip_top):  # these need every process's samples first
        local.kept()
    local.restore_negative_payloads()  # ranking.negative_k: the local worst go along with their payloads
    for s in local.records:
        s.payload, s.embedding = _to_cpu(s.payload), _to_cpu(s.embedding)
    everything = [s for part in dist.gather(local.records) for s in part]
    everything.sort(key=lambda s: (s.prompt_index, s.sample_index))
    merged = StreamingPool(cfg.ranking, expected_total=total)
    merged.add(everything)
    return merged


def _to_cpu(payload):
    if isinstance(payload, torch.Tensor):
        return payload.cpu()
    if isinstance(payload, dict):
        return {k: _to_cpu(v) for k, v in payload.items()}
    return payload


def run_raft(cfg, task: RaftTask, run: RunDir, *, should_stop: EarlyStopper | None = None, dist: Dist | None = None, on_stage=None) -> list[dict]:
    """Run (or resume) every stage; returns the metrics rows.

    ``should_stop(rows) -> str | None`` is asked after every stage (and once on resume): a reason ends
    the run, keeps ``should_stop.best_stage(rows)`` as final/ and records the reason in
    ``<run>/early_stop.json``.

    With ``dist`` over several processes, only the main process writes the run directory; what it
    reads (progress, metrics, stop decisions) is broadcast to the others. ``on_stage(row, stage_dir)`` is
    called on the main process after each stage's row is written (stage 0 included), e.g. for trackers.
    """
    dist = dist or Dist()
    main = dist.is_main
    if main:
        run.begin()  # config.yaml: the run has really started (the task loaded)
    # completed, intact stages; damaged ones are reported and redone, unfinished ones cleared
    done = dist.broadcast(run.recover() if main else None)
    rows = dist.broadcast(run.metrics() if main else None)
    tally = Tally(rows[-1] if rows else {}, dist)
    offline = cfg.mode == "offline" or cfg.sampling.external_pool is not None

    # Step 0: the base model's evaluation (stage 0) before any training.
    if done == 0 and not any(r["stage"] == 0 for r in rows) and cfg.eval.every:
        row = {"stage": 0, **tally.evaluate(task, 0, run.stage_dir(0))}
        row.update(tally.row())
        if main:
            run.put_metrics(row)
            run.mark_done(0, {"stage": 0})
            if on_stage:
                on_stage(row, run.stage_dir(0))
        rows = rows + [row]
    if done:
        if main:
            print(f"resuming {run.root} after stage {done}", flush=True)
        task.restore(run.stage_dir(done))

    # the base's held-out rewards, which every screen is paired with (read once; the main process pairs)
    base_eval = run.stage_dir(0) / "eval.jsonl"
    base_rows = read_jsonl(base_eval) if main and getattr(cfg.eval, "screen_per_prompt", 0) and base_eval.is_file() else None
    reason = dist.broadcast(should_stop(rows) if should_stop and main else None)  # a stopped run stays stopped
    for stage in range(done + 1, cfg.num_stages + 1):
        if reason:
            break
        sdir = run.stage_dir(stage)
        row: dict = {"stage": stage}

        # Steps 1-3: sample and score (online), or reuse the first stage's pool (offline).
        t = time.perf_counter()
        negatives: list[Sample] = []
        if offline and stage > 1:
            records, kept = None, None
            if main:
                records, kept = read_kept(task, run.stage_dir(1))
                kept.sort(key=lambda s: -s.reward)
            records, kept = dist.broadcast((records, kept))
            rewards = [s.reward if s.reward is not None else math.nan for s in map(_from_record, records)]
            discarded = sum(1 for r in records if r.get("discarded"))
        else:
            pool = collect_pool(cfg, task, stage, tally.stats, dist)
            kept = pool.kept()
            negatives = pool.negatives() if pool.negative_k else []  # ranking.negative_k: the worst per prompt
            if pool.deferred:
                row["ranking_threshold"] = pool.cut  # the stage's threshold (ranking.threshold_quantile)
            if main:
                task.save_kept(sdir, kept)
                write_jsonl(sdir / "samples.jsonl", [{**s.record(), "prompt": task.train_prompts[s.prompt_index]} for s in pool.records])
                faults.fault_point("sample", stage)
            rewards = [s.reward for s in pool.records]
            discarded = sum(1 for s in pool.records if s.extras.get("discarded"))
            del pool
        row["time_sample"] = time.perf_counter() - t
        row["time_score"] = tally.stats.pop("time_score", 0.0)
        if not kept:
            raise ScoreError(
                f"stage {stage} kept no samples (every sample was discarded ({discarded}), or its reward NaN or below "
                f"ranking.threshold={cfg.ranking.threshold}); lower the threshold, loosen the discard rule or check the reward"
            )
        s_all, s_kept = summary(rewards), summary([s.reward for s in kept])
        row.update(
            reward_mean=s_all.get("mean"),
            reward_std=s_all.get("std"),
            reward_max=s_all.get("max"),
            reward_min=s_all.get("min"),
            kept_reward_mean=s_kept.get("mean"),
            kept_reward_min=s_kept.get("min"),
            num_generated=len(rewards),
            num_kept=len(kept),
            num_discarded=discarded,
        )
        if negatives:
            row.update(num_negatives=len(negatives), negative_reward_mean=summary([s.reward for s in negatives]).get("mean"))

        # Step 4: fine-tune on the kept samples (and, with ranking.replay_top_k, the best that earlier stages kept).
        t = time.perf_counter()
        train_set = kept
        replay_k = getattr(cfg.ranking, "replay_top_k", 0)
        if replay_k and stage > 1:
            replayed = load_replay(task, run, stage, replay_k, dist)
            train_set = kept + replayed
            row.update(num_replayed=len(replayed), replayed_reward_mean=summary([s.reward for s in replayed]).get("mean"))
        # ranking.negative_k: the worst samples too, for a negative-aware loss (passed only when there are some)
        row.update(task.finetune(stage, train_set, negatives=negatives) if negatives else task.finetune(stage, train_set))
        row["time_finetune"] = time.perf_counter() - t
        faults.fault_point("train", stage)  # training writes nothing: a kill anywhere in it leaves this state
        if main:
            task.save(sdir)
            faults.fault_point("save", stage)
        del kept, train_set, negatives

        # Step 5: evaluate on held-out prompts with fixed seeds; between evaluations, screen on a few of them
        # (eval.screen_per_prompt) and evaluate in full at once when the screen nears early_stop's target.
        full = bool(cfg.eval.every) and (stage % cfg.eval.every == 0 or stage == cfg.num_stages)
        if not full and cfg.eval.every and should_stop is not None and should_stop.floor_patience > 1:  # a dip: read the floors again
            full = bool(dist.broadcast(should_stop.floor_recheck(rows) if main else None))
        screen_n = getattr(cfg.eval, "screen_per_prompt", 0)
        scale = 1.0
        if not full and screen_n and cfg.eval.every:
            scales = getattr(cfg.early_stop, "lora_scales", None)
            screen_at = functools.partial(_screen_at, task, tally, run, stage, screen_n, base_rows)
            if scales and should_stop is not None and should_stop.target(rows) is not None:
                full, scale = _screen_scales(screen_at, [float(x) for x in scales], rows, row, should_stop, dist)
            else:
                row.update(screen_at(1.0))
                if should_stop is not None:
                    full = bool(dist.broadcast(should_stop.screen_calls_for_eval(rows, row) if main else None))
        if full:
            with _at_scale(task, scale):
                row.update(tally.evaluate(task, stage, sdir))
            if scale != 1.0:
                row["eval_lora_scale"] = scale

        # Step 6: checkpoint: metrics, then the stage marker (the marker is what resume trusts).
        row.update(tally.row())
        if main:
            run.put_metrics(row)
            run.mark_done(stage, {"stage": stage, "num_kept": row["num_kept"]})
            print(stage_line(row, task.console_metrics), flush=True)
            if on_stage:
                on_stage(row, sdir)
        rows = rows + [row]
        reason = dist.broadcast(should_stop(rows) if should_stop and main else None)

    if not reason and should_stop is not None:  # early_stop.floor_patience: the last stage's dip had no next stage
        reason = dist.broadcast(should_stop.ended_under_floor(rows) if main else None)
    if reason and should_stop is not None and cfg.eval.every > 1 and cfg.eval.fallback:
        rows = _evaluate_skipped(task, run, rows, should_stop, tally, dist)
    if not main:
        dist.barrier()  # wait until the main process has written final/
        return rows

    last = run.last_completed()
    final = last
    scale = 1.0  # early_stop.lora_scales: final/ is its stage's LoRA at the scale that stage was evaluated at
    if reason and last:
        final = should_stop.best_stage(rows) or last
        scale = next((r.get("eval_lora_scale", 1.0) for r in rows if r["stage"] == final), 1.0)
        # the run's outcome, printed like its stage lines (a target reached is no warning; a floor's is in its reason)
        print(f"early stop after stage {last}: {reason}; final/ = stage {final}", flush=True)
        record = {"reason": reason, "stopped_after_stage": last, "final_stage": final}
        fallback = [r["stage"] for r in rows if r.get("eval_fallback")]
        if fallback:
            record["evaluated_after_stop"] = fallback
        if scale != 1.0:
            record["final_lora_scale"] = scale
        write_json(run.root / STOP_FILE, record)
    else:
        (run.root / STOP_FILE).unlink(missing_ok=True)  # a resumed run went on past an earlier stop
    if final:
        weights = task.weights_dir(run.stage_dir(final))
        if scale != 1.0:
            scale_lora_dir(weights, run.final_dir, scale)
        else:
            copy_dir_atomic(weights, run.final_dir)
    dist.barrier()
    return rows


def _at_scale(task: RaftTask, scale: float):
    """``task.lora_scaled(scale)``, or nothing to do at scale 1 (a task without LoRA scales needs no such hook)."""
    return task.lora_scaled(scale) if scale != 1.0 else contextlib.nullcontext()


def _screen_at(task: RaftTask, tally: Tally, run: RunDir, stage: int, per_prompt: int, base_rows: list[dict] | None, scale: float) -> dict:
    """A screen of the stage with its LoRA at ``scale``, paired with the base's evaluation rows ``base_rows`` at the
    same held-out slots (:func:`~.common.paired_screen`; the main process has them, the others pass None)."""
    sdir = run.stage_dir(stage)
    with _at_scale(task, scale):
        out = tally.screen(task, stage, sdir, per_prompt)
    shot = sdir / "screen.jsonl"
    if base_rows is not None and shot.is_file():
        out.update(paired_screen(read_jsonl(shot), base_rows))
    return out


def _screen_scales(screen_at, scales, rows, row, stopper, dist) -> tuple[bool, float]:
    """``early_stop.lora_scales``: screen the stage with its LoRA at the largest scale first. When even that is more
    than ``early_stop.screen_band_se`` standard errors short of the target, go on training (one screen, as without scales); when it is within
    them but short, evaluate that scale in full. When it reaches the target, screen at 1 and the other scales in
    ascending order and pick the first whose estimate reaches it too (else the largest): the least extrapolation
    that may do. ``screen_at(scale)`` screens and returns the screen's figures. Returns (evaluate in full now, at
    which scale); ``row`` gains the picked screen's ``screen_*`` figures (``screen_lora_scale`` when not 1), every
    screen's estimate of the held-out reward (``lora_screen_estimates``: [scale, estimate]) and their summed time."""
    main = dist.is_main
    goal = stopper.target(rows)[0]
    estimates, spent = [], 0.0
    screens: dict[float, dict] = {}

    def reaches(scale: float) -> bool:
        nonlocal spent
        out = screen_at(scale)
        spent += out.pop("time_screen")
        screens[scale] = out
        estimate = stopper.screen_estimate(out) if main else None
        estimates.append([scale, None if estimate is None else estimate[0]])
        return bool(dist.broadcast(estimate is not None and estimate[0] >= goal if main else None))

    top = scales[-1]
    reached = reaches(top)
    near = dist.broadcast(stopper.screen_calls_for_eval(rows, screens[top]) if main else None)
    picked = top
    if reached:
        picked = next((scale for scale in [1.0, *scales[:-1]] if reaches(scale)), top)
    row.update(screens[picked], time_screen=spent, lora_screen_estimates=estimates)
    if picked != 1.0:
        row["screen_lora_scale"] = picked
    return bool(near), picked


def skipped_stages(rows: list[dict], passes_floors) -> list[int]:
    """The trained stages that sparse evaluation (``eval.every``) left out between the first evaluated stage that
    fails a floor since the last one that passes (the start of the run's last stretch under a floor, which
    ``early_stop.floor_patience`` may make longer than one) and the evaluated stage before it, newest first: the
    stages final/ could fall back to.
    ``passes_floors(row)``. A stage evaluated only with its LoRA at a scale (``early_stop.lora_scales``) that failed
    a floor there counts as left out: as trained, it may pass."""
    evaluated = [r for r in rows if "time_eval" in r and not extrapolated(r)]
    last_pass = max((r["stage"] for r in evaluated if r["stage"] == 0 or passes_floors(r)), default=0)
    failing = next((r["stage"] for r in evaluated if r["stage"] > last_pass and not passes_floors(r)), None)
    if failing is None:
        return []
    before = max((r["stage"] for r in evaluated if r["stage"] < failing), default=0)
    left_out = [r for r in rows if "time_eval" not in r or (extrapolated(r) and not passes_floors(r))]
    return [r["stage"] for r in reversed(left_out) if before < r["stage"] < failing]


def _evaluate_skipped(task: RaftTask, run: RunDir, rows: list[dict], stopper: EarlyStopper, tally: Tally, dist: Dist) -> list[dict]:
    """``eval.fallback``: after a floor stopped a sparsely evaluated run, evaluate the stages trained since the
    evaluation before the failing one, newest first, until one passes the floors; final/ is then chosen among
    all evaluated stages as usual. Each such stage's metrics row gains its held-out figures (``eval_fallback``)."""
    main = dist.is_main
    todo = dist.broadcast(skipped_stages(rows, lambda r: stopper.passes_floors(rows, r)) if main else None)
    if not todo:
        return rows
    rows = [dict(r) for r in rows]
    by_stage = {r["stage"]: r for r in rows}
    for stage in todo:
        if main:
            print(f"early stop: evaluating stage {stage} (trained since the last evaluation) to fall back on", flush=True)
        sdir = run.stage_dir(stage)
        task.restore(sdir)
        row = by_stage[stage]
        row.pop("eval_lora_scale", None)  # evaluated now as trained, at scale 1
        row.update(tally.evaluate(task, stage, sdir), eval_fallback=True)
        if main:
            run.put_metrics(row)
            run.mark_done(stage, {"stage": stage, "num_kept": row["num_kept"]})  # reseal: its eval files are new
        if dist.broadcast(stopper.passes_floors(rows, row) if main else None):
            break
    last = rows[-1]
    last.update(tally.row())  # the run's cumulative columns now include these evaluations
    if main:
        run.put_metrics(last)
    return rows


def load_replay(task: RaftTask, run: RunDir, stage: int, k: int, dist: Dist) -> list[Sample]:
    """``ranking.replay_top_k``: the best ``k`` per prompt (by reward) of what stages 1 .. stage-1 kept, read
    back from their ``samples.jsonl`` and saved kept payloads (so a resumed run replays the same), in
    :func:`~.ranking.replay_pick`'s order. The main process reads; every process gets the same list."""
    out = None
    if dist.is_main:
        candidates = [(earlier, s) for earlier in range(1, stage) for s in read_kept(task, run.stage_dir(earlier))[1]]
        out = [s for _, s in replay_pick(candidates, k)]
    return dist.broadcast(out)


def read_kept(task: RaftTask, stage_dir: Path) -> tuple[list[dict], list[Sample]]:
    """A finished stage's ``samples.jsonl`` records and its kept samples with their saved payloads (on the CPU)."""
    records = read_jsonl(stage_dir / "samples.jsonl")
    kept = task.load_kept(stage_dir, [_from_record(r) for r in records if r.get("kept")])
    for s in kept:
        s.payload = _to_cpu(s.payload)
    return records, kept


def _from_record(r: dict) -> Sample:
    reward = r.get("reward")
    return Sample(
        prompt_index=r["prompt_index"],
        sample_index=r["sample_index"],
        seed=r["seed"],
        reward=math.nan if reward is None else reward,
        log_ratio=r.get("log_ratio"),
        extras={k: v for k, v in r.items() if k not in ("prompt_index", "sample_index", "seed", "reward", "log_ratio")},
    )


def stage_line(row: dict, extra: Sequence[tuple[str, str]] = ()) -> str:
    """One-line stage summary for the console; ``extra``: the task's (metric key, label) pairs to show too."""

    def fmt(key, spec=".4g"):
        v = row.get(key)
        return "-" if v is None else format(v, spec)

    parts = [
        f"stage {row['stage']:>3}",
        f"reward mean {fmt('reward_mean')} max {fmt('reward_max')}",
        f"kept {row.get('num_kept', 0)}/{row.get('num_generated', 0)} (mean {fmt('kept_reward_mean')})",
    ]
    if "loss_mean" in row:
        parts.append(f"loss {fmt('loss_mean')}")
    if "eval_reward_mean" in row:
        at = f" (LoRA x{row['eval_lora_scale']:g})" if "eval_lora_scale" in row else ""
        parts.append(f"eval reward {fmt('eval_reward_mean')}{at}")
    for key, label in extra:
        if key in row:
            parts.append(f"{label} {fmt(key)}")
    parts.append(f"{row.get('seconds', 0):.0f}s")
    return " | ".join(parts)
