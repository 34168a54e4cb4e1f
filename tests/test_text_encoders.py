"""Text encoders: shapes, masks, batch independence, the frozen MiniLM, and the per-caption cache."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from unnoise.errors import UnnoiseError
from unnoise.text.encoders import (
    CachedTextEncoder,
    HFTextEncoder,
    TextEmbedding,
    TextEncoder,
    load_text_encoder,
)

LONG = "a small red circle above a large blue square next to three green triangles on a white background"


@pytest.fixture(scope="module")
def encoder():
    """The packaged all-MiniLM-L6-v2, loaded once for this file.

    The tests encode a few short prompts at a time, where one thread is many times faster than two
    competing with other jobs, so this file runs single-threaded and restores the setting after.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_text_encoder()
    torch.set_num_threads(threads)


class CountingEncoder:
    """Wraps an encoder and records the prompts of every call, to see what a cache asks for."""

    def __init__(self, inner, name=None):
        self.inner, self.calls = inner, []
        self.dim, self.max_tokens, self.name = inner.dim, inner.max_tokens, name or inner.name

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.inner.encode(prompts)


def token_lengths(encoder, prompts):
    ids = encoder.tokenizer(prompts, truncation=True, max_length=encoder.max_tokens)["input_ids"]
    return torch.tensor([len(row) for row in ids])


def assert_same(a: TextEmbedding, b: TextEmbedding, atol=0.0):
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.tokens, b.tokens, atol=atol, rtol=0)
    torch.testing.assert_close(a.pooled, b.pooled, atol=atol, rtol=0)


# --- the encoder ------------------------------------------------------------------------------------------


def test_shapes_and_dtypes(encoder):
    out = encoder.encode(["a red circle", LONG])
    B, T, D = out.tokens.shape
    assert (B, D) == (2, 384) and encoder.dim == 384 and len(out) == 2
    assert out.tokens.dtype == out.pooled.dtype == torch.float32 and out.mask.dtype == torch.bool
    assert out.mask.shape == (2, T) and out.pooled.shape == (2, 384)
    assert isinstance(encoder, TextEncoder) and "all-MiniLM-L6-v2" in encoder.name


def test_mask_matches_tokenised_lengths_and_padding_is_masked_and_zero(encoder):
    prompts = ["a red circle", LONG, "two stars"]
    out = encoder.encode(prompts)
    lengths = token_lengths(encoder, prompts)
    assert torch.equal(out.mask.sum(1), lengths)
    assert torch.equal(out.mask, torch.arange(out.mask.shape[1]) < lengths[:, None])  # right padding
    assert out.tokens[~out.mask].abs().max() == 0


def test_a_prompt_encodes_the_same_alone_or_beside_longer_ones(encoder):
    alone = encoder.encode(["a red circle"])
    batch = encoder.encode([LONG, "a red circle", "x"])
    T = alone.tokens.shape[1]
    assert not batch.mask[1, T:].any()
    # bit for bit: a resumed training run re-encodes its captions in other company (tests/test_training.py)
    assert torch.equal(batch.tokens[1, :T], alone.tokens[0])
    assert torch.equal(batch.pooled[1], alone.pooled[0])


def test_pooled_is_unit_norm_and_closer_for_similar_prompts(encoder):
    circle, ring, triangles = encoder.encode(["a red circle", "a red ring", "three blue triangles"]).pooled
    torch.testing.assert_close(torch.stack([circle, ring, triangles]).norm(dim=1), torch.ones(3))
    assert F.cosine_similarity(circle, ring, dim=0) > F.cosine_similarity(circle, triangles, dim=0)


def test_the_empty_prompt_works(encoder):
    out = encoder.encode(["", "a red circle"])
    assert out.mask[0].sum() == 2  # [CLS] [SEP]
    assert torch.isfinite(out.tokens).all() and out.pooled[0].norm().item() == pytest.approx(1.0)


def test_truncation_at_max_tokens(encoder):
    assert encoder.encode([LONG * 3]).tokens.shape[1] == encoder.max_tokens == 32
    short = copy.copy(encoder)  # shares the frozen model
    short.max_tokens = 8
    out = short.encode([LONG, "a"])
    assert out.tokens.shape[1] == 8 and out.mask[0].all() and out.mask[1].sum() == 3


def test_the_encoder_is_frozen(encoder):
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert all(p.dtype == torch.float32 for p in encoder.model.parameters())
    assert not encoder.encode(["a red circle"]).tokens.requires_grad


def test_a_single_string_is_refused(encoder):
    with pytest.raises(UnnoiseError, match="list"):
        encoder.encode("a red circle")


# --- bad folders ------------------------------------------------------------------------------------------


