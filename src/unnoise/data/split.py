"""A fixed, seeded held-out split of a captioned folder, by concept.

Images that are variants of one another (the skin tones of one emoji, numbered photos of one object) must
fall on the same side, or a held-out image is a near copy of a training one and memorisation passes for
generalisation. An image's concept is its caption with variant qualifiers removed (`VARIANT_WORDS`:
Unicode's skin-tone modifiers, "medium-dark skin tone" and the like). A concept's side is decided by a
hash of (seed, concept) alone, so it does not move when images are added, removed or reordered.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

DEFAULT_HELD_OUT = 0.1  # of the concepts
VARIANT_WORDS = re.compile(r"(?:[:,]\s*)?\b(?:light|medium-light|medium|medium-dark|dark) skin tone\b")


def concept_of(caption: str) -> str:
    """The caption without variant qualifiers: 'handshake, light skin tone' -> 'handshake'."""
    stripped = VARIANT_WORDS.sub("", caption)
    return re.sub(r"[\s,:;]+$", "", stripped).strip().lower()


def is_held_out(concept: str, fraction: float, seed: int = 0) -> bool:
    """Whether the concept is held out: its hash, read as a number in [0, 1), is below `fraction`."""
    digest = hashlib.sha256(f"{seed}:{concept}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def held_out_mask(
    captions: Sequence[str],
    fraction: float = DEFAULT_HELD_OUT,
    seed: int = 0,
    concepts: Sequence[str] | None = None,
) -> list[bool]:
    """For each item, whether it is held out; `concepts` (one per item) overrides the captions' concepts."""
    keys = [concept_of(c) for c in captions] if concepts is None else [str(k) for k in concepts]
    return [is_held_out(key, fraction, seed) for key in keys]
