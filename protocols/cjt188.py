"""CJ/T 188 (户用计量仪表数据传输技术条件) water meter frames as the payload codec ``cjt188``.

Why: Chinese utilities read their meters through concentrators and DTUs that speak CJ/T 188;
decoding its frames lets those meters feed ingest like any other vendor's.

Frame (every multi-byte field low byte first, except the data identifier, see below)::

    [FE ...]  68  T  A0..A6  C  L  DI(2) SER  data...  CS  16

* ``FE`` wake-up bytes, any number (also between frames of one message).
* ``T`` meter type: 10H cold water, 11H domestic hot water, 12H drinking water, 13H reclaimed
  water (others, heat 20H/21H, gas 30H, electricity 40H, are UNSUPPORTED_FORMAT here).
* ``A0..A6`` address, 14 BCD digits, A0 the lowest two: the device is ``serial:<digits>``.
* ``C`` control: bit 7 set in a meter's answer, bit 6 set for an abnormal answer (then the
  data is SER and status only: MALFORMED with the status in the detail); 81H is read data.
* ``L`` length of DI+SER+data; ``CS`` the sum of all bytes from 68H to the data, modulo 256
  (BAD_CRC when wrong); ``16H`` the end byte.
* ``DI`` 901FH (current metering data). Edition 2004 sends it high byte first (``90 1F``), as
  the meters we know of do; edition 2018 low byte first (``1F 90``) like the rest of the frame.
  Both are recognised; :func:`encode_cjt188` writes either.
* 901FH data: current cumulative volume (4 BCD bytes, 6 integer and 2 decimal digits) with its
  unit code, settlement-day cumulative volume with its unit code, real time (7 BCD bytes
  ss mm hh DD MM YYYY, low first) and status ST (2 bytes). Unit codes: 29H litre, 2CH m3
  (others are MALFORMED for a volume).
* ST byte 0: bits 0-1 valve (00 open, 01 closed, 11 abnormal), bit 2 battery low (-> quality
  LOW_BATTERY); byte 1 is the manufacturer's and ignored.

The meter clock is China Standard Time (UTC+8, no daylight saving): the reading is stamped with
the meter's real time at ``utc_offset_h`` (8 unless the decoder is told otherwise). The
settlement-day volume and the valve state are parsed (:func:`parse_frames`) but are not
readings: the settlement day itself is not in the frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from protocols.payloads import BAD_CRC, MALFORMED, UNSUPPORTED_FORMAT, _fail
from protocols.uplink import Quality, Uplink

FORMAT = "cjt188"
START, END, PREAMBLE = 0x68, 0x16, 0xFE
WATER_TYPES = {0x10: "cold water", 0x11: "hot water", 0x12: "drinking water", 0x13: "reclaimed"}
DI_METERING = 0x901F
UNIT_SCALE_M3 = {0x29: 0.001, 0x2C: 1.0}  # litre, m3
UNIT_CODE = {"L": 0x29, "m3": 0x2C}
VALVE = {0: "open", 1: "closed", 2: "unknown", 3: "abnormal"}
MAX_FRAMES = 1000
CHINA_UTC_OFFSET_H = 8


@dataclass(slots=True)
class Cjt188Frame:
    """One decoded 901FH answer: who, what, when, and the meter's status."""

    meter_type: int
    address: str
    control: int
    di_order: str  # "2004" (90 1F) or "2018" (1F 90)
    serial_no: int
    volume_m3: float
    settlement_m3: float
    meter_time: float
    valve: str
    battery_low: bool

    @property
    def device(self) -> str:
        """``serial:<address>``: how ingest resolves the meter (the registry's ``serial``)."""
        return f"serial:{int(self.address)}"


def _bcd(raw: bytes, what: str, device: str | None = None) -> int:
    digits = raw[::-1].hex()
    if not digits.isdigit():
        raise _fail(MALFORMED, f"CJ/T 188 {what} {digits.upper()} is not BCD", device)
    return int(digits)


