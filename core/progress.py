"""Live progress from workers to the launching process over a loopback UDP side channel.

`p.run()` blocks on local runners and Beam metrics are not live there (and absent on the DaskRunner), so
workers send small datagrams ("read 65536") to a listener the launcher opened on 127.0.0.1. Fire and forget:
a lost datagram only makes the progress line lag. Datagrams carry stage names and counts, never values.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections import Counter


class ProgressReporter:
    """Worker side; a no-op when no address is configured (remote runners)."""

    def __init__(self, addr: tuple[str, int] | None) -> None:
        self.addr: tuple[str, int] | None = (str(addr[0]), int(addr[1])) if addr else None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if self.addr else None

    def send(self, stage: str, n: int) -> None:
        if self.sock is not None and self.addr is not None:
            try:
                self.sock.sendto(f"{stage} {int(n)}".encode(), self.addr)
            except OSError:
                pass


class ProgressListener:
    """Launcher side: counts datagrams and redraws one status line on stderr while the pipeline runs."""

    def __init__(self, enabled: bool | str = True) -> None:
        self.counts: Counter[str] = Counter()
        self.tty = sys.stderr.isatty()
        self.enabled = bool(enabled) and self.tty or enabled == "always"
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.addr = self.sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._start = time.monotonic()

    def __enter__(self) -> ProgressListener:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
        if self.enabled and self.tty:
            sys.stderr.write("\n")

    def _loop(self) -> None:
        # On a terminal the status line is redrawn in place; otherwise (logs, CI) a line is printed every few
        # seconds, and only when the counts moved.
        last, shown = 0.0, None
        every = 0.25 if self.tty else 3.0
        while not self._stop.is_set():
            try:
                data, _ = self.sock.recvfrom(256)
                stage, n = data.decode().split()
                self.counts[stage] += int(n)
            except (TimeoutError, ValueError, OSError):
                pass
            now = time.monotonic()
            state = (self.counts["read"], self.counts["written"])
            if self.enabled and now - last > every and (self.tty or state != shown):
                last, shown = now, state
                line = f"  {now - self._start:6.1f}s  rows read {state[0]:>10,}  written {state[1]:>10,}"
                sys.stderr.write(f"\r{line}" if self.tty else f"{line}\n")
                sys.stderr.flush()
