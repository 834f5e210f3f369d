#!/bin/bash
# One run, plain Slurm, no Python launcher: the shape of a typical course-project job script.
#
#   sbatch sbatch/min_project.sh                                   # configs/base.yaml as it is
#   sbatch sbatch/min_project.sh configs/base.yaml optim.name=adam train.epochs=50
#
# Results go to $PIPELINE_OUT/<run id>/ (default runs/min_project/); the same command again resumes the
# run from its last checkpoint. Environment: PIPELINE_PYTHON (the Python that has this project
# installed; default: the first of $SLURM_SUBMIT_DIR/.venv, the .venv of the repository this script was
# submitted from, an activated conda environment, python3 on PATH, that can import the project),
# PIPELINE_DATA (the data folder, read by configs/base.yaml).
#SBATCH --job-name=min_project
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=8GB
#SBATCH --partition=rtx8000
#SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
#SBATCH --output=min_project_%j.out
# Before the time limit Slurm sends SIGUSR2 to this script's process (python, through exec): the run
# saves a checkpoint at the next step and requeues itself; the requeued job resumes from it.
#SBATCH --signal=B:USR2@120
#SBATCH --requeue

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

# Cluster environment: edit for your site (kept as comments so the script runs anywhere as is).
# module purge; module load anaconda3/2024.02; conda activate pipeline

# The project's Python. Slurm runs a copy of this script from its spool folder, so the repository is
# found through the path sbatch was given (scontrol's Command=), not through $0.
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
  echo "min_project.sh: no Python with this project installed (tried ${SLURM_SUBMIT_DIR:-.}/.venv, the repository's .venv, \$CONDA_PREFIX, python3 on PATH): set PIPELINE_PYTHON=/path/to/env/bin/python or activate the environment before sbatch" >&2
  exit 2
fi
config="${1:-configs/base.yaml}"
[ $# -gt 0 ] && shift
echo "job ${SLURM_JOB_ID:-?} on $(hostname -s): ${config} $*"
exec "${python_bin}" -m pipeline.run "${config}" "$@" --out "${PIPELINE_OUT:-runs/min_project}"
