"""Thin Prefect tasks around the core stages: logging and progress here, the work in `yoloq`."""
