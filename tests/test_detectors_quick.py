"""Every detector's quick check is a pure optimization: it must be true of any text in which the
detector finds something, or masking would silently skip values."""

from __future__ import annotations

import re
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from policy import detectors

# Texts made of what the patterns look for (digits and their separators, letters, signs), with
# known positives spliced in so every pattern gets matches to check against.
ALPHABET = string.digits * 3 + " -.+()@:/=_'\"ABCDXYZabcdkey" + "ſK"
SAMPLES = ["123-45-6789", "4111 1111 1111 1111", "4111111111111111", "+1 415 555 2671", "(415) 555-2671",
           "AB 12 34 56 C", "12345678Z", "X-1234567-L", "GB82 WEST 1234 5698 7654 32", "bob@example.com",
           "password 'x'", "api_key=abc", "PaSsWoRd: y", "https://u:p@h", "AKIAIOSFODNN7EXAMPLE"]


def _found_without_quick(d: detectors.Detector, text: str) -> bool:
    return any(d.validate is None or d.validate(m.group(0)) for m in d.pattern.finditer(text))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.text(ALPHABET, max_size=12), st.sampled_from(SAMPLES)), max_size=6))
def test_quick_checks_never_reject_a_text_the_pattern_matches(parts):
    text = " ".join(parts)
    for d in detectors.DETECTORS.values():
        if d.quick is not None and _found_without_quick(d, text):
            assert d.quick(text), (d.name, text)


def test_the_samples_themselves():
    for text in SAMPLES:
        for d in detectors.DETECTORS.values():
            if d.quick is not None and _found_without_quick(d, text):
                assert d.quick(text), (d.name, text)


@settings(max_examples=400, deadline=None)
@given(st.text(string.digits, min_size=1, max_size=12))
def test_short_numbers_skip_no_detector(text):
    """find() answers a bare number under 13 digits with nothing, unasked: no pattern may match one."""
    for d in detectors.DETECTORS.values():
        assert not _found_without_quick(d, text), (d.name, text)
    assert detectors.find(text) == []


def _digit_profile(text: str) -> tuple[int, int]:
    runs = [len(r) for r in re.findall(r"\d+", text)]
    return sum(runs), max(runs, default=0)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(st.text(ALPHABET + "²٣", max_size=14), st.sampled_from(SAMPLES)), max_size=6))
def test_digit_needs_never_reject_a_text_the_pattern_matches(parts):
    """min_digits/min_run, like quick, only save work: every match leaves them satisfied."""
    text = " ".join(parts)
    total, longest = _digit_profile(text)
    for d in detectors.DETECTORS.values():
        if d.min_digits and _found_without_quick(d, text):
            assert total >= d.min_digits and longest >= d.min_run, (d.name, text)


def test_digit_needs_hold_for_every_sample_match():
    for text in SAMPLES:
        for d in detectors.DETECTORS.values():
            for m in d.pattern.finditer(text):
                if d.validate is None or d.validate(m.group(0)):
                    total, longest = _digit_profile(m.group(0))
                    assert total >= d.min_digits and longest >= d.min_run, (d.name, m.group(0))
