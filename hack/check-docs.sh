#!/usr/bin/env bash
# Checks that every relative link in the project's documentation resolves: README.md,
# docs/*.md, SECURITY.md, CHANGELOG.md and examples/**/README.md. A link must name an existing
# file or directory (relative to the file that holds it), and a link with an #anchor into a
# Markdown file must name one of its headings, slugged as GitHub does (lowercase; punctuation
# dropped except '-' and '_'; each space becomes '-'; a repeated heading gets -1, -2, ...).
# Links inside code blocks and code spans are not links; absolute URLs (https:, mailto:, ...)
# are not checked. Exits 1 with the list of broken links.
#
#   hack/check-docs.sh [FILE.md...]     # default: the files above
set -euo pipefail
cd "$(dirname "$0")/.."

exec python3 - "$@" <<'PY'
import glob
import os
import re
import sys
from urllib.parse import unquote

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"\]\(\s*<?([^()\s<>]*(?:\([^()\s]*\)[^()\s<>]*)*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def default_files():
    files = ["README.md", *sorted(glob.glob("docs/*.md")), "SECURITY.md", "CHANGELOG.md"]
    files += sorted(
        f for f in glob.glob("examples/**/README.md", recursive=True) if "node_modules" not in f
    )
    return [f for f in files if os.path.isfile(f)]


def outside_fences(path):
    """(line number, line) of the lines outside fenced code blocks, as written."""
    fence = None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            m = FENCE.match(line)
            if fence is None and m:
                fence = m.group(1)[0] * len(m.group(1))
                continue
            if fence is not None:
                if m and m.group(1).startswith(fence):
                    fence = None
                continue
            yield number, line.rstrip("\n")


def prose_lines(path):
    """(line number, text) of the lines outside fenced code blocks, code spans blanked out."""
    for number, line in outside_fences(path):
        yield number, CODE_SPAN.sub(lambda s: " " * len(s.group(0)), line)


def slug(text):
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags go
    text = text.replace("`", "").lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


anchors_cache = {}


def anchors(path):
    if path not in anchors_cache:
        seen, found = {}, set()
        for _, line in outside_fences(path):
            found.update(HTML_ANCHOR.findall(line))
            h = HEADING.match(line)
            if h:
                base = slug(h.group(2))
                n = seen.get(base, 0)
                seen[base] = n + 1
                found.add(base if n == 0 else f"{base}-{n}")
        anchors_cache[path] = found
    return anchors_cache[path]


def targets(line):
    for m in INLINE_LINK.finditer(line):
        yield m.group(1)
    m = REFERENCE_DEF.match(line)
    if m:
        yield m.group(1)


problems = []
files = sys.argv[1:] or default_files()
for path in files:
    for number, line in prose_lines(path):
        for target in targets(line):
            if not target or SCHEME.match(target) or target.startswith("//"):
                continue
            file_part, _, anchor = target.partition("#")
            file_part = unquote(file_part)
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            where = f"{path}:{number}: ({target})"
            if not os.path.exists(resolved):
                problems.append(f"{where} no such file: {resolved}")
                continue
            if anchor and resolved.endswith(".md") and os.path.isfile(resolved):
                if unquote(anchor) not in anchors(resolved):
                    problems.append(f"{where} {resolved} has no heading with the anchor #{anchor}")

if problems:
    print(f"{len(problems)} broken relative link(s):")
    for p in problems:
        print(f"  {p}")
    sys.exit(1)
print(f"docs: every relative link resolves ({len(files)} files)")
PY
