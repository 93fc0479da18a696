"""Galleries of a synthetic run directory: files, relative links, the before/after grid, the reward curve,
the CLI, and the page opened in headless Chromium (skipped when Debian's chromium is not installed)."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from raft_diffusion.cli import main
from raft_diffusion.core.errors import UserError
from raft_diffusion.core.rundir import RunDir, write_json, write_jsonl
from raft_diffusion.diffusion.config import config_from_dict
from raft_diffusion.diffusion.gallery import base_best_of_k, write_gallery

PROMPTS = ["a red square", "a blue circle", "a green star"]
K = 3
SIZE = 32
CHROMIUM = Path("/usr/bin/chromium")


def colour(stage, p, k):
    """A colour unique to each (stage, prompt, sample) and unlike any text or background colour."""
    return (30 + 60 * stage, 35 + 70 * p, 25 + 50 * k)


def reward(stage, p, k):
    return round(0.1 * stage + 0.01 * p + 0.003 * k * (1 if stage % 2 else -1), 6)


def make_run(root: Path, stages=2, stopped_at=None, final=None, clip=True, overrides=()) -> RunDir:
    """stages/000..<stages> with eval.jsonl + 32 px PNGs (a solid colour with a 4x4 checker corner), metrics.jsonl,
    config.yaml, stage.json markers, and optionally an early-stop record."""
    run = RunDir(root)
    cfg = config_from_dict({}, (["eval.clip_model=tiny", "early_stop.min_diversity_ratio=0.5"] if clip else []) + list(overrides))
    run.start(cfg.to_dict())
    run.begin()  # config.yaml, as the stage loop writes it once the task has loaded
    rows = []
    for s in range(stages + 1):
        sdir = run.stage_dir(s)
        (sdir / "eval").mkdir(parents=True)
        evals = []
        for p, prompt in enumerate(PROMPTS):
            for k in range(K):
                arr = np.empty((SIZE, SIZE, 3), np.uint8)
                arr[:] = colour(s, p, k)
                arr[:4, :4][(np.indices((4, 4)).sum(0) % 2) == 1] = 255  # a checker: resampling must not blur it
                name = f"eval/p{p:04d}_s{k:03d}.png"
                Image.fromarray(arr).save(sdir / name)
                evals.append({"prompt_index": p, "sample_index": k, "seed": 1000 * p + k, "prompt": prompt, "reward": reward(s, p, k), "image": name})
        write_jsonl(sdir / "eval.jsonl", evals)
        rs = [e["reward"] for e in evals]
        row = {"stage": s, "eval_reward_mean": float(np.mean(rs)), "eval_reward_std": float(np.std(rs)), "reward_queries": 9 * s, "seconds": 3.0 * s}
        if clip:
            row.update(eval_clip_score=25.0 - s, eval_diversity=0.2 - 0.05 * s)
        if s:
            row.update(reward_mean=0.1 * s, kept_reward_mean=0.1 * s + 0.05, num_kept=3, loss_mean=0.5)
            run.mark_done(s, {"stage": s})
        rows.append(row)
    write_jsonl(run.metrics_path, rows)
    if stopped_at is not None:
        write_json(run.root / "early_stop.json", {"reason": "test reason", "stopped_after_stage": stopped_at, "final_stage": final})
    return run


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.imgs = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.refs.append((tag, a[key]))
        if tag == "img":
            self.imgs.append(a)


def parse(page: Path) -> Links:
    links = Links()
    links.feed(page.read_text())
    return links


def local_target(page: Path, ref: str) -> Path:
    url = urlparse(ref)
    assert not url.scheme and not url.netloc and not ref.startswith("/"), f"not a relative link: {ref}"
    return (page.parent / unquote(url.path)).resolve()


def test_gallery_files_reference_only_existing_relative_files(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_gallery(run.root)
    gallery = run.root / "gallery"
    assert page == gallery / "index.html"
    for name in ("index.html", "grid_before_after.png", "reward_curve.png"):
        assert (gallery / name).is_file(), name
    links = parse(page)
    targets = {local_target(page, ref) for _, ref in links.refs}
    assert all(t.is_file() for t in targets), [t for t in targets if not t.is_file()]
    every_eval_png = {p.resolve() for p in run.root.glob("stages/*/eval/*.png")}
    assert every_eval_png <= targets  # every stage's every image is on the page
    assert len(every_eval_png) == 3 * len(PROMPTS) * K
    text = page.read_text()
    assert "http:" not in text and "https:" not in text and "<link" not in text and "<script src" not in text
    # small images are enlarged by a whole factor with nearest-neighbour
    eval_imgs = [a for a in links.imgs if "/eval/" in a["src"]]
    assert {(a["width"], a["height"]) for a in eval_imgs} == {("128", "128")}
    assert all("px" in a.get("class", "") for a in eval_imgs)
    assert "image-rendering:pixelated" in text


def test_page_labels_every_image_with_its_reward_and_the_change_against_the_base(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_gallery(run.root)
    text = page.read_text()
    for prompt in PROMPTS:
        assert f"<h3>{prompt} " in text
    for p in range(len(PROMPTS)):
        for k in range(K):
            for s in range(3):
                assert f">{reward(s, p, k):.4g}" in text  # the label under the image
    # stage 2, prompt 1, sample 2 vs base: 0.2 + 0.01 - 0.006 - (0.01 - 0.006) = +0.2
    d = reward(2, 1, 2) - reward(0, 1, 2)
    assert f"({d:+.2g})" in text and "class='up'" in text
    assert "stage 2 (final)" in text and "held-out prompt 2" in text


def test_base_best_of_k(tmp_path):
    run = make_run(tmp_path / "run")
    bok, k = base_best_of_k(run)
    expected = np.mean([max(reward(0, p, j) for j in range(K)) for p in range(len(PROMPTS))])
    assert k == K and bok == pytest.approx(expected)
    assert f"best-of-{K} on the held-out prompts: <b>{expected:.4g}</b>" in write_gallery(run.root).read_text()


def _blocks(img: Image.Image, rgb) -> tuple[int, tuple]:
    arr = np.asarray(img.convert("RGB"))
    mask = (arr == np.array(rgb, np.uint8)).all(-1)
    ys, xs = np.nonzero(mask)
    return int(mask.sum()), (() if not len(xs) else (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))


def test_grid_before_after_rows_are_prompts_base_left_final_right(tmp_path):
    run = make_run(tmp_path / "run")
    write_gallery(run.root)
    grid = Image.open(run.root / "gallery" / "grid_before_after.png")
    scale = 3  # 32 px -> 96 px, nearest-neighbour
    checker_pixels = 8  # white squares of the 4x4 checker
    boxes = {}
    for s in (0, 1, 2):
        for p in range(len(PROMPTS)):
            for k in range(K):
                count, box = _blocks(grid, colour(s, p, k))
                if s == 1:
                    assert count == 0  # only base and final are in the grid
                    continue
                assert count == (SIZE * SIZE - checker_pixels) * scale**2, (s, p, k)  # no blur: exact colours
                assert box[2] - box[0] == box[3] - box[1] == SIZE * scale
                boxes[s, p, k] = box
    for p in range(len(PROMPTS)):
        assert boxes[0, p, K - 1][2] < boxes[2, p, 0][0]  # base left of final
        for k in range(K - 1):
            assert boxes[2, p, k][2] < boxes[2, p, k + 1][0]  # samples in order
        if p:
            assert boxes[0, p - 1, 0][3] < boxes[0, p, 0][1]  # one row per prompt, in order
    assert grid.size[1] > len(PROMPTS) * SIZE * scale


def test_early_stopped_run_shows_the_kept_stage_as_final(tmp_path):
    run = make_run(tmp_path / "run", stages=3, stopped_at=3, final=1)
    page = write_gallery(run.root)
    grid = Image.open(run.root / "gallery" / "grid_before_after.png")
    assert _blocks(grid, colour(1, 0, 0))[0] > 0 and _blocks(grid, colour(3, 0, 0))[0] == 0
    text = page.read_text()
    assert "Stopped early after stage 3: test reason; final/ = stage 1." in text
    assert "stage 1 (final)" in text and "<tr class='final'><td>1 (final)</td>" in text


def test_reward_curve_has_a_panel_per_measured_metric(tmp_path):
    full = make_run(tmp_path / "a")
    reward_only = make_run(tmp_path / "b", clip=False)
    write_gallery(full.root)
    write_gallery(reward_only.root)
    w3, h3 = Image.open(full.root / "gallery" / "reward_curve.png").size
    w1, h1 = Image.open(reward_only.root / "gallery" / "reward_curve.png").size
    assert h3 == h1 and w3 == pytest.approx(3 * w1, abs=2)


def test_reward_curve_says_a_pruned_pools_mean_is_of_its_finished_samples(tmp_path, monkeypatch):
    from raft_diffusion.diffusion import gallery

    labels = []
    monkeypatch.setattr(gallery, "render_reward_curve", lambda path, rows, **kw: labels.append(kw["pool_label"]))
    write_gallery(make_run(tmp_path / "plain").root)
    write_gallery(make_run(tmp_path / "pruned", overrides=["sampling.prune_step=10", "sampling.prune_keep=4"]).root)
    write_gallery(make_run(tmp_path / "both", overrides=["sampling.prune_step=10", "sampling.prune_keep=4", "eval.guidance_scale=2"]).root)
    assert labels == [
        "training pool mean",
        "training pool mean (finished samples only)",
        "training pool mean (finished samples only; guidance 7.5; held-out 2)",
    ]


def test_gallery_of_a_base_only_run_and_errors(tmp_path, capsys):
    run = make_run(tmp_path / "base", stages=0)
    page = write_gallery(run.root)
    assert len([a for a in parse(page).imgs if "/eval/" in a["src"]]) == len(PROMPTS) * K
    with pytest.raises(UserError, match="has no held-out evaluation"):
        write_gallery(tmp_path / "empty")
    assert main(["gallery", str(run.root)]) == 0
    assert capsys.readouterr().out.strip() == str(page)
    assert main(["gallery", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- the page in a real browser -------------------------------------------------------------------

PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = [].slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  var px = imgs.filter(function (i) { return getComputedStyle(i).imageRendering === 'pixelated'; });
  document.querySelector(".controls button[data-show^='s000']").click();  // base vs final
  var hidden = [].filter.call(document.querySelectorAll('td.s001'), function (e) { return getComputedStyle(e).display === 'none'; });
  var shown = [].filter.call(document.querySelectorAll('td.s002'), function (e) { return getComputedStyle(e).display !== 'none'; });
  var out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({images: imgs.length, broken: broken.map(function (i) { return i.getAttribute('src'); }),
    pixelated: px.length, hidden_s001: hidden.length, shown_s002: shown.length});
  document.body.appendChild(out);
});
</script>"""
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless browser test needs Debian's chromium at /usr/bin/chromium (apt-get install chromium; .ci/run installs it)"
)
def test_gallery_page_in_headless_chromium(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_gallery(run.root)
    probe = page.with_name("probe.html")  # same folder, so the relative links resolve the same way
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))

    def chromium(*args):
        profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
        cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=90)

    proc = chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r"<pre id=\"probe\">(.*?)</pre>", proc.stdout)
    assert found, f"no probe result (rc {proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"'))
    n_eval = 3 * len(PROMPTS) * K
    assert result["broken"] == []
    assert result["images"] == n_eval + 1  # every eval image and the reward curve
    assert result["pixelated"] == n_eval
    assert result["hidden_s001"] == len(PROMPTS) * K and result["shown_s002"] == len(PROMPTS) * K

    shot = tmp_path / "gallery.png"
    proc = chromium("--screenshot=" + str(shot), "--window-size=1280,2400", "--hide-scrollbars", page.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2400)
    arr = np.asarray(img)
    for p in range(len(PROMPTS)):  # the first prompts' base images are rendered, unblurred, on screen
        if p < 2:
            assert (arr == np.array(colour(0, p, 0), np.uint8)).all(-1).sum() > 100 * 100, p
    shutil.copy(shot, run.root / "gallery" / "screenshot.png")


