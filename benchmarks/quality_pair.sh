#!/usr/bin/env bash
# The pretrained-pair benchmark of docs/BENCHMARKS.md end to end, resumable: re-run it to go on where it stopped
# (finished runs and evaluations are kept and skipped). Hours on 2 CPU cores; the work directory lives outside
# the work tree so that it outlives a fresh checkout: WORK=${WORK:-$HOME/xtokd-runs/quality-pair}.
#   1. the LR, chosen once on the held-out Dolly dev slice with SFT (lowest bits-per-byte);
#   2. SFT, DSKD, DWA-KD over 3 training seeds (seed 1 first), the Teacher row, DWA-KD with the projector
#      pre-fit, MTA and SRA (from a second cache with intermediate layers and salience) at seed 1, DSKD with the
#      pre-fit, MTA and SRA at 3 seeds, then the baselines.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$HOME/xtokd-runs/quality-pair}
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
PY=.venv/bin/python
Q=(benchmarks/quality.py --work "$WORK")
"$PY" "${Q[@]}" --select --lrs 2e-5,1e-4,5e-4 --methods sft --seeds 1 --eval-samples 20 --eval-seeds 10 \
    --bpb-samples 0 --out "$WORK/select.json" --md "$WORK/select.md"
LR=$("$PY" -c "
import json, sys; s = json.load(open(sys.argv[1]))['summary']
print(min(s, key=lambda k: s[k]['mean_bpb'][0]).split('lr=')[1])" "$WORK/select.json")
echo "selected lr $LR" | tee "$WORK/selected_lr.txt"
"$PY" "${Q[@]}" --lrs "$LR" --methods sft,dskd,dwa_kd --seeds 1 --bpb-samples 500 --student-base \
    --out "$WORK/main-seed1.json" --md "$WORK/main-seed1.md"
"$PY" "${Q[@]}" --lrs "$LR" --methods sft,dskd,dwa_kd --seeds 1,2,3 --bpb-samples 500 --student-base \
    --out "$WORK/main.json" --md "$WORK/main.md"
# the Teacher row (a 1.5B on CPU: 10 prompts per set, one sampling seed, bpb on the first 50 references)
"$PY" "${Q[@]}" --lrs "$LR" --methods sft --seeds 1 --bpb-samples 500 --teacher \
    --out "$WORK/teacher.json" --md "$WORK/teacher.md"
# the projector pre-fit (docs/BENCHMARKS.md, "why KD does not beat SFT"): one pass over the rows fitting query/t2s
"$PY" "${Q[@]}" --lrs "$LR" --methods dwa_kd --seeds 1,2,3 --bpb-samples 500 \
    --set train.projector_prefit_steps=75 --out "$WORK/prefit-dwa.json" --md "$WORK/prefit-dwa.md"
# the relatives that read intermediate teacher layers: a second cache of the same rows with layers and salience
# (Qwen2.5-Coder-1.5B has 28 blocks, the pruned SmolLM2 24); MTA pairs four layers (the lowest on words), SRA the
# top three, as their reference scripts do for their pairs
CS=(--cache-set "cache.layers=[7,14,21,24,26,-1]" --cache-set cache.salience=true)
"$PY" "${Q[@]}" "${CS[@]}" --lrs "$LR" --methods mta --seeds 1 --bpb-samples 500 \
    --set "objective.span_teacher_layers=[7,14,21,-1]" --set "objective.span_student_layers=[6,12,18,-1]" \
    --set objective.span_word_pairs=1 --out "$WORK/mta-seed1.json" --md "$WORK/mta-seed1.md"
"$PY" "${Q[@]}" "${CS[@]}" --lrs "$LR" --methods sra --seeds 1 --bpb-samples 500 \
    --set "objective.sra_teacher_layers=[24,26,-1]" --set "objective.sra_student_layers=[20,22,-1]" \
    --out "$WORK/sra-seed1.json" --md "$WORK/sra-seed1.md"
"$PY" "${Q[@]}" --lrs "$LR" --methods dwa_kd,dskd --seeds 1,2,3 --bpb-samples 500 \
    --set train.projector_prefit_steps=75 --out "$WORK/prefit.json" --md "$WORK/prefit.md"
"$PY" "${Q[@]}" "${CS[@]}" --lrs "$LR" --methods mta --seeds 1,2,3 --bpb-samples 500 \
    --set "objective.span_teacher_layers=[7,14,21,-1]" --set "objective.span_student_layers=[6,12,18,-1]" \
    --set objective.span_word_pairs=1 --out "$WORK/mta.json" --md "$WORK/mta.md"
"$PY" "${Q[@]}" "${CS[@]}" --lrs "$LR" --methods sra --seeds 1,2,3 --bpb-samples 500 \
    --set "objective.sra_teacher_layers=[24,26,-1]" --set "objective.sra_student_layers=[20,22,-1]" \
    --out "$WORK/sra.json" --md "$WORK/sra.md"
"$PY" "${Q[@]}" --lrs "$LR" --methods sft,dskd,dwa_kd,uld,mined,multilevel_ot --seeds 1,2,3 --bpb-samples 500 \
    --student-base --teacher --out "$WORK/all.json" --md "$WORK/all.md"
