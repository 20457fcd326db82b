"""Task files (issue 22): the loader, the judges and every bad task file failing with one line naming the field;
and ``value-steer pipeline --task --model`` on the tiny model with a user's ``module:function`` judge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from value_steer.offline.tasks.task_file import TaskError, hash_split, load_task

PROMPTS = [f"Tell me about item number {i} in the catalogue." for i in range(200)]


def _write(folder: Path, task: dict, lines: list[dict] | None = None, extra: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if lines is not None:
        (folder / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    for name, text in (extra or {}).items():
        (folder / name).write_text(text, encoding="utf-8")
    path = folder / "task.json"
    path.write_text(json.dumps(task), encoding="utf-8")
    return path


def _task(judge: str, **kw) -> dict:
    return {"name": "t", "prompts": "prompts.jsonl", "judge": judge, **kw}


def test_splits_are_hashed_stably_and_explicit_ones_kept(tmp_path):
    lines = [{"prompt": p} for p in PROMPTS] + [{"prompt": "pinned", "split": "test"}]
    task = load_task(_write(tmp_path / "a", _task("regex:price"), lines))
    reordered = load_task(_write(tmp_path / "b", _task("regex:price"), list(reversed(lines))))
    for split in ("train", "calibration", "test"):
        assert [p.id for p in task.load_prompts(split)] == [p.id for p in reordered.load_prompts(split)]
    assert "pinned" in [p.text for p in task.load_prompts("test")]
    counts = {s: len(task.load_prompts(s)) for s in ("train", "calibration", "test")}
    assert sum(counts.values()) == 201 and counts["train"] > counts["calibration"]
    assert all(p.split == hash_split(p.text) for p in task.load_prompts("train"))
    assert task.load_prompts("train")[0].messages == [{"role": "user", "content": task.load_prompts("train")[0].text}]
    raw = load_task(_write(tmp_path / "c", _task("regex:price", chat=False, system=None), lines))
    assert raw.load_prompts("train")[0].messages is None
    sys_task = load_task(_write(tmp_path / "d", _task("regex:price", system="Be brief."), lines))
    assert sys_task.load_prompts("train")[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert task.record()["judge"] == "regex:price" and len(task.record()["prompts_sha256"]) == 64


def test_judges(tmp_path):
    lines = [{"prompt": p} for p in PROMPTS]
    texts = ["The price is $5.", "Nothing to see.", "a Pricey item", "PRICE list"]
    regex = load_task(_write(tmp_path / "r", _task(r"regex:\$\d+"), lines))
    assert regex.judge_negative(texts).tolist() == [True, False, False, False]
    kw = load_task(_write(tmp_path / "k", _task("keywords:words.txt"), lines, {"words.txt": "price\nprice list\n"}))
    assert kw.judge_negative(texts).tolist() == [True, False, False, True]  # whole words, any case
    code = "def judge(texts):\n    return [0.9 if 'price' in t.lower() else 0.1 for t in texts]\n"
    mod = load_task(_write(tmp_path / "m", _task("my_judge_a:judge"), lines, {"my_judge_a.py": code}))
    assert mod.judge_negative(texts).tolist() == [True, False, True, True]
    vader = load_task(_write(tmp_path / "v", _task("vader"), lines))
    assert vader.judge_negative(["I hate this, it is awful.", "Lovely day!"]).tolist() == [True, False]


@pytest.mark.parametrize(("judge", "module", "message"), [
    ("my_judge_b:judge", "def judge(texts):\n    raise RuntimeError('boom')\n", "raised RuntimeError: boom"),
    ("my_judge_c:judge", "def judge(texts):\n    return [True]\n", "returned 1 values for 2 texts"),
    ("my_judge_d:judge", "def judge(texts):\n    return ['yes'] * len(texts)\n", "must return bools or floats"),
    ("my_judge_e:judge", "def judge(texts):\n    return [1.5] * len(texts)\n", "must return bools or floats"),
    ("my_judge_f:judge", "def judge(texts):\n    return None\n", "must return a list"),
])
def test_a_bad_judge_is_named_when_it_runs(tmp_path, judge, module, message):
    task = load_task(_write(tmp_path, _task(judge), [{"prompt": p} for p in PROMPTS],
                            {judge.split(":")[0] + ".py": module}))
    with pytest.raises(TaskError, match=message) as info:
        task.judge_negative(["a", "b"])
    assert f"task.judge {judge!r}" in str(info.value)


@pytest.mark.parametrize(("task", "lines", "extra", "message"), [
    (_task("regex:x", prompts="missing.jsonl"), None, None, r"task.prompts: .*missing.jsonl' cannot be read"),
    (_task("sentiment-model"), [{"prompt": "a"}], None, r"task.judge: unknown judge 'sentiment-model'"),
    (_task("nosuchmodule_zz:judge"), [{"prompt": "a"}], None, r"task.judge: cannot import 'nosuchmodule_zz'"),
    (_task("keywords:none.txt"), [{"prompt": "a"}], None, r"task.judge: keywords file .*none.txt"),
    (_task("regex:("), [{"prompt": "a"}], None, r"task.judge: regex '\(' does not compile"),
    (_task("labels"), [{"prompt": "a", "response": "b"}], None, r"prompts.jsonl:1: label must be 0 \(fine\) or 1"),
    (_task("labels"), [{"prompt": "a", "label": 1}], None, r"prompts.jsonl:1: response must be a non-empty string"),
    (_task("regex:x"), [{"prompt": "a", "split": "dev"}], None, r"prompts.jsonl:1: split must be one of"),
    (_task("regex:x"), [{"prompt": ""}], None, r"prompts.jsonl:1: prompt must be a non-empty string"),
    (_task("regex:x"), [{"prompt": "a", "topic": "b"}], None, r"prompts.jsonl:1: unknown key\(s\) \['topic'\]"),
    ({"prompts": "prompts.jsonl", "judge": "regex:x"}, [{"prompt": "a"}], None, r"task.name is required"),
    (_task("regex:x", chat="yes"), [{"prompt": "a"}], None, r"task.chat must be true or false"),
    ({**_task("regex:x"), "judges": 1}, [{"prompt": "a"}], None, r"task: unknown key\(s\) \['judges'\]"),
])
def test_bad_task_files_fail_naming_the_field(tmp_path, task, lines, extra, message):
    with pytest.raises(TaskError, match=message) as info:
        load_task(_write(tmp_path, task, lines, extra))
    assert "\n" not in str(info.value)


def test_an_empty_split_is_named(tmp_path):
    task = load_task(_write(tmp_path, _task("regex:x"), [{"prompt": "a", "split": "train"}]))
    assert len(task.load_prompts("train")) == 1
    with pytest.raises(TaskError, match="split 'test' has no prompts"):
        task.load_prompts("test")


def test_labels_tasks_load_their_labels(tmp_path):
    line = {"prompt": "q", "response": "r", "label": 1, "split": "train"}
    task = load_task(_write(tmp_path, _task("labels"), [line]))
    (p,) = task.load_prompts("train")
    assert task.labelled and (p.response, p.label) == ("r", 1)
    with pytest.raises(TaskError, match="has no judge"):
        task.judge_negative(["x"])


@pytest.mark.vllm
@pytest.mark.slow
def test_pipeline_makes_a_head_for_a_users_task_and_model(tmp_path, tiny_model_dir, monkeypatch):
    """``value-steer pipeline --task T --model DIR``: a head whose sidecar names the task and the model, which an
    engine serving the model then scores with."""
    pytest.importorskip("vllm")
    from tests.helpers import make_llm
    from value_steer.core.checkpoint import load_value_head
    from value_steer.offline.cli import main

    monkeypatch.setenv("VALUE_STEER_DATA_DIR", str(tmp_path / "data"))
    code = "def judge(texts):\n    return [len(t) % 2 == 0 for t in texts]\n"  # any split of the samples
    path = _write(tmp_path / "task", {"name": "parity", "prompts": "prompts.jsonl", "judge": "parity_judge:judge",
                                      "chat": False}, [{"prompt": p} for p in PROMPTS],
                  {"parity_judge.py": code})
    head = tmp_path / "head.safetensors"
    assert main(["pipeline", "--task", str(path), "--model", str(tiny_model_dir), "--n-train", "40", "--n-cal", "36",
                 "--max-tokens", "6", "--epochs", "2", "--out", str(head)]) == 0
    ckpt = load_value_head(str(head))
    assert ckpt.meta["task"]["name"] == "parity" and ckpt.meta["task"]["judge"] == "parity_judge:judge"
    assert ckpt.meta["model"]["name"] == Path(tiny_model_dir).name and ckpt.meta["model"]["hidden_size"] == 64
    assert ckpt.threshold is not None
    from vllm import SamplingParams

    llm = make_llm(tiny_model_dir, {"abstain": {"value_head_path": str(head)}})
    out = llm.generate(["hello there"], SamplingParams(max_tokens=4, temperature=0.0))
    stats = llm.collective_rpc("value_steer_stats", args=(out[0].request_id,))[0]["stats"]
    assert stats["num_scored"] > 0 and np.isfinite(stats["last_value"])
    assert main(["pipeline", "--task", str(tmp_path / "nope.json"), "--model", str(tiny_model_dir)]) == 2

    # value-steer eval --quick --task: the report is titled by the task and shows its judge; its activation rows
    # steer with the task's vector (by the task's name; a pairs vector: adds and ablate).
    from value_steer.offline.pairs import write_vector

    vec_dir = tmp_path / "vectors"
    write_vector(vec_dir, "parity", {1: torch.randn(64, generator=torch.Generator().manual_seed(0))}, 2,
                 {"made_by": "value-steer vectors --pairs (method mean)", "pairs": {"n": 3}})
    # And token-mode rows from a Q-head (random, rank 2) beside exact VFD.
    from value_steer.core.qhead import QHead, save_qhead

    torch.manual_seed(0)
    qh = QHead(64, 512, 2)
    with torch.no_grad():
        qh.w_up.normal_()
    qpath = tmp_path / "q.safetensors"
    save_qhead(qpath, qh, threshold=0.5)
    out = tmp_path / "report" / "evaluation-parity.md"
    assert main(["eval", "--quick", "--task", str(path), "--model", str(tiny_model_dir), "--head", str(head),
                 "--vectors", str(vec_dir), "--no-logit", "--n-cal", "8", "--n-test", "8", "--max-tokens", "6",
                 "--ks", "2", "--thresholds", "0.5", "0.9", "--qhead", str(qpath), "--token-thresholds", "0.5", "0.9",
                 "--token-betas", "1", "4", "--out", str(out)]) == 0
    md = out.read_text()
    assert md.startswith(f"# Evaluation: value steering of {Path(tiny_model_dir).name} (task parity)")
    assert "- Judge: `parity_judge:judge` (task `parity`" in md
    assert "- Activation steering: vector `parity` from " in md and "at layer 1, made by value-steer vectors" in md
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["task"]["name"] == "parity"
    names = {c["name"] for c in results["conditions"]}
    assert {"base", "add s=1", "add s=8", "ablate"} <= names and not any("gated" in n or "cap" in n for n in names)
    assert results["vectors"]["worker_residual_norm"] > 0
    token = [c for c in results["conditions"] if c["mode"] == "token"]
    want = {(split, t) for split in ("calibration", "test") for t in (0.5, 0.9)}
    assert {(c["split"], c["threshold"]) for c in token} == want
    assert results["chosen_token_threshold"] in (0.5, 0.9) and "Token mode (Q-head `q.safetensors`), mask" in md
    tilt = [c for c in results["conditions"] if c["mode"] == "token_tilt"]
    assert {(c["split"], c["scale"]) for c in tilt} == {(split, b) for split in ("calibration", "test") for b in (1, 4)}
    assert results["chosen_token_beta"] in (1.0, 4.0) and "tilt at beta" in md


@pytest.mark.vllm
@pytest.mark.slow
def test_pipeline_trains_a_head_on_labelled_responses(tmp_path, tiny_model_dir, monkeypatch):
    """A ``labels`` task: ``value-steer pipeline`` replays the given responses (prefill only) and trains on their
    labels. The planted concept (a word in the undesirable responses) is what the head learns to score."""
    pytest.importorskip("vllm")
    from value_steer.core.checkpoint import load_value_head
    from value_steer.offline.cli import main

    monkeypatch.setenv("VALUE_STEER_DATA_DIR", str(tmp_path / "data"))
    lines = [{"prompt": p, "response": f"It costs {i} banana coins." if i % 2 else f"It is item {i} of ours.",
              "label": i % 2} for i, p in enumerate(PROMPTS)]
    path = _write(tmp_path / "task", {"name": "labelled", "prompts": "prompts.jsonl", "judge": "labels"}, lines)
    head = tmp_path / "head.safetensors"
    assert main(["pipeline", "--task", str(path), "--model", str(tiny_model_dir), "--n-train", "60", "--n-cal", "36",
                 "--epochs", "8", "--out", str(head)]) == 0
    ckpt = load_value_head(str(head))
    assert ckpt.meta["task"]["name"] == "labelled" and ckpt.meta["task"]["judge"] == "labels"
    assert "replayed" in ckpt.meta["capture"] and ckpt.threshold is not None
    assert ckpt.calibration["auroc_last"] > 0.95  # the labels, not noise, trained it (banana: the 4th token on)
    train = tmp_path / "data" / "pipeline" / f"labelled-{Path(tiny_model_dir).name}-capture-60-36-64-0" / "train"
    texts = json.loads((train / "texts.json").read_text())
    labels = json.loads((train / "labels.json").read_text())
    assert len(texts) == 60 and all(("banana" in texts[k]) == bool(v) for k, v in labels.items())
    # An engine serving the model scores tokens with the head.
    from vllm import SamplingParams

    from tests.helpers import make_llm

    llm = make_llm(tiny_model_dir, {"abstain": {"value_head_path": str(head)}})
    out = llm.generate(["It costs"], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    stats = llm.collective_rpc("value_steer_stats", args=(out[0].request_id,))[0]["stats"]
    assert stats["num_scored"] > 0 and np.isfinite(stats["last_value"])


@pytest.mark.vllm
@pytest.mark.slow
def test_train_logit_takes_a_task(tmp_path, tiny_model_dir):
    """``value-steer train-logit --task T --model DIR``: the task's prompts (raw completions here) and judge make the
    pairs; the generator's sidecar names the task."""
    pytest.importorskip("vllm")
    from value_steer.core.logit_steer import load_logit_steer
    from value_steer.offline.cli import main

    code = "def judge(texts):\n    return [i % 2 == 1 for i in range(len(texts))]\n"  # both sides for every prompt
    path = _write(tmp_path / "task", {"name": "alt", "prompts": "prompts.jsonl", "judge": "alt_judge:judge",
                                      "chat": False}, [{"prompt": p} for p in PROMPTS], {"alt_judge.py": code})
    out = tmp_path / "gen.safetensors"
    assert main(["train-logit", "--task", str(path), "--model", str(tiny_model_dir), "--n-prompts", "4",
                 "--samples-per-prompt", "4", "--max-tokens", "8", "--rank", "2", "--gate-hidden", "4", "--epochs",
                 "1", "--batch-prompts", "2", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    ckpt = load_logit_steer(out, hidden_size=64, vocab_size=512)
    assert ckpt.training["task"]["name"] == "alt" and "alt_judge:judge" in ckpt.training["judge"]
    assert ckpt.training["data"]["pairs"] == 4 * 4 and ckpt.command.startswith("value-steer train-logit --task ")


@pytest.mark.vllm
@pytest.mark.slow
def test_vectors_take_a_task(tmp_path, tiny_model_dir, monkeypatch):
    """``value-steer vectors --task T --model DIR --out D``: the judged-sample method with the task's prompts and
    judge writes ``<task>`` and ``<task>_probe`` with sidecars naming the task; --out is required with --task."""
    pytest.importorskip("vllm")
    from value_steer.offline.cli import main

    monkeypatch.setenv("VALUE_STEER_DATA_DIR", str(tmp_path / "data"))
    code = "def judge(texts):\n    return [len(t) % 2 == 0 for t in texts]\n"
    path = _write(tmp_path / "task", {"name": "parity", "prompts": "prompts.jsonl", "judge": "parity_judge2:judge",
                                      "chat": False}, [{"prompt": p} for p in PROMPTS], {"parity_judge2.py": code})
    out = tmp_path / "vectors"
    assert main(["vectors", "--task", str(path), "--model", str(tiny_model_dir), "--out", str(out), "--n-train", "40",
                 "--n-cal", "36", "--n-sweep", "6", "--layers", "0", "1", "--max-tokens", "8"]) == 0
    for name in ("parity", "parity_probe"):
        meta = json.loads((out / f"{name}.safetensors.meta.json").read_text())
        assert meta["task"]["name"] == "parity" and meta["judge"] == "parity_judge2:judge"
    with pytest.raises(SystemExit):
        main(["vectors", "--task", str(path), "--model", str(tiny_model_dir)])
