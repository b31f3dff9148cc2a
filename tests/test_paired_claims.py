"""Claims paired over the same expressions and seeds (bench.check): per-expression scores kept beside
the store, an error from the expressions' bootstrap and the seeds' spread, and the fallback to seeds'
means where the scores are missing."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from bench.check import effective_df, evaluate_claim, paired_difference, student_t_quantile
from ehin.evaluate import read_per_expression, write_per_expression


def test_paired_difference_by_hand():
    a = {0: {(1, 1): 100.0, (1, 2): 0.0, (2, 1): 100.0}, 1: {(1, 1): 100.0, (1, 2): 0.0, (2, 1): 100.0}}
    b = {0: {(1, 1): 0.0, (1, 2): 0.0, (2, 1): 100.0, (3, 1): 0.0}, 2: {(1, 1): 0.0}}
    diff, se, df, n, seeds = paired_difference(a, b)
    assert (n, seeds) == (3, 1)  # seed 0 only; expression (3, 1) is b's alone
    assert diff == pytest.approx(100 / 3)
    assert math.isnan(se) and math.isnan(df)  # one seed: the training's spread is unmeasured, the error unknown
    assert paired_difference(a, {5: {(1, 1): 0.0}}) is None
    # two seeds whose differences are +100/3 (seed 0) and -100/3 (seed 1, every expression alike)
    b[1] = {(1, 1): 100.0, (1, 2): 100.0, (2, 1): 100.0}
    diff, se, df, n, seeds = paired_difference(a, b)
    assert (n, seeds, diff) == (3, 2, pytest.approx(0.0))
    # the seeds' part alone: std(+33.3, -33.3) / sqrt(2) = 33.3; the expressions' adds to it
    assert se >= 100 / 3
    assert 1.0 <= df <= 3.0  # one degree from the seeds, two from the expressions: Welch-Satterthwaite between


def _records(tmp_path, row: str, scores: dict[int, np.ndarray]) -> list[dict]:
    out = []
    for seed, pm in scores.items():
        rel = f"per_expression/{row}-{seed}.npz"
        rows = [dict(ref_id=i, sent_id=0, point_mask=bool(v), point_box=bool(v), box_acc=False, point_any_object=True,
                     iou=float(v), inter=0, union=1) for i, v in enumerate(pm)]
        write_per_expression(tmp_path / rel, rows)
        out.append({"row": row, "seed": seed, "metrics": {"point_mask": 100.0 * pm.mean()}, "per_expression": rel})
    return out


def test_per_expression_files_round_trip(tmp_path):
    rows = [dict(ref_id=7, sent_id=3, point_mask=True, point_box=False, box_acc=True, point_any_object=True,
                 iou=0.25, inter=5, union=20, sentence="left red one")]
    for name in ("a.npz", "a.jsonl"):
        write_per_expression(tmp_path / name, rows)
        z = read_per_expression(tmp_path / name)
        assert z["ref_id"].tolist() == [7] and z["point_mask"].tolist() == [1] and z["iou"][0] == pytest.approx(0.25)


def test_npz_files_keep_ids_as_steps_and_recompute_iou(tmp_path):
    from ehin.evaluate import PER_EXPRESSION_FIELDS

    rng = np.random.default_rng(0)
    inter = rng.integers(0, 5000, 300)
    union = inter + rng.integers(0, 5000, 300)
    union[:3] = inter[:3] = 0  # an empty union: IoU 0 (deviation 4)
    rows = [dict(ref_id=int(r), sent_id=int(s), point_mask=bool(i % 2), point_box=False, box_acc=True,
                 point_any_object=bool(i % 3), inter=int(a), union=int(u), iou=a / u if u > 0 else 0.0)
            for i, (r, s, a, u) in enumerate(zip(np.sort(rng.integers(0, 10**6, 300))[::-1], rng.permutation(300),
                                                 inter, union))]
    write_per_expression(tmp_path / "new.npz", rows)
    with np.load(tmp_path / "new.npz") as z:
        assert "iou" not in z.files and "ref_id" not in z.files and "sent_id_step" in z.files
    # the format before ID_STEPS: every field as it is
    np.savez_compressed(tmp_path / "old.npz", **{k: np.asarray([r[k] for r in rows], dtype=t)
                                                 for k, t in PER_EXPRESSION_FIELDS.items()})
    new, old = read_per_expression(tmp_path / "new.npz"), read_per_expression(tmp_path / "old.npz")
    assert list(new) == list(PER_EXPRESSION_FIELDS)
    for k, t in PER_EXPRESSION_FIELDS.items():
        assert new[k].dtype == t and np.array_equal(new[k], old[k]), k
    assert (tmp_path / "new.npz").stat().st_size < (tmp_path / "old.npz").stat().st_size
    # an iou that is not inter / union stays in the file as it was
    rows[5]["iou"] = 0.5
    write_per_expression(tmp_path / "kept.npz", rows)
    assert read_per_expression(tmp_path / "kept.npz")["iou"][5] == np.float32(0.5)


CLAIM = {"id": "c", "text": "A beats B", "kind": "greater", "a": "A", "b": "B", "metric": "point_mask"}
SWEEP = SimpleNamespace(name="t", rows=["A", "B"])


def _moved(base: dict[int, np.ndarray], shifts: dict[int, int]) -> dict[int, np.ndarray]:
    """`base` with `shifts[seed]` more expressions right (fewer where negative) in each seed."""
    out = {}
    for s, pm in base.items():
        b, n = pm.copy(), shifts[s]
        b[np.flatnonzero(pm == (0 if n > 0 else 1))[:abs(n)]] = 1.0 if n > 0 else 0.0
        out[s] = b
    return out


def _judge(tmp_path, a: dict, b: dict) -> tuple[list[dict], dict]:
    records = _records(tmp_path, "B", b) + _records(tmp_path, "A", a)
    return records, evaluate_claim(SWEEP, CLAIM, records, tmp_path)[0]


def test_a_small_consistent_gain_is_beyond_noise_only_when_paired(tmp_path):
    """Seeds whose means scatter widely (30 % to 70 %) hide a +4-point gain on the same expressions from
    a comparison of means; paired over expressions it stands far beyond noise."""
    rng = np.random.default_rng(0)
    base = {s: (rng.random(500) < p).astype(float) for s, p in zip(range(3), (0.3, 0.5, 0.7))}
    records, paired = _judge(tmp_path, _moved(base, {0: 20, 1: 20, 2: 20}), base)  # 20 of 500 more right
    assert paired["test"].startswith("paired (500 expressions x 3 seeds)")
    assert paired["margin"] == pytest.approx(4.0) and paired["status"] == "holds" and paired["significant"]
    # without the per-expression files: the seeds' means, and the same gain is within their noise
    (seeds,) = evaluate_claim(SWEEP, CLAIM, [{k: v for k, v in r.items() if k != "per_expression"} for r in records],
                              tmp_path)
    assert seeds["test"] == "seeds (3 seeds)" and seeds["margin"] == pytest.approx(4.0) and not seeds["significant"]


def test_a_gain_that_changes_with_the_seed_is_within_noise_when_paired(tmp_path):
    """The same 500 expressions and three seeds, but the trainings disagree: row A is +8 points ahead of B
    in seed 0, level in seed 1 and 2 behind in seed 2. Resampling expressions alone would call the +2
    mean beyond noise (its error about 0.5); the seeds' spread (std 5.3 over 3 seeds: 3.1) says it is not."""
    rng = np.random.default_rng(1)
    base = {s: (rng.random(500) < 0.5).astype(float) for s in range(3)}
    other = _moved(base, {0: 40, 1: 0, 2: -10})  # +8, 0 and -2 points of 500
    records, paired = _judge(tmp_path, other, base)
    assert paired["test"].startswith("paired (500 expressions x 3 seeds)")
    assert paired["margin"] == pytest.approx(2.0) and paired["status"] == "holds"
    assert paired["noise"] > 3.0 and paired["significant"] is False
    # one seed of each: the error cannot be measured, and the verdict says so rather than "beyond noise"
    _, one = _judge(tmp_path, {0: other[0]}, {0: base[0]})
    assert one["test"] == "paired (500 expressions x 1 seed)"
    assert one["margin"] == pytest.approx(8.0) and one["status"] == "holds"
    assert one["significant"] is None and math.isnan(one["noise"])


