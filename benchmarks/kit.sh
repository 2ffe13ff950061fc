#!/usr/bin/env bash
# On the lent GPU machine: run a command of this project with the TensorRT 8.6 kit's Python 3.11
# (../shared/gpu/README.md; its chunks staged under /tmp/stage). Setup is idempotent (about 15 s the first time).
#   bash benchmarks/kit.sh -m flows.cli run ...        bash benchmarks/kit.sh benchmarks/gpu_int8.py run ...
set -eo pipefail
bash /tmp/stage/base/setup.sh > /dev/null
. /tmp/v311/env.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PREFECT_SERVER_ANALYTICS_ENABLED=false YOLO_OFFLINE=1 PYTHONUNBUFFERED=1
exec /tmp/v311/bin/python "$@"
