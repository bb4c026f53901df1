"""A real authoritative DNS server for the delivery tests (dnslib, UDP and TCP on loopback).

A test declares its zone (MX, A, AAAA records, names that answer SERVFAIL)
and points the relay's ``[delivery] nameservers`` at ``server.address``.  Any
other name is NXDOMAIN; a known name without records of the asked type
answers NOERROR with no data (so MX-less domains fall back to A, RFC 5321 §5.1).

Only loopback addresses may be served: ``a()`` refuses anything else, so a
test can never send mail off the machine.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Any

from dnslib import AAAA, MX, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer


def _free_udp_tcp_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port for UDP and TCP")


class Zone(BaseResolver):  # type: ignore[misc]
    """The records a test serves, answered by dnslib's server threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, list[RR]] = {}
        self._servfail: set[str] = set()
        self.queries: list[tuple[str, str]] = []

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().rstrip(".") + "."

    def _add(self, name: str, rtype: int, rdata: Any) -> None:
        with self._lock:
            self._records.setdefault(self._key(name), []).append(RR(self._key(name), rtype, rdata=rdata, ttl=1))

    def mx(self, domain: str, *hosts: tuple[int, str]) -> None:
        for preference, host in hosts:
            self._add(domain, QTYPE.MX, MX(self._key(host) if host != "." else ".", preference))

    def null_mx(self, domain: str) -> None:
        """RFC 7505: one MX record, preference 0, exchange "."."""
        self._add(domain, QTYPE.MX, MX(".", 0))

    def a(self, name: str, *addresses: str) -> None:
        for address in addresses:
            if not ipaddress.ip_address(address).is_loopback:
                raise ValueError(f"{address}: tests may only serve loopback addresses")
            self._add(name, QTYPE.A, A(address))

    def aaaa(self, name: str, *addresses: str) -> None:
        for address in addresses:
            if not ipaddress.ip_address(address).is_loopback:
                raise ValueError(f"{address}: tests may only serve loopback addresses")
            self._add(name, QTYPE.AAAA, AAAA(address))

    def servfail(self, name: str) -> None:
        with self._lock:
            self._servfail.add(self._key(name))

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).lower()
        qtype = request.q.qtype
        with self._lock:
            self.queries.append((qname, QTYPE[qtype]))
            if qname in self._servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            records = self._records.get(qname)
            if records is None:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            for rr in records:
                if rr.rtype == qtype:
                    reply.add_answer(rr)
        return reply


class TestDns:
    """A zone served on 127.0.0.1:<port> over UDP and TCP."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.zone = Zone()
        self.port = _free_udp_tcp_port()
        logger = DNSLogger("-request,-reply,-truncated,-error", prefix=False)
        self._servers = [
            DNSServer(self.zone, address="127.0.0.1", port=self.port, tcp=tcp, logger=logger)
            for tcp in (False, True)
        ]

    @property
    def address(self) -> str:
        """For [delivery] nameservers."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> TestDns:
        for server in self._servers:
            server.start_thread()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()
