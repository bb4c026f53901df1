"""Where a recipient's mail goes next: configured routes, then DNS (MX, A, AAAA).

A recipient domain maps to a ``Destination``: either a configured route (the
first ``[[delivery.routes]]`` entry that matches, Postfix transport_maps
style) or the domain's own MX hosts.  Messages are queued and connections are
cached per destination, so every domain sent through one route shares that
route's connections, while each MX-routed domain has its own.

Route matching (first match wins):

* ``example.com``   the domain itself only;
* ``.example.com``  its subdomains only (add both entries for both);
* ``*``             every domain.

A route's host is used as is (no MX lookup, like Postfix's ``[host]:port``):
an IP literal directly, a name through its A/AAAA records.

MX resolution follows RFC 5321 §5.1: hosts in preference order (equal
preferences shuffled), each host's IPv4 then IPv6 addresses; no MX records
means the domain itself is the one host (implicit MX); a null MX (RFC 7505)
means the domain accepts no mail.  One attempt tries at most MX_ADDRESS_LIMIT
(5) addresses of an MX list, the best first.  An address literal (``user@[127.0.0.1]``)
goes straight to that address.

Config keys read: delivery.routes, delivery.nameservers (empty: the system
resolver from /etc/resolv.conf; "ip" or "ip:port"), delivery.mx_port (25).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from dataclasses import dataclass
from typing import NamedTuple

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .config import DeliveryConfig, RouteConfig, parse_hostport

# How long one DNS question may take, retries included (dnspython's lifetime).
DNS_LIFETIME = 10.0
DESTINATION_CACHE = 10_000   # recipient domains whose destination is remembered (all forgotten when full)
# One delivery attempt tries at most this many MX addresses, the best first, as
# Postfix's smtp_mx_address_limit (5): a domain listing dozens of MX hosts that
# refuse, or stall until connect_timeout, must not hold a session for hours.
MX_ADDRESS_LIMIT = 5
MX_HOST_LOOKUPS = 10         # MX names whose addresses are looked up, best first


class NextHop(NamedTuple):
    """One address to try, with the name it was found under."""

    hostname: str   # MX host or route host: for logs, SNI, certificate checks, Remote-MTA
    address: str    # IP address to connect to
    port: int

    def __str__(self) -> str:
        # Postfix's relay= notation: host[ip]:port
        return f"{self.hostname}[{self.address}]:{self.port}"


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a group of recipients goes: a route's host, or a domain's MX hosts."""

    key: str                      # the queue and connection-cache key
    domain: str                   # the recipient domain (for a route: the first one seen)
    route: RouteConfig | None     # None: deliver by MX
    host: str = ""                # a route's host (name or IP literal)
    port: int = 0                 # a route's port


class RoutingError(Exception):
    """No next hop for a destination; ``temporary`` says whether to retry."""

    def __init__(self, temporary: bool, dsn: str, text: str) -> None:
        super().__init__(text)
        self.temporary = temporary
        self.dsn = dsn
        self.text = text


def make_resolver(nameservers: list[str]) -> dns.asyncresolver.Resolver:
    """dnspython's asyncio resolver with a TTL-honouring cache."""
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        servers: list[dns.nameserver.Nameserver | str] = []
        for ns in nameservers:
            host, port = parse_hostport(ns, 53)
            servers.append(dns.nameserver.Do53Nameserver(host, port))
        resolver.nameservers = servers
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            # No /etc/resolv.conf: every lookup will fail (and be retried) until
            # [delivery] nameservers is set; the relay still starts.
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
    resolver.lifetime = DNS_LIFETIME
    resolver.cache = dns.resolver.Cache()
    return resolver


def route_matches(pattern: str, domain: str) -> bool:
    pattern = pattern.lower()
    if pattern == "*":
        return True
    if pattern.startswith("."):
        return domain.endswith(pattern)
    return domain == pattern


