"""value-steer-compat: the adapter's contract holds on the installed vLLM, covers every vLLM name the
adapter's source uses, and steering fires."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed")

ADAPTER_DIR = Path(__file__).resolve().parents[2] / "patches" / "vllm_0_32"
ADAPTER_PACKAGE = "value_steer.patches.vllm_0_32"


def test_static_contract_holds():
    from value_steer.patches import get_adapter

    assert get_adapter().check_contract() == []


def test_contract_detects_drift(monkeypatch):
    from value_steer.patches.vllm_0_32 import contract

    monkeypatch.setattr(contract, "CONTRACT", [*contract.CONTRACT,
                        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._sample", ("self", "no_such_param")),
                        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.gone_method", ())])
    problems = contract.check_contract()
    assert any("no_such_param" in p for p in problems)
    assert any("gone_method" in p for p in problems)


def test_contract_detects_attribute_drift(monkeypatch):
    """Class entries check fields and instance attributes (vLLM's `self.x = ...`), not just dir()."""
    from value_steer.patches.vllm_0_32 import contract

    runner = "vllm.v1.worker.gpu_model_runner"
    monkeypatch.setattr(contract, "CONTRACT", [
        (runner, "GPUModelRunner", ("discard_request_mask", "no_such_buffer")),
        ("vllm.v1.kv_cache_interface", "KVCacheTensor", ("layer_stride", "no_such_field")),
        ("vllm.platforms", "current_platform", ("is_cpu", "no_such_method")),
    ])
    problems = contract.check_contract()
    assert len(problems) == 3, problems
    for missing in ("no_such_buffer", "no_such_field", "no_such_method"):
        assert any(f"missing ['{missing}']" in p for p in problems), (missing, problems)


# ---- CONTRACT covers every vLLM name in the adapter's source ------------------------------------------


def _vllm_member_names(cls: type) -> set[str]:
    from value_steer.patches.vllm_0_32.contract import _assigned_self_attributes, _attributes

    return _attributes(cls) | set(_assigned_self_attributes(cls))


def _covered(contract: Iterable[tuple[str, str, tuple[str, ...]]]
             ) -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, set[str]]]:
    """``(module -> top-level names, class -> members, "Class.method" -> parameters)`` CONTRACT lists."""
    modules: dict[str, set[str]] = {}
    members: dict[str, set[str]] = {}
    params: dict[str, set[str]] = {}
    for module, qualname, needs in contract:
        head, _, rest = qualname.partition(".")
        modules.setdefault(module, set()).add(head)
        if rest:
            members.setdefault(head, set()).add(rest)
            params.setdefault(qualname, set()).update(needs)
        else:
            members.setdefault(head, set()).update(needs)
    return modules, members, params


def _self_name(node: ast.AST) -> str | None:
    """``x`` for ``self.x`` and for ``getattr(self, "x", ...)`` / ``hasattr(self, "x")``."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id == "self"
            and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        return node.args[1].value
    return None


def _super_call(node: ast.AST) -> str | None:
    """``name`` for ``super().name(...)``."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Call) and isinstance(node.func.value.func, ast.Name)
            and node.func.value.func.id == "super"):
        return node.func.attr
    return None


def _kwargs_keys(fn: ast.FunctionDef) -> list[tuple[int, str]]:
    """``(line, key)`` of every ``kwargs["key"]`` / ``kwargs.get("key")`` on the function's ``**kwargs``."""
    if fn.args.kwarg is None:
        return []
    kw = fn.args.kwarg.arg
    out = []
    for node in ast.walk(fn):
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == kw
                and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            out.append((node.lineno, node.slice.value))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and isinstance(node.func.value, ast.Name) and node.func.value.id == kw and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return out


