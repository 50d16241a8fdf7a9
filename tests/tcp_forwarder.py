"""A TCP forwarder standing in for an SSH tunnel: 127.0.0.1:<listen> -> 127.0.0.1:<target>.

In a test (`Forwarder`): threads in the test process, with controls a real tunnel's failures need:
`drop()` cuts every connection, `refusing` closes new ones at once (the tunnel is down), `taps`
see the worker's frames, `mutate` may change one worker -> client frame (a damaged chunk).

As a program (the fake `ssh` of tests/test_remote_worker.py runs it): ``python tcp_forwarder.py
LISTEN TARGET [LISTEN_HOST [TARGET_HOST]]`` forwards until killed (hosts default to 127.0.0.1).
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable


class Forwarder:
    def __init__(
        self,
        target_port: int,
        listen_port: int = 0,
        listen_host: str = "127.0.0.1",
        target_host: str = "127.0.0.1",
    ) -> None:
        self.target_port, self.target_host = target_port, target_host
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind((listen_host, listen_port))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.refusing = False
        self.taps: list[Callable[[bytes], None]] = []  # each complete worker -> client line
        self.mutate: Callable[[bytes], bytes] | None = None  # worker -> client line -> what is sent
        self.connections = 0
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection((self.target_host, self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_worker: bool) -> None:
        buf = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not from_worker or (not self.taps and self.mutate is None):
                    dst.sendall(data)
                    continue
                buf += data
                *lines, buf = buf.split(b"\n")
                out = []
                for line in lines:
                    for tap in list(self.taps):
                        tap(line)
                    mutate = self.mutate
                    out.append(mutate(line) if mutate is not None else line)
                if out:
                    dst.sendall(b"".join(line + b"\n" for line in out))
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop(self) -> None:
        """Cut every connection now, as a tunnel that dies does."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self.server.close()
        self.drop()


if __name__ == "__main__":
    hosts = sys.argv[3:5] + ["127.0.0.1"] * (2 - len(sys.argv[3:5]))
    forwarder = Forwarder(int(sys.argv[2]), int(sys.argv[1]), hosts[0], hosts[1])
    print("forwarding", flush=True)
    threading.Event().wait()
