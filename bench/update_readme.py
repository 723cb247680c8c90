"""Regenerate bench/README.md's results section from bench/results/*.md (between the bench markers).

    python bench/update_readme.py     # from anywhere; rewrites only the text between the two markers
"""

import re
from pathlib import Path

BENCH = Path(__file__).parent
TARGET = BENCH / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def section() -> str:
    parts = []
    kinds = ["accuracy", "lm", "ablation", "speed"]  # the tables first, then what each option buys, then the ratios
    files = sorted((BENCH / "results").glob("*.md"), key=lambda p: (kinds.index(p.stem.split("-")[0]) if p.stem.split("-")[0] in kinds else 9, p.name))
    for md in files:
        body = re.sub(r"^(#+) ", r"##\1 ", md.read_text().strip(), flags=re.M)  # every heading nested under "Results"
        body = re.sub(r"\]\((?!https?:)([^)]+)\)", r"](results/\1)", body)  # links relative to bench/
        parts.append(body)
    return "\n\n".join(parts)


def main() -> None:
    text = TARGET.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{TARGET} lacks the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    TARGET.write_text(f"{head}{START}\n{section()}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    main()
