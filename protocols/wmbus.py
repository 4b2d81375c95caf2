"""Wireless M-Bus / OMS telegrams (EN 13757-4/-7, OMS vol. 2) as payload codecs ``wmbus``
(binary) and ``wmbus-hex`` (hex text, as most gateways forward them over MQTT).

Why here and not in a gateway: a utility buys meters from several vendors; decoding the standard
once, with per-meter keys, lets any wM-Bus receiver that forwards raw telegrams feed ingest.

Layers, in order:

* link layer ``L C M(2) A(6)``: A is the meter id (8 BCD digits, little-endian), version and
  device type. Frame format A telegrams may keep their CRC blocks (CRC-16/EN-13757 after the
  first 10 bytes and after every 16 bytes); they are checked and removed (bad: BAD_CRC).
* CI field: 0x7A short transport header (ACC, STS, configuration word), 0x72 long header
  (id, manufacturer, version, type of the metering device, then the same), 0x78 none.
* security mode 5 (AES-128-CBC, IV = manufacturer + address + 8 x ACC, of the long header when
  there is one): the decrypted part must start with 2F2F, else DECRYPT_FAILED (wrong key, or
  none).
* security mode 7 (OMS): behind an AFL (CI 0x90) with message counter and AES-CMAC; keys
  Kenc/Kmac derived from the meter key by AES-CMAC (KDF 1), IV zero. The AFL MAC is checked
  before decrypting (mismatch: DECRYPT_FAILED), then 2F2F. Verified by having wmbusmeters read
  telegrams made here (no published mode 7 telegram with its key was found). Other modes and
  fragmented messages are UNSUPPORTED_FORMAT.
* DIF/VIF data records: volume (every VIF scale 10^-6..10^1 m3, and 0xFB 10^2/10^3 m3), volume
  flow (m3/h, m3/min, m3/s), date (type G) and date/time (type F), error flags (0xFD 0x17).

Readings: the current volume (storage 0, tariff 0) is channel ``register`` in m3; backward-flow
volume (VIFE 0x3C) ``register_reverse``; flow ``flow`` in m3/h; error flags ``error_flags``.
Readings are stamped with the telegram's current date/time record when it has one: the meter's
wall clock, which carries no zone, so the uplink is flagged ``local_clock`` (with the record's
summer-time bit SU as ``clock_summer``, which tells the two 02:30s of an autumn night apart) and
ingest reads it in the meter's clock zone (registry ``clock``: its DMA's zone, or UTC); without
one, at decoding (on receipt). Historic values (storage > 0) are parsed (:func:`parse_records`)
but not readings. The device is ``serial:<id>`` with the id as the registry's integer ``serial``
(id 00123456 is serial 123456). STS bit 0x04 (power low) sets LOW_BATTERY.

Keys never touch the database or the registry file: :class:`KeyRing` reads them when first
needed from ``AQUAMETER_WMBUS_KEY_<ID>`` (32 hex digits) or from the file named by
``AQUAMETER_WMBUS_KEYS_FILE`` (``<id> <hex key>`` per line, ``#`` comments), through
:func:`aquameter.secrets.resolve_secret`.
"""

from __future__ import annotations

import math
import os
import re
import struct
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo

from aquameter.secrets import SecretError, resolve_secret
from protocols.payloads import BAD_CRC, MALFORMED, UNSUPPORTED_FORMAT, Decoded, _fail
from protocols.uplink import PayloadError, Quality, Uplink

DECRYPT_FAILED = "DECRYPT_FAILED"
FORMAT_BINARY = "wmbus"
FORMAT_HEX = "wmbus-hex"
MAX_TELEGRAMS = 1000
KEY_ENV_PREFIX = "AQUAMETER_WMBUS_KEY_"
KEYS_FILE_ENV = "AQUAMETER_WMBUS_KEYS_FILE"
STS_POWER_LOW = 0x04


# --- CRC and link layer -------------------------------------------------------------------------
def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x3D65) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc16_en13757(data: bytes) -> int:
    """CRC-16/EN-13757 (poly 0x3D65, init 0, inverted): the block CRC of frame format A."""
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC_TABLE[((crc >> 8) ^ b) & 0xFF]
    return crc ^ 0xFFFF


