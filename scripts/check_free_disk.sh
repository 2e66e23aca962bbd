#!/usr/bin/env bash
# Fails before a long install that would stop half-way with "No space left on device": a venv with torch's CUDA
# build and the ROS 2 wheels takes about 6.5 GB.
set -eu
venv="$1" need_gb="$2"
free_gb=$(df --output=avail -BG . | tail -1 | tr -dc 0-9)
if [ "$free_gb" -lt "$need_gb" ]; then
  echo "make setup: $venv needs about $need_gb GB of disk; $free_gb GB are free here ($(pwd))." >&2
  echo "  Free some space, or remove a venv you no longer use (each ROS 2 distribution has its own)." >&2
  exit 1
fi
