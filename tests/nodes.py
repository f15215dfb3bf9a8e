"""torchrun launches for end-to-end tests of replicas: one "node" is one torchrun launcher in a
process group of its own; several nodes on this machine meet through a c10d rendezvous on
localhost. Killing a node kills its launcher and every worker (torchrun starts its workers in
sessions of their own, so a killpg of the launcher's group alone would miss them)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from runs import descendants

LLAMA_GEN = str(Path(sys.executable).parent / "llama-gen")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return dict(item.partition("=")[::2] for item in raw.decode(errors="replace").split("\0"))


def is_alive(pid: int) -> bool:
    """Running and not a zombie (a killed worker whose launcher died stays one until reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


class Node:
    """One torchrun launcher and its workers. stderr is read as it comes, each line with the
    time it arrived (workers write straight to the launcher's stderr)."""

    def __init__(self, launcher_args: list[str], job_args: list[str]):
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *launcher_args, "--no-python",
             LLAMA_GEN, *job_args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.seen: set[int] = set()  # every worker pid met, to clean up orphans too
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line))

    @property
    def stderr(self) -> str:
        return "".join(line for _, line in self.lines)

    def workers(self) -> dict[int, int]:
        """Global rank of each live worker, by pid."""
        pids = descendants(self.proc.pid)
        self.seen.update(pids)
        ranks = {pid: environ(pid).get("RANK") for pid in pids}
        return {pid: int(rank) for pid, rank in ranks.items() if rank is not None}

    def kill(self) -> None:
        """SIGKILL to the launcher's process group and to each worker's: as if the node died."""
        self.workers()
        for pid in [self.proc.pid, *sorted(self.seen)]:
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def wait(self, timeout: float) -> int:
        """The launcher's exit status; TimeoutExpired if it runs longer than `timeout`."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.workers()
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.proc.args, timeout)
            time.sleep(0.05)
        self._reader.join(timeout=max(1.0, deadline - time.monotonic()))
        return self.proc.returncode

    def live_workers(self) -> list[int]:
        return [pid for pid in self.seen if is_alive(pid)]


def start_nodes(job_args: list[str], nnodes: int = 2, nproc: int = 1) -> list[Node]:
    """`nnodes` launchers meeting at a fresh c10d rendezvous on localhost. The first one
    hosts the rendezvous store and, started first, usually takes global rank 0 (torchrun ranks
    nodes by their launcher's pid); `Node.workers` tells for sure."""
    port, run_id = free_port(), f"llama-gen-test-{os.getpid()}-{time.monotonic_ns()}"
    nodes = []
    for node_rank in range(nnodes):
        nodes.append(Node(["--nnodes", str(nnodes), "--node_rank", str(node_rank),
                           "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
                           "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", run_id,
                           "--rdzv_conf", f"is_host={int(node_rank == 0)}"], job_args))
        if node_rank == 0:
            time.sleep(0.2)  # its pid is lower anyway; this lets it bind the port first
    return nodes


def start_standalone(job_args: list[str], nproc: int) -> Node:
    return Node(["--standalone", "--nproc_per_node", str(nproc)], job_args)


def stop_all(nodes: list[Node]) -> None:
    """Kill whatever is left of `nodes`, including workers their dead launchers left behind."""
    for node in nodes:
        if node.proc.poll() is None:
            node.kill()
        for pid in node.live_workers():
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            node.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