def _crc_length(l_field: int) -> int:
    """Bytes on air of a format A telegram with L field ``l_field`` (CRC blocks included)."""
    rest = l_field - 9
    return 1 + 9 + 2 + rest + 2 * math.ceil(rest / 16) if rest > 0 else 12


def strip_crcs(frame: bytes) -> bytes:
    """A format A telegram without its CRC blocks, each checked (BAD_CRC when one is wrong)."""
    out = bytearray()
    pos, first = 0, True
    while pos < len(frame):
        size = 10 if first else 16
        block = frame[pos : pos + size]
        if len(frame) - pos < size + 2:
            block = frame[pos : len(frame) - 2]
            size = len(block)
        if not block:
            raise _fail(MALFORMED, "wM-Bus CRC block without data")
        (crc,) = struct.unpack_from(">H", frame, pos + size)
        if crc != crc16_en13757(block):
            raise _fail(BAD_CRC, f"wM-Bus block CRC {crc:04x} at byte {pos + size} does not match")
        out += block
        pos += size + 2
        first = False
    return bytes(out)


def add_crcs(telegram: bytes) -> bytes:
    """``telegram`` (no CRCs) with format A CRC blocks, as a radio receiver delivers it."""
    out = bytearray()
    blocks = [telegram[:10]] + [telegram[i : i + 16] for i in range(10, len(telegram), 16)]
    for block in blocks:
        out += block + struct.pack(">H", crc16_en13757(block))
    return bytes(out)


def split_telegrams(data: bytes) -> list[bytes]:
    """Telegrams (CRCs removed) of a buffer holding one or many, back to back, each with or
    without format A CRC blocks: a telegram whose first block CRC is right keeps CRCs."""
    out: list[bytes] = []
    for tg, _ in _frames(data):
        if isinstance(tg, PayloadError):
            raise tg
        out.append(tg)
    return out


def _frames(data: bytes) -> list[tuple[bytes | PayloadError, bytes]]:
    """Each telegram framed in ``data`` as (telegram without CRCs, or its error; bytes as
    received). Framing that breaks off ends the list with the error and the remaining bytes.

    Why errors are items, not raised: a gateway message holds many meters' telegrams; one with
    a bad block CRC (its length is still known from L) or a broken tail must not cost the
    telegrams framed whole around it.
    """
    out: list[tuple[bytes | PayloadError, bytes]] = []
    pos = 0
    while pos < len(data):
        if len(out) >= MAX_TELEGRAMS:
            err = _fail(MALFORMED, f"more than {MAX_TELEGRAMS} wM-Bus telegrams in one message")
            out.append((err, data[pos:]))
            return out
        l_field = data[pos]
        if l_field < 10:
            err = _fail(MALFORMED, f"wM-Bus L field {l_field} at byte {pos} is too small")
            out.append((err, data[pos:]))
            return out
        with_crc = _crc_length(l_field)
        head = data[pos : pos + 12]
        if (
            len(data) - pos >= with_crc
            and len(head) == 12
            and struct.unpack_from(">H", head, 10)[0] == crc16_en13757(head[:10])
        ):
            raw = data[pos : pos + with_crc]
            try:
                out.append((strip_crcs(raw), raw))
            except PayloadError as crc_err:
                # The first block's CRC matched by chance (1 in 65536) in a telegram sent
                # without CRCs, or a later block is corrupt: this telegram only, either way.
                plain = data[pos : pos + l_field + 1]
                if len(plain) == l_field + 1 and _next_fits(data, pos + l_field + 1):
                    out.append((plain, plain))
                    pos += l_field + 1
                    continue
                out.append((crc_err, raw))
            pos += with_crc
            continue
        end = pos + l_field + 1
        if end > len(data):
            err = _fail(
                MALFORMED,
                f"wM-Bus telegram at byte {pos} needs {l_field + 1} bytes, has {len(data) - pos}",
            )
            out.append((err, data[pos:]))
            return out
        out.append((data[pos:end], data[pos:end]))
        pos = end
    if not out:
        out.append((_fail(MALFORMED, "no wM-Bus telegram"), bytes(data)))
    return out


