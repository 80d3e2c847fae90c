#!/usr/bin/python3
"""bench/clients/cut_proxy.py - a TCP proxy on loopback whose connections the
reconnect benchmark cuts on request (docs/benchmarks.md, "Client libraries").

Usage: cut_proxy.py TARGET_PORT

Listens on two free 127.0.0.1 ports and prints one line on stdout:

    cut_proxy listening 127.0.0.1:DATA control 127.0.0.1:CONTROL

Every connection accepted on DATA gets its own connection to
127.0.0.1:TARGET_PORT (arqd); bytes are forwarded both ways unchanged. On the
control port a client sends the line "cut"; the proxy then resets (RST, by
SO_LINGER 0) both sides of every connection it forwards and answers

    cut T N

where T is CLOCK_MONOTONIC in nanoseconds, read just before the first reset
(the clock time.monotonic_ns(), node's process.hrtime.bigint() and
clock_gettime(CLOCK_MONOTONIC) all read, so a driver in another process can
subtract it from its own reading), and N the number of connections cut. The
answer is written once the sockets are closed. Runs until SIGTERM or SIGINT.
Standard library only.
"""
import asyncio
import signal
import socket
import struct
import sys
import time


def _reset(transport):
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class _Side(asyncio.Protocol):
    """One side of a forwarded connection; `peer` is the other side once both
    are connected."""

    def __init__(self, proxy, accepted):
        self.proxy = proxy
        self.accepted = accepted  # the side a client connected to (not the upstream)
        self.peer = None
        self.transport = None
        self.early = []  # bytes that arrived before the peer was connected

    def connection_made(self, transport):
        self.transport = transport
        self.proxy.sides.add(self)
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        p = self.peer
        if p is None:
            self.early.append(data)
        elif not p.transport.is_closing():
            p.transport.write(data)

    def eof_received(self):
        if self.peer is not None and not self.peer.transport.is_closing():
            self.peer.transport.close()
        return False

    def connection_lost(self, exc):
        self.proxy.sides.discard(self)
        if self.peer is not None and not self.peer.transport.is_closing():
            self.peer.transport.close()

    # the other side cannot keep up: stop reading from this one meanwhile
    def pause_writing(self):
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.peer is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


class CutProxy:
    def __init__(self, target_port):
        self.target_port = target_port
        self.sides = set()  # every connected side of every forwarded connection

    def accept(self):
        client = _Side(self, True)
        asyncio.get_running_loop().create_task(self._upstream(client))
        return client

    async def _upstream(self, client):
        up = _Side(self, False)
        try:
            await asyncio.get_running_loop().create_connection(lambda: up, "127.0.0.1",
                                                               self.target_port)
        except OSError:
            _reset(client.transport)
            return
        if client.transport is None or client.transport.is_closing():
            up.transport.close()
            return
        client.peer, up.peer = up, client
        for data in client.early:
            up.transport.write(data)
        client.early = []

    def cut(self):
        """Reset every forwarded connection; (T, connections cut)."""
        sides = list(self.sides)
        t = time.monotonic_ns()
        for side in sides:
            _reset(side.transport)
        return t, sum(1 for s in sides if s.accepted)

    async def control(self, reader, writer):
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                if line.strip() != b"cut":
                    writer.write(b"error unknown command\n")
                    continue
                t, n = self.cut()
                await asyncio.sleep(0)  # the transports close their sockets in the next turn
                writer.write(f"cut {t} {n}\n".encode())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def main():
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: cut_proxy.py TARGET_PORT")
    proxy = CutProxy(int(sys.argv[1]))
    loop = asyncio.get_running_loop()
    data = await loop.create_server(proxy.accept, "127.0.0.1", 0)
    ctl = await asyncio.start_server(proxy.control, "127.0.0.1", 0)
    print(f"cut_proxy listening 127.0.0.1:{data.sockets[0].getsockname()[1]} "
          f"control 127.0.0.1:{ctl.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    data.close()
    ctl.close()
    proxy.cut()


if __name__ == "__main__":
    asyncio.run(main())
