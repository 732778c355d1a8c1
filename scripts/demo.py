"""End-to-end demo: quantize a FLUX-width model with our quantizer, render it in a real ComfyUI through its
HTTP API with the SVDQuant FLUX Loader, render the same graph with ComfyUI's own UNETLoader on the original
file, and compare load time, sampling time and the server's peak memory.

    bash scripts/setup_env.sh && .venv/bin/python scripts/demo.py [--comfyui PATH] [--size 256] [--steps 4]

No real checkpoint can be downloaded here, so the model is random (tests/flux_models.py): FLUX.1-dev's width
(hidden 3072, which ComfyUI's stock loader requires) with one double and one single block, text-encoder
widths cut to 64/32, and random conditioning instead of CLIP-L/T5-XXL, which cannot be made small (the test
node tests/comfy/tiny_flux_test). The picture is noise; the numbers are real. Everything lands in --work (default <repo>/out/demo); ComfyUI's own folders are only
read: models, outputs and the pack's link go through --extra-model-paths-config.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
import flux_models  # noqa: E402  (random FLUX / TAEF1 writers shared with the tests)

PACK_NAME = "ComfyUI-SVDQuant"
TEST_NODE = ("svdq_tiny_flux_test", REPO / "tests" / "comfy" / "tiny_flux_test")

GB = 2**30
MB = 2**20


def argument_parser(description: str, work: str) -> argparse.ArgumentParser:
    """The options the demo and the end-to-end benchmarks share: --comfyui, --work (default out/<work>), --size."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("SVDQ_COMFYUI", str(REPO / ".comfyui" / "ComfyUI")),
                    help="ComfyUI folder (default $SVDQ_COMFYUI or <repo>/.comfyui/ComfyUI)")
    ap.add_argument("--work", default=str(REPO / "out" / work), help="models, images and logs go here")
    ap.add_argument("--size", type=int, default=256, help="image width and height")
    return ap


def parse_args():
    ap = argument_parser(__doc__, "demo")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--rank", type=int, default=32, help="low-rank branch rank R for the quantizer")
    ap.add_argument("--port", type=int, default=0, help="server port on 127.0.0.1 (default: a free one)")
    return ap.parse_args()


# --- models -------------------------------------------------------------------------------------------------

def make_models(models: Path, rank: int) -> tuple[Path, Path]:
    """The random original (bf16) and our INT4 quantization of it; both reused when already there."""
    original = models / "diffusion_models" / "demo_flux_original.safetensors"
    quantized = models / "diffusion_models" / f"demo_flux_svdq-int4_r{rank}.safetensors"
    if not original.exists():
        t = time.monotonic()
        original.parent.mkdir(parents=True, exist_ok=True)
        flux_models.write_flux_bfl(original)
        print(f"wrote {original} ({original.stat().st_size / MB:.0f} MB, {time.monotonic() - t:.1f} s)")
    if not (models / "vae_approx" / "taef1_decoder.safetensors").exists():
        flux_models.write_taef1(models / "vae_approx")
    if not quantized.exists() or quantized.stat().st_mtime < original.stat().st_mtime:
        t = time.monotonic()
        cmd = [sys.executable, "-m", "nunchaku_core", "quantize", str(original), str(quantized),
               "--precision", "int4", "--rank", str(rank), "--no-report", "--quiet"]
        print("quantizing:", " ".join(cmd[1:]))
        subprocess.run(cmd, cwd=REPO, check=True)
        print(f"wrote {quantized} ({quantized.stat().st_size / MB:.0f} MB, {time.monotonic() - t:.1f} s)")
    return original, quantized


# --- server -------------------------------------------------------------------------------------------------

def installed_pack_name(comfy: Path) -> str | None:
    """The folder name under which ComfyUI's own custom_nodes has this repository, if it has it."""
    d = comfy / "custom_nodes"
    return next((p.name for p in d.iterdir() if p.resolve() == REPO), None) if d.is_dir() else None


