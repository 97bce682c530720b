#!/bin/bash
# A/B: main (total_variance) vs 01bca58 (subtract-square-sum FVU denominator), topk_profile, alternating rounds.
cd /work/main
for r in 1 2 3 4; do
  for v in new old; do
    if [ $v = old ]; then PP=/work/ab-old; EXT=/work/ab-old-ext; else PP=""; EXT=/work/ab-new-ext; fi
    echo "== round $r $v"
    PYTHONPATH=$PP TORCH_EXTENSIONS_DIR=$EXT .venv/bin/python bench/topk_profile.py --store /work/bench-data/store-train --layer 8 --steps 60 2>&1 | grep -E "mean step|other|metrics|saestrata from"
  done
done
