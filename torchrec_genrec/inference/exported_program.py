"""Loads a ``torch.export`` archive as data: nothing in it is unpickled, imported or executed.

``torch.export.load`` is not safe for files from elsewhere: an archive whose entries do not
sit under one root directory falls back to the pre-2.8 format, which unpickles the state
dict with ``weights_only=False``; a pickled weight, constant, custom object or sample input
is unpickled; symbolic-shape expressions are parsed by ``sympy.sympify`` (which evaluates
Python); and the exported program's guard strings are compiled into Python by
``ExportedProgram.module()``. This loader reads the archive itself and hands torch's
deserializer only what it has checked:

- **Layout.** Every member sits under one root directory and is one of the files
  ``torch.export.save`` writes for a single program without sample inputs: the version
  records, ``models/model.json``, the weights and constants configs, raw tensor payloads
  (``weight_N``, ``tensor_N``) and an empty ``sample_inputs/model.pt``. Members are stored
  (not compressed) and named once. Anything else — the legacy layout, AOTInductor or extra
  files, a second program, a pickled state dict — is refused.
- **Payloads.** Weights and constants are raw tensors (``use_pickle`` false, no custom or
  opaque objects), built here from the bytes with the strides the config gives.
- **Program.** Every call target is an ATen operator (a small denylist removes the ones that
  touch files) or an arithmetic ``_operator``; every symbolic expression and guard is parsed
  with :mod:`ast` and may only construct sympy numbers and symbols or compare input sizes;
  no custom objects or sub-graphs. Node metadata (stack traces, module paths) is dropped
  before deserialising: the program does not need it to run.

Example::

    with open("artifacts/hstu_int8/encoder.pt2", "rb") as f:
        program = load_exported_program(f.read(), "artifacts/hstu_int8/encoder.pt2")
    encoder = program.module()
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from typing import Any, Dict, Iterator, List, Optional, Set

import torch

from torchrec_genrec.errors import ArtifactError

__all__ = ["DENIED_ATEN_OPS", "check_archive_layout", "check_program_json", "load_exported_program"]

#: ATen operators an artifact's program may not call: they read or write files.
DENIED_ATEN_OPS = frozenset({"from_file", "_print", "save", "load"})
#: Python operators a program may call (``_operator.<name>``): arithmetic and comparisons on sizes.
_ALLOWED_OPERATORS = frozenset({"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq",
                                "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_"})
#: The callables a symbolic expression may construct (sympy classes and torch's sympy functions).
_SYMPY_CALLS = frozenset({"Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
                          "FloorDiv", "CeilDiv", "CleanDiv", "ModularIndexing", "PythonMod", "IntTrueDiv",
                          "FloatTrueDiv", "TruncToInt", "CeilToInt", "FloorToInt", "RoundToInt", "Eq", "Ne", "Lt",
                          "Le", "Gt", "Ge", "And", "Or", "Not", "ToFloat", "Identity"})
_SYMPY_KEYWORDS = frozenset({"positive", "integer", "real", "nonnegative", "negative", "nonzero", "finite",
                             "evaluate"})
_SYMBOL_NAME = re.compile(r"[a-z]{1,3}[0-9]{1,9}\Z")
_PAYLOAD_NAME = {"weights": re.compile(r"weight_[0-9]{1,9}\Z"), "constants": re.compile(r"tensor_[0-9]{1,9}\Z")}
_ROOT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}\Z")
#: Members of the archive other than payloads: path below the root -> largest size in bytes.
_FIXED_MEMBERS = {
    ".data/version": 64, ".data/serialization_id": 128, "archive_format": 64, "archive_version": 64,
    "byteorder": 64, "models/model.json": 256 << 20, "data/weights/model_weights_config.json": 64 << 20,
    "data/constants/model_constants_config.json": 64 << 20, "data/sample_inputs/model.pt": 0,
}
_REQUIRED_MEMBERS = ("archive_format", "byteorder", "models/model.json", "data/weights/model_weights_config.json",
                     "data/constants/model_constants_config.json")
#: Node metadata that deserialising would parse and running does not need.
_DROPPED_METADATA = ("stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "custom", "from_node")


def _refuse(path: str, what: str) -> ArtifactError:
    return ArtifactError(f"{what}; refusing to load it (export the run again with `genrec export`)", path=path)


def check_archive_layout(archive: zipfile.ZipFile, path: str) -> str:
    """Checks that ``archive`` holds exactly one ``torch.export`` program in the current
    layout, every member stored once under one root; returns the root directory name.

    Raises:
        ArtifactError: naming the first member that does not belong.
    """
    infos = archive.infolist()
    if not infos:
        raise _refuse(path, "empty archive")
    roots = {info.filename.split("/", 1)[0] for info in infos}
    if len(roots) != 1 or any("/" not in info.filename for info in infos):
        raise _refuse(path, "members outside one root directory (the legacy torch.export layout, which "
                            "torch.export.load unpickles)")
    [root] = roots
    if not _ROOT_NAME.match(root) or root in (".", ".."):
        raise _refuse(path, f"root directory {root!r} is not a plain name")
    seen: Set[str] = set()
    for info in infos:
        name = info.filename
        if name in seen:
            raise _refuse(path, f"member {name!r} appears twice")
        seen.add(name)
        inner = name[len(root) + 1:]
        if info.compress_type != zipfile.ZIP_STORED:
            raise _refuse(path, f"member {name!r} is compressed (torch.export stores members as they are)")
        if inner in _FIXED_MEMBERS:
            if info.file_size > _FIXED_MEMBERS[inner]:
                raise _refuse(path, f"member {name!r} is {info.file_size} bytes, more than "
                                    f"{_FIXED_MEMBERS[inner]} (sample inputs must be empty)")
            continue
        kind, _, base = inner.rpartition("/")
        if kind == "data/weights" and _PAYLOAD_NAME["weights"].match(base):
            continue
        if kind == "data/constants" and _PAYLOAD_NAME["constants"].match(base):
            continue
        raise _refuse(path, f"unexpected member {name!r} (only one exported program with raw tensor payloads "
                            "is accepted: no pickled state dict, AOTInductor, extra files or second program)")
    for inner in _REQUIRED_MEMBERS:
        if f"{root}/{inner}" not in seen:
            raise _refuse(path, f"member {root}/{inner} is missing")
    return root


def _walk(node: Any) -> Iterator[Any]:
    stack = [node]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_sympy_expression(text: str, path: str) -> None:
    """``expr_str`` values are sympy ``srepr`` strings that ``sympify`` evaluates: allow only
    calls of sympy constructors on numbers and symbol names."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError) as e:
        raise _refuse(path, f"symbolic expression {text[:80]!r} does not parse ({type(e).__name__})") from e
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Load, ast.USub, ast.UnaryOp)):
            continue
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
                raise _refuse(path, f"symbolic expression {text[:80]!r} calls something other than sympy "
                                    "constructors")
            if any(k.arg not in _SYMPY_KEYWORDS for k in node.keywords):
                raise _refuse(path, f"symbolic expression {text[:80]!r} passes unknown keywords")
            continue
        if isinstance(node, ast.Name) and node.id in _SYMPY_CALLS:
            continue
        if isinstance(node, ast.keyword):
            continue
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or (isinstance(value, (int, float)) and abs(value) < 2 ** 63):
                continue
            if isinstance(value, str) and _SYMBOL_NAME.match(value):
                continue
        raise _refuse(path, f"symbolic expression {text[:80]!r} holds {type(node).__name__} "
                            f"{ast.unparse(node)[:40]!r}, which is not a sympy number or symbol")