def _checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def _one(buf: bytes, pos: int, utc_offset_h: float) -> tuple[Cjt188Frame, int]:
    """The frame starting at ``buf[pos]`` (a 68H) and the position after its end byte."""
    if len(buf) - pos < 13:
        raise _fail(MALFORMED, f"CJ/T 188 frame cut at byte {pos} ({len(buf) - pos} bytes)")
    meter_type, addr_raw, control, length = (
        buf[pos + 1],
        buf[pos + 2 : pos + 9],
        buf[pos + 9],
        buf[pos + 10],
    )
    end = pos + 11 + length + 2
    if end > len(buf):
        raise _fail(MALFORMED, f"CJ/T 188 L={length} needs {end - pos} bytes, has {len(buf) - pos}")
    address = f"{_bcd(addr_raw, 'address'):014d}"
    device = f"serial:{int(address)}"
    if buf[end - 1] != END:
        raise _fail(MALFORMED, f"CJ/T 188 frame ends in {buf[end - 1]:02X}, not 16", device)
    cs = _checksum(buf[pos : end - 2])
    if cs != buf[end - 2]:
        raise _fail(BAD_CRC, f"CJ/T 188 checksum {buf[end - 2]:02X} != {cs:02X}", device)
    if meter_type not in WATER_TYPES:
        raise _fail(UNSUPPORTED_FORMAT, f"CJ/T 188 meter type {meter_type:02X}H", device)
    if not control & 0x80:
        raise _fail(MALFORMED, f"CJ/T 188 control {control:02X}: a request, not an answer", device)
    data = buf[pos + 11 : end - 2]
    if control & 0x40:
        st = data[-2:].hex().upper() if len(data) >= 2 else "?"
        raise _fail(MALFORMED, f"CJ/T 188 abnormal answer (C={control:02X}, ST {st})", device)
    if len(data) < 3:
        raise _fail(MALFORMED, f"CJ/T 188 data of {len(data)} bytes has no DI", device)
    if data[0] == 0x90 and data[1] == 0x1F:
        order = "2004"
    elif data[0] == 0x1F and data[1] == 0x90:
        order = "2018"
    else:
        raise _fail(UNSUPPORTED_FORMAT, f"CJ/T 188 DI {data[:2].hex().upper()}", device)
    if len(data) != 22:
        raise _fail(MALFORMED, f"CJ/T 188 901F data of {len(data)} bytes, not 22", device)
    volumes = []
    for at in (3, 8):
        unit = data[at + 4]
        if unit not in UNIT_SCALE_M3:
            raise _fail(MALFORMED, f"CJ/T 188 volume unit code {unit:02X}H", device)
        volumes.append(_bcd(data[at : at + 4], "volume", device) / 100 * UNIT_SCALE_M3[unit])
    t = data[13:20]
    ss, mi, hh, dd, mo = (_bcd(t[i : i + 1], "time", device) for i in range(5))
    year = _bcd(t[5:7], "time", device)
    try:
        local = datetime(year, mo, dd, hh, mi, ss, tzinfo=UTC)
    except ValueError:
        raise _fail(MALFORMED, f"CJ/T 188 real time {t[::-1].hex()} is no date", device) from None
    meter_time = (local - timedelta(hours=utc_offset_h)).timestamp()
    st0 = data[20]
    return (
        Cjt188Frame(
            meter_type=meter_type,
            address=address,
            control=control,
            di_order=order,
            serial_no=data[2],
            volume_m3=volumes[0],
            settlement_m3=volumes[1],
            meter_time=meter_time,
            valve=VALVE[st0 & 3],
            battery_low=bool(st0 & 4),
        ),
        end,
    )


def parse_frames(payload: bytes, utc_offset_h: float = CHINA_UTC_OFFSET_H) -> list[Cjt188Frame]:
    """Every frame of ``payload`` (one or many, FE preambles allowed), or PayloadError."""
    buf = bytes(payload)
    frames: list[Cjt188Frame] = []
    pos = 0
    while pos < len(buf):
        if buf[pos] == PREAMBLE:
            pos += 1
            continue
        if buf[pos] != START:
            raise _fail(MALFORMED, f"CJ/T 188 byte {pos} is {buf[pos]:02X}, not 68 or FE")
        if len(frames) >= MAX_FRAMES:
            raise _fail(MALFORMED, f"more than {MAX_FRAMES} CJ/T 188 frames in one message")
        frame, pos = _one(buf, pos, utc_offset_h)
        frames.append(frame)
    if not frames:
        raise _fail(MALFORMED, "no CJ/T 188 frame")
    return frames


def frame_uplink(frame: Cjt188Frame) -> Uplink:
    """The register reading of one frame (the listener uses it per frame)."""
    status = int(Quality.LOW_BATTERY) if frame.battery_low else 0
    return Uplink(frame.device, "register", [frame.meter_time], [frame.volume_m3], "m3", status)


def decode_cjt188(payload: bytes, default_device: str | None = None) -> list[Uplink]:
    """Uplinks (channel ``register``, m3) of one or many 901FH answers, or PayloadError.

    Why ``default_device`` is unused: each frame carries its meter's address.
    """
    return [frame_uplink(f) for f in parse_frames(payload)]


def _to_bcd(value: int, size: int) -> bytes:
    digits = f"{value:0{2 * size}d}"
    if len(digits) != 2 * size or value < 0:
        raise ValueError(f"{value} does not fit {size} BCD bytes")
    return bytes.fromhex(digits)[::-1]


def encode_cjt188(
    address: int,
    volume_m3: float,
    meter_time: float,
    *,
    settlement_m3: float = 0.0,
    unit: str = "m3",
    meter_type: int = 0x10,
    edition: str = "2004",
    serial_no: int = 0,
    valve: int = 0,
    battery_low: bool = False,
    preamble: int = 2,
    utc_offset_h: float = CHINA_UTC_OFFSET_H,
) -> bytes:
    """A 901FH read-data answer (C=81H) as a meter sends it: for the simulator and tests.

    ``meter_time`` is unix seconds, written as the meter's local time (UTC+``utc_offset_h``),
    whole seconds; volumes are rounded to the register's 2 decimals of ``unit``.
    """
    scale = 1000.0 if unit == "L" else 1.0
    local = datetime.fromtimestamp(int(meter_time), UTC) + timedelta(hours=utc_offset_h)
    data = bytes([0x90, 0x1F] if edition == "2004" else [0x1F, 0x90]) + bytes([serial_no & 0xFF])
    data += _to_bcd(round(volume_m3 * scale * 100), 4) + bytes([UNIT_CODE[unit]])
    data += _to_bcd(round(settlement_m3 * scale * 100), 4) + bytes([UNIT_CODE[unit]])
    data += bytes.fromhex(f"{local:%S%M%H%d%m}") + _to_bcd(local.year, 2)
    data += bytes([(valve & 3) | (4 if battery_low else 0), 0])
    body = bytes([START, meter_type]) + _to_bcd(address, 7) + bytes([0x81, len(data)]) + data
    return bytes([PREAMBLE] * preamble) + body + bytes([_checksum(body), END])