def test_display_size_enlarges_small_images_by_whole_factors():
    from raft_diffusion.diffusion.gallery import display_size

    assert display_size(32, 32, 128, 256) == (128, 128, True)
    assert display_size(24, 48, 128, 256) == (72, 144, True)  # ceil(128 / 48) = 3
    assert display_size(200, 100, 128, 256) == (200, 100, False)
    assert display_size(512, 256, 128, 256) == (256, 128, False)


def test_stage_without_saved_images_shows_placeholders(tmp_path):
    run = make_run(tmp_path / "run")
    path = run.stage_dir(1) / "eval.jsonl"
    rows = [{k: v for k, v in r.items() if k != "image"} for r in map(json.loads, path.read_text().splitlines())]
    write_jsonl(path, rows)  # as with eval.save_images=false
    page = write_gallery(run.root)
    text = page.read_text()
    assert text.count(">no image</div>") == len(PROMPTS) * K
    assert not any("stages/001" in ref for _, ref in parse(page).refs)
    assert all(local_target(page, ref).is_file() for _, ref in parse(page).refs)


def test_reward_curve_draws_screens_and_the_target(tmp_path):
    """Screened stages (hollow points) and early_stop.target_rise_sd (a line at base + x sd) are drawn in tab:purple,
    which nothing else on the curve uses; without them no purple pixel appears."""
    from raft_diffusion.diffusion.gallery import render_reward_curve

    rows = [
        {"stage": 0, "eval_reward_mean": 5.0, "eval_reward_std": 2.0},
        {"stage": 1, "screen_reward_mean": 5.8, "screen_n": 32, "reward_mean": 5.1},
        {"stage": 2, "eval_reward_mean": 7.2, "eval_reward_std": 1.0, "reward_mean": 6.0},
    ]

    def purple(path):
        px = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int((np.abs(px - np.array([148, 103, 189])).sum(axis=2) < 30).sum())

    plain = [{k: v for k, v in r.items() if not k.startswith("screen")} for r in rows]
    render_reward_curve(tmp_path / "plain.png", plain)
    render_reward_curve(tmp_path / "screens.png", rows)
    render_reward_curve(tmp_path / "both.png", rows, target_rise_sd=1.0)
    assert purple(tmp_path / "plain.png") == 0
    assert 0 < purple(tmp_path / "screens.png") < purple(tmp_path / "both.png")


