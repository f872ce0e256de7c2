"""Reader arguments in error messages, spelled the way the caller writes them.

When another value of a reader argument would fix bad input (another ``delimiter``, a
``user_col`` that names the right column), the reader raises :class:`ReaderArgumentError`.
Its message names those arguments as :class:`Arg` parts rather than as text, so that one
error reads right for every caller: ``str(error)`` spells them as Python keyword arguments
(``delimiter='\\t'``), and a front end with its own names for them, such as the ``genrec``
command line (``--delimiter $'\\t'``), renders the same message with its own
:class:`ArgumentSpelling`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from torchrec_genrec.data.errors import DataError

__all__ = ["Arg", "ArgumentSpelling", "MessagePart", "PYTHON_SPELLING", "ReaderArgumentError", "Settings"]


class _NoValue:
    def __repr__(self) -> str:
        return "NO_VALUE"


#: The value of an :class:`Arg` that names a parameter without suggesting a value.
NO_VALUE: Any = _NoValue()


@dataclasses.dataclass(frozen=True)
class Arg:
    """A reader argument that a message names.

    Args:
        name (str): the reader's parameter, e.g. ``"delimiter"``.
        value (Any): the value to pass; :data:`NO_VALUE` names the parameter alone.

    Example::

        Arg("delimiter", "\\t")  # Python: delimiter='\\t'      CLI: --delimiter $'\\t'
        Arg("user_col")          # Python: user_col            CLI: --user-col
    """

    name: str
    value: Any = NO_VALUE


@dataclasses.dataclass(frozen=True)
class Settings:
    """Several arguments suggested together, e.g. ``user_col='uid', item_col='sku'``.

    Args:
        args (Tuple[Arg, ...]): the arguments, each with its value.
    """

    args: Tuple[Arg, ...]


#: One piece of a message: text, an argument, or a group of arguments.
MessagePart = Union[str, Arg, Settings]


@dataclasses.dataclass(frozen=True)
class ArgumentSpelling:
    """How a caller writes reader arguments.

    Args:
        name (Callable[[str], str]): a parameter named alone, e.g. ``"user_col"`` ->
            ``"--user-col"``.
        setting (Callable[[str, Any], str]): a parameter with a value, e.g.
            ``("user_col", "uid")`` -> ``"--user-col uid"``.
        separator (str): between the settings of one :class:`Settings`.

    Example::

        flags = {"delimiter": "--delimiter"}
        cli = ArgumentSpelling(name=flags.__getitem__,
                               setting=lambda name, value: f"{flags[name]} {value}",
                               separator=" ")
        cli.render(["pass ", Arg("delimiter", ";")])  # 'pass --delimiter ;'
    """

    name: Callable[[str], str]
    setting: Callable[[str, Any], str]
    separator: str = ", "

    def spell(self, arg: Arg) -> str:
        return self.name(arg.name) if arg.value is NO_VALUE else self.setting(arg.name, arg.value)

    def render(self, parts: Sequence[MessagePart]) -> str:
        """The message text with every argument in this spelling."""
        out: List[str] = []
        for part in parts:
            if isinstance(part, Arg):
                out.append(self.spell(part))
            elif isinstance(part, Settings):
                out.append(self.separator.join(self.spell(a) for a in part.args))
            else:
                out.append(part)
        return "".join(out)


#: Arguments as a Python caller writes them: ``user_col``, ``delimiter='\\t'``.
PYTHON_SPELLING = ArgumentSpelling(name=lambda name: name, setting=lambda name, value: f"{name}={value!r}")


class ReaderArgumentError(DataError):
    """Bad input that another value of a reader argument would fix.

    ``str()`` spells the arguments for a Python caller; :meth:`render` spells them for
    another front end. ``path`` and ``line`` locate the problem as in :class:`DataError`.

    Args:
        parts (Sequence[MessagePart]): the message: text and the arguments it names.
        path (Optional[str]): the file the problem is in.
        line (Optional[int]): 1-based line number in ``path``, where one applies.

    Example::

        try:
            read_interactions("log.csv")  # a tab-separated file
        except ReaderArgumentError as e:
            str(e)  # "log.csv:1: found a single column ... (pass delimiter='\\t')"
            e.render(cli_spelling)  # "found a single column ... (pass --delimiter $'\\t')"
    """

    def __init__(self, parts: Sequence[MessagePart], path: Optional[str] = None, line: Optional[int] = None) -> None:
        self.parts: Tuple[MessagePart, ...] = tuple(parts)
        super().__init__(PYTHON_SPELLING.render(self.parts), path=path, line=line)

    def __reduce__(self):  # the parts, not the rendered text, rebuild the error
        return type(self), (self.parts, self.path, self.line)

    @property
    def arguments(self) -> List[Arg]:
        """Every argument the message names, in order."""
        out: List[Arg] = []
        for part in self.parts:
            if isinstance(part, Arg):
                out.append(part)
            elif isinstance(part, Settings):
                out.extend(part.args)
        return out

    def render(self, spelling: ArgumentSpelling) -> str:
        """The message in ``spelling``, without the ``path:line:`` prefix."""
        return spelling.render(self.parts)


def error_from_parts(parts: Sequence[MessagePart], path: Optional[str] = None,
                     line: Optional[int] = None) -> DataError:
    """A :class:`ReaderArgumentError` if ``parts`` name an argument, else a plain :class:`DataError`."""
    if any(isinstance(p, (Arg, Settings)) for p in parts):
        return ReaderArgumentError(parts, path=path, line=line)
    return DataError("".join(p for p in parts if isinstance(p, str)), path=path, line=line)
