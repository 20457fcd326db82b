"""``value-steer``: argument handling, and ``serve`` (what ``make serve`` runs) answering with the
committed head on the real SmolLM2 model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import wait_healthy
from value_steer.core.checkpoint import load_value_head
from value_steer.offline.cli import build_parser, default_head_path, serve_argv


def test_committed_head_is_valid_and_calibrated():
    ckpt = load_value_head(default_head_path(), hidden_size=576)
    assert ckpt.threshold is not None and 0.0 < ckpt.threshold < 1.0
    assert ckpt.calibration is not None and ckpt.calibration["method"] == "split_conformal"
    assert "python -m value_steer.offline.pipeline" in ckpt.meta["command"]


def test_serve_argv_puts_the_section_in_additional_config():
    argv = serve_argv("/m", "/h.safetensors", "vfd", 4, "127.0.0.1", 8000, 0.6, ["--max-num-seqs", "8"])
    i = argv.index("--additional-config")
    assert argv[i + 1] == '{"vfd": {"value_head_path": "/h.safetensors", "num_candidates": 4, "threshold": 0.6}}'
    assert argv[argv.index("--worker-cls") + 1] == "value_steer.worker.ValueSteerWorker"
    assert argv[-2:] == ["--max-num-seqs", "8"]


def test_serve_argv_serves_the_model_under_its_folder_name():
    argv = serve_argv("/data/models/SmolLM2-135M-Instruct", "/h.safetensors", "vfd", 4, "127.0.0.1", 8000, None, [])
    assert argv[argv.index("--served-model-name") + 1] == "SmolLM2-135M-Instruct"
    # A name given on the command line wins (vLLM would otherwise see the flag twice).
    argv = serve_argv("/m/x", "/h.safetensors", "vfd", 4, "127.0.0.1", 8000, None, ["--served-model-name", "y"])
    assert argv.count("--served-model-name") == 1 and argv[-1] == "y"


def test_operating_point_from_eval_is_the_serve_default(tmp_path):
    import json

    import torch

    from value_steer.core.checkpoint import save_value_head
    from value_steer.core.value_head import ValueHead
    from value_steer.offline.cli import vfd_operating_threshold
    from value_steer.offline.pipeline import record_operating_point

    torch.manual_seed(0)
    head = str(tmp_path / "h.safetensors")
    save_value_head(head, ValueHead(8), threshold=0.8, meta={"command": "x"})
    assert vfd_operating_threshold(head) is None
    results = tmp_path / "evaluation.json"
    results.write_text(json.dumps({"plan": {"ks": [4, 8]}, "chosen_thresholds": {"4": 0.65, "8": 0.7}}))
    point = record_operating_point(head, str(results))
    assert point["num_candidates"] == 4 and point["threshold"] == 0.65
    assert vfd_operating_threshold(head) == 0.65
    ckpt = load_value_head(head)
    assert ckpt.threshold == pytest.approx(0.8) and ckpt.meta["command"] == "x"  # the rest is kept
    results.write_text("{}")
    with pytest.raises(ValueError, match="not a value-steer eval result"):
        record_operating_point(head, str(results))


@pytest.mark.parametrize("argv", [["capture", "--split", "dev", "--n", "3", "--out", "x"],
                                  ["serve", "--mode", "both"]])
def test_bad_arguments_name_the_allowed_values(argv, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.vllm
@pytest.mark.slow
def test_serve_answers_with_the_committed_head(tmp_path):
    requests = pytest.importorskip("requests")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "value_steer.offline.cli", "serve", "--port", str(port),
                                 "--max-num-seqs", "4", "--max-model-len", "512"],
                                env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(proc, url, log)
        except RuntimeError as exc:
            pytest.fail(f"value-steer serve: {exc}")
        model = requests.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        assert model == "SmolLM2-135M-Instruct"  # the README's request uses this name
        r = requests.post(url + "/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 8, "temperature": 0.8, "seed": 1,
            "messages": [{"role": "user", "content": "Write a short review of a crowded airport."}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        stats = requests.get(f"{url}/v1/value_steer/requests/{r.json()['id']}", timeout=30).json()["stats"]
        assert stats["mode"] == "vfd" and stats["num_candidates"] == 4 and stats["head"] == "sentiment"
        assert stats["num_scored"] == r.json()["usage"]["completion_tokens"]
        # The second concept's head, as the README's request picks it; an unknown one is a 400 naming both.
        r = requests.post(url + "/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 8, "temperature": 0.8, "seed": 1, "vllm_xargs": {"head": "no-prices"},
            "messages": [{"role": "user", "content": "How much does a weekend in Lisbon cost?"}]})
        assert r.status_code == 200, r.text
        stats = requests.get(f"{url}/v1/value_steer/requests/{r.json()['id']}", timeout=30).json()["stats"]
        assert stats["head"] == "no-prices" and stats["threshold"] == pytest.approx(0.6)
        r = requests.post(url + "/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 8, "vllm_xargs": {"head": "toxicity"},
            "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 400 and "head must be one of ['sentiment', 'no-prices']" in r.text, r.text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_argv_token_mode():
    argv = serve_argv("/m", "/h.safetensors", "token", 4, "127.0.0.1", 8000, None, [], qhead="/q.safetensors")
    cfg = json.loads(argv[argv.index("--additional-config") + 1])
    assert cfg == {"vfd": {"mode": "token", "qhead_path": "/q.safetensors"}}
    argv = serve_argv("/m", "/h.safetensors", "token", 4, "127.0.0.1", 8000, 0.7, [], qhead="/q.safetensors")
    assert json.loads(argv[argv.index("--additional-config") + 1])["vfd"]["threshold"] == 0.7


def test_serve_argv_adds_the_steering_section():
    argv = serve_argv("/m", "/h.safetensors", "vfd", 4, "127.0.0.1", 8000, None, [], {"vectors": "/v"})
    cfg = json.loads(argv[argv.index("--additional-config") + 1])
    assert cfg["steering"] == {"vectors": "/v"} and cfg["vfd"]["num_candidates"] == 4
    assert build_parser().parse_args(["serve"]).steering is True
    assert build_parser().parse_args(["serve", "--no-steering"]).steering is False


def test_serve_argv_adds_the_logit_steering_section():
    argv = serve_argv("/m", "/h.safetensors", "vfd", 4, "127.0.0.1", 8000, None, [], None, {"checkpoint": "/g"})
    cfg = json.loads(argv[argv.index("--additional-config") + 1])
    assert cfg["logit_steering"] == {"checkpoint": "/g"} and "steering" not in cfg
    assert build_parser().parse_args(["serve"]).logit_steering is True
    assert build_parser().parse_args(["serve", "--no-logit-steering"]).logit_steering is False


def test_serve_takes_a_users_model_vectors_and_generator(tmp_path, monkeypatch):
    """``value-steer serve --model DIR --head H --vectors D --generator G``: the sections name them; with another
    model and no --vectors / --generator, the committed SmolLM2 ones are not preloaded."""
    from value_steer.offline import cli

    seen: list[list[str]] = []
    monkeypatch.setattr(cli.os, "execvpe", lambda exe, argv, env: seen.append(argv))
    from tests.helpers import write_constant_head

    head = write_constant_head(tmp_path / "h.safetensors", 64, 0.0, 0.6)
    vectors = tmp_path / "vectors"
    vectors.mkdir()
    (vectors / "tone.safetensors").write_bytes(b"x")
    gen = tmp_path / "g.safetensors"
    gen.write_bytes(b"x")

    def config(argv):
        cli.main(argv)
        args = seen[-1]
        return json.loads(args[args.index("--additional-config") + 1])

    cfg = config(["serve", "--model", "/m/mine", "--head", str(head), "--threshold", "0.5", "--vectors", str(vectors),
                  "--generator", str(gen)])
    assert cfg["steering"] == {"vectors": str(vectors)} and cfg["logit_steering"] == {"checkpoint": str(gen)}
    cfg = config(["serve", "--model", "/m/mine", "--head", str(head), "--threshold", "0.5"])
    assert cfg["steering"] == {} and "logit_steering" not in cfg
    with pytest.raises(SystemExit, match="--vectors"):
        cli.main(["serve", "--model", "/m/mine", "--head", str(head), "--threshold", "0.5", "--vectors",
                  str(tmp_path / "none")])


def test_serve_loads_the_second_concepts_head_beside_the_built_in_one(tmp_path):
    from value_steer.offline.assets import default_extra_heads
    from value_steer.offline.cli import serve_heads

    head = str(default_head_path())
    no_prices = default_extra_heads()["no-prices"]
    assert no_prices.is_file()  # this checkout's bring-your-own example
    heads, default = serve_heads(build_parser().parse_args(["serve"]), head, 0.6, own_model=True)
    assert default == "sentiment" and list(heads) == ["sentiment", "no-prices"]
    assert heads["sentiment"] == {"path": head, "threshold": 0.6} and heads["no-prices"]["path"] == str(no_prices)
    argv = serve_argv("/m", head, "vfd", 4, "127.0.0.1", 8000, 0.6, [], heads=heads, default_head=default)
    cfg = json.loads(argv[argv.index("--additional-config") + 1])
    assert cfg["vfd"] == {"heads": heads, "default_head": "sentiment", "num_candidates": 4}
    from value_steer.core.config import parse_additional_config

    assert [h.name for h in parse_additional_config(cfg).heads] == ["sentiment", "no-prices"]
    # Off by flag, with another model or --head, and in token mode; --extra-head adds any.
    assert serve_heads(build_parser().parse_args(["serve", "--no-extra-heads"]), head, 0.6, True) == (None, None)
    assert serve_heads(build_parser().parse_args(["serve"]), head, 0.6, own_model=False) == (None, None)
    assert serve_heads(build_parser().parse_args(["serve", "--mode", "token"]), head, None, True) == (None, None)
    mine = tmp_path / "mine.safetensors"
    from tests.helpers import write_constant_head

    write_constant_head(mine, 576, 0.0, 0.4)
    args = build_parser().parse_args(["serve", "--no-extra-heads", "--extra-head", f"mine={mine}", "--head-name", "s"])
    heads, default = serve_heads(args, head, None, True)
    assert default == "s" and heads == {"s": {"path": head}, "mine": {"path": str(mine)}}
    args = build_parser().parse_args(["serve", "--head", str(mine), "--extra-head", f"other={mine}"])
    assert list(serve_heads(args, str(mine), None, True)[0]) == ["mine", "other"]  # a user's head: its file's name
    for bad in (["--extra-head", "mine"], ["--extra-head", "x=/nonexistent.safetensors"],
                ["--extra-head", f"sentiment={mine}"]):
        with pytest.raises(SystemExit, match="--extra-head"):
            serve_heads(build_parser().parse_args(["serve", *bad]), head, None, True)
