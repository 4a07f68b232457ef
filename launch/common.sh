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
