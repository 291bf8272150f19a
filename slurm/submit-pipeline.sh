#!/bin/bash
# Submit the whole hpcq pipeline to Slurm as dependent jobs and print their ids (one line each):
# quantize (with the sweep as a job array inside it) -> label-free retraining -> [labelled baseline
# retraining] -> report. Each job starts only when the one before it succeeded (afterok); when one fails,
# Slurm cancels the jobs after it (--kill-on-invalid-dep).
#
#   slurm/submit-pipeline.sh [--labelled-baseline] SPEC.yaml [--set section.key=value ...]
#
# Extra sbatch options for every job go in HPCQ_SBATCH_ARGS; for one step in HPCQ_QUANTIZE_ARGS,
# HPCQ_RETRAIN_ARGS or HPCQ_REPORT_ARGS (e.g. HPCQ_RETRAIN_ARGS="--nodes=4 --gpus-per-node=4").
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
labelled=0
if [[ ${1:-} == --labelled-baseline ]]; then labelled=1; shift; fi
if [[ $# -lt 1 ]]; then
  echo "usage: $0 [--labelled-baseline] SPEC.yaml [--set section.key=value ...]" >&2
  exit 2
fi
spec=$1; shift
if [[ ! -f $spec ]]; then echo "$0: no run spec at $spec" >&2; exit 2; fi
read -r -a common <<< "${HPCQ_SBATCH_ARGS:-}"
read -r -a quantize_args <<< "${HPCQ_QUANTIZE_ARGS:-}"
read -r -a retrain_args <<< "${HPCQ_RETRAIN_ARGS:-}"
read -r -a report_args <<< "${HPCQ_REPORT_ARGS:-}"

submit() { sbatch --parsable "${common[@]}" "$@" | cut -d';' -f1; }

quantize=$(submit "${quantize_args[@]}" "$here/quantize.sbatch" "$spec" "$@")
echo "$quantize"
after() { echo --dependency="afterok:$1" --kill-on-invalid-dep=yes; }
# shellcheck disable=SC2046  # after's two words are meant to split
last=$(submit $(after "$quantize") "${retrain_args[@]}" "$here/retrain.sbatch" "$spec" "$@")
echo "$last"
if [[ $labelled == 1 ]]; then
  # shellcheck disable=SC2046
  last=$(submit $(after "$last") "${retrain_args[@]}" "$here/retrain.sbatch" "$spec" --labelled "$@")
  echo "$last"
fi
# shellcheck disable=SC2046
submit $(after "$last") "${report_args[@]}" "$here/report.sbatch" "$spec" "$@"
