"""Host names as policies and flows compare them: one canonical form, two kinds of pattern.

Contract:
- `canonical(name)` -> the lowercase ASCII (A-label, punycode) form without a trailing dot, so
  `bücher.example`, `BÜCHER.example.` and `xn--bcher-kva.example` are one name. Raises ValueError
  for something that is not a host name (empty labels, labels over 63 octets, names over 253).
  IDNA 2008 with UTS #46 mapping (the `idna` package), as browsers do.
- `Pattern(text)`: an exact name, or `*.suffix`, which matches every name *under* the suffix at any
  depth (`*.example.eu` matches `api.example.eu` and `a.b.example.eu`, not `example.eu` itself:
  list both to cover both). Any other wildcard is refused (ValueError), so a typo cannot widen a
  pattern silently.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

import idna

SOURCE_WORDS = {"sni": "from TLS SNI", "quic-sni": "from QUIC SNI", "dns": "from DNS"}


@lru_cache(maxsize=65536)
def canonical(name: str) -> str:
    n = name.strip().rstrip(".")
    if not n:
        raise ValueError("empty host name")
    if n.isascii():
        n = n.lower()
        if n.startswith("xn--") or ".xn--" in n:
            try:  # an A-label must decode, or it is not one
                idna.decode(n)
            except idna.IDNAError as e:
                raise ValueError(f"'{name}' is not a valid internationalised name ({e})") from None
    else:
        try:
            n = idna.encode(n, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"'{name}' is not a valid internationalised name ({e})") from None
    labels = n.split(".")
    if len(n) > 253 or any(not lab or len(lab) > 63 for lab in labels):
        raise ValueError(f"'{name}' is not a host name (empty or over-long label)")
    return n


def display(name: str) -> str:
    """The name as a person reads it: the Unicode form after the A-label when they differ."""
    if "xn--" not in name:
        return name
    try:
        u = idna.decode(name)
    except idna.IDNAError:
        return name
    return f"{name} ({u})" if u != name else name


class Pattern:
    __slots__ = ("text", "exact", "suffix")

    def __init__(self, text: str):
        self.text = text
        if text.startswith("*."):
            self.exact, self.suffix = None, "." + canonical(text[2:])
            if "*" in text[2:]:
                raise ValueError(f"'{text}': only a leading '*.' is allowed")
        else:
            if "*" in text or "?" in text or "[" in text:
                raise ValueError(f"'{text}': a pattern is an exact name or '*.suffix'")
            self.exact, self.suffix = canonical(text), None

    def matches(self, name: str) -> bool:
        """`name` must already be canonical."""
        return name == self.exact if self.exact is not None else name.endswith(self.suffix)

    def __repr__(self) -> str:
        return self.text

    def __eq__(self, other) -> bool:
        return isinstance(other, Pattern) and (self.exact, self.suffix) == (other.exact, other.suffix)

    def __hash__(self) -> int:
        return hash((self.exact, self.suffix))


# Letters of Cyrillic and Greek that render like Latin ones (UTS #39 confusables, the common subset):
# a label made only of them reads as a Latin word it is not.
_LATIN_LOOKALIKES = set("аеорсухіјѕԁһӏԛԝаеіорсѕху" + "οαερτυικνχΑΒΕΖΗΙΚΜΝΟΡΤΥΧ" + "АВЕКМНОРСТХ")


def _script(ch: str) -> str | None:
    """The script of a letter as Unicode names it (LATIN, CYRILLIC, GREEK, ...); None for digits,
    hyphens and other characters every script shares."""
    if not ch.isalpha():
        return None
    try:
        word = unicodedata.name(ch).split()[0]
    except ValueError:
        return None
    return {"CJK": "HAN"}.get(word, word)


def script_warnings(name: str) -> list[str]:
    """Why a host name in a policy may be a look-alike of another (UTS #39, in part): a label that
    mixes scripts (`pаypal` with a Cyrillic а), or a label written wholly in Cyrillic or Greek
    letters that look Latin, beside Latin labels. Empty when neither."""
    shown = name[2:] if name.startswith("*.") else name
    try:
        shown = idna.decode(canonical(shown))
    except (ValueError, idna.IDNAError):
        return []
    out = []
    labels = shown.split(".")
    latin_elsewhere = any({_script(c) for c in lab} - {None} == {"LATIN"} for lab in labels)
    for lab in labels:
        scripts = {_script(c) for c in lab} - {None}
        if len(scripts) > 1:
            out.append(f"label '{lab}' mixes scripts ({', '.join(sorted(s.title() for s in scripts))})")
        elif scripts & {"CYRILLIC", "GREEK"} and latin_elsewhere and all(c in _LATIN_LOOKALIKES or not c.isalpha()
                                                                        for c in lab):
            out.append(f"label '{lab}' is written in {next(iter(scripts)).title()} letters that look Latin")
    return out
