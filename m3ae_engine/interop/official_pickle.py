"""Official M3AE checkpoints (young-geng/m3ae_public) read and written without JAX, flax or optax.

`m3ae_main.py` saves `cloudpickle.dump({'step', 'epoch', 'variant', 'state'})`: `state` is the whole
`M3AETrainState` (a flax struct dataclass: `step`, `apply_fn`, `params` = {'params': tree}, `tx`, `opt_state`,
`tokenizer_params`). `tx` is an optax chain whose inner functions cloudpickle stores *by value* (code
objects, closures, `subimport('jax.numpy')` for their globals), `opt_state` holds optax NamedTuples.

Reading: `SafeUnpickler` constructs only numpy arrays / dtypes / scalars and builtin containers. Every other
global the pickle names (a class, a function, `cloudpickle._make_function`, `_builtin_type`, `subimport`,
`os.system`, ...) becomes an `Inert` stand-in class: calling it, calling the result, setting its state or
adding items to it only records the arguments. No module is imported and no code from the file runs. Only
the parameter tree (`state.params['params']`) is then turned into plain dicts of numpy arrays
(`materialise_tree`); the rest is only described (`describe`).

Writing (`write_official_pickle`): what the official `utils.load_checkpoint` and `finetune_main.py` /
`linear_main.py --load_pretrained` read -- `data['step']`, then `data['state'].params['params']` -- with a
`types.SimpleNamespace` as the state, so loading it needs nothing beyond the standard library and numpy.
"""
from __future__ import annotations

import _compat_pickle
import collections
import pickle
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..storage.atomic import atomic_write


class OfficialCheckpointError(ValueError):
    """The file is not an official M3AE checkpoint this reader understands (message says why)."""


# ---------------------------------------------------------------------------------------------
# inert stand-ins
# ---------------------------------------------------------------------------------------------
class Inert:
    """Stand-in for a global of the pickle that we do not trust (class, function, constructor helper).

    Each global gets its own subclass (`qualname` = "module.name"). The unpickler may instantiate it
    (REDUCE / NEWOBJ / copyreg._reconstructor), call an instance (cloudpickle calls
    `_builtin_type('CodeType')(...)`), set its state (BUILD) or append / set items on it: all of that is
    recorded, nothing is executed."""
    qualname = "?"
    args: tuple = ()  # class-level defaults: copyreg._reconstructor makes instances without __new__'s args
    kwargs: dict = {}
    state = None

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs = args, kwargs
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):  # e.g. `_builtin_type('CodeType')` called with the code's fields
        return inert_class(self.qualname + "(...)")(*args, **kwargs)

    def __setstate__(self, state):  # BUILD
        self.state = state

    @property
    def items(self) -> list:
        return self.__dict__.setdefault("_items", [])

    def __setitem__(self, key, value):  # SETITEM(S)
        self.items.append((key, value))

    def append(self, value):  # APPEND(S)
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self):
        return f"<inert {self.qualname}>"


def inert_class(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (Inert,), {"qualname": qualname})


def _latin1_encode(text, encoding="latin1"):
    """`codecs.encode` as protocol-2 pickles use it for bytes; other codecs are refused."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


# numpy array, dtype and scalar constructors (numpy 1.x `numpy.core`, numpy 2.x `numpy._core`)
_NUMPY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("multiarray", "_reconstruct"),
                  ("multiarray", "scalar"), ("numeric", "_frombuffer")}
_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
             "bytearray", "bool", "slice", "range", "object"}
_SAFE_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict,
                 ("types", "SimpleNamespace"): types.SimpleNamespace,
                 ("copyreg", "_reconstructor"): __import__("copyreg")._reconstructor,
                 ("codecs", "encode"): _latin1_encode, ("_codecs", "encode"): _latin1_encode}


def _numpy_global(module: str, name: str):
    parts = module.split(".")
    if parts[0] != "numpy":
        return None
    if (module, name) in _NUMPY_GLOBALS:
        return getattr(np, name)
    if len(parts) == 3 and parts[1] in ("core", "_core") and (parts[2], name) in _NUMPY_GLOBALS:
        import importlib
        for core in ("_core", "core"):  # a numpy-2 pickle on numpy 1.x and the other way round
            try:
                return getattr(importlib.import_module(f"numpy.{core}.{parts[2]}"), name)
            except (ImportError, AttributeError):
                continue
    return None


class SafeUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self._inert: Dict[str, type] = {}  # one stand-in class per global name, per file

    def find_class(self, module, name):
        # protocol 0-2 pickles name Python 2 modules (copy_reg, __builtin__): map them as pickle does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        fn = _numpy_global(module, name)
        if fn is not None:
            return fn
        if module == "builtins" and name in _BUILTINS:
            return super().find_class(module, name)
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        qualname = f"{module}.{name}"
        if qualname not in self._inert:
            self._inert[qualname] = inert_class(qualname)
        return self._inert[qualname]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not supported")


def safe_load(path) -> object:
    """Unpickle `path` with stand-ins for everything but numpy arrays and builtin containers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        try:
            return SafeUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError,
                KeyError, MemoryError, OverflowError, RecursionError, UnicodeDecodeError) as e:
            raise OfficialCheckpointError(f"{path} is not a readable pickle: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------
# navigating what was loaded
# ---------------------------------------------------------------------------------------------
def fields_of(obj) -> Optional[dict]:
    """The named fields of a loaded object: a dict itself; a dataclass / TrainState stand-in's BUILD state
    (`__dict__`, or `(dict, slots)`); a SimpleNamespace's attributes; a NamedTuple-like stand-in has none."""
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, types.SimpleNamespace):
        return vars(obj)
    if isinstance(obj, Inert):
        state = obj.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict state, slots state)
        if isinstance(state, dict):
            return state
        if obj.kwargs:
            return obj.kwargs
    return None


