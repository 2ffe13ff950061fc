from __future__ import annotations

import cv2
import numpy as np

from tests.conftest import VAL_IMAGES
from yoloq.preprocess import PAD_VALUE, boxes_to_original, letterbox, list_images, load_preprocessed, read_image


def test_letterbox_keeps_aspect_pads_114_and_converts_to_rgb():
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    image[:, :, 0] = 255  # pure blue in BGR
    chw, box = letterbox(image, 640)
    assert chw.shape == (3, 640, 640) and chw.dtype == np.float32
    assert box.scale == 1.0 and box.pad_x == 0 and box.pad_y == 80
    assert np.allclose(chw[:, 0, 0], PAD_VALUE / 255.0)  # top padding row
    assert np.allclose(chw[:, 320, 320], [0.0, 0.0, 1.0])  # RGB order: blue is channel 2


def test_boxes_map_back_to_original_pixels():
    image = np.zeros((427, 640, 3), dtype=np.uint8)
    _, box = letterbox(image, 320)
    original = np.array([[10.0, 20.0, 200.0, 300.0]])
    in_input = original * box.scale + [box.pad_x, box.pad_y, box.pad_x, box.pad_y]
    assert np.allclose(boxes_to_original(in_input, box), original)


def test_real_images_load_in_sorted_order_and_grayscale_becomes_three_channels(tmp_path):
    images = list_images(VAL_IMAGES)
    assert len(images) == 64 and images == sorted(images)
    gray = cv2.cvtColor(read_image(images[0]), cv2.COLOR_BGR2GRAY)
    path = tmp_path / "gray.png"
    cv2.imwrite(str(path), gray)
    chw, _ = load_preprocessed(path, 640)
    assert chw.shape == (3, 640, 640)


def test_unreadable_image_is_none(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    assert read_image(broken) is None
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert load_preprocessed(empty, 640) is None
