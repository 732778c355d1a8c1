"""nunchaku_core.hub against a stand-in Hugging Face Hub on loopback.

The stand-in speaks the part of the hub protocol that `hf_hub_download` uses, as huggingface.co does for an
LFS file: HEAD/GET `/{repo_id}/resolve/{revision}/{filename}` answers 302 to a content URL with X-Repo-Commit,
X-Linked-Etag and X-Linked-Size; errors carry X-Error-Code (EntryNotFound 404, RepoNotFound 401,
GatedRepo 403, RevisionNotFound 404), which is what huggingface_hub turns into its exception classes.

Each download runs in a fresh interpreter, like ComfyUI's process: huggingface_hub reads HF_HUB_OFFLINE and
HF_HOME at import, so changing them inside the test process would not test what users see.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PAYLOAD = os.urandom(3 * 2**20 + 17)  # a few chunks of huggingface_hub's 10 MB reads: one is enough, odd size
REPO, FILE, GATED = "mit-han-lab/nunchaku-test", "svdq-int4_r32-test.safetensors", "org/gated"


class StandInHub(BaseHTTPRequestHandler):
    requests: list = []  # replaced per server, see hub_server

    def log_message(self, *args):  # keep pytest output clean; requests are recorded instead
        return

    def _send(self, status, headers, body=b""):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "GET" and body:
            self.wfile.write(body)

    def _answer(self):
        self.server.requests.append((self.command, self.path))
        sha = hashlib.sha256(PAYLOAD).hexdigest()
        if self.path == f"/cdn/{sha}":
            return self._send(200, {"Content-Length": str(len(PAYLOAD)), "ETag": f'"{sha}"'}, PAYLOAD)
        repo, sep, rest = self.path.lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        if not sep:
            return self._send(404, {"Content-Length": "0"})
        if repo == GATED:
            return self._send(403, {"X-Error-Code": "GatedRepo", "Content-Length": "0"})
        if repo != REPO:
            return self._send(401, {"X-Error-Code": "RepoNotFound", "Content-Length": "0"})
        if revision not in ("main", COMMIT):
            return self._send(404, {"X-Error-Code": "RevisionNotFound", "Content-Length": "0"})
        if filename != FILE:
            return self._send(404, {"X-Error-Code": "EntryNotFound", "Content-Length": "0"})
        host = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self._send(302, {"Location": f"{host}/cdn/{sha}", "X-Repo-Commit": COMMIT,
                                "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(PAYLOAD)),
                                "ETag": '"small-pointer-etag"', "Content-Length": "0"})

    do_HEAD = do_GET = _answer


@pytest.fixture
def hub_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    srv.requests = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# hub.py is loaded by path: `import nunchaku_core` would import torch (3-4 s per interpreter here) for nothing.
DRIVER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("hub", sys.argv[2])
hub = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hub)
repo, filename, revision, dirs = json.loads(sys.argv[1])
seen = []
try:
    path = hub.download(repo, filename, revision, dirs, progress=lambda done, total: seen.append((done, total)))
    print(json.dumps({"path": path, "progress": seen}))
except hub.HubDownloadError as e:
    print(json.dumps({"error": str(e)}))
"""


def run_download(tmp_path, endpoint, repo=REPO, filename=FILE, revision="main", offline=False, dirs=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    dirs = dirs or [str(tmp_path / "models" / "diffusion_models")]
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([repo, filename, revision, dirs]),
                          str(REPO_ROOT / "nunchaku_core" / "hub.py")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def url_of(srv):
    return f"http://127.0.0.1:{srv.server_address[1]}"


def test_download_lands_in_models_folder_with_progress(tmp_path, hub_server):
    r = run_download(tmp_path, url_of(hub_server))
    target = tmp_path / "models" / "diffusion_models" / FILE
    assert r["path"] == str(target)
    assert target.read_bytes() == PAYLOAD
    assert r["progress"][0] == [0, len(PAYLOAD)] and r["progress"][-1] == [len(PAYLOAD)] * 2
    assert not list((tmp_path / "hf_home").rglob("*.safetensors")), "a second copy went to the HF cache"
    # A file already in place is used without asking the hub (it may have been put there by hand).
    n = len(hub_server.requests)
    assert run_download(tmp_path, url_of(hub_server))["path"] == str(target)
    assert len(hub_server.requests) == n


def test_pinned_commit_and_second_folder(tmp_path, hub_server):
    dirs = [str(tmp_path / "ro"), str(tmp_path / "rw")]
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    r = run_download(tmp_path, url_of(hub_server), revision=COMMIT, dirs=dirs)
    if os.access(dirs[0], os.W_OK):  # root ignores the mode bits
        assert r["path"] == str(tmp_path / "ro" / FILE)
    else:
        assert r["path"] == str(tmp_path / "rw" / FILE)
    assert ("HEAD", f"/{REPO}/resolve/{COMMIT}/{FILE}") in hub_server.requests


def test_missing_file_says_404_and_where_to_look(tmp_path, hub_server):
    r = run_download(tmp_path, url_of(hub_server), filename="nope.safetensors")
    msg = r["error"]
    assert "404" in msg and f"{url_of(hub_server)}/{REPO}/resolve/main/nope.safetensors" in msg
    assert f"{url_of(hub_server)}/{REPO}/tree/main" in msg


@pytest.mark.parametrize("repo,revision,expect", [
    ("org/absent", "main", "not found, or it is private"),
    (GATED, "main", "is gated"),
    (REPO, "v9", "has no revision 'v9'"),
])
def test_repo_revision_and_auth_errors(tmp_path, hub_server, repo, revision, expect):
    msg = run_download(tmp_path, url_of(hub_server), repo=repo, revision=revision)["error"]
    assert expect in msg, msg
    manual = tmp_path / "models" / "diffusion_models" / FILE
    assert f"{url_of(hub_server)}/{repo}/resolve/{revision}/{FILE}" in msg and str(manual) in msg


def test_server_down_names_url_and_manual_path(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    msg = run_download(tmp_path, endpoint)["error"]
    assert f"{endpoint}/{REPO}/resolve/main/{FILE}" in msg
    assert "Check the network or HF_ENDPOINT" in msg
    assert str(tmp_path / "models" / "diffusion_models" / FILE) in msg
    assert not (tmp_path / "models" / "diffusion_models" / FILE).exists()


def test_offline_mode_never_touches_the_network(tmp_path, hub_server):
    msg = run_download(tmp_path, url_of(hub_server), offline=True)["error"]
    assert "HF_HUB_OFFLINE" in msg and f"{url_of(hub_server)}/{REPO}/resolve/main/{FILE}" in msg
    assert hub_server.requests == []
    # ...and a file put in place by hand is what offline mode returns.
    target = tmp_path / "models" / "diffusion_models" / FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"by hand")
    assert run_download(tmp_path, url_of(hub_server), offline=True)["path"] == str(target)
    assert hub_server.requests == []


@pytest.mark.parametrize("bad", ["../escape.safetensors", "/etc/passwd", "a/../../b.safetensors", ""])
def test_filename_cannot_leave_the_models_folder(tmp_path, hub_server, bad):
    msg = run_download(tmp_path, url_of(hub_server), filename=bad)["error"]
    assert "expected a relative path" in msg
    assert hub_server.requests == []
