"""The toy world: procedurally drawn 32x32 scenes of one shape, their captions and a hidden gold aesthetic.

A scene is one subject (a circle, square, triangle or cross) of a named colour and size at one of nine
positions, on a plain or noisy background of a named colour. Everything is deterministic from a seed.

The **gold aesthetic** (1-10) is a fixed function of four properties of the scene that a person would agree
make a small picture better: a large subject, centred, contrasting with its background, on a clean
background. :mod:`raft_diffusion.diffusion.toyworld.oracle` measures the same four properties from pixels, so the gold
score of *any* image (a generated one included) can be estimated; on renders the two agree closely.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # name -> RGB; hues far apart so colour is readable at any size
    "red": (215, 40, 40),
    "yellow": (235, 205, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 210),
    "purple": (140, 50, 180),
}
BACKGROUNDS = {"white": (235, 235, 235), "black": (25, 25, 25), "gray": (128, 128, 128)}
SIZES = {"small": 4.0, "medium": 7.0, "large": 11.0}  # half-extent of the shape's box, in pixels
POSITIONS = {  # name -> (dx, dy) direction from the centre
    "top left": (-1, -1), "top": (0, -1), "top right": (1, -1),
    "left": (-1, 0), "centre": (0, 0), "right": (1, 0),
    "bottom left": (-1, 1), "bottom": (0, 1), "bottom right": (1, 1),
}  # fmt: skip
NOISE_STD = 0.06  # std of the grey noise on a "noisy" background, in [0, 1] units
MAX_OFFSET = 9.0  # how far (px) a position moves a small subject from the centre; big ones move less

# gold aesthetic: 1 + 9 * (weighted mean of four scores in [0, 1])
GOLD_WEIGHTS = {"size": 0.35, "centring": 0.25, "contrast": 0.25, "clean": 0.15}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    noisy: bool
    half: float  # half-extent in px (the size's nominal value plus jitter)
    cx: float  # centre of the shape's box, px (0 = left edge of the image)
    cy: float
    noise_seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def luminance(rgb) -> np.ndarray:
    """Rec. 601 luma of RGB values in [0, 1] (last axis)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _offset(half: float) -> float:
    return min(MAX_OFFSET, IMAGE_SIZE / 2 - half - 1.5)


def make_scene(
    shape: str,
    colour: str,
    size: str,
    position: str,
    background: str,
    noisy: bool = False,
    *,
    jitter: np.random.Generator | None = None,
    noise_seed: int = 0,
) -> Scene:
    """A scene from its named attributes; ``jitter`` perturbs size (+-0.5 px) and centre (+-1 px)."""
    for value, names, what in (
        (shape, SHAPES, "shape"),
        (colour, COLOURS, "colour"),
        (size, SIZES, "size"),
        (position, POSITIONS, "position"),
        (background, BACKGROUNDS, "background"),
    ):
        if value not in names:
            raise ValueError(f"unknown {what} {value!r}; one of {list(names)}")
    half = SIZES[size]
    jx = jy = 0.0
    if jitter is not None:
        half += float(jitter.uniform(-0.5, 0.5))
        jx, jy = (float(v) for v in jitter.uniform(-1.0, 1.0, size=2))
    dx, dy = POSITIONS[position]
    off = _offset(half)
    return Scene(
        shape, colour, size, position, background, bool(noisy), half, IMAGE_SIZE / 2 + dx * off + jx, IMAGE_SIZE / 2 + dy * off + jy, int(noise_seed)
    )


