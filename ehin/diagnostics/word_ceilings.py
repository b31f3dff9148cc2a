"""What reading some of the words is worth: PointM of guessers that point at a random annotated object
among those the words they read allow, on a synthetic split (its annotations keep each thing's shape,
colour and size).

- language-blind: any annotated object of the image (the `ehin.evaluate` baseline's expectation);
- category-aware: the objects of the category the expression names (all objects if it names none);
- location-blind: the objects matching every appearance word of the referent (category, colour,
  size); location words and relations are not read.

A guesser that hits an object hits it (it points at one of the object's own pixels), so each
expression scores [referent among the allowed] / |allowed|, and PointM is the mean over expressions.
The location-blind figure is the ceiling of any model that has not learnt location words and
relations: where it stays below language-blind + 15, TESTBED §2.3's control can pass only by
learning them from the weak signal. Reads no trained model (TESTBED §2).
"""
from __future__ import annotations

from typing import Sequence

GUESSERS = ("language_blind", "category_aware", "location_blind")


def _subject_words(sentence: str) -> list[str]:
    """The words that describe the referent itself: a relation's landmark (after the relation phrase)
    is dropped."""
    from ehin.data import synthetic as S

    text = f" {sentence.lower().replace('.', ' ')} "
    for phrase in sorted(S.RELATION_PHRASES.values(), key=len, reverse=True):
        at = text.find(f" {phrase} ")
        if at >= 0:
            text = text[:at]
            break
    return text.split()


def allowed(sentence: str, objects: Sequence[dict], guesser: str) -> list[int]:
    """Indices of `objects` ({"category", "colour", "size"}; stuff has colour and size None) that a
    guesser reading `sentence` may point at."""
    from ehin.data import synthetic as S

    if guesser == "language_blind":
        return list(range(len(objects)))
    words = _subject_words(sentence)
    names = [w for w in words if w in S.SHAPES or w in S.STUFF]
    want = {"category": names[0] if names else None}
    if guesser == "location_blind":
        want["colour"] = next((w for w in words if w in S.COLOURS), None)
        want["size"] = next((w for w in words if w in S.SIZES), None)
    elif guesser != "category_aware":
        raise ValueError(f"unknown guesser {guesser!r}; one of {GUESSERS}")
    out = [i for i, o in enumerate(objects) if all(v is None or o.get(k) == v for k, v in want.items())]
    return out or list(range(len(objects)))  # words that match nothing: read as none


def _objects(ds, image_id: int) -> tuple[list[int], list[dict]]:
    ids = ds.image_ann_ids(image_id)
    objs = []
    for a in ids:
        ann = ds.anns[a]
        attrs = ann.get("attributes", {})
        objs.append({"category": ds.categories.get(ann["category_id"], {}).get("name"),
                     "colour": attrs.get("colour"), "size": attrs.get("size")})
    return ids, objs


def ceilings(ds, split: str = "val") -> dict[str, float]:
    """guesser -> PointM (percent) over every (ref, sentence) of the split, and `expressions`."""
    totals = dict.fromkeys(GUESSERS, 0.0)
    n = 0
    for ref in ds.refs(split):
        ids, objs = _objects(ds, ref["image_id"])
        target = ids.index(ref["ann_id"])
        for sent in ref["sentences"]:
            text = ds.sentence(sent)
            for g in GUESSERS:
                pool = allowed(text, objs, g)
                totals[g] += (target in pool) / len(pool)
            n += 1
    out = {g: 100.0 * v / n if n else float("nan") for g, v in totals.items()}
    out["expressions"] = n
    return out
