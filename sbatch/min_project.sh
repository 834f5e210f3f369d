#!/bin/bash
# One run, plain Slurm, no Python launcher: the shape of a typical course-project job script.
#
#   sbatch sbatch/min_project.sh                                   # configs/base.yaml as it is
#   sbatch sbatch/min_project.sh configs/base.yaml optim.name=adam train.epochs=50
#
# Results go to $PIPELINE_OUT/<run id>/ (default runs/min_project/); the same command again resumes the
# run from its last checkpoint. Environment: PIPELINE_PYTHON (default: python on PATH after the module
# and conda lines below), PIPELINE_DATA (the data folder, read by configs/base.yaml).
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

python_bin="${PIPELINE_PYTHON:-python}"
config="${1:-configs/base.yaml}"
[ $# -gt 0 ] && shift
echo "job ${SLURM_JOB_ID:-?} on $(hostname -s): ${config} $*"
exec "${python_bin}" -m pipeline.run "${config}" "$@" --out "${PIPELINE_OUT:-runs/min_project}"
