"""Synthetic ("phantom") PA chest X-rays, written in the official TBX11K on-disk layout.

The embedded default data set: :func:`generate_phantoms` writes ``imgs/``, ``lists/`` and
``annotations/`` exactly like the TBX11K release (see ``docs/TBX11K-FORMAT.md``), so the one TBX11K
loader reads it, plus a ``truth.json`` holding what the loader cannot know (findings, lung masks, the
planted shortcut). :func:`render_phantom` renders a single image for tests and notebooks.

How an image is made. Anatomy lives in an ANATOMICAL frame of 512 x 512 units (y down, image left =
patient's right, midline x = 256). The normal film is rasterised axis-aligned at HALF resolution on a
*canonical* grid that has a margin of 48 units, then one bilinear affine warp applies the random pose
(zoom 0.95-1.08, rotation +-4 deg, shift) and upsamples to the stored size. Findings are drawn at full
resolution directly in stored pixels, masked by the lung fields.

1. A *density* map (float32; 0 = air, ~0.6-0.8 = trunk soft tissue / mediastinum, lungs ~0.3 lower,
   ribs add ~0.04-0.1) sums: body with neck, sloping shoulders, optional arms and breasts; dark lung
   fields with irregular outlines (jittered control points, a lighter periphery, apices and bases);
   mediastinum and heart (bulging to the image right); spine and trachea; hila and branching vessel
   trees; posterior ribs (curved bands with bright cortical edges), fainter anterior ribs, clavicles;
   diaphragm domes over a denser upper abdomen; an optional gastric bubble.
2. Class content: ``tb`` -> 1-3 findings (consolidation, cavity, nodule cluster, fibrosis; latent
   "Obsolete" TB -> small dense calcified nodules or dense fibrosis), 80 % of them in the upper 2/3 of
   a lung, each with a radiologist-style box; ``sick`` -> 1-2 distractors (pleural effusion at a base,
   cardiomegaly, diffuse basal reticular texture); ``healthy`` -> nothing.
3. Film: heel-effect gradient, window (offset, gain), a film curve that compresses the bright end,
   gamma, signal-dependent quantum noise, slight box blur, 8-bit quantisation. Display convention of a
   PA film: high = bright = dense (bone white, lungs dark).
4. Optional spurious cue (``shortcut`` > 0): a bright lead-marker-like "corner tag" (24 px at 512,
   letter L or R) in the top-left corner region (top-left corner 6-40 px), pasted before noise and blur.

Finding contrast: every finding's density is multiplied by ``FINDING_CONTRAST`` = 2.5 (at 1.7:
consolidation 0.17-0.26 peak, cavity wall 0.14-0.2, nodules 0.12-0.19, fibrosis 0.14-0.2, calcified
nodules 0.24-0.34 but tiny; a rib's cortex adds ~0.1 and its body ~0.04). Measured with ResNet-18 from
scratch at 224 px (600/200 images): at 1.0 (rib-like) TB was not learned in 6 epochs (val AUC 0.56);
at 1.7 the project's trainer reached val AUC 0.89 after 10 epochs and its Grad-CAM scored BELOW the
prior-only baseline (mIoU 0.10 vs 0.19); at 2.5 val AUC was 0.91 after 4 epochs. The phantoms are a
teaching device: the TB signal is deliberately clearer than on real films.
Boxes are xyxy in pixels of the stored image: tight around where the rendered finding exceeds 20 %
of its peak, plus a 2-6 px margin (at 512); widths about 25-200 px, median ~80.

Every image's randomness comes from ``SeedSequence(seed, spawn_key=(split, class, index))``: images do
not depend on generation order, and the anatomy does not depend on ``shortcut`` (the tag and its
presence use their own stream). Same seed -> byte-identical PNGs and JSON.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import DataError
from .records import LABELS

__all__ = ["generate_phantoms", "render_phantom", "PHANTOM_VERSION", "FINDING_KINDS", "DISTRACTOR_KINDS"]

PHANTOM_VERSION = 1
GENERATOR_NAME = "tbkd_lib.data.phantom"
FINDING_KINDS = ("consolidation", "cavity", "nodules", "fibrosis", "calcified_nodules")
DISTRACTOR_KINDS = ("cardiomegaly", "effusion", "interstitial")
SHORTCUT_KIND = "corner_tag"

ANAT = 512.0                    # size of the anatomical frame
MID = ANAT / 2                  # body midline, x
MARGIN = 48.0                   # anatomical units rendered around the frame (covers any pose)
ORIG_WIDTH = (1352, 3056)       # simulated original resolution written in the XML files
ORIG_HEIGHT = (1656, 3072)
FOLDERS = {"healthy": ("health", "h"), "sick": ("sick", "s"), "tb": ("tb", "tb")}
SPLIT_KEYS = {"train": 0, "val": 1}
CATEGORIES = ("ActiveTuberculosis", "ObsoletePulmonaryTuberculosis", "PulmonaryTuberculosis")
UPPER_MIDDLE_FRACTION = 0.8     # share of TB findings placed in the upper 2/3 of a lung
TAG_SIZE = 24                   # corner tag side at 512 px
MIN_BOX = 22                    # smallest TB box side at 512 px (smaller draws are re-drawn)
FINDING_CONTRAST = 2.5          # multiplies every finding's density (1.0 ~ a rib's contrast)

_GLYPHS = {  # 5 x 7 letters of the lead-marker-like corner tag
    "L": ["1....", "1....", "1....", "1....", "1....", "1....", "11111"],
    "R": ["1111.", "1...1", "1...1", "1111.", "1.1..", "1..1.", "1...1"],
}


# ------------------------------------------------------------------------------------ frames
@dataclass(frozen=True)
class _Frame:
    """Canonical raster of the anatomical frame and the pose that maps it to the stored image.

    Canonical pixel (row i, col j) of the n x n raster <-> anatomical (x, y) = (j / k - MARGIN,
    i / k - MARGIN), with ``k = size / 512`` canonical pixels per anatomical unit (coarser rasters
    cover the same area). Stored pixel ``p = c + shift + scale * k * R(theta) @ (a - 256)`` with
    ``c = (size - 1) / 2``.
    """

    size: int          # stored image side
    scale: float       # relative zoom, ~1
    theta: float       # radians, positive = clockwise on screen
    shift: tuple[float, float]

    @property
    def k(self) -> float:
        return self.size / ANAT

    @property
    def n(self) -> int:
        """Canonical raster side."""
        return int(round((ANAT + 2 * MARGIN) * self.k))

    @property
    def px(self) -> float:
        """Stored pixels per anatomical unit."""
        return self.scale * self.k

    def axes(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Anatomical ``u`` float32 (1, n) and ``v`` (n, 1) at the pixel centres of an n x n canonical raster."""
        n = self.n if n is None else n
        c = (np.arange(n, dtype=np.float32) + 0.5) * (self.n / n) - 0.5
        a = c / np.float32(self.k) - np.float32(MARGIN)
        return a[None, :], a[:, None]

    def to_canonical(self, points) -> np.ndarray:
        """Anatomical (N, 2) -> canonical pixel (x, y) (N, 2)."""
        return (np.asarray(points, dtype=np.float64) + MARGIN) * self.k

    def to_pixels(self, points) -> np.ndarray:
        """Anatomical (N, 2) (x, y) -> stored pixel (x, y) (N, 2)."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2) - MID
        c, s = math.cos(self.theta), math.sin(self.theta)
        rot = np.stack([c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]], axis=1)
        centre = (self.size - 1) / 2
        return np.array([centre + self.shift[0], centre + self.shift[1]]) + self.px * rot

    def warp(self, canonical: np.ndarray) -> np.ndarray:
        """Resample a canonical float32 (m, m) raster (any resolution m, covering the same area as
        the n x n one) to the stored image, float32 (size, size), bilinear."""
        r = canonical.shape[0] / self.n
        c, s = math.cos(self.theta), math.sin(self.theta)
        g = r / self.scale                                  # raster px per stored px
        a11, a12, a21, a22 = c * g, s * g, -s * g, c * g
        centre = (self.size - 1) / 2
        ox, oy = centre + self.shift[0] + 0.5, centre + self.shift[1] + 0.5   # PIL: pixel i spans [i, i+1)
        mid = ((MID + MARGIN) * self.k + 0.5) * r
        coeffs = (a11, a12, mid - a11 * ox - a12 * oy, a21, a22, mid - a21 * ox - a22 * oy)
        img = Image.fromarray(np.ascontiguousarray(canonical, dtype=np.float32), "F")
        return np.array(img.transform((self.size, self.size), Image.AFFINE, coeffs, resample=Image.BILINEAR))


def _sample_frame(rng: np.random.Generator, size: int) -> _Frame:
    return _Frame(size, scale=rng.uniform(0.95, 1.08), theta=math.radians(rng.uniform(-4.0, 4.0)),
                  shift=(rng.uniform(-0.02, 0.02) * size, rng.uniform(-0.02, 0.03) * size))


# -------------------------------------------------------------------------------------- geometry
def _closed_spline(points, n_out: int) -> np.ndarray:
    """Closed uniform Catmull-Rom curve through ``points`` (N, 2), sampled at ``n_out`` vertices."""
    p = np.asarray(points, dtype=np.float64)
    n = len(p)
    t = np.arange(n_out) * (n / n_out)
    i = np.floor(t).astype(int)
    u = (t - i)[:, None]
    p0, p1, p2, p3 = p[(i - 1) % n], p[i % n], p[(i + 1) % n], p[(i + 2) % n]
    return 0.5 * (2 * p1 + (p2 - p0) * u + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u ** 2
                  + (3 * p1 - p0 - 3 * p2 + p3) * u ** 3)


def _inside(poly: np.ndarray, points) -> np.ndarray:
    """Even-odd point-in-polygon test: ``poly`` (M, 2), ``points`` (N, 2) -> bool (N,)."""
    pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
    x, y = pts[:, :1], pts[:, 1:]
    x0, y0 = poly[:, 0][None], poly[:, 1][None]
    x1, y1 = np.roll(poly[:, 0], -1)[None], np.roll(poly[:, 1], -1)[None]
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return (np.sum(crosses & (x < x_at), axis=1) % 2) == 1


def _row_spans(poly: np.ndarray, y: float) -> list[tuple[float, float]]:
    """Horizontal intervals of the polygon at height ``y`` (sorted crossing pairs)."""
    y0, y1 = poly[:, 1], np.roll(poly[:, 1], -1)
    x0, x1 = poly[:, 0], np.roll(poly[:, 0], -1)
    hit = (y0 > y) != (y1 > y)
    xs = np.sort(x0[hit] + (y - y0[hit]) * (x1[hit] - x0[hit]) / (y1[hit] - y0[hit]))
    return [(float(xs[i]), float(xs[i + 1])) for i in range(0, len(xs) - 1, 2)]


# ------------------------------------------------------------------------------------ anatomy
@dataclass(frozen=True)
class _Anatomy:
    """One patient, in the anatomical frame. Polygons are (N, 2) float64 (x, y)."""

    right_lung: np.ndarray    # patient's right = image LEFT
    left_lung: np.ndarray     # patient's left = image RIGHT (medial border = heart border)
    heart: np.ndarray
    body_half_width: float
    neck_half_width: float
    shoulder_y: float
    arms: bool
    breasts: float            # 0 = none, else soft-tissue density of the breast shadows
    spine_x: float
    rib_start: float          # y of the first posterior rib at the spine
    rib_gap: float            # spacing of the posterior ribs ...
    rib_growth: float         # ... growing by this much per rib
    rib_width: float          # fraction of a rib period that is bone
    rib_bend: float
    rib_wobble: float
    rib_levels: np.ndarray    # relative brightness of each posterior rib, (13,)
    front_start: float
    front_gap: float
    clavicle_y: float
    clavicle_tilt: float      # rise of the clavicle from the sternal to the acromial end
    carina_y: float
    hila: tuple[tuple[float, float], tuple[float, float]]
    lung_sx: float
    gastric_bubble: tuple[float, float, float] | None


# Control points (dx from midline, y) of a standard right lung (image left), apex first, clockwise
# on screen: lateral wall, costophrenic angle, right dome, cardiophrenic angle, right heart border,
# mediastinum.
_RIGHT_LUNG = [(64, 88), (86, 66), (114, 74), (150, 116), (178, 186), (194, 266), (198, 346), (198, 398),
               (194, 416), (176, 408), (150, 384), (118, 364), (88, 366), (62, 380), (50, 392),
               (56, 352), (57, 308), (48, 266), (34, 220), (30, 160), (38, 114)]
_RIGHT_HEART = slice(14, 18)      # indices of the right heart border in _RIGHT_LUNG
_RIGHT_DOME = slice(9, 14)
# Left lung (image right): mediastinum with aortic knob, then the heart border, then the outer wall.
_LEFT_MEDIAL = [(30, 118), (36, 158), (42, 176), (40, 198), (46, 218)]
_LEFT_OUTER = [(62, 88), (84, 68), (112, 78), (148, 120), (176, 190), (192, 272), (198, 352),
               (199, 414), (196, 432), (178, 426), (158, 402), (140, 392)]


def _heart_border(k: float) -> np.ndarray:
    """Left heart border (image right), (dx, y) from the pulmonary trunk down to the apex; ``k``
    widens it (cardiomegaly > 1.4)."""
    ang = np.radians(np.linspace(-95, 15, 8))
    dx = 30 + 92 * k * np.cos(ang)
    return np.stack([np.maximum(dx, 44), 360 + 118 * np.sin(ang)], axis=1)


def _jitter(rng, pts, sigma: float) -> np.ndarray:
    pts = np.asarray(pts, dtype=np.float64)
    return pts + rng.normal(0.0, sigma, pts.shape)


def _sample_anatomy(rng: np.random.Generator, cardiomegaly: bool) -> _Anatomy:
    """Draw one patient's anatomy. ``cardiomegaly`` widens the heart (cardiothoracic ratio > 0.55)."""
    sx, sy = rng.uniform(0.92, 1.06), rng.uniform(0.9, 1.08)
    top = rng.uniform(-8, 12)
    k_left = rng.uniform(1.4, 1.65) if cardiomegaly else rng.uniform(0.9, 1.1)
    k_right = rng.uniform(1.5, 1.9) if cardiomegaly else rng.uniform(0.85, 1.15)

    def place(pts, side: int) -> np.ndarray:
        """(dx, y) standard points -> anatomical (x, y); side -1 = image left, +1 = image right."""
        p = np.asarray(pts, dtype=np.float64).copy()
        p[:, 0] = MID + side * p[:, 0] * sx
        p[:, 1] = 80 + (p[:, 1] - 80) * sy + top
        return p

    right = np.asarray(_RIGHT_LUNG, dtype=np.float64).copy()
    right[_RIGHT_HEART, 0] = 34 + (right[_RIGHT_HEART, 0] - 34) * k_right
    right[_RIGHT_DOME, 1] += rng.uniform(-14, 14) * np.array([0.4, 0.8, 1.0, 0.8, 0.4])
    heart = _heart_border(k_left)
    outer = np.asarray(_LEFT_OUTER, dtype=np.float64).copy()
    outer[8:, 1] += rng.uniform(-14, 14) * np.array([0.3, 0.6, 0.9, 1.0])
    left = np.concatenate([_LEFT_MEDIAL, heart, outer[::-1]])
    right_lung = _closed_spline(_jitter(rng, place(right, -1), 3.0), 64)
    left_lung = _closed_spline(_jitter(rng, place(left, +1), 3.0), 64)
    heart_poly = np.concatenate([place(heart, +1), place(right[_RIGHT_HEART], -1), place([(0, 218)], +1)])

    hila = ((MID - 58 * sx, 80 + 168 * sy + top), (MID + 54 * sx, 80 + 160 * sy + top))
    bubble = None
    if rng.random() < 0.55:
        bubble = (MID + rng.uniform(85, 130) * sx, float(place(outer, 1)[10, 1]) + rng.uniform(18, 35),
                  rng.uniform(14, 26))
    return _Anatomy(
        right_lung=right_lung, left_lung=left_lung, heart=heart_poly,
        body_half_width=rng.uniform(235, 265) * sx, neck_half_width=rng.uniform(46, 60),
        shoulder_y=rng.uniform(-25, 10) + top, arms=bool(rng.random() < 0.5),
        breasts=float(rng.uniform(0.04, 0.09)) if rng.random() < 0.4 else 0.0,
        spine_x=MID + rng.uniform(-3, 3), rib_start=80 + (rng.uniform(-32, -24)) * sy + top,
        rib_gap=rng.uniform(25, 29) * sy, rib_growth=rng.uniform(0.9, 1.6) * sy,
        rib_width=rng.uniform(0.44, 0.54), rib_bend=rng.uniform(0.85, 1.15),
        rib_wobble=rng.uniform(0, 2 * math.pi), rib_levels=rng.uniform(0.75, 1.0, 13).astype(np.float32),
        front_start=80 + rng.uniform(18, 28) * sy + top, front_gap=rng.uniform(38, 44) * sy,
        clavicle_y=80 + rng.uniform(28, 42) * sy + top, clavicle_tilt=rng.uniform(25, 42),
        carina_y=80 + rng.uniform(115, 140) * sy + top, hila=hila, lung_sx=sx, gastric_bubble=bubble)


