"""Run every code block of the documentation (docs/**/*.md and README.md) on the CPU.

One test per page. A page's blocks run in order, in one temporary working
directory, like a reader pasting them one after another:

- ```` ```python ```` blocks are executed in one namespace per page;
- ```` ```python title="name.py" ```` blocks are written to ``name.py`` in the
  working directory (and not executed), for the shell blocks that follow to
  run or import;
- ```` ```bash ```` blocks run under ``bash -e -o pipefail`` with this
  interpreter's ``bin`` directory first on ``PATH`` (so ``python`` and
  ``lightning-meta`` are the project's) and a ``.venv`` link to it, and must
  exit 0;
- ```` ```text ```` is program output: right after a python block (nothing but
  blank lines between them) it must equal what that block printed, so shown
  output cannot drift from the code; elsewhere (after a shell command, whose
  output depends on the terminal) it is shown as is. ```` ```mermaid ```` is a
  diagram.

An HTML comment right before a fence changes what happens to that block:
``<!-- docs-test: skip REASON -->`` leaves it out (the reason is required and
shown in the test report) and ``<!-- docs-test: returncode N -->`` expects a
shell block to exit with N. Skips are rare on purpose: each is listed in
``ALLOWED_SKIPS`` below, so adding one is a reviewed change. README.md may not
carry markers (it stays as short as possible), so its skips live here too.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from support.capabilities import FSDP2_ON_CPU, FSDP2_ON_CPU_REASON

ROOT = Path(__file__).resolve().parents[2]
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]

CODE = {"python", "py", "bash", "sh", "shell"}
NOT_CODE = {"text", "mermaid"}

# (page relative to the root, first line of the block) -> why it cannot run here.
ALLOWED_SKIPS = {
    (
        "README.md",
        "bash scripts/demo.sh    # the main job: trains an ensemble and a hypernetwork on the CPU",
    ): "set-up of .venv itself (pip) and the whole test suite, which contains this test; "
    "the demo runs in tests/project/test_examples.py, the suite in CI",
    (
        "docs/getting-started.md",
        "bash scripts/demo.sh    # set up .venv, then train an ensemble and a hypernetwork",
    ): "the README's two commands: set-up (pip) and the whole suite, which contains this test",
}

# Blocks that run FSDP2 on the CPU, which torch itself cannot do before 2.7:
# skipped there (the support window starts at torch 2.6), run everywhere else.
NEEDS_FSDP2_ON_CPU = {("docs/recipes/deferred-init.md", "python train_fsdp.py")}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<what>skip|returncode)\s*(?P<arg>.*?)\s*-->\s*$")
_TITLE = re.compile(r"""title\s*=\s*["']([^"']+)["']""")


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    title: str | None
    source: str
    skip: str | None = None
    returncode: int = 0
    adjacent: bool = False  # only blank lines since the previous block's closing fence

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def first_line(self) -> str:
        return self.source.splitlines()[0] if self.source else ""


def blocks(page: Path) -> list[Block]:
    """Return every fenced block of ``page`` with its marker, in order."""
    lines = page.read_text().splitlines()
    out: list[Block] = []
    i = 0
    last_close = -2
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""
        ):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        close = i
        i += 1  # the closing fence
        lang = info.split()[0].lower() if info else ""
        title = _TITLE.search(info)
        block = Block(page, start + 1, lang, title[1] if title else None, "\n".join(body) + "\n")
        block.adjacent = all(not line.strip() for line in lines[last_close + 1 : start])
        last_close = close
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        marker = _MARKER.match(lines[j]) if j >= 0 else None
        if marker and marker["what"] == "skip":
            block.skip = marker["arg"] or "(no reason given)"
        elif marker:
            block.returncode = int(marker["arg"])
        rel = str(page.relative_to(ROOT))
        if (rel, block.first_line.strip()) in ALLOWED_SKIPS:
            block.skip = ALLOWED_SKIPS[(rel, block.first_line.strip())]
        elif (rel, block.first_line.strip()) in NEEDS_FSDP2_ON_CPU and not FSDP2_ON_CPU:
            block.skip = FSDP2_ON_CPU_REASON
        out.append(block)
    return out


def test_every_block_is_known_code_or_output() -> None:
    """No untested block sneaks in under an unknown language, and every skip is listed."""
    problems = []
    for page in PAGES:
        for block in blocks(page):
            if block.lang not in CODE | NOT_CODE:
                problems.append(
                    f"{block.where}: fence language {block.lang!r} is neither code "
                    f"({sorted(CODE)}) nor output ({sorted(NOT_CODE)})"
                )
            rel = str(page.relative_to(ROOT))
            key = (rel, block.first_line.strip())
            if block.skip and key not in ALLOWED_SKIPS and key not in NEEDS_FSDP2_ON_CPU:
                problems.append(f"{block.where}: skipped ({block.skip}) but not in ALLOWED_SKIPS")
    assert not problems, "\n".join(problems)
    assert sum(1 for p in PAGES for b in blocks(p) if b.lang in CODE) >= 20


def _shell_env(workdir: Path) -> dict[str, str]:
    bindir = Path(sys.executable).parent
    link = workdir / ".venv"
    if not link.exists():
        link.symlink_to(bindir.parent, target_is_directory=True)
    env = dict(os.environ)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workdir), env.get("PYTHONPATH")]))
    env.update(COLUMNS="120", NO_COLOR="1", PYTHONUNBUFFERED="1")
    return env


def _run_python(block: Block, namespace: dict[str, object]) -> str:
    """Execute ``block`` in ``namespace``; return what it printed (also echoed)."""
    code = compile(block.source, block.where, "exec")
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(code, namespace)
    except Exception as e:
        raise AssertionError(
            f"{block.where}: the python block raised {type(e).__name__}: {e}"
        ) from e
    finally:
        sys.stdout.write(printed.getvalue())
    return printed.getvalue()


def _normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def _run_shell(block: Block, workdir: Path) -> None:
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.source],
        cwd=workdir,
        env=_shell_env(workdir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == block.returncode, (
        f"{block.where}: `{shlex.quote(block.first_line)}` exited {proc.returncode}, "
        f"expected {block.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n"
        f"{proc.stderr[-4000:]}"
    )


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    skipped = []
    printed: str | None = None  # output of the previous block when it was python
    try:
        for block in blocks(page):
            if block.lang == "text" and block.adjacent and printed is not None:
                assert _normalize(printed) == _normalize(block.source), (
                    f"{block.where}: the output shown differs from what the block above "
                    f"printed:\n--- shown\n{block.source}--- printed\n{printed}"
                )
            printed = None
            if block.lang in NOT_CODE:
                continue
            if block.skip:
                skipped.append(f"{block.where}: {block.skip}")
                continue
            if block.title:
                (tmp_path / block.title).write_text(block.source)
            elif block.lang in ("python", "py"):
                printed = _run_python(block, namespace)
            else:
                _run_shell(block, tmp_path)
    finally:
        # Modules the page's files defined must not leak into the next page.
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if file.startswith(str(tmp_path)):
                del sys.modules[name]
    for line in skipped:
        print(f"skipped {line}")


_LLAMA_TARGET = """
from transformers import LlamaConfig, LlamaForCausalLM