def sample_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` random scenes, uniform over the attributes (a third of the backgrounds noisy); deterministic."""
    rng = np.random.default_rng([seed, 0x7079])
    out = []
    for _ in range(n):
        out.append(
            make_scene(
                SHAPES[rng.integers(len(SHAPES))],
                list(COLOURS)[rng.integers(len(COLOURS))],
                list(SIZES)[rng.integers(len(SIZES))],
                list(POSITIONS)[rng.integers(len(POSITIONS))],
                list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
                bool(rng.random() < 1 / 3),
                jitter=rng,
                noise_seed=int(rng.integers(2**31)),
            )
        )
    return out


# ----------------------------------------------------------------------------------------------- drawing


def shape_mask(shape: str, cx: float, cy: float, half: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (``size`` x ``size``) of ``shape`` with box centre (cx, cy)."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    d = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (cx - half) * s, (cy - half) * s, (cx + half) * s, (cy + half) * s
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "cross":
        t = 0.36 * half * s  # half the arm thickness
        d.rectangle([x0, cy * s - t, x1, cy * s + t], fill=255)
        d.rectangle([cx * s - t, y0, cx * s + t, y1], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {list(SHAPES)}")
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def render(scene: Scene) -> np.ndarray:
    """The scene as ``uint8 [32, 32, 3]``."""
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float64) / 255.0
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float64) / 255.0
    img = np.broadcast_to(bg, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if scene.noisy:
        noise = np.random.default_rng(scene.noise_seed).normal(0.0, NOISE_STD, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
        img = img + noise
    m = shape_mask(scene.shape, scene.cx, scene.cy, scene.half)[..., None]
    img = img * (1 - m) + fg * m
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """``uint8 [N, 32, 32, 3]``."""
    return np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def to_tensor(images: np.ndarray):
    """``uint8 [N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [0, 1] (the reward contract)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


# ----------------------------------------------------------------------------------------------- captions


def caption(scene: Scene, *, size: bool = True, position: bool = True, background: bool = True) -> str:
    """E.g. ``"a small red triangle in the top left on a noisy white background"``.

    Turning parts off gives the shorter prompts a person would type (``"a red triangle on a white background"``);
    colour and shape are always named.
    """
    words = ["a"] + ([scene.size] if size else []) + [scene.colour, scene.shape]
    if position:
        words.append(f"{_PREPOSITION.get(scene.position, 'in')} the {scene.position}")
    if background:
        words.append(f"on a {'noisy ' if scene.noisy else ''}{scene.background} background")
    return " ".join(words)


def caption_variant(scene: Scene, rng: np.random.Generator, p_full: float = 0.5) -> str:
    """The full caption with probability ``p_full``, else one with each optional part kept with p = 0.5."""
    if rng.random() < p_full:
        return caption(scene)
    keep = rng.random(3) < 0.5
    return caption(scene, size=bool(keep[0]), position=bool(keep[1]), background=bool(keep[2]))


_PREPOSITION = {"top": "at", "bottom": "at", "left": "on", "right": "on"}  # else "in" (the centre, the top left)
_CAPTION_RE = re.compile(
    r"^a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) (?:in|at|on) the (?P<position>[a-z ]+?) on an? "
    r"(?P<noisy>noisy )?(?P<background>\w+) background$"
)


def parse_caption(text: str) -> dict:
    """Attributes named in a caption (inverse of :func:`caption`); raises ``ValueError`` if it is not one.

    Short prompts are read too: any text naming exactly one known shape and at most one known colour gives
    ``{"shape": ..., "colour": ... or None}`` (other keys absent).
    """
    m = _CAPTION_RE.match(text.strip().lower())
    if m and m["size"] in SIZES and m["colour"] in COLOURS and m["shape"] in SHAPES and m["position"] in POSITIONS and m["background"] in BACKGROUNDS:
        return {
            "shape": m["shape"],
            "colour": m["colour"],
            "size": m["size"],
            "position": m["position"],
            "background": m["background"],
            "noisy": bool(m["noisy"]),
        }
    words = re.findall(r"[a-z]+", text.lower())
    shapes = [w for w in words if w in SHAPES]
    colours = [w for w in words if w in COLOURS]
    if len(set(shapes)) != 1 or len(set(colours)) > 1:
        raise ValueError(f"not a toy-world caption (need one shape of {list(SHAPES)}): {text!r}")
    return {"shape": shapes[0], "colour": colours[0] if colours else None}


# ----------------------------------------------------------------------------------------------- gold


def aesthetic_from_features(extent: float, offset: float, contrast: float, noise: float) -> float:
    """The gold formula on measurable quantities (shared by the gold score and the pixel oracle).

    extent: the subject's box side / image side; offset: px from the box centre to the image centre;
    contrast: |luma(subject) - luma(background)|; noise: std of the background's luma.
    """
    scores = {
        # grows up to 70% of the frame; a subject that fills the frame is not better (0 at 100%)
        "size": float(min(np.clip((extent - 0.2) / 0.5, 0.0, 1.0), np.clip((1.0 - extent) / 0.2, 0.0, 1.0))),
        "centring": float(1.0 - np.clip(offset / 12.0, 0.0, 1.0)),
        "contrast": float(np.clip(contrast / 0.8, 0.0, 1.0)),
        "clean": float(1.0 - np.clip(noise / NOISE_STD, 0.0, 1.0)),
    }
    return 1.0 + 9.0 * sum(GOLD_WEIGHTS[k] * v for k, v in scores.items())


def gold_aesthetic(scene: Scene) -> float:
    """The hidden gold aesthetic of a scene, in [1, 10]: large, centred, high-contrast, clean is best."""
    fg = np.asarray(COLOURS[scene.colour]) / 255.0
    bg = np.asarray(BACKGROUNDS[scene.background]) / 255.0
    offset = float(np.hypot(scene.cx - IMAGE_SIZE / 2, scene.cy - IMAGE_SIZE / 2))
    return aesthetic_from_features(2 * scene.half / IMAGE_SIZE, offset, abs(float(luminance(fg) - luminance(bg))), NOISE_STD if scene.noisy else 0.0)


def all_captions(*, noisy: bool | None = None) -> list[str]:
    """Every caption of the world without jitter (``noisy`` restricts the background style)."""
    out = []
    for shape in SHAPES:
        for colour in COLOURS:
            for size in SIZES:
                for position in POSITIONS:
                    for bg in BACKGROUNDS:
                        for nz in (False, True) if noisy is None else (noisy,):
                            out.append(caption(make_scene(shape, colour, size, position, bg, nz)))
    return out