def _unwrap_mapping(obj) -> Optional[dict]:
    """A flax FrozenDict stand-in -> its dict (`FrozenDict.__reduce__` is `(FrozenDict, (dict,))`; older
    versions keep it in the `_dict` field)."""
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, Inert):
        if len(obj.args) == 1 and isinstance(obj.args[0], dict):
            return obj.args[0]
        f = fields_of(obj)
        if f is not None and isinstance(f.get("_dict"), dict):
            return f["_dict"]
    return None


def materialise_tree(node, where: str = "params") -> dict:
    """Nested dicts (or FrozenDicts) of float numpy arrays -> plain nested dicts of numpy arrays.
    Anything else in the tree is an error naming its path."""
    d = _unwrap_mapping(node)
    if d is None:
        raise OfficialCheckpointError(f"{where} is {_kind(node)}, not a dict of arrays")
    out = {}
    for k, v in d.items():
        path = f"{where}/{k}"
        if _unwrap_mapping(v) is not None:
            out[str(k)] = materialise_tree(v, path)
        elif isinstance(v, (np.ndarray, np.generic)) and v.dtype.kind == "f":
            out[str(k)] = np.asarray(v)
        else:
            raise OfficialCheckpointError(f"{path} is {_kind(v)}, not a float array (jax arrays must be "
                                          f"saved with jax.device_get, as m3ae_main.py does)")
    return out


def _kind(x) -> str:
    if isinstance(x, Inert):
        return f"a stand-in for {x.qualname}"
    if isinstance(x, np.ndarray):
        return f"an array of dtype {x.dtype}"
    return f"a {type(x).__name__}"


def _is_param_tree(node) -> bool:
    d = _unwrap_mapping(node)
    return d is not None and any(k in d for k in ("encoder", "image_embedding", "text_embedding"))


def _as_int(x) -> Optional[int]:
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return int(x)
    if isinstance(x, np.ndarray) and x.shape == () and x.dtype.kind in "iu":
        return int(x)
    return None


# ---------------------------------------------------------------------------------------------
# the checkpoint
# ---------------------------------------------------------------------------------------------
@dataclass
class OfficialCheckpoint:
    path: Path
    params: dict  # the Flax parameter tree: nested dicts of numpy arrays
    params_at: str  # where it was found, e.g. "state.params['params']"
    step: Optional[int] = None
    epoch: Optional[int] = None
    variant: Optional[dict] = None  # the official flags flattened by get_user_flags ('m3ae.emb_dim', ...)
    other: List[str] = field(default_factory=list)  # one line per entry left unmaterialised


