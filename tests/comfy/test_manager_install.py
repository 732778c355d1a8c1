"""ComfyUI-Manager installs this pack from a git URL into a real ComfyUI with no internet: it clones the pack,
pip-installs requirements.txt (everything already installed), runs install.py (which compiles the kernels), and after
the Manager's own restart the server lists our nodes.

Needs a ComfyUI that ships the Manager as a package (0.33: `main.py --enable-manager`, manager_requirements.txt
pins comfyui_manager 4.2.2, which scripts/setup_env.sh installs). A ComfyUI whose cli_args has no --enable-manager
(0.3.75) skips. 3 minutes on 2 cores shared with other jobs, most of it install.py compiling.

What the Manager needs, read from its source (comfyui_manager 4.2.2 and 4.3 behave the same here):
* Installing from a git URL is only in the legacy UI's API, POST /v2/customnode/install/git_url with the URL as
  the body (`--enable-manager-legacy-ui`, which implies --enable-manager). The new UI's queue
  (POST /v2/manager/queue/task, kind "install") only installs packs listed in the channel's custom-node-list.json;
  a URL fails with "Node '<url>@unknown' not found in [default, cache]".
* That endpoint wants `allow_git_url_install = true` in <user dir>/__manager/config.ini and a loopback --listen;
  security_level is not consulted. The reboot endpoint wants security_level normal or lower (the default, normal).
* The URL must have a scheme and a host (manager_core.is_valid_url), so file:///x.git is refused;
  file://localhost/x.git is accepted by both the Manager and git. The folder it installs into is the URL's basename
  without .git, hence the bare repository's name.
* The install runs inside the request: the POST answers when git clone, one `pip install <line>` per
  requirements.txt line and `python install.py` are done. A failing pip line or install.py only prints
  "install script failed" and the install still reports success, so this test checks the log and the packages.
* The reboot endpoint os.execv()s the same command line: same pid, same log file, so this test's Popen follows it.

No internet: config.ini `network_mode = offline` (no channel or registry fetches), PIP_NO_INDEX=1 for the pip it
runs (requirements must resolve from installed packages; torch is never reinstalled), GIT_ALLOW_PROTOCOL=file (the
clone is local). The server runs with --base-directory <tmp>, so custom_nodes/, user/ and models/ are fresh and the
ComfyUI tree is not written; the pack comes from this checkout's committed HEAD (a bare clone), as CI's fresh clone
of main would give it.
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import COMFYUI, PACK_NAME, REPO, START_TIMEOUT, ComfyClient, _free_port

INSTALL_TIMEOUT = 900  # clone + pip no-ops + install.py: 100 s on 2 idle cores, 130-165 s loaded; mostly compiling
CONFIG_INI = """[default]
network_mode = offline
allow_git_url_install = true
"""
# what the Manager logs when it tried the network anyway (cnr_utils, manager_core.get_data_by_mode,
# manager_server.default_cache_update)
NETWORK_TRIES = ("Cannot connect to comfyregistry", "Due to a network error", "Failed to perform initial fetching")


def _manager_unsupported_reason() -> str | None:
    cli_args = COMFYUI / "comfy" / "cli_args.py"
    if not cli_args.is_file():
        pytest.fail(f"no ComfyUI at {COMFYUI}: run scripts/setup_env.sh or set SVDQ_COMFYUI")
    if '"--enable-manager"' not in cli_args.read_text():
        return f"ComfyUI at {COMFYUI} has no --enable-manager"
    return None


def _post(url: str, body: bytes, content_type: str, timeout: float) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _node_names(pack: Path) -> set[str]:
    """The keys of every NODE_CLASS_MAPPINGS dict literal in pack/nodes/*.py, read without importing them."""
    names = set()
    for path in sorted((pack / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                    and any(isinstance(t, ast.Name) and t.id == "NODE_CLASS_MAPPINGS" for t in node.targets)):
                names.update(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return names


def _installed_packages() -> dict[str, str]:
    return {d.metadata["Name"].lower(): d.version for d in importlib.metadata.distributions()}


def _wait_up(client: ComfyClient, what: str) -> None:
    t0 = time.time()
    while not client.alive():
        if client.proc.poll() is not None or time.time() - t0 > START_TIMEOUT:
            pytest.fail(f"ComfyUI did not come up {what} (exit {client.proc.poll()}); log tail:\n"
                        f"{client.log()[-4000:]}")
        time.sleep(0.5)


def _import_line(log: str, pack: Path) -> str:
    """The line for `pack` in ComfyUI's "Import times for custom nodes:" block of `log`."""
    block = log.split("Import times for custom nodes:")
    assert len(block) > 1, f"no custom-node import block in the log:\n{log[-4000:]}"
    lines = [ln for ln in block[-1].splitlines() if str(pack) in ln]
    assert lines, f"{pack} is not in the custom-node import block:\n{block[-1][:2000]}"
    return lines[0]


def test_manager_installs_the_pack_from_a_git_url_offline(tmp_path):
    why = _manager_unsupported_reason()
    if why is not None:
        pytest.skip(why)
    if importlib.util.find_spec("comfyui_manager") is None:
        pytest.fail(f"{COMFYUI} supports --enable-manager but {sys.executable} has no comfyui_manager: run "
                    f"scripts/setup_env.sh, or pip install -r {COMFYUI / 'manager_requirements.txt'} with the venv's "
                    f"constraints file")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    bare = tmp_path / f"{PACK_NAME}.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(REPO), str(bare)], check=True)
    git_url = f"file://localhost{bare}"

    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "user" / "__manager").mkdir(parents=True)
    (base / "user" / "__manager" / "config.ini").write_text(CONFIG_INI)
    pack = base / "custom_nodes" / PACK_NAME
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", GIT_ALLOW_PROTOCOL="file")
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--disable-api-nodes", "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
           "--enable-manager-legacy-ui"]
    log_path = tmp_path / "comfyui.log"
    packages_before = _installed_packages()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=COMFYUI, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    client = ComfyClient(url, log_path, proc)
    try:
        _wait_up(client, "with the Manager")
        assert "Legacy UI is enabled" in client.log(), client.log()[-4000:]
        assert "SVDQuantFluxLoader" not in client._call("/object_info")  # the nodes come from the install only

        t0 = time.time()
        status = _post(url + "/v2/customnode/install/git_url", git_url.encode(), "text/plain", INSTALL_TIMEOUT)
        install_log = client.log()
        assert status == 200, f"install from {git_url}: HTTP {status}; log tail:\n{install_log[-5000:]}"
        print(f"\nManager install: {time.time() - t0:.0f} s")
        assert "Installation was successful." in install_log, install_log[-5000:]
        cloned = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pack, capture_output=True, text=True, check=True)
        assert cloned.stdout.strip() == head

        # requirements.txt: one `pip install <line>` each, all already satisfied, nothing (torch least) reinstalled
        assert "install script failed" not in install_log, install_log[-5000:]
        assert _installed_packages() == packages_before
        # install.py ran with ComfyUI's python and built the kernels in the installed copy (its own lines: the
        # Manager's are printed through rich, which wraps them at 80 columns)
        assert f"SVDQuant: building the compiled kernels with {sys.executable}" in install_log, install_log[-5000:]
        built = list((pack / "nunchaku_core").glob("_C*.so"))
        assert len(built) == 1, install_log[-5000:]
        assert f"SVDQuant: compiled kernels ready: {built[0]}" in install_log, install_log[-5000:]

        # the Manager's restart: the same process re-executes main.py with the same arguments
        restart_from = len(install_log)
        try:
            _post(url + "/v2/manager/reboot", b"", "application/json", 30)
        except OSError:
            pass  # os.execv drops the connection without an answer (RemoteDisconnected)
        t0 = time.time()
        while "Restarting..." not in client.log()[restart_from:]:
            assert proc.poll() is None and time.time() - t0 < 30, f"no restart; log tail:\n{client.log()[-3000:]}"
            time.sleep(0.2)
        _wait_up(client, "after the Manager's restart")
        restarted = client.log()[restart_from:]
        line = _import_line(restarted, pack)
        assert "IMPORT FAILED" not in line, f"{line}\n{restarted[-5000:]}"

        info = client._call("/object_info")
        expected = _node_names(pack)
        assert "SVDQuantFluxLoader" in expected
        missing = expected - set(info)
        assert not missing, f"the restarted server does not list {sorted(missing)}; log tail:\n{restarted[-4000:]}"
        assert {info[n]["python_module"] for n in expected} == {f"custom_nodes.{PACK_NAME}"}

        tried = [m for m in NETWORK_TRIES if m in client.log()]
        assert not tried, f"the Manager tried the network: {tried}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"ComfyUI log: {log_path}")