def test_metrics_table_shows_a_screened_stages_screen_mean(tmp_path):
    """A stage screened, not evaluated (eval.screen_per_prompt), shows its screen's mean, marked as a screen; an
    evaluated stage keeps mean ± std, and a stage with neither shows '-'."""
    from raft_diffusion.diffusion.gallery import _metrics_table

    rows = [
        {"stage": 0, "eval_reward_mean": 5.0, "eval_reward_std": 2.0},
        {"stage": 1, "screen_reward_mean": 5.8, "screen_n": 32},
        {"stage": 2, "reward_mean": 6.0},
        {"stage": 3, "eval_reward_mean": 7.2, "eval_reward_std": 1.0, "screen_reward_mean": 7.0, "screen_n": 32},
    ]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row)[1] for row in _metrics_table(rows, 3).split("<tr")[2:]]
    assert cells == ["5 &plusmn; 2", "~5.8 (screen)", "-", "7.2 &plusmn; 1"]
    assert "title='screen of 32 held-out images'" in _metrics_table(rows, 3)


def test_gallery_shows_screen_estimates_and_stages_at_a_scale(tmp_path):
    """A screen paired with the base shows its estimate, not its raw mean; a stage evaluated with its LoRA at a scale
    (early_stop.lora_scales) says so in the table and is drawn as a red star off the line (no red without one)."""
    from raft_diffusion.diffusion.gallery import _metrics_table, render_reward_curve

    rows = [
        {"stage": 0, "eval_reward_mean": 5.0, "eval_reward_std": 2.0},
        {"stage": 1, "screen_reward_mean": 5.8, "screen_reward_estimate": 6.1, "screen_n": 32},
        {"stage": 2, "eval_reward_mean": 7.2, "eval_reward_std": 1.0, "eval_lora_scale": 1.3},
    ]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row)[1] for row in _metrics_table(rows, 2).split("<tr")[2:]]
    assert cells == ["5 &plusmn; 2", "~6.1 (screen)", "7.2 &plusmn; 1 (LoRA x1.3)"]

    def red(path):
        px = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int((np.abs(px - np.array([214, 39, 40])).sum(axis=2) < 30).sum())

    render_reward_curve(tmp_path / "scaled.png", rows)
    render_reward_curve(tmp_path / "plain.png", [{k: v for k, v in r.items() if k != "eval_lora_scale"} for r in rows])
    assert red(tmp_path / "plain.png") == 0 < red(tmp_path / "scaled.png")
