"""The mutation score of `make mutation` (mutmut's results under mutants/), and the survivors.

Score: killed and timed-out mutants over all mutants, leaving out those that only change the text of a
message (a string literal with a space in it: words, not a key, a code or a column name). Mutants marked
equivalent carry ``# pragma: no mutate`` with a reason in the code and are not made at all.

    .venv/bin/python tests/mutation_report.py [--all]   # --all: the message mutants too
"""

from __future__ import annotations

import argparse
import io
import sys
import tokenize
from collections import Counter

from mutmut.configuration import config
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

CAUGHT = ("killed", "timeout", "caught by type check")


def tokens(line: str) -> list[tuple[int, str]] | None:
    try:
        return [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline)]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None


def only_message_text(diff: str) -> bool:
    """True when the mutant changes nothing but words inside string literals."""
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--all", action="store_true", help="list the message mutants that survived too")
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
            diff = get_diff_for_mutant(name, path=path)
            kind = "message" if only_message_text(diff) else status
            counts[kind] += 1
            mine[kind if kind == "message" else ("caught" if status in CAUGHT else "missed")] += 1
            if status not in CAUGHT and (kind != "message" or args.all):
                survivors.append((name, status, diff))
    if not by_file or not sum(counts.values()):
        print('No mutation results: run "make mutation" (mutmut run) first.', file=sys.stderr)
        return 1
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
