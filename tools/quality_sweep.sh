#!/usr/bin/env bash
# The issue-12 sweep as run on the 2-core machine, in order: the 10,000-image sweep, then the
# 1,000-image variant (settings in BENCHMARKS.md). Resumable: rerun it to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY benchmarks/bench_quality.py
$PY benchmarks/bench_quality.py --train-fraction 0.1 --budget-scale 4 \
    --arms unet_full,unet_patch,dit_full,dit_patch,dit_route --plot docs/figures/quality_vs_compute_1000.png
