"""The package surface: lazy exports that `dir()` shows, doc pointers that name existing sections."""

from __future__ import annotations

import pytest


def test_dir_lists_the_lazy_public_names():
    import reaemb_trl

    names = dir(reaemb_trl)
    assert set(reaemb_trl.__all__) <= set(names), sorted(set(reaemb_trl.__all__) - set(names))
    assert {"ThoughtEmbedder", "LRCLTrainer", "CRRLTrainer", "export_table", "__version__"} <= set(names)
    assert names == sorted(names)
    for name in reaemb_trl.__all__:  # every listed name resolves
        assert getattr(reaemb_trl, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        reaemb_trl.nope  # noqa: B018


def test_references_to_doc_sections_name_existing_sections():
    """Every `docs/<name>.md, "<Section>"` pointer in code, configs, tests and docs names a heading of that file."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    files = [p for pattern in ("reaemb_trl/**/*.py", "recipes/**/*.py", "recipes/**/*.yaml", "tests/*.py", "docs/*.md",
                               "examples/*.py", "README.md") for p in repo.glob(pattern)]  # fmt: skip
    pointer = re.compile(r'docs/([\w-]+\.md)`?,\s*(?:#\s*)?"([^"]{1,80})"')
    headings: dict[str, set[str]] = {}
    bad = []
    for path in files:
        for doc, section in pointer.findall(path.read_text(encoding="utf-8")):
            section = " ".join(section.replace("#", " ").split())
            if doc not in headings:
                text = (repo / "docs" / doc).read_text(encoding="utf-8") if (repo / "docs" / doc).is_file() else ""
                headings[doc] = {line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")}
            if section not in headings[doc]:
                bad.append(f"{path.relative_to(repo)}: docs/{doc}, {section!r}")
    assert not bad, "pointers to missing doc sections:\n" + "\n".join(bad)
