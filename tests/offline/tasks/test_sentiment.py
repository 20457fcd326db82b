"""value_steer.offline.tasks.sentiment: the VADER judge and the prompt splits."""

from __future__ import annotations

import numpy as np
import pytest

from value_steer.offline.tasks import SPLITS
from value_steer.offline.tasks import sentiment as S


def test_judge_polarity():
    neg = [
        "This was a terrible, awful experience and I hate it.",
        "The flight was delayed, rude staff, worst trip ever.",
    ]
    pos = ["I love this, it is wonderful and the staff were great!", "What a lovely, happy day."]
    neutral = ["The train leaves at nine.", ""]
    out = S.judge_negative(neg + pos + neutral)
    assert out.dtype == np.bool_ and out.shape == (6,)
    assert out.tolist() == [True, True, False, False, False, False]
    scores = S.compound(neg + pos)
    assert (scores[:2] < -0.05).all() and (scores[2:] > 0.05).all()
    assert S.judge_negative("I hate this.").tolist() == [True]  # a str is one text
    assert S.judge_negative([]).shape == (0,)


def test_split_sizes():
    sizes = {s: len(S.load_prompts(s)) for s in SPLITS}
    total = sum(sizes.values())
    assert total >= 2000
    spec = S.prompt_spec()
    assert total == len(spec["templates"]) * len(spec["topics"])
    assert abs(sizes["train"] / total - 0.6) < 0.03
    assert abs(sizes["calibration"] / total - 0.2) < 0.03
    assert abs(sizes["test"] / total - 0.2) < 0.03
    kinds = {t["kind"] for t in spec["templates"]}
    assert kinds == {"negative", "neutral"}


def test_splits_disjoint_by_pair_and_topic():
    seen_pairs: dict[tuple[str, str], str] = {}
    topics: dict[str, set[str]] = {}
    ids: set[str] = set()
    for split in SPLITS:
        ps = S.load_prompts(split)
        topics[split] = {p.topic for p in ps}
        for p in ps:
            assert p.split == split
            key = (p.template_id, p.topic)
            assert key not in seen_pairs, (key, split, seen_pairs.get(key))
            seen_pairs[key] = split
            assert p.id not in ids
            ids.add(p.id)
    assert not topics["train"] & topics["test"]
    assert not topics["train"] & topics["calibration"]
    assert not topics["calibration"] & topics["test"]
    # every split holds every template: the same template mix
    n_templates = len(S.prompt_spec()["templates"])
    for split in SPLITS:
        assert len({p.template_id for p in S.load_prompts(split)}) == n_templates


def test_prompts_deterministic_and_well_formed():
    a = S.load_prompts("test")
    b = S.load_prompts("test")
    assert [p.id for p in a] == [p.id for p in b] == sorted(p.id for p in a)
    assert a == b
    a[0].messages.append({"role": "user", "content": "mutated"})
    assert len(S.load_prompts("test")[0].messages) == 1  # callers get their own copies
    for p in b[:50]:
        assert p.messages == [{"role": "user", "content": p.text}]
        assert p.topic in p.text and "{topic}" not in p.text
        assert p.text[0].isupper()
    s1 = S.sample_prompts("test", 20, seed=1)
    assert [p.id for p in s1] == [p.id for p in S.sample_prompts("test", 20, seed=1)]
    assert [p.id for p in s1] != [p.id for p in S.sample_prompts("test", 20, seed=2)]
    assert len(S.sample_prompts("calibration", None)) == len(S.load_prompts("calibration"))


def test_bad_split():
    with pytest.raises(ValueError, match="unknown split"):
        S.load_prompts("dev")
