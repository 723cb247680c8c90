"""Regenerate README.md's benchmark section from bench/results/*.md (between the bench markers)."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def section() -> str:
    parts = []
    kinds = ["accuracy", "ablation", "speed"]  # the table first, then what each option buys, then the ratios
    files = sorted((ROOT / "bench" / "results").glob("*.md"), key=lambda p: (kinds.index(p.stem.split("-")[0]) if p.stem.split("-")[0] in kinds else 9, p.name))
    for md in files:
        body = re.sub(r"^# ", "### ", md.read_text().strip(), count=1)  # nest under the README's heading
        body = re.sub(r"\]\((?!https?:)([^)]+)\)", r"](bench/results/\1)", body)  # links relative to the root
        parts.append(body)
    return "\n\n".join(parts)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    readme.write_text(f"{head}{START}\n{section()}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    main()
