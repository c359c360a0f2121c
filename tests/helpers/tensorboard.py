"""A real ``tensorboard`` server for tests and the screenshot script, always stopped."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

_URL = re.compile(r"(http://127\.0\.0\.1:\d+)/")


@contextlib.contextmanager
def tensorboard_server(
    logdir: str, *, start_timeout: float = 90.0, extra_args: tuple[str, ...] = ()
) -> Iterator[str]:
    """Start ``tensorboard`` on 127.0.0.1 (a free port) over ``logdir``; yield its base URL.

    The server runs with ``--port 0`` (the OS picks a free port; TensorBoard 2.21 has no
    ``--url_file``, so the URL is read from the line it prints on start) and
    ``--load_fast=false`` (the pure-Python reader, no Rust data server), with TensorBoard's
    default sampling (10 images per tag) unless ``extra_args`` say otherwise. It is stopped
    on exit, killed if it does not stop within 10 s.
    """
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            logdir,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--load_fast=false",
            *extra_args,
        ]
        log_path = os.path.join(tmp, "server.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                with open(log_path) as f:
                    found = _URL.search(f.read())
                if found:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    with open(log_path) as f:
                        raise RuntimeError(f"tensorboard did not start:\n{f.read()[-3000:]}")
                time.sleep(0.1)
            yield found.group(1)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def get(base: str, path: str, params: dict[str, Any] | None = None, timeout: float = 30) -> bytes:
    """GET ``base + path`` with query ``params``; the body."""
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def get_json(base: str, path: str, params: dict[str, Any] | None = None) -> Any:
    return json.loads(get(base, path, params))


def post_json(base: str, path: str, payload: dict[str, Any], timeout: float = 30) -> Any:
    request = urllib.request.Request(
        base + path,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "X-TensorBoard-Feature-Flags": "{}"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def poll(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 60) -> Any:
    """Call ``fetch`` until ``done`` accepts its result (the server loads files gradually)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def wait_for_tags(base: str, plugin: str, run: str, needed: set[str], timeout: float = 60) -> dict:
    """Poll ``/data/plugin/<plugin>/tags`` until ``run`` has every tag in ``needed``."""
    deadline = time.monotonic() + timeout
    tags: dict = {}
    while time.monotonic() < deadline:
        tags = get_json(base, f"/data/plugin/{plugin}/tags")
        if needed <= set(tags.get(run, {})):
            return tags
        time.sleep(0.5)
    raise AssertionError(f"{plugin} tags of {run!r} never had {needed - set(tags.get(run, {}))}")
