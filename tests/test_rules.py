"""Each record-level rule on crafted strings."""

from __future__ import annotations

import pickle

import pytest

from conftest import make_doc
from cptkit.config import NormalizeConfig, PrepareConfig, QualityConfig, RedactConfig
from cptkit.records import quarantine_reason
from cptkit.rules.language import detect_language
from cptkit.rules.normalize import normalize
from cptkit.rules.quality import quality_issue
from cptkit.rules.redact import redact
from cptkit.rules.steps import Drop, Keep, apply_rules, record_steps, run_steps

# ---------------------------------------------------------------- normalize


def test_normalize_composes_unicode_to_nfc() -> None:
    assert normalize("cafe\u0301", NormalizeConfig()) == "caf\u00e9"


def test_normalize_removes_control_and_zero_width_characters_but_keeps_tabs_and_newlines() -> None:
    assert normalize("a\x00b\x07c\u200bd\ufeffe\tf\ng", NormalizeConfig()) == "abcde\tf\ng"


def test_normalize_whitespace_keeps_indentation() -> None:
    text = "\r\n\r\ndef f():  \r\n    return 1\u00a0+\u20032\n\n\n\n\nend   \n\n"
    assert normalize(text, NormalizeConfig()) == "def f():\n    return 1 + 2\n\nend"


def test_normalize_can_be_switched_off_piece_by_piece() -> None:
    cfg = NormalizeConfig(unicode_nfc=False, strip_control=False, collapse_whitespace=False)
    assert normalize("cafe\u0301\x00  \n\n\n\nx", cfg) == "cafe\u0301\x00  \n\n\n\nx"


# ---------------------------------------------------------------- redact


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("mail jane.doe+cpt@example.co.uk today", "mail <EMAIL> today", "email"),
        ("call +1 415 555 0100 now", "call <PHONE> now", "phone_number"),
        ("call (415) 555-0100 now", "call <PHONE> now", "phone_number"),
        ("server 10.0.12.7 is down", "server <IP_ADDRESS> is down", "ip_address"),
        ("v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 up", "v6 <IP_ADDRESS> up", "ip_address"),
        ("token dapi0123456789abcdef0123456789abcdef here", "token <SECRET> here", "secret"),
        ("key AKIAIOSFODNN7EXAMPLE x", "key <SECRET> x", "secret"),
        ("gh ghp_" + "a" * 36 + " x", "gh <SECRET> x", "secret"),
        ('password = "hunter2hunter2"', 'password = "<SECRET>"', "secret"),
        ("api_key: abcdef123456789", "api_key: <SECRET>", "secret"),
        (
            "Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345",
            "Authorization: Bearer <SECRET>",
            "secret",
        ),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nabc\n-----END RSA PRIVATE KEY-----",
            "<SECRET>",
            "secret",
        ),
    ],
)
def test_redact_replaces_each_kind(text: str, expected: str, kind: str) -> None:
    out, counts = redact(text, RedactConfig(enabled=True))
    assert out == expected
    assert counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.11.7 was released on 2023-12-04.",
        "Version 1.2.3.4 of the library",
        "The range is 100-200 and the year 2024.",
        "Call f(x) with token_count = 5",
        "user@localhost is not a routable address",
    ],
)
def test_redact_leaves_ordinary_technical_text_alone(text: str) -> None:
    out, counts = redact(text, RedactConfig(enabled=True))
    assert (out, counts) == (text, {})


def test_redact_kinds_can_be_switched_off() -> None:
    text = "jane@example.com 10.0.0.1"
    out, counts = redact(text, RedactConfig(enabled=True, emails=False))
    assert out == "jane@example.com <IP_ADDRESS>"
    assert counts == {"ip_address": 1}


# ---------------------------------------------------------------- quality

GOOD = make_doc(3)


def test_good_prose_passes_every_quality_check() -> None:
    assert quality_issue(GOOD, QualityConfig()) is None


@pytest.mark.parametrize(
    ("text", "overrides", "reason"),
    [
        ("Too short to keep.", {}, "too_short"),
        (GOOD, {"max_chars": 100}, "too_long"),
        (GOOD + " Lorem ipsum dolor sit amet.", {}, "blocklist"),
        (GOOD, {"min_words": 10_000}, "too_few_words"),
        (GOOD, {"max_words": 10}, "too_many_words"),
        ("a b c d e f g h i j " * 30, {}, "mean_word_length"),
        (" ".join(["supercalifragilistic"] * 20 + ["the", "of", "and"]) * 5, {}, "mean_word_length"),
        (GOOD + " #" * 60, {}, "symbol_ratio"),
        (GOOD + " 123 456 789" * 60, {}, "alpha_words"),
        (
            GOOD.replace(" the ", " a ").replace(" of ", " in ").replace(" and ", " or ").replace("The ", "A "),
            {"min_stop_words": 50},
            "stop_words",
        ),
        (
            GOOD + "".join(f" a{i}=(&);" for i in range(300)),
            {"max_non_alnum_chars_ratio": 0.3},
            "non_alnum_chars",
        ),
        ("\n".join(f"- item {i} of the list and more words here" for i in range(30)), {}, "bullet_lines"),
        (
            "\n".join(f"Line {i} of the story and then the rest..." for i in range(30)),
            {"max_symbol_word_ratio": None},
            "ellipsis_lines",
        ),
    ],
)
def test_each_quality_check_drops_what_it_should(text: str, overrides: dict[str, object], reason: str) -> None:
    assert quality_issue(text, QualityConfig(**overrides)) == reason  # type: ignore[arg-type]


