"""Sentences and sections of reST files: prose kept (indented descriptions too), markup reduced to words,
code, directives, comments and tables left out, titles that are not unique dropped."""

from qdistill.data.sentences import load_sections, load_sentences, paragraphs, plain, sections
from qdistill.data.text import list_text_files, split_files

DOC = """\
:mod:`spam` --- Eggs and spam
========================================

.. module:: spam
   :synopsis: Eggs.

.. index::
   single: spam; eggs in a sentence that is not prose at all

The :func:`~spam.fry` function fries an egg in the pan.  It returns ``None`` when the pan is cold.

Example::

   result = spam.fry(egg)  # this is code and not a sentence at all

.. function:: fry(egg, pan=None)

   Fry *egg* in the given pan, or in the default pan when none is given.

   .. code-block:: python

      fry(Egg("large"), pan=Pan("iron"))  # more code that is not a sentence

* A list item is a sentence of its own as well, like this one.

.. This comment says something that nobody should ever read as prose.

Examples
--------

+------+------+
| a table row with many words in it | x |
+------+------+

Short.
"""


def test_prose_is_kept_and_markup_code_directives_are_not():
    (title, body), = sections(DOC)[:1]
    assert title == "spam --- Eggs and spam"
    found = paragraphs(body)
    assert found == [
        "The spam.fry function fries an egg in the pan. It returns None when the pan is cold.",
        "Example:",
        "Fry egg in the given pan, or in the default pan when none is given.",
        "A list item is a sentence of its own as well, like this one.",
    ]
    assert plain(":ref:`the tutorial <tut-intro>` and `Python <https://python.org>`_") == "the tutorial and Python"


def test_splits_follow_the_token_corpus_and_titles_must_be_unique(tmp_path):
    for i in range(12):
        (tmp_path / f"doc{i}.rst").write_text(DOC.replace("Eggs and spam", f"Eggs number {i}").replace("fries an egg", f"fries egg {i}"))
    splits = split_files(list_text_files(tmp_path))
    for split in ("train", "val", "test"):
        sents = load_sentences(tmp_path, split)
        numbered = [f"The spam.fry function fries egg {f[3:-4]} in the pan." for f in splits[split]]
        assert sents[0] == numbered[0] and len(sents) == len(numbered) + 3 and set(numbered) < set(sents)  # the others once
        titles = [t for t, _ in load_sections(tmp_path, split)]
        assert titles == [f"spam --- Eggs number {f[3:-4]}" for f in splits[split]]  # "Examples" repeats: left out
