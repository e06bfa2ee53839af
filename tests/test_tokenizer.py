"""The CLIP tokenizer of common.py: known ids, cleaning, truncation, the vocabulary file, and parity with
open_clip's tokenizer over a few hundred varied strings."""
import hashlib
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import EOT_ID, SOT_ID, decode, tokenize  # noqa: E402

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]


def test_known_ids():
    t = tokenize("a photo of a cat")
    assert t.shape == (1, 77) and t.dtype == torch.long
    assert t[0].tolist() == CAT + [0] * 70
    assert tokenize("a photo of a dog.")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407]


def test_case_and_whitespace_do_not_matter():
    assert torch.equal(tokenize("A PHOTO OF A CAT"), tokenize("a photo of a cat"))
    assert torch.equal(tokenize("  a\tphoto\n\nof   a cat  "), tokenize("a photo of a cat"))


def test_batch_shape_and_padding():
    t = tokenize(["a cat", "", "a photo of a dog."])
    assert t.shape == (3, 77)
    assert t[1, :3].tolist() == [SOT_ID, EOT_ID, 0]
    for row in t:  # SOT first, one EOT, zeros after it
        n = int((row != 0).sum())
        assert row[0] == SOT_ID and row[n - 1] == EOT_ID and (row[n:] == 0).all()
        assert int(row.argmax()) == n - 1  # text features are pooled at the largest id


@pytest.mark.parametrize("context_length", [77, 16, 5, 2])
def test_truncation_keeps_eot_last(context_length):
    long = " ".join(["photograph"] * 300)
    t = tokenize([long, "a cat"], context_length=context_length)
    assert t.shape == (2, context_length)
    assert t[0, 0] == SOT_ID and t[0, -1] == EOT_ID and (t[0] != 0).all()
    assert (t[0, 1:-1] != EOT_ID).all()


def test_longer_context_pads():
    t = tokenize("a photo of a cat", context_length=100)
    assert t.shape == (1, 100) and t[0].tolist() == CAT + [0] * 93


def test_html_entities_are_unescaped_twice():
    assert torch.equal(tokenize("fish &amp;amp; chips"), tokenize("fish & chips"))
    assert torch.equal(tokenize("&lt;b&gt;bold&lt;/b&gt;"), tokenize("<b>bold</b>"))
    assert torch.equal(tokenize("&quot;quoted&quot;"), tokenize('"quoted"'))


def test_unicode_and_emoji():
    for text in ["café naïve résumé", "日本語のテキスト", "東京 タワー", "😀 🎉 👍🏽", "привет мир", "καλημέρα"]:
        t = tokenize(text)[0]
        n = int((t != 0).sum())
        assert n > 2 and t[n - 1] == EOT_ID
        assert decode(t) == " ".join(text.split()).lower()
    assert torch.equal(tokenize("CAFÉ"), tokenize("café"))
    # ftfy repairs mojibake before tokenizing
    assert torch.equal(tokenize("cafÃ©"), tokenize("café"))


def test_decode_round_trip():
    assert decode(tokenize("a photo of a cat")[0]) == "a photo of a cat"
    assert decode(CAT) == "a photo of a cat"
    text = "an unusually long hyphenless sentence about photographers and their cameras"
    assert decode(tokenize(text)[0]) == text
    # punctuation and digits are separate pre-tokens, so they come back space-separated
    assert decode(tokenize("a dog. 42")[0]) == "a dog . 4 2"


def test_special_token_spelling_is_plain_text():
    # no caption can inject a start or end token
    ids = tokenize("<|endoftext|> <|startoftext|>")[0].tolist()
    n = ids.index(EOT_ID)
    assert SOT_ID not in ids[1:n] and EOT_ID not in ids[:n]