def test_a_folder_that_is_not_a_model_names_the_path(tmp_path):
    with pytest.raises(UnnoiseError, match=r"config\.json is missing") as error:
        HFTextEncoder(tmp_path)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(UnnoiseError, match="does not exist") as error:
        load_text_encoder(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(error.value)


def test_pickled_weights_are_never_loaded(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnnoiseError, match="pickled"):
        HFTextEncoder(tmp_path)


def test_damaged_weights_give_an_unnoise_error(encoder, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (tmp_path / name).write_bytes((encoder.path / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UnnoiseError, match="could not load") as error:
        HFTextEncoder(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_importing_the_module_does_not_import_transformers():
    code = "import sys, unnoise.text.encoders; print('transformers' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


# --- TextEmbedding ----------------------------------------------------------------------------------------


def test_cat_pads_to_the_longest_and_select_picks_rows(encoder):
    short, long = encoder.encode(["a"]), encoder.encode([LONG, "b"])
    both = TextEmbedding.cat([short, long])
    assert both.tokens.shape == (3, long.tokens.shape[1], 384)
    assert both.mask[0].sum() == short.mask.sum() and both.tokens[0][~both.mask[0]].abs().max() == 0
    assert_same(both.select([1, 2]), long)
    assert_same(both[0].select(torch.tensor([0])).padded_to(0), short.padded_to(both.tokens.shape[1]))
    assert len(both.select([0, 0, 0])) == 3 and len(both[1:]) == 2
    assert both.to("cpu").device.type == "cpu"
    with pytest.raises(UnnoiseError):
        TextEmbedding.cat([])


# --- the cache --------------------------------------------------------------------------------------------


def test_the_cache_returns_what_the_encoder_returns_and_encodes_only_new_captions(encoder):
    counting = CountingEncoder(encoder)
    cached = CachedTextEncoder(counting)
    first = ["a red circle", LONG, "a red circle", ""]
    assert_same(cached.encode(first), encoder.encode(first), atol=1e-5)
    # duplicates encoded once, each new caption alone (its states never depend on its batch)
    assert counting.calls == [["a red circle"], [LONG], [""]]

    second = ["two stars", "a red circle", "", "a blue ring"]
    assert_same(cached.encode(second), encoder.encode(second), atol=1e-5)
    assert counting.calls[3:] == [["two stars"], ["a blue ring"]]

    assert_same(cached.encode(first[::-1]), encoder.encode(first[::-1]), atol=1e-5)
    assert len(counting.calls) == 5 and len(cached) == 5
    alone = CachedTextEncoder(encoder).encode(["two stars"])
    assert torch.equal(
        cached.encode(["two stars"]).tokens, alone.tokens
    )  # bit for bit, whatever came with it


def test_precompute_fills_the_cache_in_batches(encoder):
    counting = CountingEncoder(encoder)
    cached = CachedTextEncoder(counting)
    captions = [f"{n} red circles" for n in range(5)]
    assert cached.precompute(captions, batch_size=2) == 5
    assert [len(c) for c in counting.calls] == [2, 2, 1]
    assert cached.precompute(captions) == 0
    cached.encode(captions[::2])
    assert len(counting.calls) == 3


def test_a_bounded_cache_keeps_the_most_recently_used_captions(encoder):
    """Issue 12: the server cached every distinct prompt for ever (about 60 KB each)."""
    counting = CountingEncoder(encoder)
    cached = CachedTextEncoder(counting, max_entries=2)
    for prompt in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        cached.encode([prompt])
    assert len(cached) == 2 and "a" in cached and "c" in cached and "b" not in cached
    assert_same(cached.encode(["b", "c"]), encoder.encode(["b", "c"]), atol=1e-5)
    assert counting.calls == [["a"], ["b"], ["c"], ["b"]]


def test_first_last_tokens_are_the_mean_of_the_embedding_layer_and_the_last(encoder):
    first_last = load_text_encoder(token_layers="first-last")
    prompts = ["a red circle in the top left", "a red circle in the top right", ""]
    a, b = encoder.encode(prompts), first_last.encode(prompts)
    assert first_last.name == encoder.name + "-first-last"  # caches keyed by name keep them apart
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)  # the pooled vector is the last's
    inputs = encoder.tokenizer(prompts[:1], return_tensors="pt")
    with torch.no_grad():
        first = encoder.model(**inputs, output_hidden_states=True).hidden_states[0][0]  # (T, D)
    torch.testing.assert_close(b.tokens[0, : len(first)], (first + a.tokens[0, : len(first)]) / 2)
    assert torch.all(b.tokens[~b.mask] == 0)


def test_first_last_tokens_keep_left_and_right_apart(encoder):
    """The reason for the option (issue 11): "left" and "right" nearly merge in MiniLM's last layer."""
    first_last = load_text_encoder(token_layers="first-last")
    prompts = ["a red circle in the top left", "a red circle in the top right"]
    word = 7  # [CLS] a red circle in the top left [SEP]: the position word
    last_gap, first_last_gap = (
        (e.tokens[0, word] - e.tokens[1, word]).norm()
        for e in (encoder.encode(prompts), first_last.encode(prompts))
    )
    assert first_last_gap > 1.8 * last_gap


def test_unknown_token_layers_are_named():
    with pytest.raises(UnnoiseError, match="token layers must be one of last, first-last"):
        load_text_encoder(token_layers="middle")
    with pytest.raises(UnnoiseError, match="token layers"):
        load_text_encoder(token_layers=["last"])