def _check_guard(text: str, inputs: Set[str], path: str) -> None:
    """Guards are Python that ``ExportedProgram.module()`` compiles: allow only comparisons
    and arithmetic of integers and input sizes, ``L['<input>'].size()[<i>]``."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError) as e:
        raise _refuse(path, f"guard {text[:80]!r} does not parse ({type(e).__name__})") from e
    allowed_nodes = (ast.Expression, ast.Compare, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Load, ast.And, ast.Or,
                     ast.Not, ast.USub, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Eq, ast.NotEq,
                     ast.Lt, ast.LtE, ast.Gt, ast.GtE)
    sizes: Set[int] = set()  # ids of nodes inside an allowed size read
    for node in ast.walk(tree):
        if id(node) in sizes or isinstance(node, allowed_nodes):
            continue
        if isinstance(node, ast.Constant) and type(node.value) is int:
            continue
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call):
            call, index = node.value, node.slice
            func = call.func
            if (type(getattr(index, "value", None)) is int and not call.args and not call.keywords
                    and isinstance(func, ast.Attribute) and func.attr == "size"
                    and isinstance(func.value, ast.Subscript) and isinstance(func.value.value, ast.Name)
                    and func.value.value.id == "L" and isinstance(func.value.slice, ast.Constant)
                    and func.value.slice.value in inputs):
                sizes.update(id(n) for n in ast.walk(node) if n is not node)
                continue
        raise _refuse(path, f"guard {text[:80]!r} holds {type(node).__name__} {ast.unparse(node)[:40]!r}: "
                            "a guard may only compare input sizes and integers")


def _check_target(target: Any, path: str) -> None:
    if not isinstance(target, str):
        raise _refuse(path, f"call target {target!r} is not an operator name")
    parts = target.split(".")
    if len(parts) == 5 and parts[:3] == ["torch", "ops", "aten"] and all(p.isidentifier() for p in parts[3:]):
        if parts[3] in DENIED_ATEN_OPS:
            raise _refuse(path, f"the program calls {target}, which touches files")
        return
    if len(parts) == 2 and parts[0] == "_operator" and parts[1] in _ALLOWED_OPERATORS:
        return
    raise _refuse(path, f"the program calls {target!r}: only ATen operators and arithmetic are allowed")


def check_program_json(program: Dict[str, Any], path: str) -> None:
    """Checks a serialized program (``models/model.json``) before it is deserialised: call
    targets, symbolic expressions, guards, no custom objects or sub-graphs.

    Raises:
        ArtifactError: naming what is not allowed.
    """
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise _refuse(path, "models/model.json is not a serialized exported program")
    module = program["graph_module"]
    graph = module.get("graph")
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise _refuse(path, "the program has no graph")
    if graph.get("custom_obj_values"):
        raise _refuse(path, "the program holds custom objects")
    for node in graph["nodes"]:
        if not isinstance(node, dict):
            raise _refuse(path, "a graph node is not an object")
        _check_target(node.get("target"), path)
    inputs: Set[str] = set()
    for spec in module.get("module_call_graph") or []:
        if isinstance(spec, dict) and spec.get("fqn") == "":
            names = (spec.get("signature") or {}).get("forward_arg_names") or []
            inputs.update(n for n in names if isinstance(n, str) and n.isidentifier())
    guards = program.get("guards_code") or []
    if not isinstance(guards, list):
        raise _refuse(path, "guards_code is not a list")
    for guard in guards:
        if not isinstance(guard, str):
            raise _refuse(path, "a guard is not a string")
        _check_guard(guard, inputs, path)
    for key in program.get("range_constraints") or {}:
        if not _SYMBOL_NAME.match(str(key)):
            raise _refuse(path, f"range constraint on {key!r}, which is not a symbol name")
    for item in _walk(program):
        if isinstance(item, dict):
            if "expr_str" in item:
                if not isinstance(item["expr_str"], str):
                    raise _refuse(path, "a symbolic expression is not a string")
                _check_sympy_expression(item["expr_str"], path)
            for key in ("as_custom_obj", "as_graph", "custom_obj", "as_operator"):
                if item.get(key) is not None:
                    raise _refuse(path, f"the program holds {key} (custom objects and sub-graphs are not accepted)")


def _strip_metadata(program: Dict[str, Any]) -> None:
    graph_module = program["graph_module"]
    graph_module["metadata"] = {}
    for node in graph_module["graph"]["nodes"]:
        metadata = node.get("metadata") or {}
        node["metadata"] = {k: v for k, v in metadata.items() if k not in _DROPPED_METADATA}


def _read_json(archive: zipfile.ZipFile, name: str, path: str) -> Any:
    try:
        return json.loads(archive.read(name))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise _refuse(path, f"{name} is not valid JSON ({type(e).__name__})") from e


def _payloads(archive: zipfile.ZipFile, root: str, kind: str, path: str) -> Dict[str, torch.Tensor]:
    """``{fqn: tensor}`` from a weights / constants config and its raw payload members."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import (_dict_to_dataclass, deserialize_scalar_type, deserialize_size,
                                               deserialize_storage_offset, deserialize_stride)

    config_name = f"{root}/data/{kind}/model_{kind}_config.json"
    raw = _read_json(archive, config_name, path)
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        raise _refuse(path, f"{config_name} is not a payload config")
    for fqn, meta in raw["config"].items():
        if not isinstance(meta, dict) or meta.get("use_pickle") or not isinstance(meta.get("tensor_meta"), dict):
            raise _refuse(path, f"{kind[:-1]} {fqn!r} is pickled or not a tensor ({config_name})")
        if not _PAYLOAD_NAME[kind].match(str(meta.get("path_name", ""))):
            raise _refuse(path, f"{kind[:-1]} {fqn!r} names payload {meta.get('path_name')!r}, not a raw tensor "
                                f"({config_name})")
    try:
        config = _dict_to_dataclass(schema.PayloadConfig, raw)
    except Exception as e:  # noqa: BLE001 - any schema mismatch is a corrupt archive
        raise _refuse(path, f"{config_name} does not fit torch's payload schema ({type(e).__name__}: {e})") from e
    flat: Dict[str, torch.Tensor] = {}
    tensors: Dict[str, torch.Tensor] = {}
    for fqn, meta in config.config.items():
        tensor_meta = meta.tensor_meta
        try:
            dtype = deserialize_scalar_type(tensor_meta.dtype)
            if meta.path_name not in flat:
                member = f"{root}/data/{kind}/{meta.path_name}"
                try:
                    data = bytearray(archive.read(member))
                except KeyError as e:
                    raise _refuse(path, f"{kind[:-1]} {fqn!r}: payload {member} is missing") from e
                element = torch.empty((), dtype=dtype).element_size()
                if len(data) % element:
                    raise _refuse(path, f"payload {member} is {len(data)} bytes, not a multiple of {dtype}'s "
                                        f"{element}")
                flat[meta.path_name] = (torch.frombuffer(data, dtype=dtype) if data
                                        else torch.empty(0, dtype=dtype))
            tensor = torch.as_strided(flat[meta.path_name], deserialize_size(tensor_meta.sizes),
                                      deserialize_stride(tensor_meta.strides),
                                      deserialize_storage_offset(tensor_meta.storage_offset))
        except ArtifactError:
            raise
        except Exception as e:  # noqa: BLE001 - out-of-bounds strides, unknown dtypes, symbolic sizes
            raise _refuse(path, f"{kind[:-1]} {fqn!r} does not fit its payload ({type(e).__name__}: {e})") from e
        if kind == "weights" and meta.is_param:
            tensor = torch.nn.Parameter(tensor, requires_grad=bool(tensor_meta.requires_grad))
        tensors[fqn] = tensor
    return tensors


