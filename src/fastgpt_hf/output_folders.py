"""Output folders that are never clobbered, mixed, half-written or written by two processes at once.

- `refuse_unwritable(output, sources)`: a `ValueError` when `output` is a file, or is (or holds) a folder or file
  the command reads: refused even with `--overwrite`.
- `refuse_occupied(folder, remedy)`: a `ValueError` when `folder` already holds something (without `--overwrite`).
- `writer_lock(folder)`: an exclusive `fcntl.flock` on `.NAME.lock` beside the folder while a command writes it;
  a second writer is refused with the holder's process id.
- `staged_folder(final)`: a temporary folder beside `final` to write into, renamed into place on success (an old
  `final` is replaced whole), removed on an error; `move_into_place` is that rename, `replace_with_empty_folder`
  its use for `--overwrite` of a folder written over a long run.
- `replace_entries(staging, folder, keep)`: the entries of a folder that also holds other things (a training run's
  final model beside its `checkpoint-N` folders) replaced by a staged set, `config.json` last.

Temporary and lock names start with a dot and end in `.tmp`, `.old` or `.lock`: Transformers' checkpoint search
(`checkpoint-N`) never picks them up, and a crash leaves them, never a half-written folder, under the final name.
"""

import fcntl
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

# What makes a folder a model for `from_pretrained` and the `fastgpt` commands: written last, removed first.
CONFIG_NAME = "config.json"


def temporary_sibling(final: Path, suffix: str = "tmp") -> Path:
    """`.NAME.SUFFIX` beside `final`: where it is written (`tmp`) or its old version waits for removal (`old`)."""
    final = Path(os.path.abspath(final))  # `.` and `a/..` have names too; symbolic links are not followed
    return final.parent / f".{final.name}.{suffix}"


def lock_path(folder: Path) -> Path:
    """The lock file of `folder`, beside it, so that the folder itself may be renamed or replaced while locked."""
    return temporary_sibling(folder, "lock")


def refuse_unwritable(output: Path, sources: Iterable[Path]) -> None:
    """Raise a ValueError when `output` is a file, or when writing it would destroy one of `sources`.

    A source is destroyed when it is `output` itself or lies inside it (paths compared resolved, so `./a` and a
    symbolic link to it count as `a`); a folder inside a source (`quantize CK CK/int8`) leaves the source whole.
    """
    if output.is_file():
        raise ValueError(f"{output} is a file; pass a folder (new or empty) to write to.")
    target = output.resolve()
    for source in sources:
        resolved = Path(source).resolve()
        if resolved == target or target in resolved.parents:
            relation = "is" if resolved == target else "holds"
            raise ValueError(
                f"{output} {relation} {source}, which this command reads: writing there would destroy it, even with "
                "--overwrite; choose another output folder."
            )


def refuse_occupied(folder: Path, remedy: str) -> None:
    """Raise a ValueError naming what `folder` holds when it is not empty; `remedy` says what to pass instead."""
    entries = sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []
    if entries:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise ValueError(f"{folder} already holds files ({shown}); {remedy}.")


@contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Hold the lock of `folder` (`lock_path`) while the block runs; a ValueError names the holder when taken.

    The kernel drops a `flock` when its process ends, even by a crash, so a lock file left behind never blocks.
    The file holds the holder's process id and is removed on release.
    """
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = _locked_descriptor(path, folder)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, str(os.getpid()).encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked, so that no other process locks this file meanwhile
        os.close(descriptor)


def _locked_descriptor(path: Path, folder: Path) -> int:
    """An open descriptor of `path` holding its exclusive lock."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip()
            os.close(descriptor)
            who = f"process {holder}" if holder else "another process"
            raise ValueError(
                f"{folder} is being written by {who} (lock {path}); wait for it to finish or choose another "
                "output folder."
            ) from None
        # A holder releasing its lock removes the file: when that happened after our open, lock the new one.
        if _is_same_file(path, descriptor):
            return descriptor
        os.close(descriptor)


def _is_same_file(path: Path, descriptor: int) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(descriptor))
    except FileNotFoundError:
        return False


def remove(path: Path) -> None:
    """Delete a file or folder tree; nothing when absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def move_into_place(staging: Path, final: Path) -> None:
    """Rename the written folder `staging` to `final`, replacing an old `final` whole (renamed aside, then removed).

    Each step is one rename on the same file system: `final` is at every moment the old folder, the new one, or
    (after a crash between the two renames) absent, never a mix.
    """
    if final.exists():
        old = temporary_sibling(final, "old")
        remove(old)
        final.rename(old)
        staging.rename(final)
        remove(old)
    else:
        staging.rename(final)


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `final` to write into, moved into place when the block ends without error.

    On an error the temporary folder is removed and `final` is left as it was. A temporary folder left by a crash
    is removed first: the caller holds `writer_lock(final)`, so no process is writing it.
    """
    staging = temporary_sibling(final)
    remove(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        remove(staging)
        raise
    move_into_place(staging, final)


def replace_with_empty_folder(folder: Path) -> None:
    """Put an empty folder in place of `folder` (`move_into_place`: the old one goes whole, at once)."""
    with staged_folder(folder):
        pass


def replace_entries(staging: Path, folder: Path, keep: Callable[[Path], bool]) -> None:
    """Replace the entries of `folder` that `keep` rejects by the entries of `staging` (a folder inside it).

    For a folder that holds a model beside things that stay (a training run's `checkpoint-N` folders). Files move
    one by one, so `config.json` goes first and comes back last: a crash in between leaves a folder that nothing
    takes for a model, never an old config over new weights or the reverse.
    """
    (folder / CONFIG_NAME).unlink(missing_ok=True)
    for entry in folder.iterdir():
        if entry != staging and not keep(entry):
            remove(entry)
    for entry in sorted(staging.iterdir(), key=lambda entry: entry.name == CONFIG_NAME):
        entry.rename(folder / entry.name)
    staging.rmdir()
