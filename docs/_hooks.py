"""mkdocs hooks (mkdocs.yml ``hooks:``): the site is built from the same
Markdown that reads right in the repository.

- The home page is README.md itself.
- Relative links are written for the repository (README.md links
  ``docs/usage.md``, docs pages link ``../benchmarks/results/alloc.png``).
  Links into docs/ are rewritten to the site's pages; files elsewhere in
  the repository that a page links to are copied into the site under
  ``repo/`` as they are (Markdown ones too, unrendered) and the links
  point there.  A link to a file that does not
  exist is left alone, so ``mkdocs build --strict`` still fails on it.
"""
from __future__ import annotations

import os
import posixpath
import re
from typing import Any, Dict, Iterator, Optional

from mkdocs.structure.files import File

# [text](target) and ![alt](target), not inside code spans or blocks
_LINK = re.compile(r"(!?\[[^\]\n]*\]\()([^)\s]+)(\))")
_FENCE = re.compile(r"^( *)(```|~~~).*?^\1\2", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")

_REPO_DIR = "repo"
_sources: Dict[str, str] = {}   # site path of a page -> its path in the repository


class _RepoFile(File):
    """A repository file linked from a page, copied into the site as it is
    (a linked Markdown file too: a generated benchmark report is data to
    read, not a page of the site)."""

    def is_documentation_page(self) -> bool:
        return False


def _repo_root(config: Any) -> str:
    return os.path.dirname(os.path.abspath(str(config["config_file_path"])))


def _docs_prefix(config: Any) -> str:
    return posixpath.relpath(os.path.abspath(config["docs_dir"]), _repo_root(config)) + "/"


def _target(link: str, source: str) -> Optional[str]:
    """The repository path a relative link of ``source`` points at, or None
    for links to elsewhere (URLs, anchors, absolute paths)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#|^/", link):
        return None
    path = link.split("#", 1)[0].split("?", 1)[0]
    if not path:
        return None
    return posixpath.normpath(posixpath.join(posixpath.dirname(source), path))


def _links(markdown: str) -> Iterator["re.Match[str]"]:
    """Relative links outside code: (match, target) pairs."""
    masked = _FENCE.sub(lambda m: " " * len(m.group(0)), markdown)
    masked = _CODE.sub(lambda m: " " * len(m.group(0)), masked)
    for m in _LINK.finditer(masked):
        yield m


def on_files(files: Any, config: Any) -> Any:
    root = _repo_root(config)
    docs = _docs_prefix(config)
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    files.append(File.generated(config, "index.md", content=readme))
    _sources.clear()
    _sources["index.md"] = "README.md"
    pages = {"README.md": readme}
    for file in list(files):
        if file.src_uri.endswith(".md") and file.src_uri != "index.md":
            _sources[file.src_uri] = docs + file.src_uri
            with open(file.abs_src_path, encoding="utf-8") as f:
                pages[docs + file.src_uri] = f.read()
    # files outside docs/ that the pages link to
    wanted = set()
    for source, markdown in pages.items():
        for m in _links(markdown):
            target = _target(m.group(2), source)
            if (target is not None and not target.startswith(docs)
                    and not target.startswith("..")
                    and os.path.isfile(os.path.join(root, target))):
                wanted.add(target)
    for target in sorted(wanted):
        files.append(_RepoFile.generated(config, f"{_REPO_DIR}/{target}",
                                         abs_src_path=os.path.join(root, target)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    source = _sources.get(page.file.src_uri)
    if source is None:
        return markdown
    docs = _docs_prefix(config)
    root = _repo_root(config)
    here = posixpath.dirname(page.file.src_uri)
    out, last = [], 0
    for m in _links(markdown):
        target = _target(m.group(2), source)
        if target is None:
            continue
        anchor = m.group(2)[len(m.group(2).split("#", 1)[0]):]
        if target.startswith(docs):
            new = posixpath.relpath(target[len(docs):], here or ".") + anchor
        elif os.path.isfile(os.path.join(root, target)):
            new = posixpath.relpath(f"{_REPO_DIR}/{target}", here or ".") + anchor
        else:
            continue  # broken or a directory: mkdocs reports it as it is
        out.append(markdown[last:m.start(2)] + new)
        last = m.end(2)
    out.append(markdown[last:])
    return "".join(out)