class Router:
    """Maps recipient domains to destinations and destinations to next hops."""

    def __init__(self, config: DeliveryConfig, resolver: dns.asyncresolver.Resolver | None = None) -> None:
        self.config = config
        self.resolver = resolver if resolver is not None else make_resolver(config.nameservers)
        self._route_hosts = [parse_hostport(r.host, config.mx_port) for r in config.routes]
        # Every message asks twice (the queue manager groups, the agent queues); the
        # answer depends only on the domain and this config, and the route walk with
        # its key costs a few microseconds.  A new config makes a new Router.
        self._destinations: dict[str, Destination] = {}

    def destination_for(self, domain: str) -> Destination:
        found = self._destinations.get(domain)
        if found is not None:
            return found
        if len(self._destinations) >= DESTINATION_CACHE:
            self._destinations.clear()
        found = self._destinations[domain] = self._destination(domain.lower().rstrip("."))
        return found

    def _destination(self, domain: str) -> Destination:
        for route, (host, port) in zip(self.config.routes, self._route_hosts):
            if route_matches(route.domain, domain):
                # Routes with the same host and settings share a queue and connections.
                key = f"route:[{host}]:{port}:{route.tls}:{route.username}"
                return Destination(key, domain, route, host, port)
        return Destination(domain, domain, None)

    async def next_hops(self, destination: Destination) -> list[NextHop]:
        """The addresses to try, best first; raises RoutingError when there are none."""
        if destination.route is not None:
            return await self._host_hops(destination.host, destination.port, implicit=False)
        domain = destination.domain
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1]
            literal = literal[5:] if literal.lower().startswith("ipv6:") else literal
            try:
                ipaddress.ip_address(literal)
            except ValueError:
                raise RoutingError(False, "5.1.2", f"bad address literal {domain}") from None
            return [NextHop(domain, literal, self.config.mx_port)]
        return await self._mx_hops(domain)

    async def _mx_hops(self, domain: str) -> list[NextHop]:
        try:
            answer = await self.resolver.resolve(domain, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            raise RoutingError(False, "5.1.2", f"Host or domain name not found. Name service error "
                                               f"for name={domain} type=MX: Host not found") from None
        except dns.resolver.NoAnswer:
            # RFC 5321 §5.1: no MX records: the domain itself is the implicit MX.
            return await self._host_hops(domain, self.config.mx_port, implicit=True)
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.YXDOMAIN) as exc:
            raise RoutingError(True, "4.4.3", f"Host or domain name not found. Name service error "
                                              f"for name={domain} type=MX: {_dns_problem(exc)}") from None
        records = [(r.preference, r.exchange) for r in answer]
        # RFC 7505 §3: a single MX with an empty exchange (".") means "no mail here".
        if len(records) == 1 and records[0][1] == dns.name.root:
            raise RoutingError(False, "5.1.10", f"Domain {domain} does not accept mail (null MX, RFC 7505)")
        records = [r for r in records if r[1] != dns.name.root]
        random.shuffle(records)  # RFC 5321 §5.1: spread load among equal preferences
        records.sort(key=lambda r: r[0])
        port = self.config.mx_port
        lookups = [self._host_hops(exchange.to_text(omit_final_dot=True), port, implicit=False)
                   for _, exchange in records[:MX_HOST_LOOKUPS]]
        results = await asyncio.gather(*lookups, return_exceptions=True)
        hops: list[NextHop] = []
        temporary: RoutingError | None = None
        permanent: RoutingError | None = None
        for result in results:
            if isinstance(result, RoutingError):
                if result.temporary:
                    temporary = temporary or result
                else:
                    permanent = permanent or result
            elif isinstance(result, BaseException):
                raise result
            else:
                hops.extend(result)
        if hops:
            return hops[:MX_ADDRESS_LIMIT]
        if temporary is not None:
            raise temporary
        assert permanent is not None
        raise RoutingError(False, "5.4.4", f"no address for any MX host of {domain}: {permanent.text}")

    async def _host_hops(self, host: str, port: int, implicit: bool) -> list[NextHop]:
        """A host's addresses: an IP literal as is, a name by A then AAAA."""
        try:
            ipaddress.ip_address(host)
            return [NextHop(host, host, port)]
        except ValueError:
            pass
        results = await asyncio.gather(self._addresses(host, "A"), self._addresses(host, "AAAA"),
                                       return_exceptions=True)
        hops: list[NextHop] = []
        problems: list[BaseException] = []
        for result in results:
            if isinstance(result, BaseException):
                problems.append(result)
            else:
                hops.extend(NextHop(host, address, port) for address in result)
        if hops:
            return hops
        for exc in problems:
            if isinstance(exc, (dns.resolver.NoNameservers, dns.exception.Timeout)):
                raise RoutingError(True, "4.4.3", f"Host or domain name not found. Name service error "
                                                  f"for name={host} type=A: {_dns_problem(exc)}")
        for exc in problems:
            if not isinstance(exc, (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.exception.DNSException)):
                raise exc
        # NXDOMAIN or no address records: a permanent failure (5.1.2 for the
        # recipient's own domain, 5.4.4 for an MX or route host without address).
        dsn = "5.1.2" if implicit else "5.4.4"
        raise RoutingError(False, dsn, f"Host or domain name not found. Name service error "
                                       f"for name={host} type=A: Host not found")

    async def _addresses(self, host: str, rdtype: str) -> list[str]:
        try:
            answer = await self.resolver.resolve(host, rdtype, search=False)
        except dns.resolver.NoAnswer:
            return []
        return [r.to_text() for r in answer]


def _dns_problem(exc: BaseException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timed out, try again"
    return "server failure, try again"
