#!/bin/bash
# The runs of a sweep as one plain Slurm array, without the Python launcher: array task i runs line i+1
# of <sweep>/array_runs.txt, the run folders that `--no-submit` wrote for the current sweep file (or,
# without that file, the i-th run folder in the order of their ids).
#
#   python -m pipeline.sweep sweeps/optimizers.yaml --no-submit     # writes the run folders, prints N
#   sbatch --array=0-$((N-1))%8 sbatch/array.sh runs/optimizers
#
# Finished runs are skipped by the job itself (their metrics exist), so resubmitting the whole array
# after a failure or a time limit finishes exactly what is left.
#SBATCH --job-name=pipeline-array
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=8GB
#SBATCH --time=04:00:00
#SBATCH --output=pipeline-array_%A_%a.out
# Before the time limit Slurm sends SIGUSR2 to this script's process (python, through exec): the run
# saves a checkpoint at the next step and requeues itself; the requeued job resumes from it.
#SBATCH --signal=B:USR2@120
#SBATCH --requeue

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

# Cluster environment: edit for your site (kept as comments so the script runs anywhere as is).
# module purge; module load anaconda3/2024.02; conda activate pipeline

# The project's Python, found as sbatch/min_project.sh finds it (each script stands alone: Slurm runs a
# copy from its spool folder): PIPELINE_PYTHON, else the submit folder's .venv, the .venv of the
# repository this script was submitted from (scontrol's Command=), an activated conda environment,
# python3 on PATH, the first that can import the project.
usable() {
  [ -x "$1" ] && "$1" -c 'import importlib.util as u, omegaconf, pipeline.run; assert u.find_spec("torch")' \
    >/dev/null 2>&1
}
find_python() {
  if [ -n "${PIPELINE_PYTHON:-}" ]; then echo "${PIPELINE_PYTHON}"; return; fi
  local script repo="" c
  script=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' || true)
  [ -n "${script}" ] && repo=$(cd "$(dirname "${script}")/.." 2>/dev/null && pwd)
  for c in "${SLURM_SUBMIT_DIR:-.}/.venv/bin/python" "${repo:+${repo}/.venv/bin/python}" \
           "${CONDA_PREFIX:+${CONDA_PREFIX}/bin/python}" "$(command -v python3 || true)"; do
    if [ -n "${c}" ] && usable "${c}"; then echo "${c}"; return; fi
  done
}
python_bin=$(find_python)
if [ -z "${python_bin}" ]; then
  echo "array.sh: no Python with this project installed (tried ${SLURM_SUBMIT_DIR:-.}/.venv, the repository's .venv, \$CONDA_PREFIX, python3 on PATH): set PIPELINE_PYTHON=/path/to/env/bin/python or activate the environment before sbatch" >&2
  exit 2
fi
sweep_dir="${1:?usage: sbatch --array=0-N sbatch/array.sh <out>/<sweep>}"
index="${SLURM_ARRAY_TASK_ID:?submit with --array}"
if [ -f "${sweep_dir}/array_runs.txt" ]; then
  run_dir=$(sed -n "$((index + 1))p" "${sweep_dir}/array_runs.txt")
else
  run_dir=$(find "${sweep_dir}" -mindepth 2 -maxdepth 2 -name config.yaml -printf '%h\n' | LC_ALL=C sort \
            | sed -n "$((index + 1))p")
fi
if [ -z "${run_dir}" ]; then
  echo "array task ${index}: ${sweep_dir} has no run folder number ${index}" >&2
  exit 2
fi
echo "task ${SLURM_ARRAY_JOB_ID:-?}_${index} on $(hostname -s): ${run_dir}"
exec "${python_bin}" -m pipeline.run "${run_dir}"
