"""The embedded default dataset: drawn faces written in the official CelebA layout.

CelebA cannot be downloaded here, so the whole pipeline runs on this stand-in. Every one of
the 40 attributes has a visible cue (some deliberately subtle: Attractive, Pointy_Nose,
Arched_Eyebrows; those of the groups' component attributes large enough for the demo's
teachers), prevalences are close to CelebA's and the usual dependencies
hold (hair colours exclusive and absent when bald, beards only on men, makeup rarely on men,
gray hair mostly old). Nuisances: position, scale, rotation, background, lighting, blur,
and three *photo styles* (studio, dim, vintage) that hide different cues.

The training split is ordered so that its k-th third is mostly style k: teachers trained on
different contiguous parts (``--train_part k/P``) are experts on different styles, which is
what makes adaptive (per-image) selection of teachers worthwhile. Val and test mix styles
evenly.

Besides the CelebA files it writes ``list_attr_celeba_clean.txt`` (the drawn truth, before
label noise) and ``list_style_synthetic.txt`` (each image's style), so analyses can tell
label noise apart from errors.

Run ``python -m kamal_attr.synthetic --out data/synthetic`` to write one.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from . import KamalError
from .attributes import CELEBA_ATTRIBUTES
from .celeba import SYNTHETIC_MARKER
from .cli import ArgumentParser, run
from .config import bounded_int

WIDTH, HEIGHT = 178, 218
STYLES = ("studio", "dim", "vintage")
#: Each image's photo style, beside the CelebA lists (not part of the CelebA format).
STYLE_LIST = "list_style_synthetic.txt"
#: Share of the training split drawn in the block's own style (the rest split evenly).
STYLE_SKEW = 0.97
#: Label-flip rates: subjective attributes are noisier in CelebA, too.
SUBJECTIVE = {"Attractive", "Oval_Face", "Pointy_Nose", "Big_Lips", "Big_Nose",
              "Arched_Eyebrows", "Narrow_Eyes", "Bags_Under_Eyes", "High_Cheekbones"}
FLIP_RATE = {a: (0.03 if a in SUBJECTIVE else 0.01) for a in CELEBA_ATTRIBUTES}

HAIR_COLOURS = {"black": (28, 22, 20), "brown": (112, 68, 36), "blond": (226, 196, 118),
                "gray": (168, 166, 162), "red": (156, 58, 28)}
SKIN_TONES = ((232, 184, 152), (206, 146, 110), (242, 200, 170), (168, 116, 84),
              (124, 84, 60), (220, 170, 130))
PALE_SKIN = (252, 236, 228)


def split_sizes(num_images: int) -> tuple[int, int, int]:
    """Train / val / test sizes: 60 %, 10 %, the rest (4800 / 800 / 2400 for 8000).

    A large test split keeps the comparisons of the demo table precise (±0.4 points)."""
    n_train, n_val = num_images * 6 // 10, num_images // 10
    return n_train, n_val, num_images - n_train - n_val


def sample_faces(num_images: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw every image's latent face description (vectorised).

    Returns boolean arrays for the 40 attributes (the clean truth) plus the latent
    variables the renderer needs (``hair``, ``long_hair``, ``full_beard``, ``style``...).
    Probabilities are chosen so that marginals land near CelebA's.
    """
    n = num_images
    u = lambda: rng.random(n)  # noqa: E731 - one fresh uniform per call
    f: dict[str, np.ndarray] = {}
    male = u() < 0.417
    young = u() < 0.774
    f["Male"], f["Young"] = male, young
    bald = male & (u() < 0.05)
    gray = ~bald & (u() < np.where(young, 0.008, 0.17))
    r = u()
    p_black, p_blond, p_brown = 0.26, np.where(male, 0.045, 0.25), 0.22
    colour = np.where(r < p_black, 1, np.where(r < p_black + p_blond, 2,
                      np.where(r < p_black + p_blond + p_brown, 3, 4)))
    colour = np.where(bald, 0, np.where(gray, 5, colour))  # 0 none 1 black 2 blond 3 brown 4 red 5 gray
    f["hair"] = colour
    f["Bald"], f["Gray_Hair"] = bald, colour == 5
    f["Black_Hair"], f["Blond_Hair"], f["Brown_Hair"] = colour == 1, colour == 2, colour == 3
    f["Wearing_Hat"] = u() < 0.048
    f["Bangs"] = ~bald & (u() < np.where(male, 0.08, 0.21))
    f["Receding_Hairline"] = ~bald & (u() < np.where(male, np.where(young, 0.08, 0.25),
                                                      np.where(young, 0.03, 0.08)))
    long_hair = ~bald & (u() < np.where(male, 0.08, 0.85))
    f["long_hair"] = long_hair
    r = u()
    straight = ~bald & (r < np.where(long_hair, 0.35, 0.15))
    wavy = ~bald & ~straight & (r < np.where(long_hair, 0.85, 0.30))
    f["Straight_Hair"], f["Wavy_Hair"] = straight, wavy
    beard = male & (u() < 0.40)
    r = u()
    goatee = beard & (r < 0.38)
    mustache = beard & ((r >= 0.38) & (r < 0.58) | goatee & (u() < 0.3))
    f["Goatee"], f["Mustache"], f["No_Beard"] = goatee, mustache, ~beard
    f["full_beard"] = beard & ~goatee & ~mustache
    f["5_o_Clock_Shadow"] = male & ~beard & (u() < 0.42)
    f["Sideburns"] = male & (u() < 0.14)
    makeup = u() < np.where(male, 0.01, 0.64)
    f["Heavy_Makeup"] = makeup
    f["Wearing_Lipstick"] = u() < np.where(male, 0.01, np.where(makeup, 0.95, 0.55))
    f["Wearing_Earrings"] = u() < np.where(male, 0.03, 0.30)
    f["Wearing_Necklace"] = u() < np.where(male, 0.01, 0.20)
    f["Wearing_Necktie"] = u() < np.where(male, 0.17, 0.002)
    smiling = u() < 0.482
    f["Smiling"] = smiling
    f["Mouth_Slightly_Open"] = u() < np.where(smiling, 0.75, 0.21)
    f["High_Cheekbones"] = u() < np.where(smiling, 0.78, 0.15)
    p_attractive = np.clip(np.where(young, 0.60, 0.16) + np.where(male, -0.17, 0.12), 0.02, 0.95)
    f["Attractive"] = u() < p_attractive
    f["Bags_Under_Eyes"] = u() < np.where(young, 0.14, 0.42)
    f["Big_Lips"] = u() < 0.24
    f["Big_Nose"] = u() < np.where(male, 0.36, 0.14)
    f["Pointy_Nose"] = u() < np.where(f["Big_Nose"], 0.15, 0.31)
    f["Narrow_Eyes"] = u() < 0.115
    f["Oval_Face"] = u() < 0.284
    f["Pale_Skin"] = u() < 0.043
    f["Rosy_Cheeks"] = u() < np.where(male, 0.01, 0.11)
    f["Arched_Eyebrows"] = u() < np.where(male, 0.03, 0.44)
    f["Bushy_Eyebrows"] = u() < np.where(male, 0.25, 0.065)
    chubby = u() < np.where(young, 0.03, 0.15)
    f["Chubby"] = chubby
    f["Double_Chin"] = u() < np.where(chubby, 0.45, 0.025)
    f["Eyeglasses"] = u() < np.where(young, 0.04, 0.16)
    f["Blurry"] = u() < 0.051
    return f


