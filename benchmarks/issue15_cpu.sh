#!/usr/bin/env bash
# The CPU measurements of issue 15's "Done when", in one run on a quiet machine (nothing else
# running; ~10 minutes on 2 cores). Needs .venv (the project) and .venv-bench (Captum and
# pytorch-grad-cam, benchmarks/PEERS.md). Each script appends its section to its results file.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"

# 1. Method costs in forward passes (Grad-CAM <= 1.1 at batch 8), torch's default threads.
.venv/bin/python benchmarks/bench_methods.py --methods gradcam cam saliency --repeats 7 \
    --skip-accuracy

# 2. Exact occlusion 16/8 against the best Captum setting, warm, quiet: lite0 and ResNet-18.
.venv-bench/bin/python benchmarks/bench_occlusion.py --models lite0 resnet18 --sides exact \
    --warmup --images 1

# 3. The same beside one busy-loop process (lite0).
.venv-bench/bin/python benchmarks/bench_occlusion.py --models lite0 --sides exact --warmup \
    --images 1 --busy 1

# 4. The first call in a fresh process (no warm-up; lite0).
.venv-bench/bin/python benchmarks/bench_occlusion.py --models lite0 --sides exact --no-warmup \
    --images 1

# 5. evaluate on 10 images beside a busy process; analyze with decode workers.
.venv/bin/python benchmarks/bench_contention.py --repeats 2
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
