"""A Google Cloud Storage API on 127.0.0.1 for tests and benchmarks: gcp-storage-emulator
(in memory) behind a loopback proxy that holds every request for `latency_ms` before passing it
on, as a remote object store's first byte takes that long.

The emulator answers HTTP/1.0, one request per connection; the proxy reads each request whole,
waits, passes it on over a new connection and returns the answer with `Connection: close`.
It also answers `GET /__stats` itself: requests passed on, and the most in flight at once.

  with Emulator(latency_ms=30) as gcs:       # a separate process; sets the environment gcsfs
      gcs.upload(local_dir, "bucket/store")  # (and so etils.epath's gs://) reads
      ... gs://bucket/store ...

Run as a script it serves until killed: python tests/gcs.py --port=P --proxy_port=Q.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import urllib.request

from processes import free_port

BUCKET = "bucket"
ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


class Emulator:
    """The emulator and its proxy in a child process. On entry it sets STORAGE_EMULATOR_HOST (to
    the proxy), TensorStore's endpoint and token (for Orbax) and
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false; on exit it restores them."""

    def __init__(self, latency_ms: float = 30.0, bucket: str = BUCKET):
        self.latency_ms = latency_ms
        self.bucket = bucket
        self.port = free_port()
        self.proxy_port = free_port()
        self._proc = None
        self._saved: dict[str, str | None] = {}

    @property
    def endpoint(self) -> str:
        """The proxied endpoint (with the latency)."""
        return f"http://127.0.0.1:{self.proxy_port}"

    def __enter__(self) -> Emulator:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            f"--port={self.port}",
            f"--proxy_port={self.proxy_port}",
            f"--latency_ms={self.latency_ms}",
            f"--bucket={self.bucket}",
        ]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self._proc.stdout.readline()
        if line.strip() != "ready":
            self._proc.kill()
            raise RuntimeError(f"the GCS emulator did not start: {line!r}")
        env = ENV | {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            # Orbax reads and writes gs:// through TensorStore, which has its own GCS client.
            "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        }
        for key, value in env.items():
            self._saved[key] = os.environ.get(key)
            os.environ[key] = value
        return self

    def __exit__(self, *exc) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def upload(self, local_dir: str, remote: str) -> None:
        """Copies the files under `local_dir` (subdirectories too) to gs://`remote`/ straight
        to the emulator (without the latency)."""
        import gcsfs

        fs = gcsfs.GCSFileSystem(endpoint_url=f"http://127.0.0.1:{self.port}", token="anon")
        names = sorted(
            os.path.relpath(os.path.join(root, f), local_dir)
            for root, _, files in os.walk(local_dir)
            for f in files
        )
        # Many at once (gcsfs uploads a dict concurrently), in batches of bounded memory.
        batch, size = {}, 0
        for name in names:
            with open(os.path.join(local_dir, name), "rb") as f:
                batch[f"{remote}/{name}"] = f.read()
            size += len(batch[f"{remote}/{name}"])
            if size > 64 << 20 or name == names[-1]:
                fs.pipe(batch)
                batch, size = {}, 0
        # The file systems this process already uses cache listings: forget them, as a new
        # process would start without them.
        for instance in list(gcsfs.GCSFileSystem._cache.values()):
            instance.invalidate_cache()

    def stats(self) -> dict[str, int]:
        """{"requests": passed on so far, "max_in_flight": the most at once}; `reset` too."""
        with urllib.request.urlopen(f"{self.endpoint}/__stats", timeout=10) as r:
            return json.loads(r.read())

    def reset_stats(self) -> None:
        with urllib.request.urlopen(f"{self.endpoint}/__stats?reset=1", timeout=10) as r:
            r.read()


async def _proxy(port: int, upstream: int, latency_s: float) -> None:
    stats = {"requests": 0, "max_in_flight": 0}
    in_flight = 0

    async def handle(reader, writer):
        nonlocal in_flight
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        if head.startswith(b"GET /__stats"):
            response = json.dumps(stats).encode()
            if head.startswith(b"GET /__stats?reset=1"):
                stats.update(requests=0, max_in_flight=in_flight)
            writer.write(
                b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(response)}\r\n\r\n".encode()
                + response
            )
        else:
            in_flight += 1
            stats["requests"] += 1
            stats["max_in_flight"] = max(stats["max_in_flight"], in_flight)
            try:
                await asyncio.sleep(latency_s)
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
                up_writer.write(head + body)
                await up_writer.drain()
                response = await up_reader.read()
                up_writer.close()
            finally:
                in_flight -= 1
            # One request per connection, as the emulator: clients must not reuse it.
            writer.write(response.replace(b"\r\n", b"\r\nConnection: close\r\n", 1))
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def orphaned():
        # The parent that started this server may die without stopping it.
        parent = os.getppid()
        while os.getppid() == parent:
            await asyncio.sleep(1)

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=512)
    print("ready", flush=True)
    async with server:
        await asyncio.wait(
            [asyncio.ensure_future(server.serve_forever()), asyncio.ensure_future(orphaned())],
            return_when=asyncio.FIRST_COMPLETED,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--proxy_port", type=int, required=True)
    parser.add_argument("--latency_ms", type=float, default=30.0)
    parser.add_argument("--bucket", default=BUCKET)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from http import server as http_server

    from gcp_storage_emulator import server as emulator

    class Server(http_server.ThreadingHTTPServer):
        # The emulator's HTTPServer takes one connection at a time with a backlog of 5, so
        # concurrent clients past 5 wait for a SYN retry (1 s); real GCS serves them at once.
        request_queue_size = 512
        daemon_threads = True

    # Its storage is not thread-safe: requests that change it take turns.
    changing = threading.Lock()
    for name in ("do_POST", "do_PUT", "do_PATCH", "do_DELETE"):
        handle = getattr(emulator.RequestHandler, name)

        def locked(self, handle=handle):
            with changing:
                handle(self)

        setattr(emulator.RequestHandler, name, locked)
    emulator.server.HTTPServer = Server
    server = emulator.create_server(
        "127.0.0.1", args.port, in_memory=True, default_bucket=args.bucket
    )
    server.start()
    try:
        asyncio.run(_proxy(args.proxy_port, args.port, args.latency_ms / 1000))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
