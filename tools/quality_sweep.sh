#!/usr/bin/env bash
# The issue-12 sweep as run on the 2-core machine, in order: the 10,000-image sweep, the
# 1,000-image variant at 4x, then its DiT arms at 8x (settings and why in BENCHMARKS.md).
# Resumable: rerun it to continue; a finished stage reports at once.
#
# The two seeds run side by side, one torch thread each: on 2 cores that trains the demo U-Net
# 1.36-1.43x and the DiT 1.00-1.12x as fast in all as one 2-thread process does
# (benchmarks/bench_cpu_layout.py; BENCHMARKS.md). Each process
# sees one seed, so its own closing summary is partial; `--report` rebuilds summary.json and the
# plot from every seed's points once both are done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

seeds_side_by_side() {
    local pids=() seed
    for seed in 0 1; do
        OMP_NUM_THREADS=1 $PY benchmarks/bench_quality.py --seeds "$seed" "$@" > "bench_out/quality-seed$seed.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    $PY benchmarks/bench_quality.py "$@" --report
}

mkdir -p bench_out
seeds_side_by_side
seeds_side_by_side --train-fraction 0.1 --budget-scale 4 \
    --arms unet_full,unet_patch,dit_full,dit_patch,dit_route --plot docs/figures/quality_vs_compute_1000.png
# the 8x stage: two workers side by side on the same list, one torch thread each; each arm-seed
# is trained by one of them, under its own lock (bench_quality.train_all), so two run at once.
# An arm-seed takes about 2-2.6 h so (BENCHMARKS.md); checkpoints (bench_out/) do not outlive the machine, points
# (benchmarks/results/) do: commit an arm-seed's points.json once all 12 points are in.
LONG=(--train-fraction 0.1 --budget-scale 8 --evals 12 --arms dit_full,dit_patch,dit_route
      --out bench_out/quality-long --results benchmarks/results/quality-compute-long
      --plot docs/figures/quality_vs_compute_1000_8x.png)
pids=()
for worker in 0 1; do
    OMP_NUM_THREADS=1 $PY benchmarks/bench_quality.py "${LONG[@]}" > "bench_out/quality-long-worker$worker.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
$PY benchmarks/bench_quality.py "${LONG[@]}" --report

# issue 28: the representation-alignment arms (settings in BENCHMARKS.md, fixed before they ran),
# on 10,000 images against the dit_full points above, then on 1,000 images at 4x. Two workers
# side by side on the same list, as the 8x stage: each arm-seed is trained by one of them.
two_workers() {  # LOG_NAME ARGS...: bench_out/LOG_NAME-worker{0,1}.log
    local pids=() worker name=$1
    shift
    for worker in 0 1; do
        OMP_NUM_THREADS=1 $PY benchmarks/bench_quality.py "$@" > "bench_out/$name-worker$worker.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    $PY benchmarks/bench_quality.py "$@" --report
}
two_workers quality-repa --arms dit_patch_route_repa,dit_patch_repa,dit_repa,dit_patch_route_after_repa,dit_patch_repa_k64 \
    --plot docs/figures/quality_vs_compute_repa.png
two_workers quality-repa-1000 --train-fraction 0.1 --budget-scale 4 --arms dit_patch_route_repa,dit_patch_repa,dit_repa \
    --plot docs/figures/quality_vs_compute_repa_1000.png

# issue 29: the 2025 DiT block's arms (settings in BENCHMARKS.md, fixed before they ran), on
# 10,000 images against the dit_full points, two workers as above
two_workers quality-dit2025 --arms dit2025_full,dit2025_patch,dit2025_patch_route,dit2025_patch_nocoord,dit2025_patch_route_repa \
    --plot docs/figures/quality_vs_compute_dit2025.png
