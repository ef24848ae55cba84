"""``%pxg`` / ``%%pxg``: stock ``%px`` with grouped output (``%load_ext pxfabric``).

The magics subclass stock ``ParallelMagics`` and parse their options with stock's own
argument decorators (``exec_args``, ``output_args``), so ``%%pxg`` takes exactly ``%%px``'s
options. What differs is what happens after the wait: the outputs are printed by
:func:`pxfabric.grouped.show_grouped` (each distinct output once, with its engines), and errors
are raised as a :class:`GroupedCompositeError` (a ``CompositeError`` whose traceback shows each
distinct error once). Differences in the options, all deliberate:

* ``--group-outputs``/``-r``/``-e`` are accepted and ignored (the grouping is by value).
* Output is not streamed unless ``--stream`` is given (live output cannot be grouped); with
  ``--stream``, stdout/stderr/display data stream per engine as in stock and the results and
  errors come grouped at the end.
* ``--targets`` also takes the spelling the output uses, ``0-3`` or ``0-6,8-63`` (stock would
  evaluate ``0-3`` as the number -3); anything else is read as stock reads it.
* ``--verbose`` prints the "Parallel execution on engine(s)" line for this cell.

``%pxg`` runs on the view the stock ``%px`` uses (the one activated last, e.g. by creating a
``Client`` in IPython or ``view.activate()``), so ``%pxconfig`` (targets, blocking,
``--progress-after``, ``--verbose``) applies to both; ``%px`` itself is untouched.
"""

from __future__ import annotations

import re
import time

from IPython.core import magic_arguments
from IPython.core.error import UsageError
from IPython.core.magic import Magics
from ipyparallel.client.magics import ParallelMagics, exec_args, nullcontext, output_args
from ipyparallel.error import CompositeError, RemoteError

from . import grouped

# "0-3", "0-6,8-63", "2,5": ids as format_ranges writes them (with a '-' or ',' in them: a
# bare number keeps stock's meaning, one engine and an unwrapped result).
_RANGES = re.compile(r"^\s*\d+\s*(-\s*\d+\s*)?(,\s*\d+\s*(-\s*\d+\s*)?)*$")


class GroupedCompositeError(CompositeError):
    """A ``CompositeError`` that draws each distinct error once, labelled with its engines
    (``[0-15:execute]: ``); still a ``CompositeError`` (same ``elist``), so code catching the
    stock error catches this one."""

    def _groups(self):
        pairs = []
        for en, ev, etb, ei in self.elist:
            ei = ei or {}
            pairs.append((ei.get("engine_id", -1), grouped.ErrorInfo(
                ename=str(en), evalue=str(ev), traceback=etb or "",
                method=str(ei.get("method") or "execute"))))
        return grouped.group_values(pairs, key=grouped.error_key)

    def __str__(self):
        return str(self.msg) + "\n" + grouped.error_summary(self._groups())

    def render_traceback(self, excid=None):
        if excid is not None:
            return super().render_traceback(excid)
        return grouped.error_lines(self._groups(), self.tb_limit)


class GroupedParallelMagics(ParallelMagics):
    """``%pxg`` and ``%%pxg`` on the active ``%px`` view."""

    def __init__(self, shell):
        self.suffix = "g"
        # Magics.__init__ binds what self.magics names; stock's __init__ would also register
        # %pxresultg, %pxconfigg and %autopxg, which would only duplicate the stock magics.
        self.magics = dict(line={"pxg": self.pxg}, cell={"pxg": self.cell_pxg})
        Magics.__init__(self, shell=shell)

    # --- the stock %px magics this one follows

    def _px_magics(self) -> ParallelMagics:
        px = self.shell.magics_manager.magics["line"].get("px")
        owner = getattr(px, "__self__", None)
        if not isinstance(owner, ParallelMagics) or owner.view is None:
            raise UsageError("%pxg runs on the view of %px, and no view is active: create an "
                             "ipyparallel.Client in this session (or call view.activate()) first")
        return owner

    @property
    def view(self):
        return self._px_magics().view

    def _eval_target_str(self, ts):
        if _RANGES.match(ts) and ("-" in ts or "," in ts):
            try:
                return grouped.parse_ranges(ts)
            except ValueError as e:
                raise UsageError(str(e)) from None
        return super()._eval_target_str(ts)

    # --- the magics

    def pxg(self, line=""):
        """Executes the given python command in parallel; each distinct output once.

        Examples
        --------
        ::

            In [1]: %pxg print(rank % 2)
            [stdout:0,2,4,6] 0
            [stdout:1,3,5,7] 1
        """
        return self.parallel_execute(line)

    @magic_arguments.magic_arguments()
    @exec_args
    @output_args
    def cell_pxg(self, line="", cell=None):
        """Executes the cell in parallel, as %%px; each distinct output once with its engines.

        Examples
        --------
        ::

            In [2]: %%pxg --targets 0-3
               ...: import os
               ...: os.cpu_count()
            Out[0-3:7]: 2
        """
        args = magic_arguments.parse_argstring(self.cell_pxg, line)
        view = self.view
        if args.targets:
            save_targets = view.targets
            view.targets = self._eval_target_str(args.targets)
        # with --local, the remote result is shown after the local run
        block = False if args.local else args.block
        try:
            ar = self.parallel_execute(cell, block=block, save_name=args.save_name,
                                       stream_output=args.stream,
                                       progress_after=args.progress_after_seconds,
                                       verbose=args.set_verbose)
        finally:
            if args.targets:
                view.targets = save_targets
        block = view.block if args.block is None else args.block
        if args.local:
            self.shell.run_cell(cell)
            if block:
                self._show(ar, stream_output=False)
        if not block:
            return ar

    def parallel_execute(self, cell, block=None, groupby="type", save_name=None,
                         stream_output=None, progress_after=None, verbose=None):
        """Stock ``parallel_execute`` (same waits and progress bar), grouped display."""
        px = self._px_magics()
        view = px.view
        block = view.block if block is None else block
        stream_output = bool(stream_output)
        verbose = px.verbose if verbose is None else verbose
        if verbose:
            targets = view.targets
            if isinstance(targets, list) and len(targets) > 10:
                targets = grouped.format_ranges(targets)
            print(("Parallel" if block else "Async parallel") + f" execution on engine(s): {targets}")

        result = view.execute(cell, silent=False, block=False)
        result._fname = "%pxg"
        self.last_result = result
        if save_name:
            self.shell.user_ns[save_name] = result
        if not block:
            return result

        if progress_after is None:
            progress_after = px.progress_after_seconds
        with result.stream_output() if stream_output else nullcontext():
            finished = False
            if progress_after > 0:
                # wait for 'quick' results before showing progress
                deadline = time.perf_counter() + progress_after
                if result.wait_for_output(timeout=progress_after):
                    result.wait(max(deadline - time.perf_counter(), 0))
                finished = result.ready()
            if not finished:
                if progress_after >= 0:
                    result.wait_interactive()
                result.wait_for_output()
                result.wait()
        self._show(result, stream_output)

    def _show(self, result, stream_output):
        """Grouped outputs, then the errors raised (as stock, where %px raises them)."""
        try:
            result.get()
        except CompositeError as e:
            error = GroupedCompositeError(e.msg, e.elist)
        except RemoteError as e:  # one engine: stock's error as it is
            error = e
        else:
            error = None
        grouped.show_grouped(result, result_only=stream_output, errors=False)
        if error is not None:
            raise error from None
