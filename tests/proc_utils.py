"""Stopping processes a test started, by their own process ids (never a broad kill)."""

from __future__ import annotations

import contextlib
import subprocess

import psutil


def kill_processes(procs: list[psutil.Process], grace_s: float = 15.0) -> None:
    """Terminate, wait up to ``grace_s``, then kill whatever is left."""
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (empty when it is gone)."""
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Processes whose command line contains ``text`` (e.g. a test's own temp dir)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if any(text in part for part in (p.info["cmdline"] or [])):
                found.append(p)
    return found


def kill_tree(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGKILL a process and everything it started (e.g. a driver and its local Ray cluster)
    at once, like a crash, and reap it."""
    for p in process_tree(proc.pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=timeout_s)
