"""A real TensorBoard server reads a real run: scalars and attention pictures over HTTP."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from ssl_kd.engine.trainer import train
from tests.helpers import tiny_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(base: str, path: str, **query: str) -> bytes:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def wait_for(condition, timeout: float, server: subprocess.Popen):
    """Polls until `condition()` is truthy; fails early if the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"tensorboard exited with {server.returncode}")
        try:
            value = condition()
            if value:
                return value
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    pytest.fail(f"tensorboard did not serve the run within {timeout} s")


def test_tensorboard_serves_training_scalars_and_attention_images(tmp_path):
    train(tiny_config(tmp_path, **{"train.max_steps": 2, "eval.pictures_every_steps": 2}))
    port = free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    server = subprocess.Popen(
        [str(tensorboard), "--logdir", str(tmp_path / "tb"), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        scalar_tags = wait_for(
            lambda: json.loads(get(base, "/data/plugin/scalars/tags")).get(".", {}), 90, server
        )
        assert {"train/loss", "method/keep_ratio", "cost/teacher_pflops_total"} <= set(scalar_tags)
        loss = json.loads(get(base, "/data/plugin/scalars/scalars", run=".", tag="train/loss"))
        assert [point[1] for point in loss] == [2]  # [wall_time, step, value]
        assert loss[0][2] > 0

        image_tags = json.loads(get(base, "/data/plugin/images/tags"))["."]
        assert "dino/attention" in image_tags
        images = json.loads(get(base, "/data/plugin/images/images", run=".", tag="dino/attention"))
        assert images[0]["step"] == 2
        png = get(base, "/data/plugin/images/individualImage?" + images[0]["query"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode is not None
