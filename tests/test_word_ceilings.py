"""What reading some of the words is worth (ehin.diagnostics.word_ceilings), on scenes whose answers are
counted by hand."""
import pytest

from ehin.data.refer import ReferDataset
from ehin.diagnostics import word_ceilings as W

# Four things and one stuff region: two red circles (one big), a blue circle, a red square, grass.
OBJECTS = [{"category": "circle", "colour": "red", "size": "big"},
           {"category": "circle", "colour": "red", "size": "small"},
           {"category": "circle", "colour": "blue", "size": "small"},
           {"category": "square", "colour": "red", "size": "small"},
           {"category": "grass", "colour": None, "size": None}]


@pytest.mark.parametrize("sentence, guesser, expected", [
    ("red circle on the left", "language_blind", [0, 1, 2, 3, 4]),
    ("red circle on the left", "category_aware", [0, 1, 2]),
    ("red circle on the left", "location_blind", [0, 1]),          # the location word is not read
    ("big red circle", "location_blind", [0]),
    ("left one", "category_aware", [0, 1, 2, 3, 4]),               # no category named: anything
    ("the red square left of the blue circle", "category_aware", [3]),  # the landmark is not the subject
    ("the red square left of the blue circle", "location_blind", [3]),
    ("grass", "location_blind", [4]),
    ("green circle", "location_blind", [0, 1, 2, 3, 4]),           # words matching nothing: read as none
])
def test_allowed_objects_by_hand(sentence, guesser, expected):
    assert W.allowed(sentence, OBJECTS, guesser) == expected


class _Scene:
    """The one-image REFER view that `ceilings` reads."""
    categories = {1: {"name": "circle"}, 2: {"name": "square"}, 3: {"name": "grass"}}

    def __init__(self):
        cat = {"circle": 1, "square": 2, "grass": 3}
        self.anns = {10 + i: {"category_id": cat[o["category"]],
                              **({"attributes": {"colour": o["colour"], "size": o["size"]}} if o["colour"] else {})}
                     for i, o in enumerate(OBJECTS)}

    def refs(self, split):
        return [{"image_id": 1, "ann_id": 10, "sentences": [{"sent": "red circle on the left"}, {"sent": "big red circle"}]},
                {"image_id": 1, "ann_id": 12, "sentences": [{"sent": "blue circle"}]}]

    def image_ann_ids(self, image_id):
        return list(self.anns)

    sentence = staticmethod(ReferDataset.sentence)


def test_ceilings_average_the_hit_chance_over_expressions():
    c = W.ceilings(_Scene())
    assert c["expressions"] == 3
    assert c["language_blind"] == pytest.approx(100 * (1 / 5 + 1 / 5 + 1 / 5) / 3)
    assert c["category_aware"] == pytest.approx(100 * (1 / 3 + 1 / 3 + 1 / 3) / 3)
    assert c["location_blind"] == pytest.approx(100 * (1 / 2 + 1 + 1) / 3)


def test_unknown_guesser_is_refused():
    with pytest.raises(ValueError, match="unknown guesser"):
        W.allowed("red circle", OBJECTS, "oracle")
