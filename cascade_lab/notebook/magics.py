"""The ``%cascade`` line magic (listings, defaults, panels, inspector, training, cancel) and the ``%%cascade``
cell magic (the cell body is the prompt). Both drive the kernel's shared `Session`; loading them imports no torch."""

from __future__ import annotations

import importlib
import re
import shlex
import sys
import warnings
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import MagicArgumentParser
from traitlets import Bool, Float, Int, TraitError, Unicode, observe

from .options import NEGATIVE_SEPARATOR, NEXT_SEPARATOR, PARSER, parse_cell, parse_size, size_table
from .session import Defaults, JobRunning, LoraUnavailable, free_memory, get_session

HELP = f"""\
%%cascade [options]      generate images; the cell body is the prompt, taken verbatim
%cascade plugins         list plugins: version, hooks, registered names, load errors
%cascade samplers        list samplers by family (official, comfyui, plugins')
%cascade schedulers      list schedulers by family
%cascade variants        list weight variants: memory needed, files present on this machine
%cascade config [k=v..]  show or set the defaults (also %config CascadeMagics.default_variant = "lite_bf16")
%cascade panel           open the generation panel (ipywidgets)
%cascade panel train [CONFIG]
                         open the training panel (its form filled from a training TOML when given)
%cascade train CONFIG [--set KEY=VALUE ...] [--background] [-o NAME]
                         fine-tune Stage C (or B) as the training TOML says (--set overrides its fields), printing
                         progress; the run (a TrainingRun: losses, samples, output_file) is stored as
                         _cascade_train_run, and as NAME with -o. --background returns at once (run.wait()).
                         Ctrl-C or %cascade cancel ends it after the current step with a resumable checkpoint
                         (--set resume=auto continues it). No generation runs while a training does.
%cascade comfyui run FILE [--set NODE.INPUT=VALUE ...] [--models DIR] [-o DIR]
                         run a ComfyUI workflow (.json or ComfyUI PNG), show each Save/Preview node's image
%cascade inspect [NAME]  open the latent inspector on a Result (default: the last one)
%cascade cancel          stop the running job before its next step (a training: after it, with a checkpoint)
%cascade unload          drop the loaded models and free their memory
%cascade help            this text

The prompt: the cell body, byte for byte ({{braces}}, $dollars, quotes, any language, several lines);
only the line break IPython ends every cell with is dropped. Add --expand to fill in {{name}}, ${{name}}
or $name from notebook variables (plain names only, nothing is evaluated; $$ {{{{ }}}} stay literal).
A long negative prompt goes in the body too, after a line that reads exactly:
    {NEGATIVE_SEPARATOR}
A batch of different prompts, one image each: separate them with lines that read exactly
    {NEXT_SEPARATOR}
(after the negative line too, for one negative prompt per image).

Coming from ComfyUI: --compat comfyui gives ComfyUI's image for ComfyUI's seed and settings (its seeding,
latent sizes, CFG, and its 44 samplers / 9 schedulers under their own names, euler_ancestral + simple unless
given); --seed-b is the second KSampler's seed, --denoise its partial schedule. See docs/comfyui.md.
Stop a job with the kernel's interrupt (or %cascade cancel): it stops between two steps, keeps the last
preview and frees memory; the session is ready for the next job.

Named sizes (multiples of 128 around 1024² pixels; any ratio W:H works, e.g. --size 4:5):
{size_table()}

Use %%cascade without %load_ext, in a notebook:
    %config MagicsManager.lazy_magics = {{"cascade": "cascade_lab"}}
or for every session, in ~/.ipython/profile_default/ipython_config.py:
    c.MagicsManager.lazy_magics = {{"cascade": "cascade_lab"}}"""

# trait on CascadeMagics → field of session.Defaults ("default_size" is width and height together)
TRAIT_FIELDS = {"default_variant": "variant", "default_device": "device", "default_dtype": "dtype",
                "default_steps_c": "steps_c", "default_steps_b": "steps_b", "default_cfg_c": "cfg_c",
                "default_cfg_b": "cfg_b", "default_sampler": "sampler", "default_scheduler": "scheduler",
                "preview": "preview", "preview_interval": "preview_interval", "keep_trajectory": "keep_trajectory"}
