#!/usr/bin/env bash
# The GPU session's checks, in one go (see benchmarks/README.md): CUDA tests, the TR step
# cost model on ResNet-18 with CIFAR-shaped batches, issue 13's GPU figures (ResNet-18 epoch time
# against Adam with products on 1/8 of the batch, TR and ARC; goal <= 2x Adam), host-device
# synchronisations per step (counted, and as CUDA's sync debug mode flags them), and a short
# runner smoke test on CUDA (tr_rms and arc_rms). Expected run time on an H200: about 8 minutes
# (each command has its own timeout; the sum of the timeouts is 12 minutes).
# Usage on a GPU machine, from the repository root: OUT=<dir> bash benchmarks/device_check.sh
set -u
OUT=${OUT:-/tmp/trlib_device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
timeout 90 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tail -4
timeout 90 python3 -m pytest tests/test_arc.py tests/test_cubic.py -m cuda -q -p no:cacheprovider 2>&1 | tail -4
timeout 100 python3 benchmarks/bench_tr_step.py --device cuda --model resnet18 --tr-batch 512 --adam-batch 128 \
  --krylov 10 --check-every 1 5 10 --repeats 5 --json "$OUT/timings.json"
timeout 60 python3 benchmarks/bench_tr_step.py --device cuda --model resnet18 --tr-batch 512 --adam-batch 128 \
  --krylov 10 --check-every 5 --repeats 3 --hvp forward_over_reverse --json "$OUT/timings_forward_over_reverse.json"
timeout 100 python3 benchmarks/bench_tr_step.py --device cuda --model resnet18 --tr-batch 512 --adam-batch 128 \
  --krylov 10 --check-every 5 --repeats 5 --hessian-fraction 0.125 --json "$OUT/timings_subsampled.json"
timeout 100 python3 benchmarks/bench_tr_step.py --device cuda --model resnet18 --tr-batch 512 --adam-batch 128 \
  --krylov 10 --check-every 5 --repeats 5 --hessian-fraction 0.125 --optimizer arc \
  --json "$OUT/timings_arc_subsampled.json"
timeout 120 python3 benchmarks/bench_syncs.py --device cuda --steps 10 --json "$OUT/syncs.json"
timeout 60 python3 -m trlib.experiments run --task cifar_resnet18 --method tr_rms arc_rms --seeds 0 --budget 25s \
  --data stand-in --device cuda --out "$OUT/run" --no-progress 2>&1 | tail -5
ls "$OUT" "$OUT/run" 2>/dev/null
