#!/usr/bin/env bash
# The project's GPU measurements in one command (run it on a machine with a CUDA GPU).
#
#   bash benchmarks/gpu_battery.sh smoke [SECONDS]   # CUDA unit tests, 2:4 kernel + FISTA micro-benchmarks (GPU to
#                                                    # themselves), then the four paper_repro scripts at --scale
#                                                    # stories on the GPU (every method's CUDA path, end to end)
#   bash benchmarks/gpu_battery.sh paper [SECONDS]   # the four paper_repro scripts at --scale paper (SmolLM2-135M,
#                                                    # `paper` protocol) and self-vs-C4 calibration, in parallel
#   bash benchmarks/gpu_battery.sh speed [SECONDS]   # dense vs pruned latency (bench_models) with the GPU to itself
#
# Results go under $RES (default out/gpu). Every step is resumable (sweep.py JSONL rows), so a stage cut by
# its deadline continues where it stopped when run again. Runs in one stage share the GPU: their wall times
# are not speed figures (the `speed` stage is).
set -u
STAGE=${1:?usage: gpu_battery.sh smoke|paper|speed [SECONDS]}
BUDGET=${2:-540}
RES=${RES:-out/gpu}
THREADS=${THREADS:-3}
mkdir -p "$RES/logs"
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
PY=${PYTHON:-python3}

$PY - <<'EOF'
import torch, transformers, platform
print("torch", torch.__version__, "transformers", transformers.__version__, "python", platform.python_version(),
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
EOF

case "$STAGE" in
smoke)
    timeout 150 $PY -m pytest -q -p no:cacheprovider -m "gpu or not slow" \
        tests/test_fista.py::test_cuda_matches_cpu tests/test_alpha.py::test_eigenvalues_on_cuda_match_cpu \
        tests/test_pipeline.py::test_cuda_device_model_on_cpu 2>&1 | tail -15
    timeout 90 $PY benchmarks/semistructured/bench_semistructured.py --json "$RES/semistructured_layers.json" \
        > "$RES/logs/semistructured.log" 2>&1; echo "bench_semistructured rc=$?"; tail -25 "$RES/logs/semistructured.log"
    timeout 60 $PY benchmarks/solvers/bench_fista.py --device cuda --repeats 3 --json "$RES/bench_fista_cuda.json" \
        > "$RES/logs/bench_fista.log" 2>&1; echo "bench_fista rc=$?"; tail -12 "$RES/logs/bench_fista.log"
    for p in fistapruner alphapruning spap eggs_ptp; do
        timeout -s INT $(( $(left) - 20 )) $PY paper_repro/$p.py --scale stories --threads 2 --out-dir "$RES/stories" \
            > "$RES/logs/stories_$p.log" 2>&1 &
    done
    wait
    ;;
paper)
    for p in fistapruner alphapruning spap eggs_ptp; do
        timeout -s INT $(( $(left) - 15 )) $PY paper_repro/$p.py --scale paper --threads "$THREADS" \
            --out-dir "$RES/paper" > "$RES/logs/paper_$p.log" 2>&1 &
    done
    timeout -s INT $(( $(left) - 15 )) $PY benchmarks/models/self_vs_c4_calibration.py --protocol paper --device cuda \
        --threads "$THREADS" --gen-threads "$THREADS" --output "$RES/self_vs_c4" > "$RES/logs/self_vs_c4.log" 2>&1 &
    wait
    ;;
paper2)  # the same rows as `paper`, prioritised over six workers, evaluated on WikiText-2 + PTB only (no C4)
    EV="--no-extra --eval-datasets wikitext2,ptb --threads 2 --out-dir $RES/paper"
    run() { timeout -s INT $(( $(left) - 15 )) $PY paper_repro/$1.py --scale paper $EV --variants "$2" \
                > "$RES/logs/paper2_$1_${3}.log" 2>&1; }
    run fistapruner sparsegpt,sparsegpt_ec 1 &
    run fistapruner wanda,magnitude 2 &
    { run fistapruner fista,fista_noec 3; } &
    run spap spap,group_obs,flap 4 &
    run alphapruning alpha_wanda,owl_wanda,alpha_sparsegpt,owl_sparsegpt,uniform_sparsegpt 5 &
    run eggs_ptp ria,sparsegpt,eggs_b2,wanda 6 &
    wait
    ;;
kernels)
    timeout 120 $PY -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/test_fista.py::test_cuda_matches_cpu \
        2>&1 | tail -3
    for b in cutlass cusparselt; do
        timeout 100 $PY benchmarks/semistructured/bench_semistructured.py --backend $b --iters 100 \
            --json "$RES/semistructured_layers_$b.json" > "$RES/logs/semistructured_$b.log" 2>&1
        echo "bench_semistructured --backend $b rc=$?"; grep -v Warning "$RES/logs/semistructured_$b.log" | tail -32
    done
    ;;
speed)
    timeout -s INT $(( $(left) - 15 )) $PY benchmarks/models/bench_models.py --model smollm2-135m --protocol paper \
        --out "$RES/bench_models_smollm2.jsonl" > "$RES/logs/bench_models.log" 2>&1
    ;;
*) echo "unknown stage $STAGE"; exit 2 ;;
esac
echo "== stage $STAGE done in $(( $(date +%s) - T0 )) s"
for f in "$RES"/logs/*.log; do echo "--- $f"; grep -E "Error|error|Traceback|=== done" "$f" | tail -6; done
