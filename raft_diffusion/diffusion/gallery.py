"""Before/after galleries of a run directory (and the page of ``raft-diffusion compare``).

``write_gallery(run_dir)`` writes ``<run>/gallery/``:

    index.html              static page: reward curve, metrics per stage, config summary, then for each
                            held-out prompt every evaluated stage's images for the same seeds side by side,
                            each labelled with its reward (and its change against the base model's image)
    grid_before_after.png   one PNG: rows = prompts, the base model's samples next to the final stage's
    reward_curve.png        held-out reward (mean +- std), prompt fidelity and diversity per stage,
                            with the base model's best-of-K as a reference line

The page references the stages' PNGs by relative paths (``../stages/001/eval/p0000_s000.png``): no server,
no network, no external assets. Small images are enlarged by whole factors with nearest-neighbour
(``image-rendering: pixelated`` on the page, ``Image.NEAREST`` in the grid).
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import yaml
from PIL import Image, ImageDraw, ImageFont

from ..core.common import finite as _finite
from ..core.early_stop import read_stop
from ..core.errors import UserError
from ..core.rundir import RunDir, atomic_write_text, read_jsonl
from .metrics import best_of_k

GALLERY_DIR = "gallery"
PAGE_TARGET_PX = 128  # images smaller than this are enlarged by a whole factor on the page
PAGE_MAX_PX = 256  # and larger ones shown at most this big (click for the full image)
GRID_TARGET_PX = 96
GRID_MAX_PX = 192


@dataclass
class Cell:
    """One image of a column: its file (None when it was not saved), reward and seed."""

    image: Path | None
    reward: float | None = None
    seed: int | None = None


@dataclass
class Column:
    """One model (a stage of a run, the base model, a LoRA) evaluated on the same prompts and seeds."""

    key: str  # CSS-safe id
    title: str
    cells: dict[tuple[int, int], Cell] = field(default_factory=dict)  # (prompt index, sample index) -> cell
    note: str = ""

    def mean_reward(self) -> float | None:
        v = [c.reward for c in self.cells.values() if _finite(c.reward)]
        return sum(v) / len(v) if v else None


# ---------------------------------------------------------------------------------------------- run data


def fmt(v, spec: str = ".4g") -> str:
    return format(v, spec) if _finite(v) else "-"


def eval_stages(run: RunDir) -> list[int]:
    """Stages that have a held-out evaluation (stage 0 = the base model), in order."""
    return sorted(int(p.parent.name) for p in (run.root / "stages").glob("[0-9][0-9][0-9]/eval.jsonl"))


def final_stage(run: RunDir) -> int | None:
    """The stage whose weights are in final/: the early stop's choice, else the last completed stage."""
    stop = read_stop(run.root)
    if stop and stop.get("final_stage"):
        return int(stop["final_stage"])
    last = run.last_completed()
    return last or None


def stage_column(run: RunDir, stage: int, title: str | None = None) -> tuple[Column, dict[int, str]]:
    """A stage's eval images as a column, and the prompts by index."""
    sdir = run.stage_dir(stage)
    col = Column(key=f"s{stage:03d}", title=title or ("base" if stage == 0 else f"stage {stage}"))
    prompts: dict[int, str] = {}
    for row in read_jsonl(sdir / "eval.jsonl"):
        p, k = int(row["prompt_index"]), int(row["sample_index"])
        prompts[p] = row.get("prompt", f"prompt {p}")
        image = sdir / row["image"] if row.get("image") and (sdir / row["image"]).is_file() else None
        col.cells[(p, k)] = Cell(image=image, reward=row.get("reward"), seed=row.get("seed"))
    return col, prompts


def base_best_of_k(run: RunDir) -> tuple[float | None, int]:
    """(best-of-K of the base model's held-out samples, K): per prompt the best of its K rewards, averaged."""
    rows = read_jsonl(run.stage_dir(0) / "eval.jsonl")
    if not rows:
        return None, 0
    rewards = [r["reward"] if r.get("reward") is not None else math.nan for r in rows]
    k = max(sum(1 for r in rows if r["prompt_index"] == p) for p in {r["prompt_index"] for r in rows})
    value = best_of_k(rewards, [r["prompt_index"] for r in rows])
    return (value if math.isfinite(value) else None), k


