"""Dense bit packing of integer codes: ``b`` bits per code, 8 codes in ``b`` bytes.

Layout (every width the same rule): the codes, flattened in row-major order and
padded with zeros to a multiple of 8, form a little-endian bit stream in which
code ``i`` occupies bits ``i*b .. i*b + b - 1``. So 2-bit codes go 4 to a byte
(code 0 in the lowest two bits), 4-bit codes 2 to a byte (code 0 in the low
nibble), 3-bit codes 8 to 3 bytes, 8-bit codes one per byte. A tensor of ``n``
codes takes ``ceil(n / 8) * b`` bytes.

Codes are unsigned (``0 .. 2^b - 1``); a signed grid is stored shifted by its
lowest value (``code = q - Qn``), which the manifest records as ``offset``.

Why not torchao's packing: ``torchao.prototype.dtypes.uintx.bitpacking`` packs
2/3/4 bits on CPU, but it is a prototype module (no promise that its layout
stays, and an exported file must stay readable), it needs the packed dimension
to be a multiple of 8, it splits 3-bit codes over two shards (2 + 1 bits), and
a reader of exported files would need torchao (which pins a torch range) for
40 lines of shifts.
"""

from __future__ import annotations

import math

import torch

WIDTHS = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take."""
    return math.ceil(n / 8) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (any shape and integer dtype, values in ``0 .. 2^bits - 1``) into uint8."""
    if bits not in WIDTHS:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in 0..{2**bits - 1} for {bits} bits")
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)  # 8 codes -> one integer of 8 * bits <= 64 bits
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (groups << shifts).sum(dim=1)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    return ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of a ``pack_codes`` result, as int64 (flat)."""
    if bits not in WIDTHS:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_bytes(n, bits):
        raise ValueError(f"expected {packed_bytes(n, bits)} packed bytes (uint8, flat) for {n} codes of {bits} bits, "
                         f"got {packed.numel()} ({packed.dtype})")
    groups = packed.to(torch.int64).view(-1, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    word = (groups << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    codes = (word.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:n]
