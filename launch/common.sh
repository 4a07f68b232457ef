# Shared by the launchers: KEY=VALUE overrides in, one `glp` command out.
# DRY_RUN=1 prints the exact commands instead of running them.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
if [[ -z "${GLP:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/glp" ]]; then GLP="$REPO/.venv/bin/glp"; else GLP="glp"; fi
fi
RUN_ROOT="${RUN_ROOT:-runs}"          # local path or bucket URL (gs://, s3://)
DATA_ROOT="${DATA_ROOT:-data}"
export GLP_RUN_ROOT="$RUN_ROOT" GLP_DATA_ROOT="$DATA_ROOT"

# run CMD...: print (DRY_RUN=1) or execute, quoting each word so the line can be pasted.
run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

# train_args: config=..., output_path, and every extra KEY=VALUE given as OVERRIDES="k=v ..."
train_args() {
  local run_name="$1"
  local args=("config=${CONFIG:?set CONFIG=experiments/....yaml}" "output_path=${RUN_ROOT}/${run_name}")
  # shellcheck disable=SC2206
  local extra=(${OVERRIDES:-})
  printf '%s\n' "${args[@]}" "${extra[@]}"
}

# Preemption: `glp train` exits 75 (EX_TEMPFAIL) after a SIGTERM/SIGINT once its checkpoint
# is written; rerunning the same command resumes. run_retrying CMD... reruns CMD while it
# exits 75, at most MAX_RETRIES times (RETRY_DELAY_S between tries). A Ctrl-C at this
# script stops the loop: only a signal the command alone received (a preemption) reruns it.
PREEMPTED_EXIT=75
run_retrying() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then run "$@"; return; fi
  local tries=0 status interrupted=0
  trap 'interrupted=1' INT TERM
  while true; do
    set +e; "$@"; status=$?; set -e
    if [[ $status -ne $PREEMPTED_EXIT || $interrupted -eq 1 ]]; then break; fi
    if (( tries >= ${MAX_RETRIES:-10} )); then
      echo "launch: still preempted after ${tries} reruns (MAX_RETRIES); rerun this script to resume" >&2
      break
    fi
    tries=$((tries + 1))
    echo "launch: preempted (exit $status); rerun ${tries}/${MAX_RETRIES:-10} resumes from the checkpoint" >&2
    sleep "${RETRY_DELAY_S:-5}"
  done
  trap - INT TERM
  return "$status"
}