def write_extra_paths(work: Path, comfy: Path) -> Path:
    """Models and test nodes from the work folder; the pack too unless ComfyUI already has it (twice would
    register every node twice)."""
    nodes = work / "custom_nodes"
    shutil.rmtree(nodes, ignore_errors=True)
    nodes.mkdir(parents=True)
    (nodes / TEST_NODE[0]).symlink_to(TEST_NODE[1])
    if installed_pack_name(comfy) is None:
        (nodes / PACK_NAME).symlink_to(REPO)
    cfg = work / "extra_model_paths.yaml"
    cfg.write_text(f"svdq_demo:\n  base_path: {work}\n  diffusion_models: models/diffusion_models\n"
                   f"  vae_approx: models/vae_approx\n  loras: models/loras\n  custom_nodes: custom_nodes\n")
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ComfyUI process on loopback, with its resident memory sampled every 20 ms: `peaks[node]` is the
    highest RSS seen while `node` (set by whoever follows the execution) was running."""

    def __init__(self, comfy: Path, work: Path, port: int):
        import torch  # only to choose --cpu; ComfyUI imports it anyway

        self.url = f"http://127.0.0.1:{port}"
        self.log_path = work / f"server-{port}.log"
        args = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
                "--disable-api-nodes", "--extra-model-paths-config", str(write_extra_paths(work, comfy)),
                "--output-directory", str(work / "output"), "--user-directory", str(work / "user"),
                # only this pack and the test node: other packs in a user's ComfyUI would skew the numbers
                "--disable-all-custom-nodes", "--whitelist-custom-nodes",
                installed_pack_name(comfy) or PACK_NAME, TEST_NODE[0]]
        if not torch.cuda.is_available():
            args.append("--cpu")
        (work / "user").mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=comfy, stdout=self.log, stderr=subprocess.STDOUT)
        self.node: str | None = None
        self.peaks: dict[str | None, int] = {}
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        import psutil

        p = psutil.Process(self.proc.pid)
        while not self._stop.wait(0.02):
            try:
                rss, node = p.memory_info().rss, self.node
                self.peaks[node] = max(self.peaks.get(node, 0), rss)
            except psutil.NoSuchProcess:
                return

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def __enter__(self):
        import urllib.request

        t = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; see {self.log_path}")
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=2).read()
                break
            except OSError:
                if time.monotonic() - t > 180:
                    raise RuntimeError(f"ComfyUI did not answer in 180 s; see {self.log_path}")
                time.sleep(0.3)
        self._sampler.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def run_graph(url: str, graph: dict, on_node=lambda node: None) -> tuple[dict, dict]:
    """Queue `graph` (API format), follow it on the websocket; returns ({node id: seconds}, history entry).
    A node's time runs from its `executing` message to the next one; on_node(id) is called at each."""
    import aiohttp

    client_id = uuid.uuid4().hex
    times: dict[str, float] = {}
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
            async with s.post(f"{url}/prompt", json={"prompt": graph, "client_id": client_id}) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"/prompt refused the graph: {json.dumps(body, indent=1)}")
            prompt_id = body["prompt_id"]
            current, started = None, 0.0
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue  # binary frames are sampler previews
                m = json.loads(msg.data)
                data = m.get("data", {})
                if data.get("prompt_id") != prompt_id:
                    continue
                if m["type"] == "execution_error":
                    raise RuntimeError(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                                       f"{data.get('exception_message')}\n{''.join(data.get('traceback', []))}")
                if m["type"] == "executing":
                    now = time.monotonic()
                    if current is not None:
                        times[current] = now - started
                    current, started = data["node"], now
                    on_node(current)
                    if current is None:
                        break
        async with s.get(f"{url}/history/{prompt_id}") as r:
            history = (await r.json())[prompt_id]
    return times, history


def graph(loader: dict, size: int, steps: int, seed: int, prefix: str) -> dict:
    """text-to-image as in example_workflows/, with random conditioning in place of the text encoders."""
    return {
        "1": loader,
        "2": {"class_type": "TinyFluxConditioning", "inputs": {"model": ["1", 0], "tokens": 8, "guidance": 3.5,
                                                               "seed": seed}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0], "seed": seed,
            "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "taef1"}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def render(comfy: Path, work: Path, port: int, g: dict) -> dict:
    """A fresh server per model, so neither run inherits the other's memory or caches."""
    with Server(comfy, work, port or free_port()) as srv:
        idle = srv.rss()
        t = time.monotonic()
        times, history = asyncio.run(run_graph(srv.url, g, on_node=lambda node: setattr(srv, "node", node)))
        total = time.monotonic() - t
        image = history["outputs"]["7"]["images"][0]
        return {"load": times.get("1", 0.0), "sample": times.get("4", 0.0), "total": total,
                "idle": idle, "peak_load": srv.peaks.get("1", 0), "peak_sample": srv.peaks.get("4", 0),
                "peak": max(srv.peaks.values()), "png": work / "output" / image["subfolder"] / image["filename"]}


def main():
    a = parse_args()
    comfy, work = Path(a.comfyui).resolve(), Path(a.work).resolve()
    if not (comfy / "main.py").is_file():
        sys.exit(f"{comfy}: no ComfyUI here (main.py missing); run scripts/setup_env.sh or pass --comfyui PATH")
    models = work / "models"
    original, quantized = make_models(models, a.rank)

    runs = {}
    for label, loader, path in (
        (f"SVDQuant int4 r{a.rank}", {"class_type": "SVDQuantFluxLoader",
                                      "inputs": {"model_name": quantized.name, "weight_dtype": "default"}}, quantized),
        ("original bf16", {"class_type": "UNETLoader",
                           "inputs": {"unet_name": original.name, "weight_dtype": "default"}}, original),
    ):
        print(f"rendering {label} ({a.size}x{a.size}, {a.steps} steps) ...", flush=True)
        r = render(comfy, work, a.port, graph(loader, a.size, a.steps, a.seed, label.split()[0].lower()))
        runs[label] = r | {"file": path.stat().st_size}

    print()
    print(f"FLUX-width random model (hidden 3072, 1 double + 1 single block), {a.size}x{a.size}, {a.steps} "
          f"euler steps, ComfyUI at {comfy}")
    print(f"{'':<20} {'file':>9} {'time: load':>11} {'sampling':>9} {'graph':>8}   "
          f"{'RSS: idle':>9} {'load':>8} {'sampling':>8} {'peak':>8}")
    for label, r in runs.items():
        print(f"{label:<20} {r['file'] / MB:>6.0f} MB {r['load']:>9.2f} s {r['sample']:>7.2f} s {r['total']:>6.2f} s   "
              + " ".join(f"{r[k] / GB:>6.2f} GB" for k in ("idle", "peak_load", "peak_sample", "peak")))
    print()
    print("time: load = the loader node, sampling = the KSampler node (model to device + steps), graph = the prompt.")
    print("RSS = resident memory of the ComfyUI server process, sampled every 20 ms; idle = before the prompt,")
    print("load / sampling = highest while that node ran, peak = highest over the prompt. A fresh server per model.")
    for label, r in runs.items():
        print(f"{label}: {r['png']}")
    print(f"same seed and conditioning, quantized vs original image: PSNR {psnr(*(r['png'] for r in runs.values())):.1f} dB")


def psnr(a: Path, b: Path) -> float:
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (a, b))
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


if __name__ == "__main__":
    main()