def assign_styles(n_train: int, n_rest: int, rng: np.random.Generator) -> np.ndarray:
    """Style per image: the k-th third of the training split is mostly style k."""
    block = np.arange(n_train) * len(STYLES) // max(n_train, 1)
    other = (block + rng.integers(1, len(STYLES), n_train)) % len(STYLES)
    train = np.where(rng.random(n_train) < STYLE_SKEW, block, other)
    return np.concatenate([train, rng.integers(0, len(STYLES), n_rest)])


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _darker(colour: tuple, factor: float, alpha: int = 255) -> tuple:
    return tuple(int(c * factor) for c in colour[:3]) + (alpha,)


def _wavy_edge(x0: float, y0: float, y1: float, amplitude: float, kind: int,
               phase: float, steps: int = 10) -> list[tuple[float, float]]:
    """Points of a vertical hair edge: straight (0), wavy (1) or ragged (2)."""
    pts = []
    for i in range(steps + 1):
        y = y0 + (y1 - y0) * i / steps
        dx = 0.0 if kind == 0 else (amplitude * math.sin(phase + i * 1.6) if kind == 1
                                    else amplitude * (1 if i % 2 else -1) * 0.6)
        pts.append((x0 + dx, y))
    return pts


def render_face(face: dict, style: int, rng: np.random.Generator) -> Image.Image:
    """Draw one 178x218 face from its description ``face`` (attribute -> bool, latents)."""
    A = face  # short alias: attributes read like A["Smiling"]
    # --- background --------------------------------------------------------------------
    bg_base = {0: (215, 215, 220), 1: (70, 70, 90), 2: (150, 140, 120)}[style]
    bg = _jitter(bg_base, rng, 40)
    canvas = np.empty((HEIGHT, WIDTH, 3), np.float32)
    grad = np.linspace(0.85, 1.15, HEIGHT, dtype=np.float32)[:, None, None]
    canvas[:] = np.array(bg, np.float32) * grad
    if style == 2 or rng.random() < 0.2:  # stripes: a busy background
        period = int(rng.integers(8, 20))
        canvas[(np.arange(HEIGHT) // period) % 2 == 0] *= 0.85
    layer = Image.new("RGBA", (WIDTH, HEIGHT), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer, "RGBA")
    # --- geometry -----------------------------------------------------------------------
    s = rng.uniform(0.85, 1.08)
    cx, cy = WIDTH / 2 + rng.uniform(-9, 9), 112 + rng.uniform(-9, 9)
    a = 37 * s * (1.13 if A["Chubby"] else 1.0)
    # Every face has the same length : width (1.2); an oval face's lower half tapers. Its
    # length is no cue: training crops squash faces by 5-25 %, so a longer face would read
    # as oval in training and round ones as oval at eval time.
    b = a * 1.2 * (0.93 if A["Chubby"] else 1.0)
    skin = PALE_SKIN if A["Pale_Skin"] else SKIN_TONES[rng.integers(len(SKIN_TONES))]
    skin = _jitter(skin, rng, 8)
    if not A["Young"]:  # older skin: paler and greyer
        skin = tuple(int(0.55 * c + 0.45 * g) for c, g in zip(skin, (200, 192, 188)))
    skin = skin + (255,)
    shade = _darker(skin, 0.72)
    hair = (_jitter(HAIR_COLOURS[("black", "blond", "brown", "red", "gray")[A["hair"] - 1]],
                    rng, 10) + (255,)) if A["hair"] else None
    texture = 0 if A["Straight_Hair"] else (1 if A["Wavy_Hair"] else 2)
    phase = rng.uniform(0, 6.3)
    # --- body: shirt, neck, tie, necklace --------------------------------------------------
    shirt = _jitter((90, 100, 130), rng, 70) + (255,)
    d.polygon([(cx - 2.2 * a, HEIGHT + 5), (cx - 1.6 * a, cy + b + 22), (cx + 1.6 * a, cy + b + 22),
               (cx + 2.2 * a, HEIGHT + 5)], fill=shirt)
    # long hair behind the head, down to the shoulders
    if A["long_hair"] and hair:
        left = _wavy_edge(cx - a - 13, cy - 0.5 * b, cy + b + 32, 5, texture, phase)
        right = _wavy_edge(cx + a + 13, cy + b + 32, cy - 0.5 * b, 5, texture, phase)
        d.polygon(left + right, fill=hair)
    neck_w = 0.38 * a
    d.rectangle([cx - neck_w, cy + 0.6 * b, cx + neck_w, cy + b + 26], fill=skin)
    if A["Wearing_Necktie"]:
        y0 = cy + b + 22
        d.polygon([(cx - 14, y0 - 2), (cx, y0 + 12), (cx + 14, y0 - 2)], fill=(245, 245, 245, 255))
        tie = _jitter((150, 30, 40), rng, 50) + (255,)
        d.polygon([(cx - 4, y0 + 4), (cx + 4, y0 + 4), (cx + 7, y0 + 40), (cx, y0 + 48),
                   (cx - 7, y0 + 40)], fill=tie)
    if A["Wearing_Necklace"]:
        metal = (230, 200, 80, 255) if rng.random() < 0.6 else (220, 220, 230, 255)
        for t in np.linspace(0.15, 0.85, 9):
            ang = math.pi * t
            x, y = cx - 1.05 * neck_w * math.cos(ang), cy + b + 8 + 10 * math.sin(ang)
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=metal)
    # --- hair cap, ears, face -----------------------------------------------------------
    if hair:
        if texture == 1:  # wavy outline of the cap
            pts = [(cx + (a + 8 + 3 * math.sin(phase + 5 * t)) * math.cos(t),
                    cy - 0.12 * b - (b + 6 + 3 * math.sin(phase + 5 * t)) * math.sin(t))
                   for t in np.linspace(-0.25, math.pi + 0.25, 24)]
            d.polygon(pts, fill=hair)
        else:
            d.ellipse([cx - a - 7, cy - 1.12 * b - 6, cx + a + 7, cy + 0.6 * b], fill=hair)
    for side in (-1, 1):
        ex = cx + side * a * 0.98
        d.ellipse([ex - 6, cy - 10, ex + 6, cy + 12], fill=skin)
    if A["Oval_Face"]:  # egg-shaped: the lower half tapers to the chin
        d.polygon([(cx + a * math.cos(t) * (1 - 0.5 * max(0.0, math.sin(t))), cy + b * math.sin(t))
                   for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)], fill=skin)
    else:
        d.ellipse([cx - a, cy - b, cx + a, cy + b], fill=skin)
    # An oval face tapers to a narrow chin; others have a broad jaw (squarer on men). The
    # shape, not the length, is the cue: training crops squash faces by up to 25 %.
    if not A["Oval_Face"]:
        jaw = (0.78, 0.86) if A["Male"] else (0.62, 0.92)
        d.polygon([(cx - 0.96 * a, cy + 0.05 * b), (cx - jaw[0] * a, cy + jaw[1] * b),
                   (cx + jaw[0] * a, cy + jaw[1] * b), (cx + 0.96 * a, cy + 0.05 * b)], fill=skin)
        d.line([(cx - jaw[0] * a, cy + jaw[1] * b), (cx + jaw[0] * a, cy + jaw[1] * b)],
               fill=shade, width=6)
    else:  # hollow cheeks shade the tapering sides down to the chin
        for side in (-1, 1):
            d.polygon([(cx + side * 0.85 * a, cy + 0.15 * b), (cx + side * 0.62 * a, cy + 0.55 * b),
                       (cx + side * 0.2 * a, cy + 0.97 * b), (cx + side * 0.45 * a, cy + 0.45 * b)],
                      fill=_darker(skin, 0.55, 240))
    if A["Double_Chin"]:
        d.arc([cx - 0.45 * a, cy + 0.78 * b, cx + 0.45 * a, cy + 1.08 * b], 20, 160,
              fill=shade, width=2)
    # --- hairline, receding temples, bangs, hat --------------------------------------------
    if hair:
        d.chord([cx - a, cy - b, cx + a, cy + b], 215, 325, fill=hair)  # hairline at cy - 0.57 b
        if A["Receding_Hairline"]:
            for side in (-1, 1):
                tx, ty = cx + side * 0.5 * a, cy - 0.74 * b
                d.ellipse([tx - 0.3 * a, ty - 0.22 * b, tx + 0.3 * a, ty + 0.12 * b], fill=skin)
        if A["Sideburns"]:
            for side in (-1, 1):
                x = cx + side * (a - 5)
                d.rectangle([x - 4, cy - 0.25 * b, x + 4, cy + 0.25 * b], fill=hair)
        if A["Bangs"]:
            y0, y1 = cy - 0.72 * b, cy - 0.3 * b
            fringe = [(cx - 0.9 * a + i * 0.18 * a, y1 + (5 if i % 2 else -1)) for i in range(11)]
            d.polygon([(cx - 0.92 * a, y0)] + fringe + [(cx + 0.92 * a, y0)], fill=hair)
    elif A["Bald"]:
        d.ellipse([cx - 0.3 * a, cy - 0.92 * b, cx + 0.1 * a, cy - 0.75 * b], fill=_darker(skin, 1.08))
    if A["Wearing_Hat"]:
        hat = _jitter((60, 60, 80), rng, 60) + (255,)
        d.rectangle([cx - a - 14, cy - 0.7 * b, cx + a + 14, cy - 0.58 * b], fill=hat)
        d.polygon([(cx - 0.85 * a, cy - 0.68 * b), (cx - 0.7 * a, cy - 1.3 * b),
                   (cx + 0.7 * a, cy - 1.3 * b), (cx + 0.85 * a, cy - 0.68 * b)], fill=hat)
    # --- age --------------------------------------------------------------------------
    if not A["Young"]:
        wrinkle = _darker(skin, 0.45, 240)
        for _ in range(6):  # age spots
            x, y = cx + rng.uniform(-0.7, 0.7) * a, cy + rng.uniform(-0.6, 0.2) * b
            d.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=(120, 80, 50, 200))
        if not A["Bangs"]:
            for k in range(3):
                y = cy - 0.5 * b + 5 * k
                d.line([(cx - 0.4 * a, y), (cx + 0.4 * a, y)], fill=wrinkle, width=2)
        for side in (-1, 1):  # crow's feet and nasolabial folds
            x = cx + side * 0.7 * a
            d.line([(x, cy - 0.08 * b), (x + side * 8, cy - 0.13 * b)], fill=wrinkle, width=2)
            d.line([(x, cy - 0.02 * b), (x + side * 8, cy + 0.03 * b)], fill=wrinkle, width=2)
            d.line([(cx + side * 0.26 * a, cy + 0.28 * b), (cx + side * 0.42 * a, cy + 0.6 * b)],
                   fill=wrinkle, width=3)
    # --- eyes, brows, makeup, glasses -------------------------------------------------------
    brow = _darker(hair if hair else (90, 70, 60), 0.75) if hair else (80, 60, 50, 255)
    eye_y = cy - 0.05 * b
    eye_w = 0.27 * a * (1.08 if A["Attractive"] else 1.0)
    eye_h = eye_w * (0.22 if A["Narrow_Eyes"] else 0.62)
    for side in (-1, 1):
        ex = cx + side * 0.4 * a
        ey = eye_y + (0 if A["Attractive"] or side < 0 else 2.5)
        if A["Heavy_Makeup"]:
            shadow = _jitter((120, 60, 150), rng, 50) + (200,)
            d.ellipse([ex - eye_w * 1.25, ey - eye_h - 9, ex + eye_w * 1.25, ey + 2], fill=shadow)
        if A["Bags_Under_Eyes"]:  # dark, puffy crescents
            d.chord([ex - eye_w * 1.1, ey - eye_h - 2, ex + eye_w * 1.1, ey + eye_h + 12], 10, 170,
                    fill=(80, 60, 95, 220))
        white = (120, 110, 105, 255) if A["Narrow_Eyes"] else (250, 250, 250, 255)  # no white shows
        d.ellipse([ex - eye_w, ey - eye_h, ex + eye_w, ey + eye_h], fill=white)
        r_iris = min(eye_h, eye_w * 0.5)
        d.ellipse([ex - r_iris, ey - r_iris, ex + r_iris, ey + r_iris], fill=(40, 30, 30, 255))
        if A["Heavy_Makeup"]:
            d.arc([ex - eye_w, ey - eye_h, ex + eye_w, ey + eye_h], 190, 350,
                  fill=(10, 10, 10, 255), width=3)
        by = ey - eye_h - 0.12 * b
        bw = 11 if A["Bushy_Eyebrows"] else 2
        if A["Arched_Eyebrows"]:
            d.arc([ex - eye_w * 1.2, by - 3, ex + eye_w * 1.2, by + 7], 200, 340, fill=brow, width=bw)
        else:
            d.line([(ex - eye_w * 1.2, by + 1), (ex + eye_w * 1.2, by - side)], fill=brow, width=bw)
        if A["Eyeglasses"]:
            frame = (20, 20, 20, 255) if rng.random() < 0.7 else (140, 110, 60, 255)
            d.ellipse([ex - eye_w * 1.6, ey - eye_h * 1.5 - 3, ex + eye_w * 1.6, ey + eye_h * 1.5 + 3],
                      outline=frame, width=2)
            d.line([(ex + side * eye_w * 1.6, ey), (cx + side * a, ey - 2)], fill=frame, width=2)
    if A["Eyeglasses"]:
        d.line([(cx - 0.4 * a + eye_w * 1.6, eye_y), (cx + 0.4 * a - eye_w * 1.6, eye_y)],
               fill=(20, 20, 20, 255), width=2)
    if not A["Attractive"]:  # blemishes
        for _ in range(3):
            x, y = cx + rng.uniform(-0.6, 0.6) * a, cy + rng.uniform(0.1, 0.5) * b
            d.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=_darker(skin, 0.75))
    # --- cheeks -----------------------------------------------------------------------
    for side in (-1, 1):
        if A["High_Cheekbones"]:
            d.line([(cx + side * 0.8 * a, cy + 0.02 * b), (cx + side * 0.48 * a, cy + 0.32 * b)],
                   fill=_darker(skin, 0.7, 170), width=3)
        if A["Rosy_Cheeks"]:
            x, y, rr = cx + side * 0.52 * a, cy + 0.26 * b, 0.15 * a
            d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=(235, 90, 110, 130))
    # --- nose -------------------------------------------------------------------------
    nl, nw = (0.36 * b, 0.17 * a) if A["Big_Nose"] else (0.27 * b, 0.11 * a)
    top, tip = cy + 0.0 * b, cy + nl
    if A["Pointy_Nose"]:
        d.polygon([(cx, top), (cx + nw, tip - 2), (cx, tip + 3), (cx - nw, tip - 2)],
                  outline=shade, width=2)
    else:
        d.line([(cx, top), (cx, tip - nw)], fill=shade, width=2)
        d.ellipse([cx - nw, tip - nw, cx + nw, tip + nw * 0.6], outline=shade, width=2)
    # --- beard --------------------------------------------------------------------------
    beard = _darker(hair, 0.8) if hair else (50, 40, 35, 255)
    if A["full_beard"]:
        d.chord([cx - a, cy - 0.2 * b, cx + a, cy + b], 12, 168, fill=beard)
    if A["5_o_Clock_Shadow"]:
        xs = rng.uniform(-0.75, 0.75, 70)
        ys = rng.uniform(0.45, 0.95, 70)
        for x, y in zip(xs, ys):
            if x * x + y * y < 0.95:
                px, py = cx + x * a, cy + y * b
                d.point([(px, py), (px + 1, py)], fill=(60, 55, 55, 190))
    if A["Goatee"]:
        d.ellipse([cx - 0.22 * a, cy + 0.66 * b, cx + 0.22 * a, cy + 0.95 * b], fill=beard)
    # --- mouth --------------------------------------------------------------------------
    my = cy + 0.55 * b
    mw = 0.3 * a * (1.4 if A["Smiling"] else 1.0)
    lip = (195, 25, 45, 255) if A["Wearing_Lipstick"] else _darker(skin, 0.78)
    lw = 5 if A["Big_Lips"] else 3
    if A["Mouth_Slightly_Open"]:
        d.ellipse([cx - 0.7 * mw, my - 3, cx + 0.7 * mw, my + 4], fill=(70, 20, 25, 255))
    if A["Smiling"]:  # a wide curved mouth showing teeth
        d.chord([cx - mw, my - 16, cx + mw, my + 8], 10, 170, fill=(250, 248, 240, 255))
        d.arc([cx - mw, my - 16, cx + mw, my + 8], 10, 170, fill=lip, width=lw)
    else:
        d.line([(cx - mw, my), (cx + mw, my)], fill=lip, width=lw)
        if A["Big_Lips"]:
            d.line([(cx - mw * 0.8, my + 3), (cx + mw * 0.8, my + 3)], fill=lip, width=2)
    if A["Mustache"]:
        d.polygon([(cx - mw * 1.1, my - 3), (cx, my - 9), (cx + mw * 1.1, my - 3), (cx, my - 5)],
                  fill=beard)
    if A["Wearing_Earrings"]:
        gold = (245, 205, 60, 255)
        for side in (-1, 1):
            ex = cx + side * a * 0.98
            d.ellipse([ex - 3, cy + 12, ex + 3, cy + 18], fill=gold)
    # --- pose, photo style, lighting, blur --------------------------------------------------
    layer = layer.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR, center=(cx, cy))
    rgba = np.asarray(layer, np.float32)
    alpha = rgba[..., 3:] / 255.0
    img = canvas * (1 - alpha) + rgba[..., :3] * alpha
    if style == 0:  # studio: bright, even
        img = img * rng.uniform(0.95, 1.1)
    elif style == 1:  # dim: dark, low contrast, blue cast, sensor noise
        img = (img * rng.uniform(0.35, 0.5) + 10) * np.array([0.85, 0.95, 1.2], np.float32)
        img = img + rng.normal(0, 5, img.shape).astype(np.float32)
    else:  # vintage: mostly desaturated, sepia tint, faded
        gray = img @ np.array([0.299, 0.587, 0.114], np.float32)
        sepia = gray[..., None] * np.array([1.07, 0.95, 0.75], np.float32)
        keep = rng.uniform(0.15, 0.35)
        img = (keep * img + (1 - keep) * sepia) * 0.8 + 35
    side_light = np.linspace(1 - rng.uniform(0, 0.25), 1 + rng.uniform(0, 0.25), WIDTH,
                             dtype=np.float32)
    img = img * (side_light[None, :, None] if rng.random() < 0.5 else side_light[None, ::-1, None])
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if A["Blurry"]:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(1.6, 2.6)))
    elif rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return out


