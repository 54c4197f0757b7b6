"""Hosts as Linux network namespaces, for multi-host integration tests.

A `Network` is a private /24 under 10.231.0.0/16 (the first one no interface of this machine
uses) with a bridge in a "switch" namespace and, per host, a namespace joined to the bridge by a
veth pair: `eth0` in the host, `h-<name>` on the switch. One more veth pair joins the namespace
this process runs in to the bridge as the client machine (`.1`), so tests talk to every host
over the bridge, as a client on the same network would. Hosts get `.10`, `.11`, ... in order.

Processes run in a host with `ip netns exec` (`Host.command`): real processes with real sockets,
in the host's own port space, so every host can use the same ports as the deployment recipe.
`partition` takes a host's switch port down, so its packets are dropped without an error on
either side (a pulled cable, not a refused connection); `heal` brings it back.

Only namespaces are created by name (`fleetnet-<pid>-<tag>-<role>`); every link lives in or
between them, so deleting the namespaces removes all of it, the client's veth included. A run
that died without cleaning up leaves namespaces whose pid is gone: the next `Network` removes
them, with any process still running inside.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

SUPERNET = ipaddress.ip_network("10.231.0.0/16")
PREFIX = "fleetnet"
_STALE = re.compile(rf"^{PREFIX}-(\d+)-")
_LOCK = Path("/tmp/fleetnet.lock")


class NetnsError(RuntimeError):
    """An `ip` command failed."""


def ip(*args: str, check: bool = True) -> str:
    """Run `ip ARGS...`; its stdout, or NetnsError with its stderr."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def netns_refusal() -> str | None:
    """None where this process may create network namespaces; else why it may not.

    Found by trying: a kernel without namespaces, or a user without CAP_SYS_ADMIN and
    CAP_NET_ADMIN, refuses `ip netns add`.
    """
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
    except NetnsError as exc:
        return (f"`ip netns add` is refused here (it takes root, or CAP_SYS_ADMIN and "
                f"CAP_NET_ADMIN): {exc}")
    ip("netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    address: str
    switch_port: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host."""
        return ["ip", "netns", "exec", self.netns, *argv]


def _namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _kill_inside(netns: str) -> None:
    """SIGKILL whatever still runs in a namespace this module created."""
    for pid in ip("netns", "pids", netns, check=False).split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def _remove_stale() -> None:
    for netns in _namespaces():
        match = _STALE.match(netns)
        if match is None or psutil.pid_exists(int(match.group(1))):
            continue
        logger.warning("removing namespace %s of a run that is gone", netns)
        _kill_inside(netns)
        ip("netns", "del", netns, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of SUPERNET that no address or route of this namespace touches."""
    used = [ipaddress.ip_interface(word).network
            for line in ip("-4", "-o", "addr", "show").splitlines()
            for word in line.split()[3:4]]
    used += [ipaddress.ip_network(line.split()[0], strict=False)
             for line in ip("-4", "route", "show", "table", "all").splitlines()
             if line.split() and line.split()[0][0].isdigit()]
    for subnet in SUPERNET.subnets(new_prefix=24):
        if not any(subnet.overlaps(net) for net in used):
            return subnet
    raise NetnsError(f"every /24 of {SUPERNET} is in use on this machine")


class Network:
    """A switch, one namespace per host, and this process's namespace as the client (.1)."""

    def __init__(self, hosts: Sequence[str]) -> None:
        self.tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{PREFIX}-{self.tag}-switch"
        self.hosts: dict[str, Host] = {}
        self._names = list(hosts)
        self._client_link = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self.client_address = ""

    def __enter__(self) -> Network:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def create(self) -> None:
        _remove_stale()
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for name in self._names:
            netns = f"{PREFIX}-{self.tag}-{name}"
            ip("netns", "add", netns)
            ip("-n", netns, "link", "set", "lo", "up")
            port = f"h-{name}"[:15]
            ip("-n", self.switch, "link", "add", port, "type", "veth",
               "peer", "name", "eth0", "netns", netns)
            ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            self.hosts[name] = Host(name, netns, "", port)
        # The subnet is chosen and taken (by the client's address) under a lock, so two runs at
        # once do not pick the same one.
        with _LOCK.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = _free_subnet()
            # The subnet's third byte keeps the name unique among the runs alive.
            self._client_link = f"fleetnet{self.subnet.network_address.packed[2]}"
            ip("link", "add", self._client_link, "type", "veth",
               "peer", "name", "client", "netns", self.switch)
            self.client_address = str(self.subnet.network_address + 1)
            ip("addr", "add", f"{self.client_address}/24", "dev", self._client_link)
        ip("link", "set", self._client_link, "up")
        ip("-n", self.switch, "link", "set", "client", "master", "br0", "up")
        for index, name in enumerate(self._names):
            host = self.hosts[name]
            address = str(self.subnet.network_address + 10 + index)
            ip("-n", host.netns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", host.netns, "link", "set", "eth0", "up")
            self.hosts[name] = Host(name, host.netns, address, host.switch_port)

    def partition(self, name: str) -> None:
        """Cut a host off: its switch port goes down, and packets to and from it are dropped."""
        ip("-n", self.switch, "link", "set", self.hosts[name].switch_port, "down")

    def heal(self, name: str) -> None:
        ip("-n", self.switch, "link", "set", self.hosts[name].switch_port, "up")

    def listening(self, name: str) -> set[tuple[str, int]]:
        """TCP (address, port) pairs listening inside a host, read from its /proc/net/tcp."""
        text = subprocess.run(
            self.hosts[name].command(["cat", "/proc/net/tcp"]), capture_output=True, text=True,
            timeout=20, check=True,
        ).stdout
        found = set()
        for line in text.splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":  # LISTEN
                continue
            address, port = local.split(":")
            packed = bytes.fromhex(address)[::-1]  # little-endian on every Linux we run on
            found.add((str(ipaddress.IPv4Address(packed)), int(port, 16)))
        return found

    def close(self) -> None:
        """Stop what still runs in the hosts and delete every namespace (and so every link)."""
        names = [h.netns for h in self.hosts.values()] + [self.switch]
        present = set(_namespaces())
        for netns in names:
            if netns in present:
                _kill_inside(netns)
                ip("netns", "del", netns, check=False)
        if self._client_link:
            # Gone with the switch namespace already; this only covers a half-made network.
            ip("link", "del", self._client_link, check=False)