# ---------------------------------------------------------------------------------------------- sizes, text


def display_size(width: int, height: int, target: int, largest: int) -> tuple[int, int, bool]:
    """(width, height, nearest): enlarge small images by a whole factor, shrink big ones to ``largest``."""
    side = max(width, height)
    if side < target:
        f = math.ceil(target / side)
        return width * f, height * f, True
    if side > largest:
        s = largest / side
        return max(1, round(width * s)), max(1, round(height * s)), False
    return width, height, False


def _image_size(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    with Image.open(path) as im:
        return im.size


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip() + "..."
    out = []
    for line in lines:  # a single word wider than the box: cut it
        while draw.textlength(line, font=font) > width and len(line) > 4:
            line = line[:-4] + "..."
        out.append(line)
    return out


UP, DOWN, NEUTRAL = (18, 128, 48), (200, 40, 40), (90, 90, 90)


def _delta_colour(value, ref) -> tuple[int, int, int]:
    if not (_finite(value) and _finite(ref)) or value == ref:
        return NEUTRAL
    return UP if value > ref else DOWN


# ---------------------------------------------------------------------------------------------- grid PNG


def render_grid(path: Path, prompts: dict[int, str], columns: list[Column], *, max_samples: int = 4) -> Path:
    """One PNG: a row per prompt, a group of up to ``max_samples`` images per column, rewards under each
    image (coloured against the first column's image of the same seed), group titles on top."""
    path = Path(path)
    samples = sorted({k for col in columns for (_, k) in col.cells})[:max_samples]
    first = next((c.image for col in columns for c in col.cells.values() if c.image is not None), None)
    w0, h0 = _image_size(first) or (64, 64)
    cw, ch, nearest = display_size(w0, h0, GRID_TARGET_PX, GRID_MAX_PX)
    font, small, bold = _font(14), _font(12), _font(15)
    margin, label_w, gap, group_gap, text_h, head_h, row_pad, foot_h = 16, 210, 6, 28, 20, 46, 14, 22
    group_w = len(samples) * cw + (len(samples) - 1) * gap
    width = margin * 2 + label_w + len(columns) * group_w + (len(columns) - 1) * group_gap
    row_h = ch + text_h + row_pad
    height = margin * 2 + head_h + len(prompts) * row_h + foot_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x0 = [margin + label_w + i * (group_w + group_gap) for i in range(len(columns))]
    for col, x in zip(columns, x0):  # group titles
        mean = col.mean_reward()
        draw.text((x + group_w / 2, margin), col.title, fill=(20, 20, 20), font=bold, anchor="ma")
        draw.text((x + group_w / 2, margin + 20), f"mean reward {fmt(mean)}", fill=NEUTRAL, font=small, anchor="ma")
    ref = columns[0]
    for r, (p, prompt) in enumerate(sorted(prompts.items())):
        y = margin + head_h + r * row_h
        draw.line([(margin, y - row_pad // 2), (width - margin, y - row_pad // 2)], fill=(225, 225, 225))
        lines = _wrap(draw, prompt, font, label_w - 12, max_lines=max(1, ch // 18))
        for i, line in enumerate(lines):
            draw.text((margin, y + 4 + 18 * i), line, fill=(20, 20, 20), font=font)
        for col, x in zip(columns, x0):
            for j, k in enumerate(samples):
                cx = x + j * (cw + gap)
                cell = col.cells.get((p, k))
                if cell is not None and cell.image is not None:
                    with Image.open(cell.image) as im:
                        im = im.convert("RGB").resize((cw, ch), Image.NEAREST if nearest else Image.LANCZOS)
                    canvas.paste(im, (cx, y))
                else:
                    draw.rectangle([cx, y, cx + cw - 1, y + ch - 1], fill=(238, 238, 238))
                    draw.text((cx + cw / 2, y + ch / 2), "no image", fill=NEUTRAL, font=small, anchor="mm")
                reward = None if cell is None else cell.reward
                base = ref.cells.get((p, k))
                colour = NEUTRAL if col is ref else _delta_colour(reward, None if base is None else base.reward)
                draw.text((cx + cw / 2, y + ch + 3), fmt(reward), fill=colour, font=small, anchor="ma")
    if len(columns) > 1:
        draw.text(
            (margin, height - margin - 14),
            f"Reward under each image; green / red: higher / lower than the {ref.title} image of the same seed.",
            fill=NEUTRAL,
            font=small,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------- reward curve


def render_reward_curve(
    path: Path,
    rows: list[dict],
    *,
    best_of_k_value: float | None = None,
    k: int = 0,
    final: int | None = None,
    floors: dict[str, float] | None = None,
    title: str = "",
    pool_label: str = "training pool mean",
    target_rise_sd: float | None = None,
) -> Path:
    """Held-out reward (mean +- std) per stage, plus fidelity and diversity panels when measured.

    ``floors`` maps ``eval_clip_score`` / ``eval_diversity`` to the early-stop ratio (drawn as ratio x base).
    Screened stages (``eval.screen_per_prompt``) are drawn as hollow points with their screen's estimate, stages
    evaluated with their LoRA at a scale (``early_stop.lora_scales``) as stars off the line, and
    ``target_rise_sd`` (``early_stop.target_rise_sd``) as the line base mean + x base std.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    floors = floors or {}
    panels = [("eval_reward_mean", "held-out reward")]
    panels += [
        (key, label)
        for key, label in (("eval_clip_score", "prompt fidelity (CLIP score)"), ("eval_diversity", "diversity (1 - cos, same prompt)"))
        if any(_finite(r.get(key)) for r in rows)
    ]
    fig = Figure(figsize=(4.8 * len(panels), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label) in zip(axes, panels):
        # early_stop.lora_scales: a stage evaluated with its LoRA at a scale is a candidate, drawn apart from the line
        pts = [(r["stage"], r[key], r.get(key.replace("_mean", "_std"))) for r in rows if _finite(r.get(key)) and "eval_lora_scale" not in r]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", color="tab:blue", label="mean ± std" if key == "eval_reward_mean" else label)
        scaled = [(r["stage"], r[key], r["eval_lora_scale"]) for r in rows if _finite(r.get(key)) and "eval_lora_scale" in r]
        if scaled:
            ax.plot(
                [p[0] for p in scaled], [p[1] for p in scaled], linestyle="none", marker="*", markersize=9, color="tab:red", label="LoRA at a scale"
            )
            for x, y, scale in scaled:
                ax.annotate(f"x{scale:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color="tab:red")
        if key == "eval_reward_mean":
            if all(_finite(p[2]) for p in pts) and pts:
                ax.fill_between(
                    xs, [y - p[2] for y, p in zip(ys, pts)], [y + p[2] for y, p in zip(ys, pts)], color="tab:blue", alpha=0.18, linewidth=0
                )
            if _finite(best_of_k_value):
                ax.axhline(best_of_k_value, color="tab:orange", linestyle="--", label=f"base best-of-{k}")
            pool = [(r["stage"], r["reward_mean"]) for r in rows if _finite(r.get("reward_mean"))]
            if pool:
                ax.plot([p[0] for p in pool], [p[1] for p in pool], color="0.6", linestyle=":", marker=".", label=pool_label)
            screens = [(r["stage"], _screen_value(r), r.get("screen_n")) for r in rows if _finite(_screen_value(r))]
            if screens:
                n = screens[-1][2]
                ax.plot(
                    [p[0] for p in screens], [p[1] for p in screens], linestyle="none", marker="o", markerfacecolor="none",
                    color="tab:purple", label=f"screen estimate ({n} held-out images)" if n else "screen estimate",
                )  # fmt: skip
            base_row = next((r for r in rows if r["stage"] == 0), {})
            if target_rise_sd is not None and _finite(base_row.get("eval_reward_mean")) and _finite(base_row.get("eval_reward_std")):
                goal = base_row["eval_reward_mean"] + target_rise_sd * base_row["eval_reward_std"]
                ax.axhline(goal, color="tab:purple", linestyle="-.", linewidth=1, label=f"early-stop target (+{target_rise_sd:g} base sd)")
        base = next((r.get(key) for r in rows if r["stage"] == 0 and _finite(r.get(key))), None)
        if key in floors and base is not None:
            ax.axhline(floors[key] * base, color="tab:red", linestyle="--", linewidth=1, label=f"early-stop floor ({floors[key]:g} x base)")
        if final is not None and final in xs:
            ax.axvline(final, color="tab:green", linestyle=":", linewidth=1.2, label=f"final (stage {final})")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("stage (0 = base model)")
        last = max([r["stage"] for r in rows] + [1])
        ax.set_xlim(-0.3, last + 0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------- HTML page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1400px;padding:0 16px;color:#222;background:#fbfbfb}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:22px 0 6px}.muted{color:#777;font-weight:normal;font-size:12px}
.stop{background:#fff4e0;border:1px solid #f0c36d;padding:6px 10px;border-radius:4px;display:inline-block}
table{border-collapse:collapse}td,th{padding:4px 8px}
table.metrics td,table.metrics th{border:1px solid #ddd;text-align:right}table.metrics th{background:#f0f0f0}
table.metrics tr.final td{background:#eaf6ea;font-weight:600}
table.cfg td{border-bottom:1px solid #eee;vertical-align:top}table.cfg td:first-child{color:#555;white-space:nowrap}
.scroll{overflow-x:auto}
table.imgs th{font-weight:600;text-align:center;vertical-align:bottom;white-space:nowrap}
table.imgs td{text-align:center;vertical-align:top;padding:4px}
table.imgs th.seed{text-align:right;font-weight:normal;color:#666;vertical-align:middle}
img.px{image-rendering:crisp-edges;image-rendering:pixelated}
table.imgs img{display:block;margin:0 auto;background:#eee;border:1px solid #ccc}
.r{font-variant-numeric:tabular-nums;font-size:13px}.up{color:#128030}.down{color:#c82828}.same{color:#777}
.noimg{display:flex;align-items:center;justify-content:center;background:#eee;color:#777;margin:0 auto}
.controls{position:sticky;top:0;background:#fbfbfbee;padding:6px 0;z-index:1}
.controls label{margin-right:10px;white-space:nowrap}.controls button{margin-left:6px}
pre{background:#f4f4f4;padding:8px;overflow-x:auto;font-size:12px}
"""

SCRIPT = """
(function(){
  var boxes=[].slice.call(document.querySelectorAll('.controls input[type=checkbox]'));
  function apply(){boxes.forEach(function(b){
    [].forEach.call(document.querySelectorAll('.'+b.value),function(e){e.style.display=b.checked?'':'none';});});}
  boxes.forEach(function(b){b.addEventListener('change',apply);});
  [].forEach.call(document.querySelectorAll('.controls button'),function(btn){
    btn.addEventListener('click',function(){var keep=btn.getAttribute('data-show');
      boxes.forEach(function(b){b.checked=(keep==='all')||keep.split(' ').indexOf(b.value)>=0;});apply();});});
})();
"""


def _src(path: Path, page_dir: Path) -> str:
    return quote(Path(os.path.relpath(Path(path).resolve(), Path(page_dir).resolve())).as_posix(), safe="/")


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _image_cell(col: Column, cell: Cell | None, ref: Cell | None, page_dir: Path, is_ref: bool) -> str:
    if cell is None:
        return f"<td class='{col.key}'><span class='same'>-</span></td>"
    size = _image_size(cell.image)
    if size is None:
        w, h, nearest = PAGE_TARGET_PX, PAGE_TARGET_PX, False
        img = f"<div class='noimg' style='width:{w}px;height:{h}px'>no image</div>"
    else:
        w, h, nearest = display_size(*size, PAGE_TARGET_PX, PAGE_MAX_PX)
        src = _src(cell.image, page_dir)
        alt = f"{col.title}, sample seed {cell.seed}, reward {fmt(cell.reward)}"
        img = (
            f"<a href='{src}'><img src='{src}' width='{w}' height='{h}' alt='{_esc(alt)}' "
            f"title='seed {_esc(cell.seed)}'{' class=px' if nearest else ''}></a>"
        )
    label = fmt(cell.reward)
    if not is_ref and ref is not None and _finite(cell.reward) and _finite(ref.reward):
        d = cell.reward - ref.reward
        cls = "up" if d > 0 else "down" if d < 0 else "same"
        label += f" <span class='{cls}'>({d:+.2g})</span>"
    return f"<td class='{col.key}'>{img}<div class='r'>{label}</div></td>"


def render_page(
    out_dir: Path,
    *,
    title: str,
    prompts: dict[int, str],
    columns: list[Column],
    intro_html: str = "",
    sections_html: str = "",
    images_heading: str = "Held-out images",
    prompt_label: str = "held-out prompt",
    name: str = "index.html",
) -> Path:
    """A static HTML page: ``intro_html`` and ``sections_html`` on top, then per prompt a table with a row per
    sample (seed) and a column per model, rewards labelled and compared with the first column."""
    out_dir = Path(out_dir)
    ref = columns[0]
    ends = f"{columns[0].key} {columns[-1].key}"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        intro_html,
        sections_html,
        f"<h2 id='images'>{_esc(images_heading)}</h2>",
        "<p class='muted'>Same prompt and seed in every column; each image is labelled with its reward and, in "
        f"parentheses, the change against the {_esc(ref.title)} image of the same seed. Click an image for the file.</p>",
        "<div class='controls'>Show: "
        + "".join(f"<label><input type='checkbox' value='{c.key}' checked> {_esc(c.title)}</label>" for c in columns)
        + f"<button type='button' data-show='{ends}'>{_esc(columns[0].title)} vs {_esc(columns[-1].title)}</button>"
        + "<button type='button' data-show='all'>all</button></div>",
    ]
    samples = sorted({k for col in columns for (_, k) in col.cells})
    for p, prompt in sorted(prompts.items()):
        parts.append(
            f"<h3>{_esc(prompt)} <span class='muted'>{_esc(prompt_label)} {p}</span></h3><div class='scroll'><table class='imgs'><tr><th></th>"
        )
        for col in columns:
            mine = [c.reward for (pp, _), c in col.cells.items() if pp == p and _finite(c.reward)]
            mean = sum(mine) / len(mine) if mine else None
            parts.append(
                f"<th class='{col.key}'>{_esc(col.title)}<br><span class='muted'>mean {fmt(mean)}"
                f"{(' &middot; ' + _esc(col.note)) if col.note else ''}</span></th>"
            )
        parts.append("</tr>")
        for k in samples:
            seed = next((col.cells[(p, k)].seed for col in columns if (p, k) in col.cells), None)
            parts.append(f"<tr><th class='seed'>sample {k}<br><span class='muted'>seed {_esc(seed)}</span></th>")
            for col in columns:
                parts.append(_image_cell(col, col.cells.get((p, k)), ref.cells.get((p, k)), out_dir, col is ref))
            parts.append("</tr>")
        parts.append("</table></div>")
    parts.append(f"<script>{SCRIPT}</script></body></html>\n")
    path = out_dir / name
    atomic_write_text(path, "\n".join(parts))
    return path


# ---------------------------------------------------------------------------------------------- run gallery

METRIC_COLUMNS = [
    ("eval_reward_mean", "held-out reward"),
    ("eval_best_of_k", "best-of-K"),
    ("eval_clip_score", "CLIP score"),
    ("eval_diversity", "diversity"),
    ("reward_mean", "pool reward"),
    ("kept_reward_mean", "kept reward"),
    ("loss_mean", "loss"),
    ("num_kept", "kept"),
    ("reward_queries", "reward queries"),
    ("seconds", "seconds"),
]


def _screen_value(row: dict):
    """A screened stage's estimate of its held-out reward: paired with the base's evaluation when it could be
    (``screen_reward_estimate``), else the screen's mean."""
    return row.get("screen_reward_estimate", row.get("screen_reward_mean"))


def _metrics_table(rows: list[dict], final: int | None) -> str:
    cols = [(k, label) for k, label in METRIC_COLUMNS if any(k in r for r in rows)]
    comps = sorted({k for r in rows for k in r if k.startswith("eval_reward_mean/")})
    out = ["<table class='metrics'><tr><th>stage</th>"]
    out += [f"<th>{_esc(label)}</th>" for _, label in cols]
    out += [f"<th>{_esc(c.split('/', 1)[1])}</th>" for c in comps]
    out.append("</tr>")
    for r in rows:
        cls = " class='final'" if r["stage"] == final else ""
        stage = "0 (base)" if r["stage"] == 0 else str(r["stage"]) + (" (final)" if r["stage"] == final else "")
        out.append(f"<tr{cls}><td>{stage}</td>")
        for key, _ in cols:
            v = r.get(key)
            if key == "eval_reward_mean" and _finite(r.get("eval_reward_std")):
                at = f" (LoRA x{r['eval_lora_scale']:g})" if "eval_lora_scale" in r else ""
                out.append(f"<td>{fmt(v)} &plusmn; {fmt(r['eval_reward_std'], '.3g')}{at}</td>")
            elif key == "eval_reward_mean" and _finite(_screen_value(r)):  # eval.screen_per_prompt
                out.append(f"<td title='screen of {r.get('screen_n')} held-out images'>~{fmt(_screen_value(r))} (screen)</td>")
            elif key == "seconds":
                out.append(f"<td>{fmt(v, '.0f')}</td>")
            else:
                out.append(f"<td>{fmt(v) if isinstance(v, float) else _esc('-' if v is None else v)}</td>")
        out += [f"<td>{fmt(r.get(c))}</td>" for c in comps]
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _guidances(cfg: dict) -> tuple:
    """(pool, held-out) guidance scales of a run's config.yaml dict (the held-out one defaults to the pool's)."""
    g_pool = ((cfg or {}).get("sampling") or {}).get("guidance_scale")
    g_eval = ((cfg or {}).get("eval") or {}).get("guidance_scale")
    return g_pool, g_pool if g_eval is None else g_eval


def config_value(cfg: dict, dotted: str, default=None):
    """``cfg["a"]["b"]`` for ``"a.b"`` in a run's config.yaml mapping; ``default`` when a part is missing."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _config_summary(cfg: dict) -> str:
    if not cfg:
        return "<p class='muted'>no config.yaml</p>"

    def get(dotted):
        return config_value(cfg, dotted)

    size = f"{get('sampling.height')}x{get('sampling.width')}" if get("sampling.height") or get("sampling.width") else "the model's size"
    items = [
        ("model", get("model.pretrained")),
        ("reward", json.dumps(get("reward"))),
        ("seed", get("seed")),
        ("stages", get("num_stages")),
        ("mode", get("mode")),
        (
            "sampling",
            f"K={get('sampling.num_per_prompt')}, {get('sampling.num_inference_steps')} steps, guidance "
            f"{get('sampling.guidance_scale')}, {get('sampling.scheduler') or 'the model scheduler'}, {size}",
        ),
        (
            "ranking",
            f"{get('ranking.mode')}, top_k={get('ranking.top_k')}, top_ratio={get('ranking.top_ratio')}, "
            f"max_kept={json.dumps(get('ranking.max_kept'))}, kl_beta={get('ranking.kl_beta')}, "
            f"diversity_weight={get('ranking.diversity_weight')}, novelty_weight={get('ranking.novelty_weight')}, "
            f"prompt_match={json.dumps(get('ranking.prompt_match'))}",
        ),
        (
            "train",
            f"{get('train.method')} rank {get('train.lora_rank')} alpha {get('train.lora_alpha')}, lr "
            f"{get('train.learning_rate')} ({get('train.lr_scheduler')}"
            + (f", x {get('train.stage_lr_decay')} a stage" if get("train.stage_lr_decay") else "")
            + f"), {get('train.steps_per_stage')} steps x "
            f"batch {get('train.batch_size')} per stage",
        ),
        ("eval", f"{get('eval.num_per_prompt')} samples per held-out prompt, guidance {_guidances(cfg)[1]}, CLIP {get('eval.clip_model')}"),
        ("early stop", json.dumps(get("early_stop"))),
        ("prompts", f"train {json.dumps(get('prompts.train'))}; held-out {json.dumps(get('prompts.eval'))}"),
    ]
    rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in items if v not in (None, "null"))
    full = _esc(yaml.safe_dump(cfg, sort_keys=False))
    return f"<table class='cfg'>{rows}</table><details><summary>full config.yaml</summary><pre>{full}</pre></details>"


def write_gallery(run_dir: str | Path, *, max_grid_samples: int = 4) -> Path:
    """Write ``<run>/gallery/`` (index.html, grid_before_after.png, reward_curve.png); returns index.html."""
    run = RunDir(run_dir)
    stages = eval_stages(run)
    if not stages:
        raise UserError(f"{run.root} has no held-out evaluation (stages/*/eval.jsonl): is it a raft-diffusion run directory with eval.every >= 1?")
    out = run.root / GALLERY_DIR
    out.mkdir(parents=True, exist_ok=True)
    rows = run.metrics()
    cfg = yaml.safe_load(run.config_path.read_text()) if run.config_path.is_file() else {}
    stop = read_stop(run.root)
    final = final_stage(run)
    if final not in stages:
        final = stages[-1] if stages[-1] != 0 else None

    # 1. columns: every evaluated stage, base first
    columns, prompts = [], {}
    for s in stages:
        title = "base" if s == 0 else f"stage {s} (final)" if s == final else f"stage {s}"
        col, ps = stage_column(run, s, title)
        columns.append(col)
        prompts.update(ps)

    # 2. the reward curve
    bok, k = base_best_of_k(run)
    es = (cfg or {}).get("early_stop") or {}
    floors = {
        key: es[f] for key, f in (("eval_clip_score", "min_fidelity_ratio"), ("eval_diversity", "min_diversity_ratio")) if es.get(f) is not None
    }
    title = f"{run.root.name}: reward {(cfg or {}).get('reward', {}).get('name', 'mix')}"
    if stop:
        how = "target reached at" if str(stop.get("reason", "")).startswith("target reached") else "stopped early after"
        title += f" ({how} stage {stop.get('stopped_after_stage')}; final/ = stage {stop.get('final_stage')})"
    g_pool, g_eval = _guidances(cfg)
    notes = []
    if config_value(cfg, "sampling.prune_step") is not None:  # the pruned samples have no reward
        notes.append("finished samples only")
    if g_pool is not None and g_eval != g_pool:
        notes.append(f"guidance {g_pool:g}; held-out {g_eval:g}")
    pool_label = "training pool mean" + (f" ({'; '.join(notes)})" if notes else "")
    render_reward_curve(
        out / "reward_curve.png",
        rows,
        best_of_k_value=bok,
        k=k,
        final=final,
        floors=floors,
        title=title,
        pool_label=pool_label,
        target_rise_sd=es.get("target_rise_sd"),
    )

    # 3. base vs final grid
    ends = [c for c in columns if c.key in ("s000", f"s{final or 0:03d}")]
    render_grid(out / "grid_before_after.png", prompts, ends if len(ends) == 2 else columns[-2:] or columns, max_samples=max_grid_samples)

    # 4. the page
    intro = [f"<p class='muted'>{_esc(run.root.resolve())}</p><p>"]
    if final is not None:
        intro.append(f"final/ holds the weights of <b>stage {final}</b>. ")
    if _finite(bok):
        intro.append(
            f"Base model best-of-{k} on the held-out prompts: <b>{fmt(bok)}</b> (mean over prompts of the best "
            f"of the {k} samples): what a single round of selection reaches."
        )
    intro.append("</p>")
    if stop:
        intro.append(
            f"<p class='stop'>Stopped early after stage {_esc(stop.get('stopped_after_stage'))}: "
            f"{_esc(stop.get('reason'))}; final/ = stage {_esc(stop.get('final_stage'))}.</p>"
        )
    sections = (
        "<h2>Reward curve</h2><img src='reward_curve.png' alt='held-out reward per stage' style='max-width:100%'>"
        "<p><a href='grid_before_after.png'>grid_before_after.png</a>: base vs final, one row per prompt.</p>"
        f"<h2>Metrics per stage</h2><div class='scroll'>{_metrics_table(rows, final)}</div>"
        f"<h2>Config</h2>{_config_summary(cfg or {})}"
    )
    return render_page(
        out, title=f"RAFT gallery: {run.root.name}", prompts=prompts, columns=columns, intro_html="".join(intro), sections_html=sections
    )
