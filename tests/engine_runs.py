"""Running requests through the engine and comparing with each one run alone; catching host reads
in a step."""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

from llama_gen.engine.engine import Engine
from llama_gen.engine.requests import Completion, Request
from llama_gen.model.transformer import Transformer


def run(engine: Engine, requests: list[Request]) -> dict:
    """Completions by tag; every request gets exactly one, carrying that very request."""
    done = list(engine.generate(requests))
    by_tag = {c.request.tag: c for c in done}
    assert len(done) == len(requests) == len(by_tag)
    assert all(by_tag[r.tag].request is r for r in requests)
    return by_tag


def alone(model: Transformer, request: Request, max_seq_len: int = 64, stop_ids=()) -> Completion:
    [done] = Engine(model, stop_ids, max_batch_size=1, max_seq_len=max_seq_len).generate([request])
    return done


HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default",
              "aten.is_nonzero.default", "aten.equal.default"}


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value to the host (a device sync on a GPU). The one
    copy a step makes on purpose, its tokens' `tolist`, does not dispatch an op."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))
