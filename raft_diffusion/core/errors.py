"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """An invalid configuration value or key."""


class ScoreError(UserError):
    """What a task's ``score`` returned is unusable (wrong shape or type, all NaN); the message names the reward."""


def is_user_facing(e: BaseException, user_errors: tuple[type[BaseException], ...] = ()) -> bool:
    """Our own errors and those the caller names (e.g. the reward package's); other exceptions are bugs
    and keep their traceback."""
    return isinstance(e, (UserError, *user_errors))


RESUME_HINT = "the run directory keeps every completed stage: rerun the same command to resume"

# errno -> what to do about it (the message adds the path and the system's wording)
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space (or choose another {option})",
    errno.EDQUOT: "the disk quota is exceeded: free some space (or choose another {option})",
    errno.EACCES: "permission denied: fix the permissions, or choose an {option} you can write to",
    errno.EPERM: "operation not permitted: fix the permissions, or choose an {option} you can write to",
    errno.EROFS: "the file system is read-only: choose an {option} on a writable disk",
    errno.ENOTDIR: "a path component is a file, not a folder: choose another {option} (or move the file away)",
    errno.EEXIST: "a file is in the way: choose another {option} (or move the file away)",
    errno.EISDIR: "a folder is where a file should be: choose another path (or move the folder away)",
}
_RESUMABLE = {errno.ENOSPC, errno.EDQUOT}  # a run stopped by these resumes once there is room


def os_advice(code: int | None, *, resume: bool = True, option: str = "--output-dir") -> str | None:
    """What to do about an OSError with this errno, or None when there is no advice for it; ``option`` is the
    command's flag for its output folder. With ``resume`` (a run that has started) a full disk's advice adds that the
    completed stages are kept and the command resumes."""
    advice = _OS_ADVICE.get(code)
    if advice is not None:
        advice = advice.format(option=option)
    if advice is not None and resume and code in _RESUMABLE:
        advice = f"{advice}; {RESUME_HINT}"
    return advice


def environment_error(e: BaseException) -> str | None:
    """A one-line message for an error of the machine rather than of the code (disk, permissions, memory).

    Libraries often wrap the OSError (safetensors, torch.save): the chain of causes is searched too.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        message = _environment_error(e)
        if message is not None:
            return message
        e = e.__cause__ or e.__context__
    return None


def _environment_error(e: BaseException) -> str | None:
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and _is_alloc_failure(str(e))):
        first = str(e).strip().splitlines()[0] if str(e).strip() else "MemoryError"
        if "out of memory" in first.lower() and "cuda" in first.lower():
            first = first.split(".")[0]  # torch's CUDA message goes on about allocator settings
        return (
            f"out of memory ({first}); lower sampling.batch_size, train.batch_size or the image size, or free memory on this machine; {RESUME_HINT}"
        )
    if isinstance(e, OSError) and e.errno in _OS_ADVICE:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror or type(e).__name__}{where}: {os_advice(e.errno)}"
    text = str(e)
    if "No space left on device" in text or "os error 28" in text:  # wrapped by a Rust or C++ writer
        return f"No space left on device: {os_advice(errno.ENOSPC)}"
    return None


def _is_alloc_failure(text: str) -> bool:
    t = text.lower()
    return "can't allocate memory" in t or "out of memory" in t or "cannot allocate memory" in t


def run_command(args, user_errors=()) -> int:
    """Run a CLI handler ``args.func(args)``: user errors (ours and ``user_errors``, e.g. the reward package's)
    and environment errors print as one line (exit 2), Ctrl-C as a resume hint. ``--verbose`` keeps the traceback.

    ``user_errors`` is a tuple of exception types, or a function returning one, called only when an error
    happens (so that naming a package's errors does not import the package on every start)."""
    import sys

    verbose = getattr(args, "verbose", False)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last completed stage", file=sys.stderr)
        return 130
    except Exception as e:
        if verbose:
            raise
        if isinstance(e, UserError) or is_user_facing(e, user_errors() if callable(user_errors) else user_errors):
            message = str(e)
        else:
            message = environment_error(e)
            if message is None:
                raise
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2
