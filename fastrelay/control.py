"""The control socket: how ``fastrelay queue ...`` acts on the running relay.

The relay owns its spool; an admin command must not write to it from another
process (two writers would interleave records).  So the relay serves a Unix
stream socket at ``<spool_dir>/control.sock`` (mode 0600: only the relay's
user may talk to it) and the CLI sends its request there.

Protocol: JSON lines.  A request is one JSON object with ``cmd`` and its
arguments; the answer is one JSON object with ``ok`` and either ``message`` or
``error`` (plus whatever fields a command adds).  Several requests may share
a connection.  Examples::

    {"cmd": "flush"}                        -> {"ok": true, "message": "...", "count": 3}
    {"cmd": "hold", "queue_id": "Bx7..."}   -> {"ok": true, "message": "Bx7...: on hold"}
    {"cmd": "nope"}                         -> {"ok": false, "error": "unknown command 'nope'"}

Commands are registered by the modules that implement them
(``ControlServer.register``); delivery registers flush, hold, release and
delete.

The socket is bound before the spool is recovered: if another relay already
answers on it, this one refuses to start rather than share the spool.

Config keys read: server.spool_dir.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .errors import FastrelayError

log = logging.getLogger("fastrelay.control")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024
# sockaddr_un.sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class RelayNotRunning(FastrelayError):
    """No relay answers on the control socket."""


def socket_path(spool_dir: Path) -> Path:
    return spool_dir / SOCKET_NAME


class ControlServer:
    """Serves JSON-line commands on a Unix socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = {}
        self._server: asyncio.AbstractServer | None = None

    def register(self, name: str, handler: Handler) -> None:
        self.handlers[name] = handler

    async def start(self) -> None:
        """Bind the socket; raise OSError(EADDRINUSE) if a relay already answers there."""
        path = self.path
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            log.warning("control: socket path %s is too long for a Unix socket; "
                        "`fastrelay queue` commands will not reach this relay", path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if _answers(path):
                raise OSError(errno.EADDRINUSE, f"another fastrelay is running on this spool "
                                                f"(its control socket {path} answers)")
            path.unlink()  # left over from a relay that did not stop cleanly
        old = os.umask(0o177)  # born 0600: no window in which others may connect
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(path), limit=MAX_REQUEST)
        finally:
            os.umask(old)
        log.debug("control: listening on %s", path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(_encode({"ok": False, "error": "request too long"}))
                    break
                if not line:
                    break
                writer.write(_encode(await self._answer(line)))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "not a JSON object"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": "a request is a JSON object with a \"cmd\" string"}
        handler = self.handlers.get(request["cmd"])
        if handler is None and not self.handlers:
            return {"ok": False, "error": "the relay is still starting; try again"}
        if handler is None:
            return {"ok": False, "error": f"unknown command {request['cmd']!r}",
                    "commands": sorted(self.handlers)}
        try:
            answer = await handler(request)
        except Exception as exc:
            log.exception("control: %s failed", request["cmd"])
            return {"ok": False, "error": f"{request['cmd']} failed: {exc}"}
        log.info("control: %s%s: %s", request["cmd"],
                 f" {request['queue_id']}" if isinstance(request.get("queue_id"), str) else "",
                 answer.get("message") or answer.get("error"))
        return answer

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                # A spool gone read-only (a failing disk) must not stop the shutdown;
                # the next start removes the stale socket.
                log.warning("control: cannot remove %s: %s", self.path, exc)


def _encode(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer).encode() + b"\n"


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def request(path: Path, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to the running relay and return its answer (blocking; for the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            what = "no control socket" if isinstance(exc, FileNotFoundError) else "nothing answers on"
            raise RelayNotRunning(f"the relay is not running ({what} {path})") from None
        s.sendall(_encode(message))
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise RelayNotRunning(f"the relay closed the control connection ({path})")
            data += chunk
    answer = json.loads(data)
    if not isinstance(answer, dict):
        raise FastrelayError(f"unexpected answer from the relay: {data[:200]!r}")
    return answer


def ask_running_relay(config_path: str, message: dict[str, Any]) -> dict[str, Any] | None:
    """The admin commands' round trip: load the config, ask the relay, report failures.

    Returns the relay's successful answer, or None after printing why not
    (bad config, relay not running, socket error, or the relay's own error).
    """
    import sys

    from .config import load_config
    from .errors import ConfigError, FastrelayError

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"fastrelay: {exc}", file=sys.stderr)
        return None
    try:
        answer = request(socket_path(config.path(config.server.spool_dir)), message)
    except RelayNotRunning as exc:
        print(f"fastrelay: {exc}", file=sys.stderr)
        return None
    except (FastrelayError, OSError, ValueError) as exc:
        print(f"fastrelay: control socket: {exc}", file=sys.stderr)
        return None
    if not answer.get("ok"):
        print(f"fastrelay: {answer.get('error', 'failed')}", file=sys.stderr)
        return None
    return answer
