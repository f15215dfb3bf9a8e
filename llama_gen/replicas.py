"""Results between data-parallel replicas: replica leaders send their finished lines and bad
prompt lines to global rank 0, the writer, through torchrun's key-value store, so replicas never
wait for each other."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from . import distributed
from .distributed import Dist
from .records import BadLine


@dataclass(frozen=True)
class Finished:
    """A finished sample's output line, and the prompt file line it answers."""

    output: dict[str, Any]
    source_line: int


Message = Finished | BadLine
_KINDS = {cls.__name__: cls for cls in (Finished, BadLine)}


def encode(message: Message) -> str:
    return json.dumps({"kind": type(message).__name__, **dataclasses.asdict(message)},
                      ensure_ascii=False)


def decode(text: str) -> Message:
    fields = json.loads(text)
    return _KINDS[fields.pop("kind")](**fields)


class StoreLost(Exception):
    """The key-value store carrying the replicas' results is gone (torchrun, which holds it,
    died): results not yet received are not written, and the next run makes them again."""


class Mailbox:
    """Messages from data-parallel replica leaders to global rank 0, through the process group's
    key-value store. A replica `close`s its mailbox when it has sent everything."""

    def __init__(self, dist: Dist):
        self._store = distributed.key_value_store()
        self._replica = dist.data_parallel_rank
        self._replicas = dist.data_parallel_size
        self._sent = 0
        self._received = [0] * self._replicas
        self._closed = [False] * self._replicas

    def send(self, message: Message) -> None:
        with _store_errors():
            self._store.set(f"mail/{self._replica}/{self._sent}", encode(message))
            self._sent += 1
            self._store.set(f"mail/{self._replica}/count", str(self._sent))

    def close(self) -> None:
        with _store_errors():
            self._store.set(f"mail/{self._replica}/closed", str(self._sent))

    def receive(self) -> list[Message]:
        """Messages that arrived since the last call (rank 0 only; never blocks)."""
        messages = []
        with _store_errors():
            for r in range(1, self._replicas):
                # A replica that had nothing to send closes without a count.
                has_mail = self._store.check([f"mail/{r}/count"])
                count = int(self._store.get(f"mail/{r}/count")) if has_mail else 0
                for i in range(self._received[r], count):
                    key = f"mail/{r}/{i}"
                    messages.append(decode(self._store.get(key).decode()))
                    self._store.delete_key(key)
                self._received[r] = count
                if not self._closed[r] and self._store.check([f"mail/{r}/closed"]):
                    self._closed[r] = int(self._store.get(f"mail/{r}/closed")) == count
        return messages

    def all_closed(self) -> bool:
        return all(self._closed[1:])


@contextlib.contextmanager
def _store_errors():
    try:
        yield
    except distributed.StoreError as e:
        raise StoreLost(f"the replicas' results could not go through torchrun's store ({e})"
                        ) from None
