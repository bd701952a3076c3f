"""What a person's name may hold: one character rule, for the validator (`problem`) and for
the OpenAPI document (`pattern()`), so the two cannot drift apart.
"""

import functools
import unicodedata

import mailer

# Embeddings, overrides and isolates: they reorder the text that follows them (in a mail,
# a log, a terminal) until a terminator that may never come. The marks LRM, RLM and ALM
# (U+200E, U+200F, U+061C) stay allowed: they touch only their neighbours, and a
# right-to-left name may need one beside digits or Latin letters.
BIDI_CONTROLS = frozenset('\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069')
# Letters and symbols that are blank by design: a known way to make an "empty" name.
BLANK_GRAPHEMES = frozenset('\u115f\u1160\u3164\uffa0\u2800')
# Letters, numbers, punctuation and symbols; not marks (alone they show nothing), spaces,
# format characters (U+200B, U+FEFF, U+00AD...), private-use or unassigned code points.
VISIBLE_CATEGORIES = frozenset('LNPS')


def is_forbidden(char):
    return unicodedata.category(char) in mailer.CONTROL_CATEGORIES or char in BIDI_CONTROLS


def is_visible(char):
    return unicodedata.category(char)[0] in VISIBLE_CATEGORIES and char not in BLANK_GRAPHEMES


def problem(name):
    """What is wrong with the characters of `name`, or None."""
    if mailer.has_control_characters(name):
        return 'must not contain control characters'
    if not BIDI_CONTROLS.isdisjoint(name):
        return 'must not contain bidirectional controls (U+202A to U+202E, U+2066 to U+2069)'
    if not any(map(is_visible, name)):
        return 'must contain at least one visible character'
    return None


def _class(predicate):
    """An ECMA regex class of the BMP characters `predicate` holds for.

    Only BMP escapes, and no surrogates: without the `u` flag an ECMA engine sees a
    character beyond the BMP as two surrogates, which the class then lets through, as
    Python's `re` lets the character through. So beyond the BMP every character counts
    as allowed and visible here; the validator alone refuses the few that are not.
    """
    ranges, start = [], None
    for code in range(0x10000):
        inside = not 0xd800 <= code <= 0xdfff and predicate(chr(code))
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            ranges.append((start, code - 1))
            start = None
    if start is not None:
        ranges.append((start, 0xffff))
    return ''.join(f'\\u{a:04x}' if a == b else f'\\u{a:04x}-\\u{b:04x}' for a, b in ranges)


@functools.cache
def pattern():
    """The ECMA regex that accepts what `problem` accepts, for the untrimmed value (within
    the BMP: see `_class`)."""
    allowed = f'[^{_class(is_forbidden)}]'
    visible = f'[^{_class(lambda char: not is_visible(char))}]'
    return f'^{allowed}*{visible}{allowed}*$'