_D = Defaults()
TRAIN_RUN = "_cascade_train_run"  # where %cascade train always leaves its run in the notebook

TRAIN_PARSER = MagicArgumentParser(prog="%cascade train",
                                   description="Fine-tune Stage C (or Stage B: stage = 'b') from a training TOML.")
TRAIN_PARSER.allow_abbrev = False
TRAIN_PARSER.add_argument("config", help="a TOML file of TrainConfig fields (plus optional dataset tables)")
TRAIN_PARSER.add_argument("--set", dest="changes", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                          help="override a field, e.g. --set max_train_steps=100 learning_rate=5e-5")
TRAIN_PARSER.add_argument("--background", action="store_true", help="return at once; the run goes on in a thread")
TRAIN_PARSER.add_argument("-o", "--out", metavar="NAME", help=f"also store the run as NAME (always: {TRAIN_RUN})")


@magics_class
class CascadeMagics(Magics):
    """``%cascade`` subcommands and the ``%%cascade`` generation cell. The traits are the session defaults."""

    default_variant = Unicode(_D.variant, help="weight variant: auto, full, bf16, lite, lite_bf16, ...").tag(
        config=True)
    default_device = Unicode(_D.device, allow_none=True, help="cpu, cuda, ... (None: cuda when available)").tag(
        config=True)
    default_dtype = Unicode(_D.dtype, allow_none=True, help="float32 or bfloat16 (None: the device's best)").tag(
        config=True)
    default_size = Unicode(f"{_D.width}x{_D.height}", help="WIDTHxHEIGHT, a ratio (16:9) or a name").tag(config=True)
    default_steps_c = Int(_D.steps_c, help="Stage C steps").tag(config=True)
    default_steps_b = Int(_D.steps_b, help="Stage B steps").tag(config=True)
    default_cfg_c = Float(_D.cfg_c, help="Stage C classifier-free guidance").tag(config=True)
    default_cfg_b = Float(_D.cfg_b, help="Stage B classifier-free guidance").tag(config=True)
    default_sampler = Unicode(_D.sampler, help="sampler of both stages").tag(config=True)
    default_scheduler = Unicode(_D.scheduler, help="scheduler of both stages").tag(config=True)
    preview = Bool(_D.preview, help="live Stage C preview while a job runs").tag(config=True)
    preview_interval = Float(_D.preview_interval, help="seconds between preview updates").tag(config=True)
    keep_trajectory = Bool(_D.keep_trajectory, help="keep every step's latent (latent inspector)").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        self._syncing, self._constructing = False, True
        super().__init__(shell=shell, **kwargs)  # configured traits reach the session through _to_session
        self._constructing = False
        self._from_session()

    # -- defaults: traits <-> session ------------------------------------------------------------------
    @observe(*TRAIT_FIELDS, "default_size")
    def _to_session(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        name, value = change["name"], change["new"]
        try:
            if name == "default_size":
                width, height = parse_size(value)
                get_session().configure(width=width, height=height)
            else:
                get_session().configure(**{TRAIT_FIELDS[name]: value})
        except ValueError as exc:
            if self._constructing:  # a bad ipython_config.py value must not break %load_ext
                warnings.warn(f"CascadeMagics.{name}: {exc}; keeping the current default", stacklevel=2)
                return
            self._from_session()  # put the trait back to the value in force
            raise TraitError(f"CascadeMagics.{name}: {exc}") from None

    def _from_session(self) -> None:
        d = get_session().defaults
        self._syncing = True
        try:
            for trait, field in TRAIT_FIELDS.items():
                setattr(self, trait, getattr(d, field))
            self.default_size = f"{d.width}x{d.height}"
        finally:
            self._syncing = False

    @no_var_expand
    @line_cell_magic
    def cascade(self, line: str, cell: str | None = None) -> Any:
        self._from_session()  # a panel may have changed the defaults since: keep the traits current
        if cell is not None:
            return self._generate(line, cell)
        return self._command(line)

    cascade.__doc__ = f"%cascade SUBCOMMAND | %%cascade [options] + prompt\n\n{HELP}\n\n{PARSER.format_help()}"

    # -- %cascade ----------------------------------------------------------------------------------------
    def _command(self, line: str) -> Any:
        """Run a ``%cascade`` subcommand; panels and the inspector are returned (shown as the cell's value, and
        ``p = %cascade panel`` keeps one to drive from code)."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%cascade: {exc}") from None
        if words and words[0].split("=")[0] == "--from":  # %cascade --from FILE.png [options]: no body needed
            return self._generate(line, "")
        command, args = (words[0], words[1:]) if words else ("help", [])
        from .. import listing

        if command == "help":
            print(HELP + "\n\n" + PARSER.format_help())
        elif command == "plugins":
            print(listing.plugins_text())
        elif command in ("samplers", "schedulers"):
            print(listing.kind_text(command[:-1]))
        elif command == "variants":
            print(variants_text())
        elif command == "config":
            self._config(args)
        elif command == "panel":
            return self._panel(args)
        elif command == "train":
            self._train(args)
        elif command == "inspect":
            return self._inspector(args)
        elif command == "comfyui":
            from ..comfyui.magic import comfyui_command

            comfyui_command(self.shell, args)
        elif command == "cancel":
            training = get_session().training is not None
            if not get_session().cancel():
                print("no cascade_lab job is running")
            else:
                print("stop requested: the training ends after its current step and saves a resumable checkpoint"
                      if training else "cancel requested: the job stops before its next step")
        elif command == "unload":
            try:
                get_session().unload()
            except JobRunning as exc:
                raise UsageError(str(exc)) from None
            print("models unloaded, memory freed")
        else:
            raise UsageError(f"unknown %cascade command {command!r}; try: %cascade help")
        return None

    def _config(self, args: list[str]) -> None:
        session = get_session()
        changes: dict[str, Any] = {}
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep:
                raise UsageError(f"%cascade config {arg!r}: write KEY=VALUE, e.g. variant=lite_bf16")
            if key == "size":
                try:
                    changes["width"], changes["height"] = parse_size(value)
                except ValueError as exc:
                    raise UsageError(f"%cascade config size: {exc}") from None
            else:
                changes[key] = value
        if changes:
            try:
                session.configure(**changes)
            except ValueError as exc:
                raise UsageError(f"%cascade config: {exc}") from None
            self._from_session()
            return
        d = session.defaults
        rows = {"size": f"{d.width}x{d.height}"} | {f: getattr(d, f) for f in TRAIT_FIELDS.values()}
        print("\n".join(f"{k:<17}= {v}" for k, v in rows.items()))
        print("set with: %cascade config KEY=VALUE ...  or  %config CascadeMagics.default_KEY = VALUE")

    def _panel(self, args: list[str]) -> Any:
        if not args:
            return _widget("panel", "GenerationPanel")()
        if args[0] != "train" or len(args) > 2:
            raise UsageError("use %cascade panel (generation) or %cascade panel train [CONFIG] (training)")
        try:
            return _widget("train_panel", "TrainingPanel")(*args[1:])
        except (ValueError, FileNotFoundError) as exc:  # ConfigError is a ValueError
            raise UsageError(f"%cascade panel train: {exc}") from None

    def _train(self, args: list[str]) -> None:
        """``%cascade train``: a `Session.train` job; the foreground waits, printing the command line's progress."""
        from ..training import TrainConfig
        from ..training.cli_entry import print_progress  # the same progress lines as `cascade-lab train`
        from ..training.config import parse_value

        assert self.shell is not None
        opts = TRAIN_PARSER.parse_args(args)
        changes: dict[str, Any] = {}
        for item in opts.changes:
            key, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"%cascade train --set {item!r}: write KEY=VALUE, e.g. --set max_train_steps=100")
            changes[key.strip()] = parse_value(value.strip())
        session = get_session()
        try:
            config = TrainConfig.coerce(opts.config, **changes)
            # background: no progress lines, they would land in whichever cell runs next
            run = session.train(config, callback=None if opts.background else print_progress, background=True)
        except (ValueError, FileNotFoundError, JobRunning) as exc:  # ConfigError is a ValueError
            raise UsageError(f"%cascade train: {exc}") from None
        names = [TRAIN_RUN] + ([opts.out] if opts.out else [])
        for name in names:
            self.shell.user_ns[name] = run
        where = " and ".join(names)
        if opts.background:
            c = config
            length = f"{c.max_train_epochs} epochs" if c.max_train_epochs else f"{c.max_train_steps} steps"
            print(f"training {config.name!r} in the background ({config.mode}, {length}, "
                  f"into {config.output_dir}); the run is {where}: {names[-1]}.wait() blocks until it ends, "
                  "%cascade cancel ends it after the current step with a checkpoint")
            return
        try:
            session.wait_training()
        except KeyboardInterrupt:
            print("stopping after this step and saving a checkpoint (Ctrl-C again stops waiting; the run still "
                  "stops)", flush=True)
            run.stop()
            session.wait_training()
        print(f"{run.status}: step {run.step}/{run.total_steps}; model {run.output_file}; checkpoint "
              f"{run.last_checkpoint}; the run is {where}")
        if run.status == "error":
            if run.step == 0 and isinstance(run.error, (ValueError, FileNotFoundError)):
                raise UsageError(f"%cascade train: {run.error}") from None  # the data or a file, not a bug
            raise run.error
        if run.status == "nan":
            raise UsageError(f"%cascade train: {run.error}")

    def _inspector(self, args: list[str]) -> Any:
        if len(args) > 1:
            raise UsageError("%cascade inspect takes one variable name (a Result), or none for the last result")
        if args:
            assert self.shell is not None
            if args[0] not in self.shell.user_ns:
                raise UsageError(f"%cascade inspect: {args[0]!r} is not defined in the notebook")
            result = self.shell.user_ns[args[0]]
        else:
            result = get_session().last_result
            if result is None:
                raise UsageError("%cascade inspect: no result yet; run a %%cascade cell (or name a Result)")
        if not hasattr(result, "latent_c"):
            raise UsageError(f"%cascade inspect: {args[0]!r} is a {type(result).__name__}, not a cascade_lab Result")
        return _widget("inspector", "LatentInspector")(result)

    # -- %%cascade ---------------------------------------------------------------------------------------
    def _generate(self, line: str, cell: str) -> None:
        assert self.shell is not None
        request = parse_cell(line, cell, self.shell.user_ns)
        session = get_session()
        if session.busy:
            raise UsageError(f"%%cascade: {session.running.label if session.running else 'a job'} is still "
                             "running; wait for it or %cascade cancel")
        from ..diffusion import Cancelled  # the job needs torch from here on
        from ..pipeline import NonFiniteLatent
        from .display import LiveProgress

        options = dict(request.options)
        where = {k: options.pop(k, None) for k in ("variant", "device", "dtype")}
        show = session.defaults.preview if request.preview is None else request.preview
        progress = LiveProgress(preview=(lambda x0: session.cascade(**where).preview(x0)) if show else None,
                                interval=session.defaults.preview_interval)
        stopped = failed = None
        try:
            result = session.generate(request.prompt, request.negative_prompt, callback=progress, **where, **options)
        except JobRunning as exc:
            raise UsageError(str(exc)) from None
        except LoraUnavailable as exc:
            raise UsageError(f"--lora: {exc}") from None
        except KeyboardInterrupt:
            stopped = "interrupted"
        except Cancelled:
            stopped = "cancelled"
        except (ValueError, KeyError, FileNotFoundError) as exc:
            if progress.last is not None:  # a failure inside sampling is a bug: keep its traceback
                raise
            raise UsageError(f"%%cascade: {str(exc).strip(chr(39))}") from None
        except NonFiniteLatent as exc:  # stopped at the step that broke; the previews shown so far stay
            failed = str(exc)
        finally:  # the bars keep their final state: done, or marked where the job stopped
            progress.close(stopped or ("failed" if failed is not None or sys.exc_info()[0] is not None else None))
        if failed is not None:
            free_memory()
            raise UsageError(f"%%cascade: {failed}")
        if stopped is not None:  # outside the except block: the traceback (and its tensors) is gone
            free_memory()
            kept = "; the last preview is kept" if progress.previews else ""
            raise UsageError(f"cascade_lab job {stopped} {progress.where()}{kept}; memory freed, the session is "
                             "ready for the next job")
        progress.show_result(result)
        if request.out:
            self.shell.user_ns[request.out] = result
        if request.save:
            from ..results import SaveError, output_paths

            plain = output_paths(request.save, len(result.images), overwrite=True)
            try:
                paths = result.save(request.save, overwrite=request.overwrite)
            except (SaveError, ValueError) as exc:  # the result is kept for another try
                self.shell.user_ns["_cascade_unsaved"] = result
                raise UsageError(f"%%cascade --save: {exc} (the result is kept as _cascade_unsaved)") from None
            renamed = "" if paths == plain else f" ({plain[0]} exists; --overwrite replaces it)"
            print("saved " + ", ".join(str(p) for p in paths) + renamed)


