"""``value-steer vectors --pairs`` (issue 22): contrastive pairs -> per-layer mean differences of the residual stream,
checked against transformers' hidden states of the same model; bad pairs files name the line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from value_steer.offline.pairs import pair_directions, read_pairs, write_vector
from value_steer.offline.tasks.task_file import TaskError

PAIRS = [
    {"prompt": "How was the trip?", "positive": "It was lovely and calm.", "negative": "It was awful and loud."},
    {"positive": "Great food, kind staff.", "negative": "Cold food, rude staff."},
    {"prompt": "Rate the film.", "positive": "A joy from start to end.", "negative": "A bore from start to end."},
]


def _pairs_file(tmp_path: Path, lines: list) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(("line", "message"), [
    ({"positive": "a"}, r"pairs.jsonl:1: negative is required"),
    ({"negative": "a", "positive": ""}, r"pairs.jsonl:1: positive is required"),
    ({"positive": "a", "negative": "b", "label": 1}, r"pairs.jsonl:1: unknown key\(s\) \['label'\]"),
    ({"positive": "a", "negative": "b", "prompt": 3}, r"pairs.jsonl:1: prompt must be a string"),
    ("[1, 2]", r"pairs.jsonl:1: must be a JSON object"),
    ("{", r"pairs.jsonl:1: not a JSON object"),
])
def test_bad_pairs_name_the_line_and_field(tmp_path, line, message):
    with pytest.raises(TaskError, match=message):
        read_pairs(_pairs_file(tmp_path, [line]))


def test_directions_and_the_written_file(tmp_path):
    pos = torch.tensor([[2.0, 0.0], [4.0, 1.0], [3.0, -1.0]])
    neg = torch.zeros(3, 2)
    assert torch.allclose(pair_directions(pos, neg, "mean"), torch.tensor([3.0, 0.0]))
    pc = pair_directions(pos, neg, "pca")
    assert torch.dot(pc, torch.tensor([3.0, 0.0])) > 0 and abs(float(pc.norm()) - 3.0) < 1e-5
    # Several layers: one [num_layers, H] file, rows of layers not asked for zero; one layer: [H].
    path = write_vector(tmp_path, "v", {1: torch.ones(2), 3: torch.full((2,), 2.0)}, 5, {"made_by": "test"})
    from safetensors.torch import load_file

    t = load_file(str(path))["vector"]
    assert t.shape == (5, 2) and t[0].abs().sum() == 0 and t[3].tolist() == [2.0, 2.0]
    meta = json.loads(Path(str(path) + ".meta.json").read_text())
    assert meta["layers"] == [1, 3] and meta["norms"]["3"] == pytest.approx(2 * 2**0.5)
    assert load_file(str(write_vector(tmp_path, "w", {2: torch.ones(2)}, 5, {})))["vector"].shape == (2,)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("method", ["mean", "pca"])
def test_pairs_vector_equals_the_mean_difference_of_the_residual_stream(tmp_path, tiny_model_dir, method):
    """The vector at layer 0 equals, per pair, mean(positive response tokens) - mean(negative response tokens) of
    transformers' hidden state after layer 0 (the residual stream the steering op edits), averaged over pairs (for
    pca: their first principal component, scaled to that mean's norm); the server loads the file."""
    pytest.importorskip("vllm")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from value_steer.offline.cli import main
    from value_steer.offline.pairs import _token_ids

    out = tmp_path / "vectors"
    assert main(["vectors", "--pairs", str(_pairs_file(tmp_path, PAIRS)), "--model", str(tiny_model_dir),
                 "--layers", "0", "--name", "tone", "--out", str(out), "--method", method]) == 0
    got = load_file(str(out / "tone.safetensors"))["vector"]

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32).eval()

    def mean_stream(prompt, response):
        ids, start = _token_ids(tok, prompt, response)
        with torch.no_grad():
            hs = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
        return hs[start:].mean(dim=0)

    pos = torch.stack([mean_stream(p.get("prompt"), p["positive"]) for p in PAIRS])
    neg = torch.stack([mean_stream(p.get("prompt"), p["negative"]) for p in PAIRS])
    want = pair_directions(pos, neg, method)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.norm()))
    meta = json.loads((out / "tone.safetensors.meta.json").read_text())
    assert meta["pairs"]["n"] == 3 and meta["layers"] == [0] and method in meta["made_by"]
    assert main(["vectors", "--pairs", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model_dir),
                 "--layers", "0", "--name", "x", "--out", str(out)]) == 2