def _next_fits(data: bytes, pos: int) -> bool:
    """Whether a telegram may start at ``pos``: the buffer ends there, or an L field of a
    telegram that fits does (the check that tells a CRC-less telegram from a corrupt one)."""
    return pos == len(data) or (data[pos] >= 10 and pos + data[pos] + 1 <= len(data))


def manufacturer_code(m: int) -> str:
    """The three-letter FLAG code of a manufacturer field (``0x2C2D`` -> ``KAM``)."""
    return "".join(chr(((m >> s) & 0x1F) + 64) for s in (10, 5, 0))


def _bcd_id(raw: bytes) -> str:
    return raw[::-1].hex().upper()


def _device_of(meter_id: str) -> str:
    """``serial:<id>`` as the registry's integer ``serial`` spells it: id 00123456 is serial
    123456 (as CJ/T 188 addresses are), so a meter whose id starts with zeros resolves too."""
    return f"serial:{int(meter_id)}" if meter_id.isdigit() else f"serial:{meter_id}"


# --- keys ---------------------------------------------------------------------------------------
class KeyRing:
    """Per-meter AES keys, read from the environment or a key file when first asked for.

    Why not the registry or the database: a key stored with the data would hand every backup
    and dashboard user the power to read (and forge) meters; see :mod:`aquameter.secrets`.
    """

    def __init__(self, keys: dict[str, bytes] | None = None, *, from_env: bool = True) -> None:
        self._keys = {k.upper(): v for k, v in (keys or {}).items()}
        self._from_env = from_env
        self._file_loaded = False

    def key_for(self, meter_id: str) -> bytes | None:
        """The 16-byte key of ``meter_id`` (8 digits), or None when no key is configured."""
        meter_id = meter_id.upper()
        if meter_id in self._keys:
            return self._keys[meter_id]
        if not self._from_env:
            return None
        env = KEY_ENV_PREFIX + meter_id
        if env in os.environ:
            key = _parse_key(resolve_secret(env, None) or "", env)
            self._keys[meter_id] = key
            return key
        if not self._file_loaded:
            self._file_loaded = True
            text = resolve_secret(None, os.environ.get(KEYS_FILE_ENV) or None)
            for n, line in enumerate((text or "").splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if line:
                    ident, _, hexkey = line.partition(" ")
                    where = f"{KEYS_FILE_ENV} line {n}"
                    self._keys.setdefault(ident.upper(), _parse_key(hexkey.strip(), where))
        return self._keys.get(meter_id)


def _parse_key(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text.removeprefix("hex:"))
    except ValueError:
        raise SecretError(f"{where}: not a hex AES key") from None
    if len(key) != 16:
        raise SecretError(f"{where}: an AES-128 key has 32 hex digits")
    return key


_default_keyring = KeyRing()


def set_keyring(ring: KeyRing) -> None:
    """Use ``ring`` for the ``wmbus`` codecs of this process (tests, or a service's own)."""
    global _default_keyring
    _default_keyring = ring


# --- data records -------------------------------------------------------------------------------
@dataclass(slots=True)
class DataRecord:
    """One DIF/VIF data record. ``quantity`` is volume, flow, date, datetime, error_flags or
    other; ``value`` is in m3, m3/h, unix seconds (the meter's wall clock written as if UTC:
    the record has no zone, ingest applies the meter's) or raw."""

    dif: int
    vif: int
    vifes: list[int] = field(default_factory=list)
    function: int = 0
    storage: int = 0
    tariff: int = 0
    subunit: int = 0
    quantity: str = "other"
    unit: str = ""
    value: float | None = None
    summer_time: bool | None = None  # a type F date/time's SU bit: the clock was on summer time


_INT_SIZES = {0x1: 1, 0x2: 2, 0x3: 3, 0x4: 4, 0x6: 6, 0x7: 8}
_BCD_SIZES = {0x9: 1, 0xA: 2, 0xB: 3, 0xC: 4, 0xE: 6}


def _bcd(raw: bytes) -> float | None:
    digits = raw[::-1].hex()
    negative = digits[0] == "f"
    if negative:
        digits = digits[1:]
    if not digits.isdigit():
        return None
    return float(-int(digits) if negative else int(digits))


def _type_f(raw: bytes) -> float | None:
    """Date and time, type F (CP32): minutes, hours, day, month, year since 2000 (the hour
    byte's bit 7, SU, says summer time: read by the caller)."""
    if raw[0] & 0x80:
        return None
    minute, hour, day, month = raw[0] & 0x3F, raw[1] & 0x1F, raw[2] & 0x1F, raw[3] & 0x0F
    year = 2000 + (((raw[2] & 0xE0) >> 5) | ((raw[3] & 0xF0) >> 1))
    try:
        return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _type_g(raw: bytes) -> float | None:
    """Date, type G (CP16): day, month, year since 2000."""
    day, month = raw[0] & 0x1F, raw[1] & 0x0F
    year = 2000 + (((raw[0] & 0xE0) >> 5) | ((raw[1] & 0xF0) >> 1))
    try:
        return datetime(year, month, day, tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _vif_meaning(vif: int, vifes: list[int], ext: int | None) -> tuple[str, str, float]:
    """(quantity, unit, multiplier) of a VIF (``ext`` 0xFB/0xFD for the extension tables)."""
    if ext == 0xFD:
        if vifes and vifes[0] & 0x7F == 0x17:
            return "error_flags", "", 1.0
        return "other", "", 1.0
    if ext == 0xFB:
        if vif & 0x7E == 0x10:  # volume 10^(n+2) m3
            return "volume", "m3", 10.0 ** ((vif & 1) + 2)
        return "other", "", 1.0
    v = vif & 0x7F
    if v & 0x78 == 0x10:
        return "volume", "m3", 10.0 ** ((v & 7) - 6)
    if v & 0x78 == 0x38:
        return "flow", "m3/h", 10.0 ** ((v & 7) - 6)
    if v & 0x78 == 0x40:
        return "flow", "m3/h", 10.0 ** ((v & 7) - 7) * 60
    if v & 0x78 == 0x48:
        return "flow", "m3/h", 10.0 ** ((v & 7) - 9) * 3600
    if v == 0x6C:
        return "date", "s", 1.0
    if v == 0x6D:
        return "datetime", "s", 1.0
    return "other", "", 1.0


def parse_records(data: bytes) -> list[DataRecord]:
    """The data records of a decrypted application layer, in order (MALFORMED if one is cut).

    Why public: tests compare it record by record with pyMeterBus.
    """
    records: list[DataRecord] = []
    pos, n = 0, len(data)
    while pos < n:
        dif = data[pos]
        pos += 1
        if dif == 0x2F:  # idle filler
            continue
        if dif in (0x0F, 0x1F):  # manufacturer-specific data follows: not records
            break
        rec = DataRecord(dif=dif, vif=0, function=(dif >> 4) & 3, storage=(dif >> 6) & 1)
        ext, shift = dif & 0x80, 1
        tshift = 0
        while ext:
            if pos >= n or shift > 40:
                raise _fail(MALFORMED, "wM-Bus record cut in its DIFEs")
            dife = data[pos]
            pos += 1
            rec.storage |= (dife & 0x0F) << shift
            rec.tariff |= ((dife >> 4) & 3) << tshift
            rec.subunit |= ((dife >> 6) & 1) << (tshift // 2)
            shift, tshift, ext = shift + 4, tshift + 2, dife & 0x80
        if pos >= n:
            raise _fail(MALFORMED, "wM-Bus record without a VIF")
        rec.vif = data[pos]
        pos += 1
        table = rec.vif if rec.vif in (0xFB, 0xFD) else None
        more = rec.vif & 0x80
        if rec.vif & 0x7F == 0x7C:  # plain-text VIF: length + ASCII, then VIFEs
            if pos >= n:
                raise _fail(MALFORMED, "wM-Bus plain-text VIF cut")
            pos += 1 + data[pos]
        while more:
            if pos >= n or len(rec.vifes) > 10:
                raise _fail(MALFORMED, "wM-Bus record cut in its VIFEs")
            rec.vifes.append(data[pos])
            more = data[pos] & 0x80
            pos += 1
        base_vif = rec.vif
        if table is not None:
            base_vif = rec.vifes[0] if rec.vifes else 0
        rec.quantity, rec.unit, mult = _vif_meaning(base_vif, rec.vifes, table)
        coding = dif & 0x0F
        if coding == 0xD:  # variable length
            if pos >= n:
                raise _fail(MALFORMED, "wM-Bus variable-length record cut")
            size = data[pos] & 0x3F if data[pos] < 0xC0 else 0
            pos += 1
        elif coding == 0x5:
            size = 4
        elif coding in _INT_SIZES:
            size = _INT_SIZES[coding]
        elif coding in _BCD_SIZES:
            size = _BCD_SIZES[coding]
        else:
            size = 0
        raw = data[pos : pos + size]
        if len(raw) != size:
            raise _fail(MALFORMED, f"wM-Bus record at byte {pos} cut ({len(raw)} of {size} bytes)")
        pos += size
        if rec.quantity == "date" and size == 2:
            rec.value = _type_g(raw)
        elif rec.quantity == "datetime" and size == 4:
            rec.value = _type_f(raw)
            rec.summer_time = bool(raw[1] & 0x80)
        elif coding in _INT_SIZES:
            rec.value = float(int.from_bytes(raw, "little", signed=rec.quantity != "error_flags"))
        elif coding in _BCD_SIZES:
            rec.value = _bcd(raw)
        elif coding == 0x5:
            rec.value = struct.unpack("<f", raw)[0]
        if rec.value is not None and rec.quantity in ("volume", "flow"):
            rec.value *= mult
        records.append(rec)
    return records


# --- transport layer and decryption -------------------------------------------------------------
@dataclass(slots=True)
class Telegram:
    """A decoded telegram: who sent it, its header fields and its data records."""

    manufacturer: str
    meter_id: str
    version: int
    device_type: int
    ci: int
    access_number: int = 0
    status: int = 0
    security_mode: int = 0
    records: list[DataRecord] = field(default_factory=list)


def _decrypt_mode5(key: bytes, iv: bytes, blob: bytes, device: str) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    plain = dec.update(blob) + dec.finalize()
    if plain[:2] != b"\x2f\x2f":
        raise _fail(DECRYPT_FAILED, "decrypted data does not start with 2F2F (wrong key?)", device)
    return plain


@dataclass(slots=True)
class _Afl:
    """What an authentication and fragmentation layer (CI 90H) holds that mode 7 needs."""

    mcl: int = 0
    counter: bytes | None = None
    mac: bytes = b""


_MAC_LENGTHS = {3: 2, 4: 4, 5: 8, 6: 12, 7: 16}  # AFL.MCL authentication type -> AES-CMAC bytes


def _afl(tg: bytes, device: str) -> tuple[_Afl, int]:
    """The AFL at byte 10 and the offset of the CI field after it (no fragmented messages)."""
    if len(tg) < 14:
        raise _fail(MALFORMED, "wM-Bus AFL header cut", device)
    end = 12 + tg[11]
    if tg[11] < 2 or end >= len(tg):
        raise _fail(MALFORMED, f"wM-Bus AFL length {tg[11]}", device)
    (fc,) = struct.unpack_from("<H", tg, 12)
    if fc & 0x4000 or fc & 0x00FF:
        raise _fail(UNSUPPORTED_FORMAT, "fragmented wM-Bus message (AFL)", device)
    afl, p = _Afl(), 14
    if fc & 0x2000:
        afl.mcl, p = tg[p], p + 1
    if fc & 0x0200:
        p += 2
    if fc & 0x0800:
        afl.counter, p = tg[p : p + 4], p + 4
    if fc & 0x0400:
        size = _MAC_LENGTHS.get(afl.mcl & 0x0F)
        if size is None:
            raise _fail(UNSUPPORTED_FORMAT, f"wM-Bus AFL authentication {afl.mcl & 15}", device)
        afl.mac, p = tg[p : p + size], p + size
    if p > end:
        raise _fail(MALFORMED, f"wM-Bus AFL fields need {p - 12} bytes, length is {tg[11]}", device)
    return afl, end


def _kdf(key: bytes, constant: int, counter: bytes, ident: bytes) -> bytes:
    """OMS mode 7 ephemeral key: AES-CMAC(K, DC || counter || id || 07 x 7); DC 00 encryption,
    01 MAC, both from the meter."""
    from cryptography.hazmat.primitives.ciphers import algorithms
    from cryptography.hazmat.primitives.cmac import CMAC

    mac = CMAC(algorithms.AES(key))
    mac.update(bytes([constant]) + counter + ident + b"\x07" * 7)
    return mac.finalize()


def _afl_mac(kmac: bytes, afl: _Afl, rest: bytes) -> bytes:
    """AFL.MAC = AES-CMAC(Kmac, MCL || MCR || next CI ... last byte), full 16 bytes."""
    from cryptography.hazmat.primitives.ciphers import algorithms
    from cryptography.hazmat.primitives.cmac import CMAC

    mac = CMAC(algorithms.AES(kmac))
    mac.update(bytes([afl.mcl]) + (afl.counter or b"") + rest)
    return mac.finalize()


def parse_telegram(tg: bytes, keys: KeyRing | None = None) -> Telegram:
    """A telegram without CRCs, parsed and (modes 5 and 7) decrypted with its meter's key."""
    keys = keys or _default_keyring
    if len(tg) < 11 or tg[0] != len(tg) - 1:
        raise _fail(MALFORMED, f"wM-Bus L field {tg[0] if tg else 0} for {len(tg)} bytes")
    (m_field,) = struct.unpack_from("<H", tg, 2)
    t = Telegram(
        manufacturer=manufacturer_code(m_field),
        meter_id=_bcd_id(tg[4:8]),
        version=tg[8],
        device_type=tg[9],
        ci=tg[10],
    )
    iv_head, ident = tg[2:10], tg[4:8]
    afl: _Afl | None = None
    o = 10
    if t.ci == 0x90:
        afl, o = _afl(tg, _device_of(t.meter_id))
        t.ci = tg[o]
    tpl_start = o
    if t.ci == 0x7A:
        if len(tg) < o + 5:
            raise _fail(MALFORMED, "wM-Bus short header cut", _device_of(t.meter_id))
        t.access_number, t.status = tg[o + 1], tg[o + 2]
        (cw,) = struct.unpack_from("<H", tg, o + 3)
        o += 5
    elif t.ci == 0x72:
        if len(tg) < o + 13:
            raise _fail(MALFORMED, "wM-Bus long header cut", _device_of(t.meter_id))
        ident = tg[o + 1 : o + 5]
        t.meter_id = _bcd_id(ident)
        (m2,) = struct.unpack_from("<H", tg, o + 5)
        t.manufacturer, t.version, t.device_type = manufacturer_code(m2), tg[o + 7], tg[o + 8]
        t.access_number, t.status = tg[o + 9], tg[o + 10]
        (cw,) = struct.unpack_from("<H", tg, o + 11)
        iv_head = tg[o + 5 : o + 7] + ident + tg[o + 7 : o + 9]
        o += 13
    elif t.ci == 0x78:
        cw, o = 0, o + 1
    else:
        raise _fail(
            UNSUPPORTED_FORMAT,
            f"wM-Bus CI field {t.ci:02X} is not supported",
            _device_of(t.meter_id),
        )
    device = _device_of(t.meter_id)
    if not t.meter_id.isdigit():
        raise _fail(MALFORMED, f"wM-Bus id {t.meter_id} is not BCD", device)
    t.security_mode = (cw >> 8) & 0x1F
    if t.security_mode == 7:  # configuration field extension byte (KDF selection)
        if o >= len(tg) or (tg[o] >> 4) & 3 != 1 or afl is None or afl.counter is None:
            raise _fail(
                UNSUPPORTED_FORMAT, "wM-Bus mode 7 without KDF 1 or AFL message counter", device
            )
        if not afl.mac:
            raise _fail(UNSUPPORTED_FORMAT, "wM-Bus mode 7 without an AFL MAC", device)
        o += 1
    body = tg[o:]
    if t.security_mode in (5, 7):
        blocks = (cw >> 4) & 0x0F
        size = 16 * blocks if blocks else len(body) - len(body) % 16
        if size == 0 or size > len(body):
            raise _fail(
                MALFORMED,
                f"wM-Bus mode {t.security_mode}: {blocks} blocks in {len(body)} bytes",
                device,
            )
        try:
            key = keys.key_for(t.meter_id)
        except SecretError as err:
            raise _fail(DECRYPT_FAILED, f"key of {t.meter_id}: {err}", device) from None
        if key is None:
            raise _fail(DECRYPT_FAILED, f"no key for encrypted meter {t.meter_id}", device)
        if t.security_mode == 5:
            iv = iv_head + bytes([t.access_number]) * 8
        else:
            assert afl is not None and afl.counter is not None  # checked above
            kmac = _kdf(key, 0x01, afl.counter, ident)
            if _afl_mac(kmac, afl, tg[tpl_start:])[: len(afl.mac)] != afl.mac:
                raise _fail(DECRYPT_FAILED, "AFL MAC does not match (wrong key?)", device)
            key, iv = _kdf(key, 0x00, afl.counter, ident), bytes(16)
        body = _decrypt_mode5(key, iv, body[:size], device) + body[size:]
    elif t.security_mode != 0:
        raise _fail(
            UNSUPPORTED_FORMAT, f"wM-Bus security mode {t.security_mode} is not supported", device
        )
    try:
        t.records = parse_records(body)
    except PayloadError as err:
        raise _fail(err.reason, err.detail, device) from None
    return t


def _uplinks(t: Telegram, now: float) -> list[Uplink]:
    """The current readings of a telegram, stamped with its own date/time record when it has
    one (type F: the meter's wall clock, flagged ``local_clock`` so that ingest converts it with
    the meter's clock zone), else with the time it was decoded (UTC).

    Why the meter's time first: a gateway that forwards a backlog (or a replayed day) would
    otherwise stamp hours of readings with one instant, and all but one become duplicates.
    """
    device = _device_of(t.meter_id)
    meter_clock, summer = False, None
    for r in t.records:
        if (
            r.quantity == "datetime"
            and r.value is not None
            and not (r.storage or r.tariff or r.subunit or r.function)
        ):
            now, meter_clock, summer = r.value, True, r.summer_time
            break
    status = int(Quality.LOW_BATTERY) if t.status & STS_POWER_LOW else 0
    out: list[Uplink] = []
    seen: set[str] = set()
    for r in t.records:
        if r.value is None or r.storage or r.tariff or r.subunit or r.function:
            continue
        if r.quantity == "volume":
            channel = "register_reverse" if any(v & 0x7F == 0x3C for v in r.vifes) else "register"
        elif r.quantity in ("flow", "error_flags"):
            channel = r.quantity
        else:
            continue
        if channel in seen:
            continue
        seen.add(channel)
        unit = r.unit or None
        out.append(
            Uplink(
                device, channel, [now], [r.value], unit, status,
                local_clock=meter_clock, clock_summer=summer,
            )
        )  # fmt: skip
    if not out:
        raise _fail(MALFORMED, f"wM-Bus telegram of {t.meter_id} has no current reading", device)
    return out


def decode_wmbus(
    payload: bytes, default_device: str | None = None, *, keys: KeyRing | None = None
) -> Decoded:
    """Uplinks of one or many binary telegrams (with or without CRC blocks), or PayloadError.

    A telegram that fails on its own (wrong key, bad CRC, no reading) lands in the result's
    ``rejected`` with its bytes while the others decode; PayloadError only when none does.
    Why ``default_device`` is unused: a telegram names its meter; a gateway's topic does not.
    """
    now = float(int(time.time()))
    out = Decoded()
    for tg, raw in _frames(bytes(payload)):
        try:
            if isinstance(tg, PayloadError):
                raise tg
            out.extend(_uplinks(parse_telegram(tg, keys), now))
        except PayloadError as err:
            out.rejected.append((err, raw))
    if not out:
        raise out.rejected[0][0]
    return out


_HEX_SEP = re.compile(r"[\s,;]+")


def decode_wmbus_hex(
    payload: bytes, default_device: str | None = None, *, keys: KeyRing | None = None
) -> Decoded:
    """Uplinks of hex telegrams separated by whitespace, commas or semicolons (``0x`` allowed);
    a word that is not hex or does not decode is refused on its own, as in :func:`decode_wmbus`.
    """
    try:
        text = bytes(payload).decode("ascii")
    except UnicodeDecodeError:
        raise _fail(MALFORMED, "wM-Bus hex payload is not ASCII") from None
    words = [w.removeprefix("0x").removeprefix("0X") for w in _HEX_SEP.split(text) if w]
    if not words:
        raise _fail(MALFORMED, "empty wM-Bus hex payload")
    if len(words) > MAX_TELEGRAMS:
        raise _fail(MALFORMED, f"more than {MAX_TELEGRAMS} wM-Bus telegrams in one message")
    out = Decoded()
    for w in words:
        try:
            raw = bytes.fromhex(w)
        except ValueError:
            out.rejected.append((_fail(MALFORMED, f"not hex: {w[:40]!r}"), w.encode()))
            continue
        try:
            part = decode_wmbus(raw, default_device, keys=keys)
        except PayloadError as err:
            out.rejected.append((err, w.encode()))
            continue
        out.extend(part)
        out.rejected.extend((err, w.encode()) for err, _ in part.rejected)
    if not out:
        raise out.rejected[0][0]
    return out


def encode_wmbus(
    meter_id: str,
    volume_m3: float,
    *,
    manufacturer: str = "AQM",
    version: int = 1,
    device_type: int = 0x07,
    access_number: int = 0,
    status: int = 0,
    key: bytes | None = None,
    mode: int = 5,
    counter: int = 0,
    crc: bool = False,
    meter_time: float | None = None,
    clock: tzinfo | None = None,
) -> bytes:
    """A water meter telegram (CI 0x7A) with the volume in litres (VIF 0x13); encrypted when a
    key is given: mode 5, or mode 7 (behind an AFL with ``counter`` and an 8-byte CMAC, KDF 1).

    ``meter_time`` (unix seconds) adds the meter's current date/time record (VIF 6DH, type F),
    which the decoder then uses as the reading's time: the wall clock of ``clock`` at that
    instant (UTC when None), as a meter set to that zone writes it.

    Why: the fleet simulator and the round-trip tests need telegrams as meters send them, and
    mode 7 can only be checked by having an independent decoder (wmbusmeters) read ours.
    """
    m = 0
    for ch in manufacturer:
        m = (m << 5) | (ord(ch) - 64)
    ident = bytes.fromhex(meter_id)[::-1]
    head = struct.pack("<BH", 0x44, m) + ident + bytes([version, device_type])
    records = b"\x04\x13" + struct.pack("<i", round(volume_m3 * 1000))
    if meter_time is not None:  # current date and time, type F (whole minutes, wall clock)
        d = datetime.fromtimestamp(int(meter_time) // 60 * 60, clock or UTC)
        y = d.year - 2000
        su = 0x80 if d.dst() else 0x00  # SU: the wall clock is on summer time
        records += b"\x04\x6d" + bytes(
            [d.minute, d.hour | su, d.day | ((y & 0x07) << 5), d.month | ((y & 0x78) << 1)]
        )
    afl, ext = b"", b""
    kmac = mcr = b""
    if key is not None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        plain = b"\x2f\x2f" + records
        plain += b"\x2f" * (-len(plain) % 16)
        if mode == 7:
            mcr = struct.pack("<I", counter)
            kmac, key = _kdf(key, 0x01, mcr, ident), _kdf(key, 0x00, mcr, ident)
            iv, ext = bytes(16), b"\x10"
        else:
            iv = head[1:9] + bytes([access_number]) * 8
        enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        body = enc.update(plain) + enc.finalize()
        cw = (mode << 8) | ((len(plain) // 16) << 4)
    else:
        body, cw = records, 0
    tpl = bytes([0x7A, access_number, status]) + struct.pack("<H", cw) + ext
    if key is not None and mode == 7:
        mcl = 0x25  # message counter present, AES-CMAC-128 truncated to 8 bytes
        mac = _afl_mac(kmac, _Afl(mcl, mcr), tpl + body)[:8]
        afl = bytes([0x90, 15]) + struct.pack("<H", 0x2C00) + bytes([mcl]) + mcr + mac
    tg = head + afl + tpl + body
    tg = bytes([len(tg)]) + tg
    return add_crcs(tg) if crc else tg