def test_student_t_quantiles_and_welch_satterthwaite():
    # tabulated two-sided 95 % points; df = 1 is the Cauchy's tan(0.475 pi)
    assert student_t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-6)
    for df, t in ((2, 4.3027), (4, 2.7764), (30, 2.0423), (1e9, 1.9600)):
        assert student_t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    # equal variances of 1 and 4 degrees: (2v)^2 / (v^2/1 + v^2/4) = 3.2; a part with no spread adds nothing
    assert effective_df([(1.0, 1), (1.0, 4)]) == pytest.approx(3.2)
    assert effective_df([(2.0, 1), (0.0, 499)]) == pytest.approx(1.0)
    assert effective_df([(0.0, 1), (0.0, 499)]) == 499


def test_two_seeds_need_a_margin_far_beyond_twice_their_error(tmp_path):
    """Two seeds whose paired differences are +5 and +3 points of 500 expressions: a +4 margin about three
    errors away, which '2 x SE' would call beyond noise. Half its variance is the two seeds' spread (one
    degree of freedom), so by Welch-Satterthwaite the error has about two, t is about 4, and the margin is
    within noise; five seeds that agree as closely make it beyond noise."""
    rng = np.random.default_rng(2)
    base = {s: (rng.random(500) < 0.5).astype(float) for s in range(5)}
    records, two = _judge(tmp_path, _moved({s: base[s] for s in (0, 1)}, {0: 25, 1: 15}), {s: base[s] for s in (0, 1)})
    assert two["margin"] == pytest.approx(4.0) and 2.5 < two["margin"] / two["noise"] < 4
    assert 1 < two["noise_df"] < 3 and two["significant"] is False
    _, five = _judge(tmp_path, _moved(base, {0: 25, 1: 15, 2: 20, 3: 22, 4: 18}), base)
    assert five["margin"] == pytest.approx(4.0) and five["noise_df"] > 3 and five["significant"] is True


