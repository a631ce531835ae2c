"""Secret keeps its value out of every printed form; redact() scrubs it from text."""

from __future__ import annotations

from rerank_service.config.secret import Secret, redact

VALUE = "sk-very-secret-0123456789"
MASK = "**********"


def test_str_shows_only_the_mask() -> None:
    assert str(Secret(VALUE)) == MASK


def test_repr_shows_only_the_mask() -> None:
    text = repr(Secret(VALUE))
    assert VALUE not in text
    assert text == f"Secret({MASK})"


def test_f_string_and_format_spec_do_not_reveal_the_value() -> None:
    secret = Secret(VALUE)
    rendered = f"{secret} {secret!r} {secret!s} {[secret]} {(secret,)} { ({'k': secret}) }"
    assert VALUE not in rendered
    assert MASK in rendered


def test_reveal_returns_the_value() -> None:
    assert Secret(VALUE).reveal() == VALUE


def test_matches_is_true_for_the_exact_value() -> None:
    assert Secret(VALUE).matches(VALUE)


def test_matches_rejects_prefixes_suffixes_case_changes_and_padding() -> None:
    secret = Secret(VALUE)
    for candidate in (VALUE[:-1], VALUE + "x", "x" + VALUE, VALUE.upper(), f" {VALUE}", f"{VALUE} ", ""):
        assert not secret.matches(candidate), candidate


def test_matches_handles_non_ascii_values() -> None:
    secret = Secret("clé-ünïcode")
    assert secret.matches("clé-ünïcode")
    assert not secret.matches("cle-unicode")


def test_equality_compares_values_and_only_with_secrets() -> None:
    assert Secret(VALUE) == Secret(VALUE)
    assert Secret(VALUE) != Secret(VALUE + "x")
    assert Secret(VALUE) != VALUE
    assert hash(Secret(VALUE)) == hash(Secret(VALUE))


def test_redact_replaces_every_occurrence() -> None:
    text = f"key={VALUE}; again {VALUE}{VALUE} end"
    assert redact(text, [Secret(VALUE)]) == f"key={MASK}; again {MASK}{MASK} end"


def test_redact_replaces_every_secret_in_the_list() -> None:
    text = "first=aaaa-key second=bbbb-key"
    assert redact(text, [Secret("aaaa-key"), Secret("bbbb-key")]) == f"first={MASK} second={MASK}"


def test_redact_leaves_text_without_secrets_unchanged() -> None:
    assert redact("nothing to hide", [Secret(VALUE)]) == "nothing to hide"
    assert redact("nothing to hide", []) == "nothing to hide"


def test_redact_ignores_an_empty_secret() -> None:
    # An empty value would otherwise match between every character.
    assert redact("abc", [Secret("")]) == "abc"


def test_redact_masks_a_short_secret_wherever_it_stands_alone() -> None:
    text = 'invalid token pt-05: "pt-05", Bearer pt-05, key=k, [k]'
    assert redact(text, [Secret("pt-05"), Secret("k")]) == (
        f'invalid token {MASK}: "{MASK}", Bearer {MASK}, key={MASK}, [{MASK}]'
    )


def test_redact_leaves_a_short_secret_inside_a_longer_word() -> None:
    # A one-letter test key must not turn every "k" of every log line into a mask.
    assert redact("rerank kind", [Secret("k"), Secret("1234567")]) == "rerank kind"
    assert redact("abc123 xabc abcx", [Secret("abc")]) == "abc123 xabc abcx"


def test_redact_masks_a_long_secret_even_inside_a_word() -> None:
    assert redact(f"x{VALUE}y", [Secret(VALUE)]) == f"x{MASK}y"
