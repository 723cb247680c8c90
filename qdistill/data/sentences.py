"""Sentences and titled sections of a folder of reST files, for embedding tasks.

Split by file exactly as the token corpus is (`text.split_files`): the held-out files give the sentences
whose neighbours a student must agree on with its teacher, and the sections whose title must retrieve
the section's own text. Markup (roles, literals, emphasis, link targets) is reduced to its words;
directives, code and tables are left out: they are not sentences."""

from __future__ import annotations

import re
from pathlib import Path

from qdistill.data.text import SPLITS, _read, list_text_files, split_files
from qdistill.errors import QDistillError

UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>_:.])\1{2,}\s*$")  # a reST section adornment
ROLE = re.compile(r":[\w:+.-]+:`~?!?([^`<]*?)\s*(?:<[^>]*>)?`")  # :func:`~os.fork` -> os.fork; :ref:`text <target>` -> text
LINK = re.compile(r"`([^`<]*?)\s*(?:<[^>]*>)?`__?")  # `text <url>`_ -> text
LITERAL = re.compile(r"``(.*?)``|\*\*(.*?)\*\*|\*(\S.*?)\*|`([^`]*)`")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
MIN_WORDS, MAX_WORDS = 6, 64  # a sentence; shorter are headings or fragments, longer are run-ons of lists
SECTION_WORDS = 200  # the answer of a title query: the first words of its section (cut again at the task's max_len)


def plain(text: str) -> str:
    """The words of a piece of reST: roles, links, literals and emphasis reduced to their text."""
    text = ROLE.sub(r"\1", text)
    text = LINK.sub(r"\1", text)
    text = LITERAL.sub(lambda m: next(g for g in m.groups() if g is not None), text)
    return " ".join(text.split())


def sections(text: str) -> list[tuple[str, str]]:
    """(title, body) of each titled section, in order; the text before the first title is left out."""
    lines = text.splitlines()
    starts = [
        i
        for i in range(len(lines) - 1)
        if lines[i].strip() and not lines[i][0].isspace() and not UNDERLINE.match(lines[i])
        and UNDERLINE.match(lines[i + 1]) and len(lines[i + 1].rstrip()) >= len(lines[i].rstrip())
    ]
    out = []
    for n, i in enumerate(starts):
        end = starts[n + 1] - 1 if n + 1 < len(starts) else len(lines)  # the next title's overline, if any, is markup
        body = [line for line in lines[i + 2 : end] if not UNDERLINE.match(line)]
        out.append((plain(lines[i]), "\n".join(body)))
    return out


CODE_DIRECTIVES = ("code-block", "code", "sourcecode", "doctest", "testcode", "testoutput", "productionlist", "literalinclude", "highlight", "csv-table", "table", "list-table", "math", "raw", "image", "figure", "toctree", "index")


def paragraphs(body: str) -> list[str]:
    """The prose paragraphs of a section body, as plain text. Indented prose (a function's description under
    its directive) counts; code (after `::` or a code directive, up to the next line indented no deeper),
    directive and option lines, comments and tables do not; list items count as prose."""
    out, current, skip_deeper = [], [], None

    def flush():
        text = plain(" ".join(current))
        if text:
            out.append(text)
        current.clear()

    for line in body.splitlines():
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if skip_deeper is not None and (not stripped or indent > skip_deeper):
            continue  # inside code, a table or a comment
        skip_deeper = None
        if not stripped:
            flush()
            continue
        directive = re.match(r"\.\.\s+([\w:-]+)::", stripped)
        if stripped.startswith("..") and (not directive or directive.group(1) in CODE_DIRECTIVES):
            flush()  # a comment, a link target or a code-like directive: it and its indented content
            skip_deeper = indent
            continue
        if directive or (stripped.startswith(":") and not current) or stripped.startswith(("+-", "===", "|", ">>>")):
            flush()  # a directive's own line and its options: the content below is prose
            continue
        if re.match(r"^(\*|-|#\.|\d+\.)\s+", stripped):
            flush()  # a list item starts a paragraph of its own
            stripped = re.sub(r"^(\*|-|#\.|\d+\.)\s+", "", stripped)
        current.append(stripped)
        if stripped.endswith("::"):
            current[-1] = stripped[:-1] if not stripped.endswith(" ::") else stripped[:-3]
            flush()
            skip_deeper = indent  # a literal block follows
    flush()
    return out


def sentences(paragraph: str) -> list[str]:
    return [s for s in SENTENCE_END.split(paragraph) if MIN_WORDS <= len(s.split()) <= MAX_WORDS]


def _split_files(folder: Path, split: str) -> list[Path]:
    if split not in SPLITS:
        raise QDistillError(f"unknown split {split!r}; choose train, val or test")
    return [folder / rel for rel in split_files(list_text_files(folder))[split]]


def load_sentences(folder: str | Path, split: str) -> list[str]:
    """Every prose sentence of the split's files, in file order, each once."""
    seen: dict[str, None] = {}
    for path in _split_files(Path(folder), split):
        for _, body in sections(_read(path)):
            for p in paragraphs(body):
                seen.update(dict.fromkeys(sentences(p)))
    return list(seen)


def load_sections(folder: str | Path, split: str, min_words: int = 20) -> list[tuple[str, str]]:
    """(title, the first SECTION_WORDS words of its prose) for the split's sections whose title is unique in
    the split (case aside: "Examples" would have many right answers) and whose prose has `min_words` words."""
    found = []
    for path in _split_files(Path(folder), split):
        for title, body in sections(_read(path)):
            words = " ".join(paragraphs(body)).split()
            if title and len(words) >= min_words:
                found.append((title, " ".join(words[:SECTION_WORDS])))
    counts: dict[str, int] = {}
    for title, _ in found:
        counts[title.lower()] = counts.get(title.lower(), 0) + 1
    return [(t, body) for t, body in found if counts[t.lower()] == 1]
