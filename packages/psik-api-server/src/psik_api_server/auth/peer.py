"""Who is on the other end of a connection: the peer's uid, looked up once per connection.

* Over a UNIX socket the kernel says: ``SO_PEERCRED`` (Linux), ``getpeereid`` (BSD, macOS).
* Over loopback TCP the client's end of the connection is a socket too, owned by the uid
  that created it: the socket whose *local* address is the client's (ip, port) and whose
  *remote* address is the server's. Linux answers "which socket is this 4-tuple, and
  whose" in two ways: ``sock_diag`` netlink (``NETLINK_SOCK_DIAG``, what ``ss`` uses)
  looks up exactly that socket, and ``/proc/net/tcp`` and ``tcp6`` list every TCP socket
  of the network namespace with a ``uid`` column. sock_diag is asked first: reading the
  tables walks the kernel's whole socket hash (milliseconds, see bench/bench_peer.py);
  the tables are the fallback where netlink is not allowed. Systems with neither
  (macOS) cannot tell: :meth:`PeerLookup.tcp_uid` answers None, and ``security`` asks
  for the local secret instead.
* Only an end its owner still holds names a uid: one with an inode (the kernel reads
  the uid before the inode, and an orphan never gets one back), in ESTABLISHED,
  CLOSE_WAIT (the server closed its half) or FIN_WAIT1/FIN_WAIT2 (the client shut its
  sending half down after its request, ``shutdown(SHUT_WR)`` as ``nc -N`` does, and
  still holds the socket, waiting for the answer). Once the client has closed its
  socket, its end is an orphan with no inode (FIN_WAIT1/2, CLOSING, LAST_ACK, CLOSE;
  after the delayed ACK a FIN_WAIT2 mini-socket), which both lookups report as uid 0,
  or on newer kernels as the socket's creator: neither is proof. A client that sends
  its whole request corked and closes at once while the server is busy would otherwise
  be root to a server run as root. Such an end is "cannot tell" (None), never a uid; so
  is an end without an inode in any state, and one in any other state.

How the app sees its connection: an ASGI scope has the peer's address but not the
socket. The server's connection hooks (:mod:`psik_api_server.serving.uvicorn_seam` for uvicorn,
:mod:`psik_api_server.serving.hypercorn_seam` for hypercorn) make every request of a connection carry that
connection's :class:`Connection` in ``scope["extensions"]["psik_api.connection"]``, and
look the peer's uid up at accept with the app's lookup (``context(app).peer_lookup``, found
through the ``.app`` of the middleware the server wraps it in,
:meth:`Connection.look_up_at_accept`): the later the lookup, the likelier the client has
closed its end meanwhile (a server busy for 40 ms is enough). Because the
:class:`Connection` lives as long as the connection, that one lookup serves every
request of a keep-alive connection; where the app's lookup cannot be found, the first
request looks the uid up instead.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket
import struct
import sys
from pathlib import Path
from typing import Any

from starlette.types import Scope

#: The key of a request's :class:`Connection` in ``scope["extensions"]``.
CONNECTION = "psik_api.connection"

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

# /proc/net/tcp states. Rows that are not the client's socket are passed over:
# TIME_WAIT (an earlier connection of the same ports), LISTEN, NEW_SYN_RECV. Of the
# others only an end its owner still holds names a uid, and only with an inode:
# ESTABLISHED, CLOSE_WAIT (the server closed its half), FIN_WAIT1 and FIN_WAIT2 (the
# client shut down its sending half and waits for the answer). The same states without
# an inode are an orphan (the client closed its socket), whose uid column says nothing;
# so are CLOSING, LAST_ACK and CLOSE.
_NOT_A_CLIENT_END = {"06", "0A", "0C"}
_HELD = {"01", "08", "04", "05"}


class Connection:
    """One connection the server accepted: its socket family, both ends' addresses, and
    the peer's uid once looked up (``uid_known`` says whether that has been done)."""

    __slots__ = ("_sock", "family", "local", "peer", "uid", "uid_known")

    def __init__(self, family: int | None, local: Any, peer: Any, sock: Any = None) -> None:
        self.family = family
        self.local = local
        self.peer = peer
        self.uid: int | None = None
        self.uid_known = False
        self._sock = sock

    @classmethod
    def of_transport(cls, transport: Any) -> Connection:
        sock = transport.get_extra_info("socket")
        family = getattr(sock, "family", None)
        return cls(family, transport.get_extra_info("sockname"), transport.get_extra_info("peername"), sock)

    @property
    def is_unix(self) -> bool:
        return self.family == getattr(socket, "AF_UNIX", object())

    def look_up_at_accept(self, app: Any) -> None:
        """Look the peer's uid up now, with the lookup of ``app`` (or of an app it wraps,
        through ``.app``), while the client's end is surely open. Only a peer that can be
        on this host: a remote peer's uid is never asked (``security`` refuses it)."""
        if not (self.is_unix or _on_this_host(self.peer)):
            return
        for _ in range(16):  # uvicorn's and starlette's wrappers keep the app in ``.app``
            ctx = getattr(getattr(app, "state", None), "context", None)
            lookup = getattr(ctx, "peer_lookup", None)
            if isinstance(lookup, PeerLookup):
                self.peer_uid(lookup)
                return
            app = getattr(app, "app", None)
            if app is None:
                return

    def peer_uid(self, lookup: PeerLookup) -> int | None:
        """The peer's uid (None: cannot be told), looked up on the first call only."""
        if not self.uid_known:
            if self.is_unix:
                self.uid = lookup.unix_uid(self._sock)
            elif isinstance(self.peer, tuple) and isinstance(self.local, tuple):
                self.uid = lookup.tcp_uid(self.peer, self.local)
            self.uid_known = True
        return self.uid


