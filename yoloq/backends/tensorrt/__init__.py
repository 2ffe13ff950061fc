"""TensorRT backend: engines built with Polygraphy from the FP32 or Q/DQ ONNX, run on the execution API directly.

TensorRT itself is imported only where it is used (build, run, profile), so every module here imports on a machine
without it. What each module produces:

- `versions`: what the installed TensorRT can build (8.6, 10.x, 11.x), from its version alone (pure rules);
- `cuda`: the GPUs the NVIDIA driver reports, and CUDA events for timing (ctypes);
- `environment`: the installed TensorRT, its library version and the GPU (`load_environment`);
- `inputs`: the image input of an ONNX model (`onnx_input`);
- `keys`: names of engines, calibration caches and the timing cache (content hashes);
- `constraints`: layer precision constraints on a parsed network (float layers, FP16 for convs outside Q/DQ);
- `build`: `TensorRTBackend`, which builds (or reuses) the engine of a variant;
- `runner`: `TensorRTRunner`, which runs an engine on one CUDA stream (a context manager);
- `timing`: device time (CUDA events) and end-to-end time of an engine;
- `profile`: per-layer times, kernels and precisions of an engine (IProfiler + engine inspector), aggregated;
- `profile_report`: the profile as markdown, a PNG plot and JSON.
"""
