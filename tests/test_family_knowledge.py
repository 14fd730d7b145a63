"""Families own their knowledge: nothing outside ecoflap_cli/models/ branches on a model type or a
family name (a static check of the source), and the registry answers every family question from
a model type alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ecoflap_cli
from ecoflap_cli.models import REGISTRY, adapter_class, families, families_with_task
from ecoflap_cli.models.causal_lm import CausalLMAdapter

PACKAGE = Path(ecoflap_cli.__file__).parent
#: where family knowledge may live (models/), and what sits outside the library (benchmarks)
EXEMPT = ("models/", "bench/", "testing.py")


def family_words() -> set[str]:
    """Every model type, family and display name the adapters declare, plus common spellings."""
    words = {"blip", "blip2", "blip-2", "clip", "instructblip", "llava", "siglip", "t5", "flan-t5"}
    for cls in [*families(), CausalLMAdapter]:
        words |= {cls.family.lower(), *(t.lower() for t in cls.model_types)}
    words |= set(REGISTRY)
    return words


def _strings(node: ast.AST) -> list[str]:
    """The string constants of a literal, or of a tuple/list/set of literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for elt in node.elts for s in _strings(elt)]
    return []


def _reads_model_type(node: ast.AST) -> bool:
    """``x.model_type``, ``model_type``, ``getattr(x, "model_type", ...)`` or ``x["model_type"]``."""
    if isinstance(node, ast.Attribute):
        return node.attr == "model_type"
    if isinstance(node, ast.Name):
        return node.id == "model_type"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
        return len(node.args) >= 2 and _strings(node.args[1]) == ["model_type"]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and _strings(node.args[0]) == ["model_type"]
    if isinstance(node, ast.Subscript):
        return _strings(node.slice) == ["model_type"]
    return False


def violations(source: str, where: str = "<source>") -> list[str]:
    """Comparisons of a model type with a string, comparisons with a family name, and dict
    literals keyed by family names (a lookup table is a branch too)."""
    words = family_words()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_reads_model_type(o) for o in operands) and any(_strings(o) for o in operands):
                found.append(f"{where}:{node.lineno}: compares model_type with a string")
            named = [s for o in operands for s in _strings(o) if s.lower() in words]
            if named:
                found.append(f"{where}:{node.lineno}: compares with family name(s) {named}")
        elif isinstance(node, ast.Dict):
            keys = [s for k in node.keys if k is not None for s in _strings(k) if s.lower() in words]
            if keys:
                found.append(f"{where}:{node.lineno}: a table keyed by family name(s) {keys}")
    return found


def generic_sources() -> list[Path]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if not relative.startswith(EXEMPT):
            files.append(path)
    return files


def test_no_generic_module_branches_on_a_family() -> None:
    files = generic_sources()
    assert any(p.name == "multimodal.py" for p in files) and any(p.name == "tasks.py" for p in files)
    problems = [v for p in files for v in violations(p.read_text(), str(p.relative_to(PACKAGE)))]
    assert not problems, "family knowledge outside ecoflap_cli/models/:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "snippet",
    [
        'if model.config.model_type == "clip": pass',
        'if getattr(config, "model_type", None) in ("blip-2", "instructblip"): pass',
        'ok = config.get("model_type") != "whatever"',
        'if family == "llava": pass',
        'x = kind in {"SigLIP", "other"}',
        'CLASSES = {"clip": "CLIPModel"}',
    ],
)
def test_the_check_catches_family_branches(snippet: str) -> None:
    assert violations(snippet)


def test_the_check_lets_generic_code_through() -> None:
    assert not violations(
        'if task.name not in adapter.eval_tasks: pass\nif name == "zero_shot": pass\n'
        'info = {"model_type": getattr(config, "model_type", None)}'
    )


def test_every_family_answers_from_its_model_type() -> None:
    import transformers

    from ecoflap_cli.evaluation.tasks import TASK_OPTION

    for model_type, cls in REGISTRY.items():
        assert adapter_class(model_type) is cls and model_type in cls.model_types
        assert isinstance(getattr(transformers, cls.loader_class), type), cls.loader_class
        assert set(cls.eval_tasks) <= set(TASK_OPTION), cls.__name__
        assert cls.data_kind in ("text", "image-text") and cls.min_batch_pairs >= 1
    assert adapter_class("llama") is CausalLMAdapter and adapter_class(None) is CausalLMAdapter
    assert CausalLMAdapter.loader_class == "AutoModelForCausalLM"
    assert {"blip-2", "instructblip", "clip", "llava", "siglip"} <= set(REGISTRY)
    assert families_with_task("zero_shot") == ["CLIP", "SigLIP"]
    assert families_with_task("vqa") == ["BLIP-2 / InstructBLIP", "LLaVA"]


def test_loading_takes_the_class_from_the_adapter() -> None:
    from ecoflap_cli.io.reading import auto_class_for

    for model_type, cls in REGISTRY.items():
        assert auto_class_for(model_type).__name__ == cls.loader_class
    assert auto_class_for("llama").__name__ == "AutoModelForCausalLM"


def test_register_takes_model_types_from_the_class_or_the_decorator() -> None:
    from ecoflap_cli.models import register

    class Declared(CausalLMAdapter):
        model_types = ("toy-declared",)

    class Named(CausalLMAdapter):
        pass

    try:
        assert register(Declared) is Declared and adapter_class("toy-declared") is Declared
        assert register("toy-a", "toy-b")(Named) is Named and Named.model_types == ("toy-a", "toy-b")
        assert adapter_class("toy-b") is Named
        with pytest.raises(TypeError, match="claimed by"):
            register("toy-a")(Declared)
        with pytest.raises(TypeError, match="no model_types"):
            register(type("Bare", (CausalLMAdapter,), {}))
    finally:
        for name in ("toy-declared", "toy-a", "toy-b"):
            REGISTRY.pop(name, None)