def build():
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8)
    return LlamaForCausalLM(config)
"""


def _prose(page: Path) -> str:
    """Return ``page`` without its fenced blocks, whitespace runs made one space."""
    return " ".join(re.sub(r"^```.*?^```", " ", page.read_text(), flags=re.S | re.M).split())


def _inline_commands(page: Path, program: str) -> list[str]:
    """Return the inline code spans of ``page`` that start with ``program``, joined across lines."""
    text = _prose(page)
    return [span for span in re.findall(r"`([^`]+)`", text) if span.startswith(program + " ")]


@pytest.mark.slow
def test_readme_command_lines_run(tmp_path: Path) -> None:
    """The README's inline ``lightning-meta estimate`` line runs on the README's own Llama.

    It used to lack ``--input`` and exit 2 ("no inputs for LlamaForCausalLM").
    The span after it (``--memory 80GiB --fit batch``) is added to it, as the
    sentence says.
    """
    pytest.importorskip("transformers")
    readme = ROOT / "README.md"
    (command,) = _inline_commands(readme, "lightning-meta estimate")
    fit = re.search(re.escape(command) + r"`, and `([^`]+)`", _prose(readme))
    assert fit is not None and fit[1] == "--memory 80GiB --fit batch"
    (tmp_path / "readme_llama.py").write_text(_LLAMA_TARGET)
    argv = shlex.split(command.replace("TARGET", "readme_llama.py:build"))
    for extra in ([], shlex.split(fit[1])):
        proc = subprocess.run(
            [sys.executable, "-m", "lightning_meta", *argv[1:], *extra],
            cwd=tmp_path,
            env=_shell_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, (extra, proc.stderr[-2000:])
        answer = json.loads(proc.stdout)
        assert answer["value"] > 0 if extra else answer["rank"]["world_size"] == 64


# Messages troubleshooting.md quotes that are not the package's (torch's, Lightning's).
_FOREIGN = (
    "NotImplementedError: Cannot copy out of meta tensor",
    "Please use torch.nn.Module.to_empty()",
    "ValueError: DistributedDataParallel's input module",
    'if __name__ == "__main__":',
    "Tensor.item() cannot be called on meta tensors",
)
# Quotes whose words the code assembles from several strings at run time (a
# plan's repr, a helper's phrase, a "+" chain), which no single literal holds;
# the tests named raise the message.
_COMPOSED = {
    "Ensemble(execution='vmap') ran the template's forward under torch.vmap, and the forward "
    "changed '...'": "tests/templates/test_ensemble_state.py",
    "deferred_init cannot record <op> ... issued at file:line: it needs the values of a "
    "tensor": "tests/deferred/test_reads.py",
    "materialize cannot replay <op> ... it reads a real tensor captured while recording that "
    "was modified in place since": "tests/deferred/test_materialize.py",
    "cannot load '<path>' into <Module>; the module was left unchanged:": "tests/load/test_hostile.py",
    "the forward of <Model> in module '<path>' would fail on a real device: aten.<op> refuses "
    "the dtypes of its tensors": "tests/estimate/test_estimate_dtypes.py",
    "importing '...' called sys.exit(0)": "tests/cli/test_exit_codes.py",
}
# Placeholders of a quote: <Model>, '<path>', '...', [...], (...), ..., file:line, N.
_HOLE = re.compile(r"'?<[^>]*>'?|'\.\.\.'|\[\.\.\.\]|\(\.\.\.\)|\.\.\.|\bfile:line\b|\bN\b")


def _message_texts() -> list[str]:
    """Return every string literal of the package, an f-string's holes as NUL."""
    texts = []
    for path in sorted((ROOT / "src" / "lightning_meta").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                parts = [v.value if isinstance(v, ast.Constant) else "\0" for v in node.values]
                texts.append(" ".join("".join(map(str, parts)).split()))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                texts.append(" ".join(node.value.split()))
    return texts


def test_troubleshooting_quotes_messages_the_code_prints() -> None:
    """Every message quoted in troubleshooting.md occurs in the source, placeholders aside.

    A reader searches the page for the words of their error; it once quoted
    "a shape-only run cannot follow" where ``estimate`` says "a shape-only run
    does not know".
    """
    texts = _message_texts()
    missing = []
    quotes = re.findall(r"`([^`]+)`", _prose(ROOT / "docs" / "troubleshooting.md"))
    assert set(_COMPOSED) <= set(quotes), "_COMPOSED lists a quote the page no longer has"
    for quote in quotes:
        if len(quote.split()) < 4 or quote.startswith(_FOREIGN) or quote in _COMPOSED:
            continue  # code, not a message; or a message assembled at run time
        # a word the message fills in at run time ("the forward of", "the backward of")
        parts = [p.strip() for p in _HOLE.split(quote)]
        pattern = r"[^\n]*?".join(re.escape(p) for p in parts if p)
        pattern = pattern.replace(re.escape("the forward of"), r"the (?:forward|\x00) of")
        if not any(re.search(pattern, t) for t in texts):
            missing.append(quote)
    assert missing == [], "quoted in troubleshooting.md but printed nowhere:\n" + "\n".join(missing)


def test_troubleshooting_quote_for_value_reads_is_what_estimate_says() -> None:
    # The page quoted "a shape-only run cannot follow", which only the grouped-mm
    # message says, so the literal check above could not tell.
    import torch
    from torch import nn

    import lightning_meta as lm

    found = re.search(
        r"the model reads tensor values \(`([^`]+)`\)", _prose(ROOT / "docs" / "troubleshooting.md")
    )
    assert found is not None

    class ReadsValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            return y[y > 0].sum()  # a shape that depends on the weights' values

    with pytest.raises(lm.MetaTensorError) as info:
        lm.estimate(ReadsValues, "2,4", optimizer=None)
    assert found[1] in str(info.value), str(info.value)


def test_pages_state_the_cost_of_deferred_construction_as_its_docstring_does() -> None:
    # choosing-a-pattern.md once said "about what FakeTensorMode costs" and
    # "nothing until materialization": about ten times that, and one tensor's scratch
    import lightning_meta as lm

    phrase = "eager construction's random draws"
    assert phrase in " ".join((lm.deferred_init.__doc__ or "").split())
    row = next(
        line
        for line in (ROOT / "docs" / "choosing-a-pattern.md").read_text().splitlines()
        if line.startswith("| `lm.deferred_init`")
    )
    assert phrase in row and "scratch for one tensor" in row, row
    assert "what `FakeTensorMode` costs" not in row
