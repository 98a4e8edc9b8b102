# Shared by launch/slurm/*.sbatch (sourced from the repository root). Two modes:
#   bash launch/slurm/X.sbatch [overrides]   outside a job: derives the node count from the recipe's
#                                             world size, creates runs/slurm/ and submits itself
#   sbatch [--nodes=N] launch/slurm/X.sbatch  inside the job: checks nodes x GPUs = world size, launches
# sbatch opens --output before the script runs, so a log path under a missing directory loses the log:
# the self-submission creates runs/slurm/ first; a plain sbatch writes %x-%j.out in the submit dir.

# The recipe's world size: a parallel.world_size=N override, else the recipe's parallel.world_size
# field, else its '# world_size: N' comment; empty when none is stated.
recipe_world_size() {
  local recipe=$1 arg n
  shift
  for arg in "$@"; do
    case $arg in parallel.world_size=*) echo "${arg#parallel.world_size=}"; return ;; esac
  done
  # an indented `world_size: N` inside the parallel section (the only section with that key)
  n=$(sed -n -E 's/^[[:space:]]+world_size:[[:space:]]*([0-9]+).*/\1/p' "$recipe" | head -n 1)
  [[ -z $n ]] && n=$(sed -n -E 's/^#[[:space:]]*world_size:[[:space:]]*([0-9]+).*/\1/p' "$recipe" | head -n 1)
  echo "$n"
}

# Sets NODES and NPROC_PER_NODE for world size $1 with up to $2 GPUs per node; exits 2 if it cannot split.
split_world() {
  local world=$1 gpn=$2
  if (( world <= gpn )); then
    NODES=1 NPROC_PER_NODE=$world
  elif (( world % gpn == 0 )); then
    NODES=$(( world / gpn )) NPROC_PER_NODE=$gpn
  else
    echo "error: world size ${world} does not split into nodes of GPUS_PER_NODE=${gpn} GPUs" >&2
    exit 2
  fi
}

# Outside a job: submit this script with the derived --nodes and a log under runs/slurm/ (exec: never returns).
# Inside a job: check the allocation against the recipe and set NPROC_PER_NODE.
megagsm_slurm_prepare() {
  local script=$1 recipe=$2
  shift 2
  [[ -f $recipe ]] || { echo "error: RECIPE=${recipe}: no such file (submit from the repository root)" >&2; exit 2; }
  local world
  world=$(recipe_world_size "$recipe" "$@")
  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    if [[ -n ${NODES:-} ]]; then
      NPROC_PER_NODE=$GPUS_PER_NODE
    elif [[ -n $world ]]; then
      split_world "$world" "$GPUS_PER_NODE"
    else
      echo "error: ${recipe} states no world size (parallel.world_size or '# world_size: N'); set NODES" >&2
      exit 2
    fi
    mkdir -p runs/slurm
    exec sbatch --nodes="${NODES}" --gpus-per-node="${NPROC_PER_NODE}" --output="runs/slurm/%x-%j.out" \
      --export="ALL,RECIPE=${recipe},GPUS_PER_NODE=${NPROC_PER_NODE}" "$script" "$@"
  fi
  NPROC_PER_NODE=$GPUS_PER_NODE
  if [[ -n $world ]]; then
    if (( world < GPUS_PER_NODE && SLURM_NNODES == 1 )); then
      NPROC_PER_NODE=$world
    fi
    if (( SLURM_NNODES * NPROC_PER_NODE != world )); then
      local want
      want=$(( (world + GPUS_PER_NODE - 1) / GPUS_PER_NODE ))
      echo "error: ${recipe} needs ${world} GPUs but the job has ${SLURM_NNODES} nodes x ${NPROC_PER_NODE};" \
           "submit with sbatch --nodes=${want} (or: bash ${script})" >&2
      exit 2
    fi
  fi
}
