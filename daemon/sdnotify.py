"""systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram per message.

Outside systemd (no $NOTIFY_SOCKET) every call does nothing. A failed send is logged once and
never stops the daemon: replication matters more than telling systemd about it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("dbsync.daemon")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET %r is not a unix socket path; not notifying systemd", address)
            address = None
        # "@name" is a socket in the abstract namespace.
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_interval = _watchdog_interval(env) if self.address else None
        self._sock: socket.socket | None = None
        self._last_ping = float("-inf")
        self._status: str | None = None
        self._ready = False
        self._reloading = False
        self._failed = False

    def ready(self, status: str) -> None:
        """READY=1 the first time; later calls only update the status."""
        if self._ready:
            self.status(status)
            return
        self._ready = True
        self._status = status
        self._send(f"READY=1\nSTATUS={status}")

    def reloading(self) -> None:
        """RELOADING=1 with the CLOCK_MONOTONIC time in microseconds, which Type=notify-reload
        needs to match the reload it asked for; nothing before the first READY=1 (a start that
        is still under way is not a reload)."""
        if not self._ready:
            return
        self._reloading = True
        self._status = "reloading the configuration"
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS={self._status}")

    def reloaded(self, status: str) -> None:
        """READY=1 again once a reload is over, whether it was taken or refused."""
        if not self._reloading:
            self.status(status)
            return
        self._reloading = False
        self._status = status
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        """WATCHDOG=1, at most eight times per watchdog interval however often it is called."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval / 8:
            self._last_ping = now
            self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._status = "stopping"
        self._send("STOPPING=1\nSTATUS=stopping")

    def _send(self, message: str) -> None:
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc)
                self._failed = True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between watchdog deadlines, if systemd expects pings from this process."""
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        return None
    return seconds if seconds > 0 else None
