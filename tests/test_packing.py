"""Bit packing and per-kind integer codes: hand-computed layouts, round trips at every width, exact decoding."""

import pytest
import torch

from squat_cli.export.codes import ExportError, act_state, build_act_quantizer, decode_weight, encode_weight
from squat_cli.export.packing import pack_codes, packed_bytes, unpack_codes
from squat_cli.quant.gobo import GoboQuantizer
from squat_cli.quant.lsq import LsqQuantizer
from squat_cli.quant.q8bert import MaxQuantizer
from squat_cli.quant.qbert import EmaRangeQuantizer, GroupQuantizer
from squat_cli.quant.qlinear import QuantLinear


def test_layout_by_hand():
    # 2-bit: code 0 in the lowest two bits -> 0b00_11_10_01
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001, 0]  # padded to 8 codes = 2 bytes
    # 4-bit: code 0 in the low nibble
    assert pack_codes(torch.tensor([1, 2]), 4).tolist() == [0x21, 0, 0, 0]
    # 3-bit: codes 0..7 -> sum i << 3i = 0xFAC688, little-endian in 3 bytes
    assert pack_codes(torch.arange(8), 3).tolist() == [0x88, 0xC6, 0xFA]
    assert pack_codes(torch.tensor([255, 0, 7]), 8).tolist() == [255, 0, 7, 0, 0, 0, 0, 0]
    # a code across a byte boundary: 5 in bits 0-2, 6 in bits 3-5, 7 in bits 6-8 -> 5 + 48 + (7 & 3) * 64, then 7 >> 2
    assert pack_codes(torch.tensor([5, 6, 7]), 3)[:2].tolist() == [245, 1]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (13,), (3, 5), (384, 384), (2, 3, 7)])
