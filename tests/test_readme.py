"""README's reading order and exercises point at what is really there: line ranges, function names, graders.

After moving code, `python tests/test_readme.py --fix` rewrites the reading order's line ranges from the code."""
import ast
import re
import sys
from pathlib import Path

from test_exercises import EXERCISES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title):
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def top_level(path, name):
    """(first line with decorators, last line) of the top-level def / class `name` in `path`."""
    for node in ast.parse((ROOT / path).read_text()).body:
        if getattr(node, "name", None) == name:
            return min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno
    raise AssertionError(f"README's reading order names {name} in {path}, which has no such top-level definition")


def test_reading_order_line_ranges_match_the_code():
    rows = re.findall(r"^\| \d+ \| `([\w/]+\.py)` (\d+)-(\d+) `([^`]+)` \|", section("Reading order"), re.M)
    assert len(rows) >= 10, "the reading order table was not found"
    for path, first, last, what in rows:
        first, last = int(first), int(last)
        lines = (ROOT / path).read_text().splitlines()
        if what.startswith("# "):  # a section of a script: from its header to the line before the next header
            assert lines[first - 1].startswith("# ---") and what[2:] in lines[first - 1], (path, first, what)
            assert last == len(lines) or lines[last].startswith("# ---"), (path, last, "is not a section's end")
        else:
            assert top_level(path, what) == (first, last), f"{path} {what}: README says {first}-{last}"


def test_exercises_table_is_the_checked_list():
    grader = r"`python -m pytest tests/test_equations.py -k (\w+)`"
    rows = re.findall(r"^\| [^|]+ \| `([\w/]+\.py)` `([\w.]+)` \| " + grader + r" \|", section("Exercises"), re.M)
    assert rows == [tuple(e) for e in EXERCISES]


if __name__ == "__main__" and sys.argv[1:] == ["--fix"]:
    def fixed(m):
        path, what = m.group(1), m.group(4)
        if what.startswith("# "):
            lines = (ROOT / path).read_text().splitlines()
            first = next(i for i, line in enumerate(lines, 1) if line.startswith("# ---") and what[2:] in line)
            last = next((i for i in range(first, len(lines)) if lines[i].startswith("# ---")), len(lines))
        else:
            first, last = top_level(path, what)
        return f"`{path}` {first}-{last} `{what}`"

    text = re.sub(r"`([\w/]+\.py)` (\d+)-(\d+) `([^`]+)`", fixed, README)
    (ROOT / "README.md").write_text(text)
    print("README.md: reading order line ranges rewritten" if text != README else "README.md: already right")