def contract_gaps(sources: dict[str, str], contract: Iterable[tuple[str, str, tuple[str, ...]]],
                  vllm_bases: dict[str, tuple[type, ...]]) -> list[str]:
    """Every vLLM name ``sources`` (file name -> adapter source) use that ``contract`` does not list.

    ``vllm_bases`` maps each adapter class that binds to vLLM classes to them (a runner mixin: the V1
    runners it is mixed in front of; the request validator: vLLM's ``LogitsProcessor``). In such a class
    these are bindings: a method that overrides a member of a base, ``super().name(...)``, a keyword read
    from an override's ``**kwargs``, and ``self.name`` (or ``getattr(self, "name")``) when the adapter
    does not define ``name`` itself or vLLM's class has it too. In every module, ``from vllm.x import Y``
    and, for ``import vllm.x as m``, each ``m.Y``.
    """
    modules, members, params = _covered(contract)
    trees = {name: ast.parse(src) for name, src in sources.items()}
    # Names the adapter's classes define themselves (shared across mixins: VFD reads the steering mixin's).
    own: set[str] = set()
    for tree in trees.values():
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for stmt in cls.body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    own.add(stmt.name)
                elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    own.add(stmt.target.id)
                elif isinstance(stmt, ast.Assign):
                    own.update(t.id for t in stmt.targets if isinstance(t, ast.Name))
            for node in ast.walk(cls):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    name = _self_name(node)
                    if name is not None:
                        own.add(name)
    vllm_members = {b: _vllm_member_names(b) for bases in vllm_bases.values() for b in bases}

    gaps: list[str] = []
    for fname, tree in trees.items():
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
                for a in node.names:
                    if a.name not in modules.get(node.module or "", set()):
                        gaps.append(f"{fname}:{node.lineno}: from {node.module} import {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] != "vllm":
                        continue
                    if a.name not in modules:
                        gaps.append(f"{fname}:{node.lineno}: import {a.name}")
                    if a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr not in modules.get(aliases[node.value.id], set())):
                gaps.append(f"{fname}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")

        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name in vllm_bases):
            bases = vllm_bases[cls.name]
            names = [b.__name__ for b in bases]
            listed = set().union(*(members.get(b, set()) for b in names))
            vllm_has = set().union(*(vllm_members[b] for b in bases))
            for fn in (s for s in cls.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))):
                overrides = fn.name in vllm_has and (fn.name == "__init__" or not fn.name.startswith("__"))
                if overrides and fn.name not in listed:
                    gaps.append(f"{fname}:{fn.lineno}: {cls.name}.{fn.name} overrides {names[0]}.{fn.name}")
                if overrides:
                    known = set().union(*(params.get(f"{b}.{fn.name}", set()) for b in names))
                    gaps += [f"{fname}:{line}: {cls.name}.{fn.name} reads **kwargs[{key!r}]"
                             for line, key in _kwargs_keys(fn) if key not in known]
                for node in ast.walk(fn):
                    called = _super_call(node)
                    if called is not None and called not in listed:
                        gaps.append(f"{fname}:{node.lineno}: super().{called}() in {cls.name}")
                    attr = _self_name(node)
                    if (attr is not None and not (attr.startswith("__") and attr != "__init__")
                            and (attr not in own or attr in vllm_has) and attr not in listed):
                        gaps.append(f"{fname}:{node.lineno}: self.{attr} in {cls.name}")
    return sorted(set(gaps))


def _adapter_sources() -> dict[str, str]:
    """The adapter's modules as they are on disk now (read at test time: they change under this test)."""
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(ADAPTER_DIR.glob("*.py"))}


