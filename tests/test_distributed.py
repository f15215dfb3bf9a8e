"""Devices and torchrun's environment: where each process runs. (The collectives run under
torchrun in test_cli.py.)"""
import subprocess
import sys

import pytest
import torch

from llama_gen.errors import UserError
from llama_gen.runtime.distributed import Launch, launch_env, pick_device


def test_device_defaults_to_this_process_gpu_else_the_cpu():
    assert pick_device(local_rank=0, local_world_size=1, gpus=0) == torch.device("cpu")
    assert pick_device(local_rank=1, local_world_size=2, gpus=4) == torch.device("cuda", 1)
    # Where each process sees only its own GPU (CUDA_VISIBLE_DEVICES per process), it is cuda:0.
    assert pick_device(local_rank=3, local_world_size=4, gpus=1) == torch.device("cuda", 0)
    assert pick_device(1, 2, gpus=2, device="cpu") == torch.device("cpu")


def test_cuda_without_an_index_is_this_process_gpu():
    assert pick_device(2, 4, gpus=4, device="cuda") == torch.device("cuda", 2)
    assert pick_device(0, 1, gpus=1, device="cuda:0") == torch.device("cuda", 0)


@pytest.mark.parametrize("device, local_world_size, gpus, message", [
    ("cuda", 1, 0, "torch sees no CUDA GPU here"),
    ("cuda:2", 1, 2, "this machine has 2 GPU(s), cuda:0 to cuda:1"),
    ("cuda:0", 2, 2, "puts all 2 processes of this machine on one GPU"),
    ("gpu", 1, 1, "--device 'gpu' is not a device"),
])
def test_impossible_devices_are_user_errors(device, local_world_size, gpus, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pick_device(0, local_world_size, gpus, device)


def test_launch_env_reads_torchrun_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launch_env() == Launch(0, 1, 0, 1)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert launch_env() == Launch(5, 8, 1, 4)
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(UserError, match="must be integers"):
        launch_env()


STOPPED_STORE = """
import os, signal, subprocess, sys
from datetime import timedelta
from llama_gen.runtime import distributed
server = subprocess.Popen([sys.executable, "-c", "import sys, time, torch.distributed as d; "
                           "s = d.TCPStore('localhost', 0, is_master=True, wait_for_workers=False); "
                           "print(s.port, flush=True); time.sleep(120)"], stdout=subprocess.PIPE)
os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=server.stdout.readline().decode().strip())
store = distributed.key_value_store(timedelta(seconds=1))
print("answered", store.add("k", 1), flush=True)
os.kill(server.pid, signal.SIGSTOP)  # a machine that vanished: connected, never answering
try:
    store.add("k", 1)
except distributed.StoreError as e:
    print(type(e).__name__, e, flush=True)
server.kill()
os._exit(0)  # the call that never returned stays blocked in its thread
"""


def test_a_store_that_stops_answering_is_an_error_not_a_hang():
    """TCPStore's own timeout does not cover a server that stopped answering: our client gives
    up after its timeout (1 s here; a minute in a run) with a StoreError."""
    done = subprocess.run([sys.executable, "-c", STOPPED_STORE], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.splitlines() == ["answered 1", "StoreTimeout no answer to add in 1 s"], \
        done.stdout + done.stderr
