"""The ``%cascade`` line magic and ``%%cascade`` cell magic."""

from __future__ import annotations

import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand

HELP = """\
%%cascade [options]      generate images; the cell body is the prompt
%cascade plugins         list plugins: version, hooks, registered names, load errors
%cascade samplers        list samplers
%cascade schedulers      list schedulers
%cascade variants        list weight variants
%cascade help            this text"""


@magics_class
class CascadeMagics(Magics):
    """``%cascade`` subcommands and the ``%%cascade`` generation cell."""

    @no_var_expand
    @line_cell_magic
    def cascade(self, line: str, cell: str | None = None) -> Any:
        if cell is not None:
            raise UsageError("%%cascade generation is not available in this version; see %cascade help")
        words = shlex.split(line)
        command = words[0] if words else "help"
        from .. import listing

        if command == "help":
            print(HELP)
        elif command == "plugins":
            print(listing.plugins_text())
        elif command in ("samplers", "schedulers", "variants"):
            print(listing.kind_text(command[:-1]))
        else:
            raise UsageError(f"unknown %cascade command {command!r}; try: %cascade help")
        return None


def load_ipython_extension(ipython: Any) -> None:
    from ..plugins import load_plugins

    load_plugins()
    ipython.register_magics(CascadeMagics)


def unload_ipython_extension(ipython: Any) -> None:
    magics = ipython.magics_manager.magics
    for kind in ("line", "cell"):
        magics[kind].pop("cascade", None)
    ipython.magics_manager.registry.pop("CascadeMagics", None)