def read_official_checkpoint(path) -> OfficialCheckpoint:
    """An official pickle (or a bare parameter tree) -> OfficialCheckpoint, running no code from it."""
    path = Path(path)
    top = safe_load(path)
    top_fields = fields_of(top)
    candidates = [("state.params['params']", ("state", "params", "params")), ("state.params", ("state", "params")),
                  ("params['params']", ("params", "params")), ("params", ("params",)), ("the top level", ())]
    for where, keys in candidates:
        node = top
        for k in keys:
            f = _unwrap_mapping(node)
            f = f if f is not None else fields_of(node)
            node = f.get(k) if f is not None else None
        if _is_param_tree(node):
            break
    else:
        shown = sorted(map(str, top_fields)) if top_fields is not None else _kind(top)
        raise OfficialCheckpointError(f"{path}: no official M3AE parameter tree (looked for state.params['params'] "
                                      f"holding 'encoder' / 'image_embedding'); the top level holds {shown}")
    try:
        ckpt = OfficialCheckpoint(path, materialise_tree(node, where), where)
    except RecursionError as e:
        raise OfficialCheckpointError(f"{path}: the parameter tree nests too deeply") from e
    if top_fields is not None and keys:
        ckpt.step, ckpt.epoch = _as_int(top_fields.get("step")), _as_int(top_fields.get("epoch"))
        variant = top_fields.get("variant")
        if variant is not None:
            if not isinstance(variant, dict):
                raise OfficialCheckpointError(f"{path}: 'variant' is {_kind(variant)}, not the dict of flags "
                                              f"m3ae_main.py writes")
            ckpt.variant = {str(k): v for k, v in variant.items()}
        ckpt.other = describe_rest(top_fields)
    return ckpt


def describe_rest(top_fields: dict) -> List[str]:
    """One line per checkpoint entry that conversion leaves alone (optimizer state, optax functions, ...)."""
    lines = []
    for key, value in top_fields.items():
        if key in ("step", "epoch", "variant"):
            continue
        sub = fields_of(value) if key == "state" else None
        if sub is None:
            lines.append(f"{key}: {summarise(value)}")
            continue
        lines.append(f"{key}: {_kind(value) if isinstance(value, Inert) else type(value).__name__} with fields "
                     f"{', '.join(map(str, sub))}")
        for k, v in sub.items():
            if k != "params":
                lines.append(f"{key}.{k}: {summarise(v)}")
    return lines


def summarise(obj, limit: int = 200_000) -> str:
    """'N arrays (M values), K stand-ins (the most frequent names)' for any loaded object graph."""
    if isinstance(obj, np.ndarray) and obj.size <= 4 and obj.dtype.kind in "biuf":
        return f"array {obj.tolist()} ({obj.dtype})"
    n_arrays = n_values = 0
    names: collections.Counter = collections.Counter()
    seen, stack = set(), [obj]
    while stack and len(seen) < limit:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, np.ndarray):
            n_arrays += 1
            n_values += x.size if x.dtype.kind != "O" else 0
            if x.dtype.kind == "O":
                stack.extend(x.ravel().tolist())
        elif isinstance(x, Inert):
            names[x.qualname] += 1
            stack.extend([*x.args, *x.kwargs.values(), x.state, *x.items])
        elif isinstance(x, type) and issubclass(x, Inert):  # a global named but never called
            names[x.qualname] += 1
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, types.SimpleNamespace):
            stack.extend(vars(x).values())
    if not n_arrays and not names:
        text = repr(obj)
        return text if len(text) <= 80 else text[:77] + "..."
    parts = [f"{n_arrays} array{'s' * (n_arrays > 1)} ({n_values:,} values)"] if n_arrays else []
    if names:
        top = ", ".join(f"{q} x{c}" if c > 1 else q for q, c in names.most_common(3))
        parts.append(f"{sum(names.values())} inert stand-ins ({top}{', ...' if len(names) > 3 else ''})")
    head = f"{obj.qualname} holding " if isinstance(obj, Inert) else ""
    return head + ", ".join(parts) + " -- not loaded into the model, nothing run"


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def write_official_pickle(path, params: dict, variant: dict, step: int = 0, epoch: int = 0) -> Path:
    """{'step', 'epoch', 'variant', 'state'} with `state.params == {'params': params}` and `state.step`, the
    fields the official `utils.load_checkpoint` and `--load_pretrained` read. No optimizer state: official
    training cannot resume from it (m3ae_main.py --load_checkpoint needs the whole M3AETrainState).
    Written to a temporary file, fsync'ed and renamed over `path`."""
    data = {"step": int(step), "epoch": int(epoch), "variant": dict(variant),
            "state": types.SimpleNamespace(step=np.asarray(step, np.int32), params={"params": params},
                                           opt_state=None, tokenizer_params=None)}

    def write(tmp):
        with open(tmp, "wb") as f:
            pickle.dump(data, f, protocol=4)
    return atomic_write(path, write)
