#!/bin/bash
# Submit the whole hpcq pipeline to Slurm as dependent jobs and print their ids (one line each):
# quantize (with the sweep as a job array inside it) -> label-free retraining -> [labelled baseline
# retraining, when the spec's retrain.labelled_baseline is true] -> report. Each job starts only when the
# one before it succeeded (afterok); when one fails, Slurm cancels the jobs after it (--kill-on-invalid-dep).
# The spec is checked before anything is submitted (exit status 2 and the reason when it is invalid).
#
#   slurm/submit-pipeline.sh SPEC.yaml [--set section.key=value ...]
#
# Extra sbatch options for every job go in HPCQ_SBATCH_ARGS; for one step in HPCQ_QUANTIZE_ARGS,
# HPCQ_RETRAIN_ARGS or HPCQ_REPORT_ARGS (e.g. HPCQ_RETRAIN_ARGS="--nodes=4 --gpus-per-node=4"); they are
# split at spaces, so no value in them may contain one. PYTHON names the interpreter of hpcq's
# environment when `python` is not it (HPCQ the hpcq command, for the jobs).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [[ $# -lt 1 ]]; then
  echo "usage: $0 SPEC.yaml [--set section.key=value ...]" >&2
  exit 2
fi
spec=$1; shift
if [[ ! -f $spec ]]; then echo "$0: no run spec at $spec" >&2; exit 2; fi
spec=$(cd "$(dirname "$spec")" && pwd)/$(basename "$spec")  # jobs may run in another directory
# Validate the spec (with its --set overrides) and read whether it asks for the labelled baseline.
labelled=$("${PYTHON:-python}" - "$spec" "$@" <<'PY'
import sys
from hpcq.config import load_config
from hpcq.errors import HpcqError
args = sys.argv[2:]
overrides = [value for flag, value in zip(args[::2], args[1::2]) if flag == "--set"]
try:
    print(int(load_config(sys.argv[1], overrides).retrain.labelled_baseline))
except HpcqError as exc:
    sys.exit(f"invalid run spec: {exc}")
PY
) || exit 2
read -r -a common <<< "${HPCQ_SBATCH_ARGS:-}"
read -r -a quantize_args <<< "${HPCQ_QUANTIZE_ARGS:-}"
read -r -a retrain_args <<< "${HPCQ_RETRAIN_ARGS:-}"
read -r -a report_args <<< "${HPCQ_REPORT_ARGS:-}"

# ${a[@]+"${a[@]}"}: an empty array under set -u (bash before 4.4 calls "${a[@]}" unbound)
submit() { sbatch --parsable ${common[@]+"${common[@]}"} "$@" | cut -d';' -f1; }
after() { echo --dependency="afterok:$1" --kill-on-invalid-dep=yes; }

quantize=$(submit ${quantize_args[@]+"${quantize_args[@]}"} "$here/quantize.sbatch" "$spec" "$@")
echo "$quantize"
# shellcheck disable=SC2046  # after's two words are meant to split
last=$(submit $(after "$quantize") ${retrain_args[@]+"${retrain_args[@]}"} "$here/retrain.sbatch" "$spec" "$@")
echo "$last"
if [[ $labelled == 1 ]]; then
  # shellcheck disable=SC2046
  last=$(submit $(after "$last") ${retrain_args[@]+"${retrain_args[@]}"} "$here/retrain.sbatch" "$spec" --labelled "$@")
  echo "$last"
fi
# shellcheck disable=SC2046
submit $(after "$last") ${report_args[@]+"${report_args[@]}"} "$here/report.sbatch" "$spec" "$@"