def test_pair_compares_two_rows_of_any_store_through_the_cli(tmp_path, capsys):
    """`bench.check --pair A B --tables T`: the claims' paired test on two rows of a store whose records ran
    with `--set` (no sweep hash to match): +4 points in every seed is beyond noise, a typo is one line."""
    from bench.check import main
    from bench.store import ResultStore

    rng = np.random.default_rng(0)
    base = {s: (rng.random(500) < p).astype(float) for s, p in zip(range(3), (0.3, 0.5, 0.7))}
    store = ResultStore(tmp_path)
    for r in _records(tmp_path, "B", base) + _records(tmp_path, "A", _moved(base, {0: 20, 1: 20, 2: 20})):
        store.append({**r, "table": "t", "cell_id": f"x/t/{r['row']}/seed{r['seed']}/h"})
    assert main(["--pair", "A", "B", "--tables", "t", "--results", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    (pm,) = [x for x in lines if x.split()[0] == "point_mask"]
    assert pm.split()[1] == "+4.00" and "beyond noise; 500 expressions x 3 seeds" in pm
    (bx,) = [x for x in lines if x.split()[0] == "box_acc"]
    assert bx.split()[1] == "+0.00" and "within noise" in bx      # box_acc is False in both rows
    with pytest.raises(SystemExit) as e:
        main(["--pair", "A", "C", "--tables", "t", "--results", str(tmp_path)])
    assert e.value.code == 2 and "no t record of row 'C' (rows: A, B)" in capsys.readouterr().err


def test_against_pairs_the_same_row_of_two_stores(tmp_path, capsys):
    """`bench.check --against B --results A --tables T`: each row both stores hold, A's minus B's by the same
    paired test (the same cells run two ways); a row only one holds is one line."""
    from bench.check import main
    from bench.store import ResultStore

    rng = np.random.default_rng(1)
    base = {s: (rng.random(400) < p).astype(float) for s, p in zip(range(3), (0.4, 0.5, 0.6))}
    runs = {"a": _moved(base, {0: -12, 1: -12, 2: -12}), "b": base}
    for name, scores in runs.items():
        store = ResultStore(tmp_path / name)
        for r in _records(tmp_path / name, "A", scores):
            store.append({**r, "table": "t", "config_hash": "h", "cell_id": f"x/t/A/seed{r['seed']}/h"})
    ResultStore(tmp_path / "a").append({"row": "Z", "seed": 0, "table": "t", "cell_id": "x/t/Z/seed0/h"})
    assert main(["--against", str(tmp_path / "b"), "--tables", "t", "--results", str(tmp_path / "a")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"t: A [{tmp_path / 'a'}] - A [{tmp_path / 'b'}], paired")  # Z: only in a
    (pm,) = [x for x in lines if x.split()[0] == "point_mask"]
    assert pm.split()[1] == "-3.00" and "beyond noise; 400 expressions x 3 seeds" in pm
    assert not any("note:" in x or "processes" in x for x in lines)  # same config, one process each
    with pytest.raises(SystemExit) as e:
        main(["--against", str(tmp_path / "b"), "--tables", "t", "--rows", "Z", "--results", str(tmp_path / "a")])
    assert e.value.code == 2 and "t row 'Z' is not in both" in capsys.readouterr().err


def _seed_records(values: dict[str, list[float]], metric: str = "overall_iou") -> list[dict]:
    """Records without per-expression scores (a metric compared by the seeds' means): row -> value by seed."""
    return [{"row": row, "seed": s, "metrics": {metric: v}} for row, vs in values.items() for s, v in enumerate(vs)]


ROWS = SimpleNamespace(name="t", rows=["A", "B1", "B2", "B3"])


def test_means_compare_only_the_seeds_both_rows_have():
    """A has five seeds, B one: A's seed 0 is ahead of B's, its five-seed mean behind. The claim is judged on
    seed 0 alone, as the paired test would pair it, and says so; its noise is unknown with one seed."""
    records = _seed_records({"A": [41.0, 38.0, 39.0, 40.0, 38.0], "B1": [40.0]})
    claim = {"id": "c", "text": "A beats B1", "kind": "greater", "a": "A", "b": "B1", "metric": "overall_iou"}
    (res,) = evaluate_claim(ROWS, claim, records)
    assert res["margin"] == pytest.approx(1.0) and res["status"] == "holds"
    assert res["test"] == "seeds (1 seed)" and res["significant"] is None


def test_one_row_against_a_list_is_compared_with_every_row_of_it():
    records = _seed_records({"A": [30.0, 30.5, 31.0], "B1": [20.0, 20.5, 21.0], "B2": [35.0, 35.5, 36.0],
                             "B3": [40.0, 40.5, 41.0]})
    claim = {"id": "c", "text": "A beats each B", "kind": "greater", "a": "A", "b": ["B1", "B2", "B3"],
             "metric": "overall_iou"}
    (res,) = evaluate_claim(ROWS, claim, records)
    assert res["status"] == "does not hold" and res["margin"] == pytest.approx(-10.0)
    assert res["compared"] == "A vs B3 (1 of 3 pairs hold)" and res["significant"] is True


def test_a_best_row_with_a_rival_not_run_is_incomplete_until_a_rival_beats_it():
    claim = {"id": "c", "text": "A is best", "kind": "best", "row": "A", "metric": "overall_iou"}
    records = _seed_records({"A": [30.0, 30.5, 31.0], "B1": [20.0, 20.5, 21.0], "B2": [25.0, 25.5, 26.0]})
    (res,) = evaluate_claim(ROWS, claim, records)
    assert res["status"] == "incomplete" and res["significant"] is None
    assert res["compared"] == "A vs B2 (2 of 3 pairs hold; without results: A vs B3)"
    records += _seed_records({"B3": [32.0, 32.5, 33.0]})[:1]  # B3's seed 0 only: it beats A there
    (res,) = evaluate_claim(ROWS, claim, records)
    assert res["status"] == "does not hold" and res["margin"] == pytest.approx(-2.0)
    assert res["compared"].startswith("A vs B3 (2 of 3 pairs hold")


def test_a_required_gap_is_part_of_the_margin_and_of_its_test():
    """The paper's 'nearly 14 points': +5 well measured is 9 short of it, beyond noise; +3.5 against a gap
    of 3 holds by 0.5, within a noise of about 0.6."""
    claim = {"id": "c", "text": "A beats B1 by 14", "kind": "greater", "a": "A", "b": "B1", "metric": "overall_iou",
             "margin": 14}
    records = _seed_records({"A": [25.0, 25.1, 24.9, 25.05, 24.95], "B1": [20.0] * 5})
    (res,) = evaluate_claim(ROWS, claim, records)
    assert res["margin"] == pytest.approx(-9.0) and res["status"] == "does not hold" and res["significant"] is True
    records = _seed_records({"A": [23.5, 24.5, 22.5, 24.0, 23.0], "B1": [20.0] * 5})
    (res,) = evaluate_claim(ROWS, {**claim, "margin": 3}, records)
    assert res["margin"] == pytest.approx(0.5) and res["status"] == "holds" and res["significant"] is False


def test_most_pairs_is_decided_by_the_pair_at_the_majority():
    """Two of three pairs won by 10 and one lost by 10: 'most' holds, beyond noise, and the deciding pair is
    the second best (+10), not the lost one; all pairs would fail by the lost one."""
    records = _seed_records({"A": [30.0, 30.5, 31.0], "B1": [20.0, 20.5, 21.0], "B2": [20.0, 20.5, 21.0],
                             "B3": [40.0, 40.5, 41.0]})
    claim = {"id": "c", "text": "A beats most B", "kind": "greater", "a": "A", "b": ["B1", "B2", "B3"],
             "metric": "overall_iou", "quantifier": "most"}
    (res,) = evaluate_claim(ROWS, claim, records)
    assert res["status"] == "holds" and res["margin"] == pytest.approx(10.0) and res["significant"] is True
    assert res["compared"] == "A vs B2 (2 of 3 pairs hold, 2 must)"
    (res,) = evaluate_claim(ROWS, {**claim, "quantifier": None}, records)
    assert res["status"] == "does not hold" and res["margin"] == pytest.approx(-10.0)