def _adapter_vllm_bases() -> dict[str, tuple[type, ...]]:
    """Each adapter class -> the vLLM classes it binds to, from the classes the adapter really builds."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from value_steer.core.config import SteerConfig
    from value_steer.core.modes import MODES
    from value_steer.patches import get_adapter

    adapter = get_adapter()
    out: dict[str, tuple[type, ...]] = {}
    # Runner mixins: whatever the adapter puts in front of the V1 runner, for every mode.
    for mode in MODES.values():
        runner = adapter.runner_class(GPUModelRunner, adapter.runner_mixins(SteerConfig(mode=mode)))
        for cls in runner.__mro__:
            if cls.__module__.startswith(ADAPTER_PACKAGE):
                out[cls.__name__] = (GPUModelRunner, CPUModelRunner)
    # Other adapter classes built on a vLLM class (the request validator).
    for name, obj in vars(adapter).items():
        if isinstance(obj, type) and obj.__module__.startswith(ADAPTER_PACKAGE) and name not in out:
            bases = tuple(b for b in obj.__mro__[1:] if b.__module__.startswith("vllm"))
            if bases:
                out[obj.__name__] = bases
    return out


def test_contract_covers_the_adapter_source():
    """Every vLLM name the adapter's modules use is in CONTRACT, so value-steer-compat checks all of them."""
    from value_steer.patches.vllm_0_32.contract import CONTRACT

    bases = _adapter_vllm_bases()
    assert {"SteeringRunnerMixin", "VFDRunnerMixin", "RequestArgsValidator"} <= set(bases), bases
    gaps = contract_gaps(_adapter_sources(), CONTRACT, bases)
    assert not gaps, "vLLM names the adapter uses but CONTRACT does not list (add them):\n" + "\n".join(gaps)


def test_contract_coverage_catches_uncovered_names():
    """The coverage check is not vacuous: an unlisted import, override, super() call, **kwargs key and
    runner attribute are each reported, in planted source and in the real adapter."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from value_steer.patches.vllm_0_32.contract import CONTRACT

    planted = (
        "from vllm.v1.worker.gpu_model_runner import GPUModelRunner, NotListed\n"
        "import vllm.v1.worker.cpu_worker as cw\n"
        "class M:\n"
        "    def _dummy_sampler_run(self, n):\n"
        "        return super()._dummy_sampler_run(n) + cw.NoSuchThing\n"
        "    def _build_attention_metadata(self, *args, **kwargs):\n"
        "        return kwargs['num_tokens'] + kwargs.get('not_a_listed_kwarg', 0)\n"
        "    def _vs_mine(self):\n"
        "        return self.lora_config, self._vs_mine, getattr(self, 'cache_config', None)\n"
    )
    gaps = contract_gaps({"planted.py": planted}, CONTRACT, {"M": (GPUModelRunner,)})
    expected = ["import NotListed", "vllm.v1.worker.cpu_worker.NoSuchThing",
                "M._dummy_sampler_run overrides", "super()._dummy_sampler_run()", "**kwargs['not_a_listed_kwarg']",
                "self.lora_config", "self.cache_config"]
    for needle in expected:
        assert any(needle in g for g in gaps), (needle, gaps)
    assert len(gaps) == len(expected), gaps  # and nothing listed is reported (GPUModelRunner, num_tokens, _vs_mine)

    # The real adapter: dropping entries it relies on makes the check fail on them.
    dropped = {"GPUModelRunner._prepare_padding_mask", "CommonAttentionMetadata"}
    thinned = [e for e in CONTRACT if e[1] not in dropped]
    gaps = contract_gaps(_adapter_sources(), thinned, _adapter_vllm_bases())
    assert any("_prepare_padding_mask" in g for g in gaps), gaps
    assert any("import CommonAttentionMetadata" in g for g in gaps), gaps


def test_unsupported_version_is_refused():
    from value_steer.patches import adapter_name

    with pytest.raises(RuntimeError, match=r"supports vLLM \['0.32'\]; installed vLLM is 0.19.1"):
        adapter_name("0.19.1")


@pytest.mark.slow
def test_behavioral_cli():
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-m", "value_steer.offline.compat", "--behavioral"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "abstain fires: 2 tokens, finish=stop" in proc.stdout
    assert proc.stdout.strip().endswith("compatible")
