#!/usr/bin/env bash
# Issue 34's GPU part, prepared for a lent device (run from the repository root; writes into $OUT, or ./gpu_out):
#   the CUDA tests (every compressor on CUDA tensors against the reference, over gloo), then the compressors'
#   rounds with 2 ranks on one GPU (gloo with CUDA tensors: NCCL refuses two ranks on one GPU), then their
#   compute floors at W = 2 and 8 (fake world: a round's non-wire cost and its CUDA kernels).
# On the CPU (no GPU): DEVICE=cpu bash benchmarks/gpu/check.sh checks the script itself.
set -uo pipefail
out="${OUT:-gpu_out}"; mkdir -p "$out"
device="${DEVICE:-cuda}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
  | tee "$out/device.txt"
if [ "$device" = cuda ]; then
  timeout 240 python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15 | tee "$out/test_cuda.txt"
fi
timeout 240 torchrun --nproc-per-node 2 -m localsgd_optim.bench --device "$device" --backend gloo \
  --methods compressors ours --models 48x128 --rounds 10 --step-reps 5 2>&1 | grep -v Warning | tee "$out/bench.txt"
for w in 2 8; do
  timeout 120 python -m localsgd_optim.bench --fake-world "$w" --device "$device" --models 48x128 \
    --methods compressors --rounds 5 --compressors 'int4,int2,top-1% 2-bit,int4 rs' 2>&1 | grep -v Warning \
    | tee "$out/fake_world_$w.txt"
done