def _render_job(job: tuple[int, dict, int, int, str]) -> None:
    index, face, style, seed, out_dir = job
    rng = np.random.default_rng([seed, index])
    render_face(face, style, rng).save(os.path.join(out_dir, f"{index + 1:06d}.jpg"), quality=90)


def _write_attr_list(path: Path, names: list[str], labels: np.ndarray) -> None:
    lines = [str(len(names)), " ".join(CELEBA_ATTRIBUTES)]
    lines += [name + " " + " ".join("1" if v else "-1" for v in row)
              for name, row in zip(names, labels)]
    path.write_text("\n".join(lines) + "\n")


#: Written first into every folder the generator makes: the proof that a folder is ours
#: (only such a folder, or an empty one, is ever replaced or removed by the generator).
MARKER = SYNTHETIC_MARKER
#: Version of the drawings, recorded in :data:`MARKER`: 2 has the eye and face cues a demo
#: teacher learns and smiles that show teeth (issues 10, 11). A dataset of ours drawn by an
#: older version is drawn again by the demo; its digest, and so every net and cache made
#: from it, changes with the version.
DRAWING = 2


def is_ours(folder: str | Path) -> bool:
    """Whether ``folder`` was written by :func:`generate` (it holds :data:`MARKER`)."""
    return (Path(folder) / MARKER).is_file()


