"""Linux plumbing for the local cluster: a bridge, network namespaces cabled to it by veth
pairs, and killing whatever runs inside a namespace.

Everything here calls iproute2's `ip` (as root) and touches only the links, namespaces and
processes it is given by name or id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from ipaddress import IPv4Interface, IPv4Network

# Where a free subnet is looked for when none is asked for: 10.203.0.0/24, 10.203.1.0/24, ...
SUBNET_POOL = IPv4Network("10.203.0.0/16")
POLL_S = 0.1


def ip(*args: str) -> str:
    """Runs `ip *args` and returns its stdout.

    Raises:
        RuntimeError: Naming the command and ip's own message when it fails.
    """
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")
    return out.stdout


def require_root() -> None:
    """Raises RuntimeError unless this process can create namespaces with iproute2's `ip`."""
    if shutil.which("ip") is None:
        raise RuntimeError("the local cluster needs iproute2's `ip` (apt-get install iproute2)")
    if os.geteuid() != 0:
        raise RuntimeError("the local cluster creates network namespaces: run it as root")


def networks_in_use() -> list[IPv4Network]:
    """The IPv4 networks this host routes to or has an address in (the default route aside)."""
    used = []
    for route in json.loads(ip("-j", "-4", "route", "show", "table", "all")):
        if route.get("dst", "default") != "default":
            used.append(IPv4Network(route["dst"], strict=False))
    for link in json.loads(ip("-j", "-4", "addr", "show")):
        for a in link.get("addr_info", []):
            used.append(IPv4Interface(f"{a['local']}/{a['prefixlen']}").network)
    return used


def pick_subnet(requested: IPv4Network | None = None) -> IPv4Network:
    """`requested`, or the first /24 of SUBNET_POOL, checked against this host's routes.

    Raises:
        ValueError: When `requested` is not a private network with room for a few nodes, or
            overlaps a network this host already uses (named in the message).
        RuntimeError: When every /24 of the pool is in use.
    """
    used = networks_in_use()
    if requested is not None:
        if not requested.is_private or requested.prefixlen > 28:
            raise ValueError(f"--subnet {requested}: expected a private IPv4 network of /28 or larger")
        clash = [str(u) for u in used if u.overlaps(requested)]
        if clash:
            raise ValueError(f"--subnet {requested}: overlaps {', '.join(clash)} on this host")
        return requested
    for net in SUBNET_POOL.subnets(new_prefix=24):
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError(f"no free /24 in {SUBNET_POOL}: pass --subnet")


def create_bridge(name: str, address: IPv4Interface) -> None:
    """Creates bridge `name` holding `address` (the host's end of the private network)."""
    ip("link", "add", name, "type", "bridge")
    ip("addr", "add", str(address), "dev", name)
    ip("link", "set", name, "up")


def create_netns(netns: str, veth: str, bridge: str, address: IPv4Interface) -> None:
    """Creates namespace `netns` with loopback and an eth0 holding `address`, cabled to `bridge`
    by the veth pair whose host end is `veth`. The namespace gets no default route."""
    ip("netns", "add", netns)
    ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
    ip("link", "set", veth, "master", bridge, "up")
    ip("-n", netns, "addr", "add", str(address), "dev", "eth0")
    ip("-n", netns, "link", "set", "eth0", "up")
    ip("-n", netns, "link", "set", "lo", "up")


def link_exists(name: str) -> bool:
    """Whether a network link `name` exists in the host's namespace."""
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0


def netns_exists(name: str) -> bool:
    """Whether a named network namespace `name` exists."""
    return name in {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}


def delete_link(name: str) -> None:
    """Deletes link `name` (a veth takes its peer with it); does nothing if it is gone."""
    if link_exists(name):
        ip("link", "del", name)


def delete_netns(name: str) -> None:
    """Deletes namespace `name`; does nothing if it is gone."""
    if netns_exists(name):
        ip("netns", "del", name)


def netns_pids(netns: str) -> list[int]:
    """The ids of the processes inside namespace `netns` (none if it does not exist)."""
    if not netns_exists(netns):
        return []
    return [int(p) for p in ip("netns", "pids", netns).split()]


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_netns(netns: str, timeout_s: float = 30) -> list[int]:
    """SIGKILLs every process inside `netns` until none is left (a dying parent may have just
    forked); returns the ids it killed.

    Raises:
        TimeoutError: When processes are still inside after `timeout_s` seconds.
    """
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while pids := netns_pids(netns):
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {pids} still run inside namespace {netns}")
        _signal(pids, signal.SIGKILL)
        killed.update(pids)
        time.sleep(POLL_S)
    return sorted(killed)
