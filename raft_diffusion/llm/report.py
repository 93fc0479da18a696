"""report.html: the text counterpart of the diffusion gallery.

A metrics table per stage, then every held-out prompt with the base model's completions (stage 0)
next to those of the stage kept as final/ (the last evaluated one, or the best one after an early
stop), each with its reward (and gold score), same seeds side by side.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from ..core.early_stop import read_stop
from ..core.errors import UserError
from ..core.rundir import RunDir, atomic_write_text, read_jsonl

COLUMNS = [
    ("stage", "stage"),
    ("eval_reward_mean", "reward"),
    ("eval_reward_std", "reward std"),
    ("eval_gold_mean", "gold"),
    ("eval_distinct_1", "distinct-1"),
    ("eval_distinct_2", "distinct-2"),
    ("eval_distinct_1_per_prompt", "distinct-1 per prompt"),
    ("eval_distinct_2_per_prompt", "distinct-2 per prompt"),
    ("eval_length", "length (tokens)"),
    ("eval_repeated_2gram_rate", "repeated bigrams"),
    ("eval_base_perplexity", "base ppl"),
    ("eval_best_of_k", "best-of-K"),
    ("reward_mean", "pool reward"),
    ("kept_reward_mean", "kept reward"),
    ("loss_mean", "loss"),
    ("num_discarded", "discarded"),
    ("seconds", "seconds"),
]
CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}th{background:#f4f4f4}
.pair td{width:50%}.r{color:#555;font-size:90%;white-space:nowrap}.pos{color:#070}.neg{color:#a00}h3{margin-top:2em}"""


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _cell(row: dict | None) -> str:
    if row is None:
        return "<td>-</td>"
    r = row.get("reward")
    cls = "" if r is None else ("pos" if r > 0 else "neg")
    facts = f"reward <b class='{cls}'>{_fmt(r)}</b>" + (f" &middot; gold {_fmt(row['gold'])}" if "gold" in row else "")
    return f"<td>{html.escape(row['completion']) or '<i>(empty)</i>'}<div class='r'>{facts} &middot; seed #{row['sample_index']}</div></td>"


def last_eval_stage(run: RunDir) -> int | None:
    stages = sorted(int(p.parent.name) for p in (run.root / "stages").glob("*/eval.jsonl"))
    return stages[-1] if stages else None


def write_report(run_dir: str | Path) -> Path:
    """Write <run>/report.html from metrics.jsonl and the eval.jsonl of stage 0 and of the last evaluated stage."""
    run = RunDir(run_dir)
    stop = read_stop(run.root)
    last = stop["final_stage"] if stop and (run.stage_dir(stop["final_stage"]) / "eval.jsonl").is_file() else last_eval_stage(run)
    if last is None:
        raise UserError(f"{run.root} has no evaluation yet (stages/*/eval.jsonl); run 'raft-diffusion llm align' first")
    before = read_jsonl(run.stage_dir(0) / "eval.jsonl")
    after = read_jsonl(run.stage_dir(last) / "eval.jsonl")
    metrics = run.metrics()
    cols = [(k, label) for k, label in COLUMNS if any(k in m for m in metrics)]
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>RAFT report: {html.escape(str(run.root))}</title>",
        f"<style>{CSS}</style></head><body><h1>RAFT report</h1><p>{html.escape(str(run.root))}</p>",
    ]
    out.append("<h2>Held-out metrics per stage</h2><table><tr>" + "".join(f"<th>{c}</th>" for _, c in cols) + "</tr>")
    for m in metrics:
        out.append("<tr>" + "".join(f"<td>{_fmt(m.get(k))}</td>" for k, _ in cols) + "</tr>")
    out.append("</table>")
    base = next((m for m in metrics if m.get("stage") == 0), {})
    if "eval_base_best_of_k" in base:
        ref = f"base model best-of-K reward on the held-out prompts: <b>{_fmt(base['eval_base_best_of_k'])}</b>"
        if "eval_base_best_of_k_gold" in base:
            ref += f" (gold {_fmt(base['eval_base_best_of_k_gold'])})"
        out.append(f"<p>Reference: {ref}.</p>")
    if stop:
        out.append(f"<p>Early stop: {html.escape(stop['reason'])}; final/ = stage {stop['final_stage']}.</p>")
    out.append(f"<h2>Completions: base (stage 0) vs stage {last}{' (final/)' if run.final_dir.is_dir() else ''}, same seeds</h2>")
    by_key = {(r["prompt_index"], r["sample_index"]): r for r in after}
    prompts: dict[int, list[dict]] = {}
    for r in before or after:
        prompts.setdefault(r["prompt_index"], []).append(r)
    for p, rows in sorted(prompts.items()):
        out.append(f"<h3>{html.escape(rows[0]['prompt'])}</h3><table class='pair'><tr><th>base</th><th>stage {last}</th></tr>")
        for r in rows:
            b = r if before else None
            out.append("<tr>" + _cell(b) + _cell(by_key.get((p, r["sample_index"]))) + "</tr>")
        out.append("</table>")
    out.append("</body></html>\n")
    path = run.root / "report.html"
    atomic_write_text(path, "\n".join(out))
    return path
