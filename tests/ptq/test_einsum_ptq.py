"""PTQ of Dense-like einsum weights (Tunix's ``Einsum``: ``BTD,DNH->BTNH``, ``BTNH,NHD->BTD``): the record
pass finds how many leading axes an einsum contracts, GPTQ solves a ``(*K, *F)`` kernel as its
``(prod K, prod F)`` matrix, and on Tunix's Llama3 GPTQ beats RTN."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import PerChannel, PerGroup, PerTensor, Quantizer, Rule, dequantize, presets, ptq, quantize
from qjax.core import einsum_contract


@pytest.mark.parametrize("subscripts,position,want", [
    ("BTD,DNH->BTNH", 2, 1), ("BTNH,NHD->BTD", 2, 2), ("BTD,DV->BTV", 2, 1), ("DNH,BTD->BTNH", 1, 1),
    ("BTD,DNH->BTHN", 2, 0), ("BTHD,BSHD->BHTS", 2, 0), ("BTD,DF->BTF", 1, 0), ("...D,DF->...F", 2, 0),
    ("BTNH,HND->BTD", 2, 0)])
def test_einsum_contract(subscripts, position, want):
    assert einsum_contract(subscripts, position, 2) == want


@pytest.mark.parametrize("q", [Quantizer("int4", PerChannel(-1)), Quantizer("int3", PerTensor())],
                         ids=["per-output", "per-tensor"])
def test_an_nd_kernel_is_solved_as_its_matrix(q):
    # NHD weight of BTNH,NHD->BTD contracts (N, H): GPTQ of it equals GPTQ of the (N*H, D) matrix whenever
    # the scales are per output column (the same grid on both shapes)
    w = jax.random.normal(jax.random.key(0), (4, 8, 6))
    x = jax.random.normal(jax.random.key(1), (64, 32)) * jnp.linspace(0.2, 3, 32)
    h = 2 * x.T @ x / 64
    got = ptq.gptq_layer(q, w, h, contract=2)
    assert got.codes.shape == w.shape
    if isinstance(q.granularity, PerChannel):  # per D: the same grid as per column of the (N*H, D) matrix
        flat = ptq.gptq_layer(Quantizer(q.format, PerChannel(-1)), w.reshape(32, 6), h)
        np.testing.assert_array_equal(got.codes.reshape(32, 6), flat.codes)
        np.testing.assert_allclose(dequantize(got).reshape(32, 6), dequantize(flat), rtol=1e-6)
    err = jnp.sum((x @ (w.reshape(32, 6) - dequantize(got).reshape(32, 6))) ** 2)
    err_rtn = jnp.sum((x @ (w.reshape(32, 6) - dequantize(quantize(q, w)).reshape(32, 6))) ** 2)
    assert float(err) < float(err_rtn)
    with pytest.raises(ValueError, match=r"granularity PerGroup.*allowed: PerTensor\(\), PerChannel over"):
        ptq.gptq_layer(Quantizer("int4", PerGroup(0, 2)), w, h, contract=2)


@pytest.mark.parametrize("q", [Quantizer("int3", PerGroup(1, 4), "minmax"), presets.nvfp4(1)],
                         ids=["int3-g4", "nvfp4"])
def test_groups_along_the_last_contracted_axis(q):
    # groups of the NHD kernel along H are groups of consecutive rows of the (N*H, D) matrix (H is its
    # fastest input axis): the same solve, the scales laid out on the kernel's own block view
    w = jax.random.normal(jax.random.key(2), (2, 16, 6))
    x = jax.random.normal(jax.random.key(3), (64, 32)) * jnp.linspace(0.2, 3, 32)
    h = 2 * x.T @ x / 64
    got = ptq.gptq_layer(q, w, h, contract=2, block_size=16)
    flat_q = dataclasses.replace(q, granularity=PerGroup(0, q.granularity.size))
    flat = ptq.gptq_layer(flat_q, w.reshape(32, 6), h, block_size=16)
    np.testing.assert_array_equal(got.codes.reshape(32, 6), flat.codes)
    assert got.scale.shape == quantize(q, w).scale.shape and got.scale.dtype == quantize(q, w).scale.dtype
    np.testing.assert_allclose(dequantize(got).reshape(32, 6), dequantize(flat), rtol=1e-6)


def test_gptq_beats_rtn_on_tunix_llama3():
    from tests.clients.models import tokens, tunix_llama3

    client = tunix_llama3()
    rules = [Rule(".*", weight=Quantizer("int3", PerChannel(-1)), weight_names=("kernel", "w"), name="w3")]
    batches = [{**client.inputs, "input_tokens": tokens(seed=s)} for s in range(3)]
    ref = [client.forward(client.model, b) for b in batches]

    def error(model):
        pairs = zip(batches, ref, strict=True)
        return sum(float(jnp.sum((client.forward(model, b) - r) ** 2)) for b, r in pairs)

    e_rtn = error(ptq.rtn(tunix_llama3().model, None, rules, batches[0]))
    e_gptq = error(ptq.gptq(tunix_llama3().model, None, rules, batches))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
