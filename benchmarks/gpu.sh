#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a machine with a CUDA GPU and torch installed:
#   bash benchmarks/gpu.sh OUT_DIR
# Runs the accelerator tests (parity on the device, exact head-dim padding, fused kernels), then
# the backbone benchmark at batch 8 and 16 (bf16 fast path vs fp16 published-style path).
set -uo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_accelerator.py tests/test_swift_parity.py \
    tests/test_attention.py 2>&1 | tail -15 | tee "$out/tests.txt"
for batch in 8 16; do
    python3 benchmarks/backbone.py --device cuda --batch "$batch" --repeats 10 --warmup 3 \
        --checkpointing --compile > "$out/backbone_b$batch.json" 2> "$out/backbone_b$batch.err"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps(d['ratios_forward_backward']))" \
        "$out/backbone_b$batch.json"
done
