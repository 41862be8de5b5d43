"""Every ``python`` and ``bash`` block of README.md runs as written, so that no example can rot.

Each block runs in a fresh process in a temporary folder, with this Python's environment first on
``PATH`` (``python`` is the interpreter running the tests) and without the ``TRITON_INTERPRET``
that tests/conftest.py sets: a reader's shell does not have it. A block that must not run in CI
(a GPU script, a fresh install) has ``<!-- not run: reason -->`` on the line above it; it is
reported as a skip with that reason. ``text`` blocks (the layout tree) are not code; any other
language fails the inventory test, so that a new block is either run or marked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>.*?)\s*-->$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
RUN = ("python", "bash")
NOT_CODE = ("text",)
TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason, where the block is marked


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a markdown text, each with the ``not run`` reason above it (if any)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if i == len(lines):
            raise ValueError(f"README line {start + 1}: a code block that is never closed")
        above = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marked = NOT_RUN.match(above)
        blocks.append(Block(start + 1, m["lang"], "\n".join(lines[start + 1:i]) + "\n",
                            marked["reason"] if marked else None))
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
CODE = [b for b in BLOCKS if b.lang in RUN]


def test_parser_reads_fences_and_marks():
    text = "x\n<!-- not run: needs a GPU -->\n\n```bash\nnvidia-smi\n```\n```python\nprint(1)\n```\n```text\na\n```\n"
    got = readme_blocks(text)
    assert [(b.line, b.lang, b.code, b.not_run) for b in got] == [
        (4, "bash", "nvidia-smi\n", "needs a GPU"), (7, "python", "print(1)\n", None), (10, "text", "a\n", None)]
    with pytest.raises(ValueError, match="line 1: a code block that is never closed"):
        readme_blocks("```python\nprint(1)\n")


def test_inventory():
    """Every block is python, bash or text; every mark has a reason and sits above code; the
    examples of the layers, the kernels and the profiler run (at least four blocks)."""
    unknown = [f"line {b.line}: ```{b.lang}" for b in BLOCKS if b.lang not in RUN + NOT_CODE]
    assert not unknown, f"README blocks of no known language (use python, bash or text): {unknown}"
    assert all(b.not_run for b in BLOCKS if b.not_run is not None), "a `not run` mark needs its reason"
    stray = [f"line {b.line}" for b in BLOCKS if b.not_run and b.lang not in RUN]
    assert not stray, f"`not run` marks above blocks that are not code: {stray}"
    run = [b for b in CODE if b.not_run is None]
    assert len(run) >= 4, f"only {len(run)} of {len(CODE)} README code blocks run; the rest are marked `not run`"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.mark.slow
@pytest.mark.parametrize("block", CODE, ids=[f"line{b.line}-{b.lang}" for b in CODE])
def test_readme_block_runs(block: Block, tmp_path):
    if block.not_run is not None:
        pytest.skip(f"README line {block.line}: not run: {block.not_run}")
    argv = [sys.executable, "-c", block.code] if block.lang == "python" else \
        ["bash", "-euo", "pipefail", "-c", block.code]
    r = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, (
        f"README line {block.line} (```{block.lang}) exited {r.returncode}: fix the block, or mark it with "
        f"`<!-- not run: reason -->` on the line above.\n--- stdout\n{r.stdout[-4000:]}\n"
        f"--- stderr\n{r.stderr[-4000:]}")
