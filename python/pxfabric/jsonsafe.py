"""Make message content safe for a strict JSON/UTF-8 encoder.

The engine runtime hands plain dicts to C++, which encodes them as JSON and sends them as UTF-8
frames. Python strings may hold lone surrogates (``surrogateescape``-decoded bytes, or ``'\\udcff'``
typed by a user), and user data may hold tuples, numpy scalars, bytes or NaN. The stock engine
lets ``jupyter_client``'s packer cope with (or crash on) these; here every outgoing value is
turned into JSON-native types and valid Unicode before it leaves Python.
"""

from __future__ import annotations

import codecs
import json
import math
import numbers
from binascii import b2a_base64
from datetime import date, datetime, timezone
from typing import Any

_REPLACEMENT = "\ufffd".encode("utf-8")


def _surrogate_error(exc: UnicodeError):
    """Encode error handler: escaped bytes back to bytes, other surrogates to U+FFFD."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for ch in exc.object[exc.start : exc.end]:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(code - 0xDC00)
        else:
            out += _REPLACEMENT
    return bytes(out), exc.end


codecs.register_error("pxfabric.surrogates", _surrogate_error)


def clean_text(text: str) -> str:
    """Return ``text`` as valid Unicode (no lone surrogates).

    Surrogate-escaped bytes are restored and decoded as UTF-8 with replacement characters for
    anything that is not valid UTF-8; other lone surrogates become U+FFFD.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "pxfabric.surrogates").decode("utf-8", "replace")


def iso_now() -> str:
    """Current UTC time formatted exactly as ``jupyter_client`` serializes ``utcnow()``."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _date(obj: datetime) -> str:
    if obj.tzinfo is None:
        obj = obj.replace(tzinfo=timezone.utc)
    return obj.isoformat().replace("+00:00", "Z")


def jsonable(obj: Any) -> Any:
    """Return a copy of ``obj`` made of JSON-native types with valid Unicode strings.

    Conversions follow ``jupyter_client``'s ``json_default``/``json_clean``: tuples, sets and
    other iterables become lists, integral and real numbers become ``int``/``float`` (NaN and
    infinities become their ``repr``), ``bytes`` become base64 text, datetimes ISO-8601 with
    ``Z``; dict keys become strings. Anything else becomes its ``repr`` rather than failing.
    """
    if obj is None or obj is True or obj is False:
        return obj
    t = type(obj)
    if t is str:
        return clean_text(obj)
    if t is int:
        return obj
    if t is float:
        return obj if math.isfinite(obj) else repr(obj)
    if t is dict:
        return {(k if type(k) is str and k.isascii() else _key(k)): jsonable(v) for k, v in obj.items()}
    if t is list or t is tuple:
        return [jsonable(v) for v in obj]
    if isinstance(obj, str):
        return clean_text(str(obj))
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else repr(value)
    if isinstance(obj, dict):
        return {_key(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return b2a_base64(bytes(obj)).decode("ascii")
    if isinstance(obj, datetime):
        return _date(obj)
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, date):
        return obj.isoformat()
    if getattr(obj, "shape", None) == () and hasattr(obj, "item"):
        # numpy scalars and 0-d arrays (np.bool_ is neither Integral nor Real)
        return jsonable(obj.item())
    try:
        items = list(iter(obj))
    except Exception:
        return clean_text(repr(obj))
    return [jsonable(v) for v in items]


def _key(key: Any) -> str:
    return clean_text(key if isinstance(key, str) else str(key))


def dumps(obj: Any) -> bytes:
    """Pack ``obj`` like ``jupyter_client``'s JSON packer, but never fail on odd values.

    Provided for callers that prefer Python to produce the frame bytes.
    """
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError):
        return json.dumps(jsonable(obj), ensure_ascii=False, allow_nan=False).encode("utf-8")
