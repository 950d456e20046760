"""What every forked worker process does first: let go of its parent's locks, and die with it.

A forked child shares its parent's open files, and with them the parent's flock locks (a lock
belongs to the open file, and lasts while any process holds it open). A worker that outlived a
killed parent, as torch's DataLoader workers do for seconds (they poll for their parent every 5 s)
or for good (blocked writing a batch nobody reads), kept the run folder's, the cache's or
--output's lock: the next run was refused, or waited forever. So each lock this process takes is
registered here, and a worker started through `start` replaces those descriptors with /dev/null
and asks the kernel to kill it when its parent dies (Linux's PR_SET_PDEATHSIG).

Stop signals are the parent's to handle: Ctrl-C reaches the whole foreground process group, and
Slurm or systemd send SIGTERM to every process of a job. A training worker that died of one at
once would break the parent's orderly stop (its last step, its checkpoint); it ignores them
instead, and the parent ends it, or the kernel does when the parent is gone. infer.py's readers
keep SIGTERM's default, which is how torch's DataLoader ends a worker that does not answer.
"""
import ctypes
import functools
import os
import signal
import sys


_locks = {}  # descriptor -> (device, inode) of the files of this process whose locks its workers must not keep
PR_SET_PDEATHSIG = 1


def _find_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up here, in the parent: dlopen and dlsym take the dynamic loader's lock, which a forked child
# inherits as it was, so a worker forked while another thread of the parent held it would wait forever.
_prctl = _find_prctl() if sys.platform.startswith("linux") else None


def hold(f):
    """Register an open file (or descriptor) that holds a lock; returns it."""
    fd = f if isinstance(f, int) else f.fileno()
    _locks[fd] = identity(fd)
    return f


def let_go(f):
    """Unregister it (call before closing it: its number may be reused)."""
    _locks.pop(f if isinstance(f, int) else f.fileno(), None)


def identity(fd):
    try:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino
    except OSError:
        return None


def start(parent, ignore_sigterm=True):
    """The first thing a worker forked by process `parent` does."""
    if _locks:
        null = os.open(os.devnull, os.O_RDWR)
        for fd, file in _locks.items():
            if identity(fd) != file:
                continue  # closed without let_go and the number reused: not ours to touch
            try:
                os.dup2(null, fd)  # the number stays valid for any object that still refers to it
            except OSError:
                pass
        os.close(null)
        _locks.clear()
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_sigterm else signal.SIG_DFL)
    if os.getppid() != parent:  # the parent died before the line above could take effect
        os._exit(1)


def initializer(ignore_sigterm=True):
    """start() bound to this process as the parent: a worker_init_fn / pool initializer for the workers it forks."""
    return functools.partial(_start_any, os.getpid(), ignore_sigterm)


def _start_any(parent, ignore_sigterm, *_):
    start(parent, ignore_sigterm)  # DataLoader passes the worker id
