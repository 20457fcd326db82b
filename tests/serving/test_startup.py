"""Start-up under vLLM's GPU defaults, tested on CPU: what value_steer's plugin does before and after vLLM
builds the engine config (``prepare_engine_args`` / ``check_engine_config``), and that the plugin is wired.

The CUDA platform's defaults that matter here (docs/gpu-defaults.md): Model Runner V2 is selected
(``VLLM_USE_V2_MODEL_RUNNER`` unset), async scheduling is on (``async_scheduling=None`` resolves to True),
and ``cudagraph_mode`` resolves to ``FULL_AND_PIECEWISE`` with non-empty capture sizes. The CPU platform
resolves all three differently, so these tests hand the hook CUDA's inputs (``cuda_graphs=True``) and a
real CPU-built ``VllmConfig`` with CUDA's resolved values written back into it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import TINY_HIDDEN, write_constant_head
from value_steer.core.modes import MODE_ABSTAIN, MODE_VFD
from value_steer.serving import WORKER_CLS

pytestmark = pytest.mark.vllm

V2_ENV = "VLLM_USE_V2_MODEL_RUNNER"


@pytest.fixture
def fresh_env(monkeypatch):
    """vLLM's environment as a fresh process sees it: no runner chosen, no frozen env cache, no config."""
    import vllm.envs as envs

    monkeypatch.delenv(V2_ENV, raising=False)
    monkeypatch.delenv("VALUE_STEER_CONFIG", raising=False)
    envs.disable_envs_cache()
    yield monkeypatch
    monkeypatch.undo()
    envs.disable_envs_cache()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    return write_constant_head(tmp_path_factory.mktemp("head") / "head.safetensors", TINY_HIDDEN, 0.0, 0.6)


def _args(model, section: str, head: str, **kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), worker_cls=WORKER_CLS, additional_config={section: {"value_head_path": head}},
                      dtype="float32", max_model_len=256, **kw)


def test_plugin_is_an_installed_vllm_general_plugin():
    from importlib.metadata import entry_points

    from vllm.plugins import DEFAULT_PLUGINS_GROUP

    found = {ep.name: ep.value for ep in entry_points(group=DEFAULT_PLUGINS_GROUP)}
    assert found.get("value_steer") == "value_steer.serving.plugin:register"
    # Not a vllm.logits_processors plugin: vLLM would add it to every engine, and Model Runner V2 refuses it.
    assert not [ep for ep in entry_points(group="vllm.logits_processors") if ep.value.startswith("value_steer")]


def test_vfd_under_cuda_defaults_is_adjusted_before_the_config_is_built(fresh_env, tiny_model_dir, head):
    from vllm.config import CUDAGraphMode

    from value_steer.patches.vllm_0_32 import REQUEST_VALIDATOR, prepare_engine_args

    args = _args(tiny_model_dir, "vfd", head)
    assert args.async_scheduling is None and args.compilation_config.cudagraph_mode is None  # CUDA: on, FULL
    cfg = prepare_engine_args(args, cuda_graphs=True)
    assert cfg.mode == MODE_VFD
    assert os.environ[V2_ENV] == "0"  # set before any engine process is spawned: they inherit it
    assert args.async_scheduling is False
    assert args.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert args.logits_processors == [REQUEST_VALIDATOR]
    assert json.loads(os.environ["VALUE_STEER_CONFIG"]) == {"vfd": {"value_head_path": head}}
    # One KV cache group for hybrid-attention models (docs/models.md).
    assert args.disable_hybrid_kv_cache_manager is True


def test_vfd_refuses_an_explicit_hybrid_kv_cache_manager(fresh_env, tiny_model_dir, head):
    from value_steer.patches.vllm_0_32 import StartupError, prepare_engine_args

    args = _args(tiny_model_dir, "vfd", head, disable_hybrid_kv_cache_manager=False)
    with pytest.raises(StartupError, match="--no-disable-hybrid-kv-cache-manager: vfd needs one KV cache group"):
        prepare_engine_args(args, cuda_graphs=True)
    abstain = _args(tiny_model_dir, "abstain", head, disable_hybrid_kv_cache_manager=False)
    prepare_engine_args(abstain, cuda_graphs=True)  # abstention never needed one group
    assert abstain.disable_hybrid_kv_cache_manager is False


def test_abstention_keeps_async_scheduling_and_full_cuda_graphs(fresh_env, tiny_model_dir, head):
    from value_steer.patches.vllm_0_32 import prepare_engine_args

    args = _args(tiny_model_dir, "abstain", head, async_scheduling=True)
    assert prepare_engine_args(args, cuda_graphs=True).mode == MODE_ABSTAIN
    assert os.environ[V2_ENV] == "0"
    assert args.async_scheduling is True and args.compilation_config.cudagraph_mode is None


