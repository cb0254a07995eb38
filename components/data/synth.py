"""A deterministic synthetic Cityscapes: street scenes drawn as labelled polygons, in the real layout.

Every frame is a list of polygons with real Cityscapes label names (sky, building, road, ... and void
labels such as ``out of roi``, ``ego vehicle``, ``license plate``, ``cargroup``), saved as the
``*_gtFine_polygons.json`` annotation format. The label images come from cityscapesscripts'
``json2labelImg`` / ``json2instanceImg``; the RGB frame is rendered from the same polygons (drawn in
order, later over earlier, like cityscapesscripts) with a per-object colour, texture and noise, so a
model can learn it but not from colour alone (classes overlap in colour; brightness varies by frame).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import json2labelImg
from PIL import Image, ImageDraw
from tqdm import tqdm

logger = logging.getLogger(__name__)

TRAIN_CITIES = (
    "aachen",
    "bochum",
    "bremen",
    "cologne",
    "darmstadt",
    "dusseldorf",
    "erfurt",
    "hamburg",
    "hanover",
    "jena",
    "krefeld",
    "monchengladbach",
    "strasbourg",
    "stuttgart",
    "tubingen",
    "ulm",
    "weimar",
    "zurich",
)
VAL_CITIES = ("frankfurt", "lindau", "munster")
FRAME = 19  # Cityscapes' annotated frame of each 30-frame snippet

# label -> (base RGB, smooth-noise amplitude, pixel-noise amplitude, window-pattern amplitude)
_MATERIALS: dict[str, tuple[tuple[int, int, int], float, float, float]] = {
    "sky": ((135, 170, 210), 8, 2, 0),
    "building": ((120, 105, 95), 15, 6, -28),
    "vegetation": ((70, 115, 50), 20, 14, 0),
    "terrain": ((125, 135, 75), 12, 10, 0),
    "sidewalk": ((145, 135, 135), 8, 6, 0),
    "road": ((95, 90, 100), 8, 5, 0),
    "pole": ((100, 100, 95), 4, 4, 0),
    "traffic sign": ((200, 190, 60), 4, 4, 0),
    "traffic light": ((40, 40, 35), 3, 3, 0),
    "car": ((90, 95, 100), 6, 4, 0),
    "cargroup": ((110, 100, 110), 10, 8, 0),
    "person": ((150, 95, 80), 10, 8, 0),
    "license plate": ((230, 230, 220), 2, 3, 0),
    "out of roi": ((20, 20, 20), 2, 2, 0),
    "ego vehicle": ((40, 45, 50), 3, 3, 0),
}
_CAR_COLOURS = ((160, 20, 30), (30, 40, 120), (200, 200, 200), (30, 30, 30), (90, 95, 100), (150, 150, 140))
_SIGN_COLOURS = ((200, 190, 60), (60, 90, 180), (190, 40, 40))
_CLOTHES = ((150, 95, 80), (40, 40, 60), (180, 160, 120), (90, 30, 30), (60, 90, 60))


@dataclass(frozen=True)
class _Object:
    label: str
    polygon: list[list[int]]
    colour: tuple[int, int, int]


def generate_synthetic_cityscapes(
    out: Path, *, train: int, val: int, height: int, width: int, cities: int = 3, seed: int = 0
) -> Path:
    """Write ``train``/``val`` frames of ``width``x``height`` into ``out`` in the Cityscapes layout.

    Files: ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and
    ``gtFine/<split>/<city>/..._gtFine_{polygons.json,labelIds.png,instanceIds.png,color.png}``.
    Frames are spread round-robin over ``cities`` real city names per split (val has 3 at most).
    The same arguments always give byte-identical files.
    """
    out = Path(out)
    jobs = [("train", TRAIN_CITIES[: max(1, cities)], train), ("val", VAL_CITIES[: max(1, cities)], val)]
    total = train + val
    with tqdm(total=total, desc="synthetic cityscapes", unit="img", disable=total < 50) as bar:
        for split_index, (split, split_cities, count) in enumerate(jobs):
            for index in range(count):
                city = split_cities[index % len(split_cities)]
                stem = f"{city}_{index // len(split_cities):06d}_{FRAME:06d}"
                rng = np.random.default_rng([seed, split_index, index])
                _write_frame(out, split, city, stem, rng, height, width)
                bar.update()
    logger.info("wrote %d synthetic frames (%dx%d) to %s", total, width, height, out)
    return out


def _write_frame(
    out: Path, split: str, city: str, stem: str, rng: np.random.Generator, height: int, width: int
) -> None:
    objects = _scene(rng, height, width)
    image_dir = out / "leftImg8bit" / split / city
    gt_dir = out / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)

    annotation = {
        "imgHeight": height,
        "imgWidth": width,
        "objects": [{"label": obj.label, "polygon": obj.polygon} for obj in objects],
    }
    polygons = gt_dir / f"{stem}_gtFine_polygons.json"
    polygons.write_text(json.dumps(annotation, indent=4))
    json2labelImg(str(polygons), str(gt_dir / f"{stem}_gtFine_labelIds.png"), "ids")
    json2labelImg(str(polygons), str(gt_dir / f"{stem}_gtFine_color.png"), "color")
    # json2instanceImg() saves a 32-bit PIL image, which current Pillow refuses as PNG; Cityscapes
    # ships these as 16-bit PNGs, so draw with cityscapesscripts and save the same image as uint16.
    parsed = Annotation()
    parsed.fromJsonFile(str(polygons))
    instances = np.asarray(createInstanceImage(parsed, "ids"), dtype=np.uint16)
    cv2.imwrite(str(gt_dir / f"{stem}_gtFine_instanceIds.png"), instances)

    rgb = _render(objects, rng, height, width)
    cv2.imwrite(str(image_dir / f"{stem}_leftImg8bit.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _scene(rng: np.random.Generator, h: int, w: int) -> list[_Object]:
    """A street scene as polygons in drawing order (background first, like Cityscapes annotations)."""
    objects: list[_Object] = []

    def add(
        label: str, points: list[tuple[float, float]], colour: tuple[int, int, int] | None = None
    ) -> None:
        polygon = [[round(min(max(x, 0), w - 1)), round(min(max(y, 0), h - 1))] for x, y in points]
        base = colour or _MATERIALS[label][0]
        jitter = rng.integers(-12, 13, size=3)
        objects.append(_Object(label, polygon, tuple(int(c) for c in np.clip(np.add(base, jitter), 0, 255))))

    horizon = h * rng.uniform(0.38, 0.5)
    vanish_x = w * rng.uniform(0.4, 0.6)
    add("sky", [(0, 0), (w, 0), (w, horizon), (0, horizon)])

    x = -rng.uniform(0, 0.1) * w
    while x < w:
        building_w = rng.uniform(0.08, 0.25) * w
        if rng.random() > 0.2:  # gaps let the sky through
            top, slant = h * rng.uniform(0.03, 0.3), h * rng.uniform(-0.05, 0.05)
            bottom = horizon + 0.05 * h
            add("building", [(x, top), (x + building_w, top + slant), (x + building_w, bottom), (x, bottom)])
        x += building_w

    for _ in range(rng.integers(1, 5)):
        add(
            "vegetation",
            _blob(rng, rng.uniform(0, w), rng.uniform(0.2, 0.45) * h, rng.uniform(0.04, 0.12) * w),
        )

    add("sidewalk", [(0, horizon), (w, horizon), (w, h), (0, h)])
    if rng.random() < 0.7:
        side = rng.choice([0.0, 1.0])
        edge_x = side * w
        add(
            "terrain",
            [
                (edge_x, horizon + 0.02 * h),
                (abs(edge_x - 0.3 * w), horizon + 0.02 * h),
                (abs(edge_x - 0.2 * w), horizon + 0.15 * h),
                (edge_x, horizon + 0.25 * h),
            ],
        )

    road_top = rng.uniform(0.04, 0.1) * w
    left_bottom, right_bottom = rng.uniform(-0.2, 0.15) * w, rng.uniform(0.85, 1.2) * w
    add(
        "road",
        [(vanish_x - road_top, horizon), (vanish_x + road_top, horizon), (right_bottom, h), (left_bottom, h)],
    )

    def depth(y: float) -> float:  # 0 at the horizon, 1 at the bottom edge: the perspective scale
        return (y - horizon) / (h - horizon)

    for index in range(rng.integers(1, 4)):
        foot = horizon + rng.uniform(0.1, 0.4) * (h - horizon)
        side = index % 2
        pole_x = rng.uniform(0.02, 0.2) * w if side == 0 else rng.uniform(0.8, 0.98) * w
        pole_h = depth(foot) * h * rng.uniform(0.9, 1.4)
        half = max(0.5, 0.006 * w * depth(foot) * 2)
        top = foot - pole_h
        add(
            "pole", [(pole_x - half, top), (pole_x + half, top), (pole_x + half, foot), (pole_x - half, foot)]
        )
        size = max(2.0, 0.03 * w * depth(foot) * 2)
        if rng.random() < 0.8:
            sign = _SIGN_COLOURS[rng.integers(len(_SIGN_COLOURS))]
            add(
                "traffic sign", [(pole_x - size, top), (pole_x + size, top), (pole_x, top + 1.6 * size)], sign
            )
        elif rng.random() < 0.8:
            add(
                "traffic light",
                [
                    (pole_x - size / 2, top),
                    (pole_x + size / 2, top),
                    (pole_x + size / 2, top + 2 * size),
                    (pole_x - size / 2, top + 2 * size),
                ],
            )

    if rng.random() < 0.6:
        group_w = rng.uniform(0.06, 0.15) * w
        group_x = vanish_x + rng.uniform(-1, 1) * road_top
        add(
            "cargroup",
            [
                (group_x - group_w / 2, horizon - 0.03 * h),
                (group_x + group_w / 2, horizon - 0.03 * h),
                (group_x + group_w / 2, horizon + 0.02 * h),
                (group_x - group_w / 2, horizon + 0.02 * h),
            ],
        )

    feet = sorted(horizon + rng.uniform(0.15, 0.9, size=rng.integers(1, 5)) * (h - horizon))
    for foot in feet:  # nearer (lower) cars are drawn over farther ones
        car_w = depth(foot) * 0.35 * w * rng.uniform(0.8, 1.2)
        car_h = car_w * rng.uniform(0.4, 0.5)
        road_half = road_top + depth(foot) * ((right_bottom - left_bottom) / 2 - road_top)
        centre = vanish_x + depth(foot) * ((left_bottom + right_bottom) / 2 - vanish_x)
        cx = centre + rng.uniform(-0.6, 0.6) * road_half
        x0, x1 = cx - car_w / 2, cx + car_w / 2
        add(
            "car",
            [
                (x0, foot),
                (x1, foot),
                (x1, foot - 0.55 * car_h),
                (x1 - 0.2 * car_w, foot - car_h),
                (x0 + 0.2 * car_w, foot - car_h),
                (x0, foot - 0.55 * car_h),
            ],
            _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))],
        )
        if car_w > 12:
            px, py = 0.1 * car_w, 0.25 * car_h
            add(
                "license plate",
                [
                    (cx - px, foot - py - 0.1 * car_h),
                    (cx + px, foot - py - 0.1 * car_h),
                    (cx + px, foot - py),
                    (cx - px, foot - py),
                ],
            )

    for _ in range(rng.integers(1, 5)):
        foot = horizon + rng.uniform(0.1, 0.8) * (h - horizon)
        person_h = depth(foot) * 0.45 * h * rng.uniform(0.8, 1.2)
        person_w = person_h * 0.3
        px = rng.choice([rng.uniform(0.02, 0.25), rng.uniform(0.75, 0.98)]) * w
        add(
            "person",
            [
                (px - person_w / 4, foot),
                (px - person_w / 2, foot - 0.6 * person_h),
                (px - person_w / 4, foot - 0.85 * person_h),
                (px, foot - person_h),
                (px + person_w / 4, foot - 0.85 * person_h),
                (px + person_w / 2, foot - 0.6 * person_h),
                (px + person_w / 4, foot),
            ],
            _CLOTHES[rng.integers(len(_CLOTHES))],
        )

    border = max(1.0, 0.01 * w)
    add("out of roi", [(0, 0), (border, 0), (border, h), (0, h)])
    add("out of roi", [(w - border, 0), (w, 0), (w, h), (w - border, h)])
    ego = h * rng.uniform(0.06, 0.12)
    add(
        "ego vehicle",
        [
            (0, h),
            (0, h - 0.5 * ego),
            (0.25 * w, h - 0.9 * ego),
            (0.5 * w, h - ego),
            (0.75 * w, h - 0.9 * ego),
            (w, h - 0.5 * ego),
            (w, h),
        ],
    )
    return objects


def _blob(rng: np.random.Generator, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    radii = radius * rng.uniform(0.7, 1.2, size=angles.size)
    return [(cx + r * np.cos(a), cy + 0.8 * r * np.sin(a)) for a, r in zip(angles, radii, strict=True)]


def _render(objects: list[_Object], rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """RGB frame: per-object colour + smooth texture + window pattern + pixel noise, all by lookup tables."""
    # The object index map, drawn with PIL exactly like cityscapesscripts draws the label images.
    index_img = Image.new("I", (w, h), 0)
    drawer = ImageDraw.Draw(index_img)
    for index, obj in enumerate(objects, start=1):
        drawer.polygon([tuple(p) for p in obj.polygon], fill=index)
    index_map = np.asarray(index_img, dtype=np.int32)

    count = len(objects) + 1
    colour = np.zeros((count, 3), np.float32)
    smooth_amp, pixel_amp, window_amp = (np.zeros(count, np.float32) for _ in range(3))
    for index, obj in enumerate(objects, start=1):
        _, smooth_amp[index], pixel_amp[index], window_amp[index] = _MATERIALS[obj.label]
        colour[index] = obj.colour

    gain = rng.uniform(0.65, 1.3)  # per-frame exposure
    tint = rng.uniform(-8, 8, size=3).astype(np.float32)
    coarse = rng.standard_normal((h // 8 + 2, w // 8 + 2)).astype(np.float32)
    smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    pixel = rng.standard_normal((h, w), dtype=np.float32)
    period = max(2, w // 128)
    ys, xs = np.ogrid[:h, :w]
    windows = (((ys // period) % 3 == 1) & ((xs // period) % 3 == 1)).astype(np.float32)

    shade = smooth * smooth_amp[index_map] + pixel * pixel_amp[index_map] + windows * window_amp[index_map]
    rgb = colour[index_map] * gain + tint + shade[..., None]
    rgb += rng.normal(0, 3, size=(h, w, 3)).astype(np.float32)  # sensor noise
    return np.clip(rgb, 0, 255).astype(np.uint8)