class PeerLookup:
    """Finds a peer's uid. ``proc_root`` is where the socket tables are read
    (``/proc``) and ``sock_diag`` whether netlink is asked first; tests turn both off to
    play a system that can tell nothing over TCP (macOS)."""

    def __init__(self, proc_root: str | Path = "/proc", *, sock_diag: bool = True) -> None:
        self.proc_root = Path(proc_root)
        self.sock_diag = sock_diag and hasattr(socket, "AF_NETLINK")

    def unix_uid(self, sock: Any) -> int | None:
        """The uid of the process at the other end of a connected UNIX socket."""
        if sock is None:
            return None
        try:
            if hasattr(socket, "SO_PEERCRED"):
                size = struct.calcsize("3i")
                _pid, uid, _gid = struct.unpack(
                    "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
                )
                return int(uid)
            return _getpeereid(sock.fileno())
        except (OSError, ValueError, AttributeError):
            return None

    def tcp_uid(self, client: tuple[Any, ...], server: tuple[Any, ...]) -> int | None:
        """The uid owning the client's end of the TCP connection ``client`` -> ``server``
        (both ``(ip, port, ...)`` as the server's socket reports them), or None."""
        try:
            cip, sip = _ip(str(client[0])), _ip(str(server[0]))
            cport, sport = int(client[1]), int(server[1])
        except (ValueError, IndexError, TypeError):
            return None
        c4, s4 = _v4(cip), _v4(sip)
        searches: list[tuple[str, IP, IP]] = []
        if c4 is not None and s4 is not None:
            # An AF_INET6 client reaching an IPv4 socket is listed in tcp6, v4-mapped.
            searches += [("tcp", c4, s4), ("tcp6", _mapped(c4), _mapped(s4))]
        elif isinstance(cip, ipaddress.IPv6Address) and isinstance(sip, ipaddress.IPv6Address):
            searches.append(("tcp6", cip, sip))
        if self.sock_diag:
            for table, local, remote in searches:
                family = socket.AF_INET6 if table == "tcp6" else socket.AF_INET
                found = _sock_diag_uid(family, local, cport, remote, sport)
                if found is _NO_NETLINK:
                    self.sock_diag = False  # not allowed here: the tables from now on
                    break
                if isinstance(found, int):
                    return found
            else:
                return None
        for table, local, remote in searches:
            uid = self._find(table, f": {_hex(local)}:{cport:04X} {_hex(remote)}:{sport:04X} ")
            if uid is not None:
                return uid
        return None

    def _find(self, table: str, needle: str) -> int | None:
        try:
            text = (self.proc_root / "net" / table).read_text(encoding="ascii", errors="replace")
        except OSError:
            return None
        start = 0
        while (at := text.find(needle, start)) >= 0:
            end = text.find("\n", at)
            fields = text[at + 2 : end if end >= 0 else len(text)].split()
            start = at + len(needle)
            # local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            if len(fields) < 9 or fields[2] in _NOT_A_CLIENT_END:
                continue
            if fields[2] in _HELD and fields[6].isdigit() and fields[8].isdigit() and int(fields[8]):
                return int(fields[6])
            # An orphan (or a row we cannot read): cannot tell, unless a held row follows.
        return None


