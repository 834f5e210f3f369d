#!/bin/bash

# Parameters
#SBATCH --account=pr_123_general
#SBATCH --array=0-4%5
#SBATCH --comment=pipeline-submit:{token0}
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:rtx8000:1
#SBATCH --job-name=pipeline-optimizers
#SBATCH --mem=32GB
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output={sweep}/logs/%A_%a/%A_%a_0_log.out
#SBATCH --partition=rtx8000
#SBATCH --signal=USR2@120
#SBATCH --time=720
#SBATCH --wckey=submitit

# setup
module purge
module load anaconda3/2024.02
source "$(conda info --base)/etc/profile.d/conda.sh"
conda activate pipeline

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output {sweep}/logs/%A_%a/%A_%a_%t_log.out {python} -u -m submitit.core._submit {sweep}/logs/%j
