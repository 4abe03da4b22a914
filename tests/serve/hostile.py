"""A corpus of hostile texts (issue 11) shared by the in-process and the real-HTTP serve tests, and
``roundtrip``, how every HTTP test compares a served answer with the in-process predictor's."""

from __future__ import annotations

import json

from conftest import roundtrip  # noqa: F401 (re-exported: the serve tests import it from here)

from mtl.config import ServeSpec

HOSTILE = {
    "lone high surrogate": "fly \ud800 to boston",
    "lone low surrogate": "\udc00 denver",
    "NUL": "fly\x00 to \x00boston",
    "BOM": "\ufefffly to boston",
    "RTL override": "fly \u202eto boston\u202c tomorrow",
    "zero-width only": "\u200b\u200c\u200d\ufeff",
    "controls only": "\x00\x01\x1f\x7f",
    "combining-mark flood": "fly " + "a" + "\u0301" * 5000 + " boston",
    "5,000 emoji": "\U0001F600" * 5000,
    "emoji words": " ".join(["\U0001F600\U0001F680"] * 300),
    "100-kB word": "x" * 100_000,
    "100-kB word among words": "fly to " + "y" * 100_000 + " boston",
    "mixed scripts": "لندن to 東京 via Zürich",
    "newlines and tabs": "fly\nto\tboston\r\n",
}
REFUSED = {"lone high surrogate", "lone low surrogate", "zero-width only", "controls only"}
HOSTILE_SPEC = ServeSpec(max_texts=4, max_chars=120_000, max_body_bytes=1_000_000)


def check_hostile_answer(text: str, status: int, body: dict) -> None:
    """200 with entity spans that slice the text as sent, or a 4xx with a message; never a 500."""
    assert status in (200, 422), (status, body)
    if status == 200:
        [pred] = body["predictions"]
        assert set(pred) == {"intent", "slots", "sentiment", "topic"}
        assert len(pred["slots"]["tags"]) <= len(text.split())
        for ent in pred["slots"]["entities"]:
            assert text[ent["start"]:ent["end"]] == ent["text"]
    else:
        assert "texts[0]" in json.dumps(body["detail"])


def docs_assets(html: str) -> list[str]:
    """Every script and stylesheet the /docs page loads."""
    import re

    return re.findall(r'<script[^>]+src="([^"]+)"', html) + re.findall(r'<link[^>]+href="([^"]+)"', html)


