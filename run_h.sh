#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export TORCHINDUCTOR_COMPILE_THREADS=16
timeout 120 python bench/gpu.py --model gpt2m_sdpa --compile --no-eager --no-anchors --offload only --budgets 6.8GiB --tag final --out-dir $OUT 2>&1 | grep -E "^\|" | tail -4
export TORCHINDUCTOR_COMPILE_THREADS=8
rm -rf /tmp/cts; i=0
for c in "torch.compile:0.5 --channels-last" "graphed:none:50:pointwise --channels-last"; do
  i=$((i+1))
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind_$i timeout 110 python bench/diag/compiled_time.py resnet50 $c --parties 2 --sync /tmp/cts > /tmp/ct_$i.txt 2>&1 &
done
wait
grep -h "^| " /tmp/ct_*.txt
cat /tmp/ct_*.txt > $OUT/logs.txt
