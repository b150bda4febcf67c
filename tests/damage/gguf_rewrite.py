"""A GGUF copied with keys retyped, replaced or dropped (through gguf-py's reader and writer)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

VT = gguf.GGUFValueType


def _value(field: gguf.ReaderField) -> tuple[Any, VT, VT | None]:
    kind = field.types[0]
    sub = field.types[-1] if kind == VT.ARRAY else None
    return field.contents(), kind, sub


def rewritten(src: Path, dst: Path, set_keys: dict[str, tuple[Any, VT] | tuple[Any, VT, VT]] | None = None,
              drop_keys: tuple[str, ...] = ()) -> Path:
    """``src`` written to ``dst`` with ``set_keys`` ({key: (value, type[, item type])}) set and
    ``drop_keys`` left out; tensors are copied as they are."""
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    w = gguf.GGUFWriter(str(dst), arch)
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # written again below, possibly retyped
    keys = {name: _value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    keys.update({k: (v[0], v[1], v[2] if len(v) > 2 else None) for k, v in (set_keys or {}).items()})
    for key, (value, kind, sub) in keys.items():
        if key in drop_keys:
            continue
        w.add_key_value(key, value, kind, sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
