"""Where a model's pointing succeeds, by what a synthetic expression says: PointM per kind of expression.

    python -m ehin.evaluate --checkpoint RUN/checkpoints/last.pt --per-expression RUN/val.jsonl
    python -m ehin.diagnostics.expression_kinds RUN/val.jsonl [OTHER_RUN/val.jsonl ...]

The synthetic grammar (ehin.data.synthetic) builds every expression from a closed vocabulary, so its
words say exactly which cue picks the referent out. Each expression gets the first kind that holds:

- relation: names a second object to be located against ("the red star left of the big circle");
- location: a location word ("left", "top", ...), with or without appearance words;
- colour: a colour word (and possibly size and the category);
- size + category: a size word and the category, no colour;
- category only: the category name (a shape or stuff name) and nothing else;
- no category: appearance words with "one" ("big one", "red one").

Per kind: the expressions' count and share, PointM (the peak inside the referent's mask) and
"any object" (the peak on some annotated object, the referent or not): a model that finds objects but
not the right one has a high second and a low first. The language-blind guess does not read the words,
so its PointM is about the same for every kind (the split's figure, `ehin.data.fidelity`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from ehin.cli import command, command_parser, UserError

KINDS = ("relation", "location", "colour", "size + category", "category only", "no category")


def _vocabulary() -> dict[str, set[str]]:
    from ehin.data import synthetic as S

    relation_words = {w for phrase in S.RELATION_PHRASES.values() for w in phrase.split()} - {"the", "of", "to"}
    return {"colour": set(S.COLOURS), "size": set(S.SIZES), "location": set(S.LOCATION_WORDS),
            "category": set(S.SHAPES) | set(S.STUFF), "relation": relation_words}


def kind_of(sentence: str, vocab: dict[str, set[str]] | None = None) -> str:
    """The kind (KINDS) of one expression of the synthetic grammar."""
    vocab = vocab or _vocabulary()
    words = sentence.lower().replace(".", " ").split()
    has = {k: any(w in v for w in words) for k, v in vocab.items()}
    categories = sum(w in vocab["category"] for w in words)
    if has["relation"] and categories >= 2:
        return "relation"
    if has["location"]:
        return "location"
    if has["colour"]:
        return "colour"
    if not has["category"]:
        return "no category"
    return "size + category" if has["size"] else "category only"


def breakdown(rows: Sequence[dict]) -> dict[str, dict]:
    """kind -> {n, share, point_mask, point_any_object} (percent) over per-expression rows."""
    vocab = _vocabulary()
    out: dict[str, dict] = {}
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(kind_of(r["sentence"], vocab), []).append(r)
    for k in KINDS:
        group = by_kind.get(k, [])
        if not group:
            continue
        out[k] = {"n": len(group), "share": 100.0 * len(group) / len(rows),
                  "point_mask": 100.0 * sum(float(r["point_mask"]) for r in group) / len(group),
                  "point_any_object": 100.0 * sum(float(r["point_any_object"]) for r in group) / len(group)}
    return out


def markdown(tables: dict[str, dict[str, dict]], first: str = "file") -> str:
    """One row per (table, kind): `tables` maps a name (the `first` column) to a `breakdown`."""
    lines = [f"| {first} | kind | expressions | share | PointM | any object |", "|---|---|---:|---:|---:|---:|"]
    for name, table in tables.items():
        for k, v in table.items():
            lines.append(f"| {name} | {k} | {v['n']} | {v['share']:.0f} % | {v['point_mask']:.1f} | "
                         f"{v['point_any_object']:.1f} |")
    return "\n".join(lines) + "\n"


@command
def main(argv: list[str] | None = None) -> int:
    p = command_parser("python -m ehin.diagnostics.expression_kinds", __doc__)
    p.add_argument("files", nargs="+", help="per-expression JSON-lines files of ehin.evaluate --per-expression")
    p.add_argument("--json", help="also write the breakdowns here (default: not written)")
    args = p.parse_args(argv)
    tables = {}
    for f in args.files:
        path = Path(f)
        if not path.is_file():
            raise UserError(f"{f}: no such file (write it with python -m ehin.evaluate --per-expression {f})")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            raise UserError(f"{f}: no expressions in it")
        tables[f] = breakdown(rows)
    sys.stdout.write(markdown(tables))
    if args.json:
        Path(args.json).write_text(json.dumps(tables, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