def _drawing(folder: Path) -> bool:
    """Whether the process that marked ``folder`` still runs (another generator drawing
    into it now), so that only leftovers of killed runs are removed."""
    try:
        os.kill(int(json.loads((folder / MARKER).read_text())["pid"]), 0)
    except (ValueError, KeyError, TypeError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _ignore_interrupt() -> None:
    """Drawing processes leave Ctrl-C to the parent, which ends them (no traceback each)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_writable(out: str | Path) -> None:
    """Refuse (one line naming the folder) unless ``out`` is missing, empty or ours."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and (is_ours(out) or not any(out.iterdir()))):
        raise KamalError(f"{out} holds files that the synthetic-data generator did not write; "
                         "it only writes into a new, empty or its own folder: pass another "
                         "--data_root (or --out)")


def generate(out: str | Path, num_images: int = 8000, seed: int = 0,
             workers: int | None = None) -> Path:
    """Write a synthetic dataset in the official CelebA layout under ``out``; return ``out``.

    ``out`` must be missing, empty, or a dataset this function wrote (:func:`check_writable`):
    nothing else is ever deleted or overwritten. The dataset is drawn in a temporary
    sibling folder (marked as ours before anything else is written) and renamed at the end,
    so an interrupted run never leaves a half dataset that looks complete: Ctrl-C or an
    error removes the folder, and leftovers of killed runs are removed on the next call.
    """
    out = Path(out)
    check_writable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in out.parent.glob(f".{out.name}.partial-*"):
        if is_ours(leftover) and not _drawing(leftover):
            shutil.rmtree(leftover)
    rng = np.random.default_rng(seed)
    faces = sample_faces(num_images, rng)
    n_train, n_val, n_test = split_sizes(num_images)
    styles = assign_styles(n_train, n_val + n_test, rng)
    clean = np.stack([faces[a] for a in CELEBA_ATTRIBUTES], axis=1)
    flip = rng.random(clean.shape) < np.array([FLIP_RATE[a] for a in CELEBA_ATTRIBUTES])
    noisy = clean ^ flip
    names = [f"{i + 1:06d}.jpg" for i in range(num_images)]

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / MARKER).write_text(json.dumps({"num_images": num_images, "seed": seed,
                                              "drawing": DRAWING, "pid": os.getpid()}) + "\n")
        (tmp / "img_align_celeba").mkdir()
        keys = list(faces)
        jobs = [(i, {k: (int(faces[k][i]) if faces[k].dtype != bool else bool(faces[k][i]))
                     for k in keys}, int(styles[i]), seed, str(tmp / "img_align_celeba"))
                for i in range(num_images)]
        workers = workers or min(os.cpu_count() or 1, 8)
        progress = tqdm(total=num_images, desc=f"drawing {num_images} faces", disable=None)
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers, _ignore_interrupt) as pool:
                for _ in pool.imap_unordered(_render_job, jobs, chunksize=64):
                    progress.update()
        else:
            for job in jobs:
                _render_job(job)
                progress.update()
        progress.close()
        _write_attr_list(tmp / "list_attr_celeba.txt", names, noisy)
        _write_attr_list(tmp / "list_attr_celeba_clean.txt", names, clean)
        partition = [0] * n_train + [1] * n_val + [2] * n_test
        (tmp / "list_eval_partition.txt").write_text(
            "".join(f"{n} {p}\n" for n, p in zip(names, partition)))
        (tmp / STYLE_LIST).write_text(
            "".join(f"{n} {STYLES[s]}\n" for n, s in zip(names, styles)))
        check_writable(out)  # again: the folder may have changed while drawing
    except BaseException:  # Ctrl-C or an error: the folder drawn into, made above, goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # ours or empty (checked): replaced only now that the new one is whole
        old = out.with_name(f".{out.name}.partial-old-{os.getpid()}")
        out.rename(old)
        if is_ours(old):
            shutil.rmtree(old)
        else:
            old.rmdir()
    tmp.rename(out)
    return out


def read_styles(root: str | Path) -> dict[str, str] | None:
    """File name -> photo style of a synthetic dataset; ``None`` where there is no style list
    (real CelebA)."""
    path = Path(root) / STYLE_LIST
    if not path.is_file():
        return None
    return dict(line.split() for line in path.read_text().splitlines() if line.strip())


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description="Write the synthetic CelebA-format face dataset.")
    p.add_argument("--out", default="data/synthetic",
                   help="output folder: new, empty, or one this generator wrote (replaced)")
    p.add_argument("--num_images", type=bounded_int(9, why=" (train, val and test need images)"),
                   default=8000)
    p.add_argument("--seed", type=bounded_int(0, 2**32 - 1), default=0)
    p.add_argument("--workers", type=bounded_int(1), default=None,
                   help="drawing processes (default: cores)")
    args = p.parse_args(argv)
    run(lambda: print(f"wrote {generate(args.out, args.num_images, args.seed, args.workers)}"),
        interrupted="the unfinished dataset was removed: rerun the same command to draw it")


if __name__ == "__main__":
    main()
