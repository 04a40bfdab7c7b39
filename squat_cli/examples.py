"""A task split's examples as read from their source, before tokenising (GLUE files, the hub, or a user task's
files)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Examples:
    text_a: list[str]
    text_b: Optional[list[str]]
    label: list[float] | list[int]
    fingerprint: str
    """Identifies the source content (file hash or hub fingerprint), for caching."""

    def __len__(self) -> int:
        return len(self.text_a)
