"""Text as the program compares and writes it: captions normalised for every score (lower-cased,
punctuation removed, whitespace collapsed), and file names escaped so that each stays on its line.
"""
import re


_PUNCT = re.compile(r"[^\w\s]")


def normalize(text):
    return " ".join(_PUNCT.sub("", text.lower()).split())


# Characters a name may hold that would break a line of output or its encoding: C0 and C1 controls
# (a newline, a tab, ESC), DEL, the Unicode line and paragraph separators (str.splitlines splits on them).
_BREAKING = {*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029}


def shown_name(name):
    """A file name as every output writes it (stdout's path<TAB>caption, --json, --output): as it is,
    but for a byte that is not UTF-8 (Python holds it as a lone surrogate, caf\udce9) and a control
    character, which are written as Python escapes (caf\xe9.jpg, a\nb.jpg). So each name stays on
    its line, every output is valid UTF-8, and --resume and metrics.py match the names again."""
    if all(ord(ch) not in _BREAKING and not 0xD800 <= ord(ch) <= 0xDFFF for ch in name):
        return name
    out = []
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the undecodable byte code - 0xDC00
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code in _BREAKING or 0xD800 <= code <= 0xDFFF:
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch) or
                       (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"))
        else:
            out.append(ch)
    return "".join(out)
