#!/usr/bin/env bash
# slurm/submit-array.sh TASKS [Hydra overrides]: TASKS array tasks over the dataset, then a merge job
# that runs when every task has succeeded. Extra sbatch options for the tasks: SPLITWISER_SBATCH.
#   slurm/submit-array.sh 8 data.path=/data/reports.parquet procs=4
# On a CPU partition (the command line's --gres=none replaces array.sbatch's --gres=gpu:1):
#   SPLITWISER_SBATCH="--gres=none --partition=cpu --cpus-per-task=16" slurm/submit-array.sh 8 model.device=cpu ...
set -euo pipefail
tasks=${1:?usage: slurm/submit-array.sh TASKS [Hydra overrides]}
shift
read -r -a extra <<<"${SPLITWISER_SBATCH:-}"
array=$(sbatch --parsable --array=0-$((tasks - 1)) "${extra[@]}" slurm/array.sbatch "$@")
array=${array%%;*}  # --parsable prints "id" or "id;cluster"
root=${SPLITWISER_OUTPUTS:-outputs}/array-$array
merge=$(sbatch --parsable --dependency=afterok:"$array" slurm/merge.sbatch "$root")
echo "array job $array ($tasks tasks) and merge job ${merge%%;*}: results in $root"
