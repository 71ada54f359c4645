"""``--shard i/N``: a stable partition of a store's study keys.

N independent processes (a SLURM array, say) share one store and one output folder;
each takes the studies whose key hashes to its index. The partition depends on the key
alone, so a resubmitted shard gets the same studies, and a study is in exactly one shard.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"a shard is i/N with 0 <= i < N, not {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
        if not m:
            raise ValueError(f"--shard takes i/N (e.g. 0/4: the first of four), not {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def whole(self) -> bool:
        return self.count == 1

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, key: str) -> bool:
        return self.whole or bucket(key, self.count) == self.index

    def select(self, keys) -> list[str]:
        return [k for k in keys if self.owns(k)]


def bucket(key: str, count: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % count
