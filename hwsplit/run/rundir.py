"""The run directory: its format, its records, its summary and the rule of one writer per run.

A run directory holds ``config.json`` (what was asked), ``stages.jsonl`` (one JSON record per
completed stage: at least ``stage``, ``test_top1``, ``macs``, ``params``, ``cost``), ``stage-K.pt``
(architecture + weights, loadable with ``weights_only=True``), ``summary.md`` (the same records, for
people) and ``.lock`` (held by the one process writing it). Every file is written atomically
(:mod:`hwsplit.infra.fsio`). A stage is complete when its record is in ``stages.jsonl``, which is written after
its checkpoint.
See docs/design.md §5.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hwsplit.infra.distributed import is_main
from hwsplit.infra.errors import ConfigError, RunFailed, RunLocked
from hwsplit.infra.fsio import atomic_write_json, atomic_write_text
from hwsplit.infra.units import fmt_si

log = logging.getLogger(__name__)

#: Sub-directories of a grow run that hold networks derived from its stages (hwsplit.run.finetune).
DERIVED = ("final", "finetune", "retrain")
#: The run's list of the ONNX files ``export`` wrote from it (removed with the run it came from).
EXPORTS = "exports.json"


class WriteFailed(OSError):
    """Writing a file of the run directory failed (disk full, permission); the previous file is intact."""


class StageFailed(RunFailed):
    """A stage could not complete (a non-finite loss, a failed write). Earlier stages are intact.

    ``stage`` is the stage that failed, ``run`` the run directory; ``summary.md`` says why.
    """

    def __init__(self, message: str, *, stage: int, run: Path) -> None:
        super().__init__(message)
        self.stage = stage
        self.run = run


class RunDir:
    """The files of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config = property(lambda self: self.path / "config.json")
    stages = property(lambda self: self.path / "stages.jsonl")
    summary = property(lambda self: self.path / "summary.md")
    lockfile = property(lambda self: self.path / ".lock")
    exports = property(lambda self: self.path / EXPORTS)
    tb = property(lambda self: self.path / "tb")  # TensorBoard event files (hwsplit/run/tblog.py)

    def event_files(self) -> list[Path]:
        """The TensorBoard event files in ``tb/``."""
        return sorted(p for p in self.tb.glob("events.out.tfevents.*") if p.is_file()) if self.tb.is_dir() else []

    def checkpoint(self, stage: int) -> Path:
        return self.path / f"stage-{stage}.pt"

    def partial(self, stage: int) -> Path:
        """The training state of a stage still training (``partial-K.pt``), written after every epoch."""
        return self.path / f"partial-{stage}.pt"

    def partials(self) -> list[Path]:
        return sorted(self.path.glob("partial-*.pt"))

    def checkpoints(self) -> dict[int, Path]:
        """Existing ``stage-K.pt`` files by K."""
        out = {}
        for p in self.path.glob("stage-*.pt"):
            m = re.fullmatch(r"stage-(\d+)\.pt", p.name)
            if m:
                out[int(m.group(1))] = p
        return dict(sorted(out.items()))

    def temporaries(self) -> list[Path]:
        """Temporary files an interrupted atomic write may have left (``.NAME.XXXX.tmp``)."""
        return sorted(p for p in self.path.glob(".*.tmp") if p.is_file())

    def is_run(self) -> bool:
        """Whether the directory holds (part of) an hwsplit run: records, checkpoints, or a config.json
        that hwsplit wrote (a JSON object with a ``model`` and ``cost`` field)."""
        if self.stages.exists() or self.checkpoints():
            return True
        try:
            data = json.loads(self.config.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(data, dict) and "model" in data and "cost" in data

    def own_files(self) -> list[Path]:
        """The files of the run format present in the directory (``.lock`` excepted)."""
        return [p for p in (self.config, self.stages, self.summary, *self.checkpoints().values()) if p.exists()]

    def records(self) -> list[dict[str, Any]]:
        if not self.stages.exists():
            return []
        records = []
        try:
            text = self.stages.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"run: {self.stages} is not UTF-8 text") from None
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as err:
                raise ValueError(f"run: {self.stages} line {i} is not JSON ({type(err).__name__})") from None
        return records

    def write_records(self, records: list[dict[str, Any]]) -> None:
        atomic_write_text(self.stages, "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n"
                                               for r in records))

    def append(self, record: dict[str, Any]) -> None:
        self.write_records(self.records() + [record])

    def trim_to_completed(self) -> list[dict[str, Any]]:
        """Make the directory consistent for continuing, and return the records of its completed stages.

        A stage is complete when its record is in ``stages.jsonl`` in order (``"stage"`` = its index) and its
        checkpoint exists; the first record that is not ends the list. Removed: temporary files of an
        interrupted write, the records after the completed ones, checkpoints without a record, and every
        training state but the next stage's (``partial-K.pt``, which continues from its last finished epoch).
        The last completed stage's checkpoint is what a run continues from: a ``ValueError`` when it does not
        hold the architecture its record names (nothing is removed then). Call it while holding :meth:`lock`;
        ``grow --resume``, fine-tuning, the width and pruning baselines continue this way.
        """
        for tmp in self.temporaries():
            log.info("removing %s, left by an interrupted write", tmp.name)
            tmp.unlink()
        records = self.records()
        checkpoints = self.checkpoints()
        kept: list[dict[str, Any]] = []
        for i, r in enumerate(records):
            if r.get("stage") != i or i not in checkpoints:
                break
            kept.append(r)
        if kept and "architecture" in kept[-1]:
            from hwsplit.network.checkpoint import load_checkpoint

            if load_checkpoint(checkpoints[len(kept) - 1])["architecture"] != kept[-1]["architecture"]:
                raise ValueError(f"resume: {checkpoints[len(kept) - 1]} does not hold the architecture recorded "
                                 f"for stage {len(kept) - 1} in {self.stages}")
        if len(kept) != len(records):
            log.warning("resume: keeping %d of the %d records in %s", len(kept), len(records), self.stages)
            self.write_records(kept)
        for k, p in checkpoints.items():
            if k >= len(kept):
                log.info("resume: removing %s (its stage did not complete)", p.name)
                p.unlink()
        for p in self.partials():
            if p != self.partial(len(kept)):
                log.info("resume: removing %s (not the training state of stage %d)", p.name, len(kept))
                p.unlink()
        return kept

    @contextlib.contextmanager
    def lock(self, what: str = "write") -> Iterator[None]:
        """Hold the run's advisory lock (``.lock``, ``fcntl.flock``) while the block runs.

        The kernel releases it when the process dies, so a killed run never stays locked. A second
        process gets :class:`~hwsplit.infra.errors.RunLocked` at once, with the holder's pid.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock, as before
            yield
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT, 0o666)
        except (PermissionError, FileExistsError, NotADirectoryError) as err:  # name the run, not .lock
            raise ConfigError(f"run: cannot {what} {self.path} ({err.strerror or type(err).__name__})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
                raise RunLocked(f"run: {self.path} is in use by {holder} (one process may {what} a run at a "
                                "time; wait for it or use another directory)") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, in hex (the fingerprint of a checkpoint or an ONNX file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lock_holder(run: RunDir) -> str | None:
    """Who holds ``run``'s lock (``"pid N"``), or None when no live process does (the kernel drops the
    lock of a process that died, so a run whose writer was killed reads as not held)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        fd = os.open(run.lockfile, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            return os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
        return None
    finally:
        os.close(fd)


def resume_hint(run: RunDir) -> str:
    """How to continue ``run`` after an interruption, as a command (from its config.json)."""
    try:
        config = json.loads(run.config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        config = {}
    ft = config.get("finetune") if isinstance(config, dict) else None
    if isinstance(ft, dict):
        source = ft.get("source", "RUN")
        if ft.get("kind") == "final":
            return f"continue with `python cli.py grow --resume {source}`"
        stages = " ".join(f"--stage {k}" for k in ft.get("stages", []))
        default = Path(source) / ("retrain" if ft.get("from_scratch") else "finetune")
        out = "" if run.path.resolve() == default.resolve() else f" --out {run.path}"
        return (f"continue with `python cli.py finetune {source} {stages} --epochs {ft.get('epochs')}"
                f"{' --from-scratch' if ft.get('from_scratch') else ''}{out}`")
    if isinstance(config, dict) and config.get("baseline"):
        return "run the same `baseline` command again"
    return f"continue with `python cli.py grow --resume {run.path}`"


def run_status(run: RunDir) -> str:
    """The run's status as ``summary.md`` states it (``running``, ``stopped: why``, ``done``, ``failed …``,
    ``interrupted …``), except that a run said to be running while no live process holds its lock is
    ``interrupted`` (its process was killed), with the command that continues it. ``unknown`` without
    a summary."""
    try:
        text = run.summary.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return "unknown (no summary.md)"
    status = next((line[len("Status: "):].strip() for line in text.splitlines() if line.startswith("Status: ")),
                  "unknown")
    if status == "running" and lock_holder(run) is None:
        return f"interrupted (no process is writing it: it was killed or its machine stopped); {resume_hint(run)}"
    return status


def mark_interrupted(run: RunDir) -> str:
    """:func:`run_status`, and when that says the run's writer died, the same status written into its
    ``summary.md`` (under the run's lock, so never while a writer is alive). A failed write is logged."""
    status = run_status(run)
    if not status.startswith("interrupted (no process"):
        return status
    try:
        with run.lock("update"):
            text = run.summary.read_text(encoding="utf-8")
            if "\nStatus: running\n" in text:
                atomic_write_text(run.summary, text.replace("\nStatus: running\n", f"\nStatus: {status}\n", 1))
    except RunLocked:  # a writer started meanwhile
        return "running"
    except (OSError, ConfigError) as err:
        log.warning("could not mark %s interrupted: %s", run.summary, err)
    return status


def record_export(run: RunDir, onnx_path: str | Path, *, checkpoint: str | Path) -> None:
    """Add an ONNX file ``export`` wrote from ``run`` to its ``exports.json`` (path, sha256 of the file and of
    the checkpoint), so that replacing the run (:func:`start_fresh`) removes the export with it."""
    try:
        entries = json.loads(run.exports.read_text(encoding="utf-8")) if run.exports.exists() else []
    except (OSError, ValueError, RecursionError):
        entries = []
    path = str(Path(onnx_path).resolve())
    entries = [e for e in entries if isinstance(e, dict) and e.get("path") != path]
    entries.append({"path": path, "sha256": file_sha256(path), "checkpoint": Path(checkpoint).name,
                    "checkpoint_sha256": file_sha256(checkpoint)})
    atomic_write_json(run.exports, entries)


def _remove_exports(run: RunDir) -> None:
    """Delete the ONNX files ``run``'s exports.json lists, unless changed since (those are left, with a warning)."""
    try:
        entries = json.loads(run.exports.read_text(encoding="utf-8")) if run.exports.exists() else []
    except (OSError, ValueError, RecursionError):
        entries = []
    for e in entries if isinstance(entries, list) else []:
        path = Path(e.get("path", "")) if isinstance(e, dict) else None
        if path is None or not path.is_file():
            continue
        if file_sha256(path) == e.get("sha256"):
            log.warning("removing %s, exported from the run being replaced", path)
            path.unlink()
        else:
            log.warning("leaving %s: exported from the run being replaced, but changed since", path)
    if run.exports.exists():
        run.exports.unlink()


def derived_runs(run: RunDir) -> list[RunDir]:
    """``run``'s sub-directories ``final/``, ``finetune/``, ``retrain/`` that hold a fine-tuning of it."""
    out = []
    for sub in DERIVED:
        d = RunDir(run.path / sub)
        try:
            config = json.loads(d.config.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(config, dict) and isinstance(config.get("finetune"), dict):
            out.append(d)
    return out


def check_source(run: RunDir) -> None:
    """Refuse (``ConfigError``) a fine-tuned directory whose source stages changed since it was made.

    A fine-tuning records the sha256 of each source checkpoint (config.json ``finetune.source_sha256``);
    when the source run directory still exists, each ``stage-K.pt`` there must still have that hash (a
    grow run replaced by ``--overwrite`` or deleted stages do not). Other directories pass.
    """
    try:
        config = json.loads(run.config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return
    ft = config.get("finetune") if isinstance(config, dict) else None
    if not isinstance(ft, dict) or not isinstance(ft.get("source_sha256"), dict):
        return
    source = RunDir(run.path.parent if ft.get("source_in_parent") else ft.get("source", ""))
    if not source.path.is_dir():
        log.warning("%s: its source run %s is gone; its stages cannot be checked", run.path, source.path)
        return
    for stage, digest in ft["source_sha256"].items():
        ckpt = source.checkpoint(int(stage))
        if not ckpt.is_file() or file_sha256(ckpt) != digest:
            raise ConfigError(f"run: {run.path} was trained from stage {stage} of {source.path}, whose "
                              f"{ckpt.name} {'is gone' if not ckpt.is_file() else 'has changed'} since (the run was "
                              f"replaced?); it no longer belongs to that run: train it again or delete {run.path}")


def remove_run_files(run: RunDir) -> None:
    """Delete a previous run's files from ``run`` (config.json first: killed half-way, no run is left
    to resume rather than a mix of two), the ONNX files exported from it (:func:`record_export`) and
    its fine-tunings (``final/``, ``finetune/``, ``retrain/``, with their exports), TensorBoard event
    files (``tb/``) included. Nothing else in the directory is touched; a derived directory (and
    ``tb/``) is removed only when nothing else is left in it."""
    busy = [(d, h) for d in derived_runs(run) if (h := lock_holder(d)) is not None]
    if busy:
        raise RunLocked(f"run: {busy[0][0].path} is in use by {busy[0][1]}; wait for it before replacing {run.path}")
    for d in derived_runs(run):  # first: killed half-way, the run is whole and what is left of these is refused
        log.warning("removing %s, derived from the run being replaced", d.path)
        remove_run_files(d)
        if d.lockfile.exists():
            d.lockfile.unlink()
        with contextlib.suppress(OSError):
            d.path.rmdir()
    _remove_exports(run)
    for p in [run.config, run.stages, *run.checkpoints().values(), *run.partials(), *run.temporaries(),
              run.summary, *run.event_files()]:
        if p.exists():
            p.unlink()
    with contextlib.suppress(OSError):
        run.tb.rmdir()  # only when empty


def start_fresh(run: RunDir, *, overwrite: bool = True) -> None:
    """Make ``run`` ready for a new run: create it, or replace the run it holds.

    A directory that holds a run is emptied of the run's files only with ``overwrite=True``
    (otherwise :class:`~hwsplit.infra.errors.ConfigError` says to use ``--resume`` or ``--overwrite``).
    A directory whose ``config.json``/``summary.md`` hwsplit did not write is never emptied:
    ``ConfigError`` whatever ``overwrite`` says. Call it while holding ``run.lock()``.
    """
    run.path.mkdir(parents=True, exist_ok=True)
    if run.is_run():
        try:
            old: int | str = len(run.records())
        except ValueError:  # an unreadable stages.jsonl is replaced too
            old = "unreadable"
        if not overwrite:
            raise ConfigError(f"out: {run.path} holds a run ({old} completed stage(s)); continue it with "
                              f"--resume {run.path}, or replace it with --overwrite")
        log.warning("replacing the run in %s (%s completed stage(s))", run.path, old)
        remove_run_files(run)
    elif run.own_files():
        names = ", ".join(p.name for p in run.own_files())
        raise ConfigError(f"out: {run.path} is not an hwsplit run but holds {names}; hwsplit never empties such "
                          "a directory (choose a new or empty one)")


def continue_or_start(dest: RunDir, info: dict[str, Any], *, overwrite: bool) -> list[dict[str, Any]]:
    """Make the locked ``dest`` ready for the job ``info`` (its config.json) and write that config.json: the
    records to continue after when ``dest`` holds the same job (a kill left it), none for a fresh start. A
    different job there is replaced only with ``overwrite`` (``ConfigError`` otherwise). Fine-tuning, pruning
    and the width baseline continue this way; ``grow --resume`` checks its settings its own way
    (hwsplit.run.grow) and trims the directory the same way (:meth:`RunDir.trim_to_completed`)."""
    kept = _prepare(dest, info, overwrite=overwrite)
    atomic_write_json(dest.config, info)
    return kept


#: config.json keys that name a file or directory: compared by what they name, not by their spelling
PATH_KEYS = ("data_dir", "profile", "source")


def resolve_paths(data: Any) -> Any:
    """``data`` (a config.json's content) with the values of :data:`PATH_KEYS` at any depth resolved to absolute
    paths, so that a relative and an absolute spelling of the same data directory, profile or source run
    compare equal."""
    if isinstance(data, dict):
        return {k: (str(Path(v).expanduser().resolve()) if k in PATH_KEYS and isinstance(v, str) else resolve_paths(v))
                for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_paths(v) for v in data]
    return data


def _same_job(dest: RunDir, info: dict[str, Any]) -> bool | None:
    """Whether ``dest``'s config.json is ``info`` (paths compared by what they name); ``None`` when it has none."""
    if not dest.config.exists():
        return None
    try:
        return resolve_paths(json.loads(dest.config.read_text(encoding="utf-8"))) == resolve_paths(info)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False


def _prepare(dest: RunDir, info: dict[str, Any], *, overwrite: bool) -> list[dict[str, Any]]:
    """The records to keep in ``dest``: for the same job, those of its completed records
    (:meth:`RunDir.trim_to_completed`); none for a fresh start."""
    same = _same_job(dest, info)
    if same:
        kept = dest.trim_to_completed()
        if kept:
            log.info("continuing %s after %d completed record(s)", dest.path, len(kept))
        return kept
    if same is False and not overwrite:
        raise ConfigError(f"out: {dest.path} holds another job (its config.json differs); replace it "
                          "with --overwrite or choose --out")
    start_fresh(dest, overwrite=overwrite)
    return []


def record_widths(record: dict[str, Any]) -> list[int]:
    """The per-layer widths a table shows: every splittable layer in graph order (the stem included, as in
    ``widths.png``); for a record without them, the family's width list (and its stem width first)."""
    widths = record.get("widths")
    if isinstance(widths, dict) and widths:
        return [widths[n] for n in record.get("layers", widths) if n in widths]
    arch = record.get("architecture", {})
    if isinstance(arch.get("widths"), list):
        return ([arch["stem_width"]] if isinstance(arch.get("stem_width"), int) else []) + arch["widths"]
    return []


def shown_stage(record: dict[str, Any]) -> int:
    """The stage a table names a record by: a fine-tuned or retrained record by the grown stage it came from."""
    return record.get("source_stage", record["stage"])


def stage_table(records: list[dict[str, Any]]) -> list[list[str]]:
    """Rows (header first) of the per-stage table the CLI prints and summary.md shows."""
    unit = records[0]["cost"]["unit"] if records else ""
    measured = any("measured" in r for r in records)
    baseline = any("width_mult" in r for r in records)
    rows = [["stage"] + (["width ×"] if baseline else []) + ["test top-1", "test loss", "MACs", "params",
                                                            f"cost ({unit})"]
            + (["measured ms"] if measured else []) + ["split", "widths"]]
    for r in records:
        row = [str(shown_stage(r))] + ([f"{r['width_mult']:g}"] if baseline else [])
        row += [f"{r['test_top1']:.4f}", f"{r['test_loss']:.4f}", fmt_si(r["macs"]), fmt_si(r["params"]),
                f"{r['cost']['value']:.4g}"]
        if measured:
            lat = (r.get("measured") or {}).get("latency_ms")
            row.append(f"{lat['median']:.4g}" if lat else "-")
        split = "-" if "source_stage" in r else str(r.get("neurons_split", 0))  # a fine-tuning splits nothing
        rows.append(row + [split, " ".join(str(w) for w in record_widths(r))])
    return rows


def write_summary(run: RunDir, config: Any, records: list[dict[str, Any]], *, status: str,
                  title: str | None = None, safe: bool = False) -> None:
    """summary.md: the settings, the stage table and the run's status (running, stopped: why, failed: why).

    ``config`` is the run's :class:`~hwsplit.run.config.GrowConfig`. ``safe=True`` (while handling
    another error) logs a failed write instead of raising it. Only rank 0 of a multi-process run writes.
    """
    if not is_main():
        return
    rows = stage_table(records)
    lines = [f"# hwsplit run: {title or f'{config.model} on {config.dataset}, cost {config.cost}'}", "",
             f"growth ratio {config.growth_ratio}, budget {config.budget}, {config.epochs} epochs per stage, "
             f"split by {config.split_method} ({config.split_epochs} epoch(s)), step {config.split_step}, "
             f"selection {config.selection}, seed {config.seed}", ""]
    lines.append("| " + " | ".join(rows[0]) + " |")
    lines.append("|" + "---|" * len(rows[0]))
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines.append("")
    lines.append(f"Status: {status}")
    lines.append("")
    lines.append("Load a stage: `hwsplit.network.checkpoint.load_model('stage-K.pt')`.")
    try:
        atomic_write_text(run.summary, "\n".join(lines) + "\n")
    except (OSError, RuntimeError) as err:
        if not safe:
            raise WriteFailed(f"could not write {run.summary} ({err})") from err
        log.error("could not write %s: %s", run.summary, err)


__all__ = ["DERIVED", "EXPORTS", "RunDir", "StageFailed", "WriteFailed",
           "check_source", "continue_or_start", "derived_runs", "file_sha256", "lock_holder", "mark_interrupted",
           "record_export", "record_widths", "remove_run_files", "resume_hint", "run_status", "shown_stage",
           "stage_table", "start_fresh", "write_summary"]