def test_vocabulary_file_hash():
    with open(common.BPE_PATH, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    tok = common.SimpleTokenizer()
    assert len(tok.encoder) == common.VOCAB_SIZE == 49408
    assert tok.encoder["<|startoftext|>"] == SOT_ID and tok.encoder["<|endoftext|>"] == EOT_ID


def _parity_strings():
    """Deterministic, varied strings: fixed cases, then random mixtures over several scripts."""
    fixed = [
        "", " ", "a", "A", "a photo of a cat", "a photo of a dog.", "It's what we're doing, isn't it? I'd've...",
        "IT'S WE'LL THEY'VE I'M HE'D", "fish &amp;amp; chips", "&lt;div&gt;&nbsp;&#39;x&#39;&quot;y&quot;",
        "&amp;lt;script&amp;gt;", "café naïve résumé Ångström Øresund façade", "cafÃ© mojibake Ã¼ber",
        "漢字 日本語 中文 한국어 ภาษาไทย", "東京タワーの夜景", "😀🎉👍🏽 👨‍👩‍👧 ❤️ 🇫🇷", "emoji🙂in🙂words",
        "1234567890 3.14159 2024-01-01 1,000,000 ½ ² ٣ ४", "!!!???...---,,,;;;:::", "((([[[{{{<<<>>>}}}]]])))",
        "\t\n\r  multiple   spaces\u00a0and\u2003others  ", "ﬁ ligature ﬀ ﬃ", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
        "Ελληνικά κείμενα", "Русский текст", "עברית", "العربية النص", "हिन्दी पाठ", "http://example.com/a?b=c&d=e#f",
        "user@example.com #hashtag @mention $100 50% a+b=c", "zero\u200bwidth\u200dspace", "tab\tseparated\tcols",
        "a" * 500, "the " * 200, "x" + "!" * 300, "日" * 120, "😀" * 100,
    ]
    rng = random.Random(1234)
    alphabets = [
        "abcdefghijklmnopqrstuvwxyz      ", "ABCDEFGHIJKLMNOPQRSTUVWXYZ    ", "àáâäãåæçèéêëìíîïñòóôöõøùúûüýÿß  ",
        "0123456789   ", ".,;:!?-_()[]{}'\"/\\@#$%^&*+=~`|<>  ", "漢字日本語中文한국어テキスト  ", "😀🎉👍🏽❤️🙂🚀🌍  ",
        "абвгдежзийклмнопрстуфхцчшщъыьэюя  ", "αβγδεζηθικλμνξοπρστυφχψω  ", "\t\n\r\u00a0\u2003",
    ]
    entities = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&amp;amp;", "&nbsp;", "&eacute;", "&#x1F600;"]
    words = ["photo", "cat", "dog", "the", "of", "a", "beautiful", "sunset", "over", "mountains", "it's",
             "we'll", "New York", "don't", "1080p", "HD", "wallpaper"]
    out = list(fixed)
    while len(out) < 330:
        kind = rng.random()
        if kind < 0.35:  # a character soup over one to three alphabets
            chars = "".join(rng.sample(alphabets, rng.randint(1, 3)))
            s = "".join(rng.choice(chars) for _ in range(rng.randint(1, 60)))
        elif kind < 0.7:  # caption-like word sequences with entities and punctuation
            parts = [rng.choice(words) for _ in range(rng.randint(1, 20))]
            for _ in range(rng.randint(0, 3)):
                parts.insert(rng.randrange(len(parts) + 1), rng.choice(entities + list(".,!?;:-")))
            s = " ".join(parts)
            s = s.upper() if rng.random() < 0.2 else s
        elif kind < 0.85:  # very long texts
            s = " ".join(rng.choice(words) for _ in range(rng.randint(60, 200)))
        else:  # digits and punctuation runs
            s = "".join(rng.choice("0123456789.,-+/:%$ ") for _ in range(rng.randint(1, 80)))
        out.append(s)
    assert not any("<end_of_text>" in s or "<start_of_text>" in s for s in out)
    return out


def test_parity_with_open_clip():
    open_clip = pytest.importorskip("open_clip")
    theirs = open_clip.get_tokenizer("ViT-B-32")
    texts = _parity_strings()
    assert len(texts) >= 300
    ours_ids, their_ids = tokenize(texts), theirs(texts)
    mismatches = [t for t, a, b in zip(texts, ours_ids, their_ids) if not torch.equal(a, b)]
    assert not mismatches, f"{len(mismatches)} strings differ, e.g. {mismatches[:3]!r}"
    for n in (16, 100):
        assert torch.equal(tokenize(texts[:50], context_length=n), theirs(texts[:50], context_length=n))