def _widget(module: str, name: str) -> Any:
    """A panel class from ``cascade_lab.notebook.<module>``, imported only when asked for."""
    try:
        found = importlib.import_module(f"{__package__}.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == "ipywidgets":
            raise UsageError(f"{name} needs ipywidgets: pip install ipywidgets") from None
        if exc.name == f"{__package__}.{module}":
            raise UsageError(f"{name} is not available in this version of cascade_lab") from None
        raise
    return getattr(found, name)


def variants_text() -> str:
    """Each variant: description, memory on the default device, and whether its files are on this machine."""
    from ..plugins import registries
    from ..weights import WeightsNotFoundError, locate
    from ..weights.memory import GiB, compute_dtypes, estimate

    device = get_session().defaults.device
    torch = sys.modules.get("torch")
    device = device or ("cuda" if torch is not None and torch.cuda.is_available() else "cpu")
    dtypes = compute_dtypes(device)
    registry = registries()["variant"]
    lines = [f"memory on {device} (Stage C {dtypes.stage_c}, Stage B {dtypes.stage_b}):"]
    for variant in registry:
        lines.append(f"{variant.name}  {variant.description}  [{registry.owner[variant.name]}]")
        if not variant.files:
            lines.append("    built in: no weight files needed")
            continue
        e = estimate(variant, dtypes)
        lines.append(f"    memory: {e.resident / GiB:.1f} GiB all resident, {e.swapped / GiB:.1f} GiB with "
                     "stage swapping")
        try:
            locate(variant.name, download=False)
            lines.append("    files: present on this machine")
        except WeightsNotFoundError as exc:
            m = re.search(r"(\d+) file\(s\) not found", str(exc))
            count = f"{m[1]} of {len(variant.files)} files missing" if m else "files missing"
            lines.append(f"    files: not present ({count}; loading it downloads them)")
        except Exception as exc:  # a broken file or folder must not break the listing
            lines.append(f"    files: could not check ({type(exc).__name__}: {exc})")
    return "\n".join(lines)


def load_ipython_extension(ipython: Any) -> None:
    from ..plugins import load_plugins

    load_plugins()
    ipython.register_magics(CascadeMagics(shell=ipython))


def unload_ipython_extension(ipython: Any) -> None:
    manager = ipython.magics_manager
    for kind in ("line", "cell"):
        manager.magics[kind].pop("cascade", None)
    instance = manager.registry.pop("CascadeMagics", None)
    if instance is not None and instance in getattr(ipython, "configurables", []):
        ipython.configurables.remove(instance)
