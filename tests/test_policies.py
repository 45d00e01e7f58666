"""Exit policies against an independent plain-numpy reference.

Every registered policy must have a reference here (``REFERENCE``); a test fails when
the registry and the reference table disagree, so a new policy cannot go untested.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from edgeexit.errors import PolicyError, ThresholdError, UnknownPolicyError
from edgeexit.policies import (
    ExitPolicy,
    check_thresholds,
    get_policy,
    list_policies,
    register_policy,
)

# --- the reference: one sample at a time, written out the long way ---------------------


def ref_softmax(row: np.ndarray) -> np.ndarray:
    z = np.asarray(row, dtype=np.float64)
    e = np.exp(z - z.max())  # shifting by the max changes nothing mathematically, avoids overflow
    return e / e.sum()


def ref_confidence(row: np.ndarray) -> float:
    return float(ref_softmax(row).max())


def ref_entropy(row: np.ndarray) -> float:
    p = ref_softmax(row)
    p = p[p > 0]  # 0 ln 0 = 0
    return float(-(p * np.log(p)).sum())


def ref_margin(row: np.ndarray) -> float:
    p = np.sort(ref_softmax(row))[::-1]
    second = p[1] if p.size > 1 else 0.0
    return float(p[0] - second)


def ref_patience_alone(row: np.ndarray) -> float:
    """PABEE's counter at a sample's first exit (no earlier exit agrees yet): 0, or NaN where the
    row makes no prediction (a NaN, a +inf, or every class at -inf); the counter across exits is
    checked in tests/test_policy_tables.py."""
    valid = not np.isnan(row).any() and np.isfinite(np.max(row))
    return 0.0 if valid else math.nan


# name -> (direction, per-row reference score)
REFERENCE: dict[str, tuple[str, Callable[[np.ndarray], float]]] = {
    "confidence": ("higher", ref_confidence),
    "entropy": ("lower", ref_entropy),
    "margin": ("higher", ref_margin),
    "patience": ("higher", ref_patience_alone),
}

# Policies that score a signal (an exit output of shape (n, 1)) rather than the logits:
# name -> (direction, signal, reference score of a sample at its first exit); q_exit's score
# needs the exits before it, which tests/test_policy_tables.py follows across exits.
SIGNAL_REFERENCE: dict[str, tuple[str, str, Callable[[float], float]]] = {
    "gate": ("higher", "gate", lambda value: float(value)),
    "q_exit": ("higher", "halt", lambda value: math.nan),
}

POLICIES = [name for name in list_policies() if name not in SIGNAL_REFERENCE]
SIGNAL_POLICIES = sorted(SIGNAL_REFERENCE)
ATOL = 1e-9


def ref_scores(name: str, logits: np.ndarray) -> np.ndarray:
    return np.array([REFERENCE[name][1](row) for row in logits], dtype=np.float64)


def ref_rule(direction: str, scores: np.ndarray, threshold: float) -> np.ndarray:
    if direction == "higher":
        return scores >= threshold
    return scores < threshold


# --- logits cases ------------------------------------------------------------------------


def _ties(rng: np.random.Generator) -> np.ndarray:
    rows = [np.zeros(6), np.full(6, 1e3), np.full(6, -7.25)]
    for _ in range(20):  # top-2 tie, the rest random below it
        row = rng.normal(size=6)
        row[rng.choice(6, size=2, replace=False)] = row.max() + 1.0
        rows.append(row)
    for _ in range(10):  # three-way tie at the top
        row = rng.normal(size=6)
        row[:3] = 2.5
        rows.append(row)
    return np.stack(rows)


def _partial_neg_inf(rng: np.random.Generator) -> np.ndarray:
    logits = rng.normal(size=(16, 7))
    logits[:, ::3] = -np.inf  # a class that can never occur has probability exactly 0
    return logits


CASES: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "gaussian-10": lambda r: r.normal(size=(64, 10)),
    "1-class": lambda r: r.normal(size=(8, 1)),
    "2-class": lambda r: r.normal(scale=3.0, size=(64, 2)),
    "64-class": lambda r: r.normal(scale=2.0, size=(32, 64)),  # last width on the pure-python path
    "65-class": lambda r: r.normal(scale=2.0, size=(32, 65)),  # first width on the numpy path
    "1000-class": lambda r: r.normal(scale=3.0, size=(16, 1000)),
    "scale-1e3": lambda r: r.normal(scale=1e3, size=(64, 10)),
    "scale-1e3-2-class": lambda r: r.normal(scale=1e3, size=(64, 2)),
    "scale-1e3-1000-class": lambda r: r.normal(scale=1e3, size=(8, 1000)),
    "offset-1e4": lambda r: r.normal(size=(32, 10)) + 1e4,
    "near-uniform": lambda r: r.normal(scale=1e-6, size=(32, 10)),
    "float32": lambda r: r.normal(scale=5.0, size=(64, 10)).astype(np.float32),
    "float32-scale-1e3": lambda r: r.normal(scale=1e3, size=(32, 100)).astype(np.float32),
    "float16": lambda r: r.normal(scale=4.0, size=(32, 10)).astype(np.float16),
    "ties": _ties,
    "partial-neg-inf": _partial_neg_inf,
}


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def logits(request: pytest.FixtureRequest) -> np.ndarray:
    seed = sorted(CASES).index(request.param) + 1234
    return CASES[request.param](np.random.default_rng(seed))


# --- the registry is fully covered --------------------------------------------------------


def test_every_registered_policy_has_a_reference() -> None:
    assert set(REFERENCE) | set(SIGNAL_REFERENCE) == set(list_policies()), (
        "add a plain-numpy reference for every registered policy to REFERENCE (and remove stale ones)"
    )


def test_list_policies_is_sorted() -> None:
    assert list_policies() == sorted(list_policies())


@pytest.mark.parametrize("name", POLICIES)
def test_direction_matches_reference(name: str) -> None:
    policy = get_policy(name)
    assert policy.name == name
    assert policy.direction == REFERENCE[name][0]
    assert policy.description


# --- scores ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", POLICIES)
def test_batch_score_matches_reference(name: str, logits: np.ndarray) -> None:
    policy = get_policy(name)
    got = policy.scores(logits)
    assert got.dtype == np.float64
    assert got.shape == (logits.shape[0],)
    np.testing.assert_allclose(got, ref_scores(name, logits), rtol=ATOL, atol=ATOL)
    np.testing.assert_allclose(policy.batch_score(logits), got, rtol=0, atol=0)


@pytest.mark.parametrize("name", POLICIES)
def test_score_one_matches_reference(name: str, logits: np.ndarray) -> None:
    policy = get_policy(name)
    expected = ref_scores(name, logits)
    for i, row in enumerate(logits):
        got = policy.score_one(row)
        assert isinstance(got, float)
        assert got == pytest.approx(expected[i], rel=ATOL, abs=ATOL), f"row {i}: {row.tolist()[:8]}"


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("width", [1, 2, 3, 10, 64, 65, 1000])
def test_known_values_on_uniform_logits(name: str, width: int) -> None:
    # all classes tied: p = 1/C, so confidence 1/C, entropy ln C, margin 0 (1 for one class)
    expected = {
        "confidence": 1.0 / width,
        "entropy": math.log(width),
        "margin": 1.0 if width == 1 else 0.0,
        "patience": 0.0,
    }[name]
    policy = get_policy(name)
    for value in (0.0, -3.5, 1e3):
        logits = np.full((2, width), value)
        np.testing.assert_allclose(policy.scores(logits), expected, rtol=ATOL, atol=ATOL)
        assert policy.score_one(logits[0]) == pytest.approx(expected, rel=ATOL, abs=ATOL)


@pytest.mark.parametrize("name", POLICIES)
def test_scores_refuse_non_2d_logits(name: str) -> None:
    with pytest.raises(PolicyError, match=r"2-D logits \(batch, classes\); got shape \(3,\)"):
        get_policy(name).scores(np.zeros(3))


@pytest.mark.parametrize("name", SIGNAL_POLICIES)
def test_signal_policies_read_their_signal(name: str) -> None:
    direction, signal, reference = SIGNAL_REFERENCE[name]
    policy = get_policy(name)
    assert (policy.direction, policy.reads) == (direction, signal)
    values = np.array([[0.0], [0.25], [0.5], [1.0], [np.nan], [np.inf]], dtype=np.float32)
    expected = [reference(v) for v in values[:, 0]]
    np.testing.assert_array_equal(policy.scores(values), expected)
    for row, want in zip(values, expected):
        got = policy.score_one(row)
        assert (math.isnan(got) and math.isnan(want)) or got == want
    assert not policy.accepts(policy.scores(values)[4:], 0.0).any()     # NaN and inf never exit
    with pytest.raises(PolicyError, match=rf"{signal} values \(batch, 1\); got shape \(6, 2\)"):
        policy.scores(np.zeros((6, 2)))
    with pytest.raises(PolicyError, match=r"got shape \(3,\)"):
        policy.scores(np.zeros(3))


def test_a_policy_reads_the_logits_or_a_known_signal() -> None:
    p = get_policy("gate")
    with pytest.raises(PolicyError, match="reads must be 'logits' or a signal"):
        ExitPolicy("bad", "higher", p.batch_score, p.row_score, "", reads="lambda")


# --- accepts --------------------------------------------------------------------------------


def _thresholds(scores: np.ndarray) -> np.ndarray:
    lo, hi = float(scores.min()), float(scores.max())
    pad = max(1e-3, 0.05 * (hi - lo))
    spread = np.linspace(lo - pad, hi + pad, 200)
    # the scores themselves put the threshold exactly on the boundary (>= vs <)
    return np.concatenate([spread, np.unique(scores)[:50], [-np.inf, np.inf]])


@pytest.mark.parametrize("name", POLICIES)
def test_accepts_follows_the_rule_over_many_thresholds(name: str, logits: np.ndarray) -> None:
    policy = get_policy(name)
    direction = REFERENCE[name][0]
    scores = policy.scores(logits)
    reference = ref_scores(name, logits)
    for t in _thresholds(scores):
        mask = policy.accepts(scores, t)
        assert mask.dtype == np.bool_ and mask.shape == scores.shape
        np.testing.assert_array_equal(mask, ref_rule(direction, scores, t) & np.isfinite(scores),
                                      err_msg=f"threshold {t!r}")
        # against the reference scores too, away from the boundary where rounding may differ
        clear = np.abs(reference - t) > 1e-8
        np.testing.assert_array_equal(mask[clear], ref_rule(direction, reference, t)[clear],
                                      err_msg=f"threshold {t!r}")
        one = [policy.accepts_one(float(s), float(t)) for s in scores]
        np.testing.assert_array_equal(one, mask, err_msg=f"accepts_one, threshold {t!r}")


@pytest.mark.parametrize("name", POLICIES)
def test_accepts_one_on_score_one(name: str) -> None:
    # the batch-1 path end to end: score_one then accepts_one, as ExitSession._run_one does
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=3.0, size=(50, 4)).astype(np.float32)
    policy = get_policy(name)
    reference = ref_scores(name, logits)
    for t in np.linspace(reference.min() - 0.01, reference.max() + 0.01, 200):
        clear = np.abs(reference - t) > 1e-8
        got = np.array([policy.accepts_one(policy.score_one(row), float(t)) for row in logits])
        expected = ref_rule(REFERENCE[name][0], reference, t)
        np.testing.assert_array_equal(got[clear], expected[clear], err_msg=f"threshold {t!r}")


# --- non-finite logits ------------------------------------------------------------------------

# label -> (first entries, value of every other entry)
NON_FINITE_ROWS = {
    "nan-one": ([np.nan, 1.0, 2.0], -2.0),
    "nan-after-max": ([5.0, np.nan], -2.0),  # a max() scan may never look past the NaN
    "nan-all": ([], np.nan),
    "pos-inf-one": ([np.inf, 1.0, 2.0], -2.0),
    "pos-inf-two": ([np.inf, np.inf, 0.0], -2.0),
    "pos-and-neg-inf": ([1.0, np.inf, -np.inf], -2.0),
    "neg-inf-all": ([], -np.inf),  # no class has any probability: softmax is 0/0
    "nan-and-inf": ([np.nan, np.inf, 0.0], -2.0),
}
EXTREME_THRESHOLDS = [-np.inf, -1e308, -1.0, 0.0, 0.5, 1.0, 1e308, np.inf]


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("width", [3, 1000], ids=["3-class", "1000-class"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_non_finite_logits_never_accept(name: str, width: int, dtype: type) -> None:
    policy = get_policy(name)
    rows = []
    for head, fill in NON_FINITE_ROWS.values():
        row = np.full(width, fill)
        row[: len(head)] = head
        rows.append(row)
    finite_row = np.linspace(-1.0, 1.0, width)
    logits = np.array([*rows, finite_row], dtype=dtype)

    scores = policy.scores(logits)
    assert not np.isfinite(scores[:-1]).any(), dict(zip(NON_FINITE_ROWS, scores[:-1], strict=True))
    # a broken row does not spoil its neighbours
    assert scores[-1] == pytest.approx(REFERENCE[name][1](logits[-1]), rel=ATOL, abs=ATOL)
    for t in EXTREME_THRESHOLDS:
        assert not policy.accepts(scores[:-1], t).any(), f"threshold {t}"
        for row, label in zip(logits[:-1], NON_FINITE_ROWS, strict=True):
            one = policy.score_one(row)
            assert not math.isfinite(one), f"{label}: score_one gave {one}"
            assert policy.accepts_one(one, t) is False, f"{label}, threshold {t}"


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("score", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_never_accept(name: str, score: float) -> None:
    policy = get_policy(name)
    for t in EXTREME_THRESHOLDS:
        assert policy.accepts_one(score, t) is False
        assert not policy.accepts(np.array([score, score]), t).any()


# --- the registry -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", POLICIES)
def test_registry_refuses_duplicate_names(name: str) -> None:
    original = get_policy(name)
    clone = ExitPolicy(name, "higher", original.batch_score, original.row_score, "an impostor")
    with pytest.raises(PolicyError, match=rf"a policy named '{name}' is already registered"):
        register_policy(clone)
    assert get_policy(name) is original
    assert list_policies() == sorted(POLICIES + SIGNAL_POLICIES)


def test_unknown_policy_lists_names_and_suggests_the_nearest() -> None:
    with pytest.raises(UnknownPolicyError) as info:
        get_policy("entrop")
    message = str(info.value)
    assert message.startswith("unknown exit policy 'entrop'")
    for name in list_policies():
        assert name in message
    assert "Did you mean 'entropy'?" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, PolicyError)


def test_unknown_policy_without_a_near_name_has_no_suggestion() -> None:
    with pytest.raises(UnknownPolicyError) as info:
        get_policy("zzzzzzzz")
    assert "Did you mean" not in str(info.value)
    assert "registered policies: " + ", ".join(list_policies()) in str(info.value)


def test_policy_direction_is_validated() -> None:
    p = get_policy("entropy")
    with pytest.raises(PolicyError, match="direction must be 'higher' or 'lower', got 'sideways'"):
        ExitPolicy("bad", "sideways", p.batch_score, p.row_score, "")  # type: ignore[arg-type]


# --- thresholds -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("thresholds", "expected", "fragments"),
    [
        ([0.1, 0.2], 1, ["expected 1 threshold(s), one per early exit", "got 2: [0.1, 0.2]"]),
        ([], 1, ["expected 1 threshold(s)", "got 0"]),
        ([0.1], 2, ["expected 2 threshold(s)", "the last exit always accepts"]),
        ([math.nan], 1, ["threshold 0 is nan; use a finite number"]),
        ([0.1, math.inf], 2, ["threshold 1 is inf; use a finite number"]),
        ([-math.inf], 1, ["threshold 0 is -inf"]),
        (["high"], 1, ["threshold 0 must be a number, got 'high'"]),
        ([0.2, None], 2, ["threshold 1 must be a number, got None"]),
        ([[0.5]], 1, ["threshold 0 must be a number, got [0.5]"]),
    ],
    ids=["too-many", "none-given", "too-few", "nan", "inf", "neg-inf", "string", "none", "list"],
)
def test_check_thresholds_refuses(thresholds: list[object], expected: int, fragments: list[str]) -> None:
    with pytest.raises(ThresholdError) as info:
        check_thresholds(get_policy("entropy"), thresholds, expected)  # type: ignore[arg-type]
    for fragment in fragments:
        assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", POLICIES)
def test_check_thresholds_names_the_direction(name: str) -> None:
    sign = ">=" if REFERENCE[name][0] == "higher" else "<"
    with pytest.raises(ThresholdError, match=rf"policy '{name}' exits when score {sign} threshold"):
        check_thresholds(get_policy(name), [math.nan], 1)


def test_check_thresholds_returns_floats() -> None:
    got = check_thresholds(get_policy("confidence"), [np.float32(0.5), 1, 0.25], 3)
    assert got == [0.5, 1.0, 0.25]
    assert all(type(v) is float for v in got)
    assert check_thresholds(get_policy("confidence"), [], 0) == []


@pytest.mark.parametrize(
    ("policy", "thresholds", "fragment"),
    [("entropy", 5, "thresholds must be a list"), ("entropy", "0.5", "thresholds must be a list"),
     ("entropy", [10**400], "an integer of 401 digits"), ("entropy", [1e400], "is inf"),
     ("entropy", [True], "must be a number, got True (bool)"), ("entropy", [np.bool_(False)], "(bool"),
     ("confidence", [7.0], "could never fire"), ("margin", [1.5], "could never fire"),
     ("entropy", [-5.0], "could never fire")],
    ids=["int", "str", "huge-int", "1e400", "bool", "numpy-bool", "confidence-7", "margin-1.5", "entropy-neg"],
)
def test_thresholds_are_typed_numbers_some_score_can_pass(policy, thresholds, fragment):
    with pytest.raises(ThresholdError) as info:
        check_thresholds(get_policy(policy), thresholds, 1)
    assert fragment in str(info.value)


def test_thresholds_at_the_edges_of_the_score_range_are_kept():
    # 1e300 / -1e300 always pass (forced exit paths); the search's "nobody exits" candidates sit a hair
    # beyond the lowest or highest recorded score
    assert check_thresholds(get_policy("entropy"), [1e300], 1) == [1e300]
    assert check_thresholds(get_policy("entropy"), [-1e-9], 1) == [-1e-9]
    assert check_thresholds(get_policy("confidence"), [np.float32(1.0)], 1) == [1.0]
    assert check_thresholds(get_policy("margin"), [-1e300, None], 2, allow_disabled=True) == [-1e300, None]
