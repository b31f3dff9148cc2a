"""ehin.diagnostics.expression_kinds: expressions of every synthetic variant get the kind their words
say, and the breakdown's figures are the hand-counted ones."""
import json

import pytest

from ehin.diagnostics.expression_kinds import breakdown, kind_of, main


@pytest.mark.parametrize("sentence, kind", [
    ("the white star to the right of the big star", "relation"),       # refcocog
    ("The small red ring above the big pink cross.", "relation"),
    ("small hexagon on the right", "location"),                         # refcoco
    ("right big one", "location"),
    ("bottom", "location"),                                             # referit
    ("small green hexagon", "colour"),
    ("red one", "colour"),
    ("big star", "size + category"),
    ("triangle", "category only"),
    ("water", "category only"),
    ("big one", "no category"),
])
def test_kinds(sentence, kind):
    assert kind_of(sentence) == kind


def test_breakdown_and_cli(tmp_path, capsys):
    rows = [{"sentence": "red one", "point_mask": 1.0, "point_any_object": 1.0},
            {"sentence": "small red star", "point_mask": 0.0, "point_any_object": 1.0},
            {"sentence": "left star", "point_mask": 0.0, "point_any_object": 0.0},
            {"sentence": "star", "point_mask": 1.0, "point_any_object": 1.0}]
    b = breakdown(rows)
    assert list(b) == ["location", "colour", "category only"]
    assert b["colour"] == {"n": 2, "share": 50.0, "point_mask": 50.0, "point_any_object": 100.0}
    assert b["location"]["point_mask"] == 0.0 and b["category only"]["share"] == 25.0
    f = tmp_path / "val.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(f), "--json", str(tmp_path / "b.json")]) == 0
    assert "| colour | 2 | 50 % | 50.0 | 100.0 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())[str(f)]["colour"]["n"] == 2
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.jsonl")])