def test_round_trip_every_width_and_odd_sizes(bits, shape):
    g = torch.Generator().manual_seed(bits * 100 + len(shape))
    codes = torch.randint(0, 2**bits, shape, generator=g)
    packed = pack_codes(codes, bits)
    n = codes.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(n, bits) == -(-n // 8) * bits
    assert torch.equal(unpack_codes(packed, bits, n).view(shape), codes)


def test_density_matches_the_spec():
    assert [packed_bytes(384 * 384, b) for b in (2, 3, 4, 8)] == [384 * 384 // 4, 384 * 384 * 3 // 8, 384 * 384 // 2,
                                                                   384 * 384]


def test_bad_codes_and_bad_bytes_are_refused():
    with pytest.raises(ValueError, match="codes must lie in 0..3"):
        pack_codes(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="codes must lie in 0..3"):
        pack_codes(torch.tensor([-1]), 2)
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        pack_codes(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="expected 3 packed bytes"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 3, 8)


def _layer(wq, rows=6, cols=8, seed=0, aq=None):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(cols, rows)
    lin.weight.data = torch.randn(rows, cols) * 0.05
    lin.weight.data[0, 0] = 0.4  # an outlier far in the tail
    return QuantLinear.from_linear(lin, wq, aq)


def _decoded(tensors, desc):
    return decode_weight(tensors, desc)


@pytest.mark.parametrize("bits,per_channel", [(2, False), (3, False), (4, True), (8, True)])
def test_lsq_codes_by_hand(bits, per_channel):
    layer = _layer(LsqQuantizer(bits, channels=6 if per_channel else None))
    layer.wq.init_lsq(layer.weight.detach())
    tensors, desc = encode_weight("l", layer)
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = layer.wq.step.detach()
    w = layer.weight.detach()
    expect = ((w.reshape(6, -1) if per_channel else w) / s).clamp(qn, qp).round() - qn  # codes by hand
    assert desc == {"kind": "uniform", "bits": bits, "offset": qn, "levels": 2**bits,
                    "granularity": "channel" if per_channel else "tensor", "shape": [6, 8]}
    assert torch.equal(unpack_codes(tensors["codes"], bits, 48).view(6, 8), expect.view(6, 8).long())
    assert torch.equal(_decoded(tensors, desc), layer.wq(w))  # exactly the training weight


def test_q8bert_group_and_gobo_codes_decode_exactly():
    q8 = _layer(MaxQuantizer(8))
    t, d = encode_weight("q8", q8)
    assert d["offset"] == -127 and d["levels"] == 255
    assert float(t["scale"]) == float(q8.weight.detach().abs().max() / 127)
    assert torch.equal(_decoded(t, d), q8.wq(q8.weight))

    grp = _layer(GroupQuantizer(3, groups=2))
    t, d = encode_weight("g", grp)
    rows = grp.weight.detach().reshape(2, -1)
    assert torch.equal(t["min"], rows.amin(1, keepdim=True)) and d["groups"] == 2
    assert torch.equal(t["scale"], (rows.amax(1, keepdim=True) - rows.amin(1, keepdim=True)) / 7)
    assert torch.equal(_decoded(t, d), grp.wq(grp.weight))

    gobo = _layer(GoboQuantizer(2, threshold=-1.0))
    gobo.wq.fit(gobo.weight.detach())
    t, d = encode_weight("gobo", gobo)
    assert d["outliers"] >= 1 and 0 in t["outlier_index"].tolist()  # the planted 0.4 stays FP32, bit-exact
    assert float(t["outlier_value"][t["outlier_index"].tolist().index(0)]) == pytest.approx(0.4)
    assert t["codebook"].numel() == 4 and torch.equal(_decoded(t, d), gobo.wq(gobo.weight))


def test_uninitialised_or_foreign_quantizers_are_refused():
    with pytest.raises(ExportError, match="never initialised"):
        encode_weight("l", _layer(LsqQuantizer(2)))
    layer = _layer(LsqQuantizer(2))
    layer.wq = torch.nn.Identity()
    with pytest.raises(ExportError, match="no export for weight quantizer Identity"):
        encode_weight("l", layer)


def test_tampered_codes_are_caught():
    layer = _layer(LsqQuantizer(3))
    layer.wq.init_lsq(layer.weight.detach())
    t, d = encode_weight("l", layer)
    with pytest.raises(ExportError, match="outside the layer's grid"):
        decode_weight(t, {**d, "levels": 2})


@pytest.mark.parametrize("aq", [LsqQuantizer(8), MaxQuantizer(8, ema=0.9), EmaRangeQuantizer(8)])
def test_activation_quantizers_rebuild_exactly(aq):
    x = torch.randn(4, 5, 8) * 3
    if isinstance(aq, LsqQuantizer):
        aq.set_step(torch.tensor(0.037))
    elif isinstance(aq, MaxQuantizer):
        aq.init_max(x.abs().max() * 0.8)
    else:
        aq.init_range([x * 0.7])
    aq.eval()
    tensors, desc = act_state(aq)
    again = build_act_quantizer(tensors, desc)
    assert desc["bits"] == 8 and torch.equal(again(x), aq(x))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_embedding_codes_round_trip_at_every_width(bits):
    """A per-row LSQ word-embedding table: packed codes and the block-quantized (ONNX kernel) form both decode to
    the table the run looks up, bit for bit; the kernel stores 3 bits in 4-bit fields, 5-7 in 8-bit ones."""
    from squat_cli.export.onnx_lowbit import block_quantized, decode_block_quantized, kernel_bits, signed_codes
    from squat_cli.quant.qlinear import QuantEmbedding

    g = torch.Generator().manual_seed(bits)
    emb = torch.nn.Embedding(50, 64, padding_idx=0)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(50, 64, generator=g) * torch.rand(50, 1, generator=g))
    layer = QuantEmbedding.from_embedding(emb, LsqQuantizer(bits, channels=50))
    layer.wq.init_lsq(layer.weight.detach())
    table = layer.quantized_weight().detach()
    tensors, desc = encode_weight("emb", layer)
    assert desc["granularity"] == "channel" and tensors["codes"].numel() == 50 * 64 * bits // 8
    assert torch.equal(decode_weight(tensors, desc), table)
    codes, step, got_bits = signed_codes("emb", layer)
    assert got_bits == bits and int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) < 2 ** (bits - 1)
    field = kernel_bits(bits)
    assert field == {2: 2, 3: 4, 4: 4}.get(bits, 8)
    packed, scales = block_quantized(codes, step, bits, 32)
    assert packed.shape == (50, 2, 32 * field // 8) and scales.shape == (50, 2)
    assert torch.equal(decode_block_quantized(packed, scales, field, 64), table)