def test_repetition_checks() -> None:
    repeated_paragraphs = "\n\n".join([GOOD.split("\n\n")[1]] * 4)
    assert quality_issue(repeated_paragraphs, QualityConfig()) == "duplicate_paragraphs"
    lines = "\n".join(
        ["The same line of text with the words in it."] * 5 + [f"Line {i} is new and of its own." for i in range(6)]
    )
    assert quality_issue(lines, QualityConfig(max_duplicate_paragraphs_ratio=None)) == "duplicate_lines"
    no_dup_structure = QualityConfig(
        max_duplicate_paragraphs_ratio=None,
        max_duplicate_paragraph_chars_ratio=None,
        max_duplicate_lines_ratio=None,
        max_duplicate_line_chars_ratio=None,
    )
    spam = " ".join(f"buy the cheap widget now and {w}" for w in ["x" * (i % 7 + 1) for i in range(40)])
    assert quality_issue(spam, no_dup_structure) == "top_2gram"
    no_top = no_dup_structure.model_copy(update={"max_top_ngram_chars_ratio": {}})
    words = GOOD.split()
    text = " ".join(words[:40] + words[:40] + words[40:120])
    assert quality_issue(text, no_top) == "duplicate_5gram"


def test_null_disables_a_check() -> None:
    assert (
        quality_issue("Too short to keep.", QualityConfig(min_chars=None, min_words=None, min_stop_words=None)) is None
    )


# ---------------------------------------------------------------- language


def test_language_detection_uses_the_bundled_model() -> None:
    assert detect_language(GOOD)[0] == "en"
    lang, score = detect_language(
        "Die Bibliothek bietet eine einheitliche Schnittstelle zum Lesen und Schreiben strukturierter Dateien."
    )
    assert lang == "de" and score > 0.5


def test_apply_rules_drops_other_languages_and_keeps_english() -> None:
    german = (
        "Die Bibliothek bietet eine einheitliche Schnittstelle zum Lesen und Schreiben von Dateien. "
        "Jeder Leser nimmt einen Pfad und liefert die Datensätze, und der Schreiber folgt demselben Entwurf. "
        "Die Konfiguration wird aus einer einzigen Datei gelesen, die vor jeder Arbeit geprüft wird. "
        "Fehlt ein Wert, gilt der Standard aus dem Schema; ist ein Wert falsch, nennt das Programm den Schlüssel."
    )
    config = PrepareConfig.model_validate({"quality": {"min_stop_words": 0}})
    assert apply_rules(german, config).reason == "language"
    assert apply_rules(GOOD, config).text == GOOD
    assert apply_rules("  \n\t \n", config).reason == "empty"


def test_quarantine_reasons() -> None:
    assert quarantine_reason(None, "invalid_json", 100) == "invalid_json"
    assert quarantine_reason(None, None, 100) == "null_text"
    assert quarantine_reason("é" * 60, None, 100) == "oversize"
    assert quarantine_reason("a" * 60, None, 100) is None


# ---------------------------------------------------------------- the step list


def test_the_step_list_holds_the_enabled_rules_in_order() -> None:
    names = [s.name for s in record_steps(PrepareConfig())]
    assert names == ["normalize", "empty", "quality", "language"]
    config = PrepareConfig.model_validate({"redact": {"enabled": True}, "language": {"enabled": False}})
    assert [s.name for s in record_steps(config)] == ["normalize", "empty", "redact", "quality"]


def test_a_step_keeps_with_its_text_and_counts_or_drops_with_a_reason() -> None:
    config = PrepareConfig.model_validate({"redact": {"enabled": True}})
    redact_step = next(s for s in record_steps(config) if s.name == "redact")
    assert redact_step("mail jane@example.com") == Keep("mail <EMAIL>", {"email": 1})
    quality_step = next(s for s in record_steps(config) if s.name == "quality")
    assert quality_step("Too short to keep.") == Drop("too_short")


def test_counts_of_a_document_dropped_by_a_later_step_are_kept() -> None:
    config = PrepareConfig.model_validate({"redact": {"enabled": True}})
    outcome = apply_rules("Write to jane@example.com.", config)
    assert outcome.reason == "too_short" and outcome.text is None
    assert outcome.counts == {"redact": {"email": 1}}


def test_steps_survive_pickling_for_other_processes() -> None:
    config = PrepareConfig.model_validate({"redact": {"enabled": True}, "quality": {"min_stop_words": 0}})
    steps = record_steps(config)
    copies = pickle.loads(pickle.dumps(steps))
    german = "Die Bibliothek bietet eine einheitliche Schnittstelle zum Lesen und Schreiben von Dateien. " * 4
    for text in (GOOD + " jane@example.com", german, "  ", "short"):
        assert run_steps(copies, text) == run_steps(steps, text)
