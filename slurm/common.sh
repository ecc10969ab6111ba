# Sourced by the sbatch scripts. They run in the directory they were submitted from, which must be
# the project root, with the Python environment that has splitwiser active at submission (sbatch
# passes the environment on). SPLITWISER_PYTHON picks another interpreter, SPLITWISER_OUTPUTS
# another parent directory for the outputs (default: outputs). Nothing here needs a GPU: on a CPU
# partition (sbatch --gres=none --partition=cpu ...) the job runs on the CPU, and mps=auto starts no daemon.
set -euo pipefail
PYTHON=${SPLITWISER_PYTHON:-python}
OUTPUTS=${SPLITWISER_OUTPUTS:-outputs}

# run_resumable CMD...: runs CMD and returns its status. USR1 (sent by `--signal=B:USR1@120` two
# minutes before the time limit) stops CMD, whose finished rows are on disk, and requeues this job:
# it starts again with the same job id, so the same output dir, and resumes. TERM (scancel, a
# preempted node) stops CMD the same way; `--requeue` lets SLURM requeue a preempted job.
run_resumable() {
  local child status=0 requeue=0
  "$@" &
  child=$!
  trap 'requeue=1; kill -TERM "$child" 2>/dev/null || true' USR1
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM
  # a trapped signal interrupts `wait`; wait again until CMD has really exited
  while :; do
    wait "$child" && status=0 || status=$?
    kill -0 "$child" 2>/dev/null || break
  done
  trap - USR1 TERM
  if [ "$requeue" = 1 ]; then
    echo "splitwiser: the time limit is near; requeueing job $SLURM_JOB_ID, which will resume" >&2
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}

# has_override NAME ARGS...: whether the Hydra overrides set NAME (e.g. output.dir)
has_override() {
  local name=$1 arg
  shift
  for arg in "$@"; do [[ "$arg" == "$name="* || "$arg" == "+$name="* ]] && return 0; done
  return 1
}
