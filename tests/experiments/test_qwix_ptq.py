"""experiments.qwix_ptq: Qwix's RTN, GPTQ, AWQ and SmoothQuant on Tunix's Llama3 (tests/clients/models.py,
one layer) and a tiny random FlaxBert (2 layers, hidden 64; no download), a weight-only and a W+A config
each; configurations Qwix cannot express (or, strictly, does not do) come back with a reason.

The models are tiny, so the configs here use small groups: ``w4_g32`` (Llama3: embed 32, MLP 64, head_dim 8;
``o_proj`` contracts 4 x 8 = 32, one group) and the study's own ``w2_g64`` on FlaxBert (hidden 64).
GPTQ (and AWQ on Llama3) quantize one or two layer types per model: compiling GPTQ's column loop is the
slow part. GPTQ runs at int8 per channel, weight-only and W8A8, whose weights share that compilation.
AWQ with inputs only runs with ``strict=False`` in Qwix (see experiments.qwix_ptq), so it is checked for its
reason here; SmoothQuant, W+A only in Qwix, runs with ``strict=False``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("qwix", reason="Qwix missing: pip install -e '.[test]'")

import jax.numpy as jnp

from experiments import qwix_ptq as qp
from experiments import qwix_rules as qr
from tests.clients.models import fill_linen_weights

# slow: ~70 s of CPU (GPTQ's column loop, each quantized forward's compilation); Tunix warns (flax 0.12)
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

W4_G32 = qr.QwixConfig("w4_g32", "int4", 32)
W8 = qr.QwixConfig("w8", "int8")  # the weights of w8a8 without its inputs
DECODER_GPTQ_LAYERS = r"layers/\d+/mlp/(gate|up)_proj"
DECODER_AWQ_LAYERS = r"layers/\d+/(mlp/(gate|up)_proj|attn/o_proj)"
BERT_GPTQ_LAYERS = r"encoder/layer/\d+/attention/self/(query|key|value)"


@pytest.fixture(scope="module")
def decoder():
    pytest.importorskip("tunix", reason="Tunix missing: pip install --no-deps google-tunix==0.1.7")
    from tests.clients.models import tokens, tunix_llama3

    model = tunix_llama3(num_layers=1).model
    calib = [tokens(seed=s, batch=4, seq=8) for s in (1, 2)]
    return model, calib, qp.float_forward("decoder", model)(calib[0])


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers", reason="transformers<5 is in the test extras")
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=16)
    module = transformers.FlaxBertModel(config, _do_init=False).module
    rng = np.random.default_rng(0)
    calib = []
    for _ in range(2):
        ids = jnp.asarray(rng.integers(1, 128, (4, 12)), jnp.int32)
        calib.append({"input_ids": ids, "attention_mask": jnp.ones_like(ids).at[0, -3:].set(0),
                      "token_type_ids": jnp.zeros_like(ids),
                      "position_ids": jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), ids.shape)})
    variables = fill_linen_weights(module, calib[0])
    model = (module, variables)
    return model, calib, qp.float_forward("minilm", model)(calib[0])


def check_quantized(result: qp.QwixResult, batch, ref, max_error: float) -> float:
    """Quantized (output differs), close to the float model, smaller than float32; the error."""
    assert result.supported and result.reason is None, result.reason
    out = result.forward(batch)
    assert out.shape == ref.shape and np.all(np.isfinite(np.asarray(out)))
    error = qp.relative_error(out, ref)
    assert 1e-4 < error < max_error, (result.method, result.config, error)
    assert 0 < result.layer_bytes < result.float_layer_bytes
    assert result.packed_layer_bytes <= result.layer_bytes
    assert result.param_bytes < result.float_param_bytes and result.quantize_time_s > 0
    assert result.rule and result.qwix_version == qp.QWIX_VERSION
    return error


# -------------------------------------------------------------------------------------------- decoder


def test_decoder_rtn(decoder):
    model, calib, ref = decoder
    w4 = qp.run_qwix("rtn", W4_G32, "decoder", model, calib)
    err4 = check_quantized(w4, calib[0], ref, 0.6)
    # o_proj contracts 4 x 8 = 32: one group, so a per-channel rule of its own before the tiled one
    assert w4.rule.startswith("[qwix.QuantizationRule(module_path='(layers/0/attn/o_proj)'")
    assert "tile_size=32" in w4.rule and w4.rtn_fallback_layers == ()
    # int4 codes are jnp.int4 arrays, one byte each as jax counts them; packed: half of that
    assert w4.packed_layer_bytes < w4.layer_bytes
    w8a8 = qp.run_qwix("rtn", "w8a8", "decoder", model, calib)
    err8 = check_quantized(w8a8, calib[0], ref, 0.1)
    assert "act_qtype=jnp.int8" in w8a8.rule and "act_static_scale=False" in w8a8.rule
    assert err8 < err4 and w8a8.packed_layer_bytes == w8a8.layer_bytes > w4.packed_layer_bytes


def test_decoder_gptq_weights_alone_and_with_inputs(decoder):
    model, calib, ref = decoder
    w8 = qp.run_qwix("gptq", W8, "decoder", model, calib, module_path=DECODER_GPTQ_LAYERS)
    check_quantized(w8, calib[0], ref, 0.1)
    w8a8 = qp.run_qwix("gptq", "W8A8", "decoder", model, calib, module_path=DECODER_GPTQ_LAYERS)
    check_quantized(w8a8, calib[0], ref, 0.1)
    assert "gptq.GptqRule" in w8a8.rule and w8a8.rtn_fallback_layers == ()
    assert w8.layer_bytes == w8a8.layer_bytes
    assert not np.array_equal(np.asarray(w8.forward(calib[0])), np.asarray(w8a8.forward(calib[0])))


def test_decoder_gptq_falls_back_to_rtn_on_o_proj_and_refuses_int3(decoder):
    model, calib, _ = decoder
    result = qp.run_qwix("gptq", W8, "decoder", model, calib, module_path=r"layers/\d+/attn/o_proj")
    # o_proj contracts two axes (BTNH,NHD->BTD): Qwix's calibration records nothing, RTN quantizes it
    assert result.supported and result.rtn_fallback_layers == ("layers/0/attn/o_proj",)
    int3 = qp.run_qwix("gptq", qr.QwixConfig("w3", "int3"), "decoder", model, calib)
    assert not int3.supported and "synthetic qtype" in int3.reason
    assert "'nvfp4'" in qr.known_limits("gptq", qr.CONFIGS["nvfp4"])[1]
    assert qr.known_limits("gptq", qr.CONFIGS["w2_g64"]) == ([], None)  # jnp.int2 exists: Qwix's GPTQ runs


def test_decoder_awq(decoder):
    model, calib, ref = decoder
    w4 = qp.run_qwix("awq", W4_G32, "decoder", model, calib, module_path=DECODER_AWQ_LAYERS)
    check_quantized(w4, calib[0], ref, 0.6)
    assert "awq.AwqRule" in w4.rule and "n_grid=20" in w4.rule
    assert w4.rtn_fallback_layers == ("layers/0/attn/o_proj",)  # two contraction axes: no statistics
    w8a8 = qp.run_qwix("awq", "w8a8", "decoder", model, calib)
    assert not w8a8.supported and w8a8.forward is None and w8a8.reason.startswith("strict")
    assert len(w8a8.caveats) == 1 and "AwqInferenceProvider" in w8a8.caveats[0]


def test_decoder_smoothquant(decoder):
    model, calib, ref = decoder
    weight_only = qp.run_qwix("smoothquant", W4_G32, "decoder", model, calib, strict=False)
    assert not weight_only.supported and "act_qtype" in weight_only.reason
    strict = qp.run_qwix("smoothquant", "w8a8", "decoder", model, calib)
    assert not strict.supported and "not quantized" in strict.reason
    loose = qp.run_qwix("smoothquant", "w8a8", "decoder", model, calib, strict=False)
    check_quantized(loose, calib[0], ref, 0.2)
    # SqCalibrationProvider reads module.kernel: the MLP is smoothed, the Einsum projections are plain PTQ
    assert "smooth_quant.SqRule" in loose.rule and "qwix.QuantizationRule" in loose.rule
    assert set(loose.rtn_fallback_layers) == {f"layers/0/attn/{p}_proj" for p in "qkvo"}


def test_decoder_unexpressible_groups_and_types_have_reasons(decoder):
    model, calib, _ = decoder
    # o_proj's last contraction axis is 8 wide, nvfp4's blocks 16: no tiling; groups wider than a layer's
    # contraction give one scale per output channel (as the study's qjax rules do)
    result = qp.run_qwix("rtn", "nvfp4", "decoder", model, calib)
    assert not result.supported and "tile_size" in result.reason and "layers/0/attn" in result.reason
    wide = qp.run_qwix("rtn", "W2 g64", "decoder", model, calib)
    assert wide.supported and wide.rule.count("tile_size=64") == 1  # the MLP down projection only
    with pytest.raises(ValueError, match="unknown config"):
        qp.run_qwix("rtn", "w5", "decoder", model, calib)
    with pytest.raises(ValueError, match="without a weight"):
        qp.run_qwix("rtn", "w8a8", "decoder", model, calib, module_path=r"layers/\d+/attn")


def test_decoder_float_model_is_left_untouched(decoder):
    model, calib, ref = decoder  # after the runs above (Qwix quantizes clones)
    np.testing.assert_array_equal(np.asarray(qp.float_forward("decoder", model)(calib[0])), np.asarray(ref))


# ------------------------------------------------------------------------------------------------ BERT


def test_bert_rtn_and_nvfp4(bert):
    model, calib, ref = bert
    w2 = qp.run_qwix("rtn", "w2_g64", "minilm", model, calib)
    check_quantized(w2, calib[0], ref, 1.0)
    assert "weight_qtype='int2'" in w2.rule and "tile_size=64" in w2.rule and "act_qtype" not in w2.rule
    w8a8 = qp.run_qwix("rtn", "w8a8", "minilm", model, calib)
    check_quantized(w8a8, calib[0], ref, 0.1)
    nvfp4 = qp.run_qwix("rtn", "nvfp4", "minilm", model, calib)
    check_quantized(nvfp4, calib[0], ref, 0.5)
    assert "weight_qtype='nvfp4'" in nvfp4.rule and "tile_size=16" in nvfp4.rule


def test_bert_gptq(bert):
    model, calib, ref = bert
    w8 = qp.run_qwix("gptq", W8, "minilm", model, calib, module_path=BERT_GPTQ_LAYERS)
    check_quantized(w8, calib[0], ref, 0.1)
    w8a8 = qp.run_qwix("gptq", "w8a8", "minilm", model, calib, module_path=BERT_GPTQ_LAYERS)
    check_quantized(w8a8, calib[0], ref, 0.1)
    assert w8.rtn_fallback_layers == w8a8.rtn_fallback_layers == ()


def test_bert_awq_and_smoothquant(bert):
    model, calib, ref = bert
    awq = qp.run_qwix("awq", "w2_g64", "minilm", model, calib)
    check_quantized(awq, calib[0], ref, 1.0)
    assert awq.layer_bytes > qp.run_qwix("rtn", "w2_g64", "minilm", model, calib).layer_bytes  # + awq_scale
    assert "strict" in qp.run_qwix("awq", "w4a8", "minilm", model, calib).reason
    assert "act_qtype" in qp.run_qwix("smoothquant", "w2_g64", "minilm", model, calib).reason
    sq = qp.run_qwix("smoothquant", "w8a8", "minilm", model, calib, strict=False)
    check_quantized(sq, calib[0], ref, 0.1)
    assert sq.rtn_fallback_layers == () and sq.caveats
