"""What one socket write costs the writer, in CPU time, when it wakes a reader asleep on
another core: the cost behind "one request write to the engine costs as much as all the chunk
writes to the client" in the gateway's profiles (bench/RESULTS.md, issue 18).

A reader pinned to core 0 answers each message with 16 small writes; the writer, pinned to
core 1, sends one message every 10 ms (the reader is asleep when it arrives), then the same
back to back. CPU time is the writer thread's own (`time.thread_time_ns`), as /proc counts it
for the overhead benchmark. On a VM, waking an idle vCPU is an IPI through the hypervisor.

    python bench/wakeup_cost.py [READER_CORE]     # 0: the other core (default); 1: the same
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time


def _reader(server: socket.socket, core: int) -> None:
    os.sched_setaffinity(0, {core})
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while conn.recv(65536):
        for _ in range(16):
            conn.send(b"x" * 300)
    os._exit(0)


def _measure(sock: socket.socket, gap: float, n: int = 500) -> tuple[float, float]:
    cpu, wall = [], []
    for _ in range(n):
        if gap:
            time.sleep(gap)
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        sock.send(b"P" * 400)
        cpu.append(time.thread_time_ns() - c0)
        wall.append(time.perf_counter_ns() - w0)
        got = 0
        while got < 16 * 300:
            got += len(sock.recv(65536))
    return statistics.median(cpu) / 1000, statistics.median(wall) / 1000


def main() -> None:
    reader_core = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    pid = os.fork()
    if pid == 0:
        _reader(server, reader_core)
    os.sched_setaffinity(0, {1})
    sock = socket.create_connection(server.getsockname())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for label, gap in (("reader asleep (100/s)", 0.01), ("back to back", 0.0)):
        cpu, wall = _measure(sock, gap)
        print(f"one write, {label}, reader on core {reader_core}: "
              f"CPU {cpu:.1f} us, wall {wall:.1f} us (medians)")
    sock.close()
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
