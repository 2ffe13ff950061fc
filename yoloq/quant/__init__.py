"""Explicit quantization of YOLO ONNX models, one small module per step (ModelOpt's ONNX layout, Polygraphy's names):

    graph       where the detector's convolutions end and its box decoding begins (`analyze_head`), model loading
    statistics  streaming activation statistics over calibration images (max |x| and |x| histograms)
    ranges      the range each calibration algorithm picks from the statistics (minmax, percentile, mse, entropy)
    placement   which tensors get a Q/DQ pair and which share a scale: named rules after TensorRT's Q/DQ guidance
    qdq         the Q/DQ ONNX written from a placement and ranges (symmetric, per-channel weights)
    formats     the quantized number format as a value (INT8 today; FP8 would be one more entry)

Nothing here imports Prefect, MLflow or TensorRT.
"""
