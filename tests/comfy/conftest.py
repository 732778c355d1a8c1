"""A real ComfyUI server for end-to-end tests, one per session, on loopback.

ComfyUI comes from $SVDQ_COMFYUI (default <repo>/.comfyui/ComfyUI) and runs with the python running pytest.
This repository is installed as the custom node `custom_nodes/ComfyUI-SVDQuant` (a symlink, created if
missing) next to the test-only conditioning node `tests/comfy/tiny_flux_test`; other custom nodes in that
ComfyUI are not loaded (--disable-all-custom-nodes + whitelist). Models live in a per-session temp dir
(--extra-model-paths-config, folders MODEL_DIRS); outputs, user data and the database too, so the ComfyUI tree is untouched
apart from the symlinks, which are removed at the end if this session created them.

Fixtures: `comfy` (the client: run(graph), images(history), log(), alive(), free()), `comfy_models` (the
models dir; tests write files into models/diffusion_models while the server runs: ComfyUI rescans a
folder when its mtime changes). `comfy_server(models, work, extra_args)` starts a further server the same way
(the web UI tests serve a second frontend with --front-end-root).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))   # flux_models, shared with tests/test_ops_unit.py

COMFYUI = Path(os.environ.get("SVDQ_COMFYUI", REPO / ".comfyui" / "ComfyUI"))
PACK_NAME = "ComfyUI-SVDQuant"
TEST_NODE_NAME = "svdq_tiny_flux_test"
START_TIMEOUT = 180.0
# models/ folders the server sees in the per-session dir (the pack's nodes read diffusion_models,
# text_encoders, loras, svdquant_calibration; the graphs use vae_approx for TAEF1)
MODEL_DIRS = ("diffusion_models", "vae_approx", "vae", "text_encoders", "clip", "loras", "svdquant_calibration")


class ComfyClient:
    def __init__(self, url: str, log_path: Path, proc: subprocess.Popen):
        self.url, self.log_path, self.proc = url, log_path, proc

    def _call(self, path: str, data=None, timeout=60):
        req = urllib.request.Request(self.url + path, data=None if data is None else json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return body if path.startswith("/view") else (json.loads(body) if body else None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            self._call("/system_stats", timeout=10)
            return True
        except (urllib.error.URLError, OSError):
            return False

    def queue(self, graph: dict) -> str:
        """POST /prompt; a validation failure (HTTP 400) raises AssertionError with ComfyUI's node_errors."""
        try:
            return self._call("/prompt", {"prompt": graph, "client_id": str(uuid.uuid4())})["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST /prompt -> HTTP {e.code}: {e.read().decode()[:3000]}") from e

    def wait(self, prompt_id: str, timeout: float) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            h = self._call(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                return h[prompt_id]
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited with {self.proc.returncode}; log tail:\n{self.log()[-3000:]}")
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout:.0f} s; log tail:\n{self.log()[-3000:]}")

    def run(self, graph: dict, timeout: float = 600) -> dict:
        """Queue a graph, wait, return its history entry (status_str 'success' or 'error')."""
        return self.wait(self.queue(graph), timeout)

    @staticmethod
    def error(entry: dict) -> dict | None:
        """The execution_error message of a failed run (exception_message, exception_type, node_type...)."""
        for kind, body in entry.get("status", {}).get("messages", []):
            if kind == "execution_error":
                return body
        return None

    def images(self, entry: dict):
        """The run's output images as uint8 numpy arrays [H, W, 3]."""
        import numpy as np
        from PIL import Image
        out = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                q = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img["subfolder"],
                                            "type": img["type"]})
                out.append(np.asarray(Image.open(io.BytesIO(self._call("/view?" + q))).convert("RGB")))
        return out

    def free(self) -> None:
        """Unload models (ComfyUI keeps them cached; two FLUX-width models would hold ~4 GB each)."""
        self._call("/free", {"unload_models": True, "free_memory": True})


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link(link: Path, target: Path) -> bool:
    """Make `link` point at `target`; True if this call created it."""
    if link.is_symlink() or link.exists():
        if link.resolve() != target.resolve():
            pytest.fail(f"{link} exists and is not a link to {target}; remove it or point SVDQ_COMFYUI elsewhere")
        return False
    link.symlink_to(target, target_is_directory=True)
    return True


@pytest.fixture(scope="session")
def comfy_models(tmp_path_factory) -> Path:
    """<tmp>/models with the MODEL_DIRS folders; TAEF1 written to vae_approx/."""
    import flux_models
    root = tmp_path_factory.mktemp("comfy_models")
    for d in MODEL_DIRS:
        (root / d).mkdir()
    flux_models.write_taef1(root / "vae_approx")
    return root


@contextlib.contextmanager
def comfy_server(models: Path, work: Path, extra_args: tuple[str, ...] = ()) -> Iterator[ComfyClient]:
    """A ComfyUI server on a free loopback port, models from `models`, its output, user data and log in
    `work`, started with `extra_args` added (e.g. --front-end-root); stopped when the block ends."""
    if not (COMFYUI / "main.py").is_file():
        pytest.fail(f"no ComfyUI at {COMFYUI}: run scripts/setup_env.sh (or set SVDQ_COMFYUI to a ComfyUI checkout whose requirements are "
                    f"installed in {sys.executable})")
    for d in ("output", "temp", "input", "user"):
        (work / d).mkdir()
    paths_yaml = work / "extra_model_paths.yaml"
    paths_yaml.write_text(f"svdquant_tests:\n    base_path: {models}\n"
                          + "".join(f"    {d}: {d}\n" for d in MODEL_DIRS))
    custom = COMFYUI / "custom_nodes"
    created = [link for link, target in ((custom / PACK_NAME, REPO),
                                         (custom / TEST_NODE_NAME, Path(__file__).parent / "tiny_flux_test"))
               if _link(link, target)]
    port = _free_port()
    log_path = work / "comfyui.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--disable-api-nodes", "--extra-model-paths-config", str(paths_yaml),
           "--output-directory", str(work / "output"), "--temp-directory", str(work / "temp"),
           "--input-directory", str(work / "input"), "--user-directory", str(work / "user"),
           "--database-url", "sqlite:///:memory:",
           "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_NAME, TEST_NODE_NAME, *extra_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    client = ComfyClient(f"http://127.0.0.1:{port}", log_path, proc)
    try:
        t0 = time.time()
        while not client.alive():
            if proc.poll() is not None or time.time() - t0 > START_TIMEOUT:
                pytest.fail(f"ComfyUI did not start (exit {proc.poll()}); log tail:\n{client.log()[-4000:]}")
            time.sleep(0.5)
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for link in created:
            link.unlink()
        print(f"\nComfyUI log: {log_path}")


@pytest.fixture(scope="session")
def comfy(comfy_models, tmp_path_factory):
    with comfy_server(comfy_models, tmp_path_factory.mktemp("comfy_run")) as client:
        yield client
