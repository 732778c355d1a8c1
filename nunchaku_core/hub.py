"""Fetch one checkpoint file from the Hugging Face Hub into a models folder, with errors that say what to do.

The download itself is `huggingface_hub.hf_hub_download(local_dir=...)`, so the file lands directly in the
folder ComfyUI lists (no second copy in the HF cache). Everything that can go wrong (offline, no route to the
hub, missing repo / revision / file, gated or private repo) becomes a `HubDownloadError` whose message names
the exact URL and the folder to put the file in by hand.

Environment, read at call time (huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at its import, so
a process that changes them later would otherwise be ignored): HF_ENDPOINT (a mirror), HF_HUB_OFFLINE=1,
HF_TOKEN (gated / private repos).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"

# progress(done_bytes, total_bytes); called from a helper thread while the download runs.
Progress = Callable[[int, int], None]


class HubDownloadError(RuntimeError):
    """A download that did not happen; str(e) is the whole explanation for the user."""


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_ENDPOINT


def offline() -> bool:
    # The values huggingface_hub itself treats as true (constants._is_true).
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def file_url(repo_id: str, filename: str, revision: str = "main") -> str:
    """The URL a browser or `wget` can fetch the file from (huggingface_hub's own /resolve/ form)."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, filename, revision=revision or "main", endpoint=endpoint())


def check_filename(filename: str) -> str:
    """A workflow is untrusted input: the file name must stay inside the models folder."""
    p = Path(filename)
    if not filename or p.is_absolute() or ".." in p.parts or "\\" in filename:
        raise HubDownloadError(f"filename {filename!r}: expected a relative path inside the repository "
                               "such as 'svdq-int4_r32-flux.1-dev.safetensors' (no '..', not absolute)")
    return p.as_posix()


def find_existing(filename: str, dirs: list[str]) -> str | None:
    for d in dirs:
        p = Path(d) / filename
        if p.is_file():
            return str(p)
    return None


def pick_target_dir(dirs: list[str]) -> str:
    """First folder of `dirs` (ComfyUI's list for one model type, most preferred first) that is or can be
    made writable."""
    for d in dirs:
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            log.info("hub: skipping %s: %s", d, e)
            continue
        if os.access(d, os.W_OK):
            return d
    raise HubDownloadError(f"none of the model folders is writable: {dirs}")


def download(repo_id: str, filename: str, revision: str, dirs: list[str], progress: Progress | None = None) -> str:
    """Path of `filename` from `repo_id`@`revision`, downloaded into the first writable folder of `dirs`
    unless a file of that name is already in one of them.

    An existing file is used as is, without asking the hub: the user may have put it there by hand (the
    advice of every error below), and a model folder must keep working offline. Delete it to re-download.
    """
    filename = check_filename(filename)
    revision = revision or "main"
    found = find_existing(filename, dirs)
    if found:
        log.info("hub: %s already present, not downloading", found)
        return found
    target = pick_target_dir(dirs)
    url = file_url(repo_id, filename, revision)
    manual = f"Download {url} in a browser and put it at {Path(target) / filename}."

    def no_route(why: str) -> HubDownloadError:
        return HubDownloadError(f"{url}: the hub could not be reached ({why}). Check the network or HF_ENDPOINT, "
                                f"or: {manual}")

    if offline():
        raise HubDownloadError(f"{repo_id}/{filename}: not in {target} and HF_HUB_OFFLINE is set, so nothing is "
                               f"downloaded. Unset HF_HUB_OFFLINE to download it, or: {manual}")

    down = _unreachable(url)
    if down:
        raise no_route(down)

    import huggingface_hub
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    t0 = time.monotonic()
    try:
        meta = huggingface_hub.get_hf_file_metadata(url)
        with _Watch(Path(target), filename, meta.size or 0, progress):
            path = huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, local_dir=target,
                                                   endpoint=endpoint())
    # Order matters: LocalEntryNotFoundError < EntryNotFoundError < HfHubHTTPError < requests' HTTPError <
    # OSError, and GatedRepoError < RepositoryNotFoundError.
    except LocalEntryNotFoundError as e:  # hf_hub_download's wrapper around a failed connection
        raise no_route(_cause(e)) from e
    except GatedRepoError as e:
        raise HubDownloadError(f"{url}: {repo_id} is gated. Accept its license at {endpoint()}/{repo_id} "
                               f"and set HF_TOKEN (or run `huggingface-cli login`), or: {manual}") from e
    except RepositoryNotFoundError as e:
        raise HubDownloadError(f"{url}: repository {repo_id!r} not found, or it is private and no valid "
                               f"HF_TOKEN is set. Check the repo id, or: {manual}") from e
    except RevisionNotFoundError as e:
        raise HubDownloadError(f"{url}: {repo_id} has no revision {revision!r}. Use 'main' or a commit "
                               f"hash, or: {manual}") from e
    except EntryNotFoundError as e:
        raise HubDownloadError(f"{url}: {repo_id}@{revision} has no file {filename!r} (404). See the file "
                               f"list at {endpoint()}/{repo_id}/tree/{revision}") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        hint = "set HF_TOKEN to a token that can read this repo" if status in (401, 403) else "try again later"
        raise HubDownloadError(f"{url}: HTTP {status} from the hub; {hint}, or: {manual}") from e
    except OSError as e:  # requests' ConnectionError / Timeout mid-way, a full disk while writing
        raise HubDownloadError(f"{url}: download into {target} failed ({type(e).__name__}: {e}). Check the "
                               f"network, HF_ENDPOINT and free disk space, or: {manual}") from e
    log.info("hub: downloaded %s (%.1f MB) in %.1f s", path, os.path.getsize(path) / 2**20, time.monotonic() - t0)
    return path


def _unreachable(url: str) -> str | None:
    """Why the hub's host does not accept a TCP connection, or None if it does (or a proxy is in the way).
    huggingface_hub retries a refused connection for ~25 s (http_backoff: 1+2+4+8+8 s, measured 23 s), twice
    (metadata, then download); one direct connect tells the same at once. Skipped when a proxy is configured
    for the URL, because then only the proxy has to be reachable."""
    u = urlsplit(url)
    if urllib.request.getproxies().get(u.scheme) and not urllib.request.proxy_bypass(u.hostname or ""):
        return None
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=10).close()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def _cause(e: BaseException) -> str:
    c = e.__cause__ or e.__context__
    return f"{type(c).__name__}: {c}" if c else str(e).splitlines()[0]


class _Watch:
    """Reports progress by watching the size of huggingface_hub's partial file, which it writes under
    `<local_dir>/.cache/huggingface/download/` as `*.incomplete` (0.2x .. 0.36; hf_hub_download takes no
    progress callback). If that layout ever changes the only loss is that progress stays at 0 until done."""

    def __init__(self, local_dir: Path, filename: str, total: int, progress: Progress | None):
        self.dir = local_dir / ".cache" / "huggingface" / "download" / Path(filename).parent
        self.total, self.progress = total, progress
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hub-progress", daemon=True)

    def __enter__(self):
        if self.progress:
            self.progress(0, self.total)
            self.thread.start()
        return self

    def __exit__(self, exc_type, *_):
        if self.progress:
            self.stop.set()
            self.thread.join()
            if exc_type is None:
                self.progress(self.total, self.total)

    def _run(self):
        while not self.stop.wait(0.5):
            done = 0
            for p in self.dir.glob("*.incomplete") if self.dir.is_dir() else ():
                try:
                    done = max(done, p.stat().st_size)
                except FileNotFoundError:  # renamed to its final name between glob and stat
                    pass
            self.progress(min(done, self.total), self.total)
