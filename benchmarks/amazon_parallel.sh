#!/bin/bash
# The full issue-33 measurement on one GPU machine: amazon_cross_domain.py once per (size, pair), all at once, each
# process on one CPU thread, then the pooled tables (amazon_table.py). On an H200 with 16 cores, 24 processes ran
# 252 judged runs and 144 source-only trainings in about 11 minutes (benchmarks/README.md).
#
#   bash benchmarks/amazon_parallel.sh OUT [METHODS] [DEADLINE_S] [SEEDS]
#
# METHODS run in the order given, so a run stopped by DEADLINE_S (default: none) keeps the first methods of every
# pair. Started again into the same OUT, each process appends to its own lines (amazon_table reads the last line
# per run). AMAZON_MODEL: a built-in name or a local folder (default minilm-l6); PEFT_ADAPT_DATA as for the tests.
set -u
out=${1:?usage: amazon_parallel.sh OUT [METHODS] [DEADLINE_S] [SEEDS]}
methods=${2:-self_training,dann,mmd,coral,self_training_flexmatch,entropy,adda}
deadline=${3:-0}  # 0: no limit
seeds=${4:-0,1,2}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
domains="books dvd electronics kitchen"
pids=()
for rows in 800 400; do
  for s in $domains; do
    for t in $domains; do
      [ "$s" = "$t" ] && continue
      dir=$out/$rows-$s-$t
      mkdir -p "$dir"
      timeout "$deadline" "$python" "$here/amazon_cross_domain.py" --quick --pairs "$s:$t" --methods "$methods" \
        --rows "$rows" --seeds "$seeds" --model "${AMAZON_MODEL:-minilm-l6}" --out "$dir" >> "$dir/log" 2>&1 &
      pids+=($!)
    done
  done
done
wait "${pids[@]}"
shopt -s nullglob
logs=("$out"/*/amazon_cross_domain.jsonl)
[ ${#logs[@]} -gt 0 ] || { echo "no run finished; the processes' output is in $out/*/log" >&2; exit 1; }
"$python" "$here/amazon_table.py" "${logs[@]}"