def _ip(text: str) -> IP:
    return ipaddress.ip_address(text.split("%", 1)[0])


def _on_this_host(peer: Any) -> bool:
    """Whether a TCP peer ``(ip, port, ...)`` is a loopback address."""
    try:
        ip = _ip(str(peer[0]))
    except (ValueError, IndexError, TypeError):
        return False
    return (_v4(ip) or ip).is_loopback


def _v4(ip: IP) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    return ip.ipv4_mapped


def _mapped(ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)


def _hex(ip: IP) -> str:
    """An address as /proc/net/tcp* print it: 32-bit words in the host's byte order."""
    packed = ip.packed
    return "".join(
        f"{int.from_bytes(packed[i : i + 4], sys.byteorder):08X}" for i in range(0, len(packed), 4)
    )


# sock_diag (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NO_COOKIE = 0xFFFFFFFF
_NO_NETLINK = object()
_TCP_HELD = {1, 8, 4, 5}  # ESTABLISHED, CLOSE_WAIT, FIN_WAIT1/2: as _HELD above (and an inode)


def _sock_diag_uid(family: int, local: IP, lport: int, remote: IP, rport: int) -> int | object | None:
    """The uid of the TCP socket ``local:lport -> remote:rport``, asked of the kernel by
    an exact sock_diag lookup: its uid, None when there is no such socket, or
    ``_NO_NETLINK`` when netlink cannot be used here."""
    sockid = struct.pack(
        "!HH16s16s", lport, rport, local.packed.ljust(16, b"\0"), remote.packed.ljust(16, b"\0")
    ) + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)
    # inet_diag_req_v2: family, protocol, ext, pad, states (all), then the socket id.
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    message = _NLMSG.pack(_NLMSG.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + request
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)
            nl.sendto(message, (0, 0))
            answer = nl.recv(8192)
    except OSError:
        return _NO_NETLINK
    if len(answer) < _NLMSG.size:
        return _NO_NETLINK
    _len, kind, _flags, _seq, _pid = _NLMSG.unpack_from(answer)
    if kind == _NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", answer, _NLMSG.size)
        return None if -error == errno.ENOENT else _NO_NETLINK
    # inet_diag_msg: family, state, timer, retrans, the socket id (48 bytes),
    # expires, rqueue, wqueue, uid, inode.
    if kind != _SOCK_DIAG_BY_FAMILY or len(answer) < _NLMSG.size + 72:
        return _NO_NETLINK
    state = answer[_NLMSG.size + 1]
    uid, inode = struct.unpack_from("=II", answer, _NLMSG.size + 4 + 48 + 12)
    # The kernel reads the uid before the inode, and a socket once orphaned stays so:
    # an inode means the uid was read while the owner still held the socket.
    return int(uid) if state in _TCP_HELD and inode else None


def _getpeereid(fd: int) -> int | None:
    """BSD and macOS: ``getpeereid(2)`` (not in glibc; Linux uses SO_PEERCRED)."""
    libc = ctypes.CDLL(None, use_errno=True)
    getpeereid = getattr(libc, "getpeereid", None)
    if getpeereid is None:
        return None
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if getpeereid(fd, ctypes.byref(uid), ctypes.byref(gid)) != 0:
        return None
    return int(uid.value)


def connection_of(scope: Scope) -> Connection | None:
    """The connection a request came on, if the server told us (see the module doc)."""
    extensions = scope.get("extensions") or {}
    conn = extensions.get(CONNECTION)
    return conn if isinstance(conn, Connection) else None
