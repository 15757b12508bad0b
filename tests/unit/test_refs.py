import pytest

from moorage.errors import InvalidReference
from moorage.refs import ModelRef, parse_ref


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("minilm", ModelRef("minilm")),
        ("minilm@production", ModelRef("minilm", alias="production")),
        ("minilm:12", ModelRef("minilm", version=12)),
        ("bge-small.v1_5", ModelRef("bge-small.v1_5")),
    ],
)
def test_parses_the_three_forms(text, expected):
    ref = parse_ref(text)
    assert ref == expected
    assert str(ref) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  ",
        "../etc",
        "a/b",
        "a\\b",
        "..",
        ".hidden",
        "UPPER",
        "x:0",
        "x:-1",
        "x:1.5",
        "x:",
        "x@",
        "x@1bad",
        "x@prod:1",
        "a" * 64,
        "x@" + "a" * 33,
        "x y",
    ],
)
def test_rejects_bad_references_with_a_clear_error(text):
    with pytest.raises(InvalidReference) as info:
        parse_ref(text)
    assert info.value.status == 400
    assert info.value.code == "invalid_reference"
    assert "\n" not in info.value.message
