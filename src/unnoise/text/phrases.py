"""Attribute phrases of a prompt: which words modify which noun ("a red circle and a blue square").

Attribute binding (`unnoise.nn.layers.bind_attention`) needs to know, token by token, which words are the
attributes of which noun. Without a parser, a phrase is a run of content words between function words
(articles, numbers, conjunctions, prepositions, words of place) and punctuation: its last word is the noun,
the words before it are its attributes. "two big red circles to the left of a blue square" gives
(big red -> circles) and (blue -> square); "left" alone is no phrase. Compound nouns ("fire truck") read
as an attribute and a noun, which binds them together all the same.

The codes, one per token: 0 for a token in no phrase, g for an attribute of phrase g, -g for a piece of
phrase g's noun (g = 1, 2, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

SPECIAL_TOKENS = frozenset({"[CLS]", "[SEP]", "[PAD]", "[UNK]", "<s>", "</s>", "<pad>"})
_FUNCTION_WORDS_TEXT = """
    a an the this that these those some any each every no its their his her my our your
    one two three four five six seven eight nine ten many several few
    and or but nor with without
    of to in on at by for from into onto over under above below beneath behind beside between near next
    around across along through inside outside upon against among toward towards
    left right top bottom middle center centre corner side front back up down
    is are was were be being been has have had
"""
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS_TEXT.split())


def attribute_phrases(pieces: Sequence[str]) -> list[int]:
    """Each token's phrase code (see the module docstring) for a prompt tokenised as `pieces` (WordPiece:
    a piece starting with "##" continues the word before it)."""
    words: list[list[int]] = []  # the token positions of each word, in order
    for t, piece in enumerate(pieces):
        if piece.startswith("##") and words and words[-1]:
            words[-1].append(t)
        else:
            words.append([t])
    codes = [0] * len(pieces)
    phrase: list[list[int]] = []
    count = 0
    for word in [*words, []]:  # a final empty word closes the last phrase
        text = "".join(pieces[t].removeprefix("##") for t in word).lower()
        if word and text.isalpha() and text not in FUNCTION_WORDS and pieces[word[0]] not in SPECIAL_TOKENS:
            phrase.append(word)
            continue
        if len(phrase) >= 2:
            count += 1
            for attribute in phrase[:-1]:
                for t in attribute:
                    codes[t] = count
            for t in phrase[-1]:
                codes[t] = -count
        phrase = []
    return codes