def test_every_setting_vfd_cannot_honour_is_refused_in_one_message(fresh_env, tiny_model_dir, head):
    from value_steer.patches.vllm_0_32 import StartupError, prepare_engine_args

    fresh_env.setenv(V2_ENV, "1")
    args = _args(tiny_model_dir, "vfd", head, async_scheduling=True, pipeline_parallel_size=2,
                 compilation_config={"cudagraph_mode": "FULL_AND_PIECEWISE"},
                 speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(StartupError) as err:
        prepare_engine_args(args, cuda_graphs=True)
    text = str(err.value)
    assert len(err.value.problems) == 5, text
    for setting, fix in [(f"{V2_ENV}=1", f"{V2_ENV}=0"), ("--async-scheduling", "--no-async-scheduling"),
                         ("cudagraph_mode FULL_AND_PIECEWISE", '"cudagraph_mode": "PIECEWISE"'),
                         ("speculative decoding", "remove --speculative-config"),
                         ("--pipeline-parallel-size 2", "--pipeline-parallel-size 1")]:
        assert any(setting in p and fix in p for p in err.value.problems), (setting, text)


def test_enforce_eager_needs_no_cuda_graph_change(fresh_env, tiny_model_dir, head):
    from value_steer.patches.vllm_0_32 import prepare_engine_args

    args = _args(tiny_model_dir, "vfd", head, enforce_eager=True)
    prepare_engine_args(args, cuda_graphs=True)
    assert args.compilation_config.cudagraph_mode is None


def _cuda_like_config(tiny_model_dir):
    """A real VllmConfig built on CPU, with the values CUDA's defaults resolve to written back into it."""
    from vllm.config import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    cfg = EngineArgs(model=str(tiny_model_dir), dtype="float32", max_model_len=256).create_engine_config()
    cfg.scheduler_config.async_scheduling = True
    cfg.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    cfg.compilation_config.cudagraph_capture_sizes = [1, 2, 4, 8]
    return cfg


def test_check_engine_config_under_cuda_defaults(fresh_env, tiny_model_dir, head):
    import vllm.envs as envs

    from value_steer.core.config import parse_additional_config
    from value_steer.patches.vllm_0_32 import StartupError, check_engine_config

    cfg = _cuda_like_config(tiny_model_dir)
    vfd = parse_additional_config({"vfd": {"value_head_path": head}})
    abstain = parse_additional_config({"abstain": {"value_head_path": head}})
    # V1 selected (what the plugin's hook arranges): abstention runs with async scheduling and FULL graphs.
    fresh_env.setenv(V2_ENV, "0")
    envs.disable_envs_cache()
    check_engine_config(cfg, abstain)
    with pytest.raises(StartupError) as err:
        check_engine_config(cfg, vfd)
    assert len(err.value.problems) == 2
    assert "--no-async-scheduling" in err.value.problems[0]
    assert "FULL_AND_PIECEWISE" in err.value.problems[1] and "PIECEWISE" in err.value.problems[1]
    # V2 selected (the plugin excluded by VLLM_PLUGINS on a GPU): refused, naming the variable.
    fresh_env.setenv(V2_ENV, "1")
    envs.disable_envs_cache()
    assert cfg.use_v2_model_runner
    with pytest.raises(StartupError, match=f"Model Runner V2.*{V2_ENV}=0"):
        check_engine_config(cfg, abstain)


def test_token_mode_keeps_async_scheduling_and_full_cuda_graphs(fresh_env, tiny_model_dir, tmp_path):
    """Token-mode VFD edits logits only (no candidate rows, no scratch KV): start-up leaves CUDA's defaults on, and
    a CUDA-like config with async scheduling and FULL graphs passes; a Q-head for another model is refused."""
    import vllm.envs as envs
    from vllm.engine.arg_utils import EngineArgs

    from value_steer.core.config import parse_additional_config
    from value_steer.core.qhead import QHead, save_qhead
    from value_steer.patches.vllm_0_32 import StartupError, check_engine_config, prepare_engine_args

    q = tmp_path / "q.safetensors"
    save_qhead(q, QHead(TINY_HIDDEN, 512, 2), threshold=0.5)
    section = {"vfd": {"mode": "token", "qhead_path": str(q)}}
    args = EngineArgs(model=str(tiny_model_dir), worker_cls=WORKER_CLS, additional_config=section, dtype="float32",
                      max_model_len=256)
    prepare_engine_args(args, cuda_graphs=True)
    assert args.async_scheduling is None and args.compilation_config.cudagraph_mode is None
    assert args.disable_hybrid_kv_cache_manager is None
    fresh_env.setenv(V2_ENV, "0")
    envs.disable_envs_cache()
    cfg = _cuda_like_config(tiny_model_dir)
    check_engine_config(cfg, parse_additional_config(section))
    other = tmp_path / "other.safetensors"
    save_qhead(other, QHead(TINY_HIDDEN * 2, 512, 2), threshold=0.5)
    with pytest.raises(StartupError, match=r"vfd\.qhead_path: .*hidden_size 128 does not match the model's 64"):
        check_engine_config(cfg, parse_additional_config({"vfd": {"mode": "token", "qhead_path": str(other)}}))
    named = {"vfd": {"mode": "token", "heads": {"ok": {"path": str(q)}, "wide": {"path": str(other)}},
                     "default_head": "ok"}}
    with pytest.raises(StartupError, match=r"vfd\.heads\.wide: .*hidden_size 128 does not match the model's 64"):
        check_engine_config(cfg, parse_additional_config(named))


def test_every_value_head_must_fit_the_model(fresh_env, tiny_model_dir, head, tmp_path):
    """A value head whose hidden size is not the model's is refused before any engine starts, naming the head: the
    single-path form by ``value_head_path``, a named head by ``heads.<name>``."""
    from value_steer.core.config import parse_additional_config
    from value_steer.patches.vllm_0_32 import StartupError, check_engine_config

    cfg = _cuda_like_config(tiny_model_dir)
    wide = write_constant_head(tmp_path / "wide.safetensors", TINY_HIDDEN * 2, 0.0, 0.6)
    with pytest.raises(StartupError, match=r"abstain\.value_head_path: .*hidden size"):
        check_engine_config(cfg, parse_additional_config({"abstain": {"value_head_path": wide}}))
    heads = {"fits": {"path": head}, "wide": {"path": wide}}
    with pytest.raises(StartupError, match=r"vfd\.heads\.wide: .*hidden size") as err:
        check_engine_config(cfg, parse_additional_config({"vfd": {"heads": heads, "default_head": "fits"}}))
    assert "heads.fits" not in str(err.value)
    check_engine_config(cfg, parse_additional_config({"abstain": {"heads": {"fits": {"path": head}}}}))


def test_vllms_own_config_path_runs_the_hook(fresh_env, tiny_model_dir, head):
    """``EngineArgs.create_engine_config`` (what ``vllm serve`` and ``LLM`` call) goes through the plugin's hook:
    with value_steer's worker it adds the validator and refuses what VFD cannot honour; with any other worker
    it changes nothing."""
    from value_steer.patches.vllm_0_32 import StartupError, has_request_validator

    cfg = _args(tiny_model_dir, "abstain", head).create_engine_config()
    assert has_request_validator(cfg) and not cfg.use_v2_model_runner
    assert os.environ[V2_ENV] == "0"
    with pytest.raises(StartupError, match="--no-async-scheduling"):
        _args(tiny_model_dir, "vfd", head, async_scheduling=True).create_engine_config()
    from vllm.engine.arg_utils import EngineArgs

    plain = EngineArgs(model=str(tiny_model_dir), dtype="float32", max_model_len=256, async_scheduling=True)
    assert not has_request_validator(plain.create_engine_config())


def test_other_engines_are_left_alone(fresh_env, tiny_model_dir):
    from vllm.engine.arg_utils import EngineArgs

    from value_steer.patches.vllm_0_32 import has_request_validator

    args = EngineArgs(model=str(tiny_model_dir), dtype="float32", max_model_len=256, additional_config={"x": 1})
    cfg = args.create_engine_config()
    assert not has_request_validator(cfg) and args.async_scheduling is None
    assert V2_ENV not in os.environ and "VALUE_STEER_CONFIG" not in os.environ
    assert cfg.additional_config == {"x": 1}  # another plugin's additional_config is not ours to check


def test_bad_additional_config_fails_before_the_config_is_built(fresh_env, tiny_model_dir, head):
    from value_steer.core.config import ConfigError

    args = _args(tiny_model_dir, "vfd", head)
    args.additional_config = {"vfd": {"value_head_path": head, "num_candidates": 0}}
    with pytest.raises(ConfigError, match=r"vfd\.num_candidates must be an integer in \[1, 64\]"):
        args.create_engine_config()


def test_plugin_stands_aside_for_a_vllm_without_adapter(monkeypatch):
    import value_steer.patches as patches
    from value_steer.serving import plugin

    monkeypatch.setattr(patches, "vllm_version", lambda: "0.31.0")
    plugin.register()  # no adapter, no error: other engines in this environment keep working


def test_launcher_gives_the_cpu_build_a_vllm_version():
    code = ("from value_steer.serving.launcher import patch_vllm_version; patch_vllm_version(); "
            "import importlib.metadata as md; print(md.version('vllm'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    from value_steer.patches import vllm_version

    assert out.split("+")[0] == vllm_version().split("+")[0]

