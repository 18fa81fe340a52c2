"""The mutation score of `make mutation` (mutmut's results under mutants/), and the survivors.

Score: killed and timed-out mutants over all mutants, leaving out those that only change the text of a
message: every line they change lies inside a log call's arguments (``logger.info(...)``), inside the
message of an exception (any argument of ``SomethingError(...)`` but a RowError's code, its first), inside
the progress bar's settings (``tqdm(...)``: what a terminal shows), or in a string literal with a space in
it (words, not a key, a code or a column name). Mutants marked equivalent
carry ``# pragma: no mutate`` with a reason in the code and are not made at all.

    .venv/bin/python tests/mutation_report.py [--all]   # --all: the message mutants too
    .venv/bin/mutmut run $(.venv/bin/python tests/mutation_report.py --missed)  # recheck the missed ones

mutmut keeps a mutant's result until its function changes, so a test written after a mutant survived counts
for it only once that mutant is run again (``--missed`` names them).
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import textwrap
import tokenize
from collections import Counter

from mutmut.configuration import config
from mutmut.mutation.data import SourceFileMutationData
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

CAUGHT = ("killed", "timeout", "caught by type check")


def tokens(line: str) -> list[tuple[int, str]] | None:
    try:
        return [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline)]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None


LOG_CALLS = {"debug", "info", "warning", "error", "exception", "critical", "warn"}


def _message_lines(function: str) -> set[int]:
    """Lines of a function's source that lie inside a message: a log call's arguments, an exception's
    message (every argument of a call to a name ending in Error, but a RowError's first: its code)."""
    try:
        tree = ast.parse(textwrap.dedent(function))
    except SyntaxError:
        return set()
    lines: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        owner = node.func.value if isinstance(node.func, ast.Attribute) else None
        arguments = [*node.args, *(k.value for k in node.keywords)]
        if name in LOG_CALLS and isinstance(owner, ast.Name) and owner.id in ("logger", "logging", "warnings"):
            message = arguments
        elif name == "tqdm":  # its total and file are what it counts and where it goes; the rest, how it looks
            message = [k.value for k in node.keywords if k.arg not in ("total", "file", "disable")]
        elif name.endswith("Error") or name.endswith("Exception"):
            message = arguments[1:] if name == "RowError" else arguments
        else:
            continue
        for argument in message:
            lines.update(range(argument.lineno, argument.end_lineno + 1))
    return lines


def _changed_lines(diff: str) -> list[int]:
    """The original function's line numbers (1 = its ``def``) that the mutant changes."""
    changed, line = [], 0
    for text in diff.splitlines():
        hunk = re.match(r"@@ -(\d+)", text)
        if hunk:
            line = int(hunk.group(1))
        elif text.startswith("---") or text.startswith("+++"):
            continue
        elif text.startswith("-"):
            changed.append(line)
            line += 1
        elif text.startswith(" "):
            line += 1
    return changed


def only_message_text(diff: str, function: str = "") -> bool:
    """True when the mutant changes nothing but the text of a message."""
    changed = _changed_lines(diff)
    if function and changed and set(changed) <= _message_lines(function):
        return True
    removed = [line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    if not removed or len(removed) != len(added):
        return False
    for before, after in zip(removed, added):
        old, new = tokens(before), tokens(after)
        if old is None or new is None or len(old) != len(new):
            return False
        for (kind, text), (kind2, text2) in zip(old, new):
            if (kind, text) == (kind2, text2):
                continue
            if kind != tokenize.STRING or kind2 != tokenize.STRING or " " not in text:
                return False
    return True


def _functions(name: str, path) -> tuple[str, str]:
    """The original function and its mutant, as mutmut diffs them (each from its ``def``)."""
    import libcst as cst
    from mutmut.mutation.diff_apply import (
        read_functions_from_index,
        read_mutant_function,
        read_mutants_module,
        read_original_function,
    )

    functions = read_functions_from_index(name, path)
    if functions is None:
        module = read_mutants_module(path)
        functions = (read_original_function(module, name), read_mutant_function(module, name))
    return tuple(cst.Module([f]).code.strip() for f in functions)


def _diff(original: str, mutant: str) -> str:
    import difflib

    return "\n".join(difflib.unified_diff(original.split("\n"), mutant.split("\n"), lineterm="", n=3))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--all", action="store_true", help="list the message mutants that survived too")
    parser.add_argument("--missed", action="store_true", help="only the names of the missed mutants, for mutmut run")
    args = parser.parse_args()
    config()  # mutmut reads [tool.mutmut]
    counts: Counter = Counter()
    survivors = []
    by_file: dict[str, Counter] = {}
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        mine = by_file.setdefault(str(path), Counter())
        for name, code in data.exit_code_by_key.items():
            status = status_by_exit_code[code]
            original, mutant = _functions(name, path)
            diff = _diff(original, mutant)
            kind = "message" if only_message_text(diff, original) else status
            counts[kind] += 1
            mine[kind if kind == "message" else ("caught" if status in CAUGHT else "missed")] += 1
            if status not in CAUGHT and (kind != "message" or args.all):
                survivors.append((name, status, diff))
    if not by_file or not sum(counts.values()):
        print('No mutation results: run "make mutation" (mutmut run) first.', file=sys.stderr)
        return 1
    if args.missed:
        print(" ".join(name for name, _, _ in survivors))
        return 0
    for name, status, diff in survivors:
        print(f"# {name}: {status}\n{diff}\n")
    for path, c in by_file.items():
        total = c["caught"] + c["missed"]
        print(f"{path}: {c['caught']}/{total} caught, {c['message']} message-only left out")
    scored = sum(n for kind, n in counts.items() if kind != "message")
    caught = sum(counts[k] for k in CAUGHT)
    print(f"mutants: {dict(sorted(counts.items()))}")
    print(
        f"mutation score: {caught}/{scored} = {100 * caught / scored:.1f}% (killed or timed out; message-only left out)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
