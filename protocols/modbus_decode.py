"""Register maps for Modbus devices: channel params → points, points → read blocks, words → values.

Everything here is pure (no sockets) so the poller's hardest-to-get-right parts are unit-tested
directly: a wrong word order on a float32 is a plausible-looking wrong number, not an error.

Addressing: ``address`` is the **PDU address, 0-based**, exactly what goes on the wire. Vendor
manuals often print 1-based "register numbers" or Modicon references (40001 = holding register at
PDU address 0, 30001 = input register 0, 00001 = coil 0, 10001 = discrete input 0): subtract the
offset before writing the registry. ``mbpoll -r`` uses the 1-based reference, ``mbpoll -0 -r`` the
PDU address.

Byte and word order of multi-register values, in the usual letter notation (A = most significant
byte of the 32-bit value):

==========  ============  ===========  ==============================================
byte_order  word_order    letters      seen on
==========  ============  ===========  ==============================================
big         big           ABCD         Modbus spec order, most PLCs (default)
big         little        CDAB         "word swapped" (many flow meters, Schneider)
little      big           BADC         "byte swapped"
little      little        DCBA         fully little-endian
==========  ============  ===========  ==============================================

``word_order`` has no effect on 16-bit types; ``byte_order = "little"`` swaps the two bytes of
every register. The value stored is ``raw * scale + offset`` in the channel's ``unit`` (what the
device sends); ingest converts that unit to the canonical one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pymodbus.client.mixin import ModbusClientMixin

from protocols.params import ModbusPointParams, ParamsError, validate_params

Table = Literal["holding", "input", "coil", "discrete"]
Order = Literal["big", "little"]

TABLES: tuple[Table, ...] = ("holding", "input", "coil", "discrete")
BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete"})

_DT = ModbusClientMixin.DATATYPE
# type name -> (pymodbus datatype, registers)
TYPES: dict[str, tuple[Any, int]] = {
    "int16": (_DT.INT16, 1),
    "uint16": (_DT.UINT16, 1),
    "int32": (_DT.INT32, 2),
    "uint32": (_DT.UINT32, 2),
    "float32": (_DT.FLOAT32, 2),
    "int64": (_DT.INT64, 4),
    "uint64": (_DT.UINT64, 4),
    "float64": (_DT.FLOAT64, 4),
    "bool": (None, 1),
}

# Protocol limits (Modbus Application Protocol v1.1b3, 6.1-6.4): registers and bits per read.
MAX_REGISTERS_PER_READ = 125
MAX_BITS_PER_READ = 2000


class ModbusConfigError(ValueError):
    """A channel's or device's Modbus params cannot be used (names the device and channel)."""


@dataclass(frozen=True, slots=True)
class Point:
    """One channel's place in the device's register map."""

    channel: str
    unit: str
    table: Table
    address: int
    type: str = "uint16"
    byte_order: Order = "big"
    word_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0
    bit: int | None = None

    @property
    def width(self) -> int:
        """Registers (or bits, for coil/discrete) the point occupies."""
        if self.table in BIT_TABLES:
            return 1
        return TYPES[self.type][1]

    @property
    def end(self) -> int:
        return self.address + self.width


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` registers/bits of ``table`` from ``address``."""

    table: Table
    address: int
    count: int
    points: tuple[Point, ...]


def parse_point(channel: str, unit: str, params: Mapping[str, Any], where: str = "") -> Point:
    """Validate one channel's ``params`` (see protocols/modbus.sample.toml for every key).

    The keys and their types go through :class:`~protocols.params.ModbusPointParams` first, so a
    misspelt key (``typ`` for ``type``) is refused here, by the poller, instead of silently
    reading the default type; the rules that need the whole point are checked below."""
    where = where or f"channel {channel}"
    if "address" not in params:
        raise ModbusConfigError(f"{where}: address (0-based PDU address) is required")
    try:
        p = validate_params(ModbusPointParams, params, where)
    except ParamsError as err:
        raise ModbusConfigError(str(err)) from None
    table = p.table
    address = p.address
    typ = p.type or ("bool" if table in BIT_TABLES else "uint16")
    if table in BIT_TABLES and typ != "bool":
        raise ModbusConfigError(f"{where}: {table} points are bits; type must be 'bool'")
    bit = p.bit
    if bit is not None:
        if table in BIT_TABLES or typ != "bool":
            raise ModbusConfigError(f"{where}: bit applies only to type 'bool' on a register table")
        if not 0 <= bit <= 15:
            raise ModbusConfigError(f"{where}: bit must be 0..15, not {bit}")
    elif typ == "bool" and table not in BIT_TABLES:
        raise ModbusConfigError(f"{where}: type 'bool' on a register table needs bit = 0..15")
    point = Point(
        channel=channel,
        unit=unit,
        table=table,
        address=address,
        type=typ,
        byte_order=p.byte_order,
        word_order=p.word_order,
        scale=p.scale,
        offset=p.offset,
        bit=bit,
    )
    if point.end > 65536:
        raise ModbusConfigError(f"{where}: address {address} (+{point.width}) outside 0..65535")
    return point


def plan_blocks(
    points: Sequence[Point],
    *,
    max_gap: int = 16,
    max_registers: int = MAX_REGISTERS_PER_READ,
    max_bits: int = MAX_BITS_PER_READ,
) -> list[Block]:
    """Group points of each table into as few reads as the limits allow.

    A block grows while the next point starts at most ``max_gap`` registers (bits) after the end of
    the block and the block stays within the protocol limit. Reading across a gap costs a few
    bytes but saves a round trip; devices that answer a read over undefined registers with
    exception 02 are handled by the poller, which splits such a block.
    """
    blocks: list[Block] = []
    for table in TABLES:
        pts = sorted((p for p in points if p.table == table), key=lambda p: (p.address, p.end))
        if not pts:
            continue
        limit = max_bits if table in BIT_TABLES else max_registers
        start, end, members = pts[0].address, pts[0].end, [pts[0]]
        for p in pts[1:]:
            new_end = max(end, p.end)
            if p.address - end <= max_gap and new_end - start <= limit:
                end = new_end
                members.append(p)
                continue
            blocks.append(Block(table, start, end - start, tuple(members)))
            start, end, members = p.address, p.end, [p]
        blocks.append(Block(table, start, end - start, tuple(members)))
    return blocks


def _swap_bytes(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


def decode_words(
    words: Sequence[int], type_: str, byte_order: Order = "big", word_order: Order = "big"
) -> float:
    """Registers as read (each a 16-bit int) → the raw number, before scale and offset."""
    datatype, width = TYPES[type_]
    if len(words) != width or datatype is None:
        raise ValueError(f"{type_} needs {width} register(s), got {len(words)}")
    regs = [_swap_bytes(w) for w in words] if byte_order == "little" else list(words)
    value = ModbusClientMixin.convert_from_registers(regs, datatype, word_order=word_order)
    return float(value)  # type: ignore[arg-type]


def decode_point(point: Point, block: Block, data: Sequence[int] | Sequence[bool]) -> float:
    """The point's value in its channel unit, from the words (or bits) its block returned."""
    i = point.address - block.address
    if point.table in BIT_TABLES:
        raw = 1.0 if data[i] else 0.0
    elif point.bit is not None:
        word = int(data[i])
        if point.byte_order == "little":
            word = _swap_bytes(word)
        raw = float((word >> point.bit) & 1)
    else:
        raw = decode_words(
            [int(w) for w in data[i : i + point.width]],
            point.type,
            point.byte_order,
            point.word_order,
        )
    return raw * point.scale + point.offset
