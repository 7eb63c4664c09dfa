#!/usr/bin/env bash
# SupOnly on CamVid (1/8 labeled = 46 images, seed 0, MobileNetV2 ImageNet init): val mIoU and
# wall time, written to docs/results/camvid_suponly.md. Usage (from the repo root, with
# ../shared beside it, or pass the data and weight paths):
#   bash benchmarks/suponly_camvid.sh [DATA_ROOT] [WEIGHTS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/camvid}
weights=${2:-../shared/weights/mobilenet_v2_imagenet.pth}
threads=${3:-2}
out=runs/camvid-suponly-s0
rm -rf "$out"
cmd=(python -m ciscr train camvid --out "$out" "data.root=$data" "model.pretrained=$weights" seed=0
     data.labeled=0.125 train.progress=false)
start=$(date +%s)
OMP_NUM_THREADS=$threads "${cmd[@]}" > "$out.log" 2>&1
wall=$(( $(date +%s) - start ))
miou=$(python -c "import json; print(f\"{100 * json.load(open('$out/stage1/metrics.json'))['miou']:.2f}\")")
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
{
  echo "# SupOnly on CamVid, 1/8 labeled (46 images), seed 0, MobileNetV2 ImageNet init"
  echo
  echo "| val mIoU (%) | wall time (s) | machine | threads | date |"
  echo "|---|---|---|---|---|"
  echo "| $miou | $wall | $cpu, $(nproc) cores | $threads | $(date -u +%Y-%m-%d) |"
  echo
  echo "Command: \`bash benchmarks/suponly_camvid.sh $*\`, which runs \`${cmd[*]}\`"
  echo "(config \`configs/camvid.yaml\`: 200 iterations of batch 8, crop 160, whole-image"
  echo "evaluation on the 101 val images; the result is the last checkpoint)."
  echo
  echo '```'
  sed -n '/^class/,/^pixel acc/p' "$out.log"
  echo '```'
} > docs/results/camvid_suponly.md
cat docs/results/camvid_suponly.md