def load_exported_program(data: bytes, path: str) -> "torch.export.ExportedProgram":
    """An ``ExportedProgram`` from the bytes of a ``torch.export.save`` archive, loaded
    without unpickling or running anything from it (see the module docstring).

    Args:
        data (bytes): the archive (read once by the caller, which checked its sha256).
        path (str): the file it came from, for messages.

    Returns:
        torch.export.ExportedProgram: the program; ``.module()`` runs it.

    Raises:
        ArtifactError: a layout, payload or program this loader does not accept, naming it.
    """
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as e:
        raise _refuse(path, f"not a torch.export archive ({e})") from e
    with archive:
        root = check_archive_layout(archive, path)
        if archive.read(f"{root}/archive_format").strip() != b"pt2":
            raise _refuse(path, "archive_format is not pt2")
        program = _read_json(archive, f"{root}/models/model.json", path)
        check_program_json(program, path)
        _strip_metadata(program)
        state_dict = _payloads(archive, root, "weights", path)
        constants = _payloads(archive, root, "constants", path)
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, program)
        # b"": no sample inputs (the layout check allows only an empty member), so nothing is unpickled.
        return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, b"")
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - a program torch cannot rebuild is an unusable artifact
        raise _refuse(path, f"the program does not deserialise ({type(e).__name__}: {e})") from e


def _program_targets(program: Dict[str, Any]) -> List[Optional[str]]:
    """The call targets of a serialized program (for tests and diagnostics)."""
    return [n.get("target") for n in program["graph_module"]["graph"]["nodes"]]
