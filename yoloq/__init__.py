"""yoloq: quantize YOLO detectors to INT8 without losing accuracy, and prove it."""

__version__ = "0.1.0"
