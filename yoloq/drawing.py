"""Detections drawn on images (OpenCV): boxes with class and score, and two models' detections side by side."""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

from yoloq.detector import ImageDetections
from yoloq.heads import Detections


def class_color(class_id: int) -> tuple[int, int, int]:
    """A stable, distinct BGR colour per class (golden-ratio hues)."""
    hue = (class_id * 0.618033988749895) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(blue * 255), int(green * 255), int(red * 255)


def draw_detections(image_bgr: np.ndarray, found: ImageDetections, min_score: float = 0.0) -> np.ndarray:
    """A copy of the image with every detection of at least `min_score` drawn: box, class name and score."""
    return draw_boxes(image_bgr, found.boxes_xyxy, found.scores, found.class_ids, found.class_names, min_score)


def draw_boxes(
    image_bgr: np.ndarray,
    boxes_xyxy: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    labels: list[str],
    min_score: float = 0.0,
) -> np.ndarray:
    """A copy of the image with each box of at least `min_score` drawn in its class colour, labelled
    `labels[i] score` (labels: one per box)."""
    canvas = image_bgr.copy()
    thickness = max(1, round(max(canvas.shape[:2]) / 400))
    scale = max(0.4, max(canvas.shape[:2]) / 1600)
    order = np.argsort(scores, kind="stable")  # best drawn last, on top
    for index in order.tolist():
        score = float(scores[index])
        if score < min_score:
            continue
        color = class_color(int(class_ids[index]))
        x1, y1, x2, y2 = (int(round(float(v))) for v in boxes_xyxy[index])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
        label = f"{labels[index]} {score:.2f}"
        (width, height), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = max(0, y1 - height - baseline - 2)
        cv2.rectangle(canvas, (x1, top), (x1 + width + 2, top + height + baseline + 2), color, -1)
        origin = (x1 + 1, top + height + 1)
        cv2.putText(canvas, label, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def comparison_image(
    image_bgr: np.ndarray, detections: dict[str, Detections], class_names: list[str], min_score: float
) -> np.ndarray:
    """One image with each model's detections (of at least `min_score`) side by side, titled with the model's name
    and how many boxes it drew."""
    panels, titles = [], []
    for name, found in detections.items():
        labels = [class_names[c] if 0 <= c < len(class_names) else str(c) for c in found.classes.tolist()]
        panels.append(draw_boxes(image_bgr, found.boxes_xyxy, found.scores, found.classes, labels, min_score))
        titles.append(f"{name}: {int((found.scores >= min_score).sum())} boxes >= {min_score:g}")
    return side_by_side(panels, titles)


def side_by_side(images: list[np.ndarray], titles: list[str], height: int = 480) -> np.ndarray:
    """Images scaled to one height and placed left to right, each with its title in a band above it."""
    band = 32
    panels = []
    for image, title in zip(images, titles, strict=True):
        width = max(1, round(image.shape[1] * height / image.shape[0]))
        resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        panel = np.full((height + band, width, 3), 255, np.uint8)
        panel[band:] = resized
        cv2.putText(panel, title, (6, band - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        panels.append(panel)
    gap = np.full((height + band, 8, 3), 255, np.uint8)
    row = [panels[0]]
    for panel in panels[1:]:
        row += [gap, panel]
    return np.concatenate(row, axis=1)