# ------------------------------------------------------------------------- raster helpers
STRIP_VALUES = 24_000   # pointwise maps are evaluated in strips of ~24k pixels (~96 KB temporaries):
                        # they stay in cache and on the heap, where fresh full-size arrays would cost
                        # page faults (3x slower in some VMs)


def _in_strips(n_rows: int, fn) -> np.ndarray:
    """Stack ``fn(rows: slice) -> float32 (len(rows), n)`` over strips of rows (n = n_rows, square)."""
    step = max(1, STRIP_VALUES // n_rows)
    out = None
    for r0 in range(0, n_rows, step):
        rows = slice(r0, min(r0 + step, n_rows))
        part = fn(rows)
        if out is None:
            out = np.empty((n_rows, part.shape[1]), np.float32)
        out[rows] = part
    return out


def _smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Smooth random field, float32 (size, size), ~N(0, 1): cells x cells noise, bicubic-upsampled."""
    small = rng.standard_normal((cells, cells), dtype=np.float32)
    return np.asarray(Image.fromarray(small, "F").resize((size, size), Image.BICUBIC))


def _polygon_canvas(polys, frame: _Frame, n: int) -> Image.Image:
    """Anatomical ``polys`` filled (255) on an n x n canonical raster, as a PIL "L" image."""
    canvas = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(canvas)
    factor = n / frame.n
    for poly in polys:
        pix = (frame.to_canonical(poly) + 0.5) * factor - 0.5
        draw.polygon([tuple(p) for p in pix.round(2)], fill=255)
    return canvas


def _pixel_polygons(polys, size: int) -> Image.Image:
    """Stored-pixel ``polys`` [(N, 2) (x, y)] filled (255) on a size x size PIL "L" image."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polys:
        draw.polygon([tuple(p) for p in np.round(poly, 2)], fill=255)
    return canvas


def _as_float(canvas: Image.Image, blur: float = 0.0) -> np.ndarray:
    """PIL "L" image (optionally Gaussian-blurred by ``blur`` px) -> float32 (n, n) in [0, 1]."""
    if blur > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(canvas, dtype=np.float32) * np.float32(1 / 255)


def _band(d: np.ndarray, half, edge: float) -> np.ndarray:
    """Soft-edged band profile: 1 where ``|d| < half``, ramping to 0 over ``edge``."""
    return np.clip((half - np.abs(d)) * np.float32(1 / edge) + 0.5, 0, 1)


# ------------------------------------------------------------------------- anatomical parts
# Each part takes anatomical coordinates u float32 (1, n) and v (rows, 1) and returns float32
# (rows, n), so that it can be evaluated strip by strip.
def _body(u, v, a: _Anatomy) -> np.ndarray:
    """Soft tissue of trunk, sloping shoulders, neck and (optionally) arms; [0, 1]."""
    r = np.clip((v - a.shoulder_y) / 110.0, 0, 1)
    ramp = 1 - (1 - r) ** 2.5                                            # trapezius slope, rounded shoulder
    hw = a.neck_half_width + (a.body_half_width - a.neck_half_width) * ramp
    hw = hw * (1 - 0.06 * np.clip((v - 430) / 150, 0, 1))                # slight waist
    trunk = np.sqrt(np.clip(1 - np.square((u - MID) / hw), 0, 1)) * (0.75 + 0.25 * ramp)
    if not a.arms:
        return trunk
    dx = np.abs(u - MID)
    arm_mid = a.body_half_width + 40
    arm = np.sqrt(np.clip(1 - np.square((dx - arm_mid) / 30), 0, 1)) * np.clip((v - a.shoulder_y - 40) / 30, 0, 1)
    return np.maximum(trunk, 0.7 * arm)


def _abdomen(v, a: _Anatomy) -> np.ndarray:
    """Extra density of the upper abdomen (liver, spleen) under the domes, overlapping the posterior
    lung bases. [0, 1], (rows, 1)."""
    domes = max(a.right_lung[:, 1].max(), a.left_lung[:, 1].max()) - 45
    return np.clip((v - domes) / 50, 0, 1)


def _lung_profile(v, a: _Anatomy) -> np.ndarray:
    """Vertical darkness profile of the lungs: lighter apices (overlap) and bases (soft tissue). (rows, 1)."""
    top = min(a.right_lung[:, 1].min(), a.left_lung[:, 1].min())
    h = max(a.right_lung[:, 1].max(), a.left_lung[:, 1].max()) - top
    f = (v - top) / h
    return 1 - 0.22 * np.clip((f - 0.6) / 0.4, 0, 1) - 0.15 * np.clip((0.15 - f) / 0.15, 0, 1)


def _rib_phase(t: np.ndarray, start: float, gap: float, growth: float) -> np.ndarray:
    """Continuous rib index at warped height ``t``: rib j is centred at start + j*gap + growth*j^2."""
    root = np.sqrt(np.clip(gap * gap + 4 * growth * (t - start), 0, None))
    return (root - gap) * np.float32(1 / (2 * growth))


def _ribcage(v, a: _Anatomy) -> np.ndarray:
    """Half-width of the rib cage (anatomical units) at heights ``v`` (rows, 1)."""
    top = a.rib_start
    y = [top - 30, top, top + 50, top + 130, top + 250, top + 600]
    return a.lung_sx * np.interp(v, y, [0, 60, 160, 196, 206, 206]).astype(np.float32)


def _posterior_ribs(u, v, a: _Anatomy) -> np.ndarray:
    """Posterior ribs: bands leaving the spine, arching up slightly, then falling laterally;
    brighter cortical edges, rib-to-rib intensity variation. [0, 1]."""
    dx = np.abs(u - a.spine_x)
    s = dx - 14
    shape = 0.0029 * s * s - 0.25 * s + 1.5 * np.sin(s / 23 + a.rib_wobble)          # (1, n)
    bend = a.rib_bend * (1.4 - 0.6 * np.clip((v - a.rib_start) / 330, 0, 1))          # (rows, 1)
    cage = _ribcage(v, a)
    wrap = 70 * np.square(np.clip((dx - cage + 45) / 45, 0, 1))                       # lateral turn-down
    phase = _rib_phase(v - bend * shape - wrap, a.rib_start, a.rib_gap, a.rib_growth)
    frac = phase - np.round(phase)
    half = a.rib_width / 2
    edge = np.square(np.square(frac * np.float32(1 / half)))
    bone = _band(frac, half, 0.06) * (0.4 + 0.6 * edge)                             # bright cortex
    bone *= a.rib_levels[np.clip(np.rint(phase), 0, len(a.rib_levels) - 1).astype(np.intp)]
    ends = np.clip((cage + 8 - dx) / 6, 0, 1) * np.clip((dx - 12) / 8, 0, 1)
    return bone * ends * (phase < 11.5)


def _anterior_ribs(u, v, a: _Anatomy) -> np.ndarray:
    """Anterior ribs: fainter, wider bands falling from the lateral wall towards the sternum. [0, 1]."""
    dx = np.abs(u - a.spine_x)
    s = np.clip(205 - dx, 0, None)
    phase = (v - (0.52 * s - 0.0011 * s * s) - a.front_start) * np.float32(1 / a.front_gap)
    frac = phase - np.round(phase)
    ends = np.clip((_ribcage(v, a) - dx) / 8, 0, 1) * np.clip((dx - 65) / 30, 0, 1)
    edge = np.square(np.square(frac * np.float32(1 / 0.16)))
    return _band(frac, 0.16, 0.08) * (0.5 + 0.5 * edge) * ends * ((phase > -0.5) & (phase < 5.5))


def _clavicles(u, v, a: _Anatomy) -> np.ndarray:
    """Two clavicles: from the sternal notch they rise steeply, run flatter over the apices and dip
    slightly to the acromion (an S-curve); thick sternal head, slim shaft, tapered lateral end. [0, 1]."""
    dx = np.abs(u - MID)
    s = dx - 20
    rise = np.sin(np.clip(s / 170, 0, 1) * np.float32(math.pi / 2))
    droop = np.square(np.clip((s - 140) / 60, 0, 1))
    centre = a.clavicle_y - a.clavicle_tilt * rise + 12 * droop
    half = 8.5 - 2.5 * np.clip(s / 70, 0, 1)
    d = v - centre
    bone = _band(d, half, 2.0) * (0.7 + 0.3 * np.square(d / half))
    return bone * np.clip(s / 5, 0, 1) * np.clip((205 - dx) / 25, 0, 1)


def _spine(u, v, a: _Anatomy) -> np.ndarray:
    """Vertebral column with faint vertebral bodies / disc spaces. [0, 1]."""
    half = 15 + 8 * np.clip(v / 480, 0, 1)
    q = np.clip(1 - np.square((u - a.spine_x) / half), 0, 1)
    discs = 0.8 + 0.2 * np.cos((v - a.rib_start) * np.float32(2 * math.pi / 29))
    return np.sqrt(q) * discs


def _trachea(u, v, a: _Anatomy) -> np.ndarray:
    """Air column of the trachea, down to the carina. [0, 1] (subtracted)."""
    q = np.clip(1 - np.square((u - a.spine_x - 2) / 9), 0, 1)
    return q * np.clip((a.carina_y - v) / 20, 0, 1)


def _breasts(u, v, a: _Anatomy) -> np.ndarray:
    """Breast shadows over the lower lateral zones with a soft, rounded inferior margin. [0, 1]."""
    out = 0
    for side in (-1, 1):
        r2 = np.square((u - MID - side * 130 * a.lung_sx) / 115) + np.square((v - 320) / 100)
        out = out + np.clip((1 - r2) * 2.5, 0, 1) * np.clip((v - 270) / 40, 0, 1)
    return out


def _gastric_bubble(u, v, a: _Anatomy) -> np.ndarray:
    """Gas in the stomach fundus under the left dome (image right). [0, 1] (subtracted)."""
    bx, by, r = a.gastric_bubble
    return np.clip((1 - (np.square((u - bx) / r) + np.square((v - by) / (0.6 * r)))) * 3, 0, 1)


def _vessel_tree(rng, a: _Anatomy, frame: _Frame, n: int) -> np.ndarray:
    """Pulmonary vessels: from each hilum 6 trunks that fork 3 times, slightly wavy, thick and dense
    centrally, thin and faint peripherally. Drawn with PIL on an n x n canonical raster (1-px lines at
    half resolution); float32 (n, n) in [0, 1]."""
    canvas = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(canvas)
    factor = n / frame.n * frame.k        # raster px per anatomical unit
    trunks = []
    for side, (hx, hy) in zip((-1, 1), a.hila):
        base = np.radians(np.linspace(-70, 75, 6)) + rng.normal(0, 0.12, 6)
        trunks += [(hx, hy, math.atan2(math.sin(b), side * math.cos(b))) for b in base]
    x = np.array([t[0] for t in trunks])
    y = np.array([t[1] for t in trunks])
    ang = np.array([t[2] for t in trunks])
    length, width = rng.uniform(24, 36, len(trunks)), rng.uniform(3.5, 5.0, len(trunks))
    for depth in range(4):
        wiggle = rng.normal(0, 0.15, (2, len(x)))
        x1 = x + 0.5 * length * np.cos(ang + wiggle[0])
        y1 = y + 0.5 * length * np.sin(ang + wiggle[0])
        ang = ang + wiggle[0] + wiggle[1]
        x2, y2 = x1 + 0.5 * length * np.cos(ang), y1 + 0.5 * length * np.sin(ang)
        pts = (np.stack([x, y, x1, y1, x2, y2], axis=1) + MARGIN) * factor
        for p, w in zip(pts.tolist(), width.tolist()):
            draw.line(p, fill=int(90 + 165 * min(w / 4.5, 1)), width=max(1, int(round(w * factor))))
        turn = rng.uniform(0.25, 0.6, (2, len(x)))
        x, y = np.concatenate([x2, x2]), np.concatenate([y2, y2])
        ang = np.concatenate([ang - turn[0], ang + turn[1]])
        length = np.concatenate([length, length]) * rng.uniform(0.6, 0.8, 2 * len(length))
        width = np.concatenate([width, width]) * 0.68
    return _as_float(canvas)


def _mediastinal_shadows(a: _Anatomy, frame: _Frame, n: int) -> np.ndarray:
    """Heart (0.6) and hilar (1.0) shadows drawn at n/2, blurred by ~7 anatomical units, resized to
    float32 (n, n) in [0, 1]."""
    m = n // 2
    canvas = _polygon_canvas([a.heart], frame, m).point(lambda value: value * 0.6)
    draw = ImageDraw.Draw(canvas)
    per_unit = m / frame.n * frame.k
    for hx, hy in a.hila:
        (cx, cy), = (frame.to_canonical([(hx, hy)]) + 0.5) * (m / frame.n) - 0.5
        r = 14 * per_unit
        draw.ellipse([cx - r, cy - 1.2 * r, cx + r, cy + 1.2 * r], fill=255)
    canvas = canvas.filter(ImageFilter.GaussianBlur(7 * per_unit))
    return _as_float(canvas.resize((n, n), Image.BILINEAR))


def _smooth_mask(polys, frame: _Frame, n: int, blur: float) -> np.ndarray:
    """Polygons filled at n/2, blurred by ``blur`` (fraction of n), resized to float32 (n, n) in [0, 1]."""
    canvas = _polygon_canvas(polys, frame, n // 2).filter(ImageFilter.GaussianBlur(blur * n / 2))
    return _as_float(canvas.resize((n, n), Image.BILINEAR))


def _anatomy_density(rng, a: _Anatomy, frame: _Frame, n: int, distractors) -> np.ndarray:
    """The whole normal film (and the ``sick`` distractors) on an n x n canonical raster (half
    resolution): trunk, lungs (with vessels and mottling), heart, hila, spine, trachea, ribs,
    clavicles, breasts, gastric bubble. Returns the density, float32 (n, n).
    """
    u, v = frame.axes(n)
    lung_canvas = _polygon_canvas([a.right_lung, a.left_lung], frame, 2 * n).reduce(2)   # anti-aliased
    lungs = _as_float(lung_canvas, blur=0.8)
    deep = _smooth_mask([a.right_lung, a.left_lung], frame, n, 1 / 22)
    shadows = _mediastinal_shadows(a, frame, n)
    vessels = _vessel_tree(rng, a, frame, n)
    mottle = _smooth_noise(rng, 10, n)
    texture = np.clip(1 - np.abs(_smooth_noise(rng, n // 5, n)) * 2.5, 0, 1)      # fine reticulation
    body_level, lung_level = rng.uniform(0.58, 0.68), rng.uniform(0.31, 0.37)
    vessel_level, bone_level = rng.uniform(0.035, 0.06), rng.uniform(0.8, 1.2)
    rib_level = rng.uniform(0.8, 1.2)
    effusion = _sample_effusion(rng, a) if "effusion" in distractors else None
    interstitial = _sample_interstitial(rng, n) if "interstitial" in distractors else None

    def rows(sl):
        vv, lung = v[sl], lungs[sl]
        d = body_level * _body(u, vv, a) * (1 + 0.12 * _abdomen(vv, a))
        dark = lung_level * _lung_profile(vv, a) * (0.3 + 0.7 * deep[sl]) * (1 + 0.06 * mottle[sl])
        if effusion is not None:
            fluid = _effusion(u, vv, a, effusion)
            dark = dark * (1 - fluid) - 0.02 * fluid                  # fluid replaces air, a bit denser
        d -= lung * (dark - vessel_level * vessels[sl] - 0.02 * texture[sl])
        d += 0.05 * shadows[sl] - 0.08 * _trachea(u, vv, a)
        d += bone_level * 0.1 * _spine(u, vv, a)
        d += _bone_density(u, vv, a, lung, rib_level)
        if a.breasts:
            d += a.breasts * _breasts(u, vv, a)
        if a.gastric_bubble is not None:
            d -= 0.12 * _gastric_bubble(u, vv, a)
        if interstitial is not None:
            d += _interstitial(u, vv, a, interstitial[0][sl], interstitial[1]) * lung
        return d

    return _in_strips(n, rows)


def _bone_density(u, v, a: _Anatomy, lungs: np.ndarray, contrast: float) -> np.ndarray:
    """Sharp bones for rows ``v``: posterior and anterior ribs (seen mostly through the lungs, weight
    0.35 outside) and clavicles. ``lungs`` float32 (rows, n). Returns float32 (rows, n), ~[0, 0.15]."""
    ribs = 0.1 * _posterior_ribs(u, v, a) + 0.04 * _anterior_ribs(u, v, a)
    return contrast * (ribs * (0.35 + 0.65 * lungs) + 0.15 * _clavicles(u, v, a))


# ----------------------------------------------------------------------------- TB findings
@dataclass
class _Patch:
    """A finding's density on a local window of the stored image: ``values`` float32 (h, w) at
    (row y0, col x0)."""

    values: np.ndarray
    y0: int
    x0: int


def _window(cx: float, cy: float, radius: float):
    """Pixel grid (ys (h, 1), xs (1, w)) relative to the centre, and the window's top-left corner."""
    r = int(math.ceil(radius)) + 2
    x0, y0 = int(round(cx)) - r, int(round(cy)) - r
    ys = (np.arange(2 * r + 1, dtype=np.float32) + y0 - cy)[:, None]
    xs = (np.arange(2 * r + 1, dtype=np.float32) + x0 - cx)[None, :]
    return ys, xs, y0, x0


def _patchy_blob(rng, ys, xs, diameter: float) -> np.ndarray:
    """Irregular soft opacity about ``diameter`` px across (its > 20 % part spans ~0.8 diameter):
    union of Gaussians, noise-modulated. [0, 1]."""
    g = np.zeros(np.broadcast_shapes(ys.shape, xs.shape), np.float32)
    for _ in range(rng.integers(4, 9)):
        oy, ox = rng.normal(0, diameter / 6, 2)
        sig = rng.uniform(diameter / 6, diameter / 3.5)
        g += np.exp(-(np.square(ys - oy) + np.square(xs - ox)) / (2 * sig * sig))
    g /= g.max()
    noise = _smooth_noise(rng, 7, g.shape[0])
    return np.clip((g * (0.8 + 0.35 * noise) - 0.2) / 0.45, 0, 1)


def _consolidation(rng, cx, cy, px: float) -> _Patch:
    """Soft, patchy, ill-defined airspace opacity, 45-220 anatomical units across (median 140)."""
    d = float(np.clip(rng.lognormal(math.log(140), 0.35), 45, 220)) * px
    ys, xs, y0, x0 = _window(cx, cy, 0.75 * d)
    m = _patchy_blob(rng, ys, xs, d)
    return _Patch((rng.uniform(0.1, 0.15) * m ** 0.7).astype(np.float32), y0, x0)


def _cavity(rng, cx, cy, px: float) -> _Patch:
    """Thick-walled ring with a lucent (air) centre, inside a faint consolidation halo."""
    r0 = rng.uniform(10, 22) * px
    wall = rng.uniform(2.5, 5.0) * px
    halo = min(rng.uniform(4.0, 7.0) * r0, 170 * px)
    ys, xs, y0, x0 = _window(cx, cy, 0.75 * halo + r0)
    r = np.sqrt(np.square(ys) + np.square(xs))
    ang = np.arctan2(ys, xs)
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    rr = r0 * (1 + 0.14 * np.cos(2 * ang + p1) + 0.07 * np.cos(3 * ang + p2))
    ring = np.exp(-np.square((r - rr) / wall))
    lumen = np.clip((rr - wall - r) / (1.5 * px), 0, 1)
    amp = rng.uniform(0.08, 0.12)
    values = amp * ring - 0.4 * amp * lumen + 0.45 * amp * _patchy_blob(rng, ys, xs, halo) * (1 - lumen)
    return _Patch(values.astype(np.float32), y0, x0)


def _nodule_field(rng, ys, xs, count, spread, r_range, edge) -> np.ndarray:
    """``count`` small round nodules scattered ~N(0, spread) around the centre. [0, 1]."""
    out = np.zeros(np.broadcast_shapes(ys.shape, xs.shape), np.float32)
    for _ in range(count):
        oy, ox = np.clip(rng.normal(0, spread, 2), -2 * spread, 2 * spread)
        rn = rng.uniform(*r_range)
        dist = np.sqrt(np.square(ys - oy) + np.square(xs - ox))
        out = np.maximum(out, np.clip((rn - dist) / edge + 0.5, 0, 1))
    return out


def _nodules(rng, cx, cy, px: float) -> _Patch:
    """Cluster of 6-17 small soft nodules ("tree-in-bud" / acinar) with a faint haze."""
    spread = rng.uniform(18, 45) * px
    ys, xs, y0, x0 = _window(cx, cy, 2.2 * spread + 7 * px)
    dots = _nodule_field(rng, ys, xs, int(rng.integers(6, 18)), spread, (2.5 * px, 5.5 * px), 1.8 * px)
    haze = np.exp(-(np.square(ys) + np.square(xs)) / (2 * (1.3 * spread) ** 2))
    amp = rng.uniform(0.07, 0.11)
    return _Patch((amp * dots + 0.3 * amp * haze).astype(np.float32), y0, x0)


def _streaks(rng, ys, xs, count, length, direction, thickness) -> np.ndarray:
    """``count`` gently curved, tapered strands of up to ``length`` px, roughly parallel to
    ``direction`` (radians) and side by side across it; max-combined. [0, 1]."""
    out = np.zeros(np.broadcast_shapes(ys.shape, xs.shape), np.float32)
    for _ in range(count):
        ang = direction + rng.normal(0, 0.18)
        ln = rng.uniform(0.45, 1.0) * length
        shift_across, shift_along = rng.normal(0, length / 5), rng.normal(0, length / 8)
        dx, dy = math.cos(ang), math.sin(ang)
        along = xs * dx + ys * dy - shift_along
        across = -xs * dy + ys * dx - shift_across
        across = across - rng.normal(0, 0.12) * ln * np.square(along / ln)           # curvature
        th = rng.uniform(0.7, 1.3) * thickness
        taper = np.clip((ln / 2 - np.abs(along)) / (0.3 * ln), 0, 1)
        out = np.maximum(out, np.exp(-np.square(across / th)) * taper)
    return out


def _fibrosis(rng, cx, cy, px: float, towards: tuple[float, float], dense: bool = False) -> _Patch:
    """Streaky, coarse linear opacities converging towards the hilum ``towards`` (pixel x, y), in a
    patchy haze. ``dense``: latent (fibro-calcific) variant, shorter and denser, with 1-3 calcified dots.
    """
    length = (rng.uniform(30, 70) if dense else rng.uniform(80, 160)) * px
    ys, xs, y0, x0 = _window(cx, cy, 0.75 * length)
    direction = math.atan2(towards[1] - cy, towards[0] - cx)
    lines = _streaks(rng, ys, xs, int(rng.integers(5, 11)), length, direction, rng.uniform(1.8, 3.0) * px)
    haze = _patchy_blob(rng, ys, xs, 0.8 * length)
    amp = rng.uniform(0.11, 0.16) if dense else rng.uniform(0.08, 0.12)
    values = amp * lines + 0.35 * amp * haze
    if dense:
        values = values + rng.uniform(0.14, 0.2) * _nodule_field(
            rng, ys, xs, int(rng.integers(1, 4)), length / 5, (1.8 * px, 3.2 * px), 0.7 * px)
    return _Patch(values.astype(np.float32), y0, x0)


def _calcified_nodules(rng, cx, cy, px: float) -> _Patch:
    """Latent TB: 2-6 small, sharp, dense (calcified) nodules with thin strands."""
    spread = rng.uniform(6, 18) * px
    ys, xs, y0, x0 = _window(cx, cy, 2.2 * spread + 6 * px)
    dots = _nodule_field(rng, ys, xs, int(rng.integers(2, 7)), spread, (2.0 * px, 4.2 * px), 0.7 * px)
    strands = _streaks(rng, ys, xs, int(rng.integers(1, 4)), 3 * spread, rng.uniform(0, np.pi), 1.0 * px)
    return _Patch((rng.uniform(0.14, 0.2) * dots + 0.06 * strands).astype(np.float32), y0, x0)


def _finding_patch(rng, kind: str, cx, cy, px, hilum) -> _Patch:
    """Render one finding of ``kind`` centred at pixel (cx, cy); ``px`` = pixels per anatomical unit.
    The density is scaled by ``FINDING_CONTRAST``."""
    if kind == "consolidation":
        patch = _consolidation(rng, cx, cy, px)
    elif kind == "cavity":
        patch = _cavity(rng, cx, cy, px)
    elif kind == "nodules":
        patch = _nodules(rng, cx, cy, px)
    elif kind in ("fibrosis", "fibrosis_dense"):
        patch = _fibrosis(rng, cx, cy, px, hilum, dense=kind == "fibrosis_dense")
    else:
        patch = _calcified_nodules(rng, cx, cy, px)
    patch.values *= np.float32(FINDING_CONTRAST)
    return patch


def _masked(patch: _Patch, lungs: np.ndarray) -> _Patch:
    """Clip ``patch`` to the image and multiply it by the lung mask (findings stay in the lungs)."""
    h, w = patch.values.shape
    n = lungs.shape[0]
    ya, xa = max(patch.y0, 0), max(patch.x0, 0)
    yb, xb = min(patch.y0 + h, n), min(patch.x0 + w, n)
    vals = patch.values[ya - patch.y0:yb - patch.y0, xa - patch.x0:xb - patch.x0]
    return _Patch(vals * lungs[ya:yb, xa:xb], ya, xa)


def _tight_box(patch: _Patch, margin: float, size: int):
    """Box (x1, y1, x2, y2) around where |values| > 20 % of the peak, plus ``margin``, clipped to the
    size x size image. None if empty."""
    mag = np.abs(patch.values)
    if mag.size == 0 or mag.max() <= 0:
        return None
    support = mag > 0.2 * mag.max()
    rows, cols = np.flatnonzero(support.any(axis=1)), np.flatnonzero(support.any(axis=0))
    x1, y1 = max(patch.x0 + cols[0] - margin, 0), max(patch.y0 + rows[0] - margin, 0)
    x2, y2 = min(patch.x0 + cols[-1] + margin, size - 1), min(patch.y0 + rows[-1] + margin, size - 1)
    return tuple(round(float(c), 2) for c in (x1, y1, x2, y2))


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _sample_site(rng, lung: np.ndarray) -> tuple[float, float]:
    """A point inside ``lung`` (anatomical polygon): upper/middle 2/3 with prob. 0.8, else lower third."""
    top, bottom = lung[:, 1].min(), lung[:, 1].max()
    for _ in range(50):
        if rng.random() < UPPER_MIDDLE_FRACTION:
            f = 0.06 + 0.56 * rng.beta(1.3, 1.6)
        else:
            f = rng.uniform(0.7, 0.88)
        y = top + f * (bottom - top)
        spans = [(lo + 14, hi - 14) for lo, hi in _row_spans(lung, y) if hi - lo > 36]
        if spans:
            lo, hi = spans[int(rng.integers(len(spans)))]
            return float(rng.uniform(lo, hi)), float(y)
    return float(lung[:, 0].mean()), float(top + 0.4 * (bottom - top))


def _tb_kinds(rng) -> tuple[list[str], list[str]]:
    """Finding kinds and box categories of one TB image: 1-3 boxes; ~77 % of images active only,
    ~18 % latent only, the rest mixed (like TBX11K)."""
    n = int(rng.choice([1, 2, 3], p=[0.52, 0.42, 0.06]))
    r = rng.random()
    if r < 0.77:
        latent = [False] * n
    elif r < 0.95 or n == 1:
        latent = [True] * n
    else:
        latent = [i == 0 for i in range(n)]
    kinds, cats = [], []
    for is_latent in latent:
        if is_latent:
            kinds.append(str(rng.choice(["calcified_nodules", "fibrosis_dense"], p=[0.6, 0.4])))
            cats.append(CATEGORIES[1])
        else:
            kinds.append(str(rng.choice(["consolidation", "cavity", "nodules", "fibrosis"],
                                        p=[0.4, 0.2, 0.25, 0.15])))
            cats.append(CATEGORIES[0])
    return kinds, cats


def _add_findings(rng, density, lungs, a: _Anatomy, frame: _Frame, lung_px) -> dict:
    """Render 1-3 TB findings into the stored-pixel ``density`` float32 (S, S) (in place), each masked
    by its own lung: ``lungs`` = [right, left] masks float32 (S, S), ``lung_px`` = [right, left]
    polygons. Returns their truth (boxes in stored pixels, categories, kinds)."""
    kinds, cats = _tb_kinds(rng)
    boxes, out_kinds, out_cats = [], [], []
    side = int(rng.integers(2))
    for kind, cat in zip(kinds, cats):
        for _ in range(30):
            lung = (a.right_lung, a.left_lung)[side]
            (cx, cy), = frame.to_pixels([_sample_site(rng, lung)])
            (hx, hy), = frame.to_pixels([a.hila[side]])
            patch = _masked(_finding_patch(rng, kind, cx, cy, frame.px, (hx, hy)), lungs[side])
            box = _tight_box(patch, rng.uniform(2, 6) * frame.k, frame.size)
            if box is None or min(box[2] - box[0], box[3] - box[1]) < MIN_BOX * frame.k:
                continue
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            if not _inside(lung_px[side], [centre])[0] or any(_iou(box, b) > 0.05 for b in boxes):
                continue
            h, w = patch.values.shape
            density[patch.y0:patch.y0 + h, patch.x0:patch.x0 + w] += patch.values
            boxes.append(box)
            out_kinds.append("fibrosis" if kind == "fibrosis_dense" else kind)
            out_cats.append(cat)
            break
        side = 1 - side if rng.random() < 0.65 else side
    return {"boxes": [list(b) for b in boxes], "categories": out_cats, "findings": out_kinds}


# ------------------------------------------------------------------------------ distractors
@dataclass(frozen=True)
class _EffusionSpec:
    sides: tuple[int, ...]       # 0 = right lung (image left), 1 = left lung
    heights: tuple[float, ...]   # fluid height as a fraction of the lung height


def _sample_effusion(rng, a: _Anatomy) -> _EffusionSpec:
    sides = (int(rng.integers(2)),) if rng.random() < 0.7 else (0, 1)
    return _EffusionSpec(sides, tuple(float(rng.uniform(0.2, 0.4)) for _ in sides))


def _effusion(u, v, a: _Anatomy, spec: _EffusionSpec) -> np.ndarray:
    """Pleural effusion: fraction of the lung's air replaced by fluid, [0, 1]: basal, under a meniscus
    that rises laterally (blunts the costophrenic angle)."""
    out = 0
    for side, frac in zip(spec.sides, spec.heights):
        lung = (a.right_lung, a.left_lung)[side]
        base = float(lung[:, 1].max())
        height = frac * (base - lung[:, 1].min())
        sign = -1 if side == 0 else 1
        lateral = np.clip((sign * (u - MID) - 40) / 155, 0, 1)
        meniscus = base - height * (0.3 + 0.7 * np.square(lateral))
        fluid = np.clip((v - meniscus) / 10 + 0.5, 0, 1) * (0.75 + 0.25 * np.clip((v - meniscus) / 40, 0, 1))
        out = out + fluid * ((u - MID) * sign > 0)
    return out


def _sample_interstitial(rng, n: int) -> tuple[np.ndarray, float]:
    """Net texture (zero crossings of a smooth random field) float32 (n, n) in [0, 1], and its level."""
    net = np.clip(1 - np.abs(_smooth_noise(rng, max(8, n // 6), n)) * 3.0, 0, 1)
    return net, rng.uniform(0.07, 0.1)


def _interstitial(u, v, a: _Anatomy, net: np.ndarray, level: float) -> np.ndarray:
    """Diffuse reticular texture over both lungs, basal and peripheral predominance. Multiply by the
    lung mask. [0, ~0.1]."""
    top = min(a.right_lung[:, 1].min(), a.left_lung[:, 1].min())
    base = max(a.right_lung[:, 1].max(), a.left_lung[:, 1].max())
    basal = 0.3 + 0.7 * np.clip((v - top) / (base - top), 0, 1)
    peripheral = 0.6 + 0.4 * np.clip((np.abs(u - MID) - 40) / 120, 0, 1)
    return level * net * basal * peripheral


# ------------------------------------------------------------------------------------ film
_LUT_STEPS, _LUT_SIZE = 1024, 2048      # film-curve lookup table: x in [0, 2) in steps of 1/1024


@dataclass(frozen=True)
class _Exposure:
    """Film processing: window offset/gain, film-curve knee, gamma, heel gradients, noise, box-blur radius (px)."""

    offset: float
    gain: float
    knee: float
    gamma: float
    heel: tuple[float, float]
    noise: float
    blur: float


def _sample_exposure(rng, size: int) -> _Exposure:
    return _Exposure(offset=rng.uniform(-0.02, 0.04), gain=rng.uniform(1.0, 1.2), knee=rng.uniform(0.8, 1.5),
                     gamma=rng.uniform(1.05, 1.5), heel=(rng.uniform(-0.06, 0.06), rng.uniform(-0.04, 0.04)),
                     noise=rng.uniform(0.008, 0.02), blur=rng.uniform(0.3, 0.6) * size / ANAT)


def _corner_tag(rng, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Bright lead-marker-like square with a dark letter: (tag float32 (T, T) in [0, 1], (x0, y0))."""
    side = max(8, int(round(TAG_SIZE * size / ANAT)))
    glyph = np.array([[c == "1" for c in row] for row in _GLYPHS[str(rng.choice(sorted(_GLYPHS)))]],
                     dtype=np.float32)
    cell = max(1, side // 8)
    big = np.kron(glyph, np.ones((cell, cell), np.float32))
    tag = np.full((side, side), rng.uniform(0.86, 0.96), np.float32)
    gy, gx = (side - big.shape[0]) // 2, (side - big.shape[1]) // 2
    tag[gy:gy + big.shape[0], gx:gx + big.shape[1]] -= 0.6 * big
    lo, hi = int(round(6 * size / ANAT)), int(round(40 * size / ANAT))
    return tag, (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))


def _expose(density: np.ndarray, exposure: _Exposure, noise: np.ndarray, tag) -> np.ndarray:
    """Density float32 (H, W) -> displayed 8-bit film, uint8 (H, W).

    Heel-effect gradient, window, film curve ``(1 - exp(-knee x)) / (1 - exp(-knee))`` (compresses the
    bright end), gamma; then the corner tag, signal-dependent quantum noise and detector blur.
    """
    size = density.shape[0]
    ramp = np.arange(size, dtype=np.float32) / size - 0.5
    heel_rows, heel_cols = exposure.heel[0] * ramp[:, None], exposure.heel[1] * ramp[None, :]
    x = np.arange(_LUT_SIZE, dtype=np.float64) / _LUT_STEPS
    lut = (np.clip((1 - np.exp(-exposure.knee * x)) / (1 - math.exp(-exposure.knee)), 0, 1)
           ** exposure.gamma).astype(np.float32)                      # film curve on a 1/1024 grid
    offset, gain = np.float32(exposure.offset), np.float32(exposure.gain * _LUT_STEPS)

    def film(rows):
        index = (density[rows] * (1 + heel_rows[rows] + heel_cols) - offset) * gain
        return lut[np.clip(index, 0, _LUT_SIZE - 1).astype(np.int32)]

    img = _in_strips(size, film)
    if tag is not None:
        patch, (x0, y0) = tag
        img[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]] = patch

    def grain(rows):
        signal = img[rows]
        grain = exposure.noise * np.float32(math.sqrt(12)) * (noise[rows] - 0.5)    # unit variance
        return np.clip((signal + (0.4 + 0.6 * signal) * grain) * 255 + 0.5, 0, 255)

    img8 = _in_strips(size, grain).astype(np.uint8)
    return np.asarray(Image.fromarray(img8, "L").filter(ImageFilter.BoxBlur(exposure.blur)))


# --------------------------------------------------------------------------------- render
def render_phantom(rng: np.random.Generator, label: str, shortcut_present: bool,
                   image_size: int = 512, tag_rng: np.random.Generator | None = None):
    """Render one phantom PA chest film.

    ``label``: "healthy" | "sick" | "tb". ``shortcut_present``: paste the corner tag; its position and
    letter come from ``tag_rng`` (default: ``rng``, drawn last, so the anatomy never depends on it).

    Returns ``(image, truth)``: ``image`` uint8 (image_size, image_size), high = dense/bright;
    ``truth`` = {"boxes": [[x1, y1, x2, y2], ...] (stored pixels, floats with 2 decimals),
    "categories": box names, "findings": kinds per box, "distractors": kinds, "lung_masks":
    {"right", "left"} (polygons [[x, y], ...] in stored pixels; "right" = patient's right = image
    left), "shortcut": {"present", "box" ([x1, y1, x2, y2] or None), "kind"}}.
    """
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    size = int(image_size)
    if size < 64:
        raise ValueError(f"image_size must be >= 64, got {size}")
    distractors = []
    if label == "sick":
        count = 1 if rng.random() < 0.7 else 2
        distractors = sorted(str(d) for d in rng.choice(DISTRACTOR_KINDS, size=count, replace=False))
    frame = _sample_frame(rng, size)
    a = _sample_anatomy(rng, cardiomegaly="cardiomegaly" in distractors)
    density = frame.warp(_anatomy_density(rng, a, frame, frame.n // 2, distractors))
    lung_px = [frame.to_pixels(a.right_lung), frame.to_pixels(a.left_lung)]
    truth = {"boxes": [], "categories": [], "findings": []}
    if label == "tb":
        lungs = [_as_float(_pixel_polygons([poly], size).filter(ImageFilter.BoxBlur(2 * size / ANAT)))
                 for poly in lung_px]
        truth = _add_findings(rng, density, lungs, a, frame, lung_px)

    exposure = _sample_exposure(rng, size)
    noise = rng.random((size, size), dtype=np.float32)
    tag = _corner_tag(tag_rng if tag_rng is not None else rng, size) if shortcut_present else None
    image = _expose(density, exposure, noise, tag)

    tag_box = None
    if tag is not None:
        side, (x0, y0) = tag[0].shape[0], tag[1]
        tag_box = [float(x0), float(y0), float(x0 + side - 1), float(y0 + side - 1)]
    truth.update({
        "distractors": distractors,
        "lung_masks": {"right": np.round(lung_px[0], 1).tolist(), "left": np.round(lung_px[1], 1).tolist()},
        "shortcut": {"present": bool(shortcut_present), "box": tag_box, "kind": SHORTCUT_KIND},
    })
    return image, truth


# ---------------------------------------------------------------------------------- writing
def _png_bytes(gray: np.ndarray) -> bytes:
    """8-bit RGB PNG (R = G = B, like TBX11K) of ``gray`` uint8 (H, W).

    Written directly (PNG "Up" filter + zlib level 1): about twice as fast as PIL's encoder, which
    tries every filter per row; any PNG reader decodes it (tests check PIL does, exactly).
    """
    h, w = gray.shape
    rgb = np.repeat(gray, 3, axis=1)                               # (H, 3W): R, G, B interleaved
    rows = np.empty((h, 3 * w + 1), np.uint8)
    rows[:, 0] = 2                                                  # filter type "Up"
    rows[0, 1:] = rgb[0]
    np.subtract(rgb[1:], rgb[:-1], out=rows[1:, 1:])              # wraps modulo 256, as PNG wants

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)          # 8-bit, colour type 2 (RGB)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
            + chunk(b"IEND", b""))


def _xml_text(stem: str, width: int, height: int, boxes, categories) -> str:
    """TBX11K box file (tab-indented, same tags as the release): ``boxes`` xyxy integers at (width, height)."""
    lines = ["<annotation>", f"\t<filename>{stem}</filename>", "\t<segmented>0</segmented>", "\t<size>",
             f"\t\t<width>{width}</width>", f"\t\t<height>{height}</height>", "\t</size>"]
    for (x1, y1, x2, y2), name in zip(boxes, categories):
        lines += ["\t<object>", f"\t\t<name>{name}</name>", "\t\t<pose>unspecified</pose>",
                  "\t\t<truncated>0</truncated>", "\t\t<difficult>0</difficult>", "\t\t<bndbox>",
                  f"\t\t\t<xmin>{x1}</xmin>", f"\t\t\t<ymin>{y1}</ymin>", f"\t\t\t<xmax>{x2}</xmax>",
                  f"\t\t\t<ymax>{y2}</ymax>", "\t\t</bndbox>", "\t</object>"]
    return "\n".join(lines + ["</annotation>"]) + "\n"


def _to_original(box, width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """Stored-pixel box -> integer box at the original resolution, inverse of the official
    ``x * size / width - 1`` (so a reader recovers the box within 0.5 * size / width px)."""
    x1, y1, x2, y2 = box
    return (round((x1 + 1) * width / size), round((y1 + 1) * height / size),
            round((x2 + 1) * width / size), round((y2 + 1) * height / size))


def _coco(lines: list[str], truth: dict, size: int, only_tb: bool) -> dict:
    """COCO dict as in the release: ``info`` is a list, bbox = [x, y, w, h] in stored pixels."""
    images, annotations = [], []
    for line in lines:
        entry = truth[f"imgs/{line}"]
        if only_tb and entry["label"] != "tb":
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": line, "width": size, "height": size})
        for (x1, y1, x2, y2), name in zip(entry["boxes"], entry["categories"]):
            w, h = round(x2 - x1, 2), round(y2 - y1, 2)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": CATEGORIES.index(name) + 1, "iscrowd": 0,
                                "area": int(w * h), "bbox": [x1, y1, w, h]})
    return {
        "info": [{"description": "tbkd phantom chest X-rays in the TBX11K layout (synthetic)",
                  "version": str(PHANTOM_VERSION), "contributor": GENERATOR_NAME}],
        "licenses": [{"id": 1, "name": "synthetic data, no restrictions", "url": ""}],
        "categories": [{"id": i + 1, "name": name, "supercategory": "Tuberculosis"}
                       for i, name in enumerate(CATEGORIES)],
        "images": images, "annotations": annotations,
    }


def _class_counts(n: int, proportions) -> dict[str, int]:
    """Split ``n`` images over LABELS by ``proportions`` (largest remainder, ties to the first)."""
    p = np.asarray(proportions, dtype=np.float64)
    raw = n * p / p.sum()
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:n - counts.sum()]] += 1
    return {label: int(c) for label, c in zip(LABELS, counts)}


def _image_streams(seed: int, split: str, label: str, index: int):
    """Independent generators (anatomy, shortcut tag, XML size) of one image, from (seed, split,
    class, index) only."""
    seq = np.random.SeedSequence(seed, spawn_key=(SPLIT_KEYS[split], LABELS.index(label), index))
    return [np.random.default_rng(child) for child in seq.spawn(3)]


def _tag_probability(split: str, label: str, shortcut: float) -> float:
    """P(corner tag): none at all when ``shortcut`` = 0; otherwise 0.5 +- shortcut/2 in train (+ for
    TB, - for non-TB) and 0.5 in val (independent of the label)."""
    if shortcut == 0:
        return 0.0
    if split == "val":
        return 0.5
    return 0.5 + shortcut / 2 if label == "tb" else 0.5 - shortcut / 2


def _is_phantom_set(path: Path) -> bool:
    try:
        head = json.loads((path / "truth.json").read_text(encoding="utf-8"))
        return head.get("generator", {}).get("name") == GENERATOR_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(out: Path) -> None:
    """Refuse to overwrite anything but an empty folder or a previous phantom set."""
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder; expected a new or empty folder (or a previous phantom set)")
    if out.is_dir() and any(out.iterdir()) and not _is_phantom_set(out):
        raise DataError(out, "folder is not empty and holds no phantom set (no truth.json written by "
                             f"{GENERATOR_NAME}); expected a new or empty folder, refusing to overwrite")


def _validate(n_train, n_val, seed, shortcut, image_size, proportions) -> tuple:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    for name, n in (("n_train", n_train), ("n_val", n_val)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    if not 0.0 <= float(shortcut) <= 1.0:
        raise ValueError(f"shortcut must be in [0, 1], got {shortcut!r}")
    if int(image_size) < 64:
        raise ValueError(f"image_size must be >= 64, got {image_size!r}")
    p = tuple(float(x) for x in proportions)
    if len(p) != len(LABELS) or not all(math.isfinite(x) and x >= 0 for x in p) or sum(p) <= 0:
        raise ValueError(f"proportions must be {len(LABELS)} non-negative numbers ({', '.join(LABELS)}) "
                         f"with a positive sum, got {proportions!r}")
    return int(n_train), int(n_val), int(seed), float(shortcut), int(image_size), p


def _write_images(work: Path, counts, seed: int, shortcut: float, size: int, progress: bool):
    """Render and write every PNG (and XML for TB) under ``work``; returns (truth, lines per split)."""
    from tqdm.auto import tqdm

    truth, lines = {}, {"train": [], "val": []}
    numbers = {label: 0 for label in LABELS}
    total = sum(sum(c.values()) for c in counts.values())
    with tqdm(total=total, desc="phantoms", unit="img", disable=not progress) as bar:
        for split in ("train", "val"):
            for label in LABELS:
                folder, prefix = FOLDERS[label]
                for index in range(counts[split][label]):
                    anatomy_rng, tag_rng, size_rng = _image_streams(seed, split, label, index)
                    present = bool(tag_rng.random() < _tag_probability(split, label, shortcut))
                    image, image_truth = render_phantom(anatomy_rng, label, present, size, tag_rng=tag_rng)
                    numbers[label] += 1
                    stem = f"{prefix}{numbers[label]:04d}"
                    line = f"{folder}/{stem}.png"
                    (work / "imgs" / line).write_bytes(_png_bytes(image))
                    if label == "tb":
                        width = int(size_rng.integers(*ORIG_WIDTH, endpoint=True))
                        height = int(size_rng.integers(*ORIG_HEIGHT, endpoint=True))
                        boxes = [_to_original(b, width, height, size) for b in image_truth["boxes"]]
                        (work / "annotations" / "xml" / f"{stem}.xml").write_text(
                            _xml_text(stem, width, height, boxes, image_truth["categories"]), encoding="utf-8")
                    truth[f"imgs/{line}"] = {"split": split, "label": label, **image_truth}
                    lines[split].append(line)
                    bar.update(1)
    return truth, lines


def _write_lists_and_coco(work: Path, truth: dict, lines: dict, seed: int, size: int) -> None:
    """Shuffle the train and val lists (deterministically), write lists/ and annotations/json/."""
    for key, split in enumerate(("train", "val")):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(9, key)))
        lines[split] = [lines[split][i] for i in rng.permutation(len(lines[split]))]
    lines["trainval"] = lines["train"] + lines["val"]
    for split in ("train", "val", "trainval"):
        text = "".join(f"{line}\n" for line in lines[split])
        for name in (f"TBX11K_{split}", f"all_{split}"):
            (work / "lists" / f"{name}.txt").write_text(text, encoding="utf-8", newline="\n")
            (work / "annotations" / "json" / f"{name}.json").write_text(
                json.dumps(_coco(lines[split], truth, size, only_tb=False)), encoding="utf-8")
        (work / "annotations" / "json" / f"TBX11K_{split}_only_tb.json").write_text(
            json.dumps(_coco(lines[split], truth, size, only_tb=True)), encoding="utf-8")


def generate_phantoms(out: str | os.PathLike, n_train: int, n_val: int, seed: int = 0, shortcut: float = 0.0,
                      image_size: int = 512, proportions=(0.4, 0.3, 0.3), progress: bool = False) -> dict:
    """Write a phantom data set in the official TBX11K layout under ``out``; return a summary.

    ``n_train`` / ``n_val`` images are split over (healthy, sick, tb) by ``proportions`` (largest
    remainder). Files: ``imgs/{health,sick,tb}/{h,s,tb}NNNN.png`` (image_size^2, 8-bit RGB with
    R = G = B; numbering 1-based, continuous over train then val per class); ``lists/TBX11K_*.txt`` and
    ``lists/all_*.txt`` (train, val, trainval; the same lines, shuffled deterministically);
    ``annotations/xml/tbNNNN.xml`` (boxes as integers at a simulated original resolution, width in
    1352-3056, height in 1656-3072); ``annotations/json/{TBX11K,all}_*.json`` and
    ``TBX11K_*_only_tb.json`` (COCO, as the release); ``truth.json`` (findings, lung masks, shortcut).

    ``shortcut`` in [0, 1] plants a spurious corner tag: absent everywhere at 0; otherwise present in
    train with probability 0.5 + shortcut/2 on TB and 0.5 - shortcut/2 on non-TB images, and with
    probability 0.5 in val whatever the label.

    The set is built in a sibling temporary folder and renamed into place, so ``out`` is either the
    complete set or untouched. ``out`` may be missing, empty, or a previous phantom set (replaced);
    anything else raises ``DataError``. Bad arguments raise ``ValueError``.

    Returns ``{"out", "n_images", "counts": {split: {label: n}}, "seconds", "images_per_s", "seed",
    "shortcut", "image_size"}``.
    """
    n_train, n_val, seed, shortcut, size, proportions = _validate(n_train, n_val, seed, shortcut, image_size,
                                                                  proportions)
    out = Path(out).resolve()
    _check_target(out)
    start = time.perf_counter()
    counts = {"train": _class_counts(n_train, proportions), "val": _class_counts(n_val, proportions)}
    work = out.parent / f".{out.name}.partial"
    if work.exists():
        shutil.rmtree(work)
    try:
        for sub in ("imgs/health", "imgs/sick", "imgs/tb", "lists", "annotations/xml", "annotations/json"):
            (work / sub).mkdir(parents=True)
        truth, lines = _write_images(work, counts, seed, shortcut, size, progress)
        _write_lists_and_coco(work, truth, lines, seed, size)
        generator = {"name": GENERATOR_NAME, "version": PHANTOM_VERSION, "n_train": n_train, "n_val": n_val,
                     "proportions": list(proportions), "labels": list(LABELS), "counts": counts,
                     "original_width": list(ORIG_WIDTH), "original_height": list(ORIG_HEIGHT),
                     "upper_middle_fraction": UPPER_MIDDLE_FRACTION, "tag_size": TAG_SIZE,
                     "finding_contrast": FINDING_CONTRAST, "min_box": MIN_BOX,
                     "finding_kinds": list(FINDING_KINDS), "distractor_kinds": list(DISTRACTOR_KINDS)}
        document = {"version": 1, "seed": seed, "shortcut": shortcut, "image_size": size,
                    "generator": generator, "images": truth}
        (work / "truth.json").write_text(json.dumps(document), encoding="utf-8")
        _replace_folder(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise

    seconds = time.perf_counter() - start
    n_images = n_train + n_val
    return {"out": str(out), "n_images": n_images, "counts": counts, "seconds": round(seconds, 3),
            "images_per_s": round(n_images / max(seconds, 1e-9), 2), "seed": seed, "shortcut": shortcut,
            "image_size": size}


def _replace_folder(work: Path, out: Path) -> None:
    """Move the finished ``work`` folder to ``out`` (renames only; an old set is removed last)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old)
