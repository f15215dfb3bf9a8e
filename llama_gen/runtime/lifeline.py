"""A torchrun worker never outlives torchrun.

torchrun starts each worker in a session of its own, so a kill -9 of torchrun (the OOM killer's
way) reaches no worker: orphans would hold the output's lock and, on a GPU server, the memory the
user's rerun needs. Two layers, armed by the entry point before torch is imported:

1. The kernel's parent-death signal: SIGTERM when the parent dies (strictly, the parent's thread
   that started us: torchrun starts its workers from its main thread). Until the job installs its
   handler, SIGTERM ends the process; after, it is the job's clean stop (stop admitting work,
   write what is done, release the lock).
2. A watch thread: once the parent is gone, a worker still alive `grace` seconds later (blocked in
   a store connect or a collective, where the clean stop is never read) exits hard.

Standard library only: this module runs before torch is imported.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

GRACE_SECONDS = 10.0
POLL_SECONDS = 0.2
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_armed = False


def arm(launcher: int | None = None, grace: float = GRACE_SECONDS) -> None:
    """Under torchrun, tie this process's life to `launcher`: the parent PID recorded at the first
    line of the entry point (now, if None). Does nothing a second time, nor without torchrun: a
    plain `llama-gen` run from a shell, nohup or a scheduler is a job of its own that stops when
    its user asks (Ctrl-C, SIGTERM), not when the process that started it exits."""
    global _armed
    if _armed or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    _armed = True
    launcher = os.getppid() if launcher is None else launcher
    kernel_signals = _set_parent_death_signal(signal.SIGTERM)
    # The signal only covers a parent that dies from now on. One that died since `launcher` was
    # recorded left us to a reaper (init or a subreaper): a new parent PID. One that died even
    # before that left `launcher` itself a reaper: we can tell when that is PID 1, not torchrun.
    if os.getppid() != launcher:
        _exit_hard(f"torchrun (pid {launcher}) died before this worker could watch it")
    if launcher == 1 and not _runs_our_command(1):
        _exit_hard("torchrun died before this worker started (init, pid 1, adopted it)")
    threading.Thread(target=_watch, args=(launcher, grace, kernel_signals), name="lifeline",
                     daemon=True).start()


def _set_parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) on Linux; False where there is none."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig), ctypes.c_ulong(0),
                          ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):
        return False


def _runs_our_command(pid: int) -> bool:
    """Whether `pid` looks like our launcher: torchrun's command line ends with the arguments it
    passes to its workers (`torchrun ... llama-gen --ckpt_dir ...`). True where we cannot tell."""
    args = sys.argv[1:]
    try:
        command = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        return True
    command = command[:-1] if command and command[-1] == "" else command
    return not args or command[-len(args):] == args


def _watch(launcher: int, grace: float, kernel_signals: bool) -> None:
    while os.getppid() == launcher:
        time.sleep(POLL_SECONDS)
    if not kernel_signals:  # what the kernel sends elsewhere
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    _exit_hard(f"torchrun (pid {launcher}) died and this worker did not stop within {grace:g} s")


def _exit_hard(reason: str) -> None:
    rank = os.environ.get("RANK", "?")
    try:
        print(f"llama-gen: rank {rank}: {reason}; exiting without cleaning up (run the same command "
              "again to resume)", file=sys.stderr, flush=True)
    except OSError:  # torchrun's pipe may have no reader left
        pass
    os._exit(1)
